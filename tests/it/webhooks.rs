//! Twilio's webhooks on both backends: signatures, delivery status that never goes backwards,
//! incoming messages and keywords, opt-outs at send time, and the WhatsApp 24-hour window.

use crate::common::*;
use chrono::{Duration, Utc};
use prism_messaging::clock::ManualClock;
use serde_json::{json, Value};

both_backends!(
    signatures_are_required_and_checked,
    a_signed_form_holding_a_nul_is_refused_and_changes_nothing,
    status_callbacks_only_move_forward,
    failed_is_final,
    unknown_message_sid_is_acknowledged,
    carrier_opt_out_revokes_consent,
    a_carrier_opt_out_after_a_final_status_is_seen_on_its_replay,
    a_parked_carrier_opt_out_behind_a_final_status_is_seen_on_its_replay,
    start_gives_back_only_what_an_opt_out_took,
    a_users_change_during_a_start_is_not_overwritten,
    a_stop_while_a_user_is_erased_leaves_them_erased,
    a_carrier_opt_out_that_failed_to_record_is_recorded_on_the_retry,
    duplicate_incoming_is_stored_once,
    keywords_in_every_family_and_case,
    stop_holds_queued_messages_until_start,
    advanced_opt_out_gets_one_reply,
    whatsapp_window_closed_falls_back_to_sms_or_skips,
    inbound_inbox_for_the_host_app,
    dev_inbound_in_mock_mode,
    inbox_pages_never_split_an_instant,
);

const PATIENT: &str = "+14155552671";

async fn sent_message(app: &TestApp, user: &str) -> (String, String) {
    app.consent(user, PATIENT).await;
    let id = app.notify_ok(reminder(user)).await;
    assert_eq!(app.dispatch().await.sent, 1);
    let m = app.message(&id).await;
    (id, m["provider_sid"].as_str().unwrap().to_string())
}

async fn status(app: &TestApp, sid: &str, status: &str, error_code: Option<&str>) -> u16 {
    let mut params = vec![
        ("MessageSid", sid),
        ("MessageStatus", status),
        ("AccountSid", ACCOUNT_SID),
    ];
    if let Some(code) = error_code {
        params.push(("ErrorCode", code));
    }
    app.twilio_webhook("/webhooks/twilio/status", &params, None)
        .await
        .status()
        .as_u16()
}

async fn sms_consent(app: &TestApp, user: &str) -> bool {
    app.state
        .store
        .get_consent(user)
        .await
        .unwrap()
        .unwrap()
        .sms_consent
}

async fn sms_opted_out(app: &TestApp) -> bool {
    app.state
        .store
        .is_opted_out(PATIENT, prism_messaging::store::Channel::Sms)
        .await
        .unwrap()
}

fn statuses(message: &Value) -> Vec<String> {
    message["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap().to_string())
        .collect()
}

async fn signatures_are_required_and_checked(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    let (id, sid) = sent_message(&app, "p1").await;
    let path = "/webhooks/twilio/status";
    let params = [("MessageSid", sid.as_str()), ("MessageStatus", "delivered")];
    let owned: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let sign = |url: &str| prism_messaging::provider::signature::compute(AUTH_TOKEN, url, &owned);

    // Missing, wrong URL, wrong token, and a tampered parameter: 403, nothing changes.
    assert_eq!(
        app.twilio_webhook(path, &params, Some("")).await.status(),
        403
    );
    let wrong_url = sign(&format!("{PUBLIC_URL}/webhooks/twilio/incoming"));
    assert_eq!(
        app.twilio_webhook(path, &params, Some(&wrong_url))
            .await
            .status(),
        403
    );
    let wrong_token = prism_messaging::provider::signature::compute(
        "another-token",
        &format!("{PUBLIC_URL}{path}"),
        &owned,
    );
    assert_eq!(
        app.twilio_webhook(path, &params, Some(&wrong_token))
            .await
            .status(),
        403
    );
    let good = sign(&format!("{PUBLIC_URL}{path}"));
    let tampered = [("MessageSid", sid.as_str()), ("MessageStatus", "failed")];
    let r = app.twilio_webhook(path, &tampered, Some(&good)).await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "forbidden");
    assert_eq!(app.message(&id).await["status"], "sent");

    // Right: with or without the scheme's default port.
    let with_port = sign(&format!("{}:443{path}", PUBLIC_URL));
    assert_eq!(
        app.twilio_webhook(path, &params, Some(&with_port))
            .await
            .status(),
        200
    );
    assert_eq!(app.message(&id).await["status"], "delivered");

    // No token configured: the webhooks cannot verify anything.
    let unconfigured = TestApp::spawn(backend).await;
    let r = unconfigured.twilio_webhook(path, &params, None).await;
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(r).await, "not_configured");
}

