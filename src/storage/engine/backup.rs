//! Backups of timelines to an object store (issue #16), with barman-cloud.
//!
//! The engine, which holds every timeline's own WAL archive
//! (`wal/<id>/`) and its copy-on-write bases, does the uploads; computes
//! stay stock PostgreSQL and keep archiving into the volume as before.
//!
//! * **Continuous archiving** ([`Engine::enable_backup`]): a task per
//!   backed-up timeline uploads every file of its local archive
//!   (segments, `.history`, `.backup`) in name order with
//!   `barman-cloud-wal-archive --gzip`, to the barman server
//!   [`BackupTarget::server`] (the branch's UID) under the destination's
//!   prefix. What is uploaded is recorded after each file in
//!   `backups/<id>.json` (written to a temporary name, fsynced, renamed,
//!   directory fsynced), so a restarted engine resumes where it was and
//!   never takes a file as uploaded before the store confirmed it (an S3
//!   PUT is atomic: a killed upload leaves no object). A failing store
//!   leaves the WAL waiting in the local archive; the task retries with a
//!   backoff and catches up. The first upload to a server checks with
//!   `barman-cloud-check-wal-archive` that its archive is empty: an archive
//!   is never shared (two timelines, sibling branches, each have their
//!   own server).
//! * **Base backups** ([`Engine::base_backup`]), from the engine's copies,
//!   never from the compute: the timeline's newest base is cloned, started
//!   as a private hot standby (Unix socket only, no archiving) that replays
//!   the timeline's local archive up to its newest record, and
//!   `barman-cloud-backup` backs that standby up (a backup from a standby:
//!   its end point is WAL that is already archived). The clone is then
//!   dropped.
//! * **Retention** ([`Engine::apply_retention`]): barman's `REDUNDANCY`
//!   policy keeps the newest base backups and deletes older ones with the
//!   WAL only they needed.
//! * **Restore** (`backup_restore.rs`, [`Engine::restore_from_backup`]): the newest complete
//!   base backup at or before the point (by its end LSN or end time) is
//!   downloaded with `barman-cloud-restore`, then a private server replays
//!   WAL fetched by `barman-cloud-wal-restore` up to the point
//!   (`recovery_target_lsn` or `recovery_target_time`, inclusive,
//!   `recovery_target_timeline = 'current'`) and promotes; the result is a
//!   cleanly stopped data directory. It needs nothing but the bucket: this
//!   is the way back after losing the volume.
//!
//! Credentials stay in memory (the caller passes them again after a
//! restart) and reach the tools and servers only through their
//! environment.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::locks::base_keys;
use super::pg::{StartOpts, StopMode};
use super::{io_err, Engine};
use crate::backup::barman::{self, BackupEntry, Barman};
use crate::backup::{BackupError, ObjectStore};
use crate::storage::backups::retention_keep;
pub use crate::storage::backups::{BackupStatus, BackupTarget, BaseBackup, BaseBackupRequest};
use crate::storage::{Lsn, StorageError, TimelineId};

/// What is uploaded, as recorded on the volume.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Recorded {
    server: String,
    /// Every segment up to this name is uploaded.
    #[serde(default)]
    segments_upto: Option<String>,
    /// Uploaded `.history` and `.backup` files.
    #[serde(default)]
    others: BTreeSet<String>,
}

/// The backed-up timelines of an engine.
#[derive(Default)]
pub(super) struct Backups {
    running: Mutex<HashMap<TimelineId, Arc<Archiving>>>,
}

struct Archiving {
    target: BackupTarget,
    barman: Barman,
    status: Mutex<BackupStatus>,
    wake: tokio::sync::Notify,
    /// One upload pass at a time.
    pass: tokio::sync::Mutex<()>,
    stop: tokio_util::sync::CancellationToken,
}

pub(super) fn backup_err(e: BackupError) -> StorageError {
    if matches!(
        e.failure,
        crate::backup::Failure::EndpointUnreachable | crate::backup::Failure::ObjectStoreError
    ) {
        StorageError::Unavailable {
            message: e.to_string(),
        }
    } else {
        StorageError::invalid(e.to_string())
    }
}

/// A complete backup as barman lists it.
fn listed(b: &BackupEntry) -> BaseBackup {
    BaseBackup {
        backup_id: b.backup_id.clone(),
        end_lsn: b.end_lsn(),
        ended_at: b.ended(),
        duration: Duration::ZERO,
        size_bytes: b.size,
    }
}

