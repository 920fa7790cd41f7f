//! Errors of the storage layer, typed so callers can tell a retry from a
//! terminal failure and the HTTP layer can map them to status codes.

use serde::{Deserialize, Serialize};

use super::types::RestoreWindow;

#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize, PartialEq)]
#[serde(tag = "code", rename_all = "PascalCase")]
pub enum StorageError {
    /// The named object does not exist.
    #[error("{kind} {id} not found")]
    NotFound { kind: String, id: String },
    /// The request is malformed (bad identifier, bad LSN text, ...).
    #[error("invalid argument: {message}")]
    InvalidArgument { message: String },
    /// The point cannot be reached: outside the restore window, in the
    /// future, or not yet archived.
    #[error("invalid point: {message}{}", window.as_ref().map(|w| format!(" (restore window: {w})")).unwrap_or_default())]
    InvalidPoint {
        message: String,
        window: Option<RestoreWindow>,
    },
    /// The key was already used for a different request, or the state of the
    /// object forbids the call.
    #[error("conflict: {message}")]
    Conflict { message: String },
    /// Another operation holds the object; retry later.
    #[error("busy: {message}")]
    Busy { message: String },
    /// A transient failure (I/O hiccup, source unreachable); retry later.
    #[error("unavailable: {message}")]
    Unavailable { message: String },
    /// Authentication to the storage service failed.
    #[error("unauthorized: {message}")]
    Unauthorized { message: String },
    /// Anything else; not expected to fix itself.
    #[error("internal error: {message}")]
    Internal { message: String },
}

impl StorageError {
    /// Whether the same call may succeed if retried later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StorageError::Busy { .. } | StorageError::Unavailable { .. }
        )
    }

    pub fn not_found(kind: &str, id: impl ToString) -> Self {
        StorageError::NotFound {
            kind: kind.to_string(),
            id: id.to_string(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        StorageError::InvalidArgument {
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        StorageError::Internal {
            message: message.into(),
        }
    }

    /// A short CamelCase reason, used in conditions and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            StorageError::NotFound { .. } => "NotFound",
            StorageError::InvalidArgument { .. } => "InvalidArgument",
            StorageError::InvalidPoint { .. } => "InvalidPoint",
            StorageError::Conflict { .. } => "Conflict",
            StorageError::Busy { .. } => "Busy",
            StorageError::Unavailable { .. } => "StorageUnavailable",
            StorageError::Unauthorized { .. } => "StorageUnauthorized",
            StorageError::Internal { .. } => "StorageError",
        }
    }
}
