//! The embedded backend: one SQLite file in WAL mode, created on first start. One process owns
//! the queue (SQLite serialises writers), so claiming needs no row locks.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Sqlite};

use super::group_sync::GroupSync;
pub use readers::SqliteReaders;
pub use writer::SqliteWriter;

mod hot_writes;
mod readers;
mod writer;
use crate::error::{AppResult, ConfigError};
use crate::vault::{KeySettings, Vault};

pub struct SqliteStore {
    pool: Pool<Sqlite>,
    /// Seals and opens the encrypted columns, and computes blind indexes.
    vault: Arc<Vault>,
    /// Makes commits durable before they are acknowledged; `None` for a database in memory.
    group_sync: Option<Arc<GroupSync>>,
    /// Runs the hot writes of many requests in one transaction (`writer.rs`); `None` for a
    /// database in memory, which only the pool's connections can reach.
    writer: Option<SqliteWriter>,
    /// Inline read connections for the hot reads (`readers.rs`); `None` for a database in memory.
    readers: Option<SqliteReaders>,
    /// Claimed messages left out because they could not be opened (`open_claimed`), since start.
    unreadable_claims: std::sync::atomic::AtomicU64,
}

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// Tries for SQLite's write lock before a write gives up with "database is locked": about ten
/// seconds of `wait_for_the_lock` (the busy timeout this replaces).
const LOCK_TRIES: i32 = 10_000;

/// How every write connection waits for the write lock another connection holds: try again
/// every millisecond, for `LOCK_TRIES`. SQLite's own handler (behind a busy timeout) sleeps
/// longer between tries the longer it waits (1, 2, 5, 10 ... 50, 100 ms), so a write that met
/// the writer thread's back-to-back batches tried every 50-100 ms and mostly found it busy
/// again: under `send-otp` load, consent changes through the pool took up to 0.9 s (p99 0.2-0.3
/// s), and a STOP would as well. Trying often costs a wake-up per millisecond while waiting.
pub(crate) fn wait_for_the_lock(tries: i32) -> bool {
    if tries >= LOCK_TRIES {
        return false;
    }
    std::thread::sleep(Duration::from_millis(1));
    true
}

/// `wait_for_the_lock` as a pooled connection's busy handler (sqlx offers only a timeout).
async fn set_lock_wait(conn: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
    /// SQLite's side of the handler: its first argument is the null pointer given below.
    extern "C" fn handler(_: *mut std::ffi::c_void, tries: std::ffi::c_int) -> std::ffi::c_int {
        std::ffi::c_int::from(wait_for_the_lock(tries))
    }
    let mut handle = conn.lock_handle().await?;
    // SAFETY: the handle is this live connection, locked for the call; the handler is a plain
    // function that never unwinds, and its argument is unused (null). sqlx and rusqlite link
    // the same libsqlite3-sys, so the handle is the type `ffi` expects.
    let set = unsafe {
        rusqlite::ffi::sqlite3_busy_handler(
            handle.as_raw_handle().as_ptr(),
            Some(handler),
            std::ptr::null_mut(),
        )
    };
    match set {
        rusqlite::ffi::SQLITE_OK => Ok(()),
        code => Err(sqlx::Error::Configuration(
            format!("setting the SQLite busy handler failed with code {code}").into(),
        )),
    }
}

