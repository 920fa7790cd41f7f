//! One data-changing operation per branch at a time: a Snapshot being
//! taken of it, or a SnapshotRestore `Restoring` or `Finalizing` it (as
//! source, target, restored or backup branch).
//!
//! The lock holds by construction: both controllers take the one
//! [`OperationLock`] of the operator (leader election makes it the only
//! one), and under it they read the other kind's durable record — the
//! objects' own status, read fresh from the API server, never from a cache
//! — and write their own before letting go:
//!
//! * the Snapshot controller, before `create_snapshot`: no restore holds
//!   the branch ([`restore_holding`]); it records `status.snapshotId` before
//!   releasing, and the snapshot holds the branch until it is ready to use;
//! * the SnapshotRestore controller, before it moves to `Restoring` and
//!   again to `Finalizing`: no snapshot of the branches it changes is being
//!   taken ([`snapshot_being_taken`]); the phase is written before
//!   releasing.
//!
//! So of a Snapshot and a SnapshotRestore of one branch applied together,
//! one goes first and the other waits (`WaitingForRestore` /
//! `WaitingForSnapshot`), whatever the order their reconciles run in.

use kube::ResourceExt;

use super::{Context, Error};
use crate::api::{RestorePhase, Snapshot, SnapshotRestore};

/// The operator's operation lock (see the module docs). The snapshot quota
/// is counted under it too.
#[derive(Debug, Default)]
pub struct OperationLock(tokio::sync::Mutex<()>);

impl OperationLock {
    /// Takes the lock until the guard is dropped.
    pub async fn take(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.0.lock().await
    }
}

/// The restore (if any) that currently changes `branch`'s data: a
/// SnapshotRestore (other than `except_uid`) in `Restoring` or
/// `Finalizing` whose source, target, restored or backup branch is
/// `branch`.
pub async fn restore_holding(
    ctx: &Context,
    ns: &str,
    branch: &str,
    except_uid: Option<&str>,
) -> Result<Option<(String, RestorePhase)>, Error> {
    let list = ctx.list::<SnapshotRestore>(ns, "list restores", "").await?;
    let mut found: Vec<(String, RestorePhase)> = list
        .iter()
        .filter(|r| except_uid.is_none() || r.uid().as_deref() != except_uid)
        .filter_map(|r| {
            let phase = r.status.as_ref().and_then(|s| s.phase)?;
            if !matches!(phase, RestorePhase::Restoring | RestorePhase::Finalizing) {
                return None;
            }
            let st = r.status.as_ref();
            let touches = r.spec.source.branch.as_deref() == Some(branch)
                || r.spec.target.as_deref() == Some(branch)
                || st.and_then(|s| s.restored_branch.as_deref()) == Some(branch)
                || st.and_then(|s| s.backup_branch.as_deref()) == Some(branch);
            touches.then(|| (r.name_any(), phase))
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found.into_iter().next())
}

/// Whether a Snapshot holds a branch: it has a stored snapshot under way
/// (`status.snapshotId` recorded, not yet ready to use, not stalled).
pub fn snapshot_holds(s: &Snapshot) -> bool {
    s.metadata.deletion_timestamp.is_none()
        && s.status.as_ref().is_some_and(|st| {
            st.snapshot_id.is_some()
                && !st.ready_to_use
                && !st
                    .conditions
                    .iter()
                    .any(|c| c.type_ == crate::api::STALLED && c.status == "True")
        })
}

/// The first Snapshot (by name) being taken of one of `branches`.
pub async fn snapshot_being_taken(
    ctx: &Context,
    ns: &str,
    branches: &[&str],
) -> Result<Option<(String, String)>, Error> {
    let list = ctx.list::<Snapshot>(ns, "list snapshots", "").await?;
    let mut found: Vec<(String, String)> = list
        .iter()
        .filter(|s| branches.contains(&s.spec.branch.as_str()) && snapshot_holds(s))
        .map(|s| (s.name_any(), s.spec.branch.clone()))
        .collect();
    found.sort();
    Ok(found.into_iter().next())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{SnapshotSpec, SnapshotStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn snap(id: Option<&str>, ready: bool, stalled: bool) -> Snapshot {
        let mut s = Snapshot::new(
            "s",
            SnapshotSpec {
                branch: "prod".into(),
                ..Default::default()
            },
        );
        s.status = Some(SnapshotStatus {
            snapshot_id: id.map(Into::into),
            ready_to_use: ready,
            conditions: stalled
                .then(|| Condition {
                    type_: "Stalled".into(),
                    status: "True".into(),
                    reason: "SnapshotNotFound".into(),
                    message: String::new(),
                    last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        jiff::Timestamp::UNIX_EPOCH,
                    ),
                    observed_generation: None,
                })
                .into_iter()
                .collect(),
            ..Default::default()
        });
        s
    }

    #[test]
    fn a_snapshot_holds_its_branch_from_its_record_until_ready() {
        assert!(!snapshot_holds(&snap(None, false, false)));
        assert!(snapshot_holds(&snap(Some("a"), false, false)));
        assert!(!snapshot_holds(&snap(Some("a"), true, false)));
        assert!(!snapshot_holds(&snap(Some("a"), false, true)));
    }
}
