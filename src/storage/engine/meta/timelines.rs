//! The `timelines` table: a timeline's row, its lifecycle updates, and its
//! deletion with everything recorded about it (key, bases, WAL index,
//! replicas).

use rusqlite::{params, OptionalExtension};

use super::{
    json_err, parse_state, progress_json, record_operation, state_str, str_to_ts, ts_to_str, Kind,
    Meta, Recorded,
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

impl Meta {
    /// Records the operation and its timeline row in one transaction.
    pub async fn insert_timeline(
        &self,
        identity: &str,
        row: &TimelineRow,
    ) -> Result<Recorded, StorageError> {
        let lineage = serde_json::to_string(&row.lineage).map_err(json_err)?;
        let progress = progress_json(&row.progress)?;
        let (identity, row) = (identity.to_string(), row.clone());
        self.with(move |c| {
            let tx = c.transaction()?;
            if let Some(existing) = record_operation(
                &tx,
                row.key.as_str(),
                "timeline",
                &identity,
                row.id.as_str(),
                row.created_at,
            )? {
                return Ok(existing);
            }
            tx.execute(
                "INSERT INTO timelines (id, key, label, state, error, progress, lineage, request, created_at, pg_major) VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6, ?7, ?8, ?9)",
                params![
                    row.id.as_str(),
                    row.key.as_str(),
                    row.label,
                    state_str(row.state),
                    progress,
                    lineage,
                    row.request,
                    ts_to_str(row.created_at),
                    row.pg_major
                ],
            )?;
            tx.commit()?;
            Ok(Recorded::New)
        })
        .await
    }

    fn timeline_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TimelineRow> {
        let id: String = r.get(0)?;
        let key: String = r.get(1)?;
        let progress: Option<String> = r.get(5)?;
        let lineage: String = r.get(6)?;
        let created: String = r.get(8)?;
        let bad = |e: StorageError| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        };
        Ok(TimelineRow {
            id: TimelineId::new(id).map_err(bad)?,
            key: OpKey::new(key).map_err(bad)?,
            label: r.get(2)?,
            state: parse_state(&r.get::<_, String>(3)?),
            error: r.get(4)?,
            progress: progress.and_then(|p| serde_json::from_str(&p).ok()),
            lineage: serde_json::from_str(&lineage).map_err(|e| bad(json_err(e)))?,
            request: r.get(7)?,
            created_at: str_to_ts(&created),
            pg_major: r.get(9)?,
            pg_tli: r.get(10)?,
            wal_seg_size: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
            interrupted: r.get::<_, i64>(12)? != 0,
        })
    }

    const TL_COLS: &'static str = "id, key, label, state, error, progress, lineage, request, created_at, pg_major, pg_tli, wal_seg_size, interrupted";

    pub async fn timeline(&self, id: &TimelineId) -> Result<Option<TimelineRow>, StorageError> {
        let sql = format!("SELECT {} FROM timelines WHERE id = ?1", Self::TL_COLS);
        let id = id.clone();
        self.with(move |c| {
            c.query_row(&sql, params![id.as_str()], Self::timeline_from_row)
                .optional()
        })
        .await
    }

    pub async fn timelines(&self) -> Result<Vec<TimelineRow>, StorageError> {
        let sql = format!(
            "SELECT {} FROM timelines ORDER BY created_at, id",
            Self::TL_COLS
        );
        self.with(move |c| {
            let mut st = c.prepare(&sql)?;
            let rows = st.query_map([], Self::timeline_from_row)?;
            rows.collect()
        })
        .await
    }

    pub async fn set_timeline_progress(
        &self,
        id: &TimelineId,
        progress: Option<Progress>,
    ) -> Result<(), StorageError> {
        self.set_progress(Kind::Timeline, id.as_str(), progress)
            .await
    }

    pub async fn set_timeline_state(
        &self,
        id: &TimelineId,
        state: State,
        error: Option<&str>,
    ) -> Result<(), StorageError> {
        self.set_state(Kind::Timeline, id.as_str(), state, error)
            .await
    }

    pub async fn mark_timeline_interrupted(
        &self,
        id: &TimelineId,
        msg: &str,
    ) -> Result<(), StorageError> {
        self.mark_interrupted(Kind::Timeline, id.as_str(), msg)
            .await
    }

    pub async fn set_timeline_lineage(
        &self,
        id: &TimelineId,
        lineage: &Lineage,
    ) -> Result<(), StorageError> {
        let l = serde_json::to_string(lineage).map_err(json_err)?;
        let id = id.clone();
        self.with(move |c| {
            c.execute(
                "UPDATE timelines SET lineage = ?2 WHERE id = ?1",
                params![id.as_str(), l],
            )
        })
        .await
        .map(|_| ())
    }

    pub async fn set_timeline_pg(
        &self,
        id: &TimelineId,
        pg_major: u32,
        tli: u32,
        seg_size: u64,
    ) -> Result<(), StorageError> {
        let id = id.clone();
        self.with(move |c| {
            c.execute(
                "UPDATE timelines SET pg_major = ?2, pg_tli = ?3, wal_seg_size = ?4 WHERE id = ?1",
                params![id.as_str(), pg_major, tli, seg_size as i64],
            )
        })
        .await
        .map(|_| ())
    }

    /// Removes a timeline with its key, bases and WAL index.
    pub async fn delete_timeline(&self, id: &TimelineId) -> Result<(), StorageError> {
        let id = id.clone();
        self.with(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM operations WHERE kind = 'timeline' AND object_id = ?1",
                params![id.as_str()],
            )?;
            tx.execute("DELETE FROM timelines WHERE id = ?1", params![id.as_str()])?;
            tx.execute(
                "DELETE FROM bases WHERE timeline = ?1 AND snapshot IS NULL",
                params![id.as_str()],
            )?;
            tx.execute(
                "DELETE FROM wal_index WHERE timeline = ?1",
                params![id.as_str()],
            )?;
            tx.execute(
                "DELETE FROM commits WHERE timeline = ?1",
                params![id.as_str()],
            )?;
            tx.execute(
                "DELETE FROM replicas WHERE timeline = ?1",
                params![id.as_str()],
            )?;
            tx.commit()
        })
        .await
    }

    pub async fn mark_resumed_t(&self, id: &TimelineId) -> Result<(), StorageError> {
        self.mark_resumed(Kind::Timeline, id.as_str()).await
    }
}
