//! Pure schedule logic: when runs are due, what a run's object is called,
//! and which of a schedule's snapshots retention deletes. No I/O; "now" is
//! always passed in (see [`super::clock`]).
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
//! # Missed runs
//!
//! [`due`] returns at most one run: the most recent slot after the last
//! run (or after creation) that is not in the future. Slots missed while the
//! operator was down (or the schedule suspended) collapse into that one
//! catch-up run; there is never a burst.
//!
//! # Retention ([`prune`])
//!
//! * Snapshots labelled `pgbranch.dev/keep: "true"`, and those already being
//!   deleted, are outside retention: never deleted, never counted.
//! * `maxCount` counts **ready** snapshots only: the newest `maxCount` ready
//!   ones stay, older ready ones go. A snapshot that is not ready yet (a run
//!   in progress, or one that failed) takes no place in the count, so a
//!   pending newest run can never push out the last ready one. Not-ready
//!   snapshots older than the oldest ready one kept are failed runs nobody
//!   can use any more: they go too.
//! * `maxAge` deletes every snapshot whose run is older than `now − maxAge`,
//!   ready or not — except the newest ready snapshot, which retention never
//!   deletes: a schedule whose runs stopped succeeding (or that is
//!   suspended) keeps its last good backup rather than none.

use std::cmp::Reverse;
use std::time::Duration;

use chrono::{Datelike, NaiveDate, Timelike};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use jiff::civil::DateTime;
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::Timestamp;

use crate::api::{parse_span, MAX_DNS_LABEL_LEN};

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

/// RFC 3339 in UTC, second precision (`2026-03-29T01:00:00Z`).
pub fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Reads an RFC 3339 time written by [`rfc3339`] (or any RFC 3339 time).
pub fn parse_time(text: &str) -> Option<Timestamp> {
    text.parse().ok()
}

/// A stable 32-bit FNV-1a hash, for shortened names (the same in every
/// build, unlike `std`'s hasher).
fn fnv1a(text: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// `name` shortened to at most `max` characters: unchanged when it fits,
/// else a prefix and 8 hex digits of a hash of the whole name (two long
/// names sharing a prefix stay distinct). Never ends in `-` or `.`.
pub fn shorten(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_string();
    }
    let hash = format!("{:08x}", fnv1a(name));
    let keep = max.saturating_sub(hash.len() + 1);
    let mut end = keep.min(name.len());
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let prefix = name[..end].trim_end_matches(['-', '.']);
    if prefix.is_empty() {
        hash
    } else {
        format!("{prefix}-{hash}")
    }
}

/// The name of the object a run creates: `<owner>-<yyyymmddhhmm>` of the
/// run's slot in UTC (`<owner>` shortened so the name is at most 63
/// characters). The same slot always gives the same name, so a retried run
/// finds its object instead of making a second one.
pub fn run_name(owner: &str, slot: Timestamp) -> String {
    run_name_with(owner, "", slot)
}

/// [`run_name`] with an infix: `<owner><infix>-<yyyymmddhhmm>`.
pub fn run_name_with(owner: &str, infix: &str, slot: Timestamp) -> String {
    run_name_max(owner, infix, slot, MAX_DNS_LABEL_LEN)
}

/// [`run_name_with`] of at most `max` characters.
pub fn run_name_max(owner: &str, infix: &str, slot: Timestamp, max: usize) -> String {
    let stamp = slot.strftime("%Y%m%d%H%M").to_string();
    let room = max.saturating_sub(stamp.len() + 1);
    let base = shorten(&format!("{owner}{infix}"), room);
    format!("{base}-{stamp}")
}

/// A label value naming `name` (label values are at most 63 characters).
pub fn label_value(name: &str) -> String {
    shorten(name, MAX_DNS_LABEL_LEN)
}

/// Retention settings, parsed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub max_count: Option<usize>,
    pub max_age: Option<Duration>,
}

impl RetentionPolicy {
    /// From the spec's `retention`.
    pub fn from_spec(r: &crate::api::Retention) -> Result<Self, PlanError> {
        let max_age = match &r.max_age {
            Some(text) => Some(parse_span(text).map_err(|_| PlanError::InvalidSpan {
                field: "retention.maxAge",
                value: text.clone(),
            })?),
            None => None,
        };
        Ok(Self {
            // The schema requires at least 1; a smaller value keeps one.
            max_count: r.max_count.map(|n| usize::try_from(n.max(1)).unwrap_or(1)),
            max_age,
        })
    }
}

