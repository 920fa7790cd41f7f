//! The SnapshotRestore controller: a one-shot restore per object (per UID).
//!
//! # Phases
//!
//! * **Pending** — validation, re-checked until it passes: the source exists
//!   (a ready Snapshot, or a Ready Branch); the target, when named, exists,
//!   is Ready and is not a restore's backup branch (label
//!   `pgbranch.dev/restore-backup-of`); restoring a branch to its own
//!   history needs `preserveUnderName` and a point; the PostgreSQL major of
//!   the source (`status.pgMajor` of the Snapshot or Branch) equals the
//!   target's; the backup branch name is free; no other restore is
//!   finalizing the same target. Then the target is resolved to its UID and
//!   `status.timelineId`, recorded in `status.targetUid` /
//!   `status.targetTimelineId`, together with `restoredBranch`,
//!   `backupBranch` (`preserveUnderName`, else
//!   `<target>-old-<yyyymmddhhmmss>` of the start time, the target's name
//!   shortened so the whole stays a valid 44-character Branch name) and
//!   `startedAt`.
//! * **Restoring** — the restored data comes up as an ordinary Branch R
//!   named like the restore (a Branch of that name not made by this restore
//!   → Stalled `NameTaken`), labelled `pgbranch.dev/restore: <restore>` and
//!   owned by the restore (deleting a restore before it finalizes removes
//!   its preview): `parent {branch, lsn | timestamp}` for a branch source,
//!   `fromSnapshot` for a snapshot source; its compute, roles and databases
//!   are the target's (else the source branch's); its passwords are new.
//!   The restore waits for R to be Ready and records its timeline
//!   (`status.restoredTimelineId`).
//! * **AwaitingFinalize** (`finalize: false`) — Ready, reason
//!   `AwaitingFinalize`: preview R through its own Service `<R>` and Secret
//!   `<R>-app`; set `finalize: true` to go on.
//! * **Finalizing** — before the phase moves here (and again before step
//!   3) the target is checked again (same UID, same timeline, else Stalled
//!   `TargetChanged`, phase Failed, nothing replaced) and its Service must be
//!   the operator's (owner reference to the target Branch, no other field
//!   manager of its selector, no GitOps marker), else Stalled
//!   `ServiceNotOwned` and the restore stays where it was, re-checked every
//!   30 s. A target without a running compute skips the SQL of step 1 (its
//!   controller sets the passwords when the compute starts) and the
//!   adoption of step 4. Then these steps, each idempotent and recorded in
//!   `status.finalizeStep` once done, so an operator restarted at any point
//!   resumes at the right one:
//!   1. `Passwords` — R is marked `pgbranch.dev/handover-to: <target>` (its
//!      controller stops managing it), then over SQL on R's compute the
//!      superuser, app and declared roles get the target's passwords: the
//!      target's Secrets keep working on the restored data.
//!   2. `Backup` — the target's passwords are copied into Secrets for the
//!      backup branch B, and B is created adopting the target's old
//!      timeline (`pgbranch.dev/adopt-timeline`, see
//!      [`crate::controller::branch::handover`]), labelled
//!      `pgbranch.dev/restore-backup-of: <restore>`, no owner reference: it
//!      is never garbage-collected with the restore.
//!   3. `Target` — the target's `status.timelineId` becomes R's timeline,
//!      with a `history` entry (old timeline, restore, time, backup branch),
//!      written with a resourceVersion precondition; the target's Service
//!      selector moves to R's running compute in one patch.
//!   4. `Compute` — the target's controller adopts R's Deployment (found by
//!      its timeline label; no second postgres is ever started on a data
//!      directory) and stops its old compute; B's controller then starts B's
//!      compute on the old timeline. The restore waits for the first part.
//!   5. `Children` — branches whose data came from the target's old
//!      timeline get `status.parentBranch` = B and `status.parentTimelineId`
//!      = the old timeline (their spec is never written).
//!   6. `Cleanup` — R is deleted; its cleanup leaves the timeline and the
//!      Deployment the target now owns.
//! * **Completed** — `completedAt`, Ready. Re-applying the same manifest
//!   does nothing; deleting a Completed restore undoes nothing and leaves
//!   the backup branch. A restore is not deleted while it is Finalizing
//!   (finalizer): the finalize runs to its end first.
//! * **Failed** — the `Stalled` condition says why (`TargetChanged`,
//!   `RestoredBranchFailed`, `NameTaken`).
//!
//! A Snapshot of a branch a restore is Restoring or Finalizing (as source,
//! target, restored or backup branch) waits for it, and a restore waits to
//! start or to finalize while a snapshot of the branches it changes is
//! being taken: both take the operator's operation lock
//! ([`super::operations`]).
//!
//! For tests, [`FailPoint`] stops the operator right after a finalize step
//! is recorded, to check that a restart resumes correctly.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::{watcher, Controller};
use kube::{Api, Resource, ResourceExt};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::apply::{holder, Holder};
use super::branch::handover::ANNOTATION_HANDOVER_TO;
use super::branch::sql;
use super::branch::ANNOTATION_ADOPT_TIMELINE;
use super::operations::snapshot_being_taken;
use super::snapshot::secret_password;
use super::status::{apply_outcome, is_ready, merge_diff, outcome_changed, Outcome};
use super::{error_policy, with_deadline, Context, Error};
use crate::api::{
    Branch, BranchSpec, ParentRef, RestorePhase, Snapshot, SnapshotRestore, SnapshotRestoreStatus,
    TimelineHistoryEntry, FIELD_MANAGER, LABEL_BRANCH, LABEL_RESTORE_BACKUP_OF, LABEL_ROLE,
    LABEL_TIMELINE, STALLED,
};
use crate::compute::{
    app_secret_name, role_secret_name, secret_value, service_name, superuser_secret_name,
};
use crate::storage::TimelineId;

/// The finalizer: a restore is not deleted in the middle of finalizing.
pub const FINALIZER: &str = "pgbranch.dev/restore-cleanup";
/// Label on a restored branch: the SnapshotRestore that made it.
pub const LABEL_RESTORE: &str = "pgbranch.dev/restore";
const KIND: &str = "SnapshotRestore";
/// How many earlier timelines a Branch's `status.history` keeps.
const HISTORY_LEN: usize = 10;
/// Stalled reasons after which the restore is over (phase Failed).
const TERMINAL: &[&str] = &["TargetChanged", "RestoredBranchFailed", "NameTaken"];

/// The finalize steps, in order (`status.finalizeStep` is the last done).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FinalizeStep {
    Passwords,
    Backup,
    Target,
    Compute,
    Children,
    Cleanup,
}

