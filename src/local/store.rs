//! The local mode's own metadata: branch names and what they point at,
//! snapshot names, restores. One SQLite file (`local.sqlite`) in the local
//! directory, owned by the daemon. The storage engine keeps its own store
//! for timelines and snapshots; this one maps names onto them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Params, Row};

use super::LocalError;
use crate::storage::{Point, SnapshotId, Source, TimelineId};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS branches (
    name           TEXT PRIMARY KEY,
    timeline       TEXT,
    op_key         TEXT NOT NULL,
    source         TEXT NOT NULL,
    parent         TEXT,
    point          TEXT,
    port           INTEGER NOT NULL UNIQUE,
    password       TEXT NOT NULL,
    protected      INTEGER NOT NULL DEFAULT 0,
    want_running   INTEGER NOT NULL DEFAULT 1,
    state          TEXT NOT NULL,
    error          TEXT,
    restore_target TEXT,
    created_at     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    name       TEXT PRIMARY KEY,
    id         TEXT,
    op_key     TEXT NOT NULL,
    error      TEXT,
    branch     TEXT NOT NULL,
    timeline   TEXT NOT NULL,
    point      TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS restores (
    id              TEXT PRIMARY KEY,
    target          TEXT NOT NULL,
    source          TEXT NOT NULL,
    finalize        INTEGER NOT NULL,
    preserve        TEXT,
    restored_branch TEXT,
    timeline        TEXT,
    backup_branch   TEXT,
    state           TEXT NOT NULL,
    error           TEXT,
    started_at      TEXT NOT NULL,
    completed_at    TEXT
);
";

/// Life-cycle of a branch record (the compute state is kept by the daemon).
pub const CREATING: &str = "creating";
pub const READY: &str = "ready";
pub const FAILED: &str = "failed";

/// One branch.
#[derive(Debug, Clone)]
pub struct BranchRow {
    pub name: String,
    /// Set once the engine accepted the creation.
    pub timeline: Option<TimelineId>,
    /// Idempotency key of the creation (stable across daemon restarts).
    pub op_key: String,
    /// Where the data comes from (a superuser password is never stored here).
    pub source: Source,
    pub parent: Option<String>,
    pub point: Option<Point>,
    /// The fixed local port clients connect to.
    pub port: u16,
    pub password: String,
    pub protected: bool,
    /// Whether its compute should run (survives daemon restarts).
    pub want_running: bool,
    pub state: String,
    pub error: Option<String>,
    /// For a restore preview: the branch it replaces when finalized.
    pub restore_target: Option<String>,
    pub created_at: jiff::Timestamp,
}

/// One named snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotRow {
    pub name: String,
    /// Set once the engine accepted the request.
    pub id: Option<SnapshotId>,
    /// Idempotency key of the creation.
    pub op_key: String,
    /// Why the request failed before the engine took it.
    pub error: Option<String>,
    pub branch: String,
    pub timeline: TimelineId,
    pub point: Point,
    pub created_at: jiff::Timestamp,
}

/// One restore.
#[derive(Debug, Clone)]
pub struct RestoreRow {
    pub id: String,
    pub target: String,
    /// Human description of the source (`snapshot s1`, `main@...`).
    pub source: String,
    pub finalize: bool,
    pub preserve: Option<String>,
    pub restored_branch: Option<String>,
    pub timeline: Option<TimelineId>,
    pub backup_branch: Option<String>,
    pub state: String,
    pub error: Option<String>,
    pub started_at: jiff::Timestamp,
    pub completed_at: Option<jiff::Timestamp>,
}

/// Restore states.
pub const RESTORING: &str = "restoring";
pub const AWAITING_FINALIZE: &str = "awaitingFinalize";
pub const COMPLETED: &str = "completed";

/// The store: a SQLite connection behind a mutex (calls are short).
pub struct Store {
    conn: Mutex<Connection>,
}

