//! The `replicas` table: the read replicas of each timeline by ordinal.

use rusqlite::{params, OptionalExtension};

use super::{bad_value, parse_state, state_str, str_to_ts, ts_to_str, Meta};
use crate::storage::{State, StorageError, TimelineId};

/// A read replica as stored.
#[derive(Debug, Clone)]
pub(crate) struct ReplicaRow {
    pub timeline: TimelineId,
    pub ordinal: u32,
    pub state: State,
    pub created_at: jiff::Timestamp,
}

/// Read replicas.
impl Meta {
    fn replica_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReplicaRow> {
        let tl: String = r.get(0)?;
        let state: String = r.get(2)?;
        let created: String = r.get(3)?;
        Ok(ReplicaRow {
            timeline: TimelineId::new(tl).map_err(bad_value)?,
            ordinal: r.get(1)?,
            state: parse_state(&state),
            created_at: str_to_ts(&created),
        })
    }

    pub async fn replica(
        &self,
        timeline: &TimelineId,
        ordinal: u32,
    ) -> Result<Option<ReplicaRow>, StorageError> {
        let timeline = timeline.clone();
        self.with(move |c| {
            c.query_row(
                "SELECT timeline, ordinal, state, created_at FROM replicas WHERE timeline = ?1 AND ordinal = ?2",
                params![timeline.as_str(), ordinal],
                Self::replica_from_row,
            )
            .optional()
        })
        .await
    }

    /// The replicas of one timeline, or of every timeline, by ordinal.
    pub async fn replicas(
        &self,
        timeline: Option<&TimelineId>,
    ) -> Result<Vec<ReplicaRow>, StorageError> {
        let timeline = timeline.cloned();
        self.with(move |c| {
            let mut st = c.prepare(
                "SELECT timeline, ordinal, state, created_at FROM replicas WHERE ?1 IS NULL OR timeline = ?1 ORDER BY timeline, ordinal",
            )?;
            let rows = st.query_map(params![timeline.as_ref().map(|t| t.as_str())], Self::replica_from_row)?;
            rows.collect()
        })
        .await
    }

    /// Records a replica (replacing a stale row of the same ordinal).
    pub async fn put_replica(&self, row: &ReplicaRow) -> Result<(), StorageError> {
        self.execute(
            "INSERT OR REPLACE INTO replicas (timeline, ordinal, state, created_at) VALUES (?1, ?2, ?3, ?4)",
            vec![
                row.timeline.to_string().into(),
                row.ordinal.into(),
                state_str(row.state).to_string().into(),
                ts_to_str(row.created_at).into(),
            ],
        )
        .await
    }

    pub async fn set_replica_state(
        &self,
        timeline: &TimelineId,
        ordinal: u32,
        state: State,
    ) -> Result<(), StorageError> {
        self.execute(
            "UPDATE replicas SET state = ?3 WHERE timeline = ?1 AND ordinal = ?2",
            vec![
                timeline.to_string().into(),
                ordinal.into(),
                state_str(state).to_string().into(),
            ],
        )
        .await
    }

    pub async fn delete_replica(
        &self,
        timeline: &TimelineId,
        ordinal: u32,
    ) -> Result<(), StorageError> {
        self.execute(
            "DELETE FROM replicas WHERE timeline = ?1 AND ordinal = ?2",
            vec![timeline.to_string().into(), ordinal.into()],
        )
        .await
    }
}
