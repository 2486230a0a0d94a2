//! Reminders: the host app pushes appointments, follow-ups and subscriptions; sweeps queue their
//! reminders (appointments 24 h and 2 h before, follow-ups on their due date, subscriptions 7 days
//! and 1 day before they expire and 3 days before they renew) through the outbox.
//!
//! Each reminder is written with its `reminder_log` row in one transaction, keyed by the item's
//! time: a sweep that runs twice queues nothing twice, and a rescheduled appointment gets fresh
//! reminders while the old ones are skipped at send time (the dispatcher checks the item is still
//! on, still at that time, and not already past).
//!
//! A reminder's variables hold the item's instant, not words: the dispatcher renders "today",
//! "tomorrow" or the weekday and date, and the time, in the message's zone (the item's, else the
//! patient's, else `DEFAULT_TIME_ZONE`) when it sends it, so a reminder held back by quiet hours
//! still reads true.
//!
//! No two reminders of one appointment come within [`REMINDER_SPACING`] of each other: a 24-hour
//! reminder goes only for an appointment at least [`MIN_24H_LEAD`] ahead (nearer ones are left to
//! the 2-hour reminder), and a 2-hour reminder waits while the 24-hour one is pending (held by
//! quiet hours) or went less than that long ago. Late bookings: a 2-hour reminder only for an
//! appointment booked at least two hours ahead, unless `REMINDER_LATE_BOOKING` asks for one at
//! once.

pub mod import;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Datelike, Duration, SecondsFormat, SubsecRound, Timelike, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::clock::DynClock;
use crate::consent::parse_time_zone;
use crate::error::{AppError, AppResult};
use crate::outbox::{validate_user_id, DispatchWakeup};
use crate::status::ItemStatus;
use crate::store::{
    Channel, Consent, ConsentStore, DueFilter, NewMessage, ScheduleStore, ScheduledItem,
    SubjectType, Subscription, Upserted,
};
use crate::templates;

/// The sweeps, each a job the scheduler and `/cron/*` run (the three subscription sweeps run as
/// one job).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reminder {
    Appointment24h,
    Appointment2h,
    FollowUp,
    SubscriptionExpiring7d,
    SubscriptionExpiring1d,
    SubscriptionRenewal3d,
}

impl Reminder {
    /// The sweeps of the `subscription-reminders` job.
    pub const SUBSCRIPTIONS: [Reminder; 3] = [
        Reminder::SubscriptionExpiring7d,
        Reminder::SubscriptionExpiring1d,
        Reminder::SubscriptionRenewal3d,
    ];

    pub fn subject(self) -> SubjectType {
        match self {
            Reminder::Appointment24h | Reminder::Appointment2h => SubjectType::Appointment,
            Reminder::FollowUp => SubjectType::FollowUp,
            Reminder::SubscriptionExpiring7d | Reminder::SubscriptionExpiring1d => {
                SubjectType::SubscriptionExpiry
            }
            Reminder::SubscriptionRenewal3d => SubjectType::SubscriptionRenewal,
        }
    }

