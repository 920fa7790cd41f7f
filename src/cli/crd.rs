//! `pgbranch crd`: prints the CRDs generated from the types in `api`.

use super::CliError;

#[derive(Debug, clap::Args)]
pub struct CrdArgs {}

pub fn run(_args: CrdArgs) -> Result<(), CliError> {
    Err(CliError::Other("not implemented yet".into()))
}
