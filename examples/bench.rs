//! Load benchmark (not a test): drives the release binary over loopback HTTP and prints requests
//! per second and p50/p99 latency. Run it through `bench/run.sh`, which builds the release binary
//! and runs every scenario on SQLite and PostgreSQL.
//!
//! `cargo run --release --example bench -- <scenario> <database-url> [seconds] [concurrency]`
//! scenarios: `otp` (send-otp then verify-otp with the right code, per simulated user) and
//! `healthz`. The service runs in live mode against a fake Twilio inside this process, which is
//! how the benchmark learns each code.
//!
//! `cargo run --release --example bench -- dispatch <database-url> <messages> <instances>`
//! queues the messages, starts that many dispatcher processes on the database, and reports how
//! fast messages reach the fake Twilio and each process's peak memory.
//!
//! `cargo run --release --example bench -- sweep <database-url> <appointments>` stores that many
//! appointments, a tenth of them due for their 24-hour reminder, prints the sweep query's plan,
//! and times one sweep that queues every due reminder (in as many rounds as that takes), then a
//! sweep with nothing left to queue.
//!
//! `cargo run --release --example bench -- import <database-url> <rows>` writes a CSV of that
//! many appointments and times `prism-messaging import appointments` on it, twice (the second
//! time every row is unchanged).

#[path = "../tests/it/common/fake_twilio.rs"]
mod fake_twilio;

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

pub const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
pub const AUTH_TOKEN: &str = "bench-twilio-auth-token";

struct Latencies(Vec<Duration>);

