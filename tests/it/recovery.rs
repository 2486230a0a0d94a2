//! Recovery that never adopts the wrong message, lookups that count, a dispatcher that never waits
//! on its slowest task, and a status history that tells the truth. Against the fake Twilio.

use std::time::{Duration as StdDuration, Instant};

use crate::common::fake_twilio::{Failure, Fault};
use crate::common::*;
use chrono::{Duration, Utc};
use prism_messaging::clock::{Clock, ManualClock};
use prism_messaging::status::MessageStatus;
use serde_json::{json, Value};

both_backends!(
    a_twiml_reply_is_never_adopted,
    a_sibling_in_flight_is_never_adopted_from,
    an_otp_with_an_unknown_outcome_ends_unknown,
    a_content_sid_send_is_never_adopted,
    lookups_count_as_attempts_and_end_unknown,
    the_last_attempt_is_looked_up_before_giving_up,
    history_records_only_what_moved,
    host_keys_never_block_reminders_and_values_are_kept_as_given,
    whatsapp_records_no_sms_segments,
    refused_credentials_hold_the_queue,
    refused_credentials_hold_the_whole_queue_and_one_message_tries_again,
    a_lookup_twilio_answers_ends_the_credentials_hold,
    readiness_reports_a_provider_that_does_not_answer,
    a_slow_lookup_never_stalls_other_sends,
    an_early_callback_is_never_orphaned,
    a_server_error_with_a_code_is_looked_up_before_resending,
    a_twilio_that_cannot_be_reached_is_retried_and_never_looked_up,
    a_lookup_refused_for_credentials_holds_the_message_without_spending_it,
    a_lookup_not_made_on_the_last_attempt_waits_instead_of_ending_unknown,
    a_message_found_nowhere_and_then_held_is_no_longer_looked_up,
    twins_whose_outcomes_are_unknown_are_each_settled_once,
    a_match_dated_by_a_twilio_clock_a_little_behind_is_adopted,
    a_sid_answered_twice_is_never_sent_again,
);

const PATIENT: &str = "+14155552671";

/// A live app on a manual clock, with the patient consenting to SMS and WhatsApp.
async fn live(backend: Backend, config: TestConfig) -> (TestApp, ManualClock) {
    let clock = ManualClock::new(Utc::now());
    let app = TestApp::spawn_live(
        backend,
        config
            .set("TWILIO_TIMEOUT_MS", "400")
            .set("DISPATCH_RATE_PER_SECOND", "0")
            .with_clock(&clock),
    )
    .await;
    app.consent("p1", PATIENT).await;
    (app, clock)
}

fn receipt(channel: &str) -> Value {
    json!({
        "user_id": "p1",
        "template": "payment_received",
        "variables": {"amount": "INR 499.00", "date": "2027-01-12"},
        "channel": channel,
    })
}

async fn a_twiml_reply_is_never_adopted(backend: Backend) {
    let (app, clock) = live(backend, TestConfig::new()).await;
    let fake = app.fake.as_ref().unwrap();
    let wa = format!("whatsapp:{PATIENT}");
    // The patient texts HELP on WhatsApp; Twilio lists our TwiML answer as `outbound-reply`.
    app.incoming("SMhelp", &wa, "HELP").await;
    let reply = fake.add_listed(
        &wa,
        &format!("whatsapp:{WHATSAPP_SENDER}"),
        "PhysiologicPRISM: messages about your care.",
        "outbound-reply",
    );
    // A WhatsApp receipt whose send drops the connection: nothing is created.
    fake.script(&wa, vec![Fault::Drop]);
    let id = app.notify_ok(receipt("whatsapp")).await;
    assert_eq!(app.dispatch().await.retried, 1);
    clock.advance(Duration::minutes(5));
    app.dispatch().await;
    let m = app.message(&id).await;
    assert_eq!(m["status"], "sent", "{m}");
    assert_ne!(
        m["provider_sid"],
        reply.as_str(),
        "the HELP reply was adopted"
    );
    assert_eq!(
        fake.created()
            .iter()
            .filter(|c| c.to == wa && c.direction == "outbound-api")
            .count(),
        1
    );
}

