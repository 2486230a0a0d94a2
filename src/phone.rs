//! Phone numbers: parsed and validated with `phonenumber` (a port of Google's libphonenumber),
//! stored and compared as E.164, and masked whenever they reach a log line.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::AppError;

/// A valid phone number in E.164 form (`+919876543210`). Constructing one is the validation.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PhoneNumber(String);

impl PhoneNumber {
    /// Parse a number written in international form (a leading `+` and country code; spaces,
    /// dashes, dots and brackets allowed). Numbers that libphonenumber does not consider valid for
    /// their country are refused, so nothing unroutable is ever stored or sent.
    ///
    /// Letters are refused before libphonenumber sees them: it reads them as vanity letters
    /// (`+1 800 FLOWERS`) and would turn a typed `O` for a `0` into a 6, a stranger's number. A
    /// patient's mobile number has no letters and no extension.
    pub fn parse(input: &str) -> Result<Self, AppError> {
        let trimmed = input.trim();
        let invalid = || {
            AppError::bad_request(
                "invalid_phone",
                "phone_number must be a valid number in international format, e.g. +919876543210",
            )
        };
        if !trimmed.starts_with('+') || trimmed.len() > 32 {
            return Err(invalid());
        }
        let allowed = |c: char| c.is_ascii_digit() || " +-.()".contains(c);
        if !trimmed.chars().all(allowed) || trimmed[1..].contains('+') {
            return Err(invalid());
        }
        let parsed = phonenumber::parse(None, trimmed).map_err(|_| invalid())?;
        if !phonenumber::is_valid(&parsed) {
            return Err(invalid());
        }
        // E.164 is the country code and the national number (leading zeros kept, as for Italy's
        // fixed lines): written directly, since the crate's formatter first matches the number
        // against every national format's patterns, which E.164 does not use.
        Ok(PhoneNumber(format!(
            "+{}{}",
            parsed.country().code(),
            parsed.national()
        )))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// ISO 3166 country code of the number (`IN`, `US`, ...), when libphonenumber knows it.
    pub fn country(&self) -> Option<String> {
        let parsed = phonenumber::parse(None, &self.0).ok()?;
        parsed.country().id().map(|id| format!("{id:?}"))
    }

    /// The form safe for logs: the first two digits and the last four (`+91******3210`).
    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

/// Load libphonenumber's metadata now rather than in the first request that parses a number.
/// The crate builds its database of every region on first use (100-190 ms on a 2-core machine),
/// under a lock: a service that starts cold makes its first patient wait that long, and under
/// load every request in flight waits behind it (the first second of `send-otp` at 16
/// connections had a p99 of 107-130 ms against 9 ms with this). It also compiles one region's
/// patterns; another region's compile on its first number (the first Indian `send-otp` after
/// start then took 13 ms in all, against 106-189 ms cold). The database stays resident either
/// way (about 6 MiB); this only moves its loading before the first request.
pub fn warm_up() {
    let parsed = PhoneNumber::parse("+14155552671");
    debug_assert!(parsed.is_ok(), "the warm-up number is valid");
}

/// Mask any phone-like string for logging: keep a leading `+`, two digits of country code and
/// the last four digits; everything between becomes `*`. A number of fewer than ten digits
/// (valid in small countries: Niue's `+683 4002`) keeps one digit and the last two, so that at
/// least four stay hidden: two and four would leave one or two hidden, and those the country
/// code's own (found by review).
pub fn mask(number: &str) -> String {
    let digits: Vec<char> = number.chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.len() <= 6 {
        return "*".repeat(digits.len().max(4));
    }
    let (head, tail) = if digits.len() < 10 { (1, 2) } else { (2, 4) };
    let shown_head: String = digits[..head].iter().collect();
    let shown_tail: String = digits[digits.len() - tail..].iter().collect();
    let hidden = "*".repeat(digits.len() - head - tail);
    format!("+{shown_head}{hidden}{shown_tail}")
}

/// Mask every phone-number-like run (7 or more digits, with an optional leading `+`) in free
/// text, such as a provider's error message that quotes the number it refused.
pub fn redact_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        let digits = run.chars().filter(char::is_ascii_digit).count();
        if digits >= 7 {
            out.push_str(&mask(run));
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() || (c == '+' && run.is_empty()) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

impl TryFrom<String> for PhoneNumber {
    type Error = AppError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        PhoneNumber::parse(&value)
    }
}

impl From<PhoneNumber> for String {
    fn from(value: PhoneNumber) -> Self {
        value.0
    }
}

// Debug and Display mask the number, so a stray `{:?}` in a log line cannot leak it.
impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhoneNumber({})", self.masked())
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// Whether `code` is the ISO 3166 code of a region with its own phone numbers (`GB`, `IN`),
/// as `PhoneNumber::country` names it: `UK`, `XX` or `EU` are not.
pub fn is_region(code: &str) -> bool {
    code.parse::<phonenumber::country::Id>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_to_e164() {
        let n = PhoneNumber::parse("+91 98765-43210").unwrap();
        assert_eq!(n.as_str(), "+919876543210");
        assert_eq!(n.country().as_deref(), Some("IN"));
        let us = PhoneNumber::parse("+1 (415) 555-2671").unwrap();
        assert_eq!(us.as_str(), "+14155552671");
    }

    #[test]
    fn e164_is_what_the_crates_formatter_writes() {
        use phonenumber::Mode;
        // Italy keeps its fixed lines' leading zero in E.164.
        for input in [
            "+39 06 1234 5678",
            "+39 312 345 6789",
            "+44 20 7946 0958",
            "+91 98765 43210",
            "+1 415 555 2671",
            "+49 30 901820",
            "+225 07 12 34 56 78",
        ] {
            let ours = PhoneNumber::parse(input).unwrap();
            let parsed = phonenumber::parse(None, input).unwrap();
            let theirs = parsed.format().mode(Mode::E164).to_string();
            assert_eq!(ours.as_str(), theirs, "{input}");
        }
        assert_eq!(
            PhoneNumber::parse("+39 06 1234 5678").unwrap().as_str(),
            "+390612345678"
        );
    }

    #[test]
    fn refuses_invalid_numbers() {
        for bad in [
            "",
            "9876543210",
            "+",
            "+12",
            "+91987654321099999",
            "hello",
            "+1 555 0100",
        ] {
            let err = PhoneNumber::parse(bad).unwrap_err();
            assert_eq!(err.code(), "invalid_phone", "{bad} should be invalid");
        }
    }

    #[test]
    fn refuses_letters_vanity_numbers_and_extensions() {
        // A letter O typed for a zero must never become another digit (a stranger's number).
        assert!(PhoneNumber::parse("+919876543210").is_ok());
        for bad in [
            "+91987654321O",
            "+1 800 FLOWERS",
            "+14155552671 ext. 12",
            "+14155552671 x12",
            "+14155552671;ext=12",
            "+1415555267１",
            "+91+9876543210",
        ] {
            let err = PhoneNumber::parse(bad).unwrap_err();
            assert_eq!(err.code(), "invalid_phone", "{bad} should be invalid");
        }
    }

    #[test]
    fn masks_for_logs() {
        let n = PhoneNumber::parse("+919876543210").unwrap();
        assert_eq!(n.masked(), "+91******3210");
        assert_eq!(format!("{n:?}"), "PhoneNumber(+91******3210)");
        assert_eq!(format!("{n}"), "+91******3210");
        assert_eq!(mask("whatsapp:+14155552671"), "+14*****2671");
        // Short numbers of small countries keep at least four digits hidden.
        assert_eq!(mask("+6834002"), "+6****02");
        assert_eq!(mask("+29022001"), "+2*****01");
        assert_eq!(mask("+447400123"), "+4******23");
        assert_eq!(mask("+4474001234"), "+44****1234");
    }

    #[test]
    fn redacts_numbers_in_free_text() {
        assert_eq!(
            redact_numbers(
                "The 'To' number +15005550001 is not a valid phone number (code 21211)."
            ),
            "The 'To' number +15*****0001 is not a valid phone number (code 21211)."
        );
        assert_eq!(
            redact_numbers("to whatsapp:+919876543210"),
            "to whatsapp:+91******3210"
        );
        assert_eq!(
            redact_numbers("HTTP 503 after 1500 ms"),
            "HTTP 503 after 1500 ms"
        );
    }
}
