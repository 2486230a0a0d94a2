//! Twilio's webhooks (signed, form-encoded), the host app's inbox of patient replies, and mock
//! mode's stand-in for an incoming message.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{OriginalUri, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};

use super::api_schema::{
    ApiKeyNotConfigured, BadSignature, ErrorEnvelope, InboundAnswer, InternalError, NotMockMode,
    PayloadTooLarge, TwilioIncomingForm, TwilioStatusForm, Unauthorized, WebhooksNotConfigured,
};
use super::{HostApp, JsonBody};
use crate::error::{AppError, AppResult};
use crate::http::AppState;
use crate::inbound::Incoming;
use crate::phone::PhoneNumber;
use crate::provider::signature;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/webhooks/twilio/status", post(status_callback))
        .route("/webhooks/twilio/incoming", post(incoming))
        .route("/api/inbound", get(list_inbound))
        .route("/dev/inbound", post(dev_inbound))
}

/// The form parameters of a request whose `X-Twilio-Signature` is right, or why not.
fn verified_form(
    state: &AppState,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> AppResult<Vec<(String, String)>> {
    let token = state.config.twilio.auth_token.as_ref().ok_or_else(|| {
        AppError::NotConfigured("TWILIO_AUTH_TOKEN is not set: webhooks cannot be verified".into())
    })?;
    let presented = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| AppError::Forbidden("missing X-Twilio-Signature".into()))?;
    // A body that is not a form cannot carry a right signature: 403 like any other forgery.
    let params: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|_| AppError::Forbidden("invalid X-Twilio-Signature".into()))?;
    // The URL Twilio called: our public base URL, this path, and the query string as sent.
    let mut url = format!("{}{}", state.config.messaging.public_url, uri.path());
    if let Some(query) = uri.query() {
        url.push('?');
        url.push_str(query);
    }
    let valid = signature::is_valid(token.expose(), &url, &params, presented);
    state.metrics.webhook(valid);
    if !valid {
        tracing::warn!(
            path = uri.path(),
            "webhook refused: wrong X-Twilio-Signature"
        );
        return Err(AppError::Forbidden("invalid X-Twilio-Signature".into()));
    }
    // Twilio sends no NUL, and PostgreSQL text cannot hold one: refused before anything is
    // applied, on both backends alike.
    if params
        .iter()
        .any(|(name, value)| name.contains('\0') || value.contains('\0'))
    {
        return Err(AppError::bad_request(
            "invalid_form",
            "a form field holds a NUL character",
        ));
    }
    Ok(params)
}

fn field<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A raw body, or the error envelope (413 when over the limit).
fn raw_body(body: Result<Bytes, BytesRejection>) -> AppResult<Bytes> {
    body.map_err(|rejection| match rejection.status() {
        axum::http::StatusCode::PAYLOAD_TOO_LARGE => AppError::PayloadTooLarge,
        _ => AppError::bad_request("invalid_body", "the request body could not be read"),
    })
}

