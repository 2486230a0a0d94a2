//! Patients' messages to us: replies and the STOP / START / HELP keywords, from Twilio's incoming
//! webhook (signature checked by the HTTP layer) or mock mode's `/dev/inbound`. Keywords change
//! consent for every user with the number; each message is stored once (a repeat of its
//! `MessageSid` changes nothing and gets the same answer), and the host app reads them from
//! `/api/inbound`.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::channel::Channel;
use crate::clock::DynClock;
use crate::consent::ConsentService;
use crate::error::AppResult;
use crate::phone::{self, PhoneNumber};
use crate::store::{InboundStore, IncomingMessage, MessageStore};
use crate::templates::{self, RenderContext};

/// A patient's keyword, one word in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    Stop,
    Start,
    Help,
}

/// Twilio's opt-out words and CTIA's (`REVOKE`, `OPTOUT`), in capitals.
fn is_stop_word(word: &str) -> bool {
    matches!(
        word,
        "STOP" | "STOPALL" | "UNSUBSCRIBE" | "CANCEL" | "END" | "QUIT" | "REVOKE" | "OPTOUT"
    )
}

impl Keyword {
    pub fn parse(body: &str) -> Option<Keyword> {
        let word = body.trim();
        let exact = if word.is_empty() || word.contains(char::is_whitespace) {
            None
        } else {
            match word.to_ascii_uppercase().as_str() {
                "START" | "YES" | "UNSTOP" => Some(Keyword::Start),
                "HELP" | "INFO" => Some(Keyword::Help),
                stop if is_stop_word(stop) => Some(Keyword::Stop),
                _ => None,
            }
        };
        exact.or_else(|| Keyword::loose_stop(body))
    }

