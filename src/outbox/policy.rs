//! The send-time policy: whether a message may go now, where, and by which route. Checked by the
//! dispatcher just before each send, because consent, opt-outs, appointments and the clock all
//! change between queueing and sending. Pure functions over facts the dispatcher reads, so each
//! rule is tested here without a database.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use serde_json::Value;

use super::quiet_hours;
use crate::channel::Channel;
use crate::config::QuietHours;
use crate::phone::PhoneNumber;
use crate::status::SkipReason;
use crate::store::{Consent, ScheduledItem, SubjectType};
use crate::templates::{Category, Template};

/// A 2-hour reminder that quiet hours would move to less than this before its appointment is
/// skipped: the 24-hour reminder, sent at a waking hour the day before, has told the patient.
pub const MIN_LEAD_AFTER_QUIET_HOURS: Duration = Duration::minutes(30);

/// WhatsApp allows free-form messages for 24 hours after the patient's last message.
pub const WHATSAPP_WINDOW: Duration = Duration::hours(24);

/// What the policy needs from the configuration.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    pub messaging_enabled: bool,
    pub quiet_hours: Option<QuietHours>,
    /// `DEFAULT_TIME_ZONE`: for messages whose item and patient have no zone.
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
    let marketing_ok = template.category() != Category::Marketing || consent.marketing_consent;
    channel_consent && marketing_ok
}

/// Whether a template is a reminder about an appointment, follow-up or subscription (and so must
/// be checked against the item's current state, when a sweep queued it: the host app may send
/// the subscription templates itself, with no item behind them).
/// The time an appointment reminder names (`starts_at`), for one with no appointment stored.
pub fn appointment_time_in(template: &Template, variables: &Value) -> Option<DateTime<Utc>> {
    if !template.name.starts_with("appointment_reminder_") {
        return None;
    }
    let at = variables.get("starts_at")?.as_str()?;
    DateTime::parse_from_rfc3339(at)
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

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

/// The zone a message is read in: its item's (an appointment's or follow-up's, when the host app
/// gave one), else the patient's (preferences), else `DEFAULT_TIME_ZONE`. Quiet hours, the
/// rendered date and time and the day word all use it. A stored name this build does not know
/// falls through to the next.
pub fn message_zone(item_zone: Option<&str>, patient_zone: Option<&str>, default: Tz) -> Tz {
    [item_zone, patient_zone]
        .into_iter()
        .flatten()
        .find_map(|name| name.parse::<Tz>().ok())
        .unwrap_or(default)
}

/// What quiet hours say about sending this template now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuietHoursRule {
    /// Outside quiet hours, or a template they never hold back.
    SendNow,
    /// Hold it until the window ends.
    HoldUntil(DateTime<Utc>),
    /// Held to the window's end, the reminder would come too late.
    Skip(SkipReason),
}

