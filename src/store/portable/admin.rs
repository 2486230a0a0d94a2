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
        sqlx::query("SELECT 1").execute(&self.pool).await?;
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
