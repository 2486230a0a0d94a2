//! The hot writes on PostgreSQL, each one call of a function that migration 17 installs
//! (`migrations/postgres/0017_hot_write_functions.sql`): an OTP issued, a message marked
//! `sending`, a send's outcome recorded.
//!
//! Why: through the portable transactions each statement was a round trip, and PostgreSQL spent
//! most of an OTP send parsing, binding and answering 17 of them. A function runs the same
//! statements on cached plans inside the server, and a single statement outside a transaction
//! block is its own transaction: one round trip, one commit. What the functions write is what the
//! portable twins write (`store_conformance` runs both backends through the same tests).

use chrono::{DateTime, Utc};
use sqlx::{Pool, Postgres};

use crate::error::AppResult;
use crate::status::MessageStatus;
use crate::store::{MarkSending, OtpChecks, OtpIssue, OtpIssueOutcome, SendAttempt, SendGuard};
use crate::vault::Vault;

pub struct PgFunctions {
    pool: Pool<Postgres>,
}

/// What `message_sent` came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentCall {
    Recorded,
    ClaimLost,
    /// Callbacks for the SID wait to be applied: nothing written; the full transaction applies
    /// them with the send.
    CallbacksParked,
}

type IssueRow = (
    String,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    bool,
    bool,
);

impl PgFunctions {
    pub fn new(pool: Pool<Postgres>) -> PgFunctions {
        PgFunctions { pool }
    }

    pub async fn issue_otp(&self, vault: &Vault, issue: &OtpIssue) -> AppResult<OtpIssueOutcome> {
        let phone_index = vault.blind(&issue.phone_number);
        let mut keys = vec![
            format!("otp:phone:{phone_index}"),
            format!("otp:user:{}", issue.user_id),
        ];
        if let Some(ip) = &issue.ip {
            keys.push(format!("otp:ip:{ip}"));
        }
        keys.sort();
        let (window_start, per_number, per_address) = issue.window();
        // The limits `OtpIssue::wait_seconds` applies, as the function's refusal test: a send
        // within the cooldown, a full window, or a limit of zero.
        let cooldown_after = issue.now - chrono::Duration::seconds(issue.cooldown_seconds);
        let refuse_all = issue.max_sends_per_hour <= 0
            || (issue.ip.is_some() && issue.max_sends_per_ip_per_hour <= 0);
        let message = issue.issued_record();
        let attempt = issue.attempt.as_ref();
        let slot = attempt.and_then(|a| a.take_slot.as_ref());
        let row: IssueRow = sqlx::query_as(
            "SELECT * FROM otp_issue($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, \
             $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, \
             $30, $31, $32)",
        )
        .bind(&keys)
        .bind(&phone_index)
        .bind(vault.seal(&issue.phone_number))
        .bind(&issue.user_id)
        .bind(&issue.ip)
        .bind(issue.now)
        .bind(window_start)
        .bind(per_number)
        .bind(per_address)
        .bind(cooldown_after)
        .bind(refuse_all)
        .bind(issue.channel.as_str())
        .bind(vault.blind(&issue.send_to))
        .bind(&message.id)
        .bind(&message.template_name)
        .bind(vault.seal(&message.variables))
        .bind(&message.channel)
        .bind(message.created_at)
        .bind(message.lease_until)
        .bind(message.attempt_started_at)
        .bind(attempt.map(|a| vault.seal(&a.to_number)))
        .bind(attempt.map(|a| vault.blind(&a.to_number)))
        .bind(&message.encoding)
        .bind(message.segments)
        .bind(vault.seal_opt(message.attempt_body.as_deref()))
        .bind(slot.map(|s| s.sender.as_str()))
        .bind(slot.map(|s| s.now_us))
        .bind(slot.map(|s| s.interval_us))
        .bind(&issue.purpose)
        .bind(vault.seal(&issue.send_to))
        .bind(&issue.code_hash)
        .bind(issue.expires_at)
        .fetch_one(&self.pool)
        .await?;
        let checks = OtpChecks {
            last_send: row.1,
            number_full: row.2,
            user_full: row.3,
            address_full: row.4,
            named_opted_out: row.5,
            send_to_opted_out: row.6,
        };
        match row.0.as_str() {
            "rate_limited" => Ok(OtpIssueOutcome::RateLimited {
                retry_after_seconds: issue.wait_seconds(&checks).unwrap_or(1),
            }),
            "opted_out" => Ok(OtpIssueOutcome::OptedOut {
                named: checks.named_opted_out,
            }),
            "issued" => Ok(OtpIssueOutcome::Issued(Box::new(message))),
            other => Err(anyhow::anyhow!("otp_issue answered {other:?}").into()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn mark_sending(
        &self,
        vault: &Vault,
        id: &str,
        attempt: &SendAttempt,
        guard: SendGuard,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
        new_lease: DateTime<Utc>,
    ) -> AppResult<MarkSending> {
        let slot = attempt.take_slot.as_ref();
        let outcome: String = sqlx::query_scalar(
            "SELECT message_mark_sending($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
             $13, $14, $15)",
        )
        .bind(id)
        .bind(vault.seal(&attempt.to_number))
        .bind(&attempt.encoding)
        .bind(attempt.segments)
        .bind(now)
        .bind(attempt.channel.as_str())
        .bind(fence)
        .bind(new_lease)
        .bind(vault.seal_opt(attempt.body.as_deref()))
        .bind(vault.blind(&attempt.to_number))
        .bind(guard.consent)
        .bind(guard.marketing)
        .bind(slot.map(|s| s.sender.as_str()))
        .bind(slot.map(|s| s.now_us))
        .bind(slot.map(|s| s.interval_us))
        .fetch_one(&self.pool)
        .await?;
        match outcome.as_str() {
            "marked" => Ok(MarkSending::Marked),
            "policy_changed" => Ok(MarkSending::PolicyChanged),
            "claim_lost" => Ok(MarkSending::ClaimLost),
            other => Err(anyhow::anyhow!("message_mark_sending answered {other:?}").into()),
        }
    }

    /// `news` must already be checked to follow `status` (`MessageStatus::may_follow`).
    pub async fn record_sent(
        &self,
        id: &str,
        provider_sid: &str,
        status: MessageStatus,
        news: Option<MessageStatus>,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
    ) -> AppResult<SentCall> {
        let outcome: String = sqlx::query_scalar("SELECT message_sent($1, $2, $3, $4, $5, $6)")
            .bind(id)
            .bind(fence)
            .bind(status)
            .bind(news)
            .bind(provider_sid)
            .bind(now)
            .fetch_one(&self.pool)
            .await?;
        match outcome.as_str() {
            "recorded" => Ok(SentCall::Recorded),
            "claim_lost" => Ok(SentCall::ClaimLost),
            "parked" => Ok(SentCall::CallbacksParked),
            other => Err(anyhow::anyhow!("message_sent answered {other:?}").into()),
        }
    }
}
