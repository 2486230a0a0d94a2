//! `GET /openapi.json`: this API as OpenAPI 3.1, generated from the handlers' `#[utoipa::path]`
//! attributes and the request and answer types.
//!
//! The types say which fields there are, which are required and which may be `null`. What JSON
//! Schema can also say about a value the handlers check (lengths, patterns, enumerations, the
//! variables of each template) is added by [`refine`], each rule naming the check it mirrors. The
//! rules never ask for more than the handlers do: a request that breaks the document is refused,
//! and one that keeps to it is refused only with a documented 4xx (a number libphonenumber does
//! not know, an appointment's unknown id). `tests/it/api.rs` checks that every route is documented
//! and that the document validates against the OpenAPI 3.1 schema; `.ci/schemathesis.sh` checks
//! the running service against it.

// The functions below only carry `#[utoipa::path]` attributes for closure routes; never called.
#![allow(dead_code)]

use std::borrow::Cow;

use utoipa::openapi::schema::{
    AdditionalProperties, AnyOfBuilder, Object, ObjectBuilder, OneOfBuilder, Ref, Schema,
    SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{KnownFormat, RefOr};
use utoipa::{Modify, OpenApi, ToSchema};

use super::api_schema::*;
use crate::config::Config;
use crate::status::{MessageStatus, SkipReason};
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
        (name = "pages", description = "The patient's settings page (HTML, a session cookie)."),
    ),
    paths(
        super::preferences::get_preferences,
        super::preferences::put_preferences,
        super::preferences::history,
        super::privacy::export,
        super::privacy::erase_me,
        super::privacy::erase_user,
        super::otp::send_otp,
        super::otp::verify_otp,
        super::messages::create_notification,
        super::messages::get_message,
        super::messages::list_templates,
        super::webhooks::list_inbound,
        super::webhooks::incoming,
        super::webhooks::status_callback,
        super::cron::cleanup_expired_otps,
        super::cron::messaging_cleanup,
        super::messages::cleanup_runs,
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
        super::settings::create_link,
        super::settings::page,
        super::settings::save,
        super::settings::sign_out,
        super::settings::stylesheet,
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
            format!("^{WS}*{DATE}{WS}*$"),
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
        VarType::Datetime => string(
            format!("^{WS}*{INSTANT}{WS}*$"),
            "An RFC 3339 time with `T` and `Z` or an offset (`2027-01-12T10:30:00+05:30`), a \
             real one (else 400). Rendered when sent, in the patient's time zone: `today at \
             10:30`, `tomorrow at 10:30` or `on Wednesday 13 Jan 2027 at 10:30`, with the zone's \
             abbreviation when it is not DEFAULT_TIME_ZONE.",
        ),
        VarType::Day => string(
            format!("^{WS}*(?:{DATE}|{INSTANT}){WS}*$"),
            "`YYYY-MM-DD`, or an RFC 3339 time (its day in the patient's time zone); a real one \
             (else 400). Rendered when sent: `today`, `tomorrow` or `on Wednesday 13 Jan 2027`.",
        ),
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
            "Stored when given. Left out or null: none stored; its reminders use the patient's \
             zone, else DEFAULT_TIME_ZONE.",
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
        (
            "SendOtpRequest",
            "purpose",
            RefOr::Ref(described_ref(
                Purpose::name(),
                "`verification` when left out.",
            )),
        ),
        ("SendOtpRequest", "channel", channel()),
        ("VerifyOtpRequest", "user_id", user_id()),
        ("VerifyOtpRequest", "purpose", purpose()),
        ("VerifyOtpRequest", "phone_number", {
            let mut phone = Ref::from_schema_name(PhoneNumberInput::name());
            phone.description = "When given, the code must have been sent to this number (else \
                400 `invalid_otp`, counted as a wrong try; a value that is not a number is 400 \
                `invalid_phone`)."
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
            "time_zone",
            RefOr::Ref(described_ref(
                TimeZone::name(),
                "Left out: kept. null: removed (DEFAULT_TIME_ZONE applies). Audited.",
            )),
        ),
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
                "The number the request named, masked (its first two digits and last four). \
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
