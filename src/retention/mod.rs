//! Retention: personal data is kept only as long as its class needs. Each class has its own
//! period (`RETENTION_*_DAYS`); a run deletes what is past it in bounded batches, so no table the
//! API is writing is locked for long, and keeps a receipt (`cleanup_runs`). A message not yet final
//! is never deleted. A dry run counts and deletes nothing; `as_of` measures the periods from
//! another instant (a compliance officer's preview).

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::clock::DynClock;
use crate::config::RetentionSettings;
use crate::error::AppResult;
use crate::store::{CleanupRun, DataClass, RetentionStore};

/// Rows deleted per statement.
const BATCH: i64 = 500;

/// What a run did (or, dry, would do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CleanupReport {
    pub as_of: DateTime<Utc>,
    pub dry_run: bool,
    /// Rows deleted (or that would be) per data class.
    pub deleted: BTreeMap<&'static str, u64>,
}

#[derive(Clone)]
pub struct Retention {
    store: Arc<dyn RetentionStore>,
    clock: DynClock,
    settings: RetentionSettings,
}

impl Retention {
    pub fn new(
        store: Arc<dyn RetentionStore>,
        clock: DynClock,
        settings: RetentionSettings,
    ) -> Self {
        Retention {
            store,
            clock,
            settings,
        }
    }

    /// How long a class is kept.
    pub fn period(&self, class: DataClass) -> Duration {
        let days = match class {
            DataClass::Messages => self.settings.messages_days,
            DataClass::Inbound => self.settings.inbound_days,
            DataClass::ReminderLog => self.settings.reminder_log_days,
            DataClass::Audit => self.settings.audit_days,
            DataClass::UnmatchedCallbacks => self.settings.unmatched_callbacks_days,
        };
        Duration::days(i64::from(days))
    }

    /// One cleanup run: every class, batch after batch until nothing is past its period.
    pub async fn run(
        &self,
        as_of: Option<DateTime<Utc>>,
        dry_run: bool,
    ) -> AppResult<CleanupReport> {
        let as_of = as_of.unwrap_or_else(|| self.clock.now());
        let mut deleted = BTreeMap::new();
        for class in DataClass::ALL {
            let before = as_of - self.period(class);
            let count = if dry_run {
                self.store.expire(class, before, BATCH, true).await?
            } else {
                let mut total = 0;
                loop {
                    let batch = self.store.expire(class, before, BATCH, false).await?;
                    total += batch;
                    if batch < BATCH as u64 {
                        break total;
                    }
                }
            };
            deleted.insert(class.as_str(), count);
        }
        let report = CleanupReport {
            as_of,
            dry_run,
            deleted,
        };
        if !dry_run {
            let counts = serde_json::to_string(&report.deleted).map_err(anyhow::Error::from)?;
            self.store
                .record_cleanup_run(self.clock.now(), as_of, &counts)
                .await?;
        }
        tracing::info!(dry_run, counts = ?report.deleted, "messaging cleanup");
        Ok(report)
    }

    /// The latest receipts, newest first.
    pub async fn runs(&self, limit: i64) -> AppResult<Vec<CleanupRun>> {
        self.store.cleanup_runs(limit).await
    }
}
