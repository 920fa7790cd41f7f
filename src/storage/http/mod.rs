//! The storage trait over HTTP: an axum server and a reqwest client.
//!
//! The API is the [`Storage`](super::Storage) trait as JSON, under `/v1`:
//!
//! | method and path | trait call |
//! | --- | --- |
//! | `GET /healthz` (no auth) | liveness |
//! | `GET /v1/info` | `info` |
//! | `POST /v1/timelines` (body `CreateTimeline`) | `create_timeline` |
//! | `GET /v1/timelines` | `list_timelines` |
//! | `GET /v1/timelines/{id}` | `get_timeline` |
//! | `DELETE /v1/timelines/{id}` (204) | `delete_timeline` |
//! | `GET /v1/timelines/{id}/resolve?timestamp=RFC3339` | `resolve_point` |
//! | `PUT /v1/timelines/{id}/backup` (body `BackupTarget`, credentials included: never logged) | `set_backup(id, Some)` |
//! | `GET /v1/timelines/{id}/backup` (`null`: not archiving) | `get_backup` |
//! | `DELETE /v1/timelines/{id}/backup` (204) | `set_backup(id, None)` |
//! | `POST /v1/timelines/{id}/base-backups` (body `BaseBackupRequest`) | `start_base_backup` |
//! | `PUT /v1/timelines/{id}/replicas/{ordinal}` (body `{sourceConnection}`) | `create_replica` |
//! | `GET /v1/timelines/{id}/replicas` | `list_replicas` |
//! | `DELETE /v1/timelines/{id}/replicas/{ordinal}` (204) | `delete_replica` |
//! | `POST /v1/snapshots` (body `CreateSnapshot`) | `create_snapshot` |
//! | `GET /v1/snapshots` | `list_snapshots` |
//! | `GET /v1/snapshots/{id}` | `get_snapshot` |
//! | `DELETE /v1/snapshots/{id}` (204) | `delete_snapshot` |
//!
//! Every `/v1` call needs `Authorization: Bearer <token>` when the server has
//! a token. Errors are [`ErrorBody`] JSON with the status of
//! [`status_of`]: the client turns them back into the same
//! [`StorageError`] variant.

pub mod client;
pub mod server;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Storage, StorageError};

pub use client::HttpStorage;

/// Opens the storage layer an operator's `--storage` flag names:
/// * `embedded:/path`: the engine in-process on the volume at `/path`
///   (driver probed from the volume);
/// * `http://host:port` or `https://...`: a `pgbranch storage serve`
///   service, authenticated with `token` when given.
pub async fn connect_storage(
    spec: &str,
    token: Option<String>,
) -> Result<Arc<dyn Storage>, StorageError> {
    let spec = spec.trim();
    if let Some(path) = spec.strip_prefix("embedded:") {
        if path.is_empty() || !path.starts_with('/') {
            return Err(StorageError::invalid(format!(
                "storage {spec:?}: embedded storage needs an absolute path, like embedded:/var/lib/pgbranch"
            )));
        }
        let cfg = super::engine::EngineConfig {
            root: std::path::PathBuf::from(path),
            ..Default::default()
        };
        let engine = super::engine::Engine::open(cfg).await?;
        return Ok(Arc::new(engine));
    }
    if spec.starts_with("http://") || spec.starts_with("https://") {
        return Ok(Arc::new(HttpStorage::new(spec, token)?));
    }
    Err(StorageError::invalid(format!(
        "storage {spec:?} is neither embedded:/path nor an http(s):// URL"
    )))
}

/// The JSON body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    /// The [`StorageError`] variant (`NotFound`, `InvalidArgument`, ...).
    pub code: String,
    /// A sentence a person can act on.
    pub message: String,
    /// The full error, so a client can rebuild it exactly (e.g. the restore
    /// window of an `InvalidPoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StorageError>,
}

impl ErrorBody {
    pub fn from_error(e: &StorageError) -> Self {
        ErrorBody {
            code: e.reason_code().to_string(),
            message: e.to_string(),
            error: Some(e.clone()),
        }
    }
}

/// The HTTP status an error is answered with.
pub fn status_of(e: &StorageError) -> ::http::StatusCode {
    use ::http::StatusCode as S;
    match e {
        StorageError::NotFound { .. } => S::NOT_FOUND,
        StorageError::InvalidArgument { .. } => S::BAD_REQUEST,
        StorageError::InvalidPoint { .. } => S::UNPROCESSABLE_ENTITY,
        StorageError::Conflict { .. } => S::CONFLICT,
        StorageError::Busy { .. } => S::LOCKED,
        StorageError::Unavailable { .. } => S::SERVICE_UNAVAILABLE,
        StorageError::Unauthorized { .. } => S::UNAUTHORIZED,
        StorageError::Internal { .. } => S::INTERNAL_SERVER_ERROR,
    }
}

/// The variant name of an error, as its JSON `code` tag spells it.
trait ReasonCode {
    fn reason_code(&self) -> &'static str;
}

impl ReasonCode for StorageError {
    fn reason_code(&self) -> &'static str {
        match self {
            StorageError::NotFound { .. } => "NotFound",
            StorageError::InvalidArgument { .. } => "InvalidArgument",
            StorageError::InvalidPoint { .. } => "InvalidPoint",
            StorageError::Conflict { .. } => "Conflict",
            StorageError::Busy { .. } => "Busy",
            StorageError::Unavailable { .. } => "Unavailable",
            StorageError::Unauthorized { .. } => "Unauthorized",
            StorageError::Internal { .. } => "Internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Lsn, PointInfo, RestoreWindow};

    fn every_variant() -> Vec<StorageError> {
        vec![
            StorageError::not_found("timeline", "abc"),
            StorageError::invalid("bad id"),
            StorageError::InvalidPoint {
                message: "before the window".into(),
                window: Some(RestoreWindow {
                    oldest: PointInfo {
                        lsn: Lsn(0x1_0000_0028),
                        time: None,
                    },
                    newest: PointInfo {
                        lsn: Lsn(0x2_0000_0000),
                        time: Some("2024-05-01T12:00:00Z".parse().unwrap()),
                    },
                }),
            },
            StorageError::Conflict {
                message: "key reused".into(),
            },
            StorageError::Busy {
                message: "compute running".into(),
            },
            StorageError::Unavailable {
                message: "disk hiccup".into(),
            },
            StorageError::Unauthorized {
                message: "wrong token".into(),
            },
            StorageError::internal("boom"),
        ]
    }

    #[test]
    fn error_bodies_round_trip_every_variant() {
        for e in every_variant() {
            let json = serde_json::to_string(&ErrorBody::from_error(&e)).unwrap();
            let back: ErrorBody = serde_json::from_str(&json).unwrap();
            assert_eq!(back.error.as_ref(), Some(&e), "{json}");
            assert_eq!(back.message, e.to_string());
            // The code tag inside the error and the top-level code agree.
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(v["code"], v["error"]["code"], "{json}");
        }
    }

    #[test]
    fn statuses_tell_retryable_from_terminal() {
        for e in every_variant() {
            let s = status_of(&e);
            assert!(s.is_client_error() || s.is_server_error(), "{e:?}");
            if e.is_retryable() {
                assert!(
                    s == ::http::StatusCode::LOCKED || s == ::http::StatusCode::SERVICE_UNAVAILABLE,
                    "{e:?} -> {s}"
                );
            }
        }
    }
}