fn db(e: rusqlite::Error) -> LocalError {
    LocalError::Store(e.to_string())
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, LocalError> {
    serde_json::to_string(v).map_err(|e| LocalError::Store(e.to_string()))
}

fn parse_json<T: serde::de::DeserializeOwned>(s: &str) -> rusqlite::Result<T> {
    serde_json::from_str(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn parse_ts(s: &str) -> rusqlite::Result<jiff::Timestamp> {
    s.parse().map_err(|e: jiff::Error| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn parse_id<T: std::str::FromStr<Err = crate::storage::StorageError>>(
    s: &str,
) -> rusqlite::Result<T> {
    s.parse().map_err(|e: crate::storage::StorageError| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

const BRANCH_COLS: &str = "name, timeline, op_key, source, parent, point, port, password, protected, want_running, state, error, restore_target, created_at";

fn branch_row(r: &Row<'_>) -> rusqlite::Result<BranchRow> {
    let timeline: Option<String> = r.get(1)?;
    let point: Option<String> = r.get(5)?;
    let port: i64 = r.get(6)?;
    Ok(BranchRow {
        name: r.get(0)?,
        timeline: timeline.as_deref().map(parse_id).transpose()?,
        op_key: r.get(2)?,
        source: parse_json(&r.get::<_, String>(3)?)?,
        parent: r.get(4)?,
        point: point.as_deref().map(parse_json).transpose()?,
        port: u16::try_from(port).unwrap_or(0),
        password: r.get(7)?,
        protected: r.get(8)?,
        want_running: r.get(9)?,
        state: r.get(10)?,
        error: r.get(11)?,
        restore_target: r.get(12)?,
        created_at: parse_ts(&r.get::<_, String>(13)?)?,
    })
}

const SNAPSHOT_COLS: &str = "name, id, op_key, error, branch, timeline, point, created_at";

fn snapshot_row(r: &Row<'_>) -> rusqlite::Result<SnapshotRow> {
    let id: Option<String> = r.get(1)?;
    Ok(SnapshotRow {
        name: r.get(0)?,
        id: id.as_deref().map(parse_id).transpose()?,
        op_key: r.get(2)?,
        error: r.get(3)?,
        branch: r.get(4)?,
        timeline: parse_id(&r.get::<_, String>(5)?)?,
        point: parse_json(&r.get::<_, String>(6)?)?,
        created_at: parse_ts(&r.get::<_, String>(7)?)?,
    })
}

const RESTORE_COLS: &str = "id, target, source, finalize, preserve, restored_branch, timeline, backup_branch, state, error, started_at, completed_at";

fn restore_row(r: &Row<'_>) -> rusqlite::Result<RestoreRow> {
    let timeline: Option<String> = r.get(6)?;
    let completed: Option<String> = r.get(11)?;
    Ok(RestoreRow {
        id: r.get(0)?,
        target: r.get(1)?,
        source: r.get(2)?,
        finalize: r.get(3)?,
        preserve: r.get(4)?,
        restored_branch: r.get(5)?,
        timeline: timeline.as_deref().map(parse_id).transpose()?,
        backup_branch: r.get(7)?,
        state: r.get(8)?,
        error: r.get(9)?,
        started_at: parse_ts(&r.get::<_, String>(10)?)?,
        completed_at: completed.as_deref().map(parse_ts).transpose()?,
    })
}

/// What changes at a finalize, applied in one transaction.
pub struct Finalize<'a> {
    pub target: &'a str,
    pub new_timeline: &'a TimelineId,
    /// The preview branch that becomes the target (multi-step), removed.
    pub preview: Option<&'a str>,
    pub backup_name: &'a str,
    pub backup_port: u16,
    pub backup_password: &'a str,
    pub restore_id: &'a str,
}

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Store, LocalError> {
        let conn = Connection::open(path).map_err(db)?;
        // It holds the branches' passwords.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| LocalError::io("chmod of the metadata store", e))?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, LocalError> {
        let mut c = self
            .conn
            .lock()
            .map_err(|_| LocalError::Store("store lock poisoned".into()))?;
        f(&mut c).map_err(db)
    }

    /// Runs one statement.
    fn exec(&self, sql: &str, p: impl Params) -> Result<(), LocalError> {
        self.with(|c| c.execute(sql, p).map(|_| ()))
    }

    /// The rows a query returns, each read by `f`.
    fn rows<T>(
        &self,
        sql: &str,
        p: impl Params,
        f: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, LocalError> {
        self.with(|c| {
            let mut st = c.prepare(sql)?;
            let rows = st.query_map(p, f)?;
            rows.collect()
        })
    }

    /// The row a query returns, if any, read by `f`.
    fn row<T>(
        &self,
        sql: &str,
        p: impl Params,
        f: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Option<T>, LocalError> {
        self.with(|c| c.query_row(sql, p, f).optional())
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>, LocalError> {
        self.row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
            r.get(0)
        })
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<(), LocalError> {
        self.exec(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [key, value],
        )
    }

    pub fn branches(&self) -> Result<Vec<BranchRow>, LocalError> {
        self.rows(
            &format!("SELECT {BRANCH_COLS} FROM branches ORDER BY created_at, name"),
            [],
            branch_row,
        )
    }

    pub fn branch(&self, name: &str) -> Result<Option<BranchRow>, LocalError> {
        self.row(
            &format!("SELECT {BRANCH_COLS} FROM branches WHERE name = ?1"),
            [name],
            branch_row,
        )
    }

    pub fn insert_branch(&self, b: &BranchRow) -> Result<(), LocalError> {
        let source = json(&strip_secret(&b.source))?;
        let point = b.point.as_ref().map(json).transpose()?;
        self.exec(
            &format!("INSERT INTO branches ({BRANCH_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"),
            params![
                b.name,
                b.timeline.as_ref().map(|t| t.to_string()),
                b.op_key,
                source,
                b.parent,
                point,
                i64::from(b.port),
                b.password,
                b.protected,
                b.want_running,
                b.state,
                b.error,
                b.restore_target,
                b.created_at.to_string(),
            ],
        )
    }

    pub fn set_branch_timeline(&self, name: &str, tl: &TimelineId) -> Result<(), LocalError> {
        self.exec(
            "UPDATE branches SET timeline = ?2 WHERE name = ?1",
            [name, tl.as_str()],
        )
    }

    pub fn set_branch_state(
        &self,
        name: &str,
        state: &str,
        error: Option<&str>,
    ) -> Result<(), LocalError> {
        self.exec(
            "UPDATE branches SET state = ?2, error = ?3 WHERE name = ?1",
            params![name, state, error],
        )
    }

    pub fn set_want_running(&self, name: &str, want: bool) -> Result<(), LocalError> {
        self.exec(
            "UPDATE branches SET want_running = ?2 WHERE name = ?1",
            params![name, want],
        )
    }

    pub fn set_protected(&self, name: &str, protected: bool) -> Result<(), LocalError> {
        self.exec(
            "UPDATE branches SET protected = ?2 WHERE name = ?1",
            params![name, protected],
        )
    }

    pub fn delete_branch(&self, name: &str) -> Result<(), LocalError> {
        self.exec("DELETE FROM branches WHERE name = ?1", [name])
    }

    /// Branches whose parent is `name`.
    pub fn children(&self, name: &str) -> Result<Vec<String>, LocalError> {
        self.rows(
            "SELECT name FROM branches WHERE parent = ?1 ORDER BY name",
            [name],
            |r| r.get(0),
        )
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotRow>, LocalError> {
        self.rows(
            &format!("SELECT {SNAPSHOT_COLS} FROM snapshots ORDER BY created_at, name"),
            [],
            snapshot_row,
        )
    }

    pub fn snapshot(&self, name: &str) -> Result<Option<SnapshotRow>, LocalError> {
        self.row(
            &format!("SELECT {SNAPSHOT_COLS} FROM snapshots WHERE name = ?1"),
            [name],
            snapshot_row,
        )
    }

    pub fn insert_snapshot(&self, s: &SnapshotRow) -> Result<(), LocalError> {
        let point = json(&s.point)?;
        self.exec(
            &format!(
                "INSERT INTO snapshots ({SNAPSHOT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            ),
            params![
                s.name,
                s.id.as_ref().map(|i| i.to_string()),
                s.op_key,
                s.error,
                s.branch,
                s.timeline.as_str(),
                point,
                s.created_at.to_string()
            ],
        )
    }

    /// Records the engine's answer to a snapshot request: its id, or why
    /// it was refused.
    pub fn set_snapshot_result(
        &self,
        name: &str,
        id: Option<&SnapshotId>,
        error: Option<&str>,
    ) -> Result<(), LocalError> {
        self.exec(
            "UPDATE snapshots SET id = COALESCE(?2, id), error = ?3 WHERE name = ?1",
            params![name, id.map(|i| i.to_string()), error],
        )
    }

    pub fn delete_snapshot(&self, name: &str) -> Result<(), LocalError> {
        self.exec("DELETE FROM snapshots WHERE name = ?1", [name])
    }

    pub fn restores(&self) -> Result<Vec<RestoreRow>, LocalError> {
        self.rows(
            &format!("SELECT {RESTORE_COLS} FROM restores ORDER BY started_at, id"),
            [],
            restore_row,
        )
    }

    pub fn restore(&self, id: &str) -> Result<Option<RestoreRow>, LocalError> {
        self.row(
            &format!("SELECT {RESTORE_COLS} FROM restores WHERE id = ?1"),
            [id],
            restore_row,
        )
    }

    /// The unfinished restore whose preview branch is `branch`.
    pub fn restore_of_preview(&self, branch: &str) -> Result<Option<RestoreRow>, LocalError> {
        self.row(
            &format!(
                "SELECT {RESTORE_COLS} FROM restores WHERE restored_branch = ?1 AND state IN ('{RESTORING}', '{AWAITING_FINALIZE}')"
            ),
            [branch],
            restore_row,
        )
    }

    pub fn insert_restore(&self, r: &RestoreRow) -> Result<(), LocalError> {
        self.exec(
            &format!("INSERT INTO restores ({RESTORE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
            params![
                r.id,
                r.target,
                r.source,
                r.finalize,
                r.preserve,
                r.restored_branch,
                r.timeline.as_ref().map(|t| t.to_string()),
                r.backup_branch,
                r.state,
                r.error,
                r.started_at.to_string(),
                r.completed_at.map(|t| t.to_string()),
            ],
        )
    }

    pub fn set_restore_timeline(&self, id: &str, tl: &TimelineId) -> Result<(), LocalError> {
        self.exec(
            "UPDATE restores SET timeline = ?2 WHERE id = ?1",
            [id, tl.as_str()],
        )
    }

    pub fn set_restore_state(
        &self,
        id: &str,
        state: &str,
        error: Option<&str>,
    ) -> Result<(), LocalError> {
        let done =
            (state == COMPLETED || state == FAILED).then(|| jiff::Timestamp::now().to_string());
        self.exec(
            "UPDATE restores SET state = ?2, error = ?3, completed_at = COALESCE(?4, completed_at) WHERE id = ?1",
            params![id, state, error, done],
        )
    }

    /// The finalize of a restore, in one transaction: the old timeline of
    /// the target becomes the backup branch (children and snapshots follow
    /// it), the target points at the restored timeline, a preview branch is
    /// folded into the target, the restore is completed.
    pub fn finalize(&self, f: &Finalize<'_>) -> Result<(), LocalError> {
        let now = jiff::Timestamp::now().to_string();
        self.with(|c| {
            let tx = c.transaction()?;
            let old: BranchRow = tx.query_row(
                &format!("SELECT {BRANCH_COLS} FROM branches WHERE name = ?1"),
                [f.target],
                branch_row,
            )?;
            if let Some(p) = f.preview {
                tx.execute("DELETE FROM branches WHERE name = ?1", [p])?;
            }
            tx.execute(
                &format!("INSERT INTO branches ({BRANCH_COLS}) SELECT ?2, timeline, op_key, source, parent, point, ?3, ?4, 0, 0, state, error, NULL, created_at FROM branches WHERE name = ?1"),
                params![f.target, f.backup_name, i64::from(f.backup_port), f.backup_password],
            )?;
            tx.execute(
                "UPDATE branches SET parent = ?2 WHERE parent = ?1 AND name <> ?2",
                [f.target, f.backup_name],
            )?;
            if let Some(tl) = &old.timeline {
                tx.execute(
                    "UPDATE snapshots SET branch = ?2 WHERE branch = ?1 AND timeline = ?3",
                    [f.target, f.backup_name, tl.as_str()],
                )?;
            }
            tx.execute(
                "UPDATE branches SET timeline = ?2, op_key = ?3, state = ?4, error = NULL WHERE name = ?1",
                params![f.target, f.new_timeline.as_str(), format!("restore-{}", f.restore_id), READY],
            )?;
            tx.execute(
                "UPDATE restores SET state = ?2, backup_branch = ?3, timeline = ?4, completed_at = ?5, error = NULL WHERE id = ?1",
                params![f.restore_id, COMPLETED, f.backup_name, f.new_timeline.as_str(), now],
            )?;
            tx.commit()
        })
    }
}

/// The source as stored: a superuser password is dropped (the branch's own
/// password is put back when the request is rebuilt).
pub fn strip_secret(s: &Source) -> Source {
    match s {
        Source::Empty { .. } => Source::Empty {
            superuser_password: None,
        },
        other => other.clone(),
    }
}
