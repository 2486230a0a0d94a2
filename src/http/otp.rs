//! The public OTP calls. Anyone can call them, so they are limited and answer the same way
//! whether or not a user is known.

use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

use super::{ClientMeta, JsonBody};
use crate::error::{AppError, AppResult};
use crate::http::AppState;
use crate::otp::{SendOtpAnswer, SendOtpRequest, VerifyOtpRequest};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/messaging/send-otp", post(send_otp))
        .route("/api/messaging/verify-otp", post(verify_otp))
}

async fn send_otp(
    State(state): State<AppState>,
    meta: ClientMeta,
    JsonBody(request): JsonBody<SendOtpRequest>,
) -> AppResult<Json<SendOtpAnswer>> {
    let result = state.otp.send(request, meta.ip).await;
    state.metrics.otp_send(result.is_ok());
    Ok(Json(result?))
}

/// The mobile client reads `valid`, so errors carry `"valid": false` beside the usual envelope.
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
        Err(AppError::Internal(e)) => AppError::Internal(e).into_response(),
        Err(e) => {
            let body = json!({
                "success": false,
                "valid": false,
                "error": {"code": e.code(), "message": e.to_string()},
            });
            let mut response = (e.status(), Json(body)).into_response();
            if let AppError::TooManyRequests {
                retry_after_secs: Some(secs),
                ..
            } = e
            {
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    response.headers_mut().insert("retry-after", v);
                }
            }
            response
        }
    }
}
