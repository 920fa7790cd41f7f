//! Pure scheduling logic, shared by the SnapshotSchedule controller and the
//! Branch refresh: when runs are due, what a run's object is called, and
//! which of a schedule's snapshots retention deletes. No I/O; "now" is
//! always passed in (the operator's [`crate::controller::schedule::Clock`]).
//!
//! Where things are:
//! * `cadence`: reading a cron expression (in a time zone) or an interval,
//!   and the slots it gives: the next after a time, the latest at or
//!   before one (daylight-saving changes included);
//! * this file: which slot is due now ([`due`]), and the times of a plan;
//! * `names`: the deterministic names of the objects runs create;
//! * `retention`: which snapshots retention deletes ([`prune`]).
//!
//! # Missed runs
//!
//! [`due`] returns at most one run: the most recent slot after the last
//! run (or after creation) that is not in the future. Slots missed while the
//! operator was down (or the schedule suspended) collapse into that one
//! catch-up run; there is never a burst.

mod cadence;
mod names;
mod retention;

use std::time::Duration;

use jiff::Timestamp;

pub use cadence::{Cadence, MIN_INTERVAL};
pub use names::{label_value, run_name, run_name_max, run_name_with, shorten};
pub use retention::{prune, OwnedSnapshot, RetentionPolicy};

/// Why a schedule cannot be planned. Each maps to a `Stalled` reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("schedule {expr:?} is not a valid 5-field cron expression: {detail}")]
    InvalidCron { expr: String, detail: String },
    #[error(
        "time zone {0:?} is not a known IANA time zone (such as Europe/Berlin or America/New_York)"
    )]
    UnknownTimeZone(String),
    #[error("interval {0:?} is not valid: use a number and one unit s, m, h, d or w (such as 12h or 1d)")]
    InvalidInterval(String),
    #[error("interval {0:?} is shorter than the shortest allowed, 1m")]
    IntervalTooShort(String),
    #[error("schedule {0:?} never matches a time")]
    NeverRuns(String),
    #[error(
        "{field} {value:?} is not a span: use a number and one unit s, m, h, d or w (such as 4w)"
    )]
    InvalidSpan { field: &'static str, value: String },
}

impl PlanError {
    /// The CamelCase reason reported in a `Stalled` condition.
    pub fn reason(&self) -> &'static str {
        match self {
            PlanError::InvalidCron { .. } | PlanError::NeverRuns(_) => "InvalidSchedule",
            PlanError::UnknownTimeZone(_) => "UnknownTimeZone",
            PlanError::InvalidInterval(_) | PlanError::IntervalTooShort(_) => "InvalidInterval",
            PlanError::InvalidSpan { .. } => "InvalidSpan",
        }
    }
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The slot to run now, if any: the most recent one not yet run.
    pub run: Option<Timestamp>,
    /// Whether earlier slots were skipped in favour of `run` (downtime).
    pub skipped_missed: bool,
    /// The next slot after now.
    pub next: Option<Timestamp>,
}

/// Which run (if any) is due at `now`, given the last run's slot
/// (`last_run`, absent before the first) and the schedule's creation time.
/// At most one run: the latest slot in `(max(last_run, created), now]`.
/// Suspended: nothing runs and there is no next run; once resumed, slots
/// missed meanwhile make (at most) one catch-up run like downtime does.
pub fn due(
    cadence: &Cadence,
    suspended: bool,
    last_run: Option<Timestamp>,
    created: Timestamp,
    now: Timestamp,
) -> Due {
    if suspended {
        return Due {
            run: None,
            skipped_missed: false,
            next: None,
        };
    }
    let base = last_run.map_or(created, |l| l.max(created));
    let run = cadence.latest_at_or_before(now).filter(|s| *s > base);
    let skipped_missed =
        run.is_some_and(|r| cadence.next_after(base).is_some_and(|first| first < r));
    Due {
        run,
        skipped_missed,
        next: cadence.next_after(now),
    }
}

/// How long from `now` until `at` (zero when `at` is not in the future).
pub fn until(now: Timestamp, at: Timestamp) -> Duration {
    let secs = at.as_second() - now.as_second();
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// `at` moved `by` later (saturating).
pub fn after(at: Timestamp, by: Duration) -> Timestamp {
    let secs = i64::try_from(by.as_secs()).unwrap_or(i64::MAX);
    Timestamp::from_second(at.as_second().saturating_add(secs)).unwrap_or(Timestamp::MAX)
}

/// RFC 3339 in UTC, second precision (`2026-03-29T01:00:00Z`), as the
/// schedules write their status times ([`crate::point::read_time`] reads
/// them back).
pub fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downtime_makes_exactly_one_catch_up_run() {
        let created = ts("2026-02-20T08:00:00Z");
        let c = Cadence::cron("0 2 * * *", None).unwrap();
        let last = Some(ts("2026-03-01T02:00:00Z"));
        // Down from March 1 to March 5 13:00: four slots missed.
        let now = ts("2026-03-05T13:00:00Z");
        let d = due(&c, false, last, created, now);
        assert_eq!(d.run, Some(ts("2026-03-05T02:00:00Z")), "the latest only");
        assert!(d.skipped_missed);
        assert_eq!(d.next, Some(ts("2026-03-06T02:00:00Z")));
        // After that run, nothing more is due until the next slot.
        let d = due(&c, false, d.run, created, now);
        assert_eq!(d.run, None);
        let d = due(
            &c,
            false,
            Some(ts("2026-03-05T02:00:00Z")),
            created,
            ts("2026-03-06T02:00:00Z"),
        );
        assert_eq!(d.run, Some(ts("2026-03-06T02:00:00Z")));
        assert!(!d.skipped_missed);
    }

    #[test]
    fn a_new_schedule_waits_for_its_first_slot() {
        let c = Cadence::cron("0 2 * * *", None).unwrap();
        let created = ts("2026-03-05T10:00:00Z");
        let d = due(&c, false, None, created, ts("2026-03-05T10:00:01Z"));
        assert_eq!(d.run, None, "02:00 today was before the schedule existed");
        assert_eq!(d.next, Some(ts("2026-03-06T02:00:00Z")));
    }

    #[test]
    fn suspend_stops_runs_and_resuming_catches_up_once() {
        let c = Cadence::cron("0 * * * *", None).unwrap();
        let created = ts("2026-03-05T00:30:00Z");
        let last = Some(ts("2026-03-05T05:00:00Z"));
        let now = ts("2026-03-05T09:10:00Z");
        let d = due(&c, true, last, created, now);
        assert_eq!(
            d,
            Due {
                run: None,
                skipped_missed: false,
                next: None
            }
        );
        let d = due(&c, false, last, created, now);
        assert_eq!(d.run, Some(ts("2026-03-05T09:00:00Z")));
        assert!(d.skipped_missed);
    }
    #[test]
    fn times_round_trip() {
        let t = ts("2026-03-29T01:00:00Z");
        assert_eq!(crate::point::read_time(&rfc3339(t)), Some(t));
        assert_eq!(
            until(t, after(t, Duration::from_secs(90))),
            Duration::from_secs(90)
        );
        assert_eq!(until(after(t, Duration::from_secs(90)), t), Duration::ZERO);
    }
}