impl FinalizeStep {
    pub const ALL: [FinalizeStep; 6] = [
        FinalizeStep::Passwords,
        FinalizeStep::Backup,
        FinalizeStep::Target,
        FinalizeStep::Compute,
        FinalizeStep::Children,
        FinalizeStep::Cleanup,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FinalizeStep::Passwords => "Passwords",
            FinalizeStep::Backup => "Backup",
            FinalizeStep::Target => "Target",
            FinalizeStep::Compute => "Compute",
            FinalizeStep::Children => "Children",
            FinalizeStep::Cleanup => "Cleanup",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// Test hook: once a restore records `after_step`, `crash` is cancelled
/// (the test's operator shuts down on it) and the reconcile stops there.
#[derive(Debug, Clone)]
pub struct FailPoint {
    pub after_step: FinalizeStep,
    pub crash: CancellationToken,
}

/// Runs the SnapshotRestore controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let client = ctx.client.clone();
    let (restores, branches): (Api<SnapshotRestore>, Api<Branch>) = match &ctx.config.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let mut controller = Controller::new(restores, watcher::Config::default())
        .owns(branches, watcher::Config::default().labels(LABEL_RESTORE))
        .graceful_shutdown_on(shutdown.clone());
    if let Some(every) = ctx.config.resync_interval {
        let ticks = futures::stream::unfold((), move |()| async move {
            tokio::time::sleep(every).await;
            Some(((), ()))
        });
        controller = controller.reconcile_all_on(ticks);
    }
    let store = controller.store();
    let running = controller
        .run(reconcile, error_policy::<SnapshotRestore>, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile did not complete"),
            }
        });
    super::until_stopped(KIND, store, shutdown, running).await;
}

async fn reconcile(r: Arc<SnapshotRestore>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = r.namespace().unwrap_or_default();
    let api: Api<SnapshotRestore> = Api::namespaced(ctx.client.clone(), &ns);
    let res = super::finalizer_result(
        finalizer(&api, FINALIZER, r.clone(), |ev| async {
            match ev {
                FinalizerEvent::Apply(r) => reconcile_apply(&r, &ctx).await.map(|(a, _)| a),
                FinalizerEvent::Cleanup(r) => {
                    let phase = r.status.as_ref().and_then(|s| s.phase);
                    if phase != Some(RestorePhase::Finalizing) {
                        // Deleting a restore undoes nothing.
                        return Ok(Action::await_change());
                    }
                    let (_, phase) = reconcile_apply(&r, &ctx).await?;
                    match phase {
                        RestorePhase::Finalizing => Err(Error::Waiting(
                            "the restore is finalizing; it is deleted once done".into(),
                        )),
                        _ => Ok(Action::await_change()),
                    }
                }
            }
        })
        .await,
    );
    ctx.metrics.reconciled(KIND, started.elapsed());
    if res.is_ok() {
        ctx.record_success(r.as_ref());
    }
    res
}

/// One reconcile: the object, the last status written, helpers to write.
struct Run<'a> {
    ctx: &'a Context,
    r: &'a SnapshotRestore,
    ns: String,
    name: String,
    saved: SnapshotRestoreStatus,
}

impl Run<'_> {
    /// Writes the changed fields of `st` (the restore's status has one
    /// writer: its reconcile, never two at once), with an Event on every
    /// phase change.
    async fn save(&mut self, st: &SnapshotRestoreStatus) -> Result<(), Error> {
        let old = serde_json::to_value(&self.saved)?;
        let new = serde_json::to_value(st)?;
        let Some(diff) = merge_diff(&old, &new) else {
            return Ok(());
        };
        let api: Api<SnapshotRestore> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        with_deadline(
            self.ctx,
            "write restore status",
            api.patch_status(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Merge(&json!({ "status": diff })),
            ),
        )
        .await?;
        self.ctx.metrics.status_write(KIND);
        if st.phase != self.saved.phase {
            if let Some(p) = st.phase {
                let note = match (p, &st.progress) {
                    (_, Some(pr)) => format!("phase {p:?}: {pr}"),
                    _ => format!("phase {p:?}"),
                };
                self.event(EventType::Normal, &format!("{p:?}"), note).await;
            }
        }
        self.saved = st.clone();
        Ok(())
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: "Restore".into(),
            secondary: None,
        };
        if let Err(e) = self
            .ctx
            .recorder
            .publish(&ev, &self.r.object_ref(&()))
            .await
        {
            tracing::warn!(error = %e, "could not publish event");
        }
    }
}

struct Done {
    outcome: Outcome,
    requeue: Action,
}

fn waiting(reason: &str, message: impl Into<String>, after: Duration) -> Done {
    Done {
        outcome: Outcome::progressing(reason, message),
        requeue: Action::requeue(after),
    }
}

async fn reconcile_apply(
    r: &SnapshotRestore,
    ctx: &Context,
) -> Result<(Action, RestorePhase), Error> {
    let mut run = Run {
        ctx,
        r,
        ns: r.namespace().unwrap_or_default(),
        name: r.name_any(),
        saved: r.status.clone().unwrap_or_default(),
    };
    let mut st = run.saved.clone();
    let result = steps(&mut run, &mut st).await;
    let old_conditions = run.saved.conditions.clone();
    let (done, err) = match result {
        Ok(d) => (d, None),
        Err(Error::Stalled { reason, message }) => {
            tracing::warn!(restore = %run.name, %reason, %message, "stalled");
            if TERMINAL.contains(&reason.as_str()) {
                st.phase = Some(RestorePhase::Failed);
            }
            let again = if st.phase == Some(RestorePhase::Failed) {
                Action::await_change()
            } else {
                Action::requeue(Duration::from_secs(30))
            };
            (
                Done {
                    outcome: Outcome::stalled(reason, message),
                    requeue: again,
                },
                None,
            )
        }
        Err(Error::Waiting(what)) => (waiting("Waiting", what, ctx.config.poll_interval), None),
        Err(e) => (
            Done {
                outcome: Outcome::progressing(e.reason(), e.to_string()),
                requeue: Action::await_change(),
            },
            Some(e),
        ),
    };
    let generation = r.metadata.generation;
    st.observed_generation = generation;
    if st.phase.is_none() {
        st.phase = Some(RestorePhase::Pending);
    }
    apply_outcome(
        &mut st.conditions,
        &done.outcome,
        generation,
        jiff::Timestamp::now(),
    );
    run.save(&st).await?;
    if outcome_changed(&old_conditions, &done.outcome) {
        let (type_, reason, msg) = match &done.outcome {
            Outcome::Stalled { reason, message } => (EventType::Warning, reason, message),
            Outcome::Progressing { reason, message } | Outcome::Ready { reason, message } => {
                (EventType::Normal, reason, message)
            }
        };
        run.event(type_, reason, msg.clone()).await;
    }
    let phase = st.phase.unwrap_or_default();
    match err {
        Some(e) => Err(e),
        None => Ok((done.requeue, phase)),
    }
}

