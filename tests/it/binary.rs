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
    // Settings also come from .env in the working directory.
    std::fs::write(dir.path().join(".env"), "LOG_FORMAT=xml\n").unwrap();
    let out = binary(dir.path()).arg("migrate").output().await.unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("LOG_FORMAT"));
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

    let out = binary(dir.path()).arg("health").output().await.unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("mock mode is on"));
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
    let store = prism_messaging::store::connect(&url).await.unwrap();
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

async fn free_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn serve_sends_through_twilio_logs_nothing_private_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTwilio::start().await;
    let port = free_port().await;
    let base = format!("http://127.0.0.1:{port}");
    let mut cmd = binary(dir.path());
    live_env(&mut cmd, &fake, AUTH_TOKEN);
    cmd.env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("MESSAGING_API_KEY", API_KEY)
        .env("AUTH_JWT_SECRET", JWT_SECRET)
        .env("APP_URL", APP_URL)
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
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
    assert_eq!(status, "sent");
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
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(logs.contains("shutdown requested"), "{logs}");
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
    let port = free_port().await;
    let mut cmd = binary(dir.path());
    cmd.env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let client = reqwest::Client::new();
    let mut up = false;
    for _ in 0..100 {
        if client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_ok()
        {
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
    assert!(String::from_utf8_lossy(&out.stderr).contains("shutdown requested"));
}
