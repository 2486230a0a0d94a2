//! Deployment-wide pacing per sender: each send takes the sender's next slot from the database,
//! so the rate holds across every instance.

use std::time::Duration;

use chrono::Utc;

use super::Dispatcher;
use crate::channel::Channel;
use crate::config::TwilioSettings;
use crate::error::AppResult;
use crate::provider::OutboundMessage;
use crate::store::SendSlot;

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
    /// Wait for this sender's next send slot (deployment-wide pacing). `false` when shutdown
    /// began while waiting.
    pub(super) async fn wait_for_send_slot(&self, outbound: &OutboundMessage) -> AppResult<bool> {
        let rate = self.settings.rate_per_second;
        if rate == 0 {
            return Ok(true);
        }
        // Pacing is about real time, whatever the (test) clock says.
        let slot = self
            .messages
            .reserve_send_slot(
                self.senders.key(outbound.channel),
                Utc::now().timestamp_micros(),
                slot_interval_us(rate),
            )
            .await?;
        let wait = slot - Utc::now().timestamp_micros();
        if wait > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_micros(wait as u64)) => {}
                _ = self.shutdown.cancelled() => return Ok(false),
            }
        }
        Ok(true)
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
