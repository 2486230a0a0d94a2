//! Quiet hours (`QUIET_HOURS`): no scheduled messages (reminders) or marketing inside a daily
//! window in the message's time zone (the item's, else the patient's, else `DEFAULT_TIME_ZONE`).
//! A message that falls inside waits for the window's end, in local wall-clock time: across a
//! daylight saving change the night is an hour shorter or longer.

use chrono::{DateTime, Duration, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

use crate::config::QuietHours;

/// When `now` is inside the quiet window (in `tz`), the moment the window ends; else `None`.
pub fn quiet_until(now: DateTime<Utc>, tz: Tz, quiet: QuietHours) -> Option<DateTime<Utc>> {
    let local = now.with_timezone(&tz).naive_local();
    let time = local.time();
    let today = local.date();
    let end_date = if quiet.start <= quiet.end {
        // Within one day, e.g. 13:00-14:00.
        (time >= quiet.start && time < quiet.end).then_some(today)?
    } else if time >= quiet.start {
        // Wraps past midnight, e.g. 21:00-08:00: evening part, ends tomorrow.
        today.succ_opt()?
    } else if time < quiet.end {
        // Morning part, ends today.
        today
    } else {
        return None;
    };
    Some(to_utc(tz, end_date.and_time(quiet.end)))
}

/// A local time as UTC. A time that does not exist (skipped by a DST change) moves an hour on;
/// an ambiguous one takes the earlier instant.
fn to_utc(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    match tz.from_local_datetime(&local).earliest() {
        Some(t) => t.with_timezone(&Utc),
        None => tz
            .from_local_datetime(&(local + Duration::hours(1)))
            .earliest()
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(|| Utc.from_utc_datetime(&local)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveTime;

    fn quiet(start: &str, end: &str) -> QuietHours {
        QuietHours {
            start: NaiveTime::parse_from_str(start, "%H:%M").unwrap(),
            end: NaiveTime::parse_from_str(end, "%H:%M").unwrap(),
        }
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_window_past_midnight() {
        let q = quiet("21:00", "08:00");
        let tz = chrono_tz::UTC;
        assert_eq!(
            quiet_until(utc("2027-01-12T22:30:00Z"), tz, q),
            Some(utc("2027-01-13T08:00:00Z"))
        );
        assert_eq!(
            quiet_until(utc("2027-01-12T07:59:00Z"), tz, q),
            Some(utc("2027-01-12T08:00:00Z"))
        );
        assert_eq!(quiet_until(utc("2027-01-12T08:00:00Z"), tz, q), None);
        assert_eq!(quiet_until(utc("2027-01-12T20:59:00Z"), tz, q), None);
    }

    #[test]
    fn a_window_within_a_day() {
        let q = quiet("13:00", "14:00");
        assert_eq!(
            quiet_until(utc("2027-01-12T13:30:00Z"), chrono_tz::UTC, q),
            Some(utc("2027-01-12T14:00:00Z"))
        );
        assert_eq!(
            quiet_until(utc("2027-01-12T14:30:00Z"), chrono_tz::UTC, q),
            None
        );
    }

    #[test]
    fn in_the_patients_time_zone() {
        // 23:00 in Kolkata is 17:30 UTC; the window ends at 08:00 IST = 02:30 UTC.
        let q = quiet("21:00", "08:00");
        let tz: Tz = "Asia/Kolkata".parse().unwrap();
        assert_eq!(
            quiet_until(utc("2027-01-12T17:30:00Z"), tz, q),
            Some(utc("2027-01-13T02:30:00Z"))
        );
        assert_eq!(quiet_until(utc("2027-01-12T10:00:00Z"), tz, q), None);
    }

    #[test]
    fn across_daylight_saving_changes_the_window_keeps_local_time() {
        let q = quiet("21:00", "08:00");
        let london: Tz = "Europe/London".parse().unwrap();
        let new_york: Tz = "America/New_York".parse().unwrap();
        // London, 27-28 Mar 2027: 22:00 GMT to 08:00 BST, nine hours.
        assert_eq!(
            quiet_until(utc("2027-03-27T22:00:00Z"), london, q),
            Some(utc("2027-03-28T07:00:00Z"))
        );
        // London, 30-31 Oct 2027: 22:00 BST to 08:00 GMT, eleven hours.
        assert_eq!(
            quiet_until(utc("2027-10-30T21:00:00Z"), london, q),
            Some(utc("2027-10-31T08:00:00Z"))
        );
        // The hour after the change is still the night's: 07:30 BST is 06:30 UTC.
        assert_eq!(
            quiet_until(utc("2027-03-28T06:30:00Z"), london, q),
            Some(utc("2027-03-28T07:00:00Z"))
        );
        assert_eq!(quiet_until(utc("2027-03-28T07:00:00Z"), london, q), None);
        // 20:30 UTC on 30 Oct is 21:30 BST: inside, though 20:30 GMT would not be.
        assert!(quiet_until(utc("2027-10-30T20:30:00Z"), london, q).is_some());
        // New York, 13-14 Mar 2027: 22:00 EST (03:00 UTC) to 08:00 EDT (12:00 UTC).
        assert_eq!(
            quiet_until(utc("2027-03-14T03:00:00Z"), new_york, q),
            Some(utc("2027-03-14T12:00:00Z"))
        );
        // New York, 6-7 Nov 2027: 22:00 EDT (02:00 UTC) to 08:00 EST (13:00 UTC).
        assert_eq!(
            quiet_until(utc("2027-11-07T02:00:00Z"), new_york, q),
            Some(utc("2027-11-07T13:00:00Z"))
        );
    }

    #[test]
    fn a_window_ending_in_a_skipped_or_repeated_hour() {
        let new_york: Tz = "America/New_York".parse().unwrap();
        // 02:30 does not exist on 14 Mar 2027 in New York: the window ends an hour on, at 03:30
        // EDT (07:30 UTC).
        let q = quiet("01:00", "02:30");
        assert_eq!(
            quiet_until(utc("2027-03-14T06:30:00Z"), new_york, q),
            Some(utc("2027-03-14T07:30:00Z"))
        );
        // 01:30 happens twice on 7 Nov 2027: the window ends at the first (EDT, 05:30 UTC).
        let q = quiet("23:00", "01:30");
        assert_eq!(
            quiet_until(utc("2027-11-07T04:00:00Z"), new_york, q),
            Some(utc("2027-11-07T05:30:00Z"))
        );
    }
}
