//! Recovering messages whose earlier attempt has an unknown outcome (the process died while it was
//! `sending`, or the provider neither took nor refused it: a timeout, a dropped connection, its own
//! 5xx): look them up at the provider and adopt what is found, so a message is not sent twice.
//!
//! Adoption is strict, because adopting the wrong message breaks exactly-once the other way (a
//! message recorded as sent that never went): only what our own API calls created, from our
//! sender, at or after this attempt started, with exactly the body this attempt sent, and never a
//! SID another message holds or may be about to hold. Where the body cannot be known (an OTP, a
//! WhatsApp ContentSid send) nothing is adopted: the message ends `unknown`.

use super::{Claim, Dispatcher, Settled};
use crate::error::AppResult;
use crate::phone::PhoneNumber;
use crate::status::MessageStatus;
use crate::store::{Channel, DispatchResult, MessageRecord};

/// What looking for an earlier attempt came to.
pub(super) enum Recovery {
    /// The message is settled here: adopted, given up, or to be looked up again later.
    Settled(Settled),
    /// Nothing reached the provider: send it.
    SendAgain,
}

/// What a lookup at the provider found.
enum Lookup {
    /// This SID, not held by another message, with the provider's status word.
    Found { sid: String, status: String },
    /// The provider holds nothing that matches.
    Nothing,
    /// The lookup could not tell (it failed, timed out, or a sibling may own the match).
    Inconclusive(String),
    /// The provider was not asked (a twin settles first) or could not be (no connection, our
    /// credentials refused, too many requests at once): nothing about this message was learnt,
    /// so no attempt is spent; only its age ends the wait.
    NotAsked(String),
}

impl Dispatcher {
    /// An earlier attempt may have reached the provider: look for it there before sending again.
    pub(super) async fn recover(&self, claim: &Claim) -> AppResult<Recovery> {
        let message = &claim.message;
        let is_otp = message.template_name == "otp";
        let to = message
            .to_number
            .as_deref()
            .and_then(|n| PhoneNumber::parse(n).ok());
        let (Some(to), Some(started)) = (to, message.attempt_started_at) else {
            // Never marked `sending` with a number: nothing reached the provider. An OTP's code
            // lived only in the memory of the request that died, so it cannot be sent now.
            if is_otp {
                return self.give_up(claim, code_gone()).await;
            }
            return Ok(Recovery::SendAgain);
        };
        let masked = to.masked();
        // A message left `sending` by a process that stopped is now being looked up, not sent:
        // said so, its twins do not take it for a send in progress.
        if !message.lookup_needed {
            self.messages
                .mark_lookup_needed(&message.id, claim.fence)
                .await?;
        }
        let Some(body) = message.attempt_body.as_deref() else {
            // Nothing to match by: never adopt a guess, never resend blind.
            let why = if is_otp {
                "the code may or may not have been sent, and cannot be looked up (it is never \
                 kept); the patient asks for a new one"
            } else {
                "the provider may or may not hold this message, and a template send cannot be \
                 matched by its body"
            };
            return self.finish_unknown(claim, &masked, why).await;
        };
        match self.look_up(message, &to, body, started).await? {
            Lookup::Found { sid, status } => {
                tracing::info!(message_id = %message.id, provider_sid = %sid, "found at the provider: adopting instead of sending again");
                let adopted = DispatchResult::Sent {
                    provider_sid: sid,
                    status: MessageStatus::Sent,
                };
                Ok(Recovery::Settled(
                    match self.finish(claim, &masked, adopted, Some(status)).await? {
                        Settled::Done(_) => Settled::Adopted,
                        other => other,
                    },
                ))
            }
            Lookup::Nothing if is_otp => self.give_up(claim, code_gone()).await,
            Lookup::Nothing if self.out_of_attempts(message) => {
                // The provider does not hold it: the last attempt's error is final.
                let limit = if message.attempts >= self.settings.max_attempts {
                    "after DISPATCH_MAX_ATTEMPTS attempts"
                } else {
                    "older than DISPATCH_MAX_AGE_SECONDS"
                };
                let why = format!(
                    "gave up: {limit}; the provider does not hold it; last error: {}",
                    message.error_message.as_deref().unwrap_or("none")
                );
                let failed = DispatchResult::Failed {
                    code: message.error_code,
                    message: why,
                };
                Ok(Recovery::Settled(
                    self.finish(claim, "", failed, None).await?,
                ))
            }
            Lookup::Nothing => Ok(Recovery::SendAgain),
            // A lookup not made spends nothing: only the message's age ends its wait (found by
            // review: on the last attempt it ended `unknown` at once, without a lookup).
            Lookup::NotAsked(why) if self.too_old(message) => {
                let why = format!("no lookup could tell whether the provider holds it: {why}");
                self.finish_unknown(claim, &masked, &why).await
            }
            Lookup::Inconclusive(why) if self.out_of_attempts(message) => {
                let why = format!("no lookup could tell whether the provider holds it: {why}");
                self.finish_unknown(claim, &masked, &why).await
            }
            Lookup::Inconclusive(why) => {
                // Counted as an attempt, with its own backoff: a failing lookup must not repeat
                // every few seconds until the message is too old.
                let result = DispatchResult::LookupFailed {
                    message: format!("looking up an earlier attempt: {why}"),
                    next_attempt_at: self.lookup_backoff(message.attempts + 1),
                    counted: true,
                };
                Ok(Recovery::Settled(
                    self.finish(claim, &masked, result, None).await?,
                ))
            }
            Lookup::NotAsked(why) => {
                // Not counted (only the message's age ends it), looked up again after the
                // backoff its attempts so far give.
                let result = DispatchResult::LookupFailed {
                    message: format!("looking up an earlier attempt: {why}"),
                    next_attempt_at: self.lookup_backoff(message.attempts.max(1)),
                    counted: false,
                };
                Ok(Recovery::Settled(
                    self.finish(claim, &masked, result, None).await?,
                ))
            }
        }
    }

