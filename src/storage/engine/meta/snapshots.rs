//! The `snapshots` table: a snapshot's row, its lifecycle updates, and its
//! deletion with its key and the base it may be.

use rusqlite::{params, OptionalExtension};

use super::{
    json_err, parse_state, progress_json, record_operation, state_str, str_to_ts, ts_to_str, Kind,
    Meta, Recorded,
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

impl Meta {
    pub async fn insert_snapshot(
        &self,
        identity: &str,
        row: &SnapshotRow,
    ) -> Result<Recorded, StorageError> {
        let point = serde_json::to_string(&row.point).map_err(json_err)?;
        let progress = progress_json(&row.progress)?;
        let (identity, row) = (identity.to_string(), row.clone());
        self.with(move |c| {
            let tx = c.transaction()?;
            if let Some(existing) = record_operation(
                &tx,
                row.key.as_str(),
                "snapshot",
                &identity,
                row.id.as_str(),
                row.created_at,
            )? {
                return Ok(existing);
            }
            tx.execute(
                "INSERT INTO snapshots (id, key, label, timeline, point, state, progress, created_at, pg_major, request) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    row.id.as_str(),
                    row.key.as_str(),
                    row.label,
                    row.timeline.as_str(),
                    point,
                    state_str(row.state),
                    progress,
                    ts_to_str(row.created_at),
                    row.pg_major,
                    row.request
                ],
            )?;
            tx.commit()?;
            Ok(Recorded::New)
        })
        .await
    }

    fn snapshot_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SnapshotRow> {
        let bad = |e: StorageError| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        };
        let point: String = r.get(4)?;
        let progress: Option<String> = r.get(7)?;
        let created: String = r.get(9)?;
        Ok(SnapshotRow {
            id: SnapshotId::new(r.get::<_, String>(0)?).map_err(bad)?,
            key: OpKey::new(r.get::<_, String>(1)?).map_err(bad)?,
            label: r.get(2)?,
            timeline: TimelineId::new(r.get::<_, String>(3)?).map_err(bad)?,
            point: serde_json::from_str(&point).map_err(|e| bad(json_err(e)))?,
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

    const SN_COLS: &'static str = "id, key, label, timeline, point, state, error, progress, lsn, created_at, pg_major, request, interrupted";

    pub async fn snapshot(&self, id: &SnapshotId) -> Result<Option<SnapshotRow>, StorageError> {
        let sql = format!("SELECT {} FROM snapshots WHERE id = ?1", Self::SN_COLS);
        let id = id.clone();
        self.with(move |c| {
            c.query_row(&sql, params![id.as_str()], Self::snapshot_from_row)
                .optional()
        })
        .await
    }

    pub async fn snapshots(&self) -> Result<Vec<SnapshotRow>, StorageError> {
        let sql = format!(
            "SELECT {} FROM snapshots ORDER BY created_at, id",
            Self::SN_COLS
        );
        self.with(move |c| {
            let mut st = c.prepare(&sql)?;
            let rows = st.query_map([], Self::snapshot_from_row)?;
            rows.collect()
        })
        .await
    }

    pub async fn set_snapshot_progress(
        &self,
        id: &SnapshotId,
        progress: Option<Progress>,
    ) -> Result<(), StorageError> {
        self.set_progress(Kind::Snapshot, id.as_str(), progress)
            .await
    }

    pub async fn set_snapshot_state(
        &self,
        id: &SnapshotId,
        state: State,
        error: Option<&str>,
    ) -> Result<(), StorageError> {
        self.set_state(Kind::Snapshot, id.as_str(), state, error)
            .await
    }

    pub async fn mark_snapshot_interrupted(
        &self,
        id: &SnapshotId,
        msg: &str,
    ) -> Result<(), StorageError> {
        self.mark_interrupted(Kind::Snapshot, id.as_str(), msg)
            .await
    }

    pub async fn set_snapshot_done(
        &self,
        id: &SnapshotId,
        lsn: Option<Lsn>,
        pg_major: u32,
    ) -> Result<(), StorageError> {
        let id = id.clone();
        self.with(move |c| {
            c.execute(
                "UPDATE snapshots SET lsn = ?2, pg_major = ?3, state = 'Ready', error = NULL, progress = NULL, interrupted = 0 WHERE id = ?1",
                params![id.as_str(), lsn.map(|l| l.0 as i64), pg_major],
            )
        })
        .await
        .map(|_| ())
    }

    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), StorageError> {
        let id = id.clone();
        self.with(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM operations WHERE kind = 'snapshot' AND object_id = ?1",
                params![id.as_str()],
            )?;
            tx.execute("DELETE FROM snapshots WHERE id = ?1", params![id.as_str()])?;
            tx.execute(
                "DELETE FROM bases WHERE snapshot = ?1",
                params![id.as_str()],
            )?;
            tx.commit()
        })
        .await
    }

    pub async fn mark_resumed_s(&self, id: &SnapshotId) -> Result<(), StorageError> {
        self.mark_resumed(Kind::Snapshot, id.as_str()).await
    }
}
