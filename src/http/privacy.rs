//! A patient's copy of their data and their erasure (GDPR articles 15, 17 and 20): with their own
//! token, or erasure by the host app with its key.

use axum::extract::State;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::api_schema::{
    ApiKeyNotConfigured, ErasureAnswer, ErrorEnvelope, InternalError, Unauthorized,
    UserAuthNotConfigured,
};
use super::{AuthUser, HostApp, PathId};
use crate::error::AppResult;
use crate::http::AppState;
use crate::privacy::ErasedBy;

/// The user-token calls (opened to `CORS_ALLOWED_ORIGINS`).
pub fn user_router() -> Router<AppState> {
    Router::new()
        .route("/api/messaging/export", get(export))
        .route("/api/messaging/me", delete(erase_me))
}

/// The host app's call.
pub fn host_router() -> Router<AppState> {
    Router::new().route("/api/users/{id}", delete(erase_user))
}

#[utoipa::path(
    get,
    path = "/api/messaging/export",
    tag = "user",
    operation_id = "exportMyData",
    summary = "Everything held about me, as one JSON document",
    description = "Preferences (with where my number is opted out: `sms_opted_out`, \
        `whatsapp_opted_out`), the consent audit trail, messages (with the text sent where it \
        was kept, never a code) and their status events, the replies attributed to me (on a \
        shared number, never the others'), appointments, follow-ups, OTP send records (never \
        codes) and open settings-page sessions.",
    security(("userJwt" = [])),
    responses(
        (status = 200, description = "The document, with `\"success\": true`.", body = Object),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = UserAuthNotConfigured),
    )
)]
async fn export(
    State(state): State<AppState>,
    AuthUser(user_id): AuthUser,
) -> AppResult<Json<Value>> {
    let mut document = state.privacy.export(&user_id).await?;
    // Where the user's number is opted out is held about them too (as the preferences answer
    // it): the opt-out is kept by number, not in the preferences record. For the number in the
    // document, so the two agree.
    if let Some(preferences) = document["preferences"].as_object_mut() {
        let number = preferences
            .get("phone_number")
            .and_then(Value::as_str)
            .map(str::to_string);
        let opted_out = state.consent.opted_out_number(number.as_deref()).await?;
        preferences.insert("sms_opted_out".into(), json!(opted_out.sms));
        preferences.insert("whatsapp_opted_out".into(), json!(opted_out.whatsapp));
    }
    document["success"] = json!(true);
    Ok(Json(document))
}

#[utoipa::path(
    delete,
    path = "/api/messaging/me",
    tag = "user",
    operation_id = "eraseMe",
    summary = "Erase me",
    description = "Removes my preferences, messages (pending ones are never sent), events, \
        replies, appointments, follow-ups, OTP records and settings sessions. The consent audit \
        trail stays, anonymised, as evidence; opt-outs stay, so a number that said STOP is \
        never texted again. Harmless to repeat.",
    security(("userJwt" = [])),
    responses(
        (status = 200, description = "What was erased.", body = ErasureAnswer),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = UserAuthNotConfigured),
    )
)]
async fn erase_me(
    State(state): State<AppState>,
    AuthUser(user_id): AuthUser,
) -> AppResult<Json<Value>> {
    let counts = state.privacy.erase(&user_id, ErasedBy::User).await?;
    Ok(Json(json!({"success": true, "erased": counts})))
}

#[utoipa::path(
    delete,
    path = "/api/users/{id}",
    tag = "host-app",
    operation_id = "eraseUser",
    summary = "Erase a user",
    description = "As `DELETE /api/messaging/me`, at the host app's request.",
    params(("id" = super::api_schema::UserId, Path, description = "The user id.")),
    security(("hostAppKey" = [])),
    responses(
        (status = 200, description = "What was erased.", body = ErasureAnswer),
        (
            status = 400,
            description = "`invalid_id` or `invalid_user_id`.",
            body = ErrorEnvelope,
        ),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = ApiKeyNotConfigured),
    )
)]
async fn erase_user(
    State(state): State<AppState>,
    _: HostApp,
    PathId(user_id): PathId,
) -> AppResult<Json<Value>> {
    let counts = state.privacy.erase(&user_id, ErasedBy::HostApp).await?;
    Ok(Json(json!({"success": true, "erased": counts})))
}
