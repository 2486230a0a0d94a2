//! The rows and inputs the store reads and writes: plain values, no SQL and no business rules.

use chrono::{DateTime, Utc};
use serde::Serialize;

pub use crate::channel::Channel;
use crate::error::AppResult;
use crate::status::{ItemStatus, MessageStatus, SkipReason};

/// A change to a user's consent record, decided by the caller from the current record (read
/// inside the write's transaction, so concurrent changes each see the other's result). An error
/// aborts the change: nothing is written.
pub type ConsentEdit<'a> = &'a (dyn Fn(&Consent) -> AppResult<Consent> + Send + Sync);

/// How a consent change came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentSource {
    AppSettings,
    WebSettings,
    SmsKeyword,
    Api,
    Provider,
    /// A right `verification` code proved the number on file.
    Otp,
}

impl ConsentSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsentSource::AppSettings => "app_settings",
            ConsentSource::WebSettings => "web_settings",
            ConsentSource::SmsKeyword => "sms_keyword",
            ConsentSource::Api => "api",
            ConsentSource::Provider => "provider",
            ConsentSource::Otp => "otp",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        [
            ConsentSource::AppSettings,
            ConsentSource::WebSettings,
            ConsentSource::SmsKeyword,
            ConsentSource::Api,
            ConsentSource::Provider,
            ConsentSource::Otp,
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
    /// When a `verification` code sent to `phone_number` was entered; cleared when the number
    /// changes.
    pub phone_verified_at: Option<DateTime<Utc>>,
    /// The patient's IANA time zone, when they gave one: their reminders (for items without a
    /// zone of their own), quiet hours and times are in it.
    pub time_zone: Option<String>,
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
    /// `phone_number`, `sms_consent`, `whatsapp_consent`, `marketing_consent`,
    /// `phone_verified_at` or `time_zone`.
    pub field: String,
    pub old_value: Option<String>,
    pub new_value: Option<String>,
    pub source: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl Consent {
    /// The audit rows (field, old, new) that turn `self` into `next`.
    pub(crate) fn changes_to(
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
        if self.time_zone != next.time_zone {
            rows.push(("time_zone", self.time_zone.clone(), next.time_zone.clone()));
        }
        if self.phone_verified_at != next.phone_verified_at {
            let text = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339());
            rows.push((
                "phone_verified_at",
                text(self.phone_verified_at),
                text(next.phone_verified_at),
            ));
        }
        rows
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
    pub status: MessageStatus,
    pub reason: Option<SkipReason>,
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
    /// When the last attempt was marked `sending`: a lookup adopts only what Twilio created
    /// since.
    #[serde(skip)]
    pub attempt_started_at: Option<DateTime<Utc>>,
    /// The body the last attempt sent, exactly: a lookup adopts only that. `None` where it cannot
    /// be known (an OTP, whose code is never kept; a WhatsApp ContentSid send): never adopted.
    #[serde(skip)]
    pub attempt_body: Option<String>,
    /// The last attempt ended without the provider saying whether it took the message (a
    /// timeout, a dropped connection, its own 5xx): look it up before sending again.
    #[serde(skip)]
    pub lookup_needed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct MessageEvent {
    pub status: MessageStatus,
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
        status: MessageStatus,
    },
    /// Not sent, on purpose.
    Skipped { reason: SkipReason },
    /// Not sent and never will be.
    Failed { code: Option<i64>, message: String },
    /// Not sent this time (as far as we know); queued again for `next_attempt_at`. `lookup`: the
    /// provider may hold it, so the next attempt looks it up first.
    Retry {
        code: Option<i64>,
        message: String,
        next_attempt_at: DateTime<Utc>,
        lookup: bool,
    },
    /// Looking up an earlier attempt failed: queued again for `next_attempt_at`, still to be
    /// looked up first; the lookup `counted` as an attempt unless the provider was out.
    LookupFailed {
        message: String,
        next_attempt_at: DateTime<Utc>,
        counted: bool,
    },
    /// The provider may or may not hold it and no lookup could tell: `unknown`, never resent.
    Unknown { code: Option<i64>, message: String },
    /// Not sent, for a reason of ours rather than the message's (the provider refused our
    /// credentials, or turned the request away unprocessed for too many at once): queued again
    /// for `until`, the attempt not counted.
    Held {
        /// The provider's code (Twilio's 20003 for refused credentials, 20429 for too many at
        /// once), kept with the message like any error's.
        code: Option<i64>,
        until: DateTime<Utc>,
        message: String,
    },
    /// Not tried: held back until `until`. No attempt is counted.
    Deferred {
        until: DateTime<Utc>,
        reason: DeferReason,
    },
}

/// Why a message was held back unsent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeferReason {
    /// The patient's quiet hours.
    QuietHours,
    /// The sender's next free send slot comes after the claim's lease ends.
    SendSlot,
}

