//! Providers: the only code that speaks to a messaging network. One [`Provider`] interface;
//! [`mock::MockProvider`] records and sends nothing, [`twilio::TwilioProvider`] calls Twilio's REST
//! API. Errors say whether trying again can help.

pub mod mock;
pub mod signature;
pub mod twilio;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::phone::PhoneNumber;
use crate::store::Channel;

/// One message ready for the wire.
#[derive(Debug, Clone)]
pub struct OutboundMessage {
    /// Our message id (for the mock outbox and log correlation).
    pub message_id: String,
    pub to: PhoneNumber,
    pub channel: Channel,
    pub template_name: String,
    /// The rendered text. Sent as `Body` unless `whatsapp_template` is set.
    pub body: String,
    /// An approved WhatsApp template to send instead of free text: (Content SID, ContentVariables JSON).
    pub whatsapp_template: Option<(String, String)>,
}

/// The provider took the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub sid: String,
    /// The provider's status word for it (Twilio: `queued`, `accepted`, `sent`, ...).
    pub status: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// Trying again later can help: rate limits, the provider's own faults, timeouts, network.
    #[error("retryable provider error{}: {message}", code_suffix(*.code))]
    Retryable {
        code: Option<i64>,
        message: String,
        retry_after: Option<Duration>,
    },
    /// Trying again cannot help: invalid number, opted out, not allowed, bad request.
    #[error("permanent provider error{}: {message}", code_suffix(*.code))]
    Permanent { code: Option<i64>, message: String },
}

fn code_suffix(code: Option<i64>) -> String {
    code.map(|c| format!(" {c}")).unwrap_or_default()
}

impl ProviderError {
    pub fn code(&self) -> Option<i64> {
        match self {
            ProviderError::Retryable { code, .. } | ProviderError::Permanent { code, .. } => *code,
        }
    }
    pub fn message(&self) -> &str {
        match self {
            ProviderError::Retryable { message, .. } | ProviderError::Permanent { message, .. } => {
                message
            }
        }
    }
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProviderError::Retryable { .. })
    }
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// `mock` or `twilio`.
    fn name(&self) -> &'static str;
    async fn send(&self, message: &OutboundMessage) -> Result<Accepted, ProviderError>;
    /// Messages the provider already holds that match `message` and were created at or after
    /// `since`: used before re-sending a message whose earlier attempt has an unknown outcome
    /// (a timeout, or a process that died mid-call), so it is adopted instead of sent twice.
    /// `body` narrows the match when the body can be rebuilt (`None`: match on the number and
    /// time only).
    async fn find_sent(
        &self,
        to: &PhoneNumber,
        channel: Channel,
        body: Option<&str>,
        since: DateTime<Utc>,
    ) -> Result<Vec<Accepted>, ProviderError>;
    /// Whether the provider can be used: credentials accepted, API reachable. A one-line summary.
    async fn health(&self) -> Result<String, ProviderError>;
}

pub type DynProvider = Arc<dyn Provider>;
