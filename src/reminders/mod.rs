//! Reminders: the host app pushes appointments and follow-ups; sweeps queue their reminders
//! (appointments 24 h and 2 h before, follow-ups on their due date) through the outbox.
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

use std::sync::Arc;

use chrono::{DateTime, Duration, SecondsFormat, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::clock::DynClock;
use crate::consent::parse_time_zone;
use crate::error::{AppError, AppResult};
use crate::outbox::{validate_user_id, DispatchWakeup};
use crate::status::ItemStatus;
use crate::store::{
    Channel, ConsentStore, DueFilter, NewMessage, ScheduleStore, ScheduledItem, SubjectType,
};
use crate::templates;

/// The sweeps, each a job the scheduler and `/cron/*` run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reminder {
    Appointment24h,
    Appointment2h,
    FollowUp,
}

impl Reminder {
    pub fn subject(self) -> SubjectType {
        match self {
            Reminder::Appointment24h | Reminder::Appointment2h => SubjectType::Appointment,
            Reminder::FollowUp => SubjectType::FollowUp,
        }
    }

    /// The `reminder_log.kind`.
    pub fn kind(self) -> &'static str {
        match self {
            Reminder::Appointment24h => "24h",
            Reminder::Appointment2h => "2h",
            Reminder::FollowUp => "due",
        }
    }

    pub fn template(self) -> &'static str {
        match self {
            Reminder::Appointment24h => "appointment_reminder_24h",
            Reminder::Appointment2h => "appointment_reminder_2h",
            Reminder::FollowUp => "follow_up_reminder",
        }
    }

    /// Items whose time falls in this window are due for this reminder now. A 24-hour reminder
    /// that would come less than [`MIN_24H_LEAD`] before the appointment (a late booking, or a
    /// sweep that was down) is left to the 2-hour one; a follow-up is reminded on the day it
    /// falls due, not later.
    fn window(self, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        match self {
            Reminder::Appointment24h => (now + MIN_24H_LEAD, now + Duration::hours(24)),
            Reminder::Appointment2h => (now + Duration::seconds(1), now + Duration::hours(2)),
            Reminder::FollowUp => (now - Duration::hours(24), now),
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

/// What a sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    pub due: usize,
    pub queued: usize,
}

/// The host app's ids go into links (`/appointments/{id}`): URL-safe characters only.
fn validate_id(id: &str) -> AppResult<()> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    ok.then_some(()).ok_or_else(|| {
        AppError::bad_request(
            "invalid_id",
            "ids are 1 to 64 letters, digits, '-', '_' or '.'",
        )
    })
}

fn parse_time(field: &'static str, value: &str) -> AppResult<DateTime<Utc>> {
    // To the microsecond, as PostgreSQL keeps it, so both backends store the same time.
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc).trunc_subsecs(6))
        .map_err(|_| {
            AppError::bad_request("invalid_time", format!("{field} must be an RFC 3339 time"))
        })
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

    pub async fn put_appointment(
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
        let item = ScheduledItem {
            id: id.to_string(),
            user_id: request.user_id,
            scheduled_at: parse_time("starts_at", &request.starts_at)?,
            time_zone: Self::time_zone(request.time_zone.as_deref())?,
            status,
        };
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

    pub async fn put_follow_up(
        &self,
        id: &str,
        request: FollowUpRequest,
    ) -> AppResult<ScheduledItem> {
        validate_id(id)?;
        validate_user_id(&request.user_id)?;
        let item = ScheduledItem {
            id: id.to_string(),
            user_id: request.user_id,
            scheduled_at: parse_time("due_at", &request.due_at)?,
            time_zone: Self::time_zone(request.time_zone.as_deref())?,
            status: ItemStatus::Scheduled,
        };
        self.schedule
            .upsert_scheduled(SubjectType::FollowUp, &item, self.clock.now())
            .await
    }

    /// Cancel an item and skip its unsent reminders; the number skipped.
    pub async fn cancel(&self, kind: SubjectType, id: &str) -> AppResult<u64> {
        self.schedule
            .cancel_scheduled(kind, id, self.clock.now())
            .await?
            .ok_or(AppError::NotFound(match kind {
                SubjectType::Appointment => "appointment",
                SubjectType::FollowUp => "follow-up",
            }))
    }

    /// One round of a sweep: queue every reminder of this kind that is due now and not yet
    /// queued, and say what it did.
    pub async fn sweep(&self, reminder: Reminder) -> AppResult<SweepReport> {
        let now = self.clock.now();
        let due = self
            .schedule
            .due_without_reminder(
                reminder.subject(),
                reminder.kind(),
                &reminder.due(now, self.late_booking),
                1_000,
            )
            .await?;
        let mut report = SweepReport {
            due: due.len(),
            queued: 0,
        };
        for item in due {
            let Some(message) = self.reminder_message(reminder, &item, now).await? else {
                continue;
            };
            if self
                .schedule
                .queue_reminder(reminder.subject(), &item, reminder.kind(), &message)
                .await?
            {
                report.queued += 1;
            }
        }
        if report.queued > 0 {
            self.wakeup.notify_one();
            tracing::info!(
                reminder = reminder.template(),
                queued = report.queued,
                "reminders queued"
            );
        }
        Ok(report)
    }

    /// The reminder's message: the item's instant (rendered in the message's zone when it is
    /// sent) and a link to it.
    async fn reminder_message(
        &self,
        reminder: Reminder,
        item: &ScheduledItem,
        now: DateTime<Utc>,
    ) -> AppResult<Option<NewMessage>> {
        let link = match reminder.subject() {
            SubjectType::Appointment => format!("/appointments/{}", item.id),
            SubjectType::FollowUp => format!("/follow-ups/{}", item.id),
        };
        let instant = item
            .scheduled_at
            .to_rfc3339_opts(SecondsFormat::AutoSi, true);
        let variables = match reminder {
            Reminder::Appointment24h | Reminder::Appointment2h => {
                json!({"starts_at": instant, "link": link})
            }
            Reminder::FollowUp => json!({"due_at": instant, "link": link}),
        };
        let template = templates::find(reminder.template())
            .ok_or_else(|| anyhow::anyhow!("missing template"))?;
        if let Err(e) = template.validate(&variables, &self.render) {
            tracing::warn!(item = %item.id, error = %e, "reminder not queued: its variables are invalid");
            return Ok(None);
        }
        // The patient's SMS consent decides the channel, else WhatsApp; consent is checked again
        // when the message is sent.
        let consent = self.consent.get_consent(&item.user_id).await?;
        let channel = match consent {
            Some(c) if !c.sms_consent && c.whatsapp_consent => Channel::Whatsapp,
            _ => Channel::Sms,
        };
        Ok(Some(NewMessage {
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
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
