//! Twilio's webhooks: delivery status callbacks and incoming messages (replies and the STOP /
//! START / HELP keywords). Signatures are checked in the HTTP layer (`signature`); the handling
//! here is shared with mock mode (`/dev/inbound`, and the mock provider's own statuses).

pub mod signature;

use chrono::{DateTime, Utc};

use crate::app::AppState;
use crate::error::AppResult;
use crate::phone::{self, PhoneNumber};
use crate::store::{
    ChangeContext, Channel, ConsentPatch, ConsentSource, DynStore, IncomingMessage,
};
use crate::templates::{self, RenderContext};

pub use crate::provider::twilio::RECIPIENT_UNSUBSCRIBED as RECIPIENT_OPTED_OUT;

/// Our status for a Twilio `MessageStatus`; `None` for statuses that say nothing about delivery.
pub fn our_status(twilio_status: &str) -> Option<&'static str> {
    Some(match twilio_status {
        "accepted" | "scheduled" | "queued" => "queued",
        "sending" => "sending",
        "sent" => "sent",
        "delivered" => "delivered",
        "read" => "read",
        "undelivered" => "undelivered",
        "failed" | "canceled" => "failed",
        _ => return None,
    })
}

/// The statuses a message may move to `status` from. Statuses only move forward
/// (queued < sending < sent < delivered < read); `undelivered` and `failed` end a message unless
/// it was already delivered or read, and nothing moves a message out of them.
pub fn allowed_from(status: &str) -> &'static [&'static str] {
    match status {
        "sending" => &["queued"],
        "sent" => &["queued", "sending"],
        "delivered" => &["queued", "sending", "sent"],
        "read" => &["queued", "sending", "sent", "delivered"],
        "undelivered" | "failed" => &["queued", "sending", "sent"],
        _ => &[],
    }
}

/// Set one channel's consent for every user with this number, audited with `source`.
pub async fn set_channel_consent_for_number(
    store: &DynStore,
    number: &str,
    channel: Channel,
    consent: bool,
    source: ConsentSource,
    at: DateTime<Utc>,
) -> AppResult<Vec<String>> {
    let users = store.users_with_phone(number).await?;
    let patch = match channel {
        Channel::Sms => ConsentPatch {
            sms_consent: Some(consent),
            ..ConsentPatch::default()
        },
        Channel::Whatsapp => ConsentPatch {
            whatsapp_consent: Some(consent),
            ..ConsentPatch::default()
        },
    };
    let ctx = ChangeContext {
        source,
        ip: None,
        user_agent: Some("twilio".into()),
        at,
    };
    for user in &users {
        store.update_consent(user, &patch, &ctx).await?;
    }
    Ok(users)
}

/// The carrier reports the patient opted out (Twilio 21610): record the number's opt-out and
/// revoke that channel's consent for every user with the number, source `provider`.
pub async fn carrier_opt_out(
    store: &DynStore,
    number: &str,
    channel: Channel,
    at: DateTime<Utc>,
) -> AppResult<()> {
    store
        .set_opt_out(number, channel, ConsentSource::Provider, at)
        .await?;
    set_channel_consent_for_number(store, number, channel, false, ConsentSource::Provider, at)
        .await?;
    tracing::info!(to = %phone::mask(number), channel = channel.as_str(), "recipient opted out at the carrier: consent revoked");
    Ok(())
}

/// What a status callback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusOutcome {
    Applied { changed: bool },
    UnknownMessage,
    IgnoredStatus,
}

