//! The embedded copy-on-write storage engine.
//!
//! # Layout on the volume root
//! ```text
//! meta.sqlite                 metadata store (see [`meta`])
//! timelines/<id>/pgdata       the timeline's data directory (what a compute runs on)
//! timelines/<id>/base         read-only copy of pgdata as created: the first PITR base
//! timelines/<id>/postgres.log log of servers started by Engine::start_postgres
//! timelines/<id>/engine.log   log of the engine's private servers (recovery, replay)
//! snapshots/<id>/pgdata       a snapshot (read-only by convention; -r subvolume on btrfs)
//! wal/<id>/                   the timeline's own WAL archive (filled by its archive_command)
//! tmp/                        work directories, emptied at open
//! timelines/<id>/replicas/<n>/pgdata  read replica n of the timeline (see [`replica`])
//! ```
//!
//! # Drivers
//! See [`driver`]: `btrfs` (subvolumes, atomic), `reflink` (FICLONE per
//! file), `copy`. Probed at [`Engine::open`] unless forced.
//!
//! # Copies of a running server (head)
//! A source "looks running" when its `postmaster.pid` exists (a crashed
//! compute leaves one too: it is treated as running).
//! * stopped source: plain clone (clean shutdown state);
//! * running, atomic driver, no connection: crash-consistent clone;
//! * running, atomic driver, connection: `CHECKPOINT` then clone (so the
//!   branch starts with almost nothing to replay);
//! * running, any driver, connection, for snapshots and for non-atomic
//!   drivers: `pg_backup_start(label, true)` … clone … `pg_backup_stop(true)`
//!   in one session; `backup_label`/`tablespace_map` written into the copy and
//!   `pg_wal` re-copied after the stop;
//! * running, non-atomic driver, no connection: refused with `Busy`.
//!
//! Head snapshots of a running server with a connection always use backup
//! mode (also on btrfs), so they can serve as PITR bases of their timeline.
//!
//! # Fix-ups on every writable copy
//! `postmaster.pid`, `postmaster.opts`, `recovery.signal`, `standby.signal`
//! and `pg_replslot/*` are removed; symlinked `pg_wal` or any tablespace is
//! refused; the timeline's own settings are written to `pgbranch.conf`
//! (included from `postgresql.conf`): `archive_mode = on`, an
//! `archive_command` into its own `<compute_root>/wal/<id>/` that copies to a
//! temporary name, `sync`s it, renames it and refuses to overwrite a
//! different file (an identical one is accepted, so a re-archive after a
//! crash succeeds), `wal_level = replica`, `recovery_init_sync_method =
//! syncfs`, `listen_addresses = '*'`. The same keys are stripped from
//! `postgresql.auto.conf`, so nothing of the parent's archiving survives.
//!
//! Every new timeline is brought to a *cleanly shut down* state before it is
//! `Ready`: copies that are crash-consistent or in backup mode are recovered
//! in one stand-alone backend (`postgres --single`, archiving into the new
//! timeline's own archive), which exits with a shutdown checkpoint; should
//! that not leave the copy clean, a private server (Unix socket only) is
//! started and stopped fast. Its creation copy is then kept as
//! `timelines/<id>/base`, the first base for points in its past; later bases
//! are rolled forward from it in the background (see [`bases`]).
//!
//! # Points in the past
//! A timeline's restore window runs from its oldest base (its creation) to
//! the newest WAL record found in its own archive (`pg_waldump`, indexed in
//! the metadata store with every commit record's time). For times, the
//! newest end is the latest of: the newest archived commit, the base, and
//! the moment of the last `pg_switch_wal()` the engine asked for (every
//! commit before that moment is archived) or, for a stopped timeline
//! (no `postmaster.pid`) with no segment waiting in
//! `pg_wal/archive_status/*.ready`, the present moment: a suspended branch
//! can be branched at "five minutes ago" after its last commit.
//!
//! A copy at a point = the newest base at or before it (a rolled base only
//! when strictly before it), cloned; then a
//! private server replays the timeline's own archive with
//! `restore_command`, `recovery_target_lsn`, `recovery_target_inclusive =
//! on`, `recovery_target_timeline = 'current'`, `recovery_target_action =
//! promote`; ready when `pg_is_in_recovery()` is false; it is stopped
//! cleanly and the recovery settings are removed. When the caller passes a
//! `source_connection` and the point lies after the archived WAL, the engine
//! first runs `pg_switch_wal()` on the source and waits for the segment to
//! be archived.
//!
//! **What "at LSN X" contains**: replay stops right after the first WAL
//! record that starts at or after X (PostgreSQL's inclusive LSN target). So
//! X = the start of a commit record includes that commit; X =
//! `pg_current_wal_lsn()` read after a commit includes that commit and every
//! earlier one (the record at X is what the next writer logs, normally not
//! a commit).
//!
//! **A timestamp T** is resolved to the newest archived commit record with a
//! commit time at or before T (or the base itself when there is none), and
//! replayed as that LSN: the copy holds exactly the transactions committed
//! at or before T (commit records are taken in LSN order; two sessions
//! committing within the same microseconds may be ordered differently in
//! WAL than in time). [`Storage::resolve_point`] returns that LSN.
//!
//! **Lineage**: a point before a timeline's own oldest base is looked up in
//! its parent (recursively, while the ancestors exist and are not
//! schema-only copies): the parent's history up to the branch point
//! (`lineage.parent_lsn`) is the child's history too, replayed from the
//! parent's bases and archive. A point in the parent's history after the
//! branch point is refused. The reported window starts at the oldest
//! reachable ancestor base.
//!
//! Points before the reachable window, after the newest archived record, or
//! in the future are refused with `InvalidPoint` and the window.
//!
//! Snapshots at a past point are replayed and promoted like a branch and
//! stored read-only; snapshots at head taken in backup mode or of a stopped
//! server are also registered as PITR bases of their timeline.
//!
//! # Idempotency and crash safety
//! Every create records its key, a password-free identity of the request
//! and the new object (state `Creating`) in one transaction before touching
//! disk. The same key again returns the same object; the same key with a
//! different request is a `Conflict`. Deleting an object frees its key.
//! At open, `tmp/` is emptied; an unfinished create has its partial
//! directories removed and is re-run from the stored request when it needs
//! no secret (no superuser password, no source connection); otherwise it
//! stays `Creating` with progress "interrupted" until a create with the same
//! key (carrying the secrets again) resumes it. An unfinished delete is
//! finished. A failed create stays `Failed` (same key, same result) until it
//! is deleted.
//!
//! Private servers (recovery, replay, schema dumps) get `PR_SET_PDEATHSIG`
//! so they die with the engine; any left running on a directory that is
//! cleaned at open is stopped first. For crash tests,
//! `PGBRANCH_ENGINE_CRASH_AT=<progress step>` makes the engine SIGKILL
//! itself when an operation enters that step.
//!
//! One engine process owns a volume at a time (`engine.lock`, flock);
//! a second [`Engine::open`] on it fails with `Busy`.
//!
//! # Users
//! PostgreSQL programs run as `run_as` (default: the current user, or
//! `postgres` when root); data directories and archives belong to it.
//!
//! # Where the code is
//! One `impl Engine` block per concern, a file each: `layout.rs` (paths,
//! directory operations), `locks.rs` (objects in use), `sizes.rs`,
//! `conf.rs` (PostgreSQL configuration written into copies), `server.rs`
//! (servers on data directories), `copy.rs` (head copies, backup mode,
//! bringing a copy to a clean state), `archive.rs` (WAL archive indexing,
//! restore windows), `pitr.rs` (resolving points, replay), `timeline.rs`,
//! `snapshot.rs`, `lifecycle.rs` (what those two share), `replica.rs`,
//! `bases.rs` (rolling bases), `recover.rs` (opening a volume, recovery at
//! open), `backup.rs` (archiving to an object store, base backups and
//! restores from it). `meta/` is the metadata store, `pg/` runs PostgreSQL's programs,
//! `driver.rs` copies data directories. This file keeps the types, the
//! blocking helper (every file-system walk, process wait and SQLite call
//! goes through it, never a runtime thread) and the [`Storage`]
//! implementation.

