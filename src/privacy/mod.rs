//! A patient's rights over their data (GDPR articles 15, 17 and 20): a copy of everything held
//! about them, and erasure. Erasure keeps two things the law asks for, neither holding the number:
//! the consent audit trail, anonymised (the user id replaced by its keyed hash; number, address and
//! browser removed), as evidence of what was consented; and opt-outs (STOP), so that an erased
//! patient who said STOP is never texted again. Plus one erasure record.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::clock::DynClock;
use crate::error::AppResult;
use crate::otp::CodeHasher;
use crate::outbox::validate_user_id;
use crate::store::{ErasureCounts, PrivacyStore};

/// Who asked for an erasure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErasedBy {
    /// The patient, with their own token.
    User,
    /// The host app, with its key.
    HostApp,
}

impl ErasedBy {
    fn as_str(self) -> &'static str {
        match self {
            ErasedBy::User => "user",
            ErasedBy::HostApp => "host_app",
        }
    }
}

#[derive(Clone)]
pub struct Privacy {
    store: Arc<dyn PrivacyStore>,
    clock: DynClock,
    hasher: Arc<CodeHasher>,
}

impl Privacy {
    pub fn new(store: Arc<dyn PrivacyStore>, clock: DynClock, hasher: Arc<CodeHasher>) -> Self {
        Privacy {
            store,
            clock,
            hasher,
        }
    }

    /// One JSON document with everything held about the user.
    pub async fn export(&self, user_id: &str) -> AppResult<Value> {
        validate_user_id(user_id)?;
        let now = self.clock.now();
        let data = self.store.export_user(user_id, now).await?;
        let messages: Vec<Value> = data
            .messages
            .iter()
            .map(|m| {
                let events: Vec<&crate::store::MessageEvent> = data
                    .events
                    .iter()
                    .filter(|(id, _)| *id == m.id)
                    .map(|(_, e)| e)
                    .collect();
                json!({
                    "id": m.id, "created_at": m.created_at, "updated_at": m.updated_at,
                    "template_name": m.template_name, "channel": m.channel, "status": m.status,
                    "reason": m.reason, "to": m.to_number,
                    // The text as sent, where it was kept (never an OTP's code).
                    "body": m.attempt_body,
                    "events": events,
                })
            })
            .collect();
        let replies: Vec<Value> = data
            .replies
            .iter()
            .map(|r| {
                json!({
                    "received_at": r.received_at, "channel": r.channel, "from": r.from_number,
                    "body": r.body, "keyword": r.keyword,
                })
            })
            .collect();
        let otp_sends: Vec<Value> = data
            .otp_sends
            .iter()
            .map(|(number, ip, at)| json!({"sent_at": at, "phone_number": number, "ip": ip}))
            .collect();
        let sessions: Vec<Value> = data
            .sessions
            .iter()
            .map(|s| {
                json!({
                    "created_at": s.created_at, "last_seen_at": s.last_seen_at,
                    "expires_at": s.expires_at, "ip": s.ip, "user_agent": s.user_agent,
                })
            })
            .collect();
        Ok(json!({
            "user_id": user_id,
            "exported_at": now,
            "preferences": data.consent,
            "consent_audit_trail": data.audit,
            "messages": messages,
            "replies": replies,
            "appointments": data.appointments,
            "follow_ups": data.follow_ups,
            "subscriptions": data.subscriptions,
            "otp_sends": otp_sends,
            "settings_sessions": sessions,
        }))
    }

    /// Erase the user; what was removed. Harmless to repeat.
    pub async fn erase(&self, user_id: &str, by: ErasedBy) -> AppResult<ErasureCounts> {
        validate_user_id(user_id)?;
        let user_hash = self.hasher.keyed("erasure", user_id);
        let counts = self
            .store
            .erase_user(user_id, &user_hash, by.as_str(), self.clock.now())
            .await?;
        tracing::info!(user_hash, erased_by = by.as_str(), counts = ?counts, "user erased");
        Ok(counts)
    }
}