/// Apply a delivery status (from Twilio's callback, or the mock provider) to the message with
/// this SID. Error 21610 also revokes that channel's consent (source `provider`) and records the
/// number's opt-out.
pub async fn apply_status(
    store: &DynStore,
    provider_sid: &str,
    twilio_status: &str,
    error_code: Option<i64>,
    at: DateTime<Utc>,
) -> AppResult<StatusOutcome> {
    let Some(status) = our_status(twilio_status) else {
        tracing::info!(
            provider_sid,
            twilio_status,
            "status callback ignored: not a delivery status"
        );
        return Ok(StatusOutcome::IgnoredStatus);
    };
    let applied = store
        .apply_status(provider_sid, status, allowed_from(status), error_code, at)
        .await?;
    let Some(message) = applied.message else {
        // Never an error: Twilio would retry it forever.
        tracing::warn!(
            provider_sid,
            status,
            "status callback for an unknown MessageSid"
        );
        return Ok(StatusOutcome::UnknownMessage);
    };
    tracing::info!(message_id = %message.id, provider_sid, status, changed = applied.changed, error_code, "delivery status");
    if error_code == Some(RECIPIENT_OPTED_OUT) {
        if let (Some(channel), Some(number)) = (
            Channel::parse(&message.channel),
            message.to_number.as_deref(),
        ) {
            carrier_opt_out(store, number, channel, at).await?;
        }
    }
    Ok(StatusOutcome::Applied {
        changed: applied.changed,
    })
}

/// A patient's keyword, one word in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    Stop,
    Start,
    Help,
}

impl Keyword {
    pub fn parse(body: &str) -> Option<Keyword> {
        let word = body.trim();
        if word.is_empty() || word.contains(char::is_whitespace) {
            return None;
        }
        match word.to_ascii_uppercase().as_str() {
            "STOP" | "STOPALL" | "UNSUBSCRIBE" | "CANCEL" | "END" | "QUIT" | "REVOKE"
            | "OPTOUT" => Some(Keyword::Stop),
            "START" | "YES" | "UNSTOP" => Some(Keyword::Start),
            "HELP" | "INFO" => Some(Keyword::Help),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Keyword::Stop => "stop",
            Keyword::Start => "start",
            Keyword::Help => "help",
        }
    }

    fn reply_template(self) -> &'static str {
        match self {
            Keyword::Stop => "opt_out_confirmation",
            Keyword::Start => "opt_in_confirmation",
            Keyword::Help => "help",
        }
    }
}

/// An incoming message as Twilio posts it.
#[derive(Debug, Clone, Default)]
pub struct Incoming {
    pub message_sid: String,
    /// `+E164` or `whatsapp:+E164`.
    pub from: String,
    pub to: Option<String>,
    pub body: String,
    /// Set when Twilio's Advanced Opt-Out already handled (and answered) a keyword.
    pub opt_out_type: Option<String>,
}

