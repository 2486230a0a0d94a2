//! Providers: the only code that speaks to a messaging network. One [`Provider`] interface;
//! [`mock::MockProvider`] records and sends nothing, [`twilio::TwilioProvider`] calls Twilio's REST
//! API. Errors say whether trying again can help.

pub mod mock;
pub mod signature;
pub mod twilio;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::phone::PhoneNumber;
use crate::store::Channel;

/// One message ready for the wire.
#[derive(Debug, Clone)]
pub struct OutboundMessage {
    /// Our message id (for the mock outbox and log correlation).
    pub message_id: String,
    pub to: PhoneNumber,
    pub channel: Channel,
    pub template_name: String,
    /// The rendered text. Sent as `Body` unless `whatsapp_template` is set.
    pub body: String,
    /// An approved WhatsApp template to send instead of free text: (Content SID, ContentVariables JSON).
    pub whatsapp_template: Option<(String, String)>,
}

/// The provider took the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub sid: String,
    /// The provider's status word for it (Twilio: `queued`, `accepted`, `sent`, ...).
    pub status: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// Trying again later can help: rate limits, the provider's own faults, timeouts, network.
    #[error("retryable provider error{}: {message}", code_suffix(*.code))]
    Retryable {
        code: Option<i64>,
        message: String,
        retry_after: Option<Duration>,
        /// The provider may have created the message anyway (a timeout, a dropped connection,
        /// its own 5xx): look it up before sending again.
        outcome_unknown: bool,
    },
    /// Trying again cannot help: invalid number, opted out, not allowed, bad request.
    #[error("permanent provider error{}: {message}", code_suffix(*.code))]
    Permanent { code: Option<i64>, message: String },
    /// The provider refused our credentials (a rotated token): an outage of this deployment, not
    /// a property of the message. Nothing was created.
    #[error("the provider refused our credentials{}: {message}", code_suffix(*.code))]
    Unauthorized { code: Option<i64>, message: String },
}

fn code_suffix(code: Option<i64>) -> String {
    code.map(|c| format!(" {c}")).unwrap_or_default()
}

impl ProviderError {
    pub fn code(&self) -> Option<i64> {
        match self {
            ProviderError::Retryable { code, .. }
            | ProviderError::Permanent { code, .. }
            | ProviderError::Unauthorized { code, .. } => *code,
        }
    }
    pub fn message(&self) -> &str {
        match self {
            ProviderError::Retryable { message, .. }
            | ProviderError::Permanent { message, .. }
            | ProviderError::Unauthorized { message, .. } => message,
        }
    }
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProviderError::Retryable { .. })
    }
    /// Whether the provider turned the request away unprocessed for too many at once (Twilio's
    /// 429, code 20429: "never processed and always safe to retry").
    pub fn throttled(&self) -> bool {
        matches!(
            self,
            ProviderError::Retryable {
                code: Some(twilio::TOO_MANY_REQUESTS),
                outcome_unknown: false,
                ..
            }
        )
    }
    /// Whether the provider may hold the message although it did not say so.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            ProviderError::Retryable {
                outcome_unknown: true,
                ..
            }
        )
    }
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// `mock` or `twilio`.
    fn name(&self) -> &'static str;
    async fn send(&self, message: &OutboundMessage) -> Result<Accepted, ProviderError>;
    /// A provider inside this process (the mock) answers without a call that can fail or be
    /// half done: its acceptance, decided before the message is written, so the send is recorded
    /// in the write that creates the message (an OTP: one write per code instead of a write
    /// before the call and another after it). `None` (the default): the provider is across a
    /// network, and `send` is called between the two writes.
    fn accept_in_process(&self, _message: &OutboundMessage) -> Option<Accepted> {
        None
    }
    /// What `send` does besides answering, for a message `accept_in_process` accepted, once the
    /// write recording it has committed (the mock: its dev outbox entry), so a message whose
    /// write was refused (a rate limit met under the lock) leaves no trace.
    fn hand_over_in_process(&self, _message: &OutboundMessage, _accepted: &Accepted) {}
    /// Messages this service's API calls created from our sender to `to` on `channel`, at or
    /// after `since`, with exactly `body`, oldest first: used before re-sending a message whose
    /// earlier attempt has an unknown outcome (a timeout, or a process that died mid-call), so it
    /// is adopted instead of sent twice. A message whose body cannot be known is never looked up.
    async fn find_sent(
        &self,
        to: &PhoneNumber,
        channel: Channel,
        body: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<Accepted>, ProviderError>;
    /// Whether the provider can be used: credentials accepted, API reachable. A one-line summary.
    async fn health(&self) -> Result<String, ProviderError>;
}

pub type DynProvider = Arc<dyn Provider>;

