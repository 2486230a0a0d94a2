//! The PostgreSQL backend, for deployments with several instances sharing one queue: claiming
//! uses `FOR UPDATE SKIP LOCKED`, so two dispatchers never take the same message.

use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Pool, Postgres};

use crate::error::{AppError, AppResult, ConfigError};
use crate::vault::{KeySettings, Vault};
use functions::PgFunctions;

mod batch;
pub mod functions;

pub struct PostgresStore {
    pool: Pool<Postgres>,
    /// Seals and opens the encrypted columns, and computes blind indexes.
    vault: Arc<Vault>,
    /// The hot writes as one call each (`functions.rs`).
    functions: PgFunctions,
    /// Claimed messages left out because they could not be opened (`open_claimed`), since start.
    unreadable_claims: std::sync::atomic::AtomicU64,
}

/// The settings every session of this service runs with, set once per new connection (one round
/// trip):
///
/// - `synchronous_commit` back on where the server, database or role turned it off. Every answer
///   here says its writes are stored, so a commit must be on disk when it returns; `off` (common
///   advice for throughput) acknowledges commits a crash can still lose. Every other value
///   (`local`, `on`, `remote_write`, `remote_apply`) flushes locally before the commit returns and
///   is kept as the operator chose it.
/// - `jit` off. PostgreSQL compiles a statement whose estimated cost passes `jit_above_cost`, at
///   every execution. This service's statements are short (index probes and a few rows written),
///   but estimates are not: on a table the planner has no statistics for (a new database, or
///   autovacuum off or behind), it takes each probe of `otp_send_log` to match hundreds of rows.
///   With 200,000 codes logged and no statistics, `otp_issue_batch`'s statement cost passed
///   100,000 and each call took about 420 ms compiling it instead of 3 ms: `send-otp` on
///   PostgreSQL made 18 codes/s against 1,620 with JIT off (`bench/write-path.sh`, the grown log).
async fn session_settings(connection: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let (_, turned_on): (String, Option<String>) = sqlx::query_as(
        "SELECT set_config('jit', 'off', false), \
         CASE WHEN current_setting('synchronous_commit') = 'off' \
         THEN set_config('synchronous_commit', 'on', false) END",
    )
    .fetch_one(connection)
    .await?;
    if turned_on.is_some() {
        WARNED.call_once(|| {
            tracing::warn!(
                "PostgreSQL is set to synchronous_commit = off; this service's sessions commit \
                 with it on, so nothing it acknowledges can be lost in a crash"
            )
        });
    }
    Ok(())
}

/// Server settings under which PostgreSQL itself can lose or tear what it committed, whatever
/// a session asks: `fsync = off` (a power cut or OS crash can lose or corrupt acknowledged
/// writes) and `full_page_writes = off` (a page torn by a power cut cannot be repaired from the
/// log). Neither can be changed per session, so the service says so at start instead of failing:
/// a developer's throwaway server may run that way on purpose; a clinic's must not.
const DURABILITY_SETTINGS: [&str; 2] = ["fsync", "full_page_writes"];

/// Which of the boolean settings `names` are off, as this session sees them, by name.
async fn settings_off<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    names: &[&str],
) -> AppResult<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT name FROM pg_settings WHERE name = ANY($1) AND setting = 'off' ORDER BY name",
    )
    .bind(names)
    .fetch_all(executor)
    .await?)
}

static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// A pooled connection idle this long is pinged before it is handed out.
const IDLE_BEFORE_CHECK: Duration = Duration::from_secs(5);