impl DeferReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeferReason::QuietHours => "quiet_hours",
            DeferReason::SendSlot => "send_slot",
        }
    }
}

/// Details fixed when a send is attempted: where to, and what it costs.
#[derive(Debug, Clone)]
pub struct SendAttempt {
    pub to_number: String,
    /// The channel it goes by (a WhatsApp message may fall back to SMS).
    pub channel: Channel,
    /// SMS only: a WhatsApp message has no SMS encoding or segments.
    pub encoding: Option<String>,
    pub segments: Option<i64>,
    /// The exact body sent, when it may be kept and matched (see `MessageRecord::attempt_body`).
    pub body: Option<String>,
    /// For a message that goes at once instead of waiting its turn (an OTP): the sender's next
    /// send slot, taken with the mark, so the queued messages behind it slow down.
    pub take_slot: Option<SendSlot>,
}

/// A sender's send slot to take (`MessageStore::reserve_send_slot`).
#[derive(Debug, Clone)]
pub struct SendSlot {
    pub sender: String,
    pub now_us: i64,
    pub interval_us: i64,
}

/// What must still hold when a message is marked `sending`, checked in the same statement, so a
/// STOP or a withdrawn consent that lands after the send-time check still stops the send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendGuard {
    /// The user still has this number on file with consent for the channel (not for OTPs, which
    /// go to the number named).
    pub consent: bool,
    /// ... and marketing consent.
    pub marketing: bool,
}

/// What marking a message `sending` came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkSending {
    /// Marked, one more attempt counted: call the provider.
    Marked,
    /// The claim is no longer ours: nothing written.
    ClaimLost,
    /// The claim is ours but the number opted out or consent changed since the check: nothing
    /// written; check again.
    PolicyChanged,
}

/// What a reminder is about: an item with a time, in a table the host app pushes. A subscription
/// is two subjects, its expiry and its renewal, each with its own time (and so its own reminders
/// and its own once-per-period key in `reminder_log`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectType {
    Appointment,
    FollowUp,
    /// A subscription's `expires_at`.
    SubscriptionExpiry,
    /// A subscription's `renews_at`.
    SubscriptionRenewal,
}