impl Latencies {
    fn summary(&mut self, name: &str, elapsed: Duration) -> String {
        self.0.sort();
        let n = self.0.len();
        let pct = |p: f64| {
            self.0
                .get(((n as f64 * p) as usize).min(n.saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        format!(
            "{name:<12} {n:>8} req  {:>9.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
            n as f64 / elapsed.as_secs_f64(),
            pct(0.50).as_secs_f64() * 1000.0,
            pct(0.99).as_secs_f64() * 1000.0
        )
    }
}

async fn free_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// The data encryption key of every benchmark database (a fixed one: the figures include sealing
/// and opening, as in production).
const BENCH_KEY: &str = "YmVuY2gta2V5LWJlbmNoLWtleS1iZW5jaC1rZXktMDE=";

fn peak_rss(pid: Option<u32>) -> String {
    pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| {
                l.replace("VmHWM:", "")
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
        })
        .unwrap_or_else(|| "?".into())
}

fn server(
    binary: &std::path::Path,
    database_url: &str,
    fake: &fake_twilio::FakeTwilio,
    role: &str,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(std::env::temp_dir())
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", database_url)
        .env("DATA_ENCRYPTION_KEY", BENCH_KEY)
        .env("MESSAGING_MOCK_MODE", "false")
        .env("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
        .env("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
        .env("TWILIO_PHONE_NUMBER", "+14155550100")
        .env("TWILIO_API_BASE", &fake.base_url)
        .env("INSTANCE_ROLE", role)
        .env("QUIET_HOURS", "off")
        .env("DISPATCH_RATE_PER_SECOND", "0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    // The dispatcher's settings as the operator would set them, and its log level, for trying
    // other values.
    for name in [
        "DISPATCH_BATCH_SIZE",
        "DISPATCH_RATE_PER_SECOND",
        "RUST_LOG",
    ] {
        if let Ok(value) = std::env::var(format!("BENCH_{name}")) {
            cmd.env(name, value);
        }
    }
    cmd
}

/// Queue `n` notifications for one consenting patient through the library's own path.
async fn queue(database_url: &str, n: usize) {
    use prism_messaging::consent::ConsentPatch;
    use prism_messaging::store::{ChangeContext, ConsentSource};
    let keys = prism_messaging::store::KeySettings {
        current: Some(prism_messaging::vault::Key::parse(BENCH_KEY).unwrap()),
        ..Default::default()
    };
    let store = prism_messaging::store::connect(database_url, &keys)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let ctx = ChangeContext {
        source: ConsentSource::Api,
        ip: None,
        user_agent: None,
        at: chrono::Utc::now(),
    };
    let patch = ConsentPatch {
        phone_number: Some("+14155552671".into()),
        sms_consent: Some(true),
        ..Default::default()
    };
    store
        .update_consent("bench", &|c| patch.apply(c), &ctx)
        .await
        .unwrap();
    let render = prism_messaging::templates::RenderContext {
        clinic_name: "PhysiologicPRISM".into(),
        app_url: "http://localhost:8080".into(),
    };
    // Only the outbox, built from the store alone: no server, no provider.
    let outbox = prism_messaging::outbox::Outbox::new(
        store.clone(),
        std::sync::Arc::new(prism_messaging::clock::SystemClock),
        render,
        std::sync::Arc::default(),
    );
    for i in 0..n {
        let request = prism_messaging::outbox::NotificationRequest {
            user_id: "bench".into(),
            template: "payment_received".into(),
            variables: json!({"amount": format!("INR {i}.00"), "date": "2027-01-12"}),
            channel: None,
            idempotency_key: None,
        };
        outbox.queue_notification(request).await.unwrap();
    }
}

async fn dispatch(binary: &std::path::Path, database_url: &str, messages: usize, instances: usize) {
    queue(database_url, messages).await;
    let fake = fake_twilio::FakeTwilio::start().await;
    let started = Instant::now();
    let mut children: Vec<_> = (0..instances)
        .map(|_| {
            server(binary, database_url, &fake, "dispatcher")
                .spawn()
                .unwrap()
        })
        .collect();
    while fake.created_count() < messages {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "dispatch did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let created = fake.created();
    let first = created.iter().map(|c| c.received_at).min().unwrap();
    let last = created.iter().map(|c| c.received_at).max().unwrap();
    let backend = database_url.split(':').next().unwrap_or("?");
    let memory: Vec<String> = children.iter().map(|c| peak_rss(c.id())).collect();
    println!(
        "-- dispatch on {backend}, {instances} instance(s): {messages} messages in {:.2} s from start ({:.0} msg/s); \
         first send after {:.2} s; first to last send {:.2} s ({:.0} msg/s); peak RSS per process: {}",
        elapsed.as_secs_f64(),
        messages as f64 / elapsed.as_secs_f64(),
        first.duration_since(started).as_secs_f64(),
        last.duration_since(first).as_secs_f64(),
        messages as f64 / last.duration_since(first).as_secs_f64(),
        memory.join(", ")
    );
    for child in &mut children {
        let _ = child.start_kill();
    }
}

/// Patients the reminder scenarios spread their appointments over (each with SMS consent).
const PATIENTS: usize = 1_000;

/// The store, migrated, with `PATIENTS` consenting patients, and the service on a fixed clock.
async fn reminder_services(
    database_url: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> prism_messaging::app::Services {
    use prism_messaging::consent::ConsentPatch;
    use prism_messaging::store::{ChangeContext, ConsentSource};
    let vars: std::collections::HashMap<&str, &str> = [
        ("DATABASE_URL", database_url),
        ("DATA_ENCRYPTION_KEY", BENCH_KEY),
        ("QUIET_HOURS", "off"),
        ("RUST_LOG", "warn"),
        ("OTP_SECRET", "bench-otp-secret-0123456789abcdef"),
    ]
    .into_iter()
    .collect();
    let config =
        prism_messaging::config::Config::from_lookup(|name| vars.get(name).map(|v| v.to_string()))
            .unwrap();
    let clock = prism_messaging::clock::ManualClock::new(now);
    let services = prism_messaging::app::Services::build(config, Arc::new(clock))
        .await
        .unwrap();
    let ctx = ChangeContext {
        source: ConsentSource::Api,
        ip: None,
        user_agent: None,
        at: now,
    };
    for p in 0..PATIENTS {
        let patch = ConsentPatch {
            phone_number: Some(format!("+9198765{p:05}")),
            sms_consent: Some(true),
            ..Default::default()
        };
        services
            .store
            .update_consent(&format!("patient-{p}"), &|c| patch.apply(c), &ctx)
            .await
            .unwrap();
    }
    services
}

/// The sweep query's plan, as the database would run it for the first page.
async fn sweep_plan(
    database_url: &str,
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
) -> String {
    use prism_messaging::store::{sweep_sql, SubjectType};
    let sql = sweep_sql(SubjectType::Appointment);
    if database_url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(database_url).await.unwrap();
        let rows: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                .bind(from)
                .bind(to)
                .bind("appointment")
                .bind("24h")
                .bind(from)
                .bind("")
                .bind(1_000_i64)
                .bind("")
                .bind(from)
                .fetch_all(&pool)
                .await
                .unwrap();
        rows.into_iter()
            .map(|(id, parent, _, detail)| format!("  [{id}<-{parent}] {detail}"))
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        let pool = sqlx::PgPool::connect(database_url).await.unwrap();
        // A fresh bulk load: let the planner see it, as autovacuum soon would.
        sqlx::query("ANALYZE").execute(&pool).await.unwrap();
        let rows: Vec<(String,)> = sqlx::query_as(&format!("EXPLAIN (ANALYZE, BUFFERS) {sql}"))
            .bind(from)
            .bind(to)
            .bind("appointment")
            .bind("24h")
            .bind(from)
            .bind("")
            .bind(1_000_i64)
            .bind("")
            .bind(from)
            .fetch_all(&pool)
            .await
            .unwrap();
        rows.into_iter()
            .map(|(line,)| format!("  {line}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

async fn sweep_bench(database_url: &str, stored: usize) {
    use chrono::{Duration as Span, Utc};
    use prism_messaging::reminders::Reminder;
    use prism_messaging::store::{ItemStatus, ScheduledItem, SubjectType};
    let now = chrono::DateTime::parse_from_rfc3339("2027-01-12T04:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let services = reminder_services(database_url, now).await;
    let due = stored / 10;
    let started = Instant::now();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..stored {
        // Every tenth is in the 24-hour window (4-24 h ahead); the rest from 30 hours to a year.
        let at = if i % 10 == 0 {
            now + Span::hours(5) + Span::milliseconds((i as i64 * 37) % 68_400_000)
        } else {
            now + Span::hours(30) + Span::seconds((i as i64 * 7_919) % 31_000_000)
        };
        batch.push(ScheduledItem {
            id: format!("appt-{i:07}"),
            user_id: format!("patient-{}", i % PATIENTS),
            scheduled_at: at,
            time_zone: Some("Asia/Kolkata".into()),
            status: ItemStatus::Scheduled,
        });
        if batch.len() == batch.capacity() || i + 1 == stored {
            services
                .store
                .upsert_scheduled_many(SubjectType::Appointment, &batch, now)
                .await
                .unwrap();
            batch.clear();
        }
    }
    let backend = database_url.split(':').next().unwrap_or("?");
    eprintln!(
        "   (stored {stored} appointments on {backend} in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let plan = sweep_plan(database_url, now + Span::hours(4), now + Span::hours(24)).await;
    let started = Instant::now();
    let report = services
        .reminders
        .sweep(Reminder::Appointment24h)
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(report.queued, due, "every due reminder queued");
    let started = Instant::now();
    let again = services
        .reminders
        .sweep(Reminder::Appointment24h)
        .await
        .unwrap();
    let idle = started.elapsed();
    assert_eq!(again.queued, 0);
    let idle_plan = sweep_plan(database_url, now + Span::hours(4), now + Span::hours(24)).await;
    println!(
        "-- sweep on {backend}: {stored} appointments stored, {due} due: all queued in {:.3} s \
         ({} rounds, {:.1} us per due reminder); the next sweep, nothing to queue: {:.3} s",
        elapsed.as_secs_f64(),
        due.div_ceil(1_000).max(1),
        elapsed.as_secs_f64() * 1e6 / due.max(1) as f64,
        idle.as_secs_f64()
    );
    println!("   plan of the sweep query, first page:\n{plan}");
    println!("   plan of the sweep query, every due reminder queued:\n{idle_plan}");
}

async fn import_bench(binary: &std::path::Path, database_url: &str, rows: usize) {
    use std::io::Write;
    let dir = tempfile_dir();
    let file = dir.join("calendar.csv");
    let mut csv = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
    writeln!(csv, "id,user_id,starts_at,time_zone,status").unwrap();
    let start = chrono::DateTime::parse_from_rfc3339("2027-01-12T04:00:00Z").unwrap();
    for i in 0..rows {
        let at = start + chrono::Duration::minutes(15 * i as i64);
        let status = if i % 50 == 0 { "cancelled" } else { "" };
        writeln!(
            csv,
            "clinic-{i:07},patient-{},{},Asia/Kolkata,{status}",
            i % PATIENTS,
            at.to_rfc3339()
        )
        .unwrap();
    }
    csv.flush().unwrap();
    drop(csv);
    let backend = database_url.split(':').next().unwrap_or("?");
    // Migrations first, so the runs time the import alone (plus the process start).
    let status = tokio::process::Command::new(binary)
        .arg("migrate")
        .env_clear()
        .env("DATABASE_URL", database_url)
        .env("DATA_ENCRYPTION_KEY", BENCH_KEY)
        .current_dir(&dir)
        .stdout(Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success());
    for run in ["first import", "same file again"] {
        let started = Instant::now();
        let out = tokio::process::Command::new(binary)
            .args(["import", "appointments"])
            .arg(&file)
            .env_clear()
            .env("DATABASE_URL", database_url)
            .env("DATA_ENCRYPTION_KEY", BENCH_KEY)
            .env("RUST_LOG", "error")
            .current_dir(&dir)
            .output()
            .await
            .unwrap();
        let elapsed = started.elapsed();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary = String::from_utf8_lossy(&out.stdout);
        let summary = summary.lines().next().unwrap_or_default();
        let summary = summary.split_once(": ").map_or(summary, |(_, s)| s);
        println!(
            "-- import on {backend}, {run}: {rows} rows in {:.2} s ({:.0} rows/s): {summary}",
            elapsed.as_secs_f64(),
            rows as f64 / elapsed.as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("prism-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scenario = args.get(1).cloned().unwrap_or_else(|| "otp".into());
    if scenario == "sweep" {
        let database_url = args.get(2).cloned().expect("database url");
        let stored = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100_000);
        sweep_bench(&database_url, stored).await;
        return;
    }
    if scenario == "import" {
        let binary =
            std::env::var("PRISM_BIN").unwrap_or_else(|_| "target/release/prism-messaging".into());
        let binary = std::fs::canonicalize(&binary)
            .expect("the release binary exists (cargo build --release)");
        let database_url = args.get(2).cloned().expect("database url");
        let rows = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100_000);
        import_bench(&binary, &database_url, rows).await;
        return;
    }
    if scenario == "dispatch" {
        let binary =
            std::env::var("PRISM_BIN").unwrap_or_else(|_| "target/release/prism-messaging".into());
        let binary = std::fs::canonicalize(&binary)
            .expect("the release binary exists (cargo build --release)");
        let database_url = args.get(2).cloned().expect("database url");
        let messages = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5000);
        let instances = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
        dispatch(&binary, &database_url, messages, instances).await;
        return;
    }
    let database_url = args.get(2).cloned().expect("database url");
    let seconds: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10);
    let concurrency: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(16);
    let binary =
        std::env::var("PRISM_BIN").unwrap_or_else(|_| "target/release/prism-messaging".into());

    // Absolute, because the server runs in another working directory.
    let binary =
        std::fs::canonicalize(&binary).expect("the release binary exists (cargo build --release)");
    let fake = fake_twilio::FakeTwilio::start().await;
    let port = free_port().await;
    let base = format!("http://127.0.0.1:{port}");
    let dir = std::env::temp_dir();
    let mut child = tokio::process::Command::new(&binary)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(&dir)
        .env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", &database_url)
        .env("DATA_ENCRYPTION_KEY", BENCH_KEY)
        .env("MESSAGING_MOCK_MODE", "false")
        .env("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
        .env("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
        .env("TWILIO_PHONE_NUMBER", "+14155550100")
        .env("TWILIO_API_BASE", &fake.base_url)
        .env("OTP_SECRET", "bench-otp-secret-0123456789abcdef")
        .env("OTP_RESEND_COOLDOWN_SECONDS", "0")
        .env("OTP_MAX_SENDS_PER_HOUR", "1000")
        .env("TRUST_FORWARDED_FOR", "true")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the release binary (build it first: cargo build --release)");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency * 2)
        .build()
        .unwrap();
    for _ in 0..200 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let counter = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let base = base.clone();
        let counter = counter.clone();
        let fake = fake.clone();
        let scenario = scenario.clone();
        workers.spawn(async move {
            let (mut first, mut second) = (Vec::new(), Vec::new());
            while Instant::now() < deadline {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                if scenario == "healthz" {
                    let t = Instant::now();
                    let r = client.get(format!("{base}/healthz")).send().await.unwrap();
                    assert!(r.status().is_success());
                    first.push(t.elapsed());
                    continue;
                }
                let phone = format!("+9198{:08}", i % 100_000_000);
                let user = format!("bench-user-{i}");
                let ip = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
                let t = Instant::now();
                let r = client
                    .post(format!("{base}/api/messaging/send-otp"))
                    .header("x-forwarded-for", &ip)
                    .json(&json!({"user_id": user, "phone_number": phone, "purpose": "login"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
                first.push(t.elapsed());
                let code = fake.last_code_for(&phone).expect("the fake saw the code");
                let t = Instant::now();
                let r = client
                    .post(format!("{base}/api/messaging/verify-otp"))
                    .json(&json!({"user_id": user, "purpose": "login", "otp_code": code}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                second.push(t.elapsed());
            }
            (first, second)
        });
    }
    let (mut first, mut second) = (Latencies(vec![]), Latencies(vec![]));
    while let Some(done) = workers.join_next().await {
        let (a, b) = done.unwrap();
        first.0.extend(a);
        second.0.extend(b);
    }
    let elapsed = started.elapsed();
    let backend = database_url.split(':').next().unwrap_or("?");
    let peak_kib = child
        .id()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.to_string())
        })
        .unwrap_or_default();
    println!(
        "-- {scenario} on {backend}, {concurrency} concurrent clients, {:.1} s; server {}",
        elapsed.as_secs_f64(),
        peak_kib
            .replace("VmHWM:", "peak RSS")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    );
    if scenario == "healthz" {
        println!("{}", first.summary("healthz", elapsed));
    } else {
        println!("{}", first.summary("send-otp", elapsed));
        println!("{}", second.summary("verify-otp", elapsed));
    }
    let _ = child.start_kill();
}
