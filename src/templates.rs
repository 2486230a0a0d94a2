//! The registry of named, PHI-safe message templates.
//!
//! Every outbound message is one of these templates. A template declares its variables and each
//! variable's type; the types are narrow on purpose (a code, a date, an amount, a link into the
//! app...) so that no variable can carry free clinical text: details stay behind a link to
//! `APP_URL`. The clinic's name and the app URL are filled in by the service, not by callers.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::AppError;
use crate::segments::{self, Encoding};

/// What a variable may hold. Each type has a strict format; anything else is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VarType {
    /// 4 to 10 digits.
    Code,
    /// `HH:MM`, 24-hour clock.
    Time,
    /// `YYYY-MM-DD`; rendered as `12 Jan 2027`.
    Date,
    /// A number with up to two decimals, optionally after an ISO 4217 code: `INR 499.00`.
    Amount,
    /// A path into the app (`/appointments/123`) or an absolute URL under `APP_URL`.
    Link,
    /// A given name: letters, spaces, `-`, `'` and `.`, at most 30 characters.
    ShortName,
    /// An instant, RFC 3339 (`2027-01-12T05:00:00Z`, `2027-01-12T10:30:00+05:30`). Rendered
    /// when the message is sent, in the patient's time zone: `today at 10:30`, `tomorrow at
    /// 10:30` or `on Wednesday 13 Jan 2027 at 10:30`, with the zone's abbreviation (`IST`) when
    /// it is not `DEFAULT_TIME_ZONE`.
    Datetime,
    /// A day: an RFC 3339 instant (its day in the patient's time zone) or `YYYY-MM-DD`. Rendered
    /// when the message is sent: `today`, `tomorrow` or `on Wednesday 13 Jan 2027`.
    Day,
}

/// What a template is for: it decides whether quiet hours hold it back and whether it needs
/// marketing consent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Planned by the service or the host app ahead of time (appointment and follow-up
    /// reminders, subscription reminders): held back by quiet hours.
    Scheduled,
    /// Caused by the patient's own action just now (a payment received or failed): goes at once.
    Transactional,
    /// Promotional: marketing consent needed, held back by quiet hours.
    Marketing,
    /// A one-time passcode the patient asked for: goes at once.
    Otp,
    /// A reply to the patient's own keyword (STOP, START, HELP): goes at once; never listed.
    KeywordReply,
}

impl Kind {
    /// Quiet hours hold back what the patient did not just ask for.
    pub fn held_by_quiet_hours(self) -> bool {
        matches!(self, Kind::Scheduled | Kind::Marketing)
    }

    pub fn category(self) -> Category {
        match self {
            Kind::Scheduled | Kind::Transactional | Kind::Otp => Category::Transactional,
            Kind::Marketing => Category::Marketing,
            Kind::KeywordReply => Category::KeywordReply,
        }
    }
}

/// Whether a template needs marketing consent on top of the channel's consent (follows from its
/// [`Kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Service messages the patient expects (reminders, payments, codes): channel consent only.
    Transactional,
    /// Promotional messages: channel consent and marketing consent. Never implied.
    Marketing,
    /// Replies to the patient's own keyword (STOP, START, HELP): always allowed on that channel.
    KeywordReply,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VarSpec {
    pub name: &'static str,
    #[serde(rename = "type")]
    pub var_type: VarType,
}

#[derive(Debug)]
pub struct Template {
    pub name: &'static str,
    pub kind: Kind,
    pub variables: &'static [VarSpec],
    /// `{name}` placeholders for the declared variables, plus `{clinic}` and `{app_url}`.
    pub body: &'static str,
}

const fn var(name: &'static str, var_type: VarType) -> VarSpec {
    VarSpec { name, var_type }
}

