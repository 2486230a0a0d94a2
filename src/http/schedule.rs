//! The host app's appointments, follow-ups and subscriptions, which the reminder sweeps read.

use axum::extract::State;
use axum::routing::put;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::api_schema::{
    ApiKeyNotConfigured, AppointmentAnswer, CancelAnswer, ErrorEnvelope, FollowUpAnswer, HostId,
    InternalError, PayloadTooLarge, SubscriptionAnswer, Unauthorized,
};
use super::{HostApp, JsonBody, PathId};
use crate::error::AppResult;
use crate::http::AppState;
use crate::reminders::{AppointmentRequest, FollowUpRequest, SubscriptionRequest};
use crate::store::{ScheduledItem, SubjectType, Subscription};

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
        .route(
            "/api/subscriptions/{id}",
            put(put_subscription).delete(delete_subscription),
        )
}

fn item_json(item: &ScheduledItem, time_field: &str) -> Value {
    let mut value = json!({
        "id": item.id, "user_id": item.user_id, "time_zone": item.time_zone, "status": item.status,
    });
    value[time_field] = json!(item.scheduled_at);
    value
}

#[utoipa::path(
    put,
    path = "/api/appointments/{id}",
    tag = "host-app",
    operation_id = "putAppointment",
    summary = "Create or update an appointment",
    security(("hostAppKey" = [])),
    params(("id" = HostId, Path, description = "The host app's id.")),
    request_body = AppointmentRequest,
    responses(
        (status = 200, description = "OK", body = AppointmentAnswer),
        (
            status = 400,
            description = "Error envelope; `error.code` is one of: `invalid_id`, \
                `invalid_user_id`, `invalid_time`, `invalid_time_zone`, `invalid_status`, \
                `invalid_json`, `invalid_content_type`.",
            body = ErrorEnvelope,
        ),
        (status = 401, response = Unauthorized),
        (
            status = 404,
            description = "`not_found`: an empty id (no such route).",
            body = ErrorEnvelope,
        ),
        (status = 413, response = PayloadTooLarge),
        (status = 500, response = InternalError),
        (status = 503, response = ApiKeyNotConfigured),
    )
)]
async fn put_appointment(
    State(state): State<AppState>,
    _: HostApp,
    PathId(id): PathId,
    JsonBody(request): JsonBody<AppointmentRequest>,
) -> AppResult<Json<Value>> {
    let item = state.reminders.put_appointment(&id, request).await?;
    Ok(Json(
        json!({"success": true, "appointment": item_json(&item, "starts_at")}),
    ))
}

#[utoipa::path(
    delete,
    path = "/api/appointments/{id}",
    tag = "host-app",
    operation_id = "deleteAppointment",
    summary = "Cancel an appointment and skip its reminders not yet sent",
    security(("hostAppKey" = [])),
    params(("id" = HostId, Path, description = "The host app's id.")),
    responses(
        (status = 200, description = "OK", body = CancelAnswer),
        (status = 400, description = "`invalid_id`: the id in the path is not valid text.", body = ErrorEnvelope),
        (status = 401, response = Unauthorized),
        (status = 404, description = "`not_found`: no such appointment.", body = ErrorEnvelope),
        (status = 500, response = InternalError),
        (status = 503, response = ApiKeyNotConfigured),
    )
)]
async fn delete_appointment(
    State(state): State<AppState>,
    _: HostApp,
    PathId(id): PathId,
) -> AppResult<Json<Value>> {
    let skipped = state
        .reminders
        .cancel(SubjectType::Appointment, &id)
        .await?;
    Ok(Json(json!({"success": true, "reminders_skipped": skipped})))
}

#[utoipa::path(
    put,
    path = "/api/follow-ups/{id}",
    tag = "host-app",
    operation_id = "putFollowUp",
    summary = "Create or update a follow-up",
    security(("hostAppKey" = [])),
    params(("id" = HostId, Path, description = "The host app's id.")),
    request_body = FollowUpRequest,
    responses(
        (status = 200, description = "OK", body = FollowUpAnswer),
        (
            status = 400,
            description = "Error envelope; `error.code` is one of: `invalid_id`, \
                `invalid_user_id`, `invalid_time`, `invalid_time_zone`, `invalid_json`, \
                `invalid_content_type`.",
            body = ErrorEnvelope,
        ),
        (status = 401, response = Unauthorized),
        (
            status = 404,
            description = "`not_found`: an empty id (no such route).",
            body = ErrorEnvelope,
        ),
        (status = 413, response = PayloadTooLarge),
        (status = 500, response = InternalError),
        (status = 503, response = ApiKeyNotConfigured),
    )
)]
async fn put_follow_up(
    State(state): State<AppState>,
    _: HostApp,
    PathId(id): PathId,
    JsonBody(request): JsonBody<FollowUpRequest>,
) -> AppResult<Json<Value>> {
    let item = state.reminders.put_follow_up(&id, request).await?;
    Ok(Json(
        json!({"success": true, "follow_up": item_json(&item, "due_at")}),
    ))
}

