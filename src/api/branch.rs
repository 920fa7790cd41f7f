//! The `Branch` kind: a named, writable line of history of a database.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::common::*;

/// A writable copy of a database: at its parent's head, an LSN or a
/// timestamp, or a fresh (root) database when `parent` is absent.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "pgbranch.dev",
    version = "v1alpha1",
    kind = "Branch",
    namespaced,
    status = "BranchStatus",
    shortname = "br",
    shortname = "pgbranch",
    category = "pgbranch",
    cel,
    selectable = ".spec.parent.branch",
    doc = "A writable copy of a PostgreSQL database: a root database, or a copy of a parent Branch at its head, an LSN or a timestamp. Its Service `<name>` and Secret `<name>-app` are the stable way to connect. The name is a DNS label of at most 44 characters (room for the suffixes the operator adds).",
    // metadata.name is already a DNS-1123 subdomain (lowercase letters,
    // digits, '-' and '.', starting and ending with a letter or digit); these
    // make it a DNS-1035 label (a Service name) that leaves room for the
    // suffixes. The apiserver does not bound metadata.name for its CEL cost
    // estimate, so these stay cheap: no long regex.
    validation = Rule::new("self.metadata.name.size() <= 44").message("Branch names are at most 44 characters (room for the -old-<yyyymmddhhmmss> and -<timeline> suffixes)"),
    validation = Rule::new("!self.metadata.name.contains('.')").message("Branch names cannot contain '.': they become Service names (DNS labels)"),
    validation = Rule::new("!self.metadata.name.matches('^[0-9]')").message("Branch names must start with a letter: they become Service names (DNS labels)"),
    validation = Rule::new("!has(self.spec.parent) || self.spec.parent.branch != self.metadata.name").message("a branch cannot be its own parent"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Parent", type_ = "string", json_path = ".spec.parent.branch"),
    printcolumn(name = "Point", type_ = "string", description = "The parent's LSN or timestamp this branch was copied at; empty: the parent's head", json_path = ".spec.parent['lsn','timestamp']"),
    printcolumn(name = "Parent LSN", type_ = "string", priority = 1, description = "The parent's LSN this branch was copied at", json_path = ".status.parentLsn"),
    printcolumn(name = "Timeline", type_ = "string", json_path = ".status.timelineId"),
    printcolumn(name = "Size", type_ = "integer", description = "Logical size in bytes", json_path = ".status.logicalSizeBytes"),
    printcolumn(name = "Protected", type_ = "boolean", priority = 1, json_path = ".spec.protected"),
    printcolumn(name = "Backup", type_ = "string", priority = 1, description = "The reason of the BackupHealthy condition (spec.backup): Archiving when healthy", json_path = ".status.conditions[?(@.type==\"BackupHealthy\")].reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.parent) == has(oldSelf.parent) && (!has(self.parent) || self.parent == oldSelf.parent)").message("spec.parent is immutable: create a new Branch to copy from another parent or point").field_path(".parent").reason(Reason::FieldValueForbidden),
    validation = Rule::new("(has(self.initSource) ? self.initSource : 'parent-data') == (has(oldSelf.initSource) ? oldSelf.initSource : 'parent-data')").message("spec.initSource is immutable").field_path(".initSource").reason(Reason::FieldValueForbidden),
    validation = Rule::new("!has(self.initSource) || self.initSource != 'schema-only' || has(self.parent)").message("initSource schema-only needs a parent to copy the schema from").field_path(".initSource").reason(Reason::FieldValueRequired),
    validation = Rule::new("!has(self.initSource) || self.initSource != 'schema-only' || !has(self.parent) || !(has(self.parent.lsn) || has(self.parent.timestamp))").message("initSource schema-only copies the parent's current schema: remove parent.lsn and parent.timestamp").field_path(".initSource"),
    validation = Rule::new("!has(self.refresh) || has(self.parent)").message("refresh needs a parent to refresh from").field_path(".refresh").reason(Reason::FieldValueRequired),
    validation = Rule::new("!(has(self.parent) && has(self.fromSnapshot))").message("parent and fromSnapshot are mutually exclusive: a branch copies either a parent Branch or a Snapshot").field_path(".fromSnapshot"),
    validation = Rule::new("has(self.fromSnapshot) == has(oldSelf.fromSnapshot) && (!has(self.fromSnapshot) || self.fromSnapshot == oldSelf.fromSnapshot)").message("spec.fromSnapshot is immutable: create a new Branch to copy another Snapshot").field_path(".fromSnapshot").reason(Reason::FieldValueForbidden)
)]
pub struct BranchSpec {
    /// The branch this one is copied from, and where in its history. Absent:
    /// a root branch (a fresh `initdb`). Immutable: it can be neither added,
    /// changed nor removed after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// Create the branch from a Snapshot (same namespace) instead of a
    /// parent: its data is a copy of the snapshot, and it is otherwise a
    /// root branch (own passwords, no parent to refresh from). The Snapshot
    /// must be ready to use. Exclusive with `parent`. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub from_snapshot: Option<String>,
    /// What to copy from the parent: all data (`parent-data`, default) or
    /// only the schema, roles and databases (`schema-only`, needs a parent).
    /// Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_source: Option<InitSource>,
    /// A protected branch cannot be deleted: set `protected: false` first.
    #[serde(default)]
    pub protected: bool,
    /// When set, the branch is deleted at this time (RFC 3339, such as
    /// `2026-01-02T15:04:05Z`), with a Normal Event `Expired`. A time not
    /// after the branch's creation is refused (Stalled `ExpiresAtInPast`),
    /// never a reason to delete it at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = TIMESTAMP_MAX_LEN))]
    #[x_kube(validation = Rule::new(RULE_RFC3339).message(MSG_RFC3339))]
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
    /// compute is ready. Names are unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub databases: Vec<DatabaseSpec>,
    /// Roles that must exist on the branch, with passwords in Secrets
    /// `<branch>-<role>`. Names are unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub roles: Vec<RoleSpec>,
    /// Periodic refresh of this branch from its parent's head (needs a
    /// parent). The connection string and credentials do not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshSpec>,
    /// Continuous backup of this branch to a BackupDestination: every WAL
    /// segment of its current timeline is uploaded within seconds
    /// (`archive_timeout` 5 s on the compute), base backups are taken from
    /// the storage engine's copy-on-write copies (never from the compute)
    /// at once and then on `schedule`, each branch under its own prefix
    /// `<pathPrefix>/<branch UID>/<timeline>/` in barman-cloud's format.
    /// The `BackupHealthy` condition and `status.backup` say how it goes.
    /// Removing it stops archiving; what is in the bucket stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,
}