/// The Stalled condition recorded in status, as an error.
fn recorded_stall(st: &SnapshotRestoreStatus) -> Error {
    match st.conditions.iter().find(|c| c.type_ == STALLED) {
        Some(c) => Error::stalled(&c.reason, c.message.clone()),
        None => Error::stalled("Failed", "the restore failed"),
    }
}

async fn steps(run: &mut Run<'_>, st: &mut SnapshotRestoreStatus) -> Result<Done, Error> {
    let ctx = run.ctx;
    match st.phase.unwrap_or_default() {
        RestorePhase::Completed => {
            return Ok(Done {
                outcome: Outcome::ready("Completed", completed_message(run.r, st)),
                requeue: Action::await_change(),
            })
        }
        RestorePhase::Failed => return Err(recorded_stall(st)),
        RestorePhase::Pending => start(run, st).await?,
        _ => {}
    }
    if st.phase == Some(RestorePhase::Pending) {
        return Ok(waiting(
            "Pending",
            "waiting to start",
            ctx.config.poll_interval,
        ));
    }
    if matches!(
        st.phase,
        Some(RestorePhase::Restoring) | Some(RestorePhase::AwaitingFinalize)
    ) {
        if let Some(done) = restoring(run, st).await? {
            return Ok(done);
        }
    }
    // Finalizing.
    finalizing(run, st).await
}

fn completed_message(r: &SnapshotRestore, st: &SnapshotRestoreStatus) -> String {
    match &r.spec.target {
        Some(t) => format!(
            "branch {t} now serves the restored data (timeline {}); its old data is on branch {}",
            st.restored_timeline_id.clone().unwrap_or_default(),
            st.backup_branch.clone().unwrap_or_default()
        ),
        None => "restored".into(),
    }
}

/// The default backup name: `<target>-old-<yyyymmddhhmmss>`, the target
/// shortened so the name stays within 44 characters.
pub fn default_backup_name(target: &str, at: jiff::Timestamp) -> String {
    let suffix = format!("-old-{}", at.strftime("%Y%m%d%H%M%S"));
    let room = 44usize.saturating_sub(suffix.len());
    let base: String = target.chars().take(room).collect();
    format!("{}{suffix}", base.trim_end_matches('-'))
}

fn branch_api(ctx: &Context, ns: &str) -> Api<Branch> {
    Api::namespaced(ctx.client.clone(), ns)
}

fn pg_major_of_branch(b: &Branch) -> Option<i64> {
    b.status.as_ref().and_then(|s| s.pg_major)
}

fn branch_ready(b: &Branch) -> bool {
    b.status
        .as_ref()
        .is_some_and(|s| is_ready(&s.conditions) && s.timeline_id.is_some())
}

/// Pending: validate, resolve the target, record, move to Restoring.
async fn start(run: &mut Run<'_>, st: &mut SnapshotRestoreStatus) -> Result<(), Error> {
    let ctx = run.ctx;
    let ns = run.ns.clone();
    let r = run.r;
    let spec = &r.spec;
    let branches = branch_api(ctx, &ns);
    let restore_name = run.name.clone();
    // The operation lock, once the restore knows the branch it changes.
    let mut guard = None;
    if restore_name.len() > 44
        || restore_name.contains('.')
        || restore_name.starts_with(|c: char| c.is_ascii_digit())
    {
        return Err(Error::stalled(
            "InvalidName",
            "the restored branch is named like the SnapshotRestore: use a name of at most 44 characters, without '.', starting with a letter",
        ));
    }

    // Source.
    let source_major = match (&spec.source.snapshot, &spec.source.branch) {
        (Some(s), None) => {
            let api: Api<Snapshot> = Api::namespaced(ctx.client.clone(), &ns);
            let Some(snap) = with_deadline(ctx, "read snapshot", api.get_opt(s)).await? else {
                return Err(Error::stalled(
                    "SourceNotFound",
                    format!("snapshot {s:?} not found in namespace {ns}"),
                ));
            };
            let sst = snap.status.unwrap_or_default();
            if !sst.ready_to_use {
                return Err(Error::Waiting(format!(
                    "waiting for snapshot {s} to be ready to use"
                )));
            }
            sst.pg_major
        }
        (None, Some(b)) => {
            let Some(src) = with_deadline(ctx, "read branch", branches.get_opt(b)).await? else {
                return Err(Error::stalled(
                    "SourceNotFound",
                    format!("branch {b:?} not found in namespace {ns}"),
                ));
            };
            if !branch_ready(&src) {
                return Err(Error::Waiting(format!(
                    "waiting for source branch {b} to be Ready"
                )));
            }
            crate::point::parse_point(
                "spec.source.",
                spec.source.lsn.as_deref(),
                spec.source.timestamp.as_deref(),
            )
            .map_err(|e| Error::stalled("InvalidPoint", e.to_string()))?;
            pg_major_of_branch(&src)
        }
        _ => {
            return Err(Error::stalled(
                "InvalidSource",
                "set exactly one of source.snapshot and source.branch",
            ))
        }
    };

    // Target.
    if spec.finalize && spec.target.is_none() {
        return Err(Error::stalled(
            "TargetRequired",
            "finalize needs spec.target: the Branch to replace is never guessed",
        ));
    }
    let now = jiff::Timestamp::now();
    if let Some(t) = &spec.target {
        let Some(target) = with_deadline(ctx, "read target", branches.get_opt(t)).await? else {
            return Err(Error::stalled(
                "TargetNotFound",
                format!("target branch {t:?} not found in namespace {ns}"),
            ));
        };
        if let Some(of) = target.labels().get(LABEL_RESTORE_BACKUP_OF) {
            return Err(Error::stalled(
                "TargetIsBackup",
                format!("branch {t} is the backup made by restore {of}; name the branch to replace, not a backup"),
            ));
        }
        if target.labels().contains_key(LABEL_RESTORE) {
            return Err(Error::stalled(
                "TargetIsRestore",
                format!("branch {t} is a restore's preview branch; name the branch to replace"),
            ));
        }
        if spec.source.branch.as_deref() == Some(t.as_str()) {
            if spec.preserve_under_name.is_none() {
                return Err(Error::stalled(
                    "PreserveUnderNameRequired",
                    "restoring a branch to its own history needs preserveUnderName: the name of the backup of its current data",
                ));
            }
            if spec.source.lsn.is_none() && spec.source.timestamp.is_none() {
                return Err(Error::stalled(
                    "PointRequired",
                    "restoring a branch to its own history needs source.lsn or source.timestamp",
                ));
            }
        }
        if !branch_ready(&target) {
            return Err(Error::Waiting(format!(
                "waiting for target branch {t} to be Ready"
            )));
        }
        let target_major = pg_major_of_branch(&target);
        if let (Some(s), Some(tm)) = (source_major, target_major) {
            if s != tm {
                return Err(Error::stalled(
                    "PgMajorMismatch",
                    format!("the source holds PostgreSQL {s} data but branch {t} runs PostgreSQL {tm}; restore into a branch of the same major version"),
                ));
            }
        }
        let backup = spec
            .preserve_under_name
            .clone()
            .unwrap_or_else(|| default_backup_name(t, now));
        if let Some(b) = with_deadline(ctx, "read backup", branches.get_opt(&backup)).await? {
            if b.labels().get(LABEL_RESTORE_BACKUP_OF) != Some(&restore_name) {
                return Err(Error::stalled(
                    "BackupNameTaken",
                    format!(
                        "a Branch named {backup} already exists; choose another preserveUnderName"
                    ),
                ));
            }
        }
        // One data-changing operation per branch (controller::operations):
        // under the operation lock until the phase is recorded.
        guard = Some(ctx.operations.take().await);
        let mut touched = vec![t.as_str()];
        touched.extend(spec.source.branch.as_deref());
        if let Some((snap, b)) = snapshot_being_taken(ctx, &ns, &touched).await? {
            return Err(Error::Waiting(format!(
                "Snapshot {snap} of branch {b} is being taken; the restore starts when it is ready"
            )));
        }
        let all: Api<SnapshotRestore> = Api::namespaced(ctx.client.clone(), &ns);
        let others = with_deadline(ctx, "list restores", all.list(&ListParams::default())).await?;
        if let Some(o) = others.items.iter().find(|o| {
            o.uid() != r.uid()
                && o.spec.target.as_deref() == Some(t.as_str())
                && o.status.as_ref().and_then(|s| s.phase) == Some(RestorePhase::Finalizing)
        }) {
            return Err(Error::Waiting(format!(
                "SnapshotRestore {} is finalizing branch {t}",
                o.name_any()
            )));
        }
        let tst = target.status.clone().unwrap_or_default();
        st.target_uid = target.uid();
        st.target_timeline_id = tst.timeline_id;
        st.backup_branch = Some(backup);
    }
    st.restored_branch = Some(restore_name);
    st.started_at = Some(now.to_string());
    st.phase = Some(RestorePhase::Restoring);
    st.progress = Some("creating the restored branch".into());
    run.save(st).await?;
    drop(guard);
    Ok(())
}

