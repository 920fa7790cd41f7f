//! The operator at scale on a real control plane: how long N Branches
//! (compute disabled) take to be Ready, what the operator writes once they
//! are, and how much memory it holds. Not a test: it prints tables.
//!
//! ```text
//! bash scripts/setup.sh && export KUBEBUILDER_ASSETS=$PWD/.envtest
//! cargo bench --bench control_plane -- --branches 1000,10000
//! ```
//!
//! What is real: etcd, kube-apiserver and kube-controller-manager (started
//! as the operator tests start them, `tests/support/cluster.rs`), and the
//! operator — the release `pgbranch operator` binary as a child process,
//! as its own ServiceAccount bound to the ClusterRole we ship (so its
//! requests go through API Priority and Fairness as in a cluster), with
//! leader election on. What is not: the storage. A real storage at 10,000
//! root branches would be 10,000 `initdb`s, so the operator's `--storage`
//! is an HTTP storage service (the real `pgbranch storage serve` API, in
//! this process) backed by [`memory_storage`], which answers every call at
//! once and stores nothing.
//!
//! For each size, in a fresh namespace: the operator starts and takes its
//! Lease; the bench creates the Branches (`--concurrency` requests in
//! flight, as cluster admin) and follows them with one watch (it keeps
//! only names and times, not objects), until every one is Ready; then it
//! counts, for `--rest-seconds`, the watch events on Branches, the
//! operator's requests and every write the apiserver served. Request
//! counts come from the apiserver's own metrics (`apiserver_request_total`,
//! and `apiserver_flowcontrol_dispatched_requests_total` for the operator:
//! it is the only client that is not exempt from priority and fairness).
//! RSS is the operator process's (`VmHWM` and `VmRSS` of /proc/PID/status).
//!
//! Run by `cargo test` (no `--bench` argument) it is a quick smoke test:
//! 50 Branches, all must become Ready and none may change at rest.

#[path = "measure.rs"]
mod measure;
#[path = "memory_storage.rs"]
mod memory_storage;
#[path = "../../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role, RoleBinding};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use pgbranch::api::{Branch, Snapshot, SnapshotRestore, SnapshotSchedule};
use pgbranch::storage::http::server::{self, Auth};
use tokio_util::sync::CancellationToken;

use measure::{operator_metrics, rss, sockets, Counters, CpuTimes};
use memory_storage::MemoryStorage;
use support::cluster::{control_plane, kubeconfig_yaml, ControlPlane};

const OPERATOR_SA: &str = "pgbranch-operator";
const LEASE: &str = "pgbranch-operator";

struct Args {
    sizes: Vec<usize>,
    rest: Duration,
    timeout: Duration,
    concurrency: usize,
    /// Extra flags of `pgbranch operator` (`--operator-args "--max-concurrent-reconciles 8"`).
    operator_args: Vec<String>,
    /// Run by `cargo bench` (else: the smoke test of `cargo test`).
    bench: bool,
}

fn parse_args() -> Result<Args, String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let bench = argv.iter().any(|a| a == "--bench");
    let mut a = if bench {
        Args {
            sizes: vec![1000, 10_000],
            rest: Duration::from_secs(60),
            timeout: Duration::from_secs(900),
            concurrency: 32,
            operator_args: vec![],
            bench,
        }
    } else {
        Args {
            sizes: vec![50],
            rest: Duration::from_secs(5),
            timeout: Duration::from_secs(180),
            concurrency: 16,
            operator_args: vec![],
            bench,
        }
    };
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--branches" => {
                a.sizes = value("--branches")?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("--branches: {e}"))?;
            }
            "--rest-seconds" => {
                a.rest = Duration::from_secs(
                    value("--rest-seconds")?
                        .parse()
                        .map_err(|e| format!("--rest-seconds: {e}"))?,
                )
            }
            "--timeout-seconds" => {
                a.timeout = Duration::from_secs(
                    value("--timeout-seconds")?
                        .parse()
                        .map_err(|e| format!("--timeout-seconds: {e}"))?,
                )
            }
            "--concurrency" => {
                a.concurrency = value("--concurrency")?
                    .parse()
                    .map_err(|e| format!("--concurrency: {e}"))?
            }
            "--operator-args" => {
                a.operator_args = value("--operator-args")?
                    .split_whitespace()
                    .map(String::from)
                    .collect()
            }
            "--bench" => {}
            // Run by `cargo test`, libtest's flags (`--test-threads=2`, a
            // filter) come along: the smoke run ignores them.
            _ if !bench => {}
            other => {
                return Err(format!(
                    "unknown argument {other:?} (expected --branches N,M --rest-seconds S \
                     --timeout-seconds S --concurrency C --operator-args \"FLAGS\")"
                ))
            }
        }
    }
    if a.sizes.is_empty() || a.sizes.contains(&0) || a.concurrency == 0 {
        return Err("--branches and --concurrency must be positive".into());
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("control_plane bench: {e}");
            std::process::exit(2);
        }
    };
    let Some(cp) = control_plane() else {
        if args.bench {
            eprintln!("control_plane bench: set KUBEBUILDER_ASSETS (bash scripts/setup.sh; export KUBEBUILDER_ASSETS=$PWD/.envtest)");
            std::process::exit(2);
        }
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(run(cp, args));
}

