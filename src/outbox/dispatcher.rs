//! The dispatcher: claims queued messages, re-checks policy at send time (messaging enabled,
//! opt-outs, consent, the WhatsApp window), renders the template, paces sends per sender, calls
//! the provider and records the outcome.
//!
//! Exactly-once as far as it can be had: a message is claimed with a lease (on PostgreSQL with
//! `FOR UPDATE SKIP LOCKED`, so instances never share one), marked `sending` before the provider
//! call and given its SID after. A message whose earlier attempt has an unknown outcome (a
//! timeout, a dropped connection, or a process that died between the call and the SID) is looked
//! up at the provider before it is sent again, and the SID adopted when found. What remains is
//! the window between the provider creating a message and listing it (see README).
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

use super::quiet_hours;

mod pacing;
mod recovery;

use crate::clock::DynClock;
use crate::config::Config;
use crate::error::AppResult;
use crate::metrics::Metrics;
use crate::phone::PhoneNumber;
use crate::provider::{DynProvider, OutboundMessage, ProviderError};
use crate::store::{Channel, DispatchResult, DynStore, MessageRecord, SendAttempt, SubjectType};
use crate::templates::{self, Category, RenderContext, Template, ValidVariables};
use crate::webhooks;
use recovery::outcome_unknown;

const IDLE_POLL: Duration = Duration::from_secs(1);
/// The longest a provider's `Retry-After` may hold a message back.
const MAX_RETRY_AFTER: chrono::Duration = chrono::Duration::hours(1);
/// WhatsApp allows free-form messages for 24 hours after the patient's last message.
const WHATSAPP_WINDOW: chrono::Duration = chrono::Duration::hours(24);

/// How a WhatsApp message may go (see [`Dispatcher::whatsapp_route`]).
enum WhatsappRoute {
    FreeText,
    Template(String),
    Closed,
}

/// What became of a one-time passcode sent at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtpDelivery {
    Sent,
    /// Not sent, on purpose (`disabled`, `whatsapp_window_closed`).
    Skipped(String),
    /// The provider refused it for good, with its error code.
    Refused(Option<i64>),
    /// The provider could not take it now; asking again later can work.
    Unavailable,
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RoundReport {
    pub claimed: usize,
    pub sent: usize,
    pub skipped: usize,
    pub failed: usize,
    pub retried: usize,
    /// Held back until quiet hours end.
    pub deferred: usize,
    /// Found already at the provider (an earlier attempt's outcome was unknown) and adopted.
    pub adopted: usize,
    /// Given back unsent because shutdown began.
    pub released: usize,
    /// Taken over by another dispatcher (our lease ran out); left to it.
    pub lost: usize,
}

#[derive(Clone)]
pub struct Dispatcher {
    store: DynStore,
    provider: DynProvider,
    config: Arc<Config>,
    render: Arc<RenderContext>,
    clock: DynClock,
    /// Once cancelled, claimed messages not yet on the wire are given back.
    shutdown: CancellationToken,
    metrics: Option<Arc<Metrics>>,
}

/// A claimed message and the lease that proves the claim is still ours. Every write for the
/// message is fenced by it: if our lease ran out and another dispatcher took the message over,
/// our writes match nothing and we leave the message alone.
struct Claim {
    message: MessageRecord,
    fence: DateTime<Utc>,
}

