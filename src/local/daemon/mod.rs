//! The local daemon: owns the engine, the computes and the proxies of one
//! local directory, and serves the control API on its Unix socket.
//!
//! Structural changes (create, delete, start, stop, finalize) are serialized
//! by one lock; the long part of a creation (copy, WAL replay) runs in a
//! background task that only records its result, so `list` and progress
//! polling stay responsive.
//!
//! Where things are:
//! * this file: the daemon's state ([`Daemon`]), [`run`] (start-up, serving,
//!   shutdown), bringing branches back after a restart, and the lookups
//!   every operation shares;
//! * `http`: the control API's routes and how errors become HTTP statuses;
//! * `compute`: process supervision: the `postgres` of each running branch,
//!   its password, ports, and the proxies on the branches' fixed ports;
//! * `branches`: creating (in the background), deleting and showing branches;
//! * `snapshots`: taking, showing and deleting snapshots;
//! * `restores`: one-step and multi-step restores and their finalize switch.

mod branches;
mod compute;
mod http;
mod restores;
mod snapshots;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::api::StatusView;
use super::proxy::{Backend, Proxy};
use super::store::{BranchRow, RestoreRow, SnapshotRow, Store, CREATING, FAILED, READY, RESTORING};
use super::{LocalError, Paths};
use crate::storage::engine::{Engine, EngineConfig, PgServer};
use crate::storage::{validate_id, DriverKind, Storage, TimelineId};

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

/// `yyyymmddhhmmss` of now, for default names.
fn now_stamp() -> String {
    jiff::Timestamp::now().strftime("%Y%m%d%H%M%S").to_string()
}

/// 12 random hex digits, for operation keys and restore ids.
fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// Refuses a name the engine's ids would refuse.
fn check_name(kind: &str, name: &str) -> Result<(), LocalError> {
    validate_id(kind, name).map_err(|_| {
        LocalError::Invalid(format!(
            "{kind} name {name:?} is not valid: use 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"
        ))
    })
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
    let served = axum::serve(listener, http::router(daemon.clone()))
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
            match compute::bind_port(b.port).and_then(|l| Proxy::serve(l, initial)) {
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

    fn branch(&self, name: &str) -> Result<BranchRow, LocalError> {
        self.store()
            .branch(name)?
            .ok_or_else(|| LocalError::NotFound(format!("branch {name:?} not found")))
    }

    fn snapshot(&self, name: &str) -> Result<SnapshotRow, LocalError> {
        self.store()
            .snapshot(name)?
            .ok_or_else(|| LocalError::NotFound(format!("snapshot {name:?} not found")))
    }

    fn restore_row(&self, id: &str) -> Result<RestoreRow, LocalError> {
        self.store()
            .restore(id)?
            .ok_or_else(|| LocalError::NotFound(format!("restore {id:?} not found")))
    }

    /// Refuses `name` for a new branch: not a valid name, or taken.
    fn check_new_branch(&self, name: &str) -> Result<(), LocalError> {
        check_name("branch", name)?;
        if self.store().branch(name)?.is_some() {
            return Err(LocalError::Conflict(format!(
                "branch {name:?} already exists"
            )));
        }
        Ok(())
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

    /// What `local status` shows.
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
