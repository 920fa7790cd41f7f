//! The SnapshotSchedule controller.
//!
//! Each pass: read the schedule's Snapshots (labelled
//! `pgbranch.dev/schedule=<name>` and controlled by it) → release the ones
//! a user labelled `pgbranch.dev/keep: "true"` (their owner reference is
//! removed, so deleting the schedule does not delete them either) → when a
//! run is due ([`super::scheduling::due`]: at most one, the latest missed slot), create
//! its Snapshot, named from the slot so that a retry finds it instead of
//! making a second one → prune by retention ([`super::scheduling::prune`]; also while
//! suspended or blocked) → status and a requeue at the next run.
//!
//! Times come from [`Context::clock`], so tests drive the schedule with a
//! [`ManualClock`].

pub mod clock;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::scheduling::{self as plan, Cadence, OwnedSnapshot, PlanError, RetentionPolicy};
pub use clock::{Clock, ManualClock, SystemClock};

use super::apply::{holder, Holder};
use super::status::{conclude, Outcome};
use super::{with_deadline, Context, Drive, Error, Shutdown};
use crate::api::{
    parse_span, Branch, Snapshot, SnapshotSchedule, SnapshotScheduleStatus, SnapshotSpec,
    ANNOTATION_SCHEDULED_AT, LABEL_KEEP, LABEL_SCHEDULE, READY, STALLED,
};

/// The Snapshot `Stalled` reason of a run refused by the snapshot quota.
pub const REASON_QUOTA: &str = "SnapshotQuotaExceeded";
const KIND: &str = "SnapshotSchedule";

/// Runs the SnapshotSchedule controller until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl Shutdown) {
    let controller = super::controller_for(ctx.watched::<SnapshotSchedule>(), &ctx.config).owns(
        ctx.watched::<Snapshot>(),
        watcher::Config::default().labels(LABEL_SCHEDULE),
    );
    let how = Drive::of(KIND, "schedule");
    super::drive(controller, ctx, shutdown, how, reconcile).await;
}

async fn reconcile(sched: Arc<SnapshotSchedule>, ctx: Arc<Context>) -> Result<Action, Error> {
    if sched.meta().deletion_timestamp.is_some() {
        // Owned Snapshots go with the schedule (owner references); the
        // ones a user kept were released from it.
        return Ok(Action::await_change());
    }
    reconcile_apply(&sched, &ctx).await
}

fn is_kept(s: &Snapshot) -> bool {
    s.labels().get(LABEL_KEEP).is_some_and(|v| v == "true")
}

/// The slot of the run that made `s`: its annotation, else its creation.
fn scheduled_at(s: &Snapshot) -> jiff::Timestamp {
    s.annotations()
        .get(ANNOTATION_SCHEDULED_AT)
        .and_then(|t| crate::point::read_time(t))
        .or_else(|| s.meta().creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

fn owned_info(s: &Snapshot) -> OwnedSnapshot {
    OwnedSnapshot {
        name: s.name_any(),
        scheduled: scheduled_at(s),
        ready: s.status.as_ref().is_some_and(|st| st.ready_to_use),
        keep: is_kept(s),
        deleting: s.meta().deletion_timestamp.is_some(),
    }
}

/// The `Stalled` condition of a Snapshot, when true: (reason, message).
fn snapshot_stalled(s: &Snapshot) -> Option<(String, String)> {
    s.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == STALLED && c.status == "True")
        .map(|c| (c.reason.clone(), c.message.clone()))
}

/// When `s` became ready: its `Ready` condition's transition, else its
/// `createdAt`, else the run's slot.
fn ready_since(s: &Snapshot) -> jiff::Timestamp {
    let st = s.status.as_ref();
    st.and_then(|st| {
        st.conditions
            .iter()
            .find(|c| c.type_ == READY && c.status == "True")
            .map(|c| c.last_transition_time.0)
    })
    .or_else(|| {
        st.and_then(|st| st.created_at.as_deref())
            .and_then(crate::point::read_time)
    })
    .unwrap_or_else(|| scheduled_at(s))
}

async fn publish(
    ctx: &Context,
    sched: &SnapshotSchedule,
    type_: EventType,
    reason: &str,
    note: String,
) {
    super::status::publish(ctx, sched, type_, reason, "Schedule", &note).await;
}

/// Lists the Snapshots this schedule controls.
async fn owned_snapshots(
    ctx: &Context,
    sched: &SnapshotSchedule,
    uid: &str,
) -> Result<Vec<Snapshot>, Error> {
    let ns = sched.namespace().unwrap_or_default();
    let selector = format!("{LABEL_SCHEDULE}={}", plan::label_value(&sched.name_any()));
    let list = ctx
        .list::<Snapshot>(&ns, "list snapshots", &selector)
        .await?;
    Ok(list
        .into_iter()
        .filter(|s| holder(s, uid) == Holder::Owner)
        .collect())
}

/// Removes this schedule's owner reference from a Snapshot the user kept,
/// so neither retention nor the schedule's deletion removes it.
async fn release(ctx: &Context, snap: &Snapshot, uid: &str) -> Result<(), Error> {
    let ns = snap.namespace().unwrap_or_default();
    let api: Api<Snapshot> = ctx.api(&ns);
    let rest: Vec<_> = snap
        .meta()
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.uid != uid)
        .cloned()
        .collect();
    let patch = json!({
        "metadata": {
            "resourceVersion": snap.resource_version(),
            "ownerReferences": if rest.is_empty() { serde_json::Value::Null } else { serde_json::to_value(rest)? },
        }
    });
    tracing::info!(snapshot = %snap.name_any(), "releasing a kept snapshot from its schedule");
    with_deadline(
        ctx,
        "release snapshot",
        api.patch(
            &snap.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ),
    )
    .await?;
    Ok(())
}