/// No Twilio field holds a NUL character, and PostgreSQL cannot store one in text: a signed form
/// with one is refused (400) before anything is applied, on both backends alike (found by review:
/// on PostgreSQL a STOP's opt-out was applied, then the reply failed to store, 500, on every
/// retry).
async fn a_signed_form_holding_a_nul_is_refused_and_changes_nothing(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    let (id, sid) = sent_message(&app, "p1").await;
    let incoming = |sid: &'static str, opt_out: &'static str| {
        [
            ("MessageSid", sid),
            ("From", PATIENT),
            ("To", SMS_SENDER),
            ("Body", "STOP"),
            ("AccountSid", ACCOUNT_SID),
            ("OptOutType", opt_out),
        ]
    };
    for params in [incoming("SMnul1", "STOP\0"), incoming("SM\0nul2", "STOP")] {
        let r = app
            .twilio_webhook("/webhooks/twilio/incoming", &params, None)
            .await;
        assert_eq!(r.status(), 400, "{params:?}");
        assert_eq!(error_code(r).await, "invalid_form");
    }
    let r = app
        .twilio_webhook(
            "/webhooks/twilio/status",
            &[
                ("MessageSid", sid.as_str()),
                ("MessageStatus", "delivered\0"),
            ],
            None,
        )
        .await;
    assert_eq!(r.status(), 400);
    assert!(sms_consent(&app, "p1").await);
    assert!(!sms_opted_out(&app).await);
    assert_eq!(app.message(&id).await["status"], "sent");
    assert!(app
        .db
        .text_pairs("SELECT id, id FROM incoming_messages")
        .await
        .is_empty());
}

async fn status_callbacks_only_move_forward(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    let (id, sid) = sent_message(&app, "p1").await;
    assert_eq!(status(&app, &sid, "delivered", None).await, 200);
    // Late and repeated callbacks change nothing.
    assert_eq!(status(&app, &sid, "sent", None).await, 200);
    assert_eq!(status(&app, &sid, "sending", None).await, 200);
    assert_eq!(status(&app, &sid, "delivered", None).await, 200);
    let m = app.message(&id).await;
    assert_eq!(m["status"], "delivered");
    assert_eq!(statuses(&m), ["sending", "sent", "delivered"]);
    // read is further; a failure after delivery is not.
    status(&app, &sid, "read", None).await;
    status(&app, &sid, "undelivered", Some("30003")).await;
    let m = app.message(&id).await;
    assert_eq!(m["status"], "read");
}

