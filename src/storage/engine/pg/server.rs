//! The handle of a running `postgres` ([`PgServer`]): readiness, clean or
//! immediate shutdown, kill on drop; and stopping a postmaster an engine
//! that died left running.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Child;

use super::{io_err, log_tail, OnReplay};
use crate::storage::StorageError;

/// How [`PgServer::stop`] shuts the server down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// `pg_ctl -m fast`: roll back sessions, checkpoint, clean shutdown.
    Fast,
    /// `pg_ctl -m immediate`: no checkpoint; the next start runs recovery.
    Immediate,
}

/// A running `postgres`. Dropping it kills the server (immediate shutdown).
#[derive(Debug)]
pub struct PgServer {
    /// TCP port (and the socket's port number).
    pub port: u16,
    /// The data directory it runs on.
    pub data_dir: PathBuf,
    /// Private Unix socket directory (local connections are `trust`ed).
    pub socket_dir: PathBuf,
    /// The server's log file.
    pub log: PathBuf,
    pub(super) child: Option<Child>,
    pub(super) pid: i32,
}

impl PgServer {
    /// A connection as the superuser `postgres` over the private socket.
    pub async fn connect(&self, dbname: &str) -> Result<tokio_postgres::Client, StorageError> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(&self.socket_dir)
            .port(self.port)
            .user("postgres")
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(5));
        let (client, conn) =
            cfg.connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| StorageError::Unavailable {
                    message: format!("connecting to postgres on {}: {e}", self.data_dir.display()),
                })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    pub(super) async fn wait_ready(
        &mut self,
        timeout: Duration,
        progress: Option<OnReplay<'_>>,
        standby: bool,
    ) -> Result<(), StorageError> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(StorageError::internal(format!(
                        "postgres on {} exited ({status}) before it was ready: {}",
                        self.data_dir.display(),
                        self.log_tail()
                    )));
                }
            }
            if let Ok(c) = self.connect("postgres").await {
                let q = "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text";
                if let Ok(row) = c.query_one(q, &[]).await {
                    let in_recovery: bool = row.get(0);
                    if !in_recovery || standby {
                        return Ok(());
                    }
                    let replayed: Option<String> = row.get(1);
                    if let (Some(f), Some(l)) = (progress, replayed.and_then(|l| l.parse().ok())) {
                        f(l).await;
                    }
                }
            }
            if start.elapsed() > timeout {
                return Err(StorageError::Unavailable {
                    message: format!(
                        "postgres on {} not ready after {:?}: {}",
                        self.data_dir.display(),
                        timeout,
                        self.log_tail()
                    ),
                });
            }
            // A new server is up within tens of milliseconds: poll fast at
            // first, then gently for long replays.
            let pause = match start.elapsed().as_millis() {
                0..500 => Duration::from_millis(10),
                500..3000 => Duration::from_millis(50),
                _ => Duration::from_millis(100),
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// Shuts the server down and waits for it to exit.
    pub async fn stop(mut self, mode: StopMode) -> Result<(), StorageError> {
        let sig = match mode {
            StopMode::Fast => nix::sys::signal::Signal::SIGINT,
            StopMode::Immediate => nix::sys::signal::Signal::SIGQUIT,
        };
        let r = if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), sig);
            match tokio::time::timeout(Duration::from_secs(120), child.wait()).await {
                Ok(Ok(status)) if status.success() => Ok(()),
                Ok(Ok(status)) => Err(StorageError::internal(format!(
                    "postgres on {} exited with {status} on shutdown: {}",
                    self.data_dir.display(),
                    self.log_tail()
                ))),
                Ok(Err(e)) => Err(io_err("waiting for postgres", e)),
                Err(_) => {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(self.pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    let _ = child.wait().await;
                    Err(StorageError::internal(
                        "postgres did not stop within 120 s; killed",
                    ))
                }
            }
        } else {
            Ok(())
        };
        let _ = fs::remove_dir_all(&self.socket_dir);
        r
    }

    /// Kills the server now (SIGQUIT, SIGKILL after 10 s) and waits for
    /// it to exit, without holding up a runtime thread.
    pub(super) async fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(self.pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.start_kill();
            }
        }
        let _ = fs::remove_dir_all(&self.socket_dir);
    }

    /// [`Self::kill`] for `Drop`, which cannot await: it polls the exit,
    /// blocking its thread for up to 10 s.
    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(self.pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) => {}
                }
                if Instant::now() > deadline {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = child.start_kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = fs::remove_dir_all(&self.socket_dir);
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.child.is_none() {
            let _ = fs::remove_dir_all(&self.socket_dir);
            return;
        }
        // On a multi-threaded runtime the worker hands its other tasks to
        // another thread while this one waits for the server to exit.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            tokio::task::block_in_place(|| self.kill_now());
        } else {
            self.kill_now();
        }
    }
}

/// Stops a postmaster left running on `dir` by an engine that died (its
/// `postmaster.pid` names a live `postgres` process): SIGQUIT, then SIGKILL.
/// Blocks for up to 10 s: the engine calls it through its blocking helper.
pub(crate) fn kill_leftover(dir: &Path) {
    let Ok(text) = fs::read_to_string(dir.join("postmaster.pid")) else {
        return;
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
    else {
        return;
    };
    if pid <= 0 {
        return;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains("postgres") {
        return;
    }
    // A copy of a running server carries the source's postmaster.pid: only
    // a postmaster running in this very directory (its working directory)
    // is a leftover; the source's must live on.
    let cwd = fs::read_link(format!("/proc/{pid}/cwd")).ok();
    if cwd.is_none() || cwd != fs::canonicalize(dir).ok() {
        return;
    }
    let p = nix::unistd::Pid::from_raw(pid);
    tracing::warn!(pid, dir = %dir.display(), "stopping a postgres left running by an interrupted operation");
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGQUIT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while nix::sys::signal::kill(p, None).is_ok() {
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
