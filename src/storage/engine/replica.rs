//! Read replicas: copy-on-write copies of a timeline's data directory set
//! up as hot standbys of its primary.
//!
//! # Layout
//! `timelines/<id>/replicas/<ordinal>/pgdata` (and `postgres.log` beside
//! it for servers started by [`Engine::start_replica_postgres`]).
//!
//! # How a replica is made
//! The primary's data directory is copied with the same rules as a head
//! branch ([`Engine::copy_head`]): a stopped primary is cloned as it is; a
//! running one is snapshotted crash-consistently on atomic drivers (btrfs:
//! the standby does crash recovery over the copied `pg_wal`, then enters
//! standby mode) and copied in backup mode through the source connection on
//! the others (`backup_label` written, `pg_wal` re-copied).
//!
//! The copy is **never** normalized or started privately as a primary: the
//! end-of-recovery checkpoint would write WAL the primary never wrote and
//! the standby would diverge. Instead it gets what a standby needs:
//! `standby.signal`; `pgbranch.conf` with `archive_mode = off` (the primary
//! archives), `restore_command` reading the timeline's own archive
//! `<compute_root>/wal/<id>/` (so a standby that fell behind catches up from
//! it), `recovery_target_timeline = 'latest'`, `hot_standby = on`;
//! `postmaster.pid`/`postmaster.opts`, recovery files and replication slots
//! removed; the recovery keys stripped from `postgresql.auto.conf`. No
//! `primary_conninfo` is written: the compute passes it on its command line
//! and the password in its environment (`PGPASSWORD`).
//!
//! # Idempotency and crash safety
//! Keyed by (timeline, ordinal): a `Ready` replica is returned as it is.
//! The row is recorded `Creating` before the copy and `Ready` after it; a
//! row found `Creating` or `Deleting` at open has its directory removed
//! with the row. A replica whose postgres runs (live `postmaster.pid`)
//! cannot be deleted (`Busy`), nor can its timeline.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::lifecycle::must_be_ready;
use super::meta::ReplicaRow;
use super::server::pid_alive;
use super::{io_err, pg, Engine};
use crate::storage::{
    validate_replica_ordinal, CreateReplica, Password, Replica, State, StorageError, TimelineId,
};

impl Engine {
    fn replica_dir(&self, timeline: &TimelineId, ordinal: u32) -> PathBuf {
        self.tl_dir(timeline)
            .join("replicas")
            .join(ordinal.to_string())
    }

    /// The absolute data directory of a replica.
    pub fn replica_data_dir(&self, timeline: &TimelineId, ordinal: u32) -> PathBuf {
        self.replica_dir(timeline, ordinal).join("pgdata")
    }

    fn replica_view(row: &ReplicaRow) -> Replica {
        Replica {
            timeline: row.timeline.clone(),
            ordinal: row.ordinal,
            state: row.state,
            data_path: format!("timelines/{}/replicas/{}/pgdata", row.timeline, row.ordinal),
            created_at: row.created_at,
        }
    }

    fn replica_key(timeline: &TimelineId, ordinal: u32) -> String {
        format!("r:{timeline}:{ordinal}")
    }

    pub(super) async fn create_replica_impl(
        &self,
        req: CreateReplica,
    ) -> Result<Replica, StorageError> {
        validate_replica_ordinal(req.ordinal)?;
        let (tl, n) = (&req.timeline, req.ordinal);
        let Some(own) = self.try_acquire(Self::replica_key(tl, n)) else {
            return Err(StorageError::Busy {
                message: format!("replica {n} of timeline {tl} is being created or deleted"),
            });
        };
        if let Some(row) = self.inner.meta.replica(tl, n).await? {
            if row.state == State::Ready && self.replica_data_dir(tl, n).exists() {
                return Ok(Self::replica_view(&row));
            }
        }
        // The timeline must not go while it is copied.
        let source = self.acquire(vec![format!("t:{tl}")]);
        self.ready(tl).await?;
        // The copy runs to its end even when the caller goes away (an HTTP
        // client that timed out): a retry then finds it made (or `Busy`
        // while it is still under way) instead of starting over.
        let me = self.clone();
        tokio::spawn(async move {
            let _guards = (own, source);
            me.make_replica(req).await
        })
        .await
        .map_err(|e| io_err("creating a replica", e))?
    }

