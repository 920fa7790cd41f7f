use clap::Parser;

#[tokio::main]
async fn main() {
    let args = pgbranch::cli::args_from(std::env::args_os().collect());
    // The kubectl plugin speaks through its output; its logs only warn.
    let default_level = if args.get(1).is_some_and(|a| a == "kubectl") {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = pgbranch::cli::Cli::parse_from(args);
    if let Err(e) = pgbranch::cli::run(cli).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
