//! `GET /openapi.json`: this API as OpenAPI 3.1, generated from the handlers' `#[utoipa::path]`
//! attributes and the request and answer types.
//!
//! The types say which fields there are, which are required and which may be `null`. What JSON
//! Schema can also say about a value the handlers check (lengths, patterns, enumerations, the
//! variables of each template) is added by [`refine`], each rule naming the check it mirrors. The
//! rules never ask for more than the handlers do: a request that breaks the document is refused,
//! and one that keeps to it is refused only with a documented 4xx (a number libphonenumber does
//! not know, an appointment's unknown id). `tests/api.rs` checks that every route is documented
//! and that the document validates against the OpenAPI 3.1 schema; `.ci/schemathesis.sh` checks
//! the running service against it.

// Schema-only types: they describe answers that handlers build with `json!`, and are never built.
#![allow(dead_code)]

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::openapi::schema::{
    AdditionalProperties, AnyOfBuilder, Object, ObjectBuilder, OneOfBuilder, Ref, Schema,
    SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{KnownFormat, RefOr};
use utoipa::{Modify, OpenApi, PartialSchema, ToResponse, ToSchema};

use crate::config::Config;
use crate::status::{MessageStatus, SkipReason};
use crate::store::{MessageEvent, MessageRecord};
use crate::templates::{VarSpec, VarType, TEMPLATES};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "prism-messaging",
        description = "SMS and WhatsApp messaging for a healthcare practice platform, through \
            Twilio: per-user consent with an audit trail, PHI-safe typed templates, a crash-safe \
            outbox with delivery tracking and history, one-time passcodes, and Twilio's signed \
            webhooks. JSON in and out; every JSON error is `{\"success\": false, \"error\": \
            {\"code\", \"message\"}}`, 4xx for the caller's mistakes and 5xx only for the \
            service's own faults (500 `internal_error`, 503). JSON bodies over 64 KiB answer 413. \
            Unknown paths answer 404 `not_found` and wrong methods 405 `method_not_allowed`, both \
            with the error envelope. With INSTANCE_ROLE=dispatcher only the ops routes are served."
    ),
    servers((url = "http://127.0.0.1:8080", description = "Default BIND_ADDR")),
    tags(
        (name = "user", description = "A patient's own calls (user JWT)."),
        (name = "otp", description = "One-time passcodes (public, rate-limited)."),
        (name = "host-app", description = "The host app's server (MESSAGING_API_KEY)."),
        (name = "webhooks", description = "Twilio webhooks (form-encoded, signed)."),
        (name = "cron", description = "Scheduled jobs for an outside scheduler (CRON_SECRET)."),
        (name = "ops", description = "Health, readiness, metrics, this document."),
        (name = "dev", description = "Mock mode only; 404 otherwise."),
    ),
    paths(
        super::preferences::get_preferences,
        super::preferences::put_preferences,
        super::preferences::history,
        super::otp::send_otp,
        super::otp::verify_otp,
        super::messages::create_notification,
        super::messages::get_message,
        super::messages::list_templates,
        super::webhooks::list_inbound,
        super::webhooks::incoming,
        super::webhooks::status_callback,
        super::cron::cleanup_expired_otps,
        super::cron::subscription_reminders,
        appointment_reminders_24h,
        appointment_reminders_2h,
        follow_up_reminders,
        super::ops::healthz,
        super::ops::readyz,
        super::ops::metrics,
        super::openapi,
        super::dev::outbox_page,
        super::dev::outbox_json,
        super::webhooks::dev_inbound,
        super::schedule::put_appointment,
        super::schedule::delete_appointment,
        super::schedule::put_follow_up,
        super::schedule::delete_follow_up,
        super::schedule::put_subscription,
        super::schedule::delete_subscription,
    ),
    components(
        schemas(
            UserId,
            PhoneNumberInput,
            PhoneNumber,
            Purpose,
            Channel,
            MessageStatus,
            SkipReason,
            TimeZone,
            HostId,
            MessageId,
            Preferences,
            Plan,
        ),
        responses(
            Unauthorized,
            PayloadTooLarge,
            UserAuthNotConfigured,
            ApiKeyNotConfigured,
            CronNotConfigured,
            WebhooksNotConfigured,
            NotMockMode,
            BadSignature,
            InternalError,
        ),
    ),
    modifiers(&SecuritySchemes),
)]
struct ApiDoc;

