//! Reminders in the patient's own time (issue 11): time zones (the item's, else the patient's,
//! else DEFAULT_TIME_ZONE), the day word decided when a reminder is sent, quiet hours by template
//! kind and in the message's zone, the moves and skips they cause (daylight saving changes
//! included), late bookings, and what rows written before the change become. On both backends,
//! with the controllable clock.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::common::*;
use chrono::{DateTime, Duration, Utc};
use prism_messaging::app::Services;
use prism_messaging::clock::ManualClock;
use prism_messaging::config::Config;
use prism_messaging::store::SubjectType;
use serde_json::{json, Value};

both_backends!(
    the_patients_time_zone_is_kept_checked_and_audited,
    an_item_keeps_a_zone_only_when_given,
    a_reminder_reads_in_the_items_zone_else_the_patients_else_the_default,
    the_day_word_is_decided_when_the_reminder_is_sent,
    quiet_hours_are_the_patients_and_never_hold_their_own_receipts,
    quiet_hours_skip_a_2h_reminder_that_would_come_too_late,
    daylight_saving_changes_in_london_and_new_york,
    late_bookings_get_the_reminders_still_worth_sending,
    a_24h_reminder_held_to_the_morning_is_not_followed_by_another,
    a_late_booking_is_reminded_at_once_when_asked,
    send_otp_purpose_defaults_to_verification,
    rows_written_before_keep_their_zone_and_read_right,
);

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// The app on a clock starting at `start`, with patient `p1` (an Indian number, SMS consent).
async fn app_from(backend: Backend, config: TestConfig, start: &str) -> (TestApp, ManualClock) {
    let clock = ManualClock::new(t(start));
    let app = TestApp::spawn_with(backend, config.with_clock(&clock)).await;
    app.consent("p1", "+919876543210").await;
    (app, clock)
}

fn quiet() -> TestConfig {
    TestConfig::new().set("QUIET_HOURS", "21:00-08:00")
}

/// Move the clock to `to` (never back).
fn set_clock(clock: &ManualClock, to: &str) {
    use prism_messaging::clock::Clock;
    let by = t(to) - clock.now();
    assert!(by >= Duration::zero(), "the clock only moves forward");
    clock.advance(by);
}

async fn put(app: &TestApp, path: &str, body: Value) -> Value {
    let r = app
        .client
        .put(app.url(path))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path} {body}");
    r.json().await.unwrap()
}

async fn appointment(app: &TestApp, id: &str, user: &str, starts_at: &str, zone: Option<&str>) {
    let mut body = json!({"user_id": user, "starts_at": starts_at});
    if let Some(zone) = zone {
        body["time_zone"] = json!(zone);
    }
    put(app, &format!("/api/appointments/{id}"), body).await;
}

/// Run a sweep; how many reminders it queued.
async fn sweep(app: &TestApp, job: &str) -> u64 {
    let r = app
        .client
        .post(app.url(&format!("/cron/{job}")))
        .bearer_auth(CRON_SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["queued"].as_u64().unwrap()
}

/// What was sent, by link (or template when it has none): the latest body.
async fn sent(app: &TestApp) -> BTreeMap<String, String> {
    let outbox = app.outbox_json().await;
    let mut latest = BTreeMap::new();
    // Newest first: the first body for a link is its latest.
    for (key, body) in outbox["messages"].as_array().unwrap().iter().map(|m| {
        let body = m["body"].as_str().unwrap().to_string();
        let key = body
            .split_whitespace()
            .find(|w| w.starts_with(APP_URL))
            .map(|w| w.trim_start_matches(APP_URL).to_string())
            .unwrap_or_else(|| m["template_name"].as_str().unwrap().to_string());
        (key, body)
    }) {
        latest.entry(key).or_insert(body);
    }
    latest
}

/// Every message of `user`: (template, status, reason), sorted.
async fn statuses(app: &TestApp, user: &str) -> Vec<(String, String, Option<String>)> {
    let mut all: Vec<_> = app
        .state
        .store
        .user_messages(user, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|m| {
            (
                m.template_name,
                m.status.to_string(),
                m.reason.map(|r| r.to_string()),
            )
        })
        .collect();
    all.sort();
    all
}

async fn preferences(app: &TestApp, user: &str) -> Value {
    let token = app.user_token(user);
    app.get_json("/api/messaging/preferences", Some(&token))
        .await["preferences"]
        .clone()
}

/// The audit rows of `field`: (old, new, source).
async fn audit(
    app: &TestApp,
    user: &str,
    field: &str,
) -> Vec<(Option<String>, Option<String>, String)> {
    app.state
        .store
        .consent_audit(user)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.field == field)
        .map(|r| (r.old_value, r.new_value, r.source))
        .collect()
}

