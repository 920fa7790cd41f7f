//! The daemon's control API (JSON over HTTP on the Unix socket
//! `daemon.sock` in the local directory, mode 0600): requests and views.

use serde::{Deserialize, Serialize};

use crate::storage::{Lsn, Point, Progress};

/// A branch as `branch list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BranchView {
    pub name: String,
    pub timeline: Option<String>,
    pub parent: Option<String>,
    /// The point it was taken at (absent for a root branch).
    pub point: Option<Point>,
    /// The parent's LSN it branched off at.
    pub parent_lsn: Option<Lsn>,
    /// Its newest known LSN.
    pub lsn: Option<Lsn>,
    pub logical_size_bytes: u64,
    /// The fixed local port of its connection string.
    pub port: u16,
    /// `creating`, `starting`, `running`, `stopped`, `exited` (its postgres
    /// died; `start` it again) or `failed`.
    pub state: String,
    pub protected: bool,
    pub error: Option<String>,
    pub progress: Option<Progress>,
    /// For a multi-step restore's preview: the branch it will replace.
    pub restore_target: Option<String>,
    pub created_at: jiff::Timestamp,
    /// `postgresql://postgres:<password>@127.0.0.1:<port>/postgres`.
    pub connection_string: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateBranchRequest {
    pub name: String,
    /// The parent branch; none = a fresh root branch (`initdb`).
    pub parent: Option<String>,
    #[serde(default = "head")]
    pub point: Point,
    #[serde(default)]
    pub protected: bool,
}

fn head() -> Point {
    Point::Head
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetBranchRequest {
    pub protected: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotView {
    pub name: String,
    /// The engine's id, once it took the request.
    pub id: Option<String>,
    pub branch: String,
    pub point: Point,
    pub lsn: Option<Lsn>,
    pub size_bytes: u64,
    /// `creating`, `ready` or `failed`.
    pub state: String,
    pub error: Option<String>,
    pub progress: Option<Progress>,
    pub created_at: jiff::Timestamp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateSnapshotRequest {
    pub name: Option<String>,
    pub branch: String,
    #[serde(default = "head")]
    pub point: Point,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreRequest {
    /// Restore this snapshot ...
    pub snapshot: Option<String>,
    /// ... or this branch at `point`.
    pub source_branch: Option<String>,
    #[serde(default = "head")]
    pub point: Point,
    /// The branch whose connection string gets the restored data.
    pub target: String,
    /// One step (true) or a preview branch first (false).
    pub finalize: bool,
    /// Name of the backup branch keeping the target's old data.
    pub preserve_under_name: Option<String>,
    /// Name of the preview branch (multi-step).
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FinalizeRequest {
    pub preserve_under_name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreView {
    pub id: String,
    pub target: String,
    pub source: String,
    pub finalize: bool,
    /// `restoring`, `awaitingFinalize`, `completed` or `failed`.
    pub state: String,
    pub error: Option<String>,
    pub progress: Option<Progress>,
    pub restored_branch: Option<String>,
    pub backup_branch: Option<String>,
    pub started_at: jiff::Timestamp,
    pub completed_at: Option<jiff::Timestamp>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    pub pid: u32,
    pub dir: String,
    pub driver: String,
    pub pg_major: u32,
    pub branches: usize,
    pub running: usize,
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