async fn failed_is_final(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    let (id, sid) = sent_message(&app, "p1").await;
    status(&app, &sid, "undelivered", Some("30003")).await;
    status(&app, &sid, "delivered", None).await;
    status(&app, &sid, "sent", None).await;
    let m = app.message(&id).await;
    assert_eq!(m["status"], "undelivered");
    assert_eq!(m["error_code"], 30003);
    let undelivered = m["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["status"] == "undelivered")
        .unwrap()
        .clone();
    assert_eq!(undelivered["error_code"], 30003);
}

async fn unknown_message_sid_is_acknowledged(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    let r = app
        .twilio_webhook(
            "/webhooks/twilio/status",
            &[
                ("MessageSid", "SMdoesnotexist"),
                ("MessageStatus", "delivered"),
            ],
            None,
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "");
}

async fn carrier_opt_out_revokes_consent(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    let (id, sid) = sent_message(&app, "p1").await;
    assert_eq!(status(&app, &sid, "failed", Some("21610")).await, 200);
    assert_eq!(app.message(&id).await["status"], "failed");
    let consent = app.state.store.get_consent("p1").await.unwrap().unwrap();
    assert!(!consent.sms_consent);
    assert!(consent.whatsapp_consent, "only that channel");
    let last = app
        .state
        .store
        .consent_audit("p1")
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(
        (
            last.field.as_str(),
            last.new_value.as_deref(),
            last.source.as_str()
        ),
        ("sms_consent", Some("false"), "provider")
    );
    let id = app.notify_ok(reminder("p1")).await;
    app.dispatch().await;
    assert_eq!(app.message(&id).await["status"], "skipped");
    assert_eq!(
        app.fake.as_ref().unwrap().requests().len(),
        1,
        "nothing more sent"
    );
}

/// Writing a number's opt-out fails (a fault injected with a trigger): the 21610 callback is
/// answered 500 and changes nothing, so Twilio's retry finds it new and records both the opt-out
/// and the status. (Stored the other way round, the retry found the status seen and skipped the
/// opt-out for good.)
async fn a_carrier_opt_out_that_failed_to_record_is_recorded_on_the_retry(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    let (id, sid) = sent_message(&app, "p1").await;
    app.db.fail_inserts_into("opt_outs").await;
    assert_eq!(status(&app, &sid, "failed", Some("21610")).await, 500);
    assert_eq!(app.message(&id).await["status"], "sent", "nothing stored");
    app.db.heal_inserts_into("opt_outs").await;
    assert_eq!(status(&app, &sid, "failed", Some("21610")).await, 200);
    assert_eq!(app.message(&id).await["status"], "failed");
    let consent = app.state.store.get_consent("p1").await.unwrap().unwrap();
    assert!(!consent.sms_consent, "consent revoked on the retry");
    // A replay now changes nothing, and the number is not messaged again.
    assert_eq!(status(&app, &sid, "failed", Some("21610")).await, 200);
    let next = app.notify_ok(reminder("p1")).await;
    app.dispatch().await;
    assert_eq!(app.message(&next).await["status"], "skipped");
    assert_eq!(app.fake.as_ref().unwrap().requests().len(), 1);
}

async fn duplicate_incoming_is_stored_once(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    let first = app
        .incoming("SMdup1", PATIENT, "Can I move my appointment?")
        .await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["content-type"], "text/xml; charset=utf-8");
    let first = first.text().await.unwrap();
    let second = app
        .incoming("SMdup1", PATIENT, "Can I move my appointment?")
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(first, second);
    assert_eq!(
        first,
        r#"<?xml version="1.0" encoding="UTF-8"?><Response/>"#
    );
    let inbox = app
        .state
        .store
        .list_incoming(None, Utc::now() + Duration::days(1), 10)
        .await
        .unwrap();
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].from_number, PATIENT);
    assert_eq!(inbox[0].channel, "sms");
    // A repeated STOP is also answered once and audited once.
    app.consent("p1", PATIENT).await;
    let a = app
        .incoming("SMdup2", PATIENT, "STOP")
        .await
        .text()
        .await
        .unwrap();
    let b = app
        .incoming("SMdup2", PATIENT, "STOP")
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(a, b);
    assert!(a.contains("<Message>"));
    let audits = app.state.store.consent_audit("p1").await.unwrap();
    assert_eq!(
        audits.iter().filter(|a| a.source == "sms_keyword").count(),
        1
    );
}

/// A 21610 report for a message whose status cannot move (`undelivered` after `delivered`)
/// revokes consent; replayed after the patient's START, it must not revoke it again.
async fn a_carrier_opt_out_after_a_final_status_is_seen_on_its_replay(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    let (id, sid) = sent_message(&app, "p1").await;
    assert_eq!(status(&app, &sid, "delivered", None).await, 200);
    assert_eq!(status(&app, &sid, "undelivered", Some("21610")).await, 200);
    assert!(!sms_consent(&app, "p1").await, "the report revokes");
    let message = app.message(&id).await;
    assert_eq!(
        message["status"], "delivered",
        "the status does not move back"
    );
    assert_eq!(
        statuses(&message).last().unwrap(),
        "undelivered",
        "{message}"
    );
    start_then_replay_revokes_nothing(&app, &sid, "SMstart-replay").await;
}