async fn the_patients_time_zone_is_kept_checked_and_audited(backend: Backend) {
    let (app, _clock) = app_from(backend, TestConfig::new(), "2027-01-12T04:00:00Z").await;
    assert_eq!(preferences(&app, "p1").await["time_zone"], Value::Null);
    let r = app
        .put_preferences("p1", json!({"time_zone": "Asia/Kolkata"}))
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["preferences"]["time_zone"], "Asia/Kolkata");
    assert_eq!(preferences(&app, "p1").await["time_zone"], "Asia/Kolkata");
    assert_eq!(
        audit(&app, "p1", "time_zone").await,
        [(None, Some("Asia/Kolkata".into()), "app_settings".into())]
    );
    let rows_before = app.state.store.consent_audit("p1").await.unwrap().len();

    // An unknown zone: 400, and nothing of the request is written.
    let r = app
        .put_preferences(
            "p1",
            json!({"marketing_consent": true, "time_zone": "Mars/Olympus_Mons"}),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "invalid_time_zone");
    let now = preferences(&app, "p1").await;
    assert_eq!(now["time_zone"], "Asia/Kolkata");
    assert_eq!(now["marketing_consent"], false);
    assert_eq!(
        app.state.store.consent_audit("p1").await.unwrap().len(),
        rows_before
    );

    // Left out: kept. The same zone again: no audit row.
    app.put_preferences("p1", json!({"marketing_consent": true}))
        .await;
    app.put_preferences("p1", json!({"time_zone": "Asia/Kolkata"}))
        .await;
    assert_eq!(preferences(&app, "p1").await["time_zone"], "Asia/Kolkata");
    assert_eq!(audit(&app, "p1", "time_zone").await.len(), 1);

    // Another zone, then null removes it; each change audited with its source.
    app.put_preferences(
        "p1",
        json!({"time_zone": "Europe/London", "source": "web_settings"}),
    )
    .await;
    let r = app.put_preferences("p1", json!({"time_zone": null})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(preferences(&app, "p1").await["time_zone"], Value::Null);
    assert_eq!(
        audit(&app, "p1", "time_zone").await,
        [
            (None, Some("Asia/Kolkata".into()), "app_settings".into()),
            (
                Some("Asia/Kolkata".into()),
                Some("Europe/London".into()),
                "web_settings".into()
            ),
            (Some("Europe/London".into()), None, "app_settings".into()),
        ]
    );
}

