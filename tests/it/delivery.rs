//! Delivery that survives faults, crashes and several instances: a fake Twilio with fault
//! injection, the real binary killed and restarted, and two dispatchers on one PostgreSQL.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::fake_twilio::{Failure, Fault};
use crate::common::*;
use chrono::Utc;
use prism_messaging::clock::{Clock, ManualClock};
use prism_messaging::config::Config;
use prism_messaging::consent::ConsentPatch;
use prism_messaging::http::AppState;
use prism_messaging::store::{ChangeContext, Channel, ConsentSource, DynStore, NewMessage};
use serde_json::json;

both_backends!(
    every_fault_class_ends_sent_once_or_failed,
    permanent_codes_are_tried_once,
    a_send_time_opt_out_that_failed_to_record_is_recorded_on_the_next_try,
    a_carrier_opt_out_that_beat_its_send_is_recorded_even_when_its_write_fails,
    instance_roles_split_the_work,
    an_otp_does_not_wait_behind_paced_messages,
    a_send_slot_past_the_lease_is_not_taken,
);

fn http(status: u16, code: i64) -> Fault {
    Fault::Http(Failure {
        http_status: status,
        code,
        retry_after: None,
    })
}

async fn every_fault_class_ends_sent_once_or_failed(backend: Backend) {
    let clock = ManualClock::new(Utc::now());
    let config = TestConfig::new()
        .set("TWILIO_TIMEOUT_MS", "400")
        .set("DISPATCH_RATE_PER_SECOND", "0")
        .with_clock(&clock);
    let app = TestApp::spawn_live(backend, config).await;
    let fake = app.fake.as_ref().unwrap();
    let scenarios: Vec<(&str, Vec<Fault>)> = vec![
        ("server_errors", vec![http(500, 20500), http(503, 20503)]),
        (
            "rate_limited",
            vec![Fault::Http(Failure {
                http_status: 429,
                code: 20429,
                retry_after: Some(120),
            })],
        ),
        (
            "slow_answer",
            vec![Fault::Slow(Duration::from_millis(1500))],
        ),
        ("dropped_connection", vec![Fault::Drop, Fault::Drop]),
        ("accepted_never_answered", vec![Fault::AcceptNoAnswer]),
        ("always_down", vec![http(500, 20500); 10]),
        // More 429s than DISPATCH_MAX_ATTEMPTS: none of them is an attempt.
        ("throttled_past_the_attempts", vec![http(429, 20429); 7]),
    ];
    let mut ids = HashMap::new();
    for (i, (name, faults)) in scenarios.iter().enumerate() {
        let phone = format!("+1415555{:04}", 2000 + i);
        let user = format!("user-{name}");
        app.consent(&user, &phone).await;
        fake.script(&phone, faults.clone());
        ids.insert(*name, (app.notify_ok(reminder(&user)).await, phone));
    }
    // The 429 asked for two minutes: the retry waits at least that long.
    app.dispatch().await;
    let limited = app.stored_message(&ids["rate_limited"].0).await;
    assert_eq!(limited.status, "queued");
    assert!(
        limited.next_attempt_at >= clock.now() + chrono::Duration::seconds(119),
        "Retry-After honoured"
    );
    // Twilio never processes a request it answers 429: the message was not tried, and keeps
    // every attempt (a server error, which Twilio may have acted on, spends one).
    assert_eq!(limited.attempts, 0, "a 429 spends no attempt");
    assert_eq!(
        limited.error_code,
        Some(20429),
        "the code is kept with the message"
    );
    assert_eq!(
        app.stored_message(&ids["server_errors"].0).await.attempts,
        1
    );
    for _ in 0..12 {
        clock.advance(chrono::Duration::minutes(20));
        app.dispatch().await;
    }
    for (name, (id, phone)) in &ids {
        let m = app.message(id).await;
        let created = fake.created().iter().filter(|c| c.to == *phone).count();
        if *name == "always_down" {
            assert_eq!(m["status"], "failed", "{name}");
            assert_eq!(m["error_code"], 20500, "{name}");
            assert_eq!(
                fake.create_calls_to(phone),
                5,
                "{name}: DISPATCH_MAX_ATTEMPTS tries"
            );
            assert_eq!(created, 0);
        } else {
            assert_eq!(m["status"], "sent", "{name}: {m}");
            assert_eq!(created, 1, "{name}: exactly one message reached Twilio");
            let sid = m["provider_sid"].as_str().unwrap();
            assert!(
                fake.created().iter().any(|c| c.sid == sid),
                "{name}: the SID is Twilio's"
            );
        }
    }
    // The unknown outcomes were looked up, not sent blind.
    assert_eq!(fake.create_calls_to(&ids["slow_answer"].1), 1);
    assert_eq!(fake.create_calls_to(&ids["accepted_never_answered"].1), 1);
    assert_eq!(fake.create_calls_to(&ids["dropped_connection"].1), 3);
}

