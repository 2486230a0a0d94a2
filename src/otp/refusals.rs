//! Refusals remembered. A limit that refused a send holds until its time (sends only add to its
//! counts, and cleanup prunes only sends whose hour is over), so while it holds, a send it
//! applies to is refused from memory, without reading the limits again. The one other thing
//! that lifts a limit in the store, erasing an account (which starts the per-user hour again),
//! lifts nothing here: the memory is the stricter until its time.
//!
//! * **The same request** (the same fields as sent, the number trimmed as validation trims it,
//!   from the same client rate-limit key) until every limit that refused it lifts, with no
//!   validation either: an app's retry loop, a resend button held down, a bot asking over and
//!   over.
//! * **Any request naming the same number, for the same user id, or from the same client**,
//!   whichever limit of the three refused, once its input is valid: a bot that floods one
//!   number through many user ids and addresses (SMS bombing) costs the store nothing more once
//!   the number's hour is full.
//!
//! Every other send is decided by the store as before. A refusal from memory is one the store
//! would give; its wait is that of the limits remembered, so it can be shorter than the store's
//! when a limit that has not refused anything yet would refuse too (asked again then, the store
//! answers with the rest).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};

use super::SendOtpRequest;
use crate::store::{retry_after_seconds, LimitRefusal, OtpLimits};

/// At most this many refusals of each kind are held (a few MiB in all; by estimate some 15 MiB
/// at most, with every field at its longest). A client that varies its requests to fill the
/// memory gains nothing: a full table only stops remembering new refusals until old ones run
/// out, and every send it does not hold is decided by the store.
const CAPACITY: usize = 16_384;

/// A full table looks for refusals that ran out at most this often, so filling it cannot make
/// every refusal scan it.
const PURGE_INTERVAL: Duration = Duration::seconds(1);

/// The fields a send-otp request is decided on, as sent, and the client's rate-limit key. The
/// number is kept trimmed, as `PhoneNumber::parse` reads it: padding decides nothing, and a
/// number it accepts is at most 32 bytes once trimmed, so a key held (only ever for a valid
/// request) stays small however the number was padded within the body limit.
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
            phone_number: request.phone_number.trim().to_string(),
            purpose: request.purpose.clone(),
            channel: request.channel.clone(),
            client: client.map(str::to_string),
        }
    }

    /// The number as sent less surrounding whitespace, for a masked log line.
    pub fn phone_number(&self) -> &str {
        &self.phone_number
    }

    pub fn purpose(&self) -> &str {
        &self.purpose
    }
}

/// What one limit applies to: the number named (E.164), the user id, the client's key.
#[derive(Debug, Clone, Copy)]
pub struct LimitKeys<'a> {
    pub number: &'a str,
    pub user_id: &'a str,
    pub client: Option<&'a str>,
}

impl<'a> From<&OtpLimits<'a>> for LimitKeys<'a> {
    fn from(limits: &OtpLimits<'a>) -> Self {
        LimitKeys {
            number: limits.phone_number,
            user_id: limits.user_id,
            client: limits.ip,
        }
    }
}

/// Keys, each held until a time.
struct Holds<K> {
    until: HashMap<K, DateTime<Utc>>,
    last_purge: Option<DateTime<Utc>>,
}

impl<K> Default for Holds<K> {
    fn default() -> Self {
        Holds {
            until: HashMap::new(),
            last_purge: None,
        }
    }
}

impl<K: Hash + Eq> Holds<K> {
    fn get<Q>(&self, key: &Q, now: DateTime<Utc>) -> Option<DateTime<Utc>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.until.get(key).copied().filter(|until| *until > now)
    }

    fn hold(&mut self, key: K, until: DateTime<Utc>, now: DateTime<Utc>) {
        if until <= now {
            return;
        }
        if self.until.len() >= CAPACITY && !self.until.contains_key(&key) {
            let due = self
                .last_purge
                .is_none_or(|last| now - last >= PURGE_INTERVAL || now < last);
            if !due {
                return;
            }
            self.last_purge = Some(now);
            self.until.retain(|_, until| *until > now);
            if self.until.len() >= CAPACITY {
                return;
            }
        }
        let held = self.until.entry(key).or_insert(until);
        *held = (*held).max(until);
    }
}

#[derive(Default)]
struct Held {
    requests: Holds<RefusalKey>,
    numbers: Holds<String>,
    users: Holds<String>,
    clients: Holds<String>,
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

