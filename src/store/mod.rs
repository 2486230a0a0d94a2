//! Storage: the only code that speaks SQL.
//!
//! One [`Store`] interface with two implementations, chosen by the scheme of `DATABASE_URL`:
//! [`sqlite::SqliteStore`] (the embedded default) and [`postgres::PostgresStore`] (for several
//! instances). The SQL both accept lives once, in `portable.rs`, which each backend compiles
//! against its own concrete sqlx types (`include!`), so there is no duplicated query and no
//! generic-bound maze; what differs (row locking, claiming) lives in each backend's file.
//! Migrations: `migrations/sqlite` and `migrations/postgres`, with matching versions.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{AppError, AppResult};

/// How a consent change came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentSource {
    AppSettings,
    WebSettings,
    SmsKeyword,
    Api,
    Provider,
}

impl ConsentSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsentSource::AppSettings => "app_settings",
            ConsentSource::WebSettings => "web_settings",
            ConsentSource::SmsKeyword => "sms_keyword",
            ConsentSource::Api => "api",
            ConsentSource::Provider => "provider",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        [
            ConsentSource::AppSettings,
            ConsentSource::WebSettings,
            ConsentSource::SmsKeyword,
            ConsentSource::Api,
            ConsentSource::Provider,
        ]
        .into_iter()
        .find(|s| s.as_str() == value)
    }
}

/// A user's consent record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Consent {
    pub user_id: String,
    /// E.164.
    pub phone_number: Option<String>,
    pub sms_consent: bool,
    pub whatsapp_consent: bool,
    pub marketing_consent: bool,
    pub updated_at: DateTime<Utc>,
}

/// A requested change: `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ConsentPatch {
    pub phone_number: Option<String>,
    /// Remove the stored number (refused while SMS or WhatsApp consent stays on).
    pub clear_phone_number: bool,
    pub sms_consent: Option<bool>,
    pub whatsapp_consent: Option<bool>,
    pub marketing_consent: Option<bool>,
}

/// Who made a change and from where: recorded with every audit row.
#[derive(Debug, Clone)]
pub struct ChangeContext {
    pub source: ConsentSource,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ConsentAuditRecord {
    pub id: i64,
    pub user_id: String,
    /// `phone_number`, `sms_consent`, `whatsapp_consent` or `marketing_consent`.
    pub field: String,
    pub old_value: Option<String>,
    pub new_value: Option<String>,
    pub source: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl Consent {
    /// The record after `patch`, or an error when the result would be inconsistent (consent to
    /// be messaged with no number to message).
    pub fn patched(&self, patch: &ConsentPatch) -> AppResult<Consent> {
        let next = Consent {
            user_id: self.user_id.clone(),
            phone_number: if patch.clear_phone_number {
                None
            } else {
                patch
                    .phone_number
                    .clone()
                    .or_else(|| self.phone_number.clone())
            },
            sms_consent: patch.sms_consent.unwrap_or(self.sms_consent),
            whatsapp_consent: patch.whatsapp_consent.unwrap_or(self.whatsapp_consent),
            marketing_consent: patch.marketing_consent.unwrap_or(self.marketing_consent),
            updated_at: self.updated_at,
        };
        if next.phone_number.is_none() && (next.sms_consent || next.whatsapp_consent) {
            return Err(AppError::bad_request(
                "phone_required",
                "a phone_number is needed to consent to SMS or WhatsApp messages",
            ));
        }
        Ok(next)
    }

    /// The audit rows (field, old, new) that turn `self` into `next`.
    fn changes_to(
        &self,
        next: &Consent,
        is_new: bool,
    ) -> Vec<(&'static str, Option<String>, Option<String>)> {
        let old = |v: String| if is_new { None } else { Some(v) };
        let mut rows = Vec::new();
        if is_new || self.phone_number != next.phone_number {
            rows.push((
                "phone_number",
                if is_new {
                    None
                } else {
                    self.phone_number.clone()
                },
                next.phone_number.clone(),
            ));
        }
        for (field, before, after) in [
            ("sms_consent", self.sms_consent, next.sms_consent),
            (
                "whatsapp_consent",
                self.whatsapp_consent,
                next.whatsapp_consent,
            ),
            (
                "marketing_consent",
                self.marketing_consent,
                next.marketing_consent,
            ),
        ] {
            if is_new || before != after {
                rows.push((field, old(before.to_string()), Some(after.to_string())));
            }
        }
        rows
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Sms,
    Whatsapp,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Sms => "sms",
            Channel::Whatsapp => "whatsapp",
        }
    }
    pub fn parse(value: &str) -> Option<Channel> {
        match value {
            "sms" => Some(Channel::Sms),
            "whatsapp" => Some(Channel::Whatsapp),
            _ => None,
        }
    }
}

/// A message to queue.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: String,
    pub user_id: String,
    pub template_name: String,
    /// The validated variables as a JSON object.
    pub variables: String,
    pub channel: Channel,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
    /// `Some(lease)`: written already claimed (`sending`, leased until then) for a caller that
    /// sends it at once itself (OTP codes, which never rest in the database); `None`: `queued`
    /// for the dispatcher.
    pub claimed_until: Option<DateTime<Utc>>,
}