async fn an_item_keeps_a_zone_only_when_given(backend: Backend) {
    let (app, _clock) = app_from(backend, TestConfig::new(), "2027-01-12T04:00:00Z").await;
    let stored = |kind, id: &'static str| {
        let store = app.state.store.clone();
        async move {
            store
                .get_scheduled(kind, id)
                .await
                .unwrap()
                .unwrap()
                .time_zone
        }
    };
    let starts = "2027-01-13T04:00:00Z";
    let answer = put(
        &app,
        "/api/appointments/a1",
        json!({"user_id": "p1", "starts_at": starts}),
    )
    .await;
    assert_eq!(answer["appointment"]["time_zone"], Value::Null);
    assert_eq!(stored(SubjectType::Appointment, "a1").await, None);
    let answer = put(
        &app,
        "/api/appointments/a1",
        json!({"user_id": "p1", "starts_at": starts, "time_zone": "Europe/London"}),
    )
    .await;
    assert_eq!(answer["appointment"]["time_zone"], "Europe/London");
    assert_eq!(
        stored(SubjectType::Appointment, "a1").await.as_deref(),
        Some("Europe/London")
    );
    // A PUT is the whole item: without a zone, none is kept.
    put(
        &app,
        "/api/appointments/a1",
        json!({"user_id": "p1", "starts_at": starts, "time_zone": null}),
    )
    .await;
    assert_eq!(stored(SubjectType::Appointment, "a1").await, None);
    let answer = put(
        &app,
        "/api/follow-ups/f1",
        json!({"user_id": "p1", "due_at": starts}),
    )
    .await;
    assert_eq!(answer["follow_up"]["time_zone"], Value::Null);
    assert_eq!(stored(SubjectType::FollowUp, "f1").await, None);
    put(
        &app,
        "/api/follow-ups/f1",
        json!({"user_id": "p1", "due_at": starts, "time_zone": "Asia/Kolkata"}),
    )
    .await;
    assert_eq!(
        stored(SubjectType::FollowUp, "f1").await.as_deref(),
        Some("Asia/Kolkata")
    );
}

async fn a_reminder_reads_in_the_items_zone_else_the_patients_else_the_default(backend: Backend) {
    let (app, clock) = app_from(backend, TestConfig::new(), "2027-01-11T00:00:00Z").await;
    app.consent("p2", "+919876543211").await;
    app.put_preferences("p1", json!({"time_zone": "Asia/Kolkata"}))
        .await;
    // 04:00 UTC on the 12th: 09:30 in Kolkata, 04:00 in London (GMT) and in UTC.
    let starts = "2027-01-12T04:00:00Z";
    appointment(&app, "patients", "p1", starts, None).await;
    appointment(&app, "items", "p1", starts, Some("Europe/London")).await;
    appointment(&app, "default", "p2", starts, None).await;
    set_clock(&clock, "2027-01-11T06:00:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-24h").await, 3);
    assert_eq!(app.dispatch().await.sent, 3);
    let sent = sent(&app).await;
    let reads = |link: &str| {
        let body = &sent[link];
        body[body.find("appointment ").unwrap() + 12..body.find(". Details").unwrap()].to_string()
    };
    assert_eq!(reads("/appointments/patients"), "tomorrow at 09:30 IST");
    assert_eq!(reads("/appointments/items"), "tomorrow at 04:00 GMT");
    assert_eq!(reads("/appointments/default"), "tomorrow at 04:00");
}

async fn the_day_word_is_decided_when_the_reminder_is_sent(backend: Backend) {
    let (app, clock) = app_from(backend, quiet(), "2027-01-12T09:00:00Z").await;
    // Ten hours away on the same day: today, not tomorrow.
    appointment(&app, "same-day", "p1", "2027-01-12T19:00:00Z", None).await;
    // At 22:00 on the 13th, booked well ahead: its 24-hour reminder falls at 22:00 on the 12th,
    // inside quiet hours, and waits for 08:00 on the 13th, its own day.
    appointment(&app, "evening", "p1", "2027-01-13T22:00:00Z", None).await;
    assert_eq!(sweep(&app, "appointment-reminders-24h").await, 1);
    assert_eq!(app.dispatch().await.sent, 1);
    assert_eq!(
        sent(&app).await["/appointments/same-day"],
        "PhysiologicPRISM: reminder of your appointment today at 19:00. Details: https://app.example.com/appointments/same-day Reply STOP to opt out."
    );

    set_clock(&clock, "2027-01-12T22:00:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-24h").await, 1);
    let report = app.dispatch().await;
    assert_eq!((report.deferred, report.sent), (1, 0));
    let held = app
        .state
        .store
        .user_messages("p1", 10)
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.status == "queued")
        .unwrap();
    assert_eq!(held.next_attempt_at, t("2027-01-13T08:00:00Z"));
    set_clock(&clock, "2027-01-13T08:00:00Z");
    assert_eq!(app.dispatch().await.sent, 1);
    assert!(
        sent(&app).await["/appointments/evening"]
            .contains("reminder of your appointment today at 22:00."),
        "rendered when sent, not when queued"
    );
}