pub static TEMPLATES: &[Template] = &[
    Template {
        name: "otp",
        kind: Kind::Otp,
        variables: &[var("code", VarType::Code)],
        body: "{clinic}: your verification code is {code}. Do not share it with anyone.",
    },
    Template {
        name: "appointment_reminder_24h",
        kind: Kind::Scheduled,
        variables: &[
            var("starts_at", VarType::Datetime),
            var("link", VarType::Link),
        ],
        body: "{clinic}: reminder of your appointment {starts_at}. Details: {link} Reply STOP to opt out.",
    },
    Template {
        name: "appointment_reminder_2h",
        kind: Kind::Scheduled,
        variables: &[
            var("starts_at", VarType::Datetime),
            var("link", VarType::Link),
        ],
        body: "{clinic}: your appointment is {starts_at}. Details: {link}",
    },
    Template {
        name: "follow_up_reminder",
        kind: Kind::Scheduled,
        variables: &[var("due_at", VarType::Day), var("link", VarType::Link)],
        body: "{clinic}: you have a follow-up due {due_at}. Details: {link}",
    },
    // Both subscription templates are scheduled messages (the `subscription-reminders` sweep
    // sends them; quiet hours hold them). The host app may also send them itself.
    // `date` is a day: the sweep gives the instant, rendered "tomorrow" or "on Wednesday 13 Jan
    // 2027" in the patient's zone when sent; a host app may give `YYYY-MM-DD`.
    Template {
        name: "subscription_renewal",
        kind: Kind::Scheduled,
        variables: &[var("date", VarType::Day), var("link", VarType::Link)],
        body: "{clinic}: your subscription renews {date}. Manage it here: {link}",
    },
    Template {
        name: "subscription_expiring",
        kind: Kind::Scheduled,
        variables: &[var("date", VarType::Day), var("link", VarType::Link)],
        body: "{clinic}: your subscription expires {date}. Renew or manage it here: {link}",
    },
    Template {
        name: "payment_received",
        kind: Kind::Transactional,
        variables: &[var("amount", VarType::Amount), var("date", VarType::Date)],
        body: "{clinic}: we received your payment of {amount} on {date}. Thank you.",
    },
    Template {
        name: "payment_failed",
        kind: Kind::Transactional,
        variables: &[var("amount", VarType::Amount), var("link", VarType::Link)],
        body: "{clinic}: your payment of {amount} did not go through. Update your payment details: {link}",
    },
    Template {
        name: "opt_out_confirmation",
        kind: Kind::KeywordReply,
        variables: &[],
        body: "{clinic}: you are unsubscribed and will get no more messages here. Your appointments are not changed. Reply START to resubscribe.",
    },
    Template {
        name: "opt_in_confirmation",
        kind: Kind::KeywordReply,
        variables: &[],
        body: "{clinic}: you are subscribed to messages again. Reply STOP to unsubscribe, HELP for help.",
    },
    Template {
        name: "help",
        kind: Kind::KeywordReply,
        variables: &[],
        body: "{clinic}: messages about your appointments and account. Help: {app_url} Reply STOP to unsubscribe.",
    },
    Template {
        name: "clinic_news",
        kind: Kind::Marketing,
        variables: &[var("name", VarType::ShortName), var("link", VarType::Link)],
        body: "{clinic}: hi {name}, there is news from your clinic: {link} Reply STOP to opt out.",
    },
];

pub fn find(name: &str) -> Option<&'static Template> {
    TEMPLATES.iter().find(|t| t.name == name)
}

/// Values every template may use, from configuration rather than from callers.
#[derive(Debug, Clone)]
pub struct RenderContext {
    pub clinic_name: String,
    /// `APP_URL` without a trailing slash.
    pub app_url: String,
}

/// When and where a message is rendered for sending: `datetime` and `day` values read as
/// "today", "tomorrow" or a weekday and date in `zone` as of `now`, so a message held back (by
/// quiet hours, a retry) still tells the truth when it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderAt {
    pub now: DateTime<Utc>,
    /// The message's zone: the item's, else the patient's, else `DEFAULT_TIME_ZONE`.
    pub zone: Tz,
    /// `DEFAULT_TIME_ZONE`: times in any other zone carry its abbreviation.
    pub default_zone: Tz,
}

impl RenderAt {
    /// `today`, `tomorrow` or `on Wednesday 13 Jan 2027`: `day` as seen from `now`, both in the
    /// message's zone.
    pub fn day_word(&self, day: NaiveDate) -> String {
        let today = self.now.with_timezone(&self.zone).date_naive();
        if day == today {
            "today".to_string()
        } else if today.succ_opt() == Some(day) {
            "tomorrow".to_string()
        } else {
            day.format("on %A %-d %b %Y").to_string()
        }
    }

    /// `today at 10:30`, `tomorrow at 10:30 IST`, `on Wednesday 13 Jan 2027 at 10:30 BST`: the
    /// abbreviation only when the zone is not `DEFAULT_TIME_ZONE`.
    pub fn day_and_time(&self, at: DateTime<Utc>) -> String {
        let local = at.with_timezone(&self.zone);
        let mut text = format!(
            "{} at {}",
            self.day_word(local.date_naive()),
            local.format("%H:%M")
        );
        if self.zone != self.default_zone {
            text.push(' ');
            text.push_str(&local.format("%Z").to_string());
        }
        text
    }
}

