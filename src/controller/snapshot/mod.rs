//! The Snapshot controller: one storage snapshot per Snapshot object.
//!
//! Apply: expiry (`spec.expiresAt` due → the object deletes itself) →
//! already taken? (`status.snapshotId`: re-read it from storage, status is a
//! cache) → the branch (missing → Stalled `BranchNotFound`; not Ready yet →
//! Reconciling `WaitingForBranch`) → the per-branch operation lock (a
//! SnapshotRestore that is `Restoring` or `Finalizing` the branch, as source,
//! target or restored branch, makes the snapshot wait: Reconciling
//! `WaitingForRestore`, the message names the restore) → the per-namespace
//! quota ([`Config::snapshot_quota`](crate::controller::Config), counted over
//! the Snapshots that hold or are taking a stored snapshot; over it →
//! Stalled `SnapshotQuotaExceeded`, nothing taken) → the point (`lsn` or
//! `timestamp`; invalid or outside the branch's restore window → Stalled
//! `InvalidPoint` / `PointOutsideRestoreWindow`) → `create_snapshot` keyed by
//! the object's UID (a retry or a crash never takes a second one; at head the
//! branch's compute is reached with its superuser Secret so storage can
//! `CHECKPOINT` it first) → polled until Ready → `readyToUse`.
//!
//! The restore check, the quota count and the snapshot creation run under
//! the operator's operation lock ([`super::operations`]), so two Snapshots
//! created together cannot both take the last place, and a Snapshot and a
//! SnapshotRestore of one branch applied together are serialized.
//!
//! Cleanup (finalizer `pgbranch.dev/snapshot-cleanup`): `deletionPolicy:
//! Delete` deletes the stored snapshot (found through status, or by the UID
//! key when status was lost); `Retain` leaves it in storage.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::finalizer::Event as FinalizerEvent;
use kube::{Api, ResourceExt};

use super::expiry::{self, Expiry};
use super::operations::restore_holding;
use super::status::{conclude, is_ready, Outcome};
use super::{with_deadline, Context, Drive, Error, Shutdown};
use crate::api::{Branch, DeletionPolicy, Snapshot, SnapshotStatus};
use crate::storage::{CreateSnapshot, OpKey, Point, SnapshotId, State, StorageError, TimelineId};

/// The finalizer the Snapshot controller puts on every Snapshot.
pub const FINALIZER: &str = "pgbranch.dev/snapshot-cleanup";
const KIND: &str = "Snapshot";

/// Runs the Snapshot controller until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl Shutdown) {
    let controller = super::controller_for(ctx.watched::<Snapshot>(), &ctx.config);
    let how = Drive::of(KIND, "snapshot");
    super::drive(controller, ctx, shutdown, how, reconcile).await;
}

async fn reconcile(snap: Arc<Snapshot>, ctx: Arc<Context>) -> Result<Action, Error> {
    super::with_finalizer(&ctx, FINALIZER, snap, |ev| async {
        match ev {
            FinalizerEvent::Apply(s) => reconcile_apply(s, &ctx).await,
            FinalizerEvent::Cleanup(s) => reconcile_cleanup(s, &ctx).await,
        }
    })
    .await
}

/// Storage errors that will not fix themselves, as Stalled reasons.
pub(crate) fn storage_stalled(e: StorageError, what: &str) -> Error {
    match &e {
        StorageError::InvalidPoint { .. } => Error::stalled(
            "PointOutsideRestoreWindow",
            format!("{what}: the point is outside the restore window: {e}"),
        ),
        StorageError::InvalidArgument { .. } => {
            Error::stalled("InvalidPoint", format!("{what}: {e}"))
        }
        StorageError::NotFound { .. } => Error::stalled("TimelineNotFound", format!("{what}: {e}")),
        StorageError::Conflict { .. } => Error::stalled("StorageConflict", format!("{what}: {e}")),
        StorageError::Unauthorized { .. } => {
            Error::stalled("StorageUnauthorized", format!("{what}: {e}"))
        }
        _ => Error::Storage(e),
    }
}

struct Done {
    outcome: Outcome,
    requeue: Action,
}

async fn reconcile_apply(snap: Arc<Snapshot>, ctx: &Context) -> Result<Action, Error> {
    let mut status = snap.status.clone().unwrap_or_default();
    let result = apply_steps(&snap, ctx, &mut status).await;
    let (done, err) = match result {
        Ok(d) => (d, None),
        Err(Error::Stalled { reason, message }) => {
            tracing::warn!(%reason, %message, "stalled");
            let requeue = Action::requeue(
                if reason == "BranchNotFound" || reason == "SnapshotQuotaExceeded" {
                    Duration::from_secs(30)
                } else {
                    ctx.config.ready_requeue
                },
            );
            (
                Done {
                    outcome: Outcome::stalled(reason, message),
                    requeue,
                },
                None,
            )
        }
        Err(Error::Waiting(what)) => (
            Done {
                outcome: Outcome::progressing("Waiting", what),
                requeue: Action::requeue(ctx.config.poll_interval),
            },
            None,
        ),
        Err(e @ Error::Kube(kube::Error::Api(_))) if e.reason() == "Conflict" => return Err(e),
        Err(e) => (
            Done {
                outcome: Outcome::progressing(e.reason(), e.to_string()),
                requeue: Action::await_change(),
            },
            Some(e),
        ),
    };
    conclude(
        ctx,
        snap.as_ref(),
        snap.status.as_ref(),
        &mut status,
        &done.outcome,
    )
    .await?;
    match err {
        Some(e) => Err(e),
        None => Ok(done.requeue),
    }
}