/// A row of `messages`: the outbox and the message log in one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct MessageRecord {
    pub id: String,
    pub user_id: String,
    pub template_name: String,
    #[serde(skip)]
    pub variables: String,
    pub channel: String,
    pub status: String,
    pub reason: Option<String>,
    #[serde(skip)]
    pub to_number: Option<String>,
    pub provider_sid: Option<String>,
    pub error_code: Option<i64>,
    pub error_message: Option<String>,
    pub encoding: Option<String>,
    pub segments: Option<i64>,
    pub attempts: i64,
    #[serde(skip)]
    pub idempotency_key: Option<String>,
    #[serde(skip)]
    pub next_attempt_at: DateTime<Utc>,
    /// Also the claim's fencing token: writes for a claimed message require the value its claim
    /// set, so a dispatcher whose claim was taken over cannot overwrite the new owner's work.
    #[serde(skip)]
    pub lease_until: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The channel the host app asked for, when the message went by another (WhatsApp fell back
    /// to SMS).
    pub requested_channel: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct MessageEvent {
    pub status: String,
    pub error_code: Option<i64>,
    pub detail: Option<String>,
    pub occurred_at: DateTime<Utc>,
}

/// What the dispatcher learned about one message; each becomes a status and an event.
#[derive(Debug, Clone)]
pub enum DispatchResult {
    /// The provider accepted it. `status` is ours (`sent`, `delivered`, ...).
    Sent {
        provider_sid: String,
        status: String,
    },
    /// Not sent, on purpose: `no_consent`, `disabled`, ...
    Skipped { reason: String },
    /// Not sent and never will be.
    Failed { code: Option<i64>, message: String },
    /// Not sent this time; queued again for `next_attempt_at`.
    Retry {
        code: Option<i64>,
        message: String,
        next_attempt_at: DateTime<Utc>,
    },
    /// Not tried: held back until `until` (quiet hours). No attempt is counted.
    Deferred {
        until: DateTime<Utc>,
        reason: String,
    },
}

/// Details fixed when a send is attempted: where to, and what it costs.
#[derive(Debug, Clone)]
pub struct SendAttempt {
    pub to_number: String,
    /// The channel it goes by (a WhatsApp message may fall back to SMS).
    pub channel: Channel,
    pub encoding: String,
    pub segments: i64,
}

/// What a reminder is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectType {
    Appointment,
    FollowUp,
}

impl SubjectType {
    pub fn as_str(self) -> &'static str {
        match self {
            SubjectType::Appointment => "appointment",
            SubjectType::FollowUp => "follow_up",
        }
    }
    pub fn parse(value: &str) -> Option<SubjectType> {
        match value {
            "appointment" => Some(SubjectType::Appointment),
            "follow_up" => Some(SubjectType::FollowUp),
            _ => None,
        }
    }
    /// Its table and time column (fixed strings, safe to put in SQL).
    pub(crate) fn table(self) -> (&'static str, &'static str) {
        match self {
            SubjectType::Appointment => ("appointments", "starts_at"),
            SubjectType::FollowUp => ("follow_ups", "due_at"),
        }
    }
}

