//! The request and answer types of the JSON API, as OpenAPI schemas and responses.
//!
//! Handlers name these in their `#[utoipa::path]` attributes; [`super::openapi`] gathers them
//! into the document. They live apart from the document so that handlers depend on this file
//! and the document depends on the handlers, never both ways.

// Schema-only types: they describe answers that handlers build with `json!`, and are never built.
#![allow(dead_code)]

use chrono::{DateTime, Utc};
use serde::Serialize;
use std::borrow::Cow;
use utoipa::openapi::schema::{
    Object, ObjectBuilder, OneOfBuilder, Ref, Schema, SchemaFormat, SchemaType, Type,
};

use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToResponse, ToSchema};

use crate::status::MessageStatus;
use crate::store::{MessageEvent, MessageRecord};
use crate::templates::VarSpec;

// ---- Error answers -------------------------------------------------------------------------

/// The error envelope every JSON error uses.
#[derive(ToSchema)]
#[schema(as = Error)]
pub struct ErrorEnvelope {
    #[schema(schema_with = always_false)]
    success: bool,
    error: ErrorDetail,
}

#[derive(ToSchema)]
pub struct ErrorDetail {
    /// snake_case, stable; see each response.
    code: String,
    /// Human-readable; never holds internal details.
    message: String,
}

/// verify-otp's error envelope: the usual one plus `"valid": false` (not on 500).
#[derive(ToSchema)]
pub struct VerifyOtpError {
    #[schema(schema_with = always_false)]
    success: bool,
    #[schema(schema_with = always_false)]
    valid: bool,
    error: ErrorDetail,
}

/// `unauthorized`: missing, bad or expired credentials; says nothing more.
#[derive(ToResponse)]
pub struct Unauthorized(ErrorEnvelope);

/// `payload_too_large`: body over 64 KiB.
#[derive(ToResponse)]
pub struct PayloadTooLarge(ErrorEnvelope);

/// `not_configured`: no user-token verification is configured (AUTH_JWT_SECRET, AUTH_JWKS_FILE or
/// AUTH_JWKS_URL); only when a bearer token is presented.
#[derive(ToResponse)]
pub struct UserAuthNotConfigured(ErrorEnvelope);

/// `not_configured`: MESSAGING_API_KEY is not set (answered before the key is checked).
#[derive(ToResponse)]
pub struct ApiKeyNotConfigured(ErrorEnvelope);

/// `not_configured`: CRON_SECRET is not set (answered before the secret is checked).
#[derive(ToResponse)]
pub struct CronNotConfigured(ErrorEnvelope);

/// `not_configured`: TWILIO_AUTH_TOKEN is not set, so signatures cannot be verified.
#[derive(ToResponse)]
pub struct WebhooksNotConfigured(ErrorEnvelope);

/// `not_found`: not in mock mode.
#[derive(ToResponse)]
pub struct NotMockMode(ErrorEnvelope);

/// `forbidden`: missing or wrong `X-Twilio-Signature` (also a body that is not form-encoded).
/// Nothing is changed.
#[derive(ToResponse)]
pub struct BadSignature(ErrorEnvelope);

/// `internal_error`: the service's own fault (e.g. the database); details are logged, not
/// returned.
#[derive(ToResponse)]
pub struct InternalError(ErrorEnvelope);

pub(super) fn always_true() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Boolean)
        .enum_values(Some([true]))
        .build()
}

pub(super) fn always_false() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Boolean)
        .enum_values(Some([false]))
        .build()
}

// ---- Answers -------------------------------------------------------------------------------

#[derive(ToSchema)]
pub struct SettingsLinkAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    /// `PUBLIC_URL/settings/messaging?handoff=...`: opens the page once.
    url: String,
    /// Seconds the link may wait to be opened.
    expires_in: u64,
}

#[derive(ToSchema)]
pub struct PreferencesAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    /// `{}` when the user has none.
    #[schema(schema_with = preferences_or_empty)]
    preferences: Preferences,
}

pub(super) fn preferences_or_empty() -> Schema {
    OneOfBuilder::new()
        .item(Ref::from_schema_name(Preferences::name()))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .max_properties(Some(0)),
        )
        .description(Some("`{}` when the user has none."))
        .build()
        .into()
}