/// Continuous archiving and base backups of a branch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// Name of a BackupDestination in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("destination must be the name of a BackupDestination (lowercase letters, digits, '-' and '.')"))]
    pub destination: String,
    /// Cron expression (5 fields, UTC, such as `0 3 * * *`) of the base
    /// backups after the first one (taken when archiving starts). Absent:
    /// only that first base backup; the WAL archive keeps the branch
    /// recoverable, with replays that grow longer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    #[x_kube(validation = Rule::new(RULE_CRON).message(MSG_CRON))]
    pub schedule: Option<String>,
    /// Which base backups (and the WAL only they need) are kept in the
    /// destination. Absent: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<BackupRetention>,
}

/// Retention of a branch's base backups in its destination: applied after
/// each base backup; the newest one is always kept, and WAL a kept backup
/// needs is never deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupRetention {
    /// Keep at most this many base backups (1 to 1000); the oldest go
    /// first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("retention.count must be between 1 and 1000"))]
    pub count: Option<i32>,
    /// Delete base backups older than this: a number and one unit s, m, h,
    /// d or w (such as `30d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = SPAN_MAX_LEN))]
    #[x_kube(validation = Rule::new(RULE_SPAN).message(MSG_SPAN))]
    pub max_age: Option<String>,
}

/// The parent of a branch and the point of its history to copy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(RULE_POINT_EXCLUSIVE).message(MSG_POINT_EXCLUSIVE))]
pub struct ParentRef {
    /// Name of the parent Branch in the same namespace.
    #[schemars(length(min = 1, max = REF_NAME_MAX_LEN))]
    pub branch: String,
    /// Copy the parent as of this WAL position (`16/B3733C50`). Exclusive
    /// with `timestamp`; both absent means the parent's head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = LSN_MAX_LEN))]
    #[x_kube(validation = Rule::new(RULE_LSN).message(MSG_LSN))]
    pub lsn: Option<String>,
    /// Copy the parent as of this time (RFC 3339, such as
    /// `2026-01-02T15:04:05Z`): every transaction committed at or before it.
    /// Exclusive with `lsn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = TIMESTAMP_MAX_LEN))]
    #[x_kube(validation = Rule::new(RULE_RFC3339).message(MSG_RFC3339))]
    pub timestamp: Option<String>,
}

