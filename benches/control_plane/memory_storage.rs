//! A storage layer that stores nothing: every call completes at once,
//! from a map in memory. Used only by this bench, so that what it measures
//! is the operator and the control plane, not 10,000 `initdb`s.
//!
//! It keeps the contract the operator relies on: creation is idempotent by
//! key, a copy of a missing timeline is `NotFound`, deleting a missing
//! object is not an error. Every timeline is `Ready` as soon as it is
//! asked for; nothing of it exists on disk.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use pgbranch::storage::{
    CreateReplica, CreateSnapshot, CreateTimeline, DriverKind, Lineage, Lsn, OpKey, Replica,
    Snapshot, SnapshotId, Source, State, Storage, StorageError, StorageInfo, Timeline, TimelineId,
};

/// The volume root the operator is told about (`--volume-host-path`).
pub const ROOT: &str = "/var/lib/pgbranch";

/// The LSN every timeline reports (nothing is ever written to it).
const LSN: Lsn = Lsn(0x0100_0028);

#[derive(Default)]
struct Inner {
    timelines: HashMap<TimelineId, Timeline>,
    timeline_keys: HashMap<OpKey, TimelineId>,
    snapshots: HashMap<SnapshotId, Snapshot>,
    snapshot_keys: HashMap<OpKey, SnapshotId>,
    replicas: HashMap<(TimelineId, u32), Replica>,
}

/// The in-memory storage, with a count of calls.
#[derive(Default)]
pub struct MemoryStorage {
    inner: Mutex<Inner>,
    calls: AtomicU64,
}

impl MemoryStorage {
    /// How many trait calls it answered.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn new_timeline(key: OpKey, label: Option<String>, lineage: Lineage) -> Timeline {
    let id = TimelineId::generate();
    Timeline {
        data_path: format!("timelines/{id}/pgdata"),
        wal_archive_path: format!("wal/{id}"),
        id,
        key,
        label,
        state: State::Ready,
        error: None,
        progress: None,
        lineage,
        created_at: jiff::Timestamp::now(),
        pg_major: 16,
        lsn: Some(LSN),
        logical_size_bytes: 8 << 20,
        exclusive_bytes: Some(0),
        restore_window: None,
    }
}

