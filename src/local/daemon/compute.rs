//! Process supervision: the `postgres` of each running branch (started on
//! a private port, given the branch's password, stopped), a `postgres` left
//! over by a daemon that was killed, the branches' fixed ports and the
//! proxies on them, whose backend follows the branch's compute.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use super::Daemon;
use crate::local::proxy::{Backend, Proxy};
use crate::local::{process_alive, LocalError};
use crate::storage::engine::{PgServer, StopMode};
use crate::storage::{ConnInfo, Password, Source, StorageError, TimelineId};

/// Listens on 127.0.0.1:`port`.
pub(super) fn bind_port(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// A port nobody listens on now, for a compute's private address.
fn free_port() -> Result<u16, LocalError> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| LocalError::io("finding a free port", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| LocalError::io("finding a free port", e))
}

/// 127.0.0.1:`port`.
pub(super) fn local_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// The pid `data`'s `postmaster.pid` names, if any.
fn postmaster_pid(data: &Path) -> Option<i32> {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
        .filter(|pid| *pid > 0)
}

/// Whether the postmaster of `data` (per its `postmaster.pid`) is alive.
pub(super) fn postmaster_alive(data: &Path) -> bool {
    postmaster_pid(data).is_some_and(process_alive)
}

/// Stops a `postgres` left running on `data` by a daemon that was killed.
async fn kill_stale(data: &Path) {
    let Some(pid) = postmaster_pid(data) else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains("postgres") {
        return;
    }
    let p = nix::unistd::Pid::from_raw(pid);
    tracing::warn!(pid, data = %data.display(), "stopping a postgres left over by an earlier daemon");
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGQUIT);
    for _ in 0..100 {
        if !process_alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
    tokio::time::sleep(Duration::from_millis(200)).await;
}

impl Daemon {
    pub(super) fn set_proxy(&self, name: &str, p: Proxy) {
        if let Ok(mut m) = self.inner.proxies.lock() {
            m.insert(name.to_string(), p);
        }
    }

    pub(super) fn set_backend(&self, name: &str, b: Backend) {
        if let Ok(m) = self.inner.proxies.lock() {
            if let Some(p) = m.get(name) {
                p.set_backend(b);
            }
        }
    }

    pub(super) fn remove_proxy(&self, name: &str) {
        let p = self
            .inner
            .proxies
            .lock()
            .ok()
            .and_then(|mut m| m.remove(name));
        drop(p);
    }

    /// Marks a branch's compute as being started (`on`) or not.
    pub(super) fn starting(&self, name: &str, on: bool) {
        if let Ok(mut s) = self.inner.starting.lock() {
            if on {
                s.insert(name.to_string());
            } else {
                s.remove(name);
            }
        }
    }

    pub(super) fn is_starting(&self, name: &str) -> bool {
        self.inner
            .starting
            .lock()
            .map(|s| s.contains(name))
            .unwrap_or(false)
    }

    /// At shutdown: every compute stops cleanly, every proxy closes.
    pub(super) async fn stop_all(&self) {
        let _g = self.inner.ops.lock().await;
        let servers: Vec<(TimelineId, PgServer)> =
            self.inner.computes.lock().await.drain().collect();
        for (tl, s) in servers {
            if let Err(e) = s.stop(StopMode::Fast).await {
                tracing::warn!(timeline = %tl, error = %e, "compute did not stop cleanly");
            }
        }
        if let Ok(mut m) = self.inner.proxies.lock() {
            m.clear();
        }
    }

    /// A port for a new branch: the first free one from the port base,
    /// bound at once so no other daemon takes it.
    pub(super) fn alloc_port(&self) -> Result<(tokio::net::TcpListener, u16), LocalError> {
        let used: HashSet<u16> = self.store().branches()?.iter().map(|b| b.port).collect();
        let base = self.inner.port_base;
        for port in base..=base.saturating_add(2000) {
            if used.contains(&port) {
                continue;
            }
            if let Ok(l) = bind_port(port) {
                return Ok((l, port));
            }
        }
        Err(LocalError::Conflict(format!(
            "no free local port in {base}..{}",
            base.saturating_add(2000)
        )))
    }

