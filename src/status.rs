//! The words a message, a skip and a scheduled item can be in, as types. Each is stored as text
//! (the column holds `as_str()`), so the database stays readable and the schema unchanged; a word
//! the code does not know fails to decode instead of flowing on as a string.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Implements `as_str`, `FromStr`, `Display` and sqlx's text encoding for a fieldless enum.
macro_rules! text_enum {
    ($name:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),*
                }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(value: &str) -> Result<Self, Self::Err> {
                match value {
                    $($text => Ok($name::$variant),)*
                    other => Err(format!("unknown {} {other:?}", stringify!($name))),
                }
            }
        }

        /// So a status compares with its stored word: `status == "queued"`.
        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl<DB: sqlx::Database> sqlx::Type<DB> for $name
        where
            str: sqlx::Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <str as sqlx::Type<DB>>::type_info()
            }
            fn compatible(ty: &DB::TypeInfo) -> bool {
                <str as sqlx::Type<DB>>::compatible(ty)
            }
        }

        impl<'q, DB: sqlx::Database> sqlx::Encode<'q, DB> for $name
        where
            &'q str: sqlx::Encode<'q, DB>,
        {
            fn encode_by_ref(
                &self,
                buf: &mut <DB as sqlx::Database>::ArgumentBuffer<'q>,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<'q, DB>>::encode(self.as_str(), buf)
            }
        }

        impl<'r, DB: sqlx::Database> sqlx::Decode<'r, DB> for $name
        where
            &'r str: sqlx::Decode<'r, DB>,
        {
            fn decode(
                value: <DB as sqlx::Database>::ValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <&str as sqlx::Decode<'r, DB>>::decode(value)?;
                Ok(text.parse::<$name>()?)
            }
        }
    };
}

/// Where a message stands. Statuses only move forward (see [`MessageStatus::may_follow`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    Queued,
    Sending,
    Sent,
    Delivered,
    Read,
    Undelivered,
    Failed,
    /// Twilio may or may not hold it and no lookup could tell: never resent by the service.
    Unknown,
    /// Not sent, on purpose, with a [`SkipReason`].
    Skipped,
}

text_enum!(MessageStatus {
    Queued => "queued",
    Sending => "sending",
    Sent => "sent",
    Delivered => "delivered",
    Read => "read",
    Undelivered => "undelivered",
    Failed => "failed",
    Unknown => "unknown",
    Skipped => "skipped",
});

impl MessageStatus {
    /// Ours for a Twilio `MessageStatus`; `None` for statuses that say nothing about delivery.
    pub fn from_twilio(twilio_status: &str) -> Option<MessageStatus> {
        use MessageStatus::*;
        Some(match twilio_status {
            "accepted" | "scheduled" | "queued" => Queued,
            "sending" => Sending,
            "sent" => Sent,
            "delivered" => Delivered,
            "read" => Read,
            "undelivered" => Undelivered,
            "failed" | "canceled" => Failed,
            _ => return None,
        })
    }

    /// The statuses a message may move to `self` from: the one place the forward-only rule
    /// lives. queued < sending < sent < delivered < read; `undelivered` and `failed` end a message
    /// unless it was already delivered or read, and nothing moves a message out of them.
    pub fn allowed_from(self) -> &'static [MessageStatus] {
        use MessageStatus::*;
        match self {
            Sending => &[Queued],
            Sent => &[Queued, Sending],
            Delivered => &[Queued, Sending, Sent],
            Read => &[Queued, Sending, Sent, Delivered],
            Undelivered | Failed => &[Queued, Sending, Sent],
            Queued | Unknown | Skipped => &[],
        }
    }

    /// Whether a message in `previous` may move to `self`.
    pub fn may_follow(self, previous: MessageStatus) -> bool {
        self.allowed_from().contains(&previous)
    }

    /// Still the dispatcher's to settle (not yet handed to the provider for good).
    pub fn is_pending(self) -> bool {
        matches!(self, MessageStatus::Queued | MessageStatus::Sending)
    }
}

