//! The foundation end to end over HTTP, on both backends: preferences and their audit trail,
//! notifications through the dispatcher in mock and live mode, idempotency, consent at send time,
//! authentication and validation errors.

use crate::common::fake_twilio::Failure;
use crate::common::*;
use serde_json::{json, Value};

both_backends!(
    a_link_written_in_full_is_kept_as_its_path,
    a_variable_given_twice_or_a_byte_order_mark_is_refused,
    path_ids_that_are_not_text_answer_the_envelope,
    preferences_round_trip_with_audit,
    invalid_phone_stores_nothing,
    notification_end_to_end_in_mock_mode,
    notification_end_to_end_in_live_mode,
    whatsapp_goes_as_whatsapp_addresses,
    whatsapp_approved_template_uses_content_sid,
    messaging_service_replaces_from,
    idempotency_key_answers_the_same_message,
    no_consent_is_skipped,
    marketing_consent_is_never_implied,
    disabled_messaging_is_skipped,
    permanent_twilio_error_fails_once,
    retryable_twilio_error_is_retried,
    template_variable_errors,
    history_is_newest_first_and_private,
    quiet_hours_hold_notifications_until_morning,
    a_retried_key_after_an_sms_fallback_is_the_same_message,
    metrics_count_messages_and_outcomes,
    openapi_and_unknown_routes,
);

