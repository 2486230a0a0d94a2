//! One-time passcodes: send and verify, safe to expose to the internet.
//!
//! * Codes come from the OS's secure generator; only an HMAC of the code (keyed with a server
//!   secret, bound to the user and purpose) reaches the database. The code itself exists in memory
//!   just long enough to be sent, which is why OTP messages are sent at once rather than queued.
//! * One live code per (user, purpose); a new send replaces it. A right code verifies once,
//!   compared in constant time; `OTP_MAX_ATTEMPTS` wrong tries kill it.
//! * Sends are limited per number (cooldown and hourly cap), per user and per client IP, and
//!   optionally to some countries (`OTP_ALLOWED_COUNTRIES`), against SMS pumping. The per-number
//!   limits hold for the number named (a 429) and, silently, for the number a code goes to,
//!   however it was asked for: a number on file gets no more codes than one named directly.
//! * Answers never reveal whether a user is known: no code, a wrong code, a used code and an
//!   expired code all answer the same `invalid_otp`.

use chrono::{DateTime, Duration, Utc};
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::clock::DynClock;
use crate::config::{Config, OtpSettings};
use crate::consent::ConsentService;
use crate::error::{AppError, AppResult};
use crate::outbox::dispatcher::{Dispatcher, OtpDelivery, OtpPlan};
use crate::outbox::policy::WhatsappRoute;
use crate::outbox::{parse_channel, validate_user_id};
use crate::phone::PhoneNumber;
use crate::provider::twilio::{INVALID_TO_NUMBER, NOT_A_MOBILE_NUMBER, RECIPIENT_UNSUBSCRIBED};
use crate::status::SkipReason;
use crate::store::{
    Channel, LimitRefusal, NewMessage, OtpCleanup, OtpIssue, OtpIssueOutcome, OtpLimits, OtpRecord,
    OtpStore, VerificationUse,
};

mod refusals;
pub use refusals::{LimitKeys, RecentRefusals, RefusalKey};

/// A send-otp request past its checks: what its issue is made from, whichever number it goes to.
struct Asked<'a> {
    request: &'a SendOtpRequest,
    named: &'a PhoneNumber,
    channel: Channel,
    /// The client's rate-limit key.
    ip: Option<String>,
    code: String,
    now: DateTime<Utc>,
    /// A WhatsApp code's route to the number named, as read when the request was checked.
    named_route: Option<WhatsappRoute>,
}