    /// The `reminder_log.kind`.
    pub fn kind(self) -> &'static str {
        match self {
            Reminder::Appointment24h => "24h",
            Reminder::Appointment2h => "2h",
            Reminder::FollowUp => "due",
            Reminder::SubscriptionExpiring7d => "7d",
            Reminder::SubscriptionExpiring1d => "1d",
            Reminder::SubscriptionRenewal3d => "3d",
        }
    }

    pub fn template(self) -> &'static str {
        match self {
            Reminder::Appointment24h => "appointment_reminder_24h",
            Reminder::Appointment2h => "appointment_reminder_2h",
            Reminder::FollowUp => "follow_up_reminder",
            Reminder::SubscriptionExpiring7d | Reminder::SubscriptionExpiring1d => {
                "subscription_expiring"
            }
            Reminder::SubscriptionRenewal3d => "subscription_renewal",
        }
    }

    /// Items whose time falls in this window are due for this reminder now. A 24-hour reminder
    /// that would come less than [`MIN_24H_LEAD`] before the appointment (a late booking, or a
    /// sweep that was down) is left to the 2-hour one; a follow-up is reminded on the day it
    /// falls due, not later. A subscription's 7-day reminder is left to the 1-day one under 2
    /// days before (no two reminders within a day).
    fn window(self, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        match self {
            Reminder::Appointment24h => (now + MIN_24H_LEAD, now + Duration::hours(24)),
            Reminder::Appointment2h => (now + Duration::seconds(1), now + Duration::hours(2)),
            Reminder::FollowUp => (now - Duration::hours(24), now),
            Reminder::SubscriptionExpiring7d => (now + Duration::days(2), now + Duration::days(7)),
            Reminder::SubscriptionExpiring1d => {
                (now + Duration::seconds(1), now + Duration::days(1))
            }
            Reminder::SubscriptionRenewal3d => {
                (now + Duration::seconds(1), now + Duration::days(3))
            }
        }
    }

    /// Where the reminder's link points in the app.
    fn link(self, id: &str) -> String {
        match self.subject() {
            SubjectType::Appointment => format!("/appointments/{id}"),
            SubjectType::FollowUp => format!("/follow-ups/{id}"),
            SubjectType::SubscriptionExpiry | SubjectType::SubscriptionRenewal => {
                format!("/subscriptions/{id}")
            }
        }
    }

    /// How far ahead an item must have been booked (its time, patient or status last set) to
    /// get this reminder: an appointment booked less than two hours ahead gets no 2-hour
    /// reminder, unless `REMINDER_LATE_BOOKING` sends one at once. `None`: no minimum.
    fn min_notice(self, late_booking: bool) -> Option<Duration> {
        match self {
            Reminder::Appointment2h if !late_booking => Some(Duration::hours(2)),
            _ => None,
        }
    }

    /// The reminder this one keeps [`REMINDER_SPACING`] away from: the 2-hour reminder waits
    /// while the 24-hour one is pending, and is not sent within that long after it (a 24-hour
    /// reminder held by quiet hours to the morning of the appointment tells the patient alone).
    fn apart_from(self) -> Option<Reminder> {
        match self {
            Reminder::Appointment2h => Some(Reminder::Appointment24h),
            _ => None,
        }
    }

    /// What a sweep at `now` takes.
    fn due(self, now: DateTime<Utc>, late_booking: bool) -> DueFilter<'static> {
        let (from, to) = self.window(now);
        DueFilter {
            from,
            to,
            min_notice_seconds: self.min_notice(late_booking).map(|d| d.num_seconds()),
            apart_from: self
                .apart_from()
                .map(|other| (other.kind(), now - REMINDER_SPACING)),
        }
    }
}

/// The least time between two reminders of one appointment.
pub const REMINDER_SPACING: Duration = Duration::hours(2);

/// The 24-hour reminder goes only for an appointment at least this far ahead: nearer, the 2-hour
/// reminder follows within [`REMINDER_SPACING`] and tells the patient alone.
pub const MIN_24H_LEAD: Duration = Duration::hours(4);

/// Items of a sweep's window read per round (one query; the due ones queued in one transaction).
const SWEEP_ROUND: i64 = 1_000;

/// `PUT /api/appointments/{id}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppointmentRequest {
    pub user_id: String,
    pub starts_at: String,
    pub time_zone: Option<String>,
    pub status: Option<String>,
}

/// `PUT /api/follow-ups/{id}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FollowUpRequest {
    pub user_id: String,
    pub due_at: String,
    pub time_zone: Option<String>,
}

/// `PUT /api/subscriptions/{id}`: at least one of `renews_at` and `expires_at`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionRequest {
    pub user_id: String,
    pub plan: String,
    pub renews_at: Option<String>,
    pub expires_at: Option<String>,
    pub status: Option<String>,
}

/// What a sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    pub due: usize,
    pub queued: usize,
}

/// The host app's ids go into links (`/appointments/{id}`): URL-safe characters only, and not `.`
/// or `..`, which a link cannot carry as a path segment (found by review: such an appointment was
/// stored, and its reminders were never queued).
fn validate_id(id: &str) -> AppResult<()> {
    let ok = (1..=64).contains(&id.len())
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    ok.then_some(()).ok_or_else(|| {
        AppError::bad_request(
            "invalid_id",
            "ids are 1 to 64 letters, digits, '-', '_' or '.', and not '.' or '..'",
        )
    })
}

