//! Encryption at rest: numbers, bodies and replies are never in the database in clear (SQLite's
//! file bytes, a PostgreSQL dump of every table), `rotate-key` re-seals every row, rows written
//! before encryption are sealed in place, and the keys are refused when they do not fit.

use std::process::Stdio;

use crate::common::*;
use prism_messaging::store::KeySettings;
use prism_messaging::vault::Key;
use serde_json::{json, Value};

both_backends!(
    numbers_and_bodies_never_reach_the_database_in_clear,
    rotate_key_reseals_every_row_and_the_old_key_can_go,
    rows_written_before_encryption_are_sealed_in_place,
    the_audit_trail_takes_a_reseal_but_never_another_number,
);

/// A number, an amount and a reply no other test uses, to look for in the database's bytes.
const NUMBER: &str = "+919812345678";
const DIGITS: &str = "9812345678";
const AMOUNT: &str = "INR 4321.77";
const REPLY: &str = "knee still swollen after session 7731";

/// A patient with a number, a sent receipt, an OTP and a reply: every sealed column written.
async fn patient_with_history(app: &TestApp) -> String {
    app.consent("p1", NUMBER).await;
    let id = app
        .notify_ok(json!({
            "user_id": "p1",
            "template": "payment_received",
            "variables": {"amount": AMOUNT, "date": "2027-01-12"},
        }))
        .await;
    let r = app
        .client
        .post(app.url("/api/messaging/send-otp"))
        .json(&json!({"user_id": "p1", "phone_number": NUMBER, "purpose": "login"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.dispatch().await;
    let r = app.incoming("SMreply7731", NUMBER, REPLY).await;
    assert_eq!(r.status(), 200);
    let r = app.incoming("SMstop7731", NUMBER, "STOP").await;
    assert_eq!(r.status(), 200);
    id
}

/// What the API answers still holds the clear values.
async fn api_reads_clear(app: &TestApp, message_id: &str) {
    let prefs: Value = app
        .get_json("/api/messaging/preferences", Some(&app.user_token("p1")))
        .await;
    assert_eq!(prefs["preferences"]["phone_number"], NUMBER);
    let m = app.stored_message(message_id).await;
    assert_eq!(m.to_number.as_deref(), Some(NUMBER));
    assert!(m.attempt_body.unwrap().contains(AMOUNT));
    let reply = app
        .state
        .store
        .incoming_by_sid("SMreply7731")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (reply.from_number.as_str(), reply.body.as_str()),
        (NUMBER, REPLY)
    );
}

async fn numbers_and_bodies_never_reach_the_database_in_clear(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    let id = patient_with_history(&app).await;
    api_reads_clear(&app, &id).await;
    // The STOP is found again by the number's blind index: nothing more goes to it.
    let again = app.notify_ok(reminder("p1")).await;
    app.dispatch().await;
    assert_eq!(app.message(&again).await["reason"], "opted_out");
    let export: Value = app
        .get_json("/api/messaging/export", Some(&app.user_token("p1")))
        .await;
    assert_eq!(export["otp_sends"][0]["phone_number"], NUMBER, "{export}");

    let bytes = database_bytes(&app.db).await;
    assert!(!bytes.is_empty());
    for needle in [DIGITS, AMOUNT, REPLY, "knee still"] {
        assert!(
            !contains(&bytes, needle),
            "{needle:?} is in the database in clear"
        );
    }
}

async fn rotate_key_reseals_every_row_and_the_old_key_can_go(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    let id = patient_with_history(&app).await;
    let new_key = Key::generate();
    let rotate = |env: Vec<(&'static str, String)>| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_prism-messaging"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &app.db.url)
            .arg("rotate-key")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        async move { cmd.output().await.unwrap() }
    };
    // Without the old key, nothing can be re-sealed: refused, nothing changed.
    let out = rotate(vec![("DATA_ENCRYPTION_KEY", new_key.to_base64())]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DATA_ENCRYPTION_OLD_KEYS"), "{err}");
    let with_old = vec![
        ("DATA_ENCRYPTION_KEY", new_key.to_base64()),
        ("DATA_ENCRYPTION_OLD_KEYS", DATA_KEY.to_string()),
    ];
    let out = rotate(with_old.clone()).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count: u64 = text
        .strip_prefix("re-encrypted ")
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    // Consent, two audit rows (number set, then STOP's consent changes are not numbers), two
    // messages, two replies, an OTP code and its send log, and the index key itself.
    assert!(count >= 8, "{text}");
    assert!(text.contains("messages: 2"), "{text}");
    // Every sealed value is now under the new key.
    let stale = app
        .db
        .text_pairs(&format!(
            "SELECT user_id, phone_number FROM messaging_consent \
             WHERE phone_number NOT LIKE 'enc1:{}:%'",
            new_key.id()
        ))
        .await;
    assert!(stale.is_empty(), "{stale:?}");
    // Again: nothing left (resumable: a second run finishes what an interrupted one left).
    let out = rotate(with_old).await;
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("re-encrypted 0 rows"));

    // The old key can go: a store with the new key alone reads everything and finds numbers.
    let keys = KeySettings {
        current: Some(new_key.clone()),
        ..Default::default()
    };
    let store = prism_messaging::store::connect(&app.db.url, &keys)
        .await
        .unwrap();
    let consent = store.get_consent("p1").await.unwrap().unwrap();
    assert_eq!(consent.phone_number.as_deref(), Some(NUMBER));
    assert_eq!(store.users_with_phone(NUMBER).await.unwrap(), ["p1"]);
    assert!(store
        .is_opted_out(NUMBER, prism_messaging::channel::Channel::Sms)
        .await
        .unwrap());
    let message = store.get_message(&id).await.unwrap().unwrap();
    assert!(message.variables.contains(AMOUNT));
    let trail = store.consent_audit("p1").await.unwrap();
    assert!(trail
        .iter()
        .any(|r| r.field == "phone_number" && r.new_value.as_deref() == Some(NUMBER)));
    // The app still holding the old key cannot read rows sealed under the new one: it says so.
    let r = app
        .client
        .get(app.url(&format!("/api/messages/{id}")))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    // A different BLIND_INDEX_KEY would make every lookup miss: refused at start.
    let keys = KeySettings {
        current: Some(new_key),
        blind_index: Some(Key::generate()),
        ..Default::default()
    };
    let Err(refused) = prism_messaging::store::connect(&app.db.url, &keys).await else {
        panic!("a different BLIND_INDEX_KEY was accepted");
    };
    let refused = anyhow::Error::new(refused);
    assert!(
        prism_messaging::config::ConfigError::is_cause_of(&refused),
        "refused as a setting (exit code 2): {refused:#}"
    );
    assert!(
        format!("{refused:#}").contains("BLIND_INDEX_KEY"),
        "{refused:#}"
    );
}

/// The migrations up to the last one before encryption, applied to a fresh database.
async fn database_before_encryption(db: &TestDatabase) {
    let backend = if db.url.starts_with("sqlite:") {
        "sqlite"
    } else {
        "postgres"
    };
    let dir = tempfile::tempdir().unwrap();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend);
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let version: u32 = name[..4].parse().unwrap();
        if version < 15 {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
        }
    }
    let migrator = sqlx::migrate::Migrator::new(dir.path()).await.unwrap();
    if backend == "sqlite" {
        let options = db
            .url
            .parse::<sqlx::sqlite::SqliteConnectOptions>()
            .unwrap()
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        migrator.run(&pool).await.unwrap();
    } else {
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        migrator.run(&pool).await.unwrap();
    }
}

