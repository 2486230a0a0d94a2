//! The patient's settings page: signed in by a one-time link from the host app (which already
//! knows who the patient is), then a server-side session. Only hashes of link codes and session
//! tokens are stored; the CSRF token is derived from the session token, so it is tied to the
//! session without being stored.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::clock::DynClock;
use crate::consent::{ConsentService, OptedOut, PreferencesUpdate};
use crate::error::{AppError, AppResult};
use crate::outbox::{validate_user_id, Outbox};
use crate::store::{ChangeContext, Consent, ConsentSource, SessionStore, SettingsSession};

/// How long a settings link may wait to be opened.
pub const LINK_TTL_SECONDS: u64 = 300;

/// How many of the patient's messages the page lists.
const RECENT_MESSAGES: i64 = 20;

/// A new link for the host app to open in the patient's browser.
#[derive(Debug, Clone, Serialize)]
pub struct NewLink {
    pub url: String,
    pub expires_in: u64,
}

/// The page's form, as posted. An unticked box is absent from a form post: `false`.
#[derive(Debug, Clone, Default)]
pub struct SettingsForm {
    pub phone_number: String,
    pub sms_consent: bool,
    pub whatsapp_consent: bool,
    pub marketing_consent: bool,
}

/// One row of the page's message table.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryRow {
    /// In the patient's zone, e.g. `12 Jan 2027, 10:30`.
    pub date: String,
    /// A readable name, e.g. "Appointment reminder (24 h)".
    pub kind: String,
    pub channel: String,
    pub status: String,
}

/// Everything the page shows.
#[derive(Debug, Clone, Serialize)]
pub struct PageData {
    pub consent: Option<Consent>,
    pub history: Vec<HistoryRow>,
    /// The zone the dates are in.
    pub time_zone: String,
    /// The patient's own zone, when their preferences carry one.
    pub patient_time_zone: Option<String>,
    pub return_url: Option<String>,
    /// Where the number is opted out (STOP): the page says how to undo it.
    pub opted_out: OptedOut,
    /// The day the number on file was verified, in the same zone as the history.
    pub verified_on: Option<String>,
}

#[derive(Clone)]
pub struct SettingsPages {
    sessions: Arc<dyn SessionStore>,
    consent: ConsentService,
    outbox: Outbox,
    clock: DynClock,
    app_url: Arc<str>,
    public_url: Arc<str>,
    session_ttl: Duration,
    default_time_zone: Tz,
}