impl PostgresStore {
    pub async fn connect(database_url: &str, keys: &KeySettings) -> AppResult<Self> {
        // No key, no start, before anything is written (and before waiting on the server).
        keys.current_key(database_url, false)?;
        // A URL sqlx cannot read is a setting to fix (exit code 2), not a server that is down.
        let options: PgConnectOptions = database_url.parse().map_err(|e: sqlx::Error| {
            AppError::Internal(ConfigError::new("DATABASE_URL", e.to_string()).into())
        })?;
        // One connection first, for its own error: the pool retries until its timeout and then
        // says only that it timed out, hiding a refused port or a wrong password.
        let first = tokio::time::timeout(
            Duration::from_secs(10),
            <sqlx::PgConnection as sqlx::Connection>::connect_with(&options),
        )
        .await
        .map_err(|_| anyhow::anyhow!("connecting to PostgreSQL (DATABASE_URL): no answer in 10 s"))?
        .map_err(|e| anyhow::Error::new(e).context("connecting to PostgreSQL (DATABASE_URL)"))?;
        let _ = sqlx::Connection::close(first).await;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            // sqlx pings a connection on every acquire by default: a round trip to the server
            // per query. Only a connection that sat idle (where a server restart or a dropped
            // link would show) is checked; one in steady use answers for itself.
            .test_before_acquire(false)
            .after_connect(|connection, _meta| Box::pin(session_settings(connection)))
            .before_acquire(|connection, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_BEFORE_CHECK {
                        sqlx::Connection::ping(connection).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| anyhow::Error::new(e).context("connecting to PostgreSQL"))?;
        for setting in settings_off(&pool, &DURABILITY_SETTINGS).await? {
            tracing::warn!(
                setting,
                "PostgreSQL runs with {setting} = off: a power cut or operating system crash can \
                 lose or corrupt what it stored, acknowledged STOPs and consent changes included; \
                 turn it on for any real patient data (full_page_writes may stay off only on \
                 storage that never tears a page, such as ZFS)"
            );
        }
        Self::migrator()
            .run(&pool)
            .await
            .map_err(|e| anyhow::Error::new(e).context("applying migrations"))?;
        let vault = portable::sealing::open_vault(&pool, database_url, keys).await?;
        let store = PostgresStore {
            functions: PgFunctions::new(pool.clone()),
            pool,
            vault,
            unreadable_claims: Default::default(),
        };
        portable::sealing::seal_clear_text(&store).await?;
        Ok(store)
    }

    /// A setting as this store's sessions run with it (`session_settings`), such as
    /// `synchronous_commit` or `jit`.
    pub async fn session_setting(&self, name: &str) -> AppResult<String> {
        Ok(sqlx::query_scalar("SELECT current_setting($1)")
            .bind(name)
            .fetch_one(&self.pool)
            .await?)
    }

    fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    /// A PostgreSQL commit is durable when it returns (`synchronous_commit` on): nothing to wait
    /// for.
    async fn sync_commits(&self) -> AppResult<()> {
        Ok(())
    }

    /// No group fsyncs here: a PostgreSQL commit is durable when it returns.
    fn group_syncs(&self) -> u64 {
        0
    }

    /// The SQLite writer thread has no counterpart here: PostgreSQL runs its writes concurrently.
    fn writer(&self) -> Option<&super::sqlite::SqliteWriter> {
        None
    }

    /// Reads go through the pool: a PostgreSQL query is a round trip to the server either way.
    fn readers(&self) -> Option<&super::sqlite::SqliteReaders> {
        None
    }

    /// The hot writes as one function call each (one round trip, one commit).
    fn functions(&self) -> Option<&PgFunctions> {
        Some(&self.functions)
    }

    /// Transaction-scoped advisory locks on each key, taken in sorted order so two transactions
    /// locking overlapping keys cannot deadlock.
    async fn lock_keys(
        tx: &mut sqlx::Transaction<'_, Postgres>,
        keys: &mut [String],
    ) -> AppResult<()> {
        // One round trip for all of them, taken in sorted order (volatile functions are
        // evaluated after the sort), so two transactions never wait on each other in a circle.
        keys.sort();
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) \
             FROM unnest($1::text[]) WITH ORDINALITY AS t(k, n) ORDER BY n",
        )
        .bind(&*keys)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

mod portable {
    use super::PostgresStore as ThisStore;
    use sqlx::Postgres as Db;
    /// Lock the row read inside a transaction, so concurrent updates see each other's writes.
    /// Rows another instance is claiming right now are skipped, not waited for.
    const SKIP_LOCKED: &str = " FOR UPDATE SKIP LOCKED";
    const LOCK_FOR_UPDATE: &str = " FOR UPDATE";
    /// Nothing to fold: PostgreSQL's own vacuum reclaims deleted rows.
    const AFTER_DELETION: &str = "";
    /// Nothing to fold before the tables are rewritten (`REWRITE_SEALED_TABLE`).
    const AFTER_SEALING: &[&str] = &[];
    /// The sealing's updates leave each clear row's old version in the table files. A plain
    /// vacuum frees that space without overwriting it (found by review: 2,983 of 3,000 clear
    /// numbers were still in a table's file after one), so each table the sealing wrote is
    /// rewritten into a new file and the old one dropped. Once, when encryption came; each
    /// rewrite locks its table for as long as it takes.
    const REWRITE_SEALED_TABLE: &str = "VACUUM FULL";
    /// Rows read to be written are locked with `LOCK_FOR_UPDATE` instead.
    const BEGIN_WRITE: &str = "BEGIN";
    /// Claims read the due queue in index order whatever the statistics say.
    const CLAIM_PLAN: Option<&str> = Some(crate::store::POSTGRES_CLAIM_PLAN);
    include_portable_sql!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the real server (`TEST_DATABASE_URL`); skipped without one, as the PostgreSQL
    /// integration suite is (CI sets it and fails if the server is unreachable). The server's own
    /// durability settings cannot be turned off from a test, so a session setting stands in.
    #[tokio::test]
    async fn the_settings_that_are_off_are_named() {
        use sqlx::Connection;
        let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
            return;
        };
        let mut connection = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("SET enable_seqscan = off")
            .execute(&mut connection)
            .await
            .unwrap();
        let off = settings_off(&mut connection, &["enable_seqscan", "enable_indexscan"]);
        assert_eq!(off.await.unwrap(), ["enable_seqscan"]);
        // The names checked at start are settings this role can read (a misspelt one would
        // never be found off).
        let readable: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_settings WHERE name = ANY($1)")
                .bind(&DURABILITY_SETTINGS[..])
                .fetch_one(&mut connection)
                .await
                .unwrap();
        assert_eq!(readable, 2);
    }
}