/// Why a message was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// No consent for the channel (or for marketing), or no number on file.
    NoConsent,
    /// `MESSAGING_ENABLED=false`.
    Disabled,
    /// The number texted STOP on this channel.
    OptedOut,
    /// WhatsApp outside the 24-hour window with no approved template and no SMS consent.
    WhatsappWindowClosed,
    AppointmentCancelled,
    FollowUpCancelled,
    AppointmentRescheduled,
    FollowUpRescheduled,
    /// The item now belongs to another patient (whose own reminder is planned).
    AppointmentReassigned,
    FollowUpReassigned,
    /// The appointment's start passed before the reminder could go.
    AppointmentPassed,
    /// Quiet hours would hold a reminder past its appointment.
    QuietHoursPassed,
    /// Quiet hours would hold a 2-hour reminder to less than 30 minutes before its appointment
    /// (the 24-hour reminder told the patient the day before).
    QuietHours,
    SubscriptionCancelled,
    /// Its `expires_at` or `renews_at` changed (a new period has its own reminders).
    SubscriptionRescheduled,
    SubscriptionReassigned,
    /// The host app marked the subscription expired.
    SubscriptionExpired,
    /// The date the reminder announced (expiry, renewal) came before it could go.
    SubscriptionPassed,
    /// A one-time passcode for a number on file outside `OTP_ALLOWED_COUNTRIES`.
    CountryNotAllowed,
    /// A one-time passcode for a number within its cooldown or with its hour's codes, asked for
    /// through another route (another account with it on file, or naming it).
    DestinationLimited,
}

text_enum!(SkipReason {
    NoConsent => "no_consent",
    Disabled => "disabled",
    OptedOut => "opted_out",
    WhatsappWindowClosed => "whatsapp_window_closed",
    AppointmentCancelled => "appointment_cancelled",
    FollowUpCancelled => "follow_up_cancelled",
    AppointmentRescheduled => "appointment_rescheduled",
    FollowUpRescheduled => "follow_up_rescheduled",
    AppointmentReassigned => "appointment_reassigned",
    FollowUpReassigned => "follow_up_reassigned",
    AppointmentPassed => "appointment_passed",
    QuietHoursPassed => "quiet_hours_passed",
    QuietHours => "quiet_hours",
    SubscriptionCancelled => "subscription_cancelled",
    SubscriptionRescheduled => "subscription_rescheduled",
    SubscriptionReassigned => "subscription_reassigned",
    SubscriptionExpired => "subscription_expired",
    SubscriptionPassed => "subscription_passed",
    CountryNotAllowed => "country_not_allowed",
    DestinationLimited => "destination_limited",
});

impl SkipReason {
    /// Whether the reason is about the reminder's item (cancelled, moved, given to another
    /// patient) rather than the patient: such a reminder no longer counts as the item's reminder,
    /// so an item that comes back gets a new one.
    pub fn frees_reminder(self) -> bool {
        use SkipReason::*;
        matches!(
            self,
            AppointmentCancelled
                | FollowUpCancelled
                | AppointmentRescheduled
                | FollowUpRescheduled
                | AppointmentReassigned
                | FollowUpReassigned
                | SubscriptionCancelled
                | SubscriptionRescheduled
                | SubscriptionReassigned
                | SubscriptionExpired
        )
    }
}

/// An appointment, follow-up or subscription as the host app last pushed it: appointments and
/// follow-ups are `scheduled` or `cancelled`; subscriptions `active`, `cancelled` or `expired`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    Scheduled,
    Cancelled,
    Active,
    Expired,
}

text_enum!(ItemStatus {
    Scheduled => "scheduled",
    Cancelled => "cancelled",
    Active => "active",
    Expired => "expired",
});

impl ItemStatus {
    /// Whether its reminders are due (an appointment still on, a subscription running).
    pub fn is_on(self) -> bool {
        matches!(self, ItemStatus::Scheduled | ItemStatus::Active)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_only_move_forward() {
        use MessageStatus::*;
        assert!(Delivered.may_follow(Sent));
        assert!(!Sent.may_follow(Delivered));
        assert!(!Delivered.may_follow(Failed));
        assert!(!Failed.may_follow(Delivered));
        assert!(Read.may_follow(Delivered));
        assert!(Queued.allowed_from().is_empty());
        assert!(Skipped.allowed_from().is_empty());
        assert_eq!(MessageStatus::from_twilio("canceled"), Some(Failed));
        assert_eq!(MessageStatus::from_twilio("receiving"), None);
    }

    #[test]
    fn text_round_trips() {
        for s in MessageStatus::ALL {
            assert_eq!(s.as_str().parse::<MessageStatus>(), Ok(*s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for r in SkipReason::ALL {
            assert_eq!(r.as_str().parse::<SkipReason>(), Ok(*r));
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
        for i in ItemStatus::ALL {
            assert_eq!(i.as_str().parse::<ItemStatus>(), Ok(*i));
        }
        assert!("bogus".parse::<MessageStatus>().is_err());
    }
}
