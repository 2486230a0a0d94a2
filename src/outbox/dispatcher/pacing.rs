//! Deployment-wide pacing per sender: each send takes the sender's next slot from the database,
//! so the rate holds across every instance.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Dispatcher;
use crate::channel::Channel;
use crate::config::TwilioSettings;
use crate::error::AppResult;
use crate::provider::OutboundMessage;
use crate::store::{SendSlot, SendSlotAnswer};

/// What waiting for a send slot came to.
pub(super) enum SlotWait {
    /// The slot has come: send.
    Go,
    /// Shutdown began while waiting.
    Shutdown,
    /// The sender's next free slot comes after the claim ends: none was taken, and the message
    /// waits in the queue until this time (the dispatcher's clock).
    NotBefore(DateTime<Utc>),
}

/// The pacing key of each channel's sender: the unit Twilio rate-limits.
pub(super) struct Senders {
    sms: String,
    whatsapp: String,
}

impl Senders {
    pub(super) fn new(twilio: &TwilioSettings) -> Self {
        let sms = twilio
            .messaging_service_sid
            .clone()
            .or_else(|| twilio.phone_number.as_ref().map(|n| n.as_str().to_string()));
        let whatsapp = twilio
            .whatsapp_number
            .as_ref()
            .map(|n| n.as_str().to_string());
        let key = |channel: Channel, sender: Option<String>| {
            format!(
                "{}:{}",
                channel.as_str(),
                sender.unwrap_or_else(|| "default".into())
            )
        };
        Senders {
            sms: key(Channel::Sms, sms),
            whatsapp: key(Channel::Whatsapp, whatsapp),
        }
    }

    fn key(&self, channel: Channel) -> &str {
        match channel {
            Channel::Sms => &self.sms,
            Channel::Whatsapp => &self.whatsapp,
        }
    }
}

impl Dispatcher {
    /// Wait for this sender's next send slot (deployment-wide pacing), if it comes while the
    /// claim is still ours: `fence`, the claim's lease by the dispatcher's clock, less a margin
    /// for marking the send. A later slot is not taken (`SlotWait::NotBefore`): waiting for it
    /// would outlast the lease, the slot would be spent on nothing, and every claim after would
    /// reserve further ahead, so the queue stalled for good (a low rate, a short lease, several
    /// instances, or a burst of codes taking slots ahead of the queue).
    pub(super) async fn wait_for_send_slot(
        &self,
        outbound: &OutboundMessage,
        fence: DateTime<Utc>,
    ) -> AppResult<SlotWait> {
        let rate = self.settings.rate_per_second;
        if rate == 0 {
            return Ok(SlotWait::Go);
        }
        // Pacing is about real time, whatever the (test) clock says; the claim's time left is
        // by the dispatcher's clock.
        let now_us = Utc::now().timestamp_micros();
        let margin = (self.settings.lease / 2).min(chrono::Duration::seconds(2));
        let left_us = (fence - self.clock.now() - margin)
            .num_microseconds()
            .unwrap_or(0)
            .max(0);
        let answer = self
            .messages
            .reserve_send_slot(
                self.senders.key(outbound.channel),
                now_us,
                slot_interval_us(rate),
                now_us.saturating_add(left_us),
            )
            .await?;
        let slot = match answer {
            SendSlotAnswer::Reserved(slot) => slot,
            SendSlotAnswer::NextFreeAt(free_at) => {
                let wait = chrono::Duration::microseconds((free_at - now_us).max(0));
                return Ok(SlotWait::NotBefore(self.clock.now() + wait));
            }
        };
        let wait = slot - Utc::now().timestamp_micros();
        if wait > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_micros(wait as u64)) => {}
                _ = self.shutdown.cancelled() => return Ok(SlotWait::Shutdown),
            }
        }
        Ok(SlotWait::Go)
    }

    /// The send slot a message that goes at once (a one-time passcode) takes without waiting
    /// for it, with its `sending` mark; `None` with no rate limit.
    pub(super) fn slot_to_take(&self, outbound: &OutboundMessage) -> Option<SendSlot> {
        let rate = self.settings.rate_per_second;
        (rate > 0).then(|| SendSlot {
            sender: self.senders.key(outbound.channel).to_string(),
            now_us: Utc::now().timestamp_micros(),
            interval_us: slot_interval_us(rate),
        })
    }
}

/// Microseconds between a sender's send slots: 2% slower than the limit, so network jitter does
/// not push two slots into one second at the provider.
fn slot_interval_us(rate_per_second: u32) -> i64 {
    1_020_000 / i64::from(rate_per_second.max(1))
}