/// Restoring / AwaitingFinalize. `Some(done)`: stop here this pass.
async fn restoring(
    run: &mut Run<'_>,
    st: &mut SnapshotRestoreStatus,
) -> Result<Option<Done>, Error> {
    let ctx = run.ctx;
    let ns = run.ns.clone();
    let r = run.r;
    let branches = branch_api(ctx, &ns);
    let rname = st
        .restored_branch
        .clone()
        .unwrap_or_else(|| run.name.clone());
    let existing = with_deadline(ctx, "read restored branch", branches.get_opt(&rname)).await?;
    let rb = match existing {
        Some(b) => {
            let ours = b.labels().get(LABEL_RESTORE) == Some(&run.name)
                && b.owner_references()
                    .iter()
                    .any(|o| Some(&o.uid) == r.uid().as_ref());
            if !ours {
                return Err(Error::stalled(
                    "NameTaken",
                    format!("a Branch named {rname} already exists and was not made by this restore; the restored branch takes the restore's name: use another SnapshotRestore name"),
                ));
            }
            b
        }
        None => {
            let b = restored_branch_object(run, &rname).await?;
            tracing::info!(restore = %run.name, branch = %rname, "creating the restored branch");
            with_deadline(
                ctx,
                "create restored branch",
                branches.create(&PostParams::default(), &b),
            )
            .await?
        }
    };
    let rst = rb.status.clone().unwrap_or_default();
    if let Some(c) = rst
        .conditions
        .iter()
        .find(|c| c.type_ == STALLED && c.status == "True")
    {
        return Err(Error::stalled(
            "RestoredBranchFailed",
            format!(
                "the restored branch {rname} is stalled: {}: {}",
                c.reason, c.message
            ),
        ));
    }
    if !branch_ready(&rb) {
        st.progress = Some(format!(
            "waiting for the restored branch {rname} to be Ready"
        ));
        return Ok(Some(waiting(
            "Restoring",
            format!("restoring into branch {rname}"),
            ctx.config.poll_interval,
        )));
    }
    st.restored_timeline_id = rst.timeline_id.clone();
    if !r.spec.finalize {
        st.phase = Some(RestorePhase::AwaitingFinalize);
        st.progress = Some(format!(
            "preview branch {rname} is Ready; set spec.finalize: true to finalize"
        ));
        return Ok(Some(Done {
            outcome: Outcome::ready(
                "AwaitingFinalize",
                format!(
                    "the restored data is on branch {rname} (Service {}, Secret {}); set spec.finalize: true to move {} onto it",
                    service_name(&rname),
                    app_secret_name(&rname),
                    r.spec.target.clone().unwrap_or_else(|| "a target".into())
                ),
            ),
            requeue: Action::requeue(ctx.config.ready_requeue),
        }));
    }
    if r.spec.target.is_none() {
        return Err(Error::stalled(
            "TargetRequired",
            "finalize needs spec.target: the Branch to replace is never guessed",
        ));
    }
    if st.target_uid.is_none() {
        // A multi-step restore created without a target cannot get one
        // (the spec is immutable); CEL refuses this, check anyway.
        return Err(Error::stalled(
            "TargetRequired",
            "the target was not resolved when the restore started",
        ));
    }
    // Checked before the phase moves: a restore refused here is not
    // Finalizing (its deletion is not held back).
    precheck(run, st).await?;
    // Under the operation lock until the phase is recorded: no snapshot of
    // the target or the restored branch is being taken.
    let _guard = ctx.operations.take().await;
    let target = r.spec.target.clone().unwrap_or_default();
    if let Some((snap, b)) = snapshot_being_taken(ctx, &ns, &[target.as_str(), &rname]).await? {
        return Err(Error::Waiting(format!(
            "Snapshot {snap} of branch {b} is being taken; finalizing starts when it is ready"
        )));
    }
    st.phase = Some(RestorePhase::Finalizing);
    st.progress = Some("finalizing".into());
    run.save(st).await?;
    Ok(None)
}