/// The document this deployment serves: [`ApiDoc`] with the value rules of [`refine`].
/// `APP_URL` is part of it, because a template's link may be an absolute URL under it.
pub fn document(config: &Config) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    refine(&mut doc, &config.messaging.app_url);
    doc
}

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        let bearer = |description: &str, format: Option<&str>| {
            let mut http = HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(description));
            if let Some(format) = format {
                http = http.bearer_format(format);
            }
            SecurityScheme::Http(http.build())
        };
        components.add_security_scheme(
            "userJwt",
            bearer(
                "HS256 (AUTH_JWT_SECRET) or RS256/ES256 (AUTH_JWKS_FILE / AUTH_JWKS_URL); `exp` \
                 required and `nbf` checked; `iss`/`aud` checked when configured (required with \
                 a key set); the user id is the AUTH_USER_CLAIM claim.",
                Some("JWT"),
            ),
        );
        components.add_security_scheme(
            "hostAppKey",
            bearer("MESSAGING_API_KEY, compared in constant time.", None),
        );
        components.add_security_scheme(
            "cronSecret",
            bearer("CRON_SECRET, compared in constant time.", None),
        );
        components.add_security_scheme(
            "metricsToken",
            bearer(
                "METRICS_TOKEN, when set (then /metrics needs it); compared in constant time.",
                None,
            ),
        );
        components.add_security_scheme(
            "twilioSignature",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Twilio-Signature",
                "Twilio's request signature, keyed with TWILIO_AUTH_TOKEN.",
            ))),
        );
    }
}

// ---- Routes whose handler is a closure (the three reminder sweeps share `cron::sweep`) ------

#[utoipa::path(
    post,
    path = "/cron/appointment-reminders-24h",
    tag = "cron",
    operation_id = "appointmentReminders24h",
    summary = "Queue due 24-hour appointment reminders",
    description = "The embedded scheduler also runs it every minute. No request body.",
    security(("cronSecret" = [])),
    responses(
        (status = 200, description = "OK", body = SweepAnswer),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = CronNotConfigured),
    )
)]
fn appointment_reminders_24h() {}

#[utoipa::path(
    post,
    path = "/cron/appointment-reminders-2h",
    tag = "cron",
    operation_id = "appointmentReminders2h",
    summary = "Queue due 2-hour appointment reminders",
    description = "The embedded scheduler also runs it every minute. No request body.",
    security(("cronSecret" = [])),
    responses(
        (status = 200, description = "OK", body = SweepAnswer),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = CronNotConfigured),
    )
)]
fn appointment_reminders_2h() {}

#[utoipa::path(
    post,
    path = "/cron/follow-up-reminders",
    tag = "cron",
    operation_id = "followUpReminders",
    summary = "Queue due follow-up reminders",
    description = "The embedded scheduler also runs it every minute. No request body.",
    security(("cronSecret" = [])),
    responses(
        (status = 200, description = "OK", body = SweepAnswer),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = CronNotConfigured),
    )
)]
fn follow_up_reminders() {}

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

fn always_true() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Boolean)
        .enum_values(Some([true]))
        .build()
}

fn always_false() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Boolean)
        .enum_values(Some([false]))
        .build()
}

// ---- Answers -------------------------------------------------------------------------------

#[derive(ToSchema)]
pub struct PreferencesAnswer {
    #[schema(schema_with = always_true)]
    success: bool,
    /// `{}` when the user has none.
    #[schema(schema_with = preferences_or_empty)]
    preferences: Preferences,
}

fn preferences_or_empty() -> Schema {
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
    /// `marketing` also needs marketing consent.
    #[schema(schema_with = template_category)]
    category: String,
    /// In declared order (the `{{1}}`, `{{2}}`... order of an approved WhatsApp template).
    variables: Vec<VarSpec>,
    /// Present when TWILIO_CONTENT_SIDS names it.
    #[schema(pattern = "^HX[0-9a-fA-F]{32}$")]
    whatsapp_content_sid: Option<String>,
}

