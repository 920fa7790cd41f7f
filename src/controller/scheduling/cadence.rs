//! A schedule's cadence: a cron expression on the wall clock of a time
//! zone, or a fixed interval; and the slots it gives.
//!
//! # Cron in a time zone
//!
//! A cron expression (5 fields, or `@daily` & co.) is matched against the
//! wall clock of its IANA time zone (UTC when none). The set of run instants
//! is: every wall-clock time the expression matches, turned into an instant
//! of that zone —
//!
//! * a wall-clock time that does not exist (skipped by a spring-forward
//!   change, e.g. 02:30 in Europe/Berlin on the last Sunday of March) runs at
//!   the first instant after the gap (03:00 CEST), once, however many
//!   matches fell into the gap;
//! * a wall-clock time that happens twice (fall-back, e.g. 02:30 on the last
//!   Sunday of October) runs once, at its first occurrence (02:30 CEST).
//!
//! So `0 2 * * *` in Europe/Berlin runs exactly once every day, including
//! both change days, and the mapping from wall-clock matches to instants is
//! monotone, which keeps "next run after t" and "latest run at or before t"
//! exact and cheap.
//!
//! # Intervals
//!
//! An interval (`12h`, `1d`) runs at `anchor + k × interval` for k ≥ 1, the
//! anchor being the schedule's creation time: nothing runs at creation, the
//! first run is one interval later (as with a cron schedule, the first run
//! is the first slot after creation). Intervals shorter than a minute are
//! refused (run names have minute resolution).
//!

use chrono::{Datelike, NaiveDate, Timelike};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use jiff::civil::DateTime;
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::Timestamp;
use std::time::Duration;

use super::PlanError;
use crate::api::parse_span;

/// The shortest interval accepted.
pub const MIN_INTERVAL: Duration = Duration::from_secs(60);

/// When a schedule's runs happen.
#[derive(Debug, Clone)]
pub enum Cadence {
    /// A cron expression on the wall clock of a time zone.
    Cron { cron: Box<Cron>, tz: TimeZone },
    /// Every `every_secs` seconds from `anchor` (exclusive).
    Interval { every_secs: i64, anchor: Timestamp },
}

/// How far wall-clock matches can lie after `now`'s own wall-clock time and
/// still map to an instant at or before `now` (the longest fall-back fold
/// any zone has had is well under this).
const FOLD_LOOKAHEAD_SECS: i64 = 3 * 3600;

impl Cadence {
    /// A cron cadence: `expr` (5 fields or an `@` macro) in `time_zone`
    /// (UTC when `None`).
    pub fn cron(expr: &str, time_zone: Option<&str>) -> Result<Self, PlanError> {
        let tz = match time_zone {
            None => TimeZone::UTC,
            Some(name) => {
                TimeZone::get(name).map_err(|_| PlanError::UnknownTimeZone(name.to_string()))?
            }
        };
        let parser = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build();
        let cron = parser
            .parse(expr.trim())
            .map_err(|e| PlanError::InvalidCron {
                expr: expr.to_string(),
                detail: e.to_string(),
            })?;
        let c = Cadence::Cron {
            cron: Box::new(cron),
            tz,
        };
        // An expression such as `0 0 31 2 *` parses but never matches.
        if c.next_after(Timestamp::UNIX_EPOCH).is_none() {
            return Err(PlanError::NeverRuns(expr.to_string()));
        }
        Ok(c)
    }

    /// An interval cadence: `text` (`12h`, `1d`) from `anchor`.
    pub fn interval(text: &str, anchor: Timestamp) -> Result<Self, PlanError> {
        let every = parse_span(text).map_err(|_| PlanError::InvalidInterval(text.to_string()))?;
        if every < MIN_INTERVAL {
            return Err(PlanError::IntervalTooShort(text.to_string()));
        }
        let every_secs =
            i64::try_from(every.as_secs()).map_err(|_| PlanError::InvalidInterval(text.into()))?;
        Ok(Cadence::Interval { every_secs, anchor })
    }

