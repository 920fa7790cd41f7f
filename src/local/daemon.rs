//! The local daemon: owns the engine, the computes and the proxies of one
//! local directory, and serves the control API on its Unix socket.
//!
//! Structural changes (create, delete, start, stop, finalize) are serialized
//! by one lock; the long part of a creation (copy, WAL replay) runs in a
//! background task that only records its result, so `list` and progress
//! polling stay responsive.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use super::api::*;
use super::proxy::{Backend, Proxy};
use super::store::{
    BranchRow, Finalize, RestoreRow, SnapshotRow, Store, AWAITING_FINALIZE, CREATING, FAILED,
    READY, RESTORING,
};
use super::{connection_string, random_password, LocalError, Paths};
use crate::storage::engine::{Engine, EngineConfig, PgServer, StopMode};
use crate::storage::wait::wait_timeline_ready;
use crate::storage::{
    validate_id, ConnInfo, CreateSnapshot, CreateTimeline, DriverKind, OpKey, Password, Point,
    Source, State, Storage, StorageError, TimelineId,
};

/// Default first port of branch connection strings.
pub const DEFAULT_PORT_BASE: u16 = 55432;
/// How long a creation or restore may take before it is failed.
const CREATE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The daemon. Cheap to clone.
#[derive(Clone)]
pub struct Daemon {
    inner: Arc<Inner>,
}

struct Inner {
    paths: Paths,
    engine: Engine,
    store: Store,
    port_base: u16,
    /// Running computes by timeline.
    computes: tokio::sync::Mutex<HashMap<TimelineId, PgServer>>,
    /// Branches whose compute is being started.
    starting: Mutex<HashSet<String>>,
    /// Proxies by branch name.
    proxies: Mutex<HashMap<String, Proxy>>,
    /// Why a branch's port could not be listened on, by branch name.
    port_errors: Mutex<HashMap<String, String>>,
    /// Serializes structural changes.
    ops: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
}