impl SubjectType {
    pub const ALL: [SubjectType; 4] = [
        SubjectType::Appointment,
        SubjectType::FollowUp,
        SubjectType::SubscriptionExpiry,
        SubjectType::SubscriptionRenewal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SubjectType::Appointment => "appointment",
            SubjectType::FollowUp => "follow_up",
            SubjectType::SubscriptionExpiry => "subscription_expiry",
            SubjectType::SubscriptionRenewal => "subscription_renewal",
        }
    }
    pub fn parse(value: &str) -> Option<SubjectType> {
        SubjectType::ALL.into_iter().find(|s| s.as_str() == value)
    }

    fn is_subscription(self) -> bool {
        matches!(
            self,
            SubjectType::SubscriptionExpiry | SubjectType::SubscriptionRenewal
        )
    }

    /// Why its reminder is skipped once the item is cancelled.
    pub fn cancelled_reason(self) -> SkipReason {
        match self {
            SubjectType::Appointment => SkipReason::AppointmentCancelled,
            SubjectType::FollowUp => SkipReason::FollowUpCancelled,
            _ => SkipReason::SubscriptionCancelled,
        }
    }

    /// Why its reminder is skipped once the item is no longer on (`status` is not
    /// [`ItemStatus::is_on`]): cancelled, or (a subscription) expired.
    pub fn ended_reason(self, status: ItemStatus) -> SkipReason {
        match status {
            ItemStatus::Expired => SkipReason::SubscriptionExpired,
            _ => self.cancelled_reason(),
        }
    }

    /// Why its reminder is skipped once the item moved to another time.
    pub fn rescheduled_reason(self) -> SkipReason {
        match self {
            SubjectType::Appointment => SkipReason::AppointmentRescheduled,
            SubjectType::FollowUp => SkipReason::FollowUpRescheduled,
            _ => SkipReason::SubscriptionRescheduled,
        }
    }

    /// Why its reminder is skipped once the item belongs to another patient.
    pub fn reassigned_reason(self) -> SkipReason {
        match self {
            SubjectType::Appointment => SkipReason::AppointmentReassigned,
            SubjectType::FollowUp => SkipReason::FollowUpReassigned,
            _ => SkipReason::SubscriptionReassigned,
        }
    }

    /// Why its reminder is skipped once its time has come: an appointment has begun, a
    /// subscription has expired or renewed. `None`: a follow-up is reminded after its time too.
    pub fn passed_reason(self) -> Option<SkipReason> {
        match self {
            SubjectType::Appointment => Some(SkipReason::AppointmentPassed),
            SubjectType::FollowUp => None,
            _ => Some(SkipReason::SubscriptionPassed),
        }
    }

    /// The status an item of this kind has while it is on (and its reminders are due).
    pub fn on_status(self) -> ItemStatus {
        match self {
            SubjectType::Appointment | SubjectType::FollowUp => ItemStatus::Scheduled,
            _ => ItemStatus::Active,
        }
    }

    /// Its table and time column (fixed strings, safe to put in SQL).
    pub(crate) fn table(self) -> (&'static str, &'static str) {
        match self {
            SubjectType::Appointment => ("appointments", "starts_at"),
            SubjectType::FollowUp => ("follow_ups", "due_at"),
            SubjectType::SubscriptionExpiry => ("subscriptions", "expires_at"),
            SubjectType::SubscriptionRenewal => ("subscriptions", "renews_at"),
        }
    }

    /// Its time zone as a column of its table aliased `t` (fixed strings, safe to put in SQL).
    /// Subscriptions carry none: NULL, so the patient's zone applies, else `DEFAULT_TIME_ZONE`.
    pub(crate) fn zone_column(self) -> &'static str {
        if self.is_subscription() {
            "CAST(NULL AS TEXT)"
        } else {
            "t.time_zone"
        }
    }

    /// How long before its time the item was booked, as a column of its table aliased `t`;
    /// subscriptions have no late bookings: NULL.
    pub(crate) fn notice_column(self) -> &'static str {
        if self.is_subscription() {
            "CAST(NULL AS BIGINT)"
        } else {
            "t.notice_seconds"
        }
    }

    /// Every subject kept in the same table (a subscription's expiry and renewal), as an SQL list
    /// of fixed strings: cancelling the item skips the reminders of each.
    pub(crate) fn same_table_sql(self) -> &'static str {
        match self {
            SubjectType::Appointment => "('appointment')",
            SubjectType::FollowUp => "('follow_up')",
            _ => "('subscription_expiry', 'subscription_renewal')",
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
    /// The IANA zone the host app gave; `None` when it gave none (the patient's zone, else
    /// `DEFAULT_TIME_ZONE`, applies when a reminder is sent).
    pub time_zone: Option<String>,
    pub status: ItemStatus,
}

/// Which scheduled items a reminder sweep takes, besides having no such reminder for their time.
#[derive(Debug, Clone, Copy)]
pub struct DueFilter<'a> {
    /// The item's time lies in `[from, to]`.
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Booked (time, patient or status last set) at least this many seconds before its time.
    pub min_notice_seconds: Option<i64>,
    /// `(kind, since)`: not while the item's `kind` reminder for the same time and patient is
    /// still pending or was last attempted after `since`, so two reminders never come together.
    pub apart_from: Option<(&'a str, DateTime<Utc>)>,
}

/// Where a sweep's next page starts: after this (time, id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepCursor {
    pub at: DateTime<Utc>,
    pub id: String,
}

/// A page of a sweep's window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DuePage {
    /// The page's items that have no reminder of the kind for their time yet.
    pub due: Vec<ScheduledItem>,
    /// Where the next page starts; `None` when this page ended the window.
    pub next: Option<SweepCursor>,
}

