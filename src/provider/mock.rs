//! The mock provider: records each message in an in-memory dev outbox (bodies included, so a
//! developer can read an OTP at `/dev/outbox`), logs the masked number, sends nothing, and reports
//! every message delivered.

use std::collections::VecDeque;
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Accepted, OutboundMessage, Provider, ProviderError};
use crate::phone::PhoneNumber;
use crate::store::Channel;

/// How many messages the dev outbox keeps; older ones fall off.
pub const OUTBOX_CAPACITY: usize = 500;

#[derive(Debug, Clone, Serialize)]
pub struct OutboxEntry {
    pub id: String,
    pub to: String,
    pub channel: String,
    pub template_name: String,
    pub body: String,
    pub provider_sid: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Default)]
pub struct MockProvider {
    outbox: Mutex<VecDeque<OutboxEntry>>,
}

impl MockProvider {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new SID, and the mock's word that the message was delivered.
    fn acceptance(&self) -> Accepted {
        Accepted {
            sid: format!("SM{}", uuid::Uuid::new_v4().simple()),
            status: "delivered".to_string(),
        }
    }

    /// What would have been sent, newest first.
    pub fn outbox(&self) -> Vec<OutboxEntry> {
        match self.outbox.lock() {
            Ok(outbox) => outbox.iter().rev().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().iter().rev().cloned().collect(),
        }
    }
}

#[async_trait]
impl Provider for MockProvider {
    fn name(&self) -> &'static str {
        "mock"
    }

    async fn send(&self, message: &OutboundMessage) -> Result<Accepted, ProviderError> {
        let accepted = self.acceptance();
        self.hand_over_in_process(message, &accepted);
        Ok(accepted)
    }

    fn accept_in_process(&self, _message: &OutboundMessage) -> Option<Accepted> {
        Some(self.acceptance())
    }

    fn hand_over_in_process(&self, message: &OutboundMessage, accepted: &Accepted) {
        tracing::info!(
            message_id = %message.message_id,
            to = %message.to.masked(),
            channel = message.channel.as_str(),
            template = %message.template_name,
            "[MOCK] message recorded, not sent"
        );
        let entry = OutboxEntry {
            id: message.message_id.clone(),
            to: message.to.as_str().to_string(),
            channel: message.channel.as_str().to_string(),
            template_name: message.template_name.clone(),
            body: message.body.clone(),
            provider_sid: accepted.sid.clone(),
            created_at: Utc::now(),
        };
        let mut outbox = self
            .outbox
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if outbox.len() == OUTBOX_CAPACITY {
            outbox.pop_front();
        }
        outbox.push_back(entry);
    }

    async fn find_sent(
        &self,
        to: &PhoneNumber,
        channel: Channel,
        body: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<Accepted>, ProviderError> {
        Ok(self
            .outbox()
            .into_iter()
            .rev()
            .filter(|e| {
                e.to == to.as_str() && e.channel == channel.as_str() && e.created_at >= since
            })
            .filter(|e| e.body == body)
            .map(|e| Accepted {
                sid: e.provider_sid,
                status: "delivered".to_string(),
            })
            .collect())
    }

    async fn health(&self) -> Result<String, ProviderError> {
        Ok("mock mode is on: messages are recorded in the dev outbox, nothing is sent".to_string())
    }
}
