//! The patient's settings page (`/settings/messaging`) and the host app's call that opens it
//! (`POST /api/settings-links`). Server-rendered, auto-escaped (minijinja), usable without
//! JavaScript. The session lives in an `HttpOnly`, `SameSite=Lax` cookie scoped to `/settings`;
//! every form post carries a CSRF token tied to the session.

use axum::extract::{Query, State};
use axum::http::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use minijinja::{context, Environment};
use serde::Deserialize;
use serde_json::{json, Value};

use super::api_schema::{
    ApiKeyNotConfigured, ErrorEnvelope, PayloadTooLarge, SettingsLinkAnswer, Unauthorized,
};
use super::{ClientMeta, HostApp, JsonBody};
use crate::error::{AppError, AppResult};
use crate::http::AppState;
use crate::settings::SettingsForm;
use crate::store::SettingsSession;

const COOKIE_NAME: &str = "prism_settings";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/settings-links", post(create_link))
        .route("/settings/messaging", get(page).post(save))
        .route("/settings/sign-out", post(sign_out))
        .route("/settings/settings.css", get(stylesheet))
}

/// The body of `POST /api/settings-links`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsLinkRequest {
    pub user_id: String,
    /// Where the page's "Back to the app" link goes; must be under `APP_URL`.
    pub return_url: Option<String>,
}

#[utoipa::path(
    post,
    path = "/api/settings-links",
    tag = "host-app",
    operation_id = "createSettingsLink",
    summary = "A one-time link that signs the patient in to the settings page",
    description = "The URL opens `/settings/messaging` for this user once, within `expires_in` \
        seconds; opening it sets a session cookie and redirects to the page without the code.",
    request_body = SettingsLinkRequest,
    security(("hostAppKey" = [])),
    responses(
        (status = 200, description = "The link.", body = SettingsLinkAnswer),
        (
            status = 400,
            description = "Error envelope; `error.code` is one of: `invalid_user_id`, \
                `invalid_return_url`, `invalid_json`, `invalid_content_type`.",
            body = ErrorEnvelope,
        ),
        (status = 401, response = Unauthorized),
        (status = 413, response = PayloadTooLarge),
        (status = 503, response = ApiKeyNotConfigured),
    )
)]
async fn create_link(
    State(state): State<AppState>,
    _: HostApp,
    JsonBody(request): JsonBody<SettingsLinkRequest>,
) -> AppResult<Json<Value>> {
    let link = state
        .settings_pages
        .create_link(&request.user_id, request.return_url.as_deref())
        .await?;
    Ok(Json(
        json!({"success": true, "url": link.url, "expires_in": link.expires_in}),
    ))
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    handoff: Option<String>,
    saved: Option<String>,
}

#[utoipa::path(
    get,
    path = "/settings/messaging",
    tag = "pages",
    operation_id = "settingsPage",
    summary = "The patient's settings page (HTML)",
    description = "With `handoff`: opens a link from `POST /api/settings-links` (303 to the page \
        with a session cookie, or 410 when the link is used, expired or unknown). Without: the \
        page for the session cookie, or 401 asking to open settings from the app.",
    params(
        ("handoff" = Option<String>, Query, description = "A link's one-time code."),
        ("saved" = Option<String>, Query, description = "Shows the saved notice."),
    ),
    security(()),
    responses(
        (status = 200, description = "The page.", body = String, content_type = "text/html"),
        (status = 303, description = "Signed in: to the page, without the code."),
        (status = 401, description = "No session.", body = String, content_type = "text/html"),
        (status = 410, description = "The link is used, expired or unknown.", body = String, content_type = "text/html"),
    )
)]
async fn page(
    State(state): State<AppState>,
    meta: ClientMeta,
    headers: HeaderMap,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> AppResult<Response> {
    let query = query.map(|Query(q)| q).unwrap_or(PageQuery {
        handoff: None,
        saved: None,
    });
    if let Some(code) = query.handoff {
        let pages = &state.settings_pages;
        return Ok(
            match pages.open_link(&code, meta.ip, meta.user_agent).await? {
                Some(token) => {
                    // A GET, so `durable_writes` would not wait: the link's single use and the
                    // session it opened are on disk before the cookie leaves, or a power cut
                    // could make a used link open again.
                    state.store.durable().await?;
                    let mut response = redirect(&state, "/settings/messaging");
                    set_cookie(&mut response, &session_cookie(&state, &token));
                    response
                }
                None => notice(
                    &state,
                    StatusCode::GONE,
                    "This link has expired",
                    "Links to this page work once and for a few minutes. Open your messaging \
                 settings again from the app.",
                )?,
            },
        );
    }
    let Some((token, session)) = current_session(&state, &headers).await? else {
        return signed_out(&state, StatusCode::UNAUTHORIZED);
    };
    let page = render_page(&state, &token, &session, query.saved.is_some(), None, None).await?;
    Ok(with_session_cookie(&state, &token, page))
}

/// The session's cookie again, with a fresh `Max-Age`: the session slides forward on the server
/// with every use, and the browser's copy must too, or it drops the cookie `SESSION_TTL_SECONDS`
/// after sign-in however active the patient is.
fn with_session_cookie(state: &AppState, token: &str, mut response: Response) -> Response {
    set_cookie(&mut response, &session_cookie(state, token));
    response
}

/// The form as posted: text fields, and a checkbox only when it is ticked.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct SettingsFormBody {
    #[serde(default)]
    pub phone_number: String,
    pub sms_consent: Option<String>,
    pub whatsapp_consent: Option<String>,
    pub marketing_consent: Option<String>,
    #[serde(default)]
    pub csrf_token: String,
}