    /// Seconds until the limits that refused this very request lift, while they hold.
    pub fn request_wait(&self, key: &RefusalKey, now: DateTime<Utc>) -> Option<i64> {
        let until = self.held().requests.get(key, now)?;
        Some(retry_after_seconds(until, now))
    }

    /// Seconds until the limits remembered for this number, user id and client lift, while
    /// any of them holds.
    pub fn limits_wait(&self, keys: LimitKeys<'_>, now: DateTime<Utc>) -> Option<i64> {
        let held = self.held();
        let client = keys.client.and_then(|c| held.clients.get(c, now));
        let until = held
            .numbers
            .get(keys.number, now)
            .max(held.users.get(keys.user_id, now))
            .max(client)?;
        Some(retry_after_seconds(until, now))
    }

    /// `refusal` refused the request `key` (naming `keys`) at `now`.
    pub fn remember(
        &self,
        key: RefusalKey,
        keys: LimitKeys<'_>,
        refusal: &LimitRefusal,
        now: DateTime<Utc>,
    ) {
        let mut held = self.held();
        // Until the last of them lifts, to the instant: `retry_after_seconds` is rounded.
        if let Some(until) = refusal.lifts() {
            held.requests.hold(key, until, now);
        }
        if let Some(until) = refusal.number_until {
            held.numbers.hold(keys.number.to_string(), until, now);
        }
        if let Some(until) = refusal.user_until {
            held.users.hold(keys.user_id.to_string(), until, now);
        }
        if let (Some(client), Some(until)) = (keys.client, refusal.address_until) {
            held.clients.hold(client.to_string(), until, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(user: &str) -> RefusalKey {
        RefusalKey {
            user_id: user.into(),
            phone_number: "+44 7700 900123".into(),
            purpose: "login".into(),
            channel: None,
            client: Some("198.18.0.1".into()),
        }
    }

    fn keys(user: &str) -> LimitKeys<'_> {
        LimitKeys {
            number: "+447700900123",
            user_id: user,
            client: Some("198.18.0.1"),
        }
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + Duration::seconds(1_800_000_000 + seconds)
    }

    fn refusal(
        now: i64,
        number: Option<i64>,
        user: Option<i64>,
        client: Option<i64>,
    ) -> LimitRefusal {
        LimitRefusal::new(at(now), number.map(at), user.map(at), client.map(at))
    }

    #[test]
    fn a_refused_request_is_held_until_the_last_of_its_limits_lifts_and_no_longer() {
        let refusals = RecentRefusals::default();
        let held = refusal(0, Some(30), Some(10), None);
        refusals.remember(key("u1"), keys("u1"), &held, at(0));
        assert_eq!(refusals.request_wait(&key("u1"), at(0)), Some(30));
        assert_eq!(refusals.request_wait(&key("u1"), at(29)), Some(1));
        assert_eq!(refusals.request_wait(&key("u1"), at(30)), None);
        // Any field that differs is another request.
        assert_eq!(refusals.request_wait(&key("u2"), at(0)), None);
        let mut other_client = key("u1");
        other_client.client = None;
        assert_eq!(refusals.request_wait(&other_client, at(0)), None);
    }

    /// A client that waits the `Retry-After` it was given finds the limit lifted: the wait is
    /// rounded up (a cooldown with 29.9 s left said 29, and a retry after 29 s was refused).
    #[test]
    fn retry_after_is_rounded_up_to_the_second() {
        let wait = |ms: i64| retry_after_seconds(at(0) + Duration::milliseconds(ms), at(0));
        assert_eq!(wait(29_900), 30);
        assert_eq!(wait(30_000), 30);
        assert_eq!(wait(30_001), 31);
        assert_eq!(wait(3_599_999), 3_600);
        assert_eq!(wait(1), 1);
        assert_eq!(wait(0), 1);
        assert_eq!(wait(-500), 1);
    }

    #[test]
    fn a_request_is_held_to_the_instant_its_limits_lift_not_to_a_rounded_second() {
        let refusals = RecentRefusals::default();
        let lifts = at(0) + Duration::milliseconds(400);
        let held = LimitRefusal::new(at(0), Some(lifts), None, None);
        assert_eq!(held.retry_after_seconds, 1);
        refusals.remember(key("u1"), keys("u1"), &held, at(0));
        assert_eq!(refusals.request_wait(&key("u1"), at(0)), Some(1));
        assert_eq!(refusals.request_wait(&key("u1"), lifts), None);
        assert_eq!(refusals.limits_wait(keys("u1"), lifts), None);
    }

    #[test]
    fn each_limit_that_refused_holds_for_every_send_it_applies_to() {
        let refusals = RecentRefusals::default();
        // The number's hour and the client's refused; the user's did not.
        let held = refusal(0, Some(600), None, Some(60));
        refusals.remember(key("u1"), keys("u1"), &held, at(0));
        // Another user naming the number from another client: the number's limit.
        let elsewhere = LimitKeys {
            client: Some("198.18.0.2"),
            ..keys("u2")
        };
        assert_eq!(refusals.limits_wait(elsewhere, at(0)), Some(600));
        // Another number from the same client: the client's, while it holds.
        let other_number = LimitKeys {
            number: "+447700900124",
            ..keys("u2")
        };
        assert_eq!(refusals.limits_wait(other_number, at(0)), Some(60));
        assert_eq!(refusals.limits_wait(other_number, at(60)), None);
        // The user's own limit did not refuse: another number from another client goes.
        let fresh = LimitKeys {
            number: "+447700900124",
            user_id: "u1",
            client: None,
        };
        assert_eq!(refusals.limits_wait(fresh, at(0)), None);
    }

    #[test]
    fn a_number_padded_with_whitespace_names_the_same_small_key() {
        let request = |phone_number: String| SendOtpRequest {
            user_id: "u1".into(),
            phone_number,
            purpose: "login".into(),
            channel: None,
        };
        let plain = RefusalKey::new(&request("+1 415 555 2671".into()), Some("198.18.0.1"));
        // Within the body limit, as a flood of differently padded copies would send it.
        let padding = " ".repeat(60_000);
        let padded = request(format!("{padding}+1 415 555 2671\t\n{padding}"));
        assert!(crate::phone::PhoneNumber::parse(&padded.phone_number).is_ok());
        let padded = RefusalKey::new(&padded, Some("198.18.0.1"));
        assert_eq!(padded, plain);
        assert_eq!(padded.phone_number(), "+1 415 555 2671");
        // So one refusal holds them all.
        let refusals = RecentRefusals::default();
        let held = refusal(0, Some(30), None, None);
        refusals.remember(plain, keys("u1"), &held, at(0));
        assert_eq!(refusals.request_wait(&padded, at(0)), Some(30));
    }

    #[test]
    fn a_shorter_refusal_does_not_cut_a_longer_one_short() {
        let refusals = RecentRefusals::default();
        refusals.remember(
            key("u1"),
            keys("u1"),
            &refusal(0, None, Some(3_600), None),
            at(0),
        );
        refusals.remember(
            key("u1"),
            keys("u1"),
            &refusal(10, None, Some(15), None),
            at(10),
        );
        assert_eq!(refusals.request_wait(&key("u1"), at(20)), Some(3_580));
        assert_eq!(refusals.limits_wait(keys("u1"), at(20)), Some(3_580));
    }

    #[test]
    fn a_full_table_makes_room_from_refusals_that_ran_out_and_otherwise_holds_no_more() {
        let mut holds = Holds::<String>::default();
        for i in 0..CAPACITY {
            holds.hold(format!("u{i}"), at(10 + (i % 2) as i64 * 100), at(0));
        }
        assert_eq!(holds.until.len(), CAPACITY);
        // None has run out: the new one is not held, and the old ones stay.
        holds.hold("new".into(), at(65), at(5));
        assert_eq!(holds.get("new", at(5)), None);
        assert_eq!(holds.until.len(), CAPACITY);
        // Within the purge interval nothing is scanned, even with refusals run out.
        holds.hold("new".into(), at(65), at(5) + Duration::milliseconds(500));
        assert_eq!(holds.until.len(), CAPACITY);
        assert_eq!(holds.get("new", at(20)), None);
        // Later, the half that ran out makes room.
        holds.hold("new".into(), at(80), at(20));
        assert_eq!(holds.until.len(), CAPACITY / 2 + 1);
        assert_eq!(holds.get("new", at(20)), Some(at(80)));
        assert_eq!(holds.get("u1", at(20)), Some(at(110)));
    }
}
