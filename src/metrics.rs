//! Counters for `/metrics` (Prometheus text format). In-process counters count what this
//! instance did since it started; message totals by status come from the database, so they agree
//! across instances, through a short cache ([`StatusCounts`]) so that scrapes stay cheap.

use std::fmt::Write;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// How long a count of messages by status serves scrapes before it is taken again.
pub const STATUS_COUNTS_TTL: Duration = Duration::from_secs(15);

/// Message counts by status, `(status, count)`.
pub type Counts = Arc<Vec<(String, i64)>>;

/// The message counts by status, kept for a TTL, taken by one query at a time: scrapes that
/// arrive while a count is being taken wait for it and share it instead of each running its own
/// (counting a large `messages` table is the expensive part of a scrape). A failed count is not
/// kept, so the next scrape tries again.
pub struct StatusCounts {
    ttl: Duration,
    last: Mutex<Option<(Instant, Counts)>>,
}

impl Default for StatusCounts {
    fn default() -> Self {
        StatusCounts::new(STATUS_COUNTS_TTL)
    }
}

impl StatusCounts {
    pub fn new(ttl: Duration) -> Self {
        StatusCounts {
            ttl,
            last: Mutex::new(None),
        }
    }

    /// The cached counts while fresh, else the result of `count` (run at most once at a time).
    pub async fn get<F, Fut, E>(&self, count: F) -> Result<Counts, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<(String, i64)>, E>>,
    {
        // Held across the query: that is what makes concurrent scrapes share one.
        let mut last = self.last.lock().await;
        if let Some((at, counts)) = last.as_ref() {
            if at.elapsed() < self.ttl {
                return Ok(counts.clone());
            }
        }
        let counts: Counts = Arc::new(count().await?);
        *last = Some((Instant::now(), counts.clone()));
        Ok(counts)
    }
}

#[derive(Default)]
pub struct Metrics {
    /// `prism_messages{status}`, cached.
    pub status_counts: StatusCounts,
    dispatch: [AtomicU64; DISPATCH_OUTCOMES.len()],
    otp_sent: AtomicU64,
    otp_refused: AtomicU64,
    otp_verified: AtomicU64,
    otp_rejected: AtomicU64,
    webhooks_accepted: AtomicU64,
    webhooks_forbidden: AtomicU64,
}

const DISPATCH_OUTCOMES: [&str; 11] = [
    "claimed", "sent", "skipped", "failed", "retried", "deferred", "adopted", "released", "lost",
    "unknown", "held",
];

impl Metrics {
    /// Add one dispatcher round's outcomes, by name (unknown names are ignored).
    pub fn record_round(&self, counts: &[(&str, usize)]) {
        for (name, value) in counts {
            if let Some(i) = DISPATCH_OUTCOMES.iter().position(|o| o == name) {
                self.dispatch[i].fetch_add(*value as u64, Ordering::Relaxed);
            }
        }
    }

    pub fn otp_send(&self, sent: bool) {
        let counter = if sent {
            &self.otp_sent
        } else {
            &self.otp_refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn otp_verify(&self, valid: bool) {
        let counter = if valid {
            &self.otp_verified
        } else {
            &self.otp_rejected
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn webhook(&self, accepted: bool) {
        let counter = if accepted {
            &self.webhooks_accepted
        } else {
            &self.webhooks_forbidden
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text, with `messages` (status, count) from the database.
    pub fn render(&self, provider: &str, messages: &[(String, i64)]) -> String {
        let mut out = String::new();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP prism_info Build and provider of this instance.\n# TYPE prism_info gauge"
        );
        let _ = writeln!(
            out,
            "prism_info{{version=\"{}\",provider=\"{provider}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        let _ = writeln!(out, "# HELP prism_messages Messages in the database by status.\n# TYPE prism_messages gauge");
        for (status, count) in messages {
            let _ = writeln!(out, "prism_messages{{status=\"{status}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "# HELP prism_dispatch_total Dispatcher outcomes on this instance.\n# TYPE prism_dispatch_total counter"
        );
        for (name, counter) in DISPATCH_OUTCOMES.iter().zip(&self.dispatch) {
            let _ = writeln!(
                out,
                "prism_dispatch_total{{outcome=\"{name}\"}} {}",
                get(counter)
            );
        }
        let _ = writeln!(
            out,
            "# HELP prism_otp_sends_total OTP send requests.\n# TYPE prism_otp_sends_total counter"
        );
        let _ = writeln!(
            out,
            "prism_otp_sends_total{{result=\"sent\"}} {}",
            get(&self.otp_sent)
        );
        let _ = writeln!(
            out,
            "prism_otp_sends_total{{result=\"refused\"}} {}",
            get(&self.otp_refused)
        );
        let _ = writeln!(out, "# HELP prism_otp_verifies_total OTP verify requests.\n# TYPE prism_otp_verifies_total counter");
        let _ = writeln!(
            out,
            "prism_otp_verifies_total{{result=\"valid\"}} {}",
            get(&self.otp_verified)
        );
        let _ = writeln!(
            out,
            "prism_otp_verifies_total{{result=\"invalid\"}} {}",
            get(&self.otp_rejected)
        );
        let _ = writeln!(out, "# HELP prism_webhooks_total Twilio webhook requests.\n# TYPE prism_webhooks_total counter");
        let _ = writeln!(
            out,
            "prism_webhooks_total{{result=\"accepted\"}} {}",
            get(&self.webhooks_accepted)
        );
        let _ = writeln!(
            out,
            "prism_webhooks_total{{result=\"forbidden\"}} {}",
            get(&self.webhooks_forbidden)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn sample() -> Vec<(String, i64)> {
        vec![("delivered".into(), 3), ("queued".into(), 1)]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_scrapes_share_one_count() {
        const SCRAPES: usize = 8;
        let cache = Arc::new(StatusCounts::default());
        let queries = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        let mut tasks = vec![];
        for _ in 0..SCRAPES {
            let (cache, queries, started) = (cache.clone(), queries.clone(), started.clone());
            tasks.push(tokio::spawn(async move {
                started.fetch_add(1, Ordering::SeqCst);
                cache
                    .get(|| async {
                        queries.fetch_add(1, Ordering::SeqCst);
                        // The count stays in flight until every scrape has asked for it.
                        while started.load(Ordering::SeqCst) < SCRAPES {
                            tokio::task::yield_now().await;
                        }
                        Ok::<_, ()>(sample())
                    })
                    .await
            }));
        }
        for task in tasks {
            assert_eq!(*task.await.unwrap().unwrap(), sample());
        }
        assert_eq!(queries.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_count_is_kept_for_its_ttl_and_a_failure_is_not_kept() {
        let cache = StatusCounts::default();
        let first = cache.get(|| async { Ok::<_, ()>(sample()) }).await.unwrap();
        let again = cache.get(|| async { Ok::<_, ()>(vec![]) }).await.unwrap();
        assert_eq!(first, again, "within the TTL the first count answers");

        let expiring = StatusCounts::new(Duration::ZERO);
        assert!(expiring
            .get(|| async { Err::<Vec<_>, _>("down") })
            .await
            .is_err());
        let counts = expiring
            .get(|| async { Ok::<_, ()>(sample()) })
            .await
            .unwrap();
        assert_eq!(*counts, sample(), "a failure is retried at the next scrape");
        let counts = expiring
            .get(|| async { Ok::<_, ()>(vec![]) })
            .await
            .unwrap();
        assert!(counts.is_empty(), "an expired count is taken again");
    }
}