/// Creates the Snapshot of the run at `slot` (or finds it: a retry of the
/// same run gets the same name and never makes a second one).
async fn create_run(
    ctx: &Context,
    sched: &SnapshotSchedule,
    slot: jiff::Timestamp,
    now: jiff::Timestamp,
) -> Result<(Snapshot, bool), Error> {
    let ns = sched.namespace().unwrap_or_default();
    let name = sched.name_any();
    let uid = sched.uid().unwrap_or_default();
    if ctx
        .get::<Branch>(&ns, "read branch", &sched.spec.branch)
        .await?
        .is_none()
    {
        return Err(Error::stalled(
            "BranchNotFound",
            format!(
                "branch {:?} does not exist in namespace {ns}: the run of {} waits for it (create the branch or fix spec.branch)",
                sched.spec.branch,
                plan::rfc3339(slot)
            ),
        ));
    }
    let tmpl = &sched.spec.snapshot_template;
    let expires_at = match &tmpl.expires_after {
        Some(text) => Some(plan::rfc3339(plan::after(
            now,
            parse_span(text).map_err(|_| {
                Error::stalled(
                    "InvalidSpan",
                    PlanError::InvalidSpan {
                        field: "snapshotTemplate.expiresAfter",
                        value: text.clone(),
                    }
                    .to_string(),
                )
            })?,
        ))),
        None => None,
    };
    let mut labels: BTreeMap<String, String> = tmpl.labels.clone();
    labels.insert(LABEL_SCHEDULE.into(), plan::label_value(&name));
    let owner = sched
        .controller_owner_ref(&())
        .ok_or_else(|| Error::Waiting("the schedule has no uid yet".into()))?;
    let snap_name = plan::run_name(&name, slot);
    let snap = Snapshot {
        metadata: ObjectMeta {
            name: Some(snap_name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                ANNOTATION_SCHEDULED_AT.to_string(),
                plan::rfc3339(slot),
            )])),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: SnapshotSpec {
            branch: sched.spec.branch.clone(),
            lsn: None,
            timestamp: None,
            expires_at,
            deletion_policy: tmpl.deletion_policy,
        },
        status: None,
    };
    match ctx.create(&ns, "create snapshot", &snap).await {
        Ok(created) => {
            tracing::info!(snapshot = %snap_name, slot = %plan::rfc3339(slot), "scheduled run: snapshot created");
            Ok((created, true))
        }
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 409 => {
            let existing = ctx
                .get::<Snapshot>(&ns, "read snapshot", &snap_name)
                .await?
                .ok_or_else(|| Error::Waiting(format!("snapshot {snap_name} is being replaced")))?;
            if holder(&existing, &uid) == Holder::Owner {
                Ok((existing, false))
            } else {
                Err(Error::stalled(
                    "SnapshotNameConflict",
                    format!(
                        "Snapshot {ns}/{snap_name} for the run of {} already exists and does not belong to this schedule; rename or remove it",
                        plan::rfc3339(slot)
                    ),
                ))
            }
        }
        Err(e) => Err(e),
    }
}