/// Whether the provider currently refuses our credentials (a rotated Auth Token): set by the
/// dispatcher when a send is refused, cleared by the next accepted one; `/readyz` reports it.
/// And whether the provider answered its last health check (`Provider::health`), which `/readyz`
/// runs at most once per [`PROBE_EVERY`], so probes cost Twilio one request a minute at most.
#[derive(Debug, Default)]
pub struct ProviderHealth {
    refused: std::sync::atomic::AtomicBool,
    /// When the last check ended and whether the provider could be used then.
    probe: std::sync::Mutex<Option<(std::time::Instant, bool)>>,
    /// A check is running: other readiness requests answer from the last one meanwhile.
    probing: std::sync::atomic::AtomicBool,
}

/// How old a health check of the provider may be before `/readyz` runs another.
pub const PROBE_EVERY: Duration = Duration::from_secs(60);
/// How long one health check may take: a readiness probe must answer quickly.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What `/readyz` knows of the provider's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reachability {
    Ok,
    /// The last check failed: no answer, or an error other than refused credentials.
    Failing,
    /// No check has finished yet (the first is running).
    Unknown,
}

impl Reachability {
    pub fn as_str(self) -> &'static str {
        match self {
            Reachability::Ok => "ok",
            Reachability::Failing => "failing",
            Reachability::Unknown => "unknown",
        }
    }
}

impl ProviderHealth {
    /// The provider refused our credentials: say so loudly, once per outage.
    pub fn refused(&self, why: &str) {
        if !self
            .refused
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::error!(error = why, "the provider refuses our credentials (check TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN): holding the queue");
        }
    }

    /// The provider took a message: the credentials work.
    pub fn accepted(&self) {
        if self
            .refused
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!("the provider accepts our credentials again");
        }
    }

    pub fn credentials_refused(&self) -> bool {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What the last check of `provider`'s API found, at once. A check older than `PROBE_EVERY`
    /// (or none) starts another in the background, one at a time, within `PROBE_TIMEOUT`: a
    /// readiness probe never waits on the provider (a slow Twilio would time out the probe and
    /// take the instance out of rotation). Refused credentials count as reachable here and are
    /// reported as refused (`credentials_refused`), as a send would report them.
    pub fn reachability(self: &Arc<Self>, provider: &DynProvider) -> Reachability {
        use std::sync::atomic::Ordering;
        let last = *self.probe.lock().unwrap_or_else(|e| e.into_inner());
        let stale = last.is_none_or(|(at, _)| at.elapsed() >= PROBE_EVERY);
        if stale && !self.probing.swap(true, Ordering::AcqRel) {
            let (health, provider) = (self.clone(), provider.clone());
            tokio::spawn(async move { health.check(provider.as_ref()).await });
        }
        match last {
            Some((_, true)) => Reachability::Ok,
            Some((_, false)) => Reachability::Failing,
            None => Reachability::Unknown,
        }
    }

    /// One check of the provider's API; the caller has set `probing`, which this clears.
    async fn check(&self, provider: &dyn Provider) {
        // Cleared however this ends, a panic in the provider included: a check that never
        // finished must not stop every later one.
        struct Probing<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Probing<'_> {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::Release);
            }
        }
        let _probing = Probing(&self.probing);
        let ok = match tokio::time::timeout(PROBE_TIMEOUT, provider.health()).await {
            Ok(Ok(_)) => {
                self.accepted();
                true
            }
            Ok(Err(ProviderError::Unauthorized { message, .. })) => {
                self.refused(&message);
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "readiness: the provider's health check failed"
                );
                false
            }
            Err(_) => {
                tracing::warn!("readiness: the provider's health check did not answer in time");
                false
            }
        };
        *self.probe.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), ok));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider whose health check answers after `delay`, and counts its checks.
    struct SlowHealth {
        delay: Duration,
        checks: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl Provider for SlowHealth {
        fn name(&self) -> &'static str {
            "slow"
        }
        async fn send(&self, _message: &OutboundMessage) -> Result<Accepted, ProviderError> {
            unreachable!("not sent to in these tests")
        }
        async fn find_sent(
            &self,
            _to: &PhoneNumber,
            _channel: Channel,
            _body: &str,
            _since: DateTime<Utc>,
        ) -> Result<Vec<Accepted>, ProviderError> {
            Ok(vec![])
        }
        async fn health(&self) -> Result<String, ProviderError> {
            self.checks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(self.delay).await;
            Ok("ok".into())
        }
    }

    /// Until the first check ends: `unknown`, and no second check starts meanwhile. After it:
    /// its result, and probes within `PROBE_EVERY` reuse it.
    #[tokio::test]
    async fn readiness_never_waits_on_the_provider_and_checks_once_a_minute() {
        let health = Arc::new(ProviderHealth::default());
        let slow = Arc::new(SlowHealth {
            delay: Duration::from_millis(200),
            checks: Default::default(),
        });
        let provider: DynProvider = slow.clone();
        for _ in 0..3 {
            assert_eq!(health.reachability(&provider), Reachability::Unknown);
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        for _ in 0..3 {
            assert_eq!(health.reachability(&provider), Reachability::Ok);
        }
        assert_eq!(slow.checks.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