async fn quiet_hours_are_the_patients_and_never_hold_their_own_receipts(backend: Backend) {
    // DEFAULT_TIME_ZONE is UTC; the patient lives in Kolkata. Their appointment is at 09:24 IST
    // (03:54 UTC), booked days ahead.
    let (app, clock) = app_from(backend, quiet(), "2027-01-09T00:00:00Z").await;
    app.put_preferences(
        "p1",
        json!({"time_zone": "Asia/Kolkata", "marketing_consent": true}),
    )
    .await;
    app.consent("p2", "+919876543211").await;
    appointment(&app, "a1", "p1", "2027-01-12T03:54:00Z", None).await;
    // 01:54 UTC is 07:24 IST: quiet hours there until 08:00 IST (02:30 UTC); in UTC they would
    // last until 08:00 UTC, past the appointment.
    set_clock(&clock, "2027-01-12T01:54:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-2h").await, 1);
    // A payment receipt for a patient with no zone (UTC, where it is night) goes at once; news
    // waits for the patient's morning.
    let receipt = app
        .notify_ok(json!({
            "user_id": "p2",
            "template": "payment_received",
            "variables": {"amount": "INR 499.00", "date": "2027-01-12"},
        }))
        .await;
    let news = app
        .notify_ok(json!({
            "user_id": "p1",
            "template": "clinic_news",
            "variables": {"name": "Asha", "link": "/news/1"},
        }))
        .await;
    let report = app.dispatch().await;
    assert_eq!((report.sent, report.deferred, report.skipped), (1, 2, 0));
    assert_eq!(app.message(&receipt).await["status"], "delivered");
    let morning = t("2027-01-12T02:30:00Z");
    let news_row = app.state.store.get_message(&news).await.unwrap().unwrap();
    assert_eq!(news_row.next_attempt_at, morning, "08:00 in Kolkata");
    set_clock(&clock, "2027-01-12T02:30:00Z");
    assert_eq!(app.dispatch().await.sent, 2);
    assert!(
        sent(&app).await["/appointments/a1"].contains("your appointment is today at 09:24 IST.")
    );
    assert_eq!(
        statuses(&app, "p1").await,
        [
            ("appointment_reminder_2h".into(), "delivered".into(), None),
            ("clinic_news".into(), "delivered".into(), None),
        ]
    );
}

async fn quiet_hours_skip_a_2h_reminder_that_would_come_too_late(backend: Backend) {
    let (app, clock) = app_from(backend, quiet(), "2027-01-05T00:00:00Z").await;
    app.put_preferences("p1", json!({"time_zone": "Asia/Kolkata"}))
        .await;
    // 08:20 IST (02:50 UTC) and 07:30 IST (02:00 UTC) on the 12th.
    appointment(&app, "at-0820", "p1", "2027-01-12T02:50:00Z", None).await;
    appointment(&app, "at-0730", "p1", "2027-01-12T02:00:00Z", None).await;
    // The 24-hour reminders: 07:30 IST on the 11th is quiet (moved to 08:00), 08:20 is not.
    set_clock(&clock, "2027-01-11T02:00:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-24h").await, 1);
    assert_eq!(app.dispatch().await.deferred, 1);
    set_clock(&clock, "2027-01-11T02:30:00Z");
    assert_eq!(app.dispatch().await.sent, 1);
    set_clock(&clock, "2027-01-11T02:50:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-24h").await, 1);
    assert_eq!(app.dispatch().await.sent, 1);
    let day_before = sent(&app).await;
    assert!(day_before["/appointments/at-0730"].contains("tomorrow at 07:30 IST"));
    assert!(day_before["/appointments/at-0820"].contains("tomorrow at 08:20 IST"));
    // The 2-hour reminders fall at 05:30 and 06:20 IST: held to 08:00 IST they would come after
    // the 07:30 appointment, and 20 minutes before the 08:20 one. Both skipped.
    set_clock(&clock, "2027-01-12T00:00:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-2h").await, 1);
    set_clock(&clock, "2027-01-12T00:50:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-2h").await, 1);
    assert_eq!(app.dispatch().await.skipped, 2);
    assert_eq!(
        statuses(&app, "p1").await,
        [
            ("appointment_reminder_24h".into(), "delivered".into(), None),
            ("appointment_reminder_24h".into(), "delivered".into(), None),
            (
                "appointment_reminder_2h".into(),
                "skipped".into(),
                Some("quiet_hours".into())
            ),
            (
                "appointment_reminder_2h".into(),
                "skipped".into(),
                Some("quiet_hours_passed".into())
            ),
        ]
    );
}