fn record(status: &mut SnapshotStatus, s: &crate::storage::Snapshot) {
    status.snapshot_id = Some(s.id.to_string());
    status.timeline_id = Some(s.timeline.to_string());
    if s.state == State::Ready {
        status.lsn = s.lsn.map(|l| l.to_string());
        status.created_at = Some(s.created_at.to_string());
        status.size_bytes = Some(i64::try_from(s.size_bytes).unwrap_or(i64::MAX));
        status.pg_major = Some(i64::from(s.pg_major));
        status.ready_to_use = true;
    } else {
        status.ready_to_use = false;
    }
}

async fn apply_steps(
    snap: &Snapshot,
    ctx: &Context,
    status: &mut SnapshotStatus,
) -> Result<Done, Error> {
    let ns = snap.namespace().unwrap_or_default();
    let name = snap.name_any();
    let uid = super::uid_of(snap)?;
    let now = jiff::Timestamp::now();
    let mut requeue = ctx.config.ready_requeue;

    // Expiry.
    if let Some(exp) = &snap.spec.expires_at {
        let exp = crate::point::parse_time("spec.expiresAt", exp)
            .map_err(|e| Error::stalled("InvalidTimestamp", e.to_string()))?;
        let created = expiry::created(snap);
        match expiry::decide(Some(exp), created, now) {
            Expiry::BeforeCreation => return Err(expiry::in_past("Snapshot", exp, created)),
            Expiry::Later(until) => requeue = requeue.min(until + Duration::from_secs(1)),
            Expiry::Never => {}
            Expiry::Due => {
                tracing::info!(expires = %exp, "snapshot expired, deleting it");
                expiry::publish_expired(ctx, snap, exp).await;
                let api: Api<Snapshot> = ctx.api(&ns);
                with_deadline(
                    ctx,
                    "delete expired snapshot",
                    api.delete(&name, &Default::default()),
                )
                .await?;
                return Ok(Done {
                    outcome: Outcome::progressing("Expired", format!("expired at {exp}; deleting")),
                    requeue: Action::await_change(),
                });
            }
        }
    }

    // Taken already (or being taken): storage is the truth.
    if let Some(id) = status.snapshot_id.clone() {
        let id = SnapshotId::new(id)
            .map_err(|e| Error::stalled("SnapshotNotFound", format!("status.snapshotId: {e}")))?;
        let s = match with_deadline(ctx, "get snapshot", ctx.storage.get_snapshot(&id)).await {
            Ok(s) => s,
            Err(Error::Storage(StorageError::NotFound { .. })) => {
                status.ready_to_use = false;
                return Err(Error::stalled(
                    "SnapshotNotFound",
                    format!("snapshot {id} no longer exists in storage"),
                ));
            }
            Err(e) => return Err(e),
        };
        return poll_done(ctx, status, &s, requeue);
    }

    let point = crate::point::parse_point(
        "spec.",
        snap.spec.lsn.as_deref(),
        snap.spec.timestamp.as_deref(),
    )
    .map_err(|e| Error::stalled("InvalidPoint", e.to_string()))?;
    // Under the operation lock, from here to the recorded snapshot: no
    // restore holds the branch, the branch as it is now, the quota, then
    // create and record (see controller::operations).
    let _guard = ctx.operations.take().await;
    if let Some((restore, phase)) = restore_holding(ctx, &ns, &snap.spec.branch, None).await? {
        return Ok(Done {
            outcome: Outcome::progressing(
                "WaitingForRestore",
                format!(
                    "SnapshotRestore {restore} is {phase:?} branch {}; the snapshot is taken when it is done",
                    snap.spec.branch
                ),
            ),
            requeue: Action::requeue(ctx.config.poll_interval),
        });
    }
    let Some(branch) = ctx
        .get::<Branch>(&ns, "read branch", &snap.spec.branch)
        .await?
    else {
        return Err(Error::stalled(
            "BranchNotFound",
            format!("branch {:?} not found in namespace {ns}", snap.spec.branch),
        ));
    };
    let bst = branch.status.clone().unwrap_or_default();
    let Some(timeline) = bst
        .timeline_id
        .clone()
        .filter(|_| is_ready(&bst.conditions))
    else {
        return Ok(Done {
            outcome: Outcome::progressing(
                "WaitingForBranch",
                format!("waiting for branch {} to be Ready", snap.spec.branch),
            ),
            requeue: Action::requeue(ctx.config.poll_interval),
        });
    };
    let timeline = TimelineId::new(timeline)
        .map_err(|e| Error::stalled("TimelineNotFound", format!("branch status: {e}")))?;
    let key = OpKey::new(uid.clone())
        .map_err(|e| Error::stalled("InvalidUid", format!("UID not usable as a key: {e}")))?;
    let source_connection = match point {
        Point::Head => super::secrets::superuser_conn(ctx, &branch).await?,
        _ => None,
    };
    let all = ctx.list::<Snapshot>(&ns, "list snapshots", "").await?;
    let used = all
        .iter()
        .filter(|s| s.uid().as_deref() != Some(uid.as_str()))
        .filter(|s| s.status.as_ref().is_some_and(|st| st.snapshot_id.is_some()))
        .count();
    let quota = ctx.config.snapshot_quota as usize;
    if used >= quota {
        return Err(Error::stalled(
            "SnapshotQuotaExceeded",
            format!(
                "namespace {ns} already has {used} snapshots (limit {quota}); delete a Snapshot to take this one"
            ),
        ));
    }
    tracing::info!(branch = %snap.spec.branch, %point, "taking snapshot");
    let req = CreateSnapshot {
        key,
        timeline,
        point,
        source_connection,
        label: Some(format!("{ns}/{name}")),
    };
    let s = with_deadline(ctx, "create snapshot", ctx.storage.create_snapshot(req))
        .await
        .map_err(|e| match e {
            Error::Storage(s) => storage_stalled(s, &format!("branch {}", snap.spec.branch)),
            e => e,
        })?;
    record(status, &s);
    // Recorded before the lock is released, so the next count sees it.
    let outcome = Outcome::progressing("TakingSnapshot", format!("taking snapshot {}", s.id));
    let mut st = status.clone();
    conclude(ctx, snap, snap.status.as_ref(), &mut st, &outcome).await?;
    drop(_guard);
    *status = st;
    poll_done(ctx, status, &s, requeue)
}

