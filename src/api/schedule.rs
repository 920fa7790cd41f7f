//! The `SnapshotSchedule` kind: periodic Snapshots with retention.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::DeletionPolicy;

/// Takes Snapshots of a branch on a cron schedule or an interval and prunes
/// them by count and age.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "pgbranch.dev",
    version = "v1alpha1",
    kind = "SnapshotSchedule",
    namespaced,
    status = "SnapshotScheduleStatus",
    shortname = "pgsched",
    category = "pgbranch"
)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotScheduleSpec {
    /// The Branch (same namespace) to snapshot.
    pub branch: String,
    /// Cron expression (5 fields). Exclusive with `interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// IANA time zone of `schedule`; UTC when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Fixed interval such as `12h` or `1d`. Exclusive with `schedule`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// How many and how old snapshots to keep.
    #[serde(default)]
    pub retention: Retention,
    /// Stop taking snapshots (retention still prunes).
    #[serde(default)]
    pub suspend: bool,
    /// What each created Snapshot looks like.
    #[serde(default)]
    pub snapshot_template: SnapshotTemplate,
}

/// Retention of a schedule's snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Keep at most this many snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_count: Option<i32>,
    /// Delete snapshots older than this (e.g. `4w`, `7d`, `36h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
}

/// Template of the Snapshots a schedule creates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotTemplate {
    /// Labels put on each Snapshot.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Each Snapshot expires this long after it is taken (e.g. `30d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_after: Option<String>,
    /// Deletion policy of each Snapshot.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Observed state of a SnapshotSchedule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotScheduleStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling` and `Stalled` conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The scheduled time of the last run (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    /// The last run whose Snapshot became ready (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<String>,
    /// The next run (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<String>,
    /// Snapshots owned by this schedule now.
    #[serde(default)]
    pub active_snapshots: i32,
}
