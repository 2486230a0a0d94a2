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
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::policy::{self, PolicySettings, QuietHoursRule, WhatsappRoute};
use super::DispatchWakeup;

mod pacing;

use pacing::SlotWait;
mod recovery;

use crate::channel::Channel;
use crate::clock::DynClock;
use crate::config::{DispatchSettings, MessagingSettings, TwilioSettings};
use crate::delivery::Delivery;
use crate::error::AppResult;
use crate::metrics::Metrics;
use crate::phone::PhoneNumber;
use crate::provider::twilio::{RECIPIENT_UNSUBSCRIBED, TOO_MANY_REQUESTS};
use crate::provider::{Accepted, DynProvider, OutboundMessage, ProviderError, ProviderHealth};
use crate::status::{MessageStatus, SkipReason};
use crate::store::{
    AcceptedSend, ConsentStore, DeferReason, DispatchResult, InboundStore, MarkSending,
    MessageRecord, MessageStore, ScheduleStore, SendAttempt, SendGuard, SendSlot, Stale,
    SubjectType,
};
use crate::templates::{self, Category, RenderAt, RenderContext, Template, ValidVariables};
use recovery::outcome_unknown;

const IDLE_POLL: Duration = Duration::from_secs(1);
/// How often the running dispatcher looks for sends that died mid-way (a lease that ran out with
/// no SID). They are rare and their lease already kept them waiting; every claim looking for
/// them cost PostgreSQL a walk over every `sending` entry left since the last vacuum.
const STALE_CHECK: Duration = Duration::from_secs(1);
/// How long messages wait after the provider refused our credentials (then one is tried again).
const AUTH_OUTAGE_HOLD: chrono::Duration = chrono::Duration::seconds(60);
/// The longest a provider's `Retry-After` may hold a message back.
const MAX_RETRY_AFTER: chrono::Duration = chrono::Duration::hours(1);

/// What became of a one-time passcode sent at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtpDelivery {
    Sent,
    /// Not sent, on purpose (`disabled`, `whatsapp_window_closed`).
    Skipped(SkipReason),
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
    /// Held back unsent: quiet hours, or the sender's next free slot comes after the claim.
    pub deferred: usize,
    /// Found already at the provider (an earlier attempt's outcome was unknown) and adopted.
    pub adopted: usize,
    /// Given back unsent because shutdown began.
    pub released: usize,
    /// Taken over by another dispatcher (our lease ran out); left to it.
    pub lost: usize,
    /// Ended `unknown`: the provider may hold it and no lookup could tell.
    pub unknown: usize,
    /// Held back because the provider refused our credentials or turned the request away for
    /// too many at once (429): the attempt not counted.
    pub held: usize,
}

impl RoundReport {
    /// Each outcome with its name, for `/metrics`.
    pub fn counts(&self) -> [(&'static str, usize); 11] {
        [
            ("claimed", self.claimed),
            ("sent", self.sent),
            ("skipped", self.skipped),
            ("failed", self.failed),
            ("retried", self.retried),
            ("deferred", self.deferred),
            ("adopted", self.adopted),
            ("released", self.released),
            ("lost", self.lost),
            ("unknown", self.unknown),
            ("held", self.held),
        ]
    }
}

/// The parts of the application a dispatcher works with.
#[derive(Clone)]
pub struct DispatcherParts {
    pub messages: Arc<dyn MessageStore>,
    pub consent_records: Arc<dyn ConsentStore>,
    pub inbound: Arc<dyn InboundStore>,
    pub schedule: Arc<dyn ScheduleStore>,
    pub provider: DynProvider,
    pub delivery: Delivery,
    pub clock: DynClock,
    pub settings: DispatchSettings,
    pub messaging: MessagingSettings,
    pub twilio: TwilioSettings,
    pub metrics: Option<Arc<Metrics>>,
    pub provider_health: Arc<ProviderHealth>,
}

#[derive(Clone)]
pub struct Dispatcher {
    messages: Arc<dyn MessageStore>,
    consent_records: Arc<dyn ConsentStore>,
    inbound: Arc<dyn InboundStore>,
    schedule: Arc<dyn ScheduleStore>,
    provider: DynProvider,
    delivery: Delivery,
    clock: DynClock,
    settings: DispatchSettings,
    policy: Arc<PolicySettings>,
    /// Sender keys for pacing, per channel.
    senders: Arc<pacing::Senders>,
    render: Arc<RenderContext>,
    /// Once cancelled, claimed messages not yet on the wire are given back.
    shutdown: CancellationToken,
    metrics: Option<Arc<Metrics>>,
    provider_health: Arc<ProviderHealth>,
    /// While the provider refuses our credentials: when one message may try them again.
    credentials_retry_at: Arc<std::sync::Mutex<Option<DateTime<Utc>>>>,
}

/// What `Dispatcher::claim_reads` read for a claim.
enum ClaimReads {
    /// The claim's users' consents (by user) and each (number, channel) opted out among them.
    Read {
        consents: std::collections::HashMap<String, crate::store::Consent>,
        opted_out: std::collections::HashSet<(String, Channel)>,
    },
    /// Nothing read (an empty claim, or the reads failed): each message reads its own.
    PerMessage,
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

/// The send-time check's answer: a message ready for the provider, or what to record instead.
enum Prepared {
    Ready(OutboundMessage),
    NotSent(DispatchResult),
}

/// What a provider call came to.
enum Attempt {
    /// The provider answered (or failed to): the result to record, with the provider's own status
    /// word when it accepted the message.
    Answered {
        result: DispatchResult,
        provider_status: Option<String>,
    },
    /// The claim was taken over before the call: nothing was sent.
    ClaimLost,
    /// The number opted out, or consent changed, after the send-time check: nothing was sent.
    PolicyChanged,
}

/// How a one-time passcode goes (`Dispatcher::plan_otp`).
pub enum OtpPlan {
    /// To the provider as `outbound`; the message is written `sending` for `attempt`. With
    /// `accepted` (a provider in this process), the send is recorded in that same write, and
    /// `send_otp_now` only hands the message over.
    Send {
        outbound: Box<OutboundMessage>,
        attempt: SendAttempt,
        accepted: Option<Accepted>,
    },
    /// Not sent: the message is written and recorded skipped for this reason.
    Skip(SkipReason),
}

impl OtpPlan {
    /// The attempt to write the message `sending` for, if it goes.
    pub fn attempt(&self) -> Option<&SendAttempt> {
        match self {
            OtpPlan::Send { attempt, .. } => Some(attempt),
            OtpPlan::Skip(_) => None,
        }
    }