async fn rows_written_before_encryption_are_sealed_in_place(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    database_before_encryption(&db).await;
    let at = "2027-01-12T04:00:00Z";
    for sql in [
        format!(
            "INSERT INTO messaging_consent (user_id, phone_number, sms_consent, created_at, \
             updated_at) VALUES ('p1', '{NUMBER}', TRUE, '{at}', '{at}')"
        ),
        format!(
            "INSERT INTO consent_audit_trail (user_id, field, old_value, new_value, source, \
             created_at) VALUES ('p1', 'phone_number', NULL, '{NUMBER}', 'api', '{at}')"
        ),
        format!(
            "INSERT INTO messages (id, user_id, template_name, variables, channel, status, \
             to_number, attempts, next_attempt_at, created_at, updated_at, attempt_body) \
             VALUES ('m1', 'p1', 'payment_received', \
             '{{\"amount\":\"{AMOUNT}\",\"date\":\"2027-01-12\"}}', 'sms', 'delivered', \
             '{NUMBER}', 1, '{at}', '{at}', '{at}', 'Receipt of {AMOUNT}')"
        ),
        format!(
            "INSERT INTO incoming_messages (id, provider_sid, channel, from_number, user_id, \
             body, received_at) VALUES ('i1', 'SMold', 'sms', '{NUMBER}', 'p1', '{REPLY}', '{at}')"
        ),
        format!(
            "INSERT INTO opt_outs (phone_number, channel, source, created_at) \
             VALUES ('{NUMBER}', 'sms', 'sms_keyword', '{at}')"
        ),
        format!(
            "INSERT INTO whatsapp_sessions (phone_number, last_inbound_at) VALUES ('{NUMBER}', \
             '{at}')"
        ),
        format!(
            "INSERT INTO otp_send_log (phone_number, user_id, created_at) \
             VALUES ('{NUMBER}', 'p1', '{at}')"
        ),
        format!(
            "INSERT INTO otp_codes (user_id, purpose, phone_number, channel, code_hash, \
             expires_at, created_at) VALUES ('p1', 'login', '{NUMBER}', 'sms', 'h', '{at}', \
             '{at}')"
        ),
    ] {
        db.execute(&sql).await.unwrap();
    }
    // Enough rows that a sealed row no longer fits where its clear version was: the old versions
    // stay on their own pages (a plain VACUUM on PostgreSQL left them there; found by review).
    db.execute(&format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 400) \
         INSERT INTO messages (id, user_id, template_name, variables, channel, status, \
         to_number, attempts, next_attempt_at, created_at, updated_at) \
         SELECT 'bulk-' || i, 'p1', 'payment_received', \
         '{{\"amount\":\"{AMOUNT}\",\"date\":\"2027-01-12\"}}', 'sms', 'delivered', \
         '{NUMBER}', 1, '{at}', '{at}', '{at}' FROM n"
    ))
    .await
    .unwrap();
    assert!(contains(&database_bytes(&db).await, DIGITS));

    let store = prism_messaging::store::connect(&db.url, &test_keys())
        .await
        .unwrap();
    // Read back as they were written...
    let consent = store.get_consent("p1").await.unwrap().unwrap();
    assert_eq!(consent.phone_number.as_deref(), Some(NUMBER));
    let message = store.get_message("m1").await.unwrap().unwrap();
    assert_eq!(message.to_number.as_deref(), Some(NUMBER));
    assert!(message.variables.contains(AMOUNT));
    assert_eq!(
        message.attempt_body.as_deref(),
        Some(format!("Receipt of {AMOUNT}").as_str())
    );
    let reply = store.incoming_by_sid("SMold").await.unwrap().unwrap();
    assert_eq!(
        (reply.from_number.as_str(), reply.body.as_str()),
        (NUMBER, REPLY)
    );
    let code = store.get_otp("p1", "login").await.unwrap().unwrap();
    assert_eq!(code.phone_number, NUMBER);
    assert_eq!(
        store.consent_audit("p1").await.unwrap()[0]
            .new_value
            .as_deref(),
        Some(NUMBER)
    );
    // ... found by number through the indexes...
    use prism_messaging::channel::Channel;
    assert_eq!(store.users_with_phone(NUMBER).await.unwrap(), ["p1"]);
    assert!(store.is_opted_out(NUMBER, Channel::Sms).await.unwrap());
    assert!(store.last_whatsapp_inbound(NUMBER).await.unwrap().is_some());
    assert_eq!(
        store.last_recipient(NUMBER).await.unwrap().as_deref(),
        Some("p1")
    );
    // ... and in clear nowhere: not in the files' free pages or log either (SQLite), nor in
    // the old row versions the updates left in PostgreSQL's table files (found by review: the
    // sealing's updates left them there until an autovacuum, which a small table may never get).
    let bytes = database_bytes(&db).await;
    for needle in [DIGITS, AMOUNT, REPLY] {
        assert!(!contains(&bytes, needle), "{needle:?} left in clear");
    }
    if let Some(files) = postgres_files_bytes(&db).await {
        for needle in [DIGITS, AMOUNT, REPLY] {
            assert!(
                !contains(&files, needle),
                "{needle:?} left in the table files"
            );
        }
    }
    // Opening it again seals nothing more.
    drop(store);
    let report = prism_messaging::store::connect(&db.url, &test_keys())
        .await
        .unwrap()
        .reseal_round(1_000, true)
        .await
        .unwrap();
    assert_eq!(report.total(), 0, "{report:?}");
}

