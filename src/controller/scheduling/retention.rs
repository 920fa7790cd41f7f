//! Retention: which of a schedule's snapshots go.
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

use jiff::Timestamp;

use super::PlanError;
use crate::api::parse_span;

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

/// The names of the snapshots retention deletes now (oldest first), by the
/// rules above.
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
    use super::super::ts;
    use super::*;

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
}
