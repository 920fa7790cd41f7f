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
//!
//! This file holds the store, its schema, the `operations` table and the
//! lifecycle updates timelines and snapshots share; each other table has
//! its file ([`timelines`], [`snapshots`], [`wal`], [`replicas`]).

mod replicas;
mod snapshots;
mod timelines;
mod wal;

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use crate::storage::{OpKey, Progress, State, StorageError};

pub(crate) use replicas::ReplicaRow;
pub(crate) use snapshots::SnapshotRow;
pub(crate) use timelines::TimelineRow;
pub(crate) use wal::BaseRow;

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

/// The store. Its calls are async: each runs on the blocking pool through
/// the engine's blocking helper, since a write waits for SQLite's fsync.
pub(crate) struct Meta {
    conn: Arc<Mutex<Connection>>,
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
    /// Opens (or creates) the store. Blocking: the engine calls it on the
    /// blocking pool.
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
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection through the engine's blocking helper.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StorageError> {
        let conn = self.conn.clone();
        super::blocking("metadata store", move || {
            let mut c = conn
                .lock()
                .map_err(|_| StorageError::internal("metadata store lock poisoned"))?;
            f(&mut c).map_err(db_err)
        })
        .await
    }

    pub async fn find_op(
        &self,
        key: &OpKey,
    ) -> Result<Option<(String, String, String)>, StorageError> {
        let key = key.clone();
        self.with(move |c| {
            c.query_row(
                "SELECT kind, identity, object_id FROM operations WHERE key = ?1",
                params![key.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
        })
        .await
    }

    async fn set_progress(
        &self,
        kind: Kind,
        id: &str,
        progress: Option<Progress>,
    ) -> Result<(), StorageError> {
        let p = progress_json(&progress)?;
        let sql = format!("UPDATE {} SET progress = ?2 WHERE id = ?1", kind.table());
        let id = id.to_string();
        self.with(move |c| c.execute(&sql, params![id, p]))
            .await
            .map(|_| ())
    }

    async fn set_state(
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
        let (id, error) = (id.to_string(), error.map(str::to_string));
        self.with(move |c| c.execute(&sql, params![id, state_str(state), error]))
            .await
            .map(|_| ())
    }

    async fn mark_interrupted(&self, kind: Kind, id: &str, msg: &str) -> Result<(), StorageError> {
        let p = progress_json(&Some(Progress {
            step: msg.to_string(),
            percent: None,
        }))?;
        let sql = format!(
            "UPDATE {} SET interrupted = 1, progress = ?2 WHERE id = ?1",
            kind.table()
        );
        let id = id.to_string();
        self.with(move |c| c.execute(&sql, params![id, p]))
            .await
            .map(|_| ())
    }

    async fn mark_resumed(&self, kind: Kind, id: &str) -> Result<(), StorageError> {
        let sql = format!("UPDATE {} SET interrupted = 0 WHERE id = ?1", kind.table());
        let id = id.to_string();
        self.with(move |c| c.execute(&sql, params![id]))
            .await
            .map(|_| ())
    }
}