/// A code's issue, the plan its message goes out by, and where it goes.
struct PreparedIssue {
    issue: OtpIssue,
    plan: OtpPlan,
    send_to: PhoneNumber,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendOtpRequest {
    pub user_id: String,
    pub phone_number: String,
    /// `verification` when left out, as the guide's server does.
    #[serde(default = "default_purpose")]
    #[schema(default = "verification")]
    pub purpose: String,
    pub channel: Option<String>,
}

fn default_purpose() -> String {
    VERIFICATION.to_string()
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyOtpRequest {
    pub user_id: String,
    pub otp_code: String,
    /// `verification` when left out, as for `send-otp` (and the guide's server).
    #[serde(default = "default_purpose")]
    #[schema(default = "verification")]
    pub purpose: String,
    /// When given, the code must have been sent to this number.
    pub phone_number: Option<String>,
}

/// A right code: the number it was sent to. A login is proven only when this is the user's own
/// number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub phone_number: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SendOtpAnswer {
    pub success: bool,
    pub expires_in: u64,
    pub mock: bool,
    /// The number the request named, masked (`+44******3456`), so the user can check what they
    /// typed. Never the number on file: the answer must not describe it.
    pub sent_to: String,
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
        let secrets: Vec<&str> = match &config.otp.secret {
            Some(secret) => vec![secret.expose()],
            None => [
                &config.auth.jwt_secret,
                &config.auth.messaging_api_key,
                &config.twilio.auth_token,
                &config.auth.cron_secret,
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

    /// A keyed hash of a value under a label (an erased user's id in the audit trail): the same
    /// everywhere this key is, and not reversible without it.
    pub fn keyed(&self, label: &str, value: &str) -> String {
        self.hash(value, label, "")
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
        hex::encode(mac.finalize().into_bytes())
    }
}

/// The purpose that proves a number (and may mark the number on file verified); the store owns
/// it, since its `consume_verification_otp` writes codes of this purpose only.
pub use crate::store::VERIFICATION_PURPOSE as VERIFICATION;

/// The answer to a send a limit refused, logged with the number masked.
fn rate_limited(key: &RefusalKey, retry_after_seconds: i64) -> AppError {
    let (to, purpose) = (crate::phone::mask(key.phone_number()), key.purpose());
    tracing::info!(%to, purpose, retry_after_seconds, "OTP send refused: rate limited");
    AppError::TooManyRequests {
        code: "rate_limited",
        message: "too many codes requested; try again later".into(),
        retry_after_secs: Some(retry_after_seconds.max(1) as u64),
    }
}

/// The key a client address is limited by: the address itself, or for IPv6 its /64 (one
/// subscriber's network, where a client can pick any of 2^64 addresses).
pub fn rate_limit_key(ip: &str) -> String {
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Ok(std::net::IpAddr::V6(v6)) => v6
            .to_ipv4_mapped()
            .map(|v4| v4.to_string())
            .unwrap_or_default(),
        _ => ip.to_string(),
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

/// What the OTP service needs besides its stores: its settings and the facts it reports.
#[derive(Debug, Clone)]
pub struct OtpContext {
    pub settings: OtpSettings,
    pub messaging_enabled: bool,
    pub mock_mode: bool,
    pub clinic_name: String,
    /// The SMS and WhatsApp senders, named in the opted-out answer ("text START to ...").
    pub sms_sender: Option<String>,
    pub whatsapp_sender: Option<String>,
    /// How long the code's message stays claimed while it is sent (`DISPATCH_LEASE_SECONDS`).
    pub lease: Duration,
}

/// How long a code's provider call has taken lately (a moving average), so that a send answered
/// without one (a code dropped or skipped for a number the caller may not own) takes about as
/// long as a send: a quick 200 would tell the caller that nothing went to that number.
#[derive(Default)]
struct SendLatency {
    micros: AtomicU64,
}

impl SendLatency {
    /// A call that took longer (a provider timing out) counts as this long.
    const LONGEST: std::time::Duration = std::time::Duration::from_secs(3);

    fn record(&self, took: std::time::Duration) {
        let sample = u64::try_from(took.min(Self::LONGEST).as_micros()).unwrap_or(u64::MAX);
        // An average over about the last 8 calls, so it follows the provider's pace.
        let _ = self
            .micros
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |average| {
                Some(match average {
                    0 => sample,
                    _ => average - average / 8 + sample / 8,
                })
            });
    }

    /// A wait like a provider call's: the average, give or take a quarter. None before any
    /// call (mock mode, whose provider answers in process at once).
    fn like_a_send(&self) -> std::time::Duration {
        let average = self.micros.load(Ordering::Relaxed);
        if average == 0 {
            return std::time::Duration::ZERO;
        }
        let wait = OsRng.gen_range(average - average / 4..=average + average / 4);
        std::time::Duration::from_micros(wait)
    }
}

/// Sends and verifies one-time passcodes.
#[derive(Clone)]
pub struct Otp {
    codes: Arc<dyn OtpStore>,
    consent: ConsentService,
    dispatcher: Dispatcher,
    hasher: Arc<CodeHasher>,
    clock: DynClock,
    context: Arc<OtpContext>,
    send_latency: Arc<SendLatency>,
    refusals: Arc<RecentRefusals>,
}

impl Otp {
    pub fn new(
        codes: Arc<dyn OtpStore>,
        consent: ConsentService,
        dispatcher: Dispatcher,
        hasher: Arc<CodeHasher>,
        clock: DynClock,
        context: OtpContext,
    ) -> Self {
        Otp {
            codes,
            consent,
            dispatcher,
            hasher,
            clock,
            context: Arc::new(context),
            send_latency: Arc::default(),
            refusals: Arc::default(),
        }
    }

    /// A send's answer for a code that went nowhere (dropped, or skipped at a number the caller
    /// may not own), given after about as long as a provider call takes.
    async fn answered_as_sent(&self, sent: SendOtpAnswer) -> AppResult<SendOtpAnswer> {
        tokio::time::sleep(self.send_latency.like_a_send()).await;
        Ok(sent)
    }

    /// A send the limits refused at `now`: answered, and remembered while they hold.
    fn refused(&self, key: RefusalKey, limits: &OtpLimits<'_>, refusal: LimitRefusal) -> AppError {
        let answer = rate_limited(&key, refusal.retry_after_seconds);
        self.refusals
            .remember(key, limits.into(), &refusal, limits.now);
        answer
    }

    fn opted_out_error(&self, channel: Channel) -> AppError {
        let sender = match channel {
            Channel::Sms => self.context.sms_sender.as_ref(),
            Channel::Whatsapp => self.context.whatsapp_sender.as_ref(),
        };
        let to = sender.map(|n| format!(" to {n}")).unwrap_or_default();
        AppError::bad_request(
            "opted_out",
            format!(
                "this number has opted out of {} messages from {}; text START{to} to opt back in",
                channel.as_str(),
                self.context.clinic_name
            ),
        )
    }

    /// Issue and send a code. Nothing is sent (and nothing written) when a check fails.
    ///
    /// A code is bound to the number it goes to. For any purpose but `verification`, a user with a
    /// number on file gets the code there, whatever number the request names, and the answer is
    /// the same as for any other send: it never hints at the number on file or whether there is
    /// one. So naming your own number for someone else's account gets you nothing.
    pub async fn send(
        &self,
        request: SendOtpRequest,
        ip: Option<String>,
    ) -> AppResult<SendOtpAnswer> {
        let now = self.clock.now();
        let ip = ip.as_deref().map(rate_limit_key);
        // The same request refused moments ago: refused again, as the store would.
        let key = RefusalKey::new(&request, ip.as_deref());
        if let Some(wait) = self.refusals.request_wait(&key, now) {
            return Err(rate_limited(&key, wait));
        }
        validate_user_id(&request.user_id)?;
        validate_purpose(&request.purpose)?;
        let channel = parse_channel(request.channel.as_deref())?;
        let named = PhoneNumber::parse(&request.phone_number)?;
        let context = &self.context;
        let settings = &context.settings;
        if !self.country_allowed(&named) {
            return Err(AppError::bad_request(
                "country_not_allowed",
                "codes cannot be sent to numbers in this country",
            ));
        }
        if !context.messaging_enabled {
            return Err(AppError::Unavailable(
                "messaging is disabled on this service".into(),
            ));
        }
        let limits = OtpLimits {
            user_id: &request.user_id,
            phone_number: named.as_str(),
            channel,
            ip: ip.as_deref(),
            now,
            cooldown_seconds: settings.resend_cooldown.as_secs() as i64,
            max_sends_per_hour: i64::from(settings.max_sends_per_hour),
            max_sends_per_ip_per_hour: i64::from(settings.max_sends_per_ip_per_hour),
        };
        // A send the limits refuse is answered before a code is made or its message planned,
        // where committed state is cheap to read (SQLite: no writer, no fsync); `issue_otp`
        // checks again under its lock either way.
        if let Some(wait) = self.refusals.limits_wait((&limits).into(), now) {
            return Err(rate_limited(&key, wait));
        }
        if let Some(refusal) = self.codes.otp_refusal(&limits).await? {
            return Err(self.refused(key, &limits, refusal));
        }
        // Decided on the number named, before the issue: the refusal must not depend on the
        // number on file (whose window decides only where an accepted code goes) and must not
        // replace the user's live code. It still counts against the limits like a send: it
        // tells whether a number wrote to the clinic lately, which must not be free to probe.
        let named_route = match channel {
            Channel::Whatsapp => Some(self.dispatcher.otp_whatsapp_route(&named).await?),
            Channel::Sms => None,
        };
        if named_route == Some(WhatsappRoute::Closed) {
            if let Some(refusal) = self.codes.log_refused_otp(&limits).await? {
                return Err(self.refused(key, &limits, refusal));
            }
            return Err(whatsapp_window_closed());
        }
        let code = generate_code(settings.length);
        // Where the code goes. Where the store looks up the number on file inside the issue (one
        // round trip on PostgreSQL, whichever number the code goes to), it is planned for the
        // number named and the store sends it to another number on file instead; elsewhere (and
        // for WhatsApp, whose route depends on the number's session) the number is read first.
        // With `OTP_ALLOWED_COUNTRIES` the number on file is read first on every backend: its
        // country must be checked before the code's send is planned.
        let unless_on_file = request.purpose != VERIFICATION
            && channel == Channel::Sms
            && settings.allowed_countries.is_empty()
            && self.codes.checks_number_on_file();
        let send_to = if unless_on_file {
            named.clone()
        } else {
            self.destination(&request, &named).await?
        };
        let asked = Asked {
            request: &request,
            named: &named,
            channel,
            ip: ip.clone(),
            code,
            now,
            named_route,
        };
        let mut prepared = self.prepare_issue(&asked, send_to, unless_on_file).await?;
        let mut outcome = self.codes.issue_otp(&prepared.issue).await?;
        if let OtpIssueOutcome::OnFileElsewhere = outcome {
            let send_to = self.destination(&request, &named).await?;
            prepared = self.prepare_issue(&asked, send_to, false).await?;
            outcome = self.codes.issue_otp(&prepared.issue).await?;
        }
        let PreparedIssue {
            mut send_to,
            mut plan,
            ..
        } = prepared;
        let sent = self.sent_answer(&named);
        let message = match outcome {
            OtpIssueOutcome::Issued(message) => message,
            OtpIssueOutcome::IssuedToNumberOnFile { message, to } => {
                // Written at the number on file, which was checked when it was stored.
                send_to = PhoneNumber::parse(&to).map_err(|_| {
                    anyhow::anyhow!("a number on file does not parse as a phone number")
                })?;
                plan.redirect(send_to.clone());
                message
            }
            // A refusal for an opted-out number still counted against the limits, or anyone
            // could probe, without limit, which numbers texted STOP to this clinic. The answer
            // is about the number named, never the one on file.
            OtpIssueOutcome::OptedOut { named: true } => return Err(self.opted_out_error(channel)),
            OtpIssueOutcome::OptedOut { named: false } => {
                // The number on file opted out of this channel: nothing goes to it, and the
                // caller, who may not own that number, is told what any other caller is told.
                tracing::info!(user_id = %request.user_id, purpose = %request.purpose, "OTP not sent: the number on file opted out");
                return self.answered_as_sent(sent).await;
            }
            // The number the code would go to had its cooldown's or its hour's codes, asked for
            // naming it or through accounts that have it on file. The code was written as any
            // code is, but nothing goes: the caller hears what a send sounds like, as late as a
            // send would. A 429 here would tell them whose number it is (or that it is someone's
            // on file).
            OtpIssueOutcome::DestinationLimited(message) => {
                let skipped = OtpPlan::Skip(SkipReason::DestinationLimited);
                self.dispatcher.send_otp_now(&message, skipped).await?;
                tracing::info!(user_id = %request.user_id, purpose = %request.purpose, "OTP not sent: the number it goes to had its codes");
                return self.answered_as_sent(sent).await;
            }
            OtpIssueOutcome::RateLimited(refusal) => {
                return Err(self.refused(key, &limits, refusal))
            }
            // Only an issue that did not read the number on file can find another there.
            OtpIssueOutcome::OnFileElsewhere => {
                return Err(
                    anyhow::anyhow!("an OTP issue found another number on file twice").into(),
                )
            }
        };
        let redirected = send_to != named;
        let calls_provider = plan.attempt().is_some() && plan.accepted().is_none();
        let started = std::time::Instant::now();
        let delivery = self.dispatcher.send_otp_now(&message, plan).await?;
        if calls_provider {
            self.send_latency.record(started.elapsed());
        }
        if redirected {
            // Whatever became of a code sent to the number on file, the caller hears what a
            // successful send sounds like: anything else would describe that number.
            if delivery != OtpDelivery::Sent {
                tracing::info!(user_id = %request.user_id, outcome = ?delivery, "OTP to the number on file not delivered");
            }
            if !calls_provider {
                return self.answered_as_sent(sent).await;
            }
            return Ok(sent);
        }
        match delivery {
            OtpDelivery::Sent => Ok(sent),
            OtpDelivery::Refused(Some(RECIPIENT_UNSUBSCRIBED))
            | OtpDelivery::Skipped(SkipReason::OptedOut) => Err(self.opted_out_error(channel)),
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
            OtpDelivery::Skipped(SkipReason::WhatsappWindowClosed) => Err(whatsapp_window_closed()),
            OtpDelivery::Skipped(_) => Err(AppError::Unavailable(
                "messaging is disabled on this service".into(),
            )),
        }
    }

    /// A code's issue to `send_to`, and the plan its message goes out by.
    async fn prepare_issue(
        &self,
        asked: &Asked<'_>,
        send_to: PhoneNumber,
        unless_on_file: bool,
    ) -> AppResult<PreparedIssue> {
        let Asked {
            request,
            named,
            channel,
            code,
            now,
            ..
        } = asked;
        let (channel, now) = (*channel, *now);
        let context = &self.context;
        let settings = &context.settings;
        let message_id = uuid::Uuid::now_v7().to_string();
        // Decided before anything is written, so the message is written already `sending`. A
        // number on file outside `OTP_ALLOWED_COUNTRIES` gets nothing (the number named was
        // checked); the send is written skipped and counted like any other, and the caller hears
        // what any send sounds like.
        let plan = if self.country_allowed(&send_to) {
            // The number named goes by the route read when the request was checked.
            let known_route = asked.named_route.clone().filter(|_| send_to == **named);
            self.dispatcher
                .plan_otp(&message_id, channel, send_to.clone(), code, known_route)
                .await?
        } else {
            OtpPlan::Skip(SkipReason::CountryNotAllowed)
        };
        let issue = OtpIssue {
            user_id: request.user_id.clone(),
            purpose: request.purpose.clone(),
            phone_number: named.as_str().to_string(),
            send_to: send_to.as_str().to_string(),
            channel,
            code_hash: self.hasher.hash(&request.user_id, &request.purpose, code),
            ip: asked.ip.clone(),
            expires_at: now + Duration::seconds(settings.ttl.as_secs() as i64),
            now,
            cooldown_seconds: settings.resend_cooldown.as_secs() as i64,
            max_sends_per_hour: i64::from(settings.max_sends_per_hour),
            max_sends_per_ip_per_hour: i64::from(settings.max_sends_per_ip_per_hour),
            message: NewMessage {
                id: message_id,
                user_id: request.user_id.clone(),
                template_name: "otp".into(),
                // The code is never stored: the message records only that a code was sent.
                variables: "{}".into(),
                channel,
                idempotency_key: None,
                created_at: now,
                claimed_until: Some(now + context.lease),
            },
            attempt: plan.attempt().cloned(),
            accepted: plan.accepted(),
            unless_on_file,
        };
        Ok(PreparedIssue {
            issue,
            plan,
            send_to,
        })
    }

    /// Where a code goes: the number on file, except for `verification` (which proves the number
    /// named) and users with no number on file.
    async fn destination(
        &self,
        request: &SendOtpRequest,
        named: &PhoneNumber,
    ) -> AppResult<PhoneNumber> {
        if request.purpose == VERIFICATION {
            return Ok(named.clone());
        }
        let on_file = self
            .consent
            .get(&request.user_id)
            .await?
            .and_then(|c| c.phone_number)
            .and_then(|n| PhoneNumber::parse(&n).ok());
        Ok(on_file.unwrap_or_else(|| named.clone()))
    }

    /// `OTP_ALLOWED_COUNTRIES` (the SMS-pumping guard) lets a code go to `number`.
    fn country_allowed(&self, number: &PhoneNumber) -> bool {
        let allowed = &self.context.settings.allowed_countries;
        allowed.is_empty() || number.country().is_some_and(|c| allowed.contains(&c))
    }

    fn sent_answer(&self, named: &PhoneNumber) -> SendOtpAnswer {
        SendOtpAnswer {
            success: true,
            expires_in: self.context.settings.ttl.as_secs(),
            mock: self.context.mock_mode,
            sent_to: named.masked(),
        }
    }

    /// Verify a code: the number it was sent to, exactly once for the right, live code.
    ///
    /// Wrong tries are counted per (user, purpose) whether or not a code exists, so an unknown
    /// user answers exactly like a known one: `invalid_otp` up to `OTP_MAX_ATTEMPTS`, then 429.
    pub async fn verify(&self, request: VerifyOtpRequest) -> AppResult<Verified> {
        validate_user_id(&request.user_id)?;
        validate_purpose(&request.purpose)?;
        let expected = request
            .phone_number
            .as_deref()
            .map(PhoneNumber::parse)
            .transpose()?;
        let code = request.otp_code.trim();
        let max_attempts = i64::from(self.context.settings.max_attempts);
        let now = self.clock.now();
        let (user, purpose) = (request.user_id.as_str(), request.purpose.as_str());
        if self.codes.otp_failures(user, purpose, now).await? >= max_attempts {
            return Err(too_many_attempts());
        }
        let record = self.codes.get_otp(user, purpose).await?;
        let live = record
            .filter(|r| r.used_at.is_none() && r.expires_at > now)
            .filter(|r| {
                expected
                    .as_ref()
                    .is_none_or(|n| n.as_str() == r.phone_number)
            });
        if let Some(record) = live {
            let presented = self.hasher.hash(user, purpose, code);
            let matches: bool = presented
                .as_bytes()
                .ct_eq(record.code_hash.as_bytes())
                .into();
            if matches {
                // The conditional update lets exactly one of several simultaneous verifies win.
                if !self.consume(&record, max_attempts, now).await? {
                    return Err(invalid_code());
                }
                tracing::info!(user_id = %user, purpose = %purpose, "OTP verified");
                return Ok(Verified {
                    phone_number: record.phone_number,
                });
            }
        }
        let window_ends_at = now + Duration::seconds(self.context.settings.ttl.as_secs() as i64);
        let failures = self
            .codes
            .record_otp_failure(user, purpose, now, window_ends_at)
            .await?;
        tracing::info!(user_id = %user, purpose = %purpose, failures, "OTP verify failed");
        if failures > max_attempts {
            Err(too_many_attempts())
        } else {
            Err(invalid_code())
        }
    }

    /// Use `record`'s code if it is still live; `true` for exactly one caller. A `verification`
    /// code also records its number verified when it is the one on file, in the same write.
    async fn consume(
        &self,
        record: &OtpRecord,
        max_attempts: i64,
        now: DateTime<Utc>,
    ) -> AppResult<bool> {
        let (user, purpose) = (record.user_id.as_str(), record.purpose.as_str());
        if purpose != VERIFICATION {
            return self
                .codes
                .consume_otp(user, purpose, &record.code_hash, max_attempts, now)
                .await;
        }
        let used = self
            .codes
            .consume_verification_otp(
                user,
                &record.code_hash,
                max_attempts,
                now,
                &record.phone_number,
            )
            .await?;
        match used {
            VerificationUse::Refused => Ok(false),
            VerificationUse::Used { number_verified } => {
                if number_verified {
                    tracing::info!(user_id = %user, "phone number verified");
                }
                Ok(true)
            }
        }
    }

    /// The cleanup job: delete used and expired codes and old rate-limit records.
    pub async fn cleanup(&self) -> AppResult<OtpCleanup> {
        let report = self.codes.cleanup_otps(self.clock.now()).await?;
        tracing::info!(
            expired = report.expired_deleted,
            used = report.used_deleted,
            send_log = report.send_log_pruned,
            "OTP cleanup"
        );
        Ok(report)
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

fn whatsapp_window_closed() -> AppError {
    AppError::bad_request(
        "whatsapp_window_closed",
        "a WhatsApp code can only go to a number that wrote to us in the last 24 hours \
         (or as an approved template); use sms",
    )
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
        let config = Config::from_lookup(|n| (n == "OTP_SECRET").then(|| "k1".repeat(16))).unwrap();
        let other = Config::from_lookup(|n| (n == "OTP_SECRET").then(|| "k2".repeat(16))).unwrap();
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
    fn an_answer_without_a_send_waits_about_as_long_as_recent_sends() {
        let latency = SendLatency::default();
        assert_eq!(latency.like_a_send(), std::time::Duration::ZERO);
        latency.record(std::time::Duration::from_millis(200));
        for _ in 0..20 {
            let wait = latency.like_a_send().as_millis();
            assert!((150..=250).contains(&wait), "{wait}");
        }
        // It follows the provider: after many quicker calls the wait is theirs.
        for _ in 0..100 {
            latency.record(std::time::Duration::from_millis(40));
        }
        let wait = latency.like_a_send().as_millis();
        assert!((29..=51).contains(&wait), "{wait}");
        // A provider timing out counts as `LONGEST` at most.
        let slow = SendLatency::default();
        slow.record(std::time::Duration::from_secs(60));
        assert!(slow.like_a_send() <= SendLatency::LONGEST + SendLatency::LONGEST / 4);
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
