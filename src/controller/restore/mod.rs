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

mod backup;
mod credentials;
mod finalize;
mod restoring;
mod start;

use backup::{create_backup, reparent_children};
use credentials::{set_target_passwords, target_credentials};
use finalize::finalizing;
use restoring::{check_service_owned, restoring, svc_selector_timeline};
use start::start;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::Event as FinalizerEvent;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::apply::{holder, Holder};
use super::operations::snapshot_being_taken;
use super::status::{self, is_ready, merge_diff, outcome_changed, Guard, Outcome};
use super::{secrets, sql};
use super::{with_deadline, Context, Drive, Error, Shutdown};
use crate::api::{
    Branch, BranchSpec, ParentRef, RestorePhase, Snapshot, SnapshotRestore, SnapshotRestoreStatus,
    TimelineHistoryEntry, ANNOTATION_ADOPT_TIMELINE, ANNOTATION_HANDOVER_TO, FIELD_MANAGER,
    LABEL_BRANCH, LABEL_RESTORE, LABEL_RESTORE_BACKUP_OF, LABEL_ROLE, LABEL_TIMELINE, STALLED,
};
use crate::compute::{
    app_secret_name, role_secret_name, secret_suffix, service_name, superuser_secret_name,
};
use crate::storage::TimelineId;

/// The finalizer: a restore is not deleted in the middle of finalizing.
pub const FINALIZER: &str = "pgbranch.dev/restore-cleanup";
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
pub async fn run(ctx: Arc<Context>, shutdown: impl Shutdown) {
    let controller = super::controller_for(ctx.watched::<SnapshotRestore>(), &ctx.config).owns(
        ctx.watched::<Branch>(),
        watcher::Config::default().labels(LABEL_RESTORE),
    );
    let how = Drive::of(KIND, "restore");
    super::drive(controller, ctx, shutdown, how, reconcile).await;
}

async fn reconcile(r: Arc<SnapshotRestore>, ctx: Arc<Context>) -> Result<Action, Error> {
    super::with_finalizer(&ctx, FINALIZER, r, |ev| async {
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
    .await
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
        status::patch_status(self.ctx, self.r, "write restore status", diff, Guard::None).await?;
        if st.phase != self.saved.phase {
            if let Some(p) = st.phase {
                let note = match (p, &st.progress) {
                    (_, Some(pr)) => format!("phase {p:?}: {pr}"),
                    _ => format!("phase {p:?}"),
                };
                self.event(EventType::Normal, &format!("{p:?}"), &note)
                    .await;
            }
        }
        self.saved = st.clone();
        Ok(())
    }

    async fn event(&self, type_: EventType, reason: &str, note: &str) {
        status::publish(self.ctx, self.r, type_, reason, "Restore", note).await;
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
            tracing::warn!(%reason, %message, "stalled");
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
    if st.phase.is_none() {
        st.phase = Some(RestorePhase::Pending);
    }
    status::stamp(&mut st, &done.outcome, r.metadata.generation);
    run.save(&st).await?;
    if outcome_changed(&old_conditions, &done.outcome) {
        status::publish_outcome(ctx, r, &done.outcome, Some("Restore")).await;
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
    ctx.api(ns)
}

fn pg_major_of_branch(b: &Branch) -> Option<i64> {
    b.status.as_ref().and_then(|s| s.pg_major)
}

fn branch_ready(b: &Branch) -> bool {
    b.status
        .as_ref()
        .is_some_and(|s| is_ready(&s.conditions) && s.timeline_id.is_some())
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

    #[test]
    fn steps_parse_and_order() {
        for s in FinalizeStep::ALL {
            assert_eq!(FinalizeStep::parse(s.as_str()), Some(s));
        }
        assert!(FinalizeStep::Passwords < FinalizeStep::Cleanup);
        assert_eq!(FinalizeStep::parse("x"), None);
    }
}
