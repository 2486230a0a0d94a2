//! A fake Twilio REST API on a loopback port: it checks Basic auth, records every request with
//! its form fields, and answers in Twilio's JSON shapes (the Message resource, or the error
//! `{code, message, more_info, status}`). Tests script failures per recipient number.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
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

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<RecordedRequest>>,
    /// `To` (as sent, e.g. `whatsapp:+1...`) -> failures to answer, consumed in order.
    failures: Mutex<HashMap<String, Vec<Failure>>>,
}

#[derive(Clone)]
pub struct FakeTwilio {
    pub base_url: String,
    shared: Arc<Shared>,
}

impl FakeTwilio {
    pub async fn start() -> FakeTwilio {
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route(
                "/2010-04-01/Accounts/{account}/Messages.json",
                post(create_message),
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
        self.shared
            .failures
            .lock()
            .unwrap()
            .insert(to.to_string(), failures);
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
        let mut failures = shared.failures.lock().unwrap();
        failures
            .get_mut(&to)
            .and_then(|list| (!list.is_empty()).then(|| list.remove(0)))
    };
    if let Some(f) = scripted {
        let mut response = twilio_error(f.http_status, f.code, "scripted failure");
        if let Some(secs) = f.retry_after {
            response
                .headers_mut()
                .insert("retry-after", secs.to_string().parse().unwrap());
        }
        return response;
    }
    let sid = format!("SM{}", uuid::Uuid::new_v4().simple());
    let now = chrono::Utc::now().to_rfc2822();
    let body = json!({
        "account_sid": ACCOUNT_SID,
        "api_version": "2010-04-01",
        "body": request.field("Body").unwrap_or_default(),
        "date_created": now,
        "date_sent": null,
        "date_updated": now,
        "direction": "outbound-api",
        "error_code": null,
        "error_message": null,
        "from": request.field("From"),
        "messaging_service_sid": request.field("MessagingServiceSid"),
        "num_media": "0",
        "num_segments": "1",
        "price": null,
        "price_unit": "USD",
        "sid": sid,
        "status": "queued",
        "subresource_uris": {"media": format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}/Media.json")},
        "to": to,
        "uri": format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}.json"),
    });
    (StatusCode::CREATED, Json(body)).into_response()
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
        "status": "active",
        "type": "Full",
    }))
    .into_response()
}