async fn a_sibling_in_flight_is_never_adopted_from(backend: Backend) {
    let (app, clock) = live(backend, TestConfig::new()).await;
    let fake = app.fake.as_ref().unwrap();
    // Twilio creates the first receipt but never answers: its outcome is unknown.
    fake.script(PATIENT, vec![Fault::AcceptNoAnswer]);
    let first = app.notify_ok(receipt("sms")).await;
    assert_eq!(app.dispatch().await.retried, 1);
    let created = fake.created();
    assert_eq!(created.len(), 1);
    // A second receipt with the same text is on the wire right now (another task, another
    // instance), its SID not yet recorded: the match could be its.
    let second = app
        .notify_ok(json!({
            "user_id": "p1",
            "template": "payment_received",
            "variables": {"amount": "INR 499.00", "date": "2027-01-12"},
            "idempotency_key": "second",
        }))
        .await;
    let body = created[0].body.replace('\'', "''");
    let far = (clock.now() + Duration::days(10)).to_rfc3339();
    app.db
        .execute(&format!(
            "UPDATE messages SET status = 'sending', attempts = 1, to_number = '{}', \
             to_index = '{}', attempt_body = '{}', attempt_started_at = '{}', \
             lease_until = '{far}' WHERE id = '{second}'",
            test_vault().seal(PATIENT),
            test_vault().blind(PATIENT),
            test_vault().seal(&body),
            clock.now().to_rfc3339()
        ))
        .await
        .unwrap();
    clock.advance(Duration::minutes(5));
    let report = app.dispatch().await;
    assert_eq!((report.adopted, report.retried), (0, 1));
    let m = app.message(&first).await;
    assert_eq!(
        m["status"], "queued",
        "not adopted while a sibling may own it: {m}"
    );
    assert_eq!(m["attempts"], 1, "waiting for a sibling spends no attempt");
    // The sibling settles with the SID Twilio created for it.
    app.db
        .execute(&format!(
            "UPDATE messages SET status = 'sent', provider_sid = '{}', lease_until = NULL \
             WHERE id = '{second}'",
            created[0].sid
        ))
        .await
        .unwrap();
    clock.advance(Duration::minutes(30));
    app.dispatch().await;
    let m = app.message(&first).await;
    assert_eq!(m["status"], "sent", "{m}");
    assert_ne!(
        m["provider_sid"],
        created[0].sid.as_str(),
        "a held SID is never adopted"
    );
    assert_eq!(fake.create_calls_to(PATIENT), 2);
}

async fn an_otp_with_an_unknown_outcome_ends_unknown(backend: Backend) {
    let (app, clock) = live(backend, TestConfig::new()).await;
    let fake = app.fake.as_ref().unwrap();
    fake.script(PATIENT, vec![Fault::AcceptNoAnswer]);
    let r = app
        .client
        .post(app.url("/api/messaging/send-otp"))
        .json(&json!({"user_id": "p1", "phone_number": PATIENT, "purpose": "login"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "the caller is told to ask again");
    let m = &app.state.outbox.history("p1", 1).await.unwrap()[0];
    assert_eq!(m.status, MessageStatus::Unknown);
    clock.advance(Duration::hours(1));
    assert_eq!(app.dispatch().await.claimed, 0, "never resent");
    assert_eq!(fake.create_calls_to(PATIENT), 1);
}

async fn a_content_sid_send_is_never_adopted(backend: Backend) {
    let config = TestConfig::new().set(
        "TWILIO_CONTENT_SIDS",
        "payment_received=HX0123456789abcdef0123456789abcdef",
    );
    let (app, clock) = live(backend, config).await;
    let fake = app.fake.as_ref().unwrap();
    let wa = format!("whatsapp:{PATIENT}");
    // Outside the 24-hour window: the approved template goes, stored by Twilio in its own words.
    fake.script(&wa, vec![Fault::AcceptNoAnswer]);
    let id = app.notify_ok(receipt("whatsapp")).await;
    app.dispatch().await;
    clock.advance(Duration::minutes(5));
    let report = app.dispatch().await;
    assert_eq!((report.adopted, report.unknown), (0, 1));
    let m = app.message(&id).await;
    assert_eq!(m["status"], "unknown", "{m}");
    assert_eq!(fake.create_calls_to(&wa), 1, "never resent blind");
}

async fn lookups_count_as_attempts_and_end_unknown(backend: Backend) {
    let (app, clock) = live(backend, TestConfig::new().set("DISPATCH_MAX_ATTEMPTS", "3")).await;
    let fake = app.fake.as_ref().unwrap();
    fake.script(PATIENT, vec![Fault::Drop]);
    fake.fail_lookups(1_000);
    let id = app.notify_ok(receipt("sms")).await;
    app.dispatch().await;
    let mut rounds = 0;
    loop {
        clock.advance(Duration::minutes(20));
        let report = app.dispatch().await;
        rounds += 1;
        if report.claimed == 0 || rounds > 10 {
            break;
        }
    }
    let m = app.message(&id).await;
    assert_eq!(m["status"], "unknown", "{m}");
    let lookups = fake.requests().iter().filter(|r| r.method == "GET").count();
    assert_eq!(
        lookups, 3,
        "each lookup counted as an attempt, up to the maximum"
    );
    assert_eq!(fake.create_calls_to(PATIENT), 1);
}

async fn the_last_attempt_is_looked_up_before_giving_up(backend: Backend) {
    let (app, clock) = live(backend, TestConfig::new().set("DISPATCH_MAX_ATTEMPTS", "1")).await;
    let fake = app.fake.as_ref().unwrap();
    // Created at Twilio, but the answer comes after our timeout, on the only attempt.
    fake.script(PATIENT, vec![Fault::Slow(StdDuration::from_millis(1_500))]);
    let id = app.notify_ok(receipt("sms")).await;
    assert_eq!(app.dispatch().await.retried, 1, "not failed blind");
    clock.advance(Duration::minutes(5));
    assert_eq!(app.dispatch().await.adopted, 1);
    let m = app.message(&id).await;
    let sid = m["provider_sid"].as_str().unwrap().to_string();
    assert_eq!(sid, fake.created()[0].sid);
    // Twilio's later callback finds its message.
    let r = app
        .twilio_webhook(
            "/webhooks/twilio/status",
            &[
                ("MessageSid", sid.as_str()),
                ("MessageStatus", "delivered"),
                ("AccountSid", ACCOUNT_SID),
            ],
            None,
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.message(&id).await["status"], "delivered");
    assert_eq!(fake.create_calls_to(PATIENT), 1);
}

fn history(message: &Value) -> Vec<(String, Option<i64>)> {
    message["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["status"].as_str().unwrap().to_string(),
                e["error_code"].as_i64(),
            )
        })
        .collect()
}

