// `PrivacyStore` for both backends: included by `sqlite.rs` and `postgres.rs` inside a module that
// has `Db`, `ThisStore`, `LOCK_FOR_UPDATE` and `SKIP_LOCKED` in scope (see `store/mod.rs`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::schedule::SUBSCRIPTION_COLUMNS;
use super::*;
use crate::error::AppResult;
#[allow(unused_imports)]
use crate::store::*;

#[async_trait]
impl PrivacyStore for ThisStore {
    async fn export_user(&self, user_id: &str, now: DateTime<Utc>) -> AppResult<UserData> {
        let consent = self.get_consent(user_id).await?;
        let audit = self.consent_audit(user_id).await?;
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE user_id = $1 ORDER BY created_at, id"
        );
        let messages = sqlx::query_as::<Db, MessageRecord>(&sql)
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|m| crate::store::open_message(&self.vault, m))
            .collect::<AppResult<Vec<_>>>()?;
        let rows: Vec<(
            String,
            MessageStatus,
            Option<i64>,
            Option<String>,
            DateTime<Utc>,
        )> = sqlx::query_as(
            "SELECT e.message_id, e.status, e.error_code, e.detail, e.occurred_at \
                 FROM message_events e JOIN messages m ON m.id = e.message_id \
                 WHERE m.user_id = $1 ORDER BY e.id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        let events = rows
            .into_iter()
            .map(|(id, status, error_code, detail, occurred_at)| {
                let event = MessageEvent {
                    status,
                    error_code,
                    detail,
                    occurred_at,
                };
                (id, event)
            })
            .collect();
        let replies = sqlx::query_as::<Db, IncomingMessage>(&format!(
            "SELECT {} FROM incoming_messages WHERE user_id = $1 ORDER BY received_at, id",
            super::inbound::INCOMING_COLUMNS
        ))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|m| super::inbound::open_incoming(&self.vault, m))
        .collect::<AppResult<Vec<_>>>()?;
        let items = |table: &str, column: &str| {
            format!(
                "SELECT id, user_id, {column} AS scheduled_at, time_zone, status FROM {table} \
                 WHERE user_id = $1 ORDER BY {column}, id"
            )
        };
        let appointments = sqlx::query_as::<Db, ScheduledItem>(&items("appointments", "starts_at"))
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?;
        let follow_ups = sqlx::query_as::<Db, ScheduledItem>(&items("follow_ups", "due_at"))
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?;
        let subscriptions = sqlx::query_as::<Db, Subscription>(&format!(
            "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE user_id = $1 ORDER BY id"
        ))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        let otp_sends = sqlx::query_as::<Db, (String, Option<String>, DateTime<Utc>)>(
            "SELECT phone_number, ip, created_at FROM otp_send_log WHERE user_id = $1 \
             ORDER BY created_at, id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|(number, ip, at)| Ok((self.vault.open(&number)?, ip, at)))
        .collect::<AppResult<Vec<_>>>()?;
        let sessions = sqlx::query_as::<Db, SettingsSession>(
            "SELECT token_hash, user_id, return_url, ip, user_agent, created_at, last_seen_at, \
             expires_at FROM settings_sessions WHERE user_id = $1 AND expires_at > $2 \
             ORDER BY created_at",
        )
        .bind(user_id)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        Ok(UserData {
            consent,
            audit,
            messages,
            events,
            replies,
            appointments,
            follow_ups,
            subscriptions,
            otp_sends,
            sessions,
        })
    }

    async fn erase_user(
        &self,
        user_id: &str,
        user_hash: &str,
        erased_by: &str,
        now: DateTime<Utc>,
    ) -> AppResult<ErasureCounts> {
        // BEGIN_WRITE: on SQLite the lock is taken before the first read, so no write commits
        // between that read and the erasure's first write.
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let mut counts = ErasureCounts::default();
        // The codes go before the record is locked: a verification locks the code, then the
        // record (to mark the number verified), and taking them in the same order here keeps the
        // two from waiting on each other (PostgreSQL).
        for table in ["otp_codes", "otp_failures"] {
            counts.otp_records += sqlx::query(&format!("DELETE FROM {table} WHERE user_id = $1"))
                .bind(user_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        // Then the user's record is locked (PostgreSQL): a STOP, START or carrier opt-out that
        // changes it, or a reply that names the user, either finishes before the erasure reads
        // anything (and its audit rows or reply are erased with the rest) or waits and finds no
        // record. On SQLite the erasure's first write takes the lock that orders them.
        let lock =
            format!("SELECT user_id FROM messaging_consent WHERE user_id = $1{LOCK_FOR_UPDATE}");
        sqlx::query(&lock).bind(user_id).execute(&mut *tx).await?;
        // The number's WhatsApp window goes with the user (while the number is known).
        sqlx::query(
            "DELETE FROM whatsapp_sessions WHERE phone_index IN \
             (SELECT phone_index FROM messaging_consent WHERE user_id = $1)",
        )
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
        // Messages (pending ones included: deleted, they can never be sent), with their events
        // and reminder log rows (cascade).
        counts.messages = sqlx::query("DELETE FROM messages WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        lock_replies(&mut tx, user_id).await?;
        counts.replies = sqlx::query("DELETE FROM incoming_messages WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        unlist_from_replies(&mut tx, user_id).await?;
        counts.appointments = sqlx::query("DELETE FROM appointments WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        counts.follow_ups = sqlx::query("DELETE FROM follow_ups WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        counts.subscriptions = sqlx::query("DELETE FROM subscriptions WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        // The send log's rows lose the user and the number but keep, until they age out within
        // the hour (`cleanup_otps`), what the limits count: the numbers' blind indexes and the
        // address. Deleted, an account erased between sends would start every limit again.
        counts.otp_records += sqlx::query(
            "UPDATE otp_send_log SET user_id = $2, phone_number = '' WHERE user_id = $1",
        )
        .bind(user_id)
        .bind(format!("erased:{user_hash}"))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        counts.sessions = sqlx::query("DELETE FROM settings_sessions WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM settings_links WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        counts.audit_rows_anonymised = sqlx::query(
            "UPDATE consent_audit_trail SET user_id = $2, ip = NULL, user_agent = NULL, \
             old_value = CASE WHEN field = 'phone_number' THEN NULL ELSE old_value END, \
             new_value = CASE WHEN field = 'phone_number' THEN NULL ELSE new_value END \
             WHERE user_id = $1",
        )
        .bind(user_id)
        .bind(format!("erased:{user_hash}"))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        counts.preferences = sqlx::query("DELETE FROM messaging_consent WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("INSERT INTO erasures (user_hash, erased_at, erased_by) VALUES ($1, $2, $3)")
            .bind(user_hash)
            .bind(now)
            .bind(erased_by)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if !AFTER_DELETION.is_empty() {
            sqlx::query(AFTER_DELETION).execute(&self.pool).await?;
        }
        Ok(counts)
    }
}

/// Every reply the erasure deletes or rewrites is locked first, in the order of its id
/// (PostgreSQL; SQLite's erasure already holds the write lock). Two erasures of users who share a
/// number each touch the other's replies: taken one by one (the user's own, then those that list
/// them) they deadlocked, and a list read before the other erasure committed was written back
/// with that erased user in it (found by review). In one order they wait for each other instead,
/// and the second reads the lists as the first left them.
async fn lock_replies(tx: &mut sqlx::Transaction<'_, Db>, user_id: &str) -> AppResult<()> {
    if LOCK_FOR_UPDATE.is_empty() {
        return Ok(());
    }
    let quoted = serde_json::to_string(user_id).map_err(anyhow::Error::from)?;
    sqlx::query(&format!(
        "SELECT id FROM incoming_messages WHERE user_id = $1 \
         OR length(replace(user_ids, $2, '')) < length(user_ids) ORDER BY id{LOCK_FOR_UPDATE}"
    ))
    .bind(user_id)
    .bind(&quoted)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Replies from a number the erased user shared stay (another user's, or nobody's), but their
/// list of who had the number (`user_ids`) loses the erased user: it would otherwise still tie
/// their id to that number (found by review). Erasure is rare, so the rows are found by a scan
/// of the lists' text for the id as JSON writes it (`replace`: the one substring test SQLite and
/// PostgreSQL share), and the match is made exact here.
async fn unlist_from_replies(tx: &mut sqlx::Transaction<'_, Db>, user_id: &str) -> AppResult<()> {
    let quoted = serde_json::to_string(user_id).map_err(anyhow::Error::from)?;
    let listed: Vec<(String, String)> = sqlx::query_as(
        "SELECT id, user_ids FROM incoming_messages \
         WHERE length(replace(user_ids, $1, '')) < length(user_ids)",
    )
    .bind(&quoted)
    .fetch_all(&mut **tx)
    .await?;
    for (id, user_ids) in listed {
        // A list that does not parse reads as none (`IncomingMessage::user_ids`): written as
        // none, rather than failing the erasure or keeping the id's text.
        let users: Vec<String> = serde_json::from_str(&user_ids).unwrap_or_default();
        let kept: Vec<&String> = users.iter().filter(|u| u.as_str() != user_id).collect();
        if !users.is_empty() && kept.len() == users.len() {
            continue;
        }
        sqlx::query("UPDATE incoming_messages SET user_ids = $2 WHERE id = $1")
            .bind(&id)
            .bind(serde_json::to_string(&kept).map_err(anyhow::Error::from)?)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}