fn template_category() -> Object {
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

fn keyword() -> Object {
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
    #[schema(value_type = TimeZone)]
    time_zone: String,
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
    #[schema(value_type = TimeZone)]
    time_zone: String,
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

fn item_status() -> Object {
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

fn status_ok() -> Object {
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
    messaging_enabled: bool,
}

fn readiness_credentials() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["ok", "refused"]))
        .build()
}

fn readiness_status() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["ready", "not_ready"]))
        .build()
}

fn readiness_database() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["ok", "unavailable"]))
        .build()
}

fn provider_name() -> Object {
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
const WS: &str =
    r"[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]";
/// Not a control character (`char::is_control`: Unicode Cc).
const PRINTABLE: &str = r"[^\u0000-\u001f\u007f-\u009f]";
/// Neither a control character nor white space.
const VISIBLE: &str =
    r"[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]";
/// Separators `PhoneNumber::parse` takes between the digits of an international number.
const PHONE_SEPARATORS: &str = r"[ ().\-]";

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
    /// `reminders::time_zone`: the IANA names `chrono-tz` knows.
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

/// `Template::validate`: one variable's value (trimmed before the check).
fn variable_value(var_type: VarType, app_url: &str) -> Schema {
    let string = |pattern: String, description: &str| -> Schema {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(pattern))
            .description(Some(description))
            .build()
            .into()
    };
    match var_type {
        VarType::Code => string(format!("^{WS}*[0-9]{{4,10}}{WS}*$"), "4 to 10 digits."),
        VarType::Time => string(
            format!("^{WS}*(?:[01][0-9]|2[0-3]):[0-5][0-9]{WS}*$"),
            "HH:MM, 24-hour clock.",
        ),
        VarType::Date => string(
            format!("^{WS}*[0-9]{{4}}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01]){WS}*$"),
            "YYYY-MM-DD, a real calendar day (else 400); rendered as `12 Jan 2027`.",
        ),
        VarType::Amount => AnyOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(format!(
                        r"^{WS}*(?:[A-Z]{{3}} )?[0-9]{{1,9}}(?:\.[0-9]{{1,2}})?{WS}*$"
                    ))),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Number)
                    .minimum(Some(0))
                    .maximum(Some(999_999_999.99)),
            )
            .description(Some(
                "Up to 9 digits and 2 decimals, optionally after an ISO 4217 code (`INR 499.00`); \
                 a JSON number is taken as written (more than 2 decimals: 400).",
            ))
            .build()
            .into(),
        VarType::Link => {
            // A path into the app, or an absolute URL under APP_URL; URL-safe characters only,
            // the path at most 200 of them and not starting `//`.
            let safe = r"[A-Za-z0-9/\-_.~?=&#]";
            let first = r"[A-Za-z0-9\-_.~?=&#]";
            let path = format!("/(?:{first}{safe}{{0,198}})?");
            let query = format!(r"\?{safe}{{0,199}}");
            let app_url = regex_escape(app_url);
            string(
                format!("^{WS}*(?:{path}|{app_url}(?:{path}|{query})?){WS}*$"),
                "A path into the app (`/appointments/123`) or an absolute URL under APP_URL: \
                 letters, digits and `/-_.~?=&#`, the path at most 200 characters.",
            )
        }
        VarType::ShortName => string(
            // Letters (any script), spaces, `-` and `'`: everything else that is ASCII (a dot,
            // a slash, `@`: phones make links of them), and every control character, is refused.
            // At least one letter and no run of five spaces (not expressed).
            format!("^{WS}*[^\\u0000-\\u001f!-&(-,.-@\\[-`{{-\\u009f]{{1,30}}{WS}*$"),
            "A given name: letters, spaces, `-` and `'`, at least one letter, at most 30 \
             characters, no run of more than four spaces. No dots, slashes or `@`.",
        ),
    }
}

