//! The engine's metadata store: one SQLite database (`meta.sqlite` on the
//! volume root), written in transactions.
//!
//! Tables:
//! * `operations`: one row per idempotency key: which kind of object it
//!   created, a password-free identity of the request (to tell a retry from
//!   a different request under the same key) and the object's id;
//! * `timelines`, `snapshots`: the objects, their state, error, progress,
//!   lineage and the password-free request used to resume after a crash;
//! * `bases`: data directories a point-in-time copy of a timeline can start
//!   from (its creation copy, and snapshots taken in backup mode or of a
//!   stopped server), with the LSN and time they hold;
//! * `wal_index`, `commits`: what has been read from each timeline's WAL
//!   archive with `pg_waldump` (commit records with their times), used for
//!   the restore window and to resolve timestamps to LSNs;
//! * `replicas`: the read replicas of each timeline by ordinal, with their
//!   state (a `Creating` or `Deleting` row at open is a half-made or
//!   half-removed replica: its directory is removed with the row).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::storage::{Lineage, Lsn, OpKey, Progress, SnapshotId, State, StorageError, TimelineId};

fn db_err(e: rusqlite::Error) -> StorageError {
    StorageError::internal(format!("metadata store: {e}"))
}

fn json_err(e: serde_json::Error) -> StorageError {
    StorageError::internal(format!("metadata store: bad record: {e}"))
}

fn state_str(s: State) -> &'static str {
    match s {
        State::Creating => "Creating",
        State::Ready => "Ready",
        State::Failed => "Failed",
        State::Deleting => "Deleting",
    }
}

fn parse_state(s: &str) -> State {
    match s {
        "Ready" => State::Ready,
        "Failed" => State::Failed,
        "Deleting" => State::Deleting,
        _ => State::Creating,
    }
}

fn ts_to_str(t: jiff::Timestamp) -> String {
    t.to_string()
}

fn str_to_ts(s: &str) -> jiff::Timestamp {
    s.parse().unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

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
    /// Password-free request (JSON of [`super::StoredRequest`]).
    pub request: String,
    pub created_at: jiff::Timestamp,
    pub pg_major: u32,
    /// PostgreSQL timeline ID (TLI) the data directory is on.
    pub pg_tli: Option<u32>,
    pub wal_seg_size: Option<u64>,
    /// Interrupted by a restart; waits for a create call with the same key.
    pub interrupted: bool,
}

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

/// A base a point-in-time copy can start from.
#[derive(Debug, Clone)]
pub(crate) struct BaseRow {
    /// Relative to the volume root.
    pub path: String,
    pub timeline: TimelineId,
    pub snapshot: Option<SnapshotId>,
    pub lsn: Lsn,
    pub time: jiff::Timestamp,
    /// A base rolled forward by replay and stopped in recovery: it must be
    /// replayed (never merely started) and is consistent from `lsn` on.
    pub in_recovery: bool,
}

/// A read replica as stored.
#[derive(Debug, Clone)]
pub(crate) struct ReplicaRow {
    pub timeline: TimelineId,
    pub ordinal: u32,
    pub state: State,
    pub created_at: jiff::Timestamp,
}

/// What has been read from a timeline's archive.
#[derive(Debug, Clone, Default)]
pub(crate) struct WalIndexRow {
    pub scanned_upto: u64,
    pub last_lsn: Option<Lsn>,
    pub last_segment: Option<String>,
    /// Every commit before this instant is known to be archived.
    pub complete_time: Option<jiff::Timestamp>,
}

