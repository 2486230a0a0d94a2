//! The host app's appointments and follow-ups, which the reminder sweeps read.

use axum::extract::{Path, State};
use axum::routing::put;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{HostApp, JsonBody};
use crate::error::AppResult;
use crate::http::AppState;
use crate::reminders::{AppointmentRequest, FollowUpRequest};
use crate::store::{ScheduledItem, SubjectType};

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/api/appointments/{id}",
            put(put_appointment).delete(delete_appointment),
        )
        .route(
            "/api/follow-ups/{id}",
            put(put_follow_up).delete(delete_follow_up),
        )
}

fn item_json(item: &ScheduledItem, time_field: &str) -> Value {
    let mut value = json!({
        "id": item.id, "user_id": item.user_id, "time_zone": item.time_zone, "status": item.status,
    });
    value[time_field] = json!(item.scheduled_at);
    value
}

async fn put_appointment(
    State(state): State<AppState>,
    _: HostApp,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<AppointmentRequest>,
) -> AppResult<Json<Value>> {
    let item = state.reminders.put_appointment(&id, request).await?;
    Ok(Json(
        json!({"success": true, "appointment": item_json(&item, "starts_at")}),
    ))
}

async fn delete_appointment(
    State(state): State<AppState>,
    _: HostApp,
    Path(id): Path<String>,
) -> AppResult<Json<Value>> {
    let skipped = state
        .reminders
        .cancel(SubjectType::Appointment, &id)
        .await?;
    Ok(Json(json!({"success": true, "reminders_skipped": skipped})))
}

async fn put_follow_up(
    State(state): State<AppState>,
    _: HostApp,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<FollowUpRequest>,
) -> AppResult<Json<Value>> {
    let item = state.reminders.put_follow_up(&id, request).await?;
    Ok(Json(
        json!({"success": true, "follow_up": item_json(&item, "due_at")}),
    ))
}

async fn delete_follow_up(
    State(state): State<AppState>,
    _: HostApp,
    Path(id): Path<String>,
) -> AppResult<Json<Value>> {
    let skipped = state.reminders.cancel(SubjectType::FollowUp, &id).await?;
    Ok(Json(json!({"success": true, "reminders_skipped": skipped})))
}
