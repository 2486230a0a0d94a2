//! The embedded backend: one SQLite file in WAL mode, created on first start. One process owns
//! the queue (SQLite serialises writers), so claiming needs no row locks.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Sqlite};

use crate::error::AppResult;
use crate::store::{MessageRecord, MESSAGE_COLUMNS};

pub struct SqliteStore {
    pool: Pool<Sqlite>,
}

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

impl SqliteStore {
    pub async fn connect(database_url: &str) -> AppResult<Self> {
        let options = SqliteConnectOptions::from_str(database_url)
            .map_err(|e| anyhow::Error::new(e).context("parsing DATABASE_URL"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(|e| anyhow::Error::new(e).context("opening the SQLite database"))?;
        Ok(SqliteStore { pool })
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

    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> AppResult<Vec<MessageRecord>> {
        let sql = format!(
            "UPDATE messages SET lease_until = $1 WHERE id IN ( \
                SELECT id FROM messages \
                WHERE (status = 'queued' AND next_attempt_at <= $2 AND (lease_until IS NULL OR lease_until < $2)) \
                OR (status = 'sending' AND provider_sid IS NULL AND lease_until < $2) \
                ORDER BY next_attempt_at LIMIT $3) \
             RETURNING {MESSAGE_COLUMNS}"
        );
        Ok(sqlx::query_as::<Sqlite, MessageRecord>(&sql)
            .bind(lease_until)
            .bind(now)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }
}

mod portable {
    use super::SqliteStore as ThisStore;
    use sqlx::Sqlite as Db;
    /// SQLite has no row locks; the transaction's write lock already serialises writers.
    const LOCK_FOR_UPDATE: &str = "";
    include!("portable.rs");
}
