//! The dispatcher: claims queued messages, re-checks policy at send time (messaging enabled,
//! consent still given), renders the template, calls the provider and records the outcome.
//!
//! [`Dispatcher::run_once`] does one round and reports what it did, so tests drive it directly;
//! [`Dispatcher::run`] loops it until shutdown, waking early when a message is queued.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::DynClock;
use crate::config::Config;
use crate::error::AppResult;
use crate::phone::PhoneNumber;
use crate::provider::{DynProvider, OutboundMessage, ProviderError};
use crate::store::{Channel, DispatchResult, DynStore, MessageRecord, SendAttempt};
use crate::templates::{self, Category, RenderContext, Template, ValidVariables};

/// Messages claimed per round, and sent concurrently.
const BATCH_SIZE: i64 = 32;
/// How long a claim holds before another round may take the message again.
const LEASE: chrono::Duration = chrono::Duration::seconds(120);
/// Attempts before a retryable failure becomes `failed`.
pub const MAX_ATTEMPTS: i64 = 5;
const IDLE_POLL: Duration = Duration::from_secs(1);

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RoundReport {
    pub claimed: usize,
    pub sent: usize,
    pub skipped: usize,
    pub failed: usize,
    pub retried: usize,
}

#[derive(Clone)]
pub struct Dispatcher {
    store: DynStore,
    provider: DynProvider,
    config: Arc<Config>,
    render: Arc<RenderContext>,
    clock: DynClock,
}

impl Dispatcher {
    pub fn new(
        store: DynStore,
        provider: DynProvider,
        config: Arc<Config>,
        clock: DynClock,
    ) -> Self {
        let render = Arc::new(config.render_context());
        Dispatcher {
            store,
            provider,
            config,
            render,
            clock,
        }
    }

