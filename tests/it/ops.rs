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

async fn scrape(app: &TestApp, bearer: Option<&str>) -> reqwest::Response {
    let mut request = app.client.get(app.url("/metrics"));
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

fn gauge(text: &str, status: &str) -> Option<i64> {
    sample(text, &format!("prism_messages{{status=\"{status}\"}}"))
}

/// The value of the sample `name` (with its labels, as written) in an exposition `text`.
fn sample(text: &str, name: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

async fn metrics_gauges_are_cached_and_shared(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.consent("p1", "+14155552671").await;
    app.notify_ok(reminder("p1")).await;
    app.dispatch().await;
    // Parallel scrapes all answer, with the same count.
    let mut scrapes = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, url) = (app.client.clone(), app.url("/metrics"));
        scrapes.spawn(async move {
            let r = client.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        });
    }
    let texts = scrapes.join_all().await;
    for text in &texts {
        assert_eq!(gauge(text, "delivered"), Some(1), "{text}");
        assert!(text.contains("prism_database_up 1"), "{text}");
    }
    // A message queued now does not show until the count is taken again (15 s later): a scrape
    // does not count the table each time.
    app.notify_ok(reminder("p1")).await;
    let text = scrape(&app, None).await.text().await.unwrap();
    assert_eq!(gauge(&text, "queued"), None, "{text}");
    assert_eq!(gauge(&text, "delivered"), Some(1), "{text}");
}

both_backends!(metrics_gauges_are_cached_and_shared);

/// A queued message that cannot be opened (sealed with a key this instance does not have) is
/// counted in /metrics each time a claim finds it and leaves it out; the message behind it goes.
async fn metrics_count_messages_that_cannot_be_opened(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.consent("p1", "+14155552671").await;
    let unreadable = app.notify_ok(reminder("p1")).await;
    let readable = app.notify_ok(reminder("p1")).await;
    app.db
        .execute(&format!(
            "UPDATE messages SET variables = 'enc1:retired:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA' \
             WHERE id = '{unreadable}'"
        ))
        .await
        .unwrap();
    let unreadable_total = "prism_claims_unreadable_total";
    let text = scrape(&app, None).await.text().await.unwrap();
    assert_eq!(sample(&text, unreadable_total), Some(0), "{text}");
    app.dispatch().await;
    let text = scrape(&app, None).await.text().await.unwrap();
    assert_eq!(sample(&text, unreadable_total), Some(1), "{text}");
    let mut statuses = app.db.text_pairs("SELECT id, status FROM messages").await;
    statuses.sort();
    let mut expected = vec![
        (readable, "delivered".into()),
        (unreadable, "queued".into()),
    ];
    expected.sort();
    assert_eq!(statuses, expected);
}

both_backends!(metrics_count_messages_that_cannot_be_opened);

#[tokio::test]
async fn metrics_token_protects_metrics() {
    let token = "metrics-token-0123456789";
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        TestConfig::new().set("METRICS_TOKEN", token),
    )
    .await;
    for bearer in [None, Some("wrong-metrics-token-0123"), Some(API_KEY)] {
        let r = scrape(&app, bearer).await;
        assert_eq!(r.status(), 401, "{bearer:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body,
            json!({"success": false, "error": {"code": "unauthorized", "message": "authentication required"}})
        );
    }
    let r = app
        .client
        .get(app.url("/metrics"))
        .header("authorization", format!("Basic {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "only as a bearer token");
    let r = scrape(&app, Some(token)).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("prism_info{"));
    // The other operations routes stay open for probes.
    for path in ["/healthz", "/readyz"] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn a_half_sent_request_is_closed_after_the_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        TestConfig::new().set("HEADER_READ_TIMEOUT_SECONDS", "1"),
    )
    .await;
    let addr = app.base_url.trim_start_matches("http://").to_string();
    // Whole requests are served as before, with the peer's address known to handlers.
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    for partial in [
        "",
        "GET /healthz HTT",
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nUser-Agent: slow",
    ] {
        let started = std::time::Instant::now();
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream.write_all(partial.as_bytes()).await.unwrap();
        // The bound only turns a connection left open into a failure; the server's timeout is
        // 1 s.
        let mut answer = Vec::new();
        let closed = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            stream.read_to_end(&mut answer),
        )
        .await;
        assert!(
            closed.is_ok(),
            "{partial:?}: the server still holds the connection open"
        );
        assert!(
            started.elapsed() >= std::time::Duration::from_secs(1),
            "{partial:?}: closed by the timeout, not at once"
        );
        let answer = String::from_utf8_lossy(&answer);
        assert!(!answer.contains(" 200 "), "{partial:?}: {answer}");
    }
}