impl SettingsPages {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        sessions: Arc<dyn SessionStore>,
        consent: ConsentService,
        outbox: Outbox,
        clock: DynClock,
        app_url: &str,
        public_url: &str,
        session_ttl: std::time::Duration,
        default_time_zone: Tz,
    ) -> Self {
        SettingsPages {
            sessions,
            consent,
            outbox,
            clock,
            app_url: app_url.into(),
            public_url: public_url.into(),
            session_ttl: Duration::from_std(session_ttl).unwrap_or(Duration::minutes(30)),
            default_time_zone,
        }
    }

    pub fn session_ttl_seconds(&self) -> i64 {
        self.session_ttl.num_seconds()
    }

    /// The path `PUBLIC_URL` puts before this service's routes (`""` or, say, `"/messaging"`,
    /// never ending in `/`): a proxy that serves the service under a path strips it before the
    /// request arrives, so the page's own links, redirects and cookie must carry it back.
    pub fn base_path(&self) -> &str {
        let after_scheme = self
            .public_url
            .split_once("://")
            .map_or(&*self.public_url, |(_, rest)| rest);
        after_scheme
            .find('/')
            .map_or("", |at| &after_scheme[at..])
            .trim_end_matches('/')
    }

    /// Whether the page is served over https (its cookie is then `Secure`).
    pub fn secure(&self) -> bool {
        self.public_url.starts_with("https://")
    }

    /// A one-time link to the page for `user_id`, valid for [`LINK_TTL_SECONDS`].
    pub async fn create_link(&self, user_id: &str, return_url: Option<&str>) -> AppResult<NewLink> {
        validate_user_id(user_id)?;
        if let Some(url) = return_url {
            if !self.is_under_app_url(url) {
                return Err(AppError::bad_request(
                    "invalid_return_url",
                    "return_url must be a URL under APP_URL",
                ));
            }
        }
        let code = random_token();
        let now = self.clock.now();
        let expires_at = now + Duration::seconds(LINK_TTL_SECONDS as i64);
        self.sessions
            .create_settings_link(&hash(&code), user_id, return_url, now, expires_at)
            .await?;
        tracing::info!(user_id, "settings link created");
        Ok(NewLink {
            url: format!("{}/settings/messaging?handoff={code}", self.public_url),
            expires_in: LINK_TTL_SECONDS,
        })
    }

    /// Open a link: a new session's token for its patient, once; `None` for a used, expired or
    /// unknown code (the caller does not learn which).
    pub async fn open_link(
        &self,
        code: &str,
        ip: Option<String>,
        user_agent: Option<String>,
    ) -> AppResult<Option<String>> {
        let now = self.clock.now();
        let Some(opened) = self
            .sessions
            .consume_settings_link(&hash(code), now)
            .await?
        else {
            return Ok(None);
        };
        let token = random_token();
        let session = SettingsSession {
            token_hash: hash(&token),
            user_id: opened.user_id,
            return_url: opened.return_url,
            ip,
            user_agent,
            created_at: now,
            last_seen_at: now,
            expires_at: now + self.session_ttl,
        };
        self.sessions.create_settings_session(&session).await?;
        tracing::info!(user_id = %session.user_id, "settings session opened");
        Ok(Some(token))
    }

    /// The live session for this token, its expiry slid forward; `None` when there is none.
    pub async fn session(&self, token: &str) -> AppResult<Option<SettingsSession>> {
        let now = self.clock.now();
        self.sessions
            .touch_settings_session(&hash(token), now, now + self.session_ttl)
            .await
    }

    pub async fn sign_out(&self, token: &str) -> AppResult<()> {
        self.sessions.delete_settings_session(&hash(token)).await
    }

    /// The form's CSRF token: derived from the session token, so only a page served to that
    /// session can hold it.
    pub fn csrf_token(&self, token: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(token.as_bytes())
            .expect("HMAC takes any key length");
        mac.update(b"prism-messaging settings csrf v1");
        hex::encode(mac.finalize().into_bytes())
    }

    pub fn csrf_ok(&self, token: &str, presented: &str) -> bool {
        self.csrf_token(token)
            .as_bytes()
            .ct_eq(presented.as_bytes())
            .into()
    }

    /// What the page shows for the session's patient.
    pub async fn page(&self, session: &SettingsSession) -> AppResult<PageData> {
        let consent = self.consent.get(&session.user_id).await?;
        let opted_out = match &consent {
            Some(consent) => self.consent.opted_out_channels(consent).await?,
            None => OptedOut::default(),
        };
        // The patient's own zone when preferences carry one.
        let patient_zone = consent
            .as_ref()
            .and_then(|c| c.time_zone.as_deref())
            .and_then(|z| z.parse::<Tz>().ok());
        let zone = patient_zone.unwrap_or(self.default_time_zone);
        let history = self
            .outbox
            .history(&session.user_id, RECENT_MESSAGES)
            .await?
            .into_iter()
            .map(|m| HistoryRow {
                date: local_date(m.created_at, zone),
                kind: readable_template(&m.template_name),
                channel: match m.channel.as_str() {
                    "whatsapp" => "WhatsApp".into(),
                    _ => "SMS".into(),
                },
                status: m.status.to_string(),
            })
            .collect();
        Ok(PageData {
            history,
            time_zone: zone.name().to_string(),
            patient_time_zone: patient_zone.map(|z| z.name().to_string()),
            return_url: session.return_url.clone(),
            opted_out,
            verified_on: consent
                .as_ref()
                .and_then(|c| c.phone_verified_at)
                .map(|at| at.with_timezone(&zone).format("%-d %b %Y").to_string()),
            consent,
        })
    }

    /// Save the form: audited with source `web_settings`, the client's address and browser. An
    /// empty number removes it (refused with SMS or WhatsApp ticked: `phone_required`).
    pub async fn save(
        &self,
        session: &SettingsSession,
        form: SettingsForm,
        ip: Option<String>,
        user_agent: Option<String>,
    ) -> AppResult<Consent> {
        let phone = form.phone_number.trim();
        let update = PreferencesUpdate {
            phone_number: Some((!phone.is_empty()).then(|| phone.to_string())),
            sms_consent: Some(form.sms_consent),
            whatsapp_consent: Some(form.whatsapp_consent),
            marketing_consent: Some(form.marketing_consent),
            // The form has no zone field: the patient's zone is kept.
            time_zone: None,
            source: None,
        };
        let ctx = ChangeContext {
            source: ConsentSource::WebSettings,
            ip,
            user_agent,
            at: self.clock.now(),
        };
        self.consent
            .update_preferences(&session.user_id, update, ctx)
            .await
    }

    /// Delete expired sessions and links; how many (the cleanup job).
    pub async fn prune(&self) -> AppResult<u64> {
        self.sessions
            .prune_settings_sessions(self.clock.now())
            .await
    }

    /// Under `APP_URL` as the browser will resolve it: no `.` or `..` segment (written or
    /// percent-encoded) and no backslash, which would climb out of a path-prefixed `APP_URL`
    /// (found by review), as for a template's link.
    fn is_under_app_url(&self, url: &str) -> bool {
        let Some(rest) = url.strip_prefix(&*self.app_url) else {
            return false;
        };
        let route = rest
            .split(['?', '#'])
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
            .replace("%2e", ".");
        (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
            && !url.chars().any(|c| c.is_control() || c.is_whitespace())
            && !route.contains('\\')
            && route.split('/').all(|s| s != "." && s != "..")
    }
}

/// 32 random bytes from the OS, URL-safe.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// What is stored for a code or token: its SHA-256 (they are 256 random bits: no key needed).
fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn local_date(at: DateTime<Utc>, zone: Tz) -> String {
    at.with_timezone(&zone)
        .format("%-d %b %Y, %H:%M")
        .to_string()
}

/// A template's name for people.
pub fn readable_template(name: &str) -> String {
    match name {
        "otp" => "Verification code",
        "appointment_reminder_24h" => "Appointment reminder (24 h)",
        "appointment_reminder_2h" => "Appointment reminder (2 h)",
        "follow_up_reminder" => "Follow-up reminder",
        "subscription_renewal" => "Subscription renewal",
        "subscription_expiring" => "Subscription expiring",
        "payment_received" => "Payment received",
        "payment_failed" => "Payment failed",
        "opt_out_confirmation" => "Opt-out confirmation",
        "opt_in_confirmation" => "Opt-in confirmation",
        "help" => "Help",
        "clinic_news" => "Clinic news",
        other => return other.replace('_', " "),
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_only_their_hashes_are_kept() {
        let a = random_token();
        let b = random_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(hash(&a).len(), 64);
        assert!(!hash(&a).contains(&a));
    }

    #[test]
    fn readable_names() {
        assert_eq!(
            readable_template("appointment_reminder_24h"),
            "Appointment reminder (24 h)"
        );
        assert_eq!(readable_template("something_new"), "something new");
    }
}
