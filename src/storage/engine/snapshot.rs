//! Snapshots: planning one (at head, or replayed to a point in the past),
//! building it in the background, resuming an interrupted create under the
//! same key, the view callers get, and deleting one. Head snapshots taken
//! in backup mode or of a stopped server become PITR bases of their
//! timeline.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use super::copy::Consistency;
use super::layout::pg_major_of;
use super::locks::{base_keys, InUse};
use super::meta::{BaseRow, Recorded, SnapshotRow};
use super::timeline::point_key;
use super::{io_err, Engine, StoredRequest};
use crate::storage::{
    ConnInfo, CreateSnapshot, Lsn, Point, Progress, Snapshot, SnapshotId, State, Storage,
    StorageError, TimelineId,
};

#[derive(Debug, Clone)]
pub(super) enum SnPlan {
    Head { conn: Option<ConnInfo> },
    Replay { base: BaseRow, target: Lsn },
}

impl Engine {
    pub(super) async fn plan_snapshot(
        &self,
        req: &CreateSnapshot,
    ) -> Result<(SnPlan, InUse), StorageError> {
        let guard = self.acquire(vec![format!("t:{}", req.timeline)]);
        let row = self.ready(&req.timeline).await?;
        let conn = req.source_connection.clone();
        if req.point == Point::Head {
            self.check_copyable(&req.timeline, conn.as_ref())?;
            return Ok((SnPlan::Head { conn }, guard));
        }
        let (base, target) = self.resolve_target(&row, &req.point, conn.as_ref()).await?;
        let guard = self.join(guard, base_keys(&base));
        Ok((SnPlan::Replay { base, target }, guard))
    }

