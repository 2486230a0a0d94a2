//! The hot writes on the SQLite writer thread (see `writer.rs`): what every OTP, every dispatched
//! message and every status callback writes. Each is the same statements, in the same order, as
//! its twin in `store/portable/` (which PostgreSQL and an in-memory SQLite run), on prepared
//! statements in the writer's shared transaction. The writer holds the write lock for the whole
//! batch, so what a job reads cannot change before it writes; no key locks are needed.
//!
//! `store_conformance` runs every one of these against both backends.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, Row, ToSql};

use super::writer::{execute, parse_ts, prepare, scalar, ts, SqliteWriter};
use crate::error::AppResult;
use crate::status::{MessageStatus, SkipReason};
use crate::store::{
    AcceptedSend, DispatchResult, KnownStatus, LimitRefusal, MarkSending, MessageRecord, OtpChecks,
    OtpIssue, OtpIssueOutcome, OtpLimits, SealedAttempt, SendAttempt, SendGuard, SendSlot,
    SendSlotAnswer, SqlArg, Stale, StatusApplied, MESSAGE_COLUMNS,
};
use crate::vault::Vault;

impl SqliteWriter {
    pub async fn issue_otp(
        &self,
        vault: &Arc<Vault>,
        issue: &OtpIssue,
    ) -> AppResult<OtpIssueOutcome> {
        let (vault, issue) = (vault.clone(), issue.clone());
        self.write(move |conn| issue_otp(conn, &vault, &issue))
            .await
    }

    /// Lease the messages due, as `MessageStore::claim_messages` does; their sealed columns
    /// are left sealed, for the caller to open (off this thread, and one by one: a message that
    /// cannot be opened must not undo the claim of the others).
    pub async fn claim_sealed_messages(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
        stale: Stale,
    ) -> AppResult<Vec<MessageRecord>> {
        self.write(move |conn| {
            let mut claimed = Vec::new();
            for sql in crate::store::claim_sql("", stale) {
                let left = limit - claimed.len() as i64;
                if left <= 0 {
                    break;
                }
                let mut statement = prepare(conn, &sql, &[&ts(&lease_until), &ts(&now), &left])?;
                let mut rows = statement.raw_query();
                while let Some(row) = rows.next()? {
                    claimed.push(sealed_message_from_row(row)?);
                }
            }
            Ok(claimed)
        })
        .await
    }

    pub async fn consume_otp(
        &self,
        user_id: &str,
        purpose: &str,
        code_hash: &str,
        max_attempts: i64,
        now: DateTime<Utc>,
    ) -> AppResult<bool> {
        let params = (
            user_id.to_string(),
            purpose.to_string(),
            code_hash.to_string(),
        );
        self.write(move |conn| {
            let (user_id, purpose, code_hash) = &params;
            let used = execute(
                conn,
                crate::store::CONSUME_OTP,
                &[user_id, purpose, code_hash, &ts(&now), &max_attempts],
            )?;
            Ok(used == 1)
        })
        .await
    }