/// A body that stalls or drips is answered 408 once `HEADER_READ_TIMEOUT_SECONDS` has passed, and
/// a declared length over 64 KiB answers 413 at once, without waiting for a body that may never
/// come; a chunked body that grows past 64 KiB answers 413 too. None reaches a handler, and
/// `verify-otp`'s answers still carry `"valid": false`, which the mobile client reads.
#[tokio::test]
async fn a_stalled_body_is_answered_and_an_oversized_one_refused_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        TestConfig::new().set("HEADER_READ_TIMEOUT_SECONDS", "1"),
    )
    .await;
    let addr = app.base_url.trim_start_matches("http://").to_string();
    for call in ["send-otp", "verify-otp"] {
        let head = |length: usize| {
            format!(
                "POST /api/messaging/{call} HTTP/1.1\r\nHost: localhost\r\n\
                 Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{\"user"
            )
        };
        let chunked = format!(
            "POST /api/messaging/{call} HTTP/1.1\r\nHost: localhost\r\n\
             Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{}\r\n",
            70_000,
            "1".repeat(70_000)
        );
        for (request, status, code) in [
            (head(100), "408", "request_timeout"),
            (head(100_000_000), "413", "payload_too_large"),
            (chunked, "413", "payload_too_large"),
        ] {
            let started = std::time::Instant::now();
            let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = vec![0u8; 4096];
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(30), stream.read(&mut answer))
                    .await;
            let n = read
                .expect("the server still holds the connection open")
                .unwrap();
            let answer = String::from_utf8_lossy(&answer[..n]);
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status}")),
                "{call}: {answer}"
            );
            assert!(answer.contains(code), "{call}: {answer}");
            assert_eq!(
                answer.contains(r#""valid":false"#),
                call == "verify-otp",
                "{call}: {answer}"
            );
            // The stalled body waited out the timeout (1 s); the oversized ones did not wait.
            let waited = started.elapsed() >= std::time::Duration::from_secs(1);
            assert_eq!(
                waited,
                status == "408",
                "{call}: {status} after {:?}",
                started.elapsed()
            );
        }
    }
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_and_takes_no_new_ones() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn(Backend::Sqlite).await;
    let addr = app.base_url.trim_start_matches("http://").to_string();
    let body = serde_json::to_string(&reminder("p1")).unwrap();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/notifications HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // "100 Continue" comes when the handler starts reading the body: the request is in flight.
    let mut buf = [0u8; 256];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100"));

    app.shut_down();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("the answer, then the connection closes")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");

    // The listener is closed: new connections are refused (once the accept loop has seen the
    // cancellation; bounded, not timed).
    let mut refused = false;
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(&addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(refused, "still accepting after shutdown");
}