/// What retention needs to know about one of a schedule's snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedSnapshot {
    pub name: String,
    /// The slot of the run that made it.
    pub scheduled: Timestamp,
    /// `status.readyToUse`.
    pub ready: bool,
    /// Labelled `pgbranch.dev/keep: "true"`.
    pub keep: bool,
    /// Already being deleted.
    pub deleting: bool,
}

/// The names of the snapshots retention deletes now (oldest first). See the
/// module documentation for the rules.
pub fn prune(owned: &[OwnedSnapshot], policy: &RetentionPolicy, now: Timestamp) -> Vec<String> {
    let mut candidates: Vec<&OwnedSnapshot> =
        owned.iter().filter(|s| !s.keep && !s.deleting).collect();
    // Newest first; the name breaks ties so the order is total.
    candidates.sort_by_key(|s| Reverse((s.scheduled, s.name.clone())));
    let newest_ready = candidates.iter().find(|s| s.ready).map(|s| s.name.clone());
    let mut doomed: Vec<&OwnedSnapshot> = vec![];

    if let Some(max) = policy.max_count {
        let ready: Vec<&&OwnedSnapshot> = candidates.iter().filter(|s| s.ready).collect();
        if ready.len() >= max {
            // The oldest ready snapshot that stays.
            let oldest_kept = ready[max - 1].scheduled;
            for s in &candidates {
                let beyond = if s.ready {
                    ready
                        .iter()
                        .position(|r| r.name == s.name)
                        .is_some_and(|i| i >= max)
                } else {
                    s.scheduled < oldest_kept
                };
                if beyond {
                    doomed.push(s);
                }
            }
        }
    }
    if let Some(age) = policy.max_age {
        let cutoff = now
            .as_second()
            .saturating_sub(i64::try_from(age.as_secs()).unwrap_or(i64::MAX));
        for s in &candidates {
            if s.scheduled.as_second() < cutoff && !doomed.iter().any(|d| d.name == s.name) {
                doomed.push(s);
            }
        }
    }
    doomed.retain(|s| Some(&s.name) != newest_ready.as_ref());
    doomed.sort_by_key(|s| (s.scheduled, s.name.clone()));
    doomed.into_iter().map(|s| s.name.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

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

    fn snap(name: &str, at: &str, ready: bool) -> OwnedSnapshot {
        OwnedSnapshot {
            name: name.into(),
            scheduled: ts(at),
            ready,
            keep: false,
            deleting: false,
        }
    }

    fn policy(count: Option<usize>, age: Option<&str>) -> RetentionPolicy {
        RetentionPolicy {
            max_count: count,
            max_age: age.map(|a| parse_span(a).unwrap()),
        }
    }

    #[test]
    fn retention_by_count_deletes_the_oldest() {
        let owned: Vec<_> = (1..=6)
            .map(|d| snap(&format!("s{d}"), &format!("2026-03-0{d}T02:00:00Z"), true))
            .collect();
        let now = ts("2026-03-07T00:00:00Z");
        assert_eq!(prune(&owned, &policy(Some(4), None), now), ["s1", "s2"]);
        assert_eq!(
            prune(&owned, &policy(Some(6), None), now),
            Vec::<String>::new()
        );
        assert_eq!(
            prune(&owned, &policy(None, None), now),
            Vec::<String>::new(),
            "no retention keeps everything"
        );
    }

    #[test]
    fn retention_never_touches_kept_snapshots_nor_counts_them() {
        let mut owned: Vec<_> = (1..=5)
            .map(|d| snap(&format!("s{d}"), &format!("2026-03-0{d}T02:00:00Z"), true))
            .collect();
        owned[0].keep = true; // s1
        owned[3].keep = true; // s4
        let now = ts("2026-06-01T00:00:00Z");
        // Ready, not kept: s2 s3 s5; keep 2 → s2 goes; s1 and s4 stay.
        assert_eq!(prune(&owned, &policy(Some(2), None), now), ["s2"]);
        // Age: everything is months old; kept ones and the newest ready stay.
        assert_eq!(prune(&owned, &policy(None, Some("4w")), now), ["s2", "s3"]);
    }

    #[test]
    fn retention_by_age_and_count_together() {
        let owned = vec![
            snap("a", "2026-03-01T02:00:00Z", true),
            snap("b", "2026-03-10T02:00:00Z", true),
            snap("c", "2026-03-20T02:00:00Z", true),
            snap("d", "2026-03-27T02:00:00Z", true),
            snap("e", "2026-03-28T02:00:00Z", true),
        ];
        let now = ts("2026-03-28T12:00:00Z");
        // maxAge 14d: a and b are older; maxCount 3 also removes... a and b.
        assert_eq!(
            prune(&owned, &policy(Some(3), Some("14d")), now),
            ["a", "b"]
        );
        // maxCount 2: c goes too.
        assert_eq!(
            prune(&owned, &policy(Some(2), Some("14d")), now),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn a_pending_newest_run_never_pushes_out_the_last_ready_one() {
        let owned = vec![
            snap("old", "2026-03-01T02:00:00Z", true),
            snap("new", "2026-03-02T02:00:00Z", false),
        ];
        let now = ts("2026-03-02T02:00:30Z");
        assert_eq!(
            prune(&owned, &policy(Some(1), None), now),
            Vec::<String>::new()
        );
        // Once the new one is ready, the old one goes.
        let owned = vec![
            snap("old", "2026-03-01T02:00:00Z", true),
            snap("new", "2026-03-02T02:00:00Z", true),
        ];
        assert_eq!(prune(&owned, &policy(Some(1), None), now), ["old"]);
        // Age never removes the newest ready snapshot either, even when the
        // runs after it are failing.
        let owned = vec![
            snap("good", "2026-01-01T02:00:00Z", true),
            snap("failed", "2026-03-01T02:00:00Z", false),
        ];
        let later = ts("2026-03-20T00:00:00Z");
        assert_eq!(
            prune(&owned, &policy(Some(3), Some("7d")), later),
            ["failed"]
        );
    }

    #[test]
    fn failed_runs_older_than_what_count_keeps_are_pruned() {
        let owned = vec![
            snap("r1", "2026-03-01T02:00:00Z", true),
            snap("f2", "2026-03-02T02:00:00Z", false),
            snap("r3", "2026-03-03T02:00:00Z", true),
            snap("r4", "2026-03-04T02:00:00Z", true),
            snap("p5", "2026-03-05T02:00:00Z", false),
        ];
        let now = ts("2026-03-05T02:00:10Z");
        assert_eq!(prune(&owned, &policy(Some(2), None), now), ["r1", "f2"]);
        // With room for three ready ones, the failed run in between stays.
        assert_eq!(
            prune(&owned, &policy(Some(3), None), now),
            Vec::<String>::new()
        );
    }

    #[test]
    fn snapshots_being_deleted_are_left_alone() {
        let mut owned = vec![
            snap("a", "2026-03-01T02:00:00Z", true),
            snap("b", "2026-03-02T02:00:00Z", true),
            snap("c", "2026-03-03T02:00:00Z", true),
        ];
        owned[0].deleting = true;
        let now = ts("2026-03-04T00:00:00Z");
        assert_eq!(prune(&owned, &policy(Some(1), None), now), ["b"]);
    }

    #[test]
    fn run_names_are_deterministic_and_fit() {
        let t = ts("2026-03-29T01:00:00Z");
        assert_eq!(run_name("nightly", t), "nightly-202603290100");
        assert_eq!(run_name("nightly", t), run_name("nightly", t));
        assert_ne!(
            run_name("nightly", t),
            run_name("nightly", ts("2026-03-29T01:01:00Z"))
        );
        let long_a = format!("{}-a", "x".repeat(80));
        let long_b = format!("{}-b", "x".repeat(80));
        let (a, b) = (run_name(&long_a, t), run_name(&long_b, t));
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
        assert!(a.ends_with("-202603290100"));
        assert!(crate::api::validate_dns_label(&a).is_ok(), "{a}");
        let r = run_name_with("dev", "-refresh", t);
        assert_eq!(r, "dev-refresh-202603290100");
        assert!(label_value(&"y".repeat(100)).len() <= 63);
        assert_eq!(label_value("nightly"), "nightly");
    }

    #[test]
    fn times_round_trip() {
        let t = ts("2026-03-29T01:00:00Z");
        assert_eq!(parse_time(&rfc3339(t)), Some(t));
        assert_eq!(
            until(t, after(t, Duration::from_secs(90))),
            Duration::from_secs(90)
        );
        assert_eq!(until(after(t, Duration::from_secs(90)), t), Duration::ZERO);
    }
}
