//! Twilio's request signatures (`X-Twilio-Signature`), checked the way Twilio's own helper
//! libraries check them: the full URL Twilio called, then each form parameter sorted by name
//! (a repeated name's distinct values sorted too) appended as name + value; HMAC-SHA1 keyed with
//! the Auth Token; base64. The URL is tried with its port removed and with the scheme's default
//! port added, because Twilio's own signing is inconsistent about ports.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The signature of `url` with these form parameters.
pub fn compute(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut names: Vec<&str> = params.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(auth_token.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(url.as_bytes());
    for name in names {
        let mut values: Vec<&str> = params
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect();
        values.sort_unstable();
        values.dedup();
        for value in values {
            mac.update(name.as_bytes());
            mac.update(value.as_bytes());
        }
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Whether `signature` is right for a form-encoded request to `url`. Constant-time comparison.
pub fn is_valid(auth_token: &str, url: &str, params: &[(String, String)], signature: &str) -> bool {
    url_variants(url)
        .iter()
        .any(|candidate| equal(&compute(auth_token, candidate, params), signature))
}

/// Whether `signature` is right for a JSON-body request: the URL carries `bodySHA256` (the hex
/// SHA-256 of the body) and the signature covers the URL alone.
pub fn is_valid_with_body(auth_token: &str, url: &str, body: &[u8], signature: &str) -> bool {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return false;
    };
    let Some(expected_hash) = parsed
        .query_pairs()
        .find(|(k, _)| k == "bodySHA256")
        .map(|(_, v)| v.into_owned())
    else {
        return false;
    };
    equal(&body_hash(body), &expected_hash) && is_valid(auth_token, url, &[], signature)
}

/// Hex SHA-256 of a request body.
pub fn body_hash(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

fn equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The URL without any port, and with its port (the scheme's default when it has none).
/// The URL exactly as given first (the configured `PUBLIC_URL` as the operator wrote it, which is
/// what Twilio was told), then its normalised forms without and with the port.
fn url_variants(url: &str) -> Vec<String> {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return vec![url.to_string()];
    };
    let mut without = parsed.clone();
    let _ = without.set_port(None);
    // `Url` omits a default port when printing, so the with-port form is assembled by hand.
    let port = parsed.port_or_known_default().unwrap_or(80);
    let host = parsed.host_str().unwrap_or_default();
    let userinfo = match (parsed.username(), parsed.password()) {
        ("", None) => String::new(),
        (user, None) => format!("{user}@"),
        (user, Some(pass)) => format!("{user}:{pass}@"),
    };
    let mut with = format!(
        "{}://{userinfo}{host}:{port}{}",
        parsed.scheme(),
        parsed.path()
    );
    if let Some(query) = parsed.query() {
        with.push('?');
        with.push_str(query);
    }
    let mut variants = vec![url.to_string()];
    for candidate in [without.to_string(), with] {
        if !variants.contains(&candidate) {
            variants.push(candidate);
        }
    }
    variants
}

#[cfg(test)]
mod tests {
    //! The published vectors from twilio-python's `tests/unit/test_request_validator.py`.
    use super::*;

    #[test]
    fn the_url_as_configured_is_tried_first() {
        // Normalising would lower-case the host and drop the default port; Twilio signs what it
        // was given.
        let literal = "https://Messaging.Example.com:443/webhooks/twilio/status";
        let variants = url_variants(literal);
        assert_eq!(variants[0], literal);
        let params = vec![("MessageSid".to_string(), "SM1".to_string())];
        let signed = compute("token", literal, &params);
        assert!(is_valid("token", literal, &params, &signed));
    }

    const TOKEN: &str = "12345";
    const URI: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

    fn params() -> Vec<(String, String)> {
        [
            ("CallSid", "CA1234567890ABCDE"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
            ("Caller", "+14158675309"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn compute_signature() {
        assert_eq!(
            compute(TOKEN, URI, &params()),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
    }

    #[test]
    fn compute_signature_with_repeated_names() {
        let params: Vec<(String, String)> = [
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(compute(TOKEN, URI, &params), "IK+Dwps556ElfBT0I3Rgjkr1wJU=");
    }

    #[test]
    fn validation() {
        assert!(is_valid(
            TOKEN,
            URI,
            &params(),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
    }

    #[test]
    fn validation_removes_port_on_https() {
        let uri = URI.replace(".com", ".com:1234");
        assert!(is_valid(
            TOKEN,
            &uri,
            &params(),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
    }

    #[test]
    fn validation_removes_port_on_http() {
        let uri = URI.replace(".com", ".com:1234").replace("https", "http");
        assert!(is_valid(
            TOKEN,
            &uri,
            &params(),
            "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
        ));
    }

    #[test]
    fn validation_adds_port_on_https() {
        assert!(is_valid(
            TOKEN,
            URI,
            &params(),
            "kvajT1Ptam85bY51eRf/AJRuM3w="
        ));
    }

    #[test]
    fn validation_adds_port_on_http() {
        let uri = URI.replace("https", "http");
        assert!(is_valid(
            TOKEN,
            &uri,
            &params(),
            "0ZXoZLH/DfblKGATFgpif+LLRf4="
        ));
    }

    #[test]
    fn body_hash_and_validation_of_body() {
        let body = br#"{"property": "value", "boolean": true}"#;
        let hash = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
        assert_eq!(body_hash(body), hash);
        let uri = format!("{URI}&bodySHA256={hash}");
        assert!(is_valid_with_body(
            TOKEN,
            &uri,
            body,
            "a9nBmqA0ju/hNViExpshrM61xv4="
        ));
        assert!(!is_valid_with_body(
            TOKEN,
            &uri,
            b"{}",
            "a9nBmqA0ju/hNViExpshrM61xv4="
        ));
    }

    #[test]
    fn rejects_tampering() {
        let mut tampered = params();
        tampered[1].1 = "9999".into();
        assert!(!is_valid(
            TOKEN,
            URI,
            &tampered,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        assert!(!is_valid(
            TOKEN,
            "https://mycompany.com/other.php?foo=1&bar=2",
            &params(),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        assert!(!is_valid(
            "54321",
            URI,
            &params(),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        assert!(!is_valid(TOKEN, URI, &params(), ""));
    }
}
