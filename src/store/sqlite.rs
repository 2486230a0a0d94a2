//! The embedded backend: one SQLite file in WAL mode, created on first start. One process owns
//! the queue (SQLite serialises writers), so claiming needs no row locks.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Sqlite};

use crate::error::AppResult;
use crate::vault::{KeySettings, Vault};

pub struct SqliteStore {
    pool: Pool<Sqlite>,
    /// Seals and opens the encrypted columns, and computes blind indexes.
    vault: Arc<Vault>,
}

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

impl SqliteStore {
    pub async fn connect(database_url: &str, keys: &KeySettings) -> AppResult<Self> {
        let options = SqliteConnectOptions::from_str(database_url)
            .map_err(|e| anyhow::Error::new(e).context("parsing DATABASE_URL"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before it is acknowledged. With NORMAL a power cut can lose
            // the last commits in WAL mode: a STOP already acknowledged to Twilio, a consent
            // change, a queued message.
            .synchronous(SqliteSynchronous::Full)
            // Deleted rows are overwritten, not just unlinked: an erased patient's number must
            // not linger in free pages.
            .pragma("secure_delete", "ON")
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(|e| anyhow::Error::new(e).context("opening the SQLite database"))?;
        Self::ready(pool, database_url, keys).await
    }

    /// Migrate, set up the keys and seal clear text left from before encryption.
    async fn ready(pool: Pool<Sqlite>, database_url: &str, keys: &KeySettings) -> AppResult<Self> {
        Self::migrator()
            .run(&pool)
            .await
            .map_err(|e| anyhow::Error::new(e).context("applying migrations"))?;
        let vault = portable::sealing::open_vault(&pool, database_url, keys).await?;
        let store = SqliteStore { pool, vault };
        portable::sealing::seal_clear_text(&store).await?;
        Ok(store)
    }

    fn migrator() -> &'static Migrator {
        &MIGRATOR
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
    /// After an erasure, fold the WAL into the database file (and truncate it), so the erased
    /// rows' old pages do not linger in the log.
    const AFTER_ERASURE: &str = "PRAGMA wal_checkpoint(TRUNCATE)";
    /// After clear text was sealed (once, when encryption came): rebuild the file, so the clear
    /// values' old pages leave it and the log.
    const AFTER_SEALING: &[&str] = &["PRAGMA wal_checkpoint(TRUNCATE)", "VACUUM"];
    /// A transaction that reads and then writes takes the write lock at once, so no other
    /// writer can commit between its read and its write (which SQLite would refuse).
    const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";
    include_portable_sql!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commits_are_durable_when_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::connect(&url, &KeySettings::default())
            .await
            .unwrap();
        // 2 = FULL: every commit is synced before it returns (NORMAL, 1, may lose the last ones
        // on power loss in WAL mode).
        let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(level, 2);
    }
}