mod archive;
mod archiver;
mod backup;
mod backup_restore;
mod bases;
mod conf;
mod copy;
mod driver;
mod layout;
mod lifecycle;
mod locks;
mod meta;
mod pg;
mod pitr;
mod recover;
mod replica;
mod server;
mod sizes;
mod snapshot;
mod timeline;

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::{stream, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

pub use backup::{BackupStatus, BackupTarget, BaseBackup, BaseBackupRequest};
pub use backup_restore::{RestoreFromBackup, Restored};
pub use pg::{PgServer, StopMode};

use crate::storage::{
    CreateReplica, CreateSnapshot, CreateTimeline, DriverKind, Lsn, Point, Replica, Snapshot,
    SnapshotId, Source, Storage, StorageError, StorageInfo, Timeline, TimelineId,
};
use driver::Driver;
use meta::{Meta, SnapshotRow, TimelineRow};
use pg::PgEnv;
use sizes::SizeEntry;

/// How to open an [`Engine`].
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    /// The volume root (created if missing).
    pub root: PathBuf,
    /// Copy-on-write driver; `None` probes the volume.
    pub driver: Option<DriverKind>,
    /// PostgreSQL binaries; `None` finds `/usr/lib/postgresql/<newest>/bin`.
    pub pg_bin_dir: Option<PathBuf>,
    /// User to run PostgreSQL programs as; `None` = the current user, or
    /// `postgres` when running as root.
    pub run_as: Option<String>,
    /// Where computes see the volume root (used in `archive_command`);
    /// `None` = `root`.
    pub compute_root: Option<PathBuf>,
    /// Roll a timeline's newest base forward (by replaying its archive in
    /// the background) once this many bytes of WAL are archived past it,
    /// so point-in-time copies replay at most about that much. `None` =
    /// 1 GiB on copy-on-write drivers, never on the plain-copy driver
    /// (its bases are full copies); `Some(0)` = never.
    pub base_roll_wal_bytes: Option<u64>,
    /// How often the roller looks (`None` = 30 s).
    pub base_roll_check: Option<Duration>,
    /// Rolled bases kept per timeline besides its creation base (`None` =
    /// 8).
    pub base_roll_keep: Option<usize>,
    /// How long a copy of a running source waits for the source to archive
    /// its WAL before it fails with the archiver's state (`None` = 60 s).
    pub archive_wait: Option<Duration>,
}

