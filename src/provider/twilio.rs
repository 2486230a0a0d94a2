//! Twilio's REST API (2010-04-01), through one reqwest client with timeouts.
//!
//! The wire format follows Twilio's OpenAPI spec (`twilio_api_v2010.json`, operation
//! `CreateMessage`): HTTP Basic auth with the Account SID and Auth Token, a form-encoded body with
//! `To`, `From` or `MessagingServiceSid`, `Body` or `ContentSid` + `ContentVariables`, and
//! `StatusCallback`. Errors come back as `{code, message, more_info, status}`.

use std::time::Duration;

use async_trait::async_trait;
use chrono::SubsecRound;
use reqwest::header::RETRY_AFTER;
use reqwest::{Client, Response, StatusCode};
use serde::Deserialize;

use super::{Accepted, OutboundMessage, Provider, ProviderError};
use crate::config::TwilioConfig;
use crate::phone::PhoneNumber;
use crate::store::Channel;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// What a trial account puts before every body.
const TRIAL_PREFIX: &str = "Sent from your Twilio trial account - ";

/// Twilio error codes that no retry can fix, named for the reader. Every other 4xx is permanent
/// too; these are the ones worth recognising in logs.
pub const INVALID_TO_NUMBER: i64 = 21211;
pub const NOT_A_MOBILE_NUMBER: i64 = 21614;
/// The recipient opted out at the carrier (replied STOP there).
pub const RECIPIENT_UNSUBSCRIBED: i64 = 21610;
pub const TOO_MANY_REQUESTS: i64 = 20429;

/// Who our messages on a channel come from, as Twilio lists them.
enum Sender {
    Service(String),
    Number(String),
    Unknown,
}

pub struct TwilioProvider {
    client: Client,
    config: TwilioConfig,
    status_callback: String,
}

#[derive(Deserialize)]
struct MessageResource {
    sid: String,
    status: Option<String>,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    body: Option<String>,
    /// RFC 2822, e.g. `Thu, 24 Aug 2023 05:01:45 +0000`.
    #[serde(default)]
    date_created: Option<String>,
    #[serde(default)]
    direction: Option<String>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    messaging_service_sid: Option<String>,
}

#[derive(Deserialize)]
struct MessageList {
    #[serde(default)]
    messages: Vec<MessageResource>,
    /// Relative to the API base, e.g. `/2010-04-01/Accounts/AC.../Messages.json?...&Page=1`.
    #[serde(default)]
    next_page_uri: Option<String>,
}

/// A lookup reads at most this many pages of 1,000 messages.
const MAX_LOOKUP_PAGES: usize = 20;

/// How far Twilio's clock may be behind ours for a lookup still to find an attempt's message.
/// A message older than the attempt by less than this is adopted only if no other message holds
/// it and no twin may own it, as any match.
const LOOKUP_CLOCK_MARGIN: chrono::Duration = chrono::Duration::seconds(10);

#[derive(Deserialize)]
struct TwilioErrorBody {
    code: Option<i64>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct AccountResource {
    friendly_name: Option<String>,
    status: Option<String>,
}

impl TwilioProvider {
    /// GET a Twilio resource as JSON, with the account's credentials.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
    ) -> Result<T, ProviderError> {
        let response = self
            .client
            .get(url)
            .basic_auth(
                &self.config.account_sid,
                Some(self.config.auth_token.expose()),
            )
            .send()
            .await
            .map_err(network_error)?;
        if !response.status().is_success() {
            return Err(error_from_response(response).await);
        }
        response.json().await.map_err(unreadable)
    }

    /// The sender `send` uses for a channel (see `create_message_form`).
    fn sender_for(&self, channel: Channel) -> Sender {
        let config = &self.config;
        match channel {
            Channel::Sms => match (&config.messaging_service_sid, &config.phone_number) {
                (Some(sid), _) => Sender::Service(sid.clone()),
                (None, Some(from)) => Sender::Number(from.as_str().to_string()),
                (None, None) => Sender::Unknown,
            },
            Channel::Whatsapp => match (&config.whatsapp_number, &config.messaging_service_sid) {
                (Some(from), _) => Sender::Number(format!("whatsapp:{}", from.as_str())),
                (None, Some(sid)) => Sender::Service(sid.clone()),
                (None, None) => Sender::Unknown,
            },
        }
    }

    /// `public_url` is this service's public base URL; Twilio posts status callbacks under it.
    pub fn new(config: TwilioConfig, public_url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let client = Client::builder()
            .connect_timeout(CONNECT_TIMEOUT.min(timeout))
            .timeout(timeout)
            .user_agent(concat!("prism-messaging/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(TwilioProvider {
            client,
            config,
            status_callback: format!("{public_url}/webhooks/twilio/status"),
        })
    }

