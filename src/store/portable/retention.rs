// `RetentionStore` for both backends: included by `sqlite.rs` and `postgres.rs` inside a module
// that has `Db`, `ThisStore`, `LOCK_FOR_UPDATE` and `SKIP_LOCKED` in scope (see `store/mod.rs`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::*;
use crate::error::AppResult;
#[allow(unused_imports)]
use crate::store::*;

/// Each class's table, its key, and the condition that makes a row old (`$1` is the cutoff).
/// Fixed strings, safe to put in SQL.
fn class_sql(class: DataClass) -> (&'static str, &'static str, &'static str) {
    match class {
        // A message not yet final is never deleted: it is still the dispatcher's to settle.
        DataClass::Messages => (
            "messages",
            "id",
            "created_at < $1 AND status NOT IN ('queued', 'sending')",
        ),
        DataClass::Inbound => ("incoming_messages", "id", "received_at < $1"),
        DataClass::ReminderLog => ("reminder_log", "message_id", "starts_at < $1"),
        DataClass::Audit => ("consent_audit_trail", "id", "created_at < $1"),
        // An opt-out owed is kept until it is on record (`parked_not_owed_sql!`).
        DataClass::UnmatchedCallbacks => (
            "unmatched_status_callbacks",
            "provider_sid",
            concat!("received_at < $1 AND ", parked_not_owed_sql!()),
        ),
    }
}

#[async_trait]
impl RetentionStore for ThisStore {
    async fn expire(
        &self,
        class: DataClass,
        before: DateTime<Utc>,
        limit: i64,
        dry_run: bool,
    ) -> AppResult<u64> {
        let (table, key, old) = class_sql(class);
        if dry_run {
            let count: i64 =
                sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table} WHERE {old}"))
                    .bind(before)
                    .fetch_one(&self.pool)
                    .await?;
            return Ok(count as u64);
        }
        // One bounded batch per statement: no long lock on a table the API is writing.
        let delete = format!(
            "DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE {old} LIMIT $2)"
        );
        if class != DataClass::Audit {
            return Ok(sqlx::query(&delete)
                .bind(before)
                .bind(limit)
                .execute(&self.pool)
                .await?
                .rows_affected());
        }
        // The audit trail's delete trigger lets through only rows older than a cutoff this
        // transaction has declared (migration 30): declared, used and cleared in one go.
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        sqlx::query("INSERT INTO audit_deletion_allowed (before) VALUES ($1)")
            .bind(before)
            .execute(&mut *tx)
            .await?;
        let deleted = sqlx::query(&delete)
            .bind(before)
            .bind(limit)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM audit_deletion_allowed")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    async fn record_cleanup_run(
        &self,
        ran_at: DateTime<Utc>,
        as_of: DateTime<Utc>,
        counts: &str,
    ) -> AppResult<()> {
        sqlx::query("INSERT INTO cleanup_runs (ran_at, as_of, counts) VALUES ($1, $2, $3)")
            .bind(ran_at)
            .bind(as_of)
            .bind(counts)
            .execute(&self.pool)
            .await?;
        // The run's deletions leave the file too, not only the log (found by review: the rows
        // stayed readable in the database file until the next automatic checkpoint).
        if !AFTER_DELETION.is_empty() {
            sqlx::query(AFTER_DELETION).execute(&self.pool).await?;
        }
        Ok(())
    }

    async fn cleanup_runs(&self, limit: i64) -> AppResult<Vec<CleanupRun>> {
        Ok(sqlx::query_as::<Db, CleanupRun>(
            "SELECT id, ran_at, as_of, counts FROM cleanup_runs ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}
