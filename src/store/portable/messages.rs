// `MessageStore` for both backends: included by `sqlite.rs` and `postgres.rs` inside a module that
// has `Db`, `ThisStore`, `LOCK_FOR_UPDATE`, `SKIP_LOCKED`, `BEGIN_WRITE` and `CLAIM_PLAN` in scope
// (see `store/mod.rs`).

use async_trait::async_trait;
#[allow(unused_imports)]
use chrono::{DateTime, Utc};

use super::*;
use crate::error::AppResult;
#[allow(unused_imports)]
use crate::store::postgres::functions::SentCall;
use crate::store::*;

#[async_trait]
impl MessageStore for ThisStore {
    async fn durable(&self) -> AppResult<()> {
        self.sync_commits().await
    }

    async fn insert_message(&self, m: &NewMessage) -> AppResult<(MessageRecord, bool)> {
        let mut conn = self.pool.acquire().await?;
        if let Some(record) = insert_message_row(&mut conn, &self.vault, m).await? {
            return Ok((record, true));
        }
        // Only a taken idempotency key makes the insert a no-op.
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE idempotency_key = $1");
        let existing = sqlx::query_as::<Db, MessageRecord>(&sql)
            .bind(&m.idempotency_key)
            .fetch_one(&mut *conn)
            .await?;
        Ok((open_message(&self.vault, existing)?, false))
    }

