//! One-time passcodes: send and verify, safe to expose to the internet.
//!
//! * Codes come from the OS's secure generator; only an HMAC of the code (keyed with a server
//!   secret, bound to the user and purpose) reaches the database. The code itself exists in memory
//!   just long enough to be sent, which is why OTP messages are sent at once rather than queued.
//! * One live code per (user, purpose); a new send replaces it. A right code verifies once,
//!   compared in constant time; `OTP_MAX_ATTEMPTS` wrong tries kill it.
//! * Sends are limited per number (cooldown and hourly cap), per user and per client IP, and
//!   optionally to some countries (`OTP_ALLOWED_COUNTRIES`), against SMS pumping.
//! * Answers never reveal whether a user is known: no code, a wrong code, a used code and an
//!   expired code all answer the same `invalid_otp`.

use chrono::Duration;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::config::Config;
use crate::error::{AppError, AppResult};
use crate::outbox::dispatcher::OtpDelivery;
use crate::outbox::{parse_channel, validate_user_id};
use crate::phone::PhoneNumber;
use crate::provider::twilio::{INVALID_TO_NUMBER, NOT_A_MOBILE_NUMBER, RECIPIENT_UNSUBSCRIBED};
use crate::store::{Channel, DynStore, NewMessage, OtpCleanup, OtpIssue, OtpIssueOutcome};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendOtpRequest {
    pub user_id: String,
    pub phone_number: String,
    pub purpose: String,
    pub channel: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyOtpRequest {
    pub user_id: String,
    pub otp_code: String,
    pub purpose: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SendOtpAnswer {
    pub success: bool,
    pub expires_in: u64,
    pub mock: bool,
}

/// Keyed hashing of codes. The key is `OTP_SECRET` when set; otherwise it is derived from the
/// secrets the deployment already has (so every instance derives the same key); with none at all
/// (a bare development start) it is random per process.
pub struct CodeHasher {
    key: [u8; 32],
}

impl CodeHasher {
    pub fn from_config(config: &Config) -> CodeHasher {
        let mut digest = Sha256::new();
        digest.update(b"prism-messaging otp key v1");
        let secrets: Vec<&str> = match &config.otp_secret {
            Some(secret) => vec![secret.expose()],
            None => [
                &config.auth_jwt_secret,
                &config.messaging_api_key,
                &config.twilio_auth_token,
                &config.cron_secret,
            ]
            .into_iter()
            .flatten()
            .map(|s| s.expose())
            .collect(),
        };
        if secrets.is_empty() {
            tracing::warn!(
                "no OTP_SECRET or other secret configured: OTP codes will not survive a restart"
            );
            let random: [u8; 32] = OsRng.gen();
            digest.update(random);
        }
        for secret in secrets {
            digest.update((secret.len() as u64).to_be_bytes());
            digest.update(secret.as_bytes());
        }
        CodeHasher {
            key: digest.finalize().into(),
        }
    }

    /// HMAC-SHA256 over user, purpose and code, hex-encoded. Binding the user and purpose means a
    /// hash can never verify a code issued for someone or something else.
    pub fn hash(&self, user_id: &str, purpose: &str, code: &str) -> String {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        for part in [user_id, purpose, code] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// `length` uniformly random digits from the operating system's CSPRNG.
pub fn generate_code(length: u32) -> String {
    (0..length)
        .map(|_| char::from(b'0' + OsRng.gen_range(0..10u8)))
        .collect()
}

/// A short lowercase word: 2 to 32 of `a-z` and `_`, starting with a letter.
fn validate_purpose(purpose: &str) -> AppResult<()> {
    let ok = (2..=32).contains(&purpose.len())
        && purpose.starts_with(|c: char| c.is_ascii_lowercase())
        && purpose.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(AppError::bad_request(
            "invalid_purpose",
            "purpose must be a short lowercase word such as verification or login",
        ))
    }
}

fn opted_out_error(state: &AppState, channel: Channel) -> AppError {
    let sender = match channel {
        Channel::Sms => state.config.twilio_phone_number.as_ref(),
        Channel::Whatsapp => state.config.twilio_whatsapp_number.as_ref(),
    };
    let to = sender
        .map(|n| format!(" to {}", n.as_str()))
        .unwrap_or_default();
    AppError::bad_request(
        "opted_out",
        format!(
            "this number has opted out of {} messages from {}; text START{to} to opt back in",
            channel.as_str(),
            state.config.clinic_name
        ),
    )
}

/// Issue and send a code. Nothing is sent (and nothing written) when a check fails.
pub async fn send_otp(
    state: &AppState,
    request: SendOtpRequest,
    ip: Option<String>,
) -> AppResult<SendOtpAnswer> {
    validate_user_id(&request.user_id)?;
    validate_purpose(&request.purpose)?;
    let channel = parse_channel(request.channel.as_deref())?;
    let phone = PhoneNumber::parse(&request.phone_number)?;
    let config = &state.config;
    if !config.otp_allowed_countries.is_empty() {
        let allowed = phone
            .country()
            .is_some_and(|c| config.otp_allowed_countries.contains(&c));
        if !allowed {
            return Err(AppError::bad_request(
                "country_not_allowed",
                "codes cannot be sent to numbers in this country",
            ));
        }
    }
    // A refusal for an opted-out number still counts against the limits (below), or anyone
    // could probe, without limit, which numbers texted STOP to this clinic.
    let opted_out = state.store.is_opted_out(phone.as_str(), channel).await?;
    if !config.messaging_enabled {
        return Err(AppError::Unavailable(
            "messaging is disabled on this service".into(),
        ));
    }

    let code = generate_code(config.otp_length);
    let now = state.clock.now();
    let issue = OtpIssue {
        user_id: request.user_id.clone(),
        purpose: request.purpose.clone(),
        phone_number: phone.as_str().to_string(),
        channel,
        code_hash: state
            .otp_hasher
            .hash(&request.user_id, &request.purpose, &code),
        ip,
        expires_at: now + Duration::seconds(config.otp_ttl_seconds as i64),
        now,
        cooldown_seconds: config.otp_resend_cooldown_seconds as i64,
        max_sends_per_hour: i64::from(config.otp_max_sends_per_hour),
        message: (!opted_out).then(|| NewMessage {
            id: uuid::Uuid::now_v7().to_string(),
            user_id: request.user_id.clone(),
            template_name: "otp".into(),
            // The code is never stored: the message records only that a code was sent.
            variables: "{}".into(),
            channel,
            idempotency_key: None,
            created_at: now,
            claimed_until: Some(now + state.config.dispatch.lease),
        }),
    };
    let message = match state.store.issue_otp(&issue).await? {
        OtpIssueOutcome::Issued(message) => message,
        OtpIssueOutcome::Logged => return Err(opted_out_error(state, channel)),
        OtpIssueOutcome::RateLimited {
            retry_after_seconds,
        } => {
            tracing::info!(to = %phone.masked(), purpose = %request.purpose, retry_after_seconds, "OTP send refused: rate limited");
            return Err(AppError::TooManyRequests {
                code: "rate_limited",
                message: "too many codes requested; try again later".into(),
                retry_after_secs: Some(retry_after_seconds.max(1) as u64),
            });
        }
    };
    let delivery = state
        .dispatcher()
        .send_otp_now(&message, phone, &code)
        .await?;
    match delivery {
        OtpDelivery::Sent => Ok(SendOtpAnswer {
            success: true,
            expires_in: config.otp_ttl_seconds,
            mock: config.mock_mode,
        }),
        OtpDelivery::Refused(Some(RECIPIENT_UNSUBSCRIBED)) => Err(opted_out_error(state, channel)),
        OtpDelivery::Refused(Some(INVALID_TO_NUMBER | NOT_A_MOBILE_NUMBER)) => Err(
            AppError::bad_request("invalid_phone", "this number cannot receive messages"),
        ),
        OtpDelivery::Refused(_) => Err(AppError::bad_request(
            "undeliverable",
            "a code cannot be delivered to this number on this channel",
        )),
        OtpDelivery::Unavailable => Err(AppError::Unavailable(
            "the code could not be sent right now; try again shortly".into(),
        )),
        OtpDelivery::Skipped(reason) if reason == "whatsapp_window_closed" => {
            Err(AppError::bad_request(
                "whatsapp_window_closed",
                "a WhatsApp code can only go to a number that wrote to us in the last 24 hours \
                 (or as an approved template); use sms",
            ))
        }
        OtpDelivery::Skipped(_) => Err(AppError::Unavailable(
            "messaging is disabled on this service".into(),
        )),
    }
}

fn invalid_code() -> AppError {
    AppError::bad_request(
        "invalid_otp",
        "the code is incorrect or has expired; request a new code",
    )
}

fn too_many_attempts() -> AppError {
    AppError::TooManyRequests {
        code: "too_many_attempts",
        message: "too many wrong codes; request a new code".into(),
        retry_after_secs: None,
    }
}

/// Verify a code. `Ok(())` exactly once for the right, live code.
pub async fn verify_otp(state: &AppState, request: VerifyOtpRequest) -> AppResult<()> {
    validate_user_id(&request.user_id)?;
    validate_purpose(&request.purpose)?;
    let code = request.otp_code.trim();
    let max_attempts = i64::from(state.config.otp_max_attempts);
    let Some(record) = state
        .store
        .get_otp(&request.user_id, &request.purpose)
        .await?
    else {
        return Err(invalid_code());
    };
    if record.attempts >= max_attempts {
        return Err(too_many_attempts());
    }
    let now = state.clock.now();
    if record.used_at.is_some() || record.expires_at <= now {
        return Err(invalid_code());
    }
    let presented = state
        .otp_hasher
        .hash(&request.user_id, &request.purpose, code);
    let matches: bool = presented
        .as_bytes()
        .ct_eq(record.code_hash.as_bytes())
        .into();
    if matches {
        // The conditional update lets exactly one of several simultaneous verifies win.
        if state
            .store
            .consume_otp(
                &request.user_id,
                &request.purpose,
                &record.code_hash,
                max_attempts,
                now,
            )
            .await?
        {
            tracing::info!(user_id = %request.user_id, purpose = %request.purpose, "OTP verified");
            return Ok(());
        }
        return Err(invalid_code());
    }
    let attempts = state
        .store
        .record_otp_failure(&request.user_id, &request.purpose, &record.code_hash)
        .await?;
    tracing::info!(user_id = %request.user_id, purpose = %request.purpose, attempts, "OTP verify failed");
    match attempts {
        Some(n) if n > max_attempts => Err(too_many_attempts()),
        _ => Err(invalid_code()),
    }
}

/// The cleanup job: delete used and expired codes and old rate-limit records.
pub async fn cleanup(
    store: &DynStore,
    now: chrono::DateTime<chrono::Utc>,
) -> AppResult<OtpCleanup> {
    let report = store.cleanup_otps(now).await?;
    tracing::info!(
        expired = report.expired_deleted,
        used = report.used_deleted,
        send_log = report.send_log_pruned,
        "OTP cleanup"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_digits_of_the_right_length_and_vary() {
        let codes: Vec<String> = (0..50).map(|_| generate_code(6)).collect();
        assert!(codes
            .iter()
            .all(|c| c.len() == 6 && c.bytes().all(|b| b.is_ascii_digit())));
        let distinct: std::collections::HashSet<_> = codes.iter().collect();
        assert!(distinct.len() > 40);
    }

    #[test]
    fn hashes_bind_user_purpose_and_key() {
        let config =
            Config::from_lookup(|n| (n == "OTP_SECRET").then(|| "k1".to_string())).unwrap();
        let other = Config::from_lookup(|n| (n == "OTP_SECRET").then(|| "k2".to_string())).unwrap();
        let h = CodeHasher::from_config(&config);
        let a = h.hash("u1", "login", "123456");
        assert_eq!(a.len(), 64);
        assert_eq!(
            a,
            CodeHasher::from_config(&config).hash("u1", "login", "123456")
        );
        assert_ne!(a, h.hash("u2", "login", "123456"));
        assert_ne!(a, h.hash("u1", "verification", "123456"));
        assert_ne!(
            a,
            CodeHasher::from_config(&other).hash("u1", "login", "123456")
        );
        assert!(!a.contains("123456"));
    }

    #[test]
    fn purposes_are_short_lowercase_words() {
        for ok in ["verification", "login", "password_reset"] {
            assert!(validate_purpose(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "x",
            "Login",
            "log in",
            "login!",
            "_login",
            &"a".repeat(33),
        ] {
            assert!(validate_purpose(bad).is_err(), "{bad}");
        }
    }
}
