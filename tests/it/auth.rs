//! Authentication: user JWTs (HS256, ES256 from a JWKS file), the host app's key, and what a
//! bad credential reveals (nothing).

use std::time::Duration;

use crate::common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prism_messaging::config::Secret;
use serde_json::{json, Value};

both_backends!(bad_user_tokens_answer_a_bare_401, host_app_key_is_required);

fn sign_hs256(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn sign_es256(kid: &str, claims: Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_string());
    let key =
        EncodingKey::from_ec_pem(include_bytes!("../fixtures/test_es256_private.pem")).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn sign_rs256(kid: &str, claims: Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_string());
    let key =
        EncodingKey::from_rsa_pem(include_bytes!("../fixtures/test_rs256_private.pem")).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn in_an_hour() -> i64 {
    chrono::Utc::now().timestamp() + 3600
}

async fn get_preferences(app: &TestApp, auth: Option<&str>) -> (u16, Value) {
    let mut req = app.client.get(app.url("/api/messaging/preferences"));
    if let Some(value) = auth {
        req = req.header("authorization", value);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn bad_user_tokens_answer_a_bare_401(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let expired = sign_hs256(
        JWT_SECRET,
        json!({"sub": "u", "exp": chrono::Utc::now().timestamp() - 3600}),
    );
    let wrong_secret = sign_hs256("another-secret", json!({"sub": "u", "exp": in_an_hour()}));
    let no_exp = sign_hs256(JWT_SECRET, json!({"sub": "u"}));
    let no_sub = sign_hs256(JWT_SECRET, json!({"uid": "u", "exp": in_an_hour()}));
    // Not valid for another hour (`nbf`), though signed and unexpired.
    let not_yet = sign_hs256(
        JWT_SECRET,
        json!({"sub": "u", "exp": in_an_hour() + 3600, "nbf": in_an_hour()}),
    );
    // A user id this service could store data for but never export or erase.
    let control = sign_hs256(JWT_SECRET, json!({"sub": "tab\tuser", "exp": in_an_hour()}));
    // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiZXhwIjo0MTAyNDQ0ODAwfQ.";
    let cases = [
        None,
        Some("Bearer".to_string()),
        Some("Basic dTpw".to_string()),
        Some("Bearer not-a-jwt".to_string()),
        Some(format!("Bearer {expired}")),
        Some(format!("Bearer {wrong_secret}")),
        Some(format!("Bearer {no_exp}")),
        Some(format!("Bearer {no_sub}")),
        Some(format!("Bearer {not_yet}")),
        Some(format!("Bearer {none}")),
        Some(format!("Bearer {control}")),
        // An ES256 token when no JWKS is configured.
        Some(format!(
            "Bearer {}",
            sign_es256("test-es256", json!({"sub": "u", "exp": in_an_hour()}))
        )),
    ];
    for auth in cases {
        let (status, body) = get_preferences(&app, auth.as_deref()).await;
        assert_eq!(status, 401, "{auth:?}");
        assert_eq!(
            body,
            json!({"success": false, "error": {"code": "unauthorized", "message": "authentication required"}})
        );
    }
    let good = format!("Bearer {}", app.user_token("u"));
    assert_eq!(get_preferences(&app, Some(&good)).await.0, 200);
}

#[tokio::test]
async fn es256_tokens_verify_against_a_jwks_file_with_issuer_and_audience() {
    let jwks = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/test_jwks.json");
    let issuer = "https://securetoken.google.com/prism-test";
    let config = TestConfig::new()
        .unset("AUTH_JWT_SECRET")
        .set("AUTH_JWKS_FILE", jwks)
        .set("AUTH_ISSUER", issuer)
        .set("AUTH_AUDIENCE", "prism-test")
        .set("AUTH_USER_CLAIM", "user_id");
    let app = TestApp::spawn_with(Backend::Sqlite, config).await;
    let claims = |iss: &str, aud: &str| json!({"user_id": "firebase-uid-1", "sub": "other", "iss": iss, "aud": aud, "exp": in_an_hour()});

    // RS256 (as Firebase signs) from the same key set.
    let rs256 = sign_rs256("test-rs256", claims(issuer, "prism-test"));
    assert_eq!(
        get_preferences(&app, Some(&format!("Bearer {rs256}")))
            .await
            .0,
        200
    );
    let good = sign_es256("test-es256", claims(issuer, "prism-test"));
    let r = app
        .put_preferences_with(
            &good,
            json!({"phone_number": "+14155552671", "sms_consent": true}),
        )
        .await;
    assert_eq!(r, 200);
    // The user id came from AUTH_USER_CLAIM, not `sub`.
    assert!(app
        .state
        .store
        .get_consent("firebase-uid-1")
        .await
        .unwrap()
        .is_some());

    for bad in [
        sign_es256("test-es256", claims("https://evil.example", "prism-test")),
        sign_es256("test-es256", claims(issuer, "another-project")),
        sign_es256("unknown-kid", claims(issuer, "prism-test")),
        sign_es256(
            "test-es256",
            json!({"user_id": "x", "iss": issuer, "exp": in_an_hour()}),
        ),
        // HS256 signed with the public key's text: the algorithm-confusion attack.
        sign_hs256(
            &std::fs::read_to_string(jwks).unwrap(),
            claims(issuer, "prism-test"),
        ),
        // A valid HS256 token: HS256 is not configured here.
        prism_messaging::auth::mint_hs256(
            &Secret::new(JWT_SECRET),
            "u",
            Duration::from_secs(60),
            &[("iss", issuer), ("aud", "prism-test")],
        )
        .unwrap(),
    ] {
        let (status, _) = get_preferences(&app, Some(&format!("Bearer {bad}"))).await;
        assert_eq!(status, 401);
    }
}

#[tokio::test]
async fn user_calls_without_any_auth_configured_say_so() {
    let app =
        TestApp::spawn_with(Backend::Sqlite, TestConfig::new().unset("AUTH_JWT_SECRET")).await;
    let (status, body) = get_preferences(&app, Some("Bearer abc.def.ghi")).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "not_configured");
}

async fn host_app_key_is_required(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let body = reminder("u");
    for auth in [
        None,
        Some("Bearer wrong-key-0123456789abc"),
        Some("test-host-app-key-0123456789"),
    ] {
        let mut req = app.client.post(app.url("/api/notifications")).json(&body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
    }
    // A user's JWT is not the host app's key.
    let r = app
        .client
        .post(app.url("/api/notifications"))
        .bearer_auth(app.user_token("u"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(app.dispatch().await.claimed, 0);
    for path in ["/api/templates", "/api/messages/x"] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
}

#[tokio::test]
async fn host_app_calls_without_a_key_configured_say_so() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        TestConfig::new().unset("MESSAGING_API_KEY"),
    )
    .await;
    let r = app.notify(reminder("u")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(r).await, "not_configured");
}

/// Firebase-style: keys fetched from AUTH_JWKS_URL (here a local server standing in for Google's
/// endpoint).
#[tokio::test]
async fn es256_tokens_verify_against_a_jwks_url() {
    use std::sync::{Arc, Mutex};
    let jwks: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/test_jwks.json")).unwrap();
    let keys: Arc<Mutex<serde_json::Value>> = Arc::new(Mutex::new(jwks));
    let served = keys.clone();
    let jwks_app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let served = served.clone();
            async move { axum::Json(served.lock().unwrap().clone()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, jwks_app).await });

    let issuer = "https://securetoken.google.com/prism-test";
    let config = TestConfig::new()
        .unset("AUTH_JWT_SECRET")
        .set("AUTH_JWKS_URL", &url)
        .set("AUTH_ISSUER", issuer)
        .set("AUTH_AUDIENCE", "prism-test");
    let app = TestApp::spawn_with(Backend::Sqlite, config).await;
    // The keys were fetched at start: the endpoint going away changes nothing.
    *keys.lock().unwrap() = json!({"keys": []});
    let token = sign_es256(
        "test-es256",
        json!({"sub": "firebase-uid-2", "iss": issuer, "aud": "prism-test", "exp": in_an_hour()}),
    );
    let (status, _) = get_preferences(&app, Some(&format!("Bearer {token}"))).await;
    assert_eq!(status, 200);
    let forged = sign_es256(
        "other-kid",
        json!({"sub": "x", "iss": issuer, "aud": "prism-test", "exp": in_an_hour()}),
    );
    assert_eq!(
        get_preferences(&app, Some(&format!("Bearer {forged}")))
            .await
            .0,
        401
    );
}