async fn daylight_saving_changes_in_london_and_new_york(backend: Backend) {
    let (app, clock) = app_from(backend, quiet(), "2027-03-20T00:00:00Z").await;
    // London springs forward at 01:00 UTC on Sunday 28 Mar 2027. An appointment at 09:00 BST
    // (08:00 UTC) that day.
    appointment(
        &app,
        "london",
        "p1",
        "2027-03-28T08:00:00Z",
        Some("Europe/London"),
    )
    .await;
    // Its 24-hour reminder: 08:00 GMT on Saturday, awake.
    set_clock(&clock, "2027-03-27T08:00:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-24h").await, 1);
    assert_eq!(app.dispatch().await.sent, 1);
    assert!(sent(&app).await["/appointments/london"]
        .contains("reminder of your appointment tomorrow at 09:00 BST."));
    // Its 2-hour reminder: 07:00 BST (06:00 UTC), quiet until 08:00 BST, which is 07:00 UTC (read
    // in GMT it would have waited until 08:00 UTC, the appointment itself).
    set_clock(&clock, "2027-03-28T06:00:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-2h").await, 1);
    assert_eq!(app.dispatch().await.deferred, 1);
    set_clock(&clock, "2027-03-28T07:00:00Z");
    assert_eq!(app.dispatch().await.sent, 1);
    assert!(sent(&app).await["/appointments/london"]
        .contains("your appointment is today at 09:00 BST."));

    // New York falls back at 06:00 UTC on Sunday 7 Nov 2027. An appointment at 08:20 EST (13:20
    // UTC) that day, booked a week ahead.
    set_clock(&clock, "2027-10-30T00:00:00Z");
    appointment(
        &app,
        "ny",
        "p1",
        "2027-11-07T13:20:00Z",
        Some("America/New_York"),
    )
    .await;
    // 24 hours before is 09:20 EDT on Saturday: sent, and the time reads in EST.
    set_clock(&clock, "2027-11-06T13:20:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-24h").await, 1);
    assert_eq!(app.dispatch().await.sent, 1);
    assert!(sent(&app).await["/appointments/ny"]
        .contains("reminder of your appointment tomorrow at 08:20 EST."));
    // 2 hours before is 06:20 EST; quiet hours end at 08:00 EST (13:00 UTC, not 12:00 as in
    // EDT): 20 minutes before the start, so the 2-hour reminder is skipped.
    set_clock(&clock, "2027-11-07T11:20:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-2h").await, 1);
    assert_eq!(app.dispatch().await.skipped, 1);
    let all = statuses(&app, "p1").await;
    assert!(
        all.contains(&(
            "appointment_reminder_2h".into(),
            "skipped".into(),
            Some("quiet_hours".into())
        )),
        "{all:?}"
    );
}

