//! Snapshots: a snapshot's name is recorded at once and the engine is asked
//! for it in the background; its view asks the engine for its state (by id,
//! or by key before the engine answered).

use super::{check_name, now_stamp, short_id, Daemon};
use crate::local::api::{CreateSnapshotRequest, SnapshotView};
use crate::local::store::SnapshotRow;
use crate::local::LocalError;
use crate::storage::{CreateSnapshot, OpKey, Snapshot, State, Storage, StorageError};

impl Daemon {
    /// Records a snapshot and asks the engine for it in the background (a
    /// head copy in backup mode, or a replay, can take a while).
    pub(super) async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<SnapshotView, LocalError> {
        let _g = self.inner.ops.lock().await;
        let b = self.branch(&req.branch)?;
        let tl = Self::ready_timeline(&b)?;
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-{}", req.branch, now_stamp()));
        check_name("snapshot", &name)?;
        if self.store().snapshot(&name)?.is_some() {
            return Err(LocalError::Conflict(format!(
                "snapshot {name:?} already exists"
            )));
        }
        let row = SnapshotRow {
            name: name.clone(),
            id: None,
            op_key: format!("snap-{}", short_id()),
            error: None,
            branch: req.branch,
            timeline: tl.clone(),
            point: req.point,
            created_at: jiff::Timestamp::now(),
        };
        self.store().insert_snapshot(&row)?;
        let conn = self.source_connection(&tl).await?;
        let d = self.clone();
        let key = OpKey::new(row.op_key.clone())?;
        tokio::spawn(async move {
            let r = d
                .engine()
                .create_snapshot(CreateSnapshot {
                    key,
                    timeline: tl,
                    point: req.point,
                    source_connection: conn,
                    label: Some(format!("local/{name}")),
                })
                .await;
            let stored = match &r {
                Ok(s) => d.store().set_snapshot_result(&name, Some(&s.id), None),
                Err(e) => {
                    tracing::error!(snapshot = %name, error = %e, "snapshot failed");
                    d.store()
                        .set_snapshot_result(&name, None, Some(&e.to_string()))
                }
            };
            if let Err(e) = stored {
                tracing::error!(snapshot = %name, error = %e, "recording a snapshot failed");
            }
        });
        drop(_g);
        self.snapshot_view(&row).await
    }

    /// The engine's snapshot for a row: by id, or by key while the engine
    /// has not answered yet.
    pub(super) async fn engine_snapshot(
        &self,
        s: &SnapshotRow,
    ) -> Result<Option<Snapshot>, LocalError> {
        match &s.id {
            Some(id) => match self.engine().get_snapshot(id).await {
                Ok(x) => Ok(Some(x)),
                Err(StorageError::NotFound { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            },
            None => Ok(self
                .engine()
                .list_snapshots()
                .await?
                .into_iter()
                .find(|x| x.key.as_str() == s.op_key)),
        }
    }

    /// A snapshot as shown: its record and the engine's state of it.
    pub(super) async fn snapshot_view(&self, s: &SnapshotRow) -> Result<SnapshotView, LocalError> {
        let (state, lsn, size, error, progress) = match (self.engine_snapshot(s).await?, &s.error) {
            (Some(x), _) => (
                match x.state {
                    State::Creating => "creating",
                    State::Ready => "ready",
                    State::Failed => "failed",
                    State::Deleting => "deleting",
                },
                x.lsn,
                x.size_bytes,
                x.error,
                x.progress,
            ),
            (None, Some(e)) => ("failed", None, 0, Some(e.clone()), None),
            (None, None) if s.id.is_none() => ("creating", None, 0, None, None),
            (None, None) => (
                "missing",
                None,
                0,
                Some("not in the storage engine".into()),
                None,
            ),
        };
        Ok(SnapshotView {
            name: s.name.clone(),
            id: s.id.as_ref().map(|i| i.to_string()),
            branch: s.branch.clone(),
            point: s.point,
            lsn,
            size_bytes: size,
            state: state.to_string(),
            error,
            progress,
            created_at: s.created_at,
        })
    }

    /// Deletes a snapshot from the engine and its name.
    pub(super) async fn delete_snapshot(&self, name: &str) -> Result<(), LocalError> {
        let _g = self.inner.ops.lock().await;
        let s = self.snapshot(name)?;
        let id = match &s.id {
            Some(id) => Some(id.clone()),
            None => self.engine_snapshot(&s).await?.map(|x| x.id),
        };
        match id {
            Some(id) => self.engine().delete_snapshot(&id).await?,
            None if s.error.is_none() => {
                return Err(LocalError::Conflict(format!(
                    "snapshot {name:?} is still being requested; retry in a moment"
                )))
            }
            None => {}
        }
        self.store().delete_snapshot(name)?;
        Ok(())
    }
}