    async fn make_replica(&self, req: CreateReplica) -> Result<Replica, StorageError> {
        let (tl, n) = (&req.timeline, req.ordinal);
        self.remove_replica_dirs(tl, n).await?;
        let row = ReplicaRow {
            timeline: tl.clone(),
            ordinal: n,
            state: State::Creating,
            created_at: jiff::Timestamp::now(),
        };
        self.inner.meta.put_replica(&row).await?;
        tracing::info!(timeline = %tl, ordinal = n, "creating a read replica");
        match self
            .build_replica(tl, n, req.source_connection.as_ref())
            .await
        {
            Ok(()) => {
                self.inner
                    .meta
                    .set_replica_state(tl, n, State::Ready)
                    .await?;
                tracing::info!(timeline = %tl, ordinal = n, "read replica ready");
                Ok(Self::replica_view(&ReplicaRow {
                    state: State::Ready,
                    ..row
                }))
            }
            Err(e) => {
                tracing::warn!(timeline = %tl, ordinal = n, error = %e, "creating a read replica failed");
                if let Err(e2) = self.remove_replica_dirs(tl, n).await {
                    tracing::warn!(timeline = %tl, ordinal = n, error = %e2, "removing a failed replica's directory failed");
                }
                self.inner.meta.delete_replica(tl, n).await?;
                Err(e)
            }
        }
    }

