//! Recovering messages whose earlier attempt has an unknown outcome: look them up at the provider
//! and adopt what is found, so a message is not sent twice.

use serde_json::Value;

use super::{Claim, Dispatcher, Settled};
use crate::error::AppResult;
use crate::phone::PhoneNumber;
use crate::status::MessageStatus;
use crate::store::{Channel, DispatchResult, MessageRecord};
use crate::templates;

/// What looking for an earlier attempt came to.
pub(super) enum Recovery {
    /// The message is settled here: adopted, given up, or to be looked up again later.
    Settled(Settled),
    /// Nothing reached the provider: send it.
    SendAgain,
}

impl Dispatcher {
    /// An earlier attempt may have reached the provider: look for it there before sending again.
    pub(super) async fn recover(&self, claim: &Claim) -> AppResult<Recovery> {
        let message = &claim.message;
        let channel = Channel::parse(&message.channel).unwrap_or(Channel::Sms);
        let Some(to) = message
            .to_number
            .as_deref()
            .and_then(|n| PhoneNumber::parse(n).ok())
        else {
            // Never marked `sending` with a number (an OTP whose request died first): nothing
            // reached the provider.
            return self.unrecoverable_otp(claim).await;
        };
        // The body identifies the message, except where it cannot be rebuilt: an OTP's code is
        // gone, and a WhatsApp template is stored by Twilio in its own rendering.
        let body = match channel {
            Channel::Sms => self.render_body(message),
            Channel::Whatsapp => None,
        };
        let masked = to.masked();
        let candidates = match self
            .provider
            .find_sent(&to, channel, body.as_deref(), message.created_at)
            .await
        {
            Ok(candidates) => candidates,
            Err(e) => {
                // Never send blind while the outcome is unknown: look again later. The retry
                // carries no provider code, so the next claim still treats the outcome as unknown.
                let result = match self.retry_or_fail(message, message.attempts, &e) {
                    DispatchResult::Retry {
                        message,
                        next_attempt_at,
                        ..
                    } => DispatchResult::Retry {
                        code: None,
                        message: format!("looking up an earlier attempt failed: {message}"),
                        next_attempt_at,
                    },
                    other => other,
                };
                return Ok(Recovery::Settled(
                    self.finish(claim, &masked, result, None).await?,
                ));
            }
        };
        for candidate in candidates {
            // A SID already recorded belongs to another message (two identical bodies).
            if self
                .messages
                .message_by_sid(&candidate.sid)
                .await?
                .is_some()
            {
                continue;
            }
            tracing::info!(message_id = %message.id, provider_sid = %candidate.sid, "found at the provider: adopting instead of sending again");
            let adopted = DispatchResult::Sent {
                provider_sid: candidate.sid,
                status: MessageStatus::Sent,
            };
            return Ok(Recovery::Settled(
                match self
                    .finish(claim, &masked, adopted, Some(candidate.status))
                    .await?
                {
                    Settled::Done(_) => Settled::Adopted,
                    other => other,
                },
            ));
        }
        self.unrecoverable_otp(claim).await
    }

    /// An OTP whose outcome is unknown and which the provider does not hold: its code lived only
    /// in the memory of the request that died, so it cannot be sent again.
    async fn unrecoverable_otp(&self, claim: &Claim) -> AppResult<Recovery> {
        if claim.message.template_name != "otp" {
            return Ok(Recovery::SendAgain);
        }
        let failed = DispatchResult::Failed {
            code: None,
            message:
                "the process stopped while sending this code; the patient must ask for a new one"
                    .into(),
        };
        Ok(Recovery::Settled(
            self.finish(claim, "", failed, None).await?,
        ))
    }

    /// The message's body as it was sent, when it can be rebuilt.
    fn render_body(&self, message: &MessageRecord) -> Option<String> {
        let template = templates::find(&message.template_name)?;
        let variables: Value = serde_json::from_str(&message.variables).ok()?;
        let valid = template.validate(&variables, &self.render).ok()?;
        Some(template.render(&valid, &self.render).body)
    }
}

/// Whether an earlier attempt may have reached the provider without our knowing: the process
/// died while the message was `sending`, or the last attempt ended without an answer from the
/// provider (a timeout or a dropped connection leaves no provider error code).
pub(super) fn outcome_unknown(message: &MessageRecord) -> bool {
    message.status == MessageStatus::Sending
        || (message.attempts > 0 && message.error_code.is_none())
}