/// An appointment (`scheduled_at` = its start) or a follow-up (`scheduled_at` = when it is due),
/// as the host app pushed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ScheduledItem {
    pub id: String,
    pub user_id: String,
    pub scheduled_at: DateTime<Utc>,
    pub time_zone: String,
    /// `scheduled` or `cancelled`.
    pub status: String,
}

/// A message from a patient (a reply or a keyword), as received from Twilio.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct IncomingMessage {
    pub id: String,
    pub provider_sid: String,
    pub channel: String,
    /// The sender, E.164 (the `whatsapp:` prefix removed).
    pub from_number: String,
    pub to_number: Option<String>,
    /// The user whose stored number matches, if any.
    pub user_id: Option<String>,
    pub body: String,
    /// `stop`, `start` or `help` when the body was a keyword.
    pub keyword: Option<String>,
    /// The template the reply used, if one was sent.
    pub reply_template: Option<String>,
    /// Twilio's `OptOutType` when its Advanced Opt-Out handled the keyword.
    pub opt_out_type: Option<String>,
    pub received_at: DateTime<Utc>,
}

/// What a status callback did to its message.
#[derive(Debug, Clone)]
pub struct StatusApplied {
    /// The message after the callback; `None` when no message has that SID.
    pub message: Option<MessageRecord>,
    /// Whether its status moved.
    pub changed: bool,
}

/// A new one-time passcode, written with its message and its rate-limit record in one
/// transaction.
#[derive(Debug, Clone)]
pub struct OtpIssue {
    pub user_id: String,
    pub purpose: String,
    pub phone_number: String,
    pub channel: Channel,
    /// Keyed hash of the code; the code itself never reaches the database.
    pub code_hash: String,
    pub ip: Option<String>,
    pub expires_at: DateTime<Utc>,
    pub now: DateTime<Utc>,
    pub cooldown_seconds: i64,
    pub max_sends_per_hour: i64,
    /// The message that carries the code (written claimed: the caller sends it at once). `None`
    /// logs the request against the limits only (a refused request must still count, or the
    /// refusal could be probed without limit).
    pub message: Option<NewMessage>,
}

