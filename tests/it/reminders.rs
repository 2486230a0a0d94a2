//! Appointment and follow-up reminders on both backends, with a controllable clock.

use crate::common::*;
use chrono::{DateTime, Duration, Utc};
use prism_messaging::clock::ManualClock;
use serde_json::{json, Value};

both_backends!(
    a_24h_reminder_is_queued_once_in_the_patients_time,
    a_rescheduled_appointment_gets_a_new_reminder_and_skips_the_old,
    a_cancelled_appointment_skips_its_unsent_reminders,
    the_2h_reminder_and_the_windows,
    follow_ups_are_reminded_on_their_due_date,
    a_reminder_held_past_its_appointment_is_skipped,
    a_reminder_the_host_queued_is_not_held_past_the_time_it_names,
    bad_input_and_the_cron_secret,
);

/// 2027-01-12 04:00 UTC = 09:30 in Kolkata.
fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2027-01-12T04:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

async fn app_at(backend: Backend, config: TestConfig) -> (TestApp, ManualClock) {
    app_from(backend, config, t0()).await
}

/// The app on a clock that starts at `start`.
async fn app_from(
    backend: Backend,
    config: TestConfig,
    start: DateTime<Utc>,
) -> (TestApp, ManualClock) {
    let clock = ManualClock::new(start);
    let config = config.with_clock(&clock);
    let app = TestApp::spawn_with(backend, config).await;
    app.consent("p1", "+919876543210").await;
    (app, clock)
}