/// A rendered body with the encoding and segment count carriers will bill for.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub body: String,
    pub encoding: Encoding,
    pub segments: u32,
}

/// Variables after validation, in the template's declared order, already in rendered form.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidVariables(pub Vec<(&'static str, String)>);

impl ValidVariables {
    /// Twilio's `ContentVariables` for an approved WhatsApp template: `{"1": .., "2": ..}` in the
    /// template's declared order.
    pub fn content_variables_json(&self) -> String {
        let map: BTreeMap<String, &str> = self
            .0
            .iter()
            .enumerate()
            .map(|(i, (_, v))| ((i + 1).to_string(), v.as_str()))
            .collect();
        serde_json::to_string(&map).unwrap_or_else(|_| "{}".to_string())
    }
}

fn variable_error(message: String) -> AppError {
    AppError::bad_request("invalid_template_variables", message)
}

impl Template {
    /// Whether it needs marketing consent.
    pub fn category(&self) -> Category {
        self.kind.category()
    }

    /// Check `variables` (a JSON object) against the declaration: no unknown, no missing, every
    /// value a string of the declared type. `datetime` and `day` values are kept as checked (they
    /// are rendered only for sending, see [`Template::validate_at`]).
    pub fn validate(
        &self,
        variables: &Value,
        ctx: &RenderContext,
    ) -> Result<ValidVariables, AppError> {
        self.check(variables, ctx, None)
    }

    /// [`Template::validate`], with `datetime` and `day` values rendered for sending at `at`.
    pub fn validate_at(
        &self,
        variables: &Value,
        ctx: &RenderContext,
        at: &RenderAt,
    ) -> Result<ValidVariables, AppError> {
        self.check(variables, ctx, Some(at))
    }

    fn check(
        &self,
        variables: &Value,
        ctx: &RenderContext,
        at: Option<&RenderAt>,
    ) -> Result<ValidVariables, AppError> {
        let empty = Map::new();
        let object = match variables {
            Value::Object(map) => map,
            Value::Null => &empty,
            _ => return Err(variable_error("variables must be a JSON object".into())),
        };
        if let Some(unknown) = object
            .keys()
            .find(|k| !self.variables.iter().any(|v| v.name == *k))
        {
            return Err(variable_error(format!(
                "template {} has no variable named {unknown:?}",
                self.name
            )));
        }
        let mut valid = Vec::with_capacity(self.variables.len());
        for spec in self.variables {
            let raw = match object.get(spec.name) {
                None | Some(Value::Null) => {
                    return Err(variable_error(format!(
                        "template {} needs variable {:?}",
                        self.name, spec.name
                    )))
                }
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) if spec.var_type == VarType::Amount => n.to_string(),
                Some(_) => {
                    return Err(variable_error(format!(
                        "variable {:?} must be a string",
                        spec.name
                    )))
                }
            };
            let rendered = check_value(spec.var_type, raw.trim(), ctx, at).ok_or_else(|| {
                variable_error(format!(
                    "variable {:?} is not a valid {}",
                    spec.name,
                    type_description(spec.var_type)
                ))
            })?;
            valid.push((spec.name, rendered));
        }
        Ok(ValidVariables(valid))
    }

    pub fn render(&self, vars: &ValidVariables, ctx: &RenderContext) -> Rendered {
        let mut body = self
            .body
            .replace("{clinic}", &ctx.clinic_name)
            .replace("{app_url}", &ctx.app_url);
        for (name, value) in &vars.0 {
            body = body.replace(&format!("{{{name}}}"), value);
        }
        let info = segments::analyze(&body);
        Rendered {
            body,
            encoding: info.encoding,
            segments: info.segments,
        }
    }
}

fn type_description(t: VarType) -> &'static str {
    match t {
        VarType::Code => "code (4 to 10 digits)",
        VarType::Time => "time (HH:MM)",
        VarType::Date => "date (YYYY-MM-DD)",
        VarType::Amount => "amount (e.g. 499.00 or INR 499.00: an ISO 4217 currency code)",
        VarType::Link => "link (a path like /appointments/123 or a URL under APP_URL)",
        VarType::ShortName => {
            "short name (letters, spaces, '-' and ', at most 30 characters; no dots)"
        }
        VarType::Datetime => "time (RFC 3339, e.g. 2027-01-12T10:30:00+05:30)",
        VarType::Day => "day (YYYY-MM-DD or an RFC 3339 time)",
    }
}

