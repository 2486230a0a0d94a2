//! Retention: each data class deleted after its own period, in batches, never a message still to
//! be sent, with a receipt per run; a dry run and another instant from the command line.

use std::process::Stdio;

use crate::common::*;
use chrono::{DateTime, Duration, Utc};
use prism_messaging::clock::{Clock, ManualClock};
use serde_json::{json, Value};

both_backends!(
    each_class_is_deleted_after_its_period_with_a_receipt,
    the_command_line_previews_without_deleting,
);

const PATIENT: &str = "+14155552671";

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2027-01-12T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

async fn cleanup(app: &TestApp) -> Value {
    let r = app
        .client
        .post(app.url("/cron/messaging-cleanup"))
        .bearer_auth(CRON_SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn each_class_is_deleted_after_its_period_with_a_receipt(backend: Backend) {
    let clock = ManualClock::new(t0());
    let app = TestApp::spawn_live(
        backend,
        TestConfig::new()
            .set("RETENTION_INBOUND_DAYS", "30")
            .with_clock(&clock),
    )
    .await;
    app.consent("p1", PATIENT).await;
    let receipt = json!({
        "user_id": "p1",
        "template": "payment_received",
        "variables": {"amount": "INR 1.00", "date": "2027-01-12"},
    });
    // Sent long ago: a few through the service (with their events), and 600 more written
    // directly, so the deletes run in several batches.
    for i in 0..10 {
        let mut body = receipt.clone();
        body["idempotency_key"] = json!(format!("k{i}"));
        app.notify_ok(body).await;
    }
    while app.dispatch().await.claimed > 0 {}
    app.db
        .execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 600) \
             INSERT INTO messages (id, user_id, template_name, variables, channel, status, \
             attempts, next_attempt_at, created_at, updated_at) \
             SELECT 'old-' || i, 'p1', 'payment_received', '{}', 'sms', 'delivered', 1, \
             '2027-01-12T10:00:00Z', '2027-01-12T10:00:00Z', '2027-01-12T10:00:00Z' FROM n",
        )
        .await
        .unwrap();
    app.incoming("SMreply", PATIENT, "thanks").await;
    // One still to be sent when the cleanup runs: never deleted, however old.
    let mut pending = receipt.clone();
    pending["user_id"] = json!("p2");
    let pending = app.notify_ok(pending).await;

    // The reply as stored (sealed), and, on SQLite, in the database file itself.
    let sealed_reply = app
        .db
        .text_pairs("SELECT provider_sid, body FROM incoming_messages")
        .await
        .remove(0)
        .1;
    let database_file = app.db.url.strip_prefix("sqlite://").map(str::to_string);
    if database_file.is_some() {
        app.db
            .execute("PRAGMA wal_checkpoint(TRUNCATE)")
            .await
            .unwrap();
    }
    let file_holds_reply = || {
        database_file
            .as_ref()
            .is_some_and(|path| contains(&std::fs::read(path).unwrap(), &sealed_reply))
    };
    assert_eq!(file_holds_reply(), database_file.is_some());

    // A month on: only the replies (30 days) are past their period.
    clock.advance(Duration::days(31));
    let r = cleanup(&app).await;
    assert_eq!(
        r["deleted"],
        json!({"messages": 0, "inbound": 1, "reminder_log": 0, "audit": 0, "unmatched_callbacks": 0})
    );
    // Gone from the file's bytes, not only from the log (found by review).
    assert!(
        !file_holds_reply(),
        "the deleted reply is still in the file"
    );
    // A year and a day: the sent messages go, with their events; the queued one stays.
    clock.advance(Duration::days(335));
    let r = cleanup(&app).await;
    assert_eq!(r["deleted"]["messages"], 610);
    assert_eq!(r["deleted"]["audit"], 0, "seven years for the audit trail");
    let left = app.state.outbox.history("p1", 10).await.unwrap();
    assert!(left.is_empty());
    assert_eq!(app.message(&pending).await["status"], "queued");
    let events = app
        .db
        .text_pairs("SELECT message_id, status FROM message_events")
        .await;
    assert!(events.iter().all(|(id, _)| *id == pending), "{events:?}");
    // Receipts, newest first.
    let runs: Value = app.get_json("/api/cleanup-runs", Some(API_KEY)).await;
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["deleted"]["messages"], 610);
    assert_eq!(runs[1]["deleted"]["inbound"], 1);
    assert_eq!(
        runs[0]["as_of"]
            .as_str()
            .map(|t| DateTime::parse_from_rfc3339(t).unwrap()),
        Some(clock.now().into())
    );
    // The receipts need the host key.
    let r = app
        .client
        .get(app.url("/api/cleanup-runs"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The audit trail is append-only: a delete outside retention fails and removes nothing...
    let trail = app.state.consent.audit_trail("p1").await.unwrap().len();
    assert!(trail >= 4, "{trail}");
    let refused = app.db.execute("DELETE FROM consent_audit_trail").await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("append-only")),
        "{refused:?}"
    );
    assert_eq!(
        app.state.consent.audit_trail("p1").await.unwrap().len(),
        trail
    );
    // ... and its rows go at the end of their seven years, in retention's batches.
    clock.advance(Duration::days(7 * 365));
    let r = cleanup(&app).await;
    assert_eq!(r["deleted"]["audit"], trail as u64);
    assert!(app
        .state
        .consent
        .audit_trail("p1")
        .await
        .unwrap()
        .is_empty());
    let allowances = app
        .db
        .text_pairs("SELECT 'row', CAST(before AS TEXT) FROM audit_deletion_allowed")
        .await;
    assert!(allowances.is_empty(), "{allowances:?}");
}

