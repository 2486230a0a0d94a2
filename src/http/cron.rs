//! `/cron/*`: the scheduled jobs, for deployments that drive them from outside (the embedded
//! scheduler runs the same functions on its own). `Authorization: Bearer <CRON_SECRET>`.

use axum::extract::{FromRequestParts, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::app::AppState;
use crate::auth::{bearer_token, key_matches};
use crate::error::{AppError, AppResult};
use crate::otp;

pub fn router() -> Router<AppState> {
    Router::new().route("/cron/cleanup-expired-otps", post(cleanup_expired_otps))
}

/// A caller holding `CRON_SECRET`.
pub struct Cron;

impl FromRequestParts<AppState> for Cron {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let expected = state
            .config
            .cron_secret
            .as_ref()
            .ok_or_else(|| AppError::NotConfigured("CRON_SECRET is not set".into()))?;
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match bearer_token(header) {
            Some(token) if key_matches(token, expected) => Ok(Cron),
            _ => Err(AppError::Unauthorized),
        }
    }
}

async fn cleanup_expired_otps(State(state): State<AppState>, _: Cron) -> AppResult<Json<Value>> {
    let report = otp::cleanup(&state.store, state.clock.now()).await?;
    Ok(Json(json!({
        "success": true,
        "expired_deleted": report.expired_deleted,
        "used_deleted": report.used_deleted,
        "send_log_pruned": report.send_log_pruned,
    })))
}
