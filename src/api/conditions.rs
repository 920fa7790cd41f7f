//! The status contract shared by every kind: `Ready`, `Reconciling` and
//! `Stalled` conditions in the `metav1.Condition` shape (ARCHITECTURE.md,
//! "Conditions").
//!
//! Pure functions, no API calls:
//! * [`set_condition`] sets or replaces one condition, keeping
//!   `lastTransitionTime` unless the status flips;
//! * [`Health`] + [`set_health`] write the Ready/Reconciling/Stalled triple
//!   for the three states an object can be in;
//! * [`status_changed`] says whether a status write would change anything
//!   (skip the write when it would not).
//!
//! A controller builds the new status from the old one (so times carry
//! over), applies its [`Health`], and writes only when [`status_changed`].

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::Serialize;

/// Condition type: the object is usable.
pub const READY: &str = "Ready";
/// Condition type: work is under way.
pub const RECONCILING: &str = "Reconciling";
/// Condition type: a failure that will not fix itself.
pub const STALLED: &str = "Stalled";

/// Condition status `True`.
pub const TRUE: &str = "True";
/// Condition status `False`.
pub const FALSE: &str = "False";
/// Condition status `Unknown`.
pub const UNKNOWN: &str = "Unknown";

/// The longest condition message the apiserver accepts (`metav1.Condition`).
pub const MAX_MESSAGE_LEN: usize = 32768;
/// The longest condition reason the apiserver accepts.
pub const MAX_REASON_LEN: usize = 1024;

/// Whether `reason` is a valid `metav1.Condition` reason: CamelCase, starting
/// with a letter, then letters, digits, `_`, `,` or `:`, not ending in `,`
/// or `:` (the apiserver's pattern), at most 1024 characters.
pub fn is_valid_reason(reason: &str) -> bool {
    let bytes = reason.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    reason.len() <= MAX_REASON_LEN
        && first.is_ascii_alphabetic()
        && (last.is_ascii_alphanumeric() || *last == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b',' | b':'))
}

/// Builds a condition. `now` is truncated to whole seconds (what the
/// apiserver stores), so a status read back compares equal to the one
/// written; `message` is cut to [`MAX_MESSAGE_LEN`] bytes.
pub fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: jiff::Timestamp,
) -> Condition {
    debug_assert!(
        is_valid_reason(reason),
        "condition reason {reason:?} is not CamelCase"
    );
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: truncate(message, MAX_MESSAGE_LEN).to_string(),
        observed_generation,
        last_transition_time: Time(whole_seconds(now)),
    }
}

fn whole_seconds(t: jiff::Timestamp) -> jiff::Timestamp {
    jiff::Timestamp::from_second(t.as_second()).unwrap_or(t)
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Sets the condition of `new.type_` in `conditions`: appended when absent,
/// otherwise replaced — keeping the old `lastTransitionTime` unless the
/// status changed (then `new`'s time, the time of the flip, is used).
/// Returns whether anything but the time differs from before.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        None => {
            conditions.push(new);
            true
        }
        Some(old) => {
            let mut new = new;
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            let changed = *old != new;
            *old = new;
            changed
        }
    }
}

/// Removes the condition of `type_`; returns whether there was one.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    conditions.len() != before
}

/// The condition of `type_`, if any.
pub fn get_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of `type_` is `True`.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    get_condition(conditions, type_).is_some_and(|c| c.status == TRUE)
}

/// Whether `Ready` is `True` and was set for `generation` (the current
/// spec), as `kubectl wait --for=condition=Ready` and kstatus read it.
pub fn is_ready_for(conditions: &[Condition], generation: Option<i64>) -> bool {
    get_condition(conditions, READY)
        .is_some_and(|c| c.status == TRUE && c.observed_generation == generation)
}

/// Where an object stands, as the Ready/Reconciling/Stalled triple says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Work is under way: `Ready=False` and `Reconciling=True` with this
    /// reason and message, `Stalled=False`. Also the first state of every
    /// object (`Ready=False` from the first reconcile).
    Progressing { reason: String, message: String },
    /// Usable: `Ready=True` with this reason and message; `Reconciling` and
    /// `Stalled` are `False`.
    Ready { reason: String, message: String },
    /// A failure that will not fix itself (bad reference, quota, invalid
    /// point): `Ready=False` and `Stalled=True` with this reason and a
    /// message a person can act on; `Reconciling=False`.
    Stalled { reason: String, message: String },
}