    /// Claim one batch of due messages and settle each of them.
    pub async fn run_once(&self) -> AppResult<RoundReport> {
        let now = self.clock.now();
        let claimed = self
            .store
            .claim_due_messages(now, now + LEASE, BATCH_SIZE)
            .await?;
        let mut report = RoundReport {
            claimed: claimed.len(),
            ..RoundReport::default()
        };
        let mut tasks = JoinSet::new();
        for message in claimed {
            let this = self.clone();
            tasks.spawn(async move { this.settle(message).await });
        }
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(result)) => match result {
                    DispatchResult::Sent { .. } => report.sent += 1,
                    DispatchResult::Skipped { .. } => report.skipped += 1,
                    DispatchResult::Failed { .. } => report.failed += 1,
                    DispatchResult::Retry { .. } => report.retried += 1,
                },
                // The message keeps its lease and is claimed again when it expires.
                Ok(Err(e)) => tracing::error!(error = %e, "could not record a dispatch outcome"),
                Err(e) => tracing::error!(error = %e, "dispatch task panicked"),
            }
        }
        Ok(report)
    }

    /// Run rounds until `shutdown`; an idle dispatcher sleeps until `wakeup` or the poll interval.
    pub async fn run(self, wakeup: Arc<Notify>, shutdown: CancellationToken) {
        tracing::info!(provider = self.provider.name(), "dispatcher started");
        while !shutdown.is_cancelled() {
            let idle = match self.run_once().await {
                Ok(report) => report.claimed == 0,
                Err(e) => {
                    tracing::error!(error = %e, "dispatcher round failed");
                    true
                }
            };
            if idle {
                tokio::select! {
                    _ = wakeup.notified() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
        tracing::info!("dispatcher stopped");
    }

    async fn settle(&self, message: MessageRecord) -> AppResult<DispatchResult> {
        let (result, to) = match self.prepare(&message).await? {
            Ok(outbound) => {
                let to = outbound.to.masked();
                (self.send(&message, outbound).await?, to)
            }
            Err(not_sent) => (not_sent, String::new()),
        };
        self.store
            .record_dispatch(&message.id, &result, self.clock.now())
            .await?;
        log_result(&message, &to, &result);
        Ok(result)
    }

    /// The send-time policy check and rendering: either a message ready for the provider, or the
    /// reason it will not be sent.
    async fn prepare(
        &self,
        message: &MessageRecord,
    ) -> AppResult<Result<OutboundMessage, DispatchResult>> {
        let skip = |reason: &str| {
            Ok(Err(DispatchResult::Skipped {
                reason: reason.into(),
            }))
        };
        let fail = |why: String| {
            Ok(Err(DispatchResult::Failed {
                code: None,
                message: why,
            }))
        };
        if !self.config.messaging_enabled {
            return skip("disabled");
        }
        let Some(template) = templates::find(&message.template_name) else {
            return fail(format!("unknown template {}", message.template_name));
        };
        let Some(channel) = Channel::parse(&message.channel) else {
            return fail(format!("unknown channel {}", message.channel));
        };
        let consent = self.store.get_consent(&message.user_id).await?;
        let Some(consent) = consent else {
            return skip("no_consent");
        };
        let channel_consent = match channel {
            Channel::Sms => consent.sms_consent,
            Channel::Whatsapp => consent.whatsapp_consent,
        };
        let marketing_ok = template.category != Category::Marketing || consent.marketing_consent;
        if !channel_consent || !marketing_ok {
            return skip("no_consent");
        }
        let Some(to) = consent
            .phone_number
            .as_deref()
            .and_then(|p| PhoneNumber::parse(p).ok())
        else {
            return skip("no_phone_number");
        };
        let variables: Value = serde_json::from_str(&message.variables).unwrap_or(Value::Null);
        let valid = match template.validate(&variables, &self.render) {
            Ok(valid) => valid,
            Err(e) => return fail(format!("variables no longer valid: {e}")),
        };
        Ok(Ok(self.outbound(message, template, channel, to, &valid)))
    }

    /// The wire form of a message: rendered body, and the approved WhatsApp template when one is
    /// configured for it.
    fn outbound(
        &self,
        message: &MessageRecord,
        template: &Template,
        channel: Channel,
        to: PhoneNumber,
        valid: &ValidVariables,
    ) -> OutboundMessage {
        let rendered = template.render(valid, &self.render);
        let whatsapp_template = match channel {
            Channel::Whatsapp => self
                .config
                .twilio_content_sids
                .get(template.name)
                .map(|sid| (sid.clone(), valid.content_variables_json())),
            Channel::Sms => None,
        };
        OutboundMessage {
            message_id: message.id.clone(),
            to,
            channel,
            template_name: template.name.to_string(),
            body: rendered.body,
            whatsapp_template,
        }
    }

    /// Send a one-time passcode now, for a message written already claimed. The code exists only
    /// in memory, so this is the only chance to send it: a retryable provider failure is recorded
    /// as `failed` (the patient asks for a new code) instead of being queued for later.
    pub async fn send_otp_now(
        &self,
        message: &MessageRecord,
        to: PhoneNumber,
        code: &str,
    ) -> AppResult<DispatchResult> {
        let result = if !self.config.messaging_enabled {
            DispatchResult::Skipped {
                reason: "disabled".into(),
            }
        } else {
            let template = templates::find("otp")
                .ok_or_else(|| anyhow::anyhow!("the otp template is missing"))?;
            let channel = Channel::parse(&message.channel)
                .ok_or_else(|| anyhow::anyhow!("unknown channel {}", message.channel))?;
            let valid = template.validate(&serde_json::json!({ "code": code }), &self.render)?;
            let masked = to.masked();
            let outbound = self.outbound(message, template, channel, to, &valid);
            let result = match self.send(message, outbound).await? {
                DispatchResult::Retry { code, message, .. } => {
                    DispatchResult::Failed { code, message }
                }
                other => other,
            };
            self.store
                .record_dispatch(&message.id, &result, self.clock.now())
                .await?;
            log_result(message, &masked, &result);
            return Ok(result);
        };
        self.store
            .record_dispatch(&message.id, &result, self.clock.now())
            .await?;
        log_result(message, "", &result);
        Ok(result)
    }

    async fn send(
        &self,
        message: &MessageRecord,
        outbound: OutboundMessage,
    ) -> AppResult<DispatchResult> {
        let info = crate::segments::analyze(&outbound.body);
        let attempt = SendAttempt {
            to_number: outbound.to.as_str().to_string(),
            encoding: info.encoding.as_str().to_string(),
            segments: i64::from(info.segments),
        };
        self.store
            .mark_sending(&message.id, &attempt, self.clock.now())
            .await?;
        let attempts_made = message.attempts + 1;
        Ok(match self.provider.send(&outbound).await {
            Ok(accepted) => DispatchResult::Sent {
                provider_sid: accepted.sid,
                status: our_status(&accepted.status).to_string(),
            },
            Err(e) if e.is_retryable() && attempts_made < MAX_ATTEMPTS => DispatchResult::Retry {
                code: e.code(),
                message: e.message().to_string(),
                next_attempt_at: self.next_attempt(attempts_made, &e),
            },
            Err(e) => DispatchResult::Failed {
                code: e.code(),
                message: e.message().to_string(),
            },
        })
    }

    /// Exponential backoff with jitter (10 s, 20 s, 40 s, ... up to 15 min), or the provider's own
    /// `Retry-After` when it is longer.
    fn next_attempt(&self, attempts_made: i64, error: &ProviderError) -> DateTime<Utc> {
        let base = 10i64
            .saturating_mul(1 << attempts_made.clamp(0, 10))
            .min(900);
        let jitter = rand::thread_rng().gen_range(0..=base / 2);
        let mut wait = chrono::Duration::seconds(base / 2 + jitter);
        if let ProviderError::Retryable {
            retry_after: Some(after),
            ..
        } = error
        {
            wait = wait.max(chrono::Duration::from_std(*after).unwrap_or(wait));
        }
        self.clock.now() + wait
    }
}

/// Our status for a provider's status word at acceptance. Anything not yet final at the carrier
/// (`queued`, `accepted`, `sending`, `scheduled`) is `sent`: the provider has it. Status
/// callbacks move it on from there.
fn our_status(provider_status: &str) -> &'static str {
    match provider_status {
        "delivered" => "delivered",
        "read" => "read",
        "undelivered" => "undelivered",
        "failed" => "failed",
        _ => "sent",
    }
}

/// One line per outcome; `to` is already masked (empty when nothing was sent).
fn log_result(message: &MessageRecord, to: &str, result: &DispatchResult) {
    let id = message.id.as_str();
    let template = message.template_name.as_str();
    match result {
        DispatchResult::Sent {
            provider_sid,
            status,
        } => {
            tracing::info!(
                message_id = id,
                template,
                to,
                provider_sid,
                status,
                "message sent"
            )
        }
        DispatchResult::Skipped { reason } => {
            tracing::info!(message_id = id, template, reason, "message skipped")
        }
        DispatchResult::Failed { code, message } => {
            tracing::warn!(
                message_id = id,
                template,
                to,
                code,
                error = message,
                "message failed"
            )
        }
        DispatchResult::Retry {
            code,
            message,
            next_attempt_at,
        } => {
            tracing::warn!(message_id = id, template, to, code, error = message, %next_attempt_at, "message will be retried")
        }
    }
}
