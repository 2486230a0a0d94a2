//! One-time passcodes over HTTP on both backends: every rule has a test that fails without it.

use crate::common::fake_twilio::Failure;
use crate::common::*;
use chrono::{DateTime, Duration, SubsecRound, Utc};
use prism_messaging::clock::{Clock, ManualClock};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

both_backends!(
    send_and_verify_once,
    a_purpose_left_out_is_verification_on_both_calls,
    no_clear_code_in_the_database,
    codes_expire,
    a_new_send_replaces_the_old_code,
    wrong_tries_kill_the_code,
    resend_cooldown_per_number,
    hourly_limit_per_number,
    hourly_limit_per_user,
    hourly_limit_per_ip,
    country_guard,
    opted_out_numbers_are_not_sent_to,
    concurrent_verifies_succeed_once,
    cleanup_needs_the_cron_secret_and_deletes,
    bad_input_is_refused_and_reveals_nothing,
    live_mode_sends_through_twilio,
    a_live_code_for_someone_elses_account_goes_to_their_number,
    otp_length_is_configurable,
    a_closed_whatsapp_window_refuses_on_the_number_named_and_writes_nothing,
    a_number_on_file_outside_the_allowed_countries_gets_nothing,
    simultaneous_window_refusals_hold_the_limits,
    a_window_closing_during_a_request_goes_by_the_route_it_was_checked_against,
    codes_to_one_number_share_its_limits_whichever_way_they_are_asked_for,
    simultaneous_codes_to_one_number_hold_its_limits,
    simultaneous_codes_naming_a_number_and_going_to_it_share_its_hour,
    simultaneous_codes_to_numbers_on_file_and_to_numbers_named_each_go_where_they_should,
    erasing_an_account_does_not_reset_the_limits,
    a_refused_request_asked_again_is_refused_from_memory_until_its_wait_is_over,
    a_number_whose_hour_is_full_is_refused_from_memory_for_every_caller,
);

const PHONE: &str = "+919876543210";

fn clocked() -> (TestConfig, ManualClock) {
    let clock = ManualClock::new(Utc::now());
    let config = TestConfig::new().with_clock(&clock);
    (config, clock)
}

async fn send(app: &TestApp, user: &str, phone: &str, purpose: &str) -> reqwest::Response {
    app.client
        .post(app.url("/api/messaging/send-otp"))
        .json(&json!({"user_id": user, "phone_number": phone, "purpose": purpose}))
        .send()
        .await
        .unwrap()
}

async fn send_ok(app: &TestApp, user: &str, phone: &str, purpose: &str) -> String {
    let r = send(app, user, phone, purpose).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    latest_code(app, phone).await
}

async fn verify(app: &TestApp, user: &str, purpose: &str, code: &str) -> (u16, Value) {
    let r = app
        .client
        .post(app.url("/api/messaging/verify-otp"))
        .json(&json!({"user_id": user, "otp_code": code, "purpose": purpose}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// The code in the newest dev-outbox message to `phone`.
async fn latest_code(app: &TestApp, phone: &str) -> String {
    let outbox: Value = app.outbox_json().await;
    let body = outbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["to"] == phone)
        .expect("a message to the number")["body"]
        .as_str()
        .unwrap()
        .to_string();
    body.split(|c: char| !c.is_ascii_digit())
        .find(|w| w.len() == 6)
        .expect("a 6-digit code")
        .to_string()
}

async fn outbox_len(app: &TestApp) -> usize {
    let outbox: Value = app.outbox_json().await;
    outbox["messages"].as_array().unwrap().len()
}

fn wrong(code: &str) -> String {
    code.chars()
        .map(|c| {
            if c == '9' {
                '0'
            } else {
                char::from(c as u8 + 1)
            }
        })
        .collect()
}

/// `purpose` defaults to `verification` on `send-otp` and on `verify-otp` (the contract, and
/// the guide's server): a code asked for without one is verified without one, and a code for
/// another purpose is not.
async fn a_purpose_left_out_is_verification_on_both_calls(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let call = |path: &'static str, body: Value| {
        let request = app.client.post(app.url(path)).json(&body);
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, _) = call(
        "/api/messaging/send-otp",
        json!({"user_id": "u1", "phone_number": PHONE}),
    )
    .await;
    assert_eq!(status, 200);
    let code = latest_code(&app, PHONE).await;
    let login = send_ok(&app, "u2", "+919876543219", "login").await;
    let (status, body) = call(
        "/api/messaging/verify-otp",
        json!({"user_id": "u2", "otp_code": login}),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_otp"))
    );
    let (status, body) = call(
        "/api/messaging/verify-otp",
        json!({"user_id": "u1", "otp_code": code}),
    )
    .await;
    assert_eq!(
        (status, body),
        (
            200,
            json!({"success": true, "valid": true, "phone_number": PHONE})
        )
    );
    assert_eq!(verify(&app, "u2", "login", &login).await.0, 200);
}

async fn send_and_verify_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let r = send(&app, "u1", PHONE, "verification").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"success": true, "expires_in": 600, "mock": true, "sent_to": "+91******3210"})
    );
    let code = latest_code(&app, PHONE).await;
    let (status, body) = verify(&app, "u1", "verification", &code).await;
    assert_eq!(
        (status, body),
        (
            200,
            json!({"success": true, "valid": true, "phone_number": PHONE})
        )
    );
    // Single use.
    let (status, body) = verify(&app, "u1", "verification", &code).await;
    assert_eq!(status, 400);
    assert_eq!(body["valid"], false);
    assert_eq!(body["error"]["code"], "invalid_otp");
    // Scoped by purpose and user.
    let code = send_ok(&app, "u1", "+919876543219", "login").await;
    assert_eq!(verify(&app, "u1", "verification", &code).await.0, 400);
    assert_eq!(verify(&app, "u2", "login", &code).await.0, 400);
    assert_eq!(verify(&app, "u1", "login", &code).await.0, 200);
    // The OTP message is in the log, with no consent needed.
    let history = app.state.store.user_messages("u1", 10).await.unwrap();
    assert_eq!(history.len(), 2);
    assert!(history
        .iter()
        .all(|m| m.template_name == "otp" && m.status == "delivered"));
    // The mock accepts a code in process: the send is recorded with the code (one write), with
    // the SID it gave, and each message it shows in its outbox is one stored as delivered.
    let outbox: Value = app.outbox_json().await;
    let mut shown: Vec<&str> = outbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let mut stored: Vec<&str> = history.iter().map(|m| m.id.as_str()).collect();
    shown.sort_unstable();
    stored.sort_unstable();
    assert_eq!(shown, stored);
    assert!(history.iter().all(|m| m
        .provider_sid
        .as_deref()
        .is_some_and(|sid| sid.starts_with("SM"))));
    for m in &history {
        let events = event_statuses(&app.state.store, &m.id).await;
        assert_eq!(events, ["sending", "sent", "delivered"]);
    }
}

