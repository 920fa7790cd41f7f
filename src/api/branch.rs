//! The `Branch` kind: a named, writable line of history of a database.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A writable copy of a database: at its parent's head, an LSN or a
/// timestamp, or a fresh (root) database when `parent` is absent.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "pgbranch.dev",
    version = "v1alpha1",
    kind = "Branch",
    namespaced,
    status = "BranchStatus",
    shortname = "br",
    category = "pgbranch"
)]
#[serde(rename_all = "camelCase")]
pub struct BranchSpec {
    /// The branch this one is copied from, and where in its history. Absent:
    /// a root branch (a fresh `initdb`). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// What to copy from the parent: all data (`parent-data`, default) or
    /// only the schema, roles and databases (`schema-only`). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_source: Option<InitSource>,
    /// A protected branch cannot be deleted.
    #[serde(default)]
    pub protected: bool,
    /// When set, the branch is deleted at this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The PostgreSQL compute serving this branch.
    #[serde(default)]
    pub compute: ComputeSpec,
    /// `new` (default): the branch gets its own random passwords before it
    /// is Ready, so a copy of production never holds production's password.
    /// `inherit`: keep the passwords copied from the parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialsPolicy>,
    /// Databases that must exist on the branch, created over SQL once the
    /// compute is ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub databases: Vec<DatabaseSpec>,
    /// Roles that must exist on the branch, with passwords in Secrets
    /// `<branch>-<role>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<RoleSpec>,
    /// Periodic refresh of this branch from its parent's head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshSpec>,
}

/// The parent of a branch and the point of its history to copy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// Name of the parent Branch in the same namespace.
    pub branch: String,
    /// Copy the parent as of this WAL position (`16/B3733C50`). Exclusive
    /// with `timestamp`; both absent means the parent's head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// Copy the parent as of this time (RFC 3339): every transaction
    /// committed at or before it. Exclusive with `lsn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

/// What a child branch copies from its parent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum InitSource {
    /// All data.
    #[default]
    #[serde(rename = "parent-data")]
    ParentData,
    /// Only roles, databases and schema; no rows.
    #[serde(rename = "schema-only")]
    SchemaOnly,
}

/// Whether a branch keeps its parent's passwords.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CredentialsPolicy {
    /// New random passwords for this branch.
    #[default]
    New,
    /// Keep the passwords copied from the parent.
    Inherit,
}

/// The compute (PostgreSQL pods) of a branch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeSpec {
    /// Run a compute for this branch. False: storage only, no pods.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// PostgreSQL image; its major version must match the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// CPU and memory of the postgres container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Read-only replicas beside the primary.
    #[serde(default)]
    pub read_replicas: i32,
    /// Scale the compute to zero while keeping the branch.
    #[serde(default)]
    pub suspended: bool,
    /// Extra `postgresql.conf` settings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub postgres_parameters: BTreeMap<String, String>,
}

impl Default for ComputeSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            image: None,
            resources: None,
            read_replicas: 0,
            suspended: false,
            postgres_parameters: BTreeMap::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// A database that must exist on the branch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Database name.
    pub name: String,
    /// Owning role (must exist or be declared in `roles`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// A login role that must exist on the branch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleSpec {
    /// Role name.
    pub name: String,
}

/// Scheduled reset of a branch to its parent's head.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefreshSpec {
    /// Cron expression (5 fields).
    pub schedule: String,
    /// IANA time zone of the schedule; UTC when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Stop refreshing without removing the schedule.
    #[serde(default)]
    pub suspend: bool,
    /// Keep the pre-refresh data as a backup branch.
    #[serde(default)]
    pub preserve: bool,
}

/// Observed state of a Branch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BranchStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling` and `Stalled` conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// A one-word summary: Pending, Creating, Ready, Suspended, Failed, Deleting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The storage timeline this branch currently points at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline_id: Option<String>,
    /// The parent's LSN this branch was copied at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_lsn: Option<String>,
    /// The current LSN, as last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// Size of the data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_size_bytes: Option<i64>,
    /// When the timeline was created (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// PostgreSQL major version of the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_major: Option<i64>,
    /// Name of the Service that is the stable address of this branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Name of the Secret with the connection parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Connection parameters (no password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<ConnectionStatus>,
    /// Earlier timelines of this branch, newest first (restores).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<TimelineHistoryEntry>,
    /// Last scheduled refresh (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<String>,
    /// Next scheduled refresh (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<String>,
}

/// How to connect to a branch (the password is in the Secret).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStatus {
    /// The Service's DNS name.
    pub host: String,
    /// The Service port.
    pub port: i32,
    /// Default database.
    pub database: String,
    /// Application user.
    pub user: String,
}

/// A timeline the branch pointed at before a restore replaced it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimelineHistoryEntry {
    /// The replaced timeline.
    pub timeline_id: String,
    /// The SnapshotRestore that replaced it.
    pub replaced_by: String,
    /// When (RFC 3339).
    pub replaced_at: String,
    /// The backup Branch that now holds it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_branch: Option<String>,
}
