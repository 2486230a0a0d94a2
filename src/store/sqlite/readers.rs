//! Read connections for the hot reads (the number on file behind each one-time passcode, and
//! the rate limits that refuse one), run in the calling task instead of on a pool connection's
//! thread.
//!
//! Why: every sqlx SQLite query is a round trip to its connection's worker thread, several
//! channel hand-offs and thread wake-ups that cost more than the read itself (perf: about a
//! fifth of a refused send-otp's CPU). A primary-key read in WAL mode takes microseconds and
//! never waits for the writer, so it runs inline, on a connection taken from a small idle list.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::hot_writes::otp_refusal;
use super::writer::{parse_ts, prepare};
use crate::error::AppResult;
use crate::store::{Consent, LimitRefusal, OtpLimits};
use crate::vault::Vault;

/// Connections kept for reuse: a read holds one only while it runs (no await inside), so at
/// most one per runtime worker thread is in use at once; more are opened if needed, and dropped.
const IDLE_READERS: usize = 16;

pub struct SqliteReaders {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl SqliteReaders {
    pub fn new(path: &Path) -> SqliteReaders {
        SqliteReaders {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Run `read` on an idle connection (or a new one), in this task.
    fn read<T>(&self, read: impl FnOnce(&Connection) -> AppResult<T>) -> AppResult<T> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match idle {
            Some(conn) => conn,
            None => open(&self.path)?,
        };
        let answer = read(&conn);
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < IDLE_READERS {
                idle.push(conn);
            }
        }
        answer
    }

    /// The wait (seconds) a limit imposes now, if one refuses (`OtpStore::otp_refusal`). A
    /// refusal needs no writer, so abuse of a number never queues behind the one writer.
    pub fn otp_refusal(
        &self,
        vault: &Vault,
        limits: &OtpLimits<'_>,
    ) -> AppResult<Option<LimitRefusal>> {
        self.read(|conn| otp_refusal(conn, vault, limits))
    }

    /// A user's consent row as stored (sealed), like the pool's `get_consent` reads it.
    pub fn consent(&self, sql: &str, user_id: &str) -> AppResult<Option<Consent>> {
        self.read(|conn| {
            let mut statement = prepare(conn, sql, &[&user_id])?;
            let row = statement
                .raw_query()
                .next()?
                .map(|row| -> AppResult<Consent> {
                    Ok(Consent {
                        user_id: row.get(0)?,
                        phone_number: row.get(1)?,
                        sms_consent: row.get(2)?,
                        whatsapp_consent: row.get(3)?,
                        marketing_consent: row.get(4)?,
                        updated_at: parse_ts(&row.get::<_, String>(5)?)?,
                        phone_verified_at: row
                            .get::<_, Option<String>>(6)?
                            .map(|t| parse_ts(&t))
                            .transpose()?,
                        time_zone: row.get(7)?,
                    })
                })
                .transpose()?;
            Ok(row)
        })
    }
}

fn open(path: &Path) -> AppResult<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    // Reads only. A reader never waits on the writer in WAL mode; the timeout covers the moments
    // SQLite itself needs a lock (opening the log after a crash).
    conn.execute_batch("PRAGMA query_only = ON;")?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.set_prepared_statement_cache_capacity(16);
    Ok(conn)
}