/// Handle an incoming message once and answer with TwiML. A repeat of a `MessageSid` changes
/// nothing and gets the same answer.
pub async fn handle_incoming(state: &AppState, incoming: Incoming) -> AppResult<String> {
    let render = state.config.render_context();
    if let Some(seen) = state.store.incoming_by_sid(&incoming.message_sid).await? {
        return Ok(twiml(seen.reply_template.as_deref(), &render));
    }
    let (channel, raw) = match incoming.from.strip_prefix("whatsapp:") {
        Some(rest) => (Channel::Whatsapp, rest),
        None => (Channel::Sms, incoming.from.as_str()),
    };
    let from_number = PhoneNumber::parse(raw)
        .map(String::from)
        .unwrap_or_else(|_| raw.trim().to_string());
    let now = state.clock.now();
    // Advanced Opt-Out names the keyword it matched (it may be one configured in Twilio).
    let keyword = match incoming.opt_out_type.as_deref() {
        Some(t) => Keyword::parse(t),
        None => Keyword::parse(&incoming.body),
    };
    let store = &state.store;
    // The users with this number: their consent follows the keyword.
    let users = match keyword {
        Some(Keyword::Stop) => {
            store
                .set_opt_out(&from_number, channel, ConsentSource::SmsKeyword, now)
                .await?;
            set_channel_consent_for_number(
                store,
                &from_number,
                channel,
                false,
                ConsentSource::SmsKeyword,
                now,
            )
            .await?
        }
        Some(Keyword::Start) => {
            store.clear_opt_out(&from_number, channel).await?;
            set_channel_consent_for_number(
                store,
                &from_number,
                channel,
                true,
                ConsentSource::SmsKeyword,
                now,
            )
            .await?
        }
        Some(Keyword::Help) | None => store.users_with_phone(&from_number).await?,
    };
    if channel == Channel::Whatsapp {
        store.touch_whatsapp_session(&from_number, now).await?;
    }
    // When Twilio already replied, answer empty so the patient gets one reply, not two.
    let reply_template = keyword
        .filter(|_| incoming.opt_out_type.is_none())
        .map(|k| k.reply_template().to_string());
    let user_id = users.into_iter().next();
    let record = IncomingMessage {
        id: uuid::Uuid::now_v7().to_string(),
        provider_sid: incoming.message_sid.clone(),
        channel: channel.as_str().into(),
        from_number: from_number.clone(),
        to_number: incoming.to.clone(),
        user_id,
        body: incoming.body.clone(),
        keyword: keyword.map(|k| k.as_str().to_string()),
        reply_template,
        opt_out_type: incoming.opt_out_type.clone(),
        // Taken just before the insert, so rows commit close to their time order (the inbox
        // pages by it).
        received_at: state.clock.now(),
    };
    if !store.insert_incoming(&record).await? {
        // A concurrent retry stored it first: answer as it did.
        let seen = store.incoming_by_sid(&incoming.message_sid).await?;
        return Ok(twiml(
            seen.and_then(|s| s.reply_template).as_deref(),
            &render,
        ));
    }
    tracing::info!(
        provider_sid = %record.provider_sid,
        from = %phone::mask(&from_number),
        channel = channel.as_str(),
        keyword = record.keyword.as_deref().unwrap_or("none"),
        matched_user = record.user_id.is_some(),
        "incoming message"
    );
    Ok(twiml(record.reply_template.as_deref(), &render))
}

/// TwiML answering with one message from `template`, or an empty `<Response/>`.
pub fn twiml(template: Option<&str>, render: &RenderContext) -> String {
    let body = template.and_then(templates::find).map(|t| {
        let vars = templates::ValidVariables(vec![]);
        t.render(&vars, render).body
    });
    match body {
        Some(text) => format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Message>{}</Message></Response>",
            xml_escape(&text)
        ),
        None => "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>".to_string(),
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_in_any_case_with_spaces() {
        for word in [
            "STOP",
            "stop",
            " Stop ",
            "StopAll",
            "unsubscribe",
            "CANCEL",
            "end",
            "quit",
            "Revoke",
            "optout",
        ] {
            assert_eq!(Keyword::parse(word), Some(Keyword::Stop), "{word}");
        }
        for word in ["START", "yes", "Unstop"] {
            assert_eq!(Keyword::parse(word), Some(Keyword::Start), "{word}");
        }
        for word in ["HELP", "info\n"] {
            assert_eq!(Keyword::parse(word), Some(Keyword::Help), "{word}");
        }
        for text in ["stop it", "please stop", "", "STOPP", "yes please"] {
            assert_eq!(Keyword::parse(text), None, "{text}");
        }
    }

    #[test]
    fn statuses_only_move_forward() {
        assert!(allowed_from("delivered").contains(&"sent"));
        assert!(!allowed_from("sent").contains(&"delivered"));
        assert!(!allowed_from("failed").contains(&"delivered"));
        assert!(!allowed_from("delivered").contains(&"failed"));
        assert!(allowed_from("read").contains(&"delivered"));
        assert!(allowed_from("queued").is_empty());
        assert_eq!(our_status("canceled"), Some("failed"));
        assert_eq!(our_status("receiving"), None);
    }

    #[test]
    fn twiml_escapes() {
        let render = RenderContext {
            clinic_name: "A & B <Clinic>".into(),
            app_url: "https://x".into(),
        };
        let xml = twiml(Some("help"), &render);
        assert!(
            xml.contains("<Message>A &amp; B &lt;Clinic&gt;: messages"),
            "{xml}"
        );
        assert_eq!(
            twiml(None, &render),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>"
        );
    }
}