/// Quiet hours hold back scheduled messages (reminders) and marketing, in the message's `zone`,
/// until the window ends; what the patient's own action caused (a payment receipt), OTPs and
/// keyword replies go at once. `appointment_at` is the start of the appointment a reminder is
/// about: held to or past it, a reminder is skipped (`quiet_hours_passed`); a 2-hour reminder held
/// to less than [`MIN_LEAD_AFTER_QUIET_HOURS`] before it is skipped too (`quiet_hours`). A 24-hour
/// reminder is only moved (and then reads "today" when that is the day).
pub fn quiet_hours_rule(
    template: &Template,
    settings: &PolicySettings,
    now: DateTime<Utc>,
    zone: Tz,
    appointment_at: Option<DateTime<Utc>>,
) -> QuietHoursRule {
    let until = settings
        .quiet_hours
        .filter(|_| template.kind.held_by_quiet_hours())
        .and_then(|quiet| quiet_hours::quiet_until(now, zone, quiet));
    match (until, appointment_at) {
        (None, _) => QuietHoursRule::SendNow,
        (Some(until), Some(at)) if until >= at => {
            QuietHoursRule::Skip(SkipReason::QuietHoursPassed)
        }
        (Some(until), Some(at))
            if template.name == "appointment_reminder_2h"
                && at - until < MIN_LEAD_AFTER_QUIET_HOURS =>
        {
            QuietHoursRule::Skip(SkipReason::QuietHours)
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
            time_zone: None,
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
            time_zone: None,
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

    const UTC: Tz = chrono_tz::UTC;

    fn zone(name: &str) -> Tz {
        name.parse().unwrap()
    }

    #[test]
    fn quiet_hours_hold_scheduled_and_marketing_but_not_the_patients_own() {
        let night = at("2027-01-12T23:00:00Z");
        let morning = at("2027-01-13T08:00:00Z");
        let s = settings(true);
        let rule = |name: &str| quiet_hours_rule(template(name), &s, night, UTC, None);
        for held in [
            "appointment_reminder_24h",
            "appointment_reminder_2h",
            "follow_up_reminder",
            "subscription_renewal",
            "clinic_news",
        ] {
            assert_eq!(rule(held), QuietHoursRule::HoldUntil(morning), "{held}");
        }
        // Caused by the patient's own action (a payment), asked for (a code), or an answer to
        // their keyword: at once.
        for at_once in [
            "payment_received",
            "payment_failed",
            "otp",
            "help",
            "opt_out_confirmation",
        ] {
            assert_eq!(rule(at_once), QuietHoursRule::SendNow, "{at_once}");
        }
        assert_eq!(
            quiet_hours_rule(template("clinic_news"), &settings(false), night, UTC, None),
            QuietHoursRule::SendNow
        );
    }

    #[test]
    fn quiet_hours_are_the_message_zones() {
        // 02:53 UTC is 08:23 in Kolkata: the window is over there, not in UTC.
        let now = at("2027-01-12T02:53:00Z");
        let s = settings(true);
        let reminder = template("appointment_reminder_24h");
        assert_eq!(
            quiet_hours_rule(reminder, &s, now, zone("Asia/Kolkata"), None),
            QuietHoursRule::SendNow
        );
        assert_eq!(
            quiet_hours_rule(reminder, &s, now, UTC, None),
            QuietHoursRule::HoldUntil(at("2027-01-12T08:00:00Z"))
        );
        // The item's zone first, then the patient's, then DEFAULT_TIME_ZONE.
        let kolkata = zone("Asia/Kolkata");
        assert_eq!(
            message_zone(Some("Europe/London"), Some("Asia/Kolkata"), UTC),
            zone("Europe/London")
        );
        assert_eq!(message_zone(None, Some("Asia/Kolkata"), UTC), kolkata);
        assert_eq!(message_zone(None, None, kolkata), kolkata);
        assert_eq!(message_zone(Some("Mars/Base"), None, kolkata), kolkata);
    }

    #[test]
    fn quiet_hours_move_a_reminder_to_the_windows_end_or_skip_it() {
        let s = settings(true);
        let two_hours = template("appointment_reminder_2h");
        let day_before = template("appointment_reminder_24h");
        let night = at("2027-01-13T06:00:00Z");
        let window_end = at("2027-01-13T08:00:00Z");
        let rule = |t, start: &str| quiet_hours_rule(t, &s, night, UTC, Some(at(start)));
        // A 2-hour reminder that would arrive 30 minutes or more before the start: moved.
        assert_eq!(
            rule(two_hours, "2027-01-13T08:30:00Z"),
            QuietHoursRule::HoldUntil(window_end)
        );
        // Less than 30 minutes before: skipped (the 24-hour reminder told the patient).
        assert_eq!(
            rule(two_hours, "2027-01-13T08:29:00Z"),
            QuietHoursRule::Skip(SkipReason::QuietHours)
        );
        // At or after the start: skipped as passed.
        assert_eq!(
            rule(two_hours, "2027-01-13T07:59:00Z"),
            QuietHoursRule::Skip(SkipReason::QuietHoursPassed)
        );
        assert_eq!(
            rule(two_hours, "2027-01-13T08:00:00Z"),
            QuietHoursRule::Skip(SkipReason::QuietHoursPassed)
        );
        // A 24-hour reminder is moved, however near the window's end leaves it.
        assert_eq!(
            rule(day_before, "2027-01-13T08:10:00Z"),
            QuietHoursRule::HoldUntil(window_end)
        );
        assert_eq!(
            rule(day_before, "2027-01-13T07:30:00Z"),
            QuietHoursRule::Skip(SkipReason::QuietHoursPassed)
        );
        // Outside quiet hours nothing is moved or skipped, however near the start.
        assert_eq!(
            quiet_hours_rule(
                two_hours,
                &s,
                at("2027-01-13T12:00:00Z"),
                UTC,
                Some(at("2027-01-13T12:10:00Z"))
            ),
            QuietHoursRule::SendNow
        );
    }

    #[test]
    fn quiet_hour_moves_across_daylight_saving_changes() {
        let s = settings(true);
        let two_hours = template("appointment_reminder_2h");
        let london = zone("Europe/London");
        let new_york = zone("America/New_York");
        // London springs forward on 28 Mar 2027: 08:00 BST is 07:00 UTC. A 2-hour reminder at
        // 05:30 UTC (06:30 BST) for 09:00 BST (08:00 UTC) moves to 07:00 UTC, an hour ahead.
        assert_eq!(
            quiet_hours_rule(
                two_hours,
                &s,
                at("2027-03-28T05:30:00Z"),
                london,
                Some(at("2027-03-28T08:00:00Z"))
            ),
            QuietHoursRule::HoldUntil(at("2027-03-28T07:00:00Z"))
        );
        // Read in GMT it would have been held to 08:00 UTC, the start itself.
        assert_eq!(
            quiet_hours_rule(
                two_hours,
                &s,
                at("2027-03-28T05:30:00Z"),
                UTC,
                Some(at("2027-03-28T08:00:00Z"))
            ),
            QuietHoursRule::Skip(SkipReason::QuietHoursPassed)
        );
        // London falls back on 31 Oct 2027: 08:00 GMT is 08:00 UTC, so an appointment at 08:20
        // GMT is 20 minutes after the window's end: its 2-hour reminder is skipped.
        assert_eq!(
            quiet_hours_rule(
                two_hours,
                &s,
                at("2027-10-31T06:20:00Z"),
                london,
                Some(at("2027-10-31T08:20:00Z"))
            ),
            QuietHoursRule::Skip(SkipReason::QuietHours)
        );
        // New York springs forward on 14 Mar 2027: 08:00 EDT is 12:00 UTC (not 13:00).
        assert_eq!(
            quiet_hours_rule(
                two_hours,
                &s,
                at("2027-03-14T10:00:00Z"),
                new_york,
                Some(at("2027-03-14T13:00:00Z"))
            ),
            QuietHoursRule::HoldUntil(at("2027-03-14T12:00:00Z"))
        );
        // ... and falls back on 7 Nov 2027: 08:00 EST is 13:00 UTC; 12:40 UTC (07:40 EST) is
        // still quiet, and a start at 13:20 UTC is then under 30 minutes away.
        assert_eq!(
            quiet_hours_rule(
                two_hours,
                &s,
                at("2027-11-07T12:40:00Z"),
                new_york,
                Some(at("2027-11-07T13:20:00Z"))
            ),
            QuietHoursRule::Skip(SkipReason::QuietHours)
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
