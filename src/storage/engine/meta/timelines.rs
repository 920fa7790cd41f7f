//! The `timelines` table: a timeline's row, its updates, and its
//! deletion with everything recorded about it (key, bases, WAL index,
//! replicas).

use rusqlite::types::Value;

use super::{
    bad_value, json_err, object_row_fields, parse_state, progress_json, state_str, str_to_ts,
    ts_to_str, Meta, ObjectRow,
};
use crate::storage::{Lineage, OpKey, Progress, State, StorageError, TimelineId};

/// A timeline as stored.
#[derive(Debug, Clone)]
pub(crate) struct TimelineRow {
    pub id: TimelineId,
    pub key: OpKey,
    pub label: Option<String>,
    pub state: State,
    pub error: Option<String>,
    pub progress: Option<Progress>,
    pub lineage: Lineage,
    /// Password-free request (JSON of [`super::super::StoredRequest`]).
    pub request: String,
    pub created_at: jiff::Timestamp,
    pub pg_major: u32,
    /// PostgreSQL timeline ID (TLI) the data directory is on.
    pub pg_tli: Option<u32>,
    pub wal_seg_size: Option<u64>,
    /// Interrupted by a restart; waits for a create call with the same key.
    pub interrupted: bool,
}

impl ObjectRow for TimelineRow {
    object_row_fields!(TimelineId);

    const COLS: &'static str = "id, key, label, state, error, progress, lineage, request, created_at, pg_major, pg_tli, wal_seg_size, interrupted";

    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TimelineRow> {
        let id: String = r.get(0)?;
        let key: String = r.get(1)?;
        let progress: Option<String> = r.get(5)?;
        let lineage: String = r.get(6)?;
        let created: String = r.get(8)?;
        Ok(TimelineRow {
            id: TimelineId::new(id).map_err(bad_value)?,
            key: OpKey::new(key).map_err(bad_value)?,
            label: r.get(2)?,
            state: parse_state(&r.get::<_, String>(3)?),
            error: r.get(4)?,
            progress: progress.and_then(|p| serde_json::from_str(&p).ok()),
            lineage: serde_json::from_str(&lineage).map_err(|e| bad_value(json_err(e)))?,
            request: r.get(7)?,
            created_at: str_to_ts(&created),
            pg_major: r.get(9)?,
            pg_tli: r.get(10)?,
            wal_seg_size: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
            interrupted: r.get::<_, i64>(12)? != 0,
        })
    }

    fn insert(&self) -> Result<(&'static str, Vec<Value>), StorageError> {
        Ok((
            "INSERT INTO timelines (id, key, label, state, error, progress, lineage, request, created_at, pg_major) VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6, ?7, ?8, ?9)",
            vec![
                self.id.to_string().into(),
                self.key.as_str().to_string().into(),
                self.label.clone().into(),
                state_str(self.state).to_string().into(),
                progress_json(&self.progress)?.into(),
                serde_json::to_string(&self.lineage).map_err(json_err)?.into(),
                self.request.clone().into(),
                ts_to_str(self.created_at).into(),
                self.pg_major.into(),
            ],
        ))
    }
}

impl Meta {
    pub async fn set_timeline_lineage(
        &self,
        id: &TimelineId,
        lineage: &Lineage,
    ) -> Result<(), StorageError> {
        let l = serde_json::to_string(lineage).map_err(json_err)?;
        self.execute(
            "UPDATE timelines SET lineage = ?2 WHERE id = ?1",
            vec![id.to_string().into(), l.into()],
        )
        .await
    }

    pub async fn set_timeline_pg(
        &self,
        id: &TimelineId,
        pg_major: u32,
        tli: u32,
        seg_size: u64,
    ) -> Result<(), StorageError> {
        self.execute(
            "UPDATE timelines SET pg_major = ?2, pg_tli = ?3, wal_seg_size = ?4 WHERE id = ?1",
            vec![
                id.to_string().into(),
                pg_major.into(),
                tli.into(),
                (seg_size as i64).into(),
            ],
        )
        .await
    }

    /// Removes a timeline with its key, bases, WAL index and replicas.
    pub async fn delete_timeline(&self, id: &TimelineId) -> Result<(), StorageError> {
        self.delete_object(
            id,
            &[
                "DELETE FROM bases WHERE timeline = ?1 AND snapshot IS NULL",
                "DELETE FROM wal_index WHERE timeline = ?1",
                "DELETE FROM commits WHERE timeline = ?1",
                "DELETE FROM replicas WHERE timeline = ?1",
            ],
        )
        .await
    }
}