/// Twilio refuses a send with 21610 and writing the number's opt-out fails (a fault injected
/// with a trigger): the send's outcome is not recorded either, so once its lease runs out the
/// message is tried again, and this time both the opt-out and the failure are recorded. (With the
/// outcome recorded first, the message was final and the opt-out was lost for good.)
async fn a_send_time_opt_out_that_failed_to_record_is_recorded_on_the_next_try(backend: Backend) {
    let clock = ManualClock::new(Utc::now());
    let config = TestConfig::new()
        .set("DISPATCH_RATE_PER_SECOND", "0")
        .with_clock(&clock);
    let app = TestApp::spawn_live(backend, config).await;
    let fake = app.fake.as_ref().unwrap();
    let phone = "+14155553100";
    app.consent("p1", phone).await;
    let refused = Failure {
        http_status: 400,
        code: 21610,
        retry_after: None,
    };
    fake.fail(phone, vec![refused, refused]);
    let id = app.notify_ok(reminder("p1")).await;
    app.db.fail_inserts_into("opt_outs").await;
    let report = app.dispatch().await;
    assert_eq!((report.claimed, report.failed), (1, 0));
    assert_eq!(app.message(&id).await["status"], "sending", "nothing final");
    app.db.heal_inserts_into("opt_outs").await;
    clock.advance(chrono::Duration::minutes(20));
    app.dispatch().await;
    let m = app.message(&id).await;
    assert_eq!(
        (m["status"].as_str(), m["error_code"].as_i64()),
        (Some("failed"), Some(21610))
    );
    let consent = app.state.store.get_consent("p1").await.unwrap().unwrap();
    assert!(!consent.sms_consent, "the opt-out recorded on the next try");
    let next = app.notify_ok(reminder("p1")).await;
    app.dispatch().await;
    assert_eq!(app.message(&next).await["status"], "skipped");
    assert_eq!(fake.create_calls_to(phone), 2);
}

/// A 21610 callback for `sid` posted before any message has that SID (it is parked), then a
/// reminder to `user` at `phone` dispatched under that SID (the fake gives it), with the
/// opt-out's write failing when `fault` (a trigger; a crash at that point leaves the same state).
async fn opt_out_that_beat_its_send(
    app: &TestApp,
    user: &str,
    phone: &str,
    sid: &str,
    fault: bool,
) {
    app.consent(user, phone).await;
    app.fake.as_ref().unwrap().next_sid(sid);
    let callback = [
        ("MessageSid", sid),
        ("MessageStatus", "failed"),
        ("ErrorCode", "21610"),
        ("AccountSid", ACCOUNT_SID),
    ];
    let early = app
        .twilio_webhook("/webhooks/twilio/status", &callback, None)
        .await;
    assert_eq!(early.status(), 200, "parked: no message has this SID yet");
    let id = app.notify_ok(reminder(user)).await;
    if fault {
        app.db.fail_inserts_into("opt_outs").await;
    }
    app.dispatch().await;
    if fault {
        app.db.heal_inserts_into("opt_outs").await;
    }
    let m = app.message(&id).await;
    assert_eq!(
        (m["status"].as_str(), m["provider_sid"].as_str()),
        (Some("failed"), Some(sid)),
        "the parked status applied with the send"
    );
}

async fn sms_consent(app: &TestApp, user: &str) -> bool {
    let consent = app.state.store.get_consent(user).await.unwrap().unwrap();
    consent.sms_consent
}

