//! Mock mode only: the dev outbox, where a developer reads what would have been sent (bodies
//! included). Every route here answers 404 outside mock mode, and every `/dev/` path (this
//! router's and `POST /dev/inbound`) answers 404 unless `/dev/*` may be served here: a loopback
//! `BIND_ADDR`, or `DEV_ENDPOINTS=true` (see [`only_where_allowed`]).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use minijinja::{context, Environment};
use serde_json::{json, Value};

use super::api_schema::{DevOutbox, InternalError, NotMockMode};
use crate::error::{AppError, AppResult};
use crate::http::AppState;
use crate::provider::mock::MockProvider;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/dev/outbox", get(outbox_page))
        .route("/dev/outbox.json", get(outbox_json))
}

/// Whether `/dev/*` is served: mock mode, and a loopback `BIND_ADDR` or `DEV_ENDPOINTS=true`.
fn dev_endpoints_served(state: &AppState) -> bool {
    state.mock.is_some() && state.config.server.dev_endpoints
}

/// Middleware over the whole router: any `/dev/` path answers the 404 envelope unless
/// [`dev_endpoints_served`], before its handler (or body parsing) runs. The outbox shows message
/// bodies, one-time codes included, and `/dev/inbound` takes unsigned replies: neither may be
/// reachable from another machine by accident.
pub(super) async fn only_where_allowed(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if request.uri().path().starts_with("/dev/") && !dev_endpoints_served(&state) {
        return AppError::NotFound("page").into_response();
    }
    next.run(request).await
}

fn mock(state: &AppState) -> AppResult<&Arc<MockProvider>> {
    state.mock.as_ref().ok_or(AppError::NotFound("page"))
}

#[utoipa::path(
    get,
    path = "/dev/outbox.json",
    tag = "dev",
    operation_id = "devOutboxJson",
    summary = "Mock mode: the outbox as JSON",
    security(()),
    responses(
        (
            status = 200,
            description = "The last 500 messages, newest first, in memory (no `success` field).",
            body = DevOutbox,
        ),
        (status = 404, response = NotMockMode),
    )
)]
async fn outbox_json(State(state): State<AppState>) -> AppResult<Json<Value>> {
    let messages: Vec<Value> = mock(&state)?
        .outbox()
        .into_iter()
        .map(|m| {
            json!({
                "id": m.id, "to": m.to, "channel": m.channel, "template_name": m.template_name,
                "body": m.body, "created_at": m.created_at,
            })
        })
        .collect();
    Ok(Json(json!({"messages": messages})))
}

#[utoipa::path(
    get,
    path = "/dev/outbox",
    tag = "dev",
    operation_id = "devOutboxPage",
    summary = "Mock mode: the outbox page",
    security(()),
    responses(
        (
            status = 200,
            description = "An HTML page of what would have been sent.",
            body = String,
            content_type = "text/html",
        ),
        (status = 404, response = NotMockMode),
        (status = 500, response = InternalError),
    )
)]
async fn outbox_page(State(state): State<AppState>) -> AppResult<Html<String>> {
    let messages = mock(&state)?.outbox();
    let mut env = Environment::new();
    env.add_template("outbox.html", include_str!("../web/outbox.html"))
        .map_err(anyhow::Error::from)?;
    let page = env
        .get_template("outbox.html")
        .and_then(|t| {
            t.render(context! {
                clinic => state.config.messaging.clinic_name,
                capacity => crate::provider::mock::OUTBOX_CAPACITY,
                messages => messages,
            })
        })
        .map_err(anyhow::Error::from)?;
    Ok(Html(page))
}