async fn no_clear_code_in_the_database(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let code = send_ok(&app, "u1", PHONE, "verification").await;
    let mut rows = app
        .db
        .text_pairs("SELECT code_hash, phone_number FROM otp_codes")
        .await;
    rows.extend(
        app.db
            .text_pairs("SELECT variables, template_name FROM messages")
            .await,
    );
    assert_eq!(rows.len(), 2);
    let (hash, _) = &rows[0];
    assert_eq!(hash.len(), 64, "an HMAC-SHA256, hex");
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        (test_vault().open(&rows[1].0).unwrap(), rows[1].1.clone()),
        ("{}".to_string(), "otp".to_string()),
        "the message keeps no variables"
    );
    assert!(rows[1].0.starts_with("enc1:"), "variables are sealed");
    assert!(rows[0].1.starts_with("enc1:"), "the number is sealed");
    for (a, b) in &rows {
        assert!(
            !a.contains(&code) && !b.contains(&code),
            "the code {code} is stored in clear"
        );
    }
}

async fn codes_expire(backend: Backend) {
    let (config, clock) = clocked();
    let app = TestApp::spawn_with(backend, config).await;
    let code = send_ok(&app, "u1", PHONE, "verification").await;
    clock.advance(Duration::seconds(599));
    let fresh = send_ok(&app, "u2", "+919876543211", "verification").await;
    assert_eq!(
        verify(&app, "u2", "verification", &fresh).await.0,
        200,
        "inside the TTL"
    );
    clock.advance(Duration::seconds(2));
    let (status, body) = verify(&app, "u1", "verification", &code).await;
    assert_eq!(status, 400, "601 s after sending");
    assert_eq!(body["error"]["code"], "invalid_otp");
}

async fn a_new_send_replaces_the_old_code(backend: Backend) {
    let (config, clock) = clocked();
    let app = TestApp::spawn_with(backend, config).await;
    let first = send_ok(&app, "u1", PHONE, "verification").await;
    clock.advance(Duration::seconds(31));
    let mut second = send_ok(&app, "u1", PHONE, "verification").await;
    while second == first {
        clock.advance(Duration::seconds(31));
        second = send_ok(&app, "u1", PHONE, "verification").await;
    }
    assert_eq!(verify(&app, "u1", "verification", &first).await.0, 400);
    assert_eq!(verify(&app, "u1", "verification", &second).await.0, 200);
}

async fn wrong_tries_kill_the_code(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let code = send_ok(&app, "u1", PHONE, "verification").await;
    for _ in 0..5 {
        let (status, body) = verify(&app, "u1", "verification", &wrong(&code)).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_otp"))
        );
    }
    let (status, body) = verify(&app, "u1", "verification", &code).await;
    assert_eq!(status, 429, "the right code after 5 wrong tries");
    assert_eq!(body["error"]["code"], "too_many_attempts");
    assert_eq!(body["valid"], false);
}

async fn resend_cooldown_per_number(backend: Backend) {
    let (config, clock) = clocked();
    let app = TestApp::spawn_with(backend, config).await;
    send_ok(&app, "u1", PHONE, "verification").await;
    clock.advance(Duration::seconds(10));
    // Another user, same number: the cooldown is the number's.
    let r = send(&app, "u2", PHONE, "login").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "20");
    assert_eq!(error_code(r).await, "rate_limited");
    assert_eq!(outbox_len(&app).await, 1, "nothing sent");
    assert!(
        app.state
            .store
            .get_otp("u2", "login")
            .await
            .unwrap()
            .is_none(),
        "nothing written"
    );
    clock.advance(Duration::seconds(21));
    send_ok(&app, "u2", PHONE, "login").await;
}

fn limits(max: &str) -> (TestConfig, ManualClock) {
    let (config, clock) = clocked();
    (
        config
            .set("OTP_RESEND_COOLDOWN_SECONDS", "0")
            .set("OTP_MAX_SENDS_PER_HOUR", max),
        clock,
    )
}

