//! The real binary: configuration errors, `health`, `migrate`, `send`, and `serve` with graceful
//! shutdown on SIGTERM, checking its logs hold no phone number, body or secret.

use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};
use tokio::process::Command;

fn binary(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prism-messaging"));
    // A clean environment in an empty directory: no stray .env, no inherited settings.
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        // Tests run at any hour: quiet hours would hold their messages back.
        .env("QUIET_HOURS", "off")
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

fn live_env(cmd: &mut Command, fake: &FakeTwilio, token: &str) {
    cmd.env("MESSAGING_MOCK_MODE", "false")
        .env("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
        .env("TWILIO_AUTH_TOKEN", token)
        .env("TWILIO_PHONE_NUMBER", SMS_SENDER)
        .env("TWILIO_API_BASE", &fake.base_url);
}

#[tokio::test]
async fn a_bad_setting_stops_the_start_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (vec![("MESSAGING_MOCK_MODE", "false")], "TWILIO_ACCOUNT_SID"),
        // Credentials with the mode left to its default: refused, not silently mocked.
        (
            vec![("TWILIO_ACCOUNT_SID", ACCOUNT_SID)],
            "MESSAGING_MOCK_MODE",
        ),
        (
            vec![("AUTH_JWKS_URL", "https://keys.example.com/jwks")],
            "AUTH_ISSUER",
        ),
        (vec![("CRON_SECRET", "too-short")], "CRON_SECRET"),
        (vec![("BIND_ADDR", "somewhere")], "BIND_ADDR"),
        (vec![("OTP_TTL_SECONDS", "-5")], "OTP_TTL_SECONDS"),
        (
            vec![("TWILIO_PHONE_NUMBER", "12345")],
            "TWILIO_PHONE_NUMBER",
        ),
    ];
    for (vars, variable) in cases {
        let mut cmd = binary(dir.path());
        cmd.arg("serve");
        for (k, v) in &vars {
            cmd.env(k, v);
        }
        let out = cmd.output().await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{vars:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(variable), "{stderr}");
    }
    // Settings that are only found wrong when used: a key file that cannot be read, a SQLite
    // file in a directory that does not exist. Refused the same way, naming the variable.
    let cases = [
        (
            vec![
                ("AUTH_JWKS_FILE", "/nonexistent/jwks.json"),
                ("AUTH_ISSUER", "https://issuer.example.com"),
                ("AUTH_AUDIENCE", "clinic"),
            ],
            "AUTH_JWKS_FILE",
            &["serve"][..],
        ),
        (
            vec![(
                "DATABASE_URL",
                "sqlite:///nonexistent/directory/messages.db",
            )],
            "DATABASE_URL",
            &["serve", "migrate"][..],
        ),
    ];
    for (vars, variable, commands) in cases {
        for command in commands {
            let mut cmd = binary(dir.path());
            cmd.arg(command);
            for (k, v) in &vars {
                cmd.env(k, v);
            }
            let out = cmd.output().await.unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command} {vars:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
            assert!(
                stderr.starts_with("configuration error: ") && stderr.contains(variable),
                "{stderr}"
            );
        }
    }
    // Settings also come from .env in the working directory.
    std::fs::write(dir.path().join(".env"), "LOG_FORMAT=xml\n").unwrap();
    let out = binary(dir.path()).arg("migrate").output().await.unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("LOG_FORMAT"));
    // A line .env cannot read stops the start (the parser would leave every line below it
    // unread), naming the line by number and never echoing its text, which may be a secret.
    std::fs::write(
        dir.path().join(".env"),
        "# settings\nCLINIC_NAME=Clinic One\nOTP_LENGTH=abc\n",
    )
    .unwrap();
    let out = binary(dir.path()).arg("serve").output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(".env") && stderr.contains("line 2"),
        "{stderr}"
    );
    assert!(!stderr.contains("Clinic One"), "{stderr}");
    std::fs::write(
        dir.path().join(".env"),
        "CLINIC_NAME=\"Clinic One\"\nOTP_LENGTH=abc\n",
    )
    .unwrap();
    let out = binary(dir.path()).arg("serve").output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("OTP_LENGTH"));
    // A copy of .env.example with settings appended sets a name twice: only the first (the
    // example's blank) would count, so the start is refused, naming the variable and its lines,
    // not their values.
    std::fs::write(
        dir.path().join(".env"),
        "# copied\nDATABASE_URL=\nLOG_FORMAT=pretty\n# mine\nexport DATABASE_URL=sqlite://mine.db\n",
    )
    .unwrap();
    let out = binary(dir.path()).arg("migrate").output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("DATABASE_URL") && stderr.contains("lines 2, 5"),
        "{stderr}"
    );
    assert!(!stderr.contains("mine.db"), "{stderr}");
    assert!(!dir.path().join("prism-messaging.db").exists());
    assert!(!dir.path().join("mine.db").exists());
    std::fs::remove_file(dir.path().join(".env")).unwrap();
}

