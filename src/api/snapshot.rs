//! The `Snapshot` kind: a read-only point of a branch's history to return to.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::DeletionPolicy;

/// One snapshot of a branch, taken once at head, an LSN or a timestamp.
/// The spec is immutable.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "pgbranch.dev",
    version = "v1alpha1",
    kind = "Snapshot",
    namespaced,
    status = "SnapshotStatus",
    shortname = "pgsnap",
    category = "pgbranch"
)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSpec {
    /// The Branch (same namespace) to snapshot.
    pub branch: String,
    /// Snapshot as of this WAL position. Exclusive with `timestamp`; both
    /// absent means the branch's head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// Snapshot as of this time (RFC 3339). Exclusive with `lsn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// When set, the Snapshot is deleted at this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// What deleting this object does to the stored snapshot.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Observed state of a Snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling` and `Stalled` conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
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