async fn preferences_round_trip_with_audit(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let token = app.user_token("patient-1");

    let r = app
        .client
        .get(app.url("/api/messaging/preferences"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"success": true, "preferences": {}})
    );

    let r = app
        .put_preferences(
            "patient-1",
            json!({"phone_number": "+91 98765 43210", "sms_consent": true, "whatsapp_consent": false, "marketing_consent": false}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["success"], true);
    assert_eq!(body["preferences"]["phone_number"], "+919876543210");
    assert_eq!(body["preferences"]["sms_consent"], true);

    let r = app
        .client
        .get(app.url("/api/messaging/preferences"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let got: Value = r.json().await.unwrap();
    assert_eq!(got["preferences"], body["preferences"]);

    // A second change: only what changed is audited, with old and new values.
    let r = app
        .put_preferences(
            "patient-1",
            json!({"whatsapp_consent": true, "source": "web_settings"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let audit = app.state.store.consent_audit("patient-1").await.unwrap();
    let rows: Vec<(&str, Option<&str>, Option<&str>, &str)> = audit
        .iter()
        .map(|a| {
            (
                a.field.as_str(),
                a.old_value.as_deref(),
                a.new_value.as_deref(),
                a.source.as_str(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("phone_number", None, Some("+919876543210"), "app_settings"),
            ("sms_consent", None, Some("true"), "app_settings"),
            ("whatsapp_consent", None, Some("false"), "app_settings"),
            ("marketing_consent", None, Some("false"), "app_settings"),
            (
                "whatsapp_consent",
                Some("false"),
                Some("true"),
                "web_settings"
            ),
        ]
    );
    for a in &audit {
        assert_eq!(a.ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(a.user_agent.as_deref(), Some("prism-tests/1.0"));
    }
    // The same values again change nothing and add no audit rows.
    app.put_preferences("patient-1", json!({"whatsapp_consent": true}))
        .await;
    assert_eq!(
        app.state
            .store
            .consent_audit("patient-1")
            .await
            .unwrap()
            .len(),
        5
    );

    // Sources reserved for webhooks cannot be claimed by a user.
    let r = app
        .put_preferences(
            "patient-1",
            json!({"sms_consent": false, "source": "sms_keyword"}),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "invalid_source");
    // Removing the number needs the messaging consents off too, and is audited.
    let r = app
        .put_preferences("patient-1", json!({"phone_number": null}))
        .await;
    assert_eq!(error_code(r).await, "phone_required");
    let r = app
        .put_preferences(
            "patient-1",
            json!({"phone_number": null, "sms_consent": false, "whatsapp_consent": false}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["preferences"]["phone_number"],
        Value::Null
    );
    let last = app.state.store.consent_audit("patient-1").await.unwrap();
    assert!(last.iter().any(|a| a.field == "phone_number"
        && a.new_value.is_none()
        && a.old_value.as_deref() == Some("+919876543210")));
    // Consent with no number is refused.
    let r = app
        .put_preferences("patient-2", json!({"sms_consent": true}))
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "phone_required");
    assert!(app
        .state
        .store
        .get_consent("patient-2")
        .await
        .unwrap()
        .is_none());
}

async fn invalid_phone_stores_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for bad in [
        "12345",
        "+1 555 0100",
        "not a number",
        "+999123456789",
        "9876543210",
    ] {
        let r = app
            .put_preferences("p", json!({"phone_number": bad, "sms_consent": true}))
            .await;
        assert_eq!(r.status(), 400, "{bad}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["success"], false);
        assert_eq!(body["error"]["code"], "invalid_phone", "{bad}");
    }
    assert!(app.state.store.get_consent("p").await.unwrap().is_none());
    assert!(app.state.store.consent_audit("p").await.unwrap().is_empty());
}

async fn notification_end_to_end_in_mock_mode(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.consent("patient-1", "+919876543210").await;
    let r = app.notify(reminder("patient-1")).await;
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["success"], true);
    assert_eq!(body["message"]["status"], "queued");
    let id = body["message"]["id"].as_str().unwrap().to_string();

    let report = app.dispatch().await;
    assert_eq!((report.claimed, report.sent), (1, 1));
    let m = app.message(&id).await;
    assert_eq!(m["status"], "delivered");
    assert_eq!(m["encoding"], "GSM-7");
    assert_eq!(m["segments"], 1);
    assert_eq!(m["attempts"], 1);
    assert!(m["provider_sid"].as_str().unwrap().starts_with("SM"));
    let statuses: Vec<&str> = m["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    // The mock's "delivered" goes through the status-callback path, like Twilio's would.
    assert_eq!(statuses, ["sending", "sent", "delivered"]);

    let history = app
        .get_json("/api/messaging/history", Some(&app.user_token("patient-1")))
        .await;
    assert_eq!(history["messages"][0]["id"], id.as_str());
    assert_eq!(history["messages"][0]["status"], "delivered");
    assert_eq!(
        history["messages"][0]["template_name"],
        "appointment_reminder_24h"
    );

    let outbox: Value = app.outbox_json().await;
    assert_eq!(outbox["messages"][0]["id"], id.as_str());
    assert_eq!(outbox["messages"][0]["to"], "+919876543210");
    assert_eq!(outbox["messages"][0]["body"], REMINDER_BODY);
    let page = app
        .client
        .get(app.url("/dev/outbox"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("reminder of your appointment on Tuesday 12 Jan 2027"));
    // A second round finds nothing left to send.
    assert_eq!(app.dispatch().await.claimed, 0);
}

async fn notification_end_to_end_in_live_mode(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    app.consent("patient-1", "+919876543210").await;
    let id = app.notify_ok(reminder("patient-1")).await;
    let report = app.dispatch().await;
    assert_eq!(report.sent, 1, "{report:?}");

    let fake = app.fake.as_ref().unwrap();
    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let req = &requests[0];
    assert_eq!(req.method, "POST");
    assert_eq!(
        req.path,
        format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json")
    );
    assert_eq!(
        req.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(req.field_names(), ["Body", "From", "StatusCallback", "To"]);
    assert_eq!(req.field("To"), Some("+919876543210"));
    assert_eq!(req.field("From"), Some(SMS_SENDER));
    assert_eq!(req.field("Body"), Some(REMINDER_BODY));
    assert_eq!(
        req.field("StatusCallback"),
        Some(format!("{PUBLIC_URL}/webhooks/twilio/status").as_str())
    );
    assert_fields_exist_in_twilio_spec(req);

    let m = app.message(&id).await;
    assert_eq!(m["status"], "sent");
    assert!(m["provider_sid"].as_str().unwrap().starts_with("SM"));
    // Nothing in mock's outbox outside mock mode.
    let r = app
        .client
        .get(app.url("/dev/outbox.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// Every field we send is a property of `CreateMessageRequest` in Twilio's OpenAPI spec, with the
/// format the spec gives (phone numbers E.164 or channel addresses, SIDs by pattern).
fn assert_fields_exist_in_twilio_spec(req: &crate::common::fake_twilio::RecordedRequest) {
    let spec: Value = serde_json::from_str(include_str!("../fixtures/twilio_create_message.json"))
        .expect("spec fixture");
    assert_eq!(spec["operationId"], "CreateMessage");
    for required in spec["required"].as_array().unwrap() {
        assert!(
            req.field(required.as_str().unwrap()).is_some(),
            "missing required {required}"
        );
    }
    for (name, value) in &req.form {
        let prop = &spec["properties"][name.as_str()];
        assert!(prop.is_object(), "{name} is not a CreateMessage parameter");
        match prop["format"].as_str() {
            Some("phone-number") => {
                let number = value.strip_prefix("whatsapp:").unwrap_or(value);
                assert!(
                    number.starts_with('+') && number[1..].bytes().all(|b| b.is_ascii_digit()),
                    "{name}={value}"
                );
            }
            Some("uri") => assert!(
                value.starts_with("https://") || value.starts_with("http://"),
                "{name}={value}"
            ),
            _ => {}
        }
        if let Some(pattern) = prop["pattern"].as_str() {
            // Patterns in this schema are `^XX[0-9a-fA-F]{32}$`.
            let prefix = &pattern[1..3];
            assert!(
                value.len() == 34 && value.starts_with(prefix),
                "{name}={value} does not match {pattern}"
            );
        }
    }
}

async fn whatsapp_goes_as_whatsapp_addresses(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    app.consent("patient-1", "+14155552671").await;
    // The patient wrote on WhatsApp recently: free text may go back.
    assert_eq!(
        app.incoming("SMin1", "whatsapp:+14155552671", "hello")
            .await
            .status(),
        200
    );
    let mut body = reminder("patient-1");
    body["channel"] = json!("whatsapp");
    let id = app.notify_ok(body).await;
    app.dispatch().await;
    let req = &app.fake.as_ref().unwrap().requests()[0];
    assert_eq!(req.field("To"), Some("whatsapp:+14155552671"));
    assert_eq!(
        req.field("From"),
        Some(format!("whatsapp:{WHATSAPP_SENDER}").as_str())
    );
    assert_eq!(req.field("Body"), Some(REMINDER_BODY));
    assert_fields_exist_in_twilio_spec(req);
    assert_eq!(app.message(&id).await["channel"], "whatsapp");
}

async fn whatsapp_approved_template_uses_content_sid(backend: Backend) {
    let sid = "HX0123456789abcdef0123456789abcdef";
    let config = TestConfig::new().set(
        "TWILIO_CONTENT_SIDS",
        &format!("appointment_reminder_24h={sid}"),
    );
    let app = TestApp::spawn_live(backend, config).await;
    app.consent("patient-1", "+14155552671").await;
    let mut body = reminder("patient-1");
    body["channel"] = json!("whatsapp");
    app.notify_ok(body).await;
    app.dispatch().await;
    let req = &app.fake.as_ref().unwrap().requests()[0];
    assert_eq!(
        req.field_names(),
        [
            "ContentSid",
            "ContentVariables",
            "From",
            "StatusCallback",
            "To"
        ]
    );
    assert_eq!(req.field("ContentSid"), Some(sid));
    let vars: Value = serde_json::from_str(req.field("ContentVariables").unwrap()).unwrap();
    assert_eq!(
        vars,
        json!({"1": "on Tuesday 12 Jan 2027 at 10:30", "2": "https://app.example.com/appointments/a1"})
    );
    assert_fields_exist_in_twilio_spec(req);

    let templates: Value = app.get_json("/api/templates", Some(API_KEY)).await;
    let reminder = templates["templates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "appointment_reminder_24h")
        .unwrap();
    assert_eq!(reminder["whatsapp_content_sid"], sid);
    assert_eq!(
        reminder["variables"][0],
        json!({"name": "starts_at", "type": "datetime"})
    );
    assert_eq!(reminder["kind"], "scheduled");
}

async fn messaging_service_replaces_from(backend: Backend) {
    let service = "MG0123456789abcdef0123456789abcdef";
    let app = TestApp::spawn_live(
        backend,
        TestConfig::new().set("TWILIO_MESSAGING_SERVICE_SID", service),
    )
    .await;
    app.consent("patient-1", "+14155552671").await;
    app.notify_ok(reminder("patient-1")).await;
    app.dispatch().await;
    let req = &app.fake.as_ref().unwrap().requests()[0];
    assert_eq!(req.field("MessagingServiceSid"), Some(service));
    assert_eq!(req.field("From"), None);
    assert_fields_exist_in_twilio_spec(req);
}

async fn idempotency_key_answers_the_same_message(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.consent("patient-1", "+919876543210").await;
    let mut body = reminder("patient-1");
    body["idempotency_key"] = json!("appt-a1-24h");
    let first = app.notify_ok(body.clone()).await;
    let second = app.notify_ok(body.clone()).await;
    assert_eq!(first, second);
    // Concurrent repeats too.
    let repeats = futures_join(&app, &body, 8).await;
    assert!(repeats.iter().all(|id| *id == first));
    let report = app.dispatch().await;
    assert_eq!(report.claimed, 1);
    let outbox: Value = app.outbox_json().await;
    assert_eq!(outbox["messages"].as_array().unwrap().len(), 1);
    // The same key for different content is a conflict, not a silent success.
    body["variables"]["starts_at"] = json!("2027-01-12T11:30:00Z");
    let r = app.notify(body).await;
    assert_eq!(r.status(), 409);
    assert_eq!(error_code(r).await, "idempotency_key_reused");
}

async fn futures_join(app: &TestApp, body: &Value, n: usize) -> Vec<String> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let client = app.client.clone();
        let url = app.url("/api/notifications");
        let body = body.clone();
        tasks.spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(API_KEY)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
            r.json::<Value>().await.unwrap()["message"]["id"]
                .as_str()
                .unwrap()
                .to_string()
        });
    }
    let mut ids = vec![];
    while let Some(id) = tasks.join_next().await {
        ids.push(id.unwrap());
    }
    ids
}

async fn no_consent_is_skipped(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // A user never seen, and one who consented to WhatsApp only.
    let unknown = app.notify_ok(reminder("stranger")).await;
    app.put_preferences(
        "wa-only",
        json!({"phone_number": "+919876543210", "whatsapp_consent": true}),
    )
    .await;
    let sms = app.notify_ok(reminder("wa-only")).await;
    let report = app.dispatch().await;
    assert_eq!((report.claimed, report.skipped), (2, 2));
    for id in [unknown, sms] {
        let m = app.message(&id).await;
        assert_eq!(m["status"], "skipped");
        assert_eq!(m["reason"], "no_consent");
        assert_eq!(m["attempts"], 0);
    }
    let outbox: Value = app.outbox_json().await;
    assert!(outbox["messages"].as_array().unwrap().is_empty());
}

async fn marketing_consent_is_never_implied(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.consent("patient-1", "+919876543210").await;
    let news = json!({"user_id": "patient-1", "template": "clinic_news", "variables": {"name": "Asha", "link": "/news"}});
    let id = app.notify_ok(news.clone()).await;
    app.dispatch().await;
    assert_eq!(app.message(&id).await["reason"], "no_consent");
    app.put_preferences("patient-1", json!({"marketing_consent": true}))
        .await;
    let id = app.notify_ok(news).await;
    app.dispatch().await;
    assert_eq!(app.message(&id).await["status"], "delivered");
}

async fn disabled_messaging_is_skipped(backend: Backend) {
    let app =
        TestApp::spawn_with(backend, TestConfig::new().set("MESSAGING_ENABLED", "false")).await;
    app.consent("patient-1", "+919876543210").await;
    let id = app.notify_ok(reminder("patient-1")).await;
    assert_eq!(app.dispatch().await.skipped, 1);
    let m = app.message(&id).await;
    assert_eq!(
        (m["status"].as_str(), m["reason"].as_str()),
        (Some("skipped"), Some("disabled"))
    );
}

async fn permanent_twilio_error_fails_once(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    app.consent("patient-1", "+14155552671").await;
    let fake = app.fake.as_ref().unwrap();
    fake.fail(
        "+14155552671",
        vec![Failure {
            http_status: 400,
            code: 21211,
            retry_after: None,
        }],
    );
    let id = app.notify_ok(reminder("patient-1")).await;
    let report = app.dispatch().await;
    assert_eq!(report.failed, 1);
    let m = app.message(&id).await;
    assert_eq!(m["status"], "failed");
    assert_eq!(m["error_code"], 21211);
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(app.dispatch().await.claimed, 0);
}

async fn retryable_twilio_error_is_retried(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    app.consent("patient-1", "+14155552671").await;
    let fake = app.fake.as_ref().unwrap();
    fake.fail(
        "+14155552671",
        vec![Failure {
            http_status: 503,
            code: 20500,
            retry_after: None,
        }],
    );
    let id = app.notify_ok(reminder("patient-1")).await;
    assert_eq!(app.dispatch().await.retried, 1);
    let m = app.message(&id).await;
    assert_eq!(m["status"], "queued");
    assert_eq!(m["error_code"], 20500);
    // Not due yet: backoff holds it back.
    assert_eq!(app.dispatch().await.claimed, 0);
}

async fn template_variable_errors(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let cases = [
        (
            json!({"user_id": "u", "template": "payment_failed", "variables": {"amount": "10.00"}}),
            "invalid_template_variables",
        ),
        (
            json!({"user_id": "u", "template": "payment_failed", "variables": {"amount": "10.00", "link": "/p", "diagnosis": "ACL tear"}}),
            "invalid_template_variables",
        ),
        (
            json!({"user_id": "u", "template": "payment_failed", "variables": {"amount": "ten", "link": "/p"}}),
            "invalid_template_variables",
        ),
        (
            json!({"user_id": "u", "template": "payment_failed", "variables": {"amount": "10", "link": "https://evil.example/p"}}),
            "invalid_template_variables",
        ),
        (
            json!({"user_id": "u", "template": "no_such_template", "variables": {}}),
            "unknown_template",
        ),
        (
            json!({"user_id": "u", "template": "otp", "variables": {"code": "123456"}}),
            "unknown_template",
        ),
        (
            json!({"user_id": "u", "template": "help", "variables": {}}),
            "unknown_template",
        ),
        (
            json!({"user_id": "", "template": "help"}),
            "invalid_user_id",
        ),
        (
            json!({"user_id": "u", "template": "payment_received", "variables": {"amount": "1", "date": "2027-01-01"}, "channel": "fax"}),
            "invalid_channel",
        ),
        (
            json!({"user_id": "u", "template": "payment_received", "extra": 1}),
            "invalid_json",
        ),
    ];
    for (body, code) in cases {
        let r = app.notify(body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["success"], false);
        assert_eq!(v["error"]["code"], code, "{body}");
    }
    assert_eq!(app.dispatch().await.claimed, 0, "nothing was queued");
}

async fn history_is_newest_first_and_private(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.consent("a", "+919876543210").await;
    let first = app.notify_ok(reminder("a")).await;
    let second = app.notify_ok(reminder("a")).await;
    app.notify_ok(reminder("b")).await;
    let v = app
        .get_json(
            "/api/messaging/history?limit=10",
            Some(&app.user_token("a")),
        )
        .await;
    let ids: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [second.as_str(), first.as_str()]);
    let keys: Vec<&String> = v["messages"][0].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "channel",
            "created_at",
            "id",
            "status",
            "template_name",
            "updated_at"
        ]
    );
    let r = app
        .client
        .get(app.url("/api/messaging/history?limit=0"))
        .bearer_auth(app.user_token("a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

async fn quiet_hours_hold_notifications_until_morning(backend: Backend) {
    use prism_messaging::clock::{Clock, ManualClock};
    // 22:30 in Kolkata (17:00 UTC), inside 21:00-08:00.
    let night = chrono::DateTime::parse_from_rfc3339("2027-01-12T17:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let clock = ManualClock::new(night);
    let config = TestConfig::new()
        .set("QUIET_HOURS", "21:00-08:00")
        .set("DEFAULT_TIME_ZONE", "Asia/Kolkata")
        .with_clock(&clock);
    let app = TestApp::spawn_with(backend, config).await;
    app.consent("p1", "+919876543210").await;
    // For an appointment after the morning (one before it would be skipped, as passed).
    let mut body = reminder("p1");
    body["variables"]["starts_at"] = json!("2027-01-14T10:30:00Z");
    let id = app.notify_ok(body).await;
    assert_eq!(app.dispatch().await.deferred, 1);
    let m = app.stored_message(&id).await;
    assert_eq!((m.status.as_str(), m.attempts), ("queued", 0));
    let morning = chrono::DateTime::parse_from_rfc3339("2027-01-13T02:30:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    assert_eq!(m.next_attempt_at, morning, "08:00 in Kolkata");
    // OTPs are the patient's own request: never held back.
    let r = app
        .client
        .post(app.url("/api/messaging/send-otp"))
        .json(&json!({"user_id": "p2", "phone_number": "+919876543211", "purpose": "login"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    clock.advance(chrono::Duration::hours(9) + chrono::Duration::minutes(30));
    assert!(clock.now() >= morning);
    assert_eq!(app.dispatch().await.sent, 1);
    assert_eq!(app.message(&id).await["status"], "delivered");
}

async fn a_retried_key_after_an_sms_fallback_is_the_same_message(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.consent("p1", "+919876543210").await;
    let mut body = reminder("p1");
    body["channel"] = json!("whatsapp");
    body["idempotency_key"] = json!("k-wa");
    let id = app.notify_ok(body.clone()).await;
    app.dispatch().await;
    let m = app.message(&id).await;
    assert_eq!(
        (m["channel"].as_str(), m["requested_channel"].as_str()),
        (Some("sms"), Some("whatsapp"))
    );
    assert_eq!(
        app.notify_ok(body).await,
        id,
        "the host app's retry gets the same message, not a 409"
    );
}

async fn metrics_count_messages_and_outcomes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.consent("p1", "+919876543210").await;
    app.notify_ok(reminder("p1")).await;
    app.notify_ok(reminder("nobody")).await;
    app.dispatch().await;
    let r = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().await.unwrap();
    for line in [
        "prism_messages{status=\"delivered\"} 1",
        "prism_messages{status=\"skipped\"} 1",
        "prism_dispatch_total{outcome=\"sent\"} 1",
        "prism_dispatch_total{outcome=\"skipped\"} 1",
        "prism_info{version=",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    assert!(!text.contains("+91"), "no numbers in metrics");
}

async fn openapi_and_unknown_routes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let spec: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in [
        "/api/messaging/preferences",
        "/api/messaging/history",
        "/api/messaging/send-otp",
        "/api/messaging/verify-otp",
        "/api/notifications",
        "/api/messages/{id}",
        "/api/templates",
        "/api/inbound",
        "/webhooks/twilio/incoming",
        "/webhooks/twilio/status",
        "/cron/cleanup-expired-otps",
        "/cron/appointment-reminders-24h",
        "/cron/appointment-reminders-2h",
        "/cron/follow-up-reminders",
        "/api/appointments/{id}",
        "/api/follow-ups/{id}",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(spec["paths"][path].is_object(), "{path} is documented");
    }
    let r = app
        .client
        .get(app.url("/no/such/route"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "not_found");
    let r = app
        .client
        .delete(app.url("/api/notifications"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(error_code(r).await, "method_not_allowed");
    // verify-otp refuses another method as it refuses anything else: with `"valid": false`.
    let r = app
        .client
        .get(app.url("/api/messaging/verify-otp"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["valid"], false, "{body}");
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
}

async fn openapi_document(app: &TestApp) -> Value {
    let r = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// The paths the routers register: every `.route("...")` in `src/http`. Routers are only merged
/// (never nested), so each literal is a whole path.
fn routes_in_source() -> std::collections::BTreeSet<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http");
    let mut paths = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for other in [
            ".nest(",
            ".nest_service(",
            ".route_service(",
            "routing::any(",
        ] {
            assert!(
                !text.contains(other),
                "{}: {other} is not followed by this test",
                path.display()
            );
        }
        for (i, _) in text.match_indices(".route(") {
            let rest = text[i + ".route(".len()..].trim_start();
            let literal = rest
                .strip_prefix('"')
                .unwrap_or_else(|| panic!("{}: .route( without a literal path", path.display()));
            paths.insert(literal[..literal.find('"').unwrap()].to_string());
        }
    }
    paths
}

/// Every routed path is documented, every documented operation is routed (it answers, and not
/// with the router's 404 or 405), and no other method is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_every_route() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let spec = openapi_document(&app).await;
    let documented: std::collections::BTreeMap<String, Vec<String>> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(path, item)| {
            let methods = item.as_object().unwrap().keys().cloned().collect();
            (path.clone(), methods)
        })
        .collect();
    let routed = routes_in_source();
    let documented_paths: std::collections::BTreeSet<String> = documented.keys().cloned().collect();
    assert_eq!(
        routed, documented_paths,
        "routed paths (left) and documented paths (right)"
    );

    for (path, methods) in &documented {
        let url = app.url(&path.replace("{id}", "x"));
        for method in ["get", "post", "put", "delete", "patch"] {
            let r = app
                .client
                .request(method.to_uppercase().parse().unwrap(), &url)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            if methods.iter().any(|m| m == method) {
                assert_ne!(status, 405, "{method} {path} is documented but not routed");
                assert!(
                    !(status == 404 && body["error"]["message"] == "route not found"),
                    "{method} {path} is documented but not routed"
                );
            } else {
                assert_eq!(status, 405, "{method} {path} is routed but not documented");
            }
        }
    }
}

/// The document is OpenAPI 3.1 by the specification's own JSON Schema (`schema-base`, which
/// also checks every schema in it against the OpenAPI dialect of JSON Schema 2020-12), every
/// `$ref` points at something, every schema compiles (its patterns are regular expressions)
/// and every example in a schema matches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_validates() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let spec = openapi_document(&app).await;

    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openapi-3.1");
    let load = |name: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(fixtures.join(name)).unwrap()).unwrap()
    };
    let registry = jsonschema::Registry::new()
        .add(
            "https://spec.openapis.org/oas/3.1/schema/2022-10-07",
            load("schema.json"),
        )
        .unwrap()
        .add(
            "https://spec.openapis.org/oas/3.1/dialect/base",
            load("dialect/base.schema.json"),
        )
        .unwrap()
        .add(
            "https://spec.openapis.org/oas/3.1/meta/base",
            load("meta/base.schema.json"),
        )
        .unwrap()
        .prepare()
        .unwrap();
    let validator = jsonschema::options()
        .with_registry(&registry)
        .build(&load("schema-base.json"))
        .expect("the OpenAPI 3.1 schema builds");
    let errors: Vec<String> = validator
        .iter_errors(&spec)
        .map(|e| format!("{e} (at {})", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "the document is not valid OpenAPI 3.1:\n{}",
        errors.join("\n")
    );
    // The check is real: a broken document fails it.
    let mut broken = spec.clone();
    broken["paths"]["/healthz"]["get"]["responses"]["200"] = json!({"content": {}});
    assert!(!validator.is_valid(&broken));

    fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    out.push(r);
                }
                map.values().for_each(|v| refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = vec![];
    refs(&spec, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{r} is not local"));
        assert!(spec.pointer(pointer).is_some(), "{r} points at nothing");
    }

    let documents = jsonschema::Registry::new()
        .add("urn:prism-messaging:openapi", spec.clone())
        .unwrap()
        .prepare()
        .unwrap();
    for (name, schema) in spec["components"]["schemas"].as_object().unwrap() {
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .with_registry(&documents)
            .build(
                &json!({"$ref": format!("urn:prism-messaging:openapi#/components/schemas/{name}")}),
            )
            .unwrap_or_else(|e| panic!("schema {name} does not compile: {e}"));
        for example in schema["examples"].as_array().into_iter().flatten() {
            assert!(
                validator.is_valid(example),
                "{name}: example {example} does not match"
            );
        }
    }
}

async fn path_ids_that_are_not_text_answer_the_envelope(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for (method, path) in [
        (reqwest::Method::GET, "/api/messages/%FF"),
        (reqwest::Method::DELETE, "/api/appointments/%FF%FE"),
        (reqwest::Method::DELETE, "/api/follow-ups/%C3"),
        // No id holds a NUL, and PostgreSQL refuses one in text (it answered 500 there).
        (reqwest::Method::GET, "/api/messages/a%00b"),
        (reqwest::Method::DELETE, "/api/appointments/a%00b"),
        (reqwest::Method::DELETE, "/api/subscriptions/a%00b"),
    ] {
        let r = app
            .client
            .request(method, app.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        assert_eq!(error_code(r).await, "invalid_id", "{path}");
    }
}

/// A link under APP_URL written in full is stored as its path and joined to APP_URL when sent, so
/// a message held across a move of the app still goes (found by review: it failed as "no longer
/// valid"); the full and the short form of one link are the same request.
async fn a_link_written_in_full_is_kept_as_its_path(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.consent("p1", "+919876543210").await;
    let payment = |link: &str| {
        json!({"user_id": "p1", "template": "payment_failed", "idempotency_key": "pay-7",
            "variables": {"amount": "INR 10.00", "link": link}})
    };
    let id = app
        .notify_ok(payment(&format!("{APP_URL}/pay?invoice=7")))
        .await;
    let stored: Value = serde_json::from_str(&app.stored_message(&id).await.variables).unwrap();
    assert_eq!(stored["link"], "/pay?invoice=7");
    assert_eq!(app.notify_ok(payment("/pay?invoice=7")).await, id);
    app.dispatch().await;
    let outbox = app.outbox_json().await;
    let body = outbox["messages"][0]["body"].as_str().unwrap();
    assert!(body.contains(&format!("{APP_URL}/pay?invoice=7")), "{body}");
}

/// A variable given twice is refused as a body's own field is (the last one won, silently), and a
/// body that starts with a byte order mark is refused saying so (review).
async fn a_variable_given_twice_or_a_byte_order_mark_is_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.consent("p1", "+919876543210").await;
    let post = |body: Vec<u8>| {
        app.client
            .post(app.url("/api/notifications"))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let twice = br#"{"user_id": "p1", "template": "payment_received",
        "variables": {"amount": "5", "amount": "6", "date": "2027-01-12"}}"#;
    let r = post(twice.to_vec()).await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_json", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"amount\" is given twice"),
        "{body}"
    );
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend_from_slice(
        br#"{"user_id": "p1", "template": "payment_received",
            "variables": {"amount": "5", "date": "2027-01-12"}}"#,
    );
    let r = post(bom).await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("byte order mark"),
        "{body}"
    );
    assert_eq!(
        app.outbox_json().await["messages"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}
