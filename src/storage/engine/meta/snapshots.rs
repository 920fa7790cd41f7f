//! The `snapshots` table: a snapshot's row, its updates, and its
//! deletion with its key and the base it may be.

use rusqlite::types::Value;

use super::{
    bad_value, json_err, object_row_fields, parse_state, progress_json, state_str, str_to_ts,
    ts_to_str, Meta, ObjectRow,
};
use crate::storage::{Lsn, OpKey, Progress, SnapshotId, State, StorageError, TimelineId};

/// A snapshot as stored.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotRow {
    pub id: SnapshotId,
    pub key: OpKey,
    pub label: Option<String>,
    pub timeline: TimelineId,
    pub point: crate::storage::Point,
    pub state: State,
    pub error: Option<String>,
    pub progress: Option<Progress>,
    pub lsn: Option<Lsn>,
    pub created_at: jiff::Timestamp,
    pub pg_major: u32,
    pub request: String,
    pub interrupted: bool,
}

impl ObjectRow for SnapshotRow {
    object_row_fields!(SnapshotId);

    const COLS: &'static str = "id, key, label, timeline, point, state, error, progress, lsn, created_at, pg_major, request, interrupted";

    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SnapshotRow> {
        let point: String = r.get(4)?;
        let progress: Option<String> = r.get(7)?;
        let created: String = r.get(9)?;
        Ok(SnapshotRow {
            id: SnapshotId::new(r.get::<_, String>(0)?).map_err(bad_value)?,
            key: OpKey::new(r.get::<_, String>(1)?).map_err(bad_value)?,
            label: r.get(2)?,
            timeline: TimelineId::new(r.get::<_, String>(3)?).map_err(bad_value)?,
            point: serde_json::from_str(&point).map_err(|e| bad_value(json_err(e)))?,
            state: parse_state(&r.get::<_, String>(5)?),
            error: r.get(6)?,
            progress: progress.and_then(|p| serde_json::from_str(&p).ok()),
            lsn: r.get::<_, Option<i64>>(8)?.map(|v| Lsn(v as u64)),
            created_at: str_to_ts(&created),
            pg_major: r.get(10)?,
            request: r.get(11)?,
            interrupted: r.get::<_, i64>(12)? != 0,
        })
    }

    fn insert(&self) -> Result<(&'static str, Vec<Value>), StorageError> {
        Ok((
            "INSERT INTO snapshots (id, key, label, timeline, point, state, progress, created_at, pg_major, request) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            vec![
                self.id.to_string().into(),
                self.key.as_str().to_string().into(),
                self.label.clone().into(),
                self.timeline.to_string().into(),
                serde_json::to_string(&self.point).map_err(json_err)?.into(),
                state_str(self.state).to_string().into(),
                progress_json(&self.progress)?.into(),
                ts_to_str(self.created_at).into(),
                self.pg_major.into(),
                self.request.clone().into(),
            ],
        ))
    }
}

impl Meta {
    /// Records a made snapshot: its LSN and major version, `Ready`.
    pub async fn set_snapshot_done(
        &self,
        id: &SnapshotId,
        lsn: Option<Lsn>,
        pg_major: u32,
    ) -> Result<(), StorageError> {
        self.execute(
            "UPDATE snapshots SET lsn = ?2, pg_major = ?3, state = 'Ready', error = NULL, progress = NULL, interrupted = 0 WHERE id = ?1",
            vec![
                id.to_string().into(),
                lsn.map(|l| l.0 as i64).into(),
                pg_major.into(),
            ],
        )
        .await
    }

    /// Removes a snapshot with its key and the base it was.
    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), StorageError> {
        self.delete_object(id, &["DELETE FROM bases WHERE snapshot = ?1"])
            .await
    }
}