/// A plan's name: a product tier ("Pro", "Family plan 12 months"), never a description of care.
/// 1 to 64 ASCII letters, digits, spaces and `-_+()`, starting with a letter or digit.
fn validate_plan(plan: &str) -> AppResult<()> {
    let ok = (1..=64).contains(&plan.len())
        && plan.starts_with(|c: char| c.is_ascii_alphanumeric())
        && plan
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b" -_+()".contains(&b));
    ok.then_some(()).ok_or_else(|| {
        AppError::bad_request(
            "invalid_plan",
            "plan is 1 to 64 letters, digits, spaces or '-_+()', starting with a letter or digit",
        )
    })
}

fn parse_time(field: &'static str, value: &str) -> AppResult<DateTime<Utc>> {
    // To the microsecond, as PostgreSQL keeps it, so both backends store the same time.
    let invalid =
        || AppError::bad_request("invalid_time", format!("{field} must be an RFC 3339 time"));
    let time = DateTime::parse_from_rfc3339(value)
        .map_err(|_| invalid())?
        .with_timezone(&Utc);
    // A leap second (`23:59:60`): chrono keeps it, PostgreSQL rolls it into the next minute.
    // Rolled here too, so both backends store the same time and a second import of the same
    // file finds it unchanged.
    let time = match time.nanosecond().checked_sub(1_000_000_000) {
        Some(fraction) => {
            time.with_nanosecond(fraction).ok_or_else(invalid)? + Duration::seconds(1)
        }
        None => time,
    }
    .trunc_subsecs(6);
    // Within RFC 3339's years once in UTC: `9999-12-31T23:00:00-05:00` is year 10000, which
    // SQLite would store as "+10000-..." and sort before today. (A far placeholder such as
    // `9999-12-31T00:00:00Z` for a subscription that never ends is fine: it is never due.)
    if !(0..=9999).contains(&time.year()) {
        return Err(AppError::bad_request(
            "invalid_time",
            format!("{field} must fall in the years 0000 to 9999 once in UTC"),
        ));
    }
    Ok(time)
}

/// Keeps the host app's appointments and follow-ups and queues their reminders.
#[derive(Clone)]
pub struct Reminders {
    schedule: Arc<dyn ScheduleStore>,
    consent: Arc<dyn ConsentStore>,
    clock: DynClock,
    /// `REMINDER_LATE_BOOKING`: an appointment booked less than two hours ahead gets one
    /// reminder at once.
    late_booking: bool,
    render: Arc<templates::RenderContext>,
    wakeup: DispatchWakeup,
}

impl Reminders {
    pub fn new(
        schedule: Arc<dyn ScheduleStore>,
        consent: Arc<dyn ConsentStore>,
        clock: DynClock,
        late_booking: bool,
        render: templates::RenderContext,
        wakeup: DispatchWakeup,
    ) -> Self {
        Reminders {
            schedule,
            consent,
            clock,
            late_booking,
            render: Arc::new(render),
            wakeup,
        }
    }

    /// The zone the host app gave, checked; none stored when it gave none (the patient's zone,
    /// else `DEFAULT_TIME_ZONE`, applies when a reminder is sent).
    fn time_zone(requested: Option<&str>) -> AppResult<Option<String>> {
        requested
            .map(|zone| parse_time_zone(zone).map(|tz| tz.name().to_string()))
            .transpose()
    }

    /// The appointment a `PUT /api/appointments/{id}` (or an import row) describes, validated.
    pub fn appointment_item(
        &self,
        id: &str,
        request: AppointmentRequest,
    ) -> AppResult<ScheduledItem> {
        validate_id(id)?;
        validate_user_id(&request.user_id)?;
        let status = match request.status.as_deref() {
            None | Some("scheduled") => ItemStatus::Scheduled,
            Some("cancelled") => ItemStatus::Cancelled,
            Some(_) => {
                return Err(AppError::bad_request(
                    "invalid_status",
                    "status must be scheduled or cancelled",
                ))
            }
        };
        Ok(ScheduledItem {
            id: id.to_string(),
            user_id: request.user_id,
            scheduled_at: parse_time("starts_at", &request.starts_at)?,
            time_zone: Self::time_zone(request.time_zone.as_deref())?,
            status,
        })
    }

    pub async fn put_appointment(
        &self,
        id: &str,
        request: AppointmentRequest,
    ) -> AppResult<ScheduledItem> {
        let item = self.appointment_item(id, request)?;
        let status = item.status;
        let now = self.clock.now();
        if status == ItemStatus::Cancelled {
            // Record it, then cancel it, so its unsent reminders are skipped as with DELETE.
            let scheduled = ScheduledItem {
                status: ItemStatus::Scheduled,
                ..item.clone()
            };
            self.schedule
                .upsert_scheduled(SubjectType::Appointment, &scheduled, now)
                .await?;
            self.schedule
                .cancel_scheduled(SubjectType::Appointment, id, now)
                .await?;
            return Ok(item);
        }
        self.schedule
            .upsert_scheduled(SubjectType::Appointment, &item, now)
            .await
    }

