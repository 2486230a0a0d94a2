//! The send-time policy: whether a message may go now, where, and by which route. Checked by the
//! dispatcher just before each send, because consent, opt-outs, appointments and the clock all
//! change between queueing and sending. Pure functions over facts the dispatcher reads, so each
//! rule is tested here without a database.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;

use super::quiet_hours;
use crate::channel::Channel;
use crate::config::QuietHours;
use crate::phone::PhoneNumber;
use crate::status::SkipReason;
use crate::store::{Consent, ScheduledItem, SubjectType};
use crate::templates::{Category, Template};

/// WhatsApp allows free-form messages for 24 hours after the patient's last message.
pub const WHATSAPP_WINDOW: Duration = Duration::hours(24);

/// What the policy needs from the configuration.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    pub messaging_enabled: bool,
    pub quiet_hours: Option<QuietHours>,
    /// Users have no stored time zone yet, so quiet hours are kept in this one.
    pub time_zone: Tz,
    /// Approved WhatsApp templates: template name -> Content SID.
    pub content_sids: HashMap<String, String>,
}

/// The user's number on file, or `no_consent` when there is no record or no valid number.
/// Checked in this order at send time: the number, then the number's opt-out (it belongs to the
/// number, not the user), then [`consented`].
pub fn recipient(consent: Option<&Consent>) -> Result<PhoneNumber, SkipReason> {
    consent
        .and_then(|c| c.phone_number.as_deref())
        .and_then(|p| PhoneNumber::parse(p).ok())
        .ok_or(SkipReason::NoConsent)
}

/// Whether the user consented to this template on this channel. Marketing needs its own consent,
/// never implied by the others.
pub fn consented(consent: &Consent, template: &Template, channel: Channel) -> bool {
    let channel_consent = match channel {
        Channel::Sms => consent.sms_consent,
        Channel::Whatsapp => consent.whatsapp_consent,
    };
    let marketing_ok = template.category != Category::Marketing || consent.marketing_consent;
    channel_consent && marketing_ok
}

/// Whether a template is a reminder about an appointment, follow-up or subscription (and so must
/// be checked against the item's current state, when a sweep queued it: the host app may send
/// the subscription templates itself, with no item behind them).
pub fn is_reminder(template: &Template) -> bool {
    matches!(
        template.name,
        "appointment_reminder_24h"
            | "appointment_reminder_2h"
            | "follow_up_reminder"
            | "subscription_expiring"
            | "subscription_renewal"
    )
}

/// Why a reminder queued for `kind` at `at` for `user_id` should no longer go, if it should not:
/// the item is gone or cancelled, moved to another time, now another patient's (theirs is planned
/// for them), or (an appointment) already started.
pub fn reminder_obsolete(
    kind: SubjectType,
    at: DateTime<Utc>,
    user_id: &str,
    item: Option<&ScheduledItem>,
    now: DateTime<Utc>,
) -> Option<SkipReason> {
    match item {
        None => Some(kind.cancelled_reason()),
        Some(item) if !item.status.is_on() => Some(kind.ended_reason(item.status)),
        Some(item) if item.scheduled_at != at => Some(kind.rescheduled_reason()),
        Some(item) if item.user_id != user_id => Some(kind.reassigned_reason()),
        Some(_) => kind.passed_reason().filter(|_| now >= at),
    }
}

/// What quiet hours say about sending this template now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuietHoursRule {
    /// Outside quiet hours, or a template they never hold back.
    SendNow,
    /// Hold it until the window ends.
    HoldUntil(DateTime<Utc>),
    /// Held past the appointment itself, a reminder is pointless.
    Skip(SkipReason),
}

/// Quiet hours hold back transactional and marketing templates (reminders, notifications);
/// OTPs and keyword replies answer the patient and are never held back. `appointment_at` is the
/// start of the appointment a reminder is about.
pub fn quiet_hours_rule(
    template: &Template,
    settings: &PolicySettings,
    now: DateTime<Utc>,
    appointment_at: Option<DateTime<Utc>>,
) -> QuietHoursRule {
    let held_back = matches!(
        template.category,
        Category::Transactional | Category::Marketing
    ) && template.name != "otp";
    let until = settings
        .quiet_hours
        .filter(|_| held_back)
        .and_then(|quiet| quiet_hours::quiet_until(now, settings.time_zone, quiet));
    match (until, appointment_at) {
        (None, _) => QuietHoursRule::SendNow,
        (Some(until), Some(at)) if until >= at => {
            QuietHoursRule::Skip(SkipReason::QuietHoursPassed)
        }
        (Some(until), _) => QuietHoursRule::HoldUntil(until),
    }
}

/// How a WhatsApp message may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WhatsappRoute {
    /// Inside the 24-hour window: any text.
    FreeText,
    /// Outside it, as this approved template (Content SID).
    Template(String),
    /// Outside it with no approved template.
    Closed,
}