/// The embedded engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("root", &self.inner.root)
            .field("driver", &self.inner.driver.kind())
            .finish()
    }
}

struct Inner {
    root: PathBuf,
    compute_root: PathBuf,
    driver: Box<dyn Driver>,
    pg: PgEnv,
    meta: Meta,
    in_use: Mutex<HashMap<String, usize>>,
    index_lock: tokio::sync::Mutex<()>,
    /// Recently measured sizes by "t:<id>"/"s:<id>".
    sizes: Mutex<HashMap<String, SizeEntry>>,
    /// When to roll bases forward (`None`: never).
    roll: Option<bases::RollPolicy>,
    /// How long a copy waits for the source's archiver.
    archive_wait: Duration,
    /// Timelines backed up to an object store ([`backup`]).
    backups: backup::Backups,
    /// Exclusive lock on `<root>/engine.lock`: one engine per volume.
    _volume_lock: nix::fcntl::Flock<fs::File>,
}

/// The request as stored for a resume: no password, no connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredRequest {
    source: Option<Source>,
    had_password: bool,
    had_connection: bool,
}

fn io_err(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::internal(format!("{what}: {e}"))
}

/// Fault injection for crash tests: when `PGBRANCH_ENGINE_CRASH_AT` names
/// the step an operation is entering (its progress text), the engine
/// process kills itself with SIGKILL there, as a crash would.
fn crash_point(step: &str) {
    if std::env::var("PGBRANCH_ENGINE_CRASH_AT").as_deref() == Ok(step) {
        tracing::error!(step, "PGBRANCH_ENGINE_CRASH_AT: killing the engine process");
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
    }
}

/// The engine's one way to run blocking work: file-system walks and
/// deletions, waits for processes, SQLite calls. It runs `f` on tokio's
/// blocking pool, never on a runtime thread, where it would hold up every
/// request and background task scheduled on that thread.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err(what, e))?
}

impl Engine {
    /// [`blocking`] with the engine's state, for file-system work whose
    /// `io` errors read "`what`: error".
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&Inner) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, StorageError> {
        let inner = self.inner.clone();
        blocking(what, move || f(&inner).map_err(|e| io_err(what, e))).await
    }

    /// Runs an operation as a task of its own, so it goes to its end when
    /// its caller goes away (an HTTP client that gave up): its metadata
    /// steps are awaited one by one, and an operation cut off between two
    /// of them would be left half done (a create recorded but never
    /// started, a delete marked but not undone when refused).
    async fn to_the_end<T, F>(
        &self,
        what: &'static str,
        op: impl FnOnce(Engine) -> F,
    ) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, StorageError>> + Send + 'static,
    {
        tokio::spawn(op(self.clone()))
            .await
            .map_err(|e| io_err(what, e))?
    }
}