/// p1 texts START (incoming `start_sid`), and the 21610 report for `sid` is replayed (Twilio's
/// retry, or anyone replaying the signed request): seen, so consent stays given back, and the
/// carrier revoked it once in all.
async fn start_then_replay_revokes_nothing(app: &TestApp, sid: &str, start_sid: &str) {
    app.incoming(start_sid, PATIENT, "START").await;
    assert!(sms_consent(app, "p1").await);
    assert_eq!(status(app, sid, "undelivered", Some("21610")).await, 200);
    assert!(
        sms_consent(app, "p1").await,
        "a replay revoked consent given back since"
    );
    let revocations = app
        .state
        .store
        .consent_audit("p1")
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.source == "provider")
        .count();
    assert_eq!(revocations, 1);
}

/// The same, for reports that beat the send: `delivered` and then `undelivered` with 21610 arrive
/// before the send recorded its SID, so both are parked and applied with the send. The report
/// that cannot move the status is kept in the history there too; replayed after the patient's
/// START, it must not revoke again (found by review: it did, on both backends).
async fn a_parked_carrier_opt_out_behind_a_final_status_is_seen_on_its_replay(backend: Backend) {
    let app = TestApp::spawn_live(
        backend,
        TestConfig::new().set("DISPATCH_RATE_PER_SECOND", "0"),
    )
    .await;
    let sid = "SM0000000000000000000000000021699";
    app.consent("p1", PATIENT).await;
    app.fake.as_ref().unwrap().next_sid(sid);
    assert_eq!(status(&app, sid, "delivered", None).await, 200, "parked");
    assert_eq!(
        status(&app, sid, "undelivered", Some("21610")).await,
        200,
        "parked"
    );
    let id = app.notify_ok(reminder("p1")).await;
    assert_eq!(app.dispatch().await.sent, 1);
    assert!(!sms_consent(&app, "p1").await, "the parked report revokes");
    let message = app.message(&id).await;
    assert_eq!(message["status"], "delivered", "{message}");
    assert_eq!(
        statuses(&message).last().unwrap(),
        "undelivered",
        "the report is in the history: {message}"
    );
    start_then_replay_revokes_nothing(&app, sid, "SMstart-parked").await;
}

/// START gives back only the consent an opt-out took. On a family phone: one user said no in
/// the app, one consented; after STOP and START the first still has no consent, and so does a
/// user whose STOP was followed by their own no in the app. A notification for either is not
/// sent.
async fn start_gives_back_only_what_an_opt_out_took(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    let preferences = |sms: bool| {
        json!({"phone_number": PATIENT, "sms_consent": sms, "whatsapp_consent": false,
               "marketing_consent": false})
    };
    for (user, sms) in [("parent", false), ("child", true), ("changed-mind", true)] {
        let r = app.put_preferences(user, preferences(sms)).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    // A YES with no STOP before it signs nobody up.
    app.incoming("SMyes-first", PATIENT, "YES").await;
    assert!(
        !sms_consent(&app, "parent").await,
        "YES gave consent the user refused in the app"
    );
    app.incoming("SMstop-family", PATIENT, "STOP").await;
    for user in ["parent", "child", "changed-mind"] {
        assert!(!sms_consent(&app, user).await, "{user}");
    }
    // After the STOP, this one turns SMS on and off again in the app: their own no is the last.
    for on in [true, false] {
        let r = app.put_preferences("changed-mind", preferences(on)).await;
        assert_eq!(r.status(), 200);
    }
    let reply = app
        .incoming("SMstart-family", PATIENT, "START")
        .await
        .text()
        .await
        .unwrap();
    assert!(reply.contains("subscribed to messages again"), "{reply}");
    assert!(
        sms_consent(&app, "child").await,
        "START gives back what STOP took"
    );
    assert!(
        !sms_consent(&app, "parent").await,
        "START signed up a user who said no in the app"
    );
    assert!(
        !sms_consent(&app, "changed-mind").await,
        "START overrode the user's own later no"
    );
    assert!(!sms_opted_out(&app).await);
    let keyword_changes = app
        .state
        .store
        .consent_audit("parent")
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.source == "sms_keyword")
        .count();
    assert_eq!(keyword_changes, 0, "the parent's consent was never touched");
    let parent = app.notify_ok(reminder("parent")).await;
    let child = app.notify_ok(reminder("child")).await;
    app.dispatch().await;
    assert_eq!(app.message(&parent).await["status"], "skipped");
    assert_eq!(app.message(&child).await["status"], "sent");
}