/// Free text inside 24 hours of the patient's last WhatsApp message; outside it only as an
/// approved template (`TWILIO_CONTENT_SIDS`).
pub fn whatsapp_route(
    last_inbound: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    template: &Template,
    settings: &PolicySettings,
) -> WhatsappRoute {
    let open = last_inbound.is_some_and(|at| now - at < WHATSAPP_WINDOW);
    if open {
        WhatsappRoute::FreeText
    } else if let Some(sid) = settings.content_sids.get(template.name) {
        WhatsappRoute::Template(sid.clone())
    } else {
        WhatsappRoute::Closed
    }
}

/// With the WhatsApp window closed: SMS when the patient takes SMS and the number has not opted
/// out of it, else the message is skipped.
pub fn whatsapp_fallback(consent: &Consent, sms_opted_out: bool) -> Result<Channel, SkipReason> {
    if consent.sms_consent && !sms_opted_out {
        Ok(Channel::Sms)
    } else {
        Err(SkipReason::WhatsappWindowClosed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::ItemStatus;
    use crate::templates;
    use chrono::NaiveTime;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn consent(sms: bool, whatsapp: bool, marketing: bool) -> Consent {
        Consent {
            user_id: "u1".into(),
            phone_number: Some("+919876543210".into()),
            sms_consent: sms,
            whatsapp_consent: whatsapp,
            marketing_consent: marketing,
            updated_at: at("2027-01-01T00:00:00Z"),
            phone_verified_at: None,
        }
    }

    fn settings(quiet: bool) -> PolicySettings {
        PolicySettings {
            messaging_enabled: true,
            quiet_hours: quiet.then(|| QuietHours {
                start: NaiveTime::from_hms_opt(21, 0, 0).unwrap(),
                end: NaiveTime::from_hms_opt(8, 0, 0).unwrap(),
            }),
            time_zone: chrono_tz::UTC,
            content_sids: HashMap::from([(
                "payment_received".to_string(),
                "HX0123456789abcdef0123456789abcdef".to_string(),
            )]),
        }
    }

    fn template(name: &str) -> &'static Template {
        templates::find(name).unwrap()
    }

    fn item(scheduled_at: &str, status: ItemStatus) -> ScheduledItem {
        ScheduledItem {
            id: "a1".into(),
            user_id: "u1".into(),
            scheduled_at: at(scheduled_at),
            time_zone: "UTC".into(),
            status,
        }
    }

    #[test]
    fn consent_is_per_channel_and_marketing_is_never_implied() {
        let reminder = template("appointment_reminder_24h");
        let news = template("clinic_news");
        let sms_only = consent(true, false, false);
        assert!(consented(&sms_only, reminder, Channel::Sms));
        assert!(!consented(&sms_only, reminder, Channel::Whatsapp));
        assert!(!consented(&sms_only, news, Channel::Sms));
        assert!(consented(&consent(true, false, true), news, Channel::Sms));
        assert_eq!(
            recipient(Some(&sms_only)).map(String::from),
            Ok("+919876543210".to_string())
        );
        assert_eq!(recipient(None), Err(SkipReason::NoConsent));
        let no_number = Consent {
            phone_number: None,
            ..sms_only.clone()
        };
        assert_eq!(recipient(Some(&no_number)), Err(SkipReason::NoConsent));
        let bad_number = Consent {
            phone_number: Some("12".into()),
            ..sms_only
        };
        assert_eq!(recipient(Some(&bad_number)), Err(SkipReason::NoConsent));
    }

    #[test]
    fn a_reminder_goes_only_while_its_item_is_on_at_that_time() {
        let when = at("2027-01-12T10:30:00Z");
        let before = at("2027-01-12T08:00:00Z");
        let scheduled = item("2027-01-12T10:30:00Z", ItemStatus::Scheduled);
        assert_eq!(
            reminder_obsolete(
                SubjectType::Appointment,
                when,
                "u1",
                Some(&scheduled),
                before
            ),
            None
        );
        assert_eq!(
            reminder_obsolete(SubjectType::Appointment, when, "u1", None, before),
            Some(SkipReason::AppointmentCancelled)
        );
        let cancelled = item("2027-01-12T10:30:00Z", ItemStatus::Cancelled);
        assert_eq!(
            reminder_obsolete(SubjectType::FollowUp, when, "u1", Some(&cancelled), before),
            Some(SkipReason::FollowUpCancelled)
        );
        let moved = item("2027-01-13T10:30:00Z", ItemStatus::Scheduled);
        assert_eq!(
            reminder_obsolete(SubjectType::Appointment, when, "u1", Some(&moved), before),
            Some(SkipReason::AppointmentRescheduled)
        );
        assert_eq!(
            reminder_obsolete(SubjectType::Appointment, when, "u1", Some(&scheduled), when),
            Some(SkipReason::AppointmentPassed)
        );
        assert_eq!(
            reminder_obsolete(
                SubjectType::Appointment,
                when,
                "u2",
                Some(&scheduled),
                before
            ),
            Some(SkipReason::AppointmentReassigned)
        );
        assert_eq!(
            reminder_obsolete(SubjectType::FollowUp, when, "u2", Some(&scheduled), before),
            Some(SkipReason::FollowUpReassigned)
        );
        // A follow-up is reminded on its day, after its time too.
        assert_eq!(
            reminder_obsolete(SubjectType::FollowUp, when, "u1", Some(&scheduled), when),
            None
        );
    }

    #[test]
    fn quiet_hours_hold_reminders_but_never_codes() {
        let night = at("2027-01-12T23:00:00Z");
        let morning = at("2027-01-13T08:00:00Z");
        let s = settings(true);
        assert_eq!(
            quiet_hours_rule(template("payment_received"), &s, night, None),
            QuietHoursRule::HoldUntil(morning)
        );
        assert_eq!(
            quiet_hours_rule(template("otp"), &s, night, None),
            QuietHoursRule::SendNow
        );
        assert_eq!(
            quiet_hours_rule(template("help"), &s, night, None),
            QuietHoursRule::SendNow
        );
        assert_eq!(
            quiet_hours_rule(template("payment_received"), &settings(false), night, None),
            QuietHoursRule::SendNow
        );
        assert_eq!(
            quiet_hours_rule(
                template("appointment_reminder_2h"),
                &s,
                night,
                Some(at("2027-01-13T07:30:00Z"))
            ),
            QuietHoursRule::Skip(SkipReason::QuietHoursPassed)
        );
        assert_eq!(
            quiet_hours_rule(
                template("appointment_reminder_24h"),
                &s,
                night,
                Some(at("2027-01-13T10:00:00Z"))
            ),
            QuietHoursRule::HoldUntil(morning)
        );
    }

    #[test]
    fn whatsapp_free_text_only_inside_the_window() {
        let now = at("2027-01-12T12:00:00Z");
        let s = settings(false);
        let reminder = template("appointment_reminder_24h");
        assert_eq!(
            whatsapp_route(Some(now - Duration::hours(23)), now, reminder, &s),
            WhatsappRoute::FreeText
        );
        assert_eq!(
            whatsapp_route(Some(now - Duration::hours(25)), now, reminder, &s),
            WhatsappRoute::Closed
        );
        assert_eq!(
            whatsapp_route(None, now, reminder, &s),
            WhatsappRoute::Closed
        );
        assert_eq!(
            whatsapp_route(None, now, template("payment_received"), &s),
            WhatsappRoute::Template("HX0123456789abcdef0123456789abcdef".into())
        );
        assert_eq!(
            whatsapp_fallback(&consent(true, true, false), false),
            Ok(Channel::Sms)
        );
        assert_eq!(
            whatsapp_fallback(&consent(true, true, false), true),
            Err(SkipReason::WhatsappWindowClosed)
        );
        assert_eq!(
            whatsapp_fallback(&consent(false, true, false), false),
            Err(SkipReason::WhatsappWindowClosed)
        );
    }

    #[test]
    fn a_subscription_reminder_goes_only_while_it_runs_until_its_date() {
        let expires = at("2027-01-19T00:00:00Z");
        let before = at("2027-01-12T08:00:00Z");
        let mut sub = item("2027-01-19T00:00:00Z", ItemStatus::Active);
        let kind = SubjectType::SubscriptionExpiry;
        assert_eq!(
            reminder_obsolete(kind, expires, "u1", Some(&sub), before),
            None
        );
        assert_eq!(
            reminder_obsolete(kind, expires, "u1", Some(&sub), expires),
            Some(SkipReason::SubscriptionPassed)
        );
        assert_eq!(
            reminder_obsolete(kind, expires - Duration::days(7), "u1", Some(&sub), before),
            Some(SkipReason::SubscriptionRescheduled)
        );
        assert_eq!(
            reminder_obsolete(
                SubjectType::SubscriptionRenewal,
                expires,
                "u1",
                None,
                before
            ),
            Some(SkipReason::SubscriptionCancelled)
        );
        sub.status = ItemStatus::Expired;
        assert_eq!(
            reminder_obsolete(kind, expires, "u1", Some(&sub), before),
            Some(SkipReason::SubscriptionExpired)
        );
        sub.status = ItemStatus::Cancelled;
        assert_eq!(
            reminder_obsolete(kind, expires, "u1", Some(&sub), before),
            Some(SkipReason::SubscriptionCancelled)
        );
    }
}