async fn run(cp: &'static ControlPlane, args: Args) {
    cp.install_crds(&[
        Branch::crd(),
        Snapshot::crd(),
        SnapshotRestore::crd(),
        SnapshotSchedule::crd(),
        pgbranch::api::BackupDestination::crd(),
    ])
    .await;
    let admin = cp.client("default");
    let version = admin
        .apiserver_version()
        .await
        .map(|v| v.git_version)
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let started = jiff::Timestamp::now();
    eprintln!(
        "control_plane bench: {} branches, operator {}, kube-apiserver {version}",
        args.sizes
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        env!("CARGO_BIN_EXE_pgbranch")
    );
    let mut rows = vec![];
    for &n in &args.sizes {
        let row = run_size(cp, n, &args).await;
        print_detail(&row);
        rows.push(row);
    }
    print_table(&rows, &args, &version, started);
    if !args.bench {
        for r in &rows {
            assert_eq!(
                r.ready, r.n,
                "smoke: {} of {} branches Ready after {:?}",
                r.ready, r.n, args.timeout
            );
            assert_eq!(
                r.rest_branch_events, 0,
                "smoke: branches changed at rest (nothing should write to a Ready branch)"
            );
            assert!(
                r.operator_exit_ok,
                "smoke: the operator did not stop cleanly"
            );
        }
        eprintln!("control_plane smoke: ok");
    }
}

/// What one size measured.
struct Row {
    n: usize,
    ready: usize,
    created_in: Duration,
    /// From the first create until the last branch was seen Ready.
    all_ready: Option<Duration>,
    /// Per branch, from its create to its Ready (sorted).
    latencies: Vec<Duration>,
    /// Apiserver counters over creation..all Ready.
    busy: Counters,
    /// Apiserver counters over the rest window.
    rest: Counters,
    rest_window: Duration,
    rest_branch_events: u64,
    rest_lease_events: u64,
    operator_reconciles: f64,
    operator_status_writes: f64,
    operator_errors: BTreeMap<String, f64>,
    storage_calls: u64,
    rss_peak: u64,
    rss_rest: u64,
    rss_idle: u64,
    /// Open sockets of the operator (its connections to the apiserver).
    sockets_peak: usize,
    sockets_rest: usize,
    /// CPU seconds used from the first create until all were Ready.
    cpu: CpuTimes,
    busy_wall: Duration,
    operator_exit_ok: bool,
    log: PathBuf,
}

