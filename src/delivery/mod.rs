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
use crate::store::{MessageStore, StatusApplied};

/// What a status callback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusOutcome {
    Applied { changed: bool },
    UnknownMessage,
    IgnoredStatus,
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
        let applied = self
            .messages
            .apply_status(provider_sid, status, error_code, at)
            .await?;
        self.react(provider_sid, status, error_code, applied, at)
            .await
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
            if let (Some(channel), Some(number)) = (
                Channel::parse(&message.channel),
                message.to_number.as_deref(),
            ) {
                self.consent.carrier_opt_out(number, channel, at).await?;
            }
        }
        Ok(StatusOutcome::Applied {
            changed: applied.changed,
        })
    }

    /// Forget callbacks parked before `before` for SIDs no message of ours recorded: they never
    /// will (`RETENTION_UNMATCHED_CALLBACKS_DAYS`).
    pub async fn prune_unmatched(&self, before: DateTime<Utc>) -> AppResult<u64> {
        self.messages.prune_unmatched_statuses(before).await
    }
}
