//! The host app's calls: queue notifications, read a message's status, list templates.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{HostApp, JsonBody};
use crate::error::{AppError, AppResult};
use crate::http::AppState;
use crate::outbox::{self, NotificationRequest};
use crate::templates::TEMPLATES;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/notifications", post(create_notification))
        .route("/api/messages/{id}", get(get_message))
        .route("/api/templates", get(list_templates))
}

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

async fn get_message(
    State(state): State<AppState>,
    _: HostApp,
    Path(id): Path<String>,
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

async fn list_templates(State(state): State<AppState>, _: HostApp) -> Json<Value> {
    let templates: Vec<Value> = TEMPLATES
        .iter()
        .filter(|t| outbox::host_app_may_send(t))
        .map(|t| {
            let mut item =
                json!({"name": t.name, "category": t.category, "variables": t.variables});
            if let Some(sid) = state.config.twilio.content_sids.get(t.name) {
                item["whatsapp_content_sid"] = json!(sid);
            }
            item
        })
        .collect();
    Json(json!({"success": true, "templates": templates}))
}
