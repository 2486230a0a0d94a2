//! Refusals remembered. A send-otp the limits refused stays refused until its wait is over
//! (only time lifts a limit: sends only add to the counts), so the same request asked again
//! within that wait (an app's retry loop, a resend button held down, a bot) is answered from
//! memory: no number validation, no read of the limits. Every other request is decided by the
//! store as before, and a request answered from here gets the answer the store would give.
//!
//! The key is the request as the client sent it, with the client's rate-limit key: the answer
//! to a request depends only on those and on settings fixed for the process, so a request whose
//! key was refused passes every validation its first asking passed.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};

use super::SendOtpRequest;

/// At most this many refusals are held (a few MiB at most). A client that varies its requests
/// to fill it gains nothing: a full table only stops remembering new refusals until old ones
/// run out, and every request it does not hold is decided by the store.
const CAPACITY: usize = 16_384;

/// A full table looks for refusals that ran out at most this often, so filling it cannot make
/// every refusal scan it.
const PURGE_INTERVAL: Duration = Duration::seconds(1);

/// The fields a send-otp request is decided on, as sent, and the client's rate-limit key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RefusalKey {
    user_id: String,
    phone_number: String,
    purpose: String,
    channel: Option<String>,
    client: Option<String>,
}

impl RefusalKey {
    pub fn new(request: &SendOtpRequest, client: Option<&str>) -> RefusalKey {
        RefusalKey {
            user_id: request.user_id.clone(),
            phone_number: request.phone_number.clone(),
            purpose: request.purpose.clone(),
            channel: request.channel.clone(),
            client: client.map(str::to_string),
        }
    }

    /// The number as sent, for a masked log line.
    pub fn phone_number(&self) -> &str {
        &self.phone_number
    }

    pub fn purpose(&self) -> &str {
        &self.purpose
    }
}

#[derive(Default)]
struct Held {
    until: HashMap<RefusalKey, DateTime<Utc>>,
    last_purge: Option<DateTime<Utc>>,
}

/// Refusals of this process, each until the time its limit lifts.
#[derive(Default)]
pub struct RecentRefusals {
    held: Mutex<Held>,
}

impl RecentRefusals {
    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        // Nothing held is left half-written by a panic: every change is one map operation.
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Seconds until `key`'s limit lifts (at least 1), when it was refused and has not yet.
    pub fn wait_seconds(&self, key: &RefusalKey, now: DateTime<Utc>) -> Option<i64> {
        let until = *self.held().until.get(key)?;
        (until > now).then(|| (until - now).num_seconds().max(1))
    }

    /// `key` was refused at `now` for `wait_seconds`: the store would refuse it until then.
    pub fn remember(&self, key: RefusalKey, now: DateTime<Utc>, wait_seconds: i64) {
        let until = now + Duration::seconds(wait_seconds);
        let mut held = self.held();
        if held.until.len() >= CAPACITY && !held.until.contains_key(&key) {
            let due = held
                .last_purge
                .is_none_or(|last| now - last >= PURGE_INTERVAL || now < last);
            if !due {
                return;
            }
            held.last_purge = Some(now);
            held.until.retain(|_, until| *until > now);
            if held.until.len() >= CAPACITY {
                return;
            }
        }
        let entry = held.until.entry(key).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// How many refusals are held, for tests.
    pub fn len(&self) -> usize {
        self.held().until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(user: &str) -> RefusalKey {
        RefusalKey {
            user_id: user.into(),
            phone_number: "+447700900123".into(),
            purpose: "login".into(),
            channel: None,
            client: Some("198.18.0.1".into()),
        }
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + Duration::seconds(1_800_000_000 + seconds)
    }

    #[test]
    fn a_refusal_holds_until_its_wait_is_over_and_no_longer() {
        let refusals = RecentRefusals::default();
        refusals.remember(key("u1"), at(0), 30);
        assert_eq!(refusals.wait_seconds(&key("u1"), at(0)), Some(30));
        assert_eq!(refusals.wait_seconds(&key("u1"), at(29)), Some(1));
        assert_eq!(refusals.wait_seconds(&key("u1"), at(30)), None);
        // Any field that differs is another request, decided by the store.
        assert_eq!(refusals.wait_seconds(&key("u2"), at(0)), None);
        let mut other_client = key("u1");
        other_client.client = None;
        assert_eq!(refusals.wait_seconds(&other_client, at(0)), None);
    }

    #[test]
    fn a_shorter_refusal_does_not_cut_a_longer_one_short() {
        let refusals = RecentRefusals::default();
        refusals.remember(key("u1"), at(0), 3_600);
        refusals.remember(key("u1"), at(10), 5);
        assert_eq!(refusals.wait_seconds(&key("u1"), at(20)), Some(3_580));
    }

    #[test]
    fn a_full_table_makes_room_from_refusals_that_ran_out_and_otherwise_holds_no_more() {
        let refusals = RecentRefusals::default();
        for i in 0..CAPACITY {
            refusals.remember(key(&format!("u{i}")), at(0), 10 + (i % 2) as i64 * 100);
        }
        assert_eq!(refusals.len(), CAPACITY);
        // None has run out: the new refusal is not held, and the old ones stay.
        refusals.remember(key("new"), at(5), 60);
        assert_eq!(refusals.wait_seconds(&key("new"), at(5)), None);
        assert_eq!(refusals.len(), CAPACITY);
        // Within the purge interval nothing is scanned, even with refusals run out.
        refusals.remember(key("new"), at(5) + Duration::milliseconds(500), 60);
        assert_eq!(refusals.len(), CAPACITY);
        // Later, the half that ran out makes room.
        refusals.remember(key("new"), at(20), 60);
        assert_eq!(refusals.len(), CAPACITY / 2 + 1);
        assert_eq!(refusals.wait_seconds(&key("new"), at(20)), Some(60));
        assert_eq!(refusals.wait_seconds(&key("u1"), at(20)), Some(90));
    }
}
