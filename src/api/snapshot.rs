//! The `Snapshot` kind: a read-only point of a branch's history to return to.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::*;
use super::DeletionPolicy;

/// One snapshot of a branch, taken once at head, an LSN or a timestamp.
/// The spec is immutable.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "pgbranch.dev",
    version = "v1alpha1",
    kind = "Snapshot",
    namespaced,
    status = "SnapshotStatus",
    shortname = "pgsnap",
    category = "pgbranch",
    cel,
    selectable = ".spec.branch",
    doc = "A read-only point of a Branch's history to restore or branch from, taken once at the branch's head, an LSN or a timestamp. The spec is immutable.",
    printcolumn(name = "Branch", type_ = "string", json_path = ".spec.branch"),
    printcolumn(name = "LSN", type_ = "string", json_path = ".status.lsn"),
    printcolumn(
        name = "Size",
        type_ = "integer",
        description = "Size in bytes",
        json_path = ".status.sizeBytes"
    ),
    printcolumn(
        name = "Ready",
        type_ = "boolean",
        description = "True once the snapshot can be restored from",
        json_path = ".status.readyToUse"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(RULE_POINT_EXCLUSIVE).message(MSG_POINT_EXCLUSIVE),
    validation = Rule::new("self == oldSelf").message("a Snapshot's spec is immutable: create a new Snapshot instead").reason(Reason::FieldValueForbidden)
)]
pub struct SnapshotSpec {
    /// The Branch (same namespace) to snapshot.
    #[schemars(length(min = 1, max = REF_NAME_MAX_LEN))]
    pub branch: String,
    /// Snapshot as of this WAL position (`16/B3733C50`). Exclusive with
    /// `timestamp`; both absent means the branch's head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = LSN_MAX_LEN))]
    #[x_kube(validation = Rule::new(RULE_LSN).message(MSG_LSN))]
    pub lsn: Option<String>,
    /// Snapshot as of this time (RFC 3339, such as `2026-01-02T15:04:05Z`).
    /// Exclusive with `lsn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = TIMESTAMP_MAX_LEN))]
    #[x_kube(validation = Rule::new(RULE_RFC3339).message(MSG_RFC3339))]
    pub timestamp: Option<String>,
    /// When set, the Snapshot is deleted at this time (RFC 3339), with a
    /// Normal Event `Expired`. A time not after the Snapshot's creation is
    /// refused (Stalled `ExpiresAtInPast`), never a reason to delete it at
    /// once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = TIMESTAMP_MAX_LEN))]
    #[x_kube(validation = Rule::new(RULE_RFC3339).message(MSG_RFC3339))]
    pub expires_at: Option<String>,
    /// What deleting this object does to the stored snapshot: `Delete`
    /// (default) or `Retain`.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Observed state of a Snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling` and `Stalled` conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The storage layer's id of the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// The branch's timeline the snapshot was taken from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline_id: Option<String>,
    /// The LSN the snapshot holds everything up to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// When it was taken (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Size of the snapshot's data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// PostgreSQL major version of the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_major: Option<i64>,
    /// True once the snapshot can be restored from.
    #[serde(default)]
    pub ready_to_use: bool,
}