#[derive(ToSchema)]
pub struct Preferences {
    /// E.164.
    #[schema(value_type = Option<PhoneNumber>, required = true)]
    phone_number: Option<String>,
    sms_consent: bool,
    whatsapp_consent: bool,
    marketing_consent: bool,
    updated_at: DateTime<Utc>,
    /// When a `verification` code sent to this number was entered; null until then and after
    /// the number changes.
    #[schema(required = true)]
    phone_verified_at: Option<DateTime<Utc>>,
    /// The patient's time zone: their reminders (for items without a zone of their own), quiet
    /// hours and times are in it. Null: DEFAULT_TIME_ZONE.
    #[schema(value_type = Option<TimeZone>, required = true)]
    time_zone: Option<String>,
    /// The number replied STOP to SMS (or the carrier reported it opted out): nothing is sent
    /// by SMS until the patient texts START, whatever `sms_consent` says. False without a number.
    sms_opted_out: bool,
    /// The same for WhatsApp.
    whatsapp_opted_out: bool,
}

#[derive(ToSchema)]
pub struct HistoryAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    /// Newest first.
    messages: Vec<HistoryItem>,
}

#[derive(ToSchema)]
pub struct HistoryItem {
    id: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    template_name: String,
    #[schema(value_type = Channel)]
    channel: String,
    #[schema(value_type = MessageStatus)]
    status: String,
}

#[derive(ToSchema)]
pub struct VerifyOtpAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    #[schema(schema_with = always_true)]
    valid: bool,
    /// The number the code went to, in full. A login is proven only when this is the user's own
    /// number.
    #[schema(value_type = PhoneNumber)]
    phone_number: String,
}

#[derive(ToSchema)]
pub struct NotificationAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    message: QueuedMessage,
}

#[derive(ToSchema)]
pub struct QueuedMessage {
    /// UUIDv7; `GET /api/messages/{id}` follows it.
    id: String,
    #[schema(value_type = MessageStatus)]
    status: String,
}

#[derive(ToSchema)]
pub struct MessageAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    message: MessageWithEvents,
}

/// A message and its status history.
#[derive(ToSchema, Serialize)]
pub struct MessageWithEvents {
    #[serde(flatten)]
    message: MessageRecord,
    /// Status history, oldest first; each status appears at most once.
    events: Vec<MessageEvent>,
}

#[derive(ToSchema)]
pub struct TemplatesAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    templates: Vec<TemplateItem>,
}

/// A template the host app may send (not `otp` or the keyword replies).
#[derive(ToSchema)]
pub struct TemplateItem {
    name: String,
    /// What it is for: `scheduled` (reminders) and `marketing` wait for the end of QUIET_HOURS;
    /// `transactional` (caused by the patient's own action, such as a payment) and `otp` go at
    /// once.
    #[schema(schema_with = template_kind)]
    kind: String,
    /// `marketing` also needs marketing consent.
    #[schema(schema_with = template_category)]
    category: String,
    /// In declared order (the `{{1}}`, `{{2}}`... order of an approved WhatsApp template).
    variables: Vec<VarSpec>,
    /// Present when TWILIO_CONTENT_SIDS names it.
    #[schema(pattern = "^HX[0-9a-fA-F]{32}$")]
    whatsapp_content_sid: Option<String>,
}

pub(super) fn template_kind() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["scheduled", "transactional", "marketing", "otp"]))
        .description(Some(
            "`scheduled` and `marketing` wait for the end of QUIET_HOURS in the patient's zone; \
             `transactional` and `otp` go at once.",
        ))
        .build()
}

pub(super) fn template_category() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["transactional", "marketing"]))
        .description(Some("`marketing` also needs marketing consent."))
        .build()
}

#[derive(ToSchema)]
pub struct InboundAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    messages: Vec<InboundMessage>,
    /// The last message's `received_at`; pass it back as `since`. Null when the page is empty.
    #[schema(required = true)]
    next_since: Option<DateTime<Utc>>,
}

