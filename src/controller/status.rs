//! The status contract (ARCHITECTURE.md, "Conditions"): `Ready`,
//! `Reconciling` and `Stalled` conditions with `observedGeneration`,
//! `lastTransitionTime` moved only when a condition's status flips; the one
//! status writer of every controller (only the changed fields, an Event on
//! every transition) and the one Event publisher.

use std::fmt::Debug;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::{Context, Error, Object};
use crate::api::conditions::{set_health, StatusContract};
use crate::api::{FIELD_MANAGER, READY, RECONCILING, STALLED};

/// What a reconcile concluded about an object: the shared
/// Ready/Reconciling/Stalled triple of [`crate::api::conditions`].
pub use crate::api::conditions::Health as Outcome;

/// The reason of an outcome.
pub fn reason_of(o: &Outcome) -> &str {
    match o {
        Outcome::Progressing { reason, .. }
        | Outcome::Ready { reason, .. }
        | Outcome::Stalled { reason, .. } => reason,
    }
}

/// The message of an outcome.
pub fn message_of(o: &Outcome) -> &str {
    match o {
        Outcome::Progressing { message, .. }
        | Outcome::Ready { message, .. }
        | Outcome::Stalled { message, .. } => message,
    }
}

/// Sets Ready, Reconciling and Stalled from an outcome
/// (`lastTransitionTime` moves only on flips).
pub fn apply_outcome(
    conditions: &mut Vec<Condition>,
    outcome: &Outcome,
    generation: Option<i64>,
    now: jiff::Timestamp,
) {
    set_health(conditions, outcome, generation, now);
}

/// Stamps a pass's outcome on a status: `observedGeneration` and the
/// Ready/Reconciling/Stalled conditions, for `generation`.
pub fn stamp<S: StatusContract>(status: &mut S, outcome: &Outcome, generation: Option<i64>) {
    status.set_observed_generation(generation);
    apply_outcome(
        status.conditions_mut(),
        outcome,
        generation,
        jiff::Timestamp::now(),
    );
}

/// Ends a pass: stamps `outcome` on `new` ([`stamp`]) and writes it over
/// `old` with [`write_status`]. Returns whether a write happened.
pub async fn conclude<K, S>(
    ctx: &Context,
    obj: &K,
    old: Option<&S>,
    new: &mut S,
    outcome: &Outcome,
) -> Result<bool, Error>
where
    K: Object,
    S: Serialize + StatusContract,
{
    stamp(new, outcome, obj.meta().generation);
    write_status(ctx, obj, old, new, outcome).await
}

/// The status of a condition type, if present.
pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether `Ready` is `True`.
pub fn is_ready(conditions: &[Condition]) -> bool {
    condition(conditions, READY).is_some_and(|c| c.status == "True")
}

/// A JSON merge patch turning `old` into `new` (objects recursed, everything
/// else replaced, removed keys set to null). `None` when equal.
pub fn merge_diff(old: &Value, new: &Value) -> Option<Value> {
    if old == new {
        return None;
    }
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut out = Map::new();
            for (k, nv) in n {
                match o.get(k) {
                    Some(ov) => {
                        if let Some(d) = merge_diff(ov, nv) {
                            out.insert(k.clone(), d);
                        }
                    }
                    None => {
                        out.insert(k.clone(), nv.clone());
                    }
                }
            }
            for k in o.keys() {
                if !n.contains_key(k) {
                    out.insert(k.clone(), Value::Null);
                }
            }
            Some(Value::Object(out))
        }
        _ => Some(new.clone()),
    }
}

/// Writes `new` as the object's status when it differs from `old`: a merge
/// patch of only the changed fields, guarded by the object's
/// resourceVersion (a concurrent writer, e.g. a restore moving the branch to
/// a new timeline, makes this fail with 409 and the reconcile re-reads).
/// Publishes an Event when the outcome's condition set flips. Returns
/// whether a write happened.
pub async fn write_status<K, S>(
    ctx: &Context,
    obj: &K,
    old: Option<&S>,
    new: &S,
    outcome: &Outcome,
) -> Result<bool, Error>
where
    K: Object,
    S: Serialize,
{
    let old_v = match old {
        Some(s) => serde_json::to_value(s)?,
        None => Value::Object(Map::new()),
    };
    let new_v = serde_json::to_value(new)?;
    first_ready(ctx, obj, &old_v, &new_v);
    let Some(diff) = merge_diff(&old_v, &new_v) else {
        return Ok(false);
    };
    patch_status(ctx, obj, "write status", diff, Guard::ResourceVersion).await?;
    let old_conds = conditions_of(&old_v);
    if outcome_changed(&old_conds, outcome) {
        publish_outcome(ctx, obj, outcome, None).await;
    }
    Ok(true)
}

/// Whether a status patch holds only if the object is unchanged since it
/// was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Only at the object's resourceVersion: a concurrent writer makes
    /// the patch fail with 409 and the reconcile re-reads.
    ResourceVersion,
    /// Whatever changed since (the writer is the status's one owner and
    /// writes several times in one reconcile).
    None,
}

