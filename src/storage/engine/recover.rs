//! Opening a volume (checks, the run_as user, the volume lock, the driver
//! probe, the metadata store) and recovery at open: `tmp/` emptied,
//! unfinished deletes finished, unfinished creates re-run from their stored
//! request or marked interrupted (see "Idempotency and crash safety" in
//! [`super`]).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::driver::{self, Driver};
use super::layout::make_traversable;
use super::meta::{Meta, SnapshotRow, TimelineRow};
use super::pg::{self, PgEnv};
use super::{bases, blocking, io_err, Engine, EngineConfig, Inner, StoredRequest};
use crate::storage::{CreateSnapshot, CreateTimeline, DriverKind, State, StorageError};

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
        let (kind, driver, meta) = blocking("preparing the volume", {
            let (root, forced) = (root.clone(), cfg.driver);
            move || prepare_volume(&root, forced)
        })
        .await?;
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
                archive_wait: cfg
                    .archive_wait
                    .unwrap_or(super::archiver::DEFAULT_ARCHIVE_WAIT),
                backups: Default::default(),
            }),
        };
        tracing::info!(root = %engine.inner.root.display(), driver = %kind, pg_major = engine.inner.pg.major, "storage engine open");
        engine.recover().await?;
        engine.spawn_base_roller();
        Ok(engine)
    }

    /// Finishes or cleans up what operations left unfinished.
    async fn recover(&self) -> Result<(), StorageError> {
        self.recover_replicas().await?;
        for t in self.inner.meta.all::<TimelineRow>().await? {
            match t.state {
                State::Deleting => {
                    self.remove_timeline_dirs(&t.id).await;
                    self.inner.meta.delete_timeline(&t.id).await?;
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
                                    self.inner.meta.set_state(
                                        &t.id,
                                        State::Failed,
                                        Some(&e.to_string()),
                                    ).await?;
                                }
                            }
                        }
                        _ => self.inner.meta.mark_interrupted(
                            &t.id,
                            "interrupted by a restart: call create again with the same key to resume",
                        ).await?,
                    }
                }
                _ => {}
            }
        }
        for s in self.inner.meta.all::<SnapshotRow>().await? {
            match s.state {
                State::Deleting => {
                    let _ = self.remove_snapshot_dirs(&s.id).await;
                    self.inner.meta.delete_snapshot(&s.id).await?;
                }
                State::Creating => {
                    let _ = self.remove_snapshot_dirs(&s.id).await;
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
                            Err(e) => {
                                self.inner
                                    .meta
                                    .set_state(&s.id, State::Failed, Some(&e.to_string()))
                                    .await?
                            }
                        }
                    } else {
                        self.inner.meta.mark_interrupted(
                            &s.id,
                            "interrupted by a restart: call create again with the same key to resume",
                        ).await?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The volume's layout, its driver (probed, or the forced one checked),
/// `tmp/` emptied of the work directories of operations that did not
/// finish (stopping any server left running on one), and the metadata
/// store. Blocking: run through [`blocking`].
fn prepare_volume(
    root: &Path,
    forced: Option<DriverKind>,
) -> Result<(DriverKind, Box<dyn Driver>, Meta), StorageError> {
    for d in ["timelines", "snapshots", "wal", "tmp"] {
        let p = root.join(d);
        fs::create_dir_all(&p).map_err(|e| io_err("creating the volume layout", e))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
            .map_err(|e| io_err("chmod", e))?;
    }
    let tmp = root.join("tmp");
    let kind = driver::probe(root, &tmp, forced).map_err(StorageError::invalid)?;
    let driver = driver::make_driver(kind);
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
    Ok((kind, driver, meta))
}