async fn run_size(cp: &'static ControlPlane, n: usize, args: &Args) -> Row {
    let ns = cp.namespace(&format!("scale-{n}")).await;
    let admin = cp.client(&ns);
    let token = operator_token(&admin, &ns).await;
    let kubeconfig = cp.dir().join(format!("{ns}.operator.kubeconfig"));
    std::fs::write(&kubeconfig, kubeconfig_yaml(cp.server(), &token, &ns)).expect("kubeconfig");

    // The storage: the HTTP API of `pgbranch storage serve` over memory.
    let storage = Arc::new(MemoryStorage::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a storage port");
    let storage_url = format!("http://{}", listener.local_addr().expect("addr"));
    let stop_storage = CancellationToken::new();
    let served = tokio::spawn(server::serve(
        listener,
        storage.clone(),
        Auth::Disabled,
        stop_storage.clone().cancelled_owned(),
    ));

    // The bench's watch: names and times only.
    let tracker = Arc::new(Tracker::default());
    let branches: Api<Branch> = Api::namespaced(admin.clone(), &ns);
    let watch = tokio::spawn(follow(branches.clone(), tracker.clone()));
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &ns);
    let lease_events = Arc::new(Mutex::new(0u64));
    let lease_watch = tokio::spawn(count_lease_writes(leases.clone(), lease_events.clone()));
    while !tracker.synced() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The operator, as a pod would run it.
    let metrics_port = free_port();
    let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("control_plane");
    std::fs::create_dir_all(&logs).expect("a log directory");
    let log = logs.join(format!("{ns}-{}.operator.log", std::process::id()));
    let mut op = spawn_operator(
        &storage_url,
        &ns,
        &kubeconfig,
        metrics_port,
        &log,
        &args.operator_args,
    );
    let pid = op.id();
    let sockets_peak = Arc::new(Mutex::new(0usize));
    let sampler = {
        let peak = sockets_peak.clone();
        tokio::spawn(async move {
            loop {
                let n = sockets(pid);
                {
                    let mut p = peak.lock().unwrap_or_else(|p| p.into_inner());
                    *p = (*p).max(n);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    wait_leader(&leases, &mut op, &log).await;
    // Its watches are set up right after it takes the Lease.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss(pid).map(|r| r.current).unwrap_or(0);

    let m0 = Counters::scrape(&admin).await;
    let cpu0 = CpuTimes::take(cp, pid);
    let t0 = Instant::now();
    let created = create_branches(&branches, n, args.concurrency, &tracker).await;
    let created_in = t0.elapsed();
    eprintln!("  {n} branches created in {created_in:.1?} ({created} accepted)");
    let mut last_report = Instant::now();
    let all_ready = loop {
        let ready = tracker.ready_count();
        if ready >= n {
            break tracker.last_ready().map(|t| t.duration_since(t0));
        }
        if t0.elapsed() > args.timeout {
            eprintln!("  only {ready} of {n} Ready after {:?}", args.timeout);
            break None;
        }
        if let Ok(Some(status)) = op.try_wait() {
            eprintln!("  the operator exited ({status}); log: {}", log.display());
            break None;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!("  {ready} of {n} Ready after {:.0?}", t0.elapsed());
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let m1 = Counters::scrape(&admin).await;
    let cpu = CpuTimes::take(cp, pid).minus(&cpu0);
    let busy_wall = t0.elapsed();
    if let Some(t) = all_ready {
        eprintln!("  all {n} Ready after {t:.1?}");
    }

    // At rest.
    tracker.reset_events();
    *lease_events.lock().unwrap() = 0;
    tokio::time::sleep(args.rest).await;
    let rest_branch_events = tracker.events();
    let rest_lease_events = *lease_events.lock().unwrap();
    let m2 = Counters::scrape(&admin).await;
    let mem = rss(pid).unwrap_or_default();
    let sockets_rest = sockets(pid);
    sampler.abort();
    let sockets_peak = *sockets_peak.lock().unwrap();
    let om = operator_metrics(metrics_port).await;

    let operator_exit_ok = stop_operator(op).await;
    watch.abort();
    lease_watch.abort();
    stop_storage.cancel();
    let _ = served.await;

    let mut latencies = tracker.latencies();
    latencies.sort();
    Row {
        n,
        ready: tracker.ready_count(),
        created_in,
        all_ready,
        latencies,
        busy: m1.minus(&m0),
        rest: m2.minus(&m1),
        rest_window: args.rest,
        rest_branch_events,
        rest_lease_events,
        operator_reconciles: om.get("pgbranch_reconciles_total", &[("kind", "Branch")]),
        operator_status_writes: om.get("pgbranch_status_writes_total", &[("kind", "Branch")]),
        operator_errors: om.by_label("pgbranch_reconcile_errors_total", "reason"),
        storage_calls: storage.calls(),
        rss_peak: mem.peak,
        rss_rest: mem.current,
        rss_idle,
        sockets_peak,
        sockets_rest,
        cpu,
        busy_wall,
        operator_exit_ok,
        log,
    }
}

/// Creates `n` root Branches without compute, `concurrency` at a time.
async fn create_branches(
    api: &Api<Branch>,
    n: usize,
    concurrency: usize,
    tracker: &Tracker,
) -> usize {
    let width = n.to_string().len();
    let results: Vec<bool> = futures::stream::iter(0..n)
        .map(|i| {
            let name = format!("b-{i:0width$}");
            tracker.sent(&name);
            let b: Branch = serde_json::from_value(serde_json::json!({
                "apiVersion": "pgbranch.dev/v1alpha1", "kind": "Branch",
                "metadata": {"name": name},
                "spec": {"compute": {"enabled": false}},
            }))
            .expect("a Branch");
            async move {
                match api.create(&PostParams::default(), &b).await {
                    Ok(_) => true,
                    Err(e) => {
                        eprintln!("  create {}: {e}", b.name_any());
                        false
                    }
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().filter(|ok| *ok).count()
}

/// When each branch was sent and first seen Ready, and the watch events
/// since the last reset.
#[derive(Default)]
struct Tracker {
    inner: Mutex<TrackerInner>,
}

#[derive(Default)]
struct TrackerInner {
    synced: bool,
    sent: HashMap<String, Instant>,
    ready: HashMap<String, Instant>,
    last_ready: Option<Instant>,
    events: u64,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, TrackerInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn synced(&self) -> bool {
        self.lock().synced
    }
    fn sent(&self, name: &str) {
        self.lock().sent.insert(name.to_string(), Instant::now());
    }
    fn seen(&self, b: &Branch, counted: bool) {
        let ready = b
            .status
            .as_ref()
            .is_some_and(|s| pgbranch::controller::status::is_ready(&s.conditions));
        let now = Instant::now();
        let mut t = self.lock();
        if counted {
            t.events += 1;
        }
        if ready && !t.ready.contains_key(&b.name_any()) {
            t.ready.insert(b.name_any(), now);
            t.last_ready = Some(now);
        }
    }
    fn ready_count(&self) -> usize {
        self.lock().ready.len()
    }
    fn last_ready(&self) -> Option<Instant> {
        self.lock().last_ready
    }
    fn reset_events(&self) {
        self.lock().events = 0;
    }
    fn events(&self) -> u64 {
        self.lock().events
    }
    fn latencies(&self) -> Vec<Duration> {
        let t = self.lock();
        t.ready
            .iter()
            .filter_map(|(name, ready)| t.sent.get(name).map(|s| ready.duration_since(*s)))
            .collect()
    }
}

/// Follows the namespace's Branches: every change after the first list
/// counts as an event.
async fn follow(api: Api<Branch>, tracker: Arc<Tracker>) {
    let mut stream = watcher(api, watcher::Config::default().page_size(500)).boxed();
    loop {
        match stream.try_next().await {
            Ok(Some(ev)) => match ev {
                watcher::Event::Init => {}
                watcher::Event::InitApply(b) => tracker.seen(&b, false),
                watcher::Event::InitDone => tracker.lock().synced = true,
                watcher::Event::Apply(b) | watcher::Event::Delete(b) => tracker.seen(&b, true),
            },
            Ok(None) => return,
            Err(e) => {
                eprintln!("  branch watch: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Counts changes of the Leases of the namespace (the operator's Lease).
async fn count_lease_writes(api: Api<Lease>, count: Arc<Mutex<u64>>) {
    let mut stream = watcher(api, watcher::Config::default()).boxed();
    loop {
        match stream.try_next().await {
            Ok(Some(watcher::Event::Apply(_) | watcher::Event::Delete(_))) => {
                *count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            }
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// A ServiceAccount for the operator in `ns`, bound to the ClusterRole we
/// ship and to the leader-election Role; returns a token of it.
async fn operator_token(admin: &Client, ns: &str) -> String {
    let pp = PatchParams::apply("pgbranch-bench").force();
    let role: ClusterRole =
        serde_yaml::from_str(include_str!("../../config/rbac/role.yaml")).expect("role.yaml");
    Api::<ClusterRole>::all(admin.clone())
        .patch(&role.name_any(), &pp, &Patch::Apply(&role))
        .await
        .expect("apply the operator's ClusterRole");
    let mut le: Role =
        serde_yaml::from_str(include_str!("../../config/rbac/leader_election_role.yaml"))
            .expect("leader_election_role.yaml");
    le.metadata.namespace = Some(ns.into());
    Api::<Role>::namespaced(admin.clone(), ns)
        .patch(&le.name_any(), &pp, &Patch::Apply(&le))
        .await
        .expect("apply the leader-election Role");
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some(OPERATOR_SA.into());
    sas.create(&PostParams::default(), &sa)
        .await
        .expect("create the operator's ServiceAccount");
    for (name, kind, role) in [
        ("pgbranch-operator", "ClusterRole", role.name_any()),
        ("pgbranch-leader-election", "Role", le.name_any()),
    ] {
        let binding: RoleBinding = serde_json::from_value(serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": ns}],
        }))
        .expect("a RoleBinding");
        Api::<RoleBinding>::namespaced(admin.clone(), ns)
            .create(&PostParams::default(), &binding)
            .await
            .expect("bind the operator's roles");
    }
    let req = serde_json::from_value(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": 86400},
    }))
    .expect("a TokenRequest");
    sas.create_token_request(OPERATOR_SA, &PostParams::default(), &req)
        .await
        .expect("a token for the operator")
        .status
        .expect("a token")
        .token
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `pgbranch operator` watching `ns`, logging to `log`; it dies with
/// this process.
fn spawn_operator(
    storage: &str,
    ns: &str,
    kubeconfig: &std::path::Path,
    metrics_port: u16,
    log: &std::path::Path,
    extra: &[String],
) -> Child {
    let out = std::fs::File::create(log).expect("operator log");
    let err = out.try_clone().expect("operator log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgbranch"));
    cmd.args(["operator", "--storage", storage, "--namespace", ns])
        .args(["--volume-host-path", memory_storage::ROOT])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(["--lease-namespace", ns])
        .args(extra)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("POD_NAME")
        .env_remove("POD_NAMESPACE")
        .env_remove("PGBRANCH_WATCH_NAMESPACE")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    cmd.spawn().expect("start pgbranch operator")
}

/// Waits until the operator holds its Lease.
async fn wait_leader(leases: &Api<Lease>, op: &mut Child, log: &std::path::Path) {
    let start = Instant::now();
    loop {
        let held = leases
            .get_opt(LEASE)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .is_some_and(|h| !h.is_empty());
        if held {
            return;
        }
        if let Ok(Some(status)) = op.try_wait() {
            panic!(
                "the operator exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the operator did not take its Lease in 60 s; log: {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM, then waits (60 s) for a clean exit; SIGKILL otherwise.
async fn stop_operator(mut op: Child) -> bool {
    let pid = nix::unistd::Pid::from_raw(op.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok(Some(status)) = op.try_wait() {
            return status.success();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = op.kill();
    let _ = op.wait();
    false
}

fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied()
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0))
}

fn per_minute(count: f64, window: Duration) -> f64 {
    count * 60.0 / window.as_secs_f64().max(1.0)
}

/// The resources (and subresources) the operator may write, from the
/// roles we ship, without Leases (its leader election: counted apart).
/// The apiserver's counters do not say who made a request; at rest and
/// during the run nothing else writes these, except the bench's own
/// creates of Branches.
fn operator_kinds() -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for yaml in [
        include_str!("../../config/rbac/role.yaml"),
        include_str!("../../config/rbac/leader_election_role.yaml"),
    ] {
        let Ok(role) = serde_yaml::from_str::<ClusterRole>(yaml) else {
            continue;
        };
        for rule in role.rules.unwrap_or_default() {
            let writes = rule
                .verbs
                .iter()
                .any(|v| ["create", "update", "patch", "delete"].contains(&v.as_str()));
            if writes {
                out.extend(rule.resources.unwrap_or_default());
            }
        }
    }
    out.remove("leases");
    out
}

/// Writes to the operator's kinds (the bench's own Branch creates
/// excepted).
fn operator_writes(c: &Counters, bench_creates: usize) -> f64 {
    let kinds = operator_kinds();
    let all: f64 = c
        .writes()
        .filter(|((_, res), _)| kinds.contains(res))
        .map(|(_, v)| v)
        .sum();
    // (An empty f64 sum is -0.0.)
    (all - bench_creates as f64).max(0.0)
}

fn operator_reads(c: &Counters) -> f64 {
    let kinds = operator_kinds();
    c.requests
        .iter()
        .filter(|((verb, res), _)| ["GET", "LIST"].contains(&verb.as_str()) && kinds.contains(res))
        .map(|(_, v)| v)
        .sum::<f64>()
        .max(0.0)
}

fn print_detail(r: &Row) {
    let n = r.n as f64;
    println!();
    println!(
        "### {} branches: requests the apiserver served while they became Ready",
        r.n
    );
    println!();
    println!(
        "The bench's own {} creates are in `POST branches`. Per branch = count / {}.",
        r.n, r.n
    );
    println!();
    println!(
        "| verb | resource | count | per branch | apiserver time, mean | apiserver time, total |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for (key, v) in &r.busy.requests {
        let (verb, res) = key;
        let total = r.busy.seconds.get(key).copied().unwrap_or(0.0);
        if verb == "WATCH" {
            // Long-running; their count is the control plane's watch restarts.
            continue;
        }
        println!(
            "| {verb} | {res} | {v:.0} | {:.2} | {:.1} ms | {total:.1} s |",
            v / n,
            total * 1000.0 / v
        );
    }
    println!();
    println!(
        "operator: {:.0} writes ({:.1} per branch), {:.0} reads of its kinds ({:.1} per branch)",
        operator_writes(&r.busy, r.n),
        operator_writes(&r.busy, r.n) / n,
        operator_reads(&r.busy),
        operator_reads(&r.busy) / n,
    );
    println!(
        "operator: {:.0} requests ({:.1} per branch), {:.0} Branch reconciles ({:.1} per branch), {:.0} status writes; errors by reason: {:?}; storage calls: {} ({:.1} per branch); throttled (429) requests: {:.0}",
        r.busy.operator,
        r.busy.operator / n,
        r.operator_reconciles,
        r.operator_reconciles / n,
        r.operator_status_writes,
        r.operator_errors,
        r.storage_calls,
        r.storage_calls as f64 / n,
        r.busy.rejected,
    );
    println!(
        "at rest ({} s): branch watch events {}, Lease changes in the operator's namespace {}, operator requests {:.0}; requests the apiserver served:",
        r.rest_window.as_secs(),
        r.rest_branch_events,
        r.rest_lease_events,
        r.rest.operator,
    );
    println!();
    println!("| verb | resource | count |");
    println!("|---|---|---:|");
    for ((verb, res), v) in &r.rest.requests {
        if verb != "WATCH" {
            println!("| {verb} | {res} | {v:.0} |");
        }
    }
    println!();
    let ours: f64 = r.cpu.by.values().sum();
    println!(
        "CPU seconds from the first create until all were Ready ({:.0} s wall, {} CPUs): {}; everything else on the machine {:.0} s",
        r.busy_wall.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        r.cpu
            .by
            .iter()
            .map(|(k, v)| format!("{k} {v:.0} s"))
            .collect::<Vec<_>>()
            .join(", "),
        (r.cpu.machine - ours).max(0.0),
    );
    println!(
        "operator sockets: peak {}, at rest {}; RSS idle {}, peak {}, at rest {}",
        r.sockets_peak,
        r.sockets_rest,
        mib(r.rss_idle),
        mib(r.rss_peak),
        mib(r.rss_rest)
    );
    println!("operator log: {}", r.log.display());
}

fn print_table(rows: &[Row], args: &Args, version: &str, started: jiff::Timestamp) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "## Branches on a real control plane ({}, {cpus} CPUs, kube-apiserver {version}, {} build)",
        started.strftime("%Y-%m-%d"),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!();
    println!("| branches | created in | all Ready after | per branch p50 / p90 | operator requests per branch (writes) | at rest, per minute: Branch changes / operator writes (its Lease) / operator requests | operator RSS peak / at rest |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let n = r.n as f64;
        let all = match r.all_ready {
            Some(t) => secs(Some(t)),
            None => format!("only {} of {} Ready", r.ready, r.n),
        };
        let rest = if r.all_ready.is_some() {
            format!(
                "{:.0} / {:.0} ({:.0}) / {:.0}",
                per_minute(r.rest_branch_events as f64, r.rest_window),
                // `+ 0.0`: a count of none prints 0, not -0.
                per_minute(operator_writes(&r.rest, 0), r.rest_window) + 0.0,
                per_minute(r.rest_lease_events as f64, r.rest_window),
                per_minute(r.rest.operator, r.rest_window),
            )
        } else {
            "not at rest".into()
        };
        println!(
            "| {} | {:.1} s | {all} | {} / {} | {:.1} ({:.1}) | {rest} | {} / {} |",
            r.n,
            r.created_in.as_secs_f64(),
            secs(percentile(&r.latencies, 0.5)),
            secs(percentile(&r.latencies, 0.9)),
            r.busy.operator / n,
            operator_writes(&r.busy, r.n) / n,
            mib(r.rss_peak),
            mib(r.rss_rest),
        );
    }
    println!();
    println!(
        "Creates: {} in flight. At rest: the {} s after the last Branch was Ready. Operator requests: every request the apiserver's priority and fairness dispatched outside its exempt level (the operator is the only client there). Operator writes: writes to the resources the roles we ship let it write, Leases apart.",
        args.concurrency,
        args.rest.as_secs()
    );
}