/// A storage error of a backup step as a backup failure: its reason when
/// the message starts with one, else `BackupToolFailed`.
fn as_backup_error(e: &StorageError) -> BackupError {
    let text = e.to_string();
    let failure =
        crate::backup::Failure::named_in(&text).unwrap_or(crate::backup::Failure::ToolFailed);
    BackupError::new(failure, text)
}

/// The bytes of the regular files under `dir` (symlinks not followed).
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => {
                    total += e.metadata().map(|m| m.len()).unwrap_or(0);
                }
                _ => {}
            }
        }
    }
    total
}

/// Whether a local archive file is one to upload.
fn is_wal_file(name: &str) -> bool {
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    (name.len() == 24 && hex(name))
        || (name.len() == 16 && name.ends_with(".history") && hex(&name[..8]))
        || (name.ends_with(".backup") && name.len() > 24 && hex(&name[..24]))
}

fn is_segment(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Recorded {
    fn uploaded(&self, name: &str) -> bool {
        if is_segment(name) {
            self.segments_upto.as_deref().is_some_and(|u| name <= u)
        } else {
            self.others.contains(name)
        }
    }

    fn mark(&mut self, name: &str) {
        if is_segment(name) {
            if self.segments_upto.as_deref().is_none_or(|u| name > u) {
                self.segments_upto = Some(name.to_string());
            }
        } else {
            self.others.insert(name.to_string());
        }
    }
}

/// Writes `bytes` to `path` durably: temporary file, fsync, rename, fsync
/// of the directory.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

impl Engine {
    fn backups_file(&self, id: &TimelineId) -> PathBuf {
        self.inner
            .root
            .join("backups")
            .join(format!("{}.json", id.as_str()))
    }

    pub(super) fn barman_for(&self, store: &ObjectStore) -> Result<Barman, StorageError> {
        let run_as = self.inner.pg.user.as_ref().map(|u| barman::RunAs {
            uid: u.uid,
            gid: u.gid,
        });
        let conf = std::env::temp_dir().join(format!(
            "pgbranch-barman-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        Barman::new(store.clone(), run_as, &conf).map_err(backup_err)
    }

    fn read_recorded(&self, id: &TimelineId) -> Option<Recorded> {
        let text = fs::read_to_string(self.backups_file(id)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Starts (or retargets) continuous archiving of timeline `id` to
    /// `target`. The first time a server name is used its archive must be
    /// empty (`barman-cloud-check-wal-archive`); a timeline that archived
    /// to the same server before (this engine, before a restart) resumes.
    pub async fn enable_backup(
        &self,
        id: &TimelineId,
        target: BackupTarget,
    ) -> Result<(), StorageError> {
        target.validate()?;
        self.ready(id).await?;
        {
            let running =
                self.inner.backups.running.lock().map_err(|_| {
                    StorageError::internal("the backup registry's lock is poisoned")
                })?;
            if running.get(id).is_some_and(|a| a.target == target) {
                return Ok(());
            }
        }
        let barman = self.barman_for(&target.store)?;
        let recorded = self.read_recorded(id).filter(|r| r.server == target.server);
        if recorded.is_none() {
            if let Err(e) = barman.check_wal_archive(&target.server).await {
                barman.remove_config();
                return Err(backup_err(e));
            }
            let rec = Recorded {
                server: target.server.clone(),
                ..Default::default()
            };
            self.write_recorded(id, &rec).await?;
        }
        // A retarget of the same server (new credentials, say) keeps what
        // is known: the base backups and the last key, so none is repeated.
        let carried = self
            .archiving(id)
            .filter(|o| o.target.server == target.server)
            .and_then(|o| o.status.lock().ok().map(|s| s.clone()))
            .map(|s| BackupStatus {
                last_error: None,
                base_backup_running: false,
                ..s
            });
        let a = Arc::new(Archiving {
            status: Mutex::new(carried.unwrap_or_else(|| BackupStatus {
                server: target.server.clone(),
                ..Default::default()
            })),
            target,
            barman,
            wake: tokio::sync::Notify::new(),
            pass: tokio::sync::Mutex::new(()),
            stop: tokio_util::sync::CancellationToken::new(),
        });
        let old = self
            .inner
            .backups
            .running
            .lock()
            .map_err(|_| StorageError::internal("the backup registry's lock is poisoned"))?
            .insert(id.clone(), a.clone());
        if let Some(old) = old {
            old.stop.cancel();
            old.barman.remove_config();
        }
        // What the destination already holds (a restarted engine, a
        // retarget): the recoverable window starts at its oldest backup.
        tokio::spawn({
            let a = a.clone();
            async move {
                if let Ok(list) = a.barman.list_backups(&a.target.server).await {
                    let done: Vec<BaseBackup> =
                        list.iter().filter(|b| b.done()).map(listed).collect();
                    if let Ok(mut st) = a.status.lock() {
                        if st.last_base_backup.is_none() {
                            st.last_base_backup = done.last().cloned();
                        }
                        st.base_backups = done;
                    }
                }
            }
        });
        let me = self.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let wait = match me.upload_pass(&id, &a).await {
                    Ok(()) => {
                        failures = 0;
                        Duration::from_secs(1)
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        tracing::warn!(timeline = %id, error = %e, "archiving to the backup destination failed; the WAL waits in the local archive");
                        Duration::from_secs((1u64 << failures.min(5)).min(30))
                    }
                };
                tokio::select! {
                    () = a.stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                    () = a.wake.notified() => {}
                }
            }
        });
        Ok(())
    }

    /// Stops archiving timeline `id` (what is uploaded stays).
    pub fn disable_backup(&self, id: &TimelineId) {
        if let Ok(mut running) = self.inner.backups.running.lock() {
            if let Some(a) = running.remove(id) {
                a.stop.cancel();
                a.barman.remove_config();
            }
        }
    }

    /// Where timeline `id`'s backup stands (`None`: not backed up).
    pub fn backup_status(&self, id: &TimelineId) -> Option<BackupStatus> {
        let a = self.archiving(id)?;
        let st = a.status.lock().ok()?.clone();
        Some(st)
    }

    fn archiving(&self, id: &TimelineId) -> Option<Arc<Archiving>> {
        self.inner.backups.running.lock().ok()?.get(id).cloned()
    }

    /// Uploads everything archived locally now and returns the status (an
    /// error when the destination refused).
    pub async fn archive_now(&self, id: &TimelineId) -> Result<BackupStatus, StorageError> {
        let a = self
            .archiving(id)
            .ok_or_else(|| StorageError::invalid(format!("timeline {id} is not backed up")))?;
        self.upload_pass(id, &a).await?;
        Ok(a.status.lock().map(|s| s.clone()).unwrap_or_default())
    }

    async fn write_recorded(&self, id: &TimelineId, rec: &Recorded) -> Result<(), StorageError> {
        let path = self.backups_file(id);
        let bytes = serde_json::to_vec_pretty(rec).map_err(|e| io_err("serializing", e))?;
        self.blocking("recording uploaded WAL", move |_| {
            write_durably(&path, &bytes)
        })
        .await
    }

    /// One pass: uploads every local archive file not uploaded yet, in
    /// name order, recording each.
    async fn upload_pass(&self, id: &TimelineId, a: &Archiving) -> Result<(), StorageError> {
        let _pass = a.pass.lock().await;
        let dir = self.wal_dir(id);
        let mut rec = self.read_recorded(id).unwrap_or_else(|| Recorded {
            server: a.target.server.clone(),
            ..Default::default()
        });
        let mut files: Vec<(String, Option<jiff::Timestamp>)> = self
            .blocking("listing the WAL archive", {
                let dir = dir.clone();
                move |_| {
                    Ok(fs::read_dir(&dir)
                        .map(|rd| {
                            rd.flatten()
                                .map(|e| {
                                    let name = e.file_name().to_string_lossy().to_string();
                                    let mtime = e
                                        .metadata()
                                        .and_then(|m| m.modified())
                                        .ok()
                                        .and_then(|t| jiff::Timestamp::try_from(t).ok());
                                    (name, mtime)
                                })
                                .filter(|(n, _)| is_wal_file(n))
                                .collect::<Vec<_>>()
                        })
                        .unwrap_or_default())
                }
            })
            .await?;
        files.sort();
        files.retain(|(n, _)| !rec.uploaded(n));
        let names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
        let set_pending = |i: usize| {
            if let Ok(mut st) = a.status.lock() {
                st.pending = files.len() - i;
                st.oldest_pending_since = files.get(i).and_then(|(_, t)| *t);
            }
        };
        set_pending(0);
        for (i, name) in names.iter().enumerate() {
            if a.stop.is_cancelled() {
                break;
            }
            if let Err(e) = a
                .barman
                .wal_archive(&a.target.server, &dir.join(name))
                .await
            {
                if let Ok(mut st) = a.status.lock() {
                    st.last_error = Some(e.clone());
                }
                return Err(backup_err(e));
            }
            super::crash_point("uploaded a WAL file");
            rec.mark(name);
            self.write_recorded(id, &rec).await?;
            if let Ok(mut st) = a.status.lock() {
                st.last_archived_wal = Some(name.clone());
                st.last_archived_at = Some(jiff::Timestamp::now());
                if is_segment(name) {
                    st.last_segment_closed_at = files[i].1;
                }
                st.last_error = None;
            }
            set_pending(i + 1);
        }
        if let Ok(mut st) = a.status.lock() {
            if names.is_empty() {
                st.last_error = None;
            }
        }
        Ok(())
    }

    /// Starts a base backup of timeline `id` in the background, then the
    /// request's retention; idempotent by `req.key` (a request with the key
    /// of the running or last base backup, or while one runs, only returns
    /// the status). The outcome is in the status (`base_backup_running`,
    /// `last_base_backup`, `base_backup_error`).
    pub fn request_base_backup(
        &self,
        id: &TimelineId,
        req: BaseBackupRequest,
    ) -> Result<BackupStatus, StorageError> {
        let a = self
            .archiving(id)
            .ok_or_else(|| StorageError::invalid(format!("timeline {id} is not backed up")))?;
        let status = {
            let mut st = a
                .status
                .lock()
                .map_err(|_| StorageError::internal("a backup status lock is poisoned"))?;
            if st.base_backup_running || st.base_backup_key.as_deref() == Some(req.key.as_str()) {
                return Ok(st.clone());
            }
            st.base_backup_running = true;
            st.base_backup_key = Some(req.key.clone());
            st.clone()
        };
        tracing::info!(timeline = %id, key = %req.key, "base backup requested");
        let me = self.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let r = match me.base_backup(&id).await {
                Ok(b) => {
                    tracing::info!(timeline = %id, backup = %b.backup_id, took_ms = b.duration.as_millis() as u64, "base backup taken");
                    me.retention_by(&id, &req).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = &r {
                tracing::warn!(timeline = %id, error = %e, "base backup failed");
            }
            if let Ok(mut st) = a.status.lock() {
                st.base_backup_running = false;
                st.base_backup_error = r.err().map(|e| as_backup_error(&e));
            }
        });
        Ok(status)
    }

    /// The retention of a base backup request (count and age).
    async fn retention_by(
        &self,
        id: &TimelineId,
        req: &BaseBackupRequest,
    ) -> Result<(), StorageError> {
        let a = self
            .archiving(id)
            .ok_or_else(|| StorageError::invalid(format!("timeline {id} is not backed up")))?;
        let list = a
            .barman
            .list_backups(&a.target.server)
            .await
            .map_err(backup_err)?;
        let ended: Vec<_> = list
            .iter()
            .filter(|b| b.done())
            .map(|b| b.ended())
            .collect();
        let keep = retention_keep(&ended, req.keep_count, req.max_age, jiff::Timestamp::now());
        if let Some(keep) = keep.filter(|k| usize::try_from(*k).unwrap_or(usize::MAX) < ended.len())
        {
            self.apply_retention(id, keep).await?;
        }
        Ok(())
    }

    /// Keeps the newest `keep` (at least 1) base backups of timeline `id` in
    /// its destination and deletes the older ones with the WAL only they
    /// needed; returns the backups kept, oldest first. Points before the
    /// oldest kept backup's end are no longer recoverable.
    pub async fn apply_retention(
        &self,
        id: &TimelineId,
        keep: u32,
    ) -> Result<Vec<BaseBackup>, StorageError> {
        let a = self
            .archiving(id)
            .ok_or_else(|| StorageError::invalid(format!("timeline {id} is not backed up")))?;
        a.barman
            .delete_beyond(&a.target.server, keep)
            .await
            .map_err(backup_err)?;
        let list = a
            .barman
            .list_backups(&a.target.server)
            .await
            .map_err(backup_err)?;
        let kept: Vec<BaseBackup> = list.iter().filter(|b| b.done()).map(listed).collect();
        if let Ok(mut st) = a.status.lock() {
            st.base_backups = kept.clone();
        }
        Ok(kept)
    }

    /// Takes a base backup of timeline `id` into its destination from a
    /// copy of its newest base (see the module docs), never touching the
    /// compute.
    pub async fn base_backup(&self, id: &TimelineId) -> Result<BaseBackup, StorageError> {
        let started = Instant::now();
        let a = self
            .archiving(id)
            .ok_or_else(|| StorageError::invalid(format!("timeline {id} is not backed up")))?;
        let t = self.ready(id).await?;
        // The standby replays up to the newest archived record.
        self.index_archive(&t).await?;
        let target = self.inner.meta.wal_index(id).await?.last_lsn;
        let bases = self.inner.meta.bases(id).await?;
        let base = bases
            .iter()
            .max_by_key(|b| b.lsn)
            .cloned()
            .ok_or_else(|| StorageError::internal(format!("timeline {id} has no base")))?;
        let _held = self.acquire(base_keys(&base));
        let work = self.tmp().join(format!(
            "backup-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        self.clone_dir(&self.inner.root.join(&base.path), &work, false)
            .await?;
        let r = self.back_up_copy(id, &a, &work, target).await;
        // What was backed up (barman's list does not say): the copy's bytes.
        let size = self
            .blocking("measuring a base backup", {
                let work = work.clone();
                move |_| Ok(tree_size(&work))
            })
            .await
            .ok();
        if let Err(e) = self.delete_dir(&work).await {
            tracing::warn!(timeline = %id, error = %e, "removing a base backup's work copy failed");
        }
        let (mut b, done) = r?;
        b.duration = started.elapsed();
        b.size_bytes = b.size_bytes.or(size);
        if let Ok(mut st) = a.status.lock() {
            // Together: a reader never sees the new backup listed without
            // its size and duration.
            st.last_base_backup = Some(b.clone());
            st.base_backups = done;
        }
        // Ship the WAL the backup ends in without waiting for the next pass.
        a.wake.notify_one();
        Ok(b)
    }

    async fn back_up_copy(
        &self,
        id: &TimelineId,
        a: &Archiving,
        work: &Path,
        target: Option<Lsn>,
    ) -> Result<(BaseBackup, Vec<BaseBackup>), StorageError> {
        for f in [
            "postmaster.pid",
            "recovery.signal",
            "pgbranch.recovery.conf",
        ] {
            let _ = fs::remove_file(work.join(f));
        }
        self.inner.pg.write_file(&work.join("standby.signal"), "")?;
        self.inner.pg.chown(work)?;
        fs::set_permissions(work, fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err("chmod", e))?;
        let mut settings = self.local_settings(None);
        settings.extend([
            ("hot_standby".to_string(), "on".to_string()),
            (
                "restore_command".to_string(),
                format!("cp \"{}/%f\" \"%p\"", self.wal_dir(id).display()),
            ),
            (
                "recovery_target_timeline".to_string(),
                "current".to_string(),
            ),
        ]);
        let log = self.tl_dir(id).join("backup.log");
        let server = self
            .inner
            .pg
            .start_standby(
                work,
                StartOpts {
                    port: 5432,
                    listen: "",
                    settings: &settings,
                    log: &log,
                    timeout: Duration::from_secs(3600),
                    tied: true,
                    replay_progress: None,
                },
                &[],
            )
            .await?;
        if let Some(target) = target {
            let client = server.connect("postgres").await?;
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                let replayed: Option<String> = client
                    .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
                    .await
                    .map_err(|e| io_err("reading the standby's replay position", e))?
                    .get(0);
                let replayed: Option<Lsn> = replayed.and_then(|s| s.parse().ok());
                if replayed.is_some_and(|r| r >= target) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(StorageError::Unavailable {
                        message: format!(
                            "the base backup's standby replayed only to {replayed:?} of {target} in 600 s"
                        ),
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        super::crash_point("uploading a base backup");
        let out = a
            .barman
            .backup(&a.target.server, &server.socket_dir, server.port)
            .await;
        let _ = server.stop(StopMode::Immediate).await;
        out.map_err(backup_err)?;
        let list = a
            .barman
            .list_backups(&a.target.server)
            .await
            .map_err(backup_err)?;
        let newest = list
            .iter()
            .filter(|b| b.done())
            .max_by(|x, y| x.backup_id.cmp(&y.backup_id))
            .ok_or_else(|| StorageError::internal("barman-cloud-backup reported no backup"))?;
        let done: Vec<BaseBackup> = list.iter().filter(|b| b.done()).map(listed).collect();
        Ok((listed(newest), done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_files_are_recognised_and_recorded_in_order() {
        assert!(is_wal_file("000000010000000000000003"));
        assert!(is_wal_file("00000002.history"));
        assert!(is_wal_file("000000010000000000000003.00000028.backup"));
        assert!(!is_wal_file("000000010000000000000003.tmp"));
        assert!(!is_wal_file("archive_status"));
        let mut r = Recorded::default();
        r.mark("000000010000000000000003");
        r.mark("000000010000000000000002");
        r.mark("00000002.history");
        assert!(r.uploaded("000000010000000000000001"));
        assert!(r.uploaded("000000010000000000000003"));
        assert!(!r.uploaded("000000010000000000000004"));
        assert!(r.uploaded("00000002.history"));
        assert!(!r.uploaded("00000003.history"));
    }
}