async fn the_command_line_previews_without_deleting(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.consent("p1", PATIENT).await;
    let dir = tempfile::tempdir().unwrap();
    let run = |args: Vec<String>| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_prism-messaging"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &app.db.url)
            .env("DATA_ENCRYPTION_KEY", DATA_KEY)
            .env("LOG_FORMAT", "json")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .args(args);
        async move { cmd.output().await.unwrap() }
    };
    // Eight years on, the audit trail (seven years) would go: a preview deletes nothing.
    let later = (Utc::now() + Duration::days(8 * 365)).to_rfc3339();
    let out = run(vec![
        "job".into(),
        "messaging-cleanup".into(),
        "--dry-run".into(),
        "--as-of".into(),
        later.clone(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["dry_run"], true);
    assert!(
        report["deleted"]["audit"].as_u64().unwrap() >= 4,
        "{report}"
    );
    assert_eq!(
        app.state.consent.audit_trail("p1").await.unwrap().len() as u64,
        report["deleted"]["audit"].as_u64().unwrap()
    );
    let runs: Value = app.get_json("/api/cleanup-runs", Some(API_KEY)).await;
    assert!(
        runs["runs"].as_array().unwrap().is_empty(),
        "a preview leaves no receipt"
    );
    // A bad instant, or the flags on another job: refused.
    let out = run(vec![
        "job".into(),
        "messaging-cleanup".into(),
        "--as-of".into(),
        "yesterday".into(),
    ])
    .await;
    assert!(!out.status.success());
    let out = run(vec![
        "job".into(),
        "cleanup-expired-otps".into(),
        "--dry-run".into(),
    ])
    .await;
    assert!(!out.status.success());
    // For real at that instant: refused, since it would delete the audit trail before its seven
    // years are up; nothing is deleted and no receipt kept.
    let audit = app.state.consent.audit_trail("p1").await.unwrap().len();
    let out = run(vec![
        "job".into(),
        "messaging-cleanup".into(),
        "--as-of".into(),
        later,
    ])
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dry-run"));
    assert_eq!(
        app.state.consent.audit_trail("p1").await.unwrap().len(),
        audit
    );
    // A past instant (a catch-up) runs for real, with a receipt of its instant.
    let earlier = (Utc::now() - Duration::days(1)).to_rfc3339();
    let out = run(vec![
        "job".into(),
        "messaging-cleanup".into(),
        "--as-of".into(),
        earlier,
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        app.state.consent.audit_trail("p1").await.unwrap().len(),
        audit
    );
    let runs: Value = app.get_json("/api/cleanup-runs", Some(API_KEY)).await;
    assert_eq!(runs["runs"].as_array().unwrap().len(), 1);
}