async fn the_audit_trail_takes_a_reseal_but_never_another_number(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.consent("p1", NUMBER).await;
    let rows = app
        .db
        .text_pairs(
            "SELECT CAST(id AS TEXT), new_value FROM consent_audit_trail \
             WHERE field = 'phone_number'",
        )
        .await;
    let (id, sealed) = &rows[0];
    assert!(sealed.starts_with("enc1:"));
    // Another number in clear, or another value under the same key: refused.
    for value in [
        "+14155550000".to_string(),
        test_vault().seal("+14155550000"),
    ] {
        let changed = app
            .db
            .execute(&format!(
                "UPDATE consent_audit_trail SET new_value = '{value}' WHERE id = {id}"
            ))
            .await;
        assert!(changed.is_err(), "{value} went into the trail");
    }
    // A re-seal under another key goes through (what rotate-key does).
    let other = Key::generate();
    let keys = KeySettings {
        current: Some(other.clone()),
        old: vec![Key::parse(DATA_KEY).unwrap()],
        blind_index: None,
    };
    let store = prism_messaging::store::connect(&app.db.url, &keys)
        .await
        .unwrap();
    assert!(store.reseal_round(1_000, false).await.unwrap().total() > 0);
    let resealed = app
        .db
        .text_pairs(&format!(
            "SELECT CAST(id AS TEXT), new_value FROM consent_audit_trail WHERE id = {id}"
        ))
        .await;
    assert!(resealed[0].1.starts_with(&format!("enc1:{}:", other.id())));
}

