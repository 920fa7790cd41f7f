//! The `SnapshotRestore` kind: a one-shot restore of a branch to a snapshot
//! or to a point of a branch's history.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Restore data from a snapshot or a branch's past into a branch. Runs once
/// per object. The spec is immutable except `finalize` false → true.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "pgbranch.dev",
    version = "v1alpha1",
    kind = "SnapshotRestore",
    namespaced,
    status = "SnapshotRestoreStatus",
    shortname = "pgrestore",
    category = "pgbranch"
)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRestoreSpec {
    /// Where the restored data comes from.
    pub source: RestoreSource,
    /// The Branch (same namespace) whose name, Service and Secret move onto
    /// the restored data on finalize. Required when `finalize` is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// True: restore and finalize in one step. False: the restored data
    /// comes up as its own branch for preview; set true later to finalize.
    #[serde(default)]
    pub finalize: bool,
    /// Name of the backup Branch that keeps the target's pre-restore data.
    /// Default `<target>-old-<yyyymmddhhmmss>`. Required when restoring a
    /// branch to its own history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preserve_under_name: Option<String>,
}

/// The source of a restore: a snapshot, or a branch at a point.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSource {
    /// A Snapshot in the same namespace. Exclusive with `branch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// A Branch in the same namespace. Exclusive with `snapshot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// With `branch`: the WAL position to restore to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// With `branch`: the time to restore to (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

/// The phase of a restore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RestorePhase {
    #[default]
    Pending,
    Restoring,
    AwaitingFinalize,
    Finalizing,
    Completed,
    Failed,
}

/// Observed state of a SnapshotRestore.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRestoreStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling` and `Stalled` conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Where the restore is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestorePhase>,
    /// The Branch holding the restored data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_branch: Option<String>,
    /// The storage timeline holding the restored data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_timeline_id: Option<String>,
    /// The Branch keeping the target's pre-restore data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_branch: Option<String>,
    /// The target's UID, resolved when the restore started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_uid: Option<String>,
    /// The target's timeline, resolved when the restore started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_timeline_id: Option<String>,
    /// The last finalize step done (for resuming after a crash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finalize_step: Option<String>,
    /// When the restore started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it completed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    /// What is being done now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
}