/// What a child branch copies from its parent: `parent-data` (all data,
/// the default) or `schema-only` (roles, databases and schema, no rows;
/// needs a parent). Immutable.
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

/// Passwords of a child branch: `new` (default) gives the branch its own
/// random passwords before it is Ready, so a copy of production never holds
/// production's password; `inherit` keeps the passwords copied from the
/// parent.
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeSpec {
    /// Run a compute for this branch. False: storage only, no pods.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// PostgreSQL image; its major version must match the data. Default: the
    /// operator's configured image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
    /// CPU and memory of the postgres container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Read-only replicas beside the primary, 0 to 5: hot standbys streaming
    /// from it, each on its own copy-on-write copy of the primary's data
    /// (ready in seconds whatever the size), as Deployments
    /// `<branch>-<timeline>-r<n>` behind the Service `<branch>-ro` (also in
    /// the app Secret as `ro-host`/`ro-uri`). Writes through `-ro` fail.
    /// Scaled to zero while suspended; lowering it removes the extra
    /// replicas and their data. Not inherited by child branches.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 5").message("readReplicas must be between 0 and 5"))]
    pub read_replicas: i32,
    /// Scale the compute to zero while keeping the branch.
    #[serde(default)]
    pub suspended: bool,
    /// Extra `postgresql.conf` settings (name: value), at most 64. Settings
    /// the operator manages are refused: WAL archiving and recovery
    /// (`archive_*`, `restore_command`, `recovery_target*`,
    /// `primary_conninfo`), `port`, `listen_addresses` and file locations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = Rule::new(RULE_OPERATOR_PARAMETERS).message(MSG_OPERATOR_PARAMETERS))]
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

/// PostgreSQL settings the operator owns: a branch that set its own
/// `archive_command` would archive into another timeline's WAL archive and a
/// later point-in-time restore would return the wrong rows; `port` and
/// `listen_addresses` would break the Service. Lower case, as PostgreSQL
/// lists them; the compute builder must also ignore them case-insensitively.
pub const OPERATOR_PARAMETERS: &[&str] = &[
    "archive_command",
    "archive_library",
    "archive_mode",
    "archive_cleanup_command",
    "restore_command",
    "recovery_end_command",
    "recovery_target",
    "recovery_target_action",
    "recovery_target_inclusive",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_timeline",
    "recovery_target_xid",
    "primary_conninfo",
    "primary_slot_name",
    "port",
    "listen_addresses",
    "unix_socket_directories",
    "data_directory",
    "config_file",
    "hba_file",
    "ident_file",
];

/// CEL on `compute.postgresParameters`: none of [`OPERATOR_PARAMETERS`].
const RULE_OPERATOR_PARAMETERS: &str = "self.all(k, !(k in ['archive_command', 'archive_library', 'archive_mode', 'archive_cleanup_command', 'restore_command', 'recovery_end_command', 'recovery_target', 'recovery_target_action', 'recovery_target_inclusive', 'recovery_target_lsn', 'recovery_target_name', 'recovery_target_time', 'recovery_target_timeline', 'recovery_target_xid', 'primary_conninfo', 'primary_slot_name', 'port', 'listen_addresses', 'unix_socket_directories', 'data_directory', 'config_file', 'hba_file', 'ident_file']))";
const MSG_OPERATOR_PARAMETERS: &str = "postgresParameters cannot set what the operator manages: WAL archiving and recovery settings, port, listen_addresses, unix_socket_directories or file locations";

fn default_true() -> bool {
    true
}

/// A database that must exist on the branch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Database name.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Owning role (must exist or be declared in `roles`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub owner: Option<String>,
}