async fn status_callback(app: &TestApp, sid: &str, status: &str, code: Option<&str>) {
    let mut params = vec![
        ("MessageSid", sid),
        ("MessageStatus", status),
        ("AccountSid", ACCOUNT_SID),
    ];
    if let Some(code) = code {
        params.push(("ErrorCode", code));
    }
    let r = app
        .twilio_webhook("/webhooks/twilio/status", &params, None)
        .await;
    assert_eq!(r.status(), 200);
}

async fn history_records_only_what_moved(backend: Backend) {
    let (app, _clock) = live(backend, TestConfig::new()).await;
    let id = app.notify_ok(receipt("sms")).await;
    app.dispatch().await;
    let sid = app.message(&id).await["provider_sid"]
        .as_str()
        .unwrap()
        .to_string();
    for status in [
        "delivered",
        "accepted",
        "scheduled",
        "canceled",
        "delivered",
    ] {
        status_callback(&app, &sid, status, None).await;
    }
    let m = app.message(&id).await;
    assert_eq!(m["status"], "delivered");
    let statuses: Vec<String> = history(&m).into_iter().map(|(s, _)| s).collect();
    assert_eq!(statuses, ["sending", "sent", "delivered"], "{m}");

    // A later `failed` with the real error code keeps the code.
    let id = app.notify_ok(receipt("sms")).await;
    app.dispatch().await;
    let sid = app.message(&id).await["provider_sid"]
        .as_str()
        .unwrap()
        .to_string();
    status_callback(&app, &sid, "failed", None).await;
    status_callback(&app, &sid, "failed", Some("30003")).await;
    status_callback(&app, &sid, "failed", Some("30003")).await;
    let m = app.message(&id).await;
    assert_eq!(
        history(&m),
        [
            ("sending".to_string(), None),
            ("sent".to_string(), None),
            ("failed".to_string(), None),
            ("failed".to_string(), Some(30003)),
        ],
        "{m}"
    );
    assert_eq!(m["error_code"], 30003);
}

