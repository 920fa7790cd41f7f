//! The commands on branches, snapshots and restores: each is one call of
//! the daemon's control API; a creation or restore then polls until it is
//! done, showing its progress, and prints the result.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::args::parse_source;
use super::output::{
    branch_table, print_list, print_one, restore_table, snapshot_table, ProgressLine,
};
use super::{client, BranchCommand, Output, RestoreAction, RestoreArgs, SnapshotCommand};
use crate::cli::human_bytes;
use crate::cli::CliError;
use crate::local::api::{
    BranchView, CreateBranchRequest, CreateSnapshotRequest, FinalizeRequest, RestoreRequest,
    RestoreView, SetBranchRequest, SnapshotView,
};
use crate::local::client::Client;
use crate::local::Paths;
use crate::storage::{Point, Progress};

/// What one look at a long operation found.
enum Look {
    /// It is done.
    Done,
    /// It is still at it: its step (`idle` when the daemon names none).
    Busy(Option<Progress>, &'static str),
    /// It failed.
    Failed,
}

/// How a long operation ended, with its last view.
enum Ended<T> {
    Done(T),
    Failed(T),
}

/// Polls `path` until `look` says the operation is done (the progress line
/// is then finished) or failed, showing its progress on `line` meanwhile.
async fn poll<T: DeserializeOwned>(
    c: &Client,
    path: &str,
    line: &mut ProgressLine,
    look: impl Fn(&T) -> Look,
) -> Result<Ended<T>, CliError> {
    loop {
        let v: T = c.get(path).await?;
        match look(&v) {
            Look::Done => {
                line.finish();
                return Ok(Ended::Done(v));
            }
            Look::Failed => return Ok(Ended::Failed(v)),
            Look::Busy(p, idle) => line.show(p.as_ref(), idle),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `branch create|list|delete|set`.
pub(super) async fn branch(paths: &Paths, out: Output, cmd: BranchCommand) -> Result<(), CliError> {
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
                .await?;
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
            let bs: Vec<BranchView> = c.get("/branches").await?;
            print_list(out, &bs, branch_table)
        }
        BranchCommand::Delete { name } => {
            let v: serde_json::Value = c.delete(&format!("/branches/{name}")).await?;
            print_one(out, &v, |_| format!("branch {name} deleted"))
        }
        BranchCommand::Set { name, protected } => {
            let b: BranchView = c
                .patch(
                    &format!("/branches/{name}"),
                    &SetBranchRequest { protected },
                )
                .await?;
            print_one(out, &b, |b| {
                format!("branch {} (protected: {})", b.name, b.protected)
            })
        }
    }
}

/// `snapshot create|list|delete`.
pub(super) async fn snapshot(
    paths: &Paths,
    out: Output,
    cmd: SnapshotCommand,
) -> Result<(), CliError> {
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
                .await?;
            let mut line = ProgressLine::new(out);
            let path = format!("/snapshots/{}", s.name);
            let ended = poll(&c, &path, &mut line, |s: &SnapshotView| {
                match s.state.as_str() {
                    "ready" => Look::Done,
                    "creating" => Look::Busy(s.progress.clone(), "taking the snapshot"),
                    _ => Look::Failed,
                }
            })
            .await?;
            let s = match ended {
                Ended::Done(s) => s,
                Ended::Failed(s) => {
                    // A failed request leaves nothing behind.
                    let _ = c.delete::<serde_json::Value>(&path).await;
                    return Err(CliError::Other(format!(
                        "snapshot {} {}: {}",
                        s.name,
                        s.state,
                        s.error.unwrap_or_default()
                    )));
                }
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
            let ss: Vec<SnapshotView> = c.get("/snapshots").await?;
            print_list(out, &ss, snapshot_table)
        }
        SnapshotCommand::Delete { name } => {
            let v: serde_json::Value = c.delete(&format!("/snapshots/{name}")).await?;
            print_one(out, &v, |_| format!("snapshot {name} deleted"))
        }
    }
}

/// `restore` (one-step or multi-step), `restore finalize`, `restore list`.
pub(super) async fn restore(paths: &Paths, out: Output, a: RestoreArgs) -> Result<(), CliError> {
    let c = client(paths)?;
    let r: RestoreView = match a.action {
        Some(RestoreAction::List) => {
            let rs: Vec<RestoreView> = c.get("/restores").await?;
            return print_list(out, &rs, restore_table);
        }
        Some(RestoreAction::Finalize {
            preview,
            preserve_under_name,
        }) => {
            c.post(
                &format!("/branches/{preview}/finalize"),
                &FinalizeRequest {
                    preserve_under_name,
                },
            )
            .await?
        }
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
            .await?
        }
    };
    let mut line = ProgressLine::new(out);
    let ended = poll(
        &c,
        &format!("/restores/{}", r.id),
        &mut line,
        |r: &RestoreView| match r.state.as_str() {
            "completed" | "awaitingFinalize" => Look::Done,
            "restoring" => Look::Busy(
                r.progress.clone(),
                "starting the restored compute and switching the connection",
            ),
            _ => Look::Failed,
        },
    )
    .await?;
    let r = match ended {
        Ended::Done(r) => r,
        Ended::Failed(r) => {
            return Err(CliError::Other(format!(
                "restore {} failed: {}",
                r.id,
                r.error.unwrap_or_default()
            )))
        }
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
pub(super) async fn wait_branch(
    c: &Client,
    out: Output,
    name: &str,
) -> Result<BranchView, CliError> {
    let mut line = ProgressLine::new(out);
    let path = format!("/branches/{name}?brief=true");
    let ended = poll(c, &path, &mut line, |b: &BranchView| {
        match b.state.as_str() {
            "running" | "stopped" => Look::Done,
            "failed" | "exited" => Look::Failed,
            "starting" => Look::Busy(
                Some(Progress {
                    step: "starting its compute".into(),
                    percent: None,
                }),
                "",
            ),
            _ => Look::Busy(b.progress.clone(), "creating"),
        }
    })
    .await?;
    match ended {
        Ended::Done(b) => Ok(b),
        Ended::Failed(b) => {
            line.finish();
            Err(CliError::Other(format!(
                "branch {name} {}: {}",
                b.state,
                b.error.unwrap_or_default()
            )))
        }
    }
}

/// `start NAME`: starts a branch's compute.
pub(super) async fn start(paths: &Paths, out: Output, name: &str) -> Result<(), CliError> {
    let b: BranchView = client(paths)?
        .post(&format!("/branches/{name}/start"), &())
        .await?;
    print_one(out, &b, |b| {
        format!("{} is {} on port {}", b.name, b.state, b.port)
    })
}

/// `stop NAME`: stops a branch's compute.
pub(super) async fn stop(paths: &Paths, out: Output, name: &str) -> Result<(), CliError> {
    let b: BranchView = client(paths)?
        .post(&format!("/branches/{name}/stop"), &())
        .await?;
    print_one(out, &b, |b| format!("{} is {}", b.name, b.state))
}

/// `connection-string NAME`.
pub(super) async fn connection_string(
    paths: &Paths,
    out: Output,
    name: &str,
) -> Result<(), CliError> {
    let b: BranchView = client(paths)?.get(&format!("/branches/{name}")).await?;
    print_one(out, &b, |b| b.connection_string.clone())
}

/// `psql NAME [-- ARGS]`: replaces this process by psql on the branch.
pub(super) async fn psql(paths: &Paths, name: &str, args: Vec<String>) -> Result<(), CliError> {
    let b: BranchView = client(paths)?.get(&format!("/branches/{name}")).await?;
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

/// psql from PATH, else from the newest PostgreSQL under /usr/lib/postgresql.
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
