//! `/cron/*`: the scheduled jobs, for deployments that drive them from outside (the embedded
//! scheduler runs the same functions on its own). `Authorization: Bearer <CRON_SECRET>`.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::api_schema::{
    CleanupAnswer, CronNotConfigured, InternalError, RetentionAnswer, SweepAnswer, Unauthorized,
};
use super::Cron;
use crate::error::AppResult;
use crate::http::AppState;
use crate::reminders::Reminder;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/cron/cleanup-expired-otps", post(cleanup_expired_otps))
        .route("/cron/messaging-cleanup", post(messaging_cleanup))
        .route(
            "/cron/appointment-reminders-24h",
            post(|s, c| sweep(s, c, Reminder::Appointment24h)),
        )
        .route(
            "/cron/appointment-reminders-2h",
            post(|s, c| sweep(s, c, Reminder::Appointment2h)),
        )
        .route(
            "/cron/follow-up-reminders",
            post(|s, c| sweep(s, c, Reminder::FollowUp)),
        )
        .route("/cron/subscription-reminders", post(subscription_reminders))
}

async fn sweep(
    State(state): State<AppState>,
    _: Cron,
    reminder: Reminder,
) -> AppResult<Json<Value>> {
    let report = state.reminders.sweep(reminder).await?;
    Ok(Json(
        json!({"success": true, "due": report.due, "queued": report.queued}),
    ))
}

#[utoipa::path(
    post,
    path = "/cron/cleanup-expired-otps",
    tag = "cron",
    operation_id = "cleanupExpiredOtps",
    summary = "Delete used and expired codes and old rate-limit records",
    description = "The embedded scheduler also runs it every 10 minutes. No request body.",
    security(("cronSecret" = [])),
    responses(
        (status = 200, description = "OK", body = CleanupAnswer),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = CronNotConfigured),
    )
)]
async fn cleanup_expired_otps(State(state): State<AppState>, _: Cron) -> AppResult<Json<Value>> {
    let report = state.otp.cleanup().await?;
    Ok(Json(json!({
        "success": true,
        "expired_deleted": report.expired_deleted,
        "used_deleted": report.used_deleted,
        "send_log_pruned": report.send_log_pruned,
        "failures_pruned": report.failures_pruned,
    })))
}

#[utoipa::path(
    post,
    path = "/cron/messaging-cleanup",
    tag = "cron",
    operation_id = "messagingCleanup",
    summary = "Delete what is past its retention period",
    description = "Messages (final ones) and their events, replies, reminder log rows, the consent \
        audit trail and unmatched callbacks, each after its `RETENTION_*_DAYS`, in bounded \
        batches; a receipt is kept (`GET /api/cleanup-runs`). The embedded scheduler runs it \
        daily. No request body.",
    security(("cronSecret" = [])),
    responses(
        (status = 200, description = "What was deleted, per data class.", body = RetentionAnswer),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = CronNotConfigured),
    )
)]
async fn messaging_cleanup(State(state): State<AppState>, _: Cron) -> AppResult<Json<Value>> {
    let report = state.retention.run(None, false).await?;
    Ok(Json(json!({
        "success": true,
        "as_of": report.as_of,
        "deleted": report.deleted,
    })))
}

#[utoipa::path(
    post,
    path = "/cron/subscription-reminders",
    tag = "cron",
    operation_id = "subscriptionReminders",
    summary = "Queue due subscription reminders",
    description = "`subscription_expiring` 7 days and 1 day before `expires_at`, \
        `subscription_renewal` 3 days before `renews_at`, once per period; `due` and `queued` \
        are added up over the three. The embedded scheduler also runs it every 10 minutes. No \
        request body.",
    security(("cronSecret" = [])),
    responses(
        (status = 200, description = "OK", body = SweepAnswer),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = CronNotConfigured),
    )
)]
async fn subscription_reminders(State(state): State<AppState>, _: Cron) -> AppResult<Json<Value>> {
    let report = state.reminders.sweep_subscriptions().await?;
    Ok(Json(
        json!({"success": true, "due": report.due, "queued": report.queued}),
    ))
}
