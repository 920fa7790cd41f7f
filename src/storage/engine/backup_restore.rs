//! Restores from an object store (issue #16): the way back after losing
//! the volume. The newest complete base backup at or before the point (by
//! its end LSN or end time) is downloaded with `barman-cloud-restore`, then
//! a private server replays WAL fetched by `barman-cloud-wal-restore` up to
//! the point (`recovery_target_lsn` or `recovery_target_time`, inclusive,
//! `recovery_target_timeline = 'current'`) and promotes; the result is a
//! cleanly stopped data directory. Archiving and base backups are in
//! `backup.rs`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::backup::backup_err;
use super::pg::{StartOpts, StopMode};
use super::{io_err, Engine};
use crate::backup::barman::{BackupEntry, Barman};
use crate::backup::ObjectStore;
use crate::storage::{Lsn, Point, StorageError};

/// A restore from a destination into a fresh directory.
#[derive(Debug, Clone)]
pub struct RestoreFromBackup {
    pub store: ObjectStore,
    /// The backed-up timeline's barman server name.
    pub server: String,
    /// `Head`: everything archived; `Lsn`: up to and including the record
    /// at that LSN; `Timestamp`: every transaction committed at or before.
    pub point: Point,
    /// The restore's name: the data directory is
    /// `<root>/restored/<name>/pgdata`.
    pub name: String,
}

/// A restored data directory.
#[derive(Debug, Clone)]
pub struct Restored {
    /// A cleanly stopped data directory at the point.
    pub data_dir: PathBuf,
    /// The base backup it started from.
    pub backup_id: String,
    /// Where recovery ended (`pg_current_wal_lsn()` after promotion).
    pub lsn: Lsn,
}

/// The newest complete backup at or before `point`.
fn choose_backup<'a>(backups: &'a [BackupEntry], point: &Point) -> Option<&'a BackupEntry> {
    backups
        .iter()
        .filter(|b| b.done())
        .filter(|b| match point {
            Point::Head => true,
            Point::Lsn(l) => b.end_lsn().is_some_and(|e| e <= *l),
            Point::Timestamp(t) => b.ended().is_some_and(|e| e <= *t),
        })
        .max_by(|a, b| a.backup_id.cmp(&b.backup_id))
}

impl Engine {
    /// Restores a backed-up timeline from its destination at a point into
    /// `<root>/restored/<name>/pgdata` (see the module docs).
    pub async fn restore_from_backup(
        &self,
        req: RestoreFromBackup,
    ) -> Result<Restored, StorageError> {
        let barman = self.barman_for(&req.store)?;
        let r = self.restore_with(&barman, req).await;
        barman.remove_config();
        r
    }