async fn reconcile_apply(sched: &SnapshotSchedule, ctx: &Context) -> Result<Action, Error> {
    let now = ctx.clock.now();
    let ns = sched.namespace().unwrap_or_default();
    let uid = sched.uid().unwrap_or_default();
    let spec = &sched.spec;
    let mut status: SnapshotScheduleStatus = sched.status.clone().unwrap_or_default();
    let created = sched
        .meta()
        .creation_timestamp
        .as_ref()
        .map_or(now, |t| t.0);

    let mut owned = owned_snapshots(ctx, sched, &uid).await?;
    for s in owned.iter().filter(|s| is_kept(s)) {
        release(ctx, s, &uid).await?;
    }
    owned.retain(|s| !is_kept(s));

    let mut problem: Option<Outcome> = None;
    let cadence = match (&spec.schedule, &spec.interval) {
        (Some(expr), None) => Cadence::cron(expr, spec.time_zone.as_deref()),
        (None, Some(every)) => Cadence::interval(every, created),
        _ => Err(PlanError::InvalidCron {
            expr: String::new(),
            detail: "set exactly one of schedule (cron) and interval".into(),
        }),
    };
    let mut next = None;
    match cadence {
        Err(e) => problem = Some(Outcome::stalled(e.reason(), e.to_string())),
        Ok(c) => {
            let last = status
                .last_schedule_time
                .as_deref()
                .and_then(crate::point::read_time);
            let due = plan::due(&c, spec.suspend, last, created, now);
            next = due.next;
            if let Some(slot) = due.run {
                if due.skipped_missed {
                    tracing::info!(slot = %plan::rfc3339(slot), "runs were missed; catching up with the latest one only");
                }
                match create_run(ctx, sched, slot, now).await {
                    Ok((snap, fresh)) => {
                        status.last_schedule_time = Some(plan::rfc3339(slot));
                        if fresh {
                            let note = if due.skipped_missed {
                                format!("created Snapshot {} for the run of {} (earlier missed runs were skipped)", snap.name_any(), plan::rfc3339(slot))
                            } else {
                                format!(
                                    "created Snapshot {} for the run of {}",
                                    snap.name_any(),
                                    plan::rfc3339(slot)
                                )
                            };
                            publish(ctx, sched, EventType::Normal, "SnapshotCreated", note).await;
                        }
                        if !owned.iter().any(|o| o.name_any() == snap.name_any()) {
                            owned.push(snap);
                        }
                    }
                    Err(Error::Stalled { reason, message }) => {
                        problem = Some(Outcome::Stalled { reason, message })
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }

    // Retention, also while suspended or blocked.
    let infos: Vec<OwnedSnapshot> = owned.iter().map(owned_info).collect();
    let mut deleted = vec![];
    match RetentionPolicy::from_spec(&spec.retention) {
        Err(e) => {
            problem.get_or_insert(Outcome::stalled(e.reason(), e.to_string()));
        }
        Ok(policy) => {
            let api: Api<Snapshot> = ctx.api(&ns);
            for doomed in plan::prune(&infos, &policy, now) {
                tracing::info!(snapshot = %doomed, "retention: deleting snapshot");
                match with_deadline(
                    ctx,
                    "delete snapshot",
                    api.delete(&doomed, &DeleteParams::background()),
                )
                .await
                {
                    Ok(_) => {}
                    Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => {}
                    Err(e) => return Err(e),
                }
                deleted.push(doomed);
            }
            if !deleted.is_empty() {
                publish(
                    ctx,
                    sched,
                    EventType::Normal,
                    "SnapshotsPruned",
                    format!("retention deleted {}", deleted.join(", ")),
                )
                .await;
            }
        }
    }
    let live: Vec<&Snapshot> = owned
        .iter()
        .filter(|s| s.meta().deletion_timestamp.is_none() && !deleted.contains(&s.name_any()))
        .collect();
    status.active_snapshots = i32::try_from(live.len()).unwrap_or(i32::MAX);
    let newest_ready = live
        .iter()
        .filter(|s| s.status.as_ref().is_some_and(|st| st.ready_to_use))
        .max_by_key(|s| scheduled_at(s));
    if let Some(s) = newest_ready {
        let at = ready_since(s);
        let prev = status
            .last_successful_time
            .as_deref()
            .and_then(crate::point::read_time);
        if prev.is_none_or(|p| at > p) {
            status.last_successful_time = Some(plan::rfc3339(at));
        }
    }
    status.next_schedule_time = next.map(plan::rfc3339);

    // The newest run decides whether the schedule is healthy.
    let newest = live.iter().max_by_key(|s| scheduled_at(s));
    let outcome = match problem {
        Some(p) => p,
        None => match newest.and_then(|s| snapshot_stalled(s).map(|st| (s, st))) {
            Some((s, (reason, message))) if reason == REASON_QUOTA => Outcome::stalled(
                REASON_QUOTA,
                format!(
                    "the run's Snapshot {} is blocked by the snapshot quota ({message}); retention still prunes: lower retention.maxCount, delete snapshots or raise the quota",
                    s.name_any()
                ),
            ),
            Some((s, (reason, message))) => Outcome::stalled(
                "LastRunFailed",
                format!("the run's Snapshot {} failed: {reason}: {message}", s.name_any()),
            ),
            None if spec.suspend => Outcome::ready(
                "Suspended",
                format!("suspended: no runs; retention keeps pruning ({} snapshots)", live.len()),
            ),
            None => Outcome::ready(
                "Scheduled",
                format!(
                    "next run at {}; {} snapshots",
                    status.next_schedule_time.as_deref().unwrap_or("never"),
                    live.len()
                ),
            ),
        },
    };
    conclude(ctx, sched, sched.status.as_ref(), &mut status, &outcome).await?;

    let mut wait = ctx.config.ready_requeue;
    if let Some(n) = next {
        wait = wait.min(plan::until(now, n).max(Duration::from_secs(1)));
    }
    Ok(Action::requeue(wait))
}