/// A PostgreSQL server that cannot be reached is reported with its cause (here a refused
/// port), not as the pool's timeout; a missing key is refused before the server is tried; and a
/// log that is not a terminal carries no colour codes.
#[tokio::test]
async fn an_unreachable_postgres_is_reported_with_its_cause_in_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on, nor can while the test runs.
    let (_refusing, port) = refusing_port();
    let url = format!("postgres://postgres:secret-password@127.0.0.1:{port}/db");
    let out = binary(dir.path())
        .env("DATABASE_URL", &url)
        .env("DATA_ENCRYPTION_KEY", DATA_KEY)
        .arg("migrate")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A server that is down is a fault, not a setting: exit code 1, not 2.
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("DATABASE_URL") && stderr.contains("refused"),
        "{stderr}"
    );
    assert!(!stderr.contains("timed out"), "{stderr}");
    assert!(!stderr.contains("secret-password"), "{stderr}");
    let out = binary(dir.path())
        .env("DATABASE_URL", &url)
        .arg("migrate")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a missing setting: {stderr}");
    assert!(stderr.contains("DATA_ENCRYPTION_KEY"), "{stderr}");
    assert!(
        !stderr.contains("refused"),
        "the key is checked first: {stderr}"
    );
    // A URL that cannot be read is a setting to fix: exit code 2, naming the variable, with
    // no password echoed.
    for unreadable in [
        "postgres://postgres:secret-password@127.0.0.1:notaport/db",
        "postgres://postgres:secret-password@127.0.0.1/db?sslmode=bogus",
    ] {
        let out = binary(dir.path())
            .env("DATABASE_URL", unreadable)
            .env("DATA_ENCRYPTION_KEY", DATA_KEY)
            .arg("migrate")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{unreadable}: {stderr}");
        assert!(
            stderr.contains("configuration error: DATABASE_URL"),
            "{stderr}"
        );
        assert!(!stderr.contains("secret-password"), "{stderr}");
    }
    // A log line (the generated key file's warning), written to a pipe: no colour codes.
    let out = binary(dir.path())
        .env("DATABASE_URL", "sqlite://colour.db")
        .arg("migrate")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("key file"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a log file: {stderr:?}"
    );
}

