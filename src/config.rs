//! Configuration, read once at start from the environment (and a `.env` file in the working
//! directory) and validated: a bad or missing value stops the start with one line naming the
//! variable. Secrets are wrapped in [`Secret`] so `Debug` output and logs never show them.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;

use chrono::NaiveTime;
use chrono_tz::Tz;

pub use crate::error::ConfigError;
use crate::phone::PhoneNumber;
use crate::templates;

/// A value that must never be printed. `Debug` shows `Secret(..)`; read it with `expose()`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone)]
pub struct TwilioConfig {
    pub account_sid: String,
    pub auth_token: Secret,
    pub phone_number: Option<PhoneNumber>,
    pub whatsapp_number: Option<PhoneNumber>,
    pub messaging_service_sid: Option<String>,
    pub api_base: String,
}

/// `QUIET_HOURS`: a daily window in the patient's time zone; it may wrap past midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    pub start: NaiveTime,
    pub end: NaiveTime,
}

/// Everything the service reads from its environment, grouped by who uses it, parsed once.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSettings,
    /// `sqlite://PATH` or `postgres://...`.
    pub database_url: String,
    pub messaging: MessagingSettings,
    pub twilio: TwilioSettings,
    pub auth: AuthSettings,
    pub otp: OtpSettings,
    pub web: WebSettings,
    pub retention: RetentionSettings,
    /// Encryption at rest (`DATA_ENCRYPTION_KEY`, `DATA_ENCRYPTION_OLD_KEYS`, `BLIND_INDEX_KEY`).
    pub encryption: crate::vault::KeySettings,
    /// Beyond the contract: how the dispatcher sends (`DISPATCH_*`).
    pub dispatch: DispatchSettings,
}

/// How this process serves.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub bind_addr: SocketAddr,
    /// Beyond the contract: which parts this instance runs (`INSTANCE_ROLE`).
    pub role: Role,
    /// Not in the contract: take the client IP (for audit records and rate limits) from the last
    /// `X-Forwarded-For` entry (the one the trusted proxy appended), only behind such a proxy.
    pub trust_forwarded_for: bool,
    /// Beyond the contract: how long SIGTERM waits for in-flight sends (`SHUTDOWN_GRACE_SECONDS`).
    pub shutdown_grace: std::time::Duration,
    pub log_format: LogFormat,
    /// Whether `/dev/*` may be served (mock mode only, still): `DEV_ENDPOINTS=true`, or a loopback
    /// `BIND_ADDR`.
    pub dev_endpoints: bool,
    /// Beyond the contract: a connection that has not sent a whole request head within this is
    /// closed (`HEADER_READ_TIMEOUT_SECONDS`, 10).
    pub header_read_timeout: std::time::Duration,
}

/// What every message is subject to: on/off, mock, the clinic's name and links, time and quiet
/// hours.
#[derive(Debug, Clone)]
pub struct MessagingSettings {
    pub enabled: bool,
    pub mock_mode: bool,
    pub clinic_name: String,
    /// `APP_URL` without a trailing slash.
    pub app_url: String,
    /// `PUBLIC_URL` (default `APP_URL`) without a trailing slash.
    pub public_url: String,
    pub default_time_zone: Tz,
    pub quiet_hours: Option<QuietHours>,
    /// `REMINDER_LATE_BOOKING`: an appointment booked less than two hours ahead gets one
    /// reminder at once (otherwise none).
    pub reminder_late_booking: bool,
}

impl MessagingSettings {
    pub fn render_context(&self) -> templates::RenderContext {
        templates::RenderContext {
            clinic_name: self.clinic_name.clone(),
            app_url: self.app_url.clone(),
        }
    }
}

/// Twilio, as configured: present whenever any variable is set; complete (see
/// [`TwilioSettings::live`]) when not in mock mode.
#[derive(Debug, Clone)]
pub struct TwilioSettings {
    pub account_sid: Option<String>,
    pub auth_token: Option<Secret>,
    pub phone_number: Option<PhoneNumber>,
    pub whatsapp_number: Option<PhoneNumber>,
    pub messaging_service_sid: Option<String>,
    pub api_base: String,
    /// Approved WhatsApp templates: template name -> Content SID (`HX...`).
    pub content_sids: HashMap<String, String>,
    /// Beyond the contract: request timeout (`TWILIO_TIMEOUT_MS`).
    pub timeout: std::time::Duration,
}

impl TwilioSettings {
    /// The sender for a channel, when configured.
    pub fn sender(&self, whatsapp: bool) -> Option<&PhoneNumber> {
        if whatsapp {
            self.whatsapp_number.as_ref()
        } else {
            self.phone_number.as_ref()
        }
    }
}

/// Who may call: bearer keys and user-token verification.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub messaging_api_key: Option<Secret>,
    pub cron_secret: Option<Secret>,
    pub jwt_secret: Option<Secret>,
    pub jwks_file: Option<String>,
    pub jwks_url: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub user_claim: String,
    /// Bearer key for `/metrics`; unset, `/metrics` is open.
    pub metrics_token: Option<Secret>,
}

/// How long each class of personal data is kept (`RETENTION_*_DAYS`; `0` is refused, since an
/// accident would delete everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionSettings {
    /// Messages and their status events (365).
    pub messages_days: u32,
    /// Patients' replies (90).
    pub inbound_days: u32,
    /// Reminder log rows, after the item's time (90).
    pub reminder_log_days: u32,
    /// The consent audit trail (2555: seven years).
    pub audit_days: u32,
    /// Status callbacks no message claimed (1).
    pub unmatched_callbacks_days: u32,
}

/// The settings page and browser front ends.
#[derive(Debug, Clone)]
pub struct WebSettings {
    /// How long a settings-page session lasts without use (`SESSION_TTL_SECONDS`, 1800; sliding).
    pub session_ttl: std::time::Duration,
    /// Origins whose pages may call the user API and the OTP calls (`CORS_ALLOWED_ORIGINS`,
    /// comma-separated; empty: no cross-origin access).
    pub cors_allowed_origins: Vec<String>,
}

