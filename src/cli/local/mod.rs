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
//!
//! Where things are: `args` (the subcommands and their flags, as clap
//! parses them), `lifecycle` (init, up, down, status), `commands` (branches,
//! snapshots, restores, start/stop, psql), `output` (tables, JSON, the
//! progress line). The daemon itself is [`crate::local::daemon`]; these
//! commands talk to it with [`crate::local::client`].

mod args;
mod commands;
mod lifecycle;
mod output;

use std::path::{Path, PathBuf};

pub use args::{
    BranchCommand, InitArgs, LocalArgs, LocalCommand, Output, PointArgs, RestoreAction,
    RestoreArgs, SnapshotCommand,
};

use super::CliError;
use crate::local::client::Client;
use crate::local::{daemon, LocalError, Paths};

/// Runs a `local` command.
pub async fn run(args: LocalArgs) -> Result<(), CliError> {
    let dir = absolute(&args.dir)?;
    let paths = Paths::new(&dir);
    let out = args.output;
    match *args.command {
        LocalCommand::Daemon => Ok(daemon::run(paths).await?),
        LocalCommand::Init(a) => lifecycle::init(&paths, out, a).await,
        LocalCommand::Up => lifecycle::up(&paths, out).await,
        LocalCommand::Down => lifecycle::down(&paths, out).await,
        LocalCommand::Status => lifecycle::status(&paths, out).await,
        LocalCommand::Branch(cmd) => commands::branch(&paths, out, cmd).await,
        LocalCommand::Snapshot(cmd) => commands::snapshot(&paths, out, cmd).await,
        LocalCommand::Restore(a) => commands::restore(&paths, out, a).await,
        LocalCommand::Start { name } => commands::start(&paths, out, &name).await,
        LocalCommand::Stop { name } => commands::stop(&paths, out, &name).await,
        LocalCommand::ConnectionString { name } => {
            commands::connection_string(&paths, out, &name).await
        }
        LocalCommand::Psql { name, args } => commands::psql(&paths, &name, args).await,
    }
}

/// Local mode's errors end the command like the storage's do.
impl From<LocalError> for CliError {
    fn from(e: LocalError) -> Self {
        match e {
            LocalError::Storage(s) => CliError::Storage(s),
            other => CliError::Other(other.to_string()),
        }
    }
}

/// A client of the daemon of `paths`.
fn client(paths: &Paths) -> Result<Client, CliError> {
    Ok(Client::new(paths)?)
}

/// `--dir` made absolute (the daemon runs elsewhere).
fn absolute(p: &Path) -> Result<PathBuf, CliError> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}