/// A 21610 callback arrives before the send has recorded its SID, and writing the opt-out fails
/// after the send's transaction applied it. The parked callback stays owed (pruning keeps it), so
/// the next round of `prune-unmatched-callbacks` (at start, then hourly) records the opt-out
/// once. (Taken with the send, it was gone: the message `failed`, the number still messaged.)
/// Unless the patient changed that consent since: their later word stands.
async fn a_carrier_opt_out_that_beat_its_send_is_recorded_even_when_its_write_fails(
    backend: Backend,
) {
    let app = TestApp::spawn_live(
        backend,
        TestConfig::new().set("DISPATCH_RATE_PER_SECOND", "0"),
    )
    .await;
    let fake = app.fake.as_ref().unwrap();
    let job = prism_messaging::scheduler::Job::PruneUnmatchedCallbacks;
    let phone = "+14155553101";
    opt_out_that_beat_its_send(&app, "p1", phone, "SM0000000000000000000000000021610", true).await;
    assert!(sms_consent(&app, "p1").await, "the opt-out write failed");
    // A round while the write still fails: counted, still owed, and the prune still runs.
    app.db.fail_inserts_into("opt_outs").await;
    let failing = job.run(&app.state.services).await.unwrap();
    app.db.heal_inserts_into("opt_outs").await;
    assert_eq!(
        failing["opt_outs"],
        json!({"recorded": 0, "superseded": 0, "failed": 1})
    );
    assert_eq!(failing["pruned"], 0);
    assert!(sms_consent(&app, "p1").await, "not recorded yet");
    let far_ahead = chrono::Utc::now() + chrono::Duration::days(30);
    let pruned = app
        .state
        .store
        .prune_unmatched_statuses(far_ahead)
        .await
        .unwrap();
    assert_eq!(pruned, 0, "an owed opt-out is not pruned, however old");

    let round = job.run(&app.state.services).await.unwrap();
    assert_eq!(
        round["opt_outs"],
        json!({"recorded": 1, "superseded": 0, "failed": 0})
    );
    assert!(!sms_consent(&app, "p1").await, "the owed opt-out recorded");
    let again = job.run(&app.state.services).await.unwrap();
    assert_eq!(again["opt_outs"]["recorded"], 0, "once");
    let next = app.notify_ok(reminder("p1")).await;
    app.dispatch().await;
    assert_eq!(app.message(&next).await["status"], "skipped");
    assert_eq!(fake.create_calls_to(phone), 1);

    // Without a fault the send's own follow-up records the opt-out and forgets the parked
    // callback: the job finds nothing owed.
    opt_out_that_beat_its_send(
        &app,
        "p2",
        "+14155553102",
        "SM0000000000000000000000000021611",
        false,
    )
    .await;
    assert!(!sms_consent(&app, "p2").await, "recorded with the send");
    let round = job.run(&app.state.services).await.unwrap();
    assert_eq!(
        round["opt_outs"],
        json!({"recorded": 0, "superseded": 0, "failed": 0})
    );

    // The patient turned SMS off and on again in their settings after the carrier's report: the
    // owed opt-out is forgotten, not recorded over their later word.
    let phone = "+14155553103";
    opt_out_that_beat_its_send(&app, "p3", phone, "SM0000000000000000000000000021612", true).await;
    for on in [false, true] {
        let r = app.put_preferences("p3", json!({"sms_consent": on})).await;
        assert_eq!(r.status(), 200);
    }
    let round = job.run(&app.state.services).await.unwrap();
    assert_eq!(
        round["opt_outs"],
        json!({"recorded": 0, "superseded": 1, "failed": 0})
    );
    assert!(sms_consent(&app, "p3").await);
    let next = app.notify_ok(reminder("p3")).await;
    app.dispatch().await;
    assert_eq!(app.message(&next).await["status"], "sent");
    assert_eq!(fake.create_calls_to(phone), 2);
}

async fn permanent_codes_are_tried_once(backend: Backend) {
    let app = TestApp::spawn_live(
        backend,
        TestConfig::new().set("DISPATCH_RATE_PER_SECOND", "0"),
    )
    .await;
    let fake = app.fake.as_ref().unwrap();
    let codes = [
        (400, 21211),
        (400, 21610),
        (400, 21612),
        (400, 21614),
        (400, 63016),
        (400, 21602),
        (403, 20003),
    ];
    let mut ids = vec![];
    for (i, (status, code)) in codes.iter().enumerate() {
        let phone = format!("+1415555{:04}", 3000 + i);
        let user = format!("user-{code}");
        app.consent(&user, &phone).await;
        fake.fail(
            &phone,
            vec![Failure {
                http_status: *status,
                code: *code,
                retry_after: None,
            }],
        );
        ids.push((app.notify_ok(reminder(&user)).await, phone, user, *code));
    }
    let report = app.dispatch().await;
    assert_eq!(report.failed, codes.len());
    assert_eq!(app.dispatch().await.claimed, 0, "nothing is retried");
    for (id, phone, user, code) in ids {
        let m = app.message(&id).await;
        assert_eq!(
            (m["status"].as_str(), m["error_code"].as_i64()),
            (Some("failed"), Some(code))
        );
        assert_eq!(fake.create_calls_to(&phone), 1, "{code} tried once");
        let consent = app.state.store.get_consent(&user).await.unwrap().unwrap();
        assert_eq!(consent.sms_consent, code != 21610, "{code}");
        if code == 21610 {
            let last = app
                .state
                .store
                .consent_audit(&user)
                .await
                .unwrap()
                .pop()
                .unwrap();
            assert_eq!(
                (last.field.as_str(), last.source.as_str()),
                ("sms_consent", "provider")
            );
            assert!(app
                .state
                .store
                .is_opted_out(&phone, Channel::Sms)
                .await
                .unwrap());
        }
    }
}