#[derive(ToSchema)]
pub struct InboundMessage {
    id: String,
    provider_sid: String,
    #[schema(value_type = Channel)]
    channel: String,
    /// E.164 (`whatsapp:` removed).
    #[schema(value_type = PhoneNumber)]
    from: String,
    /// The user the reply is attributed to: the one the last message to this number went to,
    /// else the only user with the number, else null (never a guess).
    #[schema(required = true)]
    user_id: Option<String>,
    /// Every user whose stored number is the sender's (a family may share a phone).
    user_ids: Vec<String>,
    body: String,
    #[schema(schema_with = keyword, required = true)]
    keyword: Option<String>,
    received_at: DateTime<Utc>,
}

pub(super) fn keyword() -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some([
            serde_json::json!("stop"),
            serde_json::json!("start"),
            serde_json::json!("help"),
            serde_json::Value::Null,
        ]))
        .description(Some("The keyword the body was, if any."))
        .build()
}

#[derive(ToSchema)]
pub struct CleanupAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    #[schema(minimum = 0)]
    expired_deleted: u64,
    #[schema(minimum = 0)]
    used_deleted: u64,
    #[schema(minimum = 0)]
    send_log_pruned: u64,
    /// Counts of wrong tries whose window has ended.
    #[schema(minimum = 0)]
    failures_pruned: u64,
}

#[derive(ToSchema)]
pub struct ErasureAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    erased: ErasureCountsSchema,
}

/// What an erasure removed.
#[derive(ToSchema)]
#[schema(as = ErasureCounts)]
pub struct ErasureCountsSchema {
    #[schema(minimum = 0)]
    preferences: u64,
    #[schema(minimum = 0)]
    messages: u64,
    #[schema(minimum = 0)]
    replies: u64,
    #[schema(minimum = 0)]
    appointments: u64,
    #[schema(minimum = 0)]
    follow_ups: u64,
    #[schema(minimum = 0)]
    subscriptions: u64,
    #[schema(minimum = 0)]
    otp_records: u64,
    #[schema(minimum = 0)]
    sessions: u64,
    /// Kept as evidence, anonymised.
    #[schema(minimum = 0)]
    audit_rows_anonymised: u64,
}

/// Rows deleted per data class.
#[derive(ToSchema)]
pub struct RetentionCounts {
    #[schema(minimum = 0)]
    messages: u64,
    #[schema(minimum = 0)]
    inbound: u64,
    #[schema(minimum = 0)]
    reminder_log: u64,
    #[schema(minimum = 0)]
    audit: u64,
    #[schema(minimum = 0)]
    unmatched_callbacks: u64,
}

#[derive(ToSchema)]
pub struct RetentionAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    /// The instant the periods were measured from.
    as_of: DateTime<Utc>,
    deleted: RetentionCounts,
}

#[derive(ToSchema)]
pub struct CleanupRunsAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    runs: Vec<CleanupRunItem>,
}

#[derive(ToSchema)]
pub struct CleanupRunItem {
    id: i64,
    ran_at: DateTime<Utc>,
    as_of: DateTime<Utc>,
    deleted: RetentionCounts,
}

#[derive(ToSchema)]
pub struct SweepAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    /// Items whose reminder is due.
    #[schema(minimum = 0)]
    due: u64,
    /// Reminders queued now.
    #[schema(minimum = 0)]
    queued: u64,
}

#[derive(ToSchema)]
pub struct AppointmentAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    appointment: Appointment,
}

#[derive(ToSchema)]
pub struct Appointment {
    #[schema(value_type = HostId)]
    id: String,
    user_id: String,
    starts_at: DateTime<Utc>,
    /// As the host app gave it; null when it gave none.
    #[schema(value_type = Option<TimeZone>, required = true)]
    time_zone: Option<String>,
    #[schema(schema_with = item_status)]
    status: String,
}

#[derive(ToSchema)]
pub struct FollowUpAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    follow_up: FollowUp,
}

#[derive(ToSchema)]
pub struct FollowUp {
    #[schema(value_type = HostId)]
    id: String,
    user_id: String,
    due_at: DateTime<Utc>,
    /// As the host app gave it; null when it gave none.
    #[schema(value_type = Option<TimeZone>, required = true)]
    time_zone: Option<String>,
    #[schema(schema_with = item_status)]
    status: String,
}