    /// A stop word written loosely: `Stop.`, `STOP!`, `opt-out`, `Stop all`, full-width `ＳＴＯＰ`.
    /// Only for STOP: when in doubt a patient is not texted again, while a loose START or HELP
    /// could re-subscribe someone who did not ask.
    fn loose_stop(body: &str) -> Option<Keyword> {
        // A short reply only: a sentence that happens to spell a keyword once squeezed is not one.
        if body.chars().count() > 24 {
            return None;
        }
        let squeezed: String = body
            .chars()
            .map(|c| match c {
                // Full-width forms (U+FF01..U+FF5E) of ASCII '!'..'~'.
                '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
                _ => c,
            })
            .filter(|c| c.is_alphanumeric())
            .collect::<String>()
            .to_ascii_uppercase();
        is_stop_word(&squeezed).then_some(Keyword::Stop)
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

/// At most this many messages received at one same microsecond are returned together.
const MAX_SAME_INSTANT: i64 = 10_000;

/// The inbox lists messages received at least this long ago.
const INBOX_SETTLE_SECONDS: i64 = 2;

#[derive(Clone)]
pub struct Inbound {
    store: Arc<dyn InboundStore>,
    messages: Arc<dyn MessageStore>,
    consent: ConsentService,
    clock: DynClock,
    render: Arc<RenderContext>,
}

impl Inbound {
    pub fn new(
        store: Arc<dyn InboundStore>,
        messages: Arc<dyn MessageStore>,
        consent: ConsentService,
        clock: DynClock,
        render: RenderContext,
    ) -> Self {
        Inbound {
            store,
            messages,
            consent,
            clock,
            render: Arc::new(render),
        }
    }

    /// Handle an incoming message once and answer with TwiML. A repeat of a `MessageSid` changes
    /// nothing and gets the same answer.
    pub async fn handle(&self, incoming: Incoming) -> AppResult<String> {
        let render = &self.render;
        if let Some(seen) = self.store.incoming_by_sid(&incoming.message_sid).await? {
            return Ok(twiml(seen.reply_template.as_deref(), render));
        }
        let (channel, raw) = Channel::of_address(&incoming.from);
        let from_number = PhoneNumber::parse(raw)
            .map(String::from)
            .unwrap_or_else(|_| raw.trim().to_string());
        let now = self.clock.now();
        // Advanced Opt-Out names the keyword it matched (it may be one configured in Twilio).
        let keyword = match incoming.opt_out_type.as_deref() {
            Some(t) => Keyword::parse(t),
            None => Keyword::parse(&incoming.body),
        };
        // The users with this number: their consent follows the keyword.
        let users = match keyword {
            Some(Keyword::Stop) => self.consent.keyword_stop(&from_number, channel).await?,
            Some(Keyword::Start) => self.consent.keyword_start(&from_number, channel).await?,
            Some(Keyword::Help) | None => self.consent.users_with_phone(&from_number).await?,
        };
        if channel == Channel::Whatsapp {
            self.store.touch_whatsapp_session(&from_number, now).await?;
        }
        // When Twilio already replied, answer empty so the patient gets one reply, not two.
        let reply_template = keyword
            .filter(|_| incoming.opt_out_type.is_none())
            .map(|k| k.reply_template().to_string());
        let user_id = self.attribute(&from_number, &users).await?;
        let user_ids = serde_json::to_string(&users).map_err(anyhow::Error::from)?;
        let record = IncomingMessage {
            id: uuid::Uuid::now_v7().to_string(),
            provider_sid: incoming.message_sid.clone(),
            channel: channel.as_str().into(),
            from_number: from_number.clone(),
            to_number: incoming.to.clone(),
            user_id,
            user_ids: Some(user_ids),
            body: incoming.body.clone(),
            keyword: keyword.map(|k| k.as_str().to_string()),
            reply_template,
            opt_out_type: incoming.opt_out_type.clone(),
            // Taken just before the insert, so rows commit close to their time order (the inbox
            // pages by it).
            received_at: self.clock.now(),
        };
        if !self.store.insert_incoming(&record).await? {
            // A concurrent retry stored it first: answer as it did.
            let seen = self.store.incoming_by_sid(&incoming.message_sid).await?;
            return Ok(twiml(
                seen.and_then(|s| s.reply_template).as_deref(),
                render,
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
        Ok(twiml(record.reply_template.as_deref(), render))
    }

    /// Whose reply this is. Two patients may share a number (a family phone): the reply answers
    /// the last message that went to the number, so it is that patient's; with no such message,
    /// the only user with the number; otherwise nobody. Never a guess by sort order.
    async fn attribute(&self, number: &str, users: &[String]) -> AppResult<Option<String>> {
        if let Some(last) = self.messages.last_recipient(number).await? {
            if users.contains(&last) {
                return Ok(Some(last));
            }
        }
        Ok(match users {
            [only] => Some(only.clone()),
            _ => None,
        })
    }

    /// One page of the host app's inbox: messages received after `since`, oldest first, up to
    /// `limit` (more only when one instant holds more).
    pub async fn inbox_page(
        &self,
        since: Option<DateTime<Utc>>,
        limit: i64,
    ) -> AppResult<Vec<IncomingMessage>> {
        // Messages being written right now are left for the next call, so that a reader moving
        // `since` forward never skips one that commits after a later one.
        let until = self.clock.now() - chrono::Duration::seconds(INBOX_SETTLE_SECONDS);
        let mut messages = self.store.list_incoming(since, until, limit + 1).await?;
        // A page never ends inside a group of messages received at the same instant, or the
        // reader's next `since` would skip the rest of the group.
        if messages.len() as i64 > limit {
            let boundary = messages[limit as usize].received_at;
            let keep = messages
                .iter()
                .take(limit as usize)
                .filter(|m| m.received_at < boundary)
                .count();
            if keep > 0 {
                messages.truncate(keep);
            } else {
                // The whole page is one instant: return all of it, even past `limit`.
                messages = self
                    .store
                    .list_incoming(since, boundary, MAX_SAME_INSTANT)
                    .await?;
            }
        }
        Ok(messages)
    }
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
    fn a_stop_written_loosely_still_stops_but_start_and_help_stay_exact() {
        for word in [
            "Stop.",
            "STOP!",
            "stop!!!",
            "\"stop\"",
            "opt-out",
            "Opt out",
            "Stop all",
            "ＳＴＯＰ",
            "ｓｔｏｐ。",
            "Unsubscribe.",
        ] {
            assert_eq!(Keyword::parse(word), Some(Keyword::Stop), "{word}");
        }
        for text in [
            "Yes!",
            "Start.",
            "help?",
            "please stop texting me now",
            "stop it",
            "don't stop",
        ] {
            assert_eq!(Keyword::parse(text), None, "{text}");
        }
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