/// An RFC 3339 instant as this service writes and reads it: `YYYY-MM-DDTHH:MM:SS`, optional
/// fraction, then `Z` or `+HH:MM`/`-HH:MM`. Stricter than chrono alone (no lower-case `t`, no
/// space), so the published pattern says exactly what is accepted.
fn parse_instant(raw: &str) -> Option<DateTime<Utc>> {
    let b = raw.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        b.get(range.clone())
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    };
    let shape = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !shape {
        return None;
    }
    let mut rest = &raw[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let n = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 || n > 9 {
            return None;
        }
        rest = &fraction[n..];
    }
    let zone_ok = rest == "Z"
        || (rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':'
            && rest
                .bytes()
                .enumerate()
                .all(|(i, c)| matches!(i, 0 | 3) || c.is_ascii_digit()));
    if !zone_ok {
        return None;
    }
    DateTime::parse_from_rfc3339(raw)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The years a message's date or time may be in: a receipt, a reminder or a renewal is about
/// now, and `0000-01-01` or `9999-12-31` is a client's placeholder or bug, not something to tell
/// a patient.
const PLAUSIBLE_YEARS: std::ops::RangeInclusive<i32> = 1900..=2199;

fn plausible(date: NaiveDate) -> Option<NaiveDate> {
    PLAUSIBLE_YEARS.contains(&date.year()).then_some(date)
}

/// A `datetime` value: rendered for sending, or kept as given (trimmed) when only checked.
fn check_datetime(raw: &str, at: Option<&RenderAt>) -> Option<String> {
    let instant = parse_instant(raw)?;
    plausible(instant.date_naive())?;
    Some(match at {
        Some(at) => at.day_and_time(instant),
        None => raw.to_string(),
    })
}

/// A `day` value: `YYYY-MM-DD` is that day; an instant is its day in the message's zone.
fn check_day(raw: &str, at: Option<&RenderAt>) -> Option<String> {
    let day = if raw.len() == 10 {
        Err(plausible(NaiveDate::parse_from_str(raw, "%Y-%m-%d").ok()?)?)
    } else {
        let instant = parse_instant(raw)?;
        plausible(instant.date_naive())?;
        Ok(instant)
    };
    let Some(at) = at else {
        return Some(raw.to_string());
    };
    let day = match day {
        Err(date) => date,
        Ok(instant) => instant.with_timezone(&at.zone).date_naive(),
    };
    Some(at.day_word(day))
}

/// Validate one value and return its rendered form, or `None` when it is not of the type.
/// `datetime` and `day` values are rendered only with `at` (for sending).
fn check_value(
    t: VarType,
    raw: &str,
    ctx: &RenderContext,
    at: Option<&RenderAt>,
) -> Option<String> {
    match t {
        VarType::Datetime => check_datetime(raw, at),
        VarType::Day => check_day(raw, at),
        VarType::Code => {
            let ok = (4..=10).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_digit());
            ok.then(|| raw.to_string())
        }
        VarType::Time => {
            let ok = raw.len() == 5 && NaiveTime::parse_from_str(raw, "%H:%M").is_ok();
            ok.then(|| raw.to_string())
        }
        VarType::Date => NaiveDate::parse_from_str(raw, "%Y-%m-%d")
            .ok()
            .filter(|_| raw.len() == 10)
            .and_then(plausible)
            .map(|d| d.format("%-d %b %Y").to_string()),
        // The currency list holds when a message is queued; at send time the older rule (any
        // three capitals) still lets through what was queued under it (found by review).
        VarType::Amount => check_amount(raw, at.is_none()),
        VarType::Link => check_link(raw, &ctx.app_url),
        // No dots, slashes or `@`: phones turn `secure-pay.evil.io` into a link. No run of more
        // than four spaces: WhatsApp refuses such a template variable.
        VarType::ShortName => {
            let ok = !raw.is_empty()
                && raw.chars().count() <= 30
                && raw.chars().any(char::is_alphabetic)
                && raw
                    .chars()
                    .all(|c| c.is_alphabetic() || matches!(c, ' ' | '-' | '\''))
                && !raw.contains("     ");
            ok.then(|| raw.to_string())
        }
    }
}