#[tokio::test]
async fn sqlite_keeps_its_key_in_a_file_and_postgres_needs_one() {
    let dir = tempfile::tempdir().unwrap();
    let run = |url: String| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_prism-messaging"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", url)
            .arg("migrate")
            .current_dir(dir.path())
            .stdin(Stdio::null());
        async move { cmd.output().await.unwrap() }
    };
    let out = run("sqlite://prism-messaging.db".into()).await;
    assert!(out.status.success());
    let logs =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("generated one into the key file"), "{logs}");
    let key_file = dir.path().join("prism-messaging.db.key");
    let text = std::fs::read_to_string(&key_file).unwrap();
    assert!(
        !logs.contains(text.trim()),
        "the key itself is never logged"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // The next start reads it, and says nothing about generating.
    let out = run("sqlite://prism-messaging.db".into()).await;
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("generated"));
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), text);
    // The key file gone, the sealed database is not opened with a fresh key. That, a key file
    // that is not a key, and a key the data was not sealed with, are the setting wrong: one
    // line naming DATA_ENCRYPTION_KEY, exit code 2, the key never echoed.
    std::fs::remove_file(&key_file).unwrap();
    let refused = |out: std::process::Output, why: &str| {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{why}: {err}");
        assert_eq!(err.lines().count(), 1, "{why}: {err}");
        assert!(
            err.starts_with("configuration error: DATA_ENCRYPTION_KEY: "),
            "{why}: {err}"
        );
        err
    };
    refused(
        run("sqlite://prism-messaging.db".into()).await,
        "no key file",
    );
    assert!(!key_file.exists());
    std::fs::write(&key_file, "not a key\n").unwrap();
    let err = refused(
        run("sqlite://prism-messaging.db".into()).await,
        "bad key file",
    );
    assert!(!err.contains("not a key"), "{err}");
    std::fs::remove_file(&key_file).unwrap();
    let mut wrong_key = tokio::process::Command::new(env!("CARGO_BIN_EXE_prism-messaging"));
    let other = Key::generate().to_base64();
    let out = wrong_key
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", "sqlite://prism-messaging.db")
        .env("DATA_ENCRYPTION_KEY", &other)
        .arg("migrate")
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    let err = refused(out, "another key");
    assert!(!err.contains(&other), "{err}");

    if let Some(admin) = postgres_admin_url() {
        let out = run(admin).await;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("DATA_ENCRYPTION_KEY: required"), "{err}");
    }
}