    /// Send to `to` instead: the store wrote the message for the user's number on file
    /// (`OtpIssueOutcome::IssuedToNumberOnFile`). An OTP's text does not name its number.
    pub fn redirect(&mut self, to: PhoneNumber) {
        if let OtpPlan::Send {
            outbound, attempt, ..
        } = self
        {
            attempt.to_number = to.as_str().to_string();
            outbound.to = to;
        }
    }

    /// The send to record with the message, when the provider accepted it in process.
    pub fn accepted(&self) -> Option<AcceptedSend> {
        let OtpPlan::Send {
            accepted: Some(accepted),
            ..
        } = self
        else {
            return None;
        };
        Some(AcceptedSend {
            provider_sid: accepted.sid.clone(),
            news: news_beyond_sent(&accepted.status),
        })
    }
}

/// A one-time passcode's send, and whether a failure was only temporary.
struct OtpAttempt {
    settled: Settled,
    temporary: bool,
}

impl Dispatcher {
    pub fn new(parts: DispatcherParts) -> Self {
        let policy = PolicySettings {
            messaging_enabled: parts.messaging.enabled,
            quiet_hours: parts.messaging.quiet_hours,
            time_zone: parts.messaging.default_time_zone,
            content_sids: parts.twilio.content_sids.clone(),
        };
        Dispatcher {
            messages: parts.messages,
            consent_records: parts.consent_records,
            inbound: parts.inbound,
            schedule: parts.schedule,
            provider: parts.provider,
            delivery: parts.delivery,
            clock: parts.clock,
            settings: parts.settings,
            policy: Arc::new(policy),
            senders: Arc::new(pacing::Senders::new(&parts.twilio)),
            render: Arc::new(parts.messaging.render_context()),
            shutdown: CancellationToken::new(),
            metrics: parts.metrics,
            provider_health: parts.provider_health,
            credentials_retry_at: Arc::default(),
        }
    }

    /// How many of `wanted` messages a claim may take. While the provider refuses our
    /// credentials the queue is held as a whole, not message by message: nothing is claimed
    /// until `AUTH_OUTAGE_HOLD` has passed since the last refusal, then one message tries them
    /// again (and holds the queue anew if refused). Before, every due message made its own
    /// refused call and logged its own error (found by review); the outage is logged once, by
    /// `ProviderHealth`.
    fn claimable(&self, wanted: i64) -> i64 {
        if !self.provider_health.credentials_refused() {
            return wanted;
        }
        let now = self.clock.now();
        let mut retry_at = self
            .credentials_retry_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match *retry_at {
            Some(at) if now < at => 0,
            _ => {
                *retry_at = Some(now + AUTH_OUTAGE_HOLD);
                wanted.min(1)
            }
        }
    }

    /// The provider refused our credentials: hold the queue until `until`.
    fn hold_for_credentials(&self, until: DateTime<Utc>) {
        let mut retry_at = self
            .credentials_retry_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *retry_at = Some(retry_at.map_or(until, |at| at.max(until)));
    }

    /// Give claimed-but-unsent messages back when `shutdown` is cancelled.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Claim one batch of due messages and settle each of them.
    pub async fn run_once(&self) -> AppResult<RoundReport> {
        let now = self.clock.now();
        let settings = self.settings;
        let limit = self.claimable(settings.batch_size);
        let claimed = if limit > 0 {
            self.messages
                .claim_due_messages(now, now + settings.lease, limit)
                .await?
        } else {
            Vec::new()
        };
        let mut report = RoundReport {
            claimed: claimed.len(),
            ..RoundReport::default()
        };
        let reads = Arc::new(self.claim_reads(&claimed).await);
        let mut tasks = JoinSet::new();
        for message in claimed {
            let (this, reads) = (self.clone(), reads.clone());
            tasks.spawn(async move { this.settle(message, &reads).await });
        }
        while let Some(joined) = tasks.join_next().await {
            tally(&mut report, joined);
        }
        if let Some(metrics) = &self.metrics {
            metrics.record_round(&report.counts());
        }
        Ok(report)
    }

