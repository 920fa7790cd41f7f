//! The `SnapshotRestore` kind: a one-shot restore of a branch to a snapshot
//! or to a point of a branch's history.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::*;

/// Restore data from a snapshot or a branch's past into a branch. Runs once
/// per object. The spec is immutable except `finalize` false → true.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "pgbranch.dev",
    version = "v1alpha1",
    kind = "SnapshotRestore",
    namespaced,
    status = "SnapshotRestoreStatus",
    shortname = "pgrestore",
    category = "pgbranch",
    cel,
    selectable = ".spec.target",
    selectable = ".spec.source.snapshot",
    selectable = ".spec.source.branch",
    doc = "A one-shot restore of a Snapshot, or of a point of a Branch's history, into a branch. With finalize the target Branch keeps its name, Service and Secret and moves onto the restored data; its old data lives on as a backup Branch. The spec is immutable except finalize, which may go from false to true. Deleting the object never undoes a restore.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Source",
        type_ = "string",
        description = "The Snapshot or Branch restored from",
        json_path = ".spec.source['snapshot','branch']"
    ),
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.target"),
    printcolumn(
        name = "Finalize",
        type_ = "boolean",
        priority = 1,
        json_path = ".spec.finalize"
    ),
    printcolumn(
        name = "Restored",
        type_ = "string",
        description = "The Branch holding the restored data",
        json_path = ".status.restoredBranch"
    ),
    printcolumn(
        name = "Backup",
        type_ = "string",
        priority = 1,
        description = "The Branch keeping the target's old data",
        json_path = ".status.backupBranch"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.finalize) && self.finalize) || has(self.target)").message("target is required when finalize is true: name the Branch to replace").field_path(".target").reason(Reason::FieldValueRequired),
    validation = Rule::new("!has(self.preserveUnderName) || has(self.target)").message("preserveUnderName names the target's backup: it needs a target").field_path(".preserveUnderName"),
    validation = Rule::new("!(has(self.source.branch) && has(self.target) && self.source.branch == self.target) || has(self.preserveUnderName)").message("restoring a branch to its own history needs preserveUnderName: the name of the backup of its current data").field_path(".preserveUnderName").reason(Reason::FieldValueRequired),
    validation = Rule::new("self.source == oldSelf.source && has(self.target) == has(oldSelf.target) && (!has(self.target) || self.target == oldSelf.target) && has(self.preserveUnderName) == has(oldSelf.preserveUnderName) && (!has(self.preserveUnderName) || self.preserveUnderName == oldSelf.preserveUnderName)").message("a SnapshotRestore's spec is immutable except finalize (false to true): create a new SnapshotRestore instead").reason(Reason::FieldValueForbidden),
    validation = Rule::new("!(has(oldSelf.finalize) && oldSelf.finalize) || (has(self.finalize) && self.finalize)").message("finalize cannot go back to false once true").field_path(".finalize").reason(Reason::FieldValueForbidden)
)]
pub struct SnapshotRestoreSpec {
    /// Where the restored data comes from: a `snapshot`, or a `branch` at
    /// its head, an `lsn` or a `timestamp`.
    pub source: RestoreSource,
    /// The Branch (same namespace) whose name, Service and Secret move onto
    /// the restored data on finalize. Required when `finalize` is true; set
    /// it at creation also for a multi-step restore you mean to finalize
    /// later (only `finalize` can change afterwards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = REF_NAME_MAX_LEN))]
    pub target: Option<String>,
    /// True: restore and finalize in one step. False: the restored data
    /// comes up as its own branch for preview; set true later to finalize.
    /// Cannot go back from true to false.
    #[serde(default)]
    pub finalize: bool,
    /// Name of the backup Branch that keeps the target's pre-restore data.
    /// Default `<target>-old-<yyyymmddhhmmss>`. Required when restoring a
    /// branch to its own history. A Branch name: a DNS label of at most 44
    /// characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    #[x_kube(
        validation = Rule::new("self.size() <= 44").message("must be at most 44 characters (it is a Branch name)"),
        validation = Rule::new(RULE_DNS_LABEL).message(MSG_DNS_LABEL)
    )]
    pub preserve_under_name: Option<String>,
}

/// The source of a restore: a snapshot, or a branch at a point.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.snapshot) != has(self.branch)").message("set exactly one of source.snapshot and source.branch"),
    validation = Rule::new("has(self.branch) || !(has(self.lsn) || has(self.timestamp))").message("lsn and timestamp go with source.branch: a snapshot is restored at its own point"),
    validation = Rule::new(RULE_POINT_EXCLUSIVE).message(MSG_POINT_EXCLUSIVE)
)]
pub struct RestoreSource {
    /// A Snapshot in the same namespace. Exclusive with `branch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub snapshot: Option<String>,
    /// A Branch in the same namespace, restored at its head, `lsn` or
    /// `timestamp`. Exclusive with `snapshot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = REF_NAME_MAX_LEN))]
    pub branch: Option<String>,
    /// With `branch`: the WAL position to restore to (`16/B3733C50`).
    /// Exclusive with `timestamp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = LSN_MAX_LEN))]
    #[x_kube(validation = Rule::new(RULE_LSN).message(MSG_LSN))]
    pub lsn: Option<String>,
    /// With `branch`: the time to restore to (RFC 3339, such as
    /// `2026-01-02T15:04:05Z`). Exclusive with `lsn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = TIMESTAMP_MAX_LEN))]
    #[x_kube(validation = Rule::new(RULE_RFC3339).message(MSG_RFC3339))]
    pub timestamp: Option<String>,
}

/// The phase of a restore: `Pending` (not started), `Restoring` (the
/// restored data is being prepared), `AwaitingFinalize` (restored under its
/// own name; set `finalize: true` to go on), `Finalizing` (the target is
/// moving onto the restored data), `Completed` or `Failed` (see the
/// `Stalled` condition).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RestorePhase {
    /// Not started yet.
    #[default]
    Pending,
    /// The restored data is being prepared.
    Restoring,
    /// Restored under its own name; waiting for `finalize: true`.
    AwaitingFinalize,
    /// The target Branch is moving onto the restored data.
    Finalizing,
    /// Done.
    Completed,
    /// Stopped; the `Stalled` condition says why.
    Failed,
}

/// Observed state of a SnapshotRestore.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRestoreStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling` and `Stalled` conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
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