    /// The follow-up a `PUT /api/follow-ups/{id}` (or an import row) describes, validated.
    pub fn follow_up_item(&self, id: &str, request: FollowUpRequest) -> AppResult<ScheduledItem> {
        validate_id(id)?;
        validate_user_id(&request.user_id)?;
        Ok(ScheduledItem {
            id: id.to_string(),
            user_id: request.user_id,
            scheduled_at: parse_time("due_at", &request.due_at)?,
            time_zone: Self::time_zone(request.time_zone.as_deref())?,
            status: ItemStatus::Scheduled,
        })
    }

    pub async fn put_follow_up(
        &self,
        id: &str,
        request: FollowUpRequest,
    ) -> AppResult<ScheduledItem> {
        let item = self.follow_up_item(id, request)?;
        self.schedule
            .upsert_scheduled(SubjectType::FollowUp, &item, self.clock.now())
            .await
    }

    /// The subscription a `PUT /api/subscriptions/{id}` (or an import row) describes, validated.
    pub fn subscription_record(
        &self,
        id: &str,
        request: SubscriptionRequest,
    ) -> AppResult<Subscription> {
        validate_id(id)?;
        validate_user_id(&request.user_id)?;
        validate_plan(&request.plan)?;
        let status = match request.status.as_deref() {
            None | Some("active") => ItemStatus::Active,
            Some("cancelled") => ItemStatus::Cancelled,
            Some("expired") => ItemStatus::Expired,
            Some(_) => {
                return Err(AppError::bad_request(
                    "invalid_status",
                    "status must be active, cancelled or expired",
                ))
            }
        };
        let renews_at = request
            .renews_at
            .as_deref()
            .map(|t| parse_time("renews_at", t))
            .transpose()?;
        let expires_at = request
            .expires_at
            .as_deref()
            .map(|t| parse_time("expires_at", t))
            .transpose()?;
        if renews_at.is_none() && expires_at.is_none() {
            return Err(AppError::bad_request(
                "invalid_time",
                "renews_at or expires_at is required (RFC 3339)",
            ));
        }
        Ok(Subscription {
            id: id.to_string(),
            user_id: request.user_id,
            plan: request.plan,
            renews_at,
            expires_at,
            status,
        })
    }

    /// Create or update a subscription. One that is cancelled or expired has its reminders not
    /// yet sent skipped at once, in the same transaction; a new `expires_at` or `renews_at` is a
    /// new period with its own reminders (the old period's are skipped at send time).
    pub async fn put_subscription(
        &self,
        id: &str,
        request: SubscriptionRequest,
    ) -> AppResult<Subscription> {
        let subscription = self.subscription_record(id, request)?;
        self.schedule
            .upsert_subscriptions(std::slice::from_ref(&subscription), self.clock.now())
            .await?;
        Ok(subscription)
    }

    /// Write imported appointments or follow-ups (validated with [`Reminders::appointment_item`]
    /// or [`Reminders::follow_up_item`]) in one transaction.
    pub async fn import_items(
        &self,
        kind: SubjectType,
        items: &[ScheduledItem],
    ) -> AppResult<Vec<Upserted>> {
        self.schedule
            .upsert_scheduled_many(kind, items, self.clock.now())
            .await
    }

    /// Write imported subscriptions in one transaction.
    pub async fn import_subscriptions(&self, items: &[Subscription]) -> AppResult<Vec<Upserted>> {
        self.schedule
            .upsert_subscriptions(items, self.clock.now())
            .await
    }

    /// Cancel an item and skip its unsent reminders; the number skipped. A subscription's
    /// expiry and renewal are one item: either cancels both.
    pub async fn cancel(&self, kind: SubjectType, id: &str) -> AppResult<u64> {
        self.schedule
            .cancel_scheduled(kind, id, self.clock.now())
            .await?
            .ok_or(AppError::NotFound(match kind {
                SubjectType::Appointment => "appointment",
                SubjectType::FollowUp => "follow-up",
                SubjectType::SubscriptionExpiry | SubjectType::SubscriptionRenewal => {
                    "subscription"
                }
            }))
    }

