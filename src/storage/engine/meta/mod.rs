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

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};

use crate::storage::{OpKey, Progress, SnapshotId, State, StorageError, TimelineId};

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

/// The objects with a creation lifecycle (state, progress, interruption),
/// each kept in its own table.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
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

    /// Its name, as in the `operations` table.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Timeline => "timeline",
            Kind::Snapshot => "snapshot",
        }
    }
}

/// The id of an object with a creation lifecycle: its type says which
/// table the object is in.
pub(crate) trait ObjectId: std::fmt::Display + Clone + Send + Sync + 'static {
    const KIND: Kind;
    /// The object as stored.
    type Row: ObjectRow<Id = Self>;
    fn id(&self) -> &str;
}

impl ObjectId for TimelineId {
    const KIND: Kind = Kind::Timeline;
    type Row = TimelineRow;
    fn id(&self) -> &str {
        self.as_str()
    }
}

impl ObjectId for SnapshotId {
    const KIND: Kind = Kind::Snapshot;
    type Row = SnapshotRow;
    fn id(&self) -> &str {
        self.as_str()
    }
}

/// A stored object with a creation lifecycle: how it is read from and
/// written into its table.
pub(crate) trait ObjectRow: Sized + Send + 'static {
    type Id: ObjectId<Row = Self>;
    /// The columns [`ObjectRow::from_row`] reads, in its order.
    const COLS: &'static str;
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self>;
    /// The statement inserting this row, and its parameters.
    fn insert(&self) -> Result<(&'static str, Vec<Value>), StorageError>;
    fn id(&self) -> &Self::Id;
    fn key(&self) -> &OpKey;
    fn created_at(&self) -> jiff::Timestamp;
    fn state(&self) -> State;
}

/// The [`ObjectRow`] items every row type has the same fields for.
macro_rules! object_row_fields {
    ($id:ty) => {
        type Id = $id;

        fn id(&self) -> &$id {
            &self.id
        }

        fn key(&self) -> &OpKey {
            &self.key
        }

        fn created_at(&self) -> jiff::Timestamp {
            self.created_at
        }

        fn state(&self) -> State {
            self.state
        }
    };
}
use object_row_fields;

/// A value the store cannot take back (an id, a key, a JSON record), as a
/// row-reading error.
fn bad_value(e: StorageError) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
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

    /// One statement with its parameters.
    async fn execute(
        &self,
        sql: impl Into<String>,
        params: Vec<Value>,
    ) -> Result<(), StorageError> {
        let sql = sql.into();
        self.with(move |c| c.execute(&sql, params_from_iter(params)))
            .await
            .map(|_| ())
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

    /// Records a new object and the operation that makes it (its key and
    /// the request's `identity`) in one transaction; or returns what the
    /// key already made.
    pub async fn insert<R: ObjectRow>(
        &self,
        identity: &str,
        row: &R,
    ) -> Result<Recorded, StorageError> {
        let (sql, values) = row.insert()?;
        let kind = R::Id::KIND;
        let (key, identity) = (row.key().clone(), identity.to_string());
        let (id, created_at) = (row.id().id().to_string(), row.created_at());
        self.with(move |c| {
            let tx = c.transaction()?;
            let existing: Option<(String, String, String)> = tx
                .query_row(
                    "SELECT kind, identity, object_id FROM operations WHERE key = ?1",
                    params![key.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            if let Some((kind, identity, object_id)) = existing {
                return Ok(Recorded::Existing {
                    kind,
                    identity,
                    object_id,
                });
            }
            tx.execute(
                "INSERT INTO operations (key, kind, identity, object_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![key.as_str(), kind.name(), identity, id, ts_to_str(created_at)],
            )?;
            tx.execute(sql, params_from_iter(values))?;
            tx.commit()?;
            Ok(Recorded::New)
        })
        .await
    }

    /// A timeline or snapshot by id.
    pub async fn get<I: ObjectId>(&self, id: &I) -> Result<Option<I::Row>, StorageError> {
        let sql = format!(
            "SELECT {} FROM {} WHERE id = ?1",
            I::Row::COLS,
            I::KIND.table()
        );
        let id = id.id().to_string();
        self.with(move |c| c.query_row(&sql, params![id], I::Row::from_row).optional())
            .await
    }

    /// Every timeline or every snapshot, oldest first.
    pub async fn all<R: ObjectRow>(&self) -> Result<Vec<R>, StorageError> {
        let sql = format!(
            "SELECT {} FROM {} ORDER BY created_at, id",
            R::COLS,
            R::Id::KIND.table()
        );
        self.with(move |c| {
            let mut st = c.prepare(&sql)?;
            let rows = st.query_map([], R::from_row)?;
            rows.collect()
        })
        .await
    }

    /// Removes an object with its key and, in the same transaction, what
    /// the `also` statements (taking the id as `?1`) remove with it.
    async fn delete_object<I: ObjectId>(
        &self,
        id: &I,
        also: &'static [&'static str],
    ) -> Result<(), StorageError> {
        let (kind, id) = (I::KIND, id.id().to_string());
        self.with(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM operations WHERE kind = ?2 AND object_id = ?1",
                params![id, kind.name()],
            )?;
            tx.execute(
                &format!("DELETE FROM {} WHERE id = ?1", kind.table()),
                params![id],
            )?;
            for sql in also {
                tx.execute(sql, params![id])?;
            }
            tx.commit()
        })
        .await
    }

    pub async fn set_progress<I: ObjectId>(
        &self,
        id: &I,
        progress: Option<Progress>,
    ) -> Result<(), StorageError> {
        let p = progress_json(&progress)?;
        let sql = format!("UPDATE {} SET progress = ?2 WHERE id = ?1", I::KIND.table());
        self.execute(sql, vec![id.id().to_string().into(), p.into()])
            .await
    }

    /// Sets the state (and error), ending any progress and interruption.
    pub async fn set_state<I: ObjectId>(
        &self,
        id: &I,
        state: State,
        error: Option<&str>,
    ) -> Result<(), StorageError> {
        let sql = format!(
            "UPDATE {} SET state = ?2, error = ?3, progress = NULL, interrupted = 0 WHERE id = ?1",
            I::KIND.table()
        );
        let params = vec![
            id.id().to_string().into(),
            state_str(state).to_string().into(),
            error.map(str::to_string).into(),
        ];
        self.execute(sql, params).await
    }

    /// Marks a create interrupted by a restart, `msg` as its progress.
    pub async fn mark_interrupted<I: ObjectId>(
        &self,
        id: &I,
        msg: &str,
    ) -> Result<(), StorageError> {
        let p = progress_json(&Some(Progress {
            step: msg.to_string(),
            percent: None,
        }))?;
        let sql = format!(
            "UPDATE {} SET interrupted = 1, progress = ?2 WHERE id = ?1",
            I::KIND.table()
        );
        self.execute(sql, vec![id.id().to_string().into(), p.into()])
            .await
    }

    pub async fn mark_resumed<I: ObjectId>(&self, id: &I) -> Result<(), StorageError> {
        let sql = format!(
            "UPDATE {} SET interrupted = 0 WHERE id = ?1",
            I::KIND.table()
        );
        self.execute(sql, vec![id.id().to_string().into()]).await
    }
}