async fn late_bookings_get_the_reminders_still_worth_sending(backend: Backend) {
    let (app, clock) = app_from(backend, TestConfig::new(), "2027-01-12T04:00:00Z").await;
    // Booked 3 hours ahead (07:00), 1 hour ahead (05:00) and 10 hours ahead (14:00); and one
    // booked for three days on, then moved to 05:30.
    appointment(&app, "in-3h", "p1", "2027-01-12T07:00:00Z", None).await;
    appointment(&app, "in-1h", "p1", "2027-01-12T05:00:00Z", None).await;
    appointment(&app, "in-10h", "p1", "2027-01-12T14:00:00Z", None).await;
    appointment(&app, "moved", "p1", "2027-01-15T04:00:00Z", None).await;
    // Only the 10-hour one gets a 24-hour reminder (it reads "today").
    assert_eq!(sweep(&app, "appointment-reminders-24h").await, 1);
    assert_eq!(sweep(&app, "appointment-reminders-2h").await, 0);
    assert_eq!(app.dispatch().await.sent, 1);
    assert!(sent(&app).await["/appointments/in-10h"].contains("appointment today at 14:00."));
    set_clock(&clock, "2027-01-12T04:30:00Z");
    appointment(&app, "moved", "p1", "2027-01-12T05:30:00Z", None).await;
    assert_eq!(sweep(&app, "appointment-reminders-2h").await, 0);
    // Two hours before 07:00 (and a minute): the 3-hour booking's one reminder, though the host
    // app has just sent it again as it was (still booked 3 hours ahead, not 1 h 59).
    set_clock(&clock, "2027-01-12T05:01:00Z");
    appointment(&app, "in-3h", "p1", "2027-01-12T07:00:00Z", None).await;
    assert_eq!(sweep(&app, "appointment-reminders-24h").await, 0);
    assert_eq!(sweep(&app, "appointment-reminders-2h").await, 1);
    set_clock(&clock, "2027-01-12T06:30:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-2h").await, 0);
    // Two hours before 14:00: the 10-hour booking's second reminder.
    set_clock(&clock, "2027-01-12T12:00:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-24h").await, 0);
    assert_eq!(sweep(&app, "appointment-reminders-2h").await, 1);
    assert_eq!(app.dispatch().await.skipped, 1, "07:00 has passed");
    let sent = sent(&app).await;
    assert_eq!(
        sent.keys().collect::<Vec<_>>(),
        ["/appointments/in-10h"],
        "nothing for the 1-hour booking nor the one moved to an hour ahead"
    );
    assert_eq!(
        statuses(&app, "p1").await,
        [
            ("appointment_reminder_24h".into(), "delivered".into(), None),
            ("appointment_reminder_2h".into(), "delivered".into(), None),
            (
                "appointment_reminder_2h".into(),
                "skipped".into(),
                Some("appointment_passed".into())
            ),
        ]
    );
}

async fn a_24h_reminder_held_to_the_morning_is_not_followed_by_another(backend: Backend) {
    // Booked at 22:00 for 09:00 and 11:00 the next morning, and for 14:00.
    let (app, clock) = app_from(backend, quiet(), "2027-01-12T22:00:00Z").await;
    appointment(&app, "at-09", "p1", "2027-01-13T09:00:00Z", None).await;
    appointment(&app, "at-11", "p1", "2027-01-13T11:00:00Z", None).await;
    appointment(&app, "at-14", "p1", "2027-01-13T14:00:00Z", None).await;
    assert_eq!(sweep(&app, "appointment-reminders-24h").await, 3);
    assert_eq!(app.dispatch().await.deferred, 3, "quiet until 08:00");
    // 07:00: the 09:00 appointment's 2-hour reminder would also wait for 08:00; its 24-hour
    // reminder is still to go, so none is planned.
    set_clock(&clock, "2027-01-13T07:00:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-2h").await, 0);
    set_clock(&clock, "2027-01-13T08:00:00Z");
    assert_eq!(app.dispatch().await.sent, 3);
    let morning = sent(&app).await;
    assert!(morning["/appointments/at-09"].contains("appointment today at 09:00."));
    assert!(morning["/appointments/at-11"].contains("appointment today at 11:00."));
    // Within two hours of those, no second reminder.
    set_clock(&clock, "2027-01-13T08:01:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-2h").await, 0);
    set_clock(&clock, "2027-01-13T09:30:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-2h").await, 0);
    // The 14:00 appointment's 2-hour reminder at 12:00 is four hours after its 24-hour one.
    set_clock(&clock, "2027-01-13T12:00:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-2h").await, 1);
    assert_eq!(app.dispatch().await.sent, 1);
    let templates: Vec<String> = statuses(&app, "p1")
        .await
        .into_iter()
        .map(|(template, status, _)| format!("{template} {status}"))
        .collect();
    assert_eq!(
        templates,
        [
            "appointment_reminder_24h delivered",
            "appointment_reminder_24h delivered",
            "appointment_reminder_24h delivered",
            "appointment_reminder_2h delivered",
        ]
    );
}

