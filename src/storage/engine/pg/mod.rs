//! Running PostgreSQL's own programs (`initdb`, `postgres`, `pg_controldata`,
//! `pg_waldump`, `pg_dumpall`, `psql`) as the non-root `run_as` user, and the
//! [`PgServer`] handle of a running `postgres` (in [`server`]).

mod server;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::process::{Child, Command};

use crate::storage::{Lsn, StorageError};

pub(crate) use server::kill_leftover;
pub use server::{PgServer, StopMode};

/// The user PostgreSQL programs run as.
#[derive(Debug, Clone)]
pub(crate) struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Where the binaries are and whom they run as.
#[derive(Debug, Clone)]
pub(crate) struct PgEnv {
    pub bin: PathBuf,
    /// `None`: run as the current user, no switch.
    pub user: Option<RunAs>,
    pub major: u32,
}

fn io_err(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::internal(format!("{what}: {e}"))
}

/// The newest `/usr/lib/postgresql/<major>/bin`.
pub(crate) fn find_bin_dir() -> Option<PathBuf> {
    let mut best: Option<(u32, PathBuf)> = None;
    for e in fs::read_dir("/usr/lib/postgresql").ok()?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Ok(v) = name.parse::<u32>() {
            let bin = e.path().join("bin");
            if bin.join("postgres").exists() && best.as_ref().map(|(b, _)| v > *b).unwrap_or(true) {
                best = Some((v, bin));
            }
        }
    }
    best.map(|(_, p)| p)
}

pub(crate) fn resolve_user(name: &str) -> Result<RunAs, StorageError> {
    let u = nix::unistd::User::from_name(name)
        .map_err(|e| io_err("looking up the run_as user", e))?
        .ok_or_else(|| StorageError::invalid(format!("run_as user {name:?} does not exist")))?;
    Ok(RunAs {
        name: name.to_string(),
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
    })
}

/// Called with `pg_last_wal_replay_lsn()` while a server recovers; what it
/// returns (e.g. a progress write) is awaited before the next poll.
pub(crate) type OnReplay<'a> = &'a (dyn Fn(Lsn) -> BoxFuture<'static, ()> + Send + Sync);

/// Whom PostgreSQL programs run as, from `run_as`: that user (no switch
/// when it is the current one), else `postgres` when running as root, else
/// the current user (`None`: no switch). Never root.
pub(crate) fn run_as_user(run_as: Option<&str>) -> Result<Option<RunAs>, StorageError> {
    let euid = nix::unistd::geteuid();
    let user = match (run_as, euid.is_root()) {
        (Some(name), _) => Some(resolve_user(name)?).filter(|u| u.uid != euid.as_raw()),
        (None, true) => Some(resolve_user("postgres")?),
        (None, false) => None,
    };
    if user.as_ref().is_some_and(|u| u.uid == 0) {
        return Err(StorageError::invalid(
            "run_as must not be root: initdb and postgres refuse to run as root",
        ));
    }
    Ok(user)
}

impl super::EngineConfig {
    /// The uid an engine opened with this configuration runs PostgreSQL
    /// as, so owns its data directories with: computes must run as it.
    pub fn postgres_uid(&self) -> Result<u32, StorageError> {
        Ok(run_as_user(self.run_as.as_deref())?
            .map_or_else(|| nix::unistd::geteuid().as_raw(), |u| u.uid))
    }
}

/// How [`PgEnv::start`] runs a server.
pub(crate) struct StartOpts<'a> {
    pub port: u16,
    /// `listen_addresses` ("" = Unix socket only).
    pub listen: &'a str,
    /// Extra `-c` settings.
    pub settings: &'a [(String, String)],
    pub log: &'a Path,
    pub timeout: Duration,
    /// Dies with the engine (private servers).
    pub tied: bool,
    /// Called with `pg_last_wal_replay_lsn()` while the server recovers.
    pub replay_progress: Option<OnReplay<'a>>,
}