fn now_stamp() -> String {
    jiff::Timestamp::now().strftime("%Y%m%d%H%M%S").to_string()
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

fn check_name(kind: &str, name: &str) -> Result<(), LocalError> {
    validate_id(kind, name).map_err(|_| {
        LocalError::Invalid(format!(
            "{kind} name {name:?} is not valid: use 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"
        ))
    })
}

fn bind_port(port: u16) -> std::io::Result<tokio::net::TcpListener> {
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

fn local_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Whether the postmaster of `data` (per its `postmaster.pid`) is alive.
fn postmaster_alive(data: &Path) -> bool {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
        .filter(|pid| *pid > 0)
        .is_some_and(super::process_alive)
}

/// Stops a `postgres` left running on `data` by a daemon that was killed.
async fn kill_stale(data: &Path) {
    let Ok(text) = std::fs::read_to_string(data.join("postmaster.pid")) else {
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
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains("postgres") {
        return;
    }
    let p = nix::unistd::Pid::from_raw(pid);
    tracing::warn!(pid, data = %data.display(), "stopping a postgres left over by an earlier daemon");
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGQUIT);
    for _ in 0..100 {
        if !super::process_alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Runs the daemon for `paths` until it is asked to stop (API `shutdown`,
/// SIGTERM or SIGINT); then stops every compute cleanly.
pub async fn run(paths: Paths) -> Result<(), LocalError> {
    let me = std::process::id() as i32;
    if let Some(pid) = super::daemon_pid(&paths) {
        if pid != me {
            return Err(LocalError::Conflict(format!(
                "a daemon (pid {pid}) already runs for {}",
                paths.dir.display()
            )));
        }
    }
    let sock = paths.socket();
    if sock.as_os_str().len() > 100 {
        return Err(LocalError::Invalid(format!(
            "the control socket path {} is too long for a Unix socket; use a shorter --dir",
            sock.display()
        )));
    }
    std::fs::write(paths.pid(), format!("{me}\n"))
        .map_err(|e| LocalError::io("writing the pid file", e))?;
    let store = Store::open(&paths.store())?;
    let driver = store
        .setting("driver")?
        .map(|d| d.parse::<DriverKind>())
        .transpose()?;
    let port_base = store
        .setting("port_base")?
        .and_then(|p| p.parse().ok())
        .unwrap_or(DEFAULT_PORT_BASE);
    let engine = Engine::open(EngineConfig {
        root: paths.storage(),
        driver,
        ..Default::default()
    })
    .await?;
    store.set_setting("driver", &engine.driver().to_string())?;
    let daemon = Daemon {
        inner: Arc::new(Inner {
            paths: paths.clone(),
            engine,
            store,
            port_base,
            computes: tokio::sync::Mutex::new(HashMap::new()),
            starting: Mutex::new(HashSet::new()),
            proxies: Mutex::new(HashMap::new()),
            port_errors: Mutex::new(HashMap::new()),
            ops: tokio::sync::Mutex::new(()),
            shutdown: CancellationToken::new(),
        }),
    };
    daemon.bring_back()?;

    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .map_err(|e| LocalError::io(&format!("binding {}", sock.display()), e))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| LocalError::io("chmod of the control socket", e))?;
    tracing::info!(dir = %paths.dir.display(), "local daemon serving");

    let token = daemon.inner.shutdown.clone();
    let signals = async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = token.cancelled() => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    };
    let served = axum::serve(listener, router(daemon.clone()))
        .with_graceful_shutdown(signals)
        .await;
    daemon.stop_all().await;
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(paths.pid());
    tracing::info!("local daemon stopped");
    served.map_err(|e| LocalError::io("serving the control API", e))
}

impl Daemon {
    fn store(&self) -> &Store {
        &self.inner.store
    }
    fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// At start: every branch's port is bound again; unfinished creations
    /// resume; branches that were running are started again.
    fn bring_back(&self) -> Result<(), LocalError> {
        let branches = self.store().branches()?;
        for b in &branches {
            let initial = if b.state == CREATING || (b.state == READY && b.want_running) {
                Backend::Starting
            } else {
                Backend::Down
            };
            match bind_port(b.port).and_then(|l| Proxy::serve(l, initial)) {
                Ok(p) => self.set_proxy(&b.name, p),
                Err(e) => {
                    tracing::error!(branch = %b.name, port = b.port, error = %e, "cannot listen on the branch's port");
                    if let Ok(mut m) = self.inner.port_errors.lock() {
                        m.insert(
                            b.name.clone(),
                            format!(
                                "cannot listen on port {}: {e} (is another program using it?)",
                                b.port
                            ),
                        );
                    }
                }
            }
        }
        for r in self.store().restores()? {
            if r.state == RESTORING && r.restored_branch.is_none() {
                self.store().set_restore_state(
                    &r.id,
                    FAILED,
                    Some("interrupted: the daemon stopped during the restore; run it again"),
                )?;
                if let Some(tl) = r.timeline {
                    let engine = self.engine().clone();
                    tokio::spawn(async move {
                        let _ = engine.delete_timeline(&tl).await;
                    });
                }
            }
        }
        let d = self.clone();
        tokio::spawn(async move {
            for b in branches {
                if b.state == CREATING {
                    tokio::spawn(d.clone().create_task(b.name.clone()));
                } else if b.state == READY && b.want_running {
                    if let Err(e) = d.start_branch(&b.name).await {
                        tracing::error!(branch = %b.name, error = %e, "could not start the branch's compute");
                    }
                }
            }
        });
        Ok(())
    }

    fn set_proxy(&self, name: &str, p: Proxy) {
        if let Ok(mut m) = self.inner.proxies.lock() {
            m.insert(name.to_string(), p);
        }
    }

    fn set_backend(&self, name: &str, b: Backend) {
        if let Ok(m) = self.inner.proxies.lock() {
            if let Some(p) = m.get(name) {
                p.set_backend(b);
            }
        }
    }

    fn remove_proxy(&self, name: &str) {
        let p = self
            .inner
            .proxies
            .lock()
            .ok()
            .and_then(|mut m| m.remove(name));
        drop(p);
    }

    fn starting(&self, name: &str, on: bool) {
        if let Ok(mut s) = self.inner.starting.lock() {
            if on {
                s.insert(name.to_string());
            } else {
                s.remove(name);
            }
        }
    }

    fn is_starting(&self, name: &str) -> bool {
        self.inner
            .starting
            .lock()
            .map(|s| s.contains(name))
            .unwrap_or(false)
    }

    async fn stop_all(&self) {
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
    fn alloc_port(&self) -> Result<tokio::net::TcpListener, LocalError> {
        let used: HashSet<u16> = self.store().branches()?.iter().map(|b| b.port).collect();
        let base = self.inner.port_base;
        for port in base..=base.saturating_add(2000) {
            if used.contains(&port) {
                continue;
            }
            if let Ok(l) = bind_port(port) {
                return Ok(l);
            }
        }
        Err(LocalError::Conflict(format!(
            "no free local port in {base}..{}",
            base.saturating_add(2000)
        )))
    }

    fn branch(&self, name: &str) -> Result<BranchRow, LocalError> {
        self.store()
            .branch(name)?
            .ok_or_else(|| LocalError::NotFound(format!("branch {name:?} not found")))
    }

    fn ready_timeline(b: &BranchRow) -> Result<TimelineId, LocalError> {
        match (&b.timeline, b.state.as_str()) {
            (Some(tl), READY) => Ok(tl.clone()),
            _ => Err(LocalError::Conflict(format!(
                "branch {:?} is {}, not ready",
                b.name, b.state
            ))),
        }
    }

    /// How the engine can reach a running compute of `tl` (to checkpoint it
    /// or switch WAL before copying).
    async fn source_connection(&self, tl: &TimelineId) -> Result<Option<ConnInfo>, LocalError> {
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

    /// Starts a compute on `tl` (or finds the running one) and gives the
    /// superuser `password` before anyone is let in.
    async fn start_compute(&self, tl: &TimelineId, password: &str) -> Result<u16, LocalError> {
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
    async fn start_branch(&self, name: &str) -> Result<(), LocalError> {
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

    async fn stop_branch(&self, name: &str) -> Result<(), LocalError> {
        let _g = self.inner.ops.lock().await;
        let b = self.branch(name)?;
        self.store().set_want_running(name, false)?;
        self.set_backend(name, Backend::Down);
        if let Some(tl) = &b.timeline {
            let s = self.inner.computes.lock().await.remove(tl);
            if let Some(s) = s {
                s.stop(StopMode::Fast).await?;
            }
        }
        Ok(())
    }

    /// Records a new branch and starts its creation in the background.
    async fn create_branch(&self, req: CreateBranchRequest) -> Result<BranchView, LocalError> {
        check_name("branch", &req.name)?;
        let _g = self.inner.ops.lock().await;
        if self.store().branch(&req.name)?.is_some() {
            return Err(LocalError::Conflict(format!(
                "branch {:?} already exists",
                req.name
            )));
        }
        let source = match &req.parent {
            Some(p) => {
                let pb = self.branch(p)?;
                Source::Timeline {
                    timeline: Self::ready_timeline(&pb)?,
                    point: req.point,
                }
            }
            None => {
                if req.point != Point::Head {
                    return Err(LocalError::Invalid(
                        "a root branch (no parent) cannot be taken at a point".into(),
                    ));
                }
                Source::Empty {
                    superuser_password: None,
                }
            }
        };
        let point = req.parent.as_ref().map(|_| req.point);
        self.insert_creating(
            &req.name,
            source,
            req.parent.clone(),
            point,
            req.protected,
            None,
        )?;
        drop(_g);
        self.view(&self.branch(&req.name)?, true).await
    }

    /// Inserts a `creating` branch, binds its port and spawns its creation.
    fn insert_creating(
        &self,
        name: &str,
        source: Source,
        parent: Option<String>,
        point: Option<Point>,
        protected: bool,
        restore_target: Option<String>,
    ) -> Result<(), LocalError> {
        let listener = self.alloc_port()?;
        let port = listener
            .local_addr()
            .map_err(|e| LocalError::io("reading a bound port", e))?
            .port();
        let row = BranchRow {
            name: name.to_string(),
            timeline: None,
            op_key: format!("branch-{}", short_id()),
            source,
            parent,
            point,
            port,
            password: random_password(),
            protected,
            want_running: true,
            state: CREATING.into(),
            error: None,
            restore_target,
            created_at: jiff::Timestamp::now(),
        };
        self.store().insert_branch(&row)?;
        let proxy = Proxy::serve(listener, Backend::Starting)
            .map_err(|e| LocalError::io("starting the branch's proxy", e))?;
        self.set_proxy(name, proxy);
        tokio::spawn(self.clone().create_task(name.to_string()));
        Ok(())
    }

    async fn create_task(self, name: String) {
        if let Err(e) = self.materialize(&name).await {
            tracing::error!(branch = %name, error = %e, "branch creation failed");
            self.set_backend(&name, Backend::Down);
            let _ = self
                .store()
                .set_branch_state(&name, FAILED, Some(&e.to_string()));
            if let Ok(Some(r)) = self.store().restore_of_preview(&name) {
                let _ = self
                    .store()
                    .set_restore_state(&r.id, FAILED, Some(&e.to_string()));
            }
        }
    }

    async fn materialize(&self, name: &str) -> Result<(), LocalError> {
        let b = self.branch(name)?;
        let source = match &b.source {
            Source::Empty { .. } => Source::Empty {
                superuser_password: Some(Password(b.password.clone())),
            },
            s => s.clone(),
        };
        let conn = match &source {
            Source::Timeline { timeline, .. } => self.source_connection(timeline).await?,
            _ => None,
        };
        let tl = self
            .engine()
            .create_timeline(CreateTimeline {
                key: OpKey::new(b.op_key.clone())?,
                source,
                source_connection: conn,
                label: Some(format!("local/{name}")),
            })
            .await?;
        self.store().set_branch_timeline(name, &tl.id)?;
        wait_timeline_ready(self.engine(), &tl.id, CREATE_TIMEOUT).await?;
        if b.want_running {
            // Never seen as `stopped` between ready and started.
            self.starting(name, true);
        }
        self.store().set_branch_state(name, READY, None)?;
        if let Some(r) = self.store().restore_of_preview(name)? {
            self.store()
                .set_restore_state(&r.id, AWAITING_FINALIZE, None)?;
        }
        tracing::info!(branch = name, timeline = %tl.id, "branch created");
        if b.want_running {
            let r = self.start_branch(name).await;
            self.starting(name, false);
            r?;
        }
        Ok(())
    }

    async fn delete_branch(&self, name: &str) -> Result<(), LocalError> {
        let _g = self.inner.ops.lock().await;
        let b = self.branch(name)?;
        if b.protected {
            return Err(LocalError::Conflict(format!(
                "branch {name:?} is protected: unprotect it first (branch set {name} --protected false)"
            )));
        }
        let mut children = self.store().children(name)?;
        children.extend(
            self.store()
                .branches()?
                .into_iter()
                .filter(|c| c.restore_target.as_deref() == Some(name))
                .map(|c| c.name),
        );
        if !children.is_empty() {
            return Err(LocalError::Conflict(format!(
                "branch {name:?} has child branches ({}): delete them first",
                children.join(", ")
            )));
        }
        if b.state == CREATING {
            return Err(LocalError::Conflict(format!(
                "branch {name:?} is still being created; delete it once it is ready or failed"
            )));
        }
        self.remove_proxy(name);
        if let Some(tl) = &b.timeline {
            let s = self.inner.computes.lock().await.remove(tl);
            if let Some(s) = s {
                let _ = s.stop(StopMode::Immediate).await;
            }
            self.engine().delete_timeline(tl).await?;
        }
        if let Some(r) = self.store().restore_of_preview(name)? {
            self.store().set_restore_state(
                &r.id,
                FAILED,
                Some("its preview branch was deleted"),
            )?;
        }
        self.store().delete_branch(name)?;
        tracing::info!(branch = name, "branch deleted");
        Ok(())
    }

    /// A branch as shown. `brief` skips the storage's measurements (size,
    /// LSN), which can take a while; progress is always there.
    async fn view(&self, b: &BranchRow, brief: bool) -> Result<BranchView, LocalError> {
        let tl = match &b.timeline {
            Some(id) if !brief || b.state == CREATING => match self.engine().get_timeline(id).await
            {
                Ok(t) => Some(t),
                Err(StorageError::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            },
            _ => None,
        };
        let (running, exited) = match &b.timeline {
            Some(id) => match self.inner.computes.lock().await.get(id) {
                Some(s) if postmaster_alive(&s.data_dir) => (true, None),
                Some(s) => (
                    false,
                    Some(format!(
                        "its postgres exited (log: {}); `pgbranch local start {}` starts it again",
                        s.log.display(),
                        b.name
                    )),
                ),
                None => (false, None),
            },
            None => (false, None),
        };
        let state = if b.state == READY {
            if self.is_starting(&b.name) {
                "starting"
            } else if running {
                "running"
            } else if exited.is_some() {
                "exited"
            } else {
                "stopped"
            }
        } else {
            b.state.as_str()
        };
        Ok(BranchView {
            name: b.name.clone(),
            timeline: b.timeline.as_ref().map(|t| t.to_string()),
            parent: b.parent.clone(),
            point: b.point,
            parent_lsn: tl.as_ref().and_then(|t| t.lineage.parent_lsn),
            lsn: tl.as_ref().and_then(|t| t.lsn),
            logical_size_bytes: tl.as_ref().map(|t| t.logical_size_bytes).unwrap_or(0),
            port: b.port,
            state: state.to_string(),
            protected: b.protected,
            error: b.error.clone().or(exited).or_else(|| {
                self.inner
                    .port_errors
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&b.name).cloned())
            }),
            progress: tl
                .as_ref()
                .filter(|t| t.state == State::Creating)
                .and_then(|t| t.progress.clone()),
            restore_target: b.restore_target.clone(),
            created_at: b.created_at,
            connection_string: connection_string(b.port, &b.password),
        })
    }

    /// Records a snapshot and asks the engine for it in the background (a
    /// head copy in backup mode, or a replay, can take a while).
    async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<SnapshotView, LocalError> {
        let _g = self.inner.ops.lock().await;
        let b = self.branch(&req.branch)?;
        let tl = Self::ready_timeline(&b)?;
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-{}", req.branch, now_stamp()));
        check_name("snapshot", &name)?;
        if self.store().snapshot(&name)?.is_some() {
            return Err(LocalError::Conflict(format!(
                "snapshot {name:?} already exists"
            )));
        }
        let row = SnapshotRow {
            name: name.clone(),
            id: None,
            op_key: format!("snap-{}", short_id()),
            error: None,
            branch: req.branch,
            timeline: tl.clone(),
            point: req.point,
            created_at: jiff::Timestamp::now(),
        };
        self.store().insert_snapshot(&row)?;
        let conn = self.source_connection(&tl).await?;
        let d = self.clone();
        let key = OpKey::new(row.op_key.clone())?;
        tokio::spawn(async move {
            let r = d
                .engine()
                .create_snapshot(CreateSnapshot {
                    key,
                    timeline: tl,
                    point: req.point,
                    source_connection: conn,
                    label: Some(format!("local/{name}")),
                })
                .await;
            let stored = match &r {
                Ok(s) => d.store().set_snapshot_result(&name, Some(&s.id), None),
                Err(e) => {
                    tracing::error!(snapshot = %name, error = %e, "snapshot failed");
                    d.store()
                        .set_snapshot_result(&name, None, Some(&e.to_string()))
                }
            };
            if let Err(e) = stored {
                tracing::error!(snapshot = %name, error = %e, "recording a snapshot failed");
            }
        });
        drop(_g);
        self.snapshot_view(&row).await
    }

    /// The engine's snapshot for a row: by id, or by key while the engine
    /// has not answered yet.
    async fn engine_snapshot(
        &self,
        s: &SnapshotRow,
    ) -> Result<Option<crate::storage::Snapshot>, LocalError> {
        match &s.id {
            Some(id) => match self.engine().get_snapshot(id).await {
                Ok(x) => Ok(Some(x)),
                Err(StorageError::NotFound { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            },
            None => Ok(self
                .engine()
                .list_snapshots()
                .await?
                .into_iter()
                .find(|x| x.key.as_str() == s.op_key)),
        }
    }

    async fn snapshot_view(&self, s: &SnapshotRow) -> Result<SnapshotView, LocalError> {
        let (state, lsn, size, error, progress) = match (self.engine_snapshot(s).await?, &s.error) {
            (Some(x), _) => (
                match x.state {
                    State::Creating => "creating",
                    State::Ready => "ready",
                    State::Failed => "failed",
                    State::Deleting => "deleting",
                },
                x.lsn,
                x.size_bytes,
                x.error,
                x.progress,
            ),
            (None, Some(e)) => ("failed", None, 0, Some(e.clone()), None),
            (None, None) if s.id.is_none() => ("creating", None, 0, None, None),
            (None, None) => (
                "missing",
                None,
                0,
                Some("not in the storage engine".into()),
                None,
            ),
        };
        Ok(SnapshotView {
            name: s.name.clone(),
            id: s.id.as_ref().map(|i| i.to_string()),
            branch: s.branch.clone(),
            point: s.point,
            lsn,
            size_bytes: size,
            state: state.to_string(),
            error,
            progress,
            created_at: s.created_at,
        })
    }

    async fn delete_snapshot(&self, name: &str) -> Result<(), LocalError> {
        let _g = self.inner.ops.lock().await;
        let s = self
            .store()
            .snapshot(name)?
            .ok_or_else(|| LocalError::NotFound(format!("snapshot {name:?} not found")))?;
        let id = match &s.id {
            Some(id) => Some(id.clone()),
            None => self.engine_snapshot(&s).await?.map(|x| x.id),
        };
        match id {
            Some(id) => self.engine().delete_snapshot(&id).await?,
            None if s.error.is_none() => {
                return Err(LocalError::Conflict(format!(
                    "snapshot {name:?} is still being requested; retry in a moment"
                )))
            }
            None => {}
        }
        self.store().delete_snapshot(name)?;
        Ok(())
    }

    async fn restore(&self, req: RestoreRequest) -> Result<RestoreView, LocalError> {
        let _g = self.inner.ops.lock().await;
        let target = self.branch(&req.target)?;
        Self::ready_timeline(&target)?;
        let (source, desc, parent, point) = match (&req.snapshot, &req.source_branch) {
            (Some(s), None) => {
                let row = self
                    .store()
                    .snapshot(s)?
                    .ok_or_else(|| LocalError::NotFound(format!("snapshot {s:?} not found")))?;
                let snap = self.engine_snapshot(&row).await?;
                let Some(snap) = snap.filter(|x| x.state == State::Ready) else {
                    return Err(LocalError::Conflict(format!("snapshot {s:?} is not ready")));
                };
                (
                    Source::Snapshot { snapshot: snap.id },
                    format!("snapshot {s}"),
                    None,
                    None,
                )
            }
            (None, Some(bname)) => {
                let sb = self.branch(bname)?;
                if *bname == req.target && req.preserve_under_name.is_none() {
                    return Err(LocalError::Invalid(format!(
                        "restoring {bname:?} to its own past replaces its data: pass --preserve-under-name NAME to keep its current state as a backup branch"
                    )));
                }
                (
                    Source::Timeline {
                        timeline: Self::ready_timeline(&sb)?,
                        point: req.point,
                    },
                    format!("{bname}@{}", req.point),
                    Some(bname.clone()),
                    Some(req.point),
                )
            }
            _ => {
                return Err(LocalError::Invalid(
                    "give exactly one source: a snapshot, or a branch and a point".into(),
                ))
            }
        };
        if let Some(p) = &req.preserve_under_name {
            check_name("branch", p)?;
            if self.store().branch(p)?.is_some() {
                return Err(LocalError::Conflict(format!("branch {p:?} already exists")));
            }
        }
        let id = short_id();
        let mut row = RestoreRow {
            id: id.clone(),
            target: req.target.clone(),
            source: desc,
            finalize: req.finalize,
            preserve: req.preserve_under_name.clone(),
            restored_branch: None,
            timeline: None,
            backup_branch: None,
            state: RESTORING.into(),
            error: None,
            started_at: jiff::Timestamp::now(),
            completed_at: None,
        };
        if req.finalize {
            let conn = match &source {
                Source::Timeline { timeline, .. } => self.source_connection(timeline).await?,
                _ => None,
            };
            self.store().insert_restore(&row)?;
            tokio::spawn(self.clone().one_step(id.clone(), source, conn));
        } else {
            let name = req
                .name
                .clone()
                .unwrap_or_else(|| format!("{}-restore-{}", req.target, now_stamp()));
            check_name("branch", &name)?;
            if self.store().branch(&name)?.is_some() {
                return Err(LocalError::Conflict(format!(
                    "branch {name:?} already exists"
                )));
            }
            row.restored_branch = Some(name.clone());
            self.store().insert_restore(&row)?;
            self.insert_creating(
                &name,
                source,
                parent,
                point,
                false,
                Some(req.target.clone()),
            )?;
        }
        drop(_g);
        self.restore_view(&row).await
    }

    async fn one_step(self, id: String, source: Source, conn: Option<ConnInfo>) {
        let mut created: Option<TimelineId> = None;
        let r = async {
            let row = self
                .store()
                .restore(&id)?
                .ok_or_else(|| LocalError::NotFound(format!("restore {id} not found")))?;
            let tl = self
                .engine()
                .create_timeline(CreateTimeline {
                    key: OpKey::new(format!("restore-{id}"))?,
                    source,
                    source_connection: conn,
                    label: Some(format!("local/{} restore {id}", row.target)),
                })
                .await?;
            created = Some(tl.id.clone());
            self.store().set_restore_timeline(&id, &tl.id)?;
            wait_timeline_ready(self.engine(), &tl.id, CREATE_TIMEOUT).await?;
            let _g = self.inner.ops.lock().await;
            self.finalize_locked(&row, &tl.id, None).await
        }
        .await;
        if let Err(e) = r {
            tracing::error!(restore = %id, error = %e, "restore failed");
            let _ = self
                .store()
                .set_restore_state(&id, FAILED, Some(&e.to_string()));
            if let Some(tl) = created {
                let s = self.inner.computes.lock().await.remove(&tl);
                if let Some(s) = s {
                    let _ = s.stop(StopMode::Immediate).await;
                }
                let _ = self.engine().delete_timeline(&tl).await;
            }
        }
    }

    /// The switch of a restore (ops lock held): the restored timeline's
    /// compute is started with the target's password and made the target
    /// port's backend; the old compute is stopped; the old timeline stays
    /// as the backup branch.
    async fn finalize_locked(
        &self,
        r: &RestoreRow,
        new_tl: &TimelineId,
        preview: Option<&str>,
    ) -> Result<(), LocalError> {
        let target = self.branch(&r.target)?;
        let old_tl = Self::ready_timeline(&target)?;
        let backup = r
            .preserve
            .clone()
            .unwrap_or_else(|| format!("{}-old-{}", r.target, now_stamp()));
        check_name("branch", &backup)?;
        if self.store().branch(&backup)?.is_some() {
            return Err(LocalError::Conflict(format!(
                "branch {backup:?} already exists"
            )));
        }
        let listener = self.alloc_port()?;
        let backup_port = listener
            .local_addr()
            .map_err(|e| LocalError::io("reading a bound port", e))?
            .port();
        let new_running = self.inner.computes.lock().await.contains_key(new_tl);
        let backend = if target.want_running || new_running {
            let port = self.start_compute(new_tl, &target.password).await?;
            Backend::Up(local_addr(port))
        } else {
            Backend::Down
        };
        self.set_backend(&r.target, backend);
        let old = self.inner.computes.lock().await.remove(&old_tl);
        if let Some(s) = old {
            if let Err(e) = s.stop(StopMode::Immediate).await {
                tracing::warn!(timeline = %old_tl, error = %e, "old compute did not stop cleanly");
            }
        }
        if let Some(p) = preview {
            self.remove_proxy(p);
        }
        self.store().finalize(&Finalize {
            target: &r.target,
            new_timeline: new_tl,
            preview,
            backup_name: &backup,
            backup_port,
            backup_password: &random_password(),
            restore_id: &r.id,
        })?;
        let proxy = Proxy::serve(listener, Backend::Down)
            .map_err(|e| LocalError::io("starting the backup branch's proxy", e))?;
        self.set_proxy(&backup, proxy);
        tracing::info!(target = %r.target, backup = %backup, "restore finalized");
        Ok(())
    }

    async fn finalize(
        &self,
        preview: &str,
        req: FinalizeRequest,
    ) -> Result<RestoreView, LocalError> {
        let _g = self.inner.ops.lock().await;
        let b = self.branch(preview)?;
        let mut r = self.store().restore_of_preview(preview)?.ok_or_else(|| {
            LocalError::Conflict(format!(
                "branch {preview:?} is not the preview of a restore waiting to be finalized"
            ))
        })?;
        let tl = Self::ready_timeline(&b)?;
        if let Some(p) = req.preserve_under_name {
            check_name("branch", &p)?;
            r.preserve = Some(p);
        }
        self.finalize_locked(&r, &tl, Some(preview)).await?;
        drop(_g);
        let r = self
            .store()
            .restore(&r.id)?
            .ok_or_else(|| LocalError::NotFound(format!("restore {} not found", r.id)))?;
        self.restore_view(&r).await
    }

    async fn restore_view(&self, r: &RestoreRow) -> Result<RestoreView, LocalError> {
        let tl = match (&r.timeline, &r.restored_branch) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(b)) => self.store().branch(b)?.and_then(|b| b.timeline),
            _ => None,
        };
        let progress = match (&tl, r.state.as_str()) {
            (Some(t), RESTORING) => self
                .engine()
                .get_timeline(t)
                .await
                .ok()
                .and_then(|t| t.progress),
            _ => None,
        };
        Ok(RestoreView {
            id: r.id.clone(),
            target: r.target.clone(),
            source: r.source.clone(),
            finalize: r.finalize,
            state: r.state.clone(),
            error: r.error.clone(),
            progress,
            restored_branch: r.restored_branch.clone(),
            backup_branch: r.backup_branch.clone(),
            started_at: r.started_at,
            completed_at: r.completed_at,
        })
    }

    async fn status(&self) -> Result<StatusView, LocalError> {
        let info = self.engine().info().await?;
        Ok(StatusView {
            pid: std::process::id(),
            dir: self.inner.paths.dir.display().to_string(),
            driver: info.driver.to_string(),
            pg_major: info.pg_major,
            branches: self.store().branches()?.len(),
            running: self.inner.computes.lock().await.len(),
        })
    }
}

async fn set_password(s: &PgServer, password: &str) -> Result<(), LocalError> {
    let c = s.connect("postgres").await?;
    c.batch_execute(&format!("ALTER ROLE postgres WITH PASSWORD '{password}'"))
        .await
        .map_err(|e| LocalError::Daemon(format!("setting the branch's password: {e}")))
}

// ---------------------------------------------------------------- HTTP

struct ApiError(LocalError);

impl From<LocalError> for ApiError {
    fn from(e: LocalError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            LocalError::NotFound(_) => StatusCode::NOT_FOUND,
            LocalError::Invalid(_) => StatusCode::BAD_REQUEST,
            LocalError::Conflict(_) => StatusCode::CONFLICT,
            LocalError::Storage(e) => match e {
                StorageError::NotFound { .. } => StatusCode::NOT_FOUND,
                StorageError::InvalidArgument { .. } | StorageError::InvalidPoint { .. } => {
                    StatusCode::BAD_REQUEST
                }
                StorageError::Conflict { .. } | StorageError::Busy { .. } => StatusCode::CONFLICT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (
            status,
            Json(ErrorBody {
                error: self.0.to_string(),
            }),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// `?brief=true`: skip size and LSN (cheap, for polling).
#[derive(Debug, serde::Deserialize)]
struct ViewQuery {
    brief: Option<bool>,
}

fn router(d: Daemon) -> Router {
    Router::new()
        .route("/status", get(h_status))
        .route("/shutdown", post(h_shutdown))
        .route("/branches", get(h_branches).post(h_create_branch))
        .route(
            "/branches/{name}",
            get(h_branch).delete(h_delete_branch).patch(h_set_branch),
        )
        .route("/branches/{name}/start", post(h_start))
        .route("/branches/{name}/stop", post(h_stop))
        .route("/branches/{name}/finalize", post(h_finalize))
        .route("/snapshots", get(h_snapshots).post(h_create_snapshot))
        .route(
            "/snapshots/{name}",
            get(h_snapshot).delete(h_delete_snapshot),
        )
        .route("/restores", get(h_restores).post(h_restore))
        .route("/restores/{id}", get(h_restore_get))
        .with_state(d)
}

async fn h_status(AxState(d): AxState<Daemon>) -> ApiResult<StatusView> {
    Ok(Json(d.status().await?))
}

async fn h_shutdown(AxState(d): AxState<Daemon>) -> ApiResult<serde_json::Value> {
    d.inner.shutdown.cancel();
    Ok(Json(serde_json::json!({"stopping": true})))
}

async fn h_branches(
    AxState(d): AxState<Daemon>,
    Query(q): Query<ViewQuery>,
) -> ApiResult<Vec<BranchView>> {
    let brief = q.brief.unwrap_or(false);
    let rows = d.store().branches()?;
    let views = futures::future::join_all(rows.iter().map(|b| d.view(b, brief))).await;
    Ok(Json(views.into_iter().collect::<Result<Vec<_>, _>>()?))
}

async fn h_branch(
    AxState(d): AxState<Daemon>,
    Query(q): Query<ViewQuery>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<BranchView> {
    let b = d.branch(&name)?;
    Ok(Json(d.view(&b, q.brief.unwrap_or(false)).await?))
}

async fn h_create_branch(
    AxState(d): AxState<Daemon>,
    Json(req): Json<CreateBranchRequest>,
) -> ApiResult<BranchView> {
    Ok(Json(d.create_branch(req).await?))
}

async fn h_delete_branch(
    AxState(d): AxState<Daemon>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    d.delete_branch(&name).await?;
    Ok(Json(serde_json::json!({"deleted": name})))
}

async fn h_set_branch(
    AxState(d): AxState<Daemon>,
    Query(q): Query<ViewQuery>,
    UrlPath(name): UrlPath<String>,
    Json(req): Json<SetBranchRequest>,
) -> ApiResult<BranchView> {
    {
        let _g = d.inner.ops.lock().await;
        d.branch(&name)?;
        if let Some(p) = req.protected {
            d.store().set_protected(&name, p)?;
        }
    }
    let b = d.branch(&name)?;
    Ok(Json(d.view(&b, q.brief.unwrap_or(false)).await?))
}

async fn h_start(
    AxState(d): AxState<Daemon>,
    Query(q): Query<ViewQuery>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<BranchView> {
    d.start_branch(&name).await?;
    let b = d.branch(&name)?;
    Ok(Json(d.view(&b, q.brief.unwrap_or(false)).await?))
}

async fn h_stop(
    AxState(d): AxState<Daemon>,
    Query(q): Query<ViewQuery>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<BranchView> {
    d.stop_branch(&name).await?;
    let b = d.branch(&name)?;
    Ok(Json(d.view(&b, q.brief.unwrap_or(false)).await?))
}

async fn h_finalize(
    AxState(d): AxState<Daemon>,
    UrlPath(name): UrlPath<String>,
    Json(req): Json<FinalizeRequest>,
) -> ApiResult<RestoreView> {
    Ok(Json(d.finalize(&name, req).await?))
}

async fn h_snapshots(AxState(d): AxState<Daemon>) -> ApiResult<Vec<SnapshotView>> {
    let rows = d.store().snapshots()?;
    let views = futures::future::join_all(rows.iter().map(|s| d.snapshot_view(s))).await;
    Ok(Json(views.into_iter().collect::<Result<Vec<_>, _>>()?))
}

async fn h_snapshot(
    AxState(d): AxState<Daemon>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<SnapshotView> {
    let s = d
        .store()
        .snapshot(&name)?
        .ok_or_else(|| LocalError::NotFound(format!("snapshot {name:?} not found")))?;
    Ok(Json(d.snapshot_view(&s).await?))
}

async fn h_create_snapshot(
    AxState(d): AxState<Daemon>,
    Json(req): Json<CreateSnapshotRequest>,
) -> ApiResult<SnapshotView> {
    Ok(Json(d.create_snapshot(req).await?))
}

async fn h_delete_snapshot(
    AxState(d): AxState<Daemon>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    d.delete_snapshot(&name).await?;
    Ok(Json(serde_json::json!({"deleted": name})))
}

async fn h_restores(AxState(d): AxState<Daemon>) -> ApiResult<Vec<RestoreView>> {
    let mut out = Vec::new();
    for r in d.store().restores()? {
        out.push(d.restore_view(&r).await?);
    }
    Ok(Json(out))
}

async fn h_restore(
    AxState(d): AxState<Daemon>,
    Json(req): Json<RestoreRequest>,
) -> ApiResult<RestoreView> {
    Ok(Json(d.restore(req).await?))
}

async fn h_restore_get(
    AxState(d): AxState<Daemon>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<RestoreView> {
    let r = d
        .store()
        .restore(&id)?
        .ok_or_else(|| LocalError::NotFound(format!("restore {id:?} not found")))?;
    Ok(Json(d.restore_view(&r).await?))
}
