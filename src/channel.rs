//! The two ways a message reaches a patient.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Sms,
    Whatsapp,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Sms => "sms",
            Channel::Whatsapp => "whatsapp",
        }
    }
    /// The consent column (and audit field) that lets messages go on this channel.
    pub fn consent_field(self) -> &'static str {
        match self {
            Channel::Sms => "sms_consent",
            Channel::Whatsapp => "whatsapp_consent",
        }
    }
    /// A sender or recipient as Twilio writes it: `whatsapp:+...` is WhatsApp, anything else
    /// SMS; with the number (prefix removed).
    pub fn of_address(address: &str) -> (Channel, &str) {
        // Twilio writes the prefix in lower case; a hand-written `WhatsApp:` means the same.
        const PREFIX: &str = "whatsapp:";
        match address.get(..PREFIX.len()) {
            Some(head) if head.eq_ignore_ascii_case(PREFIX) => {
                (Channel::Whatsapp, &address[PREFIX.len()..])
            }
            _ => (Channel::Sms, address),
        }
    }

    pub fn parse(value: &str) -> Option<Channel> {
        match value {
            "sms" => Some(Channel::Sms),
            "whatsapp" => Some(Channel::Whatsapp),
            _ => None,
        }
    }
}