#[derive(ToSchema)]
pub struct SubscriptionAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    subscription: SubscriptionItem,
}

#[derive(ToSchema)]
#[schema(as = Subscription)]
pub struct SubscriptionItem {
    #[schema(value_type = HostId)]
    id: String,
    user_id: String,
    #[schema(value_type = Plan)]
    plan: String,
    /// Null when the subscription does not renew.
    renews_at: Option<DateTime<Utc>>,
    /// Null when the subscription does not expire.
    expires_at: Option<DateTime<Utc>>,
    #[schema(schema_with = subscription_status)]
    status: String,
}

fn subscription_status() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["active", "cancelled", "expired"]))
        .build()
}

pub(super) fn item_status() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["scheduled", "cancelled"]))
        .build()
}

#[derive(ToSchema)]
pub struct CancelAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    /// Reminders not yet sent that are now `skipped`.
    #[schema(minimum = 0)]
    reminders_skipped: u64,
}

#[derive(ToSchema)]
pub struct Health {
    #[schema(schema_with = status_ok)]
    status: String,
}

pub(super) fn status_ok() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["ok"]))
        .build()
}

#[derive(ToSchema)]
pub struct Readiness {
    #[schema(schema_with = readiness_status)]
    status: String,
    #[schema(schema_with = readiness_database)]
    database: String,
    #[schema(schema_with = provider_name)]
    provider: String,
    /// `refused` while the provider refuses our credentials (sends are held; not ready).
    #[schema(schema_with = readiness_credentials)]
    provider_credentials: String,
    /// The provider's API at its last health check (run in the background when the last is a
    /// minute old): `failing` when it did not answer or answered an error (reported only: still
    /// ready), `unknown` before the first has ended, `not_checked` with messaging disabled.
    #[schema(schema_with = readiness_provider_api)]
    provider_api: String,
    messaging_enabled: bool,
}

pub(super) fn readiness_provider_api() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["ok", "failing", "unknown", "not_checked"]))
        .build()
}

pub(super) fn readiness_credentials() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["ok", "refused"]))
        .build()
}

pub(super) fn readiness_status() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["ready", "not_ready"]))
        .build()
}

pub(super) fn readiness_database() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["ok", "unavailable"]))
        .build()
}

pub(super) fn provider_name() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["mock", "twilio"]))
        .build()
}

/// What the mock provider would have sent, newest first (the last 500, in memory; no `success`
/// field).
#[derive(ToSchema)]
pub struct DevOutbox {
    messages: Vec<DevOutboxItem>,
}

#[derive(ToSchema)]
pub struct DevOutboxItem {
    id: String,
    #[schema(value_type = PhoneNumber)]
    to: String,
    #[schema(value_type = Channel)]
    channel: String,
    template_name: String,
    body: String,
    created_at: DateTime<Utc>,
}

/// Twilio's status callback; other parameters are signed but unused.
#[derive(ToSchema)]
#[schema(rename_all = "PascalCase")]
pub struct TwilioStatusForm {
    message_sid: String,
    /// Twilio's status; ones that are not delivery statuses are ignored.
    message_status: String,
    /// 21610 also revokes the channel's consent and records the opt-out.
    #[schema(nullable = false)]
    error_code: Option<String>,
}

/// Twilio's incoming-message webhook; other parameters are signed but unused.
#[derive(ToSchema)]
#[schema(rename_all = "PascalCase")]
pub struct TwilioIncomingForm {
    message_sid: String,
    /// `whatsapp:+E164` for WhatsApp.
    from: String,
    #[schema(nullable = false)]
    to: Option<String>,
    #[schema(nullable = false)]
    body: Option<String>,
    /// Set when Twilio's Advanced Opt-Out already handled a keyword.
    #[schema(nullable = false)]
    opt_out_type: Option<String>,
}

// ---- Values the handlers check -------------------------------------------------------------

/// Rust's `char::is_whitespace` (Unicode White_Space), which `str::trim` removes.
pub(super) const WS: &str =
    r"[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]";
/// Not a control character (`char::is_control`: Unicode Cc).
pub(super) const PRINTABLE: &str = r"[^\u0000-\u001f\u007f-\u009f]";
/// Neither a control character nor white space.
pub(super) const VISIBLE: &str =
    r"[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]";
