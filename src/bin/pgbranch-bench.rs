//! `pgbranch-bench`: how fast pgbranch branches and snapshots a live
//! PostgreSQL database, per copy-on-write driver, against the two usual
//! ways to copy one (`pg_basebackup` and `CREATE DATABASE … TEMPLATE`),
//! measured in the same run on the same volume. Not a test: it prints
//! tables, it asserts nothing.
//!
//! Run (as root, so the engine can run postgres as the `postgres` user):
//!
//! ```text
//! # small default: copy driver, pgbench scale 10, a few minutes
//! # (--release is optional: the time is postgres and I/O, not our code)
//! cargo run --release --bin pgbranch-bench
//!
//! # every driver at the default size, on the volumes the test script mounts
//! # (scripts/test-volumes.sh exports PGBRANCH_TEST_BTRFS / PGBRANCH_TEST_XFS)
//! cargo run --bin pgbranch-bench -- --drivers copy,reflink,btrfs
//!
//! # every driver, a 1 GiB and a 5 GiB database (scale 70 and 350), on the
//! # btrfs and XFS(reflink) volumes of scripts/test-volumes.sh (make them
//! # larger than 4 GiB for scale 350: ~20 GiB each)
//! cargo run --release --bin pgbranch-bench -- \
//!     --drivers copy,reflink,btrfs --scales 70,350 \
//!     --btrfs-dir /mnt/btrfs --xfs-dir /mnt/xfs --copy-dir /var/tmp
//! ```
//!
//! For each driver and scale it: creates a root timeline, starts its
//! compute, loads `pgbench -i -s SCALE`, lets the engine roll a base past
//! the load (what its background roller does on copy-on-write drivers
//! anyway), runs `pgbench` load (`--clients`)
//! for `--pitr-back` seconds and on through the measurements, then times
//! branch at head (the first, and the median of `--branches`), the new
//! branch's postgres accepting a query, a snapshot at head, a branch at a
//! timestamp `--pitr-back` seconds back, the disk used by the `--branches`
//! head branches; then `pg_basebackup -X stream -c fast` under the same
//! load and `CREATE DATABASE … TEMPLATE` (load stopped: it needs the
//! template to have no sessions). With two scales it also prints the
//! ratios large ÷ small. Timings are wall-clock from the call to Ready.
//! Disk: plain copies are measured by the blocks their files hold;
//! copy-on-write drivers by the growth of their volume's used space (so
//! give them a volume nothing else writes to); `pg_basebackup` by its
//! files, TEMPLATE by `pg_database_size` of the copy, times `--branches`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Parser;
use pgbranch::storage::engine::{Engine, EngineConfig, StopMode};
use pgbranch::storage::wait::{wait_snapshot_ready, wait_timeline_ready};
use pgbranch::storage::*;

const PASSWORD: &str = "bench-password";
const READY_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Parser)]
#[command(
    name = "pgbranch-bench",
    about = "Benchmark pgbranch branches and snapshots"
)]
struct Args {
    /// pgbench scales to measure (1 ≈ 16 MB); with two, ratios large ÷ small.
    #[arg(long, value_delimiter = ',', default_value = "10")]
    scales: Vec<u32>,
    /// Drivers to measure.
    #[arg(long, value_delimiter = ',', default_value = "copy")]
    drivers: Vec<DriverKind>,
    /// Where the copy driver's volume lives (a temp dir is made inside).
    #[arg(long, default_value = "/var/tmp")]
    copy_dir: PathBuf,
    /// A btrfs mount for the btrfs driver.
    #[arg(long, env = "PGBRANCH_TEST_BTRFS")]
    btrfs_dir: Option<PathBuf>,
    /// An XFS (reflink=1) mount for the reflink driver.
    #[arg(long, env = "PGBRANCH_TEST_XFS")]
    xfs_dir: Option<PathBuf>,
    /// How far back the point-in-time branch goes (seconds of load first).
    #[arg(long, default_value_t = 60)]
    pitr_back: u64,
    /// How many head branches to make for the median time and disk use.
    #[arg(long, default_value_t = 10)]
    branches: usize,
    /// pgbench clients of the background load.
    #[arg(long, default_value_t = 2)]
    clients: u32,
    /// Limit the background load to this many transactions per second
    /// (pgbench -R); default: as fast as it goes (a saturating load).
    #[arg(long)]
    rate: Option<u32>,
    /// The engine's base roller threshold in MiB of archived WAL (0: never
    /// roll; default: the engine's).
    #[arg(long)]
    base_roll_wal_mib: Option<u64>,
    /// PostgreSQL binaries (pgbench, pg_basebackup, initdb, postgres).
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pg_bin: PathBuf,
}

