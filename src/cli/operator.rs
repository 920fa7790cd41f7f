//! `pgbranch operator`: runs the controllers.

use super::CliError;

#[derive(Debug, clap::Args)]
pub struct OperatorArgs {}

pub async fn run(_args: OperatorArgs) -> Result<(), CliError> {
    Err(CliError::Other("not implemented yet".into()))
}
