//! Rolling bases: keeps point-in-time copies fast as a timeline ages.
//!
//! A copy at a point is the newest base at or before it plus a replay of
//! the timeline's archive up to the point, so its time is the replay of
//! everything archived between the two. With only the base a timeline got
//! at creation, that grows without bound: a branch "one minute ago" of a
//! database loaded a week ago would replay the whole week.
//!
//! So the engine rolls bases forward in the background. When a timeline's
//! archive holds more than [`EngineConfig::base_roll_wal_bytes`] of WAL past
//! its newest base, it clones that base (copy-on-write), replays the archive
//! up to its newest record with `recovery_target_action = 'shutdown'`, and
//! keeps the result as a new base. The result is stopped *in recovery*
//! (`pg_controldata`: "shut down in recovery", consistent from its
//! "Minimum recovery ending location", which is the base's LSN): it stays
//! on the timeline's WAL history, so later copies replay on from it with
//! the same `restore_command` and a target past that LSN, exactly as from
//! the creation base. No connection to the timeline's compute is needed:
//! the archive is the only input.
//!
//! A rolled base restarts replay at the newest *checkpoint* before its
//! point: PostgreSQL makes restartpoints only where the primary logged a
//! checkpoint. So a copy from a rolled base replays at most the WAL since
//! the checkpoint before the base plus the WAL from the base to the point;
//! with PostgreSQL's defaults (`checkpoint_timeout` 5 min, `max_wal_size`
//! 1 GB) the first part is bounded too.
//!
//! A roll never holds up a delete of its timeline: it holds only the base
//! it clones (and that base's snapshot) while it replays, and the timeline
//! just for its last steps; a roll whose timeline went meanwhile is
//! dropped.
//!
//! The creation base (the oldest point of the window) and snapshot bases
//! are never pruned; of the rolled ones the newest
//! [`EngineConfig::base_roll_keep`] are kept. A pruned base's metadata goes
//! first; its directory is deleted by a later pass when no operation uses
//! it (an operation holds the `b:<path>` key from planning to the end of
//! its clone), and that same pass deletes directories a crash left without
//! metadata.
//!
//! [`EngineConfig::base_roll_wal_bytes`]: super::EngineConfig::base_roll_wal_bytes
//! [`EngineConfig::base_roll_keep`]: super::EngineConfig::base_roll_keep

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::locks::base_keys;
use super::meta::{BaseRow, TimelineRow};
use super::pg::StartOpts;
use super::{crash_point, io_err, Engine};
use crate::storage::{DriverKind, Lsn, State, StorageError, TimelineId};

/// Default WAL past the newest base that triggers a roll: about ten
/// seconds of replay on the machines we measured. Smaller makes past
/// points faster to reach but keeps the roller busier (a roll replays what
/// the compute wrote, so under a saturating write load it runs nearly all
/// the time, at low priority).
pub(super) const DEFAULT_ROLL_WAL_BYTES: u64 = 1024 * 1024 * 1024;
/// Default period of the roller's passes.
pub(super) const DEFAULT_ROLL_CHECK: Duration = Duration::from_secs(30);
/// Default number of rolled bases kept per timeline.
pub(super) const DEFAULT_ROLL_KEEP: usize = 8;

/// The roller's settings, resolved from the engine's configuration.
#[derive(Debug, Clone, Copy)]
pub(super) struct RollPolicy {
    pub every_wal_bytes: u64,
    pub check: Duration,
    pub keep: usize,
}

impl RollPolicy {
    /// `None` when bases are never rolled. The plain-copy driver does not
    /// roll unless asked: every base there is a full copy of the data.
    pub(super) fn resolve(
        kind: DriverKind,
        every: Option<u64>,
        check: Option<Duration>,
        keep: Option<usize>,
    ) -> Option<RollPolicy> {
        let every = match (every, kind) {
            (Some(0), _) => return None,
            (Some(b), _) => b,
            (None, DriverKind::Copy) => return None,
            (None, _) => DEFAULT_ROLL_WAL_BYTES,
        };
        Some(RollPolicy {
            every_wal_bytes: every,
            check: check
                .unwrap_or(DEFAULT_ROLL_CHECK)
                .max(Duration::from_millis(100)),
            keep: keep.unwrap_or(DEFAULT_ROLL_KEEP).max(1),
        })
    }
}

