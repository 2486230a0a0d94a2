//! The user's own calls: messaging preferences and message history.

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::api_schema::{
    ErrorEnvelope, HistoryAnswer, InternalError, PayloadTooLarge, PreferencesAnswer, Unauthorized,
    UserAuthNotConfigured,
};
use super::{AuthUser, ClientMeta, JsonBody};
use crate::consent::PreferencesUpdate;
use crate::error::{AppError, AppResult};
use crate::http::AppState;
use crate::store::{ChangeContext, Consent, ConsentSource, MessageRecord};

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/api/messaging/preferences",
            get(get_preferences).put(put_preferences),
        )
        .route("/api/messaging/history", get(history))
}

/// The preferences as the app sees them, with where the number is opted out.
async fn preferences_json(state: &AppState, consent: &Consent) -> AppResult<Value> {
    let opted_out = state.consent.opted_out_channels(consent).await?;
    Ok(json!({
        "phone_number": consent.phone_number,
        "sms_consent": consent.sms_consent,
        "whatsapp_consent": consent.whatsapp_consent,
        "marketing_consent": consent.marketing_consent,
        "updated_at": consent.updated_at,
        "phone_verified_at": consent.phone_verified_at,
        "time_zone": consent.time_zone,
        "sms_opted_out": opted_out.sms,
        "whatsapp_opted_out": opted_out.whatsapp,
    }))
}

#[utoipa::path(
    get,
    path = "/api/messaging/preferences",
    tag = "user",
    operation_id = "getPreferences",
    summary = "The caller's messaging preferences",
    security(("userJwt" = [])),
    responses(
        (status = 200, description = "OK", body = PreferencesAnswer),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = UserAuthNotConfigured),
    )
)]
async fn get_preferences(
    State(state): State<AppState>,
    AuthUser(user_id): AuthUser,
) -> AppResult<Json<Value>> {
    let preferences = match state.consent.get(&user_id).await? {
        Some(consent) => preferences_json(&state, &consent).await?,
        None => json!({}),
    };
    Ok(Json(json!({"success": true, "preferences": preferences})))
}

#[utoipa::path(
    put,
    path = "/api/messaging/preferences",
    tag = "user",
    operation_id = "putPreferences",
    summary = "Update the caller's preferences",
    security(("userJwt" = [])),
    request_body = PreferencesUpdate,
    responses(
        (
            status = 200,
            description = "The record after the change; each changed field is audited.",
            body = PreferencesAnswer,
        ),
        (
            status = 400,
            description = "Error envelope; `error.code` is one of: `invalid_phone`, \
                `phone_required`, `invalid_time_zone`, `invalid_source`, `invalid_json`, \
                `invalid_content_type`. Nothing is written.",
            body = ErrorEnvelope,
        ),
        (status = 401, response = Unauthorized),
        (status = 413, response = PayloadTooLarge),
        (status = 500, response = InternalError),
        (status = 503, response = UserAuthNotConfigured),
    )
)]
async fn put_preferences(
    State(state): State<AppState>,
    AuthUser(user_id): AuthUser,
    meta: ClientMeta,
    JsonBody(update): JsonBody<PreferencesUpdate>,
) -> AppResult<Json<Value>> {
    let ctx = ChangeContext {
        source: ConsentSource::AppSettings,
        ip: meta.ip,
        user_agent: meta.user_agent,
        at: state.clock.now(),
    };
    let consent = state
        .consent
        .update_preferences(&user_id, update, ctx)
        .await?;
    Ok(Json(
        json!({"success": true, "preferences": preferences_json(&state, &consent).await?}),
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct HistoryQuery {
    /// How many, newest first; otherwise 400 `invalid_limit`.
    #[param(minimum = 1, maximum = 200, default = 50, nullable = false)]
    limit: Option<i64>,
}

pub fn history_item(m: &MessageRecord) -> Value {
    json!({
        "id": m.id,
        "created_at": m.created_at,
        "updated_at": m.updated_at,
        "template_name": m.template_name,
        "channel": m.channel,
        "status": m.status,
    })
}

#[utoipa::path(
    get,
    path = "/api/messaging/history",
    tag = "user",
    operation_id = "getHistory",
    summary = "The caller's messages, newest first",
    security(("userJwt" = [])),
    params(HistoryQuery),
    responses(
        (status = 200, description = "OK", body = HistoryAnswer),
        (
            status = 400,
            description = "Error envelope; `error.code` is one of: `invalid_limit`.",
            body = ErrorEnvelope,
        ),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = UserAuthNotConfigured),
    )
)]
async fn history(
    State(state): State<AppState>,
    AuthUser(user_id): AuthUser,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> AppResult<Json<Value>> {
    let limit = query
        .map_err(|_| {
            AppError::bad_request("invalid_limit", "limit must be a number from 1 to 200")
        })?
        .0
        .limit
        .unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(AppError::bad_request(
            "invalid_limit",
            "limit must be a number from 1 to 200",
        ));
    }
    let messages = state.outbox.history(&user_id, limit).await?;
    let items: Vec<Value> = messages.iter().map(history_item).collect();
    Ok(Json(json!({"success": true, "messages": items})))
}
