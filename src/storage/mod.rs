//! The storage layer: everything that touches PostgreSQL data.
//!
//! The rest of the project reaches data only through the [`Storage`] trait.
//! Implementations:
//! * [`engine`]: the embedded copy-on-write engine (in-process);
//! * [`http`]: the same trait served over HTTP (`pgbranch storage serve`) and
//!   a client that implements it, so the operator can reach a remote engine.
//!
//! [`backups`] holds the types of the backup calls (continuous archiving of
//! a timeline to an object store, base backups).

pub mod backups;
pub mod engine;
pub mod error;
pub mod http;
pub mod tls;
pub mod types;
pub mod wait;

pub use backups::{BackupStatus, BackupTarget, BaseBackup, BaseBackupRequest};
pub use error::StorageError;

/// How an error of a copy whose source cannot archive its WAL begins (the
/// Branch controller reports it as `SourceArchivingFailed`).
pub const ARCHIVING_FAILED: &str = "WAL archiving on the source is failing";
pub use types::*;

use async_trait::async_trait;

/// The contract between the operator (and local mode) and the storage layer.
///
/// Every mutating call is idempotent and keyed by the caller (`key`, the
/// operator passes the object's UID): the same key twice returns the same
/// object and never makes a second copy. Long calls return at once with a
/// `Creating` state and `progress`; callers poll `get_*` until `Ready` or
/// `Failed`.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// What this storage layer is: driver, PostgreSQL version, limits.
    async fn info(&self) -> Result<StorageInfo, StorageError>;

    /// Start (or find, by `req.key`) the creation of a timeline.
    async fn create_timeline(&self, req: CreateTimeline) -> Result<Timeline, StorageError>;
    /// One timeline, re-read from the store (state, LSN, sizes, window).
    async fn get_timeline(&self, id: &TimelineId) -> Result<Timeline, StorageError>;
    /// All timelines (any state).
    async fn list_timelines(&self) -> Result<Vec<Timeline>, StorageError>;
    /// Delete a timeline and give its space back. Deleting a missing
    /// timeline is not an error (idempotent). A timeline whose compute is
    /// still running is refused with `Busy`.
    async fn delete_timeline(&self, id: &TimelineId) -> Result<(), StorageError>;

    /// Start (or find, by `req.key`) a snapshot of a timeline at a point.
    async fn create_snapshot(&self, req: CreateSnapshot) -> Result<Snapshot, StorageError>;
    async fn get_snapshot(&self, id: &SnapshotId) -> Result<Snapshot, StorageError>;
    async fn list_snapshots(&self) -> Result<Vec<Snapshot>, StorageError>;
    /// Delete a snapshot; deleting a missing one is not an error.
    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), StorageError>;

    /// Creates (or finds) the read replica `req.ordinal` of a Ready
    /// timeline: a copy of its data directory (running or not) set up as a
    /// hot standby of it. Idempotent by (timeline, ordinal): the same call
    /// again returns the same replica without copying again. Returns once
    /// the copy is made (`Ready`): with copy-on-write, about a second
    /// whatever the database size.
    async fn create_replica(&self, req: CreateReplica) -> Result<Replica, StorageError>;
    /// The replicas of a timeline, by ordinal.
    async fn list_replicas(&self, timeline: &TimelineId) -> Result<Vec<Replica>, StorageError>;
    /// Deletes a replica's data directory. Deleting a missing replica is not
    /// an error; one whose postgres still runs is refused with `Busy`.
    /// Deleting a timeline deletes its replicas.
    async fn delete_replica(&self, timeline: &TimelineId, ordinal: u32)
        -> Result<(), StorageError>;

    /// The LSN a timestamp resolves to on a timeline: the start of the
    /// commit record of the last transaction committed at or before it. A
    /// branch at that LSN (recovery targets are inclusive) holds exactly the
    /// transactions committed by the timestamp. Refused outside the window.
    async fn resolve_point(
        &self,
        timeline: &TimelineId,
        timestamp: jiff::Timestamp,
    ) -> Result<Lsn, StorageError>;

    /// Continuous archiving of a timeline to an object store (issue #16).
    /// `Some(target)`: every WAL file of the timeline's archive is uploaded
    /// to `target` from now on (idempotent: the same target again changes
    /// nothing; a restarted storage layer resumes where it was, so callers
    /// pass the target again on every pass); its status is returned. The
    /// first use of a server name refuses an archive that already holds
    /// WAL (never shared). `None`: archiving stops (what is uploaded
    /// stays), `Ok(None)`. A destination that fails later does not fail
    /// this call: the WAL waits locally and the status says why.
    async fn set_backup(
        &self,
        timeline: &TimelineId,
        target: Option<BackupTarget>,
    ) -> Result<Option<BackupStatus>, StorageError>;
    /// Where a timeline's backup stands (`None`: not archiving).
    async fn get_backup(&self, timeline: &TimelineId)
        -> Result<Option<BackupStatus>, StorageError>;
    /// Starts a base backup of an archiving timeline in the background,
    /// from the storage layer's copies (never the compute), then applies
    /// the request's retention. Idempotent by `req.key`; returns at once
    /// with the status (`baseBackupRunning`); poll [`Storage::get_backup`].
    async fn start_base_backup(
        &self,
        timeline: &TimelineId,
        req: BaseBackupRequest,
    ) -> Result<BackupStatus, StorageError>;
}
