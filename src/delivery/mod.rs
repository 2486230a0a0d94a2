//! Delivery tracking: Twilio's status callbacks (and the statuses a provider reports at send time)
//! move a message forward, never back. The forward-only rule is [`MessageStatus::allowed_from`];
//! the store applies it in one conditional update.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::channel::Channel;
use crate::consent::ConsentService;
use crate::error::AppResult;
use crate::provider::twilio::RECIPIENT_UNSUBSCRIBED;
use crate::status::MessageStatus;
use crate::store::{KnownStatus, MessageRecord, MessageStore, OwedOptOut, StatusApplied};

/// What a status callback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusOutcome {
    Applied { changed: bool },
    UnknownMessage,
    IgnoredStatus,
}

/// What a round of `Delivery::settle_parked_opt_outs` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ParkedOptOuts {
    /// Opt-outs recorded.
    pub recorded: u64,
    /// Forgotten unrecorded: consent changed after the carrier's report, or the message is gone.
    pub superseded: u64,
    /// Could not be recorded: still owed, for the next round.
    pub failed: u64,
}

#[derive(Clone)]
pub struct Delivery {
    messages: Arc<dyn MessageStore>,
    consent: ConsentService,
}

impl Delivery {
    pub fn new(messages: Arc<dyn MessageStore>, consent: ConsentService) -> Self {
        Delivery { messages, consent }
    }

    /// Apply a delivery status (from Twilio's callback, or the provider's answer at send time) to
    /// the message with this SID. Error 21610 also revokes that channel's consent (source
    /// `provider`) and records the number's opt-out.
    pub async fn apply_status(
        &self,
        provider_sid: &str,
        twilio_status: &str,
        error_code: Option<i64>,
        at: DateTime<Utc>,
    ) -> AppResult<StatusOutcome> {
        let Some(status) = MessageStatus::from_twilio(twilio_status) else {
            tracing::info!(
                provider_sid,
                twilio_status,
                "status callback ignored: not a delivery status"
            );
            return Ok(StatusOutcome::IgnoredStatus);
        };
        // A carrier opt-out goes on record before the status that reports it. Were it after, a
        // crash or a failed write between the two would leave the status stored and the opt-out
        // not, and Twilio's retry would find the status already seen and skip the opt-out.
        let opted_out = error_code == Some(RECIPIENT_UNSUBSCRIBED)
            && self.opt_out_unless_seen(provider_sid, status, at).await?;
        let mut applied = self
            .messages
            .apply_status(provider_sid, status, error_code, at)
            .await?;
        if opted_out && !applied.changed {
            // History keeps only what moved the status, so a report after a final status (an
            // `undelivered` after `delivered`) left no event, and each replay of it found it
            // unseen and revoked consent again, even consent the patient gave back since. It is
            // kept now (a no-op when `apply_status` stored it as a new code for the status).
            if let Some(message) = &applied.message {
                self.messages
                    .record_report(&message.id, status, error_code, at)
                    .await?;
            }
        }
        // Its opt-out is on record: for `react`, nothing about this status is new.
        applied.first_seen &= !opted_out;
        self.react(provider_sid, status, error_code, applied, at)
            .await
    }

    /// For a 21610 callback not seen before: the number's opt-out, on the message's channel.
    /// Whether it was recorded. Recording it again (a retry after a failure) changes nothing;
    /// a status already seen is a replay, which must not revoke consent given again since.
    async fn opt_out_unless_seen(
        &self,
        provider_sid: &str,
        status: MessageStatus,
        at: DateTime<Utc>,
    ) -> AppResult<bool> {
        let Some(message) = self.messages.message_by_sid(provider_sid).await? else {
            // Not ours yet: it is parked, and its opt-out follows when the send is recorded.
            return Ok(false);
        };
        let seen = self
            .messages
            .message_events(&message.id)
            .await?
            .iter()
            .any(|e| e.status == status && e.error_code == Some(RECIPIENT_UNSUBSCRIBED));
        if seen {
            return Ok(false);
        }
        self.carrier_opt_out(&message, at).await?;
        Ok(true)
    }

    /// The carrier reported that `message`'s recipient opted out: that number's opt-out, on the
    /// message's channel (`ConsentService::carrier_opt_out`).
    pub async fn carrier_opt_out(
        &self,
        message: &MessageRecord,
        at: DateTime<Utc>,
    ) -> AppResult<()> {
        if let Some((channel, number)) = recipient(message) {
            self.consent.carrier_opt_out(number, channel, at).await?;
        }
        Ok(())
    }