async fn host_keys_never_block_reminders_and_values_are_kept_as_given(backend: Backend) {
    let clock = ManualClock::new(
        chrono::DateTime::parse_from_rfc3339("2027-01-12T04:00:00Z")
            .unwrap()
            .with_timezone(&Utc),
    );
    let app = TestApp::spawn_with(backend, TestConfig::new().with_clock(&clock)).await;
    app.consent("p1", PATIENT).await;
    let starts = clock.now() + Duration::hours(20);
    let r = app
        .client
        .put(app.url("/api/appointments/a1"))
        .bearer_auth(API_KEY)
        .json(&json!({"user_id": "p1", "starts_at": starts.to_rfc3339()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The host app happens to use the key the service once used for this reminder.
    app.notify_ok(json!({
        "user_id": "p1",
        "template": "payment_received",
        "variables": {"amount": "INR 1.00", "date": "2027-01-12"},
        "idempotency_key": format!("reminder:appointment:a1:24h:{}", starts.timestamp_micros()),
    }))
    .await;
    let sweep: Value = app
        .client
        .post(app.url("/cron/appointment-reminders-24h"))
        .bearer_auth(CRON_SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (sweep["due"].clone(), sweep["queued"].clone()),
        (json!(1), json!(1))
    );

    // Trimmed values are the same request; a number renders exactly as written.
    let first = app
        .notify_ok(json!({
            "user_id": "p1",
            "template": "payment_received",
            "variables": {"amount": " INR 499.00 ", "date": "2027-01-12"},
            "idempotency_key": "pay-1",
        }))
        .await;
    let again = app
        .notify_ok(json!({
            "user_id": "p1",
            "template": "payment_received",
            "variables": {"amount": "INR 499.00", "date": "2027-01-12"},
            "idempotency_key": "pay-1",
        }))
        .await;
    assert_eq!(first, again);
    let raw = r#"{"user_id": "p1", "template": "payment_received",
        "variables": {"amount": 499.50, "date": "2027-01-12"}}"#;
    let r = notify_raw(&app, raw).await;
    assert_eq!(r.status(), 202);
    app.dispatch().await;
    let bodies: Vec<String> = app.outbox_json().await["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_string())
        .collect();
    assert!(bodies.iter().any(|b| b.contains("499.50")), "{bodies:?}");
    assert!(!bodies.iter().any(|b| b.contains("499.5 ")), "{bodies:?}");
    // An exponent is a number the schema allows (`minimum: 0`): spelled out, not refused.
    let raw = r#"{"user_id": "p1", "template": "payment_received",
        "variables": {"amount": 1.25E3, "date": "2027-01-13"}}"#;
    let r = notify_raw(&app, raw).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    app.dispatch().await;
    let outbox = app.outbox_json().await;
    let body = outbox["messages"][0]["body"].as_str().unwrap();
    assert!(body.contains("payment of 1250 on"), "{body}");
}

/// `POST /api/notifications` with a body written by hand (JSON numbers as the client wrote them).
async fn notify_raw(app: &TestApp, raw: &'static str) -> reqwest::Response {
    app.client
        .post(app.url("/api/notifications"))
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap()
}

async fn whatsapp_records_no_sms_segments(backend: Backend) {
    let (app, _clock) = live(backend, TestConfig::new()).await;
    app.incoming("SMin", &format!("whatsapp:{PATIENT}"), "hello")
        .await;
    let wa = app.notify_ok(receipt("whatsapp")).await;
    let sms = app.notify_ok(receipt("sms")).await;
    app.dispatch().await;
    let wa = app.message(&wa).await;
    assert_eq!(
        (wa["channel"].clone(), wa["segments"].clone()),
        (json!("whatsapp"), Value::Null)
    );
    assert_eq!(wa["encoding"], Value::Null);
    let sms = app.message(&sms).await;
    assert_eq!(
        (sms["encoding"].clone(), sms["segments"].clone()),
        (json!("GSM-7"), json!(1))
    );
}

async fn refused_credentials_hold_the_queue(backend: Backend) {
    // The Auth Token was rotated at Twilio and not here.
    let fake = FakeTwilio::start().await;
    let config = TestConfig::new()
        .live(&fake)
        .set("TWILIO_AUTH_TOKEN", "a-rotated-token-0123456789")
        .set("DISPATCH_RATE_PER_SECOND", "0");
    let app = TestApp::spawn_with(backend, config).await;
    app.consent("p1", PATIENT).await;
    // `/readyz` checks the provider itself: refused credentials show before any send.
    let (status, ready) = readiness_once_checked(&app).await;
    assert_eq!(status, 503);
    assert_eq!(
        (
            ready["provider_credentials"].clone(),
            ready["provider_api"].clone()
        ),
        (json!("refused"), json!("ok"))
    );
    let id = app.notify_ok(receipt("sms")).await;
    let report = app.dispatch().await;
    assert_eq!((report.held, report.failed), (1, 0));
    let m = app.message(&id).await;
    assert_eq!(
        (m["status"].clone(), m["attempts"].clone()),
        (json!("queued"), json!(0))
    );
    let r = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let ready: Value = r.json().await.unwrap();
    assert_eq!(ready["provider_credentials"], "refused");
    // Held for a while: the next round does not burn it.
    assert_eq!(app.dispatch().await.claimed, 0);
}

/// The queue is held as a whole while Twilio refuses our credentials, not message by message:
/// messages queued during the outage are not claimed and cost Twilio no call; once the hold has
/// passed, one message tries the credentials again, and the rest go once one is taken.
async fn refused_credentials_hold_the_whole_queue_and_one_message_tries_again(backend: Backend) {
    let (app, clock) = live(backend, TestConfig::new()).await;
    let fake = app.fake.as_ref().unwrap();
    let refused = Failure {
        http_status: 401,
        code: 20003,
        retry_after: None,
    };
    // Two refusals: the first send and the first try after the hold.
    fake.fail(PATIENT, vec![refused, refused]);
    app.notify_ok(receipt("sms")).await;
    assert_eq!(app.dispatch().await.held, 1);
    assert_eq!(fake.create_calls_to(PATIENT), 1);
    for amount in ["INR 1.00", "INR 2.00", "INR 3.00"] {
        app.notify_ok(json!({
            "user_id": "p1",
            "template": "payment_received",
            "variables": {"amount": amount, "date": "2027-01-12"},
        }))
        .await;
    }
    // During the hold: nothing claimed, nothing asked of Twilio.
    for _ in 0..3 {
        assert_eq!(app.dispatch().await.claimed, 0);
    }
    clock.advance(Duration::seconds(30));
    assert_eq!(app.dispatch().await.claimed, 0);
    assert_eq!(fake.create_calls_to(PATIENT), 1);
    // Past the hold: one message tries again, is refused, and holds the queue anew.
    clock.advance(Duration::seconds(31));
    let report = app.dispatch().await;
    assert_eq!((report.claimed, report.held), (1, 1));
    assert_eq!(fake.create_calls_to(PATIENT), 2);
    assert_eq!(app.dispatch().await.claimed, 0);
    // The credentials work again: the one try goes, and then everything does.
    clock.advance(Duration::seconds(61));
    let report = app.dispatch().await;
    assert_eq!((report.claimed, report.sent), (1, 1));
    let report = app.dispatch().await;
    assert_eq!((report.claimed, report.sent), (3, 3));
    assert_eq!(fake.create_calls_to(PATIENT), 6);
    let ready: Value = app.get_json("/readyz", None).await;
    assert_eq!(ready["provider_credentials"], "ok");
}

/// `/readyz` once the provider's first check has ended (it runs in the background: the first
/// probes answer `unknown`).
async fn readiness_once_checked(app: &TestApp) -> (u16, Value) {
    let deadline = Instant::now() + StdDuration::from_secs(10);
    loop {
        let r = app.client.get(app.url("/readyz")).send().await.unwrap();
        let status = r.status().as_u16();
        let ready: Value = r.json().await.unwrap();
        if ready["provider_api"] != "unknown" {
            return (status, ready);
        }
        assert!(Instant::now() < deadline, "the provider check never ended");
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
}

/// Twilio unreachable: `/readyz` says so (`provider_api: failing`) but stays ready, since the
/// instance still takes STOPs, consent changes and queued messages; and it asks Twilio at most
/// once a minute however often it is probed.
async fn readiness_reports_a_provider_that_does_not_answer(backend: Backend) {
    let fake = FakeTwilio::start().await;
    let (_refusing, closed) = refusing_port();
    let config = TestConfig::new()
        .live(&fake)
        .set("TWILIO_API_BASE", &format!("http://127.0.0.1:{closed}"));
    let app = TestApp::spawn_with(backend, config).await;
    let (status, ready) = readiness_once_checked(&app).await;
    assert_eq!(status, 200);
    assert_eq!(
        (ready["status"].clone(), ready["provider_api"].clone()),
        (json!("ready"), json!("failing"))
    );
    // With Twilio answering, the check passes, and probes within the minute reuse it.
    let app = TestApp::spawn_with(backend, TestConfig::new().live(&fake)).await;
    let (status, ready) = readiness_once_checked(&app).await;
    assert_eq!((status, ready["provider_api"].clone()), (200, json!("ok")));
    for _ in 0..3 {
        let ready: Value = app.get_json("/readyz", None).await;
        assert_eq!(ready["provider_api"], "ok");
    }
    let checks = fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with(&format!("{ACCOUNT_SID}.json")))
        .count();
    assert_eq!(checks, 1, "one health check for every probe of the minute");
    // With messaging off the provider is not asked.
    let app = TestApp::spawn_with(
        backend,
        TestConfig::new()
            .live(&fake)
            .set("MESSAGING_ENABLED", "false"),
    )
    .await;
    let ready: Value = app.get_json("/readyz", None).await;
    assert_eq!(ready["provider_api"], "not_checked");
}

async fn a_slow_lookup_never_stalls_other_sends(backend: Backend) {
    let clock = ManualClock::new(Utc::now());
    let mut config = TestConfig::new()
        .set("TWILIO_TIMEOUT_MS", "400")
        .set("DISPATCH_RATE_PER_SECOND", "0")
        .set("DISPATCH_LOOKUP_DEADLINE_SECONDS", "600")
        .with_clock(&clock);
    config.background = true;
    let app = TestApp::spawn_live(backend, config).await;
    let fake = app.fake.as_ref().unwrap();
    app.consent("p1", PATIENT).await;
    app.consent("p2", "+14155552672").await;
    // p1's receipt drops; its lookup then hangs.
    fake.script(PATIENT, vec![Fault::Drop]);
    fake.hang_lookups(1);
    let dropped = app.notify_ok(receipt("sms")).await;
    let waited = Instant::now();
    while fake.create_calls_to(PATIENT) == 0 {
        assert!(waited.elapsed() < StdDuration::from_secs(20));
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }
    // The dropped send's retry time is written after its 400 ms timeout,
    // from the clock as it reads then: move the clock only once it is.
    while app.message(&dropped).await["status"] != "queued" {
        assert!(waited.elapsed() < StdDuration::from_secs(20));
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }
    // Due again: the lookup starts, and never answers.
    clock.advance(Duration::hours(1));
    while !fake.requests().iter().any(|r| r.method == "GET") {
        assert!(waited.elapsed() < StdDuration::from_secs(20));
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }
    // Someone else's message goes meanwhile.
    app.notify_ok(json!({
        "user_id": "p2",
        "template": "payment_received",
        "variables": {"amount": "INR 1.00", "date": "2027-01-12"},
    }))
    .await;
    while fake.created_count() == 0 {
        assert!(
            waited.elapsed() < StdDuration::from_secs(20),
            "a new send waited for a hanging lookup"
        );
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }
    assert_eq!(fake.created()[0].to, "+14155552672");
}

async fn an_early_callback_is_never_orphaned(backend: Backend) {
    use prism_messaging::store::{NewMessage, SendAttempt, SendGuard};
    let db = TestDatabase::new(backend).await;
    let store = prism_messaging::store::connect(&db.url, &test_keys())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let now = Utc::now();
    let lease = now + Duration::minutes(2);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60 {
        let id = format!("m{i}");
        store
            .insert_message(&NewMessage {
                id: id.clone(),
                user_id: "u1".into(),
                template_name: "payment_received".into(),
                variables: "{}".into(),
                channel: prism_messaging::store::Channel::Sms,
                idempotency_key: None,
                created_at: now,
                claimed_until: Some(lease),
            })
            .await
            .unwrap();
        let attempt = SendAttempt {
            to_number: PATIENT.into(),
            channel: prism_messaging::store::Channel::Sms,
            encoding: None,
            segments: None,
            body: None,
            take_slot: None,
        };
        let guard = SendGuard {
            consent: false,
            marketing: false,
        };
        store
            .mark_sending(&id, &attempt, guard, now, lease, lease)
            .await
            .unwrap();
        let sid = format!("SM{i:032}");
        // The callback races the send that records its SID.
        let (callbacks, sends) = (store.clone(), store.clone());
        let (sid_a, sid_b) = (sid.clone(), sid.clone());
        tasks.spawn(async move {
            callbacks
                .apply_status(&sid_a, MessageStatus::Delivered, None, now)
                .await
                .unwrap();
        });
        tasks.spawn(async move {
            // As the dispatcher records a send: the SID, and what was parked for it.
            assert!(sends
                .record_sent(&id, &sid_b, MessageStatus::Sent, None, now, lease)
                .await
                .unwrap()
                .is_some());
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    for i in 0..60 {
        let m = store.get_message(&format!("m{i}")).await.unwrap().unwrap();
        assert_eq!(
            m.status,
            MessageStatus::Delivered,
            "m{i}: its callback was orphaned"
        );
    }
    // Nothing left parked: every early callback was taken by its send.
    assert_eq!(
        store
            .prune_unmatched_statuses(now + Duration::days(1))
            .await
            .unwrap(),
        0
    );
}

async fn a_server_error_with_a_code_is_looked_up_before_resending(backend: Backend) {
    let (app, clock) = live(backend, TestConfig::new()).await;
    let fake = app.fake.as_ref().unwrap();
    // Twilio took the message, then answered 500 with its code 20500.
    fake.script(
        PATIENT,
        vec![Fault::AcceptThenFail(Failure {
            http_status: 500,
            code: 20500,
            retry_after: None,
        })],
    );
    let id = app.notify_ok(receipt("sms")).await;
    assert_eq!(app.dispatch().await.retried, 1);
    clock.advance(Duration::minutes(5));
    assert_eq!(app.dispatch().await.adopted, 1, "looked up, not resent");
    let m = app.message(&id).await;
    assert_eq!(m["provider_sid"], fake.created()[0].sid.as_str());
    assert_eq!(fake.create_calls_to(PATIENT), 1);
}

/// Twilio out of reach (the connection refused): nothing reached it, so the message is retried
/// as any retryable failure and ends `failed` once its attempts are spent, never `unknown`
/// (found by review: each such send counted as "may be held", then every lookup failed to
/// connect, and the message ended `unknown`, never sent).
async fn a_twilio_that_cannot_be_reached_is_retried_and_never_looked_up(backend: Backend) {
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let clock = ManualClock::new(Utc::now());
    let fake = FakeTwilio::start().await;
    let config = TestConfig::new()
        .live(&fake)
        .set("TWILIO_API_BASE", &base)
        .set("TWILIO_TIMEOUT_MS", "400")
        .set("DISPATCH_RATE_PER_SECOND", "0")
        .set("DISPATCH_MAX_ATTEMPTS", "3")
        .with_clock(&clock);
    let app = TestApp::spawn_with(backend, config).await;
    app.consent("p1", PATIENT).await;
    let id = app.notify_ok(receipt("sms")).await;
    for _ in 0..6 {
        app.dispatch().await;
        clock.advance(Duration::minutes(20));
    }
    let m = app.message(&id).await;
    assert_eq!(
        (m["status"].clone(), m["attempts"].clone()),
        (json!("failed"), json!(3)),
        "{m}"
    );
    let error = m["error_message"].as_str().unwrap_or_default();
    assert!(error.contains("could not connect"), "{m}");
    assert!(!error.contains("looking up"), "{m}");
}

/// A lookup after an unknown outcome that Twilio refuses for our credentials (the Auth Token
/// rotated meanwhile) is an outage, as for a send: the message waits without spending an
/// attempt, `/readyz` reports the refusal, and once the credentials work the lookup finds nothing
/// and the message is sent (found by review: each refused lookup spent an attempt, unseen, and the
/// message ended `unknown`).
async fn a_lookup_refused_for_credentials_holds_the_message_without_spending_it(backend: Backend) {
    let (app, clock) = live(backend, TestConfig::new().set("DISPATCH_MAX_ATTEMPTS", "2")).await;
    let fake = app.fake.as_ref().unwrap();
    // The connection drops after the request went out: the outcome is unknown, nothing created.
    fake.script(PATIENT, vec![Fault::Drop]);
    let id = app.notify_ok(receipt("sms")).await;
    assert_eq!(app.dispatch().await.retried, 1);
    fake.refuse_lookups(5);
    for _ in 0..5 {
        clock.advance(Duration::minutes(20));
        app.dispatch().await;
        let m = app.message(&id).await;
        assert_eq!(
            (m["status"].clone(), m["attempts"].clone()),
            (json!("queued"), json!(1)),
            "{m}"
        );
    }
    let r = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let ready: Value = r.json().await.unwrap();
    assert_eq!(ready["provider_credentials"], "refused", "{ready}");
    // The credentials work again: the lookup finds nothing, and the message goes.
    clock.advance(Duration::minutes(20));
    assert_eq!(app.dispatch().await.sent, 1);
    let m = app.message(&id).await;
    assert_eq!(
        (m["status"].clone(), m["attempts"].clone()),
        (json!("sent"), json!(2)),
        "{m}"
    );
    assert_eq!(
        fake.create_calls_to(PATIENT),
        2,
        "the dropped send, then this one"
    );
    assert_eq!(fake.created().len(), 1);
}

/// A lookup Twilio answers ends a hold on refused credentials, as a send does (found by review:
/// only a send lifted it, so a message adopted by its lookup left the queue held a minute more).
async fn a_lookup_twilio_answers_ends_the_credentials_hold(backend: Backend) {
    let (app, clock) = live(backend, TestConfig::new()).await;
    let fake = app.fake.as_ref().unwrap();
    // Twilio took it and never answered: its outcome is unknown, and a lookup will find it.
    fake.script(PATIENT, vec![Fault::AcceptNoAnswer]);
    let held = app.notify_ok(receipt("sms")).await;
    assert_eq!(app.dispatch().await.retried, 1);
    // (No `/readyz` here: its own check of the account, which this fake does not refuse, would
    // end the hold as well.)
    fake.refuse_lookups(1);
    clock.advance(Duration::minutes(20));
    assert_eq!(app.dispatch().await.claimed, 1);
    // Past the hold the message is tried again: the lookup, answered, adopts it...
    clock.advance(Duration::minutes(20));
    let report = app.dispatch().await;
    assert_eq!((report.claimed, report.adopted), (1, 1), "{report:?}");
    assert_eq!(app.message(&held).await["status"], "sent");
    // ... and messages queued next go at once, not a minute later.
    for amount in ["INR 1.00", "INR 2.00"] {
        app.notify_ok(json!({
            "user_id": "p1",
            "template": "payment_received",
            "variables": {"amount": amount, "date": "2027-01-12"},
        }))
        .await;
    }
    let report = app.dispatch().await;
    assert_eq!((report.claimed, report.sent), (2, 2), "{report:?}");
}

/// Two receipts with the same text to one number (two payments alike, a family's phone), both
/// with unknown outcomes at once (Twilio took both and never answered; or neither reached it):
/// each is looked up in turn, the earlier attempt first, and each adopts its own message or is
/// sent again, once (found by review after a `kill -9`: each waited for the other until its
/// attempts ran out, and both ended `unknown` or `failed`, never sent).
async fn twins_whose_outcomes_are_unknown_are_each_settled_once(backend: Backend) {
    let (app, clock) = live(backend, TestConfig::new().set("DISPATCH_MAX_ATTEMPTS", "3")).await;
    let fake = app.fake.as_ref().unwrap();
    const OTHER: &str = "+14155552672";
    const THIRD: &str = "+14155552673";
    app.consent("p2", OTHER).await;
    app.consent("p3", THIRD).await;
    let twin = |user: &str, key: &str| {
        json!({"user_id": user, "template": "payment_received",
            "variables": {"amount": "INR 499.00", "date": "2027-01-12"}, "idempotency_key": key})
    };
    // Twilio holds both of p1's and never answered; neither of p2's reached it.
    fake.script(PATIENT, vec![Fault::AcceptNoAnswer, Fault::AcceptNoAnswer]);
    fake.script(OTHER, vec![Fault::Drop, Fault::Drop]);
    // p3's two were on the wire when the process was killed: left `sending`, lease run out.
    fake.script(THIRD, vec![Fault::AcceptNoAnswer, Fault::AcceptNoAnswer]);
    let mut ids = Vec::new();
    for (user, key) in [
        ("p1", "a"),
        ("p1", "b"),
        ("p2", "c"),
        ("p2", "d"),
        ("p3", "e"),
        ("p3", "f"),
    ] {
        ids.push(app.notify_ok(twin(user, key)).await);
    }
    assert_eq!(app.dispatch().await.retried, 6);
    app.db
        .execute(&format!(
            "UPDATE messages SET status = 'sending', lookup_needed = FALSE, lease_until = '{}' \
             WHERE user_id = 'p3'",
            (clock.now() - Duration::minutes(1)).to_rfc3339()
        ))
        .await
        .unwrap();
    for _ in 0..8 {
        clock.advance(Duration::minutes(20));
        app.dispatch().await;
    }
    let mut sids = Vec::new();
    for id in &ids {
        let m = app.message(id).await;
        assert_eq!(m["status"], "sent", "{m}");
        sids.push(m["provider_sid"].as_str().unwrap().to_string());
    }
    // p1's two adopted, one each; p2's two sent again, once each.
    let mut created: Vec<String> = fake.created().into_iter().map(|c| c.sid).collect();
    created.sort();
    sids.sort();
    assert_eq!(sids, created);
    assert_eq!(fake.create_calls_to(PATIENT), 2, "nothing sent twice");
    assert_eq!(
        fake.create_calls_to(OTHER),
        4,
        "two dropped, then each once"
    );
    assert_eq!(fake.create_calls_to(THIRD), 2, "nothing sent twice");
}

/// Twilio's clock a few seconds behind ours: the message an attempt created is dated before the
/// attempt began, and is still found and adopted, not sent again (found by review: with the clock
/// 1, 2 or 5 seconds behind, every such lookup sent a duplicate).
async fn a_match_dated_by_a_twilio_clock_a_little_behind_is_adopted(backend: Backend) {
    let (app, clock) = live(backend, TestConfig::new()).await;
    let fake = app.fake.as_ref().unwrap();
    fake.clock_behind(Duration::seconds(5));
    fake.script(PATIENT, vec![Fault::AcceptNoAnswer]);
    let id = app.notify_ok(receipt("sms")).await;
    assert_eq!(app.dispatch().await.retried, 1);
    clock.advance(Duration::minutes(5));
    assert_eq!(app.dispatch().await.adopted, 1);
    let m = app.message(&id).await;
    assert_eq!(m["provider_sid"], fake.created()[0].sid.as_str(), "{m}");
    assert_eq!(fake.create_calls_to(PATIENT), 1);
}

/// Twilio answering two sends with one SID (real SIDs are unique; a proxy or a fake may not be):
/// the second message was taken, so it ends `unknown` naming the SID, and is never sent again
/// (found by review: it stayed `sending`, its lookup passed over its own SID as another's, and it
/// went three times). A success with an empty SID is looked up like an unreadable answer.
async fn a_sid_answered_twice_is_never_sent_again(backend: Backend) {
    let (app, clock) = live(backend, TestConfig::new()).await;
    let fake = app.fake.as_ref().unwrap();
    const OTHER: &str = "+14155552672";
    app.consent("p2", OTHER).await;
    fake.next_sid("SMdup0000000000000000000000000000");
    fake.next_sid("SMdup0000000000000000000000000000");
    let first = app.notify_ok(receipt("sms")).await;
    assert_eq!(app.dispatch().await.sent, 1);
    let mut other = receipt("sms");
    other["user_id"] = json!("p2");
    let second = app.notify_ok(other).await;
    app.dispatch().await;
    for _ in 0..4 {
        clock.advance(Duration::minutes(20));
        app.dispatch().await;
    }
    assert_eq!(app.message(&first).await["status"], "sent");
    let m = app.message(&second).await;
    assert_eq!(m["status"], "unknown", "{m}");
    assert!(
        m["error_message"].as_str().unwrap().contains("SMdup"),
        "{m}"
    );
    assert_eq!(fake.create_calls_to(OTHER), 1, "never sent again");
}

/// On its last attempt, a message whose outcome is unknown is still looked up once the lookup can
/// be made: a lookup not made (credentials refused here) spends nothing and does not end it
/// `unknown` (found by review: it ended `unknown` at once, without a lookup).
async fn a_lookup_not_made_on_the_last_attempt_waits_instead_of_ending_unknown(backend: Backend) {
    let (app, clock) = live(backend, TestConfig::new().set("DISPATCH_MAX_ATTEMPTS", "1")).await;
    let fake = app.fake.as_ref().unwrap();
    // Twilio took it and never answered, on the only attempt.
    fake.script(PATIENT, vec![Fault::AcceptNoAnswer]);
    let id = app.notify_ok(receipt("sms")).await;
    assert_eq!(app.dispatch().await.retried, 1);
    fake.refuse_lookups(2);
    for _ in 0..2 {
        clock.advance(Duration::minutes(20));
        app.dispatch().await;
        assert_eq!(app.message(&id).await["status"], "queued");
    }
    clock.advance(Duration::minutes(20));
    assert_eq!(app.dispatch().await.adopted, 1);
    let m = app.message(&id).await;
    assert_eq!(m["provider_sid"], fake.created()[0].sid.as_str(), "{m}");
    assert_eq!(fake.create_calls_to(PATIENT), 1);
}

/// A message whose earlier attempt is looked up, found nowhere, and then held by quiet hours waits
/// as a plain queued message: its lookup mark goes, so its twins do not wait for it through the
/// night (found by review: the mark stayed).
async fn a_message_found_nowhere_and_then_held_is_no_longer_looked_up(backend: Backend) {
    // 03:00 UTC, inside quiet hours.
    let night = chrono::DateTime::parse_from_rfc3339("2027-01-12T03:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let clock = ManualClock::new(night);
    let fake = FakeTwilio::start().await;
    let config = TestConfig::new()
        .live(&fake)
        .set("QUIET_HOURS", "21:00-08:00")
        .set("DISPATCH_RATE_PER_SECOND", "0")
        .with_clock(&clock);
    let app = TestApp::spawn_with(backend, config).await;
    app.consent("p1", PATIENT).await;
    let id = app
        .notify_ok(json!({"user_id": "p1", "template": "follow_up_reminder",
            "variables": {"due_at": "2027-01-20", "link": "/follow-ups/f1"}}))
        .await;
    // As a process that died mid-send leaves it: an attempt whose outcome is unknown.
    app.db
        .execute(&format!(
            "UPDATE messages SET lookup_needed = TRUE, attempts = 1, to_number = '{}', \
             to_index = '{}', attempt_body = '{}', attempt_started_at = '{}' WHERE id = '{id}'",
            test_vault().seal(PATIENT),
            test_vault().blind(PATIENT),
            test_vault().seal("the body of that attempt"),
            clock.now().to_rfc3339()
        ))
        .await
        .unwrap();
    assert!(app.stored_message(&id).await.lookup_needed);
    assert_eq!(app.dispatch().await.deferred, 1);
    let lookups = fake.requests().iter().filter(|r| r.method == "GET").count();
    assert_eq!(lookups, 1, "looked up once");
    let m = app.stored_message(&id).await;
    assert_eq!(m.status.to_string(), "queued");
    assert!(!m.lookup_needed, "found nowhere: no longer looked up");
    assert_eq!(fake.create_calls_to(PATIENT), 0, "held, not sent");
}
