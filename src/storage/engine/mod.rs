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

mod archiver;
mod bases;
mod driver;
mod meta;
mod pg;
mod replica;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use pg::{PgServer, StopMode};

use crate::storage::{
    ConnInfo, CreateReplica, CreateSnapshot, CreateTimeline, DriverKind, Lineage, Lsn, Password,
    Point, PointInfo, Progress, Replica, RestoreWindow, Snapshot, SnapshotId, Source, State,
    Storage, StorageError, StorageInfo, Timeline, TimelineId,
};
use driver::Driver;
use meta::{BaseRow, Meta, Recorded, SnapshotRow, TimelineRow};
use pg::PgEnv;

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
    /// Exclusive lock on `<root>/engine.lock`: one engine per volume.
    _volume_lock: nix::fcntl::Flock<fs::File>,
}

/// Holds objects in use by a running operation; released on drop.
struct InUse {
    inner: Arc<Inner>,
    keys: Vec<String>,
}

impl Drop for InUse {
    fn drop(&mut self) {
        if let Ok(mut m) = self.inner.in_use.lock() {
            for k in &self.keys {
                if let Some(n) = m.get_mut(k) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(k);
                    }
                }
            }
        }
    }
}

/// The request as stored for a resume: no password, no connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredRequest {
    source: Option<Source>,
    had_password: bool,
    had_connection: bool,
}

#[derive(Debug, Clone)]
enum TlPlan {
    Empty {
        password: Option<Password>,
    },
    SchemaOnly {
        src: TimelineId,
        conn: Option<ConnInfo>,
    },
    Head {
        src: TimelineId,
        conn: Option<ConnInfo>,
    },
    /// `base.timeline` is the source or, for a point before the source
    /// was made, the ancestor whose archive is replayed.
    Replay {
        base: BaseRow,
        target: Lsn,
    },
    Snapshot {
        snap: SnapshotId,
    },
}

#[derive(Debug, Clone)]
enum SnPlan {
    Head { conn: Option<ConnInfo> },
    Replay { base: BaseRow, target: Lsn },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consistency {
    Clean,
    Crash,
    Backup,
}

fn io_err(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::internal(format!("{what}: {e}"))
}

fn identity_timeline(s: &Source) -> String {
    match s {
        Source::Empty { superuser_password } => {
            format!("timeline:empty:password={}", superuser_password.is_some())
        }
        Source::SchemaOnly { timeline } => format!("timeline:schema-only:{timeline}"),
        Source::Timeline { timeline, point } => {
            format!("timeline:timeline:{timeline}:{}", point_key(point))
        }
        Source::Snapshot { snapshot } => format!("timeline:snapshot:{snapshot}"),
    }
}

fn point_key(p: &Point) -> String {
    match p {
        Point::Head => "head".into(),
        Point::Lsn(l) => format!("lsn:{l}"),
        Point::Timestamp(t) => format!("ts:{}", t.as_microsecond()),
    }
}

fn stripped(s: &Source) -> Source {
    match s {
        Source::Empty { .. } => Source::Empty {
            superuser_password: None,
        },
        other => other.clone(),
    }
}

fn pid_alive(data: &Path) -> bool {
    let Ok(text) = fs::read_to_string(data.join("postmaster.pid")) else {
        return false;
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
    else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// Refuses data directories whose WAL or tablespaces live elsewhere: a copy
/// would keep writing into the source's files.
fn check_self_contained(data: &Path) -> Result<(), StorageError> {
    let wal = data.join("pg_wal");
    if let Ok(m) = fs::symlink_metadata(&wal) {
        if m.file_type().is_symlink() {
            return Err(StorageError::invalid(format!(
                "{} is a symbolic link: data directories with WAL outside them cannot be branched",
                wal.display()
            )));
        }
    }
    if let Ok(rd) = fs::read_dir(data.join("pg_tblspc")) {
        if let Some(e) = rd.flatten().next() {
            return Err(StorageError::invalid(format!(
                "the data directory has a tablespace ({}): tablespaces outside the data directory cannot be branched",
                e.path().display()
            )));
        }
    }
    Ok(())
}

fn pg_major_of(data: &Path) -> u32 {
    fs::read_to_string(data.join("PG_VERSION"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Segment number of a 24-hex-digit WAL file name.
fn segno_of(name: &str, seg_size: u64) -> Option<u64> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let hi = u64::from_str_radix(&name[8..16], 16).ok()?;
    let lo = u64::from_str_radix(&name[16..24], 16).ok()?;
    Some(hi * (0x1_0000_0000 / seg_size) + lo)
}

/// Logical and exclusive bytes of an object.
type Sizes = (u64, Option<u64>);

/// How long measured sizes are reused.
const SIZE_TTL: Duration = Duration::from_secs(10);

/// The sizes last measured of one timeline or snapshot.
#[derive(Debug, Default)]
struct SizeEntry {
    logical: Option<(std::time::Instant, u64)>,
    exclusive: Option<(std::time::Instant, Option<u64>)>,
    /// A background measurement of the exclusive bytes is under way.
    measuring: bool,
}

/// Bytes only `data` (plus the `extra` directories that belong to the same
/// object, e.g. a timeline's base) holds; `None` when the driver can't tell.
fn exclusive_of(i: &Inner, data: &Path, extra: &[PathBuf]) -> Option<u64> {
    let mut total = i.driver.exclusive_bytes(data)?;
    for p in extra {
        total += i.driver.exclusive_bytes(p).unwrap_or(0);
    }
    Some(total)
}

const MANAGED_KEYS: &[&str] = &[
    "archive_mode",
    "archive_command",
    "archive_library",
    "restore_command",
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_name",
    "recovery_target_inclusive",
    "recovery_target_timeline",
    "recovery_target_action",
    "primary_conninfo",
    "primary_slot_name",
];

async fn connect_source(c: &ConnInfo) -> Result<tokio_postgres::Client, StorageError> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&c.host)
        .port(c.port)
        .user(&c.user)
        .dbname(&c.dbname)
        .connect_timeout(Duration::from_secs(10));
    if let Some(pw) = &c.password {
        cfg.password(pw.0.as_bytes());
    }
    let (client, conn) =
        cfg.connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| StorageError::Unavailable {
                message: format!(
                    "cannot connect to the source at {}:{} as {}: {e}",
                    c.host, c.port, c.user
                ),
            })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn sql_err(what: &str, e: tokio_postgres::Error) -> StorageError {
    StorageError::Unavailable {
        message: format!("{what} on the source: {e}"),
    }
}

impl Engine {
    /// Opens (or creates) an engine on `cfg.root`: probes the driver, opens
    /// the metadata store, and finishes or cleans up unfinished operations.
    pub async fn open(cfg: EngineConfig) -> Result<Engine, StorageError> {
        fs::create_dir_all(&cfg.root).map_err(|e| io_err("creating the volume root", e))?;
        let root =
            fs::canonicalize(&cfg.root).map_err(|e| io_err("resolving the volume root", e))?;
        let compute_root = cfg.compute_root.clone().unwrap_or_else(|| root.clone());
        for p in [&root, &compute_root] {
            let s = p.to_string_lossy();
            if !s.starts_with('/')
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b))
            {
                return Err(StorageError::invalid(format!(
                    "volume path {s:?} must be absolute and made of letters, digits and / . _ - +"
                )));
            }
        }
        let bin = match cfg.pg_bin_dir.clone() {
            Some(b) => b,
            None => pg::find_bin_dir().ok_or_else(|| {
                StorageError::invalid("no PostgreSQL found under /usr/lib/postgresql/<major>/bin")
            })?,
        };
        let user = pg::run_as_user(cfg.run_as.as_deref())?;
        let mut env = PgEnv {
            bin,
            user,
            major: 0,
        };
        let mut cmd = env.command("postgres");
        cmd.arg("--version");
        let version = env.run(cmd, "postgres --version").await?;
        env.major = version
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.split('.').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);

        make_traversable(&root)?;
        // An engine of this process that was just dropped may still be
        // finishing a background pass (the base roller): give it a moment.
        let lock_deadline = std::time::Instant::now() + Duration::from_secs(10);
        let volume_lock = loop {
            let lockf = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(root.join("engine.lock"))
                .map_err(|e| io_err("opening engine.lock", e))?;
            match nix::fcntl::Flock::lock(lockf, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(l) => break l,
                Err((_, e)) if std::time::Instant::now() > lock_deadline => {
                    return Err(StorageError::Busy {
                        message: format!(
                            "another engine has the volume {} open ({e})",
                            root.display()
                        ),
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        for d in ["timelines", "snapshots", "wal", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(|e| io_err("creating the volume layout", e))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
                .map_err(|e| io_err("chmod", e))?;
        }
        let tmp = root.join("tmp");
        let kind = driver::probe(&root, &tmp, cfg.driver).map_err(StorageError::invalid)?;
        let driver = driver::make_driver(kind);
        // Work directories of operations that did not finish.
        if let Ok(rd) = fs::read_dir(&tmp) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    pg::kill_leftover(&p);
                    let _ = driver.delete_dir(&p);
                } else {
                    let _ = fs::remove_file(&p);
                }
            }
        }
        let meta = Meta::open(&root.join("meta.sqlite"))?;
        let engine = Engine {
            inner: Arc::new(Inner {
                root,
                compute_root,
                driver,
                pg: env,
                meta,
                in_use: Mutex::new(HashMap::new()),
                index_lock: tokio::sync::Mutex::new(()),
                sizes: Mutex::new(HashMap::new()),
                roll: bases::RollPolicy::resolve(
                    kind,
                    cfg.base_roll_wal_bytes,
                    cfg.base_roll_check,
                    cfg.base_roll_keep,
                ),
                _volume_lock: volume_lock,
                archive_wait: cfg.archive_wait.unwrap_or(archiver::DEFAULT_ARCHIVE_WAIT),
            }),
        };
        tracing::info!(root = %engine.inner.root.display(), driver = %kind, pg_major = engine.inner.pg.major, "storage engine open");
        engine.recover().await?;
        engine.spawn_base_roller();
        Ok(engine)
    }

    /// The driver in use.
    pub fn driver(&self) -> DriverKind {
        self.inner.driver.kind()
    }

    /// The absolute data directory of a timeline.
    pub fn data_dir(&self, id: &TimelineId) -> PathBuf {
        self.tl_dir(id).join("pgdata")
    }

    fn tl_dir(&self, id: &TimelineId) -> PathBuf {
        self.inner.root.join("timelines").join(id.as_str())
    }
    fn snap_dir(&self, id: &SnapshotId) -> PathBuf {
        self.inner.root.join("snapshots").join(id.as_str())
    }
    fn wal_dir(&self, id: &TimelineId) -> PathBuf {
        self.inner.root.join("wal").join(id.as_str())
    }
    fn tmp(&self) -> PathBuf {
        self.inner.root.join("tmp")
    }

    /// The shell command that archives one WAL file into the timeline's own
    /// archive: never overwrites (an existing file must be identical),
    /// fsyncs the copy before an atomic rename, then fsyncs the directory.
    /// PostgreSQL cuts the expanded command off at 1024 bytes, so the
    /// archive path is written once, into a shell variable.
    fn archive_command(root: &Path, id: &TimelineId) -> String {
        let d = root.join("wal").join(id.as_str());
        let d = d.display();
        format!(
            "d=\"{d}\"; f=\"$d/%f\"; if [ -f \"$f\" ]; then cmp -s \"%p\" \"$f\"; else cp \"%p\" \"$f.tmp\" && sync \"$f.tmp\" && mv \"$f.tmp\" \"$f\" && sync \"$d\"; fi"
        )
    }

    /// Settings for servers the engine runs itself (archive into the local
    /// view of the volume).
    fn local_settings(&self, archive: Option<&TimelineId>) -> Vec<(String, String)> {
        match archive {
            Some(id) => vec![(
                "archive_command".into(),
                Self::archive_command(&self.inner.root, id),
            )],
            None => vec![("archive_mode".into(), "off".into())],
        }
    }

    /// Starts a stock `postgres` for a ready timeline on 127.0.0.1:`port`,
    /// as the run_as user, with a private Unix socket directory; returns
    /// once it accepts connections and is not in recovery.
    pub async fn start_postgres(
        &self,
        id: &TimelineId,
        port: u16,
    ) -> Result<PgServer, StorageError> {
        let row = self
            .inner
            .meta
            .timeline(id)?
            .ok_or_else(|| StorageError::not_found("timeline", id))?;
        if row.state != State::Ready {
            return Err(StorageError::Conflict {
                message: format!("timeline {id} is {:?}, not Ready", row.state),
            });
        }
        let data = self.data_dir(id);
        if pid_alive(&data) {
            return Err(StorageError::Busy {
                message: format!("a postgres is already running on timeline {id}"),
            });
        }
        let log = self.tl_dir(id).join("postgres.log");
        self.inner
            .pg
            .start(
                &data,
                pg::StartOpts {
                    port,
                    listen: "127.0.0.1",
                    settings: &self.local_settings(Some(id)),
                    log: &log,
                    timeout: Duration::from_secs(600),
                    tied: false,
                    replay_progress: None,
                },
            )
            .await
    }

    async fn private_server(
        &self,
        data: &Path,
        archive: Option<&TimelineId>,
        log: &Path,
    ) -> Result<PgServer, StorageError> {
        self.private_server_with(data, archive, log, None).await
    }

    async fn private_server_with(
        &self,
        data: &Path,
        archive: Option<&TimelineId>,
        log: &Path,
        replay_progress: Option<&(dyn Fn(Lsn) + Send + Sync)>,
    ) -> Result<PgServer, StorageError> {
        self.inner
            .pg
            .start(
                data,
                pg::StartOpts {
                    port: 5432,
                    listen: "",
                    settings: &self.local_settings(archive),
                    log,
                    timeout: Duration::from_secs(3600),
                    tied: true,
                    replay_progress,
                },
            )
            .await
            .inspect(|_| crash_point("private server running"))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&Inner) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, StorageError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| io_err(what, e))?
            .map_err(|e| io_err(what, e))
    }