/// How one claimed message ended up.
enum Settled {
    Done(DispatchResult),
    Adopted,
    Released,
    Lost,
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
            shutdown: CancellationToken::new(),
            metrics: None,
        }
    }

    /// Count each round's outcomes for `/metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Give claimed-but-unsent messages back when `shutdown` is cancelled.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Claim one batch of due messages and settle each of them.
    pub async fn run_once(&self) -> AppResult<RoundReport> {
        let now = self.clock.now();
        let settings = self.config.dispatch;
        let claimed = self
            .store
            .claim_due_messages(now, now + settings.lease, settings.batch_size)
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
                Ok(Ok(Settled::Done(result))) => match result {
                    DispatchResult::Sent { .. } => report.sent += 1,
                    DispatchResult::Skipped { .. } => report.skipped += 1,
                    DispatchResult::Failed { .. } => report.failed += 1,
                    DispatchResult::Retry { .. } => report.retried += 1,
                    DispatchResult::Deferred { .. } => report.deferred += 1,
                },
                Ok(Ok(Settled::Adopted)) => report.adopted += 1,
                Ok(Ok(Settled::Released)) => report.released += 1,
                Ok(Ok(Settled::Lost)) => report.lost += 1,
                // The message keeps its lease and is claimed again when it expires.
                Ok(Err(e)) => tracing::error!(error = %e, "could not settle a message"),
                Err(e) => tracing::error!(error = %e, "dispatch task panicked"),
            }
        }
        if let Some(metrics) = &self.metrics {
            metrics.record_round(&report);
        }
        Ok(report)
    }

    /// Run rounds until `shutdown`; an idle dispatcher sleeps until `wakeup` or the poll interval.
    pub async fn run(self, wakeup: Arc<Notify>, shutdown: CancellationToken) {
        let this = self.with_shutdown(shutdown.clone());
        tracing::info!(provider = this.provider.name(), "dispatcher started");
        while !shutdown.is_cancelled() {
            let idle = match this.run_once().await {
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

    async fn settle(&self, message: MessageRecord) -> AppResult<Settled> {
        let Some(fence) = message.lease_until else {
            return Ok(Settled::Lost);
        };
        let mut claim = Claim { message, fence };
        if self.shutdown.is_cancelled() {
            return self.release(&claim).await;
        }
        // First what an earlier attempt may have done, whatever policy says now: a message that
        // already reached the patient is recorded as sent, not skipped.
        if outcome_unknown(&claim.message) {
            if let Some(settled) = self.recover(&claim).await? {
                return Ok(settled);
            }
        }
        let outbound = match self.prepare(&claim.message).await? {
            Ok(outbound) => outbound,
            Err(not_sent) => return self.finish(&claim, "", not_sent, None).await,
        };
        if !self.wait_for_send_slot(&outbound).await? {
            return self.release(&claim).await;
        }
        let to = outbound.to.masked();
        match self.send(&mut claim, outbound).await? {
            Some((result, provider_status)) => {
                self.finish(&claim, &to, result, provider_status).await
            }
            None => Ok(Settled::Lost),
        }
    }

    async fn release(&self, claim: &Claim) -> AppResult<Settled> {
        self.store
            .release_claim(&claim.message.id, self.clock.now(), claim.fence)
            .await?;
        Ok(Settled::Released)
    }

    /// Record the outcome, if the claim is still ours. A provider that already reports more
    /// than acceptance (the mock says `delivered`), and callbacks that arrived before the SID was
    /// recorded, go through the status-callback path: the only one that moves a sent message on.
    async fn finish(
        &self,
        claim: &Claim,
        to: &str,
        result: DispatchResult,
        provider_status: Option<String>,
    ) -> AppResult<Settled> {
        let message = &claim.message;
        let now = self.clock.now();
        if !self
            .store
            .record_dispatch(&message.id, &result, now, claim.fence)
            .await?
        {
            tracing::warn!(message_id = %message.id, "claim taken over by another dispatcher; leaving the message to it");
            return Ok(Settled::Lost);
        }
        log_result(message, to, &result);
        match &result {
            // The carrier says the patient opted out: stop messaging that number on that channel.
            DispatchResult::Failed {
                code: Some(webhooks::RECIPIENT_OPTED_OUT),
                ..
            } => {
                if let Some(sent) = self.store.get_message(&message.id).await? {
                    if let (Some(number), Some(channel)) =
                        (sent.to_number.as_deref(), Channel::parse(&sent.channel))
                    {
                        webhooks::carrier_opt_out(&self.store, number, channel, now).await?;
                    }
                }
            }
            DispatchResult::Sent { provider_sid, .. } => {
                // Only news beyond `sent` (Twilio answers `queued` at creation, which says nothing).
                let mut statuses: Vec<(String, Option<i64>)> = provider_status
                    .filter(|s| {
                        webhooks::our_status(s)
                            .is_some_and(|ours| webhooks::allowed_from(ours).contains(&"sent"))
                    })
                    .map(|s| (s, None))
                    .into_iter()
                    .collect();
                statuses.extend(self.store.take_unmatched_statuses(provider_sid).await?);
                for (status, error_code) in statuses {
                    webhooks::apply_status(&self.store, provider_sid, &status, error_code, now)
                        .await?;
                }
            }
            _ => {}
        }
        Ok(Settled::Done(result))
    }

    /// The send-time policy check and rendering: either a message ready for the provider, or the
    /// reason it will not be sent now.
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
        let Some(mut channel) = Channel::parse(&message.channel) else {
            return fail(format!("unknown channel {}", message.channel));
        };
        let Some(consent) = self.store.get_consent(&message.user_id).await? else {
            return skip("no_consent");
        };
        let Some(to) = consent
            .phone_number
            .as_deref()
            .and_then(|p| PhoneNumber::parse(p).ok())
        else {
            return skip("no_consent");
        };
        // The number texted STOP on this channel: nothing goes there until START.
        if self.store.is_opted_out(to.as_str(), channel).await? {
            return skip("opted_out");
        }
        let channel_consent = match channel {
            Channel::Sms => consent.sms_consent,
            Channel::Whatsapp => consent.whatsapp_consent,
        };
        let marketing_ok = template.category != Category::Marketing || consent.marketing_consent;
        if !channel_consent || !marketing_ok {
            return skip("no_consent");
        }
        // A reminder goes only while its appointment or follow-up is still on, at that time.
        let subject = match template.name {
            "appointment_reminder_24h" | "appointment_reminder_2h" | "follow_up_reminder" => {
                self.store.reminder_subject(&message.id).await?
            }
            _ => None,
        };
        if let Some((kind, id, at)) = &subject {
            if let Some(reason) = self.reminder_obsolete(*kind, id, *at).await? {
                return skip(&reason);
            }
        }
        if let Some(until) = self.quiet_until(template) {
            // Held past the appointment itself, a reminder is pointless.
            if let Some((SubjectType::Appointment, _, at)) = &subject {
                if until >= *at {
                    return skip("quiet_hours_passed");
                }
            }
            return Ok(Err(DispatchResult::Deferred {
                until,
                reason: "quiet_hours".into(),
            }));
        }
        let variables: Value = serde_json::from_str(&message.variables).unwrap_or(Value::Null);
        let valid = match template.validate(&variables, &self.render) {
            Ok(valid) => valid,
            Err(e) => return fail(format!("variables no longer valid: {e}")),
        };
        let mut whatsapp_template = None;
        if channel == Channel::Whatsapp {
            match self.whatsapp_route(&to, template).await? {
                WhatsappRoute::FreeText => {}
                WhatsappRoute::Template(sid) => {
                    whatsapp_template = Some((sid, valid.content_variables_json()))
                }
                // Outside the window with no approved template: SMS if the patient takes SMS.
                WhatsappRoute::Closed => {
                    let sms_ok = consent.sms_consent
                        && !self.store.is_opted_out(to.as_str(), Channel::Sms).await?;
                    if !sms_ok {
                        return skip("whatsapp_window_closed");
                    }
                    channel = Channel::Sms;
                }
            }
        }
        Ok(Ok(self.outbound(
            message,
            template,
            channel,
            to,
            &valid,
            whatsapp_template,
        )))
    }

    /// Why a reminder for `kind` `id` at `at` should no longer go, if it should not.
    async fn reminder_obsolete(
        &self,
        kind: SubjectType,
        id: &str,
        at: DateTime<Utc>,
    ) -> AppResult<Option<String>> {
        let item = self.store.get_scheduled(kind, id).await?;
        Ok(match item {
            None => Some(format!("{}_cancelled", kind.as_str())),
            Some(item) if item.status == "cancelled" => {
                Some(format!("{}_cancelled", kind.as_str()))
            }
            Some(item) if item.scheduled_at != at => Some(format!("{}_rescheduled", kind.as_str())),
            Some(_) if kind == SubjectType::Appointment && self.clock.now() >= at => {
                Some("appointment_passed".to_string())
            }
            Some(_) => None,
        })
    }

    /// When quiet hours hold this template back now, the moment they end. Users have no stored
    /// time zone yet, so theirs is `DEFAULT_TIME_ZONE`. OTPs and keyword replies answer the
    /// patient and are never held back.
    fn quiet_until(&self, template: &Template) -> Option<DateTime<Utc>> {
        if !matches!(
            template.category,
            Category::Transactional | Category::Marketing
        ) || template.name == "otp"
        {
            return None;
        }
        let quiet = self.config.quiet_hours?;
        let tz: chrono_tz::Tz = self.config.default_time_zone.parse().ok()?;
        quiet_hours::quiet_until(self.clock.now(), tz, quiet)
    }

    /// How a WhatsApp message may go: free text inside 24 hours of the patient's last WhatsApp
    /// message; outside it only as an approved template (`TWILIO_CONTENT_SIDS`).
    async fn whatsapp_route(
        &self,
        to: &PhoneNumber,
        template: &Template,
    ) -> AppResult<WhatsappRoute> {
        let last = self.store.last_whatsapp_inbound(to.as_str()).await?;
        let open = last.is_some_and(|at| self.clock.now() - at < WHATSAPP_WINDOW);
        Ok(if open {
            WhatsappRoute::FreeText
        } else if let Some(sid) = self.config.twilio_content_sids.get(template.name) {
            WhatsappRoute::Template(sid.clone())
        } else {
            WhatsappRoute::Closed
        })
    }

    /// The wire form of a message.
    fn outbound(
        &self,
        message: &MessageRecord,
        template: &Template,
        channel: Channel,
        to: PhoneNumber,
        valid: &ValidVariables,
        whatsapp_template: Option<(String, String)>,
    ) -> OutboundMessage {
        OutboundMessage {
            message_id: message.id.clone(),
            to,
            channel,
            template_name: template.name.to_string(),
            body: template.render(valid, &self.render).body,
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
    ) -> AppResult<OtpDelivery> {
        let fence = message
            .lease_until
            .ok_or_else(|| anyhow::anyhow!("an OTP message is written claimed"))?;
        let mut claim = Claim {
            message: message.clone(),
            fence,
        };
        let (settled, temporary) = self.send_otp_claimed(&mut claim, to, code).await?;
        match settled {
            Settled::Done(DispatchResult::Sent { .. }) => Ok(OtpDelivery::Sent),
            Settled::Done(DispatchResult::Skipped { reason }) => Ok(OtpDelivery::Skipped(reason)),
            Settled::Done(DispatchResult::Failed { .. }) if temporary => {
                Ok(OtpDelivery::Unavailable)
            }
            Settled::Done(DispatchResult::Failed { code, .. }) => Ok(OtpDelivery::Refused(code)),
            _ => Err(anyhow::anyhow!("the OTP message's claim was taken over").into()),
        }
    }

    async fn send_otp_claimed(
        &self,
        claim: &mut Claim,
        to: PhoneNumber,
        code: &str,
    ) -> AppResult<(Settled, bool)> {
        if !self.config.messaging_enabled {
            let skipped = DispatchResult::Skipped {
                reason: "disabled".into(),
            };
            return Ok((self.finish(claim, "", skipped, None).await?, false));
        }
        let template =
            templates::find("otp").ok_or_else(|| anyhow::anyhow!("the otp template is missing"))?;
        let channel = Channel::parse(&claim.message.channel)
            .ok_or_else(|| anyhow::anyhow!("unknown channel {}", claim.message.channel))?;
        let valid = template.validate(&serde_json::json!({ "code": code }), &self.render)?;
        let mut whatsapp_template = None;
        if channel == Channel::Whatsapp {
            match self.whatsapp_route(&to, template).await? {
                WhatsappRoute::FreeText => {}
                WhatsappRoute::Template(sid) => {
                    whatsapp_template = Some((sid, valid.content_variables_json()))
                }
                WhatsappRoute::Closed => {
                    let skipped = DispatchResult::Skipped {
                        reason: "whatsapp_window_closed".into(),
                    };
                    return Ok((self.finish(claim, "", skipped, None).await?, false));
                }
            }
        }
        let masked = to.masked();
        let outbound = self.outbound(
            &claim.message,
            template,
            channel,
            to,
            &valid,
            whatsapp_template,
        );
        // A patient is waiting for this code: it goes now, taking the sender's next slot so the
        // queued messages behind it slow down to keep the sender's rate.
        self.take_send_slot(&outbound).await?;
        let Some((result, provider_status)) = self.send(claim, outbound).await? else {
            return Ok((Settled::Lost, false));
        };
        // The code cannot wait in the queue: a failure that a retry could fix is recorded as
        // failed, and reported as temporary so the patient is told to ask again.
        let (result, temporary) = match result {
            DispatchResult::Retry { code, message, .. } => {
                (DispatchResult::Failed { code, message }, true)
            }
            other => (other, false),
        };
        Ok((
            self.finish(claim, &masked, result, provider_status).await?,
            temporary,
        ))
    }

    /// Mark the message `sending` (renewing the lease for the call), call the provider, and
    /// classify the answer, with the provider's own status word when it accepted the message.
    /// `None` when the claim was taken over before the call: nothing is sent.
    async fn send(
        &self,
        claim: &mut Claim,
        outbound: OutboundMessage,
    ) -> AppResult<Option<(DispatchResult, Option<String>)>> {
        let info = crate::segments::analyze(&outbound.body);
        let attempt = SendAttempt {
            to_number: outbound.to.as_str().to_string(),
            channel: outbound.channel,
            encoding: info.encoding.as_str().to_string(),
            segments: i64::from(info.segments),
        };
        let now = self.clock.now();
        let renewed = now + self.config.dispatch.lease;
        if !self
            .store
            .mark_sending(&claim.message.id, &attempt, now, claim.fence, renewed)
            .await?
        {
            tracing::warn!(message_id = %claim.message.id, "claim taken over before sending; not sending");
            return Ok(None);
        }
        claim.fence = renewed;
        let attempts_made = claim.message.attempts + 1;
        Ok(Some(match self.provider.send(&outbound).await {
            Ok(accepted) => (
                DispatchResult::Sent {
                    provider_sid: accepted.sid,
                    status: "sent".into(),
                },
                Some(accepted.status),
            ),
            Err(e) => (self.retry_or_fail(&claim.message, attempts_made, &e), None),
        }))
    }

    /// After a provider error: queue again with backoff while attempts and age allow, else fail
    /// with the provider's code.
    fn retry_or_fail(
        &self,
        message: &MessageRecord,
        attempts_made: i64,
        error: &ProviderError,
    ) -> DispatchResult {
        let settings = self.config.dispatch;
        let too_old = self.clock.now() - message.created_at > settings.max_age;
        if error.is_retryable() && attempts_made < settings.max_attempts && !too_old {
            return DispatchResult::Retry {
                code: error.code(),
                message: error.message().to_string(),
                next_attempt_at: self.next_attempt(attempts_made, error),
            };
        }
        let why = if too_old && error.is_retryable() {
            format!(
                "gave up: older than DISPATCH_MAX_AGE_SECONDS; last error: {}",
                error.message()
            )
        } else {
            error.message().to_string()
        };
        DispatchResult::Failed {
            code: error.code(),
            message: why,
        }
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
            // Capped: a provider's (or a proxy's) absurd Retry-After must not park a message forever.
            let after = chrono::Duration::from_std(*after)
                .unwrap_or(wait)
                .min(MAX_RETRY_AFTER);
            wait = wait.max(after);
        }
        self.clock.now() + wait
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
        DispatchResult::Deferred { until, reason } => {
            tracing::info!(message_id = id, template, reason, %until, "message held back")
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
