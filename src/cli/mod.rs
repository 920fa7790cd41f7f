//! The `pgbranch` command line: one binary for the operator, the storage
//! service, CRD generation and local mode.

pub mod crd;
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

/// Runs the parsed command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Operator(args) => operator::run(args).await,
        Command::Storage(cmd) => storage::run(cmd).await,
        Command::Crd(args) => crd::run(args),
        Command::Local(args) => local::run(args).await,
    }
}