/// `s` as a regular expression that matches exactly it.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\^$.|?*+()[]{}/-".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `POST /api/notifications`: one alternative per template the host app may send, each with
/// exactly that template's variables.
fn notification_request(base: &Object, app_url: &str) -> Schema {
    let mut one_of = OneOfBuilder::new().description(Some(
        "One alternative per template (`GET /api/templates`), with exactly its variables. A \
         template that is not listed is 400 `unknown_template`; wrong, missing or extra \
         variables are 400 `invalid_template_variables`. A repeated idempotency_key with the \
         same content answers the same message; with different content, 409.",
    ));
    for template in TEMPLATES
        .iter()
        .filter(|t| crate::outbox::host_app_may_send(t))
    {
        let mut variables = ObjectBuilder::new()
            .schema_type(Type::Object)
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        for VarSpec { name, var_type } in template.variables {
            variables = variables
                .property(*name, variable_value(*var_type, app_url))
                .required(*name);
        }
        let mut alternative = base.clone();
        alternative.title = Some(template.name.to_string());
        alternative.description = None;
        alternative.properties.insert(
            "template".into(),
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some([template.name]))
                .into(),
        );
        alternative
            .properties
            .insert("variables".into(), variables.build().into());
        if !template.variables.is_empty() {
            alternative.required.push("variables".into());
        }
        one_of = one_of.item(alternative);
    }
    one_of.build().into()
}