#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("postgres: {0}")]
    Pg(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Other(String),
}

/// What one driver at one scale measured (seconds, bytes).
#[derive(Debug, Default, Clone)]
struct Run {
    driver: Option<DriverKind>,
    scale: u32,
    data_bytes: u64,
    head_first: f64,
    head_median: f64,
    accepting: f64,
    snapshot: f64,
    pitr: f64,
    disk_branches: u64,
    disk_how: &'static str,
    basebackup: f64,
    basebackup_bytes: u64,
    template: f64,
    template_bytes: u64,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // On Ctrl-C or SIGTERM the measuring future is dropped: the computes
    // (killed when their handle drops) and pgbench (kill_on_drop) stop;
    // then the scratch directories go.
    let outcome = tokio::select! {
        r = run(&args) => r,
        _ = interrupted() => Err(BenchError::Other("interrupted".into())),
    };
    if let Ok(dirs) = CREATED.lock() {
        for d in dirs.iter().filter(|d| d.exists()) {
            remove_tree(d);
        }
    }
    if let Err(e) = outcome {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Scratch directories made by this run, removed at the end.
static CREATED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

async fn interrupted() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

/// Removes a scratch tree, btrfs subvolumes in it included.
fn remove_tree(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let mut subvols: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_dir())
        .filter(|e| e.metadata().map(|m| m.ino() == 256).unwrap_or(false))
        .map(|e| e.into_path())
        .collect();
    subvols.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for sv in subvols {
        let _ = std::process::Command::new("btrfs")
            .args(["subvolume", "delete"])
            .arg(&sv)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        eprintln!("could not remove {}: {e}", dir.display());
    }
}

async fn run(args: &Args) -> Result<(), BenchError> {
    for &driver in &args.drivers {
        let parent = match driver {
            DriverKind::Copy => Some(args.copy_dir.clone()),
            DriverKind::Btrfs => args.btrfs_dir.clone(),
            DriverKind::Reflink => args.xfs_dir.clone(),
        };
        let Some(parent) = parent else {
            println!("driver {driver}: no volume given (--btrfs-dir / --xfs-dir): skipped\n");
            continue;
        };
        let mut runs = Vec::new();
        for &scale in &args.scales {
            eprintln!("== {driver}, scale {scale} ==");
            let r = measure(args, driver, &parent, scale).await?;
            print_run(args, &r);
            runs.push(r);
        }
        if let [small, .., large] = runs.as_slice() {
            print_ratios(small, large);
        }
    }
    Ok(())
}

struct Compute {
    port: u16,
}

fn conn(port: u16, db: &str) -> ConnInfo {
    ConnInfo {
        host: "127.0.0.1".into(),
        port,
        user: "postgres".into(),
        password: Some(Password(PASSWORD.into())),
        dbname: db.into(),
    }
}

async fn client(port: u16, db: &str) -> Result<tokio_postgres::Client, BenchError> {
    let mut last = None;
    for _ in 0..300 {
        match tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(port)
            .user("postgres")
            .password(PASSWORD)
            .dbname(db)
            .connect(tokio_postgres::NoTls)
            .await
        {
            Ok((c, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                return Ok(c);
            }
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    Err(BenchError::Other(format!(
        "cannot connect to port {port}: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}

fn free_port() -> Result<u16, BenchError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn pg_tool(args: &Args, tool: &str, c: &Compute) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(args.pg_bin.join(tool));
    cmd.env("PGPASSWORD", PASSWORD)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", c.port.to_string())
        .env("PGUSER", "postgres")
        .kill_on_drop(true);
    cmd
}

async fn run_tool(mut cmd: tokio::process::Command, what: &str) -> Result<(), BenchError> {
    let out = cmd.stdout(Stdio::null()).output().await?;
    if !out.status.success() {
        return Err(BenchError::Other(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// Bytes in use on the filesystem holding `p`, after a sync.
fn used_bytes(p: &Path) -> Result<u64, BenchError> {
    nix::unistd::sync();
    let st = nix::sys::statvfs::statvfs(p).map_err(|e| BenchError::Other(e.to_string()))?;
    Ok((st.blocks() - st.blocks_free()) * st.fragment_size())
}

/// Bytes allocated to the files under `dirs` (each inode once): exact for
/// plain copies, where nothing is shared; copy-on-write drivers are
/// measured by the filesystem's used space instead (their own volume).
fn allocated_bytes<'a>(dirs: impl IntoIterator<Item = &'a Path>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for d in dirs {
        for e in walkdir::WalkDir::new(d).into_iter().flatten() {
            if let Ok(m) = e.metadata() {
                if m.is_file() && seen.insert((m.dev(), m.ino())) {
                    total += m.blocks() * 512;
                }
            }
        }
    }
    total
}

async fn timed<T, F: std::future::Future<Output = Result<T, BenchError>>>(
    f: F,
) -> Result<(T, f64), BenchError> {
    let start = Instant::now();
    let v = f.await?;
    Ok((v, start.elapsed().as_secs_f64()))
}

async fn branch_at(
    s: &dyn Storage,
    key: String,
    root: &TimelineId,
    point: Point,
    source: &ConnInfo,
) -> Result<Timeline, BenchError> {
    let t = s
        .create_timeline(CreateTimeline {
            key: OpKey::new(key)?,
            source: Source::Timeline {
                timeline: root.clone(),
                point,
            },
            source_connection: Some(source.clone()),
            label: Some("bench".into()),
        })
        .await?;
    Ok(wait_timeline_ready(s, &t.id, READY_TIMEOUT).await?)
}

async fn measure(
    args: &Args,
    driver: DriverKind,
    parent: &Path,
    scale: u32,
) -> Result<Run, BenchError> {
    // Short on purpose: PostgreSQL truncates an expanded archive_command
    // at 1024 bytes, and the engine's names the archive path several times.
    let dir = parent.join(format!(
        "pgb-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir(&dir)?;
    if let Ok(mut dirs) = CREATED.lock() {
        dirs.push(dir.clone());
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let volume = dir.join("v");
    std::fs::create_dir(&volume)?;
    let engine = Engine::open(EngineConfig {
        root: volume.clone(),
        driver: Some(driver),
        pg_bin_dir: Some(args.pg_bin.clone()),
        base_roll_wal_bytes: args.base_roll_wal_mib.map(|m| m * 1024 * 1024),
        ..EngineConfig::default()
    })
    .await?;
    let result = measure_on(args, &engine, &dir, scale).await;
    // Give the space back whatever happened.
    if let Ok(tls) = engine.list_timelines().await {
        for t in tls {
            let _ = engine.delete_timeline(&t.id).await;
        }
    }
    if let Ok(snaps) = engine.list_snapshots().await {
        for s in snaps {
            let _ = engine.delete_snapshot(&s.id).await;
        }
    }
    drop(engine);
    remove_tree(&dir);
    let mut r = result?;
    r.driver = Some(driver);
    Ok(r)
}

async fn measure_on(
    args: &Args,
    engine: &Engine,
    scratch: &Path,
    scale: u32,
) -> Result<Run, BenchError> {
    let s: &dyn Storage = engine;
    let mut r = Run {
        scale,
        ..Run::default()
    };
    let root = s
        .create_timeline(CreateTimeline {
            key: OpKey::new("bench-root")?,
            source: Source::Empty {
                superuser_password: Some(Password(PASSWORD.into())),
            },
            source_connection: None,
            label: Some("bench".into()),
        })
        .await?;
    let root = wait_timeline_ready(s, &root.id, READY_TIMEOUT).await?;
    let c = Compute { port: free_port()? };
    let pg = engine.start_postgres(&root.id, c.port).await?;
    let admin = client(c.port, "postgres").await?;
    admin.batch_execute("CREATE DATABASE bench").await?;

    eprintln!("loading pgbench scale {scale} ...");
    let mut init = pg_tool(args, "pgbench", &c);
    init.args(["-i", "-q", "-s", &scale.to_string(), "bench"]);
    run_tool(init, "pgbench -i").await?;
    admin.batch_execute("CHECKPOINT").await?;
    // Archive the load and roll a base past it, as the engine's background
    // roller would have by then: measure a steady state, not the first
    // roll of the whole load racing the timings.
    admin.batch_execute("SELECT pg_switch_wal()").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, secs) = timed(async {
        engine.roll_bases_now().await;
        Ok(())
    })
    .await?;
    eprintln!("rolled a base past the load in {secs:.1} s");
    let size: i64 = admin
        .query_one(
            "SELECT sum(pg_database_size(oid))::bigint FROM pg_database",
            &[],
        )
        .await?
        .get(0);
    r.data_bytes = u64::try_from(size).unwrap_or(0);

    // Background write load through everything that follows.
    let mut load = pg_tool(args, "pgbench", &c);
    load.args([
        "-n",
        "-c",
        &args.clients.to_string(),
        "-j",
        &args.clients.to_string(),
        "-T",
        "86400",
        "bench",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if let Some(tps) = args.rate {
        load.args(["-R", &tps.to_string()]);
    }
    let mut load = load.spawn()?;
    let load_start = Instant::now();
    eprintln!(
        "load running; waiting {} s so a point {} s back exists ...",
        args.pitr_back + 5,
        args.pitr_back
    );
    tokio::time::sleep(Duration::from_secs(args.pitr_back + 5)).await;

    let src = conn(c.port, "postgres");
    let mut head_times = Vec::new();
    let used_before = used_bytes(scratch)?;
    let mut branches = Vec::new();
    for i in 0..args.branches.max(1) {
        let (t, secs) = timed(branch_at(
            s,
            format!("head-{i}"),
            &root.id,
            Point::Head,
            &src,
        ))
        .await?;
        head_times.push(secs);
        branches.push(t);
    }
    // Each branch holds its data directory and its base (kept for PITR).
    let (bytes, how) = match engine.driver() {
        DriverKind::Copy => {
            let dirs: Vec<PathBuf> = branches
                .iter()
                .filter_map(|t| engine.data_dir(&t.id).parent().map(Path::to_path_buf))
                .collect();
            (
                allocated_bytes(dirs.iter().map(PathBuf::as_path)),
                "blocks of their files",
            )
        }
        DriverKind::Btrfs => {
            let mut total = Some(0u64);
            for t in &branches {
                // Measured by the engine in the background (it reads every
                // extent): wait for the first measurement.
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut excl = None;
                while excl.is_none() && Instant::now() < deadline {
                    excl = s.get_timeline(&t.id).await?.exclusive_bytes;
                    if excl.is_none() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                total = total.zip(excl).map(|(a, b)| a + b);
            }
            match total {
                Some(t) => (t, "btrfs exclusive bytes"),
                None => (
                    used_bytes(scratch)?.saturating_sub(used_before),
                    "volume growth, WAL archive included",
                ),
            }
        }
        DriverKind::Reflink => (
            used_bytes(scratch)?.saturating_sub(used_before),
            "volume growth, WAL archive included",
        ),
    };
    r.disk_branches = bytes;
    r.disk_how = how;
    r.head_first = head_times[0];
    head_times.sort_by(f64::total_cmp);
    r.head_median = head_times[head_times.len() / 2];

    // The first branch's postgres: start to first answered query.
    let bport = free_port()?;
    let (bpg, secs) = timed(async {
        let bpg = engine.start_postgres(&branches[0].id, bport).await?;
        let bc = client(bport, "bench").await?;
        bc.query_one("SELECT count(*) FROM pgbench_branches", &[])
            .await?;
        Ok(bpg)
    })
    .await?;
    r.accepting = secs;
    bpg.stop(StopMode::Immediate).await?;

    let (_, secs) = timed(async {
        let snap = s
            .create_snapshot(CreateSnapshot {
                key: OpKey::new("bench-snap")?,
                timeline: root.id.clone(),
                point: Point::Head,
                source_connection: Some(src.clone()),
                label: None,
            })
            .await?;
        Ok(wait_snapshot_ready(s, &snap.id, READY_TIMEOUT).await?)
    })
    .await?;
    r.snapshot = secs;

    let back = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(args.pitr_back as i64);
    let (_, secs) = timed(branch_at(
        s,
        "pitr".into(),
        &root.id,
        Point::Timestamp(back),
        &src,
    ))
    .await?;
    r.pitr = secs;

    // Baseline 1: pg_basebackup under the same load.
    let bb_dir = scratch.join("basebackup");
    let mut bb = pg_tool(args, "pg_basebackup", &c);
    bb.args(["-X", "stream", "-c", "fast", "-D"]).arg(&bb_dir);
    let (_, secs) = timed(run_tool(bb, "pg_basebackup")).await?;
    r.basebackup = secs;
    r.basebackup_bytes = allocated_bytes([bb_dir.as_path()]);
    let _ = std::fs::remove_dir_all(&bb_dir);
    eprintln!(
        "load ran {:.0} s; stopping it for CREATE DATABASE ... TEMPLATE",
        load_start.elapsed().as_secs_f64()
    );
    let _ = load.start_kill();
    let _ = load.wait().await;

    // Baseline 2: CREATE DATABASE … TEMPLATE (PostgreSQL's default strategy).
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'bench' AND pid <> pg_backend_pid()",
        )
        .await?;
    admin.batch_execute("CHECKPOINT").await?;
    let (_, secs) = timed(async {
        admin
            .batch_execute("CREATE DATABASE bench_copy TEMPLATE bench")
            .await?;
        Ok(())
    })
    .await?;
    r.template = secs;
    // A byte copy of the template's files, whatever the filesystem.
    let copy_size: i64 = admin
        .query_one("SELECT pg_database_size('bench_copy')", &[])
        .await?
        .get(0);
    r.template_bytes = u64::try_from(copy_size).unwrap_or(0);
    drop(admin);
    pg.stop(StopMode::Immediate).await?;
    Ok(r)
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

fn print_run(args: &Args, r: &Run) {
    let d = r.driver.map(|d| d.to_string()).unwrap_or_default();
    let n = args.branches.max(1);
    println!();
    println!(
        "driver {d}, pgbench scale {} (databases {}), under pgbench load ({} clients, {})",
        r.scale,
        mb(r.data_bytes),
        args.clients,
        args.rate
            .map(|t| format!("{t} tps"))
            .unwrap_or_else(|| "unthrottled".into())
    );
    println!(
        "  {:<36} {:>12} {:>16} {:>26}",
        "operation", "pgbranch", "pg_basebackup", "CREATE DATABASE TEMPLATE"
    );
    println!(
        "  {:<36} {:>10.3} s {:>14.3} s {:>24.3} s",
        "branch at head (first)", r.head_first, r.basebackup, r.template
    );
    println!(
        "  {:<36} {:>10.3} s",
        format!("branch at head (median of {n})"),
        r.head_median
    );
    println!(
        "  {:<36} {:>10.3} s",
        "new branch answering a query", r.accepting
    );
    println!("  {:<36} {:>10.3} s", "snapshot at head", r.snapshot);
    println!(
        "  {:<36} {:>10.3} s",
        format!("branch at now-{}s", args.pitr_back),
        r.pitr
    );
    println!(
        "  {:<36} {:>12} {:>16} {:>26}",
        format!("disk held by {n} copies"),
        mb(r.disk_branches),
        format!("{} (est.)", mb(r.basebackup_bytes * n as u64)),
        format!("{} (est.)", mb(r.template_bytes * n as u64)),
    );
    let ratio = |x: f64| {
        if r.head_median > 0.0 {
            format!("{:.1}x", x / r.head_median)
        } else {
            "-".into()
        }
    };
    println!(
        "  {:<36} {:>12} {:>16} {:>26}",
        "baseline ÷ pgbranch (median head)",
        "",
        ratio(r.basebackup),
        ratio(r.template)
    );
    println!("  (pgbranch disk: {}; TEMPLATE measured with the load stopped: it needs the template to have no sessions; baseline disk = {n} x one measured copy)", r.disk_how);
}

fn print_ratios(small: &Run, large: &Run) {
    let d = small.driver.map(|d| d.to_string()).unwrap_or_default();
    let q = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}", a / b)
        } else {
            "-".into()
        }
    };
    println!();
    println!(
        "driver {d}: large ÷ small (scale {} ÷ scale {}, databases {:.2}x)",
        large.scale,
        small.scale,
        large.data_bytes as f64 / small.data_bytes.max(1) as f64
    );
    for (what, a, b) in [
        (
            "branch at head (median)",
            large.head_median,
            small.head_median,
        ),
        (
            "new branch answering a query",
            large.accepting,
            small.accepting,
        ),
        ("snapshot at head", large.snapshot, small.snapshot),
        ("branch at a past timestamp", large.pitr, small.pitr),
        (
            "disk used by the branches",
            large.disk_branches as f64,
            small.disk_branches as f64,
        ),
        ("pg_basebackup", large.basebackup, small.basebackup),
        ("CREATE DATABASE TEMPLATE", large.template, small.template),
    ] {
        println!("  {what:<36} {:>8}", q(a, b));
    }
}