/// Merge-patches `fields` into the status of `obj` with the operator's
/// field manager, within the step deadline (`step` names it in a
/// timeout), and counts the write.
pub async fn patch_status<K>(
    ctx: &Context,
    obj: &K,
    step: &'static str,
    fields: Value,
    guard: Guard,
) -> Result<(), Error>
where
    K: Object,
{
    let api: Api<K> = ctx.api(&obj.namespace().unwrap_or_default());
    let patch = match guard {
        Guard::ResourceVersion => json!({
            "metadata": { "resourceVersion": obj.resource_version() },
            "status": fields,
        }),
        Guard::None => json!({ "status": fields }),
    };
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    super::with_deadline(
        ctx,
        step,
        api.patch_status(&obj.name_any(), &params, &Patch::Merge(&patch)),
    )
    .await?;
    ctx.metrics.status_write(K::kind(&()).as_ref());
    Ok(())
}

/// Publishes the Event of an outcome: Warning when Stalled, Normal
/// otherwise, its reason and message; the action is `action`, else the
/// condition the outcome sets (`Reconciling`, `Ready`, `Stalled`).
pub async fn publish_outcome<K>(ctx: &Context, obj: &K, outcome: &Outcome, action: Option<&str>)
where
    K: Resource<DynamicType = ()>,
{
    let (type_, default_action) = match outcome {
        Outcome::Progressing { .. } => (EventType::Normal, "Reconciling"),
        Outcome::Ready { .. } => (EventType::Normal, "Ready"),
        Outcome::Stalled { .. } => (EventType::Warning, "Stalled"),
    };
    publish(
        ctx,
        obj,
        type_,
        reason_of(outcome),
        action.unwrap_or(default_action),
        message_of(outcome),
    )
    .await;
}

/// Publishes an Event about `obj`, its note cut to 1,000 bytes (the API
/// refuses longer ones). A failure to publish is logged, never an error of
/// the reconcile.
pub async fn publish<K>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) where
    K: Resource<DynamicType = ()>,
{
    let ev = Event {
        type_,
        reason: reason.to_string(),
        note: Some(truncate(note, 1000)),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish event");
    }
}

/// A Branch or Snapshot Ready for the first time: how long it took from
/// its creation (once per object and process).
fn first_ready<K: Resource<DynamicType = ()>>(ctx: &Context, obj: &K, old: &Value, new: &Value) {
    let kind = K::kind(&());
    if kind != "Branch" && kind != "Snapshot" {
        return;
    }
    let ready = |v: &Value| is_ready(&conditions_of(v));
    if ready(old) || !ready(new) {
        return;
    }
    let (Some(uid), Some(created)) = (
        obj.meta().uid.as_deref(),
        obj.meta().creation_timestamp.as_ref(),
    ) else {
        return;
    };
    if ctx.metrics.first_ready(uid) {
        let took = jiff::Timestamp::now()
            .duration_since(created.0)
            .unsigned_abs();
        ctx.metrics.operation_done(&kind.to_lowercase(), took);
    }
}

fn conditions_of(status: &Value) -> Vec<Condition> {
    status
        .get("conditions")
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default()
}

/// Whether the outcome is a transition from what the old conditions said
/// (a different active condition or a different reason).
pub fn outcome_changed(old: &[Condition], outcome: &Outcome) -> bool {
    let active = match outcome {
        Outcome::Progressing { .. } => RECONCILING,
        Outcome::Ready { .. } => READY,
        Outcome::Stalled { .. } => STALLED,
    };
    match condition(old, active) {
        Some(c) => c.status != "True" || c.reason != reason_of(outcome),
        None => true,
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn transition_time_moves_only_on_flips() {
        let mut c = vec![];
        apply_outcome(
            &mut c,
            &Outcome::progressing("Creating", "a"),
            Some(1),
            t(10),
        );
        assert!(!is_ready(&c));
        let ready = condition(&c, READY).unwrap().clone();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.observed_generation, Some(1));
        apply_outcome(
            &mut c,
            &Outcome::progressing("StartingCompute", "b"),
            Some(1),
            t(20),
        );
        assert_eq!(condition(&c, READY).unwrap().last_transition_time.0, t(10));
        assert_eq!(condition(&c, READY).unwrap().reason, "StartingCompute");
        apply_outcome(&mut c, &Outcome::ready("Ready", "ok"), Some(2), t(30));
        let ready = condition(&c, READY).unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(ready.last_transition_time.0, t(30));
        assert_eq!(ready.observed_generation, Some(2));
        assert_eq!(condition(&c, RECONCILING).unwrap().status, "False");
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn stalled_sets_only_stalled_true() {
        let mut c = vec![];
        apply_outcome(
            &mut c,
            &Outcome::stalled("ParentNotFound", "x"),
            Some(1),
            t(1),
        );
        assert_eq!(condition(&c, STALLED).unwrap().status, "True");
        assert_eq!(condition(&c, READY).unwrap().status, "False");
        assert_eq!(condition(&c, RECONCILING).unwrap().status, "False");
        assert!(outcome_changed(&c, &Outcome::stalled("InvalidPoint", "y")));
        assert!(!outcome_changed(
            &c,
            &Outcome::stalled("ParentNotFound", "z")
        ));
        assert!(outcome_changed(&c, &Outcome::ready("Ready", "")));
    }

    #[test]
    fn merge_diff_only_carries_changes() {
        let old = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1]});
        let new = json!({"a": 1, "b": {"c": 2, "d": 4}, "e": [1, 2], "f": "x"});
        assert_eq!(
            merge_diff(&old, &new).unwrap(),
            json!({"b": {"d": 4}, "e": [1, 2], "f": "x"})
        );
        assert_eq!(merge_diff(&new, &new), None);
        assert_eq!(
            merge_diff(&json!({"a": 1, "g": 2}), &json!({"a": 1})).unwrap(),
            json!({"g": null})
        );
    }
}
