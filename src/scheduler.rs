//! The embedded scheduler: runs the periodic jobs, so a single instance needs no outside cron.
//! Each job is a plain function (also behind `/cron/*`); the scheduler only decides when.

use std::time::Duration;

use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::app::Services;
use crate::reminders::Reminder;

/// Owed carrier opt-outs recorded per round of `Job::PruneUnmatchedCallbacks`: each is a
/// consent change, and there is rarely more than one (a crash in a narrow window).
const PARKED_OPT_OUTS_PER_ROUND: i64 = 1_000;

/// How often the scheduler looks for due jobs.
const TICK: Duration = Duration::from_secs(60);

/// A periodic job and its period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    AppointmentReminders24h,
    AppointmentReminders2h,
    FollowUpReminders,
    /// A subscription's reminders: 7 days and 1 day before it expires, 3 days before it renews.
    SubscriptionReminders,
    CleanupExpiredOtps,
    /// Status callbacks for SIDs no message of ours ever recorded (after a day they never will);
    /// first, the carrier opt-outs still owed for callbacks that beat their send
    /// (`Delivery::settle_parked_opt_outs`). Also the first round after a start.
    PruneUnmatchedCallbacks,
    /// Settings-page sessions and links past their expiry.
    CleanupSettingsSessions,
    /// Everything past its retention period (`RETENTION_*_DAYS`), daily.
    MessagingCleanup,
}

impl Job {
    pub const ALL: [Job; 8] = [
        Job::AppointmentReminders24h,
        Job::AppointmentReminders2h,
        Job::FollowUpReminders,
        Job::SubscriptionReminders,
        Job::CleanupExpiredOtps,
        Job::PruneUnmatchedCallbacks,
        Job::CleanupSettingsSessions,
        Job::MessagingCleanup,
    ];

    pub fn every(self) -> Duration {
        match self {
            Job::AppointmentReminders24h | Job::AppointmentReminders2h | Job::FollowUpReminders => {
                Duration::from_secs(60)
            }
            // Subscription reminders are days ahead: every ten minutes is soon enough.
            Job::SubscriptionReminders | Job::CleanupExpiredOtps | Job::CleanupSettingsSessions => {
                Duration::from_secs(600)
            }
            Job::PruneUnmatchedCallbacks => Duration::from_secs(3600),
            Job::MessagingCleanup => Duration::from_secs(86_400),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Job::AppointmentReminders24h => "appointment-reminders-24h",
            Job::AppointmentReminders2h => "appointment-reminders-2h",
            Job::FollowUpReminders => "follow-up-reminders",
            Job::SubscriptionReminders => "subscription-reminders",
            Job::CleanupExpiredOtps => "cleanup-expired-otps",
            Job::PruneUnmatchedCallbacks => "prune-unmatched-callbacks",
            Job::CleanupSettingsSessions => "cleanup-settings-sessions",
            Job::MessagingCleanup => "messaging-cleanup",
        }
    }

    pub fn parse(name: &str) -> Option<Job> {
        Job::ALL.into_iter().find(|j| j.name() == name)
    }

    /// Run one round of the job and report what it did; errors are logged by the caller.
    pub async fn run(self, services: &Services) -> anyhow::Result<serde_json::Value> {
        let sweep = |reminder| services.reminders.sweep(reminder);
        match self {
            Job::AppointmentReminders24h => Ok(serde_json::to_value(
                sweep(Reminder::Appointment24h).await?,
            )?),
            Job::AppointmentReminders2h => {
                Ok(serde_json::to_value(sweep(Reminder::Appointment2h).await?)?)
            }
            Job::FollowUpReminders => Ok(serde_json::to_value(sweep(Reminder::FollowUp).await?)?),
            Job::SubscriptionReminders => Ok(serde_json::to_value(
                services.reminders.sweep_subscriptions().await?,
            )?),
            Job::CleanupExpiredOtps => Ok(serde_json::to_value(services.otp.cleanup().await?)?),
            Job::PruneUnmatchedCallbacks => {
                let now = services.clock.now();
                // The prune runs even when the owed opt-outs cannot be read: it never deletes
                // one (`store::PRUNE_UNMATCHED`).
                let opt_outs = services
                    .delivery
                    .settle_parked_opt_outs(now, PARKED_OPT_OUTS_PER_ROUND)
                    .await;
                let period = services
                    .retention
                    .period(crate::store::DataClass::UnmatchedCallbacks);
                let pruned = services.delivery.prune_unmatched(now - period).await?;
                Ok(serde_json::json!({ "pruned": pruned, "opt_outs": opt_outs? }))
            }
            Job::MessagingCleanup => Ok(serde_json::to_value(
                services.retention.run(None, false).await?,
            )?),
            Job::CleanupSettingsSessions => {
                let deleted = services.settings_pages.prune().await?;
                Ok(serde_json::json!({ "deleted": deleted }))
            }
        }
    }
}

/// Run each job when its period has passed, until `shutdown`.
pub async fn run(services: Services, shutdown: CancellationToken) {
    let mut ticker = interval(TICK);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_run: Vec<Option<tokio::time::Instant>> = vec![None; Job::ALL.len()];
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        for (i, job) in Job::ALL.into_iter().enumerate() {
            if last_run[i].is_some_and(|at| at.elapsed() < job.every()) {
                continue;
            }
            last_run[i] = Some(tokio::time::Instant::now());
            if let Err(e) = job.run(&services).await {
                tracing::error!(
                    job = job.name(),
                    error = format!("{e:#}"),
                    "scheduled job failed"
                );
            }
        }
    }
}