/// Whether a pooled connection may go back to the pool: only outside any transaction, in sqlx's
/// view and in SQLite's. A write that fails with "database or disk is full" (or an I/O error)
/// can make SQLite roll back the whole transaction by itself; sqlx's rollback on drop then fails
/// and sqlx still counts the transaction open, so the connection's next `begin` is a `SAVEPOINT`
/// and its next commit a `RELEASE`. Once such a savepoint is rolled back to, SQLite stays inside
/// a transaction that holds the write lock, and every later commit on the connection is a
/// `RELEASE` inside it: acknowledged and never committed, while every other writer waits for
/// the lock (found by review: acknowledged consent changes, queued messages and STOPs lost
/// after the disk filled, and writes stuck until a restart after it was freed). Closing the
/// connection rolls back what it holds; the pool opens a new one when it needs one.
async fn outside_any_transaction(conn: &mut sqlx::SqliteConnection) -> Result<bool, sqlx::Error> {
    use sqlx::Connection;
    // The handle is had only after the connection's worker has run the commands queued before
    // it, a dropped transaction's rollback among them; so sqlx's count is read after it, not
    // before (read before, it still counted a transaction whose rollback was queued).
    let mut handle = conn.lock_handle().await?;
    // SAFETY: the handle is this live connection, locked for the call; `sqlite3_get_autocommit`
    // only reads the connection's state.
    let sqlite_has_one =
        unsafe { rusqlite::ffi::sqlite3_get_autocommit(handle.as_raw_handle().as_ptr()) } == 0;
    drop(handle);
    let sqlx_counts_one = conn.is_in_transaction();
    if sqlx_counts_one || sqlite_has_one {
        // A warning: the failed write that led here logged its own error, and closing the
        // connection recovers from it.
        tracing::warn!(
            sqlx_counts_one,
            sqlite_has_one,
            "a database connection was left inside a transaction after a failed write: closed"
        );
        return Ok(false);
    }
    Ok(true)
}

/// An exclusive lock on `<file>.lock`, held while a process opens, migrates and seals the
/// database. A file of its own: closing any descriptor of the database file would drop SQLite's
/// own locks on it.
async fn setup_lock(file: &std::path::Path) -> AppResult<std::fs::File> {
    let mut name = file.as_os_str().to_owned();
    name.push(".lock");
    let path = std::path::PathBuf::from(name);
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        lock.lock()?;
        Ok::<_, std::io::Error>(lock)
    })
    .await
    .map_err(anyhow::Error::new)?
    .map_err(|e| {
        anyhow::Error::new(ConfigError::new(
            "DATABASE_URL",
            format!("cannot open the SQLite database's lock file {shown}: {e}"),
        ))
        .into()
    })
}

impl SqliteStore {
    pub async fn connect(database_url: &str, keys: &KeySettings) -> AppResult<Self> {
        // Two processes starting on a new file each applied the migrations (found by review: one
        // exited with "table already exists" or "database is locked"); the setup runs under a
        // lock beside the file, so the second waits and finds it done.
        let setup = match crate::vault::sqlite_file(database_url) {
            Some(file) => Some(setup_lock(&file).await?),
            None => None,
        };
        let store = Self::connect_and_set_up(database_url, keys).await;
        drop(setup);
        store
    }

