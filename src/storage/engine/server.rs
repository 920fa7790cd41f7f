//! Servers on the volume's data directories: the stock `postgres` a caller
//! starts on a ready timeline, the private servers (Unix socket only, tied
//! to the engine) it runs itself for recovery, replay and schema dumps, and
//! whether a data directory has a live server.

use std::fs;
use std::path::Path;
use std::time::Duration;

use super::pg::{self, PgServer};
use super::{crash_point, Engine};
use crate::storage::{StorageError, TimelineId};

pub(super) fn pid_alive(data: &Path) -> bool {
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

impl Engine {
    /// Starts a stock `postgres` for a ready timeline on 127.0.0.1:`port`,
    /// as the run_as user, with a private Unix socket directory; returns
    /// once it accepts connections and is not in recovery.
    pub async fn start_postgres(
        &self,
        id: &TimelineId,
        port: u16,
    ) -> Result<PgServer, StorageError> {
        self.start_postgres_with(id, port, &[]).await
    }

    /// [`Engine::start_postgres`] with further `-c` settings (a compute's
    /// own, such as its TLS files; the operator tests' kubelet passes them).
    pub async fn start_postgres_with(
        &self,
        id: &TimelineId,
        port: u16,
        extra: &[(String, String)],
    ) -> Result<PgServer, StorageError> {
        self.ready(id).await?;
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
                    settings: &[self.local_settings(Some(id)), extra.to_vec()].concat(),
                    log: &log,
                    timeout: Duration::from_secs(600),
                    tied: false,
                    replay_progress: None,
                },
            )
            .await
    }

    pub(super) async fn private_server(
        &self,
        data: &Path,
        archive: Option<&TimelineId>,
        log: &Path,
    ) -> Result<PgServer, StorageError> {
        self.private_server_with(data, archive, log, None).await
    }

    pub(super) async fn private_server_with(
        &self,
        data: &Path,
        archive: Option<&TimelineId>,
        log: &Path,
        replay_progress: Option<pg::OnReplay<'_>>,
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
}
