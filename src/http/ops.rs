//! Operations: liveness and readiness.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::openapi::{Health, Readiness};
use crate::app::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    operation_id = "metrics",
    summary = "Prometheus metrics",
    security(()),
    responses(
        (
            status = 200,
            description = "Text exposition format 0.0.4: `prism_info`, `prism_messages{status}` \
                (from the database), `prism_database_up`, and this instance's \
                `prism_dispatch_total{outcome}`, `prism_otp_sends_total{result}`, \
                `prism_otp_verifies_total{result}`, `prism_webhooks_total{result}`. Answers even \
                when the database does not.",
            body = String,
            content_type = "text/plain",
        ),
    )
)]
async fn metrics(
    State(state): State<AppState>,
) -> crate::error::AppResult<impl axum::response::IntoResponse> {
    // Counters still answer when the database does not; `prism_database_up` says which.
    let messages = state.store.message_status_counts().await;
    let database_up = messages.is_ok();
    let mut body = state
        .metrics
        .render(state.provider.name(), &messages.unwrap_or_default());
    body.push_str("# HELP prism_database_up Whether the database answered this scrape.\n# TYPE prism_database_up gauge\n");
    body.push_str(&format!("prism_database_up {}\n", u8::from(database_up)));
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    Ok(([(axum::http::header::CONTENT_TYPE, content_type)], body))
}

/// Alive: no I/O.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "ops",
    operation_id = "healthz",
    summary = "Liveness (no I/O)",
    security(()),
    responses((status = 200, description = "Alive.", body = Health))
)]
async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready: the database answers (the provider's settings were validated at start). Its remote check
/// (`prism-messaging health`) is not repeated here: a Twilio hiccup must not take every instance
/// out of a load balancer, and readiness probes would otherwise spend API calls.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "ops",
    operation_id = "readyz",
    summary = "Readiness: the database answers",
    security(()),
    responses(
        (status = 200, description = "Ready.", body = Readiness),
        (
            status = 503,
            description = "The database does not answer (`status` `not_ready`, `database` \
                `unavailable`).",
            body = Readiness,
        ),
    )
)]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let database = state.store.ping().await;
    let ok = database.is_ok();
    if let Err(e) = &database {
        tracing::warn!(error = %e, "readiness: database check failed");
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if ok { "ready" } else { "not_ready" },
            "database": if ok { "ok" } else { "unavailable" },
            "provider": state.provider.name(),
            "messaging_enabled": state.config.messaging_enabled,
        })),
    )
}