    async fn connect_and_set_up(database_url: &str, keys: &KeySettings) -> AppResult<Self> {
        let options = SqliteConnectOptions::from_str(database_url)
            .map_err(|e| anyhow::Error::new(e).context("parsing DATABASE_URL"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL: a commit reaches the log, not yet the disk; nothing is acknowledged before
            // the group fsync that follows it (`GroupSync`), so many requests share one fsync
            // and a power cut still loses nothing acknowledged: a STOP, a consent change, a
            // queued message.
            .synchronous(SqliteSynchronous::Normal)
            // Deleted rows are overwritten, not just unlinked: an erased patient's number must
            // not linger in free pages.
            .pragma("secure_delete", "ON")
            // While a new connection sets itself up; `set_lock_wait` then replaces it.
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .after_connect(|conn, _| Box::pin(set_lock_wait(conn)))
            .after_release(|conn, _| Box::pin(outside_any_transaction(conn)))
            // A connection to a local file does not go stale; sqlx's default check before each
            // acquire is a round trip to the connection's thread (perf: the largest cost of a
            // refused send-otp after the fsync).
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(|e| {
                // Nearly always the setting: a directory that does not exist or cannot be
                // written. Named as such, so the start is refused like any bad setting.
                let file = crate::vault::sqlite_file(database_url)
                    .map_or_else(|| "in memory".into(), |path| path.display().to_string());
                anyhow::Error::new(ConfigError::new(
                    "DATABASE_URL",
                    format!("cannot open the SQLite database {file}: {e}"),
                ))
            })?;
        Self::ready(pool, database_url, keys).await
    }

    /// Migrate, set up the keys and seal clear text left from before encryption.
    async fn ready(pool: Pool<Sqlite>, database_url: &str, keys: &KeySettings) -> AppResult<Self> {
        Self::migrator()
            .run(&pool)
            .await
            .map_err(|e| anyhow::Error::new(e).context("applying migrations"))?;
        let vault = portable::sealing::open_vault(&pool, database_url, keys).await?;
        let group_sync =
            crate::vault::sqlite_file(database_url).map(|file| Arc::new(GroupSync::new(file)));
        let mut store = SqliteStore {
            pool,
            vault,
            group_sync,
            writer: None,
            readers: None,
            unreadable_claims: Default::default(),
        };
        portable::sealing::seal_clear_text(&store).await?;
        // Migrations and sealing reach the disk before the first answer.
        store.sync_commits().await?;
        if let Some(file) = crate::vault::sqlite_file(database_url) {
            store.writer = Some(SqliteWriter::start(&file)?);
            store.readers = Some(SqliteReaders::new(&file));
        }
        Ok(store)
    }

    fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    /// Wait until every commit made so far is on disk (one fsync shared by every waiter that
    /// arrives while the previous one runs).
    async fn sync_commits(&self) -> AppResult<()> {
        match &self.group_sync {
            Some(sync) => sync.wait().await,
            None => Ok(()),
        }
    }

    /// fsyncs of the log so far (group commits).
    pub fn group_syncs(&self) -> u64 {
        self.group_sync.as_ref().map_or(0, |s| s.syncs())
    }

    /// The writer thread for the hot writes, when the database is a file.
    fn writer(&self) -> Option<&SqliteWriter> {
        self.writer.as_ref()
    }

    /// The inline read connections, when the database is a file.
    fn readers(&self) -> Option<&SqliteReaders> {
        self.readers.as_ref()
    }

    /// PostgreSQL's functions for the hot writes have no counterpart here: the writer thread
    /// runs them (`writer()`), or the portable transactions for a database in memory.
    fn functions(&self) -> Option<&super::postgres::functions::PgFunctions> {
        None
    }

    /// SQLite serialises writers: the transaction's first write holds the lock. Nothing to do.
    async fn lock_keys(
        _tx: &mut sqlx::Transaction<'_, Sqlite>,
        _keys: &mut [String],
    ) -> AppResult<()> {
        Ok(())
    }
}

mod portable {
    use super::SqliteStore as ThisStore;
    use sqlx::Sqlite as Db;
    /// SQLite has no row locks; the transaction's write lock already serialises writers.
    /// One process owns a SQLite queue: nothing to skip.
    const SKIP_LOCKED: &str = "";
    const LOCK_FOR_UPDATE: &str = "";
    /// After an erasure or a retention run, fold the WAL into the database file (and truncate
    /// it), so the deleted rows' pages (zeroed by `secure_delete`) replace the old ones in the
    /// file and do not linger in the log.
    const AFTER_DELETION: &str = "PRAGMA wal_checkpoint(TRUNCATE)";
    /// After clear text was sealed (once, when encryption came): rebuild the file, so the clear
    /// values' old pages leave it and the log. In WAL mode `VACUUM` writes the rebuilt pages to
    /// the log, and only a checkpoint puts them over the old ones in the file (without the last
    /// checkpoint, pages the sealing's growing rows had left stayed in the file in clear until
    /// the next automatic checkpoint: found when the test got 400 rows).
    const AFTER_SEALING: &[&str] = &[
        "PRAGMA wal_checkpoint(TRUNCATE)",
        "VACUUM",
        "PRAGMA wal_checkpoint(TRUNCATE)",
    ];
    /// The whole file was rebuilt (`AFTER_SEALING`): no table to rewrite apart.
    const REWRITE_SEALED_TABLE: &str = "";
    /// A transaction that reads and then writes takes the write lock at once, so no other
    /// writer can commit between its read and its write (which SQLite would refuse).
    const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";
    /// SQLite's planner reads `messages_due` in order for a claim without being told
    /// (`store_conformance::claims_read_the_due_queue_in_index_order`).
    const CLAIM_PLAN: Option<&str> = None;
    include_portable_sql!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store on a new database file (with its writer, readers and group fsync); the file
    /// lives as long as the returned directory.
    async fn store_on_a_file() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::connect(&url, &KeySettings::default())
            .await
            .unwrap();
        (dir, store)
    }

    /// A write through the pool and one through the writer thread, each meeting the write lock
    /// another connection holds for a while, wait for it (`wait_for_the_lock`) and then succeed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_wait_for_a_lock_another_connection_holds() {
        use crate::store::{ChangeContext, Consent, ConsentSource, ConsentStore, OtpStore};
        let (dir, store) = store_on_a_file().await;
        let holder = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let started = std::time::Instant::now();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            holder.execute_batch("COMMIT").unwrap();
        });
        let now = chrono::Utc::now();
        let ctx = ChangeContext {
            source: ConsentSource::Api,
            ip: None,
            user_agent: None,
            at: now,
        };
        let consent_on = |c: &Consent| {
            let mut next = c.clone();
            next.sms_consent = true;
            Ok(next)
        };
        let (pool_write, writer_write) = tokio::join!(
            store.update_consent("u1", &consent_on, &ctx),
            store.record_otp_failure("u1", "login", now, now + chrono::Duration::minutes(10)),
        );
        assert!(pool_write.unwrap().sms_consent);
        assert_eq!(writer_write.unwrap(), 1);
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "both waited for the lock"
        );
        release.join().unwrap();
    }

    /// A pooled write that fails on a full disk (here the connection's page limit), after which
    /// SQLite rolled its transaction back by itself, leaves no connection in the pool that is
    /// inside a transaction: the next writes begin their own, commit, are seen by another
    /// connection, and leave the write lock free (found by review: on a full disk, acknowledged
    /// writes went into a transaction never committed, and writes stayed stuck after).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_failed_on_a_full_disk_leaves_no_connection_inside_a_transaction() {
        use crate::store::{ChangeContext, ConsentSource, ConsentStore};
        use sqlx::Connection;
        let (dir, store) = store_on_a_file().await;
        {
            let mut conn = store.pool.acquire().await.unwrap();
            let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            sqlx::query(&format!("PRAGMA max_page_count = {}", pages + 2))
                .execute(&mut *conn)
                .await
                .unwrap();
            let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.unwrap();
            let mut failed = None;
            for i in 0..200 {
                let insert = sqlx::query(
                    "INSERT INTO messaging_consent (user_id, created_at, updated_at) \
                     VALUES ($1 || hex(randomblob(1500)), '2026-01-01', '2026-01-01')",
                )
                .bind(i.to_string())
                .execute(&mut *tx)
                .await;
                if let Err(e) = insert {
                    failed = Some(e.to_string());
                    break;
                }
            }
            let failed = failed.expect("the page limit was reached");
            assert!(failed.contains("full"), "{failed}");
            drop(tx);
        }
        // Every connection the pool hands out now is outside any transaction.
        let mut held = Vec::new();
        for _ in 0..store.pool.size().max(1) {
            let mut conn = store.pool.acquire().await.unwrap();
            assert!(!conn.is_in_transaction(), "sqlx counts no transaction");
            let mut handle = conn.lock_handle().await.unwrap();
            let autocommit =
                unsafe { rusqlite::ffi::sqlite3_get_autocommit(handle.as_raw_handle().as_ptr()) };
            assert_ne!(autocommit, 0, "SQLite has no transaction open");
            drop(handle);
            held.push(conn);
        }
        drop(held);
        let ctx = ChangeContext {
            source: ConsentSource::Api,
            ip: None,
            user_agent: None,
            at: chrono::Utc::now(),
        };
        let consent_on = |c: &crate::store::Consent| {
            let mut next = c.clone();
            next.sms_consent = true;
            Ok(next)
        };
        for user in ["after-1", "after-2", "after-3"] {
            store.update_consent(user, &consent_on, &ctx).await.unwrap();
        }
        let other = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
        let stored: i64 = other
            .query_row(
                "SELECT COUNT(*) FROM messaging_consent WHERE user_id LIKE 'after-%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored, 3, "each acknowledged write is committed");
        other.execute_batch("BEGIN IMMEDIATE; ROLLBACK").unwrap();
    }

    /// A database in memory has no writer thread: its OTP issue is the portable transaction,
    /// which records an in-process provider's send in the issue as the writer and PostgreSQL do
    /// (`store_conformance` covers those two).
    #[tokio::test]
    async fn in_memory_an_otp_accepted_in_process_is_recorded_in_its_issue() {
        use crate::store::{
            AcceptedSend, MessageStatus, MessageStore, OtpIssueOutcome, OtpStore, SendAttempt,
        };
        let store = SqliteStore::connect("sqlite::memory:", &KeySettings::default())
            .await
            .unwrap();
        assert!(store.writer().is_none());
        let mut issue = crate::store::tests::issue(chrono::Utc::now(), None);
        issue.attempt = Some(SendAttempt {
            to_number: issue.send_to.clone(),
            channel: crate::store::Channel::Sms,
            encoding: Some("GSM-7".into()),
            segments: Some(1),
            body: None,
            take_slot: None,
        });
        issue.accepted = Some(AcceptedSend {
            provider_sid: "SM42".into(),
            news: Some(MessageStatus::Delivered),
        });
        let outcome = store.issue_otp(&issue).await.unwrap();
        assert!(matches!(outcome, OtpIssueOutcome::Issued(_)));
        let m = store.get_message("m1").await.unwrap().unwrap();
        assert_eq!(
            (m.status, m.provider_sid.as_deref(), m.lease_until),
            (MessageStatus::Delivered, Some("SM42"), None)
        );
        let events: Vec<String> = store
            .message_events("m1")
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.status.to_string())
            .collect();
        assert_eq!(events, ["sending", "sent", "delivered"]);
    }

    #[tokio::test]
    async fn commits_are_made_durable_by_a_group_fsync() {
        use crate::store::MessageStore;
        let (_dir, store) = store_on_a_file().await;
        // 1 = NORMAL: a commit reaches the log; the fsync is the group's, before any answer.
        let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(level, 1);
        let before = store.group_syncs();
        sqlx::query("INSERT INTO vault_meta (name, value) VALUES ('t', 'v')")
            .execute(&store.pool)
            .await
            .unwrap();
        store.durable().await.unwrap();
        assert_eq!(store.group_syncs(), before + 1);
    }

    /// Messages queued one by one (through the pool, not the writer) keep the log bounded: its
    /// automatic checkpoint runs and copies them into the database file. A commit that only
    /// happens when a `RETURNING` statement is reset skips that checkpoint, and 2,000 queued
    /// messages left a 77 MB log beside an untouched 4 KiB database.
    #[tokio::test]
    async fn queued_messages_are_checkpointed_out_of_the_log() {
        use crate::store::{MessageStore, NewMessage};
        let (dir, store) = store_on_a_file().await;
        let now = chrono::Utc::now();
        for i in 0..2_000 {
            let message = NewMessage {
                id: format!("m{i}"),
                user_id: "u1".into(),
                template_name: "payment_received".into(),
                variables: format!(r#"{{"amount":"INR {i}.00"}}"#),
                channel: crate::channel::Channel::Sms,
                idempotency_key: None,
                created_at: now,
                claimed_until: None,
            };
            store.insert_message(&message).await.unwrap();
        }
        let size = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().len();
        // The automatic checkpoint starts at 1,000 pages (4 MB); the log is reused after it.
        assert!(
            size("t.db-wal") < 8 << 20,
            "the log is {} bytes: never checkpointed",
            size("t.db-wal")
        );
        assert!(
            size("t.db") > 1 << 20,
            "the database file is {} bytes: nothing was checkpointed into it",
            size("t.db")
        );
    }

    /// An OTP a limit refuses is refused by a read of committed state, never queued for the
    /// writer: answered while the writer is held up, with the wait the writer would give.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rate_limited_otp_is_refused_by_a_read_without_the_writer() {
        use crate::store::{OtpIssueOutcome, OtpStore};
        let (_dir, store) = store_on_a_file().await;
        let now = chrono::Utc::now();
        let issue = |id: &str| {
            let mut issue = crate::store::tests::issue(now, Some("198.18.0.1"));
            issue.message.id = id.into();
            issue
        };
        let first = store.issue_otp(&issue("m1")).await.unwrap();
        assert!(matches!(first, OtpIssueOutcome::Issued(_)));
        // Hold the writer until told.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (running, started) = std::sync::mpsc::channel::<()>();
        let store = Arc::new(store);
        let holding = {
            let store = store.clone();
            tokio::spawn(async move {
                let writer = store.writer().unwrap();
                writer
                    .write(move |_| {
                        let _ = running.send(());
                        let _ = held.recv();
                        Ok(())
                    })
                    .await
            })
        };
        tokio::task::spawn_blocking(move || started.recv())
            .await
            .unwrap()
            .unwrap();
        let second = issue("m2");
        let refused = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            store.otp_refusal(&second.limits()),
        )
        .await
        .expect("a refusal does not wait for the writer")
        .unwrap();
        assert!(
            refused.is_some_and(|r| (59..=60).contains(&r.retry_after_seconds)),
            "the cooldown's wait: {refused:?}"
        );
        release.send(()).unwrap();
        holding.await.unwrap().unwrap();
        // The writer, checking under its lock, refuses it too; a send within the limits is
        // not refused by the read.
        let wait = match store.issue_otp(&second).await.unwrap() {
            OtpIssueOutcome::RateLimited(refusal) => refusal.retry_after_seconds,
            other => panic!("not refused: {other:?}"),
        };
        assert!((59..=60).contains(&wait), "the cooldown's wait: {wait}");
        let mut other = issue("m3");
        other.user_id = "u2".into();
        other.phone_number = "+14155552672".into();
        assert_eq!(store.otp_refusal(&other.limits()).await.unwrap(), None);
        let logged: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM otp_send_log")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(logged, 1, "the refusal logged nothing");
    }

    #[tokio::test]
    async fn claims_walk_their_indexes_never_the_queue() {
        let (_dir, store) = store_on_a_file().await;
        // Each step of the claim: the index it must use. Walking the SID index (every message
        // not yet sent) or scanning the table made dispatch slower the longer the queue.
        use crate::store::Stale;
        let otp = "messages_due_otp";
        let stale = "messages_due (status=?)";
        let queued = "messages_due (status=? AND next_attempt_at<?)";
        let steps = [
            (Stale::Include, vec![otp, stale, queued]),
            (Stale::Skip, vec![otp, queued]),
        ];
        for (sql, index) in steps.iter().flat_map(|(stale, expected)| {
            let sql = crate::store::claim_sql("", *stale);
            assert_eq!(sql.len(), expected.len());
            sql.into_iter().zip(expected.clone())
        }) {
            let plan: Vec<(i64, i64, i64, String)> =
                sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .bind("2027-01-01T00:00:00+00:00")
                    .bind("2027-01-01T00:00:00+00:00")
                    .bind(10i64)
                    .fetch_all(&store.pool)
                    .await
                    .unwrap();
            let plan: Vec<&str> = plan.iter().map(|row| row.3.as_str()).collect();
            let plan = plan.join(" | ");
            assert!(plan.contains(index), "{index} not in {plan}");
            assert!(
                !plan.contains("provider_sid"),
                "walks the SID index: {plan}"
            );
            assert!(!plan.contains("SCAN messages"), "scans the table: {plan}");
        }
    }
}