    fn account_url(&self, suffix: &str) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}{suffix}",
            self.config.api_base, self.config.account_sid
        )
    }

    /// The `CreateMessage` form fields for `message`.
    pub fn create_message_form(
        &self,
        message: &OutboundMessage,
    ) -> Result<Vec<(&'static str, String)>, ProviderError> {
        let mut form = Vec::with_capacity(6);
        match message.channel {
            Channel::Sms => {
                form.push(("To", message.to.as_str().to_string()));
                // A Messaging Service picks the sender from its pool; otherwise our own number.
                if let Some(service) = &self.config.messaging_service_sid {
                    form.push(("MessagingServiceSid", service.clone()));
                } else if let Some(from) = &self.config.phone_number {
                    form.push(("From", from.as_str().to_string()));
                }
            }
            Channel::Whatsapp => {
                form.push(("To", format!("whatsapp:{}", message.to.as_str())));
                if let Some(from) = &self.config.whatsapp_number {
                    form.push(("From", format!("whatsapp:{}", from.as_str())));
                } else if let Some(service) = &self.config.messaging_service_sid {
                    form.push(("MessagingServiceSid", service.clone()));
                } else {
                    return Err(ProviderError::Permanent {
                        code: None,
                        message: "no WhatsApp sender configured (TWILIO_WHATSAPP_NUMBER)".into(),
                    });
                }
            }
        }
        match &message.whatsapp_template {
            Some((content_sid, variables)) => {
                form.push(("ContentSid", content_sid.clone()));
                form.push(("ContentVariables", variables.clone()));
            }
            None => form.push(("Body", message.body.clone())),
        }
        form.push(("StatusCallback", self.status_callback.clone()));
        Ok(form)
    }
}

/// Turn a non-success answer into a typed error: 429 (and Twilio's 20429) and 5xx can be retried,
/// every other 4xx cannot.
async fn error_from_response(response: Response) -> ProviderError {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body: Option<TwilioErrorBody> = response.json().await.ok();
    let code = body.as_ref().and_then(|b| b.code);
    // Twilio's messages can quote the number they refused: masked before it is logged or stored.
    let message = body
        .and_then(|b| b.message)
        .map(|m| crate::phone::redact_numbers(&m))
        .unwrap_or_else(|| format!("Twilio answered HTTP {}", status.as_u16()));
    if status == StatusCode::UNAUTHORIZED {
        ProviderError::Unauthorized { code, message }
    } else if status.is_server_error() {
        // Twilio's own fault, with or without a code (20500): it may have created the message.
        ProviderError::Retryable {
            code,
            message,
            retry_after,
            outcome_unknown: true,
        }
    } else if status == StatusCode::TOO_MANY_REQUESTS || code == Some(TOO_MANY_REQUESTS) {
        ProviderError::Retryable {
            // Tagged even when the body had no code, so the dispatcher knows it was not tried.
            code: Some(TOO_MANY_REQUESTS),
            message,
            retry_after,
            outcome_unknown: false,
        }
    } else {
        ProviderError::Permanent { code, message }
    }
}

/// A success answer we cannot read: Twilio may have done what we asked, so it counts as retryable
/// with an unknown outcome (no error code).
fn unreadable(e: reqwest::Error) -> ProviderError {
    ProviderError::Retryable {
        code: None,
        message: format!("unreadable answer from Twilio: {}", e.without_url()),
        retry_after: None,
        outcome_unknown: true,
    }
}

/// Network faults; a retry can help. A connection that was never made (refused, no route, a
/// name or TLS failure, a connect timeout) carried no request, so Twilio holds nothing and the
/// message is simply sent again (found by review: counted as "may be held", every message tried
/// during a short outage ended `unknown`, never sent). Any fault once connected may have
/// delivered the request: its outcome is unknown.
fn network_error(err: reqwest::Error) -> ProviderError {
    let never_connected = err.is_connect();
    let kind = if never_connected {
        "could not connect"
    } else if err.is_timeout() {
        "timed out"
    } else {
        "request failed"
    };
    ProviderError::Retryable {
        code: None,
        message: format!("Twilio {kind}: {}", err.without_url()),
        retry_after: None,
        outcome_unknown: !never_connected,
    }
}

