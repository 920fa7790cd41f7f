//! Types shared by several kinds.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a snapshot's deletion does to the stored data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Deleting the object deletes the stored snapshot.
    #[default]
    Delete,
    /// Deleting the object keeps the stored snapshot in the storage layer.
    Retain,
}