/// Give `user` SMS consent for `phone` and queue `n` payment notifications with distinct bodies
/// (`INR {i}.00`), straight through the store.
async fn queue_bulk(store: &DynStore, user: &str, phone: &str, n: usize) {
    let ctx = ChangeContext {
        source: ConsentSource::Api,
        ip: None,
        user_agent: None,
        at: Utc::now(),
    };
    let patch = ConsentPatch {
        phone_number: Some(phone.into()),
        sms_consent: Some(true),
        ..Default::default()
    };
    store
        .update_consent(user, &|c| patch.apply(c), &ctx)
        .await
        .unwrap();
    for i in 0..n {
        let message = NewMessage {
            id: uuid::Uuid::now_v7().to_string(),
            user_id: user.into(),
            template_name: "payment_received".into(),
            variables: json!({"amount": format!("INR {i}.00"), "date": "2027-01-12"}).to_string(),
            channel: Channel::Sms,
            idempotency_key: Some(format!("bulk-{user}-{i}")),
            created_at: Utc::now(),
            claimed_until: None,
        };
        store.insert_message(&message).await.unwrap();
    }
}

/// How many times each payment amount reached the fake.
fn deliveries_by_amount(fake: &FakeTwilio) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for c in fake.created() {
        let amount = c
            .body
            .split("INR ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap_or_default()
            .to_string();
        *counts.entry(amount).or_insert(0) += 1;
    }
    counts
}

