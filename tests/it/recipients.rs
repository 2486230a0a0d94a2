//! Right person, right number: codes bound to the number they went to, replies attributed to the
//! right patient on a shared number, reminders that follow their appointment's patient, and a STOP
//! honoured up to the provider call. Each case failed before its fix.

use crate::common::*;
use chrono::{DateTime, Duration, Utc};
use prism_messaging::clock::ManualClock;
use serde_json::{json, Value};

both_backends!(
    a_code_for_someone_elses_account_goes_to_their_number,
    a_number_on_file_without_its_blind_index_is_read_and_still_gets_the_code,
    a_user_without_a_number_gets_the_code_at_the_number_named,
    verification_marks_only_the_number_on_file_verified,
    a_verification_that_failed_to_record_leaves_the_code_usable,
    unknown_users_answer_like_known_ones,
    forwarded_addresses_take_the_last_hop_and_group_ipv6,
    letters_in_a_number_are_refused,
    a_reply_on_a_shared_number_belongs_to_the_last_patient_messaged,
    a_reassigned_appointment_reminds_its_new_patient_only,
    an_appointment_moved_away_and_back_is_reminded_again,
    a_stop_during_pacing_stops_the_remaining_sends,
    a_replayed_carrier_opt_out_does_not_revoke_again,
);

const VICTIM: &str = "+919876543210";
const ATTACKER: &str = "+447911123456";