async fn put(app: &TestApp, path: &str, body: Value) -> reqwest::Response {
    app.client
        .put(app.url(path))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn cron(app: &TestApp, job: &str) -> Value {
    let r = app
        .client
        .post(app.url(&format!("/cron/{job}")))
        .bearer_auth(CRON_SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn at(offset: Duration) -> String {
    (t0() + offset).to_rfc3339()
}

async fn statuses(app: &TestApp) -> Vec<(String, String, Option<String>)> {
    let mut all: Vec<_> = app
        .state
        .store
        .user_messages("p1", 100)
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

async fn a_24h_reminder_is_queued_once_in_the_patients_time(backend: Backend) {
    let (app, _clock) = app_at(backend, TestConfig::new()).await;
    let r = put(
        &app,
        "/api/appointments/appt-1",
        json!({"user_id": "p1", "starts_at": at(Duration::hours(20)), "time_zone": "Asia/Kolkata"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["appointment"]["status"], "scheduled");
    assert_eq!(cron(&app, "appointment-reminders-24h").await["queued"], 1);
    assert_eq!(
        cron(&app, "appointment-reminders-24h").await["queued"],
        0,
        "never twice"
    );
    // The same PUT again is an update, not a second appointment.
    put(
        &app,
        "/api/appointments/appt-1",
        json!({"user_id": "p1", "starts_at": at(Duration::hours(20)), "time_zone": "Asia/Kolkata"}),
    )
    .await;
    assert_eq!(cron(&app, "appointment-reminders-24h").await["queued"], 0);
    assert_eq!(app.dispatch().await.sent, 1);
    let outbox = app.outbox_json().await;
    // 20 hours after 04:00 UTC is 00:00 UTC on the 13th: 05:30 on 13 Jan in Kolkata, tomorrow
    // there (it is 09:30 on the 12th), in a zone other than DEFAULT_TIME_ZONE (UTC).
    assert_eq!(
        outbox["messages"][0]["body"],
        "PhysiologicPRISM: reminder of your appointment tomorrow at 05:30 IST. Details: https://app.example.com/appointments/appt-1 Reply STOP to opt out."
    );
}

async fn a_rescheduled_appointment_gets_a_new_reminder_and_skips_the_old(backend: Backend) {
    let (app, _clock) = app_at(backend, TestConfig::new()).await;
    put(
        &app,
        "/api/appointments/a2",
        json!({"user_id": "p1", "starts_at": at(Duration::hours(20))}),
    )
    .await;
    assert_eq!(cron(&app, "appointment-reminders-24h").await["queued"], 1);
    put(
        &app,
        "/api/appointments/a2",
        json!({"user_id": "p1", "starts_at": at(Duration::hours(22))}),
    )
    .await;
    assert_eq!(
        cron(&app, "appointment-reminders-24h").await["queued"],
        1,
        "the new time gets its own reminder"
    );
    let report = app.dispatch().await;
    assert_eq!((report.sent, report.skipped), (1, 1));
    let all = statuses(&app).await;
    assert!(
        all.contains(&(
            "appointment_reminder_24h".into(),
            "skipped".into(),
            Some("appointment_rescheduled".into())
        )),
        "{all:?}"
    );
    assert!(
        all.contains(&("appointment_reminder_24h".into(), "delivered".into(), None)),
        "{all:?}"
    );
}

async fn a_cancelled_appointment_skips_its_unsent_reminders(backend: Backend) {
    let (app, _clock) = app_at(backend, TestConfig::new()).await;
    put(
        &app,
        "/api/appointments/a3",
        json!({"user_id": "p1", "starts_at": at(Duration::hours(20))}),
    )
    .await;
    cron(&app, "appointment-reminders-24h").await;
    let r = app
        .client
        .delete(app.url("/api/appointments/a3"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["reminders_skipped"], 1);
    assert_eq!(
        statuses(&app).await,
        [(
            "appointment_reminder_24h".into(),
            "skipped".into(),
            Some("appointment_cancelled".into())
        )]
    );
    assert_eq!(app.dispatch().await.claimed, 0);
    assert_eq!(cron(&app, "appointment-reminders-24h").await["queued"], 0);
    assert_eq!(cron(&app, "appointment-reminders-2h").await["queued"], 0);
    let r = app
        .client
        .delete(app.url("/api/appointments/nope"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Cancelling through PUT works the same way.
    put(
        &app,
        "/api/appointments/a4",
        json!({"user_id": "p1", "starts_at": at(Duration::hours(10))}),
    )
    .await;
    assert_eq!(cron(&app, "appointment-reminders-24h").await["queued"], 1);
    let r = put(
        &app,
        "/api/appointments/a4",
        json!({"user_id": "p1", "starts_at": at(Duration::hours(10)), "status": "cancelled"}),
    )
    .await;
    assert_eq!(
        r.json::<Value>().await.unwrap()["appointment"]["status"],
        "cancelled"
    );
    assert_eq!(app.dispatch().await.sent, 0);
    assert_eq!(
        statuses(&app).await,
        [
            (
                "appointment_reminder_24h".into(),
                "skipped".into(),
                Some("appointment_cancelled".into())
            ),
            (
                "appointment_reminder_24h".into(),
                "skipped".into(),
                Some("appointment_cancelled".into())
            )
        ]
    );
}

async fn the_2h_reminder_and_the_windows(backend: Backend) {
    // Booked at 00:00 UTC, four hours before t0.
    let (app, clock) = app_from(backend, TestConfig::new(), t0() - Duration::hours(4)).await;
    put(
        &app,
        "/api/appointments/soon",
        json!({"user_id": "p1", "starts_at": at(Duration::minutes(90))}),
    )
    .await;
    clock.advance(Duration::hours(4));
    put(
        &app,
        "/api/appointments/later",
        json!({"user_id": "p1", "starts_at": at(Duration::hours(30))}),
    )
    .await;
    assert_eq!(
        cron(&app, "appointment-reminders-24h").await["queued"],
        0,
        "90 minutes away is the 2-hour reminder's"
    );
    assert_eq!(cron(&app, "appointment-reminders-2h").await["queued"], 1);
    // Six hours on, the later one enters its 24-hour window.
    clock.advance(Duration::hours(6) + Duration::minutes(1));
    assert_eq!(cron(&app, "appointment-reminders-24h").await["queued"], 1);
}

async fn follow_ups_are_reminded_on_their_due_date(backend: Backend) {
    let (app, clock) = app_at(backend, TestConfig::new()).await;
    let r = put(
        &app,
        "/api/follow-ups/f1",
        json!({"user_id": "p1", "due_at": at(Duration::hours(3))}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["follow_up"]["due_at"],
        "2027-01-12T07:00:00Z"
    );
    assert_eq!(
        cron(&app, "follow-up-reminders").await["queued"],
        0,
        "not due yet"
    );
    clock.advance(Duration::hours(3));
    assert_eq!(cron(&app, "follow-up-reminders").await["queued"], 1);
    assert_eq!(cron(&app, "follow-up-reminders").await["queued"], 0);
    app.dispatch().await;
    let outbox = app.outbox_json().await;
    assert!(outbox["messages"][0]["body"]
        .as_str()
        .unwrap()
        .contains("follow-up due today."));
    let r = app
        .client
        .delete(app.url("/api/follow-ups/f1"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// An appointment reminder the host app queues itself (`POST /api/notifications`, no appointment
/// stored here) keeps the same rules under quiet hours, by the time it names: held past it,
/// skipped (found by review: it went out after the appointment began).
async fn a_reminder_the_host_queued_is_not_held_past_the_time_it_names(backend: Backend) {
    // 04:00 UTC, inside 21:00-08:00 UTC quiet hours.
    let quiet = TestConfig::new().set("QUIET_HOURS", "21:00-08:00");
    let (app, _clock) = app_at(backend, quiet).await;
    for (template, starts_in) in [
        ("appointment_reminder_2h", Duration::minutes(90)),
        ("appointment_reminder_24h", Duration::hours(3)),
        ("appointment_reminder_2h", Duration::minutes(250)),
        ("appointment_reminder_24h", Duration::hours(24)),
    ] {
        app.notify_ok(json!({"user_id": "p1", "template": template,
            "variables": {"starts_at": at(starts_in), "link": "/appointments/a1"}}))
            .await;
    }
    app.dispatch().await;
    let mut seen = statuses(&app).await;
    seen.sort();
    let skipped = |reason: &str| Some(reason.to_string());
    assert_eq!(
        seen,
        [
            // Held to 08:00, the day before its appointment.
            ("appointment_reminder_24h".into(), "queued".into(), None),
            (
                "appointment_reminder_24h".into(),
                "skipped".into(),
                skipped("quiet_hours_passed")
            ),
            // Held to 08:00, ten minutes before its 08:10 appointment: too near, skipped.
            (
                "appointment_reminder_2h".into(),
                "skipped".into(),
                skipped("quiet_hours")
            ),
            (
                "appointment_reminder_2h".into(),
                "skipped".into(),
                skipped("quiet_hours_passed")
            ),
        ]
    );
}

async fn a_reminder_held_past_its_appointment_is_skipped(backend: Backend) {
    // 04:00 UTC is inside 21:00-08:00 UTC quiet hours; the appointment at 05:30 (booked the day
    // before) is before they end.
    let quiet = TestConfig::new().set("QUIET_HOURS", "21:00-08:00");
    let (app, clock) = app_from(backend, quiet, t0() - Duration::days(1)).await;
    put(
        &app,
        "/api/appointments/early",
        json!({"user_id": "p1", "starts_at": at(Duration::minutes(90))}),
    )
    .await;
    clock.advance(Duration::days(1));
    cron(&app, "appointment-reminders-2h").await;
    assert_eq!(app.dispatch().await.skipped, 1);
    assert_eq!(
        statuses(&app).await,
        [(
            "appointment_reminder_2h".into(),
            "skipped".into(),
            Some("quiet_hours_passed".into())
        )]
    );
    // Outside quiet hours, a reminder whose appointment has begun is skipped too.
    let (app, clock2) = app_from(backend, TestConfig::new(), t0() - Duration::days(1)).await;
    put(
        &app,
        "/api/appointments/now",
        json!({"user_id": "p1", "starts_at": at(Duration::minutes(30))}),
    )
    .await;
    clock2.advance(Duration::days(1));
    cron(&app, "appointment-reminders-2h").await;
    clock2.advance(Duration::minutes(31));
    assert_eq!(app.dispatch().await.skipped, 1);
    assert_eq!(
        statuses(&app).await,
        [(
            "appointment_reminder_2h".into(),
            "skipped".into(),
            Some("appointment_passed".into())
        )]
    );
}

async fn bad_input_and_the_cron_secret(backend: Backend) {
    let (app, _clock) = app_at(backend, TestConfig::new()).await;
    for (path, body, code) in [
        (
            "/api/appointments/bad%20id",
            json!({"user_id": "p1", "starts_at": at(Duration::hours(1))}),
            "invalid_id",
        ),
        // (`.` and `..`, which a client's URL library folds away before they arrive:
        // `reminders::tests::ids_that_a_link_cannot_carry_are_refused`.)
        (
            "/api/appointments/a",
            json!({"user_id": "p1", "starts_at": "tomorrow"}),
            "invalid_time",
        ),
        // RFC 3339, but outside its years once in UTC (stored, year 10000 would read
        // "+10000-..." and sort before today).
        (
            "/api/appointments/a",
            json!({"user_id": "p1", "starts_at": "9999-12-31T23:00:00-05:00"}),
            "invalid_time",
        ),
        (
            "/api/follow-ups/f",
            json!({"user_id": "p1", "due_at": "0000-01-01T00:00:00+01:00"}),
            "invalid_time",
        ),
        (
            "/api/appointments/a",
            json!({"user_id": "p1", "starts_at": at(Duration::hours(1)), "time_zone": "Mars/Base"}),
            "invalid_time_zone",
        ),
        (
            "/api/appointments/a",
            json!({"user_id": "p1", "starts_at": at(Duration::hours(1)), "status": "maybe"}),
            "invalid_status",
        ),
        (
            "/api/follow-ups/f",
            json!({"user_id": "", "due_at": at(Duration::hours(1))}),
            "invalid_user_id",
        ),
    ] {
        let r = put(&app, path, body.clone()).await;
        assert_eq!(r.status(), 400, "{path} {body}");
        assert_eq!(error_code(r).await, code, "{path} {body}");
    }
    let r = app
        .client
        .put(app.url("/api/appointments/a"))
        .json(&json!({"user_id": "p1", "starts_at": at(Duration::hours(1))}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for job in [
        "appointment-reminders-24h",
        "appointment-reminders-2h",
        "follow-up-reminders",
    ] {
        let r = app
            .client
            .post(app.url(&format!("/cron/{job}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{job}");
    }
}