/// Fields of `pg_controldata` the engine uses.
#[derive(Debug, Clone)]
pub(crate) struct ControlData {
    /// "shut down", "in production", "shut down in recovery", ...
    pub state: String,
    pub checkpoint: Lsn,
    pub tli: u32,
    pub seg_size: u64,
    /// "Minimum recovery ending location": where a copy stopped in recovery
    /// becomes consistent (0/0 when none is set).
    pub min_recovery: Lsn,
}

impl ControlData {
    pub fn clean(&self) -> bool {
        self.state == "shut down"
    }
}

impl PgEnv {
    pub fn command(&self, prog: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(prog));
        if let Some(u) = &self.user {
            cmd.uid(u.uid).gid(u.gid);
            cmd.env("USER", &u.name).env("HOME", "/tmp");
        }
        cmd.current_dir("/")
            .env("LC_ALL", "C")
            .env("TZ", "UTC")
            .env_remove("PGDATA")
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .env_remove("PGUSER")
            .env_remove("PGPASSWORD")
            .env_remove("PGDATABASE")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs a program to completion; a failure carries its stderr.
    pub async fn run(&self, mut cmd: Command, what: &str) -> Result<String, StorageError> {
        let out = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await
            .map_err(|e| io_err(&format!("starting {what}"), e))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(StorageError::internal(format!(
                "{what} failed ({}): {}",
                out.status,
                tail.join(" | ")
            )))
        }
    }

    /// Gives a path to the run_as user (no-op without a user switch).
    pub fn chown(&self, path: &Path) -> Result<(), StorageError> {
        if let Some(u) = &self.user {
            std::os::unix::fs::lchown(path, Some(u.uid), Some(u.gid))
                .map_err(|e| io_err(&format!("chown {}", path.display()), e))?;
        }
        Ok(())
    }

    pub fn chown_tree(&self, path: &Path) -> Result<(), StorageError> {
        if self.user.is_none() {
            return Ok(());
        }
        for e in walkdir::WalkDir::new(path).follow_links(false) {
            let e = e.map_err(|e| io_err("walking a data directory", e))?;
            self.chown(e.path())?;
        }
        Ok(())
    }

    /// Writes a file owned by the run_as user with mode 0600.
    pub fn write_file(&self, path: &Path, contents: &str) -> Result<(), StorageError> {
        fs::write(path, contents).map_err(|e| io_err(&format!("writing {}", path.display()), e))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err(&format!("chmod {}", path.display()), e))?;
        self.chown(path)
    }

    /// Makes a private directory (0700, run_as user).
    pub fn private_dir(&self, path: &Path) -> Result<(), StorageError> {
        fs::create_dir_all(path).map_err(|e| io_err(&format!("creating {}", path.display()), e))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err(&format!("chmod {}", path.display()), e))?;
        self.chown(path)
    }

    pub async fn controldata(&self, dir: &Path) -> Result<ControlData, StorageError> {
        let mut cmd = self.command("pg_controldata");
        cmd.arg("-D").arg(dir);
        let out = self.run(cmd, "pg_controldata").await?;
        parse_controldata(&out)
    }

    /// `initdb` into `dir` (which exists, empty, owned by the user).
    pub async fn initdb(
        &self,
        dir: &Path,
        password: Option<&str>,
        scratch: &Path,
    ) -> Result<(), StorageError> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(dir).args([
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-instructions",
        ]);
        let pwdir = scratch.join(format!("pw-{}", uuid::Uuid::new_v4().simple()));
        if let Some(pw) = password {
            self.private_dir(&pwdir)?;
            let f = pwdir.join("pw");
            self.write_file(&f, &format!("{pw}\n"))?;
            cmd.arg(format!("--pwfile={}", f.display()));
        }
        let r = self.run(cmd, "initdb").await;
        let _ = fs::remove_dir_all(&pwdir);
        r.map(|_| ())
    }

    /// Runs PostgreSQL's recovery on `dir` in one stand-alone backend
    /// (`postgres --single`, stdin at end of file): crash or backup
    /// recovery, the end-of-recovery checkpoint, then a clean shutdown
    /// checkpoint as it exits. No postmaster, no sockets, no polling for
    /// readiness: about a tenth of a second on a fresh copy, against a
    /// quarter of a second for a start and a fast stop. Tied to the engine
    /// like a private server: it is killed if the engine's thread goes.
    /// The caller checks `pg_controldata` for the result.
    pub async fn recover_single_user(
        &self,
        dir: &Path,
        settings: &[(String, String)],
        log: &Path,
        timeout: Duration,
    ) -> Result<(), StorageError> {
        let (logf, logf2) = log_handles(log)?;
        let mut cmd = self.command("postgres");
        cmd.arg("--single").arg("-D").arg(dir);
        for (k, v) in settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        // template1 is the one database initdb makes that a user cannot
        // simply drop; recovery completes before the backend looks it up.
        cmd.arg("template1").stdout(logf).stderr(logf2);
        // SAFETY: only prctl(2), async-signal-safe, runs in the child.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| io_err("starting a stand-alone postgres", e))?;
        let status = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(r) => r.map_err(|e| io_err("waiting for a stand-alone postgres", e))?,
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(StorageError::Unavailable {
                    message: format!(
                        "recovery of {} not done after {timeout:?}: {}",
                        dir.display(),
                        log_tail(log)
                    ),
                });
            }
        };
        if !status.success() {
            return Err(StorageError::internal(format!(
                "stand-alone postgres on {} exited with {status}: {}",
                dir.display(),
                log_tail(log)
            )));
        }
        Ok(())
    }

    /// Spawns a postmaster on `dir` with a fresh private socket directory
    /// and extra environment variables.
    fn spawn_postmaster(
        &self,
        dir: &Path,
        opts: &StartOpts<'_>,
        env: &[(String, String)],
    ) -> Result<(Child, PathBuf), StorageError> {
        let StartOpts {
            port,
            listen,
            settings,
            log,
            tied,
            ..
        } = *opts;
        let sock = std::env::temp_dir().join(format!(
            "pgbranch-s-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        self.private_dir(&sock)?;
        let (logf, logf2) = log_handles(log)?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(dir)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&sock)
            .arg("-c")
            .arg(format!("listen_addresses={listen}"));
        for (k, v) in settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        // A killed engine must not leave the server in its process group's
        // way; the handle stops it explicitly.
        cmd.stdout(logf)
            .stderr(logf2)
            .kill_on_drop(false)
            .process_group(0);
        if tied {
            // A private server must not outlive the engine (killed or not):
            // the kernel sends it SIGQUIT (immediate shutdown) when the
            // engine's thread that started it goes away.
            // SAFETY: only prctl(2), async-signal-safe, runs in the child.
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGQUIT)
                        .map_err(std::io::Error::from)
                });
            }
        }
        match cmd.spawn() {
            Ok(child) => Ok((child, sock)),
            Err(e) => {
                let _ = fs::remove_dir_all(&sock);
                Err(io_err("starting postgres", e))
            }
        }
    }

    /// Runs a postmaster on `dir` that is expected to stop by itself (a
    /// replay with `recovery_target_action = 'shutdown'`) and waits for it
    /// to exit; the caller reads `pg_controldata` for the result.
    ///
    /// It is background work (the base roller): the server's whole process
    /// group runs at nice 10 and the lowest best-effort I/O priority, so
    /// branches being created and computes serving queries go first.
    pub async fn run_to_exit(&self, dir: &Path, opts: StartOpts<'_>) -> Result<(), StorageError> {
        let (mut child, sock) = self.spawn_postmaster(dir, &opts, &[])?;
        if let Some(pid) = child.id() {
            lower_priority(pid);
        }
        let waited = tokio::time::timeout(opts.timeout, child.wait()).await;
        let r = match waited {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(StorageError::internal(format!(
                "postgres on {} exited with {status}: {}",
                dir.display(),
                log_tail(opts.log)
            ))),
            Ok(Err(e)) => Err(io_err("waiting for postgres", e)),
            Err(_) => {
                if let Some(pid) = child.id() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGQUIT,
                    );
                }
                let _ = child.wait().await;
                Err(StorageError::Unavailable {
                    message: format!(
                        "postgres on {} still running after {:?}: {}",
                        dir.display(),
                        opts.timeout,
                        log_tail(opts.log)
                    ),
                })
            }
        };
        let _ = fs::remove_dir_all(&sock);
        r
    }

    /// Starts `postgres -D dir` with extra `-c` settings; stdout and stderr
    /// go to `log`. Waits until it accepts connections on its socket and
    /// `pg_is_in_recovery()` is false.
    pub async fn start(&self, dir: &Path, opts: StartOpts<'_>) -> Result<PgServer, StorageError> {
        self.start_with(dir, opts, false, &[]).await
    }

    /// Starts a hot standby: like [`Self::start`], with extra environment
    /// variables (e.g. `PGPASSWORD` for the WAL receiver's libpq, so no
    /// password is in the arguments or the data directory); returns once it
    /// accepts read-only connections (still in recovery).
    pub async fn start_standby(
        &self,
        dir: &Path,
        opts: StartOpts<'_>,
        env: &[(String, String)],
    ) -> Result<PgServer, StorageError> {
        self.start_with(dir, opts, true, env).await
    }

    async fn start_with(
        &self,
        dir: &Path,
        opts: StartOpts<'_>,
        standby: bool,
        env: &[(String, String)],
    ) -> Result<PgServer, StorageError> {
        let (child, sock) = self.spawn_postmaster(dir, &opts, env)?;
        let StartOpts {
            port,
            log,
            timeout,
            replay_progress,
            ..
        } = opts;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        let mut server = PgServer {
            port,
            data_dir: dir.to_path_buf(),
            socket_dir: sock,
            log: log.to_path_buf(),
            child: Some(child),
            pid,
        };
        match server.wait_ready(timeout, replay_progress, standby).await {
            Ok(()) => Ok(server),
            Err(e) => {
                server.kill().await;
                Err(e)
            }
        }
    }
}

