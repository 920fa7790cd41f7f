//! Custom resource types of `pgbranch.dev/v1alpha1`.
//!
//! Doc comments on every field become `kubectl explain`. CRD YAML in `crds/`
//! is generated from these types by `pgbranch crd`.

// `#[kube(printcolumn(..), printcolumn(..))]` repeats keys such as `type_`
// inside separate columns, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
pub mod branch;
pub mod common;
pub mod conditions;
#[allow(clippy::duplicated_attributes)]
pub mod destination;
pub mod names;
#[allow(clippy::duplicated_attributes)]
pub mod restore;
#[allow(clippy::duplicated_attributes)]
pub mod schedule;
pub mod schema;
#[allow(clippy::duplicated_attributes)]
pub mod snapshot;

pub use branch::*;
pub use common::*;
pub use conditions::*;
pub use destination::{
    BackupDestination, BackupDestinationSpec, BackupDestinationStatus, CredentialsRef, Provider,
};
pub use names::*;
pub use restore::*;
pub use schedule::*;
pub use schema::{crd_schema, crds};
pub use snapshot::*;

/// The API group.
pub const GROUP: &str = "pgbranch.dev";
/// Label: the Branch a child object belongs to.
pub const LABEL_BRANCH: &str = "pgbranch.dev/branch";
/// Label: the storage timeline a compute serves.
pub const LABEL_TIMELINE: &str = "pgbranch.dev/timeline";
/// Label: `primary` or `replica`.
pub const LABEL_ROLE: &str = "pgbranch.dev/role";
/// Label on a backup branch made by a restore: the restore's name.
pub const LABEL_RESTORE_BACKUP_OF: &str = "pgbranch.dev/restore-backup-of";
/// Label a user sets on a Snapshot to keep it from schedule pruning.
pub const LABEL_KEEP: &str = "pgbranch.dev/keep";
/// The one field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "pgbranch-operator";
