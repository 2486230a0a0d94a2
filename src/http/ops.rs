//! Operations: liveness, readiness and metrics.

use axum::extract::{FromRequestParts, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::api_schema::{Health, Readiness};
use crate::auth::{bearer_token, key_matches};
use crate::error::AppError;
use crate::http::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// A scraper allowed to read `/metrics`: anyone when `METRICS_TOKEN` is unset, else the bearer of
/// that token (401 otherwise).
pub struct Scraper;

impl FromRequestParts<AppState> for Scraper {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Some(expected) = &state.config.auth.metrics_token else {
            return Ok(Scraper);
        };
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match bearer_token(header) {
            Some(token) if key_matches(token, expected) => Ok(Scraper),
            _ => Err(AppError::Unauthorized),
        }
    }
}

/// Prometheus text format. The message gauges come from a count at most
/// [`crate::metrics::STATUS_COUNTS_TTL`] old, taken by one query however many scrapes arrive.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    operation_id = "metrics",
    summary = "Prometheus metrics",
    security((), ("metricsToken" = [])),
    responses(
        (
            status = 200,
            description = "Text exposition format 0.0.4: `prism_info`, `prism_messages{status}` \
                (from the database), `prism_database_up`, and this instance's \
                `prism_dispatch_total{outcome}`, `prism_otp_sends_total{result}`, \
                `prism_otp_verifies_total{result}`, `prism_webhooks_total{result}`, \
                `prism_claims_unreadable_total`. Answers even when the database does not.",
            body = String,
            content_type = "text/plain",
        ),
        (status = 401, response = super::api_schema::Unauthorized),
    )
)]
async fn metrics(
    _: Scraper,
    State(state): State<AppState>,
) -> crate::error::AppResult<impl axum::response::IntoResponse> {
    // Counters still answer when the database does not; `prism_database_up` says which.
    let store = state.store.clone();
    let messages = state
        .metrics
        .status_counts
        .get(|| async move { store.message_status_counts().await })
        .await;
    if let Err(e) = &messages {
        tracing::warn!(
            error = format!("{e:#}"),
            "metrics: counting messages failed"
        );
    }
    let database_up = messages.is_ok();
    let messages = messages.unwrap_or_default();
    let mut body = state.metrics.render(state.provider.name(), &messages);
    body.push_str(&format!(
        "# HELP prism_database_up Whether the database answered the last count of messages (at most {} s old).\n# TYPE prism_database_up gauge\n",
        crate::metrics::STATUS_COUNTS_TTL.as_secs()
    ));
    body.push_str(&format!("prism_database_up {}\n", u8::from(database_up)));
    body.push_str(
        "# HELP prism_claims_unreadable_total Claimed messages left out because they could not be opened (a damaged value, or sealed with a key not configured); each is claimed again when its lease runs out, and counted again.\n# TYPE prism_claims_unreadable_total counter\n",
    );
    body.push_str(&format!(
        "prism_claims_unreadable_total {}\n",
        state.store.unreadable_claims()
    ));
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
    summary = "Readiness: the database answers and the provider accepts our credentials",
    security(()),
    responses(
        (status = 200, description = "Ready.", body = Readiness),
        (
            status = 503,
            description = "The database does not answer or lacks this build's schema \
                (`status` `not_ready`, `database` `unavailable`), or the provider refuses our \
                credentials.",
            body = Readiness,
        ),
    )
)]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let database = state.store.ping().await;
    let database_ok = database.is_ok();
    if let Err(e) = &database {
        tracing::warn!(error = format!("{e:#}"), "readiness: database check failed");
    }
    // The provider's API, from a check at most a minute old. Reported, not a reason to leave
    // the rotation: every instance sees the same outage, and an instance taken out would stop
    // taking STOPs, consent changes and queued messages too, which wait and go out later.
    // With messaging off nothing is sent, so the provider is not asked.
    let provider_api = if state.config.messaging.enabled {
        state.provider_health.reachability(&state.provider).as_str()
    } else {
        "not_checked"
    };
    // A provider refusing our credentials holds every send: not ready until it accepts one.
    let credentials_ok = !state.provider_health.credentials_refused();
    let ok = database_ok && credentials_ok;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if ok { "ready" } else { "not_ready" },
            "database": if database_ok { "ok" } else { "unavailable" },
            "provider": state.provider.name(),
            "provider_credentials": if credentials_ok { "ok" } else { "refused" },
            "provider_api": provider_api,
            "messaging_enabled": state.config.messaging.enabled,
        })),
    )
}