    async fn restore_with(
        &self,
        barman: &Barman,
        req: RestoreFromBackup,
    ) -> Result<Restored, StorageError> {
        let name = crate::storage::OpKey::new(&req.name)
            .map_err(|e| StorageError::invalid(format!("restore name: {e}")))?;
        let list = barman.list_backups(&req.server).await.map_err(backup_err)?;
        let backup =
            choose_backup(&list, &req.point).ok_or_else(|| StorageError::InvalidPoint {
                message: format!(
                    "no complete base backup of {} in {} ends at or before {:?} ({} listed)",
                    req.server,
                    req.store.describe(),
                    req.point,
                    list.len()
                ),
                window: None,
            })?;
        let dir = self.inner.root.join("restored").join(name.as_str());
        let data = dir.join("pgdata");
        if data.exists() {
            self.delete_dir(&data).await?;
        }
        fs::create_dir_all(&dir).map_err(|e| io_err("creating the restore directory", e))?;
        self.inner.pg.chown(&dir)?;
        barman
            .restore(&req.server, &backup.backup_id, &data)
            .await
            .map_err(backup_err)?;
        for f in [
            "standby.signal",
            "postmaster.pid",
            "postmaster.opts",
            "pgbranch.recovery.conf",
        ] {
            let _ = fs::remove_file(data.join(f));
        }
        self.inner
            .pg
            .write_file(&data.join("recovery.signal"), "")?;
        self.inner.pg.chown_tree(&data)?;
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err("chmod", e))?;
        let mut settings = self.local_settings(None);
        settings.extend([
            (
                "restore_command".to_string(),
                barman.wal_restore_command(&req.server),
            ),
            (
                "recovery_target_timeline".to_string(),
                "current".to_string(),
            ),
            ("recovery_target_action".to_string(), "promote".to_string()),
            ("recovery_target_inclusive".to_string(), "on".to_string()),
            ("hot_standby".to_string(), "on".to_string()),
        ]);
        match &req.point {
            Point::Head => {}
            Point::Lsn(l) => settings.push(("recovery_target_lsn".into(), l.to_string())),
            Point::Timestamp(t) => settings.push((
                "recovery_target_time".into(),
                t.strftime("%Y-%m-%d %H:%M:%S%.6f+00").to_string(),
            )),
        }
        let log = dir.join("restore.log");
        let server = self
            .inner
            .pg
            .start_standby(
                &data,
                StartOpts {
                    port: 5432,
                    listen: "",
                    settings: &settings,
                    log: &log,
                    timeout: Duration::from_secs(3600),
                    tied: true,
                    replay_progress: None,
                },
                &barman.env(),
            )
            .await?;
        let client = server.connect("postgres").await?;
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            let in_recovery: bool = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(|e| io_err("waiting for the restore's promotion", e))?
                .get(0);
            if !in_recovery {
                break;
            }
            if Instant::now() > deadline {
                return Err(StorageError::Unavailable {
                    message: format!("the restore did not finish: {}", server.log_tail()),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let lsn: String = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(|e| io_err("reading the restored position", e))?
            .get(0);
        drop(client);
        server.stop(StopMode::Fast).await?;
        Ok(Restored {
            data_dir: data,
            backup_id: backup.backup_id.clone(),
            lsn: lsn
                .parse()
                .map_err(|_| StorageError::internal(format!("unreadable LSN {lsn:?}")))?,
        })
    }

    /// Starts a stock `postgres` on a restored data directory (127.0.0.1,
    /// no archiving), as the engine's PostgreSQL user.
    pub async fn start_restored(
        &self,
        restored: &Restored,
        port: u16,
    ) -> Result<super::PgServer, StorageError> {
        let log = restored
            .data_dir
            .parent()
            .unwrap_or(&self.inner.root)
            .join("postgres.log");
        self.inner
            .pg
            .start(
                &restored.data_dir,
                StartOpts {
                    port,
                    listen: "127.0.0.1",
                    settings: &self.local_settings(None),
                    log: &log,
                    timeout: Duration::from_secs(600),
                    tied: false,
                    replay_progress: None,
                },
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, status: &str, end_lsn: &str, end_time: &str) -> BackupEntry {
        BackupEntry {
            backup_id: id.into(),
            status: status.into(),
            end_xlog: Some(end_lsn.into()),
            end_time: Some(end_time.into()),
            begin_xlog: None,
            begin_time: None,
            timeline: Some(1),
            size: None,
        }
    }

    #[test]
    fn a_restore_starts_from_the_newest_complete_backup_before_the_point() {
        let list = [
            entry(
                "20261207T100000",
                "DONE",
                "0/3000000",
                "Mon Dec  7 10:00:05 2026",
            ),
            entry(
                "20261207T110000",
                "DONE",
                "0/5000000",
                "Mon Dec  7 11:00:05 2026",
            ),
            // Killed mid-upload: never taken as complete.
            entry(
                "20261207T120000",
                "STARTED",
                "0/7000000",
                "Mon Dec  7 12:00:05 2026",
            ),
        ];
        let id = |p: Point| choose_backup(&list, &p).map(|b| b.backup_id.clone());
        assert_eq!(id(Point::Head).as_deref(), Some("20261207T110000"));
        assert_eq!(
            id(Point::Lsn("0/4000000".parse().unwrap())).as_deref(),
            Some("20261207T100000")
        );
        assert_eq!(id(Point::Lsn("0/2000000".parse().unwrap())), None);
        let t = |s: &str| Point::Timestamp(s.parse().unwrap());
        assert_eq!(
            id(t("2026-12-07T11:30:00Z")).as_deref(),
            Some("20261207T110000")
        );
        assert_eq!(id(t("2026-12-07T10:00:04Z")), None);
    }
}