async fn a_late_booking_is_reminded_at_once_when_asked(backend: Backend) {
    let config = TestConfig::new().set("REMINDER_LATE_BOOKING", "true");
    let (app, clock) = app_from(backend, config, "2027-01-12T04:00:00Z").await;
    appointment(&app, "in-1h", "p1", "2027-01-12T05:00:00Z", None).await;
    appointment(&app, "in-3h", "p1", "2027-01-12T07:00:00Z", None).await;
    assert_eq!(sweep(&app, "appointment-reminders-24h").await, 0);
    assert_eq!(
        sweep(&app, "appointment-reminders-2h").await,
        1,
        "one, at once"
    );
    assert_eq!(sweep(&app, "appointment-reminders-2h").await, 0);
    assert_eq!(app.dispatch().await.sent, 1);
    assert!(sent(&app).await["/appointments/in-1h"].contains("your appointment is today at 05:00."));
    // Booked 3 hours ahead: still one 2-hour reminder, at its time.
    set_clock(&clock, "2027-01-12T05:00:00Z");
    assert_eq!(sweep(&app, "appointment-reminders-24h").await, 0);
    assert_eq!(sweep(&app, "appointment-reminders-2h").await, 1);
    assert_eq!(app.dispatch().await.sent, 1);
    assert_eq!(statuses(&app, "p1").await.len(), 2);
}

