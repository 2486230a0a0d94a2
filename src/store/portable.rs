// The `Store` implementation shared by both backends. This file is not a module of its own: each
// backend `include!`s it inside a `portable` module that has `Db` (the sqlx database type),
// `ThisStore` (the backend's store), `LOCK_FOR_UPDATE` and `SKIP_LOCKED` in scope, so the SQL below compiles
// against each backend's concrete types. Keep the SQL portable: `$1` placeholders,
// `ON CONFLICT`, `RETURNING`, times bound from Rust (never `now()`), and every transaction
// starting with a write (so SQLite takes its write lock up front instead of failing to upgrade).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::AppResult;
use crate::store::{
    Channel, ChangeContext, Consent, ConsentAuditRecord, ConsentPatch, ConsentSource, DispatchResult,
    IncomingMessage, MessageEvent, MessageRecord, NewMessage, OtpCleanup, OtpIssue, OtpIssueOutcome,
    OtpRecord, ScheduledItem, SendAttempt, StatusApplied, Store, SubjectType, MESSAGE_COLUMNS,
};

const INCOMING_COLUMNS: &str = "id, provider_sid, channel, from_number, to_number, user_id, body, keyword, \
     reply_template, opt_out_type, received_at";

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
        let mut conn = self.pool.acquire().await?;
        if let Some(record) = insert_message_row(&mut conn, m).await? {
            return Ok((record, true));
        }
        // Only a taken idempotency key makes the insert a no-op.
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE idempotency_key = $1");
        let existing = sqlx::query_as::<Db, MessageRecord>(&sql)
            .bind(&m.idempotency_key)
            .fetch_one(&mut *conn)
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

    async fn message_status_counts(&self) -> AppResult<Vec<(String, i64)>> {
        Ok(sqlx::query_as("SELECT status, COUNT(*) FROM messages GROUP BY status ORDER BY status")
            .fetch_all(&self.pool)
            .await?)
    }

    async fn message_by_sid(&self, provider_sid: &str) -> AppResult<Option<MessageRecord>> {
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE provider_sid = $1");
        Ok(sqlx::query_as::<Db, MessageRecord>(&sql)
            .bind(provider_sid)
            .fetch_optional(&self.pool)
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
        let sql = format!(
            "UPDATE messages SET lease_until = $1 WHERE id IN ( \
                SELECT id FROM messages \
                WHERE (status = 'queued' AND next_attempt_at <= $2 AND (lease_until IS NULL OR lease_until < $2)) \
                OR (status = 'sending' AND provider_sid IS NULL AND lease_until < $2) \
                ORDER BY next_attempt_at LIMIT $3{SKIP_LOCKED}) \
             RETURNING {MESSAGE_COLUMNS}"
        );
        let mut claimed = sqlx::query_as::<Db, MessageRecord>(&sql)
            .bind(lease_until)
            .bind(now)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        claimed.sort_by(|a, b| a.next_attempt_at.cmp(&b.next_attempt_at).then(a.id.cmp(&b.id)));
        Ok(claimed)
    }

    async fn mark_sending(
        &self,
        id: &str,
        attempt: &SendAttempt,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
        new_lease: DateTime<Utc>,
    ) -> AppResult<bool> {
        let mut tx = self.pool.begin().await?;
        // Right-hand sides read the row as it was, so `channel` in the CASE is the old channel.
        let updated = sqlx::query(
            "UPDATE messages SET status = 'sending', attempts = attempts + 1, to_number = $2, \
             encoding = $3, segments = $4, updated_at = $5, \
             requested_channel = CASE WHEN channel <> $6 THEN COALESCE(requested_channel, channel) \
             ELSE requested_channel END, channel = $6, lease_until = $8 \
             WHERE id = $1 AND lease_until = $7 AND status IN ('queued', 'sending')",
        )
        .bind(id)
        .bind(&attempt.to_number)
        .bind(&attempt.encoding)
        .bind(attempt.segments)
        .bind(now)
        .bind(attempt.channel.as_str())
        .bind(fence)
        .bind(new_lease)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !updated {
            tx.rollback().await?;
            return Ok(false);
        }
        insert_event(&mut tx, id, "sending", None, None, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn record_dispatch(
        &self,
        id: &str,
        result: &DispatchResult,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
    ) -> AppResult<bool> {
        let mut tx = self.pool.begin().await?;
        // Every update is fenced by the claim's lease: a claim that was taken over writes nothing.
        let (query, event) = match result {
            DispatchResult::Sent { provider_sid, status } => (
                sqlx::query(
                    "UPDATE messages SET status = $3, provider_sid = $4, reason = NULL, error_code = NULL, \
                     error_message = NULL, lease_until = NULL, updated_at = $5 \
                     WHERE id = $1 AND lease_until = $2",
                )
                .bind(id)
                .bind(fence)
                .bind(status)
                .bind(provider_sid)
                .bind(now),
                Some((status.clone(), None, None)),
            ),
            DispatchResult::Skipped { reason } => (
                sqlx::query(
                    "UPDATE messages SET status = 'skipped', reason = $3, lease_until = NULL, updated_at = $4 \
                     WHERE id = $1 AND lease_until = $2",
                )
                .bind(id)
                .bind(fence)
                .bind(reason)
                .bind(now),
                Some(("skipped".to_string(), None, Some(reason.clone()))),
            ),
            DispatchResult::Failed { code, message } => (
                sqlx::query(
                    "UPDATE messages SET status = 'failed', error_code = $3, error_message = $4, \
                     lease_until = NULL, updated_at = $5 WHERE id = $1 AND lease_until = $2",
                )
                .bind(id)
                .bind(fence)
                .bind(code)
                .bind(message)
                .bind(now),
                Some(("failed".to_string(), *code, Some(message.clone()))),
            ),
            // Retries are visible in the error fields; the event history keeps one row per
            // status, so a requeue adds none.
            DispatchResult::Retry {
                code,
                message,
                next_attempt_at,
            } => (
                sqlx::query(
                    "UPDATE messages SET status = 'queued', error_code = $3, error_message = $4, \
                     next_attempt_at = $5, lease_until = NULL, updated_at = $6 \
                     WHERE id = $1 AND lease_until = $2",
                )
                .bind(id)
                .bind(fence)
                .bind(code)
                .bind(message)
                .bind(next_attempt_at)
                .bind(now),
                None,
            ),
            DispatchResult::Deferred { until, .. } => (
                sqlx::query(
                    "UPDATE messages SET status = 'queued', next_attempt_at = $3, lease_until = NULL, \
                     updated_at = $4 WHERE id = $1 AND lease_until = $2",
                )
                .bind(id)
                .bind(fence)
                .bind(until)
                .bind(now),
                None,
            ),
        };
        if query.execute(&mut *tx).await?.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        if let Some((status, code, detail)) = event {
            insert_event(&mut tx, id, &status, code, detail.as_deref(), now).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn take_unmatched_statuses(&self, provider_sid: &str) -> AppResult<Vec<(String, Option<i64>)>> {
        Ok(sqlx::query_as(
            "DELETE FROM unmatched_status_callbacks WHERE provider_sid = $1 RETURNING status, error_code",
        )
        .bind(provider_sid)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn prune_unmatched_statuses(&self, before: DateTime<Utc>) -> AppResult<u64> {
        Ok(sqlx::query("DELETE FROM unmatched_status_callbacks WHERE received_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn issue_otp(&self, issue: &OtpIssue) -> AppResult<OtpIssueOutcome> {
        let mut tx = self.pool.begin().await?;
        let mut keys = vec![format!("otp:phone:{}", issue.phone_number), format!("otp:user:{}", issue.user_id)];
        if let Some(ip) = &issue.ip {
            keys.push(format!("otp:ip:{ip}"));
        }
        ThisStore::lock_keys(&mut tx, &mut keys).await?;
        // Log this send first: on SQLite the write takes the database's write lock, serialising
        // concurrent requests before they read the counts.
        let log_id: i64 = sqlx::query_scalar(
            "INSERT INTO otp_send_log (phone_number, user_id, ip, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(&issue.phone_number)
        .bind(&issue.user_id)
        .bind(&issue.ip)
        .bind(issue.now)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(wait) = otp_retry_after(&mut tx, issue, log_id).await? {
            tx.rollback().await?;
            return Ok(OtpIssueOutcome::RateLimited { retry_after_seconds: wait });
        }
        let Some(new_message) = &issue.message else {
            tx.commit().await?;
            return Ok(OtpIssueOutcome::Logged);
        };
        let message = insert_message_row(&mut tx, new_message)
            .await?
            .ok_or_else(|| anyhow::anyhow!("OTP message id collided"))?;
        sqlx::query(
            "INSERT INTO otp_codes (user_id, purpose, phone_number, channel, code_hash, attempts, expires_at, \
             used_at, message_id, created_at) VALUES ($1, $2, $3, $4, $5, 0, $6, NULL, $7, $8) \
             ON CONFLICT (user_id, purpose) DO UPDATE SET phone_number = excluded.phone_number, \
             channel = excluded.channel, code_hash = excluded.code_hash, attempts = 0, \
             expires_at = excluded.expires_at, used_at = NULL, message_id = excluded.message_id, \
             created_at = excluded.created_at",
        )
        .bind(&issue.user_id)
        .bind(&issue.purpose)
        .bind(&issue.phone_number)
        .bind(issue.channel.as_str())
        .bind(&issue.code_hash)
        .bind(issue.expires_at)
        .bind(&message.id)
        .bind(issue.now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(OtpIssueOutcome::Issued(Box::new(message)))
    }

    async fn get_otp(&self, user_id: &str, purpose: &str) -> AppResult<Option<OtpRecord>> {
        Ok(sqlx::query_as::<Db, OtpRecord>(
            "SELECT user_id, purpose, phone_number, channel, code_hash, attempts, expires_at, used_at, created_at \
             FROM otp_codes WHERE user_id = $1 AND purpose = $2",
        )
        .bind(user_id)
        .bind(purpose)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn consume_otp(&self, user_id: &str, purpose: &str, code_hash: &str, max_attempts: i64, now: DateTime<Utc>) -> AppResult<bool> {
        let done = sqlx::query(
            "UPDATE otp_codes SET used_at = $4 WHERE user_id = $1 AND purpose = $2 AND code_hash = $3 \
             AND used_at IS NULL AND expires_at > $4 AND attempts < $5",
        )
        .bind(user_id)
        .bind(purpose)
        .bind(code_hash)
        .bind(now)
        .bind(max_attempts)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn record_otp_failure(&self, user_id: &str, purpose: &str, code_hash: &str) -> AppResult<Option<i64>> {
        Ok(sqlx::query_scalar(
            "UPDATE otp_codes SET attempts = attempts + 1 WHERE user_id = $1 AND purpose = $2 \
             AND code_hash = $3 AND used_at IS NULL RETURNING attempts",
        )
        .bind(user_id)
        .bind(purpose)
        .bind(code_hash)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn cleanup_otps(&self, now: DateTime<Utc>) -> AppResult<OtpCleanup> {
        let used_deleted = sqlx::query("DELETE FROM otp_codes WHERE used_at IS NOT NULL")
            .execute(&self.pool)
            .await?
            .rows_affected();
        let expired_deleted = sqlx::query("DELETE FROM otp_codes WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected();
        let send_log_pruned = sqlx::query("DELETE FROM otp_send_log WHERE created_at <= $1")
            .bind(now - chrono::Duration::hours(1))
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(OtpCleanup { expired_deleted, used_deleted, send_log_pruned })
    }

    async fn is_opted_out(&self, phone_number: &str, channel: Channel) -> AppResult<bool> {
        // COUNT(*) is a 64-bit integer on both backends (a bare `1` is 32-bit on PostgreSQL).
        let found: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM opt_outs WHERE phone_number = $1 AND channel = $2",
        )
        .bind(phone_number)
        .bind(channel.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(found > 0)
    }

    async fn set_opt_out(&self, phone_number: &str, channel: Channel, source: ConsentSource, at: DateTime<Utc>) -> AppResult<()> {
        sqlx::query(
            "INSERT INTO opt_outs (phone_number, channel, source, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (phone_number, channel) DO NOTHING",
        )
        .bind(phone_number)
        .bind(channel.as_str())
        .bind(source.as_str())
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn clear_opt_out(&self, phone_number: &str, channel: Channel) -> AppResult<()> {
        sqlx::query("DELETE FROM opt_outs WHERE phone_number = $1 AND channel = $2")
            .bind(phone_number)
            .bind(channel.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn users_with_phone(&self, phone_number: &str) -> AppResult<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT user_id FROM messaging_consent WHERE phone_number = $1 ORDER BY user_id")
            .bind(phone_number)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn insert_incoming(&self, m: &IncomingMessage) -> AppResult<bool> {
        let done = sqlx::query(
            "INSERT INTO incoming_messages (id, provider_sid, channel, from_number, to_number, user_id, body, \
             keyword, reply_template, opt_out_type, received_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (provider_sid) DO NOTHING",
        )
        .bind(&m.id)
        .bind(&m.provider_sid)
        .bind(&m.channel)
        .bind(&m.from_number)
        .bind(&m.to_number)
        .bind(&m.user_id)
        .bind(&m.body)
        .bind(&m.keyword)
        .bind(&m.reply_template)
        .bind(&m.opt_out_type)
        .bind(m.received_at)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn incoming_by_sid(&self, provider_sid: &str) -> AppResult<Option<IncomingMessage>> {
        let sql = format!("SELECT {INCOMING_COLUMNS} FROM incoming_messages WHERE provider_sid = $1");
        Ok(sqlx::query_as::<Db, IncomingMessage>(&sql)
            .bind(provider_sid)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn list_incoming(&self, since: Option<DateTime<Utc>>, until: DateTime<Utc>, limit: i64) -> AppResult<Vec<IncomingMessage>> {
        let sql = format!(
            "SELECT {INCOMING_COLUMNS} FROM incoming_messages WHERE received_at > $1 AND received_at <= $3 \
             ORDER BY received_at, id LIMIT $2"
        );
        let since = since.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
        Ok(sqlx::query_as::<Db, IncomingMessage>(&sql)
            .bind(since)
            .bind(limit)
            .bind(until)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn touch_whatsapp_session(&self, phone_number: &str, at: DateTime<Utc>) -> AppResult<()> {
        sqlx::query(
            "INSERT INTO whatsapp_sessions (phone_number, last_inbound_at) VALUES ($1, $2) \
             ON CONFLICT (phone_number) DO UPDATE SET last_inbound_at = excluded.last_inbound_at \
             WHERE whatsapp_sessions.last_inbound_at < excluded.last_inbound_at",
        )
        .bind(phone_number)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn last_whatsapp_inbound(&self, phone_number: &str) -> AppResult<Option<DateTime<Utc>>> {
        Ok(sqlx::query_scalar("SELECT last_inbound_at FROM whatsapp_sessions WHERE phone_number = $1")
            .bind(phone_number)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn apply_status(
        &self,
        provider_sid: &str,
        status: &str,
        allowed_from: &[&str],
        error_code: Option<i64>,
        at: DateTime<Utc>,
    ) -> AppResult<StatusApplied> {
        // `allowed_from` holds our own status words, never caller input: safe to inline.
        let from_list = allowed_from.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ");
        let mut tx = self.pool.begin().await?;
        // An empty list still runs the UPDATE (matching nothing), so on SQLite the transaction
        // starts with a write and takes the lock before it reads.
        let from_list = if from_list.is_empty() { "'-'".to_string() } else { from_list };
        let changed = {
            sqlx::query(&format!(
                "UPDATE messages SET status = $2, error_code = COALESCE($3, error_code), updated_at = $4 \
                 WHERE provider_sid = $1 AND status IN ({from_list})"
            ))
            .bind(provider_sid)
            .bind(status)
            .bind(error_code)
            .bind(at)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1
        };
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE provider_sid = $1");
        let message = sqlx::query_as::<Db, MessageRecord>(&sql)
            .bind(provider_sid)
            .fetch_optional(&mut *tx)
            .await?;
        match &message {
            Some(m) => insert_event(&mut tx, &m.id, status, error_code, Some("status callback"), at).await?,
            // Twilio may call back before the send that created the message has recorded the SID:
            // keep the event until it is (see `take_unmatched_statuses`).
            None => {
                sqlx::query(
                    "INSERT INTO unmatched_status_callbacks (provider_sid, status, error_code, received_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (provider_sid, status) DO NOTHING",
                )
                .bind(provider_sid)
                .bind(status)
                .bind(error_code)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(StatusApplied { message, changed })
    }

    async fn release_claim(&self, id: &str, now: DateTime<Utc>, fence: DateTime<Utc>) -> AppResult<()> {
        sqlx::query(
            "UPDATE messages SET lease_until = $2 WHERE id = $1 AND lease_until = $3 \
             AND status IN ('queued', 'sending')",
        )
            .bind(id)
            .bind(now)
            .bind(fence)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn reserve_send_slot(&self, sender: &str, now_us: i64, interval_us: i64) -> AppResult<i64> {
        sqlx::query("INSERT INTO send_rate (sender, next_slot_us) VALUES ($1, 0) ON CONFLICT (sender) DO NOTHING")
            .bind(sender)
            .execute(&self.pool)
            .await?;
        // One statement: atomic under PostgreSQL's row lock and SQLite's write lock alike.
        Ok(sqlx::query_scalar(
            "UPDATE send_rate SET next_slot_us = \
             (CASE WHEN next_slot_us > $2 THEN next_slot_us ELSE $2 END) + $3 \
             WHERE sender = $1 RETURNING next_slot_us - $3",
        )
        .bind(sender)
        .bind(now_us)
        .bind(interval_us)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn upsert_scheduled(&self, kind: SubjectType, item: &ScheduledItem, now: DateTime<Utc>) -> AppResult<ScheduledItem> {
        let (table, column) = kind.table();
        sqlx::query(&format!(
            "INSERT INTO {table} (id, user_id, {column}, time_zone, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id, \
             {column} = excluded.{column}, time_zone = excluded.time_zone, status = excluded.status, \
             updated_at = excluded.updated_at"
        ))
        .bind(&item.id)
        .bind(&item.user_id)
        .bind(item.scheduled_at)
        .bind(&item.time_zone)
        .bind(&item.status)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(item.clone())
    }

    async fn get_scheduled(&self, kind: SubjectType, id: &str) -> AppResult<Option<ScheduledItem>> {
        let (table, column) = kind.table();
        Ok(sqlx::query_as::<Db, ScheduledItem>(&format!(
            "SELECT id, user_id, {column} AS scheduled_at, time_zone, status FROM {table} WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn cancel_scheduled(&self, kind: SubjectType, id: &str, now: DateTime<Utc>) -> AppResult<Option<u64>> {
        let (table, _) = kind.table();
        let mut tx = self.pool.begin().await?;
        let found = sqlx::query(&format!("UPDATE {table} SET status = 'cancelled', updated_at = $2 WHERE id = $1"))
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if !found {
            tx.rollback().await?;
            return Ok(None);
        }
        let reason = format!("{}_cancelled", kind.as_str());
        // Not yet sent: queued (a dispatcher holding one finds it skipped and leaves it).
        let skipped: Vec<String> = sqlx::query_scalar(
            "UPDATE messages SET status = 'skipped', reason = $3, updated_at = $4 \
             WHERE status = 'queued' AND id IN \
             (SELECT message_id FROM reminder_log WHERE subject_type = $1 AND subject_id = $2) RETURNING id",
        )
        .bind(kind.as_str())
        .bind(id)
        .bind(&reason)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        for message_id in &skipped {
            insert_event(&mut tx, message_id, "skipped", None, Some(&reason), now).await?;
        }
        tx.commit().await?;
        Ok(Some(skipped.len() as u64))
    }

    async fn due_without_reminder(
        &self,
        kind: SubjectType,
        reminder: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: i64,
    ) -> AppResult<Vec<ScheduledItem>> {
        let (table, column) = kind.table();
        Ok(sqlx::query_as::<Db, ScheduledItem>(&format!(
            "SELECT t.id, t.user_id, t.{column} AS scheduled_at, t.time_zone, t.status FROM {table} t \
             WHERE t.status = 'scheduled' AND t.{column} >= $1 AND t.{column} <= $2 AND NOT EXISTS ( \
               SELECT 1 FROM reminder_log r WHERE r.subject_type = $3 AND r.subject_id = t.id \
               AND r.kind = $4 AND r.starts_at = t.{column}) \
             ORDER BY t.{column} LIMIT $5"
        ))
        .bind(from)
        .bind(to)
        .bind(kind.as_str())
        .bind(reminder)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn queue_reminder(&self, kind: SubjectType, item: &ScheduledItem, reminder: &str, message: &NewMessage) -> AppResult<bool> {
        let mut tx = self.pool.begin().await?;
        if insert_message_row(&mut tx, message).await?.is_none() {
            tx.rollback().await?;
            return Ok(false);
        }
        let logged = sqlx::query(
            "INSERT INTO reminder_log (subject_type, subject_id, kind, starts_at, message_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (subject_type, subject_id, kind, starts_at) DO NOTHING",
        )
        .bind(kind.as_str())
        .bind(&item.id)
        .bind(reminder)
        .bind(item.scheduled_at)
        .bind(&message.id)
        .bind(message.created_at)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !logged {
            tx.rollback().await?;
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn reminder_subject(&self, message_id: &str) -> AppResult<Option<(SubjectType, String, DateTime<Utc>)>> {
        let row: Option<(String, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT subject_type, subject_id, starts_at FROM reminder_log WHERE message_id = $1",
        )
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|(kind, id, at)| Some((SubjectType::parse(&kind)?, id, at))))
    }
}

/// Insert a message row; `None` when its idempotency key is already taken.
async fn insert_message_row(conn: &mut <Db as sqlx::Database>::Connection, m: &NewMessage) -> AppResult<Option<MessageRecord>> {
    let status = if m.claimed_until.is_some() { "sending" } else { "queued" };
    let sql = format!(
        "INSERT INTO messages (id, user_id, template_name, variables, channel, status, attempts, \
         idempotency_key, next_attempt_at, lease_until, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, $9, $8, $8) \
         ON CONFLICT (idempotency_key) DO NOTHING RETURNING {MESSAGE_COLUMNS}"
    );
    Ok(sqlx::query_as::<Db, MessageRecord>(&sql)
        .bind(&m.id)
        .bind(&m.user_id)
        .bind(&m.template_name)
        .bind(&m.variables)
        .bind(m.channel.as_str())
        .bind(status)
        .bind(&m.idempotency_key)
        .bind(m.created_at)
        .bind(m.claimed_until)
        .fetch_optional(&mut *conn)
        .await?)
}

/// Seconds until the send limits allow another OTP, or `None` when this one may go.
/// `log_id` is this request's own (already inserted) send-log row, excluded from the counts.
async fn otp_retry_after(tx: &mut sqlx::Transaction<'_, Db>, issue: &OtpIssue, log_id: i64) -> AppResult<Option<i64>> {
    let now = issue.now;
    // The cooldown, per number.
    let last: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT created_at FROM otp_send_log WHERE phone_number = $1 AND id <> $2 \
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(&issue.phone_number)
    .bind(log_id)
    .fetch_optional(&mut **tx)
    .await?;
    let mut wait = 0i64;
    if let Some(last) = last {
        let ready = last + chrono::Duration::seconds(issue.cooldown_seconds);
        if ready > now {
            wait = wait.max((ready - now).num_seconds().max(1));
        }
    }
    // The hourly limits, per number, per user and per client IP. When over, the wait is until
    // enough of the window's sends have aged out.
    let window_start = now - chrono::Duration::hours(1);
    let limits: [(&str, Option<&str>); 3] = [
        ("phone_number", Some(issue.phone_number.as_str())),
        ("user_id", Some(issue.user_id.as_str())),
        ("ip", issue.ip.as_deref()),
    ];
    for (column, value) in limits {
        let Some(value) = value else { continue };
        let sql = format!(
            "SELECT created_at FROM otp_send_log WHERE {column} = $1 AND id <> $2 AND created_at > $3 \
             ORDER BY created_at LIMIT 1 OFFSET $4"
        );
        // With `max` sends already in the window, the (count - max + 1)-th oldest must age out.
        let count: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM otp_send_log WHERE {column} = $1 AND id <> $2 AND created_at > $3"
        ))
        .bind(value)
        .bind(log_id)
        .bind(window_start)
        .fetch_one(&mut **tx)
        .await?;
        if count >= issue.max_sends_per_hour {
            let oldest_blocking: Option<DateTime<Utc>> = sqlx::query_scalar(&sql)
                .bind(value)
                .bind(log_id)
                .bind(window_start)
                .bind(count - issue.max_sends_per_hour)
                .fetch_optional(&mut **tx)
                .await?;
            let until = oldest_blocking.map(|t| t + chrono::Duration::hours(1)).unwrap_or(now);
            wait = wait.max((until - now).num_seconds().max(1));
        }
    }
    Ok((wait > 0).then_some(wait))
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