    /// What follows a status once it is stored: the log line, and for a carrier opt-out
    /// (21610, the first time it is seen) the number's opt-out.
    pub async fn react(
        &self,
        provider_sid: &str,
        status: MessageStatus,
        error_code: Option<i64>,
        applied: StatusApplied,
        at: DateTime<Utc>,
    ) -> AppResult<StatusOutcome> {
        let Some(message) = applied.message else {
            // Never an error: Twilio would retry it forever.
            tracing::warn!(
                provider_sid,
                status = status.as_str(),
                "status callback for an unknown MessageSid"
            );
            return Ok(StatusOutcome::UnknownMessage);
        };
        tracing::info!(message_id = %message.id, provider_sid, status = status.as_str(), changed = applied.changed, error_code, "delivery status");
        // Only the first time this (message, status, error code) is seen: a replayed callback
        // must not revoke consent the patient has given again since.
        if error_code == Some(RECIPIENT_UNSUBSCRIBED) && applied.first_seen {
            self.carrier_opt_out(&message, at).await?;
        }
        Ok(StatusOutcome::Applied {
            changed: applied.changed,
        })
    }

    /// What follows the callbacks a send found parked for its SID (`MessageStore::record_sent`
    /// applied them with the send): each is followed up as a callback is (`react`). A carrier
    /// opt-out among them stayed parked as owed; once the opt-out is on record it is forgotten.
    pub async fn react_to_parked(
        &self,
        provider_sid: &str,
        parked: Vec<KnownStatus>,
        at: DateTime<Utc>,
    ) -> AppResult<()> {
        let mut opt_out = false;
        for k in parked {
            let carrier_opt_out = k.error_code == Some(RECIPIENT_UNSUBSCRIBED);
            opt_out |= carrier_opt_out;
            if carrier_opt_out && !k.applied.changed {
                // As for a live callback (`apply_status`): a report that could not move the
                // status (an `undelivered` parked behind a `delivered`) is kept in the history
                // all the same, or a replay of it would find it unseen and revoke consent again,
                // even consent the patient gave back since (found by review).
                if let Some(message) = &k.applied.message {
                    self.messages
                        .record_report(&message.id, k.status, k.error_code, at)
                        .await?;
                }
            }
            self.react(provider_sid, k.status, k.error_code, k.applied, at)
                .await?;
        }
        if opt_out {
            self.messages.forget_parked_opt_outs(provider_sid).await?;
        }
        Ok(())
    }

    /// Record the carrier opt-outs still owed for callbacks that arrived before their send
    /// recorded the SID: the process stopped, or a write failed, between the send's transaction
    /// and `react_to_parked`. One round, up to `limit` SIDs. Run at start and hourly with the
    /// prune (`Job::PruneUnmatchedCallbacks`).
    ///
    /// One whose channel's consent changed after the carrier's report (not by the carrier: the
    /// patient's START, their settings) is forgotten unrecorded: the later word stands, as for a
    /// replayed callback. One that fails stays owed for the next round, and the others go on.
    pub async fn settle_parked_opt_outs(
        &self,
        at: DateTime<Utc>,
        limit: i64,
    ) -> AppResult<ParkedOptOuts> {
        let mut report = ParkedOptOuts::default();
        for owed in self.messages.parked_opt_outs_owed(limit).await? {
            match self.settle_parked_opt_out(&owed, at).await {
                Ok(true) => report.recorded += 1,
                Ok(false) => report.superseded += 1,
                Err(e) => {
                    report.failed += 1;
                    tracing::error!(provider_sid = %owed.provider_sid, error = format!("{e:#}"), "an owed carrier opt-out could not be recorded; it stays owed");
                }
            }
        }
        if report.recorded > 0 {
            tracing::warn!(
                recorded = report.recorded,
                "carrier opt-outs that arrived before their send recorded late"
            );
        }
        Ok(report)
    }

    /// `settle_parked_opt_outs` for one SID: `true` when its opt-out was recorded, `false` when
    /// a later change superseded it (or its message is gone).
    async fn settle_parked_opt_out(&self, owed: &OwedOptOut, at: DateTime<Utc>) -> AppResult<bool> {
        let sid = owed.provider_sid.as_str();
        let message = self.messages.message_by_sid(sid).await?;
        let mut recorded = false;
        if let Some((channel, number)) = message.as_ref().and_then(recipient) {
            let superseded = self
                .consent
                .channel_changed_since(number, channel, owed.reported_at)
                .await?;
            if !superseded {
                self.consent.carrier_opt_out(number, channel, at).await?;
                recorded = true;
            }
        }
        // Each report in the history (a no-op where its status moved and it is there), so that
        // a replay of it is found seen whatever happened to the consent meanwhile.
        if let Some(message) = &message {
            for status in &owed.statuses {
                self.messages
                    .record_report(&message.id, *status, Some(RECIPIENT_UNSUBSCRIBED), at)
                    .await?;
            }
        }
        self.messages.forget_parked_opt_outs(sid).await?;
        Ok(recorded)
    }

    /// Forget callbacks parked before `before` for SIDs no message of ours recorded: they never
    /// will (`RETENTION_UNMATCHED_CALLBACKS_DAYS`).
    pub async fn prune_unmatched(&self, before: DateTime<Utc>) -> AppResult<u64> {
        self.messages.prune_unmatched_statuses(before).await
    }
}

/// The channel and number `message` went to, when both are known.
fn recipient(message: &MessageRecord) -> Option<(Channel, &str)> {
    Some((
        Channel::parse(&message.channel)?,
        message.to_number.as_deref()?,
    ))
}