    /// Send until `shutdown`, with up to `DISPATCH_BATCH_SIZE` messages in flight: as soon as
    /// one settles, more are claimed, so a slow one (a long lookup, a slow provider call) never
    /// holds up the rest the way lockstep rounds would. Idle, it sleeps until `wakeup` or the
    /// poll interval.
    pub async fn run(self, wakeup: DispatchWakeup, shutdown: CancellationToken) {
        let this = self.with_shutdown(shutdown.clone());
        tracing::info!(provider = this.provider.name(), "dispatcher started");
        let capacity = usize::try_from(this.settings.batch_size)
            .unwrap_or(1)
            .max(1);
        // Claim when a quarter of the slots are free (or none is busy), not for every message
        // that settles: a claim sorts the due messages (OTPs first, then the oldest), so claiming
        // one at a time made a long queue cost a sort per message.
        let claim_at = (capacity / 4).max(1);
        let mut in_flight = JoinSet::new();
        // When sends that died mid-way were last looked for (see `Stale`): at the first claim,
        // then at most once per `STALE_CHECK`.
        let mut stale_checked: Option<tokio::time::Instant> = None;
        while !shutdown.is_cancelled() {
            let free = capacity - in_flight.len();
            let mut claimed_all_free = false;
            if free >= claim_at || in_flight.is_empty() {
                let stale = match stale_checked {
                    Some(at) if at.elapsed() < STALE_CHECK => Stale::Skip,
                    _ => {
                        stale_checked = Some(tokio::time::Instant::now());
                        Stale::Include
                    }
                };
                match this.claim(free as i64, stale).await {
                    Ok(claimed) => {
                        claimed_all_free = claimed.len() == free;
                        if let Some(metrics) = &this.metrics {
                            metrics.record_round(&[("claimed", claimed.len())]);
                        }
                        let reads = Arc::new(this.claim_reads(&claimed).await);
                        for message in claimed {
                            let (task, reads) = (this.clone(), reads.clone());
                            in_flight.spawn(async move { task.settle(message, &reads).await });
                        }
                    }
                    Err(e) => tracing::error!(error = format!("{e:#}"), "claiming messages failed"),
                }
            }
            // More may be due right away when every free slot was filled and a slot is free.
            if claimed_all_free && in_flight.len() < capacity {
                continue;
            }
            tokio::select! {
                Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => {
                    this.record_settled(joined);
                }
                _ = wakeup.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = shutdown.cancelled() => {}
            }
        }
        // Messages waiting for a send slot are given back; those on the wire finish.
        while let Some(joined) = in_flight.join_next().await {
            this.record_settled(joined);
        }
        tracing::info!("dispatcher stopped");
    }

    async fn claim(&self, wanted: i64, stale: Stale) -> AppResult<Vec<MessageRecord>> {
        let limit = self.claimable(wanted);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = self.clock.now();
        self.messages
            .claim_messages(now, now + self.settings.lease, limit, stale)
            .await
    }

    /// Count one settled message for `/metrics` (the background loop's equivalent of a round).
    fn record_settled(&self, joined: Result<AppResult<Settled>, tokio::task::JoinError>) {
        let mut report = RoundReport::default();
        tally(&mut report, joined);
        if let Some(metrics) = &self.metrics {
            let counts = report.counts();
            // `claimed` was counted when claiming.
            metrics.record_round(&counts[1..]);
        }
    }

    /// The consents and opt-outs a claim's messages are checked against, read once for all of
    /// them instead of twice per message. Reading them a moment early is safe: marking a message
    /// `sending` checks both again in the same statement (`SendGuard`), and a message stopped
    /// there is given back and prepared again with fresh reads. If the reads fail, each message
    /// reads its own.
    async fn claim_reads(&self, claimed: &[MessageRecord]) -> ClaimReads {
        if claimed.is_empty() {
            return ClaimReads::PerMessage;
        }
        let mut users: Vec<String> = claimed.iter().map(|m| m.user_id.clone()).collect();
        users.sort();
        users.dedup();
        let read = async {
            let consents = self.consent_records.get_consents(&users).await?;
            let numbers: Vec<String> = consents
                .iter()
                .filter_map(|c| c.phone_number.clone())
                .collect();
            let opted_out = self.inbound.opted_out_among(&numbers).await?;
            AppResult::Ok((consents, opted_out))
        };
        match read.await {
            Ok((consents, opted_out)) => ClaimReads::Read {
                consents: consents
                    .into_iter()
                    .map(|c| (c.user_id.clone(), c))
                    .collect(),
                opted_out: opted_out.into_iter().collect(),
            },
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "reading a claim's consents failed; reading per message"
                );
                ClaimReads::PerMessage
            }
        }
    }