/// A subscription as the host app pushed it: at least one of `renews_at` and `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Subscription {
    pub id: String,
    pub user_id: String,
    pub plan: String,
    pub renews_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    /// `active`, `cancelled` or `expired`.
    pub status: ItemStatus,
}

/// What writing one pushed item did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Upserted {
    Created,
    Updated,
    /// Already stored exactly so: nothing was written.
    Unchanged,
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
    /// The user the reply is attributed to: the one the last message to this number went to, or
    /// the only user with the number. `None` rather than a guess.
    pub user_id: Option<String>,
    /// Every user whose stored number is this one (a family may share a phone), as a JSON array.
    #[serde(skip)]
    pub user_ids: Option<String>,
    pub body: String,
    /// `stop`, `start` or `help` when the body was a keyword.
    pub keyword: Option<String>,
    /// The template the reply used, if one was sent.
    pub reply_template: Option<String>,
    /// Twilio's `OptOutType` when its Advanced Opt-Out handled the keyword.
    pub opt_out_type: Option<String>,
    pub received_at: DateTime<Utc>,
}

impl IncomingMessage {
    /// Every user with the sender's number when the message arrived (for messages stored before
    /// this was kept, the attributed user).
    pub fn user_ids(&self) -> Vec<String> {
        match self.user_ids.as_deref() {
            Some(json) => serde_json::from_str(json).unwrap_or_default(),
            None => self.user_id.iter().cloned().collect(),
        }
    }
}

/// A carrier opt-out (21610) that came before its send recorded the SID and may not be on
/// record yet (`MessageStore::parked_opt_outs_owed`).
#[derive(Debug, Clone)]
pub struct OwedOptOut {
    pub provider_sid: String,
    /// When the first report came.
    pub reported_at: DateTime<Utc>,
    /// The statuses it came with (`undelivered`, `failed`: either or both).
    pub statuses: Vec<MessageStatus>,
}

/// A status applied with a send's record (`MessageStore::record_sent`): the provider's own
/// answer, or a callback that came before the SID was recorded.
#[derive(Debug, Clone)]
pub struct KnownStatus {
    pub status: MessageStatus,
    pub error_code: Option<i64>,
    pub applied: StatusApplied,
}

/// What a status callback did to its message.
#[derive(Debug, Clone)]
pub struct StatusApplied {
    /// The message after the callback; `None` when no message has that SID.
    pub message: Option<MessageRecord>,
    /// Whether its status moved.
    pub changed: bool,
    /// Whether this (message, status) was seen for the first time (a replayed callback is not).
    pub first_seen: bool,
}

/// A new one-time passcode, written with its message and its rate-limit record in one
/// transaction.
#[derive(Debug, Clone)]
pub struct OtpIssue {
    pub user_id: String,
    pub purpose: String,
    /// The number the request named: the per-number limits count it.
    pub phone_number: String,
    /// Where the code goes (the number on file, or the one named); the code is bound to it.
    pub send_to: String,
    pub channel: Channel,
    /// Keyed hash of the code; the code itself never reaches the database.
    pub code_hash: String,
    pub ip: Option<String>,
    pub expires_at: DateTime<Utc>,
    pub now: DateTime<Utc>,
    pub cooldown_seconds: i64,
    /// Per number and per user.
    pub max_sends_per_hour: i64,
    /// Per client address (an IPv6 client's /64).
    pub max_sends_per_ip_per_hour: i64,
    /// The message that carries the code (written claimed: the caller sends it at once), unless
    /// the number named or `send_to` opted out of the channel.
    pub message: NewMessage,
    /// The attempt the message goes out for: with it, the message is written already marked
    /// `sending` (its first attempt, the `sending` event, the sender's slot), as
    /// `MessageStore::mark_sending` would, in the same transaction. `None`: written claimed, for
    /// the caller to record as skipped.
    pub attempt: Option<SendAttempt>,
    /// With `attempt`: the provider's acceptance when it runs in this process (the mock), so
    /// the send is recorded in this same write, as `MessageStore::record_sent` records one
    /// after a call. `None`: the caller sends and records the outcome.
    pub accepted: Option<AcceptedSend>,
    /// `send_to` is the number named, planned without reading the user's number on file: the
    /// store reads it under its lock and, when another number is on file, sends the code there
    /// instead (`OtpIssueOutcome::IssuedToNumberOnFile`). Only for a plan that does not depend
    /// on the number beyond the number itself (SMS), and only where
    /// `OtpStore::checks_number_on_file`.
    pub unless_on_file: bool,
}

