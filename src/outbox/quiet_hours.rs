//! Quiet hours (`QUIET_HOURS`): no reminders or notifications inside a daily window in the
//! patient's time zone. A message that falls inside waits for the window's end.

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
}
