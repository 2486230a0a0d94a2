//! The test harness: the real application on a loopback port 0, a fresh database per test
//! (a SQLite file in a temp dir, or a new PostgreSQL database), and a fake Twilio over HTTP.
//!
//! PostgreSQL tests read `TEST_DATABASE_URL` (e.g. postgres://postgres@127.0.0.1:5432/test). When
//! it is unset they are skipped with a note, so `cargo test` works on a machine without
//! PostgreSQL; CI sets it, and then an unreachable server fails the tests.
#![allow(dead_code)]

pub mod fake_twilio;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prism_messaging::clock::{DynClock, SystemClock};
use prism_messaging::config::{Config, Secret};
use prism_messaging::http::AppState;
use prism_messaging::outbox::dispatcher::RoundReport;
use prism_messaging::server::Application;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use fake_twilio::FakeTwilio;

pub const API_KEY: &str = "test-host-app-key-0123456789";
pub const JWT_SECRET: &str = "test-jwt-secret-for-hs256-tokens";
pub const CRON_SECRET: &str = "test-cron-secret-0123456789abcdef";
pub const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
pub const AUTH_TOKEN: &str = "test-twilio-auth-token";
pub const SMS_SENDER: &str = "+14155550100";
pub const WHATSAPP_SENDER: &str = "+14155238886";
pub const APP_URL: &str = "https://app.example.com";
pub const PUBLIC_URL: &str = "https://messaging.example.com";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Run a test body once per backend: `both_backends!(name);` for `async fn name(backend: Backend)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::common::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if $crate::common::postgres_admin_url().is_some() {
                    super::$name($crate::common::Backend::Postgres).await
                } else {
                    eprintln!("TEST_DATABASE_URL is not set: skipping the PostgreSQL run");
                }
            }
        }
    )*};
}

/// A loopback port that refuses connections for as long as the returned socket lives: bound but
/// never listening, so no server of a test running beside can take it. (A port bound and let go
/// could be, and was: a fake Twilio of the other backend's run answered on it.)
pub fn refusing_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

pub fn postgres_admin_url() -> Option<String> {
    std::env::var("TEST_DATABASE_URL")
        .ok()
        .filter(|v| !v.is_empty())
}

/// A fresh, empty database; dropped (PostgreSQL) or deleted (SQLite) with the value.
pub struct TestDatabase {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<(String, String)>,
}

impl TestDatabase {
    pub async fn new(backend: Backend) -> TestDatabase {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("test.db").display());
                TestDatabase {
                    url,
                    _dir: Some(dir),
                    pg_name: None,
                }
            }
            Backend::Postgres => {
                let admin = postgres_admin_url().expect("TEST_DATABASE_URL");
                let name = format!("prism_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
                    .await
                    .unwrap_or_else(|e| {
                        panic!("PostgreSQL at TEST_DATABASE_URL is unreachable: {e}")
                    });
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                let (base, _) = admin
                    .rsplit_once('/')
                    .expect("TEST_DATABASE_URL has a database name");
                TestDatabase {
                    url: format!("{base}/{name}"),
                    _dir: None,
                    pg_name: Some((admin, name)),
                }
            }
        }
    }
}

impl TestDatabase {
    /// Run raw SQL here, outside the `Store`, as an operator (or an attacker) with database
    /// access would.
    pub async fn execute(&self, sql: &str) -> Result<u64, sqlx::Error> {
        if self.pg_name.is_some() {
            let pool = sqlx::PgPool::connect(&self.url).await?;
            Ok(sqlx::query(sql).execute(&pool).await?.rows_affected())
        } else {
            let pool = sqlx::SqlitePool::connect(&self.url).await?;
            Ok(sqlx::query(sql).execute(&pool).await?.rows_affected())
        }
    }

    /// Drop a PostgreSQL database now, its sessions ended (`WITH (FORCE)`), under whatever
    /// still uses it, as an operator's mistake would.
    pub async fn drop_postgres_database(&self) {
        let (admin, name) = self.pg_name.as_ref().expect("a PostgreSQL test database");
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(admin)
            .await
            .unwrap();
        sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .unwrap();
    }

    /// Make every insert into `table` fail, as a full disk or a lost connection would fail
    /// that one write (a fault injected with a trigger), until `heal_inserts_into`.
    pub async fn fail_inserts_into(&self, table: &str) {
        let statements = if self.pg_name.is_some() {
            vec![
                "CREATE OR REPLACE FUNCTION injected_fault() RETURNS trigger LANGUAGE plpgsql \
                 AS $$ BEGIN RAISE EXCEPTION 'injected fault'; END $$"
                    .to_string(),
                format!(
                    "CREATE TRIGGER injected_fault BEFORE INSERT ON {table} \
                     FOR EACH ROW EXECUTE FUNCTION injected_fault()"
                ),
            ]
        } else {
            vec![format!(
                "CREATE TRIGGER injected_fault BEFORE INSERT ON {table} \
                 BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
            )]
        };
        for sql in statements {
            self.execute(&sql).await.expect("inject the fault");
        }
    }

    /// Undo `fail_inserts_into(table)`.
    pub async fn heal_inserts_into(&self, table: &str) {
        let sql = if self.pg_name.is_some() {
            format!("DROP TRIGGER injected_fault ON {table}")
        } else {
            "DROP TRIGGER injected_fault".to_string()
        };
        self.execute(&sql).await.expect("remove the fault");
    }

    /// The rows of a query selecting two text columns.
    pub async fn text_pairs(&self, sql: &str) -> Vec<(String, String)> {
        if self.pg_name.is_some() {
            let pool = sqlx::PgPool::connect(&self.url).await.unwrap();
            sqlx::query_as(sql).fetch_all(&pool).await.unwrap()
        } else {
            let pool = sqlx::SqlitePool::connect(&self.url).await.unwrap();
            sqlx::query_as(sql).fetch_all(&pool).await.unwrap()
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.pg_name.take() {
            // Drop runs outside async; use a short-lived runtime on its own thread.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
                        .await
                        .ok()?;
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await
                        .ok()
                })
            })
            .join();
        }
    }
}

/// Settings for one test app: the base configuration plus overrides.
pub struct TestConfig {
    pub vars: HashMap<String, String>,
    pub clock: DynClock,
    /// Run the background dispatcher and scheduler (as `serve` does) instead of leaving rounds
    /// to the test.
    pub background: bool,
}

/// The six-digit code in a message body.
pub fn code_in(body: &str) -> String {
    body.split(|c: char| !c.is_ascii_digit())
        .find(|w| w.len() == 6)
        .expect("a six-digit code")
        .to_string()
}

/// A PostgreSQL database's own files, as bytes, after a checkpoint has written what it holds
/// to them: every relation's pages, dead row versions and free space included (what a copy of
/// the server's disk would hold). `None` for SQLite.
pub async fn postgres_files_bytes(db: &TestDatabase) -> Option<Vec<u8>> {
    if db.url.starts_with("sqlite:") {
        return None;
    }
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query("CHECKPOINT").execute(&pool).await.unwrap();
    let data_directory: String = sqlx::query_scalar("SHOW data_directory")
        .fetch_one(&pool)
        .await
        .unwrap();
    let oid: String =
        sqlx::query_scalar("SELECT oid::text FROM pg_database WHERE datname = current_database()")
            .fetch_one(&pool)
            .await
            .unwrap();
    let mut bytes = Vec::new();
    let dir = std::path::Path::new(&data_directory).join("base").join(oid);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            bytes.extend(std::fs::read(&path).unwrap());
        }
    }
    assert!(
        bytes.len() > 100_000,
        "{} holds the database",
        dir.display()
    );
    Some(bytes)
}

/// Everything the database holds, as bytes: SQLite's files (database and write-ahead log, as
/// they are on disk), or every row of every PostgreSQL table as text (what a dump of the tables
/// would hold).
pub async fn database_bytes(db: &TestDatabase) -> Vec<u8> {
    if let Some(path) = db.url.strip_prefix("sqlite://") {
        let mut bytes = Vec::new();
        for file in [path.to_string(), format!("{path}-wal")] {
            if let Ok(b) = std::fs::read(&file) {
                bytes.extend(b);
            }
        }
        return bytes;
    }
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(tables.len() > 10, "{tables:?}");
    let mut bytes = Vec::new();
    for table in tables {
        let rows: Vec<String> = sqlx::query_scalar(&format!("SELECT t::text FROM {table} t"))
            .fetch_all(&pool)
            .await
            .unwrap();
        for row in rows {
            bytes.extend(row.into_bytes());
            bytes.push(b'\n');
        }
    }
    bytes
}

pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// The data encryption key every test app and test store shares (so a test may open the store an
/// app writes, on either backend).
pub const DATA_KEY: &str = "dGVzdC1rZXktdGVzdC1rZXktdGVzdC1rZXktMDEyMzQ=";

/// The keys of [`DATA_KEY`], for tests that open a store themselves.
pub fn test_keys() -> prism_messaging::store::KeySettings {
    prism_messaging::store::KeySettings {
        current: Some(prism_messaging::vault::Key::parse(DATA_KEY).unwrap()),
        ..Default::default()
    }
}

/// A vault with [`DATA_KEY`]: opens what test apps seal and computes their blind indexes.
pub fn test_vault() -> prism_messaging::vault::Vault {
    let keys = test_keys();
    prism_messaging::vault::Vault::new(keys.current.clone().unwrap(), &keys, None).unwrap()
}

impl TestConfig {
    pub fn new() -> Self {
        let vars = [
            ("BIND_ADDR", "127.0.0.1:0"),
            ("MESSAGING_API_KEY", API_KEY),
            ("AUTH_JWT_SECRET", JWT_SECRET),
            ("CRON_SECRET", CRON_SECRET),
            ("APP_URL", APP_URL),
            ("PUBLIC_URL", PUBLIC_URL),
            ("QUIET_HOURS", "off"),
            ("DATA_ENCRYPTION_KEY", DATA_KEY),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        TestConfig {
            vars,
            clock: Arc::new(SystemClock),
            background: false,
        }
    }

    pub fn set(mut self, name: &str, value: &str) -> Self {
        self.vars.insert(name.to_string(), value.to_string());
        self
    }

    /// Run on a clock the test moves.
    pub fn with_clock(mut self, clock: &prism_messaging::clock::ManualClock) -> Self {
        self.clock = Arc::new(clock.clone());
        self
    }

    /// Run on any clock (one that moves by itself, say).
    pub fn with_any_clock(mut self, clock: DynClock) -> Self {
        self.clock = clock;
        self
    }

    pub fn unset(mut self, name: &str) -> Self {
        self.vars.remove(name);
        self
    }

    /// Live mode against `fake`.
    pub fn live(self, fake: &FakeTwilio) -> Self {
        self.set("MESSAGING_MOCK_MODE", "false")
            .set("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
            .set("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
            .set("TWILIO_PHONE_NUMBER", SMS_SENDER)
            .set("TWILIO_WHATSAPP_NUMBER", WHATSAPP_SENDER)
            .set("TWILIO_API_BASE", &fake.base_url)
    }
}

pub struct TestApp {
    pub base_url: String,
    pub client: reqwest::Client,
    pub state: AppState,
    pub fake: Option<FakeTwilio>,
    shutdown: CancellationToken,
    pub db: TestDatabase,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestApp {
    /// The app in mock mode.
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, TestConfig::new()).await
    }

    /// The app in live mode against a fresh fake Twilio.
    pub async fn spawn_live(backend: Backend, config: TestConfig) -> TestApp {
        let fake = FakeTwilio::start().await;
        let config = config.live(&fake);
        let mut app = Self::spawn_with(backend, config).await;
        app.fake = Some(fake);
        app
    }

    pub async fn spawn_with(backend: Backend, config: TestConfig) -> TestApp {
        let db = TestDatabase::new(backend).await;
        let mut vars = config.vars;
        vars.insert("DATABASE_URL".into(), db.url.clone());
        let cfg = Config::from_lookup(|name| vars.get(name).cloned())
            .expect("test configuration is valid");
        let state = AppState::build(cfg, config.clock)
            .await
            .expect("app state builds");
        let mut app = Application::bind(state.clone(), "127.0.0.1:0".parse().unwrap())
            .await
            .expect("bind");
        if !config.background {
            app = app.without_dispatcher();
        }
        let addr = app.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(app.run(shutdown.clone()));
        TestApp {
            base_url: format!("http://{addr}"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            state,
            fake: None,
            shutdown,
            db,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Begin the shutdown `serve` begins on SIGTERM.
    pub fn shut_down(&self) {
        self.shutdown.cancel();
    }

    pub fn user_token(&self, user_id: &str) -> String {
        prism_messaging::auth::mint_hs256(
            &Secret::new(JWT_SECRET),
            user_id,
            Duration::from_secs(600),
            &[],
        )
        .unwrap()
    }

    /// GET a JSON answer, with a bearer token when given.
    pub async fn get_json(&self, path: &str, bearer: Option<&str>) -> Value {
        let mut request = self.client.get(self.url(path));
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap().json().await.unwrap()
    }

    /// The mock provider's dev outbox, as `/dev/outbox.json` serves it.
    pub async fn outbox_json(&self) -> Value {
        self.get_json("/dev/outbox.json", None).await
    }

    /// One dispatcher round, as the background loop would run it.
    pub async fn dispatch(&self) -> RoundReport {
        self.state
            .dispatcher
            .run_once()
            .await
            .expect("dispatch round")
    }

    pub async fn put_preferences(&self, user_id: &str, body: Value) -> reqwest::Response {
        self.client
            .put(self.url("/api/messaging/preferences"))
            .bearer_auth(self.user_token(user_id))
            .header("user-agent", "prism-tests/1.0")
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// POST a form to a Twilio webhook path, signed as Twilio signs it (with `AUTH_TOKEN` and
    /// `PUBLIC_URL`); `signature` overrides the computed one.
    pub async fn twilio_webhook(
        &self,
        path: &str,
        params: &[(&str, &str)],
        signature: Option<&str>,
    ) -> reqwest::Response {
        let owned: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let computed = prism_messaging::provider::signature::compute(
            AUTH_TOKEN,
            &format!("{PUBLIC_URL}{path}"),
            &owned,
        );
        let mut request = self.client.post(self.url(path)).form(&owned);
        match signature {
            Some("") => {}
            Some(s) => request = request.header("x-twilio-signature", s),
            None => request = request.header("x-twilio-signature", computed),
        }
        request.send().await.unwrap()
    }

    /// A signed incoming message from `from` (`+E164` or `whatsapp:+E164`).
    pub async fn incoming(&self, sid: &str, from: &str, body: &str) -> reqwest::Response {
        self.twilio_webhook(
            "/webhooks/twilio/incoming",
            &[
                ("MessageSid", sid),
                ("From", from),
                ("To", SMS_SENDER),
                ("Body", body),
                ("AccountSid", ACCOUNT_SID),
            ],
            None,
        )
        .await
    }

    /// PUT preferences with a given bearer token; the status code.
    pub async fn put_preferences_with(&self, token: &str, body: Value) -> u16 {
        let r = self
            .client
            .put(self.url("/api/messaging/preferences"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    }

    /// Give `user_id` a phone number and SMS + WhatsApp consent (not marketing).
    pub async fn consent(&self, user_id: &str, phone: &str) {
        let r = self
            .put_preferences(
                user_id,
                serde_json::json!({"phone_number": phone, "sms_consent": true, "whatsapp_consent": true, "marketing_consent": false}),
            )
            .await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    pub async fn notify(&self, body: Value) -> reqwest::Response {
        self.client
            .post(self.url("/api/notifications"))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Queue a notification that must be accepted; returns its id.
    pub async fn notify_ok(&self, body: Value) -> String {
        let r = self.notify(body).await;
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
        let v: Value = r.json().await.unwrap();
        v["message"]["id"].as_str().unwrap().to_string()
    }

    /// The message as stored (all its fields, opened), which must exist.
    pub async fn stored_message(&self, id: &str) -> prism_messaging::store::MessageRecord {
        self.state
            .store
            .get_message(id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no message {id}"))
    }

    pub async fn message(&self, id: &str) -> Value {
        let r = self
            .client
            .get(self.url(&format!("/api/messages/{id}")))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["message"].clone()
    }
}

/// The statuses of a message's events, oldest first.
pub async fn event_statuses(store: &prism_messaging::store::DynStore, id: &str) -> Vec<String> {
    store
        .message_events(id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.status.to_string())
        .collect()
}

/// The `error.code` of an error answer.
pub async fn error_code(response: reqwest::Response) -> String {
    let body: Value = response.json().await.unwrap();
    body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A reminder notification body for `user_id`.
pub fn reminder(user_id: &str) -> Value {
    serde_json::json!({
        "user_id": user_id,
        "template": "appointment_reminder_24h",
        "variables": {"starts_at": "2027-01-12T10:30:00Z", "link": "/appointments/a1"},
    })
}

/// [`reminder`]'s body, rendered on a day that is neither 11 nor 12 Jan 2027 (UTC).
pub const REMINDER_BODY: &str = "PhysiologicPRISM: reminder of your appointment on Tuesday 12 Jan 2027 at 10:30. Details: https://app.example.com/appointments/a1 Reply STOP to opt out.";