async fn send_otp_purpose_defaults_to_verification(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let r = app
        .client
        .post(app.url("/api/messaging/send-otp"))
        .json(&json!({"user_id": "u1", "phone_number": "+919876543210"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let outbox = app.outbox_json().await;
    let body = outbox["messages"][0]["body"].as_str().unwrap();
    let code: String = body.chars().filter(char::is_ascii_digit).collect();
    let verify = |purpose: &str| {
        app.client
            .post(app.url("/api/messaging/verify-otp"))
            .json(&json!({"user_id": "u1", "otp_code": code, "purpose": purpose}))
            .send()
    };
    assert_eq!(verify("login").await.unwrap().status(), 400);
    let r = verify("verification").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["valid"], true);
}

/// A database at migration 8 with an appointment (zone given), a follow-up and a queued reminder
/// with the old variables, then the service started on it.
async fn rows_written_before_keep_their_zone_and_read_right(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let dir = match backend {
        Backend::Sqlite => "migrations/sqlite",
        Backend::Postgres => "migrations/postgres",
    };
    let mut migrator =
        sqlx::migrate::Migrator::new(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir))
            .await
            .unwrap();
    let up_to_8: Vec<_> = migrator
        .migrations
        .iter()
        .filter(|m| m.version <= 8)
        .cloned()
        .collect();
    migrator.migrations = up_to_8.into();
    match backend {
        Backend::Sqlite => {
            let options: sqlx::sqlite::SqliteConnectOptions = db.url.parse().unwrap();
            let pool = sqlx::SqlitePool::connect_with(options.create_if_missing(true))
                .await
                .unwrap();
            migrator.run(&pool).await.unwrap();
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            migrator.run(&pool).await.unwrap();
        }
    }
    let ts = |s: &str| format!("'{s}+00:00'");
    for sql in [
        format!(
            "INSERT INTO messaging_consent (user_id, phone_number, sms_consent, created_at, \
             updated_at) VALUES ('p1', '+919876543210', TRUE, {0}, {0})",
            ts("2027-01-01T00:00:00")
        ),
        format!(
            "INSERT INTO appointments (id, user_id, starts_at, time_zone, status, created_at, \
             updated_at) VALUES ('old', 'p1', {}, 'Asia/Kolkata', 'scheduled', {1}, {1})",
            ts("2027-01-13T00:00:00"),
            ts("2027-01-10T00:00:00")
        ),
        format!(
            "INSERT INTO follow_ups (id, user_id, due_at, time_zone, status, created_at, \
             updated_at) VALUES ('old-f', 'p1', {}, 'UTC', 'scheduled', {1}, {1})",
            ts("2027-01-20T00:00:00"),
            ts("2027-01-10T00:00:00")
        ),
        format!(
            "INSERT INTO messages (id, user_id, template_name, variables, channel, status, \
             next_attempt_at, created_at, updated_at) VALUES ('m-old', 'p1', \
             'appointment_reminder_24h', \
             '{{\"date\":\"2027-01-13\",\"time\":\"05:30\",\"link\":\"/appointments/old\"}}', \
             'sms', 'queued', {0}, {0}, {0})",
            ts("2027-01-12T03:00:00")
        ),
        format!(
            "INSERT INTO reminder_log (subject_type, subject_id, kind, starts_at, user_id, \
             active, message_id, created_at) VALUES ('appointment', 'old', '24h', {}, 'p1', \
             TRUE, 'm-old', {})",
            ts("2027-01-13T00:00:00"),
            ts("2027-01-12T03:00:00")
        ),
    ] {
        db.execute(&sql).await.unwrap();
    }

    let clock = ManualClock::new(t("2027-01-12T04:00:00Z"));
    let mut vars = TestConfig::new().vars;
    vars.insert("DATABASE_URL".into(), db.url.clone());
    let config = Config::from_lookup(|name| vars.get(name).cloned()).unwrap();
    let services = Services::build(config, Arc::new(clock.clone()))
        .await
        .unwrap();
    let store = &services.store;
    let old = store
        .get_scheduled(SubjectType::Appointment, "old")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.time_zone.as_deref(), Some("Asia/Kolkata"));
    let follow_up = store
        .get_scheduled(SubjectType::FollowUp, "old-f")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(follow_up.time_zone.as_deref(), Some("UTC"));
    // The queued reminder now carries its appointment's instant and reads in its zone.
    let report = services.dispatcher.run_once().await.unwrap();
    assert_eq!(report.sent, 1);
    let outbox = services.mock.as_ref().unwrap().outbox();
    assert_eq!(
        outbox[0].body,
        "PhysiologicPRISM: reminder of your appointment tomorrow at 05:30 IST. Details: https://app.example.com/appointments/old Reply STOP to opt out."
    );
    // Booked three days ahead (since it was created): its 2-hour reminder is due.
    clock.advance(Duration::hours(18));
    let swept = services
        .reminders
        .sweep(prism_messaging::reminders::Reminder::Appointment2h)
        .await
        .unwrap();
    assert_eq!(swept.queued, 1);
}

#[tokio::test]
async fn templates_say_their_kind() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let answer = app.get_json("/api/templates", Some(API_KEY)).await;
    let kinds: BTreeMap<String, String> = answer["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (name, kind) in [
        ("appointment_reminder_24h", "scheduled"),
        ("appointment_reminder_2h", "scheduled"),
        ("follow_up_reminder", "scheduled"),
        ("payment_received", "transactional"),
        ("payment_failed", "transactional"),
        ("clinic_news", "marketing"),
    ] {
        assert_eq!(kinds.get(name).map(String::as_str), Some(kind), "{name}");
    }
    // OTPs and keyword replies are the service's own: not listed.
    for name in ["otp", "help", "opt_out_confirmation", "opt_in_confirmation"] {
        assert!(!kinds.contains_key(name), "{name}");
    }
    assert!(kinds
        .values()
        .all(|k| ["scheduled", "transactional", "marketing", "otp"].contains(&k.as_str())));
}

#[tokio::test]
async fn job_help_lists_every_job() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_prism-messaging"))
        .args(["job", "--help"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for job in prism_messaging::scheduler::Job::ALL {
        assert!(
            help.contains(job.name()),
            "{} missing from:\n{help}",
            job.name()
        );
    }
}
