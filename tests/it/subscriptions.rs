//! Subscriptions (reminders once per period, skipped when cancelled, expired or moved), the CSV
//! import through the built binary, and two PostgreSQL instances sweeping at once.

use std::process::Stdio;
use std::sync::Arc;

use crate::common::*;
use chrono::{DateTime, Duration, Utc};
use prism_messaging::app::Services;
use prism_messaging::clock::ManualClock;
use prism_messaging::config::Config;
use prism_messaging::reminders::Reminder;
use prism_messaging::store::{ItemStatus, ScheduledItem, SubjectType};
use serde_json::{json, Value};

both_backends!(
    subscription_reminders_go_once_per_period,
    a_moved_cancelled_expired_or_passed_subscription_skips_its_reminders,
    subscription_input_is_checked_and_the_templates_stay_sendable,
    an_appointment_import_is_idempotent_and_refuses_rows_by_line,
    follow_up_and_subscription_imports,
    subscription_reminders_read_in_the_patients_time_and_wait_for_morning,
);

/// 2027-01-12 04:00 UTC.
fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2027-01-12T04:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn at(offset: Duration) -> String {
    (t0() + offset).to_rfc3339()
}

async fn app_at(backend: Backend) -> (TestApp, ManualClock) {
    let clock = ManualClock::new(t0());
    let app = TestApp::spawn_with(backend, TestConfig::new().with_clock(&clock)).await;
    app.consent("p1", "+919876543210").await;
    (app, clock)
}