#[async_trait]
impl Storage for Engine {
    async fn info(&self) -> Result<StorageInfo, StorageError> {
        // Usage figures are best effort: `info` also says what the engine
        // is, which callers need even when a figure cannot be read.
        let volume = self
            .volume_usage()
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "reading the volume's usage"))
            .ok();
        let wal_archive_bytes = self
            .wal_archive_bytes()
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "measuring the WAL archive"))
            .ok();
        Ok(StorageInfo {
            driver: self.inner.driver.kind(),
            pg_major: self.inner.pg.major,
            root: self.inner.root.display().to_string(),
            compute_root: Some(self.inner.compute_root.display().to_string()),
            data_uid: Some(
                self.inner
                    .pg
                    .user
                    .as_ref()
                    .map_or_else(|| nix::unistd::geteuid().as_raw(), |u| u.uid),
            ),
            volume_total_bytes: volume.map(|(total, _)| total),
            volume_used_bytes: volume.map(|(_, used)| used),
            wal_archive_bytes,
        })
    }

    async fn create_timeline(&self, req: CreateTimeline) -> Result<Timeline, StorageError> {
        self.to_the_end("creating a timeline", |e| async move {
            e.create_timeline_impl(req).await
        })
        .await
    }

    async fn get_timeline(&self, id: &TimelineId) -> Result<Timeline, StorageError> {
        self.timeline_view(self.row(id).await?).await
    }

    async fn list_timelines(&self) -> Result<Vec<Timeline>, StorageError> {
        let rows = self.inner.meta.all::<TimelineRow>().await?;
        stream::iter(rows)
            .then(|r| self.timeline_view(r))
            .try_collect()
            .await
    }

    async fn delete_timeline(&self, id: &TimelineId) -> Result<(), StorageError> {
        let id = id.clone();
        self.to_the_end("deleting a timeline", |e| async move {
            e.delete_timeline_impl(&id).await
        })
        .await
    }

    async fn create_snapshot(&self, req: CreateSnapshot) -> Result<Snapshot, StorageError> {
        self.to_the_end("creating a snapshot", |e| async move {
            e.create_snapshot_impl(req).await
        })
        .await
    }

    async fn get_snapshot(&self, id: &SnapshotId) -> Result<Snapshot, StorageError> {
        self.snapshot_view(self.row(id).await?).await
    }

    async fn list_snapshots(&self) -> Result<Vec<Snapshot>, StorageError> {
        let rows = self.inner.meta.all::<SnapshotRow>().await?;
        stream::iter(rows)
            .then(|r| self.snapshot_view(r))
            .try_collect()
            .await
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), StorageError> {
        let id = id.clone();
        self.to_the_end("deleting a snapshot", |e| async move {
            e.delete_snapshot_impl(&id).await
        })
        .await
    }

    async fn resolve_point(
        &self,
        timeline: &TimelineId,
        timestamp: jiff::Timestamp,
    ) -> Result<Lsn, StorageError> {
        let row = self.ready(timeline).await?;
        let (_, lsn) = self
            .resolve_target(&row, &Point::Timestamp(timestamp), None)
            .await?;
        Ok(lsn)
    }

    async fn set_backup(
        &self,
        timeline: &TimelineId,
        target: Option<BackupTarget>,
    ) -> Result<Option<BackupStatus>, StorageError> {
        match target {
            Some(t) => {
                self.enable_backup(timeline, t).await?;
                Ok(self.backup_status(timeline))
            }
            None => {
                self.disable_backup(timeline);
                Ok(None)
            }
        }
    }

    async fn get_backup(
        &self,
        timeline: &TimelineId,
    ) -> Result<Option<BackupStatus>, StorageError> {
        Ok(self.backup_status(timeline))
    }

    async fn start_base_backup(
        &self,
        timeline: &TimelineId,
        req: BaseBackupRequest,
    ) -> Result<BackupStatus, StorageError> {
        self.request_base_backup(timeline, req)
    }

    async fn create_replica(&self, req: CreateReplica) -> Result<Replica, StorageError> {
        self.create_replica_impl(req).await
    }

    async fn list_replicas(&self, timeline: &TimelineId) -> Result<Vec<Replica>, StorageError> {
        self.list_replicas_impl(timeline).await
    }

    async fn delete_replica(
        &self,
        timeline: &TimelineId,
        ordinal: u32,
    ) -> Result<(), StorageError> {
        let timeline = timeline.clone();
        self.to_the_end("deleting a replica", |e| async move {
            e.delete_replica_impl(&timeline, ordinal).await
        })
        .await
    }
}