/// Within `tx`: the operation already recorded under `key` (`Some`), or
/// records this one (`None`: the caller inserts its object, same `tx`).
fn record_operation(
    tx: &rusqlite::Transaction<'_>,
    key: &str,
    kind: &str,
    identity: &str,
    object_id: &str,
    created_at: jiff::Timestamp,
) -> rusqlite::Result<Option<Recorded>> {
    let existing: Option<(String, String, String)> = tx
        .query_row(
            "SELECT kind, identity, object_id FROM operations WHERE key = ?1",
            params![key],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    if let Some((kind, identity, object_id)) = existing {
        return Ok(Some(Recorded::Existing {
            kind,
            identity,
            object_id,
        }));
    }
    tx.execute(
        "INSERT INTO operations (key, kind, identity, object_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![key, kind, identity, object_id, ts_to_str(created_at)],
    )?;
    Ok(None)
}

/// The objects with a creation lifecycle (state, progress, interruption),
/// each kept in its own table.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Timeline,
    Snapshot,
}

impl Kind {
    fn table(self) -> &'static str {
        match self {
            Kind::Timeline => "timelines",
            Kind::Snapshot => "snapshots",
        }
    }
}

pub(crate) struct Meta {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = r#"
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
CREATE TABLE IF NOT EXISTS operations (
  key TEXT PRIMARY KEY,
  kind TEXT NOT NULL,
  identity TEXT NOT NULL,
  object_id TEXT NOT NULL,
  created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS timelines (
  id TEXT PRIMARY KEY,
  key TEXT NOT NULL,
  label TEXT,
  state TEXT NOT NULL,
  error TEXT,
  progress TEXT,
  lineage TEXT NOT NULL,
  request TEXT NOT NULL,
  created_at TEXT NOT NULL,
  pg_major INTEGER NOT NULL DEFAULT 0,
  pg_tli INTEGER,
  wal_seg_size INTEGER,
  interrupted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS snapshots (
  id TEXT PRIMARY KEY,
  key TEXT NOT NULL,
  label TEXT,
  timeline TEXT NOT NULL,
  point TEXT NOT NULL,
  state TEXT NOT NULL,
  error TEXT,
  progress TEXT,
  lsn INTEGER,
  created_at TEXT NOT NULL,
  pg_major INTEGER NOT NULL DEFAULT 0,
  request TEXT NOT NULL,
  interrupted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS bases (
  path TEXT PRIMARY KEY,
  timeline TEXT NOT NULL,
  snapshot TEXT,
  lsn INTEGER NOT NULL,
  time TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS wal_index (
  timeline TEXT PRIMARY KEY,
  scanned_upto INTEGER NOT NULL,
  last_lsn INTEGER,
  last_segment TEXT,
  complete_time TEXT
);
CREATE TABLE IF NOT EXISTS commits (
  timeline TEXT NOT NULL,
  lsn INTEGER NOT NULL,
  time_us INTEGER NOT NULL,
  PRIMARY KEY (timeline, lsn)
);
CREATE INDEX IF NOT EXISTS commits_by_time ON commits (timeline, time_us);
CREATE TABLE IF NOT EXISTS replicas (
  timeline TEXT NOT NULL,
  ordinal INTEGER NOT NULL,
  state TEXT NOT NULL,
  created_at TEXT NOT NULL,
  PRIMARY KEY (timeline, ordinal)
);
"#;

fn progress_json(p: &Option<Progress>) -> Result<Option<String>, StorageError> {
    p.as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(json_err)
}

/// Outcome of recording a new operation.
pub(crate) enum Recorded {
    /// Recorded now: the caller starts the work.
    New,
    /// The key is known: the object it made.
    Existing {
        kind: String,
        identity: String,
        object_id: String,
    },
}

impl Meta {
    pub fn open(path: &Path) -> Result<Meta, StorageError> {
        let conn = Connection::open(path).map_err(db_err)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        // Added after the first release: bases rolled forward by replay
        // are stopped in recovery (see `bases.rs`).
        let has_in_recovery: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('bases') WHERE name = 'in_recovery'")
            .and_then(|mut st| st.exists([]))
            .map_err(db_err)?;
        if !has_in_recovery {
            conn.execute_batch(
                "ALTER TABLE bases ADD COLUMN in_recovery INTEGER NOT NULL DEFAULT 0",
            )
            .map_err(db_err)?;
        }
        Ok(Meta {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StorageError> {
        let mut c = self
            .conn
            .lock()
            .map_err(|_| StorageError::internal("metadata store lock poisoned"))?;
        f(&mut c).map_err(db_err)
    }

    pub fn find_op(&self, key: &OpKey) -> Result<Option<(String, String, String)>, StorageError> {
        self.with(|c| {
            c.query_row(
                "SELECT kind, identity, object_id FROM operations WHERE key = ?1",
                params![key.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
        })
    }

    /// Records the operation and its timeline row in one transaction.
    pub fn insert_timeline(
        &self,
        identity: &str,
        row: &TimelineRow,
    ) -> Result<Recorded, StorageError> {
        let lineage = serde_json::to_string(&row.lineage).map_err(json_err)?;
        let progress = progress_json(&row.progress)?;
        self.with(|c| {
            let tx = c.transaction()?;
            if let Some(existing) = record_operation(
                &tx,
                row.key.as_str(),
                "timeline",
                identity,
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
    }

    pub fn insert_snapshot(
        &self,
        identity: &str,
        row: &SnapshotRow,
    ) -> Result<Recorded, StorageError> {
        let point = serde_json::to_string(&row.point).map_err(json_err)?;
        let progress = progress_json(&row.progress)?;
        self.with(|c| {
            let tx = c.transaction()?;
            if let Some(existing) = record_operation(
                &tx,
                row.key.as_str(),
                "snapshot",
                identity,
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

    pub fn timeline(&self, id: &TimelineId) -> Result<Option<TimelineRow>, StorageError> {
        let sql = format!("SELECT {} FROM timelines WHERE id = ?1", Self::TL_COLS);
        self.with(|c| {
            c.query_row(&sql, params![id.as_str()], Self::timeline_from_row)
                .optional()
        })
    }

    pub fn timelines(&self) -> Result<Vec<TimelineRow>, StorageError> {
        let sql = format!(
            "SELECT {} FROM timelines ORDER BY created_at, id",
            Self::TL_COLS
        );
        self.with(|c| {
            let mut st = c.prepare(&sql)?;
            let rows = st.query_map([], Self::timeline_from_row)?;
            rows.collect()
        })
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

    pub fn snapshot(&self, id: &SnapshotId) -> Result<Option<SnapshotRow>, StorageError> {
        let sql = format!("SELECT {} FROM snapshots WHERE id = ?1", Self::SN_COLS);
        self.with(|c| {
            c.query_row(&sql, params![id.as_str()], Self::snapshot_from_row)
                .optional()
        })
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotRow>, StorageError> {
        let sql = format!(
            "SELECT {} FROM snapshots ORDER BY created_at, id",
            Self::SN_COLS
        );
        self.with(|c| {
            let mut st = c.prepare(&sql)?;
            let rows = st.query_map([], Self::snapshot_from_row)?;
            rows.collect()
        })
    }

    pub fn set_timeline_progress(
        &self,
        id: &TimelineId,
        progress: Option<Progress>,
    ) -> Result<(), StorageError> {
        self.set_progress(Kind::Timeline, id.as_str(), progress)
    }

    pub fn set_snapshot_progress(
        &self,
        id: &SnapshotId,
        progress: Option<Progress>,
    ) -> Result<(), StorageError> {
        self.set_progress(Kind::Snapshot, id.as_str(), progress)
    }

    pub fn set_timeline_state(
        &self,
        id: &TimelineId,
        state: State,
        error: Option<&str>,
    ) -> Result<(), StorageError> {
        self.set_state(Kind::Timeline, id.as_str(), state, error)
    }

    pub fn set_snapshot_state(
        &self,
        id: &SnapshotId,
        state: State,
        error: Option<&str>,
    ) -> Result<(), StorageError> {
        self.set_state(Kind::Snapshot, id.as_str(), state, error)
    }

    pub fn mark_timeline_interrupted(
        &self,
        id: &TimelineId,
        msg: &str,
    ) -> Result<(), StorageError> {
        self.mark_interrupted(Kind::Timeline, id.as_str(), msg)
    }

    pub fn mark_snapshot_interrupted(
        &self,
        id: &SnapshotId,
        msg: &str,
    ) -> Result<(), StorageError> {
        self.mark_interrupted(Kind::Snapshot, id.as_str(), msg)
    }

    fn set_progress(
        &self,
        kind: Kind,
        id: &str,
        progress: Option<Progress>,
    ) -> Result<(), StorageError> {
        let p = progress_json(&progress)?;
        let sql = format!("UPDATE {} SET progress = ?2 WHERE id = ?1", kind.table());
        self.with(|c| c.execute(&sql, params![id, p])).map(|_| ())
    }

    fn set_state(
        &self,
        kind: Kind,
        id: &str,
        state: State,
        error: Option<&str>,
    ) -> Result<(), StorageError> {
        let sql = format!(
            "UPDATE {} SET state = ?2, error = ?3, progress = NULL, interrupted = 0 WHERE id = ?1",
            kind.table()
        );
        self.with(|c| c.execute(&sql, params![id, state_str(state), error]))
            .map(|_| ())
    }

    fn mark_interrupted(&self, kind: Kind, id: &str, msg: &str) -> Result<(), StorageError> {
        let p = progress_json(&Some(Progress {
            step: msg.to_string(),
            percent: None,
        }))?;
        let sql = format!(
            "UPDATE {} SET interrupted = 1, progress = ?2 WHERE id = ?1",
            kind.table()
        );
        self.with(|c| c.execute(&sql, params![id, p])).map(|_| ())
    }

    fn mark_resumed(&self, kind: Kind, id: &str) -> Result<(), StorageError> {
        let sql = format!("UPDATE {} SET interrupted = 0 WHERE id = ?1", kind.table());
        self.with(|c| c.execute(&sql, params![id])).map(|_| ())
    }

    pub fn set_timeline_lineage(
        &self,
        id: &TimelineId,
        lineage: &Lineage,
    ) -> Result<(), StorageError> {
        let l = serde_json::to_string(lineage).map_err(json_err)?;
        self.with(|c| {
            c.execute(
                "UPDATE timelines SET lineage = ?2 WHERE id = ?1",
                params![id.as_str(), l],
            )
        })
        .map(|_| ())
    }

    pub fn set_timeline_pg(
        &self,
        id: &TimelineId,
        pg_major: u32,
        tli: u32,
        seg_size: u64,
    ) -> Result<(), StorageError> {
        self.with(|c| {
            c.execute(
                "UPDATE timelines SET pg_major = ?2, pg_tli = ?3, wal_seg_size = ?4 WHERE id = ?1",
                params![id.as_str(), pg_major, tli, seg_size as i64],
            )
        })
        .map(|_| ())
    }

    pub fn set_snapshot_done(
        &self,
        id: &SnapshotId,
        lsn: Option<Lsn>,
        pg_major: u32,
    ) -> Result<(), StorageError> {
        self.with(|c| {
            c.execute(
                "UPDATE snapshots SET lsn = ?2, pg_major = ?3, state = 'Ready', error = NULL, progress = NULL, interrupted = 0 WHERE id = ?1",
                params![id.as_str(), lsn.map(|l| l.0 as i64), pg_major],
            )
        })
        .map(|_| ())
    }

    /// Removes a timeline with its key, bases and WAL index.
    pub fn delete_timeline(&self, id: &TimelineId) -> Result<(), StorageError> {
        self.with(|c| {
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
    }

    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), StorageError> {
        self.with(|c| {
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
    }

    pub fn add_base(&self, b: &BaseRow) -> Result<(), StorageError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO bases (path, timeline, snapshot, lsn, time, in_recovery) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    b.path,
                    b.timeline.as_str(),
                    b.snapshot.as_ref().map(|s| s.as_str().to_string()),
                    b.lsn.0 as i64,
                    ts_to_str(b.time),
                    b.in_recovery
                ],
            )
        })
        .map(|_| ())
    }

    /// Bases of a timeline, oldest LSN first.
    /// Forgets one base (its directory is the caller's to delete).
    pub fn delete_base(&self, path: &str) -> Result<(), StorageError> {
        self.with(|c| c.execute("DELETE FROM bases WHERE path = ?1", params![path]))
            .map(|_| ())
    }

    pub fn bases(&self, timeline: &TimelineId) -> Result<Vec<BaseRow>, StorageError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT path, timeline, snapshot, lsn, time, in_recovery FROM bases WHERE timeline = ?1 ORDER BY lsn, time",
            )?;
            let rows = st.query_map(params![timeline.as_str()], |r| {
                let bad = |e: StorageError| {
                    rusqlite::Error::FromSqlConversionFailure(
                        0,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                };
                let snap: Option<String> = r.get(2)?;
                let time: String = r.get(4)?;
                Ok(BaseRow {
                    path: r.get(0)?,
                    timeline: TimelineId::new(r.get::<_, String>(1)?).map_err(bad)?,
                    snapshot: snap.map(SnapshotId::new).transpose().map_err(bad)?,
                    lsn: Lsn(r.get::<_, i64>(3)? as u64),
                    time: str_to_ts(&time),
                    in_recovery: r.get(5)?,
                })
            })?;
            rows.collect()
        })
    }

    pub fn wal_index(&self, timeline: &TimelineId) -> Result<WalIndexRow, StorageError> {
        self.with(|c| {
            c.query_row(
                "SELECT scanned_upto, last_lsn, last_segment, complete_time FROM wal_index WHERE timeline = ?1",
                params![timeline.as_str()],
                |r| {
                    let ct: Option<String> = r.get(3)?;
                    Ok(WalIndexRow {
                        scanned_upto: r.get::<_, i64>(0)? as u64,
                        last_lsn: r.get::<_, Option<i64>>(1)?.map(|v| Lsn(v as u64)),
                        last_segment: r.get(2)?,
                        complete_time: ct.map(|s| str_to_ts(&s)),
                    })
                },
            )
            .optional()
            .map(|o| o.unwrap_or_default())
        })
    }

    /// Stores newly read commit records and the new scan position.
    pub fn record_wal_scan(
        &self,
        timeline: &TimelineId,
        idx: &WalIndexRow,
        commits: &[(Lsn, jiff::Timestamp)],
    ) -> Result<(), StorageError> {
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare(
                    "INSERT OR IGNORE INTO commits (timeline, lsn, time_us) VALUES (?1, ?2, ?3)",
                )?;
                for (lsn, t) in commits {
                    st.execute(params![
                        timeline.as_str(),
                        lsn.0 as i64,
                        t.as_microsecond()
                    ])?;
                }
            }
            tx.execute(
                "INSERT OR REPLACE INTO wal_index (timeline, scanned_upto, last_lsn, last_segment, complete_time) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    timeline.as_str(),
                    idx.scanned_upto as i64,
                    idx.last_lsn.map(|l| l.0 as i64),
                    idx.last_segment,
                    idx.complete_time.map(ts_to_str)
                ],
            )?;
            tx.commit()
        })
    }

    /// The newest commit record of a timeline (LSN, time).
    pub fn last_commit(
        &self,
        timeline: &TimelineId,
    ) -> Result<Option<(Lsn, jiff::Timestamp)>, StorageError> {
        self.with(|c| {
            c.query_row(
                "SELECT lsn, time_us FROM commits WHERE timeline = ?1 ORDER BY lsn DESC LIMIT 1",
                params![timeline.as_str()],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()
        })
        .map(|o| {
            o.map(|(l, t)| {
                (
                    Lsn(l as u64),
                    jiff::Timestamp::from_microsecond(t).unwrap_or(jiff::Timestamp::UNIX_EPOCH),
                )
            })
        })
    }

    /// The last commit record at or before `t` with an LSN at or after
    /// `from` (the base's LSN).
    /// The time of the newest commit that starts before `lsn`.
    pub fn commit_time_before(
        &self,
        timeline: &TimelineId,
        lsn: Lsn,
    ) -> Result<Option<jiff::Timestamp>, StorageError> {
        self.with(|c| {
            c.query_row(
                "SELECT time_us FROM commits WHERE timeline = ?1 AND lsn < ?2 ORDER BY lsn DESC LIMIT 1",
                params![timeline.as_str(), lsn.0 as i64],
                |r| r.get::<_, i64>(0),
            )
            .optional()
        })
        .map(|o| o.and_then(|t| jiff::Timestamp::from_microsecond(t).ok()))
    }

    pub fn commit_at_or_before(
        &self,
        timeline: &TimelineId,
        t: jiff::Timestamp,
    ) -> Result<Option<Lsn>, StorageError> {
        self.with(|c| {
            c.query_row(
                "SELECT lsn FROM commits WHERE timeline = ?1 AND time_us <= ?2 ORDER BY lsn DESC LIMIT 1",
                params![timeline.as_str(), t.as_microsecond()],
                |r| r.get::<_, i64>(0),
            )
            .optional()
        })
        .map(|o| o.map(|l| Lsn(l as u64)))
    }

    pub fn mark_resumed_t(&self, id: &TimelineId) -> Result<(), StorageError> {
        self.mark_resumed(Kind::Timeline, id.as_str())
    }

    pub fn mark_resumed_s(&self, id: &SnapshotId) -> Result<(), StorageError> {
        self.mark_resumed(Kind::Snapshot, id.as_str())
    }
}

/// Read replicas.
impl Meta {
    fn replica_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReplicaRow> {
        let tl: String = r.get(0)?;
        let state: String = r.get(2)?;
        let created: String = r.get(3)?;
        Ok(ReplicaRow {
            timeline: TimelineId::new(tl).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?,
            ordinal: r.get(1)?,
            state: parse_state(&state),
            created_at: str_to_ts(&created),
        })
    }

    pub fn replica(
        &self,
        timeline: &TimelineId,
        ordinal: u32,
    ) -> Result<Option<ReplicaRow>, StorageError> {
        self.with(|c| {
            c.query_row(
                "SELECT timeline, ordinal, state, created_at FROM replicas WHERE timeline = ?1 AND ordinal = ?2",
                params![timeline.as_str(), ordinal],
                Self::replica_from_row,
            )
            .optional()
        })
    }

    /// The replicas of one timeline, or of every timeline, by ordinal.
    pub fn replicas(&self, timeline: Option<&TimelineId>) -> Result<Vec<ReplicaRow>, StorageError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT timeline, ordinal, state, created_at FROM replicas WHERE ?1 IS NULL OR timeline = ?1 ORDER BY timeline, ordinal",
            )?;
            let rows = st.query_map(params![timeline.map(|t| t.as_str())], Self::replica_from_row)?;
            rows.collect()
        })
    }

    /// Records a replica (replacing a stale row of the same ordinal).
    pub fn put_replica(&self, row: &ReplicaRow) -> Result<(), StorageError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO replicas (timeline, ordinal, state, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![
                    row.timeline.as_str(),
                    row.ordinal,
                    state_str(row.state),
                    ts_to_str(row.created_at)
                ],
            )
        })
        .map(|_| ())
    }

    pub fn set_replica_state(
        &self,
        timeline: &TimelineId,
        ordinal: u32,
        state: State,
    ) -> Result<(), StorageError> {
        self.with(|c| {
            c.execute(
                "UPDATE replicas SET state = ?3 WHERE timeline = ?1 AND ordinal = ?2",
                params![timeline.as_str(), ordinal, state_str(state)],
            )
        })
        .map(|_| ())
    }

    pub fn delete_replica(&self, timeline: &TimelineId, ordinal: u32) -> Result<(), StorageError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM replicas WHERE timeline = ?1 AND ordinal = ?2",
                params![timeline.as_str(), ordinal],
            )
        })
        .map(|_| ())
    }
}