/// `YYYY-MM-DD` with a month and day that may exist (`Template::validate` checks the calendar).
pub(super) const DATE: &str = "[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])";
/// `templates::parse_instant`: RFC 3339 with `T`, an optional fraction, `Z` or `+HH:MM`.
pub(super) const INSTANT: &str = concat!(
    "[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])",
    "T(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\\.[0-9]{1,9})?",
    "(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])",
);
/// Separators `PhoneNumber::parse` takes between the digits of an international number.
pub(super) const PHONE_SEPARATORS: &str = r"[ ().\-]";

/// A schema component whose schema is built here rather than derived.
macro_rules! component {
    ($(#[$doc:meta])* $name:ident, $schema:expr) => {
        $(#[$doc])*
        pub struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                $schema.into()
            }
        }

        impl ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }
        }
    };
}

component!(
    /// `outbox::validate_user_id`: 1-128 bytes, no control characters, not only white space.
    UserId,
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(128))
        .pattern(Some(format!("^{PRINTABLE}*{VISIBLE}{PRINTABLE}*$")))
        .description(Some(
            "1-128 printable characters (128 bytes of UTF-8), not only white space; otherwise \
             400 `invalid_user_id`.",
        ))
        .build()
);

component!(
    /// `PhoneNumber::parse`: a `+`, a country code and up to 15 digits in all, with spaces,
    /// dashes, dots and brackets between them; white space around is ignored.
    PhoneNumberInput,
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some({
            let sep = PHONE_SEPARATORS;
            format!(r"^{WS}*\+{sep}*[1-9](?:{sep}*[0-9]){{1,14}}{sep}*{WS}*$")
        }))
        .description(Some(
            "International form: `+`, country code and number, 2 to 15 digits, spaces, dashes, \
             dots and brackets allowed (`+91 98765 43210` is fine); stored as E.164. A number \
             libphonenumber does not know as valid for its country, or over 32 characters, is \
             400 `invalid_phone`.",
        ))
        .examples(["+919876543210", "+91 98765 43210"])
        .build()
);

component!(
    /// A stored number.
    PhoneNumber,
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(r"^\+[1-9][0-9]{1,14}$"))
        .description(Some("E.164."))
        .examples(["+919876543210"])
        .build()
);

component!(
    /// `otp::validate_purpose`.
    Purpose,
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some("^[a-z][a-z_]{1,31}$"))
        .description(Some(
            "A short lowercase word (2-32 of a-z and _, starting with a letter); otherwise 400 \
             `invalid_purpose`.",
        ))
        .examples(["verification", "login", "password_reset"])
        .build()
);

component!(
    /// `outbox::parse_channel`.
    Channel,
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["sms", "whatsapp"]))
        .build()
);

component!(
    /// `consent::parse_time_zone`: the IANA names `chrono-tz` knows.
    TimeZone,
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name())))
        .description(Some(
            "An IANA time zone (exact case); otherwise 400 `invalid_time_zone`.",
        ))
        .examples(["Asia/Kolkata"])
        .build()
);

component!(
    /// `reminders::validate_id`: the host app's ids go into links.
    HostId,
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some("^[A-Za-z0-9._-]{1,64}$"))
        .description(Some(
            "The host app's id: 1-64 letters, digits, `-`, `_` or `.` (PUT: otherwise 400 \
             `invalid_id`; DELETE: 404).",
        ))
        .build()
);

component!(
    /// `reminders::validate_plan`: a product tier, never a description of care.
    Plan,
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(r"^[A-Za-z0-9][A-Za-z0-9 _+()\-]{0,63}$"))
        .description(Some(
            "The plan's name, a product tier (`Pro`, `Family 12 months`): 1-64 ASCII letters, \
             digits, spaces and `-_+()`, starting with a letter or digit; otherwise 400 \
             `invalid_plan`. Never part of a message.",
        ))
        .examples(["Pro monthly"])
        .build()
);

component!(
    /// The id of a message: a UUIDv7 as `uuid` writes it. Any other id is simply not found.
    MessageId,
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::Custom("uuid".into())))
        .pattern(Some(
            "^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$",
        ))
        .build()
);