    /// Sizes of an object (`data`, plus `extra` directories counted in its
    /// exclusive bytes), measured at most every [`SIZE_TTL`] because callers
    /// poll. The logical size is a walk of `stat` calls (cheap whatever the
    /// data's size) and is measured on the caller's path. Exclusive bytes
    /// that cost time growing with the data (btrfs reads every extent) are
    /// measured in the background: the caller gets the last value, `None`
    /// until the first measurement lands. So a new timeline is `Ready` for
    /// its caller as soon as it is made, at any size.
    async fn measured(
        &self,
        key: String,
        data: PathBuf,
        extra: Vec<PathBuf>,
    ) -> Result<Sizes, StorageError> {
        let slow = self.inner.driver.exclusive_bytes_is_slow();
        let (fresh_logical, cached_excl, start_bg) = {
            let mut c = self
                .inner
                .sizes
                .lock()
                .map_err(|_| StorageError::internal("the size cache is poisoned"))?;
            let e = c.entry(key.clone()).or_default();
            let fresh = |at: &std::time::Instant| at.elapsed() < SIZE_TTL;
            let fresh_logical = e.logical.filter(|(at, _)| fresh(at)).map(|(_, v)| v);
            let cached_excl = e.exclusive.map(|(at, v)| (fresh(&at), v));
            let start_bg = slow && !matches!(cached_excl, Some((true, _))) && !e.measuring;
            if start_bg {
                e.measuring = true;
            }
            (fresh_logical, cached_excl, start_bg)
        };
        if start_bg {
            let me = self.clone();
            let (k, d, x) = (key.clone(), data.clone(), extra.clone());
            tokio::spawn(async move {
                let v = me
                    .blocking("measuring exclusive bytes", move |i| {
                        Ok(exclusive_of(i, &d, &x))
                    })
                    .await;
                if let Ok(mut c) = me.inner.sizes.lock() {
                    // No entry: the object was deleted meanwhile.
                    if let Some(e) = c.get_mut(&k) {
                        e.measuring = false;
                        if let Ok(v) = v {
                            e.exclusive = Some((std::time::Instant::now(), v));
                        }
                    }
                }
            });
        }
        let excl_now = !slow && !matches!(cached_excl, Some((true, _)));
        let last_excl = cached_excl.and_then(|(_, v)| v);
        if let (Some(l), false) = (fresh_logical, excl_now) {
            return Ok((l, last_excl));
        }
        let (l, ex) = self
            .blocking("measuring sizes", move |i| {
                let l = match fresh_logical {
                    Some(l) => l,
                    None => driver::tree_size(&data),
                };
                let ex = excl_now.then(|| exclusive_of(i, &data, &extra));
                Ok((l, ex))
            })
            .await?;
        if let Ok(mut c) = self.inner.sizes.lock() {
            let e = c.entry(key).or_default();
            let now = std::time::Instant::now();
            e.logical = Some((now, l));
            if let Some(ex) = ex {
                e.exclusive = Some((now, ex));
            }
        }
        Ok((l, ex.unwrap_or(last_excl)))
    }

    fn forget_sizes(&self, key: &str) {
        if let Ok(mut c) = self.inner.sizes.lock() {
            c.remove(key);
        }
    }

    async fn clone_dir(&self, src: &Path, dst: &Path, readonly: bool) -> Result<(), StorageError> {
        let (s, d) = (src.to_path_buf(), dst.to_path_buf());
        self.blocking("cloning a data directory", move |i| {
            i.driver.clone_dir(&s, &d, readonly)
        })
        .await
    }

    async fn delete_dir(&self, p: &Path) -> Result<(), StorageError> {
        let p = p.to_path_buf();
        self.blocking("deleting a data directory", move |i| {
            i.driver.delete_dir(&p)
        })
        .await
    }

    fn acquire(&self, keys: Vec<String>) -> InUse {
        if let Ok(mut m) = self.inner.in_use.lock() {
            for k in &keys {
                *m.entry(k.clone()).or_insert(0) += 1;
            }
        }
        InUse {
            inner: self.inner.clone(),
            keys,
        }
    }

    /// Takes `key` only when nobody holds it.
    fn try_acquire(&self, key: String) -> Option<InUse> {
        let mut m = self.inner.in_use.lock().ok()?;
        if m.contains_key(&key) {
            return None;
        }
        m.insert(key.clone(), 1);
        drop(m);
        Some(InUse {
            inner: self.inner.clone(),
            keys: vec![key],
        })
    }

    /// One guard holding `guard`'s objects and `more`.
    fn join(&self, guard: InUse, more: Vec<String>) -> InUse {
        let mut keys = guard.keys.clone();
        keys.extend(more);
        let joined = self.acquire(keys);
        drop(guard);
        joined
    }

    fn in_use(&self, key: &str) -> bool {
        self.inner
            .in_use
            .lock()
            .map(|m| m.contains_key(key))
            .unwrap_or(true)
    }

    fn ready_timeline(&self, id: &TimelineId) -> Result<TimelineRow, StorageError> {
        let row = self
            .inner
            .meta
            .timeline(id)?
            .ok_or_else(|| StorageError::not_found("timeline", id))?;
        if row.state != State::Ready {
            return Err(StorageError::Conflict {
                message: format!("timeline {id} is {:?}, not Ready", row.state),
            });
        }
        Ok(row)
    }

    // ---------------------------------------------------------------- fix-ups

    /// The fix-ups every writable copy gets (see the module docs).
    /// `archive`: the timeline whose archive this copy feeds (None: off).
    fn fixups(&self, data: &Path, archive: Option<&TimelineId>) -> Result<(), StorageError> {
        check_self_contained(data)?;
        self.clear_runtime_state(
            data,
            &[
                "postmaster.pid",
                "postmaster.opts",
                "recovery.signal",
                "standby.signal",
                "pgbranch.recovery.conf",
            ],
        )?;
        let mut conf = String::from(
            "# Written by pgbranch for this timeline; rewritten on every copy. Do not edit.\n",
        );
        conf.push_str("wal_level = replica\n");
        match archive {
            Some(id) => {
                conf.push_str("archive_mode = on\n");
                conf.push_str(&format!(
                    "archive_command = '{}'\n",
                    Self::archive_command(&self.inner.compute_root, id)
                ));
            }
            None => conf.push_str("archive_mode = off\n"),
        }
        conf.push_str("recovery_init_sync_method = syncfs\n");
        conf.push_str("listen_addresses = '*'\n");
        self.install_conf(data, &conf)
    }