#[derive(Debug, Clone)]
pub enum OtpIssueOutcome {
    Issued(Box<MessageRecord>),
    /// Within the limits and logged against them, with no code and no message (`message: None`).
    Logged,
    /// A limit was hit; nothing was written.
    RateLimited {
        retry_after_seconds: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OtpRecord {
    pub user_id: String,
    pub purpose: String,
    pub phone_number: String,
    pub channel: String,
    pub code_hash: String,
    pub attempts: i64,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// What an OTP cleanup removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OtpCleanup {
    pub expired_deleted: u64,
    pub used_deleted: u64,
    pub send_log_pruned: u64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Apply this backend's pending migrations.
    async fn migrate(&self) -> AppResult<()>;
    /// A cheap round trip, for `/readyz`.
    async fn ping(&self) -> AppResult<()>;

    async fn get_consent(&self, user_id: &str) -> AppResult<Option<Consent>>;
    /// Apply `patch` to the user's record (creating it when needed) and append one audit row per
    /// changed field, in one transaction.
    async fn update_consent(
        &self,
        user_id: &str,
        patch: &ConsentPatch,
        ctx: &ChangeContext,
    ) -> AppResult<Consent>;
    async fn consent_audit(&self, user_id: &str) -> AppResult<Vec<ConsentAuditRecord>>;

    /// Queue a message. With an idempotency key that is already taken, nothing is written and the
    /// existing message is returned with `false`.
    async fn insert_message(&self, message: &NewMessage) -> AppResult<(MessageRecord, bool)>;
    async fn get_message(&self, id: &str) -> AppResult<Option<MessageRecord>>;
    async fn message_events(&self, id: &str) -> AppResult<Vec<MessageEvent>>;
    async fn message_by_sid(&self, provider_sid: &str) -> AppResult<Option<MessageRecord>>;
    /// How many messages are in each status (for `/metrics`).
    async fn message_status_counts(&self) -> AppResult<Vec<(String, i64)>>;
    /// The user's messages, newest first.
    async fn user_messages(&self, user_id: &str, limit: i64) -> AppResult<Vec<MessageRecord>>;

    /// Claim up to `limit` messages: queued ones that are due, and `sending` ones without a
    /// provider SID whose lease has run out (their process died mid-send; the dispatcher looks
    /// them up at the provider before sending again). Claimed messages are leased until
    /// `lease_until` so no other dispatcher takes them meanwhile. Oldest first.
    async fn claim_due_messages(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> AppResult<Vec<MessageRecord>>;
    /// Give a claimed message back unsent (shutdown): its lease ends now.
    async fn release_claim(
        &self,
        id: &str,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
    ) -> AppResult<()>;
    /// Reserve the next send slot for `sender`, at least `interval_us` after the previous one and
    /// not before `now_us` (microseconds since the epoch). Returns the slot's time.
    async fn reserve_send_slot(
        &self,
        sender: &str,
        now_us: i64,
        interval_us: i64,
    ) -> AppResult<i64>;
    /// Mark a claimed message `sending` (one more attempt) just before the provider call.
    /// `fence` is the lease the claim set; the lease is renewed to `new_lease` for the provider
    /// call. `false` (and nothing written) when the claim is no longer ours.
    async fn mark_sending(
        &self,
        id: &str,
        attempt: &SendAttempt,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
        new_lease: DateTime<Utc>,
    ) -> AppResult<bool>;
    /// Record what happened to a claimed message and release its lease, if the claim (`fence`,
    /// the current lease) is still ours; `false` and nothing written otherwise.
    async fn record_dispatch(
        &self,
        id: &str,
        result: &DispatchResult,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
    ) -> AppResult<bool>;
    /// Status callbacks that arrived before their SID was recorded, removed as they are taken.
    async fn take_unmatched_statuses(
        &self,
        provider_sid: &str,
    ) -> AppResult<Vec<(String, Option<i64>)>>;
    /// Forget unmatched callbacks older than `before` (their message was never ours).
    async fn prune_unmatched_statuses(&self, before: DateTime<Utc>) -> AppResult<u64>;

    /// Check the OTP send limits and, within them, replace the (user, purpose) code, log the send
    /// and write its message, all in one transaction. Limits are checked under a lock on the
    /// number, user and IP, so concurrent requests cannot slip past them together.
    async fn issue_otp(&self, issue: &OtpIssue) -> AppResult<OtpIssueOutcome>;
    async fn get_otp(&self, user_id: &str, purpose: &str) -> AppResult<Option<OtpRecord>>;
    /// Mark the code used if it is still the live one (same hash), unused, unexpired and not out
    /// of attempts. `true` for exactly one caller.
    async fn consume_otp(
        &self,
        user_id: &str,
        purpose: &str,
        code_hash: &str,
        max_attempts: i64,
        now: DateTime<Utc>,
    ) -> AppResult<bool>;
    /// Count a wrong try against the live code (`code_hash` is the stored one); the new count.
    async fn record_otp_failure(
        &self,
        user_id: &str,
        purpose: &str,
        code_hash: &str,
    ) -> AppResult<Option<i64>>;
    /// Delete used and expired codes and rate-limit records older than an hour.
    async fn cleanup_otps(&self, now: DateTime<Utc>) -> AppResult<OtpCleanup>;

    /// Whether the number texted STOP on this channel (and not START since).
    async fn is_opted_out(&self, phone_number: &str, channel: Channel) -> AppResult<bool>;
    async fn set_opt_out(
        &self,
        phone_number: &str,
        channel: Channel,
        source: ConsentSource,
        at: DateTime<Utc>,
    ) -> AppResult<()>;
    async fn clear_opt_out(&self, phone_number: &str, channel: Channel) -> AppResult<()>;
    /// Users whose stored number is this one.
    async fn users_with_phone(&self, phone_number: &str) -> AppResult<Vec<String>>;

    /// Store an incoming message; `false` (and nothing written) when its SID was seen before.
    async fn insert_incoming(&self, message: &IncomingMessage) -> AppResult<bool>;
    async fn incoming_by_sid(&self, provider_sid: &str) -> AppResult<Option<IncomingMessage>>;
    /// Incoming messages received after `since` (all when `None`), oldest first.
    /// Only messages received at or before `until` are listed, so a reader that moves its
    /// `since` forward never passes a message still being written.
    async fn list_incoming(
        &self,
        since: Option<DateTime<Utc>>,
        until: DateTime<Utc>,
        limit: i64,
    ) -> AppResult<Vec<IncomingMessage>>;
    /// Remember a WhatsApp message from this number (opens its 24-hour window).
    async fn touch_whatsapp_session(&self, phone_number: &str, at: DateTime<Utc>) -> AppResult<()>;
    async fn last_whatsapp_inbound(&self, phone_number: &str) -> AppResult<Option<DateTime<Utc>>>;

    /// Create or update an appointment or follow-up (the host app's id is the key).
    async fn upsert_scheduled(
        &self,
        kind: SubjectType,
        item: &ScheduledItem,
        now: DateTime<Utc>,
    ) -> AppResult<ScheduledItem>;
    async fn get_scheduled(&self, kind: SubjectType, id: &str) -> AppResult<Option<ScheduledItem>>;
    /// Cancel it and skip its reminders not yet sent (reason `{kind}_cancelled`). `None` when
    /// there is no such item; else how many reminders were skipped.
    async fn cancel_scheduled(
        &self,
        kind: SubjectType,
        id: &str,
        now: DateTime<Utc>,
    ) -> AppResult<Option<u64>>;
    /// Scheduled items whose time lies in `[from, to]` and that have no `reminder` for that time.
    async fn due_without_reminder(
        &self,
        kind: SubjectType,
        reminder: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: i64,
    ) -> AppResult<Vec<ScheduledItem>>;
    /// Write the reminder's message and its `reminder_log` row in one transaction; `false` (and
    /// nothing written) when that reminder of that version was already queued.
    async fn queue_reminder(
        &self,
        kind: SubjectType,
        item: &ScheduledItem,
        reminder: &str,
        message: &NewMessage,
    ) -> AppResult<bool>;
    /// What a reminder message is for: its subject and the time it was queued for.
    async fn reminder_subject(
        &self,
        message_id: &str,
    ) -> AppResult<Option<(SubjectType, String, DateTime<Utc>)>>;

    /// Apply a delivery status to the message with this provider SID: record the event (a repeat
    /// is a no-op) and move the status only from one of `allowed_from`, so it never goes back.
    async fn apply_status(
        &self,
        provider_sid: &str,
        status: &str,
        allowed_from: &[&str],
        error_code: Option<i64>,
        at: DateTime<Utc>,
    ) -> AppResult<StatusApplied>;
}

pub type DynStore = Arc<dyn Store>;

/// Open the store named by `database_url` (`sqlite://...` or `postgres://...`).
pub async fn connect(database_url: &str) -> AppResult<DynStore> {
    if database_url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::connect(database_url).await?))
    } else if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        Ok(Arc::new(
            postgres::PostgresStore::connect(database_url).await?,
        ))
    } else {
        Err(AppError::Internal(anyhow::anyhow!(
            "DATABASE_URL must start with sqlite:// or postgres://"
        )))
    }
}

/// The columns of `messages`, in `MessageRecord` order.
pub(crate) const MESSAGE_COLUMNS: &str =
    "id, user_id, template_name, variables, channel, status, reason, \
     to_number, provider_sid, error_code, error_message, encoding, segments, attempts, \
     idempotency_key, next_attempt_at, lease_until, created_at, updated_at, requested_channel";