/// One-time passcodes.
#[derive(Debug, Clone)]
pub struct OtpSettings {
    pub ttl: std::time::Duration,
    pub length: u32,
    pub max_attempts: u32,
    pub resend_cooldown: std::time::Duration,
    /// Per number and per user.
    pub max_sends_per_hour: u32,
    /// Per client address, an IPv6 client's /64 (`OTP_MAX_SENDS_PER_IP_PER_HOUR`, 30).
    pub max_sends_per_ip_per_hour: u32,
    pub allowed_countries: Vec<String>,
    /// Not in the contract: the key for hashing codes. Unset: derived from the other secrets.
    pub secret: Option<Secret>,
}

/// `INSTANCE_ROLE`: `all` (default) serves the API and runs the dispatcher and scheduler; `api`
/// serves the API only; `dispatcher` sends (and runs the scheduler), serving only `/healthz`,
/// `/readyz` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    All,
    Api,
    Dispatcher,
}

impl Role {
    pub fn serves_api(self) -> bool {
        self != Role::Dispatcher
    }
    pub fn dispatches(self) -> bool {
        self != Role::Api
    }
}

/// `DISPATCH_BATCH_SIZE` by default with a per-sender rate limit (`DISPATCH_RATE_PER_SECOND`
/// above 0).
pub const PACED_BATCH_SIZE: i64 = 32;
/// `DISPATCH_BATCH_SIZE` by default without one.
pub const UNPACED_BATCH_SIZE: i64 = 256;

/// The dispatcher's knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchSettings {
    /// Messages claimed and in flight at once (`DISPATCH_BATCH_SIZE`: `PACED_BATCH_SIZE` with a
    /// rate limit, `UNPACED_BATCH_SIZE` without).
    pub batch_size: i64,
    /// How long a claim holds before another dispatcher may take the message
    /// (`DISPATCH_LEASE_SECONDS`, 120). A crashed process's messages wait this long.
    pub lease: chrono::Duration,
    /// Tries before a retryable failure is final (`DISPATCH_MAX_ATTEMPTS`, 5).
    pub max_attempts: i64,
    /// A message older than this is not retried any more (`DISPATCH_MAX_AGE_SECONDS`, 86400).
    pub max_age: chrono::Duration,
    /// Messages per second per sender number, across all instances (`DISPATCH_RATE_PER_SECOND`,
    /// 10; 0 = no limit).
    pub rate_per_second: u32,
    /// The longest one lookup of an earlier attempt may take, all its pages together
    /// (`DISPATCH_LOOKUP_DEADLINE_SECONDS`, 30); past it the lookup counts as failed.
    pub lookup_deadline: std::time::Duration,
}

fn err(variable: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::new(variable, problem)
}

/// Reads variables through a lookup function, so tests can configure without touching the
/// process environment.
struct Vars<F: Fn(&str) -> Option<String>>(F);

impl<F: Fn(&str) -> Option<String>> Vars<F> {
    /// The value, or `None` when unset or blank.
    fn get(&self, name: &'static str) -> Option<String> {
        (self.0)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    fn string(&self, name: &'static str, default: &str) -> String {
        self.get(name).unwrap_or_else(|| default.to_string())
    }

    fn bool(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name).map(|v| v.to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if matches!(v.as_str(), "true" | "1" | "yes" | "on") => Ok(true),
            Some(v) if matches!(v.as_str(), "false" | "0" | "no" | "off") => Ok(false),
            Some(v) => Err(err(name, format!("expected true or false, got {v:?}"))),
        }
    }

