//! The registry of named, PHI-safe message templates.
//!
//! Every outbound message is one of these templates. A template declares its variables and each
//! variable's type; the types are narrow on purpose (a code, a date, an amount, a link into the
//! app...) so that no variable can carry free clinical text: details stay behind a link to
//! `APP_URL`. The clinic's name and the app URL are filled in by the service, not by callers.

use std::collections::BTreeMap;

use chrono::{NaiveDate, NaiveTime};
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
}

/// Whether a template needs marketing consent on top of the channel's consent.
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
    pub category: Category,
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
        category: Category::Transactional,
        variables: &[var("code", VarType::Code)],
        body: "{clinic}: your verification code is {code}. Do not share it with anyone.",
    },
    Template {
        name: "appointment_reminder_24h",
        category: Category::Transactional,
        variables: &[
            var("date", VarType::Date),
            var("time", VarType::Time),
            var("link", VarType::Link),
        ],
        body: "{clinic}: reminder of your appointment tomorrow, {date} at {time}. Details: {link} Reply STOP to opt out.",
    },
    Template {
        name: "appointment_reminder_2h",
        category: Category::Transactional,
        variables: &[var("time", VarType::Time), var("link", VarType::Link)],
        body: "{clinic}: your appointment is today at {time}. Details: {link}",
    },
    Template {
        name: "follow_up_reminder",
        category: Category::Transactional,
        variables: &[var("date", VarType::Date), var("link", VarType::Link)],
        body: "{clinic}: you have a follow-up due on {date}. Details: {link}",
    },
    // Both subscription templates are scheduled messages (the `subscription-reminders` sweep
    // sends them; quiet hours hold them). The host app may also send them itself.
    Template {
        name: "subscription_renewal",
        category: Category::Transactional,
        variables: &[var("date", VarType::Date), var("link", VarType::Link)],
        body: "{clinic}: your subscription renews on {date}. Manage it here: {link}",
    },
    Template {
        name: "subscription_expiring",
        category: Category::Transactional,
        variables: &[var("date", VarType::Date), var("link", VarType::Link)],
        body: "{clinic}: your subscription expires on {date}. Renew or manage it here: {link}",
    },
    Template {
        name: "payment_received",
        category: Category::Transactional,
        variables: &[var("amount", VarType::Amount), var("date", VarType::Date)],
        body: "{clinic}: we received your payment of {amount} on {date}. Thank you.",
    },
    Template {
        name: "payment_failed",
        category: Category::Transactional,
        variables: &[var("amount", VarType::Amount), var("link", VarType::Link)],
        body: "{clinic}: your payment of {amount} did not go through. Update your payment details: {link}",
    },
    Template {
        name: "opt_out_confirmation",
        category: Category::KeywordReply,
        variables: &[],
        body: "{clinic}: you are unsubscribed and will receive no more messages on this number. Reply START to resubscribe.",
    },
    Template {
        name: "opt_in_confirmation",
        category: Category::KeywordReply,
        variables: &[],
        body: "{clinic}: you are subscribed to messages again. Reply STOP to unsubscribe, HELP for help.",
    },
    Template {
        name: "help",
        category: Category::KeywordReply,
        variables: &[],
        body: "{clinic}: messages about your appointments and account. Help: {app_url} Reply STOP to unsubscribe.",
    },
    Template {
        name: "clinic_news",
        category: Category::Marketing,
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
    /// Check `variables` (a JSON object) against the declaration: no unknown, no missing, every
    /// value a string of the declared type.
    pub fn validate(
        &self,
        variables: &Value,
        ctx: &RenderContext,
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
            let rendered = check_value(spec.var_type, raw.trim(), ctx).ok_or_else(|| {
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
        VarType::Amount => "amount (e.g. 499.00 or INR 499.00)",
        VarType::Link => "link (a path like /appointments/123 or a URL under APP_URL)",
        VarType::ShortName => {
            "short name (letters, spaces, '-' and ', at most 30 characters; no dots)"
        }
    }
}

/// Validate one value and return its rendered form, or `None` when it is not of the type.
fn check_value(t: VarType, raw: &str, ctx: &RenderContext) -> Option<String> {
    match t {
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
            .map(|d| d.format("%-d %b %Y").to_string()),
        VarType::Amount => check_amount(raw),
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

fn check_amount(raw: &str) -> Option<String> {
    let (currency, number) = match raw.split_once(' ') {
        Some((cur, num)) => (Some(cur), num),
        None => (None, raw),
    };
    if let Some(cur) = currency {
        if cur.len() != 3 || !cur.bytes().all(|b| b.is_ascii_uppercase()) {
            return None;
        }
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
    let safe = path.len() <= 200
        && !path.starts_with("//")
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

    #[test]
    fn renders_a_reminder() {
        let t = find("appointment_reminder_24h").unwrap();
        let vars = t
            .validate(
                &json!({"date": "2027-01-12", "time": "10:30", "link": "/appointments/a1"}),
                &ctx(),
            )
            .unwrap();
        let r = t.render(&vars, &ctx());
        assert_eq!(
            r.body,
            "PhysiologicPRISM: reminder of your appointment tomorrow, 12 Jan 2027 at 10:30. Details: https://app.example.com/appointments/a1 Reply STOP to opt out."
        );
        assert_eq!(r.encoding, Encoding::Gsm7);
        assert_eq!(r.segments, 1);
    }

    #[test]
    fn refuses_unknown_missing_and_ill_typed_variables() {
        let t = find("payment_failed").unwrap();
        let cases = [
            json!({"amount": "10.00"}),
            json!({"amount": "10.00", "link": "/pay", "note": "knee surgery"}),
            json!({"amount": "ten", "link": "/pay"}),
            json!({"amount": "10.000", "link": "/pay"}),
            json!({"amount": "10.00", "link": "https://evil.example.org/pay"}),
            json!({"amount": "10.00", "link": "https://app.example.com.evil.io/pay"}),
            json!({"amount": "10.00", "link": "/pay?note=torn ligament"}),
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
            check_value(VarType::Code, "123456", &c).as_deref(),
            Some("123456")
        );
        assert!(check_value(VarType::Code, "12a456", &c).is_none());
        assert!(check_value(VarType::Time, "25:00", &c).is_none());
        assert!(check_value(VarType::Time, "9:30", &c).is_none());
        assert!(check_value(VarType::Date, "2027-02-30", &c).is_none());
        assert_eq!(
            check_value(VarType::Amount, "INR 499.50", &c).as_deref(),
            Some("INR 499.50")
        );
        assert!(check_value(VarType::Amount, "inr 499", &c).is_none());
        assert_eq!(
            check_value(VarType::Link, "https://app.example.com/x?a=1", &c).as_deref(),
            Some("https://app.example.com/x?a=1")
        );
        assert_eq!(
            check_value(VarType::ShortName, "Anne-Marie", &c).as_deref(),
            Some("Anne-Marie")
        );
        assert!(check_value(VarType::ShortName, "has ACL tear 2024", &c).is_none());
        for smuggled in [
            "secure-pay.evil.io",
            "evil.io",
            "a/b",
            "me@evil",
            "Ann     Lee",
            "St. John",
        ] {
            assert!(
                check_value(VarType::ShortName, smuggled, &c).is_none(),
                "{smuggled}"
            );
        }
        assert_eq!(
            check_value(VarType::ShortName, "Ann    Lee", &c).as_deref(),
            Some("Ann    Lee")
        );
        assert!(check_value(
            VarType::ShortName,
            "a very long name that goes on and on",
            &c
        )
        .is_none());
    }

    #[test]
    fn content_variables_follow_declared_order() {
        let t = find("appointment_reminder_2h").unwrap();
        let vars = t
            .validate(&json!({"link": "/a", "time": "09:00"}), &ctx())
            .unwrap();
        assert_eq!(
            vars.content_variables_json(),
            r#"{"1":"09:00","2":"https://app.example.com/a"}"#
        );
    }
}