    /// How the engine can reach a running compute of `tl` (to checkpoint it
    /// or switch WAL before copying).
    pub(super) async fn source_connection(
        &self,
        tl: &TimelineId,
    ) -> Result<Option<ConnInfo>, LocalError> {
        let port = match self.inner.computes.lock().await.get(tl) {
            Some(s) => s.port,
            None => return Ok(None),
        };
        let owner = self
            .store()
            .branches()?
            .into_iter()
            .find(|b| b.timeline.as_ref() == Some(tl));
        Ok(owner.map(|b| ConnInfo {
            host: "127.0.0.1".into(),
            port,
            user: "postgres".into(),
            password: Some(Password(b.password)),
            dbname: "postgres".into(),
        }))
    }

    /// [`Self::source_connection`] of a copy's source, when it is a
    /// timeline.
    pub(super) async fn source_connection_of(
        &self,
        source: &Source,
    ) -> Result<Option<ConnInfo>, LocalError> {
        match source {
            Source::Timeline { timeline, .. } => self.source_connection(timeline).await,
            _ => Ok(None),
        }
    }

    /// Starts a compute on `tl` (or finds the running one) and gives the
    /// superuser `password` before anyone is let in.
    pub(super) async fn start_compute(
        &self,
        tl: &TimelineId,
        password: &str,
    ) -> Result<u16, LocalError> {
        if !password.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(LocalError::Invalid(
                "a branch password must be letters and digits".into(),
            ));
        }
        // Callers hold the ops lock, so nobody else starts or stops a
        // compute meanwhile; the map is only locked briefly so views stay
        // responsive during a long start.
        {
            let mut computes = self.inner.computes.lock().await;
            if let Some(s) = computes.get(tl) {
                if postmaster_alive(&s.data_dir) {
                    set_password(s, password).await?;
                    return Ok(s.port);
                }
                tracing::warn!(timeline = %tl, log = %s.log.display(), "compute had exited; starting it again");
                computes.remove(tl);
            }
        }
        kill_stale(&self.engine().data_dir(tl)).await;
        let mut attempt = 0;
        let server = loop {
            attempt += 1;
            let port = free_port()?;
            match self.engine().start_postgres(tl, port).await {
                Ok(s) => break s,
                // Someone took the port between the probe and the start.
                Err(StorageError::Internal { message }) if attempt < 3 => {
                    tracing::warn!(timeline = %tl, %message, "compute did not start; retrying on another port");
                }
                Err(e) => return Err(e.into()),
            }
        };
        if let Err(e) = set_password(&server, password).await {
            let _ = server.stop(StopMode::Immediate).await;
            return Err(e);
        }
        let port = server.port;
        self.inner.computes.lock().await.insert(tl.clone(), server);
        Ok(port)
    }

    /// Starts a branch's compute and points its proxy at it.
    pub(super) async fn start_branch(&self, name: &str) -> Result<(), LocalError> {
        let _g = self.inner.ops.lock().await;
        let b = self.branch(name)?;
        let tl = Self::ready_timeline(&b)?;
        self.store().set_want_running(name, true)?;
        self.starting(name, true);
        self.set_backend(name, Backend::Starting);
        let r = self.start_compute(&tl, &b.password).await;
        self.starting(name, false);
        match r {
            Ok(port) => {
                self.set_backend(name, Backend::Up(local_addr(port)));
                tracing::info!(branch = name, port = b.port, "branch running");
                Ok(())
            }
            Err(e) => {
                self.set_backend(name, Backend::Down);
                Err(e)
            }
        }
    }

    /// Stops a branch's compute; its proxy answers nothing until started.
    pub(super) async fn stop_branch(&self, name: &str) -> Result<(), LocalError> {
        let _g = self.inner.ops.lock().await;
        let b = self.branch(name)?;
        self.store().set_want_running(name, false)?;
        self.set_backend(name, Backend::Down);
        if let Some(tl) = &b.timeline {
            self.stop_compute(tl, StopMode::Fast).await?;
        }
        Ok(())
    }

    /// Stops the compute of `tl`, if one runs.
    pub(super) async fn stop_compute(
        &self,
        tl: &TimelineId,
        mode: StopMode,
    ) -> Result<(), LocalError> {
        let s = self.inner.computes.lock().await.remove(tl);
        match s {
            Some(s) => Ok(s.stop(mode).await?),
            None => Ok(()),
        }
    }
}

/// Gives the superuser of a running compute its branch's password.
async fn set_password(s: &PgServer, password: &str) -> Result<(), LocalError> {
    let c = s.connect("postgres").await?;
    c.batch_execute(&format!("ALTER ROLE postgres WITH PASSWORD '{password}'"))
        .await
        .map_err(|e| LocalError::Daemon(format!("setting the branch's password: {e}")))
}