/// Whether a roll is due: enough WAL archived past the newest base.
pub(super) fn roll_due(newest_base: Lsn, newest_archived: Lsn, every: u64) -> bool {
    newest_archived.0 > newest_base.0 && newest_archived.0 - newest_base.0 >= every
}

/// The rolled bases to prune, oldest first, keeping the newest `keep`.
pub(super) fn to_prune(bases: &[BaseRow], keep: usize) -> Vec<BaseRow> {
    let mut rolled: Vec<&BaseRow> = bases
        .iter()
        .filter(|b| b.in_recovery && b.snapshot.is_none())
        .collect();
    rolled.sort_by_key(|b| b.lsn);
    let n = rolled.len().saturating_sub(keep);
    rolled.into_iter().take(n).cloned().collect()
}

/// The key an operation holds on a base it clones.
pub(super) fn base_key(path: &str) -> String {
    format!("b:{path}")
}

impl Engine {
    /// Starts the background roller (a no-op when the policy says never).
    /// It holds the engine only during a pass, so dropping the engine
    /// stops it.
    pub(super) fn spawn_base_roller(&self) {
        let Some(policy) = self.inner.roll else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(policy.check).await;
                let Some(inner) = weak.upgrade() else {
                    break;
                };
                Engine { inner }.roll_pass(policy, true).await;
            }
        });
    }

    /// Runs one roller pass now, as the background roller would (a no-op
    /// when bases are never rolled). For tools that want a steady state
    /// before measuring, e.g. `pgbranch-bench` after loading data.
    /// A roll the background roller has under way is waited for first.
    pub async fn roll_bases_now(&self) {
        let Some(policy) = self.inner.roll else {
            return;
        };
        let rolling = || {
            self.inner
                .in_use
                .lock()
                .map(|m| m.keys().any(|k| k.starts_with("roll:")))
                .unwrap_or(false)
        };
        while rolling() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.roll_pass(policy, false).await;
    }

    /// One pass over every ready timeline: roll where due, prune, collect.
    /// A `background` pass stops early once its engine's owner dropped it.
    async fn roll_pass(&self, policy: RollPolicy, background: bool) {
        let timelines = match self.inner.meta.all::<TimelineRow>().await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "base roller: reading timelines failed");
                return;
            }
        };
        for t in timelines.iter().filter(|t| t.state == State::Ready) {
            // The engine's owner dropped it: stop, so the volume is free.
            if background && Arc::strong_count(&self.inner) == 1 {
                return;
            }
            if let Err(e) = self.roll_if_due(t, policy).await {
                tracing::warn!(timeline = %t.id, error = %e, "rolling a base forward failed");
            }
            if let Err(e) = self.prune_bases(&t.id, policy.keep).await {
                tracing::warn!(timeline = %t.id, error = %e, "pruning rolled bases failed");
            }
        }
    }

    async fn roll_if_due(&self, t: &TimelineRow, policy: RollPolicy) -> Result<(), StorageError> {
        self.index_archive(t).await?;
        let Some(last) = self.inner.meta.wal_index(&t.id).await?.last_lsn else {
            return Ok(());
        };
        let bases = self.inner.meta.bases(&t.id).await?;
        let Some(newest) = bases.iter().max_by_key(|b| b.lsn).cloned() else {
            return Ok(());
        };
        if !roll_due(newest.lsn, last, policy.every_wal_bytes) {
            return Ok(());
        }
        let Some(guard) = self.try_acquire(format!("roll:{}", t.id)) else {
            return Ok(());
        };
        // The base (and its snapshot) stay while they are cloned; the
        // timeline itself is not held: deleting it must not wait for a
        // replay. A delete during the roll makes the roll fail or be
        // dropped at its last step (which holds the timeline briefly).
        let tl_key = format!("t:{}", t.id);
        let keys = base_keys(&newest)
            .into_iter()
            .filter(|k| *k != tl_key)
            .collect();
        let _guard = self.join(guard, keys);
        // Deleted meanwhile: leave it.
        if self.inner.meta.get(&t.id).await?.map(|r| r.state) != Some(State::Ready) {
            return Ok(());
        }
        tracing::info!(timeline = %t.id, from = %newest.lsn, to = %last, "rolling a base forward");
        let work = self.tmp().join(format!(
            "roll-{}-{}",
            t.id,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        let r = self.roll_into(&t.id, &newest, last, &work).await;
        let _ = self.delete_dir(&work).await;
        let row = match r {
            Ok(Some(row)) => row,
            Ok(None) => {
                tracing::debug!(timeline = %t.id, "timeline deleted during a roll; roll dropped");
                return Ok(());
            }
            Err(_) if !self.is_ready(&t.id).await => {
                tracing::debug!(timeline = %t.id, "timeline deleted during a roll; roll dropped");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        tracing::info!(timeline = %t.id, lsn = %row.lsn, "rolled base kept");
        Ok(())
    }

    async fn is_ready(&self, id: &TimelineId) -> bool {
        self.ready(id).await.is_ok()
    }

    /// Clones `from` into `work`, replays to `target`, keeps the result as
    /// a base of `id` (`None`: the timeline was deleted meanwhile).
    async fn roll_into(
        &self,
        id: &TimelineId,
        from: &BaseRow,
        target: Lsn,
        work: &Path,
    ) -> Result<Option<BaseRow>, StorageError> {
        self.clone_dir(&self.inner.root.join(&from.path), work, false)
            .await?;
        let _ = fs::remove_file(work.join("postmaster.pid"));
        self.write_recovery(work, id, target, "shutdown")?;
        let log = self.tmp().join(format!(
            "{}.log",
            work.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default()
        ));
        let mut settings = self.local_settings(None);
        settings.push(("hot_standby".into(), "off".into()));
        let ran = self
            .inner
            .pg
            .run_to_exit(
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
            )
            .await;
        let cd = self.inner.pg.controldata(work).await;
        let _ = fs::remove_file(&log);
        ran?;
        let cd = cd?;
        if cd.state != "shut down in recovery" || cd.min_recovery < target {
            return Err(StorageError::internal(format!(
                "rolling a base to {target} ended {:?} at {}",
                cd.state, cd.min_recovery
            )));
        }
        for f in ["pgbranch.recovery.conf", "recovery.signal"] {
            let _ = fs::remove_file(work.join(f));
        }
        let lsn = cd.min_recovery;
        // From here the timeline is held: a delete waits (Busy) for these
        // few steps, or came first and the result is dropped.
        let _timeline = self.acquire(vec![format!("t:{id}")]);
        if !self.is_ready(id).await {
            return Ok(None);
        }
        let dir = self.tl_dir(id).join("bases");
        fs::create_dir_all(&dir).map_err(|e| io_err("creating the bases directory", e))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(|e| io_err("chmod", e))?;
        let path = format!("timelines/{id}/bases/{:016X}", lsn.0);
        // Held until the row exists, so the collector leaves it alone.
        let _held = self.acquire(vec![base_key(&path)]);
        if self
            .inner
            .meta
            .bases(id)
            .await?
            .iter()
            .any(|b| b.path == path)
        {
            // Already kept (the same point rolled twice): nothing to add.
            return Ok(None);
        }
        let dst = self.inner.root.join(&path);
        if dst.exists() {
            // Left by a roll that was killed before it kept its row.
            self.delete_dir(&dst).await?;
        }
        self.clone_dir(work, &dst, true).await?;
        crash_point("keeping a rolled base");
        let time = self
            .inner
            .meta
            .commit_time_before(id, lsn)
            .await?
            .unwrap_or(from.time)
            .max(from.time);
        let row = BaseRow {
            path,
            timeline: id.clone(),
            snapshot: None,
            lsn,
            time,
            in_recovery: true,
        };
        self.inner.meta.add_base(&row).await?;
        Ok(Some(row))
    }

    /// Forgets the rolled bases beyond `keep`, then deletes the base
    /// directories of `id` that have no metadata and no user.
    async fn prune_bases(&self, id: &TimelineId, keep: usize) -> Result<(), StorageError> {
        let bases = self.inner.meta.bases(id).await?;
        for b in to_prune(&bases, keep) {
            self.inner.meta.delete_base(&b.path).await?;
        }
        let known: Vec<String> = self
            .inner
            .meta
            .bases(id)
            .await?
            .into_iter()
            .map(|b| b.path)
            .collect();
        let dir = self.tl_dir(id).join("bases");
        let Ok(rd) = fs::read_dir(&dir) else {
            return Ok(());
        };
        for e in rd.flatten() {
            let path = format!("timelines/{id}/bases/{}", e.file_name().to_string_lossy());
            if known.contains(&path) {
                continue;
            }
            let Some(_g) = self.try_acquire(base_key(&path)) else {
                continue;
            };
            tracing::debug!(timeline = %id, path, "deleting a pruned base");
            self.remove_data_dir(&e.path()).await?;
        }
        Ok(())
    }

    /// Deletes every rolled base directory of a timeline being removed.
    pub(super) async fn remove_rolled_bases(&self, id: &TimelineId) {
        let Ok(rd) = fs::read_dir(self.tl_dir(id).join("bases")) else {
            return;
        };
        for e in rd.flatten() {
            if let Err(err) = self.delete_dir(&e.path()).await {
                tracing::warn!(timeline = %id, error = %err, "removing a rolled base failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(lsn: u64, in_recovery: bool, snapshot: bool) -> BaseRow {
        BaseRow {
            path: format!("p/{lsn}"),
            timeline: TimelineId::new("0123456789abcdef".to_string()).unwrap(),
            snapshot: snapshot
                .then(|| crate::storage::SnapshotId::new("fedcba9876543210".to_string()).unwrap()),
            lsn: Lsn(lsn),
            time: jiff::Timestamp::UNIX_EPOCH,
            in_recovery,
        }
    }

    #[test]
    fn a_roll_is_due_only_past_the_threshold() {
        assert!(!roll_due(Lsn(100), Lsn(100), 1));
        assert!(!roll_due(Lsn(100), Lsn(50), 1));
        assert!(!roll_due(Lsn(100), Lsn(199), 100));
        assert!(roll_due(Lsn(100), Lsn(200), 100));
    }

    #[test]
    fn pruning_keeps_creation_and_snapshot_bases_and_the_newest_rolled() {
        let bases = vec![
            base(10, false, false),
            base(20, true, false),
            base(30, false, true),
            base(40, true, false),
            base(50, true, false),
        ];
        let pruned: Vec<u64> = to_prune(&bases, 2).iter().map(|b| b.lsn.0).collect();
        assert_eq!(pruned, vec![20]);
        assert!(to_prune(&bases, 3).is_empty());
    }

    #[test]
    fn the_copy_driver_rolls_only_when_asked() {
        assert!(RollPolicy::resolve(DriverKind::Copy, None, None, None).is_none());
        assert!(RollPolicy::resolve(DriverKind::Copy, Some(1), None, None).is_some());
        assert!(RollPolicy::resolve(DriverKind::Btrfs, Some(0), None, None).is_none());
        let p = RollPolicy::resolve(DriverKind::Btrfs, None, None, None).unwrap();
        assert_eq!(p.every_wal_bytes, DEFAULT_ROLL_WAL_BYTES);
        assert_eq!(p.keep, DEFAULT_ROLL_KEEP);
    }
}