    /// The first run strictly after `t` (`None`: never again).
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        match self {
            Cadence::Interval { every_secs, anchor } => {
                let since = t.as_second() - anchor.as_second();
                let k = if since < 0 { 1 } else { since / every_secs + 1 };
                Timestamp::from_second(
                    anchor
                        .as_second()
                        .checked_add(k.checked_mul(*every_secs)?)?,
                )
                .ok()
            }
            Cadence::Cron { cron, tz } => {
                let mut from = to_naive(t.to_zoned(tz.clone()).datetime())?;
                // Matches whose instant is not after `t` can follow `t`'s
                // wall-clock time only inside a fold: bounded loop.
                for _ in 0..10_000 {
                    let n = cron.find_next_occurrence(&from, false).ok()?;
                    let at = resolve(tz, from_naive(&n)?)?;
                    if at > t {
                        return Some(at);
                    }
                    from = n;
                }
                None
            }
        }
    }

    /// The latest run at or before `t` (`None`: none ever).
    pub fn latest_at_or_before(&self, t: Timestamp) -> Option<Timestamp> {
        match self {
            Cadence::Interval { every_secs, anchor } => {
                let since = t.as_second() - anchor.as_second();
                if since < *every_secs {
                    return None;
                }
                let k = since / every_secs;
                Timestamp::from_second(anchor.as_second() + k * every_secs).ok()
            }
            Cadence::Cron { cron, tz } => {
                let local = t.to_zoned(tz.clone()).datetime();
                let ahead = local
                    .checked_add(jiff::SignedDuration::from_secs(FOLD_LOOKAHEAD_SECS))
                    .ok()?;
                let mut from = to_naive(ahead)?;
                let mut inclusive = true;
                // Walk matches backwards from a little past `t`'s wall
                // clock; instants are monotone in wall-clock time, so the
                // first one at or before `t` is the latest.
                for _ in 0..10_000 {
                    let n = cron.find_previous_occurrence(&from, inclusive).ok()?;
                    let at = resolve(tz, from_naive(&n)?)?;
                    if at <= t {
                        return Some(at);
                    }
                    from = n;
                    inclusive = false;
                }
                None
            }
        }
    }
}

/// A wall-clock time as croner wants it (a UTC `DateTime` whose fields are
/// the wall clock: croner only looks at the naive fields).
fn to_naive(dt: DateTime) -> Option<chrono::DateTime<chrono::Utc>> {
    let date = NaiveDate::from_ymd_opt(
        i32::from(dt.year()),
        u32::try_from(dt.month()).ok()?,
        u32::try_from(dt.day()).ok()?,
    )?;
    let naive = date.and_hms_opt(
        u32::try_from(dt.hour()).ok()?,
        u32::try_from(dt.minute()).ok()?,
        u32::try_from(dt.second()).ok()?,
    )?;
    Some(naive.and_utc())
}

fn from_naive(n: &chrono::DateTime<chrono::Utc>) -> Option<DateTime> {
    let n = n.naive_utc();
    DateTime::new(
        i16::try_from(n.year()).ok()?,
        i8::try_from(n.month()).ok()?,
        i8::try_from(n.day()).ok()?,
        i8::try_from(n.hour()).ok()?,
        i8::try_from(n.minute()).ok()?,
        i8::try_from(n.second()).ok()?,
        0,
    )
    .ok()
}

