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
pub mod labels;
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
pub use labels::*;
pub use names::*;
pub use restore::*;
pub use schedule::*;
pub use schema::{crd_schema, crds};
pub use snapshot::*;

/// The API group.
pub const GROUP: &str = "pgbranch.dev";
/// The one field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "pgbranch-operator";