fn poll_done(
    ctx: &Context,
    status: &mut SnapshotStatus,
    s: &crate::storage::Snapshot,
    requeue: Duration,
) -> Result<Done, Error> {
    record(status, s);
    match s.state {
        State::Ready => Ok(Done {
            outcome: Outcome::ready(
                "Ready",
                format!(
                    "snapshot {} of timeline {} at {} is ready to use",
                    s.id,
                    s.timeline,
                    s.lsn.map(|l| l.to_string()).unwrap_or_default()
                ),
            ),
            requeue: Action::requeue(requeue),
        }),
        State::Creating => Ok(Done {
            outcome: Outcome::progressing(
                "TakingSnapshot",
                format!(
                    "storage is taking snapshot {}{}",
                    s.id,
                    s.progress
                        .as_ref()
                        .map(|p| format!(": {}", p.step))
                        .unwrap_or_default()
                ),
            ),
            requeue: Action::requeue(ctx.config.poll_interval),
        }),
        State::Failed => Err(Error::stalled(
            "SnapshotFailed",
            format!(
                "storage could not take snapshot {}: {}",
                s.id,
                s.error.clone().unwrap_or_else(|| "no reason given".into())
            ),
        )),
        State::Deleting => Err(Error::stalled(
            "SnapshotDeleting",
            format!("snapshot {} is being deleted from storage", s.id),
        )),
    }
}

async fn reconcile_cleanup(snap: Arc<Snapshot>, ctx: &Context) -> Result<Action, Error> {
    if snap.spec.deletion_policy == DeletionPolicy::Retain {
        tracing::info!(id = ?snap.status.as_ref().and_then(|s| s.snapshot_id.clone()), "deletionPolicy Retain: keeping the stored snapshot");
        return Ok(Action::await_change());
    }
    let mut ids = vec![];
    match snap.status.as_ref().and_then(|s| s.snapshot_id.clone()) {
        Some(id) => {
            if let Ok(id) = SnapshotId::new(id) {
                ids.push(id);
            }
        }
        None => {
            let uid = snap.uid().unwrap_or_default();
            let all = with_deadline(ctx, "list snapshots", ctx.storage.list_snapshots()).await?;
            ids.extend(
                all.into_iter()
                    .filter(|s| s.key.as_str() == uid)
                    .map(|s| s.id),
            );
        }
    }
    for id in ids {
        tracing::info!(id = %id, "deleting stored snapshot");
        match with_deadline(ctx, "delete snapshot", ctx.storage.delete_snapshot(&id)).await {
            Ok(()) => {}
            Err(Error::Storage(StorageError::Busy { message })) => {
                return Err(Error::Waiting(format!(
                    "snapshot {id} is in use: {message}"
                )))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Action::await_change())
}