/// ISO 4217's current currency codes (funds and metals left out).
const CURRENCIES: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD",
    "CDF", "CHF", "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD",
    "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ",
    "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD",
    "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR",
    "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR",
    "MWK", "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN",
    "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR",
    "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB",
    "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS",
    "VED", "VES", "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW",
    "ZWG",
];

fn check_amount(raw: &str, listed_currency: bool) -> Option<String> {
    let (currency, number) = match raw.split_once(' ') {
        Some((cur, num)) => (Some(cur), num),
        None => (None, raw),
    };
    // A currency code from ISO 4217's list, not any three capitals: `HIV 1.00` would carry a
    // clinical word (found by review).
    let known = |cur: &str| match listed_currency {
        true => CURRENCIES.contains(&cur),
        false => cur.len() == 3 && cur.bytes().all(|b| b.is_ascii_uppercase()),
    };
    if currency.is_some_and(|cur| !known(cur)) {
        return None;
    }
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (number, None),
    };
    let whole_ok = (1..=9).contains(&whole.len()) && whole.bytes().all(|b| b.is_ascii_digit());
    let fraction_ok = fraction
        .is_none_or(|f| (1..=2).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()));
    (whole_ok && fraction_ok).then(|| raw.to_string())
}

/// Links point into the app and carry no free text: a path (and optional query) of URL-safe
/// token characters, joined to `APP_URL`.
fn check_link(raw: &str, app_url: &str) -> Option<String> {
    let path = if raw.starts_with('/') {
        raw
    } else {
        let rest = raw.strip_prefix(app_url)?;
        if rest.is_empty() {
            "/"
        } else if rest.starts_with('/') || rest.starts_with('?') {
            rest
        } else {
            // `https://app.example.com.evil.io/...` shares the prefix but is another host.
            return None;
        }
    };
    // No `.` or `..` segment: the patient's browser resolves them, so `/../x` would climb out
    // of a path-prefixed `APP_URL` (`https://host/clinic`) to another app on the same host.
    let route = path.split(['?', '#']).next().unwrap_or_default();
    let safe = path.len() <= 200
        && !path.starts_with("//")
        && route
            .split('/')
            .all(|segment| segment != "." && segment != "..")
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.~?=&#".contains(&b));
    safe.then(|| format!("{app_url}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> RenderContext {
        RenderContext {
            clinic_name: "PhysiologicPRISM".into(),
            app_url: "https://app.example.com".into(),
        }
    }

    #[test]
    fn every_body_uses_exactly_its_declared_variables() {
        for t in TEMPLATES {
            for v in t.variables {
                assert!(
                    t.body.contains(&format!("{{{}}}", v.name)),
                    "{} misses {}",
                    t.name,
                    v.name
                );
            }
            let mut stripped = t.body.replace("{clinic}", "").replace("{app_url}", "");
            for v in t.variables {
                stripped = stripped.replace(&format!("{{{}}}", v.name), "");
            }
            assert!(
                !stripped.contains('{'),
                "{} has an undeclared placeholder",
                t.name
            );
        }
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn at(now: &str, zone: &str) -> RenderAt {
        RenderAt {
            now: utc(now),
            zone: zone.parse().unwrap(),
            default_zone: chrono_tz::UTC,
        }
    }

    /// A currency from ISO 4217's list when queued; a message queued under the older rule (any
    /// three capitals) is still sent.
    #[test]
    fn an_amounts_currency_is_listed_when_queued_and_kept_when_sent() {
        let t = find("payment_received").unwrap();
        let paid = |amount: &str| json!({"amount": amount, "date": "2027-01-12"});
        assert!(t.validate(&paid("INR 499.00"), &ctx()).is_ok());
        assert!(t.validate(&paid("RMB 100"), &ctx()).is_err());
        let now = at("2027-01-12T12:00:00Z", "UTC");
        assert!(t.validate_at(&paid("RMB 100"), &ctx(), &now).is_ok());
    }

    #[test]
    fn renders_a_reminder() {
        let t = find("appointment_reminder_24h").unwrap();
        let variables = json!({"starts_at": "2027-01-13T05:00:00Z", "link": "/appointments/a1"});
        let vars = t
            .validate_at(&variables, &ctx(), &at("2027-01-12T12:00:00Z", "UTC"))
            .unwrap();
        let r = t.render(&vars, &ctx());
        assert_eq!(
            r.body,
            "PhysiologicPRISM: reminder of your appointment tomorrow at 05:00. Details: https://app.example.com/appointments/a1 Reply STOP to opt out."
        );
        assert_eq!(r.encoding, Encoding::Gsm7);
        assert_eq!(r.segments, 1);
        // Checked only (when queued), the time is kept as given, not rendered.
        let kept = t.validate(&variables, &ctx()).unwrap();
        assert_eq!(kept.0[0], ("starts_at", "2027-01-13T05:00:00Z".to_string()));
    }

    #[test]
    fn the_day_word_is_decided_in_the_messages_zone_when_it_is_rendered() {
        let t = find("appointment_reminder_24h").unwrap();
        let vars = json!({"starts_at": "2027-01-12T18:00:00Z", "link": "/a"});
        let body = |now: &str, zone: &str| {
            let valid = t.validate_at(&vars, &ctx(), &at(now, zone)).unwrap();
            t.render(&valid, &ctx()).body
        };
        // 18:00 UTC on the 12th is 23:30 in Kolkata: "today" seen from 08:00 IST that day,
        // "tomorrow" from the 11th, a weekday and date from the 10th.
        assert!(body("2027-01-12T02:30:00Z", "Asia/Kolkata").contains("today at 23:30 IST."));
        assert!(body("2027-01-11T12:00:00Z", "Asia/Kolkata").contains("tomorrow at 23:30 IST."));
        assert!(body("2027-01-10T12:00:00Z", "Asia/Kolkata")
            .contains("on Tuesday 12 Jan 2027 at 23:30 IST."));
        // In DEFAULT_TIME_ZONE no abbreviation; 18:00 UTC seen from 20:00 UTC the day before.
        assert!(body("2027-01-11T20:00:00Z", "UTC").contains("tomorrow at 18:00."));
        // The same instant is "today" in New York as of 13:00 UTC on the 12th (08:00 EST).
        assert!(body("2027-01-12T13:00:00Z", "America/New_York").contains("today at 13:00 EST."));
    }

    #[test]
    fn the_abbreviation_follows_daylight_saving_time() {
        let render = |now: &str, zone: &str, start: &str| at(now, zone).day_and_time(utc(start));
        // London: GMT in winter, BST in summer; the wall-clock time moves with it.
        assert_eq!(
            render(
                "2027-03-27T12:00:00Z",
                "Europe/London",
                "2027-03-27T18:00:00Z"
            ),
            "today at 18:00 GMT"
        );
        assert_eq!(
            render(
                "2027-03-27T12:00:00Z",
                "Europe/London",
                "2027-03-28T18:00:00Z"
            ),
            "tomorrow at 19:00 BST"
        );
        assert_eq!(
            render(
                "2027-10-30T12:00:00Z",
                "Europe/London",
                "2027-10-31T18:00:00Z"
            ),
            "tomorrow at 18:00 GMT"
        );
        assert_eq!(
            render(
                "2027-03-13T15:00:00Z",
                "America/New_York",
                "2027-03-14T15:00:00Z"
            ),
            "tomorrow at 11:00 EDT"
        );
        assert_eq!(
            render(
                "2027-11-06T15:00:00Z",
                "America/New_York",
                "2027-11-07T15:00:00Z"
            ),
            "tomorrow at 10:00 EST"
        );
        // No abbreviation in DEFAULT_TIME_ZONE itself.
        let london: Tz = "Europe/London".parse().unwrap();
        let in_default = RenderAt {
            default_zone: london,
            ..at("2027-03-27T12:00:00Z", "Europe/London")
        };
        assert_eq!(
            in_default.day_and_time(utc("2027-03-28T18:00:00Z")),
            "tomorrow at 19:00"
        );
    }

    #[test]
    fn the_day_word_counts_calendar_days_not_24_hours() {
        // 23:30 GMT on Saturday 27 Mar 2027; 24 hours on, the clocks have sprung forward: it is
        // 00:30 BST on Monday, the day after tomorrow.
        assert_eq!(
            at("2027-03-27T23:30:00Z", "Europe/London").day_and_time(utc("2027-03-28T23:30:00Z")),
            "on Monday 29 Mar 2027 at 00:30 BST"
        );
        // 23:30 BST on Saturday 30 Oct; 25 hours on it is 23:30 GMT on Sunday: tomorrow.
        assert_eq!(
            at("2027-10-30T22:30:00Z", "Europe/London").day_and_time(utc("2027-10-31T23:30:00Z")),
            "tomorrow at 23:30 GMT"
        );
        // New York: 23:30 EST on Saturday 13 Mar; 24 hours on is 00:30 EDT on Monday 15 Mar.
        assert_eq!(
            at("2027-03-14T04:30:00Z", "America/New_York")
                .day_and_time(utc("2027-03-15T04:30:00Z")),
            "on Monday 15 Mar 2027 at 00:30 EDT"
        );
    }

    #[test]
    fn a_day_is_a_date_or_the_day_of_an_instant() {
        let t = find("follow_up_reminder").unwrap();
        let body = |due: &str, now: &str, zone: &str| {
            let vars = json!({"due_at": due, "link": "/follow-ups/f1"});
            let valid = t.validate_at(&vars, &ctx(), &at(now, zone)).unwrap();
            t.render(&valid, &ctx()).body
        };
        assert_eq!(
            body("2027-01-12", "2027-01-12T10:00:00Z", "UTC"),
            "PhysiologicPRISM: you have a follow-up due today. Details: https://app.example.com/follow-ups/f1"
        );
        // 20:00 UTC on the 12th is the 13th in Kolkata; seen from the 12th there: tomorrow.
        assert!(body(
            "2027-01-12T20:00:00Z",
            "2027-01-12T10:00:00Z",
            "Asia/Kolkata"
        )
        .contains("due tomorrow."));
        assert!(body("2027-01-12T20:00:00Z", "2027-01-12T10:00:00Z", "UTC").contains("due today."));
        assert!(body("2027-01-10", "2027-01-12T10:00:00Z", "UTC")
            .contains("due on Sunday 10 Jan 2027."));
    }

    #[test]
    fn dates_and_times_are_in_plausible_years() {
        let c = ctx();
        let payment = find("payment_received").unwrap();
        let follow_up = find("follow_up_reminder").unwrap();
        let reminder = find("appointment_reminder_24h").unwrap();
        for (date, ok) in [
            ("0000-01-01", false),
            ("1899-12-31", false),
            ("1900-01-01", true),
            ("2027-01-12", true),
            ("2199-12-31", true),
            ("2200-01-01", false),
            ("9999-12-31", false),
        ] {
            let paid = json!({"amount": "INR 1.00", "date": date});
            assert_eq!(payment.validate(&paid, &c).is_ok(), ok, "date {date}");
            let due = json!({"due_at": date, "link": "/f"});
            assert_eq!(follow_up.validate(&due, &c).is_ok(), ok, "day {date}");
            let due = json!({"due_at": format!("{date}T10:00:00Z"), "link": "/f"});
            assert_eq!(follow_up.validate(&due, &c).is_ok(), ok, "day {date}T");
            let vars = json!({"starts_at": format!("{date}T10:00:00Z"), "link": "/a"});
            assert_eq!(reminder.validate(&vars, &c).is_ok(), ok, "time {date}");
        }
    }

    #[test]
    fn times_are_strict_rfc_3339() {
        let c = ctx();
        for ok in [
            "2027-01-12T10:30:00Z",
            "2027-01-12T10:30:00.123456Z",
            "2027-01-12T10:30:00+05:30",
            "2027-01-12T10:30:00-05:00",
        ] {
            assert!(
                check_value(VarType::Datetime, ok, &c, None).is_some(),
                "{ok}"
            );
            assert!(check_value(VarType::Day, ok, &c, None).is_some(), "{ok}");
        }
        for bad in [
            "2027-01-12",
            "2027-01-12 10:30:00Z",
            "2027-01-12t10:30:00z",
            "2027-01-12T10:30:00",
            "2027-01-12T10:30Z",
            "2027-01-12T25:30:00Z",
            "2027-02-30T10:30:00Z",
            "2027-01-12T10:30:00+0530",
            "tomorrow at ten",
        ] {
            assert!(
                check_value(VarType::Datetime, bad, &c, None).is_none(),
                "{bad}"
            );
        }
        assert!(check_value(VarType::Day, "2027-01-12", &c, None).is_some());
        assert!(check_value(VarType::Day, "2027-02-30", &c, None).is_none());
        assert!(check_value(VarType::Day, "12 Jan 2027", &c, None).is_none());
    }

    #[test]
    fn kinds_decide_quiet_hours_and_consent() {
        let kind = |name: &str| find(name).unwrap().kind;
        for name in [
            "appointment_reminder_24h",
            "appointment_reminder_2h",
            "follow_up_reminder",
        ] {
            assert_eq!(kind(name), Kind::Scheduled, "{name}");
            assert!(kind(name).held_by_quiet_hours());
        }
        for name in ["payment_received", "payment_failed"] {
            assert_eq!(kind(name), Kind::Transactional, "{name}");
            assert!(!kind(name).held_by_quiet_hours());
        }
        assert_eq!(kind("otp"), Kind::Otp);
        assert!(!kind("otp").held_by_quiet_hours());
        assert!(kind("clinic_news").held_by_quiet_hours());
        assert_eq!(find("clinic_news").unwrap().category(), Category::Marketing);
        assert!(!kind("help").held_by_quiet_hours());
    }

    #[test]
    fn refuses_unknown_missing_and_ill_typed_variables() {
        let t = find("payment_failed").unwrap();
        let cases = [
            json!({"amount": "10.00"}),
            json!({"amount": "10.00", "link": "/pay", "note": "knee surgery"}),
            json!({"amount": "ten", "link": "/pay"}),
            json!({"amount": "HIV 1.00", "link": "/pay"}),
            json!({"amount": "MRI 400", "link": "/pay"}),
            json!({"amount": "10.000", "link": "/pay"}),
            json!({"amount": "10.00", "link": "https://evil.example.org/pay"}),
            json!({"amount": "10.00", "link": "https://app.example.com.evil.io/pay"}),
            json!({"amount": "10.00", "link": "/pay?note=torn ligament"}),
            json!({"amount": "10.00", "link": "/../../admin"}),
            json!({"amount": "10.00", "link": "/pay/./.."}),
            json!({"amount": "10.00", "link": "https://app.example.com/../other-app"}),
            json!({"amount": 10, "link": 5}),
            json!(["10.00", "/pay"]),
        ];
        for vars in cases {
            let err = t.validate(&vars, &ctx()).unwrap_err();
            assert_eq!(err.code(), "invalid_template_variables", "{vars}");
        }
    }

    #[test]
    fn each_type_accepts_its_format() {
        let c = ctx();
        assert_eq!(
            check_value(VarType::Code, "123456", &c, None).as_deref(),
            Some("123456")
        );
        assert!(check_value(VarType::Code, "12a456", &c, None).is_none());
        assert!(check_value(VarType::Time, "25:00", &c, None).is_none());
        assert!(check_value(VarType::Time, "9:30", &c, None).is_none());
        assert!(check_value(VarType::Date, "2027-02-30", &c, None).is_none());
        assert_eq!(
            check_value(VarType::Amount, "INR 499.50", &c, None).as_deref(),
            Some("INR 499.50")
        );
        assert!(check_value(VarType::Amount, "inr 499", &c, None).is_none());
        assert!(
            check_value(VarType::Link, "/docs/v1.2/a..b?x=1", &c, None).is_some(),
            "dots inside a segment are fine"
        );
        assert_eq!(
            check_value(VarType::Link, "https://app.example.com/x?a=1", &c, None).as_deref(),
            Some("https://app.example.com/x?a=1")
        );
        assert_eq!(
            check_value(VarType::ShortName, "Anne-Marie", &c, None).as_deref(),
            Some("Anne-Marie")
        );
        assert!(check_value(VarType::ShortName, "has ACL tear 2024", &c, None).is_none());
        for smuggled in [
            "secure-pay.evil.io",
            "evil.io",
            "a/b",
            "me@evil",
            "Ann     Lee",
            "St. John",
        ] {
            assert!(
                check_value(VarType::ShortName, smuggled, &c, None).is_none(),
                "{smuggled}"
            );
        }
        assert_eq!(
            check_value(VarType::ShortName, "Ann    Lee", &c, None).as_deref(),
            Some("Ann    Lee")
        );
        assert!(check_value(
            VarType::ShortName,
            "a very long name that goes on and on",
            &c,
            None
        )
        .is_none());
    }

    #[test]
    fn content_variables_follow_declared_order() {
        let t = find("appointment_reminder_2h").unwrap();
        let vars = t
            .validate_at(
                &json!({"link": "/a", "starts_at": "2027-01-12T09:00:00Z"}),
                &ctx(),
                &at("2027-01-12T07:00:00Z", "UTC"),
            )
            .unwrap();
        assert_eq!(
            vars.content_variables_json(),
            r#"{"1":"today at 09:00","2":"https://app.example.com/a"}"#
        );
    }
}