/// The security headers every answer carries; the content security policy is returned.
fn assert_secured(what: &str, r: &reqwest::Response) -> String {
    let header = |name: &str| {
        r.headers()
            .get(name)
            .unwrap_or_else(|| panic!("{what}: no {name}"))
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(header("cache-control"), "no-store", "{what}");
    assert_eq!(header("x-content-type-options"), "nosniff", "{what}");
    assert_eq!(header("x-frame-options"), "DENY", "{what}");
    let csp = header("content-security-policy");
    assert!(csp.contains("frame-ancestors 'none'"), "{what}: {csp}");
    csp
}

const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.consent("p1", "+14155552671").await;

    // JSON with personal data.
    let token = app.user_token("p1");
    for path in ["/api/messaging/preferences", "/api/messaging/history"] {
        let r = app
            .client
            .get(app.url(path))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(assert_secured(path, &r), API_CSP);
    }
    let r = app
        .client
        .get(app.url("/dev/outbox.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(assert_secured("/dev/outbox.json", &r), API_CSP);

    // Error envelopes: from a handler, an unknown route, a wrong method, a refused /dev path.
    let not_dev = TestApp::spawn_with(
        Backend::Sqlite,
        TestConfig::new().set("BIND_ADDR", "0.0.0.0:8080"),
    )
    .await;
    for (what, r, status) in [
        (
            "401",
            app.client
                .get(app.url("/api/messaging/preferences"))
                .send()
                .await
                .unwrap(),
            401,
        ),
        (
            "404",
            app.client.get(app.url("/no/such")).send().await.unwrap(),
            404,
        ),
        (
            "405",
            app.client
                .delete(app.url("/api/notifications"))
                .send()
                .await
                .unwrap(),
            405,
        ),
        (
            "dev 404",
            not_dev
                .client
                .get(not_dev.url("/dev/outbox"))
                .send()
                .await
                .unwrap(),
            404,
        ),
    ] {
        assert_eq!(r.status(), status, "{what}");
        assert_eq!(assert_secured(what, &r), API_CSP, "{what}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["success"], false, "{what}");
    }

    // Other answers: metrics text, the OpenAPI document, liveness, TwiML.
    for path in ["/metrics", "/openapi.json", "/healthz"] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(assert_secured(path, &r), API_CSP, "{path}");
    }
    let r = app
        .client
        .post(app.url("/dev/inbound"))
        .json(&json!({"from": "+14155552671", "body": "HELP"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/xml"));
    assert_eq!(assert_secured("TwiML", &r), API_CSP);

    // The HTML page: no script at all, styles only its own, no framing.
    let r = app.client.get(app.url("/dev/outbox")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = assert_secured("/dev/outbox", &r);
    let directives: Vec<&str> = csp.split(';').map(str::trim).collect();
    assert!(directives.contains(&"default-src 'none'"), "{csp}");
    assert!(
        !directives.iter().any(|d| d.starts_with("script-src")),
        "scripts fall back to default-src 'none': {csp}"
    );
    assert!(!csp.contains("unsafe-eval"), "{csp}");
    for d in &directives {
        if d.contains("'unsafe-inline'") {
            assert!(
                d.starts_with("style-src "),
                "inline allowed for styles only: {csp}"
            );
        }
    }
    let page = r.text().await.unwrap();
    assert!(page.contains("Dev outbox"));
    assert!(!page.to_ascii_lowercase().contains("<script"), "{page}");
}

/// `/dev/inbound` takes a WhatsApp sender as Twilio writes it (`whatsapp:+...`): a STOP from it
/// opts the number out of WhatsApp, not SMS. With `channel: "sms"` it contradicts itself: 400
/// `invalid_channel`, and nothing is recorded.
#[tokio::test]
async fn dev_inbound_takes_a_whatsapp_address() {
    let app = TestApp::spawn_with(Backend::Sqlite, TestConfig::new()).await;
    let inbound = |body: Value| app.client.post(app.url("/dev/inbound")).json(&body).send();
    let r = inbound(json!({"from": "whatsapp:+14155552671", "body": "STOP", "channel": "sms"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_channel", "{body}");
    let recorded: Value = app.get_json("/api/inbound", Some(API_KEY)).await;
    assert_eq!(recorded["messages"], json!([]), "{recorded}");

    // A bad number is refused naming the field the caller wrote.
    let r = inbound(json!({"from": "whatsapp:+1415", "body": "STOP"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_phone", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("from "),
        "{body}"
    );

    // The prefix in any case: Twilio writes `whatsapp:`, a person may write `WhatsApp:`.
    let r = inbound(json!({"from": "WhatsApp:+14155552671", "body": "STOP"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .put_preferences(
            "p1",
            json!({"phone_number": "+14155552671", "sms_consent": true, "whatsapp_consent": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let preferences = app
        .get_json("/api/messaging/preferences", Some(&app.user_token("p1")))
        .await["preferences"]
        .clone();
    assert_eq!(preferences["whatsapp_opted_out"], true, "{preferences}");
    assert_eq!(preferences["sms_opted_out"], false, "{preferences}");
}

/// A database dropped under the running service (PostgreSQL: its sessions ended, new ones
/// refused) is the database out of reach, not a fault of the service: reads and writes answer
/// 503 `unavailable`, which a caller retries, as `/readyz` does; the cause is logged, not
/// returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_out_of_reach_answers_503_not_500() {
    if postgres_admin_url().is_none() {
        eprintln!("TEST_DATABASE_URL is not set: skipping");
        return;
    }
    let app = TestApp::spawn(Backend::Postgres).await;
    let preferences = json!({"phone_number": "+14155552671", "sms_consent": true});
    assert_eq!(
        app.put_preferences("p1", preferences.clone())
            .await
            .status(),
        200
    );
    app.db.drop_postgres_database().await;
    for _ in 0..2 {
        let r = app.put_preferences("p1", preferences.clone()).await;
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["success"], false);
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
        assert!(!body.to_string().contains("prism_test"), "no cause: {body}");
        let r = app
            .client
            .get(app.url("/api/messaging/preferences"))
            .bearer_auth(app.user_token("p1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        // verify-otp's refusal says `"valid": false` here too.
        let r = app
            .client
            .post(app.url("/api/messaging/verify-otp"))
            .json(&json!({"user_id": "p1", "otp_code": "123456"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["valid"], false, "{body}");
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
    }
    let r = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
}