    fn number<T>(&self, name: &'static str, default: T, min: T, max: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
    {
        let Some(raw) = self.get(name) else {
            return Ok(default);
        };
        let value: T = raw
            .parse()
            .map_err(|_| err(name, format!("expected a whole number, got {raw:?}")))?;
        if value < min || value > max {
            return Err(err(
                name,
                format!("must be between {min} and {max}, got {value}"),
            ));
        }
        Ok(value)
    }

    fn key(&self, name: &'static str) -> Result<Option<crate::vault::Key>, ConfigError> {
        self.get(name)
            .map(|raw| {
                crate::vault::Key::parse(&raw).map_err(|problem| {
                    err(
                        name,
                        format!("{problem} (32 random bytes, base64: `openssl rand -base64 32`)"),
                    )
                })
            })
            .transpose()
    }

    fn secret(&self, name: &'static str) -> Option<Secret> {
        self.get(name).map(Secret)
    }

    fn phone(&self, name: &'static str) -> Result<Option<PhoneNumber>, ConfigError> {
        self.get(name)
            .map(|raw| {
                PhoneNumber::parse(&raw)
                    .map_err(|_| err(name, "expected an E.164 number like +14155238886"))
            })
            .transpose()
    }

    fn url(&self, name: &'static str, default: &str) -> Result<String, ConfigError> {
        let raw = self.string(name, default);
        let parsed = reqwest::Url::parse(&raw).map_err(|e| err(name, format!("not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(err(name, "must be an http(s) URL with a host"));
        }
        // Paths are joined to it (`{APP_URL}/pay`, `{PUBLIC_URL}/webhooks/...`): a query or a
        // fragment would swallow them, and a user name or password would be sent to patients. An
        // empty fragment at the end (`https://app/#`, `https://app/#/`) is a hash-routed app's
        // base, which the paths extend as its routes (`https://app/#/pay`).
        let hash_route_base = matches!(parsed.fragment(), Some("" | "/"));
        if parsed.query().is_some() || (parsed.fragment().is_some() && !hash_route_base) {
            return Err(err(
                name,
                "must be a base URL, without a query or fragment (an empty `#` or `#/` at the \
                 end, for a hash-routed app, is fine)",
            ));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(err(name, "must not hold a user name or password"));
        }
        // The text goes into every link as written: it must be the URL as a browser writes it
        // (found by review: a space, a `..` segment or an empty `@` went into every message).
        let normal = parsed.as_str().trim_end_matches('/');
        if raw.trim_end_matches('/') != normal {
            return Err(err(
                name,
                format!("is not written as a browser writes it; write it as {normal}"),
            ));
        }
        Ok(raw.trim_end_matches('/').to_string())
    }
}

/// `CLINIC_NAME` opens every message: a name, not a sentence, so it holds no placeholder
/// (`{link}` would be filled in as a variable) and no line break, and fits beside a code.
fn clinic_name(raw: &str) -> Result<String, ConfigError> {
    let name = raw.trim();
    let ok = (1..=100).contains(&name.chars().count())
        && !name.chars().any(|c| {
            c.is_control() || matches!(c, '{' | '}' | '<' | '>' | '\u{2028}' | '\u{2029}')
        });
    ok.then(|| name.to_string()).ok_or_else(|| {
        err(
            "CLINIC_NAME",
            "1 to 100 characters, without braces, angle brackets or line breaks",
        )
    })
}

fn is_sid(value: &str, prefix: &str) -> bool {
    value.len() == 34
        && value.starts_with(prefix)
        && value[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn parse_quiet_hours(raw: &str) -> Option<QuietHours> {
    let (start, end) = raw.split_once('-')?;
    let start = NaiveTime::parse_from_str(start.trim(), "%H:%M").ok()?;
    let end = NaiveTime::parse_from_str(end.trim(), "%H:%M").ok()?;
    Some(QuietHours { start, end })
}

/// `CORS_ALLOWED_ORIGINS`: exact origins (`https://app.example.com`), no paths, no wildcards.
fn parse_origins(raw: &str) -> Result<Vec<String>, ConfigError> {
    let name = "CORS_ALLOWED_ORIGINS";
    raw.split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(|origin| {
            let url = reqwest::Url::parse(origin)
                .map_err(|_| err(name, format!("{origin:?} is not an origin")))?;
            let bare = url.path() == "/" && url.query().is_none() && !origin.ends_with('/');
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() || !bare {
                return Err(err(
                    name,
                    format!("{origin:?} must be an origin such as https://app.example.com"),
                ));
            }
            Ok(origin.to_string())
        })
        .collect()
}

fn parse_content_sids(raw: &str) -> Result<HashMap<String, String>, ConfigError> {
    let name = "TWILIO_CONTENT_SIDS";
    let mut map = HashMap::new();
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (template, sid) = pair
            .split_once('=')
            .ok_or_else(|| err(name, format!("expected template=HX... pairs, got {pair:?}")))?;
        let (template, sid) = (template.trim(), sid.trim());
        if templates::find(template).is_none() {
            return Err(err(name, format!("unknown template {template:?}")));
        }
        if !is_sid(sid, "HX") {
            return Err(err(
                name,
                format!("{sid:?} is not a Content SID (HX + 32 hex digits)"),
            ));
        }
        // Named twice with two SIDs, one of the two would be dropped unseen: say which.
        if let Some(earlier) = map.insert(template.to_string(), sid.to_string()) {
            if earlier != sid {
                return Err(err(
                    name,
                    format!("{template:?} is named twice, with two Content SIDs"),
                ));
            }
        }
    }
    Ok(map)
}

/// `BIND_ADDR`: an address and port, or a host name and port resolved once at start, to its
/// first IPv4 address if it has one (`localhost` often resolves to `::1` first, and a server on
/// `::1` alone refuses clients of 127.0.0.1), else its first. `localhost:8080` is a loopback
/// address either way, so `/dev/*` stays served there.
fn bind_address(raw: &str) -> Result<SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    if let Ok(address) = raw.parse() {
        return Ok(address);
    }
    let problem = "expected host:port with a port number, e.g. 127.0.0.1:8080 or localhost:8080";
    let resolved: Vec<SocketAddr> = raw
        .to_socket_addrs()
        .map_err(|e| {
            let why = e.to_string();
            err("BIND_ADDR", format!("{problem} ({raw:?}: {why})"))
        })?
        .collect();
    resolved
        .iter()
        .find(|a| a.is_ipv4())
        .or(resolved.first())
        .copied()
        .ok_or_else(|| err("BIND_ADDR", format!("{raw:?} resolves to no address")))
}

/// `.env` in the working directory, if there is one. A line it cannot read stops the start:
/// the parser stops there, so every setting below it would be silently left at its default. The
/// message names the line by number, never by its text (it may hold a secret).
fn load_dotenv() -> Result<(), ConfigError> {
    refuse_a_name_set_twice_in_dotenv()?;
    match dotenvy::from_path(".env") {
        Ok(()) => Ok(()),
        Err(e) if e.not_found() => Ok(()),
        Err(dotenvy::Error::LineParse(bad, _)) => {
            // The line holding the text the parser stopped at (it names the rest of that line);
            // failing that, the first line that does not parse on its own.
            let text = std::fs::read_to_string(".env").unwrap_or_default();
            let bad = bad.lines().next().unwrap_or_default().trim();
            let fails_alone =
                |line: &str| dotenvy::from_read_iter(line.as_bytes()).any(|item| item.is_err());
            let lines: Vec<&str> = text.lines().collect();
            let number = lines
                .iter()
                .position(|l| !bad.is_empty() && l.contains(bad) && fails_alone(l))
                .or_else(|| lines.iter().position(|l| fails_alone(l)));
            let at = number.map_or("a line".to_string(), |n| format!("line {}", n + 1));
            Err(err(
                ".env",
                format!(
                    "{at} cannot be read (NAME=value; quote a value with spaces or special \
                     characters: NAME=\"a b\")"
                ),
            ))
        }
        // Not a line's text (handled above): an I/O error, say a file that is not UTF-8.
        Err(e) => Err(err(".env", format!("cannot be read: {e}"))),
    }
}

/// A name set twice in `.env` stops the start. Only the first would count (a variable already
/// set is kept), so settings appended to a copy of `.env.example` would be passed over for its
/// blanks: another database, a new encryption key, with no error.
fn refuse_a_name_set_twice_in_dotenv() -> Result<(), ConfigError> {
    // A file that is missing or does not parse is `load_dotenv`'s to report.
    let Ok(items) = dotenvy::from_path_iter(".env") else {
        return Ok(());
    };
    let mut seen = std::collections::HashSet::new();
    for item in items {
        let Ok((name, _)) = item else {
            return Ok(());
        };
        if !seen.insert(name.clone()) {
            let text = std::fs::read_to_string(".env").unwrap_or_default();
            let lines: Vec<String> = text
                .lines()
                .enumerate()
                .filter(|(_, line)| sets(line, &name))
                .map(|(n, _)| (n + 1).to_string())
                .collect();
            return Err(err(
                ".env",
                format!(
                    "sets {name} more than once (lines {}): keep one",
                    lines.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Whether a line of `.env` sets `name` (`NAME=...`, `export NAME=...`, spaces allowed).
fn sets(line: &str, name: &str) -> bool {
    let line = line.trim_start();
    let line = match line.strip_prefix("export") {
        Some(rest) if rest.starts_with(char::is_whitespace) => rest.trim_start(),
        _ => line,
    };
    line.strip_prefix(name)
        .is_some_and(|rest| rest.trim_start().starts_with('='))
}

impl Config {
    /// Load `.env` (if present, without overriding the real environment), then read and validate.
    pub fn from_env() -> Result<Config, ConfigError> {
        load_dotenv()?;
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let v = Vars(lookup);
        let bind_addr = bind_address(&v.string("BIND_ADDR", "127.0.0.1:8080"))?;
        let database_url = v.string("DATABASE_URL", "sqlite://prism-messaging.db");
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            return Err(err(
                "DATABASE_URL",
                "must start with sqlite:// or postgres://",
            ));
        }
        if let Some(rest) = database_url.strip_prefix("sqlite:") {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            if rest.split('?').next().unwrap_or_default().is_empty() {
                return Err(err(
                    "DATABASE_URL",
                    "names no SQLite file: sqlite://PATH, e.g. sqlite://prism-messaging.db",
                ));
            }
        }
        let app_url = v.url("APP_URL", "http://localhost:8080")?;
        let public_url = match v.get("PUBLIC_URL") {
            Some(_) => v.url("PUBLIC_URL", "")?,
            None => app_url.clone(),
        };
        let twilio_account_sid = v.get("TWILIO_ACCOUNT_SID");
        if let Some(sid) = &twilio_account_sid {
            if !is_sid(sid, "AC") {
                return Err(err(
                    "TWILIO_ACCOUNT_SID",
                    "expected AC followed by 32 hex digits",
                ));
            }
        }
        let twilio_messaging_service_sid = v.get("TWILIO_MESSAGING_SERVICE_SID");
        if let Some(sid) = &twilio_messaging_service_sid {
            if !is_sid(sid, "MG") {
                return Err(err(
                    "TWILIO_MESSAGING_SERVICE_SID",
                    "expected MG followed by 32 hex digits",
                ));
            }
        }
        let quiet_hours = match v.get("QUIET_HOURS") {
            None => parse_quiet_hours("21:00-08:00"),
            Some(raw) if raw.eq_ignore_ascii_case("off") || raw.eq_ignore_ascii_case("none") => {
                None
            }
            Some(raw) => match parse_quiet_hours(&raw) {
                // An empty window would silently mean no quiet hours: that is `off`, said so.
                Some(QuietHours { start, end }) if start == end => {
                    return Err(err(
                        "QUIET_HOURS",
                        "the window is empty (it starts where it ends); for none, say off",
                    ))
                }
                Some(window) => Some(window),
                None => {
                    return Err(err(
                        "QUIET_HOURS",
                        "expected HH:MM-HH:MM, e.g. 21:00-08:00, or off",
                    ))
                }
            },
        };
        let log_format = match v.string("LOG_FORMAT", "pretty").as_str() {
            "pretty" => LogFormat::Pretty,
            "json" => LogFormat::Json,
            other => {
                return Err(err(
                    "LOG_FORMAT",
                    format!("expected pretty or json, got {other:?}"),
                ))
            }
        };
        let default_time_zone: Tz = {
            let raw = v.string("DEFAULT_TIME_ZONE", "UTC");
            raw.parse().map_err(|_| {
                err(
                    "DEFAULT_TIME_ZONE",
                    format!("unknown IANA time zone {raw:?}"),
                )
            })?
        };
        let otp_allowed_countries = v
            .string("OTP_ALLOWED_COUNTRIES", "")
            .split(',')
            .map(|c| c.trim().to_ascii_uppercase())
            .filter(|c| !c.is_empty())
            .collect::<Vec<_>>();
        if let Some(bad) = otp_allowed_countries
            .iter()
            .find(|c| !crate::phone::is_region(c))
        {
            return Err(err(
                "OTP_ALLOWED_COUNTRIES",
                format!(
                    "{bad:?} is not the ISO 3166 code of a country with phone numbers \
                     (the United Kingdom is GB)"
                ),
            ));
        }

        let twilio = TwilioSettings {
            account_sid: twilio_account_sid,
            auth_token: v.secret("TWILIO_AUTH_TOKEN"),
            phone_number: v.phone("TWILIO_PHONE_NUMBER")?,
            whatsapp_number: v.phone("TWILIO_WHATSAPP_NUMBER")?,
            messaging_service_sid: twilio_messaging_service_sid,
            api_base: v.url("TWILIO_API_BASE", "https://api.twilio.com")?,
            content_sids: parse_content_sids(&v.string("TWILIO_CONTENT_SIDS", ""))?,
            timeout: std::time::Duration::from_millis(v.number(
                "TWILIO_TIMEOUT_MS",
                15_000,
                100,
                120_000,
            )?),
        };
        let auth = AuthSettings {
            messaging_api_key: v.secret("MESSAGING_API_KEY"),
            cron_secret: v.secret("CRON_SECRET"),
            jwt_secret: v.secret("AUTH_JWT_SECRET"),
            jwks_file: v.get("AUTH_JWKS_FILE"),
            jwks_url: match v.get("AUTH_JWKS_URL") {
                Some(_) => Some(v.url("AUTH_JWKS_URL", "")?),
                None => None,
            },
            issuer: v.get("AUTH_ISSUER"),
            audience: v.get("AUTH_AUDIENCE"),
            user_claim: v.string("AUTH_USER_CLAIM", "sub"),
            metrics_token: v.secret("METRICS_TOKEN"),
        };
        let otp = OtpSettings {
            ttl: std::time::Duration::from_secs(v.number("OTP_TTL_SECONDS", 600, 30, 86_400)?),
            length: v.number("OTP_LENGTH", 6, 4, 10)?,
            max_attempts: v.number("OTP_MAX_ATTEMPTS", 5, 1, 100)?,
            resend_cooldown: std::time::Duration::from_secs(v.number(
                "OTP_RESEND_COOLDOWN_SECONDS",
                30,
                0,
                3_600,
            )?),
            max_sends_per_hour: v.number("OTP_MAX_SENDS_PER_HOUR", 5, 1, 1_000)?,
            max_sends_per_ip_per_hour: v.number(
                "OTP_MAX_SENDS_PER_IP_PER_HOUR",
                30,
                1,
                1_000_000,
            )?,
            allowed_countries: otp_allowed_countries,
            secret: v.secret("OTP_SECRET"),
        };
        let server = ServerSettings {
            bind_addr,
            role: match v.string("INSTANCE_ROLE", "all").as_str() {
                "all" => Role::All,
                "api" => Role::Api,
                "dispatcher" => Role::Dispatcher,
                other => {
                    return Err(err(
                        "INSTANCE_ROLE",
                        format!("expected all, api or dispatcher, got {other:?}"),
                    ))
                }
            },
            trust_forwarded_for: v.bool("TRUST_FORWARDED_FOR", false)?,
            shutdown_grace: std::time::Duration::from_secs(v.number(
                "SHUTDOWN_GRACE_SECONDS",
                20,
                0,
                600,
            )?),
            log_format,
            dev_endpoints: v.bool("DEV_ENDPOINTS", false)? || is_loopback(&bind_addr),
            header_read_timeout: std::time::Duration::from_secs(v.number(
                "HEADER_READ_TIMEOUT_SECONDS",
                10,
                1,
                300,
            )?),
        };
        let messaging = MessagingSettings {
            enabled: v.bool("MESSAGING_ENABLED", true)?,
            mock_mode: v.bool("MESSAGING_MOCK_MODE", true)?,
            clinic_name: clinic_name(&v.string("CLINIC_NAME", "PhysiologicPRISM"))?,
            app_url,
            public_url,
            default_time_zone,
            quiet_hours,
            reminder_late_booking: v.bool("REMINDER_LATE_BOOKING", false)?,
        };
        let rate_per_second = v.number("DISPATCH_RATE_PER_SECOND", 10, 0, 10_000)?;
        // In flight at once, by default: paced, a few seconds of the sender's slots (each claimed
        // message takes its slot at once, so more would only make a later message, say a retried
        // code, wait behind them); unpaced, enough to hide the provider's latency (Twilio takes
        // 100-300 ms to answer a send: 32 in flight would cap dispatch near 150 msg/s) and to
        // give the database batches to write together.
        let batch_size_default = if rate_per_second == 0 {
            UNPACED_BATCH_SIZE
        } else {
            PACED_BATCH_SIZE
        };
        let dispatch = DispatchSettings {
            batch_size: v.number("DISPATCH_BATCH_SIZE", batch_size_default, 1, 1_000)?,
            lease: chrono::Duration::seconds(v.number("DISPATCH_LEASE_SECONDS", 120, 1, 3_600)?),
            max_attempts: v.number("DISPATCH_MAX_ATTEMPTS", 5, 1, 100)?,
            max_age: chrono::Duration::seconds(v.number(
                "DISPATCH_MAX_AGE_SECONDS",
                86_400,
                60,
                30 * 86_400,
            )?),
            rate_per_second,
            lookup_deadline: std::time::Duration::from_secs(v.number(
                "DISPATCH_LOOKUP_DEADLINE_SECONDS",
                30,
                1,
                600,
            )?),
        };
        let web = WebSettings {
            session_ttl: std::time::Duration::from_secs(v.number(
                "SESSION_TTL_SECONDS",
                1800,
                60,
                86_400,
            )?),
            cors_allowed_origins: parse_origins(&v.string("CORS_ALLOWED_ORIGINS", ""))?,
        };
        let retention = RetentionSettings {
            // A reminder's message keeps its reminder from going again while its window is open
            // (the reminder log row goes with the message): up to five days, for the seven-day
            // subscription reminder (found by review: with 1-6 days it went again each day).
            messages_days: v.number("RETENTION_MESSAGES_DAYS", 365, 7, 36_500)?,
            inbound_days: v.number("RETENTION_INBOUND_DAYS", 90, 1, 36_500)?,
            reminder_log_days: v.number("RETENTION_REMINDER_LOG_DAYS", 90, 1, 36_500)?,
            audit_days: v.number("RETENTION_AUDIT_DAYS", 2555, 1, 36_500)?,
            unmatched_callbacks_days: v.number(
                "RETENTION_UNMATCHED_CALLBACKS_DAYS",
                1,
                1,
                36_500,
            )?,
        };
        let encryption = crate::vault::KeySettings {
            current: v.key("DATA_ENCRYPTION_KEY")?,
            old: v
                .get("DATA_ENCRYPTION_OLD_KEYS")
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(|k| {
                    crate::vault::Key::parse(k).map_err(|problem| {
                        err("DATA_ENCRYPTION_OLD_KEYS", format!("a key {problem}"))
                    })
                })
                .collect::<Result<_, _>>()?,
            blind_index: v.key("BLIND_INDEX_KEY")?,
        };
        if encryption.current.is_none() && !encryption.old.is_empty() {
            return Err(err(
                "DATA_ENCRYPTION_OLD_KEYS",
                "old keys need a current DATA_ENCRYPTION_KEY to rotate to",
            ));
        }
        let config = Config {
            server,
            database_url,
            messaging,
            twilio,
            auth,
            otp,
            web,
            retention,
            encryption,
            dispatch,
        };
        if !config.messaging.mock_mode {
            config.twilio.live()?;
        }
        // A claim must outlive the provider call it covers, or another dispatcher could take the
        // message over while the call is still in flight.
        if config.dispatch.lease.num_milliseconds()
            < config.twilio.timeout.as_millis() as i64 + 1_000
        {
            return Err(err(
                "DISPATCH_LEASE_SECONDS",
                "must be at least a second longer than TWILIO_TIMEOUT_MS",
            ));
        }
        refuse_unsafe_settings(&v, &config)?;
        Ok(config)
    }
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// Minimum lengths of the keys and secrets: a short one can be guessed or brute-forced offline
/// (an HS256 token is an offline oracle for its secret).
const SECRET_MIN_CHARS: [(&str, usize); 5] = [
    ("AUTH_JWT_SECRET", 32),
    ("CRON_SECRET", 32),
    ("OTP_SECRET", 32),
    ("MESSAGING_API_KEY", 16),
    ("METRICS_TOKEN", 16),
];

/// Settings that parse but would run the service unsafely: refused at start.
fn refuse_unsafe_settings<F: Fn(&str) -> Option<String>>(
    v: &Vars<F>,
    config: &Config,
) -> Result<(), ConfigError> {
    // Credentials present but the mode left to its default: the operator most likely meant to go
    // live, and mock mode would answer OTPs with success and show the codes on /dev/outbox.
    if config.twilio.account_sid.is_some() && v.get("MESSAGING_MOCK_MODE").is_none() {
        return Err(err(
            "MESSAGING_MOCK_MODE",
            "TWILIO_ACCOUNT_SID is set, so set MESSAGING_MOCK_MODE explicitly: false to send through Twilio, or true to keep the mock provider",
        ));
    }
    // A key set (Firebase's is shared by every Firebase project) proves only who signed a token,
    // not that it was issued for this project.
    let auth = &config.auth;
    if auth.jwks_file.is_some() || auth.jwks_url.is_some() {
        for (variable, value) in [
            ("AUTH_ISSUER", &auth.issuer),
            ("AUTH_AUDIENCE", &auth.audience),
        ] {
            if value.is_none() {
                return Err(err(
                    variable,
                    "required when AUTH_JWKS_FILE or AUTH_JWKS_URL is set: without AUTH_ISSUER and AUTH_AUDIENCE any project signed by the same keys could call this service",
                ));
            }
        }
    }
    for (variable, min) in SECRET_MIN_CHARS {
        let Some(value) = v.get(variable) else {
            continue;
        };
        if value.chars().count() < min {
            return Err(err(
                variable,
                format!("must be at least {min} characters (a long random value, e.g. from `openssl rand -hex 32`)"),
            ));
        }
    }
    Ok(())
}

impl TwilioSettings {
    /// The Twilio settings live mode needs, or the first one missing.
    pub fn live(&self) -> Result<TwilioConfig, ConfigError> {
        let account_sid = self.account_sid.clone().ok_or_else(|| {
            err(
                "TWILIO_ACCOUNT_SID",
                "required when MESSAGING_MOCK_MODE=false",
            )
        })?;
        let auth_token = self.auth_token.clone().ok_or_else(|| {
            err(
                "TWILIO_AUTH_TOKEN",
                "required when MESSAGING_MOCK_MODE=false",
            )
        })?;
        if self.phone_number.is_none() && self.messaging_service_sid.is_none() {
            return Err(err(
                "TWILIO_PHONE_NUMBER",
                "TWILIO_PHONE_NUMBER or TWILIO_MESSAGING_SERVICE_SID is required when MESSAGING_MOCK_MODE=false",
            ));
        }
        Ok(TwilioConfig {
            account_sid,
            auth_token,
            phone_number: self.phone_number.clone(),
            whatsapp_number: self.whatsapp_number.clone(),
            messaging_service_sid: self.messaging_service_sid.clone(),
            api_base: self.api_base.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_start_in_mock_mode_on_sqlite() {
        let c = config(&[]).unwrap();
        assert!(c.messaging.mock_mode && c.messaging.enabled);
        assert_eq!(c.database_url, "sqlite://prism-messaging.db");
        assert_eq!(c.server.bind_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.messaging.public_url, "http://localhost:8080");
        assert_eq!(c.otp.ttl.as_secs(), 600);
        assert_eq!(c.messaging.default_time_zone, chrono_tz::UTC);
        assert!(!c.messaging.reminder_late_booking);
        let late = config(&[("REMINDER_LATE_BOOKING", "true")]).unwrap();
        assert!(late.messaging.reminder_late_booking);
    }

    #[test]
    fn messages_in_flight_default_to_the_pacing() {
        let in_flight = |pairs: &[(&str, &str)]| config(pairs).unwrap().dispatch.batch_size;
        // Paced (the default 10/s): a few seconds of slots.
        assert_eq!(in_flight(&[]), PACED_BATCH_SIZE);
        assert_eq!(
            in_flight(&[("DISPATCH_RATE_PER_SECOND", "50")]),
            PACED_BATCH_SIZE
        );
        // Unpaced: enough to hide the provider's latency.
        assert_eq!(
            in_flight(&[("DISPATCH_RATE_PER_SECOND", "0")]),
            UNPACED_BATCH_SIZE
        );
        // Whatever the operator sets wins, paced or not.
        for rate in ["0", "10"] {
            assert_eq!(
                in_flight(&[
                    ("DISPATCH_RATE_PER_SECOND", rate),
                    ("DISPATCH_BATCH_SIZE", "64")
                ]),
                64
            );
        }
        assert!(config(&[("DISPATCH_BATCH_SIZE", "0")]).is_err());
    }

    /// Values that worked before the stricter checks and are right still start (review).
    #[test]
    fn sound_values_near_the_refused_ones_are_taken() {
        let app_url = |v: &str| config(&[("APP_URL", v)]).map(|c| c.messaging.app_url);
        assert_eq!(
            app_url("https://app.example.com/#/").unwrap(),
            "https://app.example.com/#"
        );
        assert_eq!(
            app_url("https://app.example.com/clinic/").unwrap(),
            "https://app.example.com/clinic"
        );
        assert!(config(&[("CLINIC_NAME", "Dr O'Brien & Associés Physiothérapie")]).is_ok());
        assert!(config(&[(
            "TWILIO_CONTENT_SIDS",
            "otp=HX00000000000000000000000000000000,otp=HX00000000000000000000000000000000",
        )])
        .is_ok());
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("BIND_ADDR", "nowhere")], "BIND_ADDR"),
            (&[("MESSAGING_ENABLED", "maybe")], "MESSAGING_ENABLED"),
            (&[("DATABASE_URL", "mysql://x")], "DATABASE_URL"),
            // No file: SQLite would give each connection a private database of its own.
            (&[("DATABASE_URL", "sqlite://")], "DATABASE_URL"),
            (&[("DATABASE_URL", "sqlite:")], "DATABASE_URL"),
            (&[("OTP_LENGTH", "3")], "OTP_LENGTH"),
            (&[("QUIET_HOURS", "late")], "QUIET_HOURS"),
            (&[("QUIET_HOURS", "21:00-21:00")], "QUIET_HOURS"),
            (
                &[("APP_URL", "https://app.example.com/c?ref=sms")],
                "APP_URL",
            ),
            (
                &[("PUBLIC_URL", "https://user:pw@msg.example.com")],
                "PUBLIC_URL",
            ),
            (&[("CLINIC_NAME", "Clinic {link}")], "CLINIC_NAME"),
            (
                &[(
                    "CLINIC_NAME",
                    "The Physiotherapy, Sports Injury and Rehabilitation Clinic of Leeds, \
                     Bradford, Wakefield and the surrounding area",
                )],
                "CLINIC_NAME",
            ),
            (&[("APP_URL", "https://app.example.com/#/pay")], "APP_URL"),
            (&[("APP_URL", "https://app.example.com/a b")], "APP_URL"),
            (
                &[("APP_URL", "https://app.example.com/clinic/..")],
                "APP_URL",
            ),
            (&[("APP_URL", "https://@app.example.com")], "APP_URL"),
            (&[("APP_URL", "https://bücher.example/app")], "APP_URL"),
            (&[("CLINIC_NAME", "Dr\u{2028}X")], "CLINIC_NAME"),
            (
                &[(
                    "TWILIO_CONTENT_SIDS",
                    "otp=HX00000000000000000000000000000000,otp=HX11111111111111111111111111111111",
                )],
                "TWILIO_CONTENT_SIDS",
            ),
            (
                &[("TWILIO_CONTENT_SIDS", "nope=HX00")],
                "TWILIO_CONTENT_SIDS",
            ),
            (
                &[("DEFAULT_TIME_ZONE", "Mars/Olympus")],
                "DEFAULT_TIME_ZONE",
            ),
            (&[("MESSAGING_MOCK_MODE", "false")], "TWILIO_ACCOUNT_SID"),
            (
                &[
                    ("DISPATCH_LEASE_SECONDS", "10"),
                    ("TWILIO_TIMEOUT_MS", "15000"),
                ],
                "DISPATCH_LEASE_SECONDS",
            ),
            (&[("INSTANCE_ROLE", "worker")], "INSTANCE_ROLE"),
            (
                &[("REMINDER_LATE_BOOKING", "soon")],
                "REMINDER_LATE_BOOKING",
            ),
            // A zero retention period would delete everything at the next cleanup.
            (
                &[("RETENTION_MESSAGES_DAYS", "0")],
                "RETENTION_MESSAGES_DAYS",
            ),
            (
                &[("RETENTION_MESSAGES_DAYS", "6")],
                "RETENTION_MESSAGES_DAYS",
            ),
            (&[("RETENTION_AUDIT_DAYS", "0")], "RETENTION_AUDIT_DAYS"),
        ];
        for (pairs, variable) in cases {
            let e = config(pairs).unwrap_err();
            assert_eq!(e.variable, *variable, "{e}");
        }
    }

    const SID: &str = "AC0123456789abcdef0123456789abcdef";

    #[test]
    fn twilio_credentials_need_an_explicit_mode() {
        for pairs in [
            vec![("TWILIO_ACCOUNT_SID", SID)],
            vec![("TWILIO_ACCOUNT_SID", SID), ("MESSAGING_MOCK_MODE", " ")],
        ] {
            let e = config(&pairs).unwrap_err();
            assert_eq!(e.variable, "MESSAGING_MOCK_MODE", "{pairs:?}");
            let text = e.to_string();
            assert!(
                text.contains("false")
                    && text.contains("true")
                    && text.contains("TWILIO_ACCOUNT_SID"),
                "{text}"
            );
        }
        // Said explicitly, the mock is kept.
        let c = config(&[("TWILIO_ACCOUNT_SID", SID), ("MESSAGING_MOCK_MODE", "true")]).unwrap();
        assert!(c.messaging.mock_mode);
        // Without credentials the default stays mock mode.
        assert!(config(&[]).unwrap().messaging.mock_mode);
    }

    #[test]
    fn a_key_set_needs_issuer_and_audience() {
        for source in ["AUTH_JWKS_FILE", "AUTH_JWKS_URL"] {
            let value = if source == "AUTH_JWKS_URL" {
                "https://keys.example.com/jwks"
            } else {
                "/etc/prism/jwks.json"
            };
            let e = config(&[(source, value)]).unwrap_err();
            assert_eq!(e.variable, "AUTH_ISSUER", "{source}");
            let e =
                config(&[(source, value), ("AUTH_ISSUER", "https://issuer.example")]).unwrap_err();
            assert_eq!(e.variable, "AUTH_AUDIENCE", "{source}");
            let e = config(&[(source, value), ("AUTH_AUDIENCE", "prism")]).unwrap_err();
            assert_eq!(e.variable, "AUTH_ISSUER", "{source}");
            config(&[
                (source, value),
                ("AUTH_ISSUER", "https://issuer.example"),
                ("AUTH_AUDIENCE", "prism"),
            ])
            .unwrap();
        }
        // HS256 alone needs neither.
        config(&[("AUTH_JWT_SECRET", &"s".repeat(32))]).unwrap();
    }

    #[test]
    fn short_secrets_are_refused_naming_the_variable() {
        for (variable, min) in [
            ("AUTH_JWT_SECRET", 32),
            ("CRON_SECRET", 32),
            ("OTP_SECRET", 32),
            ("MESSAGING_API_KEY", 16),
            ("METRICS_TOKEN", 16),
        ] {
            let short = "k".repeat(min - 1);
            let e = config(&[(variable, short.as_str())]).unwrap_err();
            assert_eq!(e.variable, variable);
            assert!(e.to_string().contains(&format!("at least {min}")), "{e}");
            assert!(
                !e.to_string().contains(&short),
                "the value is not echoed: {e}"
            );
            // Characters, not bytes: 31 two-byte characters are still too short.
            if min == 32 {
                let e = config(&[(variable, "é".repeat(31).as_str())]).unwrap_err();
                assert_eq!(e.variable, variable);
            }
            config(&[(variable, "k".repeat(min).as_str())]).unwrap();
        }
    }

    #[test]
    fn dev_endpoints_only_on_loopback_unless_asked() {
        let dev = |pairs: &[(&str, &str)]| config(pairs).unwrap().server.dev_endpoints;
        assert!(dev(&[]));
        assert!(dev(&[("BIND_ADDR", "127.0.0.1:9000")]));
        assert!(dev(&[("BIND_ADDR", "[::1]:9000")]));
        assert!(dev(&[("BIND_ADDR", "[::ffff:127.0.0.1]:9000")]));
        assert!(!dev(&[("BIND_ADDR", "0.0.0.0:8080")]));
        assert!(!dev(&[("BIND_ADDR", "[::]:8080")]));
        assert!(!dev(&[("BIND_ADDR", "10.0.0.5:8080")]));
        assert!(!dev(&[
            ("BIND_ADDR", "0.0.0.0:8080"),
            ("DEV_ENDPOINTS", "false")
        ]));
        assert!(dev(&[
            ("BIND_ADDR", "0.0.0.0:8080"),
            ("DEV_ENDPOINTS", "true")
        ]));
        let e = config(&[("DEV_ENDPOINTS", "sometimes")]).unwrap_err();
        assert_eq!(e.variable, "DEV_ENDPOINTS");
    }

    #[test]
    fn bind_addr_takes_an_address_or_a_host_name() {
        let local = config(&[("BIND_ADDR", "localhost:9162")]).unwrap();
        assert!(local.server.bind_addr.ip().is_loopback());
        assert!(
            local.server.bind_addr.is_ipv4(),
            "127.0.0.1 rather than ::1"
        );
        assert_eq!(local.server.bind_addr.port(), 9162);
        assert!(
            local.server.dev_endpoints,
            "localhost is a loopback address"
        );
        for bad in [
            "somewhere",
            "localhost",
            "localhost:port",
            "127.0.0.1:99999",
        ] {
            let e = config(&[("BIND_ADDR", bad)]).unwrap_err();
            assert_eq!(e.variable, "BIND_ADDR", "{bad}");
        }
    }

    #[test]
    fn allowed_countries_are_real_regions() {
        for bad in ["UK", "XX", "EU", "IND"] {
            let e = config(&[("OTP_ALLOWED_COUNTRIES", bad)]).unwrap_err();
            assert_eq!(e.variable, "OTP_ALLOWED_COUNTRIES", "{bad}");
            assert!(e.problem.contains("GB"), "{bad}: {}", e.problem);
        }
        let ok = config(&[("OTP_ALLOWED_COUNTRIES", "gb, IN ,us")]).unwrap();
        assert_eq!(ok.otp.allowed_countries, ["GB", "IN", "US"]);
    }

    #[test]
    fn header_read_timeout_defaults_to_ten_seconds() {
        assert_eq!(
            config(&[]).unwrap().server.header_read_timeout.as_secs(),
            10
        );
        assert_eq!(
            config(&[("HEADER_READ_TIMEOUT_SECONDS", "2")])
                .unwrap()
                .server
                .header_read_timeout
                .as_secs(),
            2
        );
        let e = config(&[("HEADER_READ_TIMEOUT_SECONDS", "0")]).unwrap_err();
        assert_eq!(e.variable, "HEADER_READ_TIMEOUT_SECONDS");
    }

    #[test]
    fn live_mode_needs_credentials_and_a_sender() {
        let sid = "AC0123456789abcdef0123456789abcdef";
        let e = config(&[
            ("MESSAGING_MOCK_MODE", "false"),
            ("TWILIO_ACCOUNT_SID", sid),
            ("TWILIO_AUTH_TOKEN", "t"),
        ])
        .unwrap_err();
        assert_eq!(e.variable, "TWILIO_PHONE_NUMBER");
        let c = config(&[
            ("MESSAGING_MOCK_MODE", "false"),
            ("TWILIO_ACCOUNT_SID", sid),
            ("TWILIO_AUTH_TOKEN", "super-secret-token"),
            ("TWILIO_PHONE_NUMBER", "+14155552671"),
        ])
        .unwrap();
        assert!(!format!("{c:?}").contains("super-secret-token"));
    }
}