/// `job messaging-cleanup --as-of` in the future deletes only with `--dry-run` (a preview);
/// `token` puts the user where `AUTH_USER_CLAIM` says the service reads it.
#[tokio::test]
async fn a_future_cleanup_is_a_preview_and_tokens_follow_the_user_claim() {
    let dir = tempfile::tempdir().unwrap();
    let out = binary(dir.path())
        .args([
            "job",
            "messaging-cleanup",
            "--as-of",
            "2090-01-01T00:00:00Z",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dry-run"));
    let out = binary(dir.path())
        .args([
            "job",
            "messaging-cleanup",
            "--dry-run",
            "--as-of",
            "2090-01-01T00:00:00Z",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let secret = "a-jwt-secret-of-at-least-thirty-two-bytes";
    let out = binary(dir.path())
        .args(["token", "--user", "u1"])
        .env("AUTH_JWT_SECRET", secret)
        .env("AUTH_USER_CLAIM", "user_id")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let payload = token.split('.').nth(1).unwrap();
    use base64::Engine;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["user_id"], "u1");
    let out = binary(dir.path())
        .args(["token", "--user", ""])
        .env("AUTH_JWT_SECRET", secret)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test]
async fn health_reports_twilio_credentials_and_mock_mode() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTwilio::start().await;
    let mut cmd = binary(dir.path());
    cmd.arg("health");
    live_env(&mut cmd, &fake, AUTH_TOKEN);
    let out = cmd.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("Twilio credentials accepted"), "{stdout}");
    let req = &fake.requests()[0];
    assert_eq!(req.path, format!("/2010-04-01/Accounts/{ACCOUNT_SID}.json"));

    let mut cmd = binary(dir.path());
    cmd.arg("health");
    live_env(&mut cmd, &fake, "a-wrong-token");
    let out = cmd.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.contains("20003"), "{stdout}");
    assert!(!stdout.contains("a-wrong-token"));

    // An account Twilio suspended answers, but cannot send: not healthy.
    fake.set_account_status("suspended");
    let mut cmd = binary(dir.path());
    cmd.arg("health");
    live_env(&mut cmd, &fake, AUTH_TOKEN);
    let out = cmd.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("suspended"), "{stdout}");

    let out = binary(dir.path()).arg("health").output().await.unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("mock mode is on"));
}

