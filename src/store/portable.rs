// The `Store` implementation shared by both backends. This file is not a module of its own: each
// backend `include!`s it inside a `portable` module that has `Db` (the sqlx database type),
// `ThisStore` (the backend's store) and `LOCK_FOR_UPDATE` in scope, so the SQL below compiles
// against each backend's concrete types. Keep the SQL portable: `$1` placeholders,
// `ON CONFLICT`, `RETURNING`, times bound from Rust (never `now()`), and every transaction
// starting with a write (so SQLite takes its write lock up front instead of failing to upgrade).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::AppResult;
use crate::store::{
    ChangeContext, Consent, ConsentAuditRecord, ConsentPatch, DispatchResult, MessageEvent, MessageRecord,
    NewMessage, SendAttempt, Store, MESSAGE_COLUMNS,
};

const CONSENT_COLUMNS: &str =
    "user_id, phone_number, sms_consent, whatsapp_consent, marketing_consent, updated_at";

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

    async fn get_consent(&self, user_id: &str) -> AppResult<Option<Consent>> {
        let sql = format!("SELECT {CONSENT_COLUMNS} FROM messaging_consent WHERE user_id = $1");
        Ok(sqlx::query_as::<Db, Consent>(&sql)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn update_consent(&self, user_id: &str, patch: &ConsentPatch, ctx: &ChangeContext) -> AppResult<Consent> {
        let mut tx = self.pool.begin().await?;
        // Create the row if missing (this write also takes SQLite's lock), then read it locked so
        // concurrent changes audit the true old values.
        let created = sqlx::query(
            "INSERT INTO messaging_consent (user_id, created_at, updated_at) VALUES ($1, $2, $2) \
             ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(user_id)
        .bind(ctx.at)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let sql = format!("SELECT {CONSENT_COLUMNS} FROM messaging_consent WHERE user_id = $1{LOCK_FOR_UPDATE}");
        let current = sqlx::query_as::<Db, Consent>(&sql)
            .bind(user_id)
            .fetch_one(&mut *tx)
            .await?;
        let mut next = current.patched(patch)?;
        let changes = current.changes_to(&next, created);
        if changes.is_empty() {
            tx.commit().await?;
            return Ok(current);
        }
        next.updated_at = ctx.at;
        sqlx::query(
            "UPDATE messaging_consent SET phone_number = $2, sms_consent = $3, whatsapp_consent = $4, \
             marketing_consent = $5, updated_at = $6 WHERE user_id = $1",
        )
        .bind(user_id)
        .bind(&next.phone_number)
        .bind(next.sms_consent)
        .bind(next.whatsapp_consent)
        .bind(next.marketing_consent)
        .bind(next.updated_at)
        .execute(&mut *tx)
        .await?;
        for (field, old_value, new_value) in changes {
            sqlx::query(
                "INSERT INTO consent_audit_trail \
                 (user_id, field, old_value, new_value, source, ip, user_agent, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(user_id)
            .bind(field)
            .bind(old_value)
            .bind(new_value)
            .bind(ctx.source.as_str())
            .bind(&ctx.ip)
            .bind(&ctx.user_agent)
            .bind(ctx.at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(next)
    }

    async fn consent_audit(&self, user_id: &str) -> AppResult<Vec<ConsentAuditRecord>> {
        Ok(sqlx::query_as::<Db, ConsentAuditRecord>(
            "SELECT id, user_id, field, old_value, new_value, source, ip, user_agent, created_at \
             FROM consent_audit_trail WHERE user_id = $1 ORDER BY id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn insert_message(&self, m: &NewMessage) -> AppResult<(MessageRecord, bool)> {
        let sql = format!(
            "INSERT INTO messages (id, user_id, template_name, variables, channel, status, attempts, \
             idempotency_key, next_attempt_at, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, 'queued', 0, $6, $7, $7, $7) \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING {MESSAGE_COLUMNS}"
        );
        let inserted = sqlx::query_as::<Db, MessageRecord>(&sql)
            .bind(&m.id)
            .bind(&m.user_id)
            .bind(&m.template_name)
            .bind(&m.variables)
            .bind(m.channel.as_str())
            .bind(&m.idempotency_key)
            .bind(m.created_at)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(record) = inserted {
            return Ok((record, true));
        }
        // Only a taken idempotency key makes the insert a no-op.
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE idempotency_key = $1");
        let existing = sqlx::query_as::<Db, MessageRecord>(&sql)
            .bind(&m.idempotency_key)
            .fetch_one(&self.pool)
            .await?;
        Ok((existing, false))
    }

    async fn get_message(&self, id: &str) -> AppResult<Option<MessageRecord>> {
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1");
        Ok(sqlx::query_as::<Db, MessageRecord>(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn message_events(&self, id: &str) -> AppResult<Vec<MessageEvent>> {
        Ok(sqlx::query_as::<Db, MessageEvent>(
            "SELECT status, error_code, detail, occurred_at FROM message_events \
             WHERE message_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn user_messages(&self, user_id: &str, limit: i64) -> AppResult<Vec<MessageRecord>> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE user_id = $1 \
             ORDER BY created_at DESC, id DESC LIMIT $2"
        );
        Ok(sqlx::query_as::<Db, MessageRecord>(&sql)
            .bind(user_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn claim_due_messages(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> AppResult<Vec<MessageRecord>> {
        let mut claimed = self.claim_due(now, lease_until, limit).await?;
        claimed.sort_by(|a, b| a.next_attempt_at.cmp(&b.next_attempt_at).then(a.id.cmp(&b.id)));
        Ok(claimed)
    }

    async fn mark_sending(&self, id: &str, attempt: &SendAttempt, now: DateTime<Utc>) -> AppResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE messages SET status = 'sending', attempts = attempts + 1, to_number = $2, \
             encoding = $3, segments = $4, updated_at = $5 WHERE id = $1",
        )
        .bind(id)
        .bind(&attempt.to_number)
        .bind(&attempt.encoding)
        .bind(attempt.segments)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        insert_event(&mut tx, id, "sending", None, None, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn record_dispatch(&self, id: &str, result: &DispatchResult, now: DateTime<Utc>) -> AppResult<()> {
        let mut tx = self.pool.begin().await?;
        let (status, code, detail) = match result {
            DispatchResult::Sent { provider_sid, status } => {
                sqlx::query(
                    "UPDATE messages SET status = $2, provider_sid = $3, reason = NULL, error_code = NULL, \
                     error_message = NULL, lease_until = NULL, updated_at = $4 WHERE id = $1",
                )
                .bind(id)
                .bind(status)
                .bind(provider_sid)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                (status.as_str(), None, None)
            }
            DispatchResult::Skipped { reason } => {
                sqlx::query(
                    "UPDATE messages SET status = 'skipped', reason = $2, lease_until = NULL, updated_at = $3 \
                     WHERE id = $1",
                )
                .bind(id)
                .bind(reason)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                ("skipped", None, Some(reason.clone()))
            }
            DispatchResult::Failed { code, message } => {
                sqlx::query(
                    "UPDATE messages SET status = 'failed', error_code = $2, error_message = $3, \
                     lease_until = NULL, updated_at = $4 WHERE id = $1",
                )
                .bind(id)
                .bind(code)
                .bind(message)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                ("failed", *code, Some(message.clone()))
            }
            DispatchResult::Retry {
                code,
                message,
                next_attempt_at,
            } => {
                sqlx::query(
                    "UPDATE messages SET status = 'queued', error_code = $2, error_message = $3, \
                     next_attempt_at = $4, lease_until = NULL, updated_at = $5 WHERE id = $1",
                )
                .bind(id)
                .bind(code)
                .bind(message)
                .bind(next_attempt_at)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                // Retries are visible in the error fields; the event history keeps one row per
                // status, so a requeue adds none.
                tx.commit().await?;
                return Ok(());
            }
        };
        insert_event(&mut tx, id, status, code, detail.as_deref(), now).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Append a status event; a repeat of the same status is a no-op (`UNIQUE (message_id, status)`).
async fn insert_event(
    tx: &mut sqlx::Transaction<'_, Db>,
    message_id: &str,
    status: &str,
    error_code: Option<i64>,
    detail: Option<&str>,
    at: DateTime<Utc>,
) -> AppResult<()> {
    sqlx::query(
        "INSERT INTO message_events (message_id, status, error_code, detail, occurred_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (message_id, status) DO NOTHING",
    )
    .bind(message_id)
    .bind(status)
    .bind(error_code)
    .bind(detail)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