async fn hourly_limit_per_number(backend: Backend) {
    let (config, clock) = limits("3");
    let app = TestApp::spawn_with(backend, config.set("TRUST_FORWARDED_FOR", "true")).await;
    for i in 0..3 {
        let r = app
            .client
            .post(app.url("/api/messaging/send-otp"))
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .json(&json!({"user_id": format!("u{i}"), "phone_number": PHONE, "purpose": "login"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        clock.advance(Duration::minutes(10));
    }
    let r = app
        .client
        .post(app.url("/api/messaging/send-otp"))
        .header("x-forwarded-for", "198.51.100.77")
        .json(&json!({"user_id": "u9", "phone_number": PHONE, "purpose": "login"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    // The first send (30 minutes ago) leaves the window in 30 minutes.
    assert_eq!(r.headers()["retry-after"], "1800");
    clock.advance(Duration::minutes(31));
    let r = app
        .client
        .post(app.url("/api/messaging/send-otp"))
        .header("x-forwarded-for", "198.51.100.78")
        .json(&json!({"user_id": "u10", "phone_number": PHONE, "purpose": "login"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

async fn hourly_limit_per_user(backend: Backend) {
    let (config, _clock) = limits("2");
    let app = TestApp::spawn_with(backend, config.set("TRUST_FORWARDED_FOR", "true")).await;
    for (i, phone) in ["+919876543201", "+919876543202", "+919876543203"]
        .iter()
        .enumerate()
    {
        let r = app
            .client
            .post(app.url("/api/messaging/send-otp"))
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .json(&json!({"user_id": "same-user", "phone_number": phone, "purpose": "login"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), if i < 2 { 200 } else { 429 }, "send {i}");
    }
}

async fn hourly_limit_per_ip(backend: Backend) {
    // The per-address limit has its own variable (default 30), apart from the per-number one.
    let (config, _clock) = limits("5");
    let app = TestApp::spawn_with(backend, config.set("OTP_MAX_SENDS_PER_IP_PER_HOUR", "2")).await;
    // All from 127.0.0.1: different users and numbers.
    assert_eq!(
        send(&app, "a", "+919876543201", "login").await.status(),
        200
    );
    assert_eq!(
        send(&app, "b", "+919876543202", "login").await.status(),
        200
    );
    let r = send(&app, "c", "+919876543203", "login").await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(outbox_len(&app).await, 2);
}

async fn country_guard(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        TestConfig::new().set("OTP_ALLOWED_COUNTRIES", "IN, GB"),
    )
    .await;
    let r = send(&app, "u1", "+14155552671", "login").await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "country_not_allowed");
    assert_eq!(outbox_len(&app).await, 0);
    send_ok(&app, "u1", PHONE, "login").await;
}

async fn opted_out_numbers_are_not_sent_to(backend: Backend) {
    let (config, clock) = clocked();
    let app = TestApp::spawn_with(
        backend,
        config.set("TWILIO_PHONE_NUMBER", SMS_SENDER).set(
            "TWILIO_CONTENT_SIDS",
            "otp=HX0123456789abcdef0123456789abcdef",
        ),
    )
    .await;
    let sql = format!(
        "INSERT INTO opt_outs (phone_index, channel, source, created_at) VALUES ('{}', 'sms', \
         'sms_keyword', '2027-01-01T00:00:00Z')",
        test_vault().blind("+919876543210")
    );
    app.db.execute(&sql).await.unwrap();
    let r = send(&app, "u1", PHONE, "login").await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "opted_out");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("START") && message.contains(SMS_SENDER),
        "{message}"
    );
    assert_eq!(outbox_len(&app).await, 0);
    // Refusals count against the limits: opt-outs cannot be probed without limit.
    assert_eq!(send(&app, "u9", PHONE, "login").await.status(), 429);
    clock.advance(Duration::seconds(31));
    // The opt-out is per channel: WhatsApp still works.
    let r = app
        .client
        .post(app.url("/api/messaging/send-otp"))
        .json(&json!({"user_id": "u1", "phone_number": PHONE, "purpose": "login", "channel": "whatsapp"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

async fn concurrent_verifies_succeed_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for round in 0..5 {
        let user = format!("u{round}");
        let code = send_ok(&app, &user, &format!("+91987654321{round}"), "login").await;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let client = app.client.clone();
            let url = app.url("/api/messaging/verify-otp");
            let body = json!({"user_id": user, "otp_code": code, "purpose": "login"});
            tasks.spawn(async move {
                client
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            });
        }
        let mut statuses = vec![];
        while let Some(s) = tasks.join_next().await {
            statuses.push(s.unwrap());
        }
        statuses.sort();
        assert_eq!(statuses, [200, 400, 400, 400], "round {round}");
    }
}

async fn cleanup_needs_the_cron_secret_and_deletes(backend: Backend) {
    let (config, clock) = clocked();
    let app = TestApp::spawn_with(backend, config).await;
    let used = send_ok(&app, "used", "+919876543201", "login").await;
    verify(&app, "used", "login", &used).await;
    send_ok(&app, "expired", "+919876543202", "login").await;
    clock.advance(Duration::seconds(700));
    send_ok(&app, "live", "+919876543203", "login").await;
    let url = app.url("/cron/cleanup-expired-otps");
    assert_eq!(app.client.post(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        app.client
            .post(&url)
            .bearer_auth("wrong-secret")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        app.client
            .post(&url)
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert!(
        app.state
            .store
            .get_otp("expired", "login")
            .await
            .unwrap()
            .is_some(),
        "refused calls delete nothing"
    );
    let r = app
        .client
        .post(&url)
        .bearer_auth(CRON_SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["success"], true);
    assert_eq!(
        (
            body["used_deleted"].as_u64(),
            body["expired_deleted"].as_u64()
        ),
        (Some(1), Some(1))
    );
    // Every count the command line prints, the call answers too.
    assert_eq!(body["failures_pruned"].as_u64(), Some(0), "{body}");
    assert!(body["send_log_pruned"].is_u64(), "{body}");
    assert!(app
        .state
        .store
        .get_otp("live", "login")
        .await
        .unwrap()
        .is_some());
    assert!(app
        .state
        .store
        .get_otp("expired", "login")
        .await
        .unwrap()
        .is_none());
    // The same job as a function, as the scheduler calls it: nothing left to do.
    let report = app.state.otp.cleanup().await.unwrap();
    assert_eq!((report.used_deleted, report.expired_deleted), (0, 0));
}

async fn bad_input_is_refused_and_reveals_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for (body, code) in [
        (
            json!({"user_id": "u", "phone_number": PHONE, "purpose": "Log In"}),
            "invalid_purpose",
        ),
        (
            json!({"user_id": "u", "phone_number": "12345", "purpose": "login"}),
            "invalid_phone",
        ),
        (
            json!({"user_id": "u", "phone_number": PHONE, "purpose": "login", "channel": "pigeon"}),
            "invalid_channel",
        ),
        (
            json!({"user_id": "", "phone_number": PHONE, "purpose": "login"}),
            "invalid_user_id",
        ),
        (
            json!({"phone_number": PHONE, "purpose": "login"}),
            "invalid_json",
        ),
    ] {
        let r = app
            .client
            .post(app.url("/api/messaging/send-otp"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(error_code(r).await, code, "{body}");
    }
    // An array where an object belongs, even one of the right length with the fields in order
    // (serde alone fills a struct from one: the code went out): the message says so, without the
    // handler's type name.
    for body in [
        json!(["u", PHONE, "login"]),
        json!(["u", PHONE, "login", "sms"]),
        json!([1]),
        json!([]),
    ] {
        let r = app
            .client
            .post(app.url("/api/messaging/send-otp"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let answer: Value = r.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "invalid_json", "{answer}");
        assert_eq!(
            answer["error"]["message"], "expected a JSON object",
            "{answer}"
        );
    }
    let r = app
        .put_preferences("u", json!([PHONE, true, false, false, null, "api"]))
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "invalid_json");
    assert_eq!(outbox_len(&app).await, 0);
    assert_eq!(
        app.state.store.get_consent("u").await.unwrap(),
        None,
        "nothing written"
    );
    // An unknown user and a wrong code for a known one answer identically.
    send_ok(&app, "known", PHONE, "login").await;
    let unknown = verify(&app, "nobody", "login", "123456").await;
    let known = verify(&app, "known", "login", "000000").await;
    assert_eq!(unknown, known);
}

async fn live_mode_sends_through_twilio(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    let r = send(&app, "u1", "+14155552671", "login").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["mock"], false);
    let fake = app.fake.as_ref().unwrap();
    let req = &fake.requests()[0];
    assert_eq!(req.field("To"), Some("+14155552671"));
    let body = req.field("Body").unwrap();
    let code: String = body
        .split(|c: char| !c.is_ascii_digit())
        .find(|w| w.len() == 6)
        .unwrap()
        .into();
    assert_eq!(verify(&app, "u1", "login", &code).await.0, 200);
    // Twilio refusing the number is the caller's problem, said plainly.
    fake.fail(
        "+14155552672",
        vec![Failure {
            http_status: 400,
            code: 21211,
            retry_after: None,
        }],
    );
    let r = send(&app, "u2", "+14155552672", "login").await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "invalid_phone");
    // Twilio down: 503. Twilio may have created it anyway, and a code is never kept, so it cannot
    // be looked up: the message ends `unknown` (never resent), the patient is told to try again.
    fake.fail(
        "+14155552673",
        vec![Failure {
            http_status: 503,
            code: 20500,
            retry_after: None,
        }],
    );
    let r = send(&app, "u3", "+14155552673", "login").await;
    assert_eq!(r.status(), 503);
    let m = &app.state.store.user_messages("u3", 1).await.unwrap()[0];
    assert_eq!((m.status.as_str(), m.error_code), ("unknown", Some(20500)));
    // Refused for good: the patient is told, not asked to retry. Rate-limited: try again later.
    fake.fail(
        "+14155552674",
        vec![Failure {
            http_status: 400,
            code: 21612,
            retry_after: None,
        }],
    );
    let r = send(&app, "u4", "+14155552674", "login").await;
    assert_eq!(
        (r.status().as_u16(), error_code(r).await.as_str()),
        (400, "undeliverable")
    );
    fake.fail(
        "+14155552675",
        vec![Failure {
            http_status: 429,
            code: 20429,
            retry_after: Some(1),
        }],
    );
    let r = send(&app, "u5", "+14155552675", "login").await;
    assert_eq!(
        (r.status().as_u16(), error_code(r).await.as_str()),
        (503, "unavailable")
    );
    // A code cannot wait in the queue: failed, with Twilio's code kept.
    let m = &app.state.store.user_messages("u5", 1).await.unwrap()[0];
    assert_eq!((m.status.as_str(), m.error_code), ("failed", Some(20429)));
}

/// Through Twilio (a provider outside this process): a code asked for someone else's account,
/// naming another number, is sent to the number on file (on PostgreSQL the batch that writes the
/// code routes it there), answers as any send does, and verifies only with that number.
async fn a_live_code_for_someone_elses_account_goes_to_their_number(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    app.consent("victim", "+14155552673").await;
    let r = send(&app, "victim", "+14155552674", "login").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["sent_to"], "+14*****2674");
    let fake = app.fake.as_ref().unwrap();
    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].field("To"), Some("+14155552673"));
    let code: String = requests[0]
        .field("Body")
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .find(|w| w.len() == 6)
        .unwrap()
        .into();
    let (status, body) = verify(&app, "victim", "login", &code).await;
    assert_eq!(
        (status, &body["phone_number"]),
        (200, &json!("+14155552673"))
    );
}

async fn otp_length_is_configurable(backend: Backend) {
    let app = TestApp::spawn_with(backend, TestConfig::new().set("OTP_LENGTH", "8")).await;
    assert_eq!(send(&app, "u1", PHONE, "login").await.status(), 200);
    let outbox: Value = app.outbox_json().await;
    let body = outbox["messages"][0]["body"].as_str().unwrap().to_string();
    let code: String = body
        .split(|c: char| !c.is_ascii_digit())
        .find(|w| !w.is_empty())
        .unwrap()
        .into();
    assert_eq!(code.len(), 8, "{body}");
    assert_eq!(verify(&app, "u1", "login", &code).await.0, 200);
}

/// A caller that hangs up while Twilio answers does not leave its code's message `sending`: the
/// send and its record run to the end without the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_whose_caller_hangs_up_is_still_recorded_as_sent() {
    use crate::common::fake_twilio::Fault;
    let app = TestApp::spawn_live(Backend::Sqlite, TestConfig::new()).await;
    let fake = app.fake.as_ref().unwrap().clone();
    fake.script(
        PHONE,
        vec![Fault::Slow(std::time::Duration::from_millis(1500))],
    );
    let hung_up = app
        .client
        .post(app.url("/api/messaging/send-otp"))
        .timeout(std::time::Duration::from_millis(300))
        .json(&json!({"user_id": "u1", "phone_number": PHONE, "purpose": "login"}))
        .send()
        .await;
    assert!(hung_up.is_err(), "the client gave up first");
    let store = app.state.store.clone();
    let mut status = String::new();
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let messages = store.user_messages("u1", 10).await.unwrap();
        if let Some(m) = messages.first() {
            status = m.status.as_str().to_string();
            if m.provider_sid.is_some() {
                break;
            }
        }
    }
    assert_eq!(
        status, "sent",
        "the code's message after its caller hung up"
    );
    assert_eq!(fake.create_calls_to(PHONE), 1);
}

/// A code through the mock is one write (accepted in process, written where its send ends): its
/// answer costs one group fsync. Through Twilio it stays two: the message is on disk as `sending`
/// before Twilio hears of it, and its outcome before the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mock_code_is_one_write_and_a_twilio_code_two() {
    for (live, writes) in [(false, 1), (true, 2)] {
        let (config, _clock) = clocked();
        let app = if live {
            TestApp::spawn_live(Backend::Sqlite, config).await
        } else {
            TestApp::spawn_with(Backend::Sqlite, config).await
        };
        let before = app.state.store.group_syncs();
        assert_eq!(send(&app, "u1", PHONE, "login").await.status(), 200);
        assert_eq!(
            app.state.store.group_syncs() - before,
            writes,
            "fsyncs for one code (live: {live})"
        );
        let history = app.state.store.user_messages("u1", 10).await.unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!(
            event_statuses(&app.state.store, &history[0].id).await[..2],
            ["sending", "sent"]
        );
    }
}

/// On SQLite an answer that confirms a write waits for the group fsync; a code the limits
/// refused confirms nothing and leaves without one. A repeated status callback changes nothing
/// yet tells Twilio the first one is stored, so it waits like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_code_waits_for_no_fsync_and_a_repeated_callback_does() {
    let (config, _clock) = clocked();
    // Live (a fake Twilio): status callbacks are signed with its credentials.
    let app = TestApp::spawn_live(Backend::Sqlite, config).await;
    assert_eq!(send(&app, "u1", PHONE, "login").await.status(), 200);
    let syncs = app.state.store.group_syncs();
    assert!(
        syncs > 0,
        "a code's answer waited for the log to reach the disk"
    );
    let r = send(&app, "u2", PHONE, "login").await;
    assert_eq!(r.status(), 429);
    assert_eq!(error_code(r).await, "rate_limited");
    assert_eq!(
        app.state.store.group_syncs(),
        syncs,
        "a refusal waits for none"
    );
    let callback = [
        ("MessageSid", "SM0123456789abcdef0123456789abcdef"),
        ("MessageStatus", "delivered"),
    ];
    for attempt in ["first", "repeated"] {
        let before = app.state.store.group_syncs();
        let r = app
            .twilio_webhook("/webhooks/twilio/status", &callback, None)
            .await;
        assert_eq!(r.status(), 200);
        assert!(
            app.state.store.group_syncs() > before,
            "the {attempt} callback's answer waited for an fsync"
        );
    }
}

/// A patient's WhatsApp message to us: it opens that number's 24-hour window.
async fn whatsapp_inbound(app: &TestApp, from: &str) {
    let r = app
        .client
        .post(app.url("/dev/inbound"))
        .json(&json!({"from": from, "body": "hello", "channel": "whatsapp"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

async fn send_whatsapp(app: &TestApp, user: &str, phone: &str) -> reqwest::Response {
    app.client
        .post(app.url("/api/messaging/send-otp"))
        .json(&json!({"user_id": user, "phone_number": phone, "purpose": "login", "channel": "whatsapp"}))
        .send()
        .await
        .unwrap()
}

/// A WhatsApp code to a number whose 24-hour window is closed (no approved template) is refused
/// on the number named, before the issue: the answer is the same whether the user has a number
/// on file (whose window is open) or none, and the user's live code still verifies. The refusal
/// counts against the limits like a send, so which numbers wrote to the clinic lately cannot be
/// probed without limit.
async fn a_closed_whatsapp_window_refuses_on_the_number_named_and_writes_nothing(backend: Backend) {
    let (config, _clock) = clocked();
    let app = TestApp::spawn_with(backend, config.set("OTP_MAX_SENDS_PER_HOUR", "3")).await;
    // `has-file`'s number on file wrote to us on WhatsApp: its window is open.
    app.consent("has-file", "+919876500300").await;
    whatsapp_inbound(&app, "+919876500300").await;
    for (user, named) in [("has-file", "+919876500401"), ("no-file", "+919876500402")] {
        let r = send_whatsapp(&app, user, named).await;
        assert_eq!(r.status(), 400, "{user}");
        assert_eq!(error_code(r).await, "whatsapp_window_closed", "{user}");
    }
    assert_eq!(outbox_len(&app).await, 0);
    // No code replaced, no message written: a live SMS code survives refusals.
    let code = send_ok(&app, "sms-user", "+919876500500", "login").await;
    for named in ["+919876500411", "+919876500412"] {
        let r = send_whatsapp(&app, "sms-user", named).await;
        assert_eq!(r.status(), 400);
    }
    let (status, _) = verify(&app, "sms-user", "login", &code).await;
    assert_eq!(status, 200);
    assert!(app
        .state
        .store
        .user_messages("no-file", 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        app.state
            .store
            .user_messages("sms-user", 10)
            .await
            .unwrap()
            .len(),
        1
    );
    // But each refusal counted: the user's three sends of the hour are spent, and so is the
    // number named's cooldown.
    let r = send_whatsapp(&app, "sms-user", "+919876500413").await;
    assert_eq!(r.status(), 429);
    assert_eq!(
        send(&app, "another", "+919876500402", "login")
            .await
            .status(),
        429
    );
    // A number named whose window is open goes; for a user with a number on file the code goes
    // there, as any code for that account does.
    whatsapp_inbound(&app, "+919876500403").await;
    let r = send_whatsapp(&app, "has-file", "+919876500403").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let outbox = app.outbox_json().await;
    assert_eq!(outbox["messages"][0]["to"], "+919876500300");
    assert_eq!(outbox["messages"][0]["channel"], "whatsapp");
}

/// A clock that moves on a second each time it is read, so every read within one request sees
/// a later time than the read before it.
#[derive(Clone)]
struct TickingClock(Arc<Mutex<DateTime<Utc>>>);

impl TickingClock {
    fn set(&self, at: DateTime<Utc>) {
        *self.0.lock().unwrap() = at;
    }
}

impl Clock for TickingClock {
    fn now(&self) -> DateTime<Utc> {
        let mut now = self.0.lock().unwrap();
        let read = *now;
        *now += Duration::seconds(1);
        read
    }
}

/// `send-otp` reads a WhatsApp number's window when it checks the request, and plans the code
/// later: a window closing between the two must not leave a request answered
/// `whatsapp_window_closed` with a code and its message written behind it. The plan goes by the
/// route the request was checked against (`plan_otp`'s `known_route`).
///
/// Each round makes a new number's window close at read k of its request's clock reads
/// (counting from 0), for k from 1 to 40, so the closing falls between every pair of reads in
/// turn. A request is then refused with nothing written (the window closed before the check) or
/// sent. Were the route read again at the plan, a round with k after the check's read and up to
/// the plan's would be answered 400 with a skipped code written for it.
async fn a_window_closing_during_a_request_goes_by_the_route_it_was_checked_against(
    backend: Backend,
) {
    let clock = TickingClock(Arc::new(Mutex::new(Utc::now().trunc_subsecs(6))));
    let app = TestApp::spawn_with(
        backend,
        TestConfig::new().with_any_clock(Arc::new(clock.clone())),
    )
    .await;
    let mut answers = Vec::new();
    for k in 1..=40 {
        let (user, number) = (format!("window-{k}"), format!("+9198765{:05}", 20000 + k));
        whatsapp_inbound(&app, &number).await;
        let opened = app
            .state
            .store
            .last_whatsapp_inbound(&number)
            .await
            .unwrap()
            .expect("the inbound message is stored");
        // Reads 0..k of the request are inside the 24 hours, read k and later outside. (Each
        // round is a day after the last, so no round's limits hold another's.)
        clock.set(opened + Duration::hours(24) - Duration::seconds(k));
        let r = send_whatsapp(&app, &user, &number).await;
        let status = r.status().as_u16();
        let messages = app.state.store.user_messages(&user, 10).await.unwrap();
        match status {
            400 => {
                assert_eq!(error_code(r).await, "whatsapp_window_closed", "k = {k}");
                let written: Vec<_> = messages
                    .iter()
                    .map(|m| (m.status.as_str(), m.reason.map(|r| r.as_str())))
                    .collect();
                assert!(
                    written.is_empty(),
                    "k = {k}: refused, yet wrote {written:?}"
                );
            }
            200 => {
                assert_eq!(messages.len(), 1, "k = {k}");
                assert_ne!(messages[0].status.as_str(), "skipped", "k = {k}");
                let outbox = app.outbox_json().await;
                assert_eq!(outbox["messages"][0]["to"], number.as_str(), "k = {k}");
                assert_eq!(outbox["messages"][0]["channel"], "whatsapp", "k = {k}");
            }
            other => panic!("k = {k}: {other} {}", r.text().await.unwrap()),
        }
        answers.push(status);
    }
    // Refused while the window closed before the check, sent from then on: one run of each.
    let first_sent = answers.iter().position(|&status| status == 200);
    assert!(
        first_sent.is_some_and(|at| at > 0 && answers[at..].iter().all(|&status| status == 200)),
        "answers for k = 1..=40: {answers:?}"
    );
}

/// `OTP_ALLOWED_COUNTRIES` holds for the number a code goes to, not only the number named: a
/// user whose number on file is elsewhere gets nothing, and the caller hears what any send
/// answers (the number on file is never revealed). The send still counts against the limits.
async fn a_number_on_file_outside_the_allowed_countries_gets_nothing(backend: Backend) {
    let (config, _clock) = clocked();
    let app = TestApp::spawn_with(
        backend,
        config
            .set("OTP_ALLOWED_COUNTRIES", "IN")
            .set("OTP_MAX_SENDS_PER_HOUR", "1"),
    )
    .await;
    app.consent("abroad", "+14155550100").await;
    let r = send(&app, "abroad", PHONE, "login").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(r.json::<Value>().await.unwrap()["sent_to"], "+91******3210");
    assert_eq!(outbox_len(&app).await, 0);
    let messages = app.state.store.user_messages("abroad", 10).await.unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].status.as_str(), "skipped");
    assert_eq!(
        messages[0].reason.map(|r| r.as_str()),
        Some("country_not_allowed")
    );
    // Counted like any send: the number named has used its hour.
    assert_eq!(send(&app, "someone", PHONE, "login").await.status(), 429);
    // A number on file inside the list gets its code.
    app.consent("home", "+919876500600").await;
    assert_eq!(
        send(&app, "home", "+919876500601", "login").await.status(),
        200
    );
    assert_eq!(
        app.outbox_json().await["messages"][0]["to"],
        "+919876500600"
    );
}

/// Window refusals are counted under the same locks as sends: 24 at once naming one number
/// answer one 400 and 23 429s (the number's cooldown), as 24 sends would answer one 200. (Logged
/// and counted without the locks, 2 to 6 of them answered 400.)
async fn simultaneous_window_refusals_hold_the_limits(backend: Backend) {
    let (config, _clock) = clocked();
    let app = TestApp::spawn_with(backend, config).await;
    let mut requests = tokio::task::JoinSet::new();
    for n in 0..24 {
        let (client, url) = (app.client.clone(), app.url("/api/messaging/send-otp"));
        requests.spawn(async move {
            let body = json!({"user_id": format!("probe-{n}"), "phone_number": "+919876500700",
                "purpose": "login", "channel": "whatsapp"});
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        });
    }
    let mut statuses = requests.join_all().await;
    statuses.sort();
    let mut expected = vec![429; 24];
    expected[0] = 400;
    assert_eq!(statuses, expected);
}

/// How many dev-outbox messages went to `phone`.
async fn sent_to(app: &TestApp, phone: &str) -> usize {
    let outbox: Value = app.outbox_json().await;
    outbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["to"] == phone)
        .count()
}

/// A send-otp from its own client address (`TRUST_FORWARDED_FOR`).
async fn send_from(
    app: &TestApp,
    address: &str,
    user: &str,
    phone: &str,
    purpose: &str,
) -> reqwest::Response {
    app.client
        .post(app.url("/api/messaging/send-otp"))
        .header("x-forwarded-for", address)
        .json(&json!({"user_id": user, "phone_number": phone, "purpose": purpose}))
        .send()
        .await
        .unwrap()
}

/// The reasons a user's OTP messages were skipped for, newest first.
async fn skipped_for(app: &TestApp, user: &str) -> Vec<&'static str> {
    let messages = app.state.store.user_messages(user, 20).await.unwrap();
    messages
        .iter()
        .filter(|m| m.status.as_str() == "skipped")
        .filter_map(|m| m.reason.map(|r| r.as_str()))
        .collect()
}

/// An app with no cooldown and 3 codes an hour, trusting `X-Forwarded-For` (so each request can
/// come from its own address), where the accounts `family-{n}` for `n` in `accounts` have `number`
/// on file.
async fn accounts_sharing_a_number(
    backend: Backend,
    number: &str,
    accounts: std::ops::Range<usize>,
) -> std::sync::Arc<TestApp> {
    let (config, _clock) = limits("3");
    let config = config.set("TRUST_FORWARDED_FOR", "true");
    let app = TestApp::spawn_with(backend, config).await;
    for n in accounts {
        app.consent(&format!("family-{n}"), number).await;
    }
    std::sync::Arc::new(app)
}

/// Send-otps all at once, each `(client address, user, number named, purpose)` from its own
/// address: their statuses, in the order they finished.
async fn send_all_at_once(
    app: &std::sync::Arc<TestApp>,
    sends: impl IntoIterator<Item = (String, String, String, &'static str)>,
) -> Vec<u16> {
    let mut requests = tokio::task::JoinSet::new();
    for (address, user, named, purpose) in sends {
        let app = app.clone();
        requests.spawn(async move {
            let r = send_from(&app, &address, &user, &named, purpose).await;
            r.status().as_u16()
        });
    }
    requests.join_all().await
}

/// Codes to a number on file are held by that number's limits, however the codes before them
/// were asked for: codes through accounts that have it on file and codes naming it all count,
/// and share its cooldown and its hour. (They were counted against the number named only, so a
/// phone could get its hour's codes through each account with it on file, and any account can
/// put any number on file.) A code past them is written as any code is (it replaces the user's
/// code) but not sent, and answered as a send: a 429, or a code left alive, would tell the caller
/// that the account's number on file had codes lately. A code to the number named stays held by
/// that number's own limits only.
async fn codes_to_one_number_share_its_limits_whichever_way_they_are_asked_for(backend: Backend) {
    const ON_FILE: &str = "+919876500800";
    let (config, clock) = clocked();
    let config = config
        .set("OTP_MAX_SENDS_PER_HOUR", "3")
        .set("TRUST_FORWARDED_FOR", "true");
    let app = TestApp::spawn_with(backend, config).await;
    app.consent("owner", ON_FILE).await;
    app.consent("sibling", ON_FILE).await;
    let ok = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    };
    // A code naming the number.
    ok(send_from(&app, "198.51.100.1", "stranger", ON_FILE, "verification").await).await;
    assert_eq!(sent_to(&app, ON_FILE).await, 1);
    // A login code through an account goes to the number on file: within the number's
    // cooldown, it is answered as a send; written, not sent.
    clock.advance(Duration::seconds(10));
    ok(send_from(&app, "198.51.100.2", "owner", "+919876500801", "login").await).await;
    assert_eq!(
        sent_to(&app, ON_FILE).await,
        1,
        "the cooldown is the number's"
    );
    assert!(app
        .state
        .store
        .get_otp("owner", "login")
        .await
        .unwrap()
        .is_some());
    assert_eq!(skipped_for(&app, "owner").await, ["destination_limited"]);
    clock.advance(Duration::seconds(21));
    ok(send_from(&app, "198.51.100.3", "owner", "+919876500802", "login").await).await;
    assert_eq!(sent_to(&app, ON_FILE).await, 2);
    clock.advance(Duration::seconds(31));
    ok(send_from(&app, "198.51.100.4", "sibling", "+919876500803", "login").await).await;
    assert_eq!(sent_to(&app, ON_FILE).await, 3);
    let siblings_code = latest_code(&app, ON_FILE).await;
    // The number's hour is full, through either account.
    clock.advance(Duration::seconds(31));
    ok(send_from(&app, "198.51.100.5", "owner", "+919876500804", "login").await).await;
    clock.advance(Duration::seconds(31));
    ok(send_from(&app, "198.51.100.6", "sibling", "+919876500805", "login").await).await;
    assert_eq!(sent_to(&app, ON_FILE).await, 3, "the hour is the number's");
    // The dropped code replaced the sibling's, as a sent one would have.
    assert_eq!(
        verify(&app, "sibling", "login", &siblings_code).await.0,
        400
    );
    assert_eq!(skipped_for(&app, "sibling").await, ["destination_limited"]);
    // A code naming the number is held by the named number's limits only (one of its hour's
    // three used): it goes.
    clock.advance(Duration::seconds(31));
    ok(send_from(&app, "198.51.100.7", "stranger", ON_FILE, "verification").await).await;
    assert_eq!(sent_to(&app, ON_FILE).await, 4);
    // Other numbers on file are not held back.
    app.consent("neighbour", "+919876500809").await;
    ok(send_from(&app, "198.51.100.8", "neighbour", "+919876500810", "login").await).await;
    assert_eq!(sent_to(&app, "+919876500809").await, 1);
    // An hour after they went, the number's codes leave its hour.
    clock.advance(Duration::minutes(59));
    ok(send_from(&app, "198.51.100.9", "owner", "+919876500806", "login").await).await;
    assert_eq!(sent_to(&app, ON_FILE).await, 5);
    // Where each logged code went (migration 28): a code to the number named only marked (its
    // row's `phone_index` is that number's), a code to a number on file under that number's
    // index, a code that went nowhere neither.
    let logged = app
        .db
        .text_pairs(
            "SELECT COALESCE(send_to_index, ''), \
             CASE WHEN went_to_named THEN 'named' ELSE '' END FROM otp_send_log ORDER BY id",
        )
        .await;
    let on_file = logged[2].0.clone();
    let neighbour = logged[7].0.clone();
    assert!(!on_file.is_empty() && !neighbour.is_empty() && on_file != neighbour);
    let expected: Vec<(String, String)> = [
        ("", "named"),
        ("", ""),
        (on_file.as_str(), ""),
        (on_file.as_str(), ""),
        ("", ""),
        ("", ""),
        ("", "named"),
        (neighbour.as_str(), ""),
        (on_file.as_str(), ""),
    ]
    .iter()
    .map(|(index, named)| (index.to_string(), named.to_string()))
    .collect();
    assert_eq!(logged, expected);
}

/// Each logged code, in the order decided, by user: named (N), to the number on file (R),
/// dropped (D).
async fn ways_logged(app: &TestApp) -> Vec<(String, String)> {
    app.db
        .text_pairs(
            "SELECT user_id, CASE WHEN went_to_named THEN 'N' \
             WHEN send_to_index IS NOT NULL THEN 'R' ELSE 'D' END \
             FROM otp_send_log ORDER BY id",
        )
        .await
}

/// Simultaneous codes to one number on file hold its limits: 24 accounts with it on file, all
/// at once from their own addresses, with no cooldown and 3 an hour. Every answer is a send's,
/// every account's code is written, and 3 reach the number.
async fn simultaneous_codes_to_one_number_hold_its_limits(backend: Backend) {
    const ON_FILE: &str = "+919876500900";
    let app = accounts_sharing_a_number(backend, ON_FILE, 0..24).await;
    let sends = (0..24).map(|n| {
        let named = format!("+9198765009{:02}", 10 + n);
        (
            format!("198.51.100.{n}"),
            format!("family-{n}"),
            named,
            "login",
        )
    });
    assert_eq!(send_all_at_once(&app, sends).await, vec![200; 24]);
    assert_eq!(sent_to(&app, ON_FILE).await, 3);
    let mut sent = 0;
    for n in 0..24 {
        let messages = app
            .state
            .store
            .user_messages(&format!("family-{n}"), 10)
            .await
            .unwrap();
        assert_eq!(messages.len(), 1, "family-{n}");
        sent += usize::from(messages[0].status.as_str() != "skipped");
    }
    assert_eq!(sent, 3);
}

/// Simultaneous codes naming a number and going to it as a number on file share its hour: 3
/// strangers name it (a code to the number named is held by that number's own limits only: all
/// three go) while 24 accounts with it on file ask login codes, with no cooldown and 3 an hour.
/// Which go first is the race's; what must hold is the limit, in the order the codes were
/// decided (the send log's): a code to the number on file goes only while fewer than 3 codes
/// went to the number before it, either way, and is dropped otherwise. On PostgreSQL, codes of
/// one batch that share the number go through the batch function's one-at-a-time path, whose
/// reads and log row (migration 28) this exercises alongside the set-based path's.
async fn simultaneous_codes_naming_a_number_and_going_to_it_share_its_hour(backend: Backend) {
    const NUMBER: &str = "+919876501200";
    let app = accounts_sharing_a_number(backend, NUMBER, 3..27).await;
    let sends = (0..27).map(|n| {
        let address = format!("198.51.100.{n}");
        match n {
            0..3 => (
                address,
                format!("stranger-{n}"),
                NUMBER.into(),
                "verification",
            ),
            _ => {
                let named = format!("+9198765012{:02}", 10 + n);
                (address, format!("family-{n}"), named, "login")
            }
        }
    });
    assert_eq!(send_all_at_once(&app, sends).await, vec![200; 27]);
    let logged = ways_logged(&app).await;
    assert_eq!(logged.len(), 27);
    let mut before = 0;
    for (user, way) in &logged {
        match way.as_str() {
            "N" => assert!(user.starts_with("stranger-"), "{logged:?}"),
            "R" => assert!(before < 3, "a code went past the hour: {logged:?}"),
            _ => assert!(
                before >= 3,
                "a code was dropped within the hour: {logged:?}"
            ),
        }
        before += usize::from(way != "D");
    }
    let went = before;
    assert!((3..=6).contains(&went), "{logged:?}");
    assert_eq!(sent_to(&app, NUMBER).await, went);
}

/// Simultaneous login codes, half for accounts with a number on file of their own (each goes
/// there, not to the number named) and half for new accounts (each goes to the number named):
/// each reaches its own number, once, and works. On PostgreSQL they meet in the batch function,
/// whose set-based statement decides the codes to the number named and leaves those to a number
/// on file to its one-at-a-time path (migration 29); the send log says which way each went.
async fn simultaneous_codes_to_numbers_on_file_and_to_numbers_named_each_go_where_they_should(
    backend: Backend,
) {
    let (config, _clock) = limits("3");
    let app = std::sync::Arc::new(
        TestApp::spawn_with(backend, config.set("TRUST_FORWARDED_FOR", "true")).await,
    );
    let on_file = |n: usize| format!("+9198765014{n:02}");
    let named = |n: usize| format!("+9198765015{n:02}");
    for n in (0..24).step_by(2) {
        app.consent(&format!("mixed-{n}"), &on_file(n)).await;
    }
    let sends = (0..24).map(|n| {
        (
            format!("198.51.100.{n}"),
            format!("mixed-{n}"),
            named(n),
            "login",
        )
    });
    assert_eq!(send_all_at_once(&app, sends).await, vec![200; 24]);
    for n in 0..24 {
        let (to, not_to) = match n % 2 {
            0 => (on_file(n), named(n)),
            _ => (named(n), on_file(n)),
        };
        assert_eq!(sent_to(&app, &to).await, 1, "mixed-{n}");
        assert_eq!(sent_to(&app, &not_to).await, 0, "mixed-{n}");
        let code = latest_code(&app, &to).await;
        assert_eq!(
            verify(&app, &format!("mixed-{n}"), "login", &code).await.0,
            200,
            "mixed-{n}"
        );
    }
    let logged = ways_logged(&app).await;
    assert_eq!(logged.len(), 24);
    for (user, way) in &logged {
        let n: usize = user.trim_start_matches("mixed-").parse().unwrap();
        let expected = if n.is_multiple_of(2) { "R" } else { "N" };
        assert_eq!(way, expected, "{user}");
    }
}

/// Two instances on one PostgreSQL database hold the limits of a number on file together. Each
/// runs its own OTP batches, so only the advisory locks keep their codes for one number from
/// slipping past its limits: the batch reads each account's number on file before it takes its
/// locks and takes that number's too. Five rounds, each a new number on file for 24 accounts
/// asked through the two instances at once: 3 codes are sent to it each time, as from one
/// instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_hold_the_limits_of_the_number_a_code_goes_to() {
    use prism_messaging::otp::SendOtpRequest;
    if postgres_admin_url().is_none() {
        eprintln!("TEST_DATABASE_URL is not set: skipping the PostgreSQL run");
        return;
    }
    let config = TestConfig::new()
        .set("OTP_RESEND_COOLDOWN_SECONDS", "0")
        .set("OTP_MAX_SENDS_PER_HOUR", "3");
    let mut vars = config.vars.clone();
    let first = TestApp::spawn_with(Backend::Postgres, config).await;
    vars.insert("DATABASE_URL".into(), first.db.url.clone());
    let second = prism_messaging::http::AppState::from_config(
        prism_messaging::config::Config::from_lookup(|name| vars.get(name).cloned()).unwrap(),
    )
    .await
    .unwrap();
    for round in 0..5 {
        let on_file = format!("+9198765010{round:02}");
        let user = |n: usize| format!("family-{round}-{n}");
        for n in 0..24 {
            first.consent(&user(n), &on_file).await;
        }
        let mut requests = tokio::task::JoinSet::new();
        for n in 0..24 {
            let request = SendOtpRequest {
                user_id: user(n),
                phone_number: format!("+91987651{round:02}{n:02}"),
                purpose: "login".into(),
                channel: None,
            };
            let otp = match n % 2 {
                0 => first.state.otp.clone(),
                _ => second.otp.clone(),
            };
            let address = format!("198.51.{round}.{n}");
            requests.spawn(async move { otp.send(request, Some(address)).await });
        }
        let answers = requests.join_all().await;
        assert!(answers.iter().all(|a| a.is_ok()));
        let (mut written, mut sent) = (0, 0);
        for n in 0..24 {
            for m in first.state.store.user_messages(&user(n), 10).await.unwrap() {
                written += 1;
                sent += usize::from(m.status.as_str() != "skipped");
            }
        }
        assert_eq!(written, 24, "round {round}: every account's code");
        assert_eq!(sent, 3, "round {round}: codes sent to the number");
    }
}

/// Erasing an account keeps what the limits count: its send-log rows lose the user and the
/// number but keep the numbers' blind indexes and the address until they age out. (Deleted, an
/// account erased between sends started every limit again: codes without limit to one number.)
async fn erasing_an_account_does_not_reset_the_limits(backend: Backend) {
    const ON_FILE: &str = "+919876501100";
    let (config, clock) = clocked();
    let config = config
        .set("OTP_MAX_SENDS_PER_HOUR", "2")
        .set("OTP_MAX_SENDS_PER_IP_PER_HOUR", "3");
    let app = TestApp::spawn_with(backend, config).await;
    let erase = |user: &'static str| {
        let request = app
            .client
            .delete(app.url("/api/messaging/me"))
            .bearer_auth(app.user_token(user));
        async move { assert_eq!(request.send().await.unwrap().status(), 200) }
    };
    // The number on file's cooldown survives the erasure of the account it went through.
    app.consent("bomber", ON_FILE).await;
    assert_eq!(
        send(&app, "bomber", "+919876501101", "login")
            .await
            .status(),
        200
    );
    erase("bomber").await;
    app.consent("bomber", ON_FILE).await;
    assert_eq!(
        send(&app, "bomber", "+919876501102", "login")
            .await
            .status(),
        200
    );
    assert_eq!(sent_to(&app, ON_FILE).await, 1);
    // The number named's cooldown and the address's hour survive too.
    erase("bomber").await;
    assert_eq!(
        send(&app, "bomber", "+919876501102", "login")
            .await
            .status(),
        429
    );
    clock.advance(Duration::seconds(31));
    erase("bomber").await;
    assert_eq!(
        send(&app, "bomber", "+919876501103", "login")
            .await
            .status(),
        200
    );
    erase("bomber").await;
    assert_eq!(
        send(&app, "bomber", "+919876501104", "login")
            .await
            .status(),
        429
    );
    // What is kept names neither the user nor a number: only the indexes the limits count.
    let kept = app
        .db
        .text_pairs("SELECT user_id, phone_number FROM otp_send_log")
        .await;
    assert_eq!(
        kept.len(),
        3,
        "the three sends logged (one of them dropped)"
    );
    for (user, number) in kept {
        assert!(user.starts_with("erased:"), "{user}");
        assert_eq!(number, "");
    }
}

/// A send the limits refused is remembered while they hold: the same request asked again is
/// refused without the store (here the send log is emptied behind the service's back, so the
/// store alone would let it go), with the wait that is left, until the instant they lift.
/// Over HTTP the request's own entry and its limits' entries give the same answer (what the
/// former saves is the number's validation); `otp::refusals::tests` drive each apart.
async fn a_refused_request_asked_again_is_refused_from_memory_until_its_wait_is_over(
    backend: Backend,
) {
    let (config, clock) = limits("2");
    let app = TestApp::spawn_with(backend, config.set("TRUST_FORWARDED_FOR", "true")).await;
    let ask = || {
        let request = app
            .client
            .post(app.url("/api/messaging/send-otp"))
            .header("x-forwarded-for", "198.51.100.1")
            .json(&json!({"user_id": "u1", "phone_number": PHONE, "purpose": "login"}));
        async move { request.send().await.unwrap() }
    };
    let started = clock.now();
    for _ in 0..2 {
        assert_eq!(ask().await.status(), 200);
        clock.advance(Duration::minutes(10));
    }
    // The first code (20 minutes ago) leaves the hour in 40 minutes.
    let r = ask().await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "2400");
    assert_eq!(app.db.execute("DELETE FROM otp_send_log").await.unwrap(), 2);

    clock.advance(Duration::minutes(1));
    let r = ask().await;
    assert_eq!(r.status(), 429, "the same request, within its wait");
    assert_eq!(r.headers()["retry-after"], "2340");
    assert_eq!(error_code(r).await, "rate_limited");
    let to_its_end = started + Duration::hours(1) - clock.now();
    clock.advance(to_its_end - Duration::milliseconds(1));
    let r = ask().await;
    assert_eq!(r.status(), 429, "a millisecond before its wait is over");
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(outbox_len(&app).await, 2, "nothing sent");
    // Once it is over, the store decides: its log is empty, so the code goes.
    clock.advance(Duration::milliseconds(1));
    assert_eq!(ask().await.status(), 200, "at the instant the limits lift");
    assert_eq!(outbox_len(&app).await, 3);
}

/// Each limit that refused a send holds, from memory, for every send it applies to: a number
/// whose hour is full, for any user and any client naming it (however the number is written);
/// a limit that did not refuse holds nothing. The send log is emptied behind the service's
/// back, so what is refused here is refused from memory.
async fn a_number_whose_hour_is_full_is_refused_from_memory_for_every_caller(backend: Backend) {
    let (config, clock) = limits("2");
    let app = TestApp::spawn_with(backend, config.set("TRUST_FORWARDED_FOR", "true")).await;
    let ask = |user: &'static str, phone: &'static str, address: &'static str| {
        let request = app
            .client
            .post(app.url("/api/messaging/send-otp"))
            .header("x-forwarded-for", address)
            .json(&json!({"user_id": user, "phone_number": phone, "purpose": "login"}));
        async move { request.send().await.unwrap() }
    };
    assert_eq!(ask("u1", PHONE, "198.51.100.1").await.status(), 200);
    clock.advance(Duration::minutes(10));
    assert_eq!(ask("u2", PHONE, "198.51.100.2").await.status(), 200);
    clock.advance(Duration::minutes(10));
    // The number's hour is full (a new user, from a new address): only the number's limit
    // refuses, for 40 minutes.
    let r = ask("u3", PHONE, "198.51.100.3").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "2400");
    assert_eq!(app.db.execute("DELETE FROM otp_send_log").await.unwrap(), 2);

    clock.advance(Duration::minutes(1));
    let r = ask("u4", "+91 98765 43210", "198.51.100.4").await;
    assert_eq!(
        r.status(),
        429,
        "another user and client, the number written another way"
    );
    assert_eq!(r.headers()["retry-after"], "2340");
    assert_eq!(error_code(r).await, "rate_limited");
    assert_eq!(outbox_len(&app).await, 2, "nothing sent");
    // The user and the client it refused are not held: another number goes.
    assert_eq!(
        ask("u3", "+919876543211", "198.51.100.3").await.status(),
        200
    );
    // Bad input is still answered as bad input.
    let r = ask("u4", "+91 98765 4321x", "198.51.100.4").await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "invalid_phone");
    // Once the number's limit lifts, the store decides again.
    clock.advance(Duration::minutes(39));
    assert_eq!(ask("u5", PHONE, "198.51.100.5").await.status(), 200);
    assert_eq!(outbox_len(&app).await, 4);
}
