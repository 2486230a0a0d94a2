// `Store` for both backends: included by `sqlite.rs` and `postgres.rs` inside a module that
// has `Db`, `ThisStore`, `LOCK_FOR_UPDATE` and `SKIP_LOCKED` in scope (see `store/mod.rs`).

use async_trait::async_trait;
#[allow(unused_imports)]
use chrono::{DateTime, Utc};

use super::*;
use crate::error::AppResult;
#[allow(unused_imports)]
use crate::store::*;

#[async_trait]
impl Store for ThisStore {
    async fn migrate(&self) -> AppResult<()> {
        ThisStore::migrator()
            .run(&self.pool)
            .await
            .map_err(|e| anyhow::Error::new(e).context("applying migrations"))?;
        Ok(())
    }

    async fn ping(&self) -> AppResult<()> {
        // Not only a connection: the schema this build runs on. A database emptied, or
        // restored from a backup older than the last migration, answers `SELECT 1` while every
        // call fails.
        let expected = ThisStore::migrator()
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or(0);
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await?;
        let applied = applied.unwrap_or(0);
        if applied < expected {
            return Err(anyhow::anyhow!(
                "the database schema is at migration {applied}, this build needs {expected}: \
                 run `prism-messaging migrate`"
            )
            .into());
        }
        Ok(())
    }

    fn group_syncs(&self) -> u64 {
        ThisStore::group_syncs(self)
    }

    fn unreadable_claims(&self) -> u64 {
        self.unreadable_claims
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}
