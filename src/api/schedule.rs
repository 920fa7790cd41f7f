//! The `SnapshotSchedule` kind: periodic Snapshots with retention.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::common::*;
use super::DeletionPolicy;

/// Takes Snapshots of a branch on a cron schedule or an interval and prunes
/// them by count and age.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "pgbranch.dev",
    version = "v1alpha1",
    kind = "SnapshotSchedule",
    namespaced,
    status = "SnapshotScheduleStatus",
    shortname = "pgsched",
    category = "pgbranch",
    cel,
    selectable = ".spec.branch",
    doc = "Takes Snapshots of a Branch on a cron schedule or at a fixed interval, and prunes the ones it made by count and age. Snapshots labelled pgbranch.dev/keep are never pruned.",
    printcolumn(name = "Branch", type_ = "string", json_path = ".spec.branch"),
    printcolumn(
        name = "Schedule",
        type_ = "string",
        description = "Cron expression or interval",
        json_path = ".spec['schedule','interval']"
    ),
    printcolumn(
        name = "Suspend",
        type_ = "boolean",
        priority = 1,
        json_path = ".spec.suspend"
    ),
    printcolumn(
        name = "Last",
        type_ = "date",
        description = "Scheduled time of the last run",
        json_path = ".status.lastScheduleTime"
    ),
    printcolumn(
        name = "Next",
        type_ = "string",
        description = "Next run",
        json_path = ".status.nextScheduleTime"
    ),
    printcolumn(
        name = "Active",
        type_ = "integer",
        description = "Snapshots owned by this schedule",
        json_path = ".status.activeSnapshots"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.schedule) != has(self.interval)").message("set exactly one of schedule (cron) and interval"),
    validation = Rule::new("!has(self.timeZone) || has(self.schedule)").message("timeZone goes with schedule (an interval has no time zone)").field_path(".timeZone")
)]
pub struct SnapshotScheduleSpec {
    /// The Branch (same namespace) to snapshot.
    #[schemars(length(min = 1, max = REF_NAME_MAX_LEN))]
    pub branch: String,
    /// Cron expression (5 fields, such as `0 2 * * *`). Exclusive with
    /// `interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    #[x_kube(validation = Rule::new(RULE_CRON).message(MSG_CRON))]
    pub schedule: Option<String>,
    /// IANA time zone of `schedule` (such as `Europe/Berlin`); UTC when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
    /// Fixed interval: a number and one unit s, m, h, d or w (such as `12h`
    /// or `1d`). Exclusive with `schedule`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = SPAN_MAX_LEN))]
    #[x_kube(validation = Rule::new(RULE_SPAN).message(MSG_SPAN))]
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

/// Retention of a schedule's snapshots. Both absent: keep every snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Keep at most this many snapshots (at least 1); the oldest go first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxCount must be at least 1"))]
    pub max_count: Option<i32>,
    /// Delete snapshots older than this: a number and one unit s, m, h, d
    /// or w (such as `4w`, `7d`, `36h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = SPAN_MAX_LEN))]
    #[x_kube(validation = Rule::new(RULE_SPAN).message(MSG_SPAN))]
    pub max_age: Option<String>,
}

/// Template of the Snapshots a schedule creates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotTemplate {
    /// Labels put on each Snapshot.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Each Snapshot expires this long after it is taken: a number and one
    /// unit s, m, h, d or w (such as `30d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = SPAN_MAX_LEN))]
    #[x_kube(validation = Rule::new(RULE_SPAN).message(MSG_SPAN))]
    pub expires_after: Option<String>,
    /// Deletion policy of each Snapshot: `Delete` (default) or `Retain`.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Observed state of a SnapshotSchedule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotScheduleStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling` and `Stalled` conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
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