pub(crate) fn parse_controldata(out: &str) -> Result<ControlData, StorageError> {
    let field = |name: &str| {
        out.lines().find_map(|l| {
            l.strip_prefix(name)
                .map(|v| v.trim_start_matches(':').trim().to_string())
        })
    };
    let missing = |n: &str| StorageError::internal(format!("pg_controldata: no {n:?} field"));
    let state = field("Database cluster state").ok_or_else(|| missing("state"))?;
    let checkpoint: Lsn = field("Latest checkpoint location")
        .ok_or_else(|| missing("checkpoint"))?
        .parse()?;
    let tli = field("Latest checkpoint's TimeLineID")
        .ok_or_else(|| missing("TimeLineID"))?
        .parse()
        .map_err(|_| missing("TimeLineID"))?;
    let seg_size = field("Bytes per WAL segment")
        .and_then(|v| v.parse().ok())
        .unwrap_or(16 * 1024 * 1024);
    let min_recovery = field("Minimum recovery ending location")
        .and_then(|v| v.parse().ok())
        .unwrap_or(Lsn(0));
    Ok(ControlData {
        state,
        checkpoint,
        tli,
        seg_size,
        min_recovery,
    })
}

/// Lowers the CPU and I/O priority of the process group `pgid` (a
/// postmaster started with its own group, and every process it forks).
/// Best effort: a failure leaves the priorities as they were.
fn lower_priority(pgid: u32) {
    use nix::libc;
    const IOPRIO_WHO_PGRP: libc::c_long = 2;
    const IOPRIO_CLASS_BE: libc::c_long = 2;
    // SAFETY: plain system calls on a process group id; no memory is shared.
    unsafe {
        if libc::setpriority(libc::PRIO_PGRP, pgid as libc::id_t, 10) != 0 {
            tracing::debug!(
                pgid,
                "could not lower the CPU priority of a background server"
            );
        }
        let lowest_best_effort = (IOPRIO_CLASS_BE << 13) | 7;
        if libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PGRP,
            pgid as libc::c_long,
            lowest_best_effort,
        ) != 0
        {
            tracing::debug!(
                pgid,
                "could not lower the I/O priority of a background server"
            );
        }
    }
}

