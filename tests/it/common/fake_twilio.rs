//! A fake Twilio REST API on a loopback port: it checks Basic auth, records every request with
//! its form fields, keeps the messages it created (listable as Twilio lists them), and answers in
//! Twilio's JSON shapes (the Message resource, or the error `{code, message, more_info, status}`).
//! Tests script faults per recipient number: HTTP errors, slow answers, dropped connections, and
//! messages accepted but never answered.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde_json::json;

use super::{ACCOUNT_SID, AUTH_TOKEN};

#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    /// Form fields in the order sent.
    pub form: Vec<(String, String)>,
    pub received_at: Instant,
}

impl RecordedRequest {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn field_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.form.iter().map(|(k, _)| k.as_str()).collect();
        names.sort();
        names
    }
}

/// A scripted answer: HTTP status and Twilio error code.
#[derive(Debug, Clone, Copy)]
pub struct Failure {
    pub http_status: u16,
    pub code: i64,
    pub retry_after: Option<u64>,
}

/// A scripted fault for one send.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Answer with this error; nothing is created.
    Http(Failure),
    /// Create the message, then answer only after this long (past the client's timeout).
    Slow(Duration),
    /// Drop the connection without answering; nothing is created.
    Drop,
    /// Create the message and never answer.
    AcceptNoAnswer,
    /// Create the message, then answer with this error anyway (Twilio's own 5xx after it took
    /// the message).
    AcceptThenFail(Failure),
}

/// A message the fake created, as its list endpoint shows it.
#[derive(Debug, Clone)]
pub struct Created {
    pub sid: String,
    pub to: String,
    pub from: Option<String>,
    pub body: String,
    pub date_created: chrono::DateTime<chrono::Utc>,
    pub received_at: Instant,
    /// `outbound-api` for what the API created; `outbound-reply` for a TwiML answer.
    pub direction: String,
    pub messaging_service_sid: Option<String>,
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<RecordedRequest>>,
    /// `To` (as sent, e.g. `whatsapp:+1...`) -> faults to apply, consumed in order.
    faults: Mutex<HashMap<String, Vec<Fault>>>,
    created: Mutex<Vec<Created>>,
    /// The next this-many `ListMessage` calls answer 500.
    failing_lookups: Mutex<usize>,
    /// The next this-many `ListMessage` calls never answer.
    hanging_lookups: Mutex<usize>,
    /// The next this-many `ListMessage` calls answer 401 (a rotated Auth Token).
    refused_lookups: Mutex<usize>,
    /// How far this Twilio's clock is behind the real one (its `date_created`).
    clock_behind: Mutex<chrono::Duration>,
    /// The account's status when not `active` (`suspended`, `closed`).
    account_status: Mutex<Option<String>>,
    /// SIDs for the next messages created, in order (then random ones), so a test can post a
    /// status callback for a message before its send has recorded the SID.
    next_sids: Mutex<Vec<String>>,
}

/// Dropping a connection is done by panicking in the handler (the connection's task dies with
/// it); this marker keeps those intended panics out of the test output.
const DROP_MARKER: &str = "fake twilio: dropping the connection";

fn quiet_intended_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let intended = info
                .payload()
                .downcast_ref::<&str>()
                .is_some_and(|m| *m == DROP_MARKER);
            if !intended {
                previous(info);
            }
        }));
    });
}

#[derive(Clone)]
pub struct FakeTwilio {
    pub base_url: String,
    shared: Arc<Shared>,
}

