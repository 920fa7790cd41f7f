//! The `pgbranch local` command line as clap parses it: the subcommands,
//! their flags and arguments, and the points they take (`--lsn`,
//! `--timestamp`, `--source BRANCH@POINT`), read by the shared parser in
//! [`crate::point`].

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use super::daemon;
use crate::cli::CliError;
use crate::point::{parse_point, parse_point_word};
use crate::storage::{DriverKind, Point};

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
    pub(super) fn point(&self) -> Result<Point, CliError> {
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
pub(super) fn parse_source(s: &str) -> Result<(String, Point), CliError> {
    let Some((b, p)) = s.split_once('@') else {
        return Ok((s.to_string(), Point::Head));
    };
    let point = parse_point_word("--source", p).map_err(|e| CliError::Usage(e.to_string()))?;
    Ok((b.to_string(), point))
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
}