async fn keywords_in_every_family_and_case(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    app.consent("p1", PATIENT).await;
    let mut n = 0;
    let mut next_sid = || {
        n += 1;
        format!("SMkw{n}")
    };
    let stops = [
        "STOP",
        "stop",
        " Stop ",
        "STOPALL",
        "unsubscribe",
        "Cancel",
        "END",
        "quit",
        "REVOKE",
        "OptOut",
    ];
    let starts = ["START", "yes", "Unstop"];
    for (stop, start) in stops.iter().zip(starts.iter().cycle()) {
        let reply = app
            .incoming(&next_sid(), PATIENT, stop)
            .await
            .text()
            .await
            .unwrap();
        assert!(reply.contains("you are unsubscribed"), "{stop}: {reply}");
        // CANCEL is a stop word: a patient answering a reminder with it must not think the
        // appointment is cancelled.
        assert!(
            reply.contains("Your appointments are not changed"),
            "{reply}"
        );
        assert!(!sms_consent(&app, "p1").await, "{stop}");
        assert!(sms_opted_out(&app).await);
        let reply = app
            .incoming(&next_sid(), PATIENT, start)
            .await
            .text()
            .await
            .unwrap();
        assert!(
            reply.contains("subscribed to messages again"),
            "{start}: {reply}"
        );
        assert!(sms_consent(&app, "p1").await, "{start}");
        assert!(!sms_opted_out(&app).await);
    }
    for help in ["HELP", "help", "Info"] {
        let reply = app
            .incoming(&next_sid(), PATIENT, help)
            .await
            .text()
            .await
            .unwrap();
        assert!(
            reply.contains("Reply STOP to unsubscribe"),
            "{help}: {reply}"
        );
    }
    // Not a keyword: a sentence that contains one.
    let reply = app
        .incoming(&next_sid(), PATIENT, "please stop calling me")
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(
        reply,
        r#"<?xml version="1.0" encoding="UTF-8"?><Response/>"#
    );
    assert!(sms_consent(&app, "p1").await);
    let audits = app.state.store.consent_audit("p1").await.unwrap();
    assert!(audits
        .iter()
        .filter(|a| a.source == "sms_keyword")
        .all(|a| a.field == "sms_consent"));
    // A WhatsApp STOP touches only WhatsApp.
    app.incoming(&next_sid(), &format!("whatsapp:{PATIENT}"), "stop")
        .await;
    let c = app.state.store.get_consent("p1").await.unwrap().unwrap();
    assert!(c.sms_consent && !c.whatsapp_consent);
}

async fn stop_holds_queued_messages_until_start(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    app.consent("p1", PATIENT).await;
    let queued = app.notify_ok(reminder("p1")).await;
    app.incoming("SMstop", PATIENT, "Stop").await;
    app.dispatch().await;
    let m = app.message(&queued).await;
    assert_eq!(
        (m["status"].as_str(), m["reason"].as_str()),
        (Some("skipped"), Some("opted_out"))
    );
    assert!(app.fake.as_ref().unwrap().requests().is_empty());
    app.incoming("SMstart", PATIENT, "START").await;
    let id = app.notify_ok(reminder("p1")).await;
    app.dispatch().await;
    assert_eq!(app.message(&id).await["status"], "sent");
    assert_eq!(app.fake.as_ref().unwrap().requests().len(), 1);
}