/// The value rules: what the handlers check that the types cannot say.
fn refine(doc: &mut utoipa::openapi::OpenApi, app_url: &str) {
    let schemas = &mut doc
        .components
        .as_mut()
        .expect("the document has components")
        .schemas;
    let user_id = || RefOr::Ref(Ref::from_schema_name(UserId::name()));
    let phone = || RefOr::Ref(Ref::from_schema_name(PhoneNumberInput::name()));
    let purpose = || RefOr::Ref(Ref::from_schema_name(Purpose::name()));
    let channel = || {
        RefOr::Ref(described_ref(
            Channel::name(),
            "`sms` when left out; otherwise 400 `invalid_channel`.",
        ))
    };
    let time_zone = || {
        RefOr::Ref(described_ref(
            TimeZone::name(),
            "DEFAULT_TIME_ZONE when left out or null.",
        ))
    };
    let date_time = |description: &str| -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .description(Some(format!(
                "{description} RFC 3339; otherwise 400 `invalid_time`."
            )))
            .into()
    };
    let string_enum = |values: &[&str], description: &str| -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(values.iter().copied()))
            .description(Some(description))
            .into()
    };

    let rules: Vec<(&str, &str, RefOr<Schema>)> = Vec::from([
        ("SendOtpRequest", "user_id", user_id()),
        ("SendOtpRequest", "phone_number", phone()),
        ("SendOtpRequest", "purpose", purpose()),
        ("SendOtpRequest", "channel", channel()),
        ("VerifyOtpRequest", "user_id", user_id()),
        ("VerifyOtpRequest", "purpose", purpose()),
        ("VerifyOtpRequest", "phone_number", {
            let mut phone = Ref::from_schema_name(PhoneNumberInput::name());
            phone.description = "When given, the code must have been sent to this number (else \
                400 `invalid_otp`, counted as a wrong try)."
                .into();
            RefOr::Ref(phone)
        }),
        (
            "VerifyOtpRequest",
            "otp_code",
            // `otp::verify_otp` trims it; codes are OTP_LENGTH (4-10) digits.
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(format!("^{WS}*[0-9]{{4,10}}{WS}*$")))
                .description(Some(
                    "The code sent: OTP_LENGTH digits (4 to 10); white space around is ignored.",
                ))
                .examples(["123456"])
                .into(),
        ),
        ("PreferencesUpdate", "phone_number", {
            let mut phone = Ref::from_schema_name(PhoneNumberInput::name());
            phone.description = "Left out: kept. null: removed (needs sms_consent and \
                whatsapp_consent false, else 400 `phone_required`)."
                .into();
            RefOr::Ref(phone)
        }),
        (
            "PreferencesUpdate",
            "source",
            string_enum(
                &["app_settings", "web_settings", "api"],
                "Recorded in the audit trail (default `app_settings`); anything else is 400 \
                 `invalid_source`.",
            ),
        ),
        ("AppointmentRequest", "user_id", user_id()),
        (
            "AppointmentRequest",
            "starts_at",
            date_time("When the appointment starts."),
        ),
        ("AppointmentRequest", "time_zone", time_zone()),
        (
            "AppointmentRequest",
            "status",
            string_enum(
                &["scheduled", "cancelled"],
                "`scheduled` when left out or null; `cancelled` also skips its reminders not \
                 yet sent. Otherwise 400 `invalid_status`.",
            ),
        ),
        ("SubscriptionRequest", "user_id", user_id()),
        (
            "SubscriptionRequest",
            "plan",
            RefOr::Ref(Ref::from_schema_name(Plan::name())),
        ),
        (
            "SubscriptionRequest",
            "renews_at",
            date_time(
                "When it renews (its `subscription_renewal` reminder goes 3 days before). At \
                 least one of `renews_at` and `expires_at`, else 400 `invalid_time`.",
            ),
        ),
        (
            "SubscriptionRequest",
            "expires_at",
            date_time(
                "When it expires (its `subscription_expiring` reminders go 7 days and 1 day \
                 before). At least one of `renews_at` and `expires_at`, else 400 \
                 `invalid_time`.",
            ),
        ),
        (
            "SubscriptionRequest",
            "status",
            string_enum(
                &["active", "cancelled", "expired"],
                "`active` when left out or null; `cancelled` and `expired` also skip its \
                 reminders not yet sent. Otherwise 400 `invalid_status`.",
            ),
        ),
        ("FollowUpRequest", "user_id", user_id()),
        ("FollowUpRequest", "due_at", date_time("When it is due.")),
        ("FollowUpRequest", "time_zone", time_zone()),
        ("DevInbound", "from", phone()),
        ("DevInbound", "channel", channel()),
        ("NotificationRequest", "user_id", user_id()),
        ("NotificationRequest", "channel", channel()),
        (
            "NotificationRequest",
            "idempotency_key",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(200))
                .pattern(Some(format!("^{PRINTABLE}*$")))
                .description(Some(
                    "1-200 printable characters (200 bytes of UTF-8), else 400 \
                     `invalid_idempotency_key`.",
                ))
                .into(),
        ),
        (
            "MessageRecord",
            "id",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some("UUIDv7."))
                .into(),
        ),
        (
            "MessageRecord",
            "channel",
            RefOr::Ref(described_ref(
                Channel::name(),
                "The channel it goes by (`sms` after a WhatsApp fallback).",
            )),
        ),
        (
            "MessageRecord",
            "status",
            RefOr::Ref(Ref::from_schema_name(MessageStatus::name())),
        ),
        (
            "MessageRecord",
            "reason",
            RefOr::Ref(described_ref(
                SkipReason::name(),
                "Why it was skipped (null unless `skipped`).",
            )),
        ),
        (
            "MessageRecord",
            "encoding",
            string_enum(&["GSM-7", "UCS-2"], "How the SMS body was encoded."),
        ),
        (
            "MessageRecord",
            "requested_channel",
            RefOr::Ref(described_ref(
                Channel::name(),
                "The channel asked for, when it went by another.",
            )),
        ),
        (
            "MessageEvent",
            "status",
            RefOr::Ref(Ref::from_schema_name(MessageStatus::name())),
        ),
    ]);
    for (component, property, schema) in rules {
        set_property(schemas, component, property, schema);
    }
    for component in ["MessageRecord", "MessageEvent", "SendOtpAnswer"] {
        require_all(schemas, component);
    }
    set_property(schemas, "SendOtpAnswer", "success", always_true().into());
    set_property(
        schemas,
        "SendOtpAnswer",
        "sent_to",
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(r"^\+[0-9]{0,2}\*+[0-9]{4}$|^\*{4,}$"))
            .description(Some(
                "The number the request named, masked (country code and last four digits). \
                 Never the number on file.",
            ))
            .examples(["+44******3456"])
            .into(),
    );

    link_notification_to_message(doc);

    let schemas = &mut doc
        .components
        .as_mut()
        .expect("the document has components")
        .schemas;
    let base = match schemas.get("NotificationRequest") {
        Some(RefOr::T(Schema::Object(object))) => object.clone(),
        _ => panic!("NotificationRequest is an object schema"),
    };
    schemas.insert(
        "NotificationRequest".into(),
        notification_request(&base, app_url).into(),
    );
}

