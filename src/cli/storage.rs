//! `pgbranch storage ...`: the storage engine as a service.

use super::CliError;

#[derive(Debug, clap::Subcommand)]
pub enum StorageCommand {}

pub async fn run(cmd: StorageCommand) -> Result<(), CliError> {
    match cmd {}
}
