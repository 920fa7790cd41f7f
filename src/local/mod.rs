//! Local mode: the storage engine without Kubernetes, with real `postgres`
//! processes as computes (like `neon_local`).
//!
//! A daemon (`pgbranch local up`) owns, for one local directory:
//! * the embedded [`Engine`](crate::storage::engine::Engine) (volume under
//!   `<dir>/storage`);
//! * the name store ([`store`], `<dir>/local.sqlite`): branch name →
//!   timeline, parent, point, fixed port, password, protected;
//! * one `postgres` per running branch, on a private port;
//! * one [`proxy`] per branch on its fixed port, whose backend is the
//!   branch's current compute (a restore's finalize switches it);
//! * a control API ([`api`]) as JSON over HTTP on the Unix socket
//!   `<dir>/daemon.sock` (mode 0600: only its owner can use it); the
//!   command line talks to it with [`client`].
//!
//! Files in the directory: `daemon.pid`, `daemon.sock`, `daemon.log`,
//! `local.sqlite`, `storage/`.

pub mod api;
pub mod client;
pub mod daemon;
pub mod proxy;
pub mod store;

use std::path::{Path, PathBuf};

use crate::storage::StorageError;

/// Errors of local mode.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("metadata store: {0}")]
    Store(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Daemon(String),
}

impl LocalError {
    pub(crate) fn io(what: &str, e: impl std::fmt::Display) -> Self {
        LocalError::Io(format!("{what}: {e}"))
    }
}

/// The files of a local directory.
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Paths {
        Paths {
            dir: dir.to_path_buf(),
        }
    }
    pub fn store(&self) -> PathBuf {
        self.dir.join("local.sqlite")
    }
    pub fn storage(&self) -> PathBuf {
        self.dir.join("storage")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("daemon.sock")
    }
    pub fn pid(&self) -> PathBuf {
        self.dir.join("daemon.pid")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }
}

/// A connection string for a branch on its fixed port.
pub fn connection_string(port: u16, password: &str) -> String {
    format!("postgresql://postgres:{password}@127.0.0.1:{port}/postgres")
}

/// A random password of 24 letters and digits (safe in URLs and SQL
/// literals).
pub fn random_password() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 24)
}

/// The pid recorded in the pid file, when that process is alive.
pub fn daemon_pid(paths: &Paths) -> Option<i32> {
    let text = std::fs::read_to_string(paths.pid()).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    if pid <= 0 {
        return None;
    }
    process_alive(pid).then_some(pid)
}

/// Whether a process runs (a zombie, dead but not yet reaped by the
/// daemon that started it, does not).
pub fn process_alive(pid: i32) -> bool {
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
        return false;
    }
    // /proc/<pid>/stat: "pid (comm) S ..."; comm may hold spaces.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => true,
    }
}