/// Two append handles on a server log: its stdout and its stderr.
fn log_handles(log: &Path) -> Result<(fs::File, fs::File), StorageError> {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| io_err(&format!("opening {}", log.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| io_err("duplicating a log handle", e))?;
    Ok((out, err))
}

/// Log lines that only say the engine's readiness polls came too early.
const POLL_NOISE: &[&str] = &[
    "the database system is starting up",
    "the database system is not yet accepting connections",
    "the database system is not accepting connections",
    "consistent recovery state has not been yet reached",
];

/// The last meaningful lines of a server log (the engine's own early
/// connection attempts left out), for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !POLL_NOISE.iter().any(|n| l.contains(n)))
        .collect();
    let from = lines.len().saturating_sub(6);
    lines[from..].join(" | ")
}

/// One record line of `pg_waldump`: its LSN and, for commits, the time.
pub(crate) fn parse_waldump_line(line: &str) -> Option<(Lsn, Option<jiff::Timestamp>)> {
    let rest = line.split_once(" lsn: ")?.1;
    let lsn: Lsn = rest.split(',').next()?.trim().parse().ok()?;
    let mut time = None;
    if line.starts_with("rmgr: Transaction") {
        if let Some(desc) = line.split_once("desc: ").map(|(_, d)| d) {
            let ts = if let Some(t) = desc.strip_prefix("COMMIT ") {
                Some(t)
            } else if let Some(t) = desc.strip_prefix("COMMIT_PREPARED ") {
                t.split_once(": ").map(|(_, t)| t)
            } else {
                None
            };
            if let Some(t) = ts {
                let t = t.split(';').next().unwrap_or("").trim();
                time = parse_pg_time(t);
            }
        }
    }
    Some((lsn, time))
}

