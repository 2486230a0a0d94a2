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
    cmd
}

/// Queue `n` notifications for one consenting patient through the library's own path.
async fn queue(database_url: &str, n: usize) {
    use prism_messaging::consent::ConsentPatch;
    use prism_messaging::store::{ChangeContext, ConsentSource};
    let store = prism_messaging::store::connect(database_url).await.unwrap();
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
         first to last send {:.2} s ({:.0} msg/s); peak RSS per process: {}",
        elapsed.as_secs_f64(),
        messages as f64 / elapsed.as_secs_f64(),
        last.duration_since(first).as_secs_f64(),
        messages as f64 / last.duration_since(first).as_secs_f64(),
        memory.join(", ")
    );
    for child in &mut children {
        let _ = child.start_kill();
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scenario = args.get(1).cloned().unwrap_or_else(|| "otp".into());
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
