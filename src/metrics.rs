//! Counters for `/metrics` (Prometheus text format). In-process counters count what this
//! instance did since it started; message totals by status come from the database at scrape
//! time, so they agree across instances.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    dispatch: [AtomicU64; DISPATCH_OUTCOMES.len()],
    otp_sent: AtomicU64,
    otp_refused: AtomicU64,
    otp_verified: AtomicU64,
    otp_rejected: AtomicU64,
    webhooks_accepted: AtomicU64,
    webhooks_forbidden: AtomicU64,
}

const DISPATCH_OUTCOMES: [&str; 9] = [
    "claimed", "sent", "skipped", "failed", "retried", "deferred", "adopted", "released", "lost",
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