#[utoipa::path(
    post,
    path = "/settings/messaging",
    tag = "pages",
    operation_id = "saveSettings",
    summary = "Save the settings form (HTML form post)",
    request_body(content = SettingsFormBody, content_type = "application/x-www-form-urlencoded"),
    security(()),
    responses(
        (status = 303, description = "Saved: back to the page with a notice."),
        (status = 400, description = "The form again, the error beside the field.", body = String, content_type = "text/html"),
        (status = 403, description = "No session, or no valid CSRF token: nothing changed.", body = String, content_type = "text/html"),
    )
)]
async fn save(
    State(state): State<AppState>,
    meta: ClientMeta,
    headers: HeaderMap,
    form: Result<Form<SettingsFormBody>, axum::extract::rejection::FormRejection>,
) -> AppResult<Response> {
    let (Some((token, session)), Ok(Form(body))) = (current_session(&state, &headers).await?, form)
    else {
        return forbidden(&state);
    };
    if !state.settings_pages.csrf_ok(&token, &body.csrf_token) {
        tracing::warn!(user_id = %session.user_id, "settings form refused: no valid CSRF token");
        return forbidden(&state);
    }
    let form = SettingsForm {
        phone_number: body.phone_number.clone(),
        sms_consent: body.sms_consent.is_some(),
        whatsapp_consent: body.whatsapp_consent.is_some(),
        marketing_consent: body.marketing_consent.is_some(),
    };
    let response = match state
        .settings_pages
        .save(&session, form.clone(), meta.ip, meta.user_agent)
        .await
    {
        Ok(_) => redirect(&state, "/settings/messaging?saved=1"),
        Err(AppError::BadRequest { code, message }) => {
            let said = said_to_the_patient(code, &message);
            render_page(&state, &token, &session, false, Some(&form), Some(said)).await?
        }
        Err(e) => return Err(e),
    };
    Ok(with_session_cookie(&state, &token, response))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct SignOutBody {
    #[serde(default)]
    pub csrf_token: String,
}

#[utoipa::path(
    post,
    path = "/settings/sign-out",
    tag = "pages",
    operation_id = "signOut",
    summary = "End the settings session (HTML form post)",
    request_body(content = SignOutBody, content_type = "application/x-www-form-urlencoded"),
    security(()),
    responses(
        (status = 200, description = "Signed out; the cookie is cleared.", body = String, content_type = "text/html"),
        (status = 403, description = "No session, or no valid CSRF token.", body = String, content_type = "text/html"),
    )
)]
async fn sign_out(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<SignOutBody>, axum::extract::rejection::FormRejection>,
) -> AppResult<Response> {
    let (Some((token, session)), Ok(Form(body))) = (current_session(&state, &headers).await?, form)
    else {
        return forbidden(&state);
    };
    if !state.settings_pages.csrf_ok(&token, &body.csrf_token) {
        return forbidden(&state);
    }
    state.settings_pages.sign_out(&token).await?;
    tracing::info!(user_id = %session.user_id, "settings session signed out");
    let mut response = notice(
        &state,
        StatusCode::OK,
        "Signed out",
        "You have signed out of your messaging settings. Open them again from the app.",
    )?;
    set_cookie(&mut response, &cleared_cookie(&state));
    Ok(response)
}

