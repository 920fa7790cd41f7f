//! Every label and annotation key the operator reads or writes, in one
//! place. Re-exported at [`crate::api`]; the finalizers stay with their
//! controllers.

// Labels on a branch's child objects (Deployments, Pods, Services, Secrets).

/// Label: the Branch a child object belongs to.
pub const LABEL_BRANCH: &str = "pgbranch.dev/branch";
/// Label: the storage timeline a compute serves.
pub const LABEL_TIMELINE: &str = "pgbranch.dev/timeline";
/// Label: `primary` or `replica`.
pub const LABEL_ROLE: &str = "pgbranch.dev/role";
/// Label on a replica compute: its ordinal (`0`, `1`, ...).
pub const LABEL_REPLICA_ORDINAL: &str = "pgbranch.dev/replica-ordinal";
/// Label naming the component of an object (`compute`, `credentials`).
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// Label naming who manages an object.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The label the EndpointSlice controller puts on a Service's slices.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Labels a Branch may carry that must never be copied onto its children
/// (Argo CD and Helm tracking: a copy would make the tool prune or claim them).
pub const TRACKING_LABELS: &[&str] = &[
    "app.kubernetes.io/instance",
    "argocd.argoproj.io/instance",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
];

/// Annotation holding a hash of what the operator last applied, so an
/// unchanged object is never re-applied (no write in steady state).
pub const ANNOTATION_APPLIED_HASH: &str = "pgbranch.dev/applied-hash";
/// Annotation on the app Secret: the `<timeline>/<generation>` on which the
/// declarative roles, databases and passwords were last applied over SQL.
pub const ANNOTATION_SQL_APPLIED: &str = "pgbranch.dev/sql-applied";
/// Annotation on an adopted compute Deployment: the hash of the adopting
/// branch's `spec.compute` when it adopted it.
pub const ANNOTATION_ADOPTED_COMPUTE: &str = "pgbranch.dev/adopted-compute";

// Branches made or changed by a restore.

/// Label on a restored branch: the SnapshotRestore that made it.
pub const LABEL_RESTORE: &str = "pgbranch.dev/restore";
/// Label on a backup branch made by a restore: the restore's name.
pub const LABEL_RESTORE_BACKUP_OF: &str = "pgbranch.dev/restore-backup-of";
/// Annotation on a new Branch naming an existing timeline to take over
/// instead of creating one (a restore's backup branch keeps the replaced
/// timeline this way). Read only while `status.timelineId` is empty.
pub const ANNOTATION_ADOPT_TIMELINE: &str = "pgbranch.dev/adopt-timeline";
/// Annotation on a restored branch: the branch its compute is handed to.
pub const ANNOTATION_HANDOVER_TO: &str = "pgbranch.dev/handover-to";

// Branch refresh (a SnapshotRestore per scheduled refresh).

/// Label on a refresh's SnapshotRestore: the refreshed branch.
pub const LABEL_REFRESH_OF: &str = "pgbranch.dev/refresh-of";
/// Annotation on a refresh's SnapshotRestore: whether its backup is kept.
pub const ANNOTATION_PRESERVE: &str = "pgbranch.dev/refresh-preserve";
/// Annotation on a refresh's SnapshotRestore once its backup branch was
/// dealt with (`deleted` or `kept`), so it is looked at (and warned about)
/// once.
pub const ANNOTATION_BACKUP_HANDLED: &str = "pgbranch.dev/refresh-backup";

// Snapshots and schedules.

/// Label a user sets on a Snapshot to keep it from schedule pruning.
pub const LABEL_KEEP: &str = "pgbranch.dev/keep";
/// Label on every Snapshot a schedule made: the schedule's name.
pub const LABEL_SCHEDULE: &str = "pgbranch.dev/schedule";
/// Annotation on every object a scheduled run made: the run's slot (RFC 3339).
pub const ANNOTATION_SCHEDULED_AT: &str = "pgbranch.dev/scheduled-at";