/// The target is still the one resolved at the start (same UID, same
/// timeline) and its Service is the operator's to retarget.
async fn precheck(run: &Run<'_>, st: &SnapshotRestoreStatus) -> Result<(), Error> {
    let ctx = run.ctx;
    let tname = run.r.spec.target.clone().unwrap_or_default();
    let branches = branch_api(ctx, &run.ns);
    let target = with_deadline(ctx, "read target", branches.get_opt(&tname)).await?;
    let Some(target) = target.filter(|t| t.uid() == st.target_uid) else {
        return Err(Error::stalled(
            "TargetChanged",
            format!("branch {tname} was deleted or created again since the restore started; nothing was replaced"),
        ));
    };
    let current = target.status.as_ref().and_then(|s| s.timeline_id.clone());
    if current != st.target_timeline_id {
        return Err(Error::stalled(
            "TargetChanged",
            format!(
                "branch {tname} moved to timeline {} since the restore started (it was on {}); nothing was replaced",
                current.unwrap_or_default(),
                st.target_timeline_id.clone().unwrap_or_default()
            ),
        ));
    }
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &run.ns);
    let svc = with_deadline(ctx, "read service", services.get_opt(&service_name(&tname))).await?;
    check_service_owned(
        svc.as_ref(),
        &target,
        st.target_uid.as_deref().unwrap_or_default(),
    )
}

/// The restored Branch R.
async fn restored_branch_object(run: &Run<'_>, rname: &str) -> Result<Branch, Error> {
    let ctx = run.ctx;
    let r = run.r;
    let branches = branch_api(ctx, &run.ns);
    // Compute, roles and databases: the target's, else the source branch's.
    let like = match (&r.spec.target, &r.spec.source.branch) {
        (Some(t), _) | (None, Some(t)) => {
            with_deadline(ctx, "read branch", branches.get_opt(t)).await?
        }
        _ => None,
    };
    let mut spec = BranchSpec::default();
    if let Some(l) = &like {
        spec.compute = l.spec.compute.clone();
        spec.roles = l.spec.roles.clone();
        spec.databases = l.spec.databases.clone();
    }
    if let Some(s) = &r.spec.source.snapshot {
        spec.from_snapshot = Some(s.clone());
    }
    if let Some(b) = &r.spec.source.branch {
        spec.parent = Some(ParentRef {
            branch: b.clone(),
            lsn: r.spec.source.lsn.clone(),
            timestamp: r.spec.source.timestamp.clone(),
        });
    }
    let mut b = Branch::new(rname, spec);
    b.metadata.namespace = Some(run.ns.clone());
    b.metadata.labels = Some(BTreeMap::from([(
        LABEL_RESTORE.to_string(),
        run.name.clone(),
    )]));
    let oref = r
        .controller_owner_ref(&())
        .ok_or_else(|| Error::stalled("InvalidObject", "the SnapshotRestore has no UID"))?;
    b.metadata.owner_references = Some(vec![oref]);
    Ok(b)
}

fn last_step(st: &SnapshotRestoreStatus) -> Option<FinalizeStep> {
    st.finalize_step.as_deref().and_then(FinalizeStep::parse)
}

/// Records a finished step; honours the fail point.
async fn step_done(
    run: &mut Run<'_>,
    st: &mut SnapshotRestoreStatus,
    step: FinalizeStep,
) -> Result<(), Error> {
    st.finalize_step = Some(step.as_str().into());
    st.progress = Some(format!("finalize step {} done", step.as_str()));
    run.save(st).await?;
    tracing::info!(restore = %run.name, step = step.as_str(), "finalize step done");
    run.event(
        EventType::Normal,
        "FinalizeStep",
        format!("finalize step {} done", step.as_str()),
    )
    .await;
    if let Some(fp) = &run.ctx.config.restore_fail_point {
        if fp.after_step == step {
            tracing::warn!(restore = %run.name, step = step.as_str(), "fail point reached: stopping the operator");
            fp.crash.cancel();
            return Err(Error::Waiting(format!(
                "fail point after {}",
                step.as_str()
            )));
        }
    }
    Ok(())
}

fn svc_selector_timeline(svc: &Service) -> Option<String> {
    svc.spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .and_then(|s| s.get(LABEL_TIMELINE))
        .cloned()
}