impl Health {
    /// See [`Health::Progressing`]; `reason` is CamelCase, e.g. `CreatingTimeline`.
    pub fn progressing(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Health::Progressing {
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// See [`Health::Ready`]; `reason` is CamelCase, e.g. `ComputeReady`.
    pub fn ready(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Health::Ready {
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// See [`Health::Stalled`]; `reason` is CamelCase, e.g. `ParentNotFound`.
    pub fn stalled(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Health::Stalled {
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// The `Ready`, `Reconciling` and `Stalled` conditions of this state,
    /// stamped with `observed_generation` and `now`.
    pub fn conditions(
        &self,
        observed_generation: Option<i64>,
        now: jiff::Timestamp,
    ) -> [Condition; 3] {
        let c = |type_: &str, status: &str, reason: &str, message: &str| {
            condition(type_, status, reason, message, observed_generation, now)
        };
        match self {
            Health::Progressing { reason, message } => [
                c(READY, FALSE, reason, message),
                c(RECONCILING, TRUE, reason, message),
                c(STALLED, FALSE, "NotStalled", ""),
            ],
            Health::Ready { reason, message } => [
                c(READY, TRUE, reason, message),
                c(RECONCILING, FALSE, "ReconcileSucceeded", ""),
                c(STALLED, FALSE, "NotStalled", ""),
            ],
            Health::Stalled { reason, message } => [
                c(READY, FALSE, reason, message),
                c(RECONCILING, FALSE, reason, ""),
                c(STALLED, TRUE, reason, message),
            ],
        }
    }
}

/// Writes `health` into `conditions` with [`set_condition`] (other
/// condition types are left alone). Returns whether anything but times
/// changed.
pub fn set_health(
    conditions: &mut Vec<Condition>,
    health: &Health,
    observed_generation: Option<i64>,
    now: jiff::Timestamp,
) -> bool {
    let mut changed = false;
    for c in health.conditions(observed_generation, now) {
        changed |= set_condition(conditions, c);
    }
    changed
}

/// Whether writing `new` over `old` would change the stored status. It
/// compares the serialized forms (what the apiserver stores) and ignores
/// nothing — times included — so a controller that builds `new` from `old`
/// with [`set_condition`]/[`set_health`] and writes only when this is true
/// makes no writes in a steady state. `old` is `None` before the first
/// status write.
pub fn status_changed<S: Serialize>(old: Option<&S>, new: &S) -> bool {
    let Some(old) = old else {
        return true;
    };
    match (serde_json::to_value(old), serde_json::to_value(new)) {
        (Ok(a), Ok(b)) => a != b,
        // Cannot compare: write, a write too many is harmless.
        _ => true,
    }
}

/// A status under the shared contract: `observedGeneration` and the
/// conditions.
pub trait StatusContract {
    /// Its conditions.
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
    /// Sets `observedGeneration`.
    fn set_observed_generation(&mut self, generation: Option<i64>);
}

macro_rules! status_contract {
    ($($t:ty),*) => {$(
        impl StatusContract for $t {
            fn conditions_mut(&mut self) -> &mut Vec<Condition> {
                &mut self.conditions
            }
            fn set_observed_generation(&mut self, generation: Option<i64>) {
                self.observed_generation = generation;
            }
        }
    )*};
}

status_contract!(
    super::BranchStatus,
    super::SnapshotStatus,
    super::SnapshotRestoreStatus,
    super::SnapshotScheduleStatus
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BranchStatus, SnapshotStatus};

    fn t(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn reasons() {
        for ok in [
            "Ready",
            "ParentNotFound",
            "Quota_Exceeded",
            "A1",
            "a",
            "Waiting:Restore",
        ] {
            assert!(is_valid_reason(ok), "{ok}");
        }
        for bad in [
            "",
            "1Ready",
            "not ready",
            "Parent-Missing",
            "Ready:",
            "Ready,",
            &"A".repeat(1025),
        ] {
            assert!(!is_valid_reason(bad), "{bad}");
        }
    }

    #[test]
    fn set_condition_keeps_time_unless_status_flips() {
        let t0 = t("2026-01-01T00:00:00Z");
        let t1 = t("2026-01-01T00:05:00.750Z");
        let t2 = t("2026-01-01T00:09:00Z");
        let mut conds = Vec::new();
        assert!(set_condition(
            &mut conds,
            condition(READY, FALSE, "Creating", "a", Some(1), t0)
        ));
        assert_eq!(conds.len(), 1);

        // Same status, new reason and message: time kept, reported as a change.
        assert!(set_condition(
            &mut conds,
            condition(READY, FALSE, "StartingCompute", "b", Some(1), t1)
        ));
        assert_eq!(conds[0].last_transition_time.0, t0);
        assert_eq!(conds[0].reason, "StartingCompute");
        assert_eq!(conds[0].message, "b");

        // Nothing new: no change, time kept.
        assert!(!set_condition(
            &mut conds,
            condition(READY, FALSE, "StartingCompute", "b", Some(1), t2)
        ));
        assert_eq!(conds[0].last_transition_time.0, t0);

        // A new generation alone is a change.
        assert!(set_condition(
            &mut conds,
            condition(READY, FALSE, "StartingCompute", "b", Some(2), t2)
        ));
        assert_eq!(conds[0].observed_generation, Some(2));
        assert_eq!(conds[0].last_transition_time.0, t0);

        // Flip: the time of the flip, whole seconds.
        assert!(set_condition(
            &mut conds,
            condition(READY, TRUE, "ComputeReady", "", Some(2), t1)
        ));
        assert_eq!(conds[0].status, TRUE);
        assert_eq!(conds[0].last_transition_time.0, t("2026-01-01T00:05:00Z"));

        // Another type is appended, the first left alone.
        assert!(set_condition(
            &mut conds,
            condition(STALLED, FALSE, "NotStalled", "", Some(2), t2)
        ));
        assert_eq!(conds.len(), 2);
        assert_eq!(conds[0].type_, READY);
        assert!(remove_condition(&mut conds, STALLED));
        assert!(!remove_condition(&mut conds, STALLED));
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let msg = "é".repeat(MAX_MESSAGE_LEN);
        let c = condition(
            READY,
            FALSE,
            "Creating",
            &msg,
            None,
            t("2026-01-01T00:00:00Z"),
        );
        assert!(c.message.len() <= MAX_MESSAGE_LEN);
        assert!(c.message.len() >= MAX_MESSAGE_LEN - 1);
        assert!(c.message.chars().all(|ch| ch == 'é'));
    }

    #[test]
    fn health_triples() {
        let now = t("2026-01-01T00:00:00Z");
        let [ready, reconciling, stalled] =
            Health::progressing("CreatingTimeline", "copying").conditions(Some(3), now);
        assert_eq!(
            (
                ready.type_.as_str(),
                ready.status.as_str(),
                ready.reason.as_str()
            ),
            (READY, FALSE, "CreatingTimeline")
        );
        assert_eq!(
            (reconciling.type_.as_str(), reconciling.status.as_str()),
            (RECONCILING, TRUE)
        );
        assert_eq!(
            (stalled.type_.as_str(), stalled.status.as_str()),
            (STALLED, FALSE)
        );
        for c in [&ready, &reconciling, &stalled] {
            assert_eq!(c.observed_generation, Some(3));
            assert!(is_valid_reason(&c.reason));
        }

        let [ready, reconciling, stalled] =
            Health::ready("ComputeReady", "accepting connections").conditions(Some(3), now);
        assert_eq!(
            (ready.status.as_str(), ready.message.as_str()),
            (TRUE, "accepting connections")
        );
        assert_eq!(reconciling.status, FALSE);
        assert_eq!(stalled.status, FALSE);

        let [ready, reconciling, stalled] = Health::stalled(
            "ParentNotFound",
            "Branch prod does not exist in namespace dev",
        )
        .conditions(Some(3), now);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            (FALSE, "ParentNotFound")
        );
        assert_eq!(reconciling.status, FALSE);
        assert_eq!(
            (
                stalled.status.as_str(),
                stalled.reason.as_str(),
                stalled.message.as_str()
            ),
            (
                TRUE,
                "ParentNotFound",
                "Branch prod does not exist in namespace dev"
            )
        );
    }

    #[test]
    fn a_life_of_conditions() {
        let t0 = t("2026-01-01T00:00:00Z");
        let t1 = t("2026-01-01T00:01:00Z");
        let t2 = t("2026-01-01T00:02:00Z");
        let mut status = BranchStatus::default();

        // First reconcile: Ready=False at once.
        assert!(set_health(
            &mut status.conditions,
            &Health::progressing("Creating", ""),
            Some(1),
            t0
        ));
        assert!(!is_condition_true(&status.conditions, READY));
        assert_eq!(status.conditions.len(), 3);

        // Ready: only Ready and Reconciling flip.
        assert!(set_health(
            &mut status.conditions,
            &Health::ready("ComputeReady", ""),
            Some(1),
            t1
        ));
        assert!(is_ready_for(&status.conditions, Some(1)));
        assert!(!is_ready_for(&status.conditions, Some(2)));
        assert_eq!(
            get_condition(&status.conditions, READY)
                .unwrap()
                .last_transition_time
                .0,
            t1
        );
        assert_eq!(
            get_condition(&status.conditions, RECONCILING)
                .unwrap()
                .last_transition_time
                .0,
            t1
        );
        assert_eq!(
            get_condition(&status.conditions, STALLED)
                .unwrap()
                .last_transition_time
                .0,
            t0
        );

        // Steady state: same health later changes nothing, so no write.
        let before = status.clone();
        assert!(!set_health(
            &mut status.conditions,
            &Health::ready("ComputeReady", ""),
            Some(1),
            t2
        ));
        assert!(!status_changed(Some(&before), &status));

        // Stalled: Stalled flips at t2, Ready flips back at t2.
        assert!(set_health(
            &mut status.conditions,
            &Health::stalled(
                "PointOutsideRestoreWindow",
                "0/1 is older than the parent's restore window"
            ),
            Some(2),
            t2
        ));
        assert!(status_changed(Some(&before), &status));
        assert!(is_condition_true(&status.conditions, STALLED));
        assert_eq!(
            get_condition(&status.conditions, STALLED)
                .unwrap()
                .last_transition_time
                .0,
            t2
        );
        assert_eq!(
            get_condition(&status.conditions, READY)
                .unwrap()
                .last_transition_time
                .0,
            t2
        );
        // Other condition types survive.
        status
            .conditions
            .push(condition("Refreshing", FALSE, "Idle", "", Some(2), t0));
        set_health(
            &mut status.conditions,
            &Health::ready("ComputeReady", ""),
            Some(2),
            t2,
        );
        assert!(get_condition(&status.conditions, "Refreshing").is_some());
    }

    #[test]
    fn status_changed_sees_every_field() {
        let a = SnapshotStatus::default();
        assert!(status_changed(None, &a));
        assert!(!status_changed(Some(&a), &a.clone()));
        let mut b = a.clone();
        b.ready_to_use = true;
        assert!(status_changed(Some(&a), &b));
        let mut c = a.clone();
        c.observed_generation = Some(1);
        assert!(status_changed(Some(&a), &c));
        // Times count too, at the precision the apiserver stores.
        let mut d = a.clone();
        d.conditions.push(condition(
            READY,
            FALSE,
            "Creating",
            "",
            None,
            t("2026-01-01T00:00:00Z"),
        ));
        let mut e = d.clone();
        e.conditions[0].last_transition_time = Time(t("2026-01-01T00:00:01Z"));
        assert!(status_changed(Some(&d), &e));
        // Sub-second differences do not survive serialization: no write.
        let mut f = d.clone();
        f.conditions[0].last_transition_time = Time(t("2026-01-01T00:00:00.5Z"));
        assert!(!status_changed(Some(&d), &f));
        // A status read back from JSON equals the one written.
        let round: SnapshotStatus =
            serde_json::from_value(serde_json::to_value(&d).unwrap()).unwrap();
        assert!(!status_changed(Some(&round), &d));
    }
}
