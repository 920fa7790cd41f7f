//! The daemon's life from the command line: `init` (directory, daemon,
//! root branch `main`), `up` (the daemon again, with the branches that were
//! running), `down` and `status`. The daemon runs as this same binary
//! (`pgbranch local daemon`), in the background, logging to `daemon.log`.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::commands::wait_branch;
use super::output::{ports_table, print_list, print_one, progress_line};
use super::{client, InitArgs, Output};
use crate::cli::CliError;
use crate::local::api::{BranchView, CreateBranchRequest, StatusView};
use crate::local::store::Store;
use crate::local::{daemon_pid, Paths};
use crate::storage::Point;

/// `status`: the daemon's state.
pub(super) async fn status(paths: &Paths, out: Output) -> Result<(), CliError> {
    let s: StatusView = client(paths)?.get("/status").await?;
    print_one(out, &s, |s| {
        format!(
            "daemon pid {} for {}\ndriver {}, PostgreSQL {}\n{} branches, {} running",
            s.pid, s.dir, s.driver, s.pg_major, s.branches, s.running
        )
    })
}

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

/// The last lines of the daemon's log, for an error.
fn log_tail(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// `init`: a new local directory, its daemon and the root branch `main`.
pub(super) async fn init(paths: &Paths, out: Output, a: InitArgs) -> Result<(), CliError> {
    if paths.store().exists() {
        return Err(CliError::Usage(format!(
            "{} is already initialized: use `pgbranch local up`",
            paths.dir.display()
        )));
    }
    std::fs::create_dir_all(&paths.dir)?;
    {
        let store = Store::open(&paths.store())?;
        store.set_setting("port_base", &a.port_base.to_string())?;
        if let Some(d) = a.driver {
            store.set_setting("driver", &d.to_string())?;
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
        .await?;
    let b = wait_branch(&c, out, "main").await?;
    let status: StatusView = c.get("/status").await?;
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

/// `up`: the daemon again; waits for the branches that come back.
pub(super) async fn up(paths: &Paths, out: Output) -> Result<(), CliError> {
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
        let bs: Vec<BranchView> = c.get("/branches?brief=true").await?;
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
    print_list(out, &branches, ports_table)
}

/// `down`: stops the daemon (and so every compute).
pub(super) async fn down(paths: &Paths, out: Output) -> Result<(), CliError> {
    let pid = daemon_pid(paths);
    let c = client(paths)?;
    match c.post::<_, serde_json::Value>("/shutdown", &()).await {
        Ok(_) => {}
        Err(e) if pid.is_none() => {
            return print_one(out, &serde_json::json!({"running": false}), |_| {
                format!("the daemon is not running ({e})")
            })
        }
        Err(e) => return Err(e.into()),
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