    /// Removes a copied server's run-time files (`files`) and replication
    /// slots: a copy must not inherit its source's slots or pid file.
    fn clear_runtime_state(&self, data: &Path, files: &[&str]) -> Result<(), StorageError> {
        for f in files {
            let p = data.join(f);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&format!("removing {}", p.display()), e)),
            }
        }
        if let Ok(rd) = fs::read_dir(data.join("pg_replslot")) {
            for e in rd.flatten() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        Ok(())
    }

    /// Writes the engine's settings `conf` as `pgbranch.conf`, includes it
    /// (and `pgbranch.recovery.conf`) from `postgresql.conf`, and strips the
    /// keys the engine manages from `postgresql.auto.conf`, so nothing of
    /// the source's archiving or recovery survives a copy.
    fn install_conf(&self, data: &Path, conf: &str) -> Result<(), StorageError> {
        self.inner
            .pg
            .write_file(&data.join("pgbranch.conf"), conf)?;
        let main = data.join("postgresql.conf");
        let text = fs::read_to_string(&main).map_err(|e| io_err("reading postgresql.conf", e))?;
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("include_if_exists = 'pgbranch"))
            .map(|l| l.to_string())
            .collect();
        lines.push("include_if_exists = 'pgbranch.conf'".into());
        lines.push("include_if_exists = 'pgbranch.recovery.conf'".into());
        self.inner
            .pg
            .write_file(&main, &(lines.join("\n") + "\n"))?;

        let auto = data.join("postgresql.auto.conf");
        if let Ok(text) = fs::read_to_string(&auto) {
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    let k = l.split('=').next().unwrap_or("").trim();
                    !MANAGED_KEYS.contains(&k)
                })
                .collect();
            self.inner.pg.write_file(&auto, &(kept.join("\n") + "\n"))?;
        }
        Ok(())
    }

    fn write_hba(&self, data: &Path) -> Result<(), StorageError> {
        let hba = "# Written by pgbranch at initdb.\n\
            local   all          all                 trust\n\
            local   replication  all                 trust\n\
            host    all          all  0.0.0.0/0      scram-sha-256\n\
            host    all          all  ::/0           scram-sha-256\n\
            host    replication  all  0.0.0.0/0      scram-sha-256\n\
            host    replication  all  ::/0           scram-sha-256\n";
        self.inner.pg.write_file(&data.join("pg_hba.conf"), hba)
    }

    /// Brings a writable copy to a clean shutdown state: crash or backup
    /// recovery in a stand-alone backend, or, should that not leave it
    /// clean, by a private start and a fast stop.
    async fn normalize(
        &self,
        data: &Path,
        archive: Option<&TimelineId>,
        log: &Path,
    ) -> Result<pg::ControlData, StorageError> {
        let is_clean = |cd: &pg::ControlData| cd.clean() && !data.join("backup_label").exists();
        let cd = self.inner.pg.controldata(data).await?;
        if is_clean(&cd) {
            return Ok(cd);
        }
        let settings = self.local_settings(archive);
        let started = std::time::Instant::now();
        match self
            .inner
            .pg
            .recover_single_user(data, &settings, log, Duration::from_secs(3600))
            .await
        {
            Ok(()) => {
                tracing::debug!(data = %data.display(), elapsed_ms = started.elapsed().as_millis() as u64, "stand-alone recovery done");
                let cd = self.inner.pg.controldata(data).await?;
                if is_clean(&cd) {
                    return Ok(cd);
                }
                tracing::warn!(data = %data.display(), state = %cd.state, "stand-alone recovery did not leave a clean copy; starting a private server");
            }
            Err(e) => {
                tracing::warn!(data = %data.display(), error = %e, "stand-alone recovery failed; starting a private server");
            }
        }
        let srv = self.private_server(data, archive, log).await?;
        srv.stop(StopMode::Fast).await?;
        self.inner.pg.controldata(data).await
    }

    /// Sets `data` up for a replay of `src`'s archive up to `target`
    /// (inclusive), ending with `action` (`promote`, or `shutdown` to stay
    /// in recovery); the settings are removed after the replay.
    fn write_recovery(
        &self,
        data: &Path,
        src: &TimelineId,
        target: Lsn,
        action: &str,
    ) -> Result<(), StorageError> {
        let rc = format!(
            "# Written by pgbranch for a replay of the WAL archive; removed after it.\n\
             restore_command = 'cp \"{}/%f\" \"%p\"'\n\
             recovery_target_lsn = '{target}'\n\
             recovery_target_inclusive = on\n\
             recovery_target_timeline = 'current'\n\
             recovery_target_action = '{action}'\n",
            self.wal_dir(src).display()
        );
        self.inner
            .pg
            .write_file(&data.join("pgbranch.recovery.conf"), &rc)?;
        self.inner.pg.write_file(&data.join("recovery.signal"), "")
    }

    /// Replays `src`'s archive on the writable base copy `data` up to
    /// `target` and promotes; leaves it cleanly shut down.
    async fn replay(
        &self,
        data: &Path,
        base: &BaseRow,
        target: Lsn,
        archive: Option<&TimelineId>,
        log: &Path,
        report: &(dyn Fn(Option<u8>) + Send + Sync),
    ) -> Result<(), StorageError> {
        let src = &base.timeline;
        let from = base.lsn.0;
        let on_lsn = move |l: Lsn| {
            let span = target.0.saturating_sub(from).max(1);
            let done = l.0.saturating_sub(from).min(span);
            report(Some((done * 100 / span) as u8));
        };
        self.write_recovery(data, src, target, "promote")?;
        let srv = match self
            .private_server_with(data, archive, log, Some(&on_lsn))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                // The whole log of this replay: the reason may be followed
                // by several lines of shutdown.
                let text = fs::read_to_string(log).unwrap_or_default();
                if text.contains("recovery ended before configured recovery target was reached")
                    || text.contains("before consistent recovery point")
                {
                    let window = match self.inner.meta.timeline(src)? {
                        Some(row) => self.reported_window(&row).await.unwrap_or(None),
                        None => None,
                    };
                    return Err(StorageError::InvalidPoint {
                        message: format!(
                            "WAL replay ended before reaching {target}: the point is not in the archived WAL of timeline {src}"
                        ),
                        window,
                    });
                }
                return Err(e);
            }
        };
        srv.stop(StopMode::Fast).await?;
        for f in ["pgbranch.recovery.conf", "recovery.signal"] {
            let _ = fs::remove_file(data.join(f));
        }
        Ok(())
    }

    /// Copies the head of a (possibly running) data directory into `dst`.
    async fn copy_head(
        &self,
        source: &TimelineId,
        dst: &Path,
        conn: Option<&ConnInfo>,
        want_backup: bool,
        readonly: bool,
        label: &str,
    ) -> Result<(Consistency, Option<Lsn>), StorageError> {
        let src_dir = self.data_dir(source);
        let src = src_dir.as_path();
        check_self_contained(src)?;
        let atomic = self.inner.driver.atomic();
        let running = src.join("postmaster.pid").exists();
        if !running {
            self.clone_dir(src, dst, readonly).await?;
            let cd = self.inner.pg.controldata(dst).await?;
            return Ok((Consistency::Clean, Some(cd.checkpoint)));
        }
        let Some(conn) = conn else {
            if atomic {
                self.clone_dir(src, dst, readonly).await?;
                return Ok((Consistency::Crash, None));
            }
            return Err(StorageError::Busy {
                message: format!(
                    "the source's server is running (postmaster.pid present) and the {} driver cannot copy a running server without a source connection for backup mode; pass source_connection or stop the compute",
                    self.inner.driver.kind()
                ),
            });
        };
        let client = connect_source(conn).await?;
        if atomic && !want_backup {
            client
                .batch_execute("CHECKPOINT")
                .await
                .map_err(|e| sql_err("CHECKPOINT", e))?;
            let lsn: String = client
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .map_err(|e| sql_err("pg_current_wal_lsn()", e))?
                .get(0);
            self.clone_dir(src, dst, readonly).await?;
            return Ok((Consistency::Crash, lsn.parse().ok()));
        }
        let ver: String = client
            .query_one("SHOW server_version_num", &[])
            .await
            .map_err(|e| sql_err("SHOW server_version_num", e))?
            .get(0);
        let v15 = ver.parse::<u32>().unwrap_or(150000) >= 150000;
        let start_sql = if v15 {
            "SELECT pg_backup_start($1, true)::text"
        } else {
            "SELECT pg_start_backup($1, true, false)::text"
        };
        client
            .query_one(start_sql, &[&label])
            .await
            .map_err(|e| sql_err("starting backup mode", e))?;
        let work = if readonly && atomic {
            self.tmp().join(format!("{label}-backup"))
        } else {
            dst.to_path_buf()
        };
        let copied = self.clone_dir(src, &work, false).await;
        let stop_sql = if v15 {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(true)"
        } else {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, true)"
        };
        let wait = self.inner.archive_wait;
        let stopped = archiver::stop_backup(&client, conn, stop_sql, wait).await;
        copied?;
        let row = stopped?;
        let lsn: String = row.get(0);
        let labelfile: String = row.get(1);
        let spcmap: Option<String> = row.get(2);
        self.inner
            .pg
            .write_file(&work.join("backup_label"), &labelfile)?;
        if let Some(m) = spcmap.filter(|m| !m.trim().is_empty()) {
            self.inner.pg.write_file(&work.join("tablespace_map"), &m)?;
        }
        let _ = fs::remove_file(work.join("postmaster.pid"));
        // WAL written during the copy, up to the backup's end.
        let (s, w) = (src.join("pg_wal"), work.join("pg_wal"));
        // "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)"
        let start_seg = labelfile
            .lines()
            .find_map(|l| l.strip_prefix("START WAL LOCATION:"))
            .and_then(|l| l.split("(file ").nth(1))
            .map(|f| f.trim_end_matches(')').trim().to_string());
        let archive = self.wal_dir(source);
        self.blocking("re-copying pg_wal", move |_| {
            recopy_wal(&s, &w, start_seg.as_deref(), Some(&archive))
        })
        .await?;
        self.inner.pg.chown_tree(&work.join("pg_wal"))?;
        if work != dst {
            self.clone_dir(&work, dst, true).await?;
            self.delete_dir(&work).await?;
        }
        Ok((Consistency::Backup, lsn.parse().ok()))
    }

    // ------------------------------------------------------------- windows

    /// Reads new segments of a timeline's archive with `pg_waldump`.
    async fn index_archive(&self, t: &TimelineRow) -> Result<(), StorageError> {
        let (Some(tli), Some(seg)) = (t.pg_tli, t.wal_seg_size) else {
            return Ok(());
        };
        let _g = self.inner.index_lock.lock().await;
        let dir = self.wal_dir(&t.id);
        let prefix = format!("{tli:08X}");
        let mut segs: Vec<String> = match fs::read_dir(&dir) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.len() == 24 && n.starts_with(&prefix) && segno_of(n, seg).is_some())
                .collect(),
            Err(_) => return Ok(()),
        };
        segs.sort();
        let Some(newest) = segs.last().cloned() else {
            return Ok(());
        };
        let mut idx = self.inner.meta.wal_index(&t.id)?;
        if idx.last_segment.as_deref() == Some(newest.as_str()) {
            return Ok(());
        }
        let base_lsn = self
            .inner
            .meta
            .bases(&t.id)?
            .first()
            .map(|b| b.lsn.0)
            .unwrap_or(0);
        let mut start = idx.scanned_upto.max(base_lsn);
        let start_seg = start / seg;
        match segs
            .iter()
            .filter_map(|n| segno_of(n, seg))
            .find(|s| *s >= start_seg)
        {
            Some(s) if s > start_seg => start = s * seg,
            Some(_) => {}
            None => return Ok(()),
        }
        let mut cmd = self.inner.pg.command("pg_waldump");
        cmd.arg("-p")
            .arg(&dir)
            .arg("-t")
            .arg(tli.to_string())
            .arg("-s")
            .arg(Lsn(start).to_string());
        // Without an end, pg_waldump waits ~5 s for the segment after the
        // newest one to appear; stop at the end of the newest archived one.
        if let Some(end_seg) = segno_of(&newest, seg) {
            cmd.arg("-e").arg(Lsn((end_seg + 1) * seg).to_string());
        }
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let out = cmd
            .output()
            .await
            .map_err(|e| io_err("running pg_waldump", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut commits = Vec::new();
        let mut last = None;
        for line in text.lines() {
            if let Some((lsn, time)) = pg::parse_waldump_line(line) {
                last = Some(lsn);
                if let Some(t) = time {
                    commits.push((lsn, t));
                }
            }
        }
        if let Some(l) = last {
            idx.scanned_upto = l.0 + 1;
            idx.last_lsn = Some(l);
        }
        idx.last_segment = Some(newest);
        self.inner.meta.record_wal_scan(&t.id, &idx, &commits)?;
        Ok(())
    }

    async fn window(&self, t: &TimelineRow) -> Result<Option<RestoreWindow>, StorageError> {
        if let Err(e) = self.index_archive(t).await {
            tracing::warn!(timeline = %t.id, error = %e, "reading the WAL archive failed");
        }
        let bases = self.inner.meta.bases(&t.id)?;
        let Some(oldest) = bases.first() else {
            return Ok(None);
        };
        let idx = self.inner.meta.wal_index(&t.id)?;
        let last_commit = self.inner.meta.last_commit(&t.id)?;
        let base_newest_lsn = bases.iter().map(|b| b.lsn).max().unwrap_or(oldest.lsn);
        let base_newest_time = bases.iter().map(|b| b.time).max().unwrap_or(oldest.time);
        let newest_lsn = idx
            .last_lsn
            .map_or(base_newest_lsn, |l| l.max(base_newest_lsn));
        let mut newest_time = base_newest_time;
        if let Some((_, t)) = last_commit {
            newest_time = newest_time.max(t);
        }
        if let Some(t) = idx.complete_time {
            newest_time = newest_time.max(t);
        }
        Ok(Some(RestoreWindow {
            oldest: PointInfo {
                lsn: oldest.lsn,
                time: Some(oldest.time),
            },
            newest: PointInfo {
                lsn: newest_lsn,
                time: Some(newest_time),
            },
        }))
    }

    /// When the timeline's server is stopped (no `postmaster.pid`) and
    /// every WAL segment it wrote is archived (no `.ready` status file),
    /// its archive holds every commit ever made: records that as of now.
    async fn archive_complete_if_stopped(&self, t: &TimelineRow) -> Result<bool, StorageError> {
        let data = self.data_dir(&t.id);
        if data.join("postmaster.pid").exists() {
            return Ok(false);
        }
        let pending = fs::read_dir(data.join("pg_wal").join("archive_status"))
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".ready"))
            })
            .unwrap_or(true);
        if pending {
            return Ok(false);
        }
        let now = jiff::Timestamp::now();
        let _g = self.inner.index_lock.lock().await;
        let mut idx = self.inner.meta.wal_index(&t.id)?;
        idx.complete_time = Some(idx.complete_time.map_or(now, |c| c.max(now)));
        self.inner.meta.record_wal_scan(&t.id, &idx, &[])?;
        Ok(true)
    }

    /// `pg_switch_wal()` on the source and wait for the segment to reach the
    /// archive, so every commit before now is archived.
    async fn switch_wal(&self, t: &TimelineRow, conn: &ConnInfo) -> Result<(), StorageError> {
        let asked = jiff::Timestamp::now();
        let client = connect_source(conn).await?;
        let name: String = client
            .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
            .await
            .map_err(|e| sql_err("pg_switch_wal()", e))?
            .get(0);
        let path = self.wal_dir(&t.id).join(&name);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !path.exists() {
            if std::time::Instant::now() > deadline {
                return Err(StorageError::Unavailable {
                    message: format!(
                        "{}: WAL segment {name} of timeline {} was not archived within 60 s; {}",
                        crate::storage::ARCHIVING_FAILED,
                        t.id,
                        archiver::archiver_state(conn).await
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _g = self.inner.index_lock.lock().await;
        let mut idx = self.inner.meta.wal_index(&t.id)?;
        idx.complete_time = Some(idx.complete_time.map_or(asked, |c| c.max(asked)));
        self.inner.meta.record_wal_scan(&t.id, &idx, &[])
    }

    /// Checks a point against the window and finds the base and LSN to
    /// replay to.
    /// Like [`Self::resolve_own`], and for a point before the timeline's
    /// own window, follows lineage: the parent's history up to the branch
    /// point is this timeline's history too (replayed from the parent's
    /// bases and archive while the parent exists).
    async fn resolve_target(
        &self,
        t: &TimelineRow,
        point: &Point,
        conn: Option<&ConnInfo>,
    ) -> Result<(BaseRow, Lsn), StorageError> {
        match self.resolve_own(t, point, conn).await {
            Err(StorageError::InvalidPoint {
                message,
                window: Some(w),
            }) if point_before(point, &w) => {
                if let Some(found) = self.resolve_in_parent(t, point).await? {
                    return Ok(found);
                }
                let window = self.reported_window(t).await?.or(Some(w));
                Err(StorageError::InvalidPoint { message, window })
            }
            r => r,
        }
    }

    fn resolve_in_parent<'a>(
        &'a self,
        t: &'a TimelineRow,
        point: &'a Point,
    ) -> futures::future::BoxFuture<'a, Result<Option<(BaseRow, Lsn)>, StorageError>> {
        Box::pin(async move {
            let Some(parent) = self.lineage_parent(t)? else {
                return Ok(None);
            };
            let Ok((base, target)) = self.resolve_target(&parent, point, None).await else {
                return Ok(None);
            };
            // Only the parent's history up to the branch point is ours.
            let ours = match (t.lineage.parent_lsn, point) {
                (Some(bp), _) => target <= bp,
                // Crash-consistent head copies do not know their LSN: only
                // commits made before the copy was asked for are certain.
                (None, Point::Timestamp(ts)) => *ts <= t.created_at,
                (None, _) => false,
            };
            Ok(ours.then_some((base, target)))
        })
    }

    /// The parent whose history this timeline continues, if it still exists.
    fn lineage_parent(&self, t: &TimelineRow) -> Result<Option<TimelineRow>, StorageError> {
        if t.lineage.schema_only {
            return Ok(None);
        }
        let Some(p) = &t.lineage.parent else {
            return Ok(None);
        };
        Ok(self
            .inner
            .meta
            .timeline(p)?
            .filter(|r| r.state == State::Ready))
    }

    /// The window a user can reach: the timeline's own, extended back
    /// through its ancestors' history while they exist.
    async fn reported_window(
        &self,
        t: &TimelineRow,
    ) -> Result<Option<RestoreWindow>, StorageError> {
        let Some(mut w) = self.window(t).await? else {
            return Ok(None);
        };
        // The ancestors only lend their oldest point, which their bases
        // give: no need to read (index) their archives, which under a
        // parent's write load would put seconds of pg_waldump on every
        // child's status read.
        let mut at = self.lineage_parent(t)?;
        while let Some(parent) = at {
            if let Some(oldest) = self.inner.meta.bases(&parent.id)?.first() {
                if oldest.lsn < w.oldest.lsn || Some(oldest.time) < w.oldest.time {
                    w.oldest = PointInfo {
                        lsn: oldest.lsn,
                        time: Some(oldest.time),
                    };
                }
            }
            at = self.lineage_parent(&parent)?;
        }
        Ok(Some(w))
    }

    /// Checks a point against the timeline's own window and finds the base
    /// and LSN to replay to.
    async fn resolve_own(
        &self,
        t: &TimelineRow,
        point: &Point,
        conn: Option<&ConnInfo>,
    ) -> Result<(BaseRow, Lsn), StorageError> {
        let no_window = || StorageError::InvalidPoint {
            message: format!("timeline {} has no restore window yet", t.id),
            window: None,
        };
        let mut w = self.window(t).await?.ok_or_else(no_window)?;
        let target = match point {
            Point::Head => {
                return Err(StorageError::internal("resolve_target called for head"));
            }
            Point::Lsn(x) => {
                if *x < w.oldest.lsn {
                    return Err(StorageError::InvalidPoint {
                        message: format!(
                            "LSN {x} is before the restore window of timeline {}",
                            t.id
                        ),
                        window: Some(w),
                    });
                }
                if *x > w.newest.lsn {
                    if let Some(c) = conn {
                        self.switch_wal(t, c).await?;
                        w = self.window(t).await?.ok_or_else(no_window)?;
                    }
                }
                if *x > w.newest.lsn {
                    return Err(StorageError::InvalidPoint {
                        message: format!(
                            "LSN {x} is after the newest archived WAL of timeline {} (in the future, or not archived yet)",
                            t.id
                        ),
                        window: Some(w),
                    });
                }
                *x
            }
            Point::Timestamp(ts) => {
                if *ts > jiff::Timestamp::now() {
                    return Err(StorageError::InvalidPoint {
                        message: format!("timestamp {ts} is in the future"),
                        window: Some(w),
                    });
                }
                if Some(*ts) < w.oldest.time {
                    return Err(StorageError::InvalidPoint {
                        message: format!(
                            "timestamp {ts} is before the restore window of timeline {}",
                            t.id
                        ),
                        window: Some(w),
                    });
                }
                if Some(*ts) > w.newest.time {
                    if self.archive_complete_if_stopped(t).await? {
                        // A stopped source has archived all it wrote.
                        w = self.window(t).await?.ok_or_else(no_window)?;
                    } else if let Some(c) = conn {
                        self.switch_wal(t, c).await?;
                        w = self.window(t).await?.ok_or_else(no_window)?;
                    }
                }
                if Some(*ts) > w.newest.time {
                    return Err(StorageError::InvalidPoint {
                        message: format!(
                            "timestamp {ts} is after the newest archived commit of timeline {} (pass a source connection so the engine can archive the current WAL, or retry later)",
                            t.id
                        ),
                        window: Some(w),
                    });
                }
                match self.inner.meta.commit_at_or_before(&t.id, *ts)? {
                    Some(l) if l >= w.oldest.lsn => l,
                    _ => {
                        // No commit since the base: the newest base not after it.
                        let bases = self.inner.meta.bases(&t.id)?;
                        // (A base stopped in recovery needs WAL after
                        // its point to replay to; a clean one does not.)
                        let b = bases
                            .iter()
                            .filter(|b| !b.in_recovery && b.time <= *ts)
                            .max_by_key(|b| b.lsn)
                            .or(bases.first())
                            .cloned()
                            .ok_or_else(no_window)?;
                        return Ok((b.clone(), b.lsn));
                    }
                }
            }
        };
        let bases = self.inner.meta.bases(&t.id)?;
        // A base stopped in recovery is consistent at its LSN; replay
        // from it must go past that point.
        let base = bases
            .iter()
            .filter(|b| b.lsn < target || (b.lsn == target && !b.in_recovery))
            .max_by_key(|b| b.lsn)
            .cloned()
            .ok_or_else(|| StorageError::InvalidPoint {
                message: format!("no base at or before {target}"),
                window: Some(w.clone()),
            })?;
        Ok((base, target))
    }

    // ------------------------------------------------------------- timelines

    async fn plan_timeline(
        &self,
        req: &CreateTimeline,
    ) -> Result<(TlPlan, Lineage, InUse), StorageError> {
        let conn = req.source_connection.clone();
        match &req.source {
            Source::Empty { superuser_password } => Ok((
                TlPlan::Empty {
                    password: superuser_password.clone(),
                },
                Lineage {
                    parent: None,
                    snapshot: None,
                    point: None,
                    parent_lsn: None,
                    schema_only: false,
                },
                self.acquire(vec![]),
            )),
            Source::SchemaOnly { timeline } => {
                let guard = self.acquire(vec![format!("t:{timeline}")]);
                self.ready_timeline(timeline)?;
                self.check_copyable(timeline, conn.as_ref())?;
                Ok((
                    TlPlan::SchemaOnly {
                        src: timeline.clone(),
                        conn,
                    },
                    Lineage {
                        parent: Some(timeline.clone()),
                        snapshot: None,
                        point: Some(Point::Head),
                        parent_lsn: None,
                        schema_only: true,
                    },
                    guard,
                ))
            }
            Source::Timeline { timeline, point } => {
                let guard = self.acquire(vec![format!("t:{timeline}")]);
                let row = self.ready_timeline(timeline)?;
                let lineage = Lineage {
                    parent: Some(timeline.clone()),
                    snapshot: None,
                    point: Some(*point),
                    parent_lsn: None,
                    schema_only: false,
                };
                if *point == Point::Head {
                    self.check_copyable(timeline, conn.as_ref())?;
                    return Ok((
                        TlPlan::Head {
                            src: timeline.clone(),
                            conn,
                        },
                        lineage,
                        guard,
                    ));
                }
                let (base, target) = self.resolve_target(&row, point, conn.as_ref()).await?;
                let guard = self.join(guard, base_keys(&base));
                let lineage = Lineage {
                    parent_lsn: Some(target),
                    ..lineage
                };
                Ok((TlPlan::Replay { base, target }, lineage, guard))
            }
            Source::Snapshot { snapshot } => {
                let guard = self.acquire(vec![format!("s:{snapshot}")]);
                let s = self
                    .inner
                    .meta
                    .snapshot(snapshot)?
                    .ok_or_else(|| StorageError::not_found("snapshot", snapshot))?;
                if s.state != State::Ready {
                    return Err(StorageError::Conflict {
                        message: format!("snapshot {snapshot} is {:?}, not Ready", s.state),
                    });
                }
                Ok((
                    TlPlan::Snapshot {
                        snap: snapshot.clone(),
                    },
                    Lineage {
                        parent: Some(s.timeline.clone()),
                        snapshot: Some(snapshot.clone()),
                        point: Some(s.point),
                        parent_lsn: s.lsn,
                        schema_only: false,
                    },
                    guard,
                ))
            }
        }
    }

    fn check_copyable(
        &self,
        src: &TimelineId,
        conn: Option<&ConnInfo>,
    ) -> Result<(), StorageError> {
        let data = self.data_dir(src);
        if conn.is_none() && !self.inner.driver.atomic() && data.join("postmaster.pid").exists() {
            return Err(StorageError::Busy {
                message: format!(
                    "timeline {src} looks running (postmaster.pid present) and the {} driver cannot copy a running server without a source connection; pass source_connection or stop its compute",
                    self.inner.driver.kind()
                ),
            });
        }
        check_self_contained(&data)
    }

    fn spawn_timeline(&self, id: TimelineId, plan: TlPlan, lineage: Lineage, guard: InUse) {
        let me = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let r = me.build_timeline(&id, plan, lineage).await;
            match r {
                Ok(()) => {
                    tracing::info!(timeline = %id, "timeline ready");
                    if let Err(e) = me.inner.meta.set_timeline_state(&id, State::Ready, None) {
                        tracing::error!(timeline = %id, error = %e, "recording a ready timeline failed");
                    }
                }
                Err(e) => {
                    tracing::warn!(timeline = %id, error = %e, "creating a timeline failed");
                    me.remove_timeline_dirs(&id).await;
                    let _ =
                        me.inner
                            .meta
                            .set_timeline_state(&id, State::Failed, Some(&e.to_string()));
                }
            }
        });
    }

    fn progress_t(&self, id: &TimelineId, step: &str) {
        crash_point(step);
        tracing::debug!(timeline = %id, step, "timeline step");
        let _ = self.inner.meta.set_timeline_progress(
            id,
            Some(Progress {
                step: step.to_string(),
                percent: None,
            }),
        );
    }

    fn progress_pct_t(&self, id: &TimelineId, step: &str, percent: Option<u8>) {
        let _ = self.inner.meta.set_timeline_progress(
            id,
            Some(Progress {
                step: step.to_string(),
                percent,
            }),
        );
    }

    async fn remove_timeline_dirs(&self, id: &TimelineId) {
        let dir = self.tl_dir(id);
        self.remove_rolled_bases(id).await;
        for sub in ["pgdata", "base"] {
            pg::kill_leftover(&dir.join(sub));
            if let Err(e) = self.delete_dir(&dir.join(sub)).await {
                tracing::warn!(timeline = %id, error = %e, "removing a data directory failed");
            }
        }
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(self.wal_dir(id));
    }

    async fn build_timeline(
        &self,
        id: &TimelineId,
        plan: TlPlan,
        mut lineage: Lineage,
    ) -> Result<(), StorageError> {
        let dir = self.tl_dir(id);
        fs::create_dir_all(&dir).map_err(|e| io_err("creating the timeline directory", e))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(|e| io_err("chmod", e))?;
        self.inner.pg.private_dir(&self.wal_dir(id))?;
        let data = dir.join("pgdata");
        let log = dir.join("engine.log");
        let label = format!("pgbranch-{id}");
        match plan {
            TlPlan::Empty { password } => {
                self.progress_t(id, "initdb");
                self.create_data_dir(&data).await?;
                self.inner
                    .pg
                    .initdb(&data, password.as_ref().map(|p| p.0.as_str()), &self.tmp())
                    .await?;
                self.write_hba(&data)?;
                self.fixups(&data, Some(id))?;
            }
            TlPlan::Head { src, conn } => {
                self.progress_t(id, "copying the source");
                let (_, lsn) = self
                    .copy_head(&src, &data, conn.as_ref(), false, false, &label)
                    .await?;
                lineage.parent_lsn = lsn;
                self.fixups(&data, Some(id))?;
                self.progress_t(id, "recovering the copy");
                self.normalize(&data, Some(id), &log).await?;
            }
            TlPlan::Replay { base, target } => {
                self.progress_t(id, "cloning the base");
                self.clone_dir(&self.inner.root.join(&base.path), &data, false)
                    .await?;
                self.fixups(&data, Some(id))?;
                if target > base.lsn || base.in_recovery {
                    self.progress_t(id, "replaying WAL");
                    // The archive of the base's timeline: this source's, or
                    // an ancestor's for a point before the source was made.
                    let report = |pct: Option<u8>| self.progress_pct_t(id, "replaying WAL", pct);
                    self.replay(&data, &base, target, Some(id), &log, &report)
                        .await?;
                } else {
                    self.normalize(&data, Some(id), &log).await?;
                }
            }
            TlPlan::Snapshot { snap } => {
                self.progress_t(id, "cloning the snapshot");
                self.clone_dir(&self.snap_dir(&snap).join("pgdata"), &data, false)
                    .await?;
                self.fixups(&data, Some(id))?;
                self.progress_t(id, "recovering the copy");
                self.normalize(&data, Some(id), &log).await?;
            }
            TlPlan::SchemaOnly { src, conn } => {
                self.build_schema_only(id, &src, conn.as_ref(), &data, &log)
                    .await?;
            }
        }
        let cd = self.inner.pg.controldata(&data).await?;
        if !cd.clean() {
            return Err(StorageError::internal(format!(
                "the new data directory is {:?}, not cleanly shut down",
                cd.state
            )));
        }
        self.inner
            .meta
            .set_timeline_pg(id, pg_major_of(&data), cd.tli, cd.seg_size)?;
        self.inner.meta.set_timeline_lineage(id, &lineage)?;
        self.progress_t(id, "keeping a base copy");
        self.clone_dir(&data, &dir.join("base"), true).await?;
        self.inner.meta.add_base(&BaseRow {
            path: format!("timelines/{id}/base"),
            timeline: id.clone(),
            snapshot: None,
            lsn: cd.checkpoint,
            time: jiff::Timestamp::now(),
            in_recovery: false,
        })?;
        Ok(())
    }

    async fn create_data_dir(&self, data: &Path) -> Result<(), StorageError> {
        let d = data.to_path_buf();
        self.blocking("creating a data directory", move |i| {
            i.driver.create_dir(&d)
        })
        .await?;
        fs::set_permissions(data, fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err("chmod", e))?;
        self.inner.pg.chown(data)
    }

    async fn build_schema_only(
        &self,
        id: &TimelineId,
        src: &TimelineId,
        conn: Option<&ConnInfo>,
        data: &Path,
        log: &Path,
    ) -> Result<(), StorageError> {
        let work = self.tmp().join(format!("{id}-schema"));
        let dumpdir = self.tmp().join(format!("{id}-dump"));
        let r = async {
            self.progress_t(id, "copying the source");
            self.copy_head(src, &work, conn, false, false, &format!("pgbranch-{id}"))
                .await?;
            self.fixups(&work, None)?;
            self.progress_t(id, "dumping the schema");
            let srv = self.private_server(&work, None, log).await?;
            self.inner.pg.private_dir(&dumpdir)?;
            let dump = dumpdir.join("schema.sql");
            let mut cmd = self.inner.pg.command("pg_dumpall");
            cmd.arg("--schema-only")
                .arg("-h")
                .arg(&srv.socket_dir)
                .arg("-p")
                .arg(srv.port.to_string())
                .args(["-U", "postgres", "-f"])
                .arg(&dump);
            let dumped = self.inner.pg.run(cmd, "pg_dumpall --schema-only").await;
            srv.stop(StopMode::Immediate).await?;
            dumped?;
            self.progress_t(id, "initdb");
            self.create_data_dir(data).await?;
            self.inner.pg.initdb(data, None, &self.tmp()).await?;
            self.write_hba(data)?;
            self.fixups(data, Some(id))?;
            self.progress_t(id, "restoring the schema");
            let srv = self.private_server(data, Some(id), log).await?;
            let mut cmd = self.inner.pg.command("psql");
            cmd.args(["-X", "-q", "-h"])
                .arg(&srv.socket_dir)
                .arg("-p")
                .arg(srv.port.to_string())
                .args(["-U", "postgres", "-d", "postgres", "-f"])
                .arg(&dump);
            let restored = self.inner.pg.run(cmd, "psql (restoring the schema)").await;
            srv.stop(StopMode::Fast).await?;
            restored.map(|_| ())
        }
        .await;
        let _ = self.delete_dir(&work).await;
        let _ = fs::remove_dir_all(&dumpdir);
        r
    }

    async fn existing_timeline(
        &self,
        kind: &str,
        identity: &str,
        object_id: &str,
        req: &CreateTimeline,
    ) -> Result<Timeline, StorageError> {
        if kind != "timeline" || identity != identity_timeline(&req.source) {
            return Err(StorageError::Conflict {
                message: format!(
                    "key {} was already used for a different request ({kind} {object_id})",
                    req.key
                ),
            });
        }
        let id = TimelineId::new(object_id)?;
        let row = self
            .inner
            .meta
            .timeline(&id)?
            .ok_or_else(|| StorageError::not_found("timeline", &id))?;
        let own = if row.state == State::Creating && row.interrupted {
            self.try_acquire(format!("t:{id}"))
        } else {
            None
        };
        if let Some(guard_self) = own {
            // Resume with the caller's secrets.
            let (plan, lineage, guard) = self.plan_timeline(req).await?;
            self.inner.meta.set_timeline_progress(
                &id,
                Some(Progress {
                    step: "resuming".into(),
                    percent: None,
                }),
            )?;
            self.inner.meta.mark_resumed_t(&id)?;
            self.remove_timeline_dirs(&id).await;
            let guard = self.join(guard, guard_self.keys.clone());
            drop(guard_self);
            self.spawn_timeline(id.clone(), plan, lineage, guard);
        }
        self.get_timeline(&id).await
    }

    async fn timeline_view(&self, row: TimelineRow) -> Result<Timeline, StorageError> {
        let id = row.id.clone();
        let mut t = Timeline {
            id: id.clone(),
            key: row.key.clone(),
            label: row.label.clone(),
            state: row.state,
            error: row.error.clone(),
            progress: row.progress.clone(),
            lineage: row.lineage.clone(),
            created_at: row.created_at,
            data_path: format!("timelines/{id}/pgdata"),
            wal_archive_path: format!("wal/{id}"),
            pg_major: row.pg_major,
            lsn: None,
            logical_size_bytes: 0,
            exclusive_bytes: None,
            restore_window: None,
        };
        if row.state == State::Ready {
            let (logical, excl) = self
                .measured(
                    format!("t:{id}"),
                    self.data_dir(&id),
                    vec![self.tl_dir(&id).join("base")],
                )
                .await?;
            t.logical_size_bytes = logical;
            t.exclusive_bytes = excl;
            t.restore_window = self.reported_window(&row).await?;
            t.lsn = t.restore_window.as_ref().map(|w| w.newest.lsn);
        }
        Ok(t)
    }

    // ------------------------------------------------------------- snapshots

    async fn plan_snapshot(&self, req: &CreateSnapshot) -> Result<(SnPlan, InUse), StorageError> {
        let guard = self.acquire(vec![format!("t:{}", req.timeline)]);
        let row = self.ready_timeline(&req.timeline)?;
        let conn = req.source_connection.clone();
        if req.point == Point::Head {
            self.check_copyable(&req.timeline, conn.as_ref())?;
            return Ok((SnPlan::Head { conn }, guard));
        }
        let (base, target) = self.resolve_target(&row, &req.point, conn.as_ref()).await?;
        let guard = self.join(guard, base_keys(&base));
        Ok((SnPlan::Replay { base, target }, guard))
    }

    fn spawn_snapshot(&self, id: SnapshotId, timeline: TimelineId, plan: SnPlan, guard: InUse) {
        let me = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            match me.build_snapshot(&id, &timeline, plan).await {
                Ok(()) => tracing::info!(snapshot = %id, "snapshot ready"),
                Err(e) => {
                    tracing::warn!(snapshot = %id, error = %e, "creating a snapshot failed");
                    let _ = me.delete_dir(&me.snap_dir(&id).join("pgdata")).await;
                    let _ = fs::remove_dir_all(me.snap_dir(&id));
                    let _ =
                        me.inner
                            .meta
                            .set_snapshot_state(&id, State::Failed, Some(&e.to_string()));
                }
            }
        });
    }

    async fn build_snapshot(
        &self,
        id: &SnapshotId,
        timeline: &TimelineId,
        plan: SnPlan,
    ) -> Result<(), StorageError> {
        let dir = self.snap_dir(id);
        fs::create_dir_all(&dir).map_err(|e| io_err("creating the snapshot directory", e))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(|e| io_err("chmod", e))?;
        let data = dir.join("pgdata");
        let progress = |s: &str| {
            crash_point(s);
            let _ = self.inner.meta.set_snapshot_progress(
                id,
                Some(Progress {
                    step: s.to_string(),
                    percent: None,
                }),
            );
        };
        let lsn = match plan {
            SnPlan::Head { conn } => {
                progress("copying the source");
                let (cons, lsn) = self
                    .copy_head(
                        timeline,
                        &data,
                        conn.as_ref(),
                        true,
                        true,
                        &format!("pgbranch-{id}"),
                    )
                    .await?;
                if let (Consistency::Clean | Consistency::Backup, Some(l)) = (cons, lsn) {
                    self.inner.meta.add_base(&BaseRow {
                        path: format!("snapshots/{id}/pgdata"),
                        timeline: timeline.clone(),
                        snapshot: Some(id.clone()),
                        lsn: l,
                        time: jiff::Timestamp::now(),
                        in_recovery: false,
                    })?;
                }
                lsn
            }
            SnPlan::Replay { base, target } => {
                let work = self.tmp().join(format!("{id}-replay"));
                let log = dir.join("engine.log");
                let r = async {
                    progress("cloning the base");
                    self.clone_dir(&self.inner.root.join(&base.path), &work, false)
                        .await?;
                    self.fixups(&work, None)?;
                    if target > base.lsn || base.in_recovery {
                        progress("replaying WAL");
                        let report = |pct: Option<u8>| {
                            let _ = self.inner.meta.set_snapshot_progress(
                                id,
                                Some(Progress {
                                    step: "replaying WAL".into(),
                                    percent: pct,
                                }),
                            );
                        };
                        self.replay(&work, &base, target, None, &log, &report)
                            .await?;
                    } else {
                        self.normalize(&work, None, &log).await?;
                    }
                    progress("storing the snapshot");
                    self.clone_dir(&work, &data, true).await
                }
                .await;
                let _ = self.delete_dir(&work).await;
                r?;
                Some(target)
            }
        };
        self.inner
            .meta
            .set_snapshot_done(id, lsn, pg_major_of(&data))?;
        Ok(())
    }

    async fn snapshot_view(&self, row: SnapshotRow) -> Result<Snapshot, StorageError> {
        let mut s = Snapshot {
            id: row.id.clone(),
            key: row.key.clone(),
            label: row.label.clone(),
            timeline: row.timeline.clone(),
            point: row.point,
            state: row.state,
            error: row.error.clone(),
            progress: row.progress.clone(),
            lsn: row.lsn,
            created_at: row.created_at,
            pg_major: row.pg_major,
            size_bytes: 0,
            exclusive_bytes: None,
        };
        if row.state == State::Ready {
            let data = self.snap_dir(&row.id).join("pgdata");
            let (size, excl) = self.measured(format!("s:{}", row.id), data, vec![]).await?;
            s.size_bytes = size;
            s.exclusive_bytes = excl;
        }
        Ok(s)
    }

    // -------------------------------------------------------------- recovery

    async fn recover(&self) -> Result<(), StorageError> {
        self.recover_replicas().await?;
        for t in self.inner.meta.timelines()? {
            match t.state {
                State::Deleting => {
                    self.remove_timeline_dirs(&t.id).await;
                    self.inner.meta.delete_timeline(&t.id)?;
                }
                State::Creating => {
                    self.remove_timeline_dirs(&t.id).await;
                    let stored: Option<StoredRequest> = serde_json::from_str(&t.request).ok();
                    let resumable = stored
                        .as_ref()
                        .map(|s| !s.had_password && !s.had_connection && s.source.is_some())
                        .unwrap_or(false);
                    let source = stored.and_then(|s| s.source);
                    match (resumable, source) {
                        (true, Some(source)) => {
                            let req = CreateTimeline {
                                key: t.key.clone(),
                                source,
                                source_connection: None,
                                label: t.label.clone(),
                            };
                            match self.plan_timeline(&req).await {
                                Ok((plan, lineage, guard)) => {
                                    tracing::info!(timeline = %t.id, "resuming an interrupted create");
                                    let guard = self.join(guard, vec![format!("t:{}", t.id)]);
                                    self.spawn_timeline(t.id.clone(), plan, lineage, guard);
                                }
                                Err(e) => {
                                    self.inner.meta.set_timeline_state(
                                        &t.id,
                                        State::Failed,
                                        Some(&e.to_string()),
                                    )?;
                                }
                            }
                        }
                        _ => self.inner.meta.mark_timeline_interrupted(
                            &t.id,
                            "interrupted by a restart: call create again with the same key to resume",
                        )?,
                    }
                }
                _ => {}
            }
        }
        for s in self.inner.meta.snapshots()? {
            match s.state {
                State::Deleting => {
                    let _ = self.delete_dir(&self.snap_dir(&s.id).join("pgdata")).await;
                    let _ = fs::remove_dir_all(self.snap_dir(&s.id));
                    self.inner.meta.delete_snapshot(&s.id)?;
                }
                State::Creating => {
                    let _ = self.delete_dir(&self.snap_dir(&s.id).join("pgdata")).await;
                    let _ = fs::remove_dir_all(self.snap_dir(&s.id));
                    let stored: Option<StoredRequest> = serde_json::from_str(&s.request).ok();
                    if stored.map(|r| !r.had_connection).unwrap_or(false) {
                        let req = CreateSnapshot {
                            key: s.key.clone(),
                            timeline: s.timeline.clone(),
                            point: s.point,
                            source_connection: None,
                            label: s.label.clone(),
                        };
                        match self.plan_snapshot(&req).await {
                            Ok((plan, guard)) => {
                                self.spawn_snapshot(s.id.clone(), s.timeline.clone(), plan, guard)
                            }
                            Err(e) => self.inner.meta.set_snapshot_state(
                                &s.id,
                                State::Failed,
                                Some(&e.to_string()),
                            )?,
                        }
                    } else {
                        self.inner.meta.mark_snapshot_interrupted(
                            &s.id,
                            "interrupted by a restart: call create again with the same key to resume",
                        )?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The objects a replay from `base` reads: its timeline's archive and, for
/// a snapshot base, the snapshot.
fn base_keys(base: &BaseRow) -> Vec<String> {
    let mut keys = vec![format!("t:{}", base.timeline), bases::base_key(&base.path)];
    if let Some(s) = &base.snapshot {
        keys.push(format!("s:{s}"));
    }
    keys
}

/// Whether a point lies before the start of a window.
fn point_before(p: &Point, w: &RestoreWindow) -> bool {
    match p {
        Point::Head => false,
        Point::Lsn(l) => *l < w.oldest.lsn,
        Point::Timestamp(t) => w.oldest.time.is_some_and(|o| *t < o),
    }
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

/// Copies the WAL segments (from the backup's start segment on, when
/// known) and history files of `src` over those in `dst`.
/// Re-copies the WAL a backup needs from the source's `pg_wal`, then fills
/// from the source's archive every segment from the backup's start that
/// `pg_wal` no longer had: a checkpoint during the copy (another backup's,
/// or a timed one) may recycle a segment the copy still holds in an older,
/// shorter state, and replay would then end before the backup's end.
/// `pg_backup_stop(true)` has waited for those segments to be archived.
fn recopy_wal(
    src: &Path,
    dst: &Path,
    start_seg: Option<&str>,
    archive: Option<&Path>,
) -> std::io::Result<()> {
    let mut refreshed = std::collections::HashSet::new();
    for e in fs::read_dir(src)? {
        let e = match e {
            Ok(e) => e,
            Err(_) => continue,
        };
        let name = e.file_name();
        let n = name.to_string_lossy();
        let segment = n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit());
        let needed = match start_seg {
            Some(s) if s.len() == 24 && segment => n[8..] >= s[8..],
            _ => true,
        };
        let wanted = (segment && needed) || n.ends_with(".history");
        if !wanted {
            continue;
        }
        let target = dst.join(&name);
        match fs::copy(e.path(), &target) {
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        }
        refreshed.insert(n.to_string());
        if let Ok(m) = e.metadata() {
            let _ = std::os::unix::fs::lchown(&target, Some(m.uid()), Some(m.gid()));
            let _ = fs::set_permissions(&target, fs::Permissions::from_mode(m.mode() & 0o7777));
        }
    }
    let (Some(archive), Some(start)) = (archive, start_seg.filter(|s| s.len() == 24)) else {
        return Ok(());
    };
    let Ok(rd) = fs::read_dir(archive) else {
        return Ok(());
    };
    let owner = fs::metadata(dst).ok();
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        let segment = n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit());
        if !segment || n[..8] != start[..8] || n[8..] < start[8..] || refreshed.contains(&n) {
            continue;
        }
        let target = dst.join(&n);
        fs::copy(e.path(), &target)?;
        if let Some(m) = &owner {
            let _ = std::os::unix::fs::lchown(&target, Some(m.uid()), Some(m.gid()));
            let _ = fs::set_permissions(&target, fs::Permissions::from_mode(0o600));
        }
    }
    Ok(())
}

/// Adds o+x to the root and to its ancestors we own, so the run_as user can
/// reach the data directories.
fn make_traversable(root: &Path) -> Result<(), StorageError> {
    let me = nix::unistd::geteuid().as_raw();
    let mut p = Some(root);
    while let Some(dir) = p {
        if let Ok(m) = fs::metadata(dir) {
            if m.uid() == me && m.mode() & 0o001 == 0 {
                tracing::warn!(dir = %dir.display(), "adding o+x so the run_as user can reach the volume");
                fs::set_permissions(dir, fs::Permissions::from_mode((m.mode() & 0o7777) | 0o011))
                    .map_err(|e| io_err(&format!("making {} traversable", dir.display()), e))?;
            }
        }
        p = dir.parent();
    }
    Ok(())
}

#[async_trait]
impl Storage for Engine {
    async fn info(&self) -> Result<StorageInfo, StorageError> {
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
        })
    }

    async fn create_timeline(&self, req: CreateTimeline) -> Result<Timeline, StorageError> {
        if let Some((kind, identity, object_id)) = self.inner.meta.find_op(&req.key)? {
            return self
                .existing_timeline(&kind, &identity, &object_id, &req)
                .await;
        }
        let (plan, lineage, guard) = self.plan_timeline(&req).await?;
        let id = TimelineId::generate();
        let stored = StoredRequest {
            source: Some(stripped(&req.source)),
            had_password: matches!(
                req.source,
                Source::Empty {
                    superuser_password: Some(_)
                }
            ),
            had_connection: req.source_connection.is_some(),
        };
        let row = TimelineRow {
            id: id.clone(),
            key: req.key.clone(),
            label: req.label.clone(),
            state: State::Creating,
            error: None,
            progress: Some(Progress {
                step: "queued".into(),
                percent: None,
            }),
            lineage: lineage.clone(),
            request: serde_json::to_string(&stored).map_err(|e| io_err("encoding a request", e))?,
            created_at: jiff::Timestamp::now(),
            pg_major: self.inner.pg.major,
            pg_tli: None,
            wal_seg_size: None,
            interrupted: false,
        };
        match self
            .inner
            .meta
            .insert_timeline(&identity_timeline(&req.source), &row)?
        {
            Recorded::New => {
                tracing::info!(timeline = %id, key = %req.key, source = %identity_timeline(&req.source), "creating a timeline");
                let guard = self.join(guard, vec![format!("t:{id}")]);
                self.spawn_timeline(id.clone(), plan, lineage, guard);
                self.get_timeline(&id).await
            }
            Recorded::Existing {
                kind,
                identity,
                object_id,
            } => {
                drop(guard);
                self.existing_timeline(&kind, &identity, &object_id, &req)
                    .await
            }
        }
    }

    async fn get_timeline(&self, id: &TimelineId) -> Result<Timeline, StorageError> {
        let row = self
            .inner
            .meta
            .timeline(id)?
            .ok_or_else(|| StorageError::not_found("timeline", id))?;
        self.timeline_view(row).await
    }

    async fn list_timelines(&self) -> Result<Vec<Timeline>, StorageError> {
        let mut out = Vec::new();
        for row in self.inner.meta.timelines()? {
            out.push(self.timeline_view(row).await?);
        }
        Ok(out)
    }

    async fn delete_timeline(&self, id: &TimelineId) -> Result<(), StorageError> {
        let Some(row) = self.inner.meta.timeline(id)? else {
            return Ok(());
        };
        if row.state == State::Creating && (!row.interrupted || self.in_use(&format!("t:{id}"))) {
            return Err(StorageError::Busy {
                message: format!("timeline {id} is still being created"),
            });
        }
        if pid_alive(&self.data_dir(id)) {
            return Err(StorageError::Busy {
                message: format!("timeline {id} has a running postgres; stop its compute first"),
            });
        }
        self.check_replicas_stopped(id)?;
        self.inner
            .meta
            .set_timeline_state(id, State::Deleting, None)?;
        if self.in_use(&format!("t:{id}")) {
            self.inner
                .meta
                .set_timeline_state(id, row.state, row.error.as_deref())?;
            return Err(StorageError::Busy {
                message: format!("timeline {id} is the source of an operation in progress"),
            });
        }
        tracing::info!(timeline = %id, "deleting a timeline");
        self.forget_sizes(&format!("t:{id}"));
        self.remove_replicas(id).await?;
        self.remove_timeline_dirs(id).await;
        self.inner.meta.delete_timeline(id)
    }

    async fn create_snapshot(&self, req: CreateSnapshot) -> Result<Snapshot, StorageError> {
        let identity = format!("snapshot:{}:{}", req.timeline, point_key(&req.point));
        let existing =
            |kind: &str, ident: &str, object_id: &str| -> Result<SnapshotId, StorageError> {
                if kind != "snapshot" || ident != identity {
                    return Err(StorageError::Conflict {
                        message: format!(
                            "key {} was already used for a different request ({kind} {object_id})",
                            req.key
                        ),
                    });
                }
                SnapshotId::new(object_id)
            };
        if let Some((kind, ident, object_id)) = self.inner.meta.find_op(&req.key)? {
            let id = existing(&kind, &ident, &object_id)?;
            self.resume_snapshot_if_interrupted(&id, &req).await?;
            return self.get_snapshot(&id).await;
        }
        let (plan, guard) = self.plan_snapshot(&req).await?;
        let id = SnapshotId::generate();
        let stored = StoredRequest {
            source: None,
            had_password: false,
            had_connection: req.source_connection.is_some(),
        };
        let row = SnapshotRow {
            id: id.clone(),
            key: req.key.clone(),
            label: req.label.clone(),
            timeline: req.timeline.clone(),
            point: req.point,
            state: State::Creating,
            error: None,
            progress: Some(Progress {
                step: "queued".into(),
                percent: None,
            }),
            lsn: None,
            created_at: jiff::Timestamp::now(),
            pg_major: self.inner.pg.major,
            request: serde_json::to_string(&stored).map_err(|e| io_err("encoding a request", e))?,
            interrupted: false,
        };
        match self.inner.meta.insert_snapshot(&identity, &row)? {
            Recorded::New => {
                tracing::info!(snapshot = %id, key = %req.key, timeline = %req.timeline, point = %req.point, "creating a snapshot");
                let guard = self.join(guard, vec![format!("s:{id}")]);
                self.spawn_snapshot(id.clone(), req.timeline.clone(), plan, guard);
                self.get_snapshot(&id).await
            }
            Recorded::Existing {
                kind,
                identity: ident,
                object_id,
            } => {
                drop(guard);
                let id = existing(&kind, &ident, &object_id)?;
                self.get_snapshot(&id).await
            }
        }
    }

    async fn get_snapshot(&self, id: &SnapshotId) -> Result<Snapshot, StorageError> {
        let row = self
            .inner
            .meta
            .snapshot(id)?
            .ok_or_else(|| StorageError::not_found("snapshot", id))?;
        self.snapshot_view(row).await
    }

    async fn list_snapshots(&self) -> Result<Vec<Snapshot>, StorageError> {
        let mut out = Vec::new();
        for row in self.inner.meta.snapshots()? {
            out.push(self.snapshot_view(row).await?);
        }
        Ok(out)
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), StorageError> {
        let Some(row) = self.inner.meta.snapshot(id)? else {
            return Ok(());
        };
        if (row.state == State::Creating && !row.interrupted) || self.in_use(&format!("s:{id}")) {
            return Err(StorageError::Busy {
                message: format!("snapshot {id} is being created or copied"),
            });
        }
        self.inner
            .meta
            .set_snapshot_state(id, State::Deleting, None)?;
        if self.in_use(&format!("s:{id}")) {
            self.inner
                .meta
                .set_snapshot_state(id, row.state, row.error.as_deref())?;
            return Err(StorageError::Busy {
                message: format!("snapshot {id} is the source of an operation in progress"),
            });
        }
        tracing::info!(snapshot = %id, "deleting a snapshot");
        self.forget_sizes(&format!("s:{id}"));
        self.delete_dir(&self.snap_dir(id).join("pgdata")).await?;
        let _ = fs::remove_dir_all(self.snap_dir(id));
        self.inner.meta.delete_snapshot(id)
    }

    async fn resolve_point(
        &self,
        timeline: &TimelineId,
        timestamp: jiff::Timestamp,
    ) -> Result<Lsn, StorageError> {
        let row = self.ready_timeline(timeline)?;
        let (_, lsn) = self
            .resolve_target(&row, &Point::Timestamp(timestamp), None)
            .await?;
        Ok(lsn)
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
        self.delete_replica_impl(timeline, ordinal).await
    }
}

impl Engine {
    async fn resume_snapshot_if_interrupted(
        &self,
        id: &SnapshotId,
        req: &CreateSnapshot,
    ) -> Result<(), StorageError> {
        let Some(row) = self.inner.meta.snapshot(id)? else {
            return Ok(());
        };
        let own = if row.state == State::Creating && row.interrupted {
            self.try_acquire(format!("s:{id}"))
        } else {
            None
        };
        if let Some(guard_self) = own {
            let (plan, guard) = self.plan_snapshot(req).await?;
            self.inner.meta.mark_resumed_s(id)?;
            let guard = self.join(guard, guard_self.keys.clone());
            drop(guard_self);
            self.spawn_snapshot(id.clone(), row.timeline.clone(), plan, guard);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_segment_numbers() {
        let seg = 16 * 1024 * 1024;
        assert_eq!(segno_of("000000010000000000000001", seg), Some(1));
        assert_eq!(segno_of("0000000200000001000000FF", seg), Some(256 + 255));
        assert_eq!(segno_of("000000010000000000000001.partial", seg), None);
        assert_eq!(segno_of("00000002.history", seg), None);
    }

    #[test]
    fn archive_command_is_durable_and_never_overwrites() {
        let id = TimelineId::new("abc").unwrap();
        let c = Engine::archive_command(Path::new("/vol"), &id);
        assert!(c.starts_with("d=\"/vol/wal/abc\"; f=\"$d/%f\";"));
        assert!(
            c.contains("cmp -s"),
            "an existing segment must be compared, not replaced"
        );
        assert!(c.contains("sync \"$f.tmp\"") && c.contains("mv \"$f.tmp\" \"$f\""));
        assert!(!c.contains('\''), "must embed in a single-quoted setting");
    }

    #[test]
    fn archive_command_fits_postgres_limit_with_long_roots() {
        // PostgreSQL truncates the expanded command at 1024 bytes; a long
        // volume path must not push it over (it did when the path was
        // repeated in every clause).
        let id = TimelineId::new("a".repeat(63)).unwrap();
        let root = PathBuf::from(format!("/{}", "r".repeat(400)));
        let c = Engine::archive_command(&root, &id);
        let expanded = c
            .replace("%f", "000000010000000000000001.partial")
            .replace("%p", "pg_wal/000000010000000000000001.partial");
        assert!(expanded.len() < 1024, "{} bytes", expanded.len());
        assert_eq!(c.matches(&*root.to_string_lossy()).count(), 1);
    }

    #[test]
    fn request_identity_ignores_secrets_but_not_the_source() {
        let a = Source::Empty {
            superuser_password: Some(Password("one".into())),
        };
        let b = Source::Empty {
            superuser_password: Some(Password("two".into())),
        };
        assert_eq!(identity_timeline(&a), identity_timeline(&b));
        assert!(!identity_timeline(&a).contains("one"));
        let t = TimelineId::new("t").unwrap();
        let head = Source::Timeline {
            timeline: t.clone(),
            point: Point::Head,
        };
        let lsn = Source::Timeline {
            timeline: t,
            point: Point::Lsn(Lsn(5)),
        };
        assert_ne!(identity_timeline(&head), identity_timeline(&lsn));
    }

    #[test]
    fn points_before_a_window() {
        let w = RestoreWindow {
            oldest: PointInfo {
                lsn: Lsn(100),
                time: Some(jiff::Timestamp::from_second(1000).unwrap()),
            },
            newest: PointInfo {
                lsn: Lsn(200),
                time: Some(jiff::Timestamp::from_second(2000).unwrap()),
            },
        };
        assert!(point_before(&Point::Lsn(Lsn(99)), &w));
        assert!(!point_before(&Point::Lsn(Lsn(100)), &w));
        assert!(point_before(
            &Point::Timestamp(jiff::Timestamp::from_second(999).unwrap()),
            &w
        ));
        assert!(!point_before(&Point::Head, &w));
    }
}