#[async_trait]
impl Provider for TwilioProvider {
    fn name(&self) -> &'static str {
        "twilio"
    }

    async fn send(&self, message: &OutboundMessage) -> Result<Accepted, ProviderError> {
        let form = self.create_message_form(message)?;
        let response = self
            .client
            .post(self.account_url("/Messages.json"))
            .basic_auth(
                &self.config.account_sid,
                Some(self.config.auth_token.expose()),
            )
            .form(&form)
            .send()
            .await
            .map_err(network_error)?;
        if !response.status().is_success() {
            return Err(error_from_response(response).await);
        }
        let resource: MessageResource = response.json().await.map_err(unreadable)?;
        // A success without a SID cannot be tracked: Twilio may hold the message, so it is
        // looked up, as for an answer that cannot be read.
        if resource.sid.trim().is_empty() {
            return Err(ProviderError::Retryable {
                code: None,
                message: "Twilio answered without a message SID".into(),
                retry_after: None,
                outcome_unknown: true,
            });
        }
        Ok(Accepted {
            sid: resource.sid,
            status: resource.status.unwrap_or_else(|| "queued".to_string()),
        })
    }

    async fn find_sent(
        &self,
        to: &PhoneNumber,
        channel: Channel,
        body: &str,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<Accepted>, ProviderError> {
        let address = |number: &str| match channel {
            Channel::Sms => number.to_string(),
            Channel::Whatsapp => format!("whatsapp:{number}"),
        };
        let to = address(to.as_str());
        // Twilio's times have whole seconds, from Twilio's clock: a message created up to
        // `LOOKUP_CLOCK_MARGIN` before the attempt began (by our clock) counts as at or after it
        // (found by review: with Twilio's clock a second behind, the attempt's own message was
        // passed over and sent again).
        let earliest = since.trunc_subsecs(0) - LOOKUP_CLOCK_MARGIN;
        let sender = self.sender_for(channel);
        // Filtered by `To` only, not `DateSent`: a message Twilio has accepted but not yet sent
        // has no send date, and that is exactly the message this lookup is for. The list is
        // newest first, so paging stops at the first message older than the attempt.
        let first_page = reqwest::Url::parse_with_params(
            &self.account_url("/Messages.json"),
            [("To", to.as_str()), ("PageSize", "1000")],
        )
        .map_err(|e| ProviderError::Permanent {
            code: None,
            message: format!("cannot build the lookup URL: {e}"),
        })?;
        let mut next = Some(first_page.to_string());
        let mut found: Vec<(chrono::DateTime<chrono::FixedOffset>, Accepted)> = Vec::new();
        for _ in 0..MAX_LOOKUP_PAGES {
            let Some(url) = next.take() else { break };
            let list: MessageList = self.get_json(&url).await?;
            let mut reached_older = false;
            for m in list.messages {
                let Some(created) = m
                    .date_created
                    .as_deref()
                    .and_then(|d| chrono::DateTime::parse_from_rfc2822(d).ok())
                else {
                    continue;
                };
                if created < earliest {
                    reached_older = true;
                    continue;
                }
                // Only what our own API calls created: never a TwiML reply (`outbound-reply`,
                // the answers to HELP and STOP) or a message sent by other means.
                let ours = m.direction.as_deref() == Some("outbound-api")
                    && match &sender {
                        Sender::Service(sid) => m.messaging_service_sid.as_deref() == Some(sid),
                        Sender::Number(from) => m.from.as_deref() == Some(from.as_str()),
                        Sender::Unknown => false,
                    };
                // Exactly the body this attempt sent (a trial account prefixes its own text).
                let same_body = m
                    .body
                    .as_deref()
                    .is_some_and(|b| b == body || b.strip_prefix(TRIAL_PREFIX) == Some(body));
                if ours && same_body && m.to.as_deref() == Some(to.as_str()) {
                    let status = m.status.unwrap_or_else(|| "queued".into());
                    found.push((created, Accepted { sid: m.sid, status }));
                }
            }
            if !reached_older {
                next = list
                    .next_page_uri
                    .map(|uri| format!("{}{uri}", self.config.api_base));
            }
        }
        found.sort_by_key(|(created, _)| *created);
        Ok(found.into_iter().map(|(_, accepted)| accepted).collect())
    }

    async fn health(&self) -> Result<String, ProviderError> {
        let account: AccountResource = self.get_json(&self.account_url(".json")).await?;
        let status = account.status.unwrap_or_else(|| "unknown".into());
        let name = account.friendly_name.unwrap_or_default();
        // A suspended or closed account answers, but sends nothing (found by review: `health`
        // said ok).
        if matches!(status.as_str(), "suspended" | "closed") {
            return Err(ProviderError::Permanent {
                code: None,
                message: format!("the Twilio account {name:?} is {status}: it cannot send"),
            });
        }
        Ok(format!(
            "Twilio credentials accepted: account {name:?}, status {status}"
        ))
    }
}