async fn advanced_opt_out_gets_one_reply(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    app.consent("p1", PATIENT).await;
    let r = app
        .twilio_webhook(
            "/webhooks/twilio/incoming",
            &[
                ("MessageSid", "SMaoo"),
                ("From", PATIENT),
                ("To", SMS_SENDER),
                ("Body", "stop"),
                ("OptOutType", "STOP"),
            ],
            None,
        )
        .await;
    assert_eq!(
        r.text().await.unwrap(),
        r#"<?xml version="1.0" encoding="UTF-8"?><Response/>"#
    );
    assert!(
        !sms_consent(&app, "p1").await,
        "the change is still recorded"
    );
    let stored = app
        .state
        .store
        .incoming_by_sid("SMaoo")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (stored.keyword.as_deref(), stored.opt_out_type.as_deref()),
        (Some("stop"), Some("STOP"))
    );
}

async fn whatsapp_window_closed_falls_back_to_sms_or_skips(backend: Backend) {
    let clock = ManualClock::new(Utc::now());
    let config = TestConfig::new().with_clock(&clock);
    let app = TestApp::spawn_live(backend, config).await;
    let fake = app.fake.as_ref().unwrap();
    app.consent("both", PATIENT).await;
    app.put_preferences(
        "wa-only",
        json!({"phone_number": "+14155552672", "whatsapp_consent": true}),
    )
    .await;
    app.incoming("SMw1", &format!("whatsapp:{PATIENT}"), "hi")
        .await;
    app.incoming("SMw2", "whatsapp:+14155552672", "hi").await;

    // 23 hours later the window is open: free text on WhatsApp.
    clock.advance(Duration::hours(23));
    let whatsapp = |user: &str| {
        let mut body = reminder(user);
        body["channel"] = json!("whatsapp");
        body
    };
    app.notify_ok(whatsapp("both")).await;
    app.dispatch().await;
    assert_eq!(
        fake.requests()[0].field("To"),
        Some(format!("whatsapp:{PATIENT}").as_str())
    );
    assert_eq!(fake.requests()[0].field("Body"), Some(REMINDER_BODY));

    // 25 hours: closed, no approved template. SMS if consented, else skipped.
    clock.advance(Duration::hours(2));
    let to_both = app.notify_ok(whatsapp("both")).await;
    let to_wa_only = app.notify_ok(whatsapp("wa-only")).await;
    app.dispatch().await;
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].field("To"), Some(PATIENT));
    assert_eq!(requests[1].field("From"), Some(SMS_SENDER));
    assert_eq!(app.message(&to_both).await["channel"], "sms");
    let m = app.message(&to_wa_only).await;
    assert_eq!(
        (m["status"].as_str(), m["reason"].as_str()),
        (Some("skipped"), Some("whatsapp_window_closed"))
    );
}

