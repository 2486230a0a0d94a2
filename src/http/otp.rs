//! The public OTP calls. Anyone can call them, so they are limited and answer the same way
//! whether or not a user is known.

use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

use super::api_schema::{
    ErrorEnvelope, InternalError, PayloadTooLarge, VerifyOtpAnswer, VerifyOtpError,
};
use super::{ClientMeta, JsonBody};
use crate::error::AppError;
use crate::http::AppState;
use crate::otp::{SendOtpAnswer, SendOtpRequest, VerifyOtpRequest};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/messaging/send-otp", post(send_otp))
        .route(
            "/api/messaging/verify-otp",
            post(verify_otp).fallback(verify_otp_other_method),
        )
}

#[utoipa::path(
    post,
    path = "/api/messaging/send-otp",
    tag = "otp",
    operation_id = "sendOtp",
    summary = "Send a one-time passcode",
    description = "Public and rate-limited. The code is sent at once, never queued; a new send \
        replaces the live code for (user_id, purpose). A refusal for an opted-out number counts \
        against the limits.",
    security(()),
    request_body = SendOtpRequest,
    responses(
        (status = 200, description = "Sent.", body = SendOtpAnswer),
        (
            status = 400,
            description = "Error envelope; `error.code` is one of: `invalid_user_id`, \
                `invalid_purpose`, `invalid_channel`, `invalid_phone`, `country_not_allowed`, \
                `opted_out`, `undeliverable`, `whatsapp_window_closed`, `invalid_json`, \
                `invalid_content_type`.",
            body = ErrorEnvelope,
        ),
        (status = 413, response = PayloadTooLarge),
        (
            status = 429,
            description = "`rate_limited`: resend cooldown or hourly cap per number, user id or \
                client IP. Nothing sent or written.",
            body = ErrorEnvelope,
            headers(("Retry-After" = u64, description = "Seconds to wait (at least 1).")),
        ),
        (status = 500, response = InternalError),
        (
            status = 503,
            description = "`unavailable`: messaging is disabled, or the provider could not take \
                the code now (ask again).",
            body = ErrorEnvelope,
        ),
    )
)]
async fn send_otp(
    State(state): State<AppState>,
    meta: ClientMeta,
    JsonBody(request): JsonBody<SendOtpRequest>,
) -> Response {
    let result = state.otp.send(request, meta.ip).await;
    state.metrics.otp_send(result.is_ok());
    match result {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => {
            // A send the limits refused wrote nothing and confirms nothing written: its 429
            // need not wait for other requests' commits to reach the disk.
            let refused = e.code() == "rate_limited";
            let mut response = e.into_response();
            if refused {
                response.extensions_mut().insert(super::ConfirmsNoWrite);
            }
            response
        }
    }
}

/// verify-otp's path, for what answers it before its handler (`bounded_body`); the route above
/// names it as a literal, as every route does (`api::openapi_documents_every_route` reads them).
pub(super) const VERIFY_OTP_PATH: &str = "/api/messaging/verify-otp";

/// The mobile client reads `valid`, so errors carry `"valid": false` beside the usual envelope.
#[utoipa::path(
    post,
    path = "/api/messaging/verify-otp",
    tag = "otp",
    operation_id = "verifyOtp",
    summary = "Verify a one-time passcode",
    description = "Public. Every error except 500 carries `\"valid\": false` beside the envelope.",
    security(()),
    request_body = VerifyOtpRequest,
    responses(
        (
            status = 200,
            description = "The right, live code; it verifies once.",
            body = VerifyOtpAnswer,
        ),
        (
            status = 400,
            description = "`invalid_otp` (no code, wrong, used or expired: indistinguishable), \
                `invalid_user_id`, `invalid_purpose`, `invalid_phone` (a `phone_number` that is \
                not a number), `invalid_json`, `invalid_content_type`.",
            body = VerifyOtpError,
        ),
        (
            status = 405,
            description = "`method_not_allowed`: only POST (with `valid: false`).",
            body = VerifyOtpError,
        ),
        (
            status = 408,
            description = "`request_timeout`: the body did not arrive within \
                HEADER_READ_TIMEOUT_SECONDS.",
            body = VerifyOtpError,
        ),
        (status = 413, description = "`payload_too_large`.", body = VerifyOtpError),
        (
            status = 429,
            description = "`too_many_attempts`: OTP_MAX_ATTEMPTS wrong tries killed the code; \
                request a new one.",
            body = VerifyOtpError,
        ),
        (status = 500, response = InternalError),
        (
            status = 503,
            description = "`unavailable`: the database is out of reach; try again shortly \
                (with `valid: false`).",
            body = VerifyOtpError,
        ),
    )
)]
async fn verify_otp(
    State(state): State<AppState>,
    body: Result<JsonBody<VerifyOtpRequest>, AppError>,
) -> Response {
    let result = match body {
        Ok(JsonBody(request)) => state.otp.verify(request).await,
        Err(e) => Err(e),
    };
    state.metrics.otp_verify(result.is_ok());
    match result {
        // In full: the caller typed the number or holds the account. A login is proven only when
        // this is the user's own number.
        Ok(verified) => Json(json!({
            "success": true,
            "valid": true,
            "phone_number": verified.phone_number,
        }))
        .into_response(),
        Err(e) => verify_refusal(e),
    }
}

/// A refused `verify-otp` (any error but a 500) in the envelope with `"valid": false` beside it.
/// Also for what is refused before the handler runs (a body too large or too slow: `bounded_body`;
/// another method than POST: the route's fallback).
pub(super) fn verify_refusal(e: AppError) -> Response {
    e.into_refusal_of_validity()
}

/// `verify-otp` asked with another method: 405, refused as the call refuses (found by review:
/// the router's 405 had no `valid`).
async fn verify_otp_other_method() -> Response {
    let mut response = verify_refusal(AppError::MethodNotAllowed);
    response
        .headers_mut()
        .insert(axum::http::header::ALLOW, HeaderValue::from_static("POST"));
    response
}