impl FakeTwilio {
    pub async fn start() -> FakeTwilio {
        quiet_intended_panics();
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route(
                "/2010-04-01/Accounts/{account}/Messages.json",
                post(create_message).get(list_messages),
            )
            .route("/2010-04-01/Accounts/{account_json}", get(fetch_account))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeTwilio {
            base_url: format!("http://{addr}"),
            shared,
        }
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The 6-digit code in the newest message body sent to `to`.
    pub fn last_code_for(&self, to: &str) -> Option<String> {
        let requests = self.shared.requests.lock().unwrap();
        let body = requests
            .iter()
            .rev()
            .find(|r| r.field("To") == Some(to))?
            .field("Body")?
            .to_string();
        body.split(|c: char| !c.is_ascii_digit())
            .find(|w| w.len() == 6)
            .map(String::from)
    }

    /// Answer the next sends to `to` with these failures, in order; later sends succeed.
    pub fn fail(&self, to: &str, failures: Vec<Failure>) {
        self.script(to, failures.into_iter().map(Fault::Http).collect());
    }

    /// Apply these faults to the next sends to `to`, in order; later sends succeed.
    pub fn script(&self, to: &str, faults: Vec<Fault>) {
        self.shared
            .faults
            .lock()
            .unwrap()
            .insert(to.to_string(), faults);
    }

    /// Answer the next `n` message-list lookups with a 500.
    pub fn fail_lookups(&self, n: usize) {
        *self.shared.failing_lookups.lock().unwrap() = n;
    }

    /// Answer the account's fetch with this status (`suspended`, `closed`).
    pub fn set_account_status(&self, status: &str) {
        *self.shared.account_status.lock().unwrap() = Some(status.to_string());
    }

    /// Date what is created this far behind the real clock, as a Twilio whose clock is behind.
    pub fn clock_behind(&self, by: chrono::Duration) {
        *self.shared.clock_behind.lock().unwrap() = by;
    }

    /// The next `n` message-list lookups answer 401, as after the Auth Token was rotated.
    pub fn refuse_lookups(&self, n: usize) {
        *self.shared.refused_lookups.lock().unwrap() = n;
    }

    /// The next `n` message-list lookups never answer.
    pub fn hang_lookups(&self, n: usize) {
        *self.shared.hanging_lookups.lock().unwrap() = n;
    }

    /// A message Twilio lists that our API calls did not create (a TwiML reply is
    /// `outbound-reply`); its SID.
    pub fn add_listed(&self, to: &str, from: &str, body: &str, direction: &str) -> String {
        let sid = format!("SM{}", uuid::Uuid::new_v4().simple());
        self.shared.created.lock().unwrap().push(Created {
            sid: sid.clone(),
            to: to.to_string(),
            from: Some(from.to_string()),
            body: body.to_string(),
            date_created: chrono::Utc::now(),
            received_at: Instant::now(),
            direction: direction.to_string(),
            messaging_service_sid: None,
        });
        sid
    }

    /// Give the next message created this SID.
    pub fn next_sid(&self, sid: &str) {
        self.shared.next_sids.lock().unwrap().push(sid.to_string());
    }

    /// The messages created so far, in creation order.
    pub fn created(&self) -> Vec<Created> {
        self.shared.created.lock().unwrap().clone()
    }

    pub fn created_count(&self) -> usize {
        self.shared.created.lock().unwrap().len()
    }

    /// `CreateMessage` calls received (answered or not).
    pub fn create_calls_to(&self, to: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == "POST" && r.field("To") == Some(to))
            .count()
    }
}

fn expected_authorization() -> String {
    let raw = format!("{ACCOUNT_SID}:{AUTH_TOKEN}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

fn twilio_error(status: u16, code: i64, message: &str) -> Response {
    let body = json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status,
    });
    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

fn record(
    shared: &Shared,
    method: &str,
    path: String,
    headers: &HeaderMap,
    body: &[u8],
) -> RecordedRequest {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(body).unwrap_or_default();
    let request = RecordedRequest {
        method: method.into(),
        path,
        authorization: header("authorization"),
        content_type: header("content-type"),
        form,
        received_at: Instant::now(),
    };
    shared.requests.lock().unwrap().push(request.clone());
    request
}

async fn create_message(
    State(shared): State<Arc<Shared>>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/2010-04-01/Accounts/{account}/Messages.json");
    let request = record(&shared, "POST", path, &headers, &body);
    if request.authorization.as_deref() != Some(expected_authorization().as_str())
        || account != ACCOUNT_SID
    {
        return twilio_error(401, 20003, "Authenticate");
    }
    let to = request.field("To").unwrap_or_default().to_string();
    if to.is_empty() {
        return twilio_error(400, 21604, "A 'To' phone number is required.");
    }
    let scripted = {
        let mut faults = shared.faults.lock().unwrap();
        faults
            .get_mut(&to)
            .and_then(|list| (!list.is_empty()).then(|| list.remove(0)))
    };
    match scripted {
        Some(Fault::Http(f)) => {
            // Twilio's own wording for an invalid number quotes it in full.
            let text = if f.code == 21211 {
                format!("The 'To' number {to} is not a valid phone number.")
            } else {
                "scripted failure".to_string()
            };
            let mut response = twilio_error(f.http_status, f.code, &text);
            if let Some(secs) = f.retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", secs.to_string().parse().unwrap());
            }
            return response;
        }
        Some(Fault::Drop) => std::panic::panic_any(DROP_MARKER),
        Some(Fault::Slow(delay)) => {
            let response = create(&shared, &request, &to);
            tokio::time::sleep(delay).await;
            return response;
        }
        Some(Fault::AcceptThenFail(f)) => {
            create(&shared, &request, &to);
            return twilio_error(f.http_status, f.code, "scripted failure after creating");
        }
        Some(Fault::AcceptNoAnswer) => {
            create(&shared, &request, &to);
            std::future::pending::<()>().await;
            unreachable!()
        }
        None => {}
    }
    create(&shared, &request, &to)
}