/// A send an in-process provider accepted before its message was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedSend {
    pub provider_sid: String,
    /// The provider's own news beyond `sent` (the mock's `delivered`), checked to follow it.
    pub news: Option<MessageStatus>,
}

impl AcceptedSend {
    /// The status the message ends in.
    pub fn status(&self) -> MessageStatus {
        self.news.unwrap_or(MessageStatus::Sent)
    }
}

/// What a one-time passcode's send limits look at: its cooldown per number, and its hourly
/// limits per number, per user and per client address (`OtpStore::otp_refusal`).
#[derive(Debug, Clone, Copy)]
pub struct OtpLimits<'a> {
    pub user_id: &'a str,
    /// The number the request named.
    pub phone_number: &'a str,
    pub channel: Channel,
    pub ip: Option<&'a str>,
    pub now: DateTime<Utc>,
    pub cooldown_seconds: i64,
    pub max_sends_per_hour: i64,
    pub max_sends_per_ip_per_hour: i64,
}

/// A send the limits refused: the wait to answer with, and until when each limit that refused
/// it holds (`None`: that limit did not refuse). Sends only add to a limit's counts and cleanup
/// prunes only sends whose hour is over, so each holds for every send it applies to until then
/// (erasing an account aside, which starts the per-user hour again): the number's for any send
/// naming that number, the user's for any send for that user id, the address's for any send
/// from that client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitRefusal {
    /// Seconds until every limit that refused lifts (at least 1): `Retry-After`.
    pub retry_after_seconds: i64,
    /// The number named: its cooldown or its hour.
    pub number_until: Option<DateTime<Utc>>,
    pub user_until: Option<DateTime<Utc>>,
    pub address_until: Option<DateTime<Utc>>,
}

impl LimitRefusal {
    /// A refusal at `now` by the limits that hold until the times given (a refusal naming none
    /// waits a second).
    pub fn new(
        now: DateTime<Utc>,
        number_until: Option<DateTime<Utc>>,
        user_until: Option<DateTime<Utc>>,
        address_until: Option<DateTime<Utc>>,
    ) -> LimitRefusal {
        let mut refusal = LimitRefusal {
            retry_after_seconds: 1,
            number_until,
            user_until,
            address_until,
        };
        if let Some(lifts) = refusal.lifts() {
            refusal.retry_after_seconds = retry_after_seconds(lifts, now);
        }
        refusal
    }

    /// When the last limit that refused lifts.
    pub fn lifts(&self) -> Option<DateTime<Utc>> {
        self.number_until
            .max(self.user_until)
            .max(self.address_until)
    }
}

/// `Retry-After` for a limit lifting at `until`: whole seconds from `now`, rounded up (a client
/// that waits as told must find the limit lifted: 29.9 s rounded down to 29 was refused again),
/// at least 1.
pub fn retry_after_seconds(until: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    let wait = until - now;
    let whole = wait.num_seconds();
    let rounded_up = if wait > chrono::Duration::seconds(whole) {
        whole + 1
    } else {
        whole
    };
    rounded_up.max(1)
}

#[derive(Debug, Clone)]
pub enum OtpIssueOutcome {
    Issued(Box<MessageRecord>),
    /// Within the limits and logged against them (a refusal must still count, or it could be
    /// probed without limit), with no code and no message: the number named (`named`) or the
    /// one the code would go to opted out of the channel.
    OptedOut {
        named: bool,
    },
    /// A limit was hit; nothing was written.
    RateLimited(LimitRefusal),
    /// `OtpIssue::unless_on_file`, and the user has another number on file: the code, its
    /// message and its opt-out check went to that number (`to`, in clear) instead.
    IssuedToNumberOnFile {
        message: Box<MessageRecord>,
        to: String,
    },
    /// `OtpIssue::unless_on_file`, and the user has another number on file that the store could
    /// not route to (no blind index beside it, or changed since the store took that number's
    /// lock): nothing was written; read the number and issue again.
    OnFileElsewhere,
    /// Within the limits of the number named, the user and the address, and logged against them,
    /// but the number the code would go to had its cooldown's or its hour's codes (whatever
    /// numbers and users they were asked for). Everything is written as for an issued code (the
    /// code replaced, the wrong tries forgiven) except the send: the message is written claimed
    /// with no attempt (`OtpIssue::dropped_record`), for the caller to record as skipped. So the
    /// caller can tell it from a send neither by the answer nor by what became of the user's
    /// code: either would tell them the number is someone's number on file.
    DestinationLimited(Box<MessageRecord>),
}