    /// A sweep: queue every reminder of this kind that is due now and not yet queued, and say
    /// what it did. It pages through the window in rounds of [`SWEEP_ROUND`] items, each round
    /// one query (continuing after the last item of the previous one), one read of the due
    /// items' patients' consent records and one transaction.
    pub async fn sweep(&self, reminder: Reminder) -> AppResult<SweepReport> {
        let now = self.clock.now();
        let due = reminder.due(now, self.late_booking);
        let template = templates::find(reminder.template())
            .ok_or_else(|| anyhow::anyhow!("missing template"))?;
        let mut report = SweepReport::default();
        let mut after = None;
        loop {
            let page = self
                .schedule
                .due_without_reminder(
                    reminder.subject(),
                    reminder.kind(),
                    &due,
                    after.as_ref(),
                    SWEEP_ROUND,
                )
                .await?;
            report.due += page.due.len();
            report.queued += self.queue_page(reminder, template, page.due, now).await?;
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        if report.queued > 0 {
            self.wakeup.notify_one();
            tracing::info!(
                reminder = reminder.template(),
                kind = reminder.kind(),
                queued = report.queued,
                "reminders queued"
            );
        }
        Ok(report)
    }

    /// Queue the reminders of one page's due items: one read of their patients' consent records
    /// and one transaction. How many were queued (not those another sweep queued first).
    async fn queue_page(
        &self,
        reminder: Reminder,
        template: &templates::Template,
        due: Vec<ScheduledItem>,
        now: DateTime<Utc>,
    ) -> AppResult<usize> {
        if due.is_empty() {
            return Ok(0);
        }
        let mut user_ids: Vec<String> = due.iter().map(|i| i.user_id.clone()).collect();
        user_ids.sort_unstable();
        user_ids.dedup();
        let consents: HashMap<String, Consent> = self
            .consent
            .get_consents(&user_ids)
            .await?
            .into_iter()
            .map(|c| (c.user_id.clone(), c))
            .collect();
        let planned: Vec<(ScheduledItem, NewMessage)> = due
            .into_iter()
            .filter_map(|item| {
                let consent = consents.get(&item.user_id);
                let message = self.reminder_message(reminder, template, &item, consent, now)?;
                Some((item, message))
            })
            .collect();
        if planned.is_empty() {
            return Ok(0);
        }
        self.schedule
            .queue_reminders(reminder.subject(), reminder.kind(), &planned)
            .await
    }

    /// The `subscription-reminders` job: its three sweeps, added up.
    pub async fn sweep_subscriptions(&self) -> AppResult<SweepReport> {
        let mut total = SweepReport::default();
        for reminder in Reminder::SUBSCRIPTIONS {
            let report = self.sweep(reminder).await?;
            total.due += report.due;
            total.queued += report.queued;
        }
        Ok(total)
    }

    /// The reminder's message: the item's instant (rendered in the message's zone when it is
    /// sent) and a link to it. The patient's SMS consent decides the channel, else WhatsApp;
    /// consent is checked again when the message is sent.
    fn reminder_message(
        &self,
        reminder: Reminder,
        template: &templates::Template,
        item: &ScheduledItem,
        consent: Option<&Consent>,
        now: DateTime<Utc>,
    ) -> Option<NewMessage> {
        let link = reminder.link(&item.id);
        let instant = item
            .scheduled_at
            .to_rfc3339_opts(SecondsFormat::AutoSi, true);
        let variables = match reminder {
            Reminder::Appointment24h | Reminder::Appointment2h => {
                json!({"starts_at": instant, "link": link})
            }
            Reminder::FollowUp => json!({"due_at": instant, "link": link}),
            Reminder::SubscriptionExpiring7d
            | Reminder::SubscriptionExpiring1d
            | Reminder::SubscriptionRenewal3d => json!({"date": instant, "link": link}),
        };
        if let Err(e) = template.validate(&variables, &self.render) {
            tracing::warn!(item = %item.id, error = format!("{e:#}"), "reminder not queued: its variables are invalid");
            return None;
        }
        let channel = match consent {
            Some(c) if !c.sms_consent && c.whatsapp_consent => Channel::Whatsapp,
            _ => Channel::Sms,
        };
        Some(NewMessage {
            id: uuid::Uuid::now_v7().to_string(),
            user_id: item.user_id.clone(),
            template_name: template.name.to_string(),
            variables: variables.to_string(),
            channel,
            // Once-only is the reminder log's partial unique key (one pending or delivered
            // reminder per item, kind, time and patient), not an idempotency key: a reminder
            // skipped because its item moved must not block the one planned when it moves back.
            idempotency_key: None,
            created_at: now,
            claimed_until: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `.` and `..` cannot be a link's segment (`/appointments/..` climbs out), so an item under
    /// one would never be reminded (found by review, sent as `%2E%2E` by curl --path-as-is). The
    /// same check holds for the API and the CSV import.
    #[test]
    fn ids_that_a_link_cannot_carry_are_refused() {
        for id in [".", "..", "", "a b", "a/b", &"x".repeat(65)] {
            assert!(validate_id(id).is_err(), "{id:?}");
        }
        for id in ["...", "a..b", "a.b", ".a", "appt-1_2", &"x".repeat(64)] {
            assert!(validate_id(id).is_ok(), "{id:?}");
        }
    }

    #[test]
    fn a_leap_second_is_rolled_into_the_next_minute_as_postgresql_does() {
        let rolled = parse_time("starts_at", "2026-12-31T23:59:60.25Z").unwrap();
        assert_eq!(rolled, t("2027-01-01T00:00:00.25Z"));
        let rolled = parse_time("starts_at", "2026-12-31T18:59:60+05:00").unwrap();
        assert_eq!(rolled, t("2026-12-31T14:00:00Z"));
        assert_eq!(
            parse_time("starts_at", "2027-01-12T09:30:00.1234567+05:30").unwrap(),
            t("2027-01-12T04:00:00.123456Z")
        );
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// Whether a reminder is due now for an item at `start` booked `notice` ahead.
    fn due(reminder: Reminder, late: bool, now: &str, start: &str, notice: Duration) -> bool {
        let (from, to) = reminder.window(t(now));
        let start = t(start);
        let notice_ok = reminder.min_notice(late).is_none_or(|min| notice >= min);
        from <= start && start <= to && notice_ok
    }

    #[test]
    fn late_bookings() {
        let booked = "2027-01-12T04:00:00Z";
        let h = Duration::hours;
        // Booked 3 hours ahead: no 24-hour reminder (the 2-hour one follows within the hour)...
        let start = "2027-01-12T07:00:00Z";
        assert!(!due(Reminder::Appointment24h, false, booked, start, h(3)));
        assert!(!due(Reminder::Appointment2h, false, booked, start, h(3)));
        // ... and one 2-hour reminder, two hours before.
        assert!(due(
            Reminder::Appointment2h,
            false,
            "2027-01-12T05:00:00Z",
            start,
            h(3)
        ));
        // Booked 1 hour ahead: none, or one at once with REMINDER_LATE_BOOKING.
        let start = "2027-01-12T05:00:00Z";
        assert!(!due(Reminder::Appointment24h, false, booked, start, h(1)));
        assert!(!due(Reminder::Appointment2h, false, booked, start, h(1)));
        assert!(!due(Reminder::Appointment24h, true, booked, start, h(1)));
        assert!(due(Reminder::Appointment2h, true, booked, start, h(1)));
        // Booked 10 hours ahead: the 24-hour reminder at once (it reads "today"), then the
        // 2-hour one.
        let start = "2027-01-12T14:00:00Z";
        assert!(due(Reminder::Appointment24h, false, booked, start, h(10)));
        assert!(due(
            Reminder::Appointment2h,
            false,
            "2027-01-12T12:00:00Z",
            start,
            h(10)
        ));
        // The 2-hour reminder keeps two hours away from the 24-hour one; nothing else waits.
        let now = t(booked);
        assert_eq!(
            Reminder::Appointment2h.due(now, false).apart_from,
            Some(("24h", now - REMINDER_SPACING))
        );
        assert_eq!(Reminder::Appointment24h.due(now, true).apart_from, None);
        assert_eq!(Reminder::FollowUp.due(now, false).apart_from, None);
        // Booked days ahead: the 24-hour reminder a day before, not before that.
        let start = "2027-01-14T04:00:00Z";
        assert!(!due(Reminder::Appointment24h, false, booked, start, h(48)));
        assert!(due(
            Reminder::Appointment24h,
            false,
            "2027-01-13T04:00:00Z",
            start,
            h(48)
        ));
    }
}