/// A login role that must exist on the branch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleSpec {
    /// Role name.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

/// Scheduled reset of a branch to its parent's head.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefreshSpec {
    /// Cron expression (5 fields, such as `0 2 * * *`).
    #[schemars(length(max = 128))]
    #[x_kube(validation = Rule::new(RULE_CRON).message(MSG_CRON))]
    pub schedule: String,
    /// IANA time zone of the schedule (such as `Europe/Berlin`); UTC when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
    /// Stop refreshing without removing the schedule.
    #[serde(default)]
    pub suspend: bool,
    /// Keep the pre-refresh data as a backup branch.
    #[serde(default)]
    pub preserve: bool,
}

/// A one-word summary of a Branch, for `kubectl get` (the conditions are
/// the contract): `Pending` (waiting for something outside the operator,
/// such as a volume claim), `Creating` (storage or compute is being prepared),
/// `Ready`, `Suspended` (storage ready, no compute runs), `Failed` (the
/// `Stalled` condition says why), `Deleting`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum BranchPhase {
    /// Waiting for something outside the operator (a volume claim).
    Pending,
    /// Storage or compute is being prepared.
    Creating,
    /// Serving (or, with compute disabled, storage ready).
    Ready,
    /// Storage ready; the compute is suspended.
    Suspended,
    /// Stopped; the `Stalled` condition says why.
    Failed,
    /// Being deleted.
    Deleting,
}

/// Observed state of a Branch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BranchStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling` and `Stalled` conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// A one-word summary: Pending, Creating, Ready, Suspended, Failed,
    /// Deleting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BranchPhase>,
    /// The storage timeline this branch currently points at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline_id: Option<String>,
    /// The parent's LSN this branch was copied at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_lsn: Option<String>,
    /// The Branch that now holds the data this branch was copied from.
    /// `spec.parent.branch` at first; after a restore replaced the parent's
    /// data, the parent's backup branch (the spec itself never changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_branch: Option<String>,
    /// The storage timeline this branch was copied from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_timeline_id: Option<String>,
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
    /// Where the backup of this branch (`spec.backup`) stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BranchBackupStatus>,
}

/// Where a branch's backup stands, as the storage engine reports it (times
/// RFC 3339).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BranchBackupStatus {
    /// The BackupDestination.
    pub destination: String,
    /// The timeline being archived (the branch's current one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline_id: Option<String>,
    /// Where in the bucket (`s3://<bucket>/<prefix>/<branch UID>`), with
    /// the barman server name (the timeline) below it: what barman-cloud's
    /// tools take to recover without pgbranch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The oldest point recoverable from the destination: the end of its
    /// oldest base backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_recoverable_time: Option<String>,
    /// The LSN of the oldest recoverable point (`firstRecoverableTime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_recoverable_lsn: Option<String>,
    /// The newest point recoverable from the destination: when PostgreSQL
    /// finished the newest uploaded WAL segment (every transaction
    /// committed before it is in the bucket). Needs a base backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recoverable_time: Option<String>,
    /// The newest WAL file in the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived_wal: Option<String>,
    /// When `lastArchivedWal` was uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived_time: Option<String>,
    /// How long the oldest WAL file not yet in the destination has waited
    /// on the storage volume (0: nothing waits).
    #[serde(default)]
    pub archive_lag_seconds: i64,
    /// WAL files waiting on the storage volume for upload.
    #[serde(default)]
    pub pending_wal_files: i64,
    /// The newest base backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_base_backup: Option<BaseBackupStatus>,
    /// Complete base backups in the destination.
    #[serde(default)]
    pub base_backups: i64,
    /// The schedule slot of the last base backup requested (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scheduled_time: Option<String>,
    /// The next slot of `spec.backup.schedule`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_scheduled_time: Option<String>,
}

/// One base backup in the destination.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BaseBackupStatus {
    /// barman's backup id.
    pub id: String,
    /// When it ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// The LSN it is consistent at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// Its size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// How long it took (seconds; absent when this operator did not see it
    /// being taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
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