    async fn get_message(&self, id: &str) -> AppResult<Option<MessageRecord>> {
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1");
        sqlx::query_as::<Db, MessageRecord>(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|m| open_message(&self.vault, m))
            .transpose()
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
        Ok(
            sqlx::query_as("SELECT status, COUNT(*) FROM messages GROUP BY status ORDER BY status")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn message_by_sid(&self, provider_sid: &str) -> AppResult<Option<MessageRecord>> {
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE provider_sid = $1");
        sqlx::query_as::<Db, MessageRecord>(&sql)
            .bind(provider_sid)
            .fetch_optional(&self.pool)
            .await?
            .map(|m| open_message(&self.vault, m))
            .transpose()
    }

    async fn sibling_in_flight(
        &self,
        id: &str,
        to_number: &str,
        body: &str,
        started: DateTime<Utc>,
    ) -> AppResult<bool> {
        // Bodies are sealed with a fresh nonce each: compare them opened. A twin being looked up
        // too waits only for the twins whose attempts began before its own (found by review:
        // two that each waited for the other spent every attempt and were never sent).
        let bodies: Vec<Option<String>> = sqlx::query_scalar(
            "SELECT attempt_body FROM messages WHERE id <> $1 AND to_index = $2 \
             AND provider_sid IS NULL AND status IN ('queued', 'sending') \
             AND ((status = 'sending' AND NOT lookup_needed) \
             OR (lookup_needed AND (attempt_started_at < $3 \
             OR (attempt_started_at = $3 AND id < $1))))",
        )
        .bind(id)
        .bind(self.vault.blind(to_number))
        .bind(started)
        .fetch_all(&self.pool)
        .await?;
        for sealed in bodies.iter().flatten() {
            if self.vault.open(sealed)? == body {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn mark_lookup_needed(&self, id: &str, fence: DateTime<Utc>) -> AppResult<()> {
        sqlx::query(
            "UPDATE messages SET lookup_needed = TRUE WHERE id = $1 AND lease_until = $2 \
             AND status IN ('queued', 'sending')",
        )
        .bind(id)
        .bind(fence)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn last_recipient(&self, to_number: &str) -> AppResult<Option<String>> {
        // The last message that went out, by when the provider took it (its one `sent` event):
        // not the last one created, which may still wait for quiet hours to end, or never go.
        // A message with a provider's status but no such event (written before events were
        // kept) counts from its creation.
        Ok(sqlx::query_scalar(
            "SELECT m.user_id FROM messages m \
             LEFT JOIN message_events e ON e.message_id = m.id AND e.status = 'sent' \
             WHERE m.to_index = $1 \
             AND (e.id IS NOT NULL OR m.status IN ('sent', 'delivered', 'read', 'undelivered')) \
             ORDER BY COALESCE(e.occurred_at, m.created_at) DESC, m.id DESC LIMIT 1",
        )
        .bind(self.vault.blind(to_number))
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn user_messages(&self, user_id: &str, limit: i64) -> AppResult<Vec<MessageRecord>> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE user_id = $1 \
             ORDER BY created_at DESC, id DESC LIMIT $2"
        );
        sqlx::query_as::<Db, MessageRecord>(&sql)
            .bind(user_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|m| open_message(&self.vault, m))
            .collect()
    }

    async fn claim_messages(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
        stale: Stale,
    ) -> AppResult<Vec<MessageRecord>> {
        // Opened after the claim commits, one by one: see `open_claimed`.
        if let Some(writer) = self.writer() {
            let sealed = writer
                .claim_sealed_messages(now, lease_until, limit, stale)
                .await?;
            return Ok(open_claimed(&self.vault, sealed, &self.unreadable_claims));
        }
        let mut claimed = Vec::new();
        // One transaction for the steps: the plan setting (`CLAIM_PLAN`) covers them and
        // nothing else, and a step that fails leaves no message leased by the steps before it.
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        if let Some(setting) = CLAIM_PLAN {
            sqlx::query(setting).execute(&mut *tx).await?;
        }
        for sql in claim_sql(SKIP_LOCKED, stale) {
            let left = limit - claimed.len() as i64;
            if left <= 0 {
                break;
            }
            claimed.extend(
                sqlx::query_as::<Db, MessageRecord>(&sql)
                    .bind(lease_until)
                    .bind(now)
                    .bind(left)
                    .fetch_all(&mut *tx)
                    .await?,
            );
        }
        tx.commit().await?;
        Ok(open_claimed(&self.vault, claimed, &self.unreadable_claims))
    }

    async fn release_claim(
        &self,
        id: &str,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
    ) -> AppResult<()> {
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

    async fn reserve_send_slot(
        &self,
        sender: &str,
        now_us: i64,
        interval_us: i64,
        latest_us: i64,
    ) -> AppResult<SendSlotAnswer> {
        if let Some(writer) = self.writer() {
            return writer
                .reserve_send_slot(sender, now_us, interval_us, latest_us)
                .await;
        }
        let reserved: Option<i64> = sqlx::query_scalar(RESERVE_SEND_SLOT)
            .bind(sender)
            .bind(now_us)
            .bind(interval_us)
            .bind(latest_us)
            .fetch_optional(&self.pool)
            .await?;
        let next_free_at = match reserved {
            Some(_) => None,
            None => {
                sqlx::query_scalar(NEXT_SEND_SLOT)
                    .bind(sender)
                    .fetch_optional(&self.pool)
                    .await?
            }
        };
        SendSlotAnswer::from_rows(reserved, next_free_at)
    }

    async fn mark_sending(
        &self,
        id: &str,
        attempt: &SendAttempt,
        guard: SendGuard,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
        new_lease: DateTime<Utc>,
    ) -> AppResult<MarkSending> {
        if let Some(writer) = self.writer() {
            return writer
                .mark_sending(&self.vault, id, attempt, guard, now, fence, new_lease)
                .await;
        }
        if let Some(functions) = self.functions() {
            return functions
                .mark_sending(&self.vault, id, attempt, guard, now, fence, new_lease)
                .await;
        }
        let sealed = attempt.sealed(&self.vault);
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(&mark_sending_sql(guard, attempt.channel))
            .bind(id)
            .bind(&sealed.to_number)
            .bind(&attempt.encoding)
            .bind(attempt.segments)
            .bind(now)
            .bind(attempt.channel.as_str())
            .bind(fence)
            .bind(new_lease)
            .bind(&sealed.body)
            .bind(&sealed.to_index)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if !updated {
            // Ours still (the guard failed), or taken over?
            let still_ours: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM messages WHERE id = $1 AND lease_until = $2 \
                 AND status IN ('queued', 'sending')",
            )
            .bind(id)
            .bind(fence)
            .fetch_one(&mut *tx)
            .await?;
            tx.rollback().await?;
            return Ok(if still_ours == 1 {
                MarkSending::PolicyChanged
            } else {
                MarkSending::ClaimLost
            });
        }
        marked_sending(&mut tx, id, attempt, now).await?;
        tx.commit().await?;
        Ok(MarkSending::Marked)
    }

    async fn record_dispatch(
        &self,
        id: &str,
        result: &DispatchResult,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
    ) -> AppResult<bool> {
        if let Some(writer) = self.writer() {
            return writer.record_dispatch(id, result, now, fence).await;
        }
        let mut tx = self.pool.begin().await?;
        if let DispatchResult::Sent { provider_sid, .. } = result {
            // See `apply_status`: recording a SID and parking a status for it never interleave.
            ThisStore::lock_keys(&mut tx, &mut [format!("sid:{provider_sid}")]).await?;
        }
        // Every update is fenced by the claim's lease: a claim that was taken over writes nothing.
        let (sql, args, event) = dispatch_write(result, now);
        let mut query = sqlx::query(sql).bind(id).bind(fence);
        for arg in args {
            query = match arg {
                SqlArg::Text(v) => query.bind(v),
                SqlArg::OptText(v) => query.bind(v),
                SqlArg::OptInt(v) => query.bind(v),
                SqlArg::Bool(v) => query.bind(v),
                SqlArg::Time(v) => query.bind(v),
            };
        }
        if query.execute(&mut *tx).await?.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        if let Some((status, code, detail)) = event {
            insert_event(&mut tx, id, status, code, detail.as_deref(), now).await?;
        }
        if let DispatchResult::Skipped { reason } = result {
            if reason.frees_reminder() {
                release_reminder(&mut tx, id).await?;
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn record_sent(
        &self,
        id: &str,
        provider_sid: &str,
        status: MessageStatus,
        news: Option<MessageStatus>,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
    ) -> AppResult<Option<Vec<KnownStatus>>> {
        if let Some(writer) = self.writer() {
            return writer
                .record_sent(&self.vault, id, provider_sid, status, news, now, fence)
                .await;
        }
        // The provider's own news (the mock's `delivered`) goes in with the send: one update
        // to where the message ends, and an event for each status it passed.
        let news = news.filter(|n| n.may_follow(status));
        if let Some(functions) = self.functions() {
            match functions
                .record_sent(id, provider_sid, status, news, now, fence)
                .await?
            {
                SentCall::Recorded => return Ok(Some(Vec::new())),
                SentCall::ClaimLost => return Ok(None),
                // Callbacks arrived before the send: the transaction below applies them.
                SentCall::CallbacksParked => {}
            }
        }
        let mut tx = self.pool.begin().await?;
        // See `apply_status`: recording a SID and parking a status for it never interleave.
        ThisStore::lock_keys(&mut tx, &mut [format!("sid:{provider_sid}")]).await?;
        let recorded = sqlx::query(RECORD_SENT)
            .bind(id)
            .bind(fence)
            .bind(news.unwrap_or(status))
            .bind(provider_sid)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if !recorded {
            tx.rollback().await?;
            return Ok(None);
        }
        insert_event(&mut tx, id, status, None, None, now).await?;
        if let Some(news) = news {
            insert_event(&mut tx, id, news, None, Some("provider answer"), now).await?;
        }
        let early: Vec<(String, Option<i64>)> = sqlx::query_as(PARKED_FOR_SID)
            .bind(provider_sid)
            .fetch_all(&mut *tx)
            .await?;
        if !early.is_empty() {
            sqlx::query(DROP_APPLIED_PARKED)
                .bind(provider_sid)
                .execute(&mut *tx)
                .await?;
        }
        let mut known = Vec::new();
        for (status, error_code) in early
            .iter()
            .filter_map(|(s, code)| Some((MessageStatus::from_twilio(s)?, *code)))
        {
            let applied =
                apply_status_in(&mut tx, &self.vault, provider_sid, status, error_code, now)
                    .await?;
            known.push(KnownStatus {
                status,
                error_code,
                applied,
            });
        }
        tx.commit().await?;
        Ok(Some(known))
    }

    async fn parked_opt_outs_owed(&self, limit: i64) -> AppResult<Vec<OwedOptOut>> {
        let rows: Vec<(String, MessageStatus, DateTime<Utc>)> =
            sqlx::query_as(PARKED_OPT_OUTS_OWED)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
        // A SID may have two (`failed` and `undelivered`), in the order they came: the first
        // report's time stands for both.
        let mut owed: Vec<OwedOptOut> = Vec::new();
        for (provider_sid, status, received_at) in rows {
            match owed.last_mut() {
                Some(last) if last.provider_sid == provider_sid => last.statuses.push(status),
                _ => owed.push(OwedOptOut {
                    provider_sid,
                    reported_at: received_at,
                    statuses: vec![status],
                }),
            }
        }
        Ok(owed)
    }

    async fn forget_parked_opt_outs(&self, provider_sid: &str) -> AppResult<()> {
        sqlx::query(FORGET_PARKED_OPT_OUTS)
            .bind(provider_sid)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn record_report(
        &self,
        message_id: &str,
        status: MessageStatus,
        error_code: Option<i64>,
        at: DateTime<Utc>,
    ) -> AppResult<()> {
        let mut tx = self.pool.begin().await?;
        insert_event(
            &mut tx,
            message_id,
            status,
            error_code,
            Some("status callback"),
            at,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn prune_unmatched_statuses(&self, before: DateTime<Utc>) -> AppResult<u64> {
        Ok(sqlx::query(PRUNE_UNMATCHED)
            .bind(before)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn apply_status(
        &self,
        provider_sid: &str,
        status: MessageStatus,
        error_code: Option<i64>,
        at: DateTime<Utc>,
    ) -> AppResult<StatusApplied> {
        if let Some(writer) = self.writer() {
            return writer
                .apply_status(&self.vault, provider_sid, status, error_code, at)
                .await;
        }
        let mut tx = self.pool.begin().await?;
        // The SID's lock (PostgreSQL; SQLite serialises writers anyway), also taken when a send
        // records the SID: a callback that finds no message cannot park its status after the
        // send recorded the SID and drained the parked ones, leaving it orphaned.
        ThisStore::lock_keys(&mut tx, &mut [format!("sid:{provider_sid}")]).await?;
        let applied =
            apply_status_in(&mut tx, &self.vault, provider_sid, status, error_code, at).await?;
        tx.commit().await?;
        Ok(applied)
    }
}

/// `apply_status` inside a transaction that holds the SID's lock.
pub(super) async fn apply_status_in(
    tx: &mut sqlx::Transaction<'_, Db>,
    vault: &crate::vault::Vault,
    provider_sid: &str,
    status: MessageStatus,
    error_code: Option<i64>,
    at: DateTime<Utc>,
) -> AppResult<StatusApplied> {
    let changed = {
        sqlx::query(&apply_status_sql(status))
            .bind(provider_sid)
            .bind(status)
            .bind(error_code)
            .bind(at)
            .execute(&mut **tx)
            .await?
            .rows_affected()
            == 1
    };
    let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE provider_sid = $1");
    let message = sqlx::query_as::<Db, MessageRecord>(&sql)
        .bind(provider_sid)
        .fetch_optional(&mut **tx)
        .await?
        .map(|m| open_message(vault, m))
        .transpose()?;
    let mut first_seen = false;
    match &message {
        Some(m) => {
            // Twilio retries and replays callbacks: only the first of each (status, error
            // code) may have effects beyond the status (a carrier opt-out).
            let seen: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM message_events WHERE message_id = $1 AND status = $2 \
                     AND (error_code = $3 OR (error_code IS NULL AND $3 IS NULL))",
            )
            .bind(&m.id)
            .bind(status)
            .bind(error_code)
            .fetch_one(&mut **tx)
            .await?;
            first_seen = seen == 0;
            // History records what moved: a callback that changes nothing adds no event,
            // except a new error code for the status the message is in (the real reason of a
            // later `failed`).
            let new_code_for_current = m.status == status && error_code.is_some();
            if !changed && first_seen && new_code_for_current {
                // The message keeps the latest code it was given for its status.
                sqlx::query("UPDATE messages SET error_code = $2 WHERE id = $1")
                    .bind(&m.id)
                    .bind(error_code)
                    .execute(&mut **tx)
                    .await?;
            }
            if changed || (first_seen && new_code_for_current) {
                insert_event(tx, &m.id, status, error_code, Some("status callback"), at).await?
            }
        }
        // Twilio may call back before the send that created the message has recorded the SID:
        // keep the event until it is (see `record_sent`).
        None => {
            sqlx::query(
                "INSERT INTO unmatched_status_callbacks (provider_sid, status, error_code, \
                     received_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (provider_sid, status) DO NOTHING",
            )
            .bind(provider_sid)
            .bind(status)
            .bind(error_code)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(StatusApplied {
        message,
        changed,
        first_seen,
    })
}

/// Insert a message row; `None` when its idempotency key is already taken.
pub(super) async fn insert_message_row(
    conn: &mut <Db as sqlx::Database>::Connection,
    vault: &crate::vault::Vault,
    m: &NewMessage,
) -> AppResult<Option<MessageRecord>> {
    let status = if m.claimed_until.is_some() {
        MessageStatus::Sending
    } else {
        MessageStatus::Queued
    };
    let sql = format!(
        "INSERT INTO messages (id, user_id, template_name, variables, channel, status, attempts, \
         idempotency_key, next_attempt_at, lease_until, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, $9, $8, $8) \
         ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING \
         RETURNING {MESSAGE_COLUMNS}"
    );
    let write = sqlx::query_as::<Db, MessageRecord>(&sql)
        .bind(&m.id)
        .bind(&m.user_id)
        .bind(&m.template_name)
        .bind(vault.seal(&m.variables))
        .bind(m.channel.as_str())
        .bind(status)
        .bind(&m.idempotency_key)
        .bind(m.created_at)
        .bind(m.claimed_until);
    returned_row(write, &mut *conn)
        .await?
        .map(|record| open_message(vault, record))
        .transpose()
}

/// A reminder skipped because its item was cancelled, moved or reassigned no longer counts as
/// that item's reminder: if the item comes back, it gets a new one.
pub(super) async fn release_reminder(
    tx: &mut sqlx::Transaction<'_, Db>,
    message_id: &str,
) -> AppResult<()> {
    sqlx::query("UPDATE reminder_log SET active = FALSE WHERE message_id = $1")
        .bind(message_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// What marking a message `sending` writes besides its row: the event, and the sender's slot
/// when the attempt takes one.
pub(super) async fn marked_sending(
    tx: &mut sqlx::Transaction<'_, Db>,
    id: &str,
    attempt: &SendAttempt,
    at: DateTime<Utc>,
) -> AppResult<()> {
    insert_event(tx, id, MessageStatus::Sending, None, None, at).await?;
    if let Some(slot) = &attempt.take_slot {
        sqlx::query(RESERVE_SEND_SLOT)
            .bind(&slot.sender)
            .bind(slot.now_us)
            .bind(slot.interval_us)
            // A code takes its slot whenever the next one is: it goes now.
            .bind(i64::MAX)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// The events of a send an in-process provider accepted before its message was written
/// (`OtpIssue::accepted`), after its `sending` one: the message was written where the send ends,
/// as `record_sent` would leave it. Its SID is new to everyone, so no callback can wait for it.
pub(super) async fn accepted_events(
    tx: &mut sqlx::Transaction<'_, Db>,
    id: &str,
    accepted: &AcceptedSend,
    at: DateTime<Utc>,
) -> AppResult<()> {
    insert_event(tx, id, MessageStatus::Sent, None, None, at).await?;
    if let Some(news) = accepted.news {
        insert_event(tx, id, news, None, Some("provider answer"), at).await?;
    }
    Ok(())
}

/// Append a status event; a repeat of the same status and error code is a no-op (the unique index
/// `message_events_once`).
pub(super) async fn insert_event(
    tx: &mut sqlx::Transaction<'_, Db>,
    message_id: &str,
    status: MessageStatus,
    error_code: Option<i64>,
    detail: Option<&str>,
    at: DateTime<Utc>,
) -> AppResult<()> {
    sqlx::query(
        "INSERT INTO message_events (message_id, status, error_code, detail, occurred_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
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