#[utoipa::path(
    delete,
    path = "/api/follow-ups/{id}",
    tag = "host-app",
    operation_id = "deleteFollowUp",
    summary = "Cancel a follow-up and skip its reminders not yet sent",
    security(("hostAppKey" = [])),
    params(("id" = HostId, Path, description = "The host app's id.")),
    responses(
        (status = 200, description = "OK", body = CancelAnswer),
        (status = 400, description = "`invalid_id`: the id in the path is not valid text.", body = ErrorEnvelope),
        (status = 401, response = Unauthorized),
        (status = 404, description = "`not_found`: no such follow-up.", body = ErrorEnvelope),
        (status = 500, response = InternalError),
        (status = 503, response = ApiKeyNotConfigured),
    )
)]
async fn delete_follow_up(
    State(state): State<AppState>,
    _: HostApp,
    PathId(id): PathId,
) -> AppResult<Json<Value>> {
    let skipped = state.reminders.cancel(SubjectType::FollowUp, &id).await?;
    Ok(Json(json!({"success": true, "reminders_skipped": skipped})))
}

fn subscription_json(subscription: &Subscription) -> Value {
    json!({
        "id": subscription.id,
        "user_id": subscription.user_id,
        "plan": subscription.plan,
        "renews_at": subscription.renews_at,
        "expires_at": subscription.expires_at,
        "status": subscription.status,
    })
}

#[utoipa::path(
    put,
    path = "/api/subscriptions/{id}",
    tag = "host-app",
    operation_id = "putSubscription",
    summary = "Create or update a subscription",
    description = "Reminders: `subscription_expiring` 7 days and 1 day before `expires_at`, \
        `subscription_renewal` 3 days before `renews_at`, once per period (a new date is a new \
        period; the old period's reminders not yet sent are skipped as \
        `subscription_rescheduled`). `cancelled` or `expired` skips the reminders not yet sent \
        at once.",
    security(("hostAppKey" = [])),
    params(("id" = HostId, Path, description = "The host app's id.")),
    request_body = SubscriptionRequest,
    responses(
        (status = 200, description = "OK", body = SubscriptionAnswer),
        (
            status = 400,
            description = "Error envelope; `error.code` is one of: `invalid_id`, \
                `invalid_user_id`, `invalid_plan`, `invalid_time` (also when both \
                `renews_at` and `expires_at` are left out), `invalid_status`, `invalid_json`, \
                `invalid_content_type`.",
            body = ErrorEnvelope,
        ),
        (status = 401, response = Unauthorized),
        (
            status = 404,
            description = "`not_found`: an empty id (no such route).",
            body = ErrorEnvelope,
        ),
        (status = 413, response = PayloadTooLarge),
        (status = 500, response = InternalError),
        (status = 503, response = ApiKeyNotConfigured),
    )
)]
async fn put_subscription(
    State(state): State<AppState>,
    _: HostApp,
    PathId(id): PathId,
    JsonBody(request): JsonBody<SubscriptionRequest>,
) -> AppResult<Json<Value>> {
    let subscription = state.reminders.put_subscription(&id, request).await?;
    Ok(Json(
        json!({"success": true, "subscription": subscription_json(&subscription)}),
    ))
}

#[utoipa::path(
    delete,
    path = "/api/subscriptions/{id}",
    tag = "host-app",
    operation_id = "deleteSubscription",
    summary = "Cancel a subscription and skip its reminders not yet sent",
    security(("hostAppKey" = [])),
    params(("id" = HostId, Path, description = "The host app's id.")),
    responses(
        (status = 200, description = "OK", body = CancelAnswer),
        (status = 400, description = "`invalid_id`: the id in the path is not valid text.", body = ErrorEnvelope),
        (status = 401, response = Unauthorized),
        (status = 404, description = "`not_found`: no such subscription.", body = ErrorEnvelope),
        (status = 500, response = InternalError),
        (status = 503, response = ApiKeyNotConfigured),
    )
)]
async fn delete_subscription(
    State(state): State<AppState>,
    _: HostApp,
    PathId(id): PathId,
) -> AppResult<Json<Value>> {
    let skipped = state
        .reminders
        .cancel(SubjectType::SubscriptionExpiry, &id)
        .await?;
    Ok(Json(json!({"success": true, "reminders_skipped": skipped})))
}