    /// Look for this attempt at the provider, within one deadline for the whole lookup.
    async fn look_up(
        &self,
        message: &MessageRecord,
        to: &PhoneNumber,
        body: &str,
        started: chrono::DateTime<chrono::Utc>,
    ) -> AppResult<Lookup> {
        let channel = Channel::parse(&message.channel).unwrap_or(Channel::Sms);
        // A sibling with the same body to the same number whose SID is not recorded yet could
        // own any match: wait until it settles.
        if self
            .messages
            .sibling_in_flight(&message.id, to.as_str(), body, started)
            .await?
        {
            return Ok(Lookup::NotAsked(
                "another message with the same text to the same number is in flight".into(),
            ));
        }
        let deadline = self.settings.lookup_deadline;
        let found = tokio::time::timeout(
            deadline,
            self.provider.find_sent(to, channel, body, started),
        )
        .await;
        let candidates = match found {
            Err(_) => {
                return Ok(Lookup::Inconclusive(format!(
                    "the lookup took longer than {} s",
                    deadline.as_secs()
                )))
            }
            Ok(Err(e)) => return Ok(self.lookup_refused(&e)),
            Ok(Ok(candidates)) => {
                // Twilio answered: the credentials work again, and a hold on them ends (found
                // by review: only a send lifted it, so a lookup's success held the queue on).
                self.provider_health.accepted();
                candidates
            }
        };
        // A twin marked `sending` while Twilio's list was read may own a match (found by review:
        // adopted here, its own send then found its SID held, and one message stood for two).
        if self
            .messages
            .sibling_in_flight(&message.id, to.as_str(), body, started)
            .await?
        {
            return Ok(Lookup::NotAsked(
                "another message with the same text to the same number went out during the lookup"
                    .into(),
            ));
        }
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
            return Ok(Lookup::Found {
                sid: candidate.sid,
                status: candidate.status,
            });
        }
        Ok(Lookup::Nothing)
    }

    /// A lookup the provider did not answer: an outage when no request reached it or it refused
    /// our credentials (which `/readyz` then reports, as for a send; found by review: each such
    /// lookup spent an attempt, and the message ended `unknown`), else inconclusive.
    fn lookup_refused(&self, error: &crate::provider::ProviderError) -> Lookup {
        use crate::provider::ProviderError;
        let why = error.message().to_string();
        match error {
            ProviderError::Unauthorized { .. } => {
                self.provider_health.refused(&why);
                self.hold_for_credentials(self.clock.now() + super::AUTH_OUTAGE_HOLD);
                Lookup::NotAsked(why)
            }
            ProviderError::Retryable {
                outcome_unknown: false,
                ..
            } => Lookup::NotAsked(why),
            _ => Lookup::Inconclusive(why),
        }
    }

    async fn give_up(&self, claim: &Claim, why: String) -> AppResult<Recovery> {
        let failed = DispatchResult::Failed {
            code: None,
            message: why,
        };
        Ok(Recovery::Settled(
            self.finish(claim, "", failed, None).await?,
        ))
    }

    async fn finish_unknown(&self, claim: &Claim, to: &str, why: &str) -> AppResult<Recovery> {
        let unknown = DispatchResult::Unknown {
            code: None,
            message: why.to_string(),
        };
        Ok(Recovery::Settled(
            self.finish(claim, to, unknown, None).await?,
        ))
    }

    /// When to look again after a failed lookup: the send backoff (10 s, 20 s, ... 15 min).
    fn lookup_backoff(&self, attempts_made: i64) -> chrono::DateTime<chrono::Utc> {
        let error = crate::provider::ProviderError::Retryable {
            code: None,
            message: String::new(),
            retry_after: None,
            outcome_unknown: true,
        };
        self.next_attempt(attempts_made, &error)
    }
}

fn code_gone() -> String {
    "the process stopped while sending this code; the patient must ask for a new one".into()
}

/// Whether an earlier attempt may have reached the provider without our knowing: the process
/// died while the message was `sending`, or the last attempt ended without an answer from the
/// provider (a timeout, a dropped connection, its own 5xx).
pub(super) fn outcome_unknown(message: &MessageRecord) -> bool {
    message.status == MessageStatus::Sending || message.lookup_needed
}