#[utoipa::path(
    get,
    path = "/settings/settings.css",
    tag = "pages",
    operation_id = "settingsStylesheet",
    summary = "The settings page's stylesheet",
    security(()),
    responses((status = 200, description = "CSS.", body = String, content_type = "text/css"))
)]
async fn stylesheet() -> Response {
    (
        [(CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../web/settings.css"),
    )
        .into_response()
}

/// The session named by the request's cookie, if it is live (its expiry slides forward).
async fn current_session(
    state: &AppState,
    headers: &HeaderMap,
) -> AppResult<Option<(String, SettingsSession)>> {
    let Some(token) = cookie(headers, COOKIE_NAME) else {
        return Ok(None);
    };
    Ok(state
        .settings_pages
        .session(&token)
        .await?
        .map(|session| (token, session)))
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

fn session_cookie(state: &AppState, token: &str) -> String {
    let secure = if state.settings_pages.secure() {
        "; Secure"
    } else {
        ""
    };
    format!(
        "{COOKIE_NAME}={token}; Path={}/settings; HttpOnly; SameSite=Lax; Max-Age={}{secure}",
        state.settings_pages.base_path(),
        state.settings_pages.session_ttl_seconds()
    )
}

fn cleared_cookie(state: &AppState) -> String {
    let secure = if state.settings_pages.secure() {
        "; Secure"
    } else {
        ""
    };
    format!(
        "{COOKIE_NAME}=; Path={}/settings; HttpOnly; SameSite=Lax; Max-Age=0{secure}",
        state.settings_pages.base_path()
    )
}

fn set_cookie(response: &mut Response, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().append(SET_COOKIE, value);
    }
}

/// A refusal of the form in the page's own words: the API's messages name its JSON fields
/// (`phone_number`), which mean nothing to a patient who typed into "Mobile number".
fn said_to_the_patient<'a>(code: &str, api_message: &'a str) -> &'a str {
    match code {
        "invalid_phone" => {
            "Enter your mobile number in international format: a + and your country code, then \
             the number, e.g. +44 7400 123456."
        }
        "phone_required" => "Enter your mobile number to get text or WhatsApp messages.",
        _ => api_message,
    }
}

/// A 303 to one of the page's routes, under `PUBLIC_URL`'s path.
fn redirect(state: &AppState, route: &str) -> Response {
    let to = format!("{}{route}", state.settings_pages.base_path());
    (StatusCode::SEE_OTHER, [(LOCATION, to)]).into_response()
}

fn templates() -> AppResult<Environment<'static>> {
    let mut env = Environment::new();
    env.add_template("settings.html", include_str!("../web/settings.html"))
        .map_err(anyhow::Error::from)?;
    env.add_template("notice.html", include_str!("../web/notice.html"))
        .map_err(anyhow::Error::from)?;
    Ok(env)
}

async fn render_page(
    state: &AppState,
    token: &str,
    session: &SettingsSession,
    saved: bool,
    form: Option<&SettingsForm>,
    error: Option<&str>,
) -> AppResult<Response> {
    let pages = &state.settings_pages;
    let data = pages.page(session).await?;
    let consent = data.consent.as_ref();
    // A refused form shows what was typed; otherwise what is stored.
    let (phone, sms, whatsapp, marketing) = match form {
        Some(f) => (
            f.phone_number.clone(),
            f.sms_consent,
            f.whatsapp_consent,
            f.marketing_consent,
        ),
        None => (
            consent
                .and_then(|c| c.phone_number.clone())
                .unwrap_or_default(),
            consent.is_some_and(|c| c.sms_consent),
            consent.is_some_and(|c| c.whatsapp_consent),
            consent.is_some_and(|c| c.marketing_consent),
        ),
    };
    let verified = data.verified_on.as_ref().filter(|_| form.is_none());
    let html = templates()?
        .get_template("settings.html")
        .and_then(|t| {
            t.render(context! {
                clinic => state.config.messaging.clinic_name,
                base => pages.base_path(),
                csrf => pages.csrf_token(token),
                saved => saved,
                phone => phone,
                phone_error => error,
                sms => sms,
                whatsapp => whatsapp,
                marketing => marketing,
                verified => verified,
                history => data.history,
                time_zone => data.time_zone,
                patient_time_zone => data.patient_time_zone,
                return_url => data.return_url,
                sms_opted_out => data.opted_out.sms,
                whatsapp_opted_out => data.opted_out.whatsapp,
            })
        })
        .map_err(anyhow::Error::from)?;
    let status = if error.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    Ok((status, Html(html)).into_response())
}

fn notice(state: &AppState, status: StatusCode, title: &str, text: &str) -> AppResult<Response> {
    let html = templates()?
        .get_template("notice.html")
        .and_then(|t| {
            t.render(context! {
                clinic => state.config.messaging.clinic_name,
                base => state.settings_pages.base_path(),
                title => title,
                text => text,
            })
        })
        .map_err(anyhow::Error::from)?;
    Ok((status, Html(html)).into_response())
}

fn signed_out(state: &AppState, status: StatusCode) -> AppResult<Response> {
    notice(
        state,
        status,
        "Open your settings from the app",
        "Your session has ended or was never started. Open your messaging settings again from \
         the app.",
    )
}

fn forbidden(state: &AppState) -> AppResult<Response> {
    notice(
        state,
        StatusCode::FORBIDDEN,
        "Not saved",
        "This form could not be checked, so nothing was changed. Open your messaging settings \
         again from the app.",
    )
}