/// Processes started together on a new SQLite file each find it set up (found by review: one of
/// two exited with "table already exists", "duplicate column name" or "database is locked").
#[tokio::test]
async fn processes_started_together_on_a_new_file_all_start() {
    for _ in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let mut runs = tokio::task::JoinSet::new();
        for _ in 0..3 {
            let mut migrate = binary(dir.path());
            runs.spawn(async move { migrate.arg("migrate").output().await });
        }
        for out in runs.join_all().await {
            let out = out.unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[tokio::test]
async fn migrate_and_send_in_mock_mode() {
    let dir = tempfile::tempdir().unwrap();
    let out = binary(dir.path()).arg("migrate").output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dir.path().join("prism-messaging.db").exists(),
        "the default SQLite file is created"
    );

    let url = format!(
        "sqlite://{}",
        dir.path().join("prism-messaging.db").display()
    );
    let store = prism_messaging::store::connect(&url, &Default::default())
        .await
        .unwrap();
    let patch = prism_messaging::consent::ConsentPatch {
        phone_number: Some("+14155552671".into()),
        sms_consent: Some(true),
        ..Default::default()
    };
    let ctx = prism_messaging::store::ChangeContext {
        source: prism_messaging::store::ConsentSource::Api,
        ip: None,
        user_agent: None,
        at: chrono::Utc::now(),
    };
    store
        .update_consent("cli-user", &|c| patch.apply(c), &ctx)
        .await
        .unwrap();

    let out = binary(dir.path())
        .args([
            "send",
            "--user",
            "cli-user",
            "--template",
            "payment_received",
        ])
        .args(["--var", "amount=INR 499.00", "--var", "date=2027-01-12"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(r#""status": "delivered""#), "{stdout}");
    assert!(
        stdout.contains("we received your payment of INR 499.00 on 12 Jan 2027"),
        "{stdout}"
    );

    let out = binary(dir.path())
        .args([
            "send",
            "--user",
            "cli-user",
            "--template",
            "payment_received",
            "--var",
            "amount=lots",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("amount"));
}

/// The message's status once the background dispatcher has settled it (5 s at most).
async fn settled_status(client: &reqwest::Client, base: &str, id: &str) -> String {
    let mut status = String::new();
    for _ in 0..100 {
        let m: Value = client
            .get(format!("{base}/api/messages/{id}"))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        status = m["message"]["status"].as_str().unwrap().to_string();
        if status != "queued" && status != "sending" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    status
}

/// `serve` started on a port the kernel picks (`BIND_ADDR=127.0.0.1:0`), found from its
/// "listening" log line: a port picked by the test and let go could be taken by another test's
/// listener before the server binds it, and that listener would answer in its place. Returns the
/// child, its base URL and its stderr, read as it comes (a full pipe would stall the server) and
/// handed over whole when the process closes it.
async fn serve_on_a_free_port(
    mut cmd: Command,
) -> (
    tokio::process::Child,
    String,
    tokio::task::JoinHandle<String>,
) {
    cmd.env("BIND_ADDR", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (found, address) = tokio::sync::oneshot::channel();
    let logs = tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut text = String::new();
        let mut found = Some(found);
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(port) = listening_port(&line) {
                if let Some(found) = found.take() {
                    let _ = found.send(port);
                }
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let port = tokio::time::timeout(Duration::from_secs(20), address)
        .await
        .expect("the server logs where it listens within 20 s")
        .expect("the server logs where it listens");
    (child, format!("http://127.0.0.1:{port}"), logs)
}

/// The port in the "listening" line, in either log format (`addr=127.0.0.1:PORT` or JSON).
fn listening_port(line: &str) -> Option<u16> {
    if !line.contains("prism-messaging listening") {
        return None;
    }
    let after = &line[line.find("127.0.0.1:")? + "127.0.0.1:".len()..];
    let digits = after
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(after.len());
    after[..digits].parse().ok()
}

/// Live mode with `PUBLIC_URL` on a loopback host (APP_URL's default, say) starts, but says that
/// Twilio cannot post delivery statuses there (found by review: it started silently, and every
/// message would stay `sent`).
#[tokio::test]
async fn live_mode_with_a_loopback_public_url_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTwilio::start().await;
    let mut cmd = binary(dir.path());
    live_env(&mut cmd, &fake, AUTH_TOKEN);
    cmd.env("PUBLIC_URL", "http://localhost:8080");
    let (child, _base, stderr) = serve_on_a_free_port(cmd).await;
    let out = stop_with_sigterm(child).await;
    let logs = stderr.await.unwrap();
    assert!(out.status.success(), "{logs}");
    assert!(logs.contains("PUBLIC_URL is a loopback address"), "{logs}");
}

#[tokio::test]
async fn serve_sends_through_twilio_logs_nothing_private_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTwilio::start().await;
    let mut cmd = binary(dir.path());
    live_env(&mut cmd, &fake, AUTH_TOKEN);
    cmd.env("MESSAGING_API_KEY", API_KEY)
        .env("AUTH_JWT_SECRET", JWT_SECRET)
        .env("APP_URL", APP_URL)
        .env("LOG_FORMAT", "json");
    let (child, base, stderr) = serve_on_a_free_port(cmd).await;
    let client = reqwest::Client::new();
    let mut up = false;
    for _ in 0..100 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the server came up");

    let token = prism_messaging::auth::mint_hs256(
        &prism_messaging::config::Secret::new(JWT_SECRET),
        "p1",
        Duration::from_secs(60),
        &[],
    )
    .unwrap();
    let r = client
        .put(format!("{base}/api/messaging/preferences"))
        .bearer_auth(&token)
        .json(&json!({"phone_number": "+14155552671", "sms_consent": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(format!("{base}/api/notifications"))
        .bearer_auth(API_KEY)
        .json(&reminder("p1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["message"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The background dispatcher sends it without being asked.
    assert_eq!(settled_status(&client, &base, &id).await, "sent");
    assert_eq!(fake.requests().len(), 1);
    let r = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let big = "x".repeat(100 * 1024);
    let r = client
        .post(format!("{base}/api/notifications"))
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(r).await, "payload_too_large");

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("stops within 15 s")
        .unwrap();
    assert!(out.status.success(), "clean exit on SIGTERM");
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr.await.unwrap()
    );
    assert!(logs.contains("shutdown requested"), "{logs}");
    assert!(!logs.contains("PUBLIC_URL is a loopback"), "{logs}");
    assert!(
        logs.contains("+14*****2671"),
        "numbers are logged masked: {logs}"
    );
    for secret in [
        "+14155552671",
        "4155552671",
        AUTH_TOKEN,
        API_KEY,
        JWT_SECRET,
        "reminder of your appointment",
    ] {
        assert!(!logs.contains(secret), "logs leak {secret}: {logs}");
    }
}

#[tokio::test]
async fn otp_send_and_verify_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    // Separate processes hash codes alike only with a configured secret.
    std::fs::write(
        dir.path().join(".env"),
        "OTP_SECRET=cli-test-secret-0123456789abcdefghij\n",
    )
    .unwrap();
    let out = binary(dir.path())
        .args([
            "otp",
            "send",
            "--user",
            "cli",
            "--phone",
            "+919876543210",
            "--purpose",
            "login",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code: String = stdout
        .split(|c: char| !c.is_ascii_digit())
        .find(|w| w.len() == 6)
        .expect("mock mode prints the message with its code")
        .into();
    let verify = |code: String| {
        let dir = dir.path().to_path_buf();
        async move {
            binary(&dir)
                .args([
                    "otp",
                    "verify",
                    "--user",
                    "cli",
                    "--purpose",
                    "login",
                    "--code",
                    &code,
                ])
                .output()
                .await
                .unwrap()
        }
    };
    let wrong = if code == "000000" {
        "111111".to_string()
    } else {
        "000000".to_string()
    };
    let out = verify(wrong).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("invalid_otp"));
    let out = verify(code.clone()).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(verify(code).await.status.code(), Some(1), "single use");
}

#[tokio::test]
async fn ctrl_c_stops_the_server_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (child, base, stderr) = serve_on_a_free_port(binary(dir.path())).await;
    let client = reqwest::Client::new();
    let mut up = false;
    for _ in 0..100 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up);
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "clean exit on Ctrl-C (SIGINT)");
    assert!(stderr.await.unwrap().contains("shutdown requested"));
}

/// A log sink that goes away (a shipper that dies, `serve 2>&1 | head`) leaves stderr a broken
/// pipe. Lines that cannot be written are dropped: requests that log still get their answers,
/// what they queued is sent, and SIGTERM still stops the process.
#[tokio::test]
async fn a_closed_log_pipe_drops_lines_not_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = binary(dir.path());
    cmd.env("MESSAGING_API_KEY", API_KEY)
        .env("CRON_SECRET", CRON_SECRET)
        .env("RUST_LOG", "debug");
    let (child, base, stderr) = serve_on_a_free_port(cmd).await;
    // The reader goes, and with it the pipe's only read end.
    stderr.abort();
    let _ = stderr.await;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let r = client
            .post(format!("{base}/cron/follow-up-reminders"))
            .bearer_auth(CRON_SECRET)
            .send()
            .await
            .expect("an answer, though the log is gone");
        assert_eq!(r.status(), 200);
    }
    let r = client
        .post(format!("{base}/api/notifications"))
        .bearer_auth(API_KEY)
        .json(&json!({"user_id": "nobody", "template": "payment_received",
            "variables": {"amount": "INR 1.00", "date": "2027-01-12"}}))
        .send()
        .await
        .expect("an answer, though the log is gone");
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["message"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The dispatcher, which logs each send, settles it (skipped: no consent on file).
    assert_eq!(settled_status(&client, &base, &id).await, "skipped");
    // SIGTERM stops the server though the log is gone.
    let out = stop_with_sigterm(child).await;
    assert!(out.status.success(), "{:?}", out.status);
}

/// SIGTERM to a server, and its output once it has stopped (within 15 s).
async fn stop_with_sigterm(child: tokio::process::Child) -> std::process::Output {
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("stops within 15 s of SIGTERM")
        .unwrap()
}

/// Every flow against the real binary, logging at `debug` in both formats: no full phone number,
/// code, message body, reply body, link code or session cookie in any line.
#[tokio::test]
async fn every_flow_at_debug_logs_nothing_private() {
    for format in ["json", "pretty"] {
        let logs = run_every_flow(format).await;
        assert!(
            logs.lines().count() > 20,
            "{format}: too few lines to mean anything"
        );
        for (private, what) in [
            ("+14155552671", "a number"),
            ("4155552671", "a number's digits"),
            ("7911123456", "another number's digits"),
            ("reminder of your appointment", "a message body"),
            ("your verification code", "an OTP message"),
            ("my knee still hurts", "a reply body"),
            ("handoff=", "a settings link"),
            ("prism_settings=", "a session cookie"),
        ] {
            assert!(!logs.contains(private), "{format} logs show {what}: {logs}");
        }
    }
}

async fn run_every_flow(format: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTwilio::start().await;
    let mut cmd = binary(dir.path());
    live_env(&mut cmd, &fake, AUTH_TOKEN);
    cmd.env("MESSAGING_API_KEY", API_KEY)
        .env("AUTH_JWT_SECRET", JWT_SECRET)
        .env("CRON_SECRET", CRON_SECRET)
        .env("APP_URL", APP_URL)
        .env("PUBLIC_URL", PUBLIC_URL)
        .env("TWILIO_WHATSAPP_NUMBER", WHATSAPP_SENDER)
        .env("LOG_FORMAT", format)
        .env("RUST_LOG", "debug");
    let (child, base, stderr) = serve_on_a_free_port(cmd).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for _ in 0..100 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = prism_messaging::auth::mint_hs256(
        &prism_messaging::config::Secret::new(JWT_SECRET),
        "p1",
        Duration::from_secs(600),
        &[],
    )
    .unwrap();
    let number = "+14155552671";
    // Preferences.
    let r = client
        .put(format!("{base}/api/messaging/preferences"))
        .bearer_auth(&token)
        .json(&json!({"phone_number": number, "sms_consent": true, "whatsapp_consent": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // An OTP, sent and verified.
    let r = client
        .post(format!("{base}/api/messaging/send-otp"))
        .json(&json!({"user_id": "p1", "phone_number": number, "purpose": "login"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let code = fake.last_code_for(number).unwrap();
    let r = client
        .post(format!("{base}/api/messaging/verify-otp"))
        .json(&json!({"user_id": "p1", "otp_code": code, "purpose": "login"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A notification, and a reminder through the sweep.
    let r = client
        .post(format!("{base}/api/notifications"))
        .bearer_auth(API_KEY)
        .json(&reminder("p1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let starts = (chrono::Utc::now() + chrono::Duration::hours(20)).to_rfc3339();
    let r = client
        .put(format!("{base}/api/appointments/a1"))
        .bearer_auth(API_KEY)
        .json(&json!({"user_id": "p1", "starts_at": starts}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(format!("{base}/cron/appointment-reminders-24h"))
        .bearer_auth(CRON_SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for _ in 0..100 {
        if fake.created_count() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        fake.created_count() >= 3,
        "the OTP, the notification and the reminder went: {}",
        fake.created_count()
    );
    // Webhooks: a reply, a STOP from another number, a delivery status.
    let signed = |path: &str, params: &[(&str, &str)]| {
        let owned: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let signature = prism_messaging::provider::signature::compute(
            AUTH_TOKEN,
            &format!("{PUBLIC_URL}{path}"),
            &owned,
        );
        client
            .post(format!("{base}{path}"))
            .header("x-twilio-signature", signature)
            .form(&owned)
            .send()
    };
    let r = signed(
        "/webhooks/twilio/incoming",
        &[
            ("MessageSid", "SMr1"),
            ("From", number),
            ("Body", "my knee still hurts"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let r = signed(
        "/webhooks/twilio/incoming",
        &[
            ("MessageSid", "SMr2"),
            ("From", "+447911123456"),
            ("Body", "STOP"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let sid = fake.created()[0].sid.clone();
    let r = signed(
        "/webhooks/twilio/status",
        &[("MessageSid", sid.as_str()), ("MessageStatus", "delivered")],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    // The settings page: a link, opened.
    let link: Value = client
        .post(format!("{base}/api/settings-links"))
        .bearer_auth(API_KEY)
        .json(&json!({"user_id": "p1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = link["url"].as_str().unwrap().replace(PUBLIC_URL, &base);
    let r = client.get(url).send().await.unwrap();
    assert_eq!(r.status(), 303);
    // Export, erasure, cleanup.
    let r = client
        .get(format!("{base}/api/messaging/export"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .delete(format!("{base}/api/messaging/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(format!("{base}/cron/messaging-cleanup"))
        .bearer_auth(CRON_SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("stops within 15 s")
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr.await.unwrap()
    )
}