    async fn build_replica(
        &self,
        tl: &TimelineId,
        n: u32,
        conn: Option<&crate::storage::ConnInfo>,
    ) -> Result<(), StorageError> {
        let dir = self.replica_dir(tl, n);
        for d in [dir.parent().unwrap_or(&dir), dir.as_path()] {
            fs::create_dir_all(d).map_err(|e| io_err("creating the replica directory", e))?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o755))
                .map_err(|e| io_err("chmod", e))?;
        }
        let data = dir.join("pgdata");
        // Backup mode where a running primary cannot be snapshotted
        // atomically; a crash-consistent snapshot is a valid standby start.
        let want_backup = !self.inner.driver.atomic();
        let label = format!("pgbranch-{tl}-replica-{n}");
        self.copy_head(tl, &data, conn, want_backup, false, &label)
            .await?;
        super::crash_point("configuring the replica");
        self.standby_config(&data, tl)?;
        self.inner.pg.chown(&data)?;
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err("chmod", e))
    }

    /// Turns a copy of the primary into a hot standby of it (see the module
    /// docs). Unlike `fixups`, keeps `backup_label` and writes no archive
    /// command.
    fn standby_config(&self, data: &Path, tl: &TimelineId) -> Result<(), StorageError> {
        self.clear_runtime_state(data)?;
        let conf = format!(
            "# Written by pgbranch for read replica of timeline {tl}. Do not edit.\n\
             wal_level = replica\n\
             archive_mode = off\n\
             restore_command = '{}'\n\
             recovery_target_timeline = 'latest'\n\
             hot_standby = on\n\
             recovery_init_sync_method = syncfs\n\
             listen_addresses = '*'\n",
            Self::restore_command(&self.inner.compute_root, tl)
        );
        self.install_conf(data, &conf)?;
        self.inner.pg.write_file(&data.join("standby.signal"), "")
    }

    /// Fetches a segment from a timeline's archive (missing: non-zero exit,
    /// as PostgreSQL expects).
    fn restore_command(root: &Path, tl: &TimelineId) -> String {
        format!(
            "cp \"{}/%f\" \"%p\"",
            root.join("wal").join(tl.as_str()).display()
        )
    }

    pub(super) async fn list_replicas_impl(
        &self,
        tl: &TimelineId,
    ) -> Result<Vec<Replica>, StorageError> {
        Ok(self
            .inner
            .meta
            .replicas(Some(tl))
            .await?
            .iter()
            .map(Self::replica_view)
            .collect())
    }

    pub(super) async fn delete_replica_impl(
        &self,
        tl: &TimelineId,
        n: u32,
    ) -> Result<(), StorageError> {
        validate_replica_ordinal(n)?;
        let Some(_own) = self.try_acquire(Self::replica_key(tl, n)) else {
            return Err(StorageError::Busy {
                message: format!("replica {n} of timeline {tl} is being created or deleted"),
            });
        };
        if self.inner.meta.replica(tl, n).await?.is_none() {
            return Ok(());
        }
        if pid_alive(&self.replica_data_dir(tl, n)) {
            return Err(StorageError::Busy {
                message: format!(
                    "replica {n} of timeline {tl} has a running postgres; stop its compute first"
                ),
            });
        }
        tracing::info!(timeline = %tl, ordinal = n, "deleting a read replica");
        self.inner
            .meta
            .set_replica_state(tl, n, State::Deleting)
            .await?;
        self.remove_replica_dirs(tl, n).await?;
        self.inner.meta.delete_replica(tl, n).await
    }

    /// Refuses (`Busy`) when a replica of the timeline runs or is being
    /// made: its timeline cannot be deleted then.
    pub(super) async fn check_replicas_stopped(&self, tl: &TimelineId) -> Result<(), StorageError> {
        for r in self.inner.meta.replicas(Some(tl)).await? {
            if pid_alive(&self.replica_data_dir(tl, r.ordinal))
                || self.in_use(&Self::replica_key(tl, r.ordinal))
            {
                return Err(StorageError::Busy {
                    message: format!(
                        "replica {} of timeline {tl} has a running postgres; stop its compute first",
                        r.ordinal
                    ),
                });
            }
        }
        Ok(())
    }

    /// Removes every replica of a timeline (its deletion cascades).
    pub(super) async fn remove_replicas(&self, tl: &TimelineId) -> Result<(), StorageError> {
        for r in self.inner.meta.replicas(Some(tl)).await? {
            self.remove_replica_dirs(tl, r.ordinal).await?;
            self.inner.meta.delete_replica(tl, r.ordinal).await?;
        }
        let _ = self
            .remove_tree(
                "removing the replicas directory",
                &self.tl_dir(tl).join("replicas"),
            )
            .await;
        Ok(())
    }

    async fn remove_replica_dirs(&self, tl: &TimelineId, n: u32) -> Result<(), StorageError> {
        let dir = self.replica_dir(tl, n);
        let data = dir.join("pgdata");
        self.remove_data_dir(&data).await?;
        self.remove_tree("removing a replica directory", &dir).await
    }

    /// At open: replicas half made or half removed (or of a timeline that
    /// is gone) are removed.
    pub(super) async fn recover_replicas(&self) -> Result<(), StorageError> {
        for r in self.inner.meta.replicas(None).await? {
            let orphan = self
                .inner
                .meta
                .get(&r.timeline)
                .await?
                .is_none_or(|t| t.state == State::Deleting);
            if r.state != State::Ready || orphan {
                tracing::info!(timeline = %r.timeline, ordinal = r.ordinal, state = ?r.state, "removing an unfinished read replica");
                self.remove_replica_dirs(&r.timeline, r.ordinal).await?;
                self.inner
                    .meta
                    .delete_replica(&r.timeline, r.ordinal)
                    .await?;
            }
        }
        Ok(())
    }

    /// Starts a stock `postgres` on a Ready replica as a hot standby on
    /// 127.0.0.1:`port`, streaming from `primary_conninfo` (which must not
    /// hold a password: pass it as `password`, given to the server's
    /// environment as `PGPASSWORD`). Returns once it accepts read-only
    /// connections. For tests and local mode; in a cluster the replica
    /// Deployment does the same.
    pub async fn start_replica_postgres(
        &self,
        tl: &TimelineId,
        ordinal: u32,
        port: u16,
        primary_conninfo: &str,
        password: Option<&Password>,
    ) -> Result<pg::PgServer, StorageError> {
        self.start_replica_postgres_with(tl, ordinal, port, primary_conninfo, password, &[])
            .await
    }

    /// [`Engine::start_replica_postgres`] with further `-c` settings (a
    /// compute's own, such as its TLS files).
    pub async fn start_replica_postgres_with(
        &self,
        tl: &TimelineId,
        ordinal: u32,
        port: u16,
        primary_conninfo: &str,
        password: Option<&Password>,
        extra: &[(String, String)],
    ) -> Result<pg::PgServer, StorageError> {
        validate_replica_ordinal(ordinal)?;
        let row = self
            .inner
            .meta
            .replica(tl, ordinal)
            .await?
            .ok_or_else(|| StorageError::not_found("replica", format!("{tl}/{ordinal}")))?;
        must_be_ready(
            format_args!("replica {ordinal} of timeline {tl}"),
            row.state,
        )?;
        if primary_conninfo.contains("password") {
            return Err(StorageError::invalid(
                "primary_conninfo must not carry a password; pass it separately",
            ));
        }
        let data = self.replica_data_dir(tl, ordinal);
        if pid_alive(&data) {
            return Err(StorageError::Busy {
                message: format!(
                    "a postgres is already running on replica {ordinal} of timeline {tl}"
                ),
            });
        }
        let settings = vec![
            ("archive_mode".to_string(), "off".to_string()),
            (
                "restore_command".to_string(),
                Self::restore_command(&self.inner.root, tl),
            ),
            ("primary_conninfo".to_string(), primary_conninfo.to_string()),
        ]
        .into_iter()
        .chain(extra.iter().cloned())
        .collect::<Vec<_>>();
        let env: Vec<(String, String)> = password
            .map(|p| vec![("PGPASSWORD".to_string(), p.0.clone())])
            .unwrap_or_default();
        let log = self.replica_dir(tl, ordinal).join("postgres.log");
        self.inner
            .pg
            .start_standby(
                &data,
                pg::StartOpts {
                    port,
                    listen: "127.0.0.1",
                    settings: &settings,
                    log: &log,
                    timeout: Duration::from_secs(600),
                    tied: false,
                    replay_progress: None,
                },
                &env,
            )
            .await
    }
}
