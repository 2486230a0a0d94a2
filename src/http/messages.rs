//! The host app's calls: queue notifications, read a message's status, list templates.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::api_schema::{
    ApiKeyNotConfigured, ErrorEnvelope, InternalError, MessageAnswer, MessageId,
    NotificationAnswer, PayloadTooLarge, TemplatesAnswer, Unauthorized,
};
use super::{HostApp, JsonBody, PathId};
use crate::error::{AppError, AppResult};
use crate::http::AppState;
use crate::outbox::{self, NotificationRequest};
use crate::templates::TEMPLATES;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/notifications", post(create_notification))
        .route("/api/messages/{id}", get(get_message))
        .route("/api/templates", get(list_templates))
        .route("/api/cleanup-runs", get(cleanup_runs))
}

#[utoipa::path(
    post,
    path = "/api/notifications",
    tag = "host-app",
    operation_id = "createNotification",
    summary = "Queue a notification from a template",
    description = "Consent, opt-outs, quiet hours and the WhatsApp window are checked at send \
        time; the outcome shows in `GET /api/messages/{id}`.",
    security(("hostAppKey" = [])),
    request_body = NotificationRequest,
    responses(
        (
            status = 202,
            description = "Queued (or, for a repeated idempotency_key, the existing message with \
                its current status).",
            body = NotificationAnswer,
        ),
        (
            status = 400,
            description = "Error envelope; `error.code` is one of: `invalid_user_id`, \
                `unknown_template`, `invalid_channel`, `invalid_template_variables`, \
                `invalid_idempotency_key`, `invalid_json`, `invalid_content_type`.",
            body = ErrorEnvelope,
        ),
        (status = 401, response = Unauthorized),
        (
            status = 409,
            description = "`idempotency_key_reused`: the key was used for a different \
                notification.",
            body = ErrorEnvelope,
        ),
        (status = 413, response = PayloadTooLarge),
        (status = 500, response = InternalError),
        (status = 503, response = ApiKeyNotConfigured),
    )
)]
async fn create_notification(
    State(state): State<AppState>,
    _: HostApp,
    JsonBody(request): JsonBody<NotificationRequest>,
) -> AppResult<(StatusCode, Json<Value>)> {
    let (message, _) = state.outbox.queue_notification(request).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"success": true, "message": {"id": message.id, "status": message.status}})),
    ))
}

#[utoipa::path(
    get,
    path = "/api/messages/{id}",
    tag = "host-app",
    operation_id = "getMessage",
    summary = "A message, with its status history",
    security(("hostAppKey" = [])),
    params((
        "id" = MessageId,
        Path,
        description = "The message's id, as `POST /api/notifications` answered it."
    )),
    responses(
        (status = 200, description = "OK", body = MessageAnswer),
        (status = 400, description = "`invalid_id`: the id in the path is not valid text.", body = ErrorEnvelope),
        (status = 401, response = Unauthorized),
        (status = 404, description = "`not_found`: no message with this id.", body = ErrorEnvelope),
        (status = 500, response = InternalError),
        (status = 503, response = ApiKeyNotConfigured),
    )
)]
async fn get_message(
    State(state): State<AppState>,
    _: HostApp,
    PathId(id): PathId,
) -> AppResult<Json<Value>> {
    let (message, events) = state
        .outbox
        .message_with_events(&id)
        .await?
        .ok_or(AppError::NotFound("message"))?;
    let mut body = serde_json::to_value(&message).map_err(anyhow::Error::from)?;
    body["events"] = serde_json::to_value(&events).map_err(anyhow::Error::from)?;
    Ok(Json(json!({"success": true, "message": body})))
}

#[utoipa::path(
    get,
    path = "/api/templates",
    tag = "host-app",
    operation_id = "listTemplates",
    summary = "Templates the host app may send",
    description = "What `POST /api/notifications` accepts; excludes `otp` and the keyword replies.",
    security(("hostAppKey" = [])),
    responses(
        (status = 200, description = "OK", body = TemplatesAnswer),
        (status = 401, response = Unauthorized),
        (status = 503, response = ApiKeyNotConfigured),
    )
)]
async fn list_templates(State(state): State<AppState>, _: HostApp) -> Json<Value> {
    let templates: Vec<Value> = TEMPLATES
        .iter()
        .filter(|t| outbox::host_app_may_send(t))
        .map(|t| {
            let mut item =
                json!({"name": t.name, "kind": t.kind, "category": t.category(), "variables": t.variables});
            if let Some(sid) = state.config.twilio.content_sids.get(t.name) {
                item["whatsapp_content_sid"] = json!(sid);
            }
            item
        })
        .collect();
    Json(json!({"success": true, "templates": templates}))
}

#[utoipa::path(
    get,
    path = "/api/cleanup-runs",
    tag = "host-app",
    operation_id = "cleanupRuns",
    summary = "Receipts of the retention cleanup runs, newest first",
    security(("hostAppKey" = [])),
    responses(
        (status = 200, description = "The last 100 runs.", body = super::api_schema::CleanupRunsAnswer),
        (status = 401, response = super::api_schema::Unauthorized),
        (status = 503, response = super::api_schema::ApiKeyNotConfigured),
    )
)]
async fn cleanup_runs(State(state): State<AppState>, _: HostApp) -> AppResult<Json<Value>> {
    let runs: Vec<Value> = state
        .retention
        .runs(100)
        .await?
        .into_iter()
        .map(|run| {
            let counts: Value = serde_json::from_str(&run.counts).unwrap_or(Value::Null);
            json!({"id": run.id, "ran_at": run.ran_at, "as_of": run.as_of, "deleted": counts})
        })
        .collect();
    Ok(Json(json!({"success": true, "runs": runs})))
}
