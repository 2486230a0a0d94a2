//! The HTTP layer: one router per feature, merged here, plus the extractors that authenticate
//! callers and turn bad JSON into the contract's error envelope.

mod api_schema;
mod cron;
mod dev;
mod headers;
mod messages;
mod openapi;
mod ops;
mod otp;
mod preferences;
mod privacy;
mod schedule;
mod settings;
mod state;
mod webhooks;

use std::net::SocketAddr;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::header::{AUTHORIZATION, USER_AGENT};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Router;
use serde::de::DeserializeOwned;

use crate::auth::{bearer_token, key_matches};
use crate::config::Secret;
use crate::error::AppError;
pub use state::AppState;

/// JSON bodies are small; anything bigger is refused before it is read.
const BODY_LIMIT_BYTES: usize = 64 * 1024;

pub fn router(state: AppState) -> Router {
    let router = Router::new()
        .route("/openapi.json", axum::routing::get(openapi))
        .merge(cross_origin(&state, preferences::router()))
        .merge(cross_origin(&state, privacy::user_router()))
        .merge(privacy::host_router())
        .merge(messages::router())
        .merge(ops::router())
        .merge(dev::router())
        .merge(cross_origin(&state, otp::router()))
        .merge(cron::router())
        .merge(webhooks::router())
        .merge(schedule::router())
        .merge(settings::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            bounded_body,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            dev::only_where_allowed,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            durable_writes,
        ))
        .with_state(state);
    headers::secure(router)
}

/// A body is read whole, within `BODY_LIMIT_BYTES` and `HEADER_READ_TIMEOUT_SECONDS` (a client
/// has as long for its body as for its headers: 64 KiB in the default 10 s is 6.4 KB/s), before
/// any handler runs, so a stalled or dripping body cannot hold a connection and its task open. A
/// declared length over the limit answers 413 at once, without waiting for a body that may never
/// come; a body that does not arrive in time answers 408.
async fn bounded_body(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::body::HttpBody;
    use axum::response::IntoResponse;
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    // verify-otp's refusals carry `"valid": false`, these too.
    let refuse: fn(AppError) -> axum::response::Response =
        if request.uri().path() == otp::VERIFY_OTP_PATH {
            otp::verify_refusal
        } else {
            <AppError as IntoResponse>::into_response
        };
    if declared.is_some_and(|n| n > BODY_LIMIT_BYTES as u64) {
        return refuse(AppError::PayloadTooLarge);
    }
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let read = axum::body::to_bytes(body, BODY_LIMIT_BYTES);
    match tokio::time::timeout(state.config.server.header_read_timeout, read).await {
        Ok(Ok(bytes)) => {
            let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
            next.run(request).await
        }
        // Over the limit (a chunked body has no length to refuse early), or a broken stream.
        Ok(Err(_)) => refuse(AppError::PayloadTooLarge),
        Err(_) => refuse(AppError::RequestTimeout),
    }
}

/// A request that may have written is answered only once its writes are durable: on SQLite the
/// group fsync after its commits (shared with every request that finished meanwhile); on
/// PostgreSQL its commits already were. A handler whose answer confirms no write at all says so
/// with [`ConfirmsNoWrite`], and that answer leaves at once.
async fn durable_writes(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let may_write = !request.method().is_safe();
    let response = next.run(request).await;
    if may_write && response.extensions().get::<ConfirmsNoWrite>().is_none() {
        if let Err(e) = state.store.durable().await {
            return e.into_response();
        }
    }
    response
}

/// A response extension for an answer that confirms no write, its request's or anyone else's (a
/// code the send limits refused): it need not wait for the group fsync. Handlers opt in; the
/// default is to wait, because an answer can confirm a write another request made and has not
/// yet made durable (a retried status callback or a repeated idempotent call finds the first
/// one's rows and changes nothing, yet its 200 tells the caller they are stored).
#[derive(Clone, Copy, Debug)]
pub struct ConfirmsNoWrite;

/// This API as OpenAPI 3.1, generated from the handlers and types (see `openapi.rs`).
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "ops",
    operation_id = "openapi",
    summary = "This document",
    security(()),
    responses((status = 200, description = "OpenAPI 3.1.", body = Object))
)]
async fn openapi(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(openapi::document(&state.config))
}

/// `router` opened to the browser origins in `CORS_ALLOWED_ORIGINS` (preflights answered): only
/// for the user-token calls and the public OTP calls. Host-app, cron, webhook and `/settings`
/// routes never get it, and with no origins configured nothing does.
fn cross_origin(state: &AppState, router: Router<AppState>) -> Router<AppState> {
    use axum::http::{header, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins: Vec<HeaderValue> = state
        .config
        .web
        .cors_allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return router;
    }
    // The routes' own 405 fallback is set before the layer, so a preflight (OPTIONS, which no
    // route handles) passes through the CORS layer instead of around it.
    router
        .method_not_allowed_fallback(method_not_allowed)
        .layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET, Method::PUT, Method::POST, Method::DELETE])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
                // A refused code's wait, which a browser hides from scripts unless exposed.
                .expose_headers([header::RETRY_AFTER])
                .max_age(std::time::Duration::from_secs(600)),
        )
}

/// Unknown paths and methods answer with the error envelope too.
async fn not_found() -> AppError {
    AppError::NotFound("route")
}

async fn method_not_allowed() -> AppError {
    AppError::MethodNotAllowed
}

/// Only the operations routes: for instances that run as dispatchers (`INSTANCE_ROLE=dispatcher`).
pub fn ops_router(state: AppState) -> Router {
    let router = Router::new()
        .merge(ops::router())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            bounded_body,
        ))
        .with_state(state);
    headers::secure(router)
}

