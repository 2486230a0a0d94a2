//! Operations: liveness and readiness.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::http::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// Prometheus text format.
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
async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready: the database answers (the provider's settings were validated at start). Its remote check
/// (`prism-messaging health`) is not repeated here: a Twilio hiccup must not take every instance
/// out of a load balancer, and readiness probes would otherwise spend API calls.
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
            "messaging_enabled": state.config.messaging.enabled,
        })),
    )
}
