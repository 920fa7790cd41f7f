//! `pgbranch storage ...`: the storage engine as a service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use super::CliError;
use crate::storage::engine::{Engine, EngineConfig};
use crate::storage::http::server::{self, Auth};
use crate::storage::{DriverKind, Storage};

/// Environment variable holding the API token when no `--token-file` is given.
pub const TOKEN_ENV: &str = "PGBRANCH_STORAGE_TOKEN";

#[derive(Debug, clap::Subcommand)]
pub enum StorageCommand {
    /// Serve the embedded engine on a data directory as an HTTP JSON API.
    ///
    /// Prints `listening on ADDR` on stdout once it accepts connections.
    /// Stops gracefully on SIGTERM or Ctrl-C.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The engine's volume root (timelines, snapshots, WAL archives, metadata).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Where computes mount this volume (their --volume-mount-path): the
    /// path written into every data directory's archive_command. Default:
    /// --data-dir, right when the engine and the computes mount the volume
    /// at the same path (as the chart does).
    #[arg(long, value_name = "DIR", env = "PGBRANCH_COMPUTE_ROOT")]
    pub compute_root: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Copy-on-write driver; probed from the volume when absent.
    #[arg(long, value_parser = ["btrfs", "reflink", "copy"])]
    pub driver: Option<String>,
    /// File holding the bearer token clients must send (else the
    /// PGBRANCH_STORAGE_TOKEN environment variable).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Serve without authentication. Refused unless the listen address is
    /// a loopback address.
    #[arg(long)]
    pub no_auth: bool,
    /// The non-root user that runs initdb and postgres (when run as root).
    #[arg(long, value_name = "USER")]
    pub run_as: Option<String>,
    /// Directory of the PostgreSQL binaries (initdb, postgres, pg_ctl).
    #[arg(long, value_name = "DIR")]
    pub pg_bin: Option<PathBuf>,
    /// Roll a timeline's newest base forward in the background once this
    /// many MiB of WAL are archived past it, so a point-in-time branch
    /// replays at most about that much. 0 = never. Default: 1024 on btrfs
    /// and reflink, never on the plain-copy driver (full copies).
    #[arg(long, value_name = "MIB")]
    pub base_roll_wal_mib: Option<u64>,
    /// Rolled bases kept per timeline besides its creation base (at least
    /// 1; --base-roll-wal-mib 0 turns rolling off).
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub base_roll_keep: u64,
}

pub async fn run(cmd: StorageCommand) -> Result<(), CliError> {
    match cmd {
        StorageCommand::Serve(args) => serve(args).await,
    }
}

fn load_auth(args: &ServeArgs) -> Result<Auth, CliError> {
    let token = match &args.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| CliError::Usage(format!("reading token file {}: {e}", f.display())))?,
        ),
        None => std::env::var(TOKEN_ENV).ok(),
    };
    match (token, args.no_auth) {
        (Some(_), true) => Err(CliError::Usage(
            "--no-auth conflicts with a token (--token-file or PGBRANCH_STORAGE_TOKEN)".into(),
        )),
        (Some(t), false) => Ok(Auth::token(&t)?),
        (None, true) if args.listen.ip().is_loopback() => Ok(Auth::Disabled),
        (None, true) => Err(CliError::Usage(format!(
            "--no-auth is only allowed on a loopback address, not {}",
            args.listen
        ))),
        (None, false) => Err(CliError::Usage(format!(
            "no API token: pass --token-file FILE or set {TOKEN_ENV} (or --no-auth on loopback)"
        ))),
    }
}

/// The engine's configuration from the flags.
fn engine_config(args: &ServeArgs) -> Result<EngineConfig, CliError> {
    let driver = args
        .driver
        .as_deref()
        .map(str::parse::<DriverKind>)
        .transpose()?;
    Ok(EngineConfig {
        root: args.data_dir.clone(),
        compute_root: args.compute_root.clone(),
        driver,
        pg_bin_dir: args.pg_bin.clone(),
        run_as: args.run_as.clone(),
        base_roll_wal_bytes: args
            .base_roll_wal_mib
            .map(|m| m.saturating_mul(1024 * 1024)),
        base_roll_keep: usize::try_from(args.base_roll_keep).ok(),
        ..EngineConfig::default()
    })
}

async fn serve(args: ServeArgs) -> Result<(), CliError> {
    let auth = load_auth(&args)?;
    let engine = Engine::open(engine_config(&args)?).await?;
    let info = engine.info().await?;
    let storage: Arc<dyn Storage> = Arc::new(engine);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::Other(format!("listening on {}: {e}", args.listen)))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        driver = %info.driver,
        pg_major = info.pg_major,
        root = %info.root,
        compute_root = info.compute_root.as_deref().unwrap_or_default(),
        data_uid = info.data_uid.unwrap_or_default(),
        auth = matches!(auth, Auth::Token(_)),
        "storage service listening"
    );
    // A plain line for scripts and tests that start us on port 0.
    println!("listening on {addr}");
    server::serve(listener, storage, auth, super::shutdown_signal()).await?;
    tracing::info!("storage service stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[test]
    fn base_roll_flags_are_checked_at_parse_time() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["x", "--data-dir", "/srv/pgbranch"];
            argv.extend_from_slice(extra);
            T::try_parse_from(argv)
        };
        let t = parse(&["--base-roll-wal-mib", "512", "--base-roll-keep", "3"]).unwrap();
        assert_eq!(t.args.base_roll_wal_mib, Some(512));
        assert_eq!(t.args.base_roll_keep, 3);
        let err = parse(&["--base-roll-keep", "0"]).unwrap_err().to_string();
        assert!(err.contains("--base-roll-keep"), "{err}");
        assert!(parse(&["--base-roll-wal-mib", "lots"]).is_err());
        // Defaults: the engine's threshold, eight kept bases.
        let t = parse(&[]).unwrap();
        assert_eq!((t.args.base_roll_wal_mib, t.args.base_roll_keep), (None, 8));
    }

    /// Computes see the volume at --compute-root (default: where the
    /// engine has it).
    #[test]
    fn compute_root_reaches_the_engine() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["x", "--data-dir", "/srv/pgbranch"];
            argv.extend_from_slice(extra);
            engine_config(&T::try_parse_from(argv).unwrap().args).unwrap()
        };
        assert_eq!(parse(&[]).compute_root, None);
        assert_eq!(
            parse(&["--compute-root", "/var/lib/pgbranch"]).compute_root,
            Some(PathBuf::from("/var/lib/pgbranch"))
        );
    }
}