/// Create the message and answer 201 with its resource.
fn create(shared: &Shared, request: &RecordedRequest, to: &str) -> Response {
    let preset = {
        let mut next = shared.next_sids.lock().unwrap();
        (!next.is_empty()).then(|| next.remove(0))
    };
    let sid = preset.unwrap_or_else(|| format!("SM{}", uuid::Uuid::new_v4().simple()));
    let created = Created {
        sid: sid.clone(),
        to: to.to_string(),
        from: request.field("From").map(String::from),
        body: request.field("Body").unwrap_or_default().to_string(),
        date_created: chrono::Utc::now() - *shared.clock_behind.lock().unwrap(),
        received_at: request.received_at,
        direction: "outbound-api".into(),
        messaging_service_sid: request.field("MessagingServiceSid").map(String::from),
    };
    let body = resource(&created);
    shared.created.lock().unwrap().push(created);
    (StatusCode::CREATED, Json(body)).into_response()
}

fn resource(m: &Created) -> serde_json::Value {
    let date = m.date_created.to_rfc2822();
    json!({
        "account_sid": ACCOUNT_SID,
        "api_version": "2010-04-01",
        "body": m.body,
        "date_created": date,
        "date_sent": date,
        "date_updated": date,
        "direction": m.direction,
        "error_code": null,
        "error_message": null,
        "from": m.from,
        "messaging_service_sid": m.messaging_service_sid,
        "num_media": "0",
        "num_segments": "1",
        "price": null,
        "price_unit": "USD",
        "sid": m.sid,
        "status": "queued",
        "subresource_uris": {"media": format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{}/Media.json", m.sid)},
        "to": m.to,
        "uri": format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{}.json", m.sid),
    })
}

/// `ListMessage`: filtered by `To` and `DateSent>` (a date), newest first, as Twilio lists.
async fn list_messages(
    State(shared): State<Arc<Shared>>,
    Path(account): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/2010-04-01/Accounts/{account}/Messages.json");
    let request = record(&shared, "GET", path, &headers, b"");
    if request.authorization.as_deref() != Some(expected_authorization().as_str())
        || account != ACCOUNT_SID
    {
        return twilio_error(401, 20003, "Authenticate");
    }
    {
        let mut refused = shared.refused_lookups.lock().unwrap();
        if *refused > 0 {
            *refused -= 1;
            return twilio_error(401, 20003, "Authenticate");
        }
    }
    {
        let mut failing = shared.failing_lookups.lock().unwrap();
        if *failing > 0 {
            *failing -= 1;
            return twilio_error(500, 20500, "Internal Server Error");
        }
    }
    let hang = {
        let mut hanging = shared.hanging_lookups.lock().unwrap();
        let hang = *hanging > 0;
        if hang {
            *hanging -= 1;
        }
        hang
    };
    if hang {
        std::future::pending::<()>().await;
    }
    let after = query
        .get("DateSent>")
        .and_then(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok());
    let page_size: usize = query
        .get("PageSize")
        .and_then(|p| p.parse().ok())
        .unwrap_or(50);
    let page: usize = query.get("Page").and_then(|p| p.parse().ok()).unwrap_or(0);
    let created = shared.created.lock().unwrap();
    let matching: Vec<&Created> = created
        .iter()
        .rev()
        .filter(|m| query.get("To").is_none_or(|to| *to == m.to))
        .filter(|m| after.is_none_or(|d| m.date_created.date_naive() >= d))
        .collect();
    let messages: Vec<serde_json::Value> = matching
        .iter()
        .skip(page * page_size)
        .take(page_size)
        .map(|m| resource(m))
        .collect();
    let next_page_uri = (matching.len() > (page + 1) * page_size).then(|| {
        let mut next: Vec<(String, String)> = query
            .iter()
            .filter(|(k, _)| *k != "Page")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        next.push(("Page".into(), (page + 1).to_string()));
        format!(
            "/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json?{}",
            serde_urlencoded::to_string(&next).unwrap()
        )
    });
    Json(json!({
        "messages": messages,
        "page": page,
        "page_size": page_size,
        "next_page_uri": next_page_uri,
    }))
    .into_response()
}

async fn fetch_account(
    State(shared): State<Arc<Shared>>,
    Path(account_json): Path<String>,
    headers: HeaderMap,
) -> Response {
    let request = record(
        &shared,
        "GET",
        format!("/2010-04-01/Accounts/{account_json}"),
        &headers,
        b"",
    );
    if request.authorization.as_deref() != Some(expected_authorization().as_str())
        || account_json != format!("{ACCOUNT_SID}.json")
    {
        return twilio_error(401, 20003, "Authenticate");
    }
    Json(json!({
        "sid": ACCOUNT_SID,
        "friendly_name": "Test clinic",
        "status": shared.account_status.lock().unwrap().clone().unwrap_or_else(|| "active".into()),
        "type": "Full",
    }))
    .into_response()
}