async fn inbound_inbox_for_the_host_app(backend: Backend) {
    let clock = ManualClock::new(Utc::now());
    let config = TestConfig::new().with_clock(&clock);
    let app = TestApp::spawn_live(backend, config).await;
    app.consent("p1", PATIENT).await;
    app.incoming("SMi1", PATIENT, "Running 10 minutes late")
        .await;
    clock.advance(Duration::milliseconds(10));
    app.incoming("SMi2", "+14155552699", "Who is this?").await;
    // Listed once settled (received two seconds ago), so a reader never skips a late commit.
    let fresh: Value = app.get_json("/api/inbound", Some(API_KEY)).await;
    assert!(fresh["messages"].as_array().unwrap().is_empty());
    clock.advance(Duration::seconds(3));
    let get = |query: &str| {
        let url = app.url(&format!("/api/inbound{query}"));
        let client = app.client.clone();
        async move { client.get(url).bearer_auth(API_KEY).send().await.unwrap() }
    };
    let all: Value = get("").await.json().await.unwrap();
    let msgs = all["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["body"], "Running 10 minutes late");
    assert_eq!(msgs[0]["user_id"], "p1");
    assert_eq!(msgs[1]["user_id"], Value::Null);
    let since = msgs[0]["received_at"].as_str().unwrap();
    let later: Value = get(&format!("?since={}&limit=10", urlencode(since)))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(later["messages"].as_array().unwrap().len(), 1);
    assert_eq!(later["messages"][0]["provider_sid"], "SMi2");
    assert_eq!(
        get("?limit=1").await.json::<Value>().await.unwrap()["messages"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(get("?since=yesterday").await.status(), 400);
    let r = app
        .client
        .get(app.url("/api/inbound"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

async fn dev_inbound_in_mock_mode(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.consent("p1", PATIENT).await;
    let r = app
        .client
        .post(app.url("/dev/inbound"))
        .json(&json!({"from": PATIENT, "body": "STOP"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("you are unsubscribed"));
    assert!(!sms_consent(&app, "p1").await);
    let r = app
        .client
        .post(app.url("/dev/inbound"))
        .json(&json!({"from": PATIENT, "body": "hello", "channel": "whatsapp"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(app
        .state
        .store
        .last_whatsapp_inbound(PATIENT)
        .await
        .unwrap()
        .is_some());
    let live = TestApp::spawn_live(backend, TestConfig::new()).await;
    let r = live
        .client
        .post(live.url("/dev/inbound"))
        .json(&json!({"from": PATIENT, "body": "STOP"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Outside mock mode the route does not exist, whatever the body.
    let r = live
        .client
        .post(live.url("/dev/inbound"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // An oversized webhook body answers the error envelope.
    let r = live
        .client
        .post(live.url("/webhooks/twilio/status"))
        .header("x-twilio-signature", "x")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("a".repeat(100 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(r).await, "payload_too_large");
}

async fn inbox_pages_never_split_an_instant(backend: Backend) {
    let clock = ManualClock::new(Utc::now());
    let config = TestConfig::new().with_clock(&clock);
    let app = TestApp::spawn_live(backend, config).await;
    // Three replies at one instant (the clock does not move), then one later.
    for i in 0..3 {
        app.incoming(&format!("SMsame{i}"), PATIENT, &format!("reply {i}"))
            .await;
    }
    clock.advance(Duration::seconds(1));
    app.incoming("SMlater", PATIENT, "later").await;
    clock.advance(Duration::seconds(5));
    let mut seen = vec![];
    let mut since: Option<String> = None;
    for _ in 0..5 {
        let query = match &since {
            Some(s) => format!("?limit=2&since={}", urlencode(s)),
            None => "?limit=2".to_string(),
        };
        let page: Value = app
            .get_json(&format!("/api/inbound{query}"), Some(API_KEY))
            .await;
        let messages = page["messages"].as_array().unwrap();
        if messages.is_empty() {
            break;
        }
        seen.extend(
            messages
                .iter()
                .map(|m| m["provider_sid"].as_str().unwrap().to_string()),
        );
        since = page["next_since"].as_str().map(String::from);
    }
    seen.sort();
    assert_eq!(
        seen,
        ["SMlater", "SMsame0", "SMsame1", "SMsame2"],
        "each reply exactly once"
    );
}

/// The store as the app has it, but the user turns SMS on and off again in the app right after
/// a START has read their audit trail (once): the race the START must not lose to. With
/// `erase_after_listing`, that user is instead erased right after the users with a number are
/// listed: the race a STOP must not lose to.
struct ChangeAfterTheTrailIsRead {
    store: prism_messaging::store::DynStore,
    changed: std::sync::atomic::AtomicBool,
    erase_after_listing: Option<&'static str>,
}

#[async_trait::async_trait]
impl prism_messaging::store::ConsentStore for ChangeAfterTheTrailIsRead {
    async fn get_consent(
        &self,
        user_id: &str,
    ) -> prism_messaging::error::AppResult<Option<prism_messaging::store::Consent>> {
        self.store.get_consent(user_id).await
    }
    async fn update_consent(
        &self,
        user_id: &str,
        edit: prism_messaging::store::ConsentEdit<'_>,
        ctx: &prism_messaging::store::ChangeContext,
    ) -> prism_messaging::error::AppResult<prism_messaging::store::Consent> {
        self.store.update_consent(user_id, edit, ctx).await
    }
    async fn update_existing_consent(
        &self,
        user_id: &str,
        edit: prism_messaging::store::ConsentEdit<'_>,
        ctx: &prism_messaging::store::ChangeContext,
    ) -> prism_messaging::error::AppResult<Option<prism_messaging::store::Consent>> {
        self.store.update_existing_consent(user_id, edit, ctx).await
    }
    async fn consent_audit(
        &self,
        user_id: &str,
    ) -> prism_messaging::error::AppResult<Vec<prism_messaging::store::ConsentAuditRecord>> {
        let trail = self.store.consent_audit(user_id).await?;
        if !self.changed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            for on in [true, false] {
                let patch = prism_messaging::consent::ConsentPatch::channel(
                    prism_messaging::store::Channel::Sms,
                    on,
                );
                let ctx = prism_messaging::store::ChangeContext {
                    source: prism_messaging::store::ConsentSource::AppSettings,
                    ip: None,
                    user_agent: None,
                    at: Utc::now(),
                };
                self.store
                    .update_consent(user_id, &|current| patch.apply(current), &ctx)
                    .await?;
            }
        }
        Ok(trail)
    }
    async fn get_consents(
        &self,
        user_ids: &[String],
    ) -> prism_messaging::error::AppResult<Vec<prism_messaging::store::Consent>> {
        self.store.get_consents(user_ids).await
    }
    async fn users_with_phone(
        &self,
        phone_number: &str,
    ) -> prism_messaging::error::AppResult<Vec<String>> {
        let users = self.store.users_with_phone(phone_number).await?;
        if let Some(user) = self.erase_after_listing {
            self.store
                .erase_user(user, "test-hash", "test", Utc::now())
                .await?;
        }
        Ok(users)
    }
}

/// A STOP lists who has the number, then revokes each one's consent; a user erased in between
/// stays erased: no new record, no audit row under their id (found by review, racing them).
async fn a_stop_while_a_user_is_erased_leaves_them_erased(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    app.consent("fam-a", PATIENT).await;
    app.consent("fam-b", PATIENT).await;
    let consent = prism_messaging::consent::ConsentService::new(
        std::sync::Arc::new(ChangeAfterTheTrailIsRead {
            store: app.state.store.clone(),
            changed: true.into(),
            erase_after_listing: Some("fam-b"),
        }),
        app.state.store.clone(),
        std::sync::Arc::new(prism_messaging::clock::SystemClock),
    );
    let users = consent
        .keyword_stop(PATIENT, prism_messaging::store::Channel::Sms)
        .await
        .unwrap();
    assert_eq!(users, ["fam-a", "fam-b"]);
    assert!(sms_opted_out(&app).await);
    assert!(!sms_consent(&app, "fam-a").await);
    assert!(app
        .state
        .store
        .get_consent("fam-b")
        .await
        .unwrap()
        .is_none());
    assert!(app
        .state
        .store
        .consent_audit("fam-b")
        .await
        .unwrap()
        .is_empty());
}

async fn a_users_change_during_a_start_is_not_overwritten(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    let r = app
        .put_preferences(
            "racer",
            json!({"phone_number": PATIENT, "sms_consent": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    app.incoming("SMstop-race", PATIENT, "STOP").await;
    assert!(!sms_consent(&app, "racer").await);
    let consent = prism_messaging::consent::ConsentService::new(
        std::sync::Arc::new(ChangeAfterTheTrailIsRead {
            store: app.state.store.clone(),
            changed: Default::default(),
            erase_after_listing: None,
        }),
        app.state.store.clone(),
        std::sync::Arc::new(prism_messaging::clock::SystemClock),
    );
    let users = consent
        .keyword_start(PATIENT, prism_messaging::store::Channel::Sms)
        .await
        .unwrap();
    assert_eq!(users, vec!["racer".to_string()]);
    assert!(!sms_opted_out(&app).await, "the START lifted the opt-out");
    assert!(
        !sms_consent(&app, "racer").await,
        "the START overwrote the user's own later no"
    );
    let trail = app.state.store.consent_audit("racer").await.unwrap();
    let last = trail.last().unwrap();
    assert_eq!(last.source, "app_settings", "{trail:?}");
    assert_eq!(last.new_value.as_deref(), Some("false"), "{trail:?}");
}