/// `POST /api/notifications` answers the id that `GET /api/messages/{id}` takes: an OpenAPI link,
/// which lets clients and tools (Schemathesis's stateful phase) follow it.
fn link_notification_to_message(doc: &mut utoipa::openapi::OpenApi) {
    // utoipa 5 writes a Link's `operationId` as `operation_id`, which OpenAPI does not know (the
    // validation test catches it); the extension map is written as it is.
    let mut extensions = utoipa::openapi::extensions::Extensions::default();
    extensions.insert("operationId".into(), "getMessage".into());
    let link = utoipa::openapi::link::LinkBuilder::new()
        .parameter("id", "$response.body#/message/id")
        .description("The message's status and history.")
        .extensions(Some(extensions))
        .build();
    let response = doc
        .paths
        .paths
        .get_mut("/api/notifications")
        .and_then(|item| item.post.as_mut())
        .and_then(|operation| operation.responses.responses.get_mut("202"));
    let Some(RefOr::T(response)) = response else {
        panic!("POST /api/notifications answers 202");
    };
    response.links.insert("getMessage".into(), RefOr::T(link));
}

/// Replace one property's schema, keeping whether it may be `null` (an `Option` field) and its
/// description. Panics when the component or property does not exist, so that a renamed field
/// fails the tests rather than silently losing its rule.
fn set_property(
    schemas: &mut std::collections::BTreeMap<String, RefOr<Schema>>,
    component: &str,
    property: &str,
    schema: RefOr<Schema>,
) {
    let Some(RefOr::T(Schema::Object(object))) = schemas.get_mut(component) else {
        panic!("no object schema {component}");
    };
    let Some(old) = object.properties.get_mut(property) else {
        panic!("{component} has no property {property}");
    };
    let (nullable, description) = match old {
        RefOr::T(Schema::Object(o)) => (
            matches!(&o.schema_type, SchemaType::Array(types) if types.contains(&Type::Null)),
            o.description.clone(),
        ),
        RefOr::T(Schema::OneOf(o)) => {
            let null = SchemaType::Type(Type::Null);
            let is_null = |item: &RefOr<Schema>| match item {
                RefOr::T(Schema::Object(o)) => o.schema_type == null,
                _ => false,
            };
            (o.items.iter().any(is_null), o.description.clone())
        }
        _ => (false, None),
    };
    let mut schema = schema;
    if let (Some(description), RefOr::T(Schema::Object(o))) = (&description, &mut schema) {
        if o.description.is_none() {
            o.description = Some(description.clone());
        }
    }
    *old = if nullable {
        nullable_schema(schema)
    } else {
        schema
    };
}

/// `schema` or `null`.
fn nullable_schema(schema: RefOr<Schema>) -> RefOr<Schema> {
    match schema {
        RefOr::T(Schema::Object(mut object)) if object.schema_type != SchemaType::AnyValue => {
            let mut types = match &object.schema_type {
                SchemaType::Type(t) => vec![t.clone()],
                SchemaType::Array(types) => types.clone(),
                SchemaType::AnyValue => unreachable!(),
            };
            if !types.contains(&Type::Null) {
                types.push(Type::Null);
            }
            object.schema_type = SchemaType::from_iter(types);
            if let Some(values) = &mut object.enum_values {
                if !values.contains(&serde_json::Value::Null) {
                    values.push(serde_json::Value::Null);
                }
            }
            RefOr::T(Schema::Object(object))
        }
        RefOr::Ref(reference) => {
            let description =
                (!reference.description.is_empty()).then(|| reference.description.clone());
            let reference = Ref::new(reference.ref_location);
            OneOfBuilder::new()
                .item(ObjectBuilder::new().schema_type(Type::Null))
                .item(reference)
                .description(description)
                .into()
        }
        other => OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Null))
            .item(other)
            .into(),
    }
}

/// Every property is always written (serde writes `None` as `null`).
fn require_all(schemas: &mut std::collections::BTreeMap<String, RefOr<Schema>>, component: &str) {
    let Some(RefOr::T(Schema::Object(object))) = schemas.get_mut(component) else {
        panic!("no object schema {component}");
    };
    object.required = object.properties.keys().cloned().collect();
}

/// A reference to a component, with a description of this use of it.
fn described_ref(name: Cow<'static, str>, description: &str) -> Ref {
    let mut reference = Ref::from_schema_name(name);
    reference.description = description.into();
    reference
}