impl OtpIssueOutcome {
    /// The outcome for a code written as `OtpIssue::written(dropped)` wrote it.
    pub(crate) fn written(record: MessageRecord, dropped: bool) -> Self {
        if dropped {
            OtpIssueOutcome::DestinationLimited(Box::new(record))
        } else {
            OtpIssueOutcome::Issued(Box::new(record))
        }
    }
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

/// What `OtpStore::consume_verification_otp` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerificationUse {
    /// The code was not used: another caller used it first, it was replaced or it expired, or
    /// the wrong tries reached their limit. Nothing changed.
    Refused,
    /// The code was used. `number_verified`: the number it went to was the user's number on file
    /// and is now recorded verified as of this use.
    Used { number_verified: bool },
}

/// What an OTP cleanup removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OtpCleanup {
    /// Counts of wrong tries whose window ended.
    pub failures_pruned: u64,
    pub expired_deleted: u64,
    pub used_deleted: u64,
    pub send_log_pruned: u64,
}

/// A settings-page session, as stored (the token itself never is).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SettingsSession {
    pub token_hash: String,
    pub user_id: String,
    /// Where "Back to the app" goes (under `APP_URL`).
    pub return_url: Option<String>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// What opening a settings link found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedLink {
    pub user_id: String,
    pub return_url: Option<String>,
}

/// The kinds of data kept for a limited time, each with its own retention period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataClass {
    /// Messages (final ones only) and, with them, their status events and reminder log rows.
    Messages,
    /// Patients' replies and keywords.
    Inbound,
    /// Reminder log rows, counted from the item's time.
    ReminderLog,
    /// The consent audit trail.
    Audit,
    /// Status callbacks no message of ours ever claimed.
    UnmatchedCallbacks,
}

impl DataClass {
    pub const ALL: [DataClass; 5] = [
        DataClass::Messages,
        DataClass::Inbound,
        DataClass::ReminderLog,
        DataClass::Audit,
        DataClass::UnmatchedCallbacks,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DataClass::Messages => "messages",
            DataClass::Inbound => "inbound",
            DataClass::ReminderLog => "reminder_log",
            DataClass::Audit => "audit",
            DataClass::UnmatchedCallbacks => "unmatched_callbacks",
        }
    }
}

/// A cleanup run's receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct CleanupRun {
    pub id: i64,
    pub ran_at: DateTime<Utc>,
    /// The instant the retention periods were measured from.
    pub as_of: DateTime<Utc>,
    /// The counts deleted per data class, as a JSON object.
    #[serde(skip)]
    pub counts: String,
}

/// Everything held about one user, for their copy (GDPR articles 15 and 20).
#[derive(Debug, Clone, Default)]
pub struct UserData {
    pub consent: Option<Consent>,
    pub audit: Vec<ConsentAuditRecord>,
    pub messages: Vec<MessageRecord>,
    /// (message id, event), oldest first.
    pub events: Vec<(String, MessageEvent)>,
    /// Replies attributed to the user (on a shared number, never the others').
    pub replies: Vec<IncomingMessage>,
    pub appointments: Vec<ScheduledItem>,
    pub follow_ups: Vec<ScheduledItem>,
    pub subscriptions: Vec<Subscription>,
    /// OTP sends logged for the user: (number named, client address, when). Never a code.
    pub otp_sends: Vec<(String, Option<String>, DateTime<Utc>)>,
    /// Settings-page sessions still open.
    pub sessions: Vec<SettingsSession>,
}

/// What an erasure removed (or anonymised).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ErasureCounts {
    pub preferences: u64,
    pub messages: u64,
    pub replies: u64,
    pub appointments: u64,
    pub follow_ups: u64,
    pub subscriptions: u64,
    pub otp_records: u64,
    pub sessions: u64,
    /// Audit rows kept as evidence, with the user id replaced by its keyed hash and the number,
    /// address and browser removed.
    pub audit_rows_anonymised: u64,
}
