//! Operations hardening: where `/dev/*` is served, `/metrics` (cached gauges, `METRICS_TOKEN`),
//! the header read timeout, and the security headers on every kind of answer.

use crate::common::*;
use serde_json::{json, Value};

/// The status and body of each `/dev/*` call.
async fn dev_calls(app: &TestApp) -> Vec<(&'static str, u16, Value)> {
    let mut out = vec![];
    for path in ["/dev/outbox", "/dev/outbox.json"] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        out.push((
            path,
            status,
            serde_json::from_str(&text).unwrap_or(Value::Null),
        ));
    }
    let r = app
        .client
        .post(app.url("/dev/inbound"))
        .json(&json!({"from": "+14155552671", "body": "the pain after my surgery"}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    out.push((
        "/dev/inbound",
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    ));
    out
}

#[tokio::test]
async fn dev_endpoints_are_served_on_loopback_only_unless_asked() {
    // Mock mode on a public address: a message with a body is in the outbox, and none of it shows.
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        TestConfig::new().set("BIND_ADDR", "0.0.0.0:8080"),
    )
    .await;
    app.consent("p1", "+14155552671").await;
    app.notify_ok(reminder("p1")).await;
    app.dispatch().await;
    for (path, status, body) in dev_calls(&app).await {
        assert_eq!(status, 404, "{path}");
        assert_eq!(
            body,
            json!({"success": false, "error": {"code": "not_found", "message": "page not found"}}),
            "{path}"
        );
    }
    let inbound: Value = app.get_json("/api/inbound", Some(API_KEY)).await;
    assert_eq!(
        inbound["messages"],
        json!([]),
        "/dev/inbound recorded nothing"
    );

    // The same address with DEV_ENDPOINTS=true, and the default loopback address: served.
    for config in [
        TestConfig::new()
            .set("BIND_ADDR", "0.0.0.0:8080")
            .set("DEV_ENDPOINTS", "true"),
        TestConfig::new().set("BIND_ADDR", "127.0.0.1:8080"),
    ] {
        let app = TestApp::spawn_with(Backend::Sqlite, config).await;
        for (path, status, _) in dev_calls(&app).await {
            assert_eq!(status, 200, "{path}");
        }
    }
}