#[async_trait]
impl Storage for MemoryStorage {
    async fn info(&self) -> Result<StorageInfo, StorageError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(StorageInfo {
            driver: DriverKind::Copy,
            pg_major: 16,
            root: ROOT.into(),
            compute_root: None,
            data_uid: None,
            volume_total_bytes: None,
            volume_used_bytes: None,
            wal_archive_bytes: None,
        })
    }

    async fn create_timeline(&self, req: CreateTimeline) -> Result<Timeline, StorageError> {
        let mut inner = self.lock();
        if let Some(id) = inner.timeline_keys.get(&req.key) {
            if let Some(t) = inner.timelines.get(id) {
                return Ok(t.clone());
            }
        }
        let lineage = match &req.source {
            Source::Empty { .. } => Lineage {
                parent: None,
                snapshot: None,
                point: None,
                parent_lsn: None,
                schema_only: false,
            },
            Source::SchemaOnly { timeline } | Source::Timeline { timeline, .. } => {
                if !inner.timelines.contains_key(timeline) {
                    return Err(StorageError::not_found("timeline", timeline));
                }
                let point = match &req.source {
                    Source::Timeline { point, .. } => Some(*point),
                    _ => None,
                };
                Lineage {
                    parent: Some(timeline.clone()),
                    snapshot: None,
                    point,
                    parent_lsn: Some(LSN),
                    schema_only: matches!(req.source, Source::SchemaOnly { .. }),
                }
            }
            Source::Snapshot { snapshot } => {
                if !inner.snapshots.contains_key(snapshot) {
                    return Err(StorageError::not_found("snapshot", snapshot));
                }
                Lineage {
                    parent: None,
                    snapshot: Some(snapshot.clone()),
                    point: None,
                    parent_lsn: Some(LSN),
                    schema_only: false,
                }
            }
        };
        let t = new_timeline(req.key.clone(), req.label, lineage);
        inner.timeline_keys.insert(req.key, t.id.clone());
        inner.timelines.insert(t.id.clone(), t.clone());
        Ok(t)
    }

    async fn get_timeline(&self, id: &TimelineId) -> Result<Timeline, StorageError> {
        self.lock()
            .timelines
            .get(id)
            .cloned()
            .ok_or_else(|| StorageError::not_found("timeline", id))
    }

    async fn list_timelines(&self) -> Result<Vec<Timeline>, StorageError> {
        Ok(self.lock().timelines.values().cloned().collect())
    }

    async fn delete_timeline(&self, id: &TimelineId) -> Result<(), StorageError> {
        let mut inner = self.lock();
        if let Some(t) = inner.timelines.remove(id) {
            inner.timeline_keys.remove(&t.key);
        }
        inner.replicas.retain(|(tl, _), _| tl != id);
        Ok(())
    }

    async fn create_snapshot(&self, req: CreateSnapshot) -> Result<Snapshot, StorageError> {
        let mut inner = self.lock();
        if let Some(id) = inner.snapshot_keys.get(&req.key) {
            if let Some(s) = inner.snapshots.get(id) {
                return Ok(s.clone());
            }
        }
        if !inner.timelines.contains_key(&req.timeline) {
            return Err(StorageError::not_found("timeline", &req.timeline));
        }
        let s = Snapshot {
            id: SnapshotId::generate(),
            key: req.key.clone(),
            label: req.label,
            timeline: req.timeline,
            point: req.point,
            state: State::Ready,
            error: None,
            progress: None,
            lsn: Some(LSN),
            created_at: jiff::Timestamp::now(),
            pg_major: 16,
            size_bytes: 8 << 20,
            exclusive_bytes: Some(0),
        };
        inner.snapshot_keys.insert(req.key, s.id.clone());
        inner.snapshots.insert(s.id.clone(), s.clone());
        Ok(s)
    }

    async fn get_snapshot(&self, id: &SnapshotId) -> Result<Snapshot, StorageError> {
        self.lock()
            .snapshots
            .get(id)
            .cloned()
            .ok_or_else(|| StorageError::not_found("snapshot", id))
    }

    async fn list_snapshots(&self) -> Result<Vec<Snapshot>, StorageError> {
        Ok(self.lock().snapshots.values().cloned().collect())
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), StorageError> {
        let mut inner = self.lock();
        if let Some(s) = inner.snapshots.remove(id) {
            inner.snapshot_keys.remove(&s.key);
        }
        Ok(())
    }

    async fn create_replica(&self, req: CreateReplica) -> Result<Replica, StorageError> {
        let mut inner = self.lock();
        if !inner.timelines.contains_key(&req.timeline) {
            return Err(StorageError::not_found("timeline", &req.timeline));
        }
        let key = (req.timeline.clone(), req.ordinal);
        let r = inner
            .replicas
            .entry(key)
            .or_insert_with(|| Replica {
                data_path: format!("timelines/{}/replicas/{}/pgdata", req.timeline, req.ordinal),
                timeline: req.timeline,
                ordinal: req.ordinal,
                state: State::Ready,
                created_at: jiff::Timestamp::now(),
            })
            .clone();
        Ok(r)
    }

    async fn list_replicas(&self, timeline: &TimelineId) -> Result<Vec<Replica>, StorageError> {
        let inner = self.lock();
        let mut out: Vec<Replica> = inner
            .replicas
            .values()
            .filter(|r| &r.timeline == timeline)
            .cloned()
            .collect();
        out.sort_by_key(|r| r.ordinal);
        Ok(out)
    }

    async fn delete_replica(
        &self,
        timeline: &TimelineId,
        ordinal: u32,
    ) -> Result<(), StorageError> {
        self.lock().replicas.remove(&(timeline.clone(), ordinal));
        Ok(())
    }

    async fn resolve_point(
        &self,
        timeline: &TimelineId,
        _timestamp: jiff::Timestamp,
    ) -> Result<Lsn, StorageError> {
        if !self.lock().timelines.contains_key(timeline) {
            return Err(StorageError::not_found("timeline", timeline));
        }
        Ok(LSN)
    }

    async fn set_backup(
        &self,
        _timeline: &TimelineId,
        _target: Option<pgbranch::storage::BackupTarget>,
    ) -> Result<Option<pgbranch::storage::BackupStatus>, StorageError> {
        Err(StorageError::invalid(
            "the in-memory benchmark storage does not back up",
        ))
    }

    async fn get_backup(
        &self,
        _timeline: &TimelineId,
    ) -> Result<Option<pgbranch::storage::BackupStatus>, StorageError> {
        Ok(None)
    }

    async fn start_base_backup(
        &self,
        _timeline: &TimelineId,
        _req: pgbranch::storage::BaseBackupRequest,
    ) -> Result<pgbranch::storage::BackupStatus, StorageError> {
        Err(StorageError::invalid(
            "the in-memory benchmark storage does not back up",
        ))
    }
}