    pub(super) fn spawn_snapshot(
        &self,
        id: SnapshotId,
        timeline: TimelineId,
        plan: SnPlan,
        guard: InUse,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            match me.build_snapshot(&id, &timeline, plan).await {
                Ok(()) => tracing::info!(snapshot = %id, "snapshot ready"),
                Err(e) => {
                    tracing::warn!(snapshot = %id, error = %e, "creating a snapshot failed");
                    let _ = me.remove_snapshot_dirs(&id).await;
                    let _ = me
                        .inner
                        .meta
                        .set_state(&id, State::Failed, Some(&e.to_string()))
                        .await;
                }
            }
        });
    }

    async fn build_snapshot(
        &self,
        id: &SnapshotId,
        timeline: &TimelineId,
        plan: SnPlan,
    ) -> Result<(), StorageError> {
        let dir = self.snap_dir(id);
        fs::create_dir_all(&dir).map_err(|e| io_err("creating the snapshot directory", e))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(|e| io_err("chmod", e))?;
        let data = dir.join("pgdata");
        let lsn = match plan {
            SnPlan::Head { conn } => {
                self.step(id, "copying the source").await;
                let (cons, lsn) = self
                    .copy_head(
                        timeline,
                        &data,
                        conn.as_ref(),
                        true,
                        true,
                        &format!("pgbranch-{id}"),
                    )
                    .await?;
                if let (Consistency::Clean | Consistency::Backup, Some(l)) = (cons, lsn) {
                    self.inner
                        .meta
                        .add_base(&BaseRow {
                            path: format!("snapshots/{id}/pgdata"),
                            timeline: timeline.clone(),
                            snapshot: Some(id.clone()),
                            lsn: l,
                            time: jiff::Timestamp::now(),
                            in_recovery: false,
                        })
                        .await?;
                }
                lsn
            }
            SnPlan::Replay { base, target } => {
                let work = self.tmp().join(format!("{id}-replay"));
                let log = dir.join("engine.log");
                let r = async {
                    self.step(id, "cloning the base").await;
                    self.clone_dir(&self.inner.root.join(&base.path), &work, false)
                        .await?;
                    self.fixups(&work, None)?;
                    if target > base.lsn || base.in_recovery {
                        self.step(id, "replaying WAL").await;
                        let report = self.percent_of(id, "replaying WAL");
                        self.replay(&work, &base, target, None, &log, &report)
                            .await?;
                    } else {
                        self.normalize(&work, None, &log).await?;
                    }
                    self.step(id, "storing the snapshot").await;
                    self.clone_dir(&work, &data, true).await
                }
                .await;
                let _ = self.delete_dir(&work).await;
                r?;
                Some(target)
            }
        };
        self.inner
            .meta
            .set_snapshot_done(id, lsn, pg_major_of(&data))
            .await?;
        Ok(())
    }

    pub(super) async fn snapshot_view(&self, row: SnapshotRow) -> Result<Snapshot, StorageError> {
        let mut s = Snapshot {
            id: row.id.clone(),
            key: row.key.clone(),
            label: row.label.clone(),
            timeline: row.timeline.clone(),
            point: row.point,
            state: row.state,
            error: row.error.clone(),
            progress: row.progress.clone(),
            lsn: row.lsn,
            created_at: row.created_at,
            pg_major: row.pg_major,
            size_bytes: 0,
            exclusive_bytes: None,
        };
        if row.state == State::Ready {
            let data = self.snap_dir(&row.id).join("pgdata");
            let (size, excl) = self.measured(format!("s:{}", row.id), data, vec![]).await?;
            s.size_bytes = size;
            s.exclusive_bytes = excl;
        }
        Ok(s)
    }

    async fn resume_snapshot_if_interrupted(
        &self,
        id: &SnapshotId,
        req: &CreateSnapshot,
    ) -> Result<(), StorageError> {
        let Some(row) = self.inner.meta.get(id).await? else {
            return Ok(());
        };
        let own = if row.state == State::Creating && row.interrupted {
            self.try_acquire(format!("s:{id}"))
        } else {
            None
        };
        if let Some(guard_self) = own {
            let (plan, guard) = self.plan_snapshot(req).await?;
            self.inner.meta.mark_resumed(id).await?;
            let guard = self.join(guard, guard_self.keys.clone());
            drop(guard_self);
            self.spawn_snapshot(id.clone(), row.timeline.clone(), plan, guard);
        }
        Ok(())
    }

    pub(super) async fn create_snapshot_impl(
        &self,
        req: CreateSnapshot,
    ) -> Result<Snapshot, StorageError> {
        let identity = format!("snapshot:{}:{}", req.timeline, point_key(&req.point));
        let existing =
            |kind: &str, ident: &str, object_id: &str| -> Result<SnapshotId, StorageError> {
                if kind != "snapshot" || ident != identity {
                    return Err(StorageError::Conflict {
                        message: format!(
                            "key {} was already used for a different request ({kind} {object_id})",
                            req.key
                        ),
                    });
                }
                SnapshotId::new(object_id)
            };
        if let Some((kind, ident, object_id)) = self.inner.meta.find_op(&req.key).await? {
            let id = existing(&kind, &ident, &object_id)?;
            self.resume_snapshot_if_interrupted(&id, &req).await?;
            return self.get_snapshot(&id).await;
        }
        let (plan, guard) = self.plan_snapshot(&req).await?;
        let id = SnapshotId::generate();
        let stored = StoredRequest {
            source: None,
            had_password: false,
            had_connection: req.source_connection.is_some(),
        };
        let row = SnapshotRow {
            id: id.clone(),
            key: req.key.clone(),
            label: req.label.clone(),
            timeline: req.timeline.clone(),
            point: req.point,
            state: State::Creating,
            error: None,
            progress: Some(Progress {
                step: "queued".into(),
                percent: None,
            }),
            lsn: None,
            created_at: jiff::Timestamp::now(),
            pg_major: self.inner.pg.major,
            request: serde_json::to_string(&stored).map_err(|e| io_err("encoding a request", e))?,
            interrupted: false,
        };
        match self.inner.meta.insert(&identity, &row).await? {
            Recorded::New => {
                tracing::info!(snapshot = %id, key = %req.key, timeline = %req.timeline, point = %req.point, "creating a snapshot");
                let guard = self.join(guard, vec![format!("s:{id}")]);
                self.spawn_snapshot(id.clone(), req.timeline.clone(), plan, guard);
                self.get_snapshot(&id).await
            }
            Recorded::Existing {
                kind,
                identity: ident,
                object_id,
            } => {
                drop(guard);
                let id = existing(&kind, &ident, &object_id)?;
                self.get_snapshot(&id).await
            }
        }
    }

    pub(super) async fn delete_snapshot_impl(&self, id: &SnapshotId) -> Result<(), StorageError> {
        let Some(row) = self.inner.meta.get(id).await? else {
            return Ok(());
        };
        if (row.state == State::Creating && !row.interrupted) || self.in_use(&format!("s:{id}")) {
            return Err(StorageError::Busy {
                message: format!("snapshot {id} is being created or copied"),
            });
        }
        self.mark_deleting(id, &format!("s:{id}"), (row.state, row.error.as_deref()))
            .await?;
        tracing::info!(snapshot = %id, "deleting a snapshot");
        self.forget_sizes(&format!("s:{id}"));
        self.remove_snapshot_dirs(id).await?;
        self.inner.meta.delete_snapshot(id).await
    }

    /// Deletes a snapshot's data directory, then what is left of its
    /// directory.
    pub(super) async fn remove_snapshot_dirs(&self, id: &SnapshotId) -> Result<(), StorageError> {
        let dir = self.snap_dir(id);
        self.delete_dir(&dir.join("pgdata")).await?;
        let _ = self
            .remove_tree("removing a snapshot directory", &dir)
            .await;
        Ok(())
    }
}
