//! `pgbranch local`: branch a PostgreSQL database on one machine, no cluster
//! needed. See `docs/local.md` for the walk-through.
//!
//! ```text
//! pgbranch local init [--dir .pgbranch]          # engine + branch `main`, prints its URL
//! pgbranch local branch create dev [--parent main] [--lsn L | --timestamp T]
//! pgbranch local branch list | delete NAME | set NAME --protected true
//! pgbranch local snapshot create [NAME] --branch main | list | delete NAME
//! pgbranch local restore --snapshot S --target main --finalize
//! pgbranch local restore --source main@2026-11-26T21:00:00Z --target main \
//!     --finalize --preserve-under-name main-before
//! pgbranch local restore finalize PREVIEW        # multi-step restore
//! pgbranch local start|stop|psql NAME
//! pgbranch local up | down | status
//! ```
//! Every command takes `--output json` for scripts.

use std::io::{IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use super::CliError;
use crate::local::api::*;
use crate::local::client::Client;
use crate::local::store::Store;
use crate::local::{daemon, daemon_pid, LocalError, Paths};
use crate::point::{parse_point, parse_point_word};
use crate::storage::{DriverKind, Point, Progress};

/// Options shared by every `local` command.
#[derive(Debug, Args)]
pub struct LocalArgs {
    /// The local directory (engine, metadata, daemon socket and logs).
    #[arg(
        long,
        global = true,
        env = "PGBRANCH_LOCAL_DIR",
        default_value = ".pgbranch"
    )]
    pub dir: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Box<LocalCommand>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum LocalCommand {
    /// Create the local directory, start the daemon and a root branch `main`.
    Init(InitArgs),
    /// Start the daemon; every branch that was running comes back.
    Up,
    /// Stop the daemon and every compute (they come back with `up`).
    Down,
    /// The daemon's state.
    Status,
    /// Branches: create, list, delete, set.
    #[command(subcommand)]
    Branch(BranchCommand),
    /// Snapshots: create, list, delete.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Restore a snapshot or a point of a branch's history onto a branch.
    Restore(RestoreArgs),
    /// Start a branch's compute.
    Start { name: String },
    /// Stop a branch's compute (its port stays reserved).
    Stop { name: String },
    /// Run psql on a branch.
    Psql {
        name: String,
        /// Extra psql arguments (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Print a branch's connection string.
    ConnectionString { name: String },
    /// Run the daemon in the foreground (started by `init` and `up`).
    #[command(hide = true)]
    Daemon,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Copy-on-write driver; probed when absent (`copy` without CoW).
    #[arg(long)]
    pub driver: Option<DriverKind>,
    /// First local port handed to branches.
    #[arg(long, default_value_t = daemon::DEFAULT_PORT_BASE)]
    pub port_base: u16,
}

/// A point: `--lsn` or `--timestamp` (absent: head).
#[derive(Debug, Args)]
pub struct PointArgs {
    /// An LSN of the parent's history, like 0/16B3740.
    #[arg(long, conflicts_with = "timestamp")]
    pub lsn: Option<String>,
    /// A time of the parent's history (RFC 3339, like 2026-11-26T21:00:00Z).
    #[arg(long)]
    pub timestamp: Option<String>,
}

impl PointArgs {
    /// The point the flags name (neither: head).
    fn point(&self) -> Result<Point, CliError> {
        parse_point("--", self.lsn.as_deref(), self.timestamp.as_deref())
            .map_err(|e| CliError::Usage(e.to_string()))
    }
}

#[derive(Debug, Subcommand)]
pub enum BranchCommand {
    /// Create a branch from a parent at its head, an LSN or a time.
    Create {
        name: String,
        /// The parent branch.
        #[arg(long, default_value = "main")]
        parent: String,
        #[command(flatten)]
        point: PointArgs,
        /// Refuse deleting it.
        #[arg(long)]
        protected: bool,
    },
    /// List branches.
    List,
    /// Delete a branch (refused when protected or when it has children).
    Delete { name: String },
    /// Change a branch's settings.
    Set {
        name: String,
        #[arg(long)]
        protected: Option<bool>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a branch (head, or a point of its history).
    Create {
        /// Its name (default: `<branch>-<yyyymmddhhmmss>`).
        name: Option<String>,
        #[arg(long, default_value = "main")]
        branch: String,
        #[command(flatten)]
        point: PointArgs,
    },
    List,
    Delete {
        name: String,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct RestoreArgs {
    #[command(subcommand)]
    pub action: Option<RestoreAction>,
    /// The snapshot to restore.
    #[arg(long, conflicts_with = "source", required_unless_present = "source")]
    pub snapshot: Option<String>,
    /// A branch and a point of its history: `BRANCH`, `BRANCH@<RFC 3339 time>`
    /// or `BRANCH@<LSN>`.
    #[arg(long)]
    pub source: Option<String>,
    /// The branch whose connection string gets the restored data.
    #[arg(long, required = true)]
    pub target: Option<String>,
    /// Switch the target now (one-step); without it the data comes up as a
    /// preview branch, switched later with `restore finalize PREVIEW`.
    #[arg(long)]
    pub finalize: bool,
    /// Name of the backup branch that keeps the target's current data
    /// (default `<target>-old-<yyyymmddhhmmss>`); required when restoring a
    /// branch to its own past.
    #[arg(long)]
    pub preserve_under_name: Option<String>,
    /// Name of the preview branch (multi-step).
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum RestoreAction {
    /// Switch the target of a multi-step restore to its preview branch.
    Finalize {
        preview: String,
        #[arg(long)]
        preserve_under_name: Option<String>,
    },
    /// List restores.
    List,
}

/// `--source`: `BRANCH` (its head) or `BRANCH@POINT`, the point being
/// `head`, an LSN or an RFC 3339 time.
fn parse_source(s: &str) -> Result<(String, Point), CliError> {
    let Some((b, p)) = s.split_once('@') else {
        return Ok((s.to_string(), Point::Head));
    };
    let point = parse_point_word("--source", p).map_err(|e| CliError::Usage(e.to_string()))?;
    Ok((b.to_string(), point))
}

/// Runs a `local` command.
pub async fn run(args: LocalArgs) -> Result<(), CliError> {
    let dir = absolute(&args.dir)?;
    let paths = Paths::new(&dir);
    let out = args.output;
    match *args.command {
        LocalCommand::Daemon => daemon::run(paths).await.map_err(local_err),
        LocalCommand::Init(a) => init(&paths, out, a).await,
        LocalCommand::Up => up(&paths, out).await,
        LocalCommand::Down => down(&paths, out).await,
        LocalCommand::Status => {
            let c = Client::new(&paths).map_err(local_err)?;
            let s: StatusView = c.get("/status").await.map_err(local_err)?;
            print_one(out, &s, |s| {
                format!(
                    "daemon pid {} for {}\ndriver {}, PostgreSQL {}\n{} branches, {} running",
                    s.pid, s.dir, s.driver, s.pg_major, s.branches, s.running
                )
            })
        }
        LocalCommand::Branch(cmd) => branch(&paths, out, cmd).await,
        LocalCommand::Snapshot(cmd) => snapshot(&paths, out, cmd).await,
        LocalCommand::Restore(a) => restore(&paths, out, a).await,
        LocalCommand::Start { name } => {
            let c = client(&paths)?;
            let b: BranchView = c
                .post(&format!("/branches/{name}/start"), &())
                .await
                .map_err(local_err)?;
            print_one(out, &b, |b| {
                format!("{} is {} on port {}", b.name, b.state, b.port)
            })
        }
        LocalCommand::Stop { name } => {
            let c = client(&paths)?;
            let b: BranchView = c
                .post(&format!("/branches/{name}/stop"), &())
                .await
                .map_err(local_err)?;
            print_one(out, &b, |b| format!("{} is {}", b.name, b.state))
        }
        LocalCommand::ConnectionString { name } => {
            let c = client(&paths)?;
            let b: BranchView = c
                .get(&format!("/branches/{name}"))
                .await
                .map_err(local_err)?;
            print_one(out, &b, |b| b.connection_string.clone())
        }
        LocalCommand::Psql { name, args } => {
            let c = client(&paths)?;
            let b: BranchView = c
                .get(&format!("/branches/{name}"))
                .await
                .map_err(local_err)?;
            let psql = find_psql().ok_or_else(|| {
                CliError::Other("psql not found in PATH nor /usr/lib/postgresql/*/bin".into())
            })?;
            // The password goes through the environment, not the command
            // line (which `ps` shows to everyone).
            let password = b
                .connection_string
                .split_once("postgres:")
                .and_then(|(_, r)| r.split_once('@'))
                .map(|(p, _)| p.to_string())
                .unwrap_or_default();
            let err = std::process::Command::new(psql)
                .env("PGPASSWORD", password)
                .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-p"])
                .arg(b.port.to_string())
                .args(args)
                .exec();
            Err(CliError::Other(format!("running psql: {err}")))
        }
    }
}

fn local_err(e: LocalError) -> CliError {
    match e {
        LocalError::Storage(s) => CliError::Storage(s),
        other => CliError::Other(other.to_string()),
    }
}

fn client(paths: &Paths) -> Result<Client, CliError> {
    Client::new(paths).map_err(local_err)
}

fn absolute(p: &Path) -> Result<PathBuf, CliError> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

fn find_psql() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("psql");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    versions.sort_unstable();
    versions
        .into_iter()
        .rev()
        .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin/psql")))
        .find(|p| p.is_file())
}

// ------------------------------------------------------------ daemon life

/// Starts the daemon in the background and waits until it answers.
async fn spawn_daemon(paths: &Paths) -> Result<(), CliError> {
    let c = client(paths)?;
    if c.alive().await {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.log())?;
    let log2 = log.try_clone()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("local")
        .arg("--dir")
        .arg(&paths.dir)
        .arg("daemon")
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0);
    let mut child = cmd.spawn()?;
    let start = Instant::now();
    loop {
        if c.alive().await {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(CliError::Other(format!(
                "the daemon exited ({status}); see {}: {}",
                paths.log().display(),
                log_tail(&paths.log())
            )));
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err(CliError::Other(format!(
                "the daemon did not answer within 120 s; see {}",
                paths.log().display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn log_tail(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

async fn init(paths: &Paths, out: Output, a: InitArgs) -> Result<(), CliError> {
    if paths.store().exists() {
        return Err(CliError::Usage(format!(
            "{} is already initialized: use `pgbranch local up`",
            paths.dir.display()
        )));
    }
    std::fs::create_dir_all(&paths.dir)?;
    {
        let store = Store::open(&paths.store()).map_err(local_err)?;
        store
            .set_setting("port_base", &a.port_base.to_string())
            .map_err(local_err)?;
        if let Some(d) = a.driver {
            store
                .set_setting("driver", &d.to_string())
                .map_err(local_err)?;
        }
    }
    progress_line(out, "starting the daemon");
    spawn_daemon(paths).await?;
    let c = client(paths)?;
    let _: BranchView = c
        .post(
            "/branches",
            &CreateBranchRequest {
                name: "main".into(),
                parent: None,
                point: Point::Head,
                protected: false,
            },
        )
        .await
        .map_err(local_err)?;
    let b = wait_branch(&c, out, "main").await?;
    let status: StatusView = c.get("/status").await.map_err(local_err)?;
    print_one(out, &b, |b| {
        format!(
            "initialized {} (driver {}, PostgreSQL {})\nbranch main is running on port {}:\n  {}",
            paths.dir.display(),
            status.driver,
            status.pg_major,
            b.port,
            b.connection_string
        )
    })
}

async fn up(paths: &Paths, out: Output) -> Result<(), CliError> {
    if !paths.store().exists() {
        return Err(CliError::Usage(format!(
            "{} is not initialized: run `pgbranch local init`",
            paths.dir.display()
        )));
    }
    spawn_daemon(paths).await?;
    let c = client(paths)?;
    // Wait for the branches that come back.
    let start = Instant::now();
    let branches = loop {
        let bs: Vec<BranchView> = c.get("/branches?brief=true").await.map_err(local_err)?;
        let busy: Vec<&str> = bs
            .iter()
            .filter(|b| b.state == "starting" || b.state == "creating")
            .map(|b| b.name.as_str())
            .collect();
        if busy.is_empty() {
            for b in &bs {
                if let Some(e) = &b.error {
                    eprintln!("warning: branch {}: {e}", b.name);
                }
            }
            break bs;
        }
        if start.elapsed() > Duration::from_millis(500) {
            progress_line(out, &format!("starting {}", busy.join(", ")));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    print_list(out, &branches, |bs| {
        let mut rows = vec![vec!["NAME".to_string(), "PORT".into(), "STATE".into()]];
        rows.extend(
            bs.iter()
                .map(|b| vec![b.name.clone(), b.port.to_string(), b.state.clone()]),
        );
        rows
    })
}

async fn down(paths: &Paths, out: Output) -> Result<(), CliError> {
    let pid = daemon_pid(paths);
    let c = client(paths)?;
    match c.post::<_, serde_json::Value>("/shutdown", &()).await {
        Ok(_) => {}
        Err(e) if pid.is_none() => {
            return print_one(out, &serde_json::json!({"running": false}), |_| {
                format!("the daemon is not running ({e})")
            })
        }
        Err(e) => return Err(local_err(e)),
    }
    let start = Instant::now();
    while daemon_pid(paths).is_some() || c.alive().await {
        if start.elapsed() > Duration::from_secs(180) {
            return Err(CliError::Other(
                "the daemon did not stop within 180 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    print_one(out, &serde_json::json!({"running": false}), |_| {
        "daemon stopped; `pgbranch local up` brings the branches back".to_string()
    })
}

// ------------------------------------------------------------- commands

async fn branch(paths: &Paths, out: Output, cmd: BranchCommand) -> Result<(), CliError> {
    let c = client(paths)?;
    match cmd {
        BranchCommand::Create {
            name,
            parent,
            point,
            protected,
        } => {
            let _: BranchView = c
                .post(
                    "/branches",
                    &CreateBranchRequest {
                        name: name.clone(),
                        parent: Some(parent),
                        point: point.point()?,
                        protected,
                    },
                )
                .await
                .map_err(local_err)?;
            let b = match wait_branch(&c, out, &name).await {
                Ok(b) => b,
                Err(e) => return Err(discard_branch(&c, &name, e).await),
            };
            print_one(out, &b, |b| {
                format!(
                    "branch {} is {} on port {}:\n  {}",
                    b.name, b.state, b.port, b.connection_string
                )
            })
        }
        BranchCommand::List => {
            let bs: Vec<BranchView> = c.get("/branches").await.map_err(local_err)?;
            print_list(out, &bs, branch_table)
        }
        BranchCommand::Delete { name } => {
            let v: serde_json::Value = c
                .delete(&format!("/branches/{name}"))
                .await
                .map_err(local_err)?;
            print_one(out, &v, |_| format!("branch {name} deleted"))
        }
        BranchCommand::Set { name, protected } => {
            let b: BranchView = c
                .patch(
                    &format!("/branches/{name}"),
                    &SetBranchRequest { protected },
                )
                .await
                .map_err(local_err)?;
            print_one(out, &b, |b| {
                format!("branch {} (protected: {})", b.name, b.protected)
            })
        }
    }
}

async fn snapshot(paths: &Paths, out: Output, cmd: SnapshotCommand) -> Result<(), CliError> {
    let c = client(paths)?;
    match cmd {
        SnapshotCommand::Create {
            name,
            branch,
            point,
        } => {
            let s: SnapshotView = c
                .post(
                    "/snapshots",
                    &CreateSnapshotRequest {
                        name,
                        branch,
                        point: point.point()?,
                    },
                )
                .await
                .map_err(local_err)?;
            let start = Instant::now();
            let mut shown = None;
            let s = loop {
                let s: SnapshotView = c
                    .get(&format!("/snapshots/{}", s.name))
                    .await
                    .map_err(local_err)?;
                match s.state.as_str() {
                    "ready" => {
                        finish_progress(out, &shown);
                        break s;
                    }
                    "creating" => show_progress(
                        out,
                        &start,
                        &mut shown,
                        s.progress.as_ref(),
                        "taking the snapshot",
                    ),
                    _ => {
                        // A failed request leaves nothing behind.
                        let _ = c
                            .delete::<serde_json::Value>(&format!("/snapshots/{}", s.name))
                            .await;
                        return Err(CliError::Other(format!(
                            "snapshot {} {}: {}",
                            s.name,
                            s.state,
                            s.error.unwrap_or_default()
                        )));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            print_one(out, &s, |s| {
                format!(
                    "snapshot {} of {} at {} ({})",
                    s.name,
                    s.branch,
                    s.lsn.map(|l| l.to_string()).unwrap_or_default(),
                    human_bytes(s.size_bytes)
                )
            })
        }
        SnapshotCommand::List => {
            let ss: Vec<SnapshotView> = c.get("/snapshots").await.map_err(local_err)?;
            print_list(out, &ss, snapshot_table)
        }
        SnapshotCommand::Delete { name } => {
            let v: serde_json::Value = c
                .delete(&format!("/snapshots/{name}"))
                .await
                .map_err(local_err)?;
            print_one(out, &v, |_| format!("snapshot {name} deleted"))
        }
    }
}

async fn restore(paths: &Paths, out: Output, a: RestoreArgs) -> Result<(), CliError> {
    let c = client(paths)?;
    let r: RestoreView = match a.action {
        Some(RestoreAction::List) => {
            let rs: Vec<RestoreView> = c.get("/restores").await.map_err(local_err)?;
            return print_list(out, &rs, restore_table);
        }
        Some(RestoreAction::Finalize {
            preview,
            preserve_under_name,
        }) => c
            .post(
                &format!("/branches/{preview}/finalize"),
                &FinalizeRequest {
                    preserve_under_name,
                },
            )
            .await
            .map_err(local_err)?,
        None => {
            let target = a
                .target
                .ok_or_else(|| CliError::Usage("--target is required".into()))?;
            let (source_branch, point) = match &a.source {
                Some(s) => {
                    let (b, p) = parse_source(s)?;
                    (Some(b), p)
                }
                None => (None, Point::Head),
            };
            c.post(
                "/restores",
                &RestoreRequest {
                    snapshot: a.snapshot,
                    source_branch,
                    point,
                    target,
                    finalize: a.finalize,
                    preserve_under_name: a.preserve_under_name,
                    name: a.name,
                },
            )
            .await
            .map_err(local_err)?
        }
    };
    let start = Instant::now();
    let mut shown = None;
    let r = loop {
        let r: RestoreView = c
            .get(&format!("/restores/{}", r.id))
            .await
            .map_err(local_err)?;
        match r.state.as_str() {
            "completed" | "awaitingFinalize" => {
                finish_progress(out, &shown);
                break r;
            }
            "restoring" => show_progress(
                out,
                &start,
                &mut shown,
                r.progress.as_ref(),
                "starting the restored compute and switching the connection",
            ),
            _ => {
                return Err(CliError::Other(format!(
                    "restore {} failed: {}",
                    r.id,
                    r.error.unwrap_or_default()
                )))
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A preview branch is usable once its compute runs.
    if let Some(p) = r
        .restored_branch
        .as_ref()
        .filter(|_| r.state != "completed")
    {
        if let Err(e) = wait_branch(&c, out, p).await {
            return Err(discard_branch(&c, p, e).await);
        }
    }
    print_one(out, &r, |r| {
        match r.state.as_str() {
        "completed" => format!(
            "restored {} onto {} (same connection string); its previous data is branch {}",
            r.source,
            r.target,
            r.backup_branch.as_deref().unwrap_or("?")
        ),
        _ => format!(
            "restored {} as preview branch {}; inspect it, then `pgbranch local restore finalize {}` switches {} to it",
            r.source,
            r.restored_branch.as_deref().unwrap_or("?"),
            r.restored_branch.as_deref().unwrap_or("?"),
            r.target
        ),
    }
    })
}

/// After a failed creation: removes the failed branch, so the same command
/// can simply be run again, and returns the failure.
async fn discard_branch(c: &Client, name: &str, e: CliError) -> CliError {
    let failed = matches!(
        c.get::<BranchView>(&format!("/branches/{name}?brief=true")).await,
        Ok(b) if b.state == "failed"
    );
    if failed {
        let _ = c
            .delete::<serde_json::Value>(&format!("/branches/{name}"))
            .await;
    }
    e
}

/// Polls a branch until it is running, stopped or failed, showing progress.
async fn wait_branch(c: &Client, out: Output, name: &str) -> Result<BranchView, CliError> {
    let start = Instant::now();
    let mut shown = None;
    loop {
        let b: BranchView = c
            .get(&format!("/branches/{name}?brief=true"))
            .await
            .map_err(local_err)?;
        match b.state.as_str() {
            "running" | "stopped" => {
                finish_progress(out, &shown);
                return Ok(b);
            }
            "failed" | "exited" => {
                finish_progress(out, &shown);
                return Err(CliError::Other(format!(
                    "branch {name} {}: {}",
                    b.state,
                    b.error.unwrap_or_default()
                )));
            }
            "starting" => {
                let p = Progress {
                    step: "starting its compute".into(),
                    percent: None,
                };
                show_progress(out, &start, &mut shown, Some(&p), "")
            }
            _ => show_progress(out, &start, &mut shown, b.progress.as_ref(), "creating"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// -------------------------------------------------------------- output

fn progress_line(out: Output, msg: &str) {
    if out == Output::Table {
        eprintln!("{msg}...");
    }
}

/// Shows a long operation's step on stderr (after the first second),
/// rewriting one line on a terminal and printing each change otherwise.
fn show_progress(
    out: Output,
    start: &Instant,
    shown: &mut Option<String>,
    p: Option<&Progress>,
    idle: &str,
) {
    if out != Output::Table || start.elapsed() < Duration::from_secs(1) {
        return;
    }
    let step = p.map(|p| p.step.clone()).unwrap_or_else(|| idle.into());
    let pct = p
        .and_then(|p| p.percent)
        .map(|x| format!(" {x}%"))
        .unwrap_or_default();
    let line = format!("{step}{pct}");
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(
            err,
            "\r\x1b[K{line} ({:.0}s)",
            start.elapsed().as_secs_f64()
        );
        let _ = err.flush();
        *shown = Some(line);
    } else if shown.as_deref() != Some(line.as_str()) {
        let _ = writeln!(err, "{line} ({:.1}s)", start.elapsed().as_secs_f64());
        *shown = Some(line);
    }
}

fn finish_progress(out: Output, shown: &Option<String>) {
    if out == Output::Table && shown.is_some() && std::io::stderr().is_terminal() {
        eprintln!();
    }
}

fn print_one<T: Serialize>(
    out: Output,
    v: &T,
    human: impl FnOnce(&T) -> String,
) -> Result<(), CliError> {
    match out {
        Output::Json => println!("{}", to_json(v)?),
        Output::Table => println!("{}", human(v)),
    }
    Ok(())
}

fn print_list<T: Serialize>(
    out: Output,
    v: &[T],
    table: impl FnOnce(&[T]) -> Vec<Vec<String>>,
) -> Result<(), CliError> {
    match out {
        Output::Json => println!("{}", to_json(&v)?),
        Output::Table => print!("{}", render_table(&table(v))),
    }
    Ok(())
}

fn to_json<T: Serialize>(v: &T) -> Result<String, CliError> {
    serde_json::to_string_pretty(v).map_err(|e| CliError::Other(e.to_string()))
}

/// Left-aligned columns; the first row is the header.
pub fn render_table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map(|c| c.chars().count()).unwrap_or(0))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
    }
    s
}

fn point_text(p: &Option<Point>) -> String {
    match p {
        None => "-".into(),
        Some(Point::Head) => "head".into(),
        Some(Point::Lsn(l)) => format!("lsn {l}"),
        Some(Point::Timestamp(t)) => t.to_string(),
    }
}

/// Sizes in binary units, one decimal.
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "-".into())
}

fn branch_table(bs: &[BranchView]) -> Vec<Vec<String>> {
    let mut rows = vec![[
        "NAME",
        "PARENT",
        "POINT",
        "LSN",
        "SIZE",
        "PORT",
        "STATE",
        "PROTECTED",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for b in bs {
        let state = match (&b.restore_target, b.state.as_str()) {
            (Some(t), s) => format!("{s} (restore of {t})"),
            (None, s) => s.to_string(),
        };
        rows.push(vec![
            b.name.clone(),
            opt(&b.parent),
            point_text(&b.point),
            opt(&b.lsn),
            human_bytes(b.logical_size_bytes),
            b.port.to_string(),
            state,
            if b.protected { "yes" } else { "no" }.into(),
        ]);
    }
    rows
}

fn snapshot_table(ss: &[SnapshotView]) -> Vec<Vec<String>> {
    let mut rows = vec![
        ["NAME", "BRANCH", "POINT", "LSN", "SIZE", "STATE", "CREATED"]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
    ];
    for s in ss {
        rows.push(vec![
            s.name.clone(),
            s.branch.clone(),
            point_text(&Some(s.point)),
            opt(&s.lsn),
            human_bytes(s.size_bytes),
            s.state.clone(),
            s.created_at.strftime("%Y-%m-%d %H:%M:%S").to_string(),
        ]);
    }
    rows
}

fn restore_table(rs: &[RestoreView]) -> Vec<Vec<String>> {
    let mut rows = vec![[
        "ID", "SOURCE", "TARGET", "STATE", "PREVIEW", "BACKUP", "STARTED",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for r in rs {
        rows.push(vec![
            r.id.clone(),
            r.source.clone(),
            r.target.clone(),
            r.state.clone(),
            opt(&r.restored_branch),
            opt(&r.backup_branch),
            r.started_at.strftime("%Y-%m-%d %H:%M:%S").to_string(),
        ]);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_with_a_point() {
        assert_eq!(parse_source("main").unwrap(), ("main".into(), Point::Head));
        let (b, p) = parse_source("main@0/16B3740").unwrap();
        assert_eq!(b, "main");
        assert_eq!(p, Point::Lsn("0/16B3740".parse().unwrap()));
        let (_, p) = parse_source("dev@2026-11-26T21:00:00Z").unwrap();
        assert!(matches!(p, Point::Timestamp(_)));
        assert_eq!(parse_source("dev@head").unwrap().1, Point::Head);
        assert!(parse_source("dev@yesterday").is_err());
    }

    #[test]
    fn tables_align_columns() {
        let t = render_table(&[
            vec!["NAME".into(), "PORT".into()],
            vec!["main".into(), "55432".into()],
            vec!["feature-x".into(), "55433".into()],
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "NAME       PORT");
        assert_eq!(lines[2], "feature-x  55433");
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(40 * 1024 * 1024), "40.0 MiB");
    }
}