/// The target's Service must be the operator's to retarget.
fn check_service_owned(svc: Option<&Service>, target: &Branch, uid: &str) -> Result<(), Error> {
    let name = target.name_any();
    let Some(svc) = svc else {
        return Err(Error::stalled(
            "ServiceNotOwned",
            format!("branch {name} has no Service {name} to retarget"),
        ));
    };
    if holder(svc, uid) != Holder::Owner {
        return Err(Error::stalled(
            "ServiceNotOwned",
            format!("Service {name} is not controlled by branch {name}; the operator never retargets a Service it does not own"),
        ));
    }
    let foreign = svc.managed_fields().iter().find(|m| {
        m.manager.as_deref() != Some(FIELD_MANAGER)
            && m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.to_string().contains("f:selector"))
    });
    if let Some(m) = foreign {
        return Err(Error::stalled(
            "ServiceNotOwned",
            format!(
                "the selector of Service {name} is also managed by {:?}; the operator never retargets a Service another tool manages",
                m.manager.clone().unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

async fn finalizing(run: &mut Run<'_>, st: &mut SnapshotRestoreStatus) -> Result<Done, Error> {
    let ctx = run.ctx;
    let ns = run.ns.clone();
    let r = run.r;
    let branches = branch_api(ctx, &ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let deploys: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let tname = r.spec.target.clone().unwrap_or_default();
    let rname = st.restored_branch.clone().unwrap_or_default();
    let bname = st.backup_branch.clone().unwrap_or_default();
    let bad = |what: &str| {
        Error::stalled(
            "InvalidStatus",
            format!("status.{what} is missing or invalid"),
        )
    };
    let t_new = st
        .restored_timeline_id
        .clone()
        .and_then(|t| TimelineId::new(t).ok())
        .ok_or_else(|| bad("restoredTimelineId"))?;
    let t_old = st
        .target_timeline_id
        .clone()
        .and_then(|t| TimelineId::new(t).ok())
        .ok_or_else(|| bad("targetTimelineId"))?;
    let target_uid = st.target_uid.clone().ok_or_else(|| bad("targetUid"))?;
    let last = last_step(st);
    let done_through = |s: FinalizeStep| last.is_some_and(|l| l >= s);

    // The target, checked again before anything is replaced.
    let target = match with_deadline(ctx, "read target", branches.get_opt(&tname)).await? {
        Some(t) if t.uid().as_deref() == Some(target_uid.as_str()) => t,
        Some(_) => {
            return Err(Error::stalled(
                "TargetChanged",
                format!("branch {tname} was deleted and created again since the restore started; nothing was replaced"),
            ))
        }
        None => {
            return Err(Error::stalled(
                "TargetChanged",
                format!("branch {tname} was deleted since the restore started; nothing was replaced"),
            ))
        }
    };
    let t_current = target.status.as_ref().and_then(|s| s.timeline_id.clone());
    // Before step 3 the target is on its old timeline (or already on the
    // new one when the operator stopped between the write and the record).
    let cur = t_current.as_deref();
    let on_expected = cur == Some(t_new.as_str())
        || (!done_through(FinalizeStep::Target) && cur == Some(t_old.as_str()));
    if !on_expected {
        return Err(Error::stalled(
            "TargetChanged",
            format!(
                "branch {tname} moved to timeline {} since the restore started (it was on {t_old}); nothing was replaced",
                t_current.unwrap_or_default()
            ),
        ));
    }
    let live_svc =
        with_deadline(ctx, "read service", services.get_opt(&service_name(&tname))).await?;
    if !done_through(FinalizeStep::Target) {
        check_service_owned(live_svc.as_ref(), &target, &target_uid)?;
    }

    // 1. Passwords.
    if !done_through(FinalizeStep::Passwords) {
        let Some(rb) = with_deadline(ctx, "read restored branch", branches.get_opt(&rname)).await?
        else {
            return Err(Error::stalled(
                "RestoredBranchFailed",
                format!("the restored branch {rname} is gone"),
            ));
        };
        if rb.annotations().get(ANNOTATION_HANDOVER_TO) != Some(&tname) {
            let patch = json!({"metadata": {"annotations": {ANNOTATION_HANDOVER_TO: tname}}});
            with_deadline(
                ctx,
                "mark restored branch",
                branches.patch(&rname, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await?;
        }
        set_target_passwords(run, &target, &rname).await?;
        step_done(run, st, FinalizeStep::Passwords).await?;
    }

    // 2. Backup branch adopting the old timeline.
    if !done_through(FinalizeStep::Backup) {
        create_backup(run, &target, &bname).await?;
        step_done(run, st, FinalizeStep::Backup).await?;
    }

    // 3. The target points at the restored timeline; its Service follows.
    if !done_through(FinalizeStep::Target) {
        check_service_owned(live_svc.as_ref(), &target, &target_uid)?;
        if target
            .status
            .as_ref()
            .and_then(|s| s.timeline_id.as_deref())
            != Some(t_new.as_str())
        {
            let mut history = target.status.clone().unwrap_or_default().history;
            history.insert(
                0,
                TimelineHistoryEntry {
                    timeline_id: t_old.to_string(),
                    replaced_by: run.name.clone(),
                    replaced_at: jiff::Timestamp::now().to_string(),
                    backup_branch: Some(bname.clone()),
                },
            );
            history.truncate(HISTORY_LEN);
            let patch = json!({
                "metadata": {"resourceVersion": target.resource_version()},
                "status": {"timelineId": t_new.to_string(), "history": history},
            });
            tracing::info!(restore = %run.name, target = %tname, from = %t_old, to = %t_new, "moving the target to the restored timeline");
            with_deadline(
                ctx,
                "move target",
                branches.patch_status(
                    &tname,
                    &PatchParams::apply(FIELD_MANAGER),
                    &Patch::Merge(&patch),
                ),
            )
            .await?;
        }
        // The selector of the Deployment that serves t_new, in one patch.
        let list = with_deadline(
            ctx,
            "list computes",
            deploys.list(&ListParams::default().labels(&format!(
                // Read replicas follow a primary: never the compute.
                "{LABEL_TIMELINE}={t_new},{LABEL_ROLE}!=replica"
            ))),
        )
        .await?;
        let sel = list
            .items
            .iter()
            .find(|d| d.metadata.deletion_timestamp.is_none())
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.selector.match_labels.clone());
        if let (Some(sel), Some(svc)) = (sel, live_svc.as_ref()) {
            let mut want: serde_json::Map<String, Value> = sel
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            if let Some(old) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) {
                for k in old.keys() {
                    want.entry(k.clone()).or_insert(Value::Null);
                }
            }
            with_deadline(
                ctx,
                "retarget service",
                services.patch(
                    &service_name(&tname),
                    &PatchParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &Patch::Merge(&json!({"spec": {"selector": want}})),
                ),
            )
            .await?;
        }
        step_done(run, st, FinalizeStep::Target).await?;
    }

    // 4. The target's controller adopts the compute and stops the old one.
    if !done_through(FinalizeStep::Compute) {
        let svc =
            with_deadline(ctx, "read service", services.get_opt(&service_name(&tname))).await?;
        let on_new =
            svc.as_ref().and_then(svc_selector_timeline).as_deref() == Some(t_new.as_str());
        let old = with_deadline(
            ctx,
            "list computes",
            deploys.list(&ListParams::default().labels(&format!(
                // Read replicas follow a primary: never the compute.
                "{LABEL_TIMELINE}={t_old},{LABEL_ROLE}!=replica"
            ))),
        )
        .await?;
        let old_running = old
            .items
            .iter()
            .any(|d| d.labels().get(LABEL_BRANCH) == Some(&tname));
        let new = with_deadline(
            ctx,
            "list computes",
            deploys.list(&ListParams::default().labels(&format!(
                // Read replicas follow a primary: never the compute.
                "{LABEL_TIMELINE}={t_new},{LABEL_ROLE}!=replica"
            ))),
        )
        .await?;
        let runs = target.spec.compute.enabled && !target.spec.compute.suspended;
        let adopted = !runs
            || new
                .items
                .iter()
                .any(|d| holder(d, &target_uid) == Holder::Owner);
        if !(on_new && !old_running && adopted) {
            st.progress = Some(format!(
                "waiting for branch {tname} to take over the compute of timeline {t_new} and stop the one of {t_old}"
            ));
            return Ok(waiting(
                "Finalizing",
                format!("handing the compute of timeline {t_new} to branch {tname}"),
                Duration::from_millis(500).min(ctx.config.poll_interval),
            ));
        }
        step_done(run, st, FinalizeStep::Compute).await?;
    }

    // 5. Children of the old timeline now descend from the backup branch.
    if !done_through(FinalizeStep::Children) {
        reparent_children(run, &tname, &rname, &bname, &t_old).await?;
        step_done(run, st, FinalizeStep::Children).await?;
    }

    // 6. The restored branch goes (its timeline and compute stay the target's).
    if !done_through(FinalizeStep::Cleanup) {
        if let Some(rb) =
            with_deadline(ctx, "read restored branch", branches.get_opt(&rname)).await?
        {
            if rb.labels().get(LABEL_RESTORE) == Some(&run.name) {
                if rb.metadata.deletion_timestamp.is_none() {
                    with_deadline(
                        ctx,
                        "delete restored branch",
                        branches.delete(&rname, &DeleteParams::background()),
                    )
                    .await?;
                }
                st.progress = Some(format!("removing the restored branch {rname}"));
                return Ok(waiting(
                    "Finalizing",
                    format!("removing the restored branch {rname}"),
                    Duration::from_millis(500).min(ctx.config.poll_interval),
                ));
            }
        }
        step_done(run, st, FinalizeStep::Cleanup).await?;
    }

    st.phase = Some(RestorePhase::Completed);
    st.completed_at = Some(jiff::Timestamp::now().to_string());
    st.progress = None;
    Ok(Done {
        outcome: Outcome::ready("Completed", completed_message(r, st)),
        requeue: Action::await_change(),
    })
}

async fn secret(ctx: &Context, ns: &str, name: &str) -> Result<Option<Secret>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    with_deadline(ctx, "read secret", api.get_opt(name)).await
}

/// `(user, password)` of a credentials Secret.
async fn creds(ctx: &Context, ns: &str, name: &str) -> Result<Option<(String, String)>, Error> {
    Ok(secret(ctx, ns, name)
        .await?
        .and_then(|s| Some((secret_value(&s, "user")?, secret_value(&s, "password")?))))
}

/// The target's credential Secrets: `(secret name suffix, user, password)`.
async fn target_credentials(
    ctx: &Context,
    ns: &str,
    target: &Branch,
) -> Result<Vec<(String, String, String)>, Error> {
    let t = target.name_any();
    let mut out = vec![];
    let Some(su) = secret_password(ctx, ns, &superuser_secret_name(&t)).await? else {
        return Err(Error::stalled(
            "SecretNotFound",
            format!(
                "the target's Secret {} is missing",
                superuser_secret_name(&t)
            ),
        ));
    };
    out.push(("superuser".to_string(), "postgres".to_string(), su));
    if let Some((u, p)) = creds(ctx, ns, &app_secret_name(&t)).await? {
        out.push(("app".to_string(), u, p));
    }
    for role in target.spec.roles.iter().skip(1) {
        let suffix = super::branch::validate::secret_suffix(&role.name);
        if let Some((u, p)) = creds(ctx, ns, &role_secret_name(&t, &suffix)).await? {
            out.push((suffix, u, p));
        }
    }
    Ok(out)
}

/// Step 1: the restored data gets the target's passwords.
async fn set_target_passwords(run: &Run<'_>, target: &Branch, rname: &str) -> Result<(), Error> {
    let ctx = run.ctx;
    let ns = &run.ns;
    if !target.spec.compute.enabled || target.spec.compute.suspended {
        // The restored branch has the target's compute spec: nothing runs.
        // The target's controller sets its passwords when its compute next
        // starts (the data's source branch's password is its fallback).
        tracing::info!(restore = %run.name, "no compute runs: passwords are set when the target's compute starts");
        return Ok(());
    }
    let all = target_credentials(ctx, ns, target).await?;
    let su = all[0].2.clone();
    let mut fallback = vec![];
    if let Some(p) = secret_password(ctx, ns, &superuser_secret_name(rname)).await? {
        fallback.push(p);
    }
    let mut roles: Vec<(String, String)> = vec![];
    for (_, user, pw) in all.iter().skip(1) {
        if user != "postgres" && !roles.iter().any(|(u, _)| u == user) {
            roles.push((user.clone(), pw.clone()));
        }
    }
    let (host, port) = ctx.resolver.resolve(ns, &service_name(rname)).await?;
    let plan = sql::SqlPlan {
        host,
        port,
        superuser_password: su,
        fallback_passwords: fallback,
        roles,
        databases: vec![],
        reset_other_logins: false,
        manage_roles_of: None,
    };
    let timeout = ctx.config.step_timeout;
    match tokio::time::timeout(timeout, sql::apply(&plan, timeout)).await {
        Ok(r) => {
            r?;
        }
        Err(_) => {
            return Err(Error::Timeout {
                step: "set the target's passwords on the restored data",
                secs: timeout.as_secs(),
            })
        }
    }
    tracing::info!(restore = %run.name, branch = %rname, "the restored data holds the target's passwords");
    Ok(())
}

/// Step 2: Secrets with the target's passwords, then the backup Branch.
async fn create_backup(run: &Run<'_>, target: &Branch, bname: &str) -> Result<(), Error> {
    let ctx = run.ctx;
    let ns = &run.ns;
    let branches = branch_api(ctx, ns);
    let existing = with_deadline(ctx, "read backup", branches.get_opt(bname)).await?;
    if let Some(b) = &existing {
        if b.labels().get(LABEL_RESTORE_BACKUP_OF) != Some(&run.name) {
            return Err(Error::stalled(
                "BackupNameTaken",
                format!("a Branch named {bname} already exists; it was not made by this restore"),
            ));
        }
        return Ok(());
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    for (suffix, user, pw) in target_credentials(ctx, ns, target).await? {
        let name = match suffix.as_str() {
            "superuser" => superuser_secret_name(bname),
            "app" => app_secret_name(bname),
            s => role_secret_name(bname, s),
        };
        if secret(ctx, ns, &name).await?.is_some() {
            continue;
        }
        // Same type as the target's (a Secret's type is immutable, and the
        // backup branch's controller re-applies its own Secrets).
        let source = match suffix.as_str() {
            "superuser" => superuser_secret_name(&target.name_any()),
            "app" => app_secret_name(&target.name_any()),
            s => role_secret_name(&target.name_any(), s),
        };
        let type_ = secret(ctx, ns, &source)
            .await?
            .and_then(|s| s.type_)
            .unwrap_or_else(|| "Opaque".into());
        let s = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(BTreeMap::from([(
                    LABEL_BRANCH.to_string(),
                    bname.to_string(),
                )])),
                ..Default::default()
            },
            type_: Some(type_),
            data: Some(BTreeMap::from([
                ("user".to_string(), ByteString(user.into_bytes())),
                ("password".to_string(), ByteString(pw.into_bytes())),
            ])),
            ..Default::default()
        };
        match with_deadline(
            ctx,
            "create secret",
            secrets.create(&PostParams::default(), &s),
        )
        .await
        {
            Ok(_) => {}
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    let spec = BranchSpec {
        compute: target.spec.compute.clone(),
        roles: target.spec.roles.clone(),
        databases: target.spec.databases.clone(),
        ..Default::default()
    };
    let mut b = Branch::new(bname, spec);
    b.metadata.namespace = Some(ns.clone());
    b.metadata.labels = Some(BTreeMap::from([(
        LABEL_RESTORE_BACKUP_OF.to_string(),
        run.name.clone(),
    )]));
    let t_old = target
        .status
        .as_ref()
        .and_then(|s| s.timeline_id.clone())
        .unwrap_or_default();
    b.metadata.annotations = Some(BTreeMap::from([(
        ANNOTATION_ADOPT_TIMELINE.to_string(),
        t_old,
    )]));
    tracing::info!(restore = %run.name, backup = %bname, "creating the backup branch");
    match with_deadline(
        ctx,
        "create backup branch",
        branches.create(&PostParams::default(), &b),
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Step 5: branches copied from the target's old timeline now descend from
/// the backup branch (status only).
async fn reparent_children(
    run: &Run<'_>,
    tname: &str,
    rname: &str,
    bname: &str,
    t_old: &TimelineId,
) -> Result<(), Error> {
    let ctx = run.ctx;
    let branches = branch_api(ctx, &run.ns);
    let all = with_deadline(ctx, "list branches", branches.list(&ListParams::default())).await?;
    for b in all.items {
        let name = b.name_any();
        if name == tname || name == rname || name == bname {
            continue;
        }
        let st = b.status.clone().unwrap_or_default();
        let parent = st
            .parent_branch
            .clone()
            .or_else(|| b.spec.parent.as_ref().map(|p| p.branch.clone()));
        if parent.as_deref() != Some(tname) {
            continue;
        }
        let from_old = match &st.parent_timeline_id {
            Some(p) => p == t_old.as_str(),
            None => match st.timeline_id.clone().and_then(|t| TimelineId::new(t).ok()) {
                Some(tl) => {
                    match with_deadline(ctx, "get timeline", ctx.storage.get_timeline(&tl)).await {
                        Ok(t) => t.lineage.parent.as_ref() == Some(t_old),
                        Err(_) => false,
                    }
                }
                None => false,
            },
        };
        if !from_old {
            continue;
        }
        tracing::info!(restore = %run.name, child = %name, backup = %bname, "re-parenting child branch to the backup");
        let patch = json!({
            "metadata": {"resourceVersion": b.resource_version()},
            "status": {"parentBranch": bname, "parentTimelineId": t_old.to_string()},
        });
        with_deadline(
            ctx,
            "re-parent child",
            branches.patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Merge(&patch),
            ),
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_names_fit_a_branch_name() {
        let at: jiff::Timestamp = "2026-01-02T03:04:05Z".parse().unwrap();
        assert_eq!(default_backup_name("prod", at), "prod-old-20260102030405");
        let long = "a".repeat(44);
        let n = default_backup_name(&long, at);
        assert_eq!(n.len(), 44);
        assert!(n.ends_with("-old-20260102030405"));
        assert_eq!(
            default_backup_name("abcdefghijklmnopqrstuvwxy-z", at),
            "abcdefghijklmnopqrstuvwxy-old-20260102030405"
        );
    }

    fn svc_of(owner_uid: Option<&str>, manager: Option<(&str, &str)>) -> Service {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
            FieldsV1, ManagedFieldsEntry, OwnerReference,
        };
        let mut s = Service::default();
        s.metadata.name = Some("prod".into());
        if let Some(uid) = owner_uid {
            s.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "pgbranch.dev/v1alpha1".into(),
                kind: "Branch".into(),
                name: "prod".into(),
                uid: uid.into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]);
        }
        if let Some((m, fields)) = manager {
            s.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
                manager: Some(m.into()),
                fields_v1: Some(FieldsV1(serde_json::from_str(fields).unwrap())),
                ..Default::default()
            }]);
        }
        s
    }

    #[test]
    fn only_the_operators_service_is_retargeted() {
        let t = Branch::new("prod", BranchSpec::default());
        let reason = |r: Result<(), Error>| r.err().map(|e| e.reason());
        assert_eq!(
            reason(check_service_owned(None, &t, "u1")).as_deref(),
            Some("ServiceNotOwned")
        );
        assert_eq!(
            reason(check_service_owned(
                Some(&svc_of(Some("u1"), None)),
                &t,
                "u1"
            )),
            None
        );
        assert_eq!(
            reason(check_service_owned(
                Some(&svc_of(Some("u2"), None)),
                &t,
                "u1"
            ))
            .as_deref(),
            Some("ServiceNotOwned")
        );
        assert_eq!(
            reason(check_service_owned(Some(&svc_of(None, None)), &t, "u1")).as_deref(),
            Some("ServiceNotOwned")
        );
        let ours = r#"{"f:spec":{"f:selector":{}}}"#;
        assert_eq!(
            reason(check_service_owned(
                Some(&svc_of(Some("u1"), Some((FIELD_MANAGER, ours)))),
                &t,
                "u1"
            )),
            None
        );
        assert_eq!(
            reason(check_service_owned(
                Some(&svc_of(Some("u1"), Some(("argocd-controller", ours)))),
                &t,
                "u1"
            ))
            .as_deref(),
            Some("ServiceNotOwned")
        );
        let labels_only = r#"{"f:metadata":{"f:labels":{"f:team":{}}}}"#;
        assert_eq!(
            reason(check_service_owned(
                Some(&svc_of(Some("u1"), Some(("kubectl", labels_only)))),
                &t,
                "u1"
            )),
            None
        );
    }

    #[test]
    fn steps_parse_and_order() {
        for s in FinalizeStep::ALL {
            assert_eq!(FinalizeStep::parse(s.as_str()), Some(s));
        }
        assert!(FinalizeStep::Passwords < FinalizeStep::Cleanup);
        assert_eq!(FinalizeStep::parse("x"), None);
    }
}