async fn send_otp(app: &TestApp, user: &str, phone: &str, purpose: &str) -> (u16, Value) {
    let r = app
        .client
        .post(app.url("/api/messaging/send-otp"))
        .json(&json!({"user_id": user, "phone_number": phone, "purpose": purpose}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn verify(app: &TestApp, body: Value) -> (u16, Value) {
    let r = app
        .client
        .post(app.url("/api/messaging/verify-otp"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// The dev outbox's messages, newest first: (to, body).
async fn outbox(app: &TestApp) -> Vec<(String, String)> {
    app.outbox_json().await["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["to"].as_str().unwrap().to_string(),
                m["body"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn a_code_for_someone_elses_account_goes_to_their_number(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        TestConfig::new().set("OTP_RESEND_COOLDOWN_SECONDS", "0"),
    )
    .await;
    app.consent("victim", VICTIM).await;
    // The attacker names their own number for the victim's account.
    let (status, answer) = send_otp(&app, "victim", ATTACKER, "login").await;
    assert_eq!(status, 200);
    // Exactly what any send answers: no hint of the number on file.
    let (_, plain) = send_otp(&app, "nobody-on-file", ATTACKER, "login").await;
    assert_eq!(answer, plain);
    assert_eq!(
        answer["sent_to"], "+44******3456",
        "the number named, never the one on file"
    );
    let sent = outbox(&app).await;
    assert_eq!(sent.len(), 2);
    let (to, body) = &sent[1];
    assert_eq!(to, VICTIM, "the code went to the number on file");
    let code = code_in(body);
    // Bound to the victim's number: naming the attacker's number never verifies.
    let (status, _) = verify(
        &app,
        json!({"user_id": "victim", "otp_code": code, "purpose": "login", "phone_number": ATTACKER}),
    )
    .await;
    assert_eq!(status, 400);
    let (status, body) = verify(
        &app,
        json!({"user_id": "victim", "otp_code": code, "purpose": "login", "phone_number": VICTIM}),
    )
    .await;
    assert_eq!((status, &body["phone_number"]), (200, &json!(VICTIM)));
}

/// A number on file whose blind index is missing (not written by this service: every write of a
/// number writes its index) is not guessed at: PostgreSQL's batch, which routes by the index,
/// writes nothing and the service reads the number and issues again; the code still goes to the
/// number on file, once.
async fn a_number_on_file_without_its_blind_index_is_read_and_still_gets_the_code(
    backend: Backend,
) {
    let app = TestApp::spawn_with(
        backend,
        TestConfig::new().set("OTP_RESEND_COOLDOWN_SECONDS", "0"),
    )
    .await;
    app.consent("victim", VICTIM).await;
    let unindex = "UPDATE messaging_consent SET phone_index = NULL WHERE user_id = 'victim'";
    let changed = app.db.execute(unindex).await.unwrap();
    assert_eq!(changed, 1);
    let (status, _) = send_otp(&app, "victim", ATTACKER, "login").await;
    assert_eq!(status, 200);
    let sent = outbox(&app).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, VICTIM, "the code went to the number on file");
}

async fn a_user_without_a_number_gets_the_code_at_the_number_named(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (status, _) = send_otp(&app, "new-user", ATTACKER, "login").await;
    assert_eq!(status, 200);
    let (to, body) = outbox(&app).await.remove(0);
    assert_eq!(to, ATTACKER);
    let (status, answer) = verify(
        &app,
        json!({"user_id": "new-user", "otp_code": code_in(&body), "purpose": "login"}),
    )
    .await;
    assert_eq!(
        (status, answer),
        (
            200,
            json!({"success": true, "valid": true, "phone_number": ATTACKER})
        )
    );
}

async fn verification_marks_only_the_number_on_file_verified(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        TestConfig::new().set("OTP_RESEND_COOLDOWN_SECONDS", "0"),
    )
    .await;
    let token = app.user_token("p1");
    app.consent("p1", VICTIM).await;
    let prefs = |app: &TestApp| {
        let token = token.clone();
        let url = app.url("/api/messaging/preferences");
        let client = app.client.clone();
        async move {
            let v: Value = client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["preferences"].clone()
        }
    };
    assert_eq!(prefs(&app).await["phone_verified_at"], Value::Null);

    // `verification` goes to the number named; a right code for another number verifies that
    // number for the caller but never touches preferences.
    send_otp(&app, "p1", ATTACKER, "verification").await;
    let (to, body) = outbox(&app).await.remove(0);
    assert_eq!(to, ATTACKER);
    let (status, answer) = verify(
        &app,
        json!({"user_id": "p1", "otp_code": code_in(&body), "purpose": "verification"}),
    )
    .await;
    assert_eq!((status, &answer["phone_number"]), (200, &json!(ATTACKER)));
    let p = prefs(&app).await;
    assert_eq!(
        (p["phone_number"].clone(), p["phone_verified_at"].clone()),
        (json!(VICTIM), Value::Null)
    );

    // The number on file: verified, audited with source `otp`.
    send_otp(&app, "p1", VICTIM, "verification").await;
    let (to, body) = outbox(&app).await.remove(0);
    assert_eq!(to, VICTIM);
    let (status, _) = verify(
        &app,
        json!({"user_id": "p1", "otp_code": code_in(&body), "purpose": "verification"}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(prefs(&app).await["phone_verified_at"].is_string());
    let audit = app.state.consent.audit_trail("p1").await.unwrap();
    let last = audit.last().unwrap();
    assert_eq!(
        (last.field.as_str(), last.source.as_str()),
        ("phone_verified_at", "otp")
    );

    // A new number is not verified.
    app.consent("p1", ATTACKER).await;
    assert_eq!(prefs(&app).await["phone_verified_at"], Value::Null);

    // A user with no record: verifying never creates one.
    send_otp(&app, "stranger", VICTIM, "verification").await;
    let (_, body) = outbox(&app).await.remove(0);
    let (status, _) = verify(
        &app,
        json!({"user_id": "stranger", "otp_code": code_in(&body), "purpose": "verification"}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(app.state.consent.get("stranger").await.unwrap().is_none());
}

/// Using a `verification` code and recording its number verified are one write: when the
/// second cannot be stored, the first is not either, and the patient's code still works once.
async fn a_verification_that_failed_to_record_leaves_the_code_usable(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.consent("p1", VICTIM).await;
    send_otp(&app, "p1", VICTIM, "verification").await;
    let (_, body) = outbox(&app).await.remove(0);
    let right = json!({"user_id": "p1", "otp_code": code_in(&body), "purpose": "verification"});

    app.db.fail_inserts_into("consent_audit_trail").await;
    assert_eq!(verify(&app, right.clone()).await.0, 500);
    let record = app
        .state
        .store
        .get_otp("p1", "verification")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.used_at, None, "the code is not used up");
    let consent = app.state.consent.get("p1").await.unwrap().unwrap();
    assert_eq!(consent.phone_verified_at, None);

    app.db.heal_inserts_into("consent_audit_trail").await;
    let (status, answer) = verify(&app, right.clone()).await;
    assert_eq!((status, &answer["phone_number"]), (200, &json!(VICTIM)));
    let consent = app.state.consent.get("p1").await.unwrap().unwrap();
    assert!(consent.phone_verified_at.is_some());
    let audit = app.state.consent.audit_trail("p1").await.unwrap();
    let verified: Vec<_> = audit
        .iter()
        .filter(|a| a.field == "phone_verified_at")
        .collect();
    assert_eq!(verified.len(), 1, "one audit row: the failed try left none");
    // Still single-use.
    assert_eq!(verify(&app, right).await.0, 400);
}

async fn unknown_users_answer_like_known_ones(backend: Backend) {
    let clock = ManualClock::new(Utc::now());
    let app = TestApp::spawn_with(backend, TestConfig::new().with_clock(&clock)).await;
    send_otp(&app, "known", VICTIM, "login").await;
    let wrong = |user: &str| json!({"user_id": user, "otp_code": "000000", "purpose": "login"});
    let mut known = vec![];
    let mut unknown = vec![];
    for _ in 0..6 {
        known.push(verify(&app, wrong("known")).await.0);
        unknown.push(verify(&app, wrong("unknown")).await.0);
    }
    assert_eq!(known, [400, 400, 400, 400, 400, 429]);
    assert_eq!(unknown, known, "a user with no code answers alike");
    // The count ends with the window of the first wrong try...
    clock.advance(Duration::seconds(601));
    assert_eq!(verify(&app, wrong("unknown")).await.0, 400);
    // ...or when a new code is sent.
    for _ in 0..5 {
        verify(&app, wrong("fresh")).await;
    }
    assert_eq!(verify(&app, wrong("fresh")).await.0, 429);
    assert_eq!(send_otp(&app, "fresh", ATTACKER, "login").await.0, 200);
    let code = code_in(&outbox(&app).await[0].1);
    let (status, _) = verify(
        &app,
        json!({"user_id": "fresh", "otp_code": code, "purpose": "login"}),
    )
    .await;
    assert_eq!(status, 200);
}

async fn forwarded_addresses_take_the_last_hop_and_group_ipv6(backend: Backend) {
    let config = TestConfig::new()
        .set("TRUST_FORWARDED_FOR", "true")
        .set("OTP_RESEND_COOLDOWN_SECONDS", "0")
        .set("OTP_MAX_SENDS_PER_IP_PER_HOUR", "2");
    let app = TestApp::spawn_with(backend, config).await;
    let send = |user: &'static str, phone: &'static str, lines: Vec<String>| {
        let mut request = app
            .client
            .post(app.url("/api/messaging/send-otp"))
            .json(&json!({"user_id": user, "phone_number": phone, "purpose": "login"}));
        for line in lines {
            request = request.header("x-forwarded-for", line);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    // A client forges a fresh first line each time; the proxy's appended line is the client.
    let forged = |i: u8| vec![format!("10.0.0.{i}"), "203.0.113.9:4711".to_string()];
    assert_eq!(send("a", "+919876543201", forged(1)).await, 200);
    assert_eq!(send("b", "+919876543202", forged(2)).await, 200);
    assert_eq!(send("c", "+919876543203", forged(3)).await, 429);
    // IPv6: the whole /64 is one client.
    let v6 = |addr: &str| vec![format!("[{addr}]:443")];
    assert_eq!(send("d", "+919876543204", v6("2001:db8:1:2::1")).await, 200);
    assert_eq!(
        send("e", "+919876543205", v6("2001:db8:1:2::ffff")).await,
        200
    );
    assert_eq!(
        send("f", "+919876543206", v6("2001:db8:1:2:abcd::9")).await,
        429
    );
    assert_eq!(send("g", "+919876543207", v6("2001:db8:1:3::1")).await, 200);
}

async fn letters_in_a_number_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for number in ["+91987654321O", "+1 800 FLOWERS", "+14155552671 ext. 12"] {
        let r = app
            .put_preferences("p1", json!({"phone_number": number, "sms_consent": true}))
            .await;
        assert_eq!(r.status(), 400, "{number}");
        assert_eq!(error_code(r).await, "invalid_phone");
        let (status, _) = send_otp(&app, "p1", number, "login").await;
        assert_eq!(status, 400, "{number}");
    }
    assert!(app.state.consent.get("p1").await.unwrap().is_none());
    assert!(outbox(&app).await.is_empty());
}

async fn a_reply_on_a_shared_number_belongs_to_the_last_patient_messaged(backend: Backend) {
    let clock = ManualClock::new(Utc::now());
    let app = TestApp::spawn_live(backend, TestConfig::new().with_clock(&clock)).await;
    // A family phone: "a-parent" sorts first.
    app.consent("a-parent", VICTIM).await;
    app.consent("b-child", VICTIM).await;
    app.incoming("SMr1", VICTIM, "Who is this?").await;
    app.notify_ok(reminder("b-child")).await;
    assert_eq!(app.dispatch().await.sent, 1);
    clock.advance(Duration::milliseconds(10));
    app.incoming("SMr2", VICTIM, "the pain after my knee surgery")
        .await;
    clock.advance(Duration::seconds(3));
    let inbox: Value = app.get_json("/api/inbound", Some(API_KEY)).await;
    let messages = inbox["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["user_id"], Value::Null, "never a guess");
    assert_eq!(messages[0]["user_ids"], json!(["a-parent", "b-child"]));
    assert_eq!(messages[1]["user_id"], "b-child");
    assert_eq!(messages[1]["user_ids"], json!(["a-parent", "b-child"]));

    // The last message that went, not the last one created: the child's reminder waits while
    // the parent's code goes at once, then the reminder goes; and a message for the parent that
    // has not gone yet changes nothing.
    app.notify_ok(reminder("b-child")).await;
    clock.advance(Duration::milliseconds(10));
    let (status, _) = send_otp(&app, "a-parent", VICTIM, "login").await;
    assert_eq!(status, 200);
    clock.advance(Duration::milliseconds(10));
    assert_eq!(app.dispatch().await.sent, 1);
    clock.advance(Duration::milliseconds(10));
    app.notify_ok(reminder("a-parent")).await;
    clock.advance(Duration::milliseconds(10));
    app.incoming("SMr3", VICTIM, "yes I will be there").await;
    clock.advance(Duration::seconds(3));
    let inbox: Value = app.get_json("/api/inbound", Some(API_KEY)).await;
    let messages = inbox["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[2]["user_id"], "b-child");
}

/// 2027-01-12 04:00 UTC.
fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2027-01-12T04:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

async fn put(app: &TestApp, path: &str, body: Value) {
    let r = app
        .client
        .put(app.url(path))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

async fn sweep_24h(app: &TestApp) -> (i64, i64) {
    let r: Value = app
        .client
        .post(app.url("/cron/appointment-reminders-24h"))
        .bearer_auth(CRON_SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (r["due"].as_i64().unwrap(), r["queued"].as_i64().unwrap())
}

/// (user, status, reason) of every message, sorted.
async fn reminders_of(app: &TestApp, users: &[&str]) -> Vec<(String, String, Option<String>)> {
    let mut all = vec![];
    for user in users {
        for m in app.state.outbox.history(user, 100).await.unwrap() {
            all.push((
                m.user_id,
                m.status.to_string(),
                m.reason.map(|r| r.to_string()),
            ));
        }
    }
    all.sort();
    all
}

async fn a_reassigned_appointment_reminds_its_new_patient_only(backend: Backend) {
    let clock = ManualClock::new(t0());
    let app = TestApp::spawn_with(backend, TestConfig::new().with_clock(&clock)).await;
    app.consent("p1", VICTIM).await;
    app.consent("p2", ATTACKER).await;
    let starts = (t0() + Duration::hours(20)).to_rfc3339();
    put(
        &app,
        "/api/appointments/a1",
        json!({"user_id": "p1", "starts_at": starts}),
    )
    .await;
    assert_eq!(sweep_24h(&app).await, (1, 1));
    // The host app moves the appointment to another patient before the reminder goes.
    put(
        &app,
        "/api/appointments/a1",
        json!({"user_id": "p2", "starts_at": starts}),
    )
    .await;
    assert_eq!(
        sweep_24h(&app).await,
        (1, 1),
        "the new patient's reminder is planned"
    );
    let report = app.dispatch().await;
    assert_eq!((report.sent, report.skipped), (1, 1));
    assert_eq!(
        reminders_of(&app, &["p1", "p2"]).await,
        vec![
            (
                "p1".into(),
                "skipped".into(),
                Some("appointment_reassigned".into())
            ),
            ("p2".into(), "delivered".into(), None),
        ]
    );
    let sent = outbox(&app).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, ATTACKER, "only the new patient heard of it");
    assert_eq!(sweep_24h(&app).await, (0, 0));
}

async fn an_appointment_moved_away_and_back_is_reminded_again(backend: Backend) {
    let clock = ManualClock::new(t0());
    let app = TestApp::spawn_with(backend, TestConfig::new().with_clock(&clock)).await;
    app.consent("p1", VICTIM).await;
    let starts = (t0() + Duration::hours(20)).to_rfc3339();
    let later = (t0() + Duration::days(3)).to_rfc3339();
    put(
        &app,
        "/api/appointments/a1",
        json!({"user_id": "p1", "starts_at": starts}),
    )
    .await;
    assert_eq!(sweep_24h(&app).await, (1, 1));
    put(
        &app,
        "/api/appointments/a1",
        json!({"user_id": "p1", "starts_at": later}),
    )
    .await;
    assert_eq!(app.dispatch().await.skipped, 1, "skipped as rescheduled");
    put(
        &app,
        "/api/appointments/a1",
        json!({"user_id": "p1", "starts_at": starts}),
    )
    .await;
    assert_eq!(
        sweep_24h(&app).await,
        (1, 1),
        "back at its time: reminded again"
    );
    assert_eq!(app.dispatch().await.sent, 1);
    assert_eq!(sweep_24h(&app).await, (0, 0), "once it went, never twice");

    // Cancelled and restored.
    put(
        &app,
        "/api/appointments/a2",
        json!({"user_id": "p1", "starts_at": starts}),
    )
    .await;
    assert_eq!(sweep_24h(&app).await, (1, 1));
    put(
        &app,
        "/api/appointments/a2",
        json!({"user_id": "p1", "starts_at": starts, "status": "cancelled"}),
    )
    .await;
    assert_eq!(sweep_24h(&app).await, (0, 0));
    put(
        &app,
        "/api/appointments/a2",
        json!({"user_id": "p1", "starts_at": starts}),
    )
    .await;
    assert_eq!(sweep_24h(&app).await, (1, 1), "restored: reminded");
    assert_eq!(app.dispatch().await.sent, 1);
    assert_eq!(outbox(&app).await.len(), 2);
}

async fn a_stop_during_pacing_stops_the_remaining_sends(backend: Backend) {
    // One send a second from the sender: a round of four takes about three seconds.
    let app = TestApp::spawn_live(
        backend,
        TestConfig::new().set("DISPATCH_RATE_PER_SECOND", "1"),
    )
    .await;
    let fake = app.fake.as_ref().unwrap();
    app.consent("p1", VICTIM).await;
    for i in 0..4 {
        app.notify_ok(json!({
            "user_id": "p1",
            "template": "payment_received",
            "variables": {"amount": format!("INR {i}.00"), "date": "2027-01-12"},
        }))
        .await;
    }
    let dispatcher = app.state.dispatcher.clone();
    let round = tokio::spawn(async move { dispatcher.run_once().await.unwrap() });
    // As soon as the first is out, the patient texts STOP.
    let started = std::time::Instant::now();
    while fake.created_count() == 0 {
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    app.incoming("SMstop", VICTIM, "STOP").await;
    round.await.unwrap();
    // Whatever was waiting for its slot is given back and skipped, never sent.
    app.dispatch().await;
    let sent = fake.created_count();
    assert!(sent <= 2, "{sent} sent after STOP");
    let all = reminders_of(&app, &["p1"]).await;
    let skipped = all
        .iter()
        .filter(|(_, status, _)| status == "skipped")
        .count();
    assert_eq!(sent + skipped, 4, "{all:?}");
    assert!(skipped >= 2, "{all:?}");
}

async fn a_replayed_carrier_opt_out_does_not_revoke_again(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    app.consent("p1", "+14155552671").await;
    let id = app.notify_ok(reminder("p1")).await;
    assert_eq!(app.dispatch().await.sent, 1);
    let sid = app.message(&id).await["provider_sid"]
        .as_str()
        .unwrap()
        .to_string();
    let callback = [
        ("MessageSid", sid.as_str()),
        ("MessageStatus", "failed"),
        ("ErrorCode", "21610"),
        ("AccountSid", ACCOUNT_SID),
    ];
    let r = app
        .twilio_webhook("/webhooks/twilio/status", &callback, None)
        .await;
    assert_eq!(r.status(), 200);
    assert!(
        !app.state
            .consent
            .get("p1")
            .await
            .unwrap()
            .unwrap()
            .sms_consent
    );
    // The patient opts back in.
    app.incoming("SMstart", "+14155552671", "START").await;
    assert!(
        app.state
            .consent
            .get("p1")
            .await
            .unwrap()
            .unwrap()
            .sms_consent
    );
    // A replay of the same signed callback changes nothing.
    let r = app
        .twilio_webhook("/webhooks/twilio/status", &callback, None)
        .await;
    assert_eq!(r.status(), 200);
    assert!(
        app.state
            .consent
            .get("p1")
            .await
            .unwrap()
            .unwrap()
            .sms_consent
    );
    let id = app.notify_ok(reminder("p1")).await;
    assert_eq!(app.dispatch().await.sent, 1, "{}", app.message(&id).await);
}