/// A user proven by a bearer JWT; holds the user id.
pub struct AuthUser(pub String);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let token = bearer_token(header).ok_or(AppError::Unauthorized)?;
        Ok(AuthUser(state.auth.verify(token).await?))
    }
}

/// Check a static bearer key: 503 when the deployment has none configured (naming the
/// variable), 401 for a missing or wrong one.
fn require_key(parts: &Parts, expected: Option<&Secret>, variable: &str) -> Result<(), AppError> {
    let expected =
        expected.ok_or_else(|| AppError::NotConfigured(format!("{variable} is not set")))?;
    let header = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match bearer_token(header) {
        Some(token) if key_matches(token, expected) => Ok(()),
        _ => Err(AppError::Unauthorized),
    }
}

/// The host app's server, proven by `MESSAGING_API_KEY`.
pub struct HostApp;

impl FromRequestParts<AppState> for HostApp {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        require_key(
            parts,
            state.config.auth.messaging_api_key.as_ref(),
            "MESSAGING_API_KEY",
        )?;
        Ok(HostApp)
    }
}

/// A scheduler outside the service, proven by `CRON_SECRET`.
pub struct Cron;

impl FromRequestParts<AppState> for Cron {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        require_key(parts, state.config.auth.cron_secret.as_ref(), "CRON_SECRET")?;
        Ok(Cron)
    }
}

/// Where a request came from, for audit records.
pub struct ClientMeta {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

impl FromRequestParts<AppState> for ClientMeta {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        // The proxy appends the address it saw to X-Forwarded-For; earlier entries come from the
        // client and can be forged (also as separate header lines). So with one trusted proxy the
        // last entry of the last line is the client.
        let forwarded = state
            .config
            .server
            .trust_forwarded_for
            .then(|| last_forwarded_hop(&parts.headers))
            .flatten();
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip().to_string());
        let user_agent = parts
            .headers
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(256).collect());
        Ok(ClientMeta {
            ip: forwarded.or(peer),
            user_agent,
        })
    }
}

/// The client address a trusted proxy appended to `X-Forwarded-For`: the last entry over every
/// header line, with any port removed (`1.2.3.4:5678`, `[2001:db8::1]:443`). `None` when it is
/// not an address.
fn last_forwarded_hop(headers: &axum::http::HeaderMap) -> Option<String> {
    let last_line = headers.get_all("x-forwarded-for").iter().next_back()?;
    let entry = last_line.to_str().ok()?.rsplit(',').next()?.trim();
    parse_ip_maybe_with_port(entry).map(|ip| ip.to_string())
}

fn parse_ip_maybe_with_port(entry: &str) -> Option<std::net::IpAddr> {
    if let Ok(ip) = entry.parse::<std::net::IpAddr>() {
        return Some(ip);
    }
    entry.parse::<SocketAddr>().ok().map(|addr| addr.ip())
}

/// A path segment (`/api/messages/{id}`), where one that is not valid UTF-8 answers with the error
/// envelope instead of axum's plain-text 400. A NUL (`%00`) is refused alike: no id holds one, and
/// PostgreSQL refuses it in text (found by review: a 500 there, a 404 on SQLite).
pub struct PathId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(id)) if !id.contains('\0') => Ok(PathId(id)),
            _ => Err(AppError::bad_request(
                "invalid_id",
                "the id in the path is not valid text",
            )),
        }
    }
}

/// `axum::Json`, but a bad body answers with the error envelope, and the body must be a JSON
/// object: serde also fills a struct from an array of its fields in order, which would let
/// `[..., true, false]` stand for a consent change (found by review).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(AppError::bad_request(
                "invalid_content_type",
                "send JSON with Content-Type: application/json",
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| json_error(JsonRejection::from(e)))?;
        if bytes.starts_with(b"\xEF\xBB\xBF") {
            return Err(AppError::bad_request(
                "invalid_json",
                "the body starts with a byte order mark (BOM); send the JSON without one",
            ));
        }
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first.is_some_and(|b| *b != b'{') {
            return Err(AppError::bad_request(
                "invalid_json",
                "expected a JSON object",
            ));
        }
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(json_error(rejection)),
        }
    }
}

/// `application/json`, or any `application/...+json`, as `axum::Json` takes it.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json") || subtype.to_ascii_lowercase().ends_with("+json"))
}

/// A body that could not be read or parsed. The deserializer's message (the field, the line and
/// the column) is what a caller needs; it never names a Rust type, since only an object reaches
/// it (an array would read "expected struct SendOtpRequest").
fn json_error(rejection: JsonRejection) -> AppError {
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => AppError::PayloadTooLarge,
        _ => AppError::bad_request("invalid_json", rejection.body_text()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for line in lines {
            map.append("x-forwarded-for", HeaderValue::from_str(line).unwrap());
        }
        map
    }

    #[test]
    fn the_last_hop_of_the_last_line_is_the_client() {
        // A client's forged first line loses to the proxy's appended one.
        assert_eq!(
            last_forwarded_hop(&headers(&["6.6.6.6", "203.0.113.7"])).as_deref(),
            Some("203.0.113.7")
        );
        assert_eq!(
            last_forwarded_hop(&headers(&["6.6.6.6, 203.0.113.7"])).as_deref(),
            Some("203.0.113.7")
        );
        assert_eq!(
            last_forwarded_hop(&headers(&["203.0.113.7:51234"])).as_deref(),
            Some("203.0.113.7")
        );
        assert_eq!(
            last_forwarded_hop(&headers(&["[2001:db8::1]:443"])).as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(
            last_forwarded_hop(&headers(&["2001:db8::1"])).as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(last_forwarded_hop(&headers(&["unknown"])), None);
        assert_eq!(last_forwarded_hop(&HeaderMap::new()), None);
    }
}