    pub async fn record_otp_failure(
        &self,
        user_id: &str,
        purpose: &str,
        now: DateTime<Utc>,
        window_ends_at: DateTime<Utc>,
    ) -> AppResult<i64> {
        let (user_id, purpose) = (user_id.to_string(), purpose.to_string());
        self.write(move |conn| {
            scalar(
                conn,
                crate::store::RECORD_OTP_FAILURE,
                &[&user_id, &purpose, &ts(&now), &ts(&window_ends_at)],
            )?
            .ok_or_else(|| anyhow::anyhow!("counting a wrong code returned no row").into())
        })
        .await
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn mark_sending(
        &self,
        vault: &Arc<Vault>,
        id: &str,
        attempt: &SendAttempt,
        guard: SendGuard,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
        new_lease: DateTime<Utc>,
    ) -> AppResult<MarkSending> {
        let sealed = attempt.sealed(vault);
        let (id, attempt) = (id.to_string(), attempt.clone());
        self.write(move |conn| {
            mark_sending(conn, &id, &attempt, &sealed, guard, now, fence, new_lease)
        })
        .await
    }

    pub async fn record_dispatch(
        &self,
        id: &str,
        result: &DispatchResult,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
    ) -> AppResult<bool> {
        let (id, result) = (id.to_string(), result.clone());
        self.write(move |conn| record_dispatch(conn, &id, &result, now, fence))
            .await
    }

    pub async fn apply_status(
        &self,
        vault: &Arc<Vault>,
        provider_sid: &str,
        status: MessageStatus,
        error_code: Option<i64>,
        at: DateTime<Utc>,
    ) -> AppResult<StatusApplied> {
        let (vault, sid) = (vault.clone(), provider_sid.to_string());
        self.write(move |conn| apply_status(conn, &vault, &sid, status, error_code, at))
            .await
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn record_sent(
        &self,
        vault: &Arc<Vault>,
        id: &str,
        provider_sid: &str,
        status: MessageStatus,
        news: Option<MessageStatus>,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
    ) -> AppResult<Option<Vec<KnownStatus>>> {
        let (vault, id, sid) = (vault.clone(), id.to_string(), provider_sid.to_string());
        self.write(move |conn| record_sent(conn, &vault, &id, &sid, status, news, now, fence))
            .await
    }

    pub async fn reserve_send_slot(
        &self,
        sender: &str,
        now_us: i64,
        interval_us: i64,
        latest_us: i64,
    ) -> AppResult<SendSlotAnswer> {
        let slot = SendSlot {
            sender: sender.to_string(),
            now_us,
            interval_us,
        };
        self.write(move |conn| reserve_slot_by(conn, &slot, latest_us))
            .await
    }
}

fn issue_otp(conn: &Connection, vault: &Vault, issue: &OtpIssue) -> AppResult<OtpIssueOutcome> {
    let phone_index = vault.blind(&issue.phone_number);
    let send_to_index = vault.blind(&issue.send_to);
    // The writer holds the write lock: the counts cannot move before this send is logged, so
    // it is logged only once it may go (a refused send writes nothing).
    let checks = otp_checks(
        conn,
        &issue.limits(),
        &phone_index,
        &send_to_index,
        issue.checked_destination(&send_to_index),
    )?;
    if let Some(refusal) = issue.refusal(&checks) {
        return Ok(OtpIssueOutcome::RateLimited(refusal));
    }
    let opted_out = issue.opted_out(&checks);
    let dropped = opted_out.is_none() && issue.destination_limited(&checks);
    // Counted against the number it went to only if a code goes out.
    let destination = issue.logged_destination(&send_to_index, opted_out.is_none() && !dropped);
    execute(
        conn,
        "INSERT INTO otp_send_log (phone_number, user_id, ip, created_at, phone_index, \
         send_to_index, went_to_named) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &vault.seal(&issue.phone_number),
            &issue.user_id,
            &issue.ip,
            &ts(&issue.now),
            &phone_index,
            &destination.send_to_index,
            &destination.went_to_named,
        ],
    )?;
    if let Some(named) = opted_out {
        return Ok(OtpIssueOutcome::OptedOut { named });
    }
    let (attempt, record) = issue.written(dropped);
    let m = &issue.message;
    let sealed = attempt.map(|a| a.sealed(vault));
    let at = ts(&m.created_at);
    execute(
        conn,
        crate::store::INSERT_OTP_MESSAGE,
        &[
            &m.id,
            &m.user_id,
            &m.template_name,
            &vault.seal(&m.variables),
            &record.channel,
            &at,
            &record.lease_until.as_ref().map(ts),
            &attempt.map(|_| at.clone()),
            &sealed.as_ref().map(|s| &s.to_number),
            &sealed.as_ref().map(|s| &s.to_index),
            &attempt.and_then(|a| a.encoding.clone()),
            &attempt.and_then(|a| a.segments),
            &sealed.as_ref().and_then(|s| s.body.as_ref()),
            &record.status.as_str(),
            &record.provider_sid,
        ],
    )?;
    if let Some(attempt) = attempt {
        marked_sending(conn, &m.id, attempt, &at)?;
        if let Some(accepted) = issue.accepted_send() {
            accepted_events(conn, &m.id, accepted, &at)?;
        }
    }
    execute(
        conn,
        "INSERT INTO otp_codes (user_id, purpose, phone_number, channel, code_hash, attempts, \
         expires_at, used_at, message_id, created_at) \
         VALUES ($1, $2, $3, $4, $5, 0, $6, NULL, $7, $8) \
         ON CONFLICT (user_id, purpose) DO UPDATE SET phone_number = excluded.phone_number, \
         channel = excluded.channel, code_hash = excluded.code_hash, attempts = 0, \
         expires_at = excluded.expires_at, used_at = NULL, message_id = excluded.message_id, \
         created_at = excluded.created_at",
        &[
            &issue.user_id,
            &issue.purpose,
            &vault.seal(&issue.send_to),
            &issue.channel.as_str(),
            &issue.code_hash,
            &ts(&issue.expires_at),
            &m.id,
            &ts(&issue.now),
        ],
    )?;
    // A new code starts a new count of wrong tries.
    execute(
        conn,
        "DELETE FROM otp_failures WHERE user_id = $1 AND purpose = $2",
        &[&issue.user_id, &issue.purpose],
    )?;
    Ok(OtpIssueOutcome::written(record, dropped))
}

/// The wait a limit imposes, read from committed state (`SqliteReaders::otp_refusal`).
pub(super) fn otp_refusal(
    conn: &Connection,
    vault: &Vault,
    limits: &OtpLimits<'_>,
) -> AppResult<Option<LimitRefusal>> {
    let phone_index = vault.blind(limits.phone_number);
    // The opt-out columns are not used here: any number will do for the code's destination.
    let checks = otp_checks(conn, limits, &phone_index, &phone_index, None)?;
    Ok(limits.refusal(&checks))
}

/// `OTP_CHECKS` for a send within `limits` (not logged yet: no id to leave out), whose code
/// goes to the number with blind index `send_to_index`; `destination`: that index when the
/// number's own limits apply (a number on file in place of the number named).
fn otp_checks(
    conn: &Connection,
    limits: &OtpLimits<'_>,
    phone_index: &str,
    send_to_index: &str,
    destination: Option<&str>,
) -> AppResult<OtpChecks> {
    let (window_start, per_number, per_address) = limits.window();
    let mut statement = prepare(
        conn,
        crate::store::OTP_CHECKS,
        &[
            &phone_index,
            &limits.user_id,
            &limits.ip,
            &ts(&window_start),
            &per_number,
            &per_address,
            &0i64,
            &limits.channel.as_str(),
            &send_to_index,
            &destination,
        ],
    )?;
    let mut rows = statement.raw_query();
    let row = rows
        .next()?
        .ok_or_else(|| anyhow::anyhow!("the OTP checks returned no row"))?;
    let time = |i: usize| -> AppResult<Option<DateTime<Utc>>> {
        row.get::<_, Option<String>>(i)?
            .map(|t| parse_ts(&t))
            .transpose()
    };
    Ok(OtpChecks {
        last_send: time(0)?,
        number_full: time(1)?,
        user_full: time(2)?,
        address_full: time(3)?,
        named_opted_out: row.get::<_, i64>(4)? > 0,
        send_to_opted_out: row.get::<_, i64>(5)? > 0,
        destination_last_send: time(6)?,
        destination_full: time(7)?,
    })
}

#[allow(clippy::too_many_arguments)]
fn mark_sending(
    conn: &Connection,
    id: &str,
    attempt: &SendAttempt,
    sealed: &SealedAttempt,
    guard: SendGuard,
    now: DateTime<Utc>,
    fence: DateTime<Utc>,
    new_lease: DateTime<Utc>,
) -> AppResult<MarkSending> {
    let sql = crate::store::mark_sending_sql(guard, attempt.channel);
    let (now, fence) = (ts(&now), ts(&fence));
    let updated = execute(
        conn,
        &sql,
        &[
            &id,
            &sealed.to_number,
            &attempt.encoding,
            &attempt.segments,
            &now,
            &attempt.channel.as_str(),
            &fence,
            &ts(&new_lease),
            &sealed.body,
            &sealed.to_index,
        ],
    )? == 1;
    if !updated {
        let still_ours: Option<i64> = scalar(
            conn,
            "SELECT COUNT(*) FROM messages WHERE id = $1 AND lease_until = $2 \
             AND status IN ('queued', 'sending')",
            &[&id, &fence],
        )?;
        return Ok(if still_ours == Some(1) {
            MarkSending::PolicyChanged
        } else {
            MarkSending::ClaimLost
        });
    }
    marked_sending(conn, id, attempt, &now)?;
    Ok(MarkSending::Marked)
}

/// What marking a message `sending` writes besides its row: the event, and the sender's slot
/// when the attempt takes one.
fn marked_sending(conn: &Connection, id: &str, attempt: &SendAttempt, at: &str) -> AppResult<()> {
    insert_event(conn, id, MessageStatus::Sending, None, None, at)?;
    if let Some(slot) = &attempt.take_slot {
        reserve_slot(conn, slot)?;
    }
    Ok(())
}

/// Take the sender's next send slot; its start.
fn reserve_slot(conn: &Connection, slot: &SendSlot) -> AppResult<i64> {
    match reserve_slot_by(conn, slot, i64::MAX)? {
        SendSlotAnswer::Reserved(at) => Ok(at),
        SendSlotAnswer::NextFreeAt(_) => {
            Err(anyhow::anyhow!("a send slot with no latest time was not reserved").into())
        }
    }
}

/// `MessageStore::reserve_send_slot` inside the writer.
fn reserve_slot_by(
    conn: &Connection,
    slot: &SendSlot,
    latest_us: i64,
) -> AppResult<SendSlotAnswer> {
    let reserved = scalar(
        conn,
        crate::store::RESERVE_SEND_SLOT,
        &[&slot.sender, &slot.now_us, &slot.interval_us, &latest_us],
    )?;
    let next_free_at = match reserved {
        Some(_) => None,
        None => scalar(conn, crate::store::NEXT_SEND_SLOT, &[&slot.sender])?,
    };
    SendSlotAnswer::from_rows(reserved, next_free_at)
}

fn record_dispatch(
    conn: &Connection,
    id: &str,
    result: &DispatchResult,
    now: DateTime<Utc>,
    fence: DateTime<Utc>,
) -> AppResult<bool> {
    let (sql, args, event) = crate::store::dispatch_write(result, now);
    let (now, fence) = (ts(&now), ts(&fence));
    let extra: Vec<Box<dyn ToSql>> = args
        .into_iter()
        .map(|arg| -> Box<dyn ToSql> {
            match arg {
                SqlArg::Text(v) => Box::new(v),
                SqlArg::OptText(v) => Box::new(v),
                SqlArg::OptInt(v) => Box::new(v),
                SqlArg::Bool(v) => Box::new(v),
                SqlArg::Time(v) => Box::new(ts(&v)),
            }
        })
        .collect();
    let mut params: Vec<&dyn ToSql> = vec![&id, &fence];
    params.extend(extra.iter().map(|p| p.as_ref()));
    if execute(conn, sql, &params)? != 1 {
        return Ok(false);
    }
    if let Some((status, code, detail)) = event {
        insert_event(conn, id, status, code, detail.as_deref(), &now)?;
    }
    if let DispatchResult::Skipped { reason } = result {
        if reason.frees_reminder() {
            execute(
                conn,
                "UPDATE reminder_log SET active = FALSE WHERE message_id = $1",
                &[&id],
            )?;
        }
    }
    Ok(true)
}

/// The callbacks parked for the SID, dropped once applied but a carrier opt-out
/// (`store::DROP_APPLIED_PARKED`).
fn take_unmatched(conn: &Connection, provider_sid: &str) -> AppResult<Vec<(String, Option<i64>)>> {
    let mut statement = prepare(conn, crate::store::PARKED_FOR_SID, &[&provider_sid])?;
    let mut rows = statement.raw_query();
    let mut taken = Vec::new();
    while let Some(row) = rows.next()? {
        taken.push((row.get(0)?, row.get(1)?));
    }
    if !taken.is_empty() {
        execute(conn, crate::store::DROP_APPLIED_PARKED, &[&provider_sid])?;
    }
    Ok(taken)
}

/// `store::portable::messages::accepted_events`: the events of a send an in-process provider
/// accepted, after its `sending` one (the message was written where the send ends).
fn accepted_events(
    conn: &Connection,
    id: &str,
    accepted: &AcceptedSend,
    at: &str,
) -> AppResult<()> {
    insert_event(conn, id, MessageStatus::Sent, None, None, at)?;
    if let Some(news) = accepted.news {
        insert_event(conn, id, news, None, Some("provider answer"), at)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn record_sent(
    conn: &Connection,
    vault: &Vault,
    id: &str,
    provider_sid: &str,
    status: MessageStatus,
    news: Option<MessageStatus>,
    now: DateTime<Utc>,
    fence: DateTime<Utc>,
) -> AppResult<Option<Vec<KnownStatus>>> {
    let at = ts(&now);
    let news = news.filter(|n| n.may_follow(status));
    let recorded = execute(
        conn,
        crate::store::RECORD_SENT,
        &[
            &id,
            &ts(&fence),
            &news.unwrap_or(status).as_str(),
            &provider_sid,
            &at,
        ],
    )? == 1;
    if !recorded {
        return Ok(None);
    }
    insert_event(conn, id, status, None, None, &at)?;
    if let Some(news) = news {
        insert_event(conn, id, news, None, Some("provider answer"), &at)?;
    }
    let early = take_unmatched(conn, provider_sid)?;
    let mut known = Vec::new();
    for (status, error_code) in early
        .iter()
        .filter_map(|(s, code)| Some((MessageStatus::from_twilio(s)?, *code)))
    {
        let applied = apply_status(conn, vault, provider_sid, status, error_code, now)?;
        known.push(KnownStatus {
            status,
            error_code,
            applied,
        });
    }
    Ok(Some(known))
}

fn apply_status(
    conn: &Connection,
    vault: &Vault,
    provider_sid: &str,
    status: MessageStatus,
    error_code: Option<i64>,
    at: DateTime<Utc>,
) -> AppResult<StatusApplied> {
    let at = ts(&at);
    let changed = execute(
        conn,
        &crate::store::apply_status_sql(status),
        &[&provider_sid, &status.as_str(), &error_code, &at],
    )? == 1;
    let message = {
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE provider_sid = $1");
        let mut statement = prepare(conn, &sql, &[&provider_sid])?;
        let mut rows = statement.raw_query();
        match rows.next()? {
            Some(row) => Some(message_from_row(row, vault)?),
            None => None,
        }
    };
    let mut first_seen = false;
    match &message {
        Some(m) => {
            let seen: Option<i64> = scalar(
                conn,
                "SELECT COUNT(*) FROM message_events WHERE message_id = $1 AND status = $2 \
                 AND (error_code = $3 OR (error_code IS NULL AND $3 IS NULL))",
                &[&m.id, &status.as_str(), &error_code],
            )?;
            first_seen = seen == Some(0);
            let new_code_for_current = m.status == status && error_code.is_some();
            if !changed && first_seen && new_code_for_current {
                execute(
                    conn,
                    "UPDATE messages SET error_code = $2 WHERE id = $1",
                    &[&m.id, &error_code],
                )?;
            }
            if changed || (first_seen && new_code_for_current) {
                insert_event(
                    conn,
                    &m.id,
                    status,
                    error_code,
                    Some("status callback"),
                    &at,
                )?;
            }
        }
        None => {
            execute(
                conn,
                "INSERT INTO unmatched_status_callbacks (provider_sid, status, error_code, \
                 received_at) VALUES ($1, $2, $3, $4) ON CONFLICT (provider_sid, status) \
                 DO NOTHING",
                &[&provider_sid, &status.as_str(), &error_code, &at],
            )?;
        }
    }
    Ok(StatusApplied {
        message,
        changed,
        first_seen,
    })
}

/// Append a status event; a repeat of the same status and error code is a no-op.
fn insert_event(
    conn: &Connection,
    message_id: &str,
    status: MessageStatus,
    error_code: Option<i64>,
    detail: Option<&str>,
    at: &str,
) -> AppResult<()> {
    execute(
        conn,
        "INSERT INTO message_events (message_id, status, error_code, detail, occurred_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        &[&message_id, &status.as_str(), &error_code, &detail, &at],
    )?;
    Ok(())
}

/// A `messages` row read with `MESSAGE_COLUMNS`, its sealed columns opened.
fn message_from_row(row: &Row<'_>, vault: &Vault) -> AppResult<MessageRecord> {
    crate::store::open_message(vault, sealed_message_from_row(row)?)
}

/// A `messages` row read with `MESSAGE_COLUMNS`, its sealed columns as stored.
fn sealed_message_from_row(row: &Row<'_>) -> AppResult<MessageRecord> {
    let time = |i: usize| -> AppResult<DateTime<Utc>> { parse_ts(&row.get::<_, String>(i)?) };
    let opt_time = |i: usize| -> AppResult<Option<DateTime<Utc>>> {
        row.get::<_, Option<String>>(i)?
            .map(|t| parse_ts(&t))
            .transpose()
    };
    let status: String = row.get(5)?;
    let reason: Option<String> = row.get(6)?;
    Ok(MessageRecord {
        id: row.get(0)?,
        user_id: row.get(1)?,
        template_name: row.get(2)?,
        variables: row.get(3)?,
        channel: row.get(4)?,
        status: status
            .parse::<MessageStatus>()
            .map_err(anyhow::Error::msg)?,
        reason: reason
            .map(|r| r.parse::<SkipReason>().map_err(anyhow::Error::msg))
            .transpose()?,
        to_number: row.get(7)?,
        provider_sid: row.get(8)?,
        error_code: row.get(9)?,
        error_message: row.get(10)?,
        encoding: row.get(11)?,
        segments: row.get(12)?,
        attempts: row.get(13)?,
        idempotency_key: row.get(14)?,
        next_attempt_at: time(15)?,
        lease_until: opt_time(16)?,
        created_at: time(17)?,
        updated_at: time(18)?,
        requested_channel: row.get(19)?,
        attempt_started_at: opt_time(20)?,
        attempt_body: row.get(21)?,
        lookup_needed: row.get(22)?,
    })
}