/// `2026-11-26 21:16:54.191105 UTC` (pg_waldump with TZ=UTC).
fn parse_pg_time(s: &str) -> Option<jiff::Timestamp> {
    let s = s.strip_suffix(" UTC")?;
    let dt: jiff::civil::DateTime = s.replacen(' ', "T", 1).parse().ok()?;
    dt.to_zoned(jiff::tz::TimeZone::UTC)
        .ok()
        .map(|z| z.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commit_records() {
        let l = "rmgr: Transaction len (rec/tot):     66/    66, tx:        721, lsn: 0/014FA0A0, prev 0/014FA018, desc: COMMIT 2026-11-26 21:16:54.191105 UTC; inval msgs: snapshot 2396";
        let (lsn, t) = parse_waldump_line(l).unwrap();
        assert_eq!(lsn, "0/014FA0A0".parse().unwrap());
        assert_eq!(t.unwrap().to_string(), "2026-11-26T21:16:54.191105Z");
        let l = "rmgr: Heap        len (rec/tot):     54/   150, tx:        722, lsn: 0/01500428, prev 0/015003F0, desc: INSERT off 2 flags 0x00";
        assert_eq!(parse_waldump_line(l).unwrap().1, None);
        assert!(parse_waldump_line("pg_waldump: error: could not find file").is_none());
    }
}

#[cfg(test)]
mod controldata_tests {
    use super::*;

    #[test]
    fn reads_the_fields_the_engine_needs() {
        let out = "pg_control version number:            1300\n\
Database cluster state:               shut down\n\
Latest checkpoint location:           0/1500708\n\
Latest checkpoint's REDO location:    0/1500708\n\
Latest checkpoint's TimeLineID:       3\n\
Bytes per WAL segment:                16777216\n";
        let cd = parse_controldata(out).unwrap();
        assert!(cd.clean());
        assert_eq!(cd.checkpoint, Lsn(0x1500708));
        assert_eq!(cd.tli, 3);
        assert_eq!(cd.seg_size, 16 * 1024 * 1024);
        let running = out.replace("shut down", "in production");
        assert!(!parse_controldata(&running).unwrap().clean());
        assert!(parse_controldata("garbage").is_err());
    }
}
