//! Security headers on every answer: answers hold personal data (preferences, message history,
//! the dev outbox's bodies), so none may be cached, sniffed into another type or framed.
//!
//! * every answer: `Cache-Control: no-store` (unless a handler chose otherwise),
//!   `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY`;
//! * JSON and everything else: `Content-Security-Policy: default-src 'none'; frame-ancestors
//!   'none'` (nothing in an answer may load or run anything);
//! * HTML pages: [`PAGE_CSP`]: their own styles, no script of any kind (inline included), forms
//!   posting only here, no framing.

use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderValue, Response};
use axum::Router;
use tower_http::set_header::SetResponseHeaderLayer;

/// The policy of every answer that is not a page.
pub const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// The policy of HTML pages. Inline `<style>` is allowed (the pages carry their CSS inline and
/// their templates escape every value); scripts are not, from anywhere.
pub const PAGE_CSP: &str = "default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self'; \
     form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// `router` with the security headers on each of its answers, error envelopes and fallbacks
/// included.
pub fn secure(router: Router) -> Router {
    router
        .layer(SetResponseHeaderLayer::if_not_present(
            CONTENT_SECURITY_POLICY,
            content_security_policy::<axum::body::Body>,
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
}

fn content_security_policy<B>(response: &Response<B>) -> Option<HeaderValue> {
    let html = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/html"));
    Some(HeaderValue::from_static(if html {
        PAGE_CSP
    } else {
        API_CSP
    }))
}