#[utoipa::path(
    post,
    path = "/webhooks/twilio/status",
    tag = "webhooks",
    operation_id = "twilioStatus",
    summary = "Twilio: a delivery status callback",
    description = "Statuses only move forward (queued < sending < sent < delivered < read); \
        undelivered and failed are final unless already delivered or read.",
    security(("twilioSignature" = [])),
    params((
        "X-Twilio-Signature" = String,
        Header,
        description = "HMAC-SHA1 (TWILIO_AUTH_TOKEN) over PUBLIC_URL + path + query and the \
            sorted form parameters, base64."
    )),
    request_body(content = TwilioStatusForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (
            status = 200,
            description = "Recorded, ignored (late, repeated or not a delivery status) or unknown \
                MessageSid; empty body.",
        ),
        (
            status = 400,
            description = "`invalid_form`: MessageSid or MessageStatus missing, or a field holds a NUL.",
            body = ErrorEnvelope,
        ),
        (status = 403, response = BadSignature),
        (status = 413, response = PayloadTooLarge),
        (status = 500, response = InternalError),
        (status = 503, response = WebhooksNotConfigured),
    )
)]
async fn status_callback(
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> AppResult<()> {
    let params = verified_form(&state, &uri, &headers, &raw_body(body)?)?;
    let (Some(sid), Some(status)) = (
        field(&params, "MessageSid"),
        field(&params, "MessageStatus"),
    ) else {
        return Err(AppError::bad_request(
            "invalid_form",
            "MessageSid and MessageStatus are required",
        ));
    };
    let error_code = field(&params, "ErrorCode").and_then(|c| c.trim().parse::<i64>().ok());
    state
        .delivery
        .apply_status(sid, status, error_code, state.clock.now())
        .await?;
    Ok(())
}

fn twiml_response(xml: String) -> Response {
    ([(CONTENT_TYPE, "text/xml; charset=utf-8")], xml).into_response()
}

#[utoipa::path(
    post,
    path = "/webhooks/twilio/incoming",
    tag = "webhooks",
    operation_id = "twilioIncoming",
    summary = "Twilio: a message came in",
    description = "Stored once per MessageSid. STOP/START/HELP keywords (any case) change consent \
        for the channel and are answered; other text is readable at `GET /api/inbound`.",
    security(("twilioSignature" = [])),
    params((
        "X-Twilio-Signature" = String,
        Header,
        description = "HMAC-SHA1 (TWILIO_AUTH_TOKEN) over PUBLIC_URL + path + query and the \
            sorted form parameters, base64."
    )),
    request_body(content = TwilioIncomingForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (
            status = 200,
            description = "TwiML: a `<Message>` with the keyword reply, or an empty \
                `<Response/>`. A repeated `MessageSid` gets the same answer and changes nothing.",
            body = String,
            content_type = "text/xml",
            example = json!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>"),
        ),
        (
            status = 400,
            description = "`invalid_form`: MessageSid or From missing, or a field holds a NUL.",
            body = ErrorEnvelope,
        ),
        (status = 403, response = BadSignature),
        (status = 413, response = PayloadTooLarge),
        (status = 500, response = InternalError),
        (status = 503, response = WebhooksNotConfigured),
    )
)]
async fn incoming(
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> AppResult<Response> {
    let params = verified_form(&state, &uri, &headers, &raw_body(body)?)?;
    let (Some(sid), Some(from)) = (field(&params, "MessageSid"), field(&params, "From")) else {
        return Err(AppError::bad_request(
            "invalid_form",
            "MessageSid and From are required",
        ));
    };
    let message = Incoming {
        message_sid: sid.to_string(),
        from: from.to_string(),
        to: field(&params, "To").map(String::from),
        body: field(&params, "Body").unwrap_or_default().to_string(),
        opt_out_type: field(&params, "OptOutType")
            .filter(|t| !t.is_empty())
            .map(String::from),
    };
    Ok(twiml_response(state.inbound.handle(message).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct InboundQuery {
    /// RFC 3339, exclusive; percent-encode a `+` offset. Omitted: from the beginning. Otherwise
    /// 400 `invalid_since`.
    #[param(format = DateTime, nullable = false)]
    since: Option<String>,
    /// At most this many (a page never splits messages received at the same instant, so it may
    /// hold more); otherwise 400 `invalid_limit`.
    #[param(minimum = 1, maximum = 200, default = 50, nullable = false)]
    limit: Option<i64>,
}

/// Patient replies and keywords for the host app, oldest first after `since` (RFC 3339).
#[utoipa::path(
    get,
    path = "/api/inbound",
    tag = "host-app",
    operation_id = "listInbound",
    summary = "Patient replies and keywords, oldest first",
    description = "Messages received after `since` and at least two seconds ago, so a reader \
        moving `since` forward never skips one still being written.",
    security(("hostAppKey" = [])),
    params(InboundQuery),
    responses(
        (status = 200, description = "OK", body = InboundAnswer),
        (
            status = 400,
            description = "Error envelope; `error.code` is one of: `invalid_query`, \
                `invalid_since`, `invalid_limit`.",
            body = ErrorEnvelope,
        ),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = ApiKeyNotConfigured),
    )
)]
async fn list_inbound(
    State(state): State<AppState>,
    _: HostApp,
    query: Result<Query<InboundQuery>, axum::extract::rejection::QueryRejection>,
) -> AppResult<Json<Value>> {
    let Query(query) = query.map_err(|_| {
        AppError::bad_request("invalid_query", "since must be RFC 3339, limit a number")
    })?;
    let since = query
        .since
        .as_deref()
        .map(|s| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    AppError::bad_request("invalid_since", "since must be an RFC 3339 time")
                })
        })
        .transpose()?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(AppError::bad_request(
            "invalid_limit",
            "limit must be a number from 1 to 200",
        ));
    }
    let messages = state.inbound.inbox_page(since, limit).await?;
    let next_since = messages.last().map(|m| m.received_at);
    let items: Vec<Value> = messages
        .iter()
        .map(|m| {
            json!({
                "id": m.id, "provider_sid": m.provider_sid, "channel": m.channel, "from": m.from_number,
                "user_id": m.user_id, "user_ids": m.user_ids(), "body": m.body, "keyword": m.keyword,
                "received_at": m.received_at,
            })
        })
        .collect();
    Ok(Json(
        json!({"success": true, "messages": items, "next_since": next_since}),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct DevInbound {
    /// The patient's number (E.164), or `whatsapp:+...` for a WhatsApp message.
    from: String,
    body: String,
    /// `sms` (the default) or `whatsapp` (the default for a `whatsapp:` address).
    channel: Option<String>,
}

/// Mock mode only: a patient's message without Twilio, through the same handling.
#[utoipa::path(
    post,
    path = "/dev/inbound",
    tag = "dev",
    operation_id = "devInbound",
    summary = "Mock mode: simulate a patient's message",
    description = "The incoming-webhook handling without a signature. The body is parsed before \
        the mock-mode check, so outside mock mode a bad body answers 400, not 404.",
    security(()),
    request_body = DevInbound,
    responses(
        (
            status = 200,
            description = "TwiML: a `<Message>` with the keyword reply, or an empty \
                `<Response/>`. A repeated `MessageSid` gets the same answer and changes nothing.",
            body = String,
            content_type = "text/xml",
            example = json!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>"),
        ),
        (
            status = 400,
            description = "Error envelope; `error.code` is one of: `invalid_phone`, \
                `invalid_channel`, `invalid_json`, `invalid_content_type`.",
            body = ErrorEnvelope,
        ),
        (status = 404, response = NotMockMode),
        (status = 413, response = PayloadTooLarge),
        (status = 500, response = InternalError),
    )
)]
async fn dev_inbound(
    State(state): State<AppState>,
    body: Result<JsonBody<DevInbound>, AppError>,
) -> AppResult<Response> {
    if state.mock.is_none() {
        return Err(AppError::NotFound("page"));
    }
    let JsonBody(request) = body?;
    // `whatsapp:+...`, as Twilio writes a WhatsApp sender, is the WhatsApp channel; with
    // `channel: "sms"` it contradicts itself and is refused.
    let (addressed, from) = crate::store::Channel::of_address(&request.from);
    let number = PhoneNumber::parse(from).map_err(|_| {
        AppError::bad_request(
            "invalid_phone",
            "from must be a valid number in international format (e.g. +919876543210), or \
             whatsapp: and one",
        )
    })?;
    let channel = match request.channel.as_deref() {
        None => addressed,
        channel => crate::outbox::parse_channel(channel)?,
    };
    if addressed == crate::store::Channel::Whatsapp && channel != addressed {
        return Err(AppError::bad_request(
            "invalid_channel",
            "from is a WhatsApp address (whatsapp:+...), but channel is sms",
        ));
    }
    let from = match channel {
        crate::store::Channel::Whatsapp => format!("whatsapp:{}", number.as_str()),
        crate::store::Channel::Sms => number.as_str().to_string(),
    };
    let message = Incoming {
        message_sid: format!("SM{}", uuid::Uuid::new_v4().simple()),
        from,
        to: None,
        body: request.body,
        opt_out_type: None,
    };
    Ok(twiml_response(state.inbound.handle(message).await?))
}
