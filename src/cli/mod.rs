//! The `pgbranch` command line: one binary for the operator, the storage
//! service, CRD generation and local mode.

pub mod crd;
pub mod kubectl;
pub mod local;
pub mod operator;
pub mod storage;

use clap::{Parser, Subcommand};

/// PostgreSQL branches, snapshots and restores as Kubernetes resources.
#[derive(Debug, Parser)]
#[command(name = "pgbranch", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Kubernetes operator.
    Operator(operator::OperatorArgs),
    /// The storage layer: `serve` runs the engine as an HTTP service.
    #[command(subcommand)]
    Storage(storage::StorageCommand),
    /// Print the CustomResourceDefinitions (YAML), or write one file per kind.
    Crd(crd::CrdArgs),
    /// Branches on this machine, no cluster: `pgbranch local init`.
    Local(local::LocalArgs),
    /// The kubectl plugin (`kubectl pgbranch …` when this binary is on
    /// PATH as `kubectl-pgbranch`): status, create, restore, finalize.
    Kubectl(kubectl::KubectlArgs),
}

/// Errors that end the program with a message.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("{0}")]
    Other(String),
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT), saying which; a signal that
/// cannot be listened for is warned about and never comes. The services
/// (`operator`, `storage serve`) stop on it.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}

/// The command line, as given: run as `kubectl-pgbranch` (the kubectl
/// plugin's name; kubectl runs `kubectl-pgbranch ARGS` for `kubectl
/// pgbranch ARGS`), the arguments are the `kubectl` subcommand's.
pub fn args_from(mut argv: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let plugin = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("kubectl-pgbranch"));
    if plugin {
        argv[0] = "kubectl-pgbranch".into();
        argv.insert(1, "kubectl".into());
    }
    argv
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Operator(args) => operator::run(args).await,
        Command::Storage(cmd) => storage::run(cmd).await,
        Command::Crd(args) => crd::run(args),
        Command::Local(args) => local::run(args).await,
        Command::Kubectl(args) => kubectl::run(args).await,
    }
}

/// Sizes in binary units, one decimal.
pub(crate) fn human_bytes(n: u64) -> String {
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