fn spawn_server(
    dir: &std::path::Path,
    database_url: &str,
    fake: &FakeTwilio,
    extra: &[(&str, &str)],
) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_prism-messaging"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(dir)
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", database_url)
        .env("DATA_ENCRYPTION_KEY", DATA_KEY)
        .env("MESSAGING_MOCK_MODE", "false")
        .env("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
        .env("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
        .env("TWILIO_PHONE_NUMBER", SMS_SENDER)
        .env("TWILIO_API_BASE", &fake.base_url)
        .env("INSTANCE_ROLE", "dispatcher")
        .env("QUIET_HOURS", "off")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

async fn wait_until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn unsettled(store: &DynStore, user: &str) -> usize {
    let all = store.user_messages(user, 10_000).await.unwrap();
    all.iter()
        .filter(|m| m.status == "queued" || m.status == "sending")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_dispatch_then_restart_delivers_every_message() {
    const N: usize = 2000;
    const BATCH: &str = "32";
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("kill.db").display());
    let store = prism_messaging::store::connect(&url, &test_keys())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    queue_bulk(&store, "bulk", "+14155552671", N).await;
    let fake = FakeTwilio::start().await;
    let settings = [
        ("DISPATCH_LEASE_SECONDS", "2"),
        ("TWILIO_TIMEOUT_MS", "1000"),
        ("DISPATCH_RATE_PER_SECOND", "0"),
        ("DISPATCH_BATCH_SIZE", BATCH),
    ];

    let mut first = spawn_server(dir.path(), &url, &fake, &settings);
    wait_until(
        "a third of the messages",
        Duration::from_secs(120),
        async || fake.created_count() >= N / 3,
    )
    .await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let at_kill = fake.created_count();
    let in_flight = store
        .user_messages("bulk", 10_000)
        .await
        .unwrap()
        .iter()
        .filter(|m| m.status == "sending")
        .count();

    let mut second = spawn_server(dir.path(), &url, &fake, &settings);
    wait_until(
        "every message settled",
        Duration::from_secs(180),
        async || unsettled(&store, "bulk").await == 0,
    )
    .await;
    second.start_kill().unwrap();

    let counts = deliveries_by_amount(&fake);
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    println!(
        "SIGKILL test: {N} messages, killed after {at_kill} had reached the fake with {in_flight} in flight; \
         after restart {} distinct delivered, {duplicates} duplicates",
        counts.len()
    );
    assert_eq!(counts.len(), N, "every message reached the fake");
    assert!(
        duplicates <= 32,
        "duplicates ({duplicates}) stay within one in-flight batch"
    );
    // The fake answered every request before the kill, so each lost answer is found by lookup.
    assert_eq!(
        duplicates, 0,
        "a fake that answers leaves nothing to duplicate"
    );
    let all = store.user_messages("bulk", 10_000).await.unwrap();
    let not_sent: Vec<_> = all
        .iter()
        .filter(|m| m.status != "sent")
        .map(|m| (&m.status, &m.error_message))
        .collect();
    assert!(not_sent.is_empty(), "all recorded as sent: {not_sent:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_sends_and_gives_back_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("term.db").display());
    let store = prism_messaging::store::connect(&url, &test_keys())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    queue_bulk(&store, "term", "+14155552671", 12).await;
    let fake = FakeTwilio::start().await;
    // Every answer takes a second (inside the timeout); pacing holds most messages back.
    fake.script(
        "+14155552671",
        vec![Fault::Slow(Duration::from_millis(1000)); 12],
    );
    let settings = [
        ("DISPATCH_RATE_PER_SECOND", "4"),
        ("TWILIO_TIMEOUT_MS", "5000"),
        ("DISPATCH_LEASE_SECONDS", "6"),
    ];
    let mut server = spawn_server(dir.path(), &url, &fake, &settings);
    wait_until("the first send", Duration::from_secs(30), async || {
        !fake.requests().is_empty()
    })
    .await;
    let pid = server.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(Duration::from_secs(20), server.wait())
        .await
        .expect("exits within the grace period")
        .unwrap();
    assert!(status.success());
    let calls_at_exit = fake.requests().len();
    let messages = store.user_messages("term", 100).await.unwrap();
    let sending = messages.iter().filter(|m| m.status == "sending").count();
    let sent = messages.iter().filter(|m| m.status == "sent").count();
    assert_eq!(sending, 0, "in-flight sends finished and were recorded");
    assert_eq!(
        sent, calls_at_exit,
        "every call made before exit was recorded"
    );
    assert!(sent < 12, "shutdown gave back the messages still waiting");

    let mut again = spawn_server(dir.path(), &url, &fake, &settings);
    wait_until("the rest sent", Duration::from_secs(60), async || {
        unsettled(&store, "term").await == 0
    })
    .await;
    again.start_kill().unwrap();
    let counts = deliveries_by_amount(&fake);
    assert_eq!(counts.len(), 12);
    assert!(
        counts.values().all(|c| *c == 1),
        "each exactly once: {counts:?}"
    );
}

async fn postgres_instances(
    n: usize,
    extra: &[(&str, &str)],
) -> Option<(Vec<AppState>, FakeTwilio, TestDatabase)> {
    postgres_admin_url()?;
    let db = TestDatabase::new(Backend::Postgres).await;
    let fake = FakeTwilio::start().await;
    let mut vars = TestConfig::new().live(&fake).vars;
    vars.insert("DATABASE_URL".into(), db.url.clone());
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    let mut states = vec![];
    for _ in 0..n {
        let config = Config::from_lookup(|name| vars.get(name).cloned()).unwrap();
        // Each instance has its own connection pool, as separate processes would.
        states.push(AppState::from_config(config).await.unwrap());
    }
    Some((states, fake, db))
}

/// Run each instance's dispatcher rounds until nothing is left; the messages each one sent.
async fn drain(states: &[AppState], user: &str) -> Vec<usize> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, state) in states.iter().enumerate() {
        let state = state.clone();
        let user = user.to_string();
        tasks.spawn(async move {
            let dispatcher = state.dispatcher.clone();
            let mut sent = 0;
            loop {
                let report = dispatcher.run_once().await.unwrap();
                sent += report.sent;
                if report.claimed == 0 {
                    if unsettled(&state.store, &user).await == 0 {
                        return (i, sent);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
    }
    let mut per_instance = vec![0; states.len()];
    while let Some(done) = tasks.join_next().await {
        let (i, sent) = done.unwrap();
        per_instance[i] = sent;
    }
    per_instance
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_postgres_send_each_message_once() {
    const N: usize = 5000;
    let Some((states, fake, _db)) =
        postgres_instances(2, &[("DISPATCH_RATE_PER_SECOND", "0")]).await
    else {
        eprintln!("TEST_DATABASE_URL is not set: skipping");
        return;
    };
    queue_bulk(&states[0].store, "bulk", "+14155552671", N).await;
    let per_instance = drain(&states, "bulk").await;
    let counts = deliveries_by_amount(&fake);
    println!(
        "two instances: {per_instance:?} messages each; {} distinct reached the fake",
        counts.len()
    );
    assert_eq!(counts.len(), N);
    assert!(
        counts.values().all(|c| *c == 1),
        "no message reached the fake twice"
    );
    assert_eq!(per_instance.iter().sum::<usize>(), N);
    assert!(
        per_instance.iter().all(|n| *n > 0),
        "both instances worked: {per_instance:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_across_two_instances() {
    const N: usize = 30;
    const RATE: usize = 10;
    let Some((states, fake, _db)) =
        postgres_instances(2, &[("DISPATCH_RATE_PER_SECOND", "10")]).await
    else {
        eprintln!("TEST_DATABASE_URL is not set: skipping");
        return;
    };
    queue_bulk(&states[0].store, "paced", "+14155552671", N).await;
    let started = Instant::now();
    drain(&states, "paced").await;
    let mut arrivals: Vec<Instant> = fake.created().iter().map(|c| c.received_at).collect();
    arrivals.sort();
    assert_eq!(arrivals.len(), N);
    // The limit's guarantee: the two instances take their slots from one row, one slot every
    // 1.02 / RATE s from the first, and no send goes before its slot. So the k-th send to reach
    // the fake comes at least k slots after the drain began (instances pacing apart would send
    // two per slot and fail this). Not a window count: on a loaded machine a late send followed
    // by one on time can put RATE + 2 into one second (CI saw 12) without any going early.
    let slot = Duration::from_micros(1_020_000 / RATE as u64);
    for (k, at) in arrivals.iter().enumerate() {
        let after = at.duration_since(started);
        // A millisecond for the wall clock the slots are taken on against this monotonic one.
        assert!(
            after + Duration::from_millis(1) >= slot * k as u32,
            "send {k} came {after:?} after the drain began, before its slot"
        );
    }
    // The most sends seen at the fake in any one-second window.
    let busiest = (0..N)
        .map(|i| {
            arrivals[i..]
                .iter()
                .take_while(|t| t.duration_since(arrivals[i]) < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    let span = arrivals[N - 1].duration_since(arrivals[0]);
    println!("rate limit {RATE}/s over two instances: busiest second {busiest} sends, {N} sends over {span:?}");
}

async fn instance_roles_split_the_work(backend: Backend) {
    let mut api_config = TestConfig::new().set("INSTANCE_ROLE", "api");
    api_config.background = true;
    let api = TestApp::spawn_with(backend, api_config).await;
    api.consent("p1", "+14155552671").await;
    let id = api.notify_ok(reminder("p1")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        api.message(&id).await["status"],
        "queued",
        "an API instance does not send"
    );

    // A dispatcher instance on the same database sends it, and serves no API.
    let mut vars = TestConfig::new().set("INSTANCE_ROLE", "dispatcher").vars;
    vars.insert("DATABASE_URL".into(), api.db.url.clone());
    let config = Config::from_lookup(|name| vars.get(name).cloned()).unwrap();
    let state = AppState::from_config(config).await.unwrap();
    let app =
        prism_messaging::server::Application::bind(state.clone(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
    let base = format!("http://{}", app.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(app.run(shutdown.clone()));
    let client = reqwest::Client::new();
    wait_until(
        "the dispatcher instance sends",
        Duration::from_secs(10),
        async || api.stored_message(&id).await.status == "delivered",
    )
    .await;
    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = client
        .post(format!("{base}/api/notifications"))
        .bearer_auth(API_KEY)
        .json(&reminder("p1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "no API on a dispatcher instance");
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

/// A send slot that comes after the claim's lease runs out is not taken: the message goes back
/// to the queue until the sender's next free slot, no attempt spent, and no slot is spent on
/// nothing. Before, the dispatcher took the slot, slept past its lease, lost the claim, and the
/// next claim reserved further ahead: at 2 a second with a 5-second lease the queue stalled
/// for good (an operator's review found it).
async fn a_send_slot_past_the_lease_is_not_taken(backend: Backend) {
    let clock = ManualClock::new(Utc::now());
    let app = TestApp::spawn_live(
        backend,
        TestConfig::new()
            .with_clock(&clock)
            .set("DISPATCH_RATE_PER_SECOND", "2")
            .set("DISPATCH_LEASE_SECONDS", "5")
            .set("TWILIO_TIMEOUT_MS", "2000"),
    )
    .await;
    let fake = app.fake.as_ref().unwrap().clone();
    app.consent("p1", "+14155552671").await;
    let first = app.notify_ok(reminder("p1")).await;
    let second = app.notify_ok(reminder("p1")).await;
    // A burst of codes has taken the sender's slots for the next minute (codes take theirs
    // without waiting).
    let sender = format!("sms:{SMS_SENDER}");
    let now_us = Utc::now().timestamp_micros();
    let minute_us = 60_000_000;
    app.state
        .store
        .reserve_send_slot(&sender, now_us, minute_us, i64::MAX)
        .await
        .unwrap();
    // Claimed again each time they are due (the clock moves on, the real slots do not): each
    // time held back, nothing taken.
    for _ in 0..3 {
        let report = app.dispatch().await;
        assert_eq!((report.sent, report.deferred), (0, 2), "{report:?}");
        clock.advance(chrono::Duration::seconds(61));
    }
    let next_free = app
        .state
        .store
        .reserve_send_slot(&sender, now_us, 1, now_us)
        .await
        .unwrap();
    assert_eq!(
        next_free,
        prism_messaging::store::SendSlotAnswer::NextFreeAt(now_us + minute_us),
        "a slot was spent on nothing"
    );
    for id in [&first, &second] {
        let m = app.message(id).await;
        assert_eq!(
            (&m["status"], &m["attempts"]),
            (&json!("queued"), &json!(0)),
            "{m}"
        );
    }
    assert_eq!(fake.created_count(), 0);
    // The burst's slots are behind us: both go, paced.
    app.db
        .execute("UPDATE send_rate SET next_slot_us = 0")
        .await
        .unwrap();
    assert_eq!(app.dispatch().await.sent, 2);
    assert_eq!(fake.created_count(), 2);
}

async fn an_otp_does_not_wait_behind_paced_messages(backend: Backend) {
    let app = TestApp::spawn_live(
        backend,
        TestConfig::new().set("DISPATCH_RATE_PER_SECOND", "2"),
    )
    .await;
    let fake = app.fake.as_ref().unwrap().clone();
    app.consent("p1", "+14155552671").await;
    for _ in 0..6 {
        app.notify_ok(reminder("p1")).await;
    }
    // Six reminders at 2/s take about three seconds; an OTP asked for meanwhile goes at once.
    let round_started = Instant::now();
    let round = {
        let state = app.state.clone();
        tokio::spawn(async move { state.dispatcher.run_once().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let r = app
        .client
        .post(app.url("/api/messaging/send-otp"))
        .json(&json!({"user_id": "p2", "phone_number": "+14155552672", "purpose": "login"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Not a stopwatch (a loaded machine stretches any figure): the code is answered while the
    // paced reminders are still going out, which the order at the fake shows below.
    let answered_after = started.elapsed();
    assert_eq!(round.await.unwrap().sent, 6);
    let created = fake.created();
    let otp_at = created.iter().position(|c| c.to == "+14155552672").unwrap();
    assert!(
        otp_at < 6,
        "the OTP overtook queued reminders (position {otp_at}, answered after {answered_after:?})"
    );
    // The reminders kept their pace: the k-th send's slot is at least k intervals (0.51 s)
    // after the round began, and a send never goes before its slot, so no reminder reaches
    // the fake early. (Measured from the round's start, not the first send: the first send
    // may reach the fake late, on a new connection, which shortens first-to-last spans.)
    let reminders: Vec<Instant> = created
        .iter()
        .filter(|c| c.to == "+14155552671")
        .map(|c| c.received_at)
        .collect();
    assert_eq!(reminders.len(), 6);
    for (k, at) in reminders.iter().enumerate() {
        let after = at.duration_since(round_started);
        assert!(
            after >= Duration::from_millis(500) * k as u32,
            "send {k} at 2/s came {after:?} after the round began, before its slot"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_lookup_never_leads_to_a_blind_resend() {
    let clock = ManualClock::new(Utc::now());
    let config = TestConfig::new()
        .set("TWILIO_TIMEOUT_MS", "300")
        .set("DISPATCH_RATE_PER_SECOND", "0")
        .with_clock(&clock);
    let app = TestApp::spawn_live(Backend::Sqlite, config).await;
    let fake = app.fake.as_ref().unwrap();
    let phone = "+14155552671";
    app.consent("p1", phone).await;
    fake.script(phone, vec![Fault::AcceptNoAnswer]);
    let id = app.notify_ok(reminder("p1")).await;
    assert_eq!(
        app.dispatch().await.retried,
        1,
        "timed out: outcome unknown"
    );
    // Twilio's list endpoint fails twice, with its own error code.
    fake.fail_lookups(2);
    for _ in 0..2 {
        clock.advance(chrono::Duration::minutes(20));
        assert_eq!(
            app.dispatch().await.retried,
            1,
            "the lookup failed: wait, do not send"
        );
        assert_eq!(fake.create_calls_to(phone), 1);
    }
    clock.advance(chrono::Duration::minutes(20));
    assert_eq!(app.dispatch().await.adopted, 1);
    assert_eq!(fake.create_calls_to(phone), 1, "sent once, found, adopted");
    assert_eq!(app.message(&id).await["status"], "sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_callback_that_beats_the_sid_is_applied_when_the_sid_is_recorded() {
    let app = TestApp::spawn_live(
        Backend::Sqlite,
        TestConfig::new().set("DISPATCH_RATE_PER_SECOND", "0"),
    )
    .await;
    let fake = app.fake.as_ref().unwrap().clone();
    let phone = "+14155552671";
    app.consent("p1", phone).await;
    // Twilio creates the message but answers a second late; its callback comes first.
    fake.script(phone, vec![Fault::Slow(Duration::from_millis(1000))]);
    let id = app.notify_ok(reminder("p1")).await;
    let round = {
        let state = app.state.clone();
        tokio::spawn(async move { state.dispatcher.run_once().await.unwrap() })
    };
    wait_until("Twilio creates it", Duration::from_secs(5), async || {
        fake.created_count() == 1
    })
    .await;
    let sid = fake.created()[0].sid.clone();
    let r = app
        .twilio_webhook(
            "/webhooks/twilio/status",
            &[("MessageSid", sid.as_str()), ("MessageStatus", "delivered")],
            None,
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(round.await.unwrap().sent, 1);
    let m = app.message(&id).await;
    assert_eq!(m["status"], "delivered", "{m}");
    assert_eq!(m["provider_sid"], sid.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_errors_are_stored_and_logged_with_the_number_masked() {
    let app = TestApp::spawn_live(Backend::Sqlite, TestConfig::new()).await;
    let phone = "+14155552671";
    app.consent("p1", phone).await;
    app.fake.as_ref().unwrap().fail(
        phone,
        vec![Failure {
            http_status: 400,
            code: 21211,
            retry_after: None,
        }],
    );
    let id = app.notify_ok(reminder("p1")).await;
    app.dispatch().await;
    let m = app.message(&id).await;
    let error = m["error_message"].as_str().unwrap();
    assert_eq!(
        error,
        "The 'To' number +14*****2671 is not a valid phone number."
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_the_maximum_age() {
    let clock = ManualClock::new(Utc::now());
    let config = TestConfig::new()
        .set("DISPATCH_MAX_AGE_SECONDS", "3600")
        .set("DISPATCH_MAX_ATTEMPTS", "100")
        .set("DISPATCH_RATE_PER_SECOND", "0")
        .with_clock(&clock);
    let app = TestApp::spawn_live(Backend::Sqlite, config).await;
    let phone = "+14155552671";
    app.consent("p1", phone).await;
    app.fake
        .as_ref()
        .unwrap()
        .script(phone, vec![http(503, 20503); 100]);
    let id = app.notify_ok(reminder("p1")).await;
    assert_eq!(app.dispatch().await.retried, 1);
    // Still young: retried.
    clock.advance(chrono::Duration::minutes(30));
    assert_eq!(app.dispatch().await.retried, 1);
    // Past an hour old: the next failure is final.
    clock.advance(chrono::Duration::minutes(31));
    assert_eq!(app.dispatch().await.failed, 1);
    let m = app.message(&id).await;
    assert_eq!(
        (m["status"].as_str(), m["error_code"].as_i64()),
        (Some("failed"), Some(20503))
    );
    assert!(m["error_message"]
        .as_str()
        .unwrap()
        .contains("DISPATCH_MAX_AGE_SECONDS"));
}