async fn put(app: &TestApp, id: &str, body: Value) -> reqwest::Response {
    app.client
        .put(app.url(&format!("/api/subscriptions/{id}")))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn put_ok(app: &TestApp, id: &str, body: Value) -> Value {
    let r = put(app, id, body).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    r.json().await.unwrap()
}

async fn sweep(app: &TestApp) -> u64 {
    let r = app
        .client
        .post(app.url("/cron/subscription-reminders"))
        .bearer_auth(CRON_SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["success"], true);
    body["queued"].as_u64().unwrap()
}

/// (template, status, reason) of p1's messages, sorted.
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

fn skipped(template: &str, reason: &str) -> (String, String, Option<String>) {
    (template.into(), "skipped".into(), Some(reason.into()))
}

async fn subscription_reminders_go_once_per_period(backend: Backend) {
    let (app, clock) = app_at(backend).await;
    let body = put_ok(
        &app,
        "s1",
        json!({"user_id": "p1", "plan": "Pro monthly", "expires_at": at(Duration::days(6))}),
    )
    .await;
    assert_eq!(
        body["subscription"],
        json!({"id": "s1", "user_id": "p1", "plan": "Pro monthly", "renews_at": null,
               "expires_at": "2027-01-18T04:00:00Z", "status": "active"})
    );
    put_ok(
        &app,
        "s2",
        json!({"user_id": "p1", "plan": "Family (12 months)", "renews_at": at(Duration::hours(60)),
               "status": "active"}),
    )
    .await;
    assert_eq!(sweep(&app).await, 2, "s1's 7-day and s2's 3-day reminders");
    assert_eq!(sweep(&app).await, 0, "never twice");
    // The same PUT again is an update of the same period: nothing new.
    put_ok(
        &app,
        "s1",
        json!({"user_id": "p1", "plan": "Pro monthly", "expires_at": at(Duration::days(6))}),
    )
    .await;
    assert_eq!(sweep(&app).await, 0);
    assert_eq!(app.dispatch().await.sent, 2);
    let outbox = app.outbox_json().await;
    let mut bodies: Vec<&str> = outbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    bodies.sort();
    assert_eq!(
        bodies,
        [
            "PhysiologicPRISM: your subscription expires on Monday 18 Jan 2027. Renew or manage it here: https://app.example.com/subscriptions/s1",
            "PhysiologicPRISM: your subscription renews on Thursday 14 Jan 2027. Manage it here: https://app.example.com/subscriptions/s2",
        ]
    );

    // 23 hours before it expires: the 1-day reminder, once.
    clock.advance(Duration::days(5) + Duration::hours(1));
    assert_eq!(sweep(&app).await, 1);
    assert_eq!(sweep(&app).await, 0);
    assert_eq!(app.dispatch().await.sent, 1);

    // Renewed for a month: a new period, reminded again.
    put_ok(
        &app,
        "s1",
        json!({"user_id": "p1", "plan": "Pro monthly", "expires_at": at(Duration::days(36))}),
    )
    .await;
    assert_eq!(sweep(&app).await, 0, "a month away");
    clock.advance(Duration::days(25));
    assert_eq!(sweep(&app).await, 1, "the new period's 7-day reminder");
    assert_eq!(app.dispatch().await.sent, 1);
    // The job is the scheduler's too.
    let job = prism_messaging::scheduler::Job::parse("subscription-reminders").unwrap();
    let report = job.run(&app.state.services).await.unwrap();
    assert_eq!(report["queued"], 0);
}

async fn subscription_reminders_read_in_the_patients_time_and_wait_for_morning(backend: Backend) {
    // 2027-01-12 20:00 UTC is 01:30 on the 13th in Kolkata: quiet hours there.
    let clock = ManualClock::new(t0() + Duration::hours(16));
    let config = TestConfig::new()
        .set("QUIET_HOURS", "21:00-08:00")
        .with_clock(&clock);
    let app = TestApp::spawn_with(backend, config).await;
    app.consent("p1", "+919876543210").await;
    app.put_preferences("p1", json!({"time_zone": "Asia/Kolkata"}))
        .await;
    // Expires at 2027-01-13 23:00 UTC: 04:30 on the 14th in Kolkata.
    put_ok(
        &app,
        "s1",
        json!({"user_id": "p1", "plan": "Pro", "expires_at": at(Duration::hours(43))}),
    )
    .await;
    // 7 hours before the 1-day window opens; then the sweep queues it at night there.
    clock.advance(Duration::hours(4));
    assert_eq!(sweep(&app).await, 1);
    let report = app.dispatch().await;
    assert_eq!(
        report.sent, 0,
        "a scheduled message waits for the patient's morning"
    );
    assert!(app.outbox_json().await["messages"]
        .as_array()
        .unwrap()
        .is_empty());
    // 08:00 in Kolkata is 02:30 UTC on the 13th.
    clock.advance(Duration::hours(3) + Duration::minutes(31));
    assert_eq!(app.dispatch().await.sent, 1);
    let outbox = app.outbox_json().await;
    assert_eq!(
        outbox["messages"][0]["body"],
        "PhysiologicPRISM: your subscription expires tomorrow. Renew or manage it here: \
         https://app.example.com/subscriptions/s1",
        "the day in the patient's zone, not UTC's"
    );
}

async fn a_moved_cancelled_expired_or_passed_subscription_skips_its_reminders(backend: Backend) {
    let (app, clock) = app_at(backend).await;
    let expiring = "subscription_expiring";
    // Moved: the old period's reminder is skipped at send time, the new one's goes.
    put_ok(
        &app,
        "moved",
        json!({"user_id": "p1", "plan": "Pro", "expires_at": at(Duration::days(6))}),
    )
    .await;
    assert_eq!(sweep(&app).await, 1);
    put_ok(
        &app,
        "moved",
        json!({"user_id": "p1", "plan": "Pro", "expires_at": at(Duration::days(5))}),
    )
    .await;
    assert_eq!(sweep(&app).await, 1);
    let report = app.dispatch().await;
    assert_eq!((report.sent, report.skipped), (1, 1));
    assert!(statuses(&app)
        .await
        .contains(&skipped(expiring, "subscription_rescheduled")));

    // Cancelled by DELETE: both its subjects' reminders are skipped at once.
    put_ok(
        &app,
        "deleted",
        json!({"user_id": "p1", "plan": "Pro", "renews_at": at(Duration::days(2)),
               "expires_at": at(Duration::days(3))}),
    )
    .await;
    assert_eq!(sweep(&app).await, 2);
    let r = app
        .client
        .delete(app.url("/api/subscriptions/deleted"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["reminders_skipped"], 2);
    let r = app
        .client
        .delete(app.url("/api/subscriptions/nope"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "not_found");

    // Cancelled or expired through PUT: skipped at once, and not planned again.
    for (id, status, reason) in [
        ("cancelled", "cancelled", "subscription_cancelled"),
        ("expired", "expired", "subscription_expired"),
    ] {
        put_ok(
            &app,
            id,
            json!({"user_id": "p1", "plan": "Pro", "expires_at": at(Duration::days(3))}),
        )
        .await;
        assert_eq!(sweep(&app).await, 1, "{id}");
        let body = put_ok(
            &app,
            id,
            json!({"user_id": "p1", "plan": "Pro", "expires_at": at(Duration::days(3)),
                   "status": status}),
        )
        .await;
        assert_eq!(body["subscription"]["status"], status);
        assert!(statuses(&app).await.contains(&skipped(expiring, reason)));
    }
    assert_eq!(sweep(&app).await, 0);
    assert_eq!(app.dispatch().await.claimed, 0, "nothing left to send");
    let all = statuses(&app).await;
    assert_eq!(
        all.iter()
            .filter(|s| **s == skipped(expiring, "subscription_cancelled")
                || **s == skipped("subscription_renewal", "subscription_cancelled"))
            .count(),
        3,
        "{all:?}"
    );

    // Its date came before the reminder could go (held, say, by quiet hours): skipped.
    put_ok(
        &app,
        "passing",
        json!({"user_id": "p1", "plan": "Pro", "expires_at": at(Duration::hours(20))}),
    )
    .await;
    assert_eq!(sweep(&app).await, 1);
    clock.advance(Duration::hours(21));
    assert_eq!(app.dispatch().await.skipped, 1);
    assert!(statuses(&app)
        .await
        .contains(&skipped(expiring, "subscription_passed")));
}

async fn subscription_input_is_checked_and_the_templates_stay_sendable(backend: Backend) {
    let (app, _clock) = app_at(backend).await;
    let expires = at(Duration::days(3));
    for (id, body, code) in [
        (
            "bad%20id",
            json!({"user_id": "p1", "plan": "Pro", "expires_at": expires}),
            "invalid_id",
        ),
        (
            "s",
            json!({"user_id": "", "plan": "Pro", "expires_at": expires}),
            "invalid_user_id",
        ),
        (
            "s",
            json!({"user_id": "p1", "plan": "ACL rehab.pdf", "expires_at": expires}),
            "invalid_plan",
        ),
        (
            "s",
            json!({"user_id": "p1", "plan": "", "expires_at": expires}),
            "invalid_plan",
        ),
        ("s", json!({"user_id": "p1", "plan": "Pro"}), "invalid_time"),
        (
            "s",
            json!({"user_id": "p1", "plan": "Pro", "renews_at": "next week"}),
            "invalid_time",
        ),
        (
            "s",
            json!({"user_id": "p1", "plan": "Pro", "expires_at": expires, "status": "paused"}),
            "invalid_status",
        ),
        (
            "s",
            json!({"user_id": "p1", "plan": "Pro", "expires_at": expires, "note": "x"}),
            "invalid_json",
        ),
    ] {
        let r = put(&app, id, body.clone()).await;
        assert_eq!(r.status(), 400, "{id} {body}");
        let answer: Value = r.json().await.unwrap();
        assert_eq!(answer["success"], false);
        assert_eq!(answer["error"]["code"], code, "{body}");
    }
    assert!(app
        .state
        .store
        .get_subscription("s")
        .await
        .unwrap()
        .is_none());
    let r = app
        .client
        .put(app.url("/api/subscriptions/s"))
        .json(&json!({"user_id": "p1", "plan": "Pro", "expires_at": expires}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .delete(app.url("/api/subscriptions/s"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .post(app.url("/cron/subscription-reminders"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The host app may still send both templates itself, and its payment notifications.
    let templates = app
        .client
        .get(app.url("/api/templates"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let names: Vec<&str> = templates["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"subscription_expiring") && names.contains(&"subscription_renewal"));
    for (template, variables) in [
        (
            "subscription_expiring",
            json!({"date": "2027-01-19", "link": "/subscriptions/s1"}),
        ),
        (
            "subscription_renewal",
            json!({"date": "2027-01-19", "link": "/subscriptions/s1"}),
        ),
        (
            "payment_received",
            json!({"amount": "INR 499.00", "date": "2027-01-12"}),
        ),
        (
            "payment_failed",
            json!({"amount": "INR 499.00", "link": "/billing"}),
        ),
    ] {
        app.notify_ok(json!({"user_id": "p1", "template": template, "variables": variables}))
            .await;
    }
    let report = app.dispatch().await;
    assert_eq!(report.sent, 4, "no item behind them, nothing to skip");
}

// ---- The import, through the built binary ------------------------------------------------------

fn binary(dir: &std::path::Path, database_url: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_prism-messaging"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("QUIET_HOURS", "off")
        .env("DATABASE_URL", database_url)
        .env("DATA_ENCRYPTION_KEY", DATA_KEY)
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Run `import KIND FILE`: (exit code, stdout with the file's path as `FILE`); stderr (logs, the
/// error that refused a whole file) is appended after a `--- stderr` line when there is an error.
async fn import(db: &TestDatabase, kind: &str, csv: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("calendar.csv");
    std::fs::write(&file, csv).unwrap();
    let out = binary(dir.path(), &db.url)
        .args(["import", kind])
        .arg(&file)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains('\r') && !stdout.contains("importing"),
        "no progress bar when stdout is not a terminal: {stdout:?}"
    );
    let mut summary = stdout.replace(&file.display().to_string(), "FILE");
    if stderr.contains("error") {
        summary.push_str(&format!("--- stderr\n{stderr}"));
    }
    (out.status.code().unwrap_or(-1), summary)
}

async fn updated_at(db: &TestDatabase, table: &str) -> Vec<(String, String)> {
    db.text_pairs(&format!(
        "SELECT id, CAST(updated_at AS TEXT) FROM {table} ORDER BY id"
    ))
    .await
}

async fn an_appointment_import_is_idempotent_and_refuses_rows_by_line(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let soon = (Utc::now() + Duration::hours(20)).to_rfc3339();
    let csv = format!(
        "id,user_id,starts_at,time_zone,status\n\
         a1,p1,{soon},Asia/Kolkata,\n\
         a2,p2,2027-01-14T10:30:00+05:30,,scheduled\n\
         a3,p3,tomorrow,,\n\
         a4,p4,2027-01-15T09:00:00Z,Mars/Base,\n\
         a5,p5,2027-01-15T09:00:00Z,,cancelled\n\
         a 6,p6,2027-01-15T09:00:00Z,,\n\
         a7,p7,2027-01-15T09:00:00Z\n\
         a8,p8,2027-01-15T09:00:00Z,,maybe\n"
    );
    let (code, out) = import(&db, "appointments", &csv).await;
    assert_eq!(code, 1, "{out}");
    let refusals = "  line 4: starts_at must be an RFC 3339 time (invalid_time)\n\
         \x20 line 5: time_zone must be an IANA zone such as Asia/Kolkata (invalid_time_zone)\n\
         \x20 line 7: ids are 1 to 64 letters, digits, '-', '_' or '.', and not '.' or '..' (invalid_id)\n\
         \x20 line 8: the row has 3 fields; the header has 5 (invalid_csv)\n\
         \x20 line 9: status must be scheduled or cancelled (invalid_status)\n";
    assert_eq!(
        out,
        format!(
            "FILE: 8 appointments rows: 3 created, 0 updated, 0 unchanged, 5 refused\n{refusals}"
        )
    );
    let store = prism_messaging::store::connect(&db.url, &test_keys())
        .await
        .unwrap();
    // Nothing half-written for a refused row.
    for id in ["a3", "a4", "a 6", "a7", "a8"] {
        assert!(store
            .get_scheduled(SubjectType::Appointment, id)
            .await
            .unwrap()
            .is_none());
    }
    let a2 = store
        .get_scheduled(SubjectType::Appointment, "a2")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a2.scheduled_at.to_rfc3339(), "2027-01-14T05:00:00+00:00");
    assert_eq!(a2.time_zone, None, "no zone stored, as with PUT");
    let a5 = store
        .get_scheduled(SubjectType::Appointment, "a5")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a5.status, ItemStatus::Cancelled);

    // The same file again changes nothing: nothing is rewritten.
    let before = updated_at(&db, "appointments").await;
    let (code, out) = import(&db, "appointments", &csv).await;
    assert_eq!(code, 1);
    assert_eq!(
        out,
        format!(
            "FILE: 8 appointments rows: 0 created, 0 updated, 3 unchanged, 5 refused\n{refusals}"
        )
    );
    assert_eq!(updated_at(&db, "appointments").await, before);

    // A reminder queued for a1, then a1 cancelled by an import: skipped, as with PUT.
    let mut vars = TestConfig::new().vars;
    vars.insert("DATABASE_URL".into(), db.url.clone());
    let config = Config::from_lookup(|name| vars.get(name).cloned()).unwrap();
    let services = Services::from_config(config).await.unwrap();
    let report = services
        .reminders
        .sweep(Reminder::Appointment24h)
        .await
        .unwrap();
    assert_eq!(report.queued, 1);
    let csv = format!(
        "status,id,user_id,starts_at,time_zone\n\
         cancelled,a1,p1,{soon},Asia/Kolkata\n\
         scheduled,a2,p2,2027-01-14T10:30:00+05:30,\n"
    );
    let (code, out) = import(&db, "appointments", &csv).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        "FILE: 2 appointments rows: 0 created, 1 updated, 1 unchanged, 0 refused\n"
    );
    let messages = store.user_messages("p1", 10).await.unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].status, "skipped");
    assert_eq!(
        messages[0].reason.map(|r| r.to_string()).as_deref(),
        Some("appointment_cancelled")
    );

    // A file whose header is not the expected one is refused whole.
    let (code, out) = import(
        &db,
        "appointments",
        "id,user,starts_at\na9,p9,2027-01-15T09:00:00Z\n",
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        out.contains("id,user_id,starts_at,time_zone,status"),
        "{out}"
    );
    assert!(store
        .get_scheduled(SubjectType::Appointment, "a9")
        .await
        .unwrap()
        .is_none());
}

async fn follow_up_and_subscription_imports(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let follow_ups = "id,user_id,due_at,time_zone\n\
         f1,p1,2027-02-01T09:00:00Z,Europe/London\n\
         f2,p2,2027-02-01,\n\
         f1,p1,2027-02-02T09:00:00Z,Europe/London\n";
    let (code, out) = import(&db, "follow-ups", follow_ups).await;
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out,
        "FILE: 3 follow-ups rows: 1 created, 0 updated, 0 unchanged, 2 refused\n\
         \x20 line 3: due_at must be an RFC 3339 time (invalid_time)\n\
         \x20 line 4: id \"f1\" is already on line 2 (duplicate_id)\n"
    );
    let (_, out) = import(&db, "follow-ups", follow_ups).await;
    assert!(
        out.starts_with("FILE: 3 follow-ups rows: 0 created, 0 updated, 1 unchanged, 2 refused"),
        "{out}"
    );
    // Saved by Excel (`\r\n`), by an old Mac (`\r`), and with blank lines: the lines are still
    // the file's own (the csv crate's count ran one short, or stayed at 1; found by review).
    let spaced = follow_ups.replacen("Europe/London\n", "Europe/London\n\r\n\n", 1);
    for (file, first_refused) in [
        (follow_ups.replace('\n', "\r\n"), 3),
        (follow_ups.replace('\n', "\r"), 3),
        (spaced, 5),
    ] {
        let (_, out) = import(&db, "follow-ups", &file).await;
        let expected = format!(
            "  line {first_refused}: due_at must be an RFC 3339 time (invalid_time)\n\
             \x20 line {}: id \"f1\" is already on line 2 (duplicate_id)\n",
            first_refused + 1
        );
        assert!(out.ends_with(&expected), "{file:?}: {out}");
    }

    let subscriptions = "id,user_id,plan,renews_at,expires_at,status\n\
         s1,p1,Pro monthly,2027-02-01T00:00:00Z,,active\n\
         s2,p2,Basic,,2027-03-01T00:00:00Z,\n\
         s3,p3,Basic,,,active\n\
         s4,p4,Knee rehab/ACL,,2027-03-01T00:00:00Z,active\n\
         s5,p5,Basic,,2027-03-01T00:00:00Z,expired\n";
    let refusals = "  line 4: renews_at or expires_at is required (RFC 3339) (invalid_time)\n\
         \x20 line 5: plan is 1 to 64 letters, digits, spaces or '-_+()', starting with a letter or digit (invalid_plan)\n";
    let (code, out) = import(&db, "subscriptions", subscriptions).await;
    assert_eq!(code, 1);
    assert_eq!(
        out,
        format!(
            "FILE: 5 subscriptions rows: 3 created, 0 updated, 0 unchanged, 2 refused\n{refusals}"
        )
    );
    let before = updated_at(&db, "subscriptions").await;
    let (_, out) = import(&db, "subscriptions", subscriptions).await;
    assert_eq!(
        out,
        format!(
            "FILE: 5 subscriptions rows: 0 created, 0 updated, 3 unchanged, 2 refused\n{refusals}"
        )
    );
    assert_eq!(updated_at(&db, "subscriptions").await, before);
    let store = prism_messaging::store::connect(&db.url, &test_keys())
        .await
        .unwrap();
    let s2 = store.get_subscription("s2").await.unwrap().unwrap();
    assert_eq!((s2.plan.as_str(), s2.status), ("Basic", ItemStatus::Active));
    assert!(s2.renews_at.is_none());
    for id in ["s3", "s4"] {
        assert!(store.get_subscription(id).await.unwrap().is_none());
    }
}

// ---- Two instances on one PostgreSQL database --------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_sweeping_at_once_send_each_reminder_once() {
    if postgres_admin_url().is_none() {
        eprintln!("TEST_DATABASE_URL is not set: skipping (PostgreSQL only: one process owns a SQLite queue)");
        return;
    }
    const ITEMS: usize = 2_500;
    const PATIENTS: usize = 50;
    let db = TestDatabase::new(Backend::Postgres).await;
    let clock = ManualClock::new(t0());
    let instance = || async {
        let mut vars = TestConfig::new()
            .set("DISPATCH_RATE_PER_SECOND", "0")
            .set("DISPATCH_BATCH_SIZE", "100")
            .vars;
        vars.insert("DATABASE_URL".into(), db.url.clone());
        let config = Config::from_lookup(|name| vars.get(name).cloned()).unwrap();
        Services::build(config, Arc::new(clock.clone()))
            .await
            .unwrap()
    };
    let a = instance().await;
    let b = instance().await;
    for p in 0..PATIENTS {
        let patch = prism_messaging::consent::ConsentPatch {
            phone_number: Some(format!("+9198765{p:05}")),
            sms_consent: Some(true),
            ..Default::default()
        };
        let ctx = prism_messaging::store::ChangeContext {
            source: prism_messaging::store::ConsentSource::Api,
            ip: None,
            user_agent: None,
            at: t0(),
        };
        a.store
            .update_consent(&format!("p{p}"), &|c| patch.apply(c), &ctx)
            .await
            .unwrap();
    }
    let items: Vec<ScheduledItem> = (0..ITEMS)
        .map(|i| ScheduledItem {
            id: format!("a{i:05}"),
            user_id: format!("p{}", i % PATIENTS),
            // Some at the same instant: pages must break ties by id.
            scheduled_at: t0() + Duration::hours(5) + Duration::seconds((i / 3) as i64),
            time_zone: None,
            status: ItemStatus::Scheduled,
        })
        .collect();
    a.store
        .upsert_scheduled_many(SubjectType::Appointment, &items, t0())
        .await
        .unwrap();

    // Both instances sweep at once, twice each.
    let (r1, r2, r3, r4) = tokio::join!(
        a.reminders.sweep(Reminder::Appointment24h),
        b.reminders.sweep(Reminder::Appointment24h),
        a.reminders.sweep(Reminder::Appointment24h),
        b.reminders.sweep(Reminder::Appointment24h),
    );
    let queued: usize = [r1, r2, r3, r4]
        .into_iter()
        .map(|r| r.unwrap().queued)
        .sum();
    assert_eq!(
        queued, ITEMS,
        "each reminder queued once over the four sweeps"
    );

    // Both instances dispatch at once until the queue is empty.
    let mut sent = 0;
    loop {
        let (x, y) = tokio::join!(a.dispatcher.run_once(), b.dispatcher.run_once());
        let (x, y) = (x.unwrap(), y.unwrap());
        sent += x.sent + y.sent;
        if x.claimed + y.claimed == 0 {
            break;
        }
    }
    assert_eq!(sent, ITEMS, "one message sent per appointment");
    let doubles = db
        .text_pairs(
            "SELECT r.subject_id, CAST(COUNT(*) AS TEXT) FROM reminder_log r \
             JOIN messages m ON m.id = r.message_id \
             GROUP BY r.subject_id HAVING COUNT(*) <> 1",
        )
        .await;
    assert!(doubles.is_empty(), "{doubles:?}");
    let statuses = db
        .text_pairs("SELECT status, CAST(COUNT(*) AS TEXT) FROM messages GROUP BY status")
        .await;
    assert_eq!(statuses, [("delivered".to_string(), ITEMS.to_string())]);
}