/// The instant of a wall-clock time in `tz`: a time in a gap maps to the end
/// of the gap (the transition), a time in a fold to its first occurrence.
fn resolve(tz: &TimeZone, dt: DateTime) -> Option<Timestamp> {
    match tz.to_ambiguous_timestamp(dt).offset() {
        AmbiguousOffset::Unambiguous { offset } => offset.to_timestamp(dt).ok(),
        AmbiguousOffset::Fold { before, .. } => before.to_timestamp(dt).ok(),
        AmbiguousOffset::Gap { after, .. } => {
            // `dt` read with the later offset lies before the transition.
            let before_gap = after.to_timestamp(dt).ok()?;
            tz.following(before_gap).next().map(|tr| tr.timestamp())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{due, rfc3339, ts};
    use super::*;

    fn runs(c: &Cadence, from: &str, n: usize) -> Vec<String> {
        let mut t = ts(from);
        let mut out = vec![];
        for _ in 0..n {
            t = c.next_after(t).unwrap();
            out.push(rfc3339(t));
        }
        out
    }

    /// Every slot in `[from, to]` by walking forward.
    fn slots_between(c: &Cadence, from: Timestamp, to: Timestamp) -> Vec<Timestamp> {
        let mut out = vec![];
        let mut t = from
            .checked_sub(jiff::SignedDuration::from_secs(1))
            .unwrap();
        while let Some(n) = c.next_after(t) {
            if n > to {
                break;
            }
            out.push(n);
            t = n;
        }
        out
    }

    #[test]
    fn berlin_2am_runs_once_on_spring_forward_day() {
        // 2026-03-29 02:00 CET → 03:00 CEST: 02:00 does not exist.
        let c = Cadence::cron("0 2 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            runs(&c, "2026-03-27T12:00:00Z", 3),
            [
                "2026-03-28T01:00:00Z", // 02:00 CET
                "2026-03-29T01:00:00Z", // the gap's end: 03:00 CEST
                "2026-03-30T00:00:00Z", // 02:00 CEST
            ]
        );
        // A time inside the gap also runs at the gap's end, once.
        let c = Cadence::cron("30 2 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            runs(&c, "2026-03-28T12:00:00Z", 2),
            ["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]
        );
    }

    #[test]
    fn berlin_2am_runs_once_on_fall_back_day() {
        // 2026-10-25 03:00 CEST → 02:00 CET: 02:00–02:59 happen twice.
        let c = Cadence::cron("0 2 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            runs(&c, "2026-10-23T12:00:00Z", 3),
            [
                "2026-10-24T00:00:00Z", // 02:00 CEST
                "2026-10-25T00:00:00Z", // the first 02:00 (CEST) only
                "2026-10-26T01:00:00Z", // 02:00 CET
            ]
        );
    }

    #[test]
    fn half_hourly_across_fall_back_never_repeats_or_goes_backwards() {
        let c = Cadence::cron("*/30 * * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            runs(&c, "2026-10-24T22:45:00Z", 6),
            [
                "2026-10-24T23:00:00Z",
                "2026-10-24T23:30:00Z",
                "2026-10-25T00:00:00Z", // 02:00 CEST
                "2026-10-25T00:30:00Z", // 02:30 CEST
                // the repeated 02:00 and 02:30 (CET) run once, above
                "2026-10-25T02:00:00Z", // 03:00 CET
                "2026-10-25T02:30:00Z",
            ]
        );
    }

    #[test]
    fn latest_slot_agrees_with_forward_walk_across_both_changes() {
        for (expr, day) in [
            ("0 2 * * *", "2026-03-29"),
            ("30 2 * * *", "2026-03-29"),
            ("*/20 * * * *", "2026-03-29"),
            ("0 2 * * *", "2026-10-25"),
            ("*/20 * * * *", "2026-10-25"),
            ("15 * * * *", "2026-10-25"),
        ] {
            let c = Cadence::cron(expr, Some("Europe/Berlin")).unwrap();
            let start = ts(&format!("{day}T00:00:00Z"))
                .checked_sub(jiff::SignedDuration::from_hours(30))
                .unwrap();
            let end = ts(&format!("{day}T00:00:00Z"))
                .checked_add(jiff::SignedDuration::from_hours(30))
                .unwrap();
            let early = start
                .checked_sub(jiff::SignedDuration::from_hours(48))
                .unwrap();
            let all = slots_between(&c, early, end);
            assert!(all.windows(2).all(|w| w[0] < w[1]), "{expr}: {all:?}");
            let mut t = start
                .checked_add(jiff::SignedDuration::from_hours(6))
                .unwrap();
            while t < end {
                let want = all.iter().rev().find(|s| **s <= t).copied();
                assert_eq!(c.latest_at_or_before(t), want, "{expr} at {t}");
                t = t.checked_add(jiff::SignedDuration::from_mins(7)).unwrap();
            }
        }
    }

    #[test]
    fn utc_is_the_default_zone_and_macros_work() {
        let c = Cadence::cron("@daily", None).unwrap();
        assert_eq!(
            runs(&c, "2026-03-28T23:59:59Z", 2),
            ["2026-03-29T00:00:00Z", "2026-03-30T00:00:00Z"]
        );
        let c = Cadence::cron("0 9 * * 1-5", None).unwrap();
        // 2026-03-27 is a Friday: the next weekday run is Monday.
        assert_eq!(
            runs(&c, "2026-03-27T10:00:00Z", 1),
            ["2026-03-30T09:00:00Z"]
        );
    }

    #[test]
    fn bad_schedules_are_refused_with_a_reason() {
        let e = Cadence::cron("0 2 * * *", Some("Europe/Nowhere")).unwrap_err();
        assert_eq!(e.reason(), "UnknownTimeZone");
        assert!(e.to_string().contains("Europe/Nowhere"));
        let e = Cadence::cron("61 2 * * *", None).unwrap_err();
        assert_eq!(e.reason(), "InvalidSchedule");
        let e = Cadence::cron("0 0 2 * * *", None).unwrap_err();
        assert_eq!(e.reason(), "InvalidSchedule", "6 fields: {e}");
        let e = Cadence::cron("0 0 31 2 *", None).unwrap_err();
        assert_eq!(e.reason(), "InvalidSchedule", "never matches: {e}");
        let anchor = ts("2026-01-01T00:00:00Z");
        assert_eq!(
            Cadence::interval("30s", anchor).unwrap_err().reason(),
            "InvalidInterval"
        );
        assert_eq!(
            Cadence::interval("1x", anchor).unwrap_err().reason(),
            "InvalidInterval"
        );
    }

    #[test]
    fn interval_runs_from_creation() {
        let created = ts("2026-05-01T10:00:07Z");
        let c = Cadence::interval("12h", created).unwrap();
        assert_eq!(
            runs(&c, "2026-05-01T10:00:07Z", 3),
            [
                "2026-05-01T22:00:07Z",
                "2026-05-02T10:00:07Z",
                "2026-05-02T22:00:07Z"
            ]
        );
        assert_eq!(c.latest_at_or_before(ts("2026-05-01T22:00:06Z")), None);
        assert_eq!(
            c.latest_at_or_before(ts("2026-05-02T09:00:00Z")),
            Some(ts("2026-05-01T22:00:07Z"))
        );
        // Nothing at creation; the first run one interval later.
        let d = due(&c, false, None, created, created);
        assert_eq!(d.run, None);
        assert_eq!(d.next, Some(ts("2026-05-01T22:00:07Z")));
        let d = due(&c, false, None, created, ts("2026-05-01T22:00:07Z"));
        assert_eq!(d.run, Some(ts("2026-05-01T22:00:07Z")));
        assert!(!d.skipped_missed);
    }
}