    async fn consent_for(
        &self,
        user_id: &str,
        reads: &ClaimReads,
    ) -> AppResult<Option<crate::store::Consent>> {
        match reads {
            ClaimReads::Read { consents, .. } => Ok(consents.get(user_id).cloned()),
            ClaimReads::PerMessage => self.consent_records.get_consent(user_id).await,
        }
    }

    async fn opted_out(
        &self,
        to: &PhoneNumber,
        channel: Channel,
        reads: &ClaimReads,
    ) -> AppResult<bool> {
        match reads {
            ClaimReads::Read { opted_out, .. } => {
                Ok(opted_out.contains(&(to.as_str().to_string(), channel)))
            }
            ClaimReads::PerMessage => self.inbound.is_opted_out(to.as_str(), channel).await,
        }
    }

    async fn settle(&self, message: MessageRecord, reads: &ClaimReads) -> AppResult<Settled> {
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
            if let recovery::Recovery::Settled(settled) = self.recover(&claim).await? {
                return Ok(settled);
            }
        }
        let outbound = match self.prepare(&claim.message, reads).await? {
            Prepared::Ready(outbound) => outbound,
            Prepared::NotSent(result) => return self.finish(&claim, "", result, None).await,
        };
        match self.wait_for_send_slot(&outbound, claim.fence).await? {
            SlotWait::Go => {}
            SlotWait::Shutdown => return self.release(&claim).await,
            SlotWait::NotBefore(until) => {
                let held = DispatchResult::Deferred {
                    until,
                    reason: DeferReason::SendSlot,
                };
                return self.finish(&claim, "", held, None).await;
            }
        }
        let to = outbound.to.masked();
        match self.send(&mut claim, outbound, None).await? {
            Attempt::Answered {
                result,
                provider_status,
            } => self.finish(&claim, &to, result, provider_status).await,
            Attempt::ClaimLost => Ok(Settled::Lost),
            // Give it back to be checked again at once: the next round skips it with the reason.
            Attempt::PolicyChanged => self.release(&claim).await,
        }
    }

    async fn release(&self, claim: &Claim) -> AppResult<Settled> {
        self.messages
            .release_claim(&claim.message.id, self.clock.now(), claim.fence)
            .await?;
        Ok(Settled::Released)
    }

    /// Record the outcome, if the claim is still ours. A provider that already reports more
    /// than acceptance (the mock says `delivered`), and callbacks that arrived before the SID was
    /// recorded, are applied in the same transaction as the send (`record_sent`), by the status
    /// callbacks' forward-only rule, and then followed up as a callback is (`Delivery::react`).
    async fn finish(
        &self,
        claim: &Claim,
        to: &str,
        result: DispatchResult,
        provider_status: Option<String>,
    ) -> AppResult<Settled> {
        let message = &claim.message;
        let now = self.clock.now();
        if let DispatchResult::Sent {
            provider_sid,
            status,
        } = &result
        {
            let news = provider_status.as_deref().and_then(news_beyond_sent);
            let recorded = self
                .messages
                .record_sent(&message.id, provider_sid, *status, news, now, claim.fence)
                .await;
            let known = match recorded {
                Ok(Some(known)) => known,
                Ok(None) => {
                    tracing::warn!(message_id = %message.id, "claim taken over by another dispatcher; leaving the message to it");
                    return Ok(Settled::Lost);
                }
                Err(e) if e.is_unique_violation() => {
                    return self.sid_held_elsewhere(claim, to, provider_sid, now).await
                }
                Err(e) => return Err(e),
            };
            log_result(message, to, &result);
            self.delivery
                .react_to_parked(provider_sid, known, now)
                .await?;
            return Ok(Settled::Done(result));
        }
        // The carrier says the patient opted out: stop messaging that number on that channel.
        // On record before the send's outcome: once the outcome is final nothing comes back here,
        // so a crash or a failed write between the two would lose the opt-out. (Whoever holds
        // the claim, the carrier's answer is true.)
        if let DispatchResult::Failed {
            code: Some(RECIPIENT_UNSUBSCRIBED),
            ..
        } = &result
        {
            if let Some(sent) = self.messages.get_message(&message.id).await? {
                self.delivery.carrier_opt_out(&sent, now).await?;
            }
        }
        if !self
            .messages
            .record_dispatch(&message.id, &result, now, claim.fence)
            .await?
        {
            tracing::warn!(message_id = %message.id, "claim taken over by another dispatcher; leaving the message to it");
            return Ok(Settled::Lost);
        }
        log_result(message, to, &result);
        Ok(Settled::Done(result))
    }

    /// The provider took the message but answered with a SID another message already holds
    /// (real SIDs are unique; found by review with a misbehaving fake: the message stayed
    /// `sending`, its lookup passed over its own SID as another's, and it was sent again, three
    /// times). It was accepted, so it is never sent again: `unknown`, with the SID named.
    async fn sid_held_elsewhere(
        &self,
        claim: &Claim,
        to: &str,
        provider_sid: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> AppResult<Settled> {
        let unknown = DispatchResult::Unknown {
            code: None,
            message: format!(
                "the provider took it but answered with SID {provider_sid}, which another \
                 message holds"
            ),
        };
        if !self
            .messages
            .record_dispatch(&claim.message.id, &unknown, now, claim.fence)
            .await?
        {
            return Ok(Settled::Lost);
        }
        log_result(&claim.message, to, &unknown);
        Ok(Settled::Done(unknown))
    }

    /// The send-time policy check (see [`policy`]) and rendering: either a message ready for the
    /// provider, or what to record instead.
    async fn prepare(&self, message: &MessageRecord, reads: &ClaimReads) -> AppResult<Prepared> {
        let skip = |reason: SkipReason| Ok(Prepared::NotSent(DispatchResult::Skipped { reason }));
        let fail = |why: String| {
            Ok(Prepared::NotSent(DispatchResult::Failed {
                code: None,
                message: why,
            }))
        };
        if !self.policy.messaging_enabled {
            return skip(SkipReason::Disabled);
        }
        let Some(template) = templates::find(&message.template_name) else {
            return fail(format!("unknown template {}", message.template_name));
        };
        let Some(mut channel) = Channel::parse(&message.channel) else {
            return fail(format!("unknown channel {}", message.channel));
        };
        let consent = self.consent_for(&message.user_id, reads).await?;
        let to = match policy::recipient(consent.as_ref()) {
            Ok(to) => to,
            Err(reason) => return skip(reason),
        };
        let Some(consent) = consent else {
            return skip(SkipReason::NoConsent);
        };
        // The number texted STOP on this channel: nothing goes there until START.
        if self.opted_out(&to, channel, reads).await? {
            return skip(SkipReason::OptedOut);
        }
        if !policy::consented(&consent, template, channel) {
            return skip(SkipReason::NoConsent);
        }
        let now = self.clock.now();
        // A reminder goes only while its appointment or follow-up is still on, at that time.
        let subject = match policy::is_reminder(template) {
            true => self.schedule.reminder_subject(&message.id).await?,
            false => None,
        };
        let mut item = None;
        if let Some((kind, id, at)) = &subject {
            item = self.schedule.get_scheduled(*kind, id).await?;
            if let Some(reason) =
                policy::reminder_obsolete(*kind, *at, &message.user_id, item.as_ref(), now)
            {
                return skip(reason);
            }
        }
        let variables: Value = serde_json::from_str(&message.variables).unwrap_or(Value::Null);
        let appointment_at = match &subject {
            Some((SubjectType::Appointment, _, at)) => Some(*at),
            // An appointment reminder the host app queued itself (`POST /api/notifications`) has
            // no appointment here: its own time stands for it, so quiet hours never hold it past
            // the appointment either (found by review: it went out after the start).
            None => policy::appointment_time_in(template, &variables),
            _ => None,
        };
        // Quiet hours, the date and time and the day word are in the message's zone: the item's,
        // else the patient's, else DEFAULT_TIME_ZONE.
        let zone = policy::message_zone(
            item.as_ref().and_then(|i| i.time_zone.as_deref()),
            consent.time_zone.as_deref(),
            self.policy.time_zone,
        );
        match policy::quiet_hours_rule(template, &self.policy, now, zone, appointment_at) {
            QuietHoursRule::SendNow => {}
            QuietHoursRule::HoldUntil(until) => {
                return Ok(Prepared::NotSent(DispatchResult::Deferred {
                    until,
                    reason: DeferReason::QuietHours,
                }))
            }
            QuietHoursRule::Skip(reason) => return skip(reason),
        }
        // Rendered now, for this send: a reminder held until morning reads "today".
        let render_at = RenderAt {
            now,
            zone,
            default_zone: self.policy.time_zone,
        };
        let valid = match template.validate_at(&variables, &self.render, &render_at) {
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
                    let sms_opted_out =
                        consent.sms_consent && self.opted_out(&to, Channel::Sms, reads).await?;
                    match policy::whatsapp_fallback(&consent, sms_opted_out) {
                        Ok(fallback) => channel = fallback,
                        Err(reason) => return skip(reason),
                    }
                }
            }
        }
        Ok(Prepared::Ready(self.outbound(
            &message.id,
            template,
            channel,
            to,
            &valid,
            whatsapp_template,
        )))
    }

    /// How a WhatsApp message to `to` may go now.
    async fn whatsapp_route(
        &self,
        to: &PhoneNumber,
        template: &Template,
    ) -> AppResult<WhatsappRoute> {
        let last = self.inbound.last_whatsapp_inbound(to.as_str()).await?;
        Ok(policy::whatsapp_route(
            last,
            self.clock.now(),
            template,
            &self.policy,
        ))
    }

    /// The wire form of a message.
    fn outbound(
        &self,
        message_id: &str,
        template: &Template,
        channel: Channel,
        to: PhoneNumber,
        valid: &ValidVariables,
        whatsapp_template: Option<(String, String)>,
    ) -> OutboundMessage {
        OutboundMessage {
            message_id: message_id.to_string(),
            to,
            channel,
            template_name: template.name.to_string(),
            body: template.render(valid, &self.render).body,
            whatsapp_template,
        }
    }

    /// How a one-time passcode to `to` on WhatsApp would go: `send-otp` refuses a number whose
    /// 24-hour window is closed with no approved template to go by before anything is written
    /// (the answer is about the number named, never the number on file), and plans a code to
    /// the number named by this same reading (`plan_otp`'s `known_route`).
    pub async fn otp_whatsapp_route(&self, to: &PhoneNumber) -> AppResult<WhatsappRoute> {
        let template =
            templates::find("otp").ok_or_else(|| anyhow::anyhow!("the otp template is missing"))?;
        self.whatsapp_route(to, template).await
    }

    /// How a one-time passcode will go, decided before its message is written, so the message
    /// can be written already `sending` with this attempt, in the transaction that issues the
    /// code (`OtpIssue::attempt`). A WhatsApp code goes by `known_route` when given (the route
    /// `send-otp` already read for this number: read again, a window closing in between would
    /// plan a skip for a request answered as refused), else by the number's route now.
    pub async fn plan_otp(
        &self,
        message_id: &str,
        channel: Channel,
        to: PhoneNumber,
        code: &str,
        known_route: Option<WhatsappRoute>,
    ) -> AppResult<OtpPlan> {
        if !self.policy.messaging_enabled {
            return Ok(OtpPlan::Skip(SkipReason::Disabled));
        }
        let template =
            templates::find("otp").ok_or_else(|| anyhow::anyhow!("the otp template is missing"))?;
        let valid = template.validate(&serde_json::json!({ "code": code }), &self.render)?;
        let mut whatsapp_template = None;
        if channel == Channel::Whatsapp {
            let route = match known_route {
                Some(route) => route,
                None => self.whatsapp_route(&to, template).await?,
            };
            match route {
                WhatsappRoute::FreeText => {}
                WhatsappRoute::Template(sid) => {
                    whatsapp_template = Some((sid, valid.content_variables_json()))
                }
                WhatsappRoute::Closed => {
                    return Ok(OtpPlan::Skip(SkipReason::WhatsappWindowClosed));
                }
            }
        }
        let outbound = self.outbound(message_id, template, channel, to, &valid, whatsapp_template);
        // A patient is waiting for this code: it goes now, taking the sender's next slot so the
        // queued messages behind it slow down to keep the sender's rate.
        let slot = self.slot_to_take(&outbound);
        let attempt = attempt_for(&outbound, slot);
        let accepted = self.provider.accept_in_process(&outbound);
        Ok(OtpPlan::Send {
            outbound: Box::new(outbound),
            attempt,
            accepted,
        })
    }

    /// Send a one-time passcode now, for a message written claimed (and, with `OtpPlan::Send`,
    /// already marked `sending` with that attempt). The code exists only in memory, so this is
    /// the only chance to send it: a retryable provider failure is recorded as `failed` (the
    /// patient asks for a new code) instead of being queued for later.
    pub async fn send_otp_now(
        &self,
        message: &MessageRecord,
        plan: OtpPlan,
    ) -> AppResult<OtpDelivery> {
        if let OtpPlan::Send {
            outbound,
            accepted: Some(accepted),
            ..
        } = &plan
        {
            // Accepted in process and recorded `sent` with the code: only the hand-over is left.
            self.provider.hand_over_in_process(outbound, accepted);
            self.provider_health.accepted();
            let result = DispatchResult::Sent {
                provider_sid: accepted.sid.clone(),
                status: MessageStatus::Sent,
            };
            log_result(message, &outbound.to.masked(), &result);
            return Ok(OtpDelivery::Sent);
        }
        // The code is written and about to go out: the send and its record run to the end even
        // if the request is dropped (a client that hung up while Twilio answered), so the message
        // is recorded as sent instead of waiting, `sending`, for its lease to run out.
        let (this, message) = (self.clone(), message.clone());
        tokio::spawn(async move { this.send_otp_to_the_end(&message, plan).await })
            .await
            .map_err(|e| anyhow::anyhow!("the OTP send task failed: {e}"))?
    }

    async fn send_otp_to_the_end(
        &self,
        message: &MessageRecord,
        plan: OtpPlan,
    ) -> AppResult<OtpDelivery> {
        let fence = message
            .lease_until
            .ok_or_else(|| anyhow::anyhow!("an OTP message is written claimed"))?;
        let mut claim = Claim {
            message: message.clone(),
            fence,
        };
        let OtpAttempt { settled, temporary } = self.send_otp_claimed(&mut claim, plan).await?;
        match settled {
            Settled::Done(DispatchResult::Sent { .. }) => Ok(OtpDelivery::Sent),
            Settled::Done(DispatchResult::Skipped { reason }) => Ok(OtpDelivery::Skipped(reason)),
            Settled::Done(DispatchResult::Failed { .. }) if temporary => {
                Ok(OtpDelivery::Unavailable)
            }
            Settled::Done(DispatchResult::Failed { code, .. }) => Ok(OtpDelivery::Refused(code)),
            Settled::Done(DispatchResult::Unknown { .. }) => Ok(OtpDelivery::Unavailable),
            _ => Err(anyhow::anyhow!("the OTP message's claim was taken over").into()),
        }
    }

    async fn send_otp_claimed(&self, claim: &mut Claim, plan: OtpPlan) -> AppResult<OtpAttempt> {
        let outbound = match plan {
            OtpPlan::Skip(reason) => {
                let result = DispatchResult::Skipped { reason };
                return Ok(OtpAttempt {
                    settled: self.finish(claim, "", result, None).await?,
                    temporary: false,
                });
            }
            OtpPlan::Send { outbound, .. } => *outbound,
        };
        let masked = outbound.to.masked();
        // Marked `sending` when it was written: what is left is the call.
        let Attempt::Answered {
            result,
            provider_status,
        } = self
            .call_provider(claim, &outbound, claim.message.attempts)
            .await?
        else {
            return Err(anyhow::anyhow!("a provider call answers").into());
        };
        // The code cannot wait in the queue, and is never kept, so it cannot be looked up: a
        // failure that a retry could fix is recorded as failed, one after which the provider may
        // hold the code as `unknown`; both are reported as temporary, so the patient is told to
        // ask again.
        let (result, temporary) = match result {
            DispatchResult::Retry {
                lookup: true,
                code,
                message,
                ..
            } => (DispatchResult::Unknown { code, message }, true),
            DispatchResult::Retry { code, message, .. } => {
                (DispatchResult::Failed { code, message }, true)
            }
            DispatchResult::Held { code, message, .. } => {
                (DispatchResult::Failed { code, message }, true)
            }
            other => (other, false),
        };
        Ok(OtpAttempt {
            settled: self.finish(claim, &masked, result, provider_status).await?,
            temporary,
        })
    }

    /// Mark the message `sending` (renewing the lease for the call), call the provider, and
    /// classify the answer.
    async fn send(
        &self,
        claim: &mut Claim,
        outbound: OutboundMessage,
        take_slot: Option<SendSlot>,
    ) -> AppResult<Attempt> {
        let attempt = attempt_for(&outbound, take_slot);
        let now = self.clock.now();
        let renewed = now + self.settings.lease;
        // Consent and opt-out again, in the statement that marks the message `sending`: a STOP
        // that lands after the send-time check still stops the send. OTPs go to the number
        // named, with or without consent, but never to one that opted out.
        let template = templates::find(&outbound.template_name);
        let guard = SendGuard {
            consent: outbound.template_name != "otp",
            marketing: template.is_some_and(|t| t.category() == Category::Marketing),
        };
        match self
            .messages
            .mark_sending(
                &claim.message.id,
                &attempt,
                guard,
                now,
                claim.fence,
                renewed,
            )
            .await?
        {
            MarkSending::Marked => {}
            MarkSending::ClaimLost => {
                tracing::warn!(message_id = %claim.message.id, "claim taken over before sending; not sending");
                return Ok(Attempt::ClaimLost);
            }
            MarkSending::PolicyChanged => {
                tracing::info!(message_id = %claim.message.id, "opt-out or consent changed just before sending; not sending");
                return Ok(Attempt::PolicyChanged);
            }
        }
        claim.fence = renewed;
        self.call_provider(claim, &outbound, claim.message.attempts + 1)
            .await
    }

    /// Call the provider for a message marked `sending` (its `attempts_made`th attempt), and
    /// classify the answer.
    async fn call_provider(
        &self,
        claim: &Claim,
        outbound: &OutboundMessage,
        attempts_made: i64,
    ) -> AppResult<Attempt> {
        // `sending` is on disk before the provider hears of the message: after a power cut the
        // attempt is looked up, never blindly sent again.
        self.messages.durable().await?;
        Ok(match self.provider.send(outbound).await {
            Ok(accepted) => {
                self.provider_health.accepted();
                Attempt::Answered {
                    result: DispatchResult::Sent {
                        provider_sid: accepted.sid,
                        status: MessageStatus::Sent,
                    },
                    provider_status: Some(accepted.status),
                }
            }
            Err(e) => Attempt::Answered {
                result: self.retry_or_fail(&claim.message, attempts_made, &e),
                provider_status: None,
            },
        })
    }

    /// After a provider error: queue again with backoff while attempts and age allow, else fail
    /// with the provider's code. An error after which the provider may hold the message is
    /// always looked up before anything else, even on the last attempt: giving up blind would
    /// mark `failed` a message Twilio may well deliver. Refused credentials hold the message
    /// without spending its attempt.
    fn retry_or_fail(
        &self,
        message: &MessageRecord,
        attempts_made: i64,
        error: &ProviderError,
    ) -> DispatchResult {
        if let ProviderError::Unauthorized { message: why, .. } = error {
            self.provider_health.refused(why);
            let until = self.clock.now() + AUTH_OUTAGE_HOLD;
            self.hold_for_credentials(until);
            return DispatchResult::Held {
                code: error.code(),
                until,
                message: why.clone(),
            };
        }
        // Turned away for too many requests at once (the dispatcher may well have more in flight
        // than an account's concurrency limit): Twilio never processed it, so the message was
        // not tried and its attempt is given back; otherwise a burst of 429s could spend a
        // message's every attempt without it ever reaching Twilio. Its age still ends it.
        let too_old = self.too_old(message);
        if error.throttled() && !too_old {
            return DispatchResult::Held {
                code: error.code(),
                until: self.next_attempt(0, error),
                message: error.message().to_string(),
            };
        }
        if error.outcome_unknown() {
            return DispatchResult::Retry {
                code: error.code(),
                message: error.message().to_string(),
                next_attempt_at: self.next_attempt(attempts_made, error),
                lookup: true,
            };
        }
        let settings = self.settings;
        if error.is_retryable() && attempts_made < settings.max_attempts && !too_old {
            return DispatchResult::Retry {
                code: error.code(),
                message: error.message().to_string(),
                next_attempt_at: self.next_attempt(attempts_made, error),
                lookup: false,
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

    /// Whether a message has had all the attempts its age and `DISPATCH_MAX_ATTEMPTS` allow.
    fn out_of_attempts(&self, message: &MessageRecord) -> bool {
        message.attempts >= self.settings.max_attempts || self.too_old(message)
    }

    /// Older than `DISPATCH_MAX_AGE_SECONDS`.
    fn too_old(&self, message: &MessageRecord) -> bool {
        self.clock.now() - message.created_at > self.settings.max_age
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

/// Add one settled message to a report.
/// The attempt a message is marked `sending` for. Segments are an SMS matter; a WhatsApp message
/// (a ContentSid send above all, whose body is never transmitted) has none.
fn attempt_for(outbound: &OutboundMessage, take_slot: Option<SendSlot>) -> SendAttempt {
    let (encoding, segments) = match outbound.channel {
        Channel::Sms => {
            let info = crate::segments::analyze(&outbound.body);
            (
                Some(info.encoding.as_str().to_string()),
                Some(i64::from(info.segments)),
            )
        }
        Channel::Whatsapp => (None, None),
    };
    SendAttempt {
        to_number: outbound.to.as_str().to_string(),
        channel: outbound.channel,
        encoding,
        segments,
        body: recoverable_body(outbound),
        take_slot,
    }
}

fn tally(report: &mut RoundReport, joined: Result<AppResult<Settled>, tokio::task::JoinError>) {
    match joined {
        Ok(Ok(Settled::Done(result))) => match result {
            DispatchResult::Sent { .. } => report.sent += 1,
            DispatchResult::Skipped { .. } => report.skipped += 1,
            DispatchResult::Failed { .. } => report.failed += 1,
            DispatchResult::Retry { .. } | DispatchResult::LookupFailed { .. } => {
                report.retried += 1
            }
            DispatchResult::Deferred { .. } => report.deferred += 1,
            DispatchResult::Unknown { .. } => report.unknown += 1,
            DispatchResult::Held { .. } => report.held += 1,
        },
        Ok(Ok(Settled::Adopted)) => report.adopted += 1,
        Ok(Ok(Settled::Released)) => report.released += 1,
        Ok(Ok(Settled::Lost)) => report.lost += 1,
        // The message keeps its lease and is claimed again when it expires.
        Ok(Err(e)) => tracing::error!(error = format!("{e:#}"), "could not settle a message"),
        Err(e) => tracing::error!(error = format!("{e:#}"), "dispatch task panicked"),
    }
}

/// The body a lookup may match an attempt by: the text sent, except where it cannot be kept or
/// matched (an OTP's code is never stored; a ContentSid send is stored by Twilio in its own
/// rendering). Such a message is never adopted.
fn recoverable_body(outbound: &OutboundMessage) -> Option<String> {
    (outbound.template_name != "otp" && outbound.whatsapp_template.is_none())
        .then(|| outbound.body.clone())
}

/// What a provider's answer to a send says beyond `sent`, if anything: the mock's `delivered`;
/// Twilio answers `queued` at creation, which says nothing.
fn news_beyond_sent(provider_status: &str) -> Option<MessageStatus> {
    MessageStatus::from_twilio(provider_status).filter(|ours| ours.may_follow(MessageStatus::Sent))
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
                status = status.as_str(),
                "message sent"
            )
        }
        DispatchResult::Skipped { reason } => {
            tracing::info!(
                message_id = id,
                template,
                reason = reason.as_str(),
                "message skipped"
            )
        }
        DispatchResult::Deferred { until, reason } => {
            tracing::info!(message_id = id, template, reason = reason.as_str(), %until, "message held back")
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
            lookup,
        } => {
            tracing::warn!(message_id = id, template, to, code, error = message, %next_attempt_at, lookup, "message will be retried")
        }
        DispatchResult::LookupFailed {
            message,
            next_attempt_at,
            ..
        } => {
            tracing::warn!(message_id = id, template, error = message, %next_attempt_at, "looking up an earlier attempt failed; will look again")
        }
        DispatchResult::Unknown { message, .. } => {
            tracing::error!(
                message_id = id,
                template,
                error = message,
                "outcome unknown: the provider may or may not hold this message; not resent"
            )
        }
        DispatchResult::Held {
            code: Some(TOO_MANY_REQUESTS),
            until,
            message,
        } => {
            tracing::warn!(message_id = id, template, error = message, %until, "held: the provider turned it away for too many requests at once (429); no attempt spent")
        }
        DispatchResult::Held { until, message, .. } => {
            // A warning: the outage itself is logged once, loudly, by `ProviderHealth`.
            tracing::warn!(message_id = id, template, error = message, %until, "held: the provider refused our credentials")
        }
    }
}
