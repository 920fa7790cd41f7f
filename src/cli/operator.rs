//! `pgbranch operator`: runs the controllers.
//!
//! One process per replica; the replicas elect a leader through a `Lease` in
//! the operator's namespace and only the leader reconciles. Each process
//! takes part under its own identity (pod or host name plus a random
//! suffix), so two processes on one host, or a restarted container, never
//! both believe they hold the Lease. The Lease lasts [`LEASE_SECONDS`] and is
//! renewed [`LEASE_GRACE_SECONDS`] before it runs out: a leader that dies
//! without releasing it (crash, force-deleted Pod whose token is revoked)
//! is replaced within about `LEASE_SECONDS` + 1 s. `/healthz`,
//! `/readyz` and Prometheus `/metrics` are served on `--metrics-addr`.
//! SIGTERM/SIGINT stop the controllers gracefully (reconciles in flight
//! finish) and release the Lease.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;

use super::CliError;
use crate::compute::{Colocation, ComputeConfig, TlsConfig, VolumeSource, DEFAULT_IMAGE};
use crate::controller::{self, ClusterDns, Config, Context, Metrics};
use crate::storage::engine::{Engine, EngineConfig};
use crate::storage::http::connect_storage;
use crate::storage::{Storage, StorageInfo};

#[derive(Debug, clap::Args)]
pub struct OperatorArgs {
    /// The storage layer: `embedded:/path` (in-process engine on a local
    /// volume; computes then mount that directory as a host path unless
    /// --volume-pvc or --volume-host-path says otherwise) or
    /// `http://host:port` (a `pgbranch storage serve`).
    #[arg(long, env = "PGBRANCH_STORAGE")]
    pub storage: String,
    /// With `--storage embedded:DIR` and run as root: the user the engine
    /// runs initdb and postgres as (default `postgres`). Its uid must be
    /// --compute-uid: computes run as that uid on the same data directories.
    #[arg(long, env = "PGBRANCH_STORAGE_RUN_AS", value_name = "USER")]
    pub storage_run_as: Option<String>,
    /// File holding the bearer token of the storage service.
    #[arg(long, env = "PGBRANCH_STORAGE_TOKEN_FILE")]
    pub storage_token_file: Option<std::path::PathBuf>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "PGBRANCH_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// How computes are built.
    #[command(flatten)]
    pub compute: Box<ComputeFlags>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "PGBRANCH_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Elect a leader through a Lease (turn off for a single local process).
    #[arg(long, env = "PGBRANCH_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the Lease.
    #[arg(long, env = "PGBRANCH_LEASE_NAME", default_value = "pgbranch-operator")]
    pub lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's name in the leader election (default: the host
    /// name); a random suffix is added so every process has its own
    /// identity.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// The identity, made once per process.
    #[arg(skip)]
    identity: OnceLock<String>,
    /// Seconds between full resyncs of every object (0: off).
    #[arg(long, env = "PGBRANCH_RESYNC_SECONDS", default_value_t = 0)]
    pub resync_seconds: u64,
    /// Most Snapshots (holding a stored snapshot) per namespace; one more is
    /// Stalled with reason SnapshotQuotaExceeded.
    #[arg(long, env = "PGBRANCH_SNAPSHOT_QUOTA", default_value_t = 10)]
    pub snapshot_quota: u32,
    /// Most reconciles each controller runs at once (0: unbounded).
    #[arg(long, env = "PGBRANCH_MAX_CONCURRENT_RECONCILES", default_value_t = controller::DEFAULT_CONCURRENCY)]
    pub max_concurrent_reconciles: u16,
}

/// Flags of the computes the operator creates.
#[derive(Debug, clap::Args)]
pub struct ComputeFlags {
    /// PostgreSQL image of computes whose Branch names none.
    #[arg(long, env = "PGBRANCH_COMPUTE_IMAGE", default_value = DEFAULT_IMAGE)]
    pub compute_image: String,
    /// The storage volume as a PersistentVolumeClaim (in each branch's
    /// namespace). Exclusive with --volume-host-path.
    #[arg(long, env = "PGBRANCH_VOLUME_PVC", conflicts_with = "volume_host_path")]
    pub volume_pvc: Option<String>,
    /// The storage volume as a directory on the node. Default with
    /// `--storage embedded:DIR`: DIR.
    #[arg(long, env = "PGBRANCH_VOLUME_HOST_PATH")]
    pub volume_host_path: Option<String>,
    /// Where computes mount the storage volume (the engine's compute root).
    #[arg(
        long,
        env = "PGBRANCH_VOLUME_MOUNT_PATH",
        default_value = "/var/lib/pgbranch"
    )]
    pub volume_mount_path: String,
    /// uid (and gid) postgres runs as in computes; owns the data directories.
    #[arg(long, env = "PGBRANCH_COMPUTE_UID", default_value_t = 999)]
    pub compute_uid: i64,
    /// Cluster DNS domain used in the `fqdn-*` Secret keys.
    #[arg(long, env = "PGBRANCH_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Schedule computes on the node of the pod with these labels
    /// (`key=value,...`, in --compute-colocate-namespace): the storage
    /// service's, when its volume (hostPath, ReadWriteOnce claim) exists on
    /// that node only.
    #[arg(
        long,
        env = "PGBRANCH_COMPUTE_COLOCATE_WITH",
        requires = "compute_colocate_namespace",
        value_name = "LABELS"
    )]
    pub compute_colocate_with: Option<String>,
    /// Namespace of the pod named by --compute-colocate-with.
    #[arg(long, env = "PGBRANCH_COMPUTE_COLOCATE_NAMESPACE", value_name = "NS")]
    pub compute_colocate_namespace: Option<String>,
    /// TLS on every compute: a CA per namespace (Secret `pgbranch-ca`), a
    /// server certificate per branch (`<branch>-tls`), `hostssl` only and
    /// `sslmode=verify-full` connection strings. `false`: plaintext.
    #[arg(long, env = "PGBRANCH_COMPUTE_TLS", default_value_t = true, action = clap::ArgAction::Set)]
    pub compute_tls: bool,
    /// Lifetime of a branch's server certificate in seconds; it is renewed
    /// (no restart, same connection strings) when a third is left.
    #[arg(long, env = "PGBRANCH_COMPUTE_CERT_LIFETIME_SECONDS", default_value_t = 90 * 24 * 3600)]
    pub compute_cert_lifetime_seconds: u64,
}

impl OperatorArgs {
    /// The controllers' configuration from the flags.
    pub fn config(&self) -> Result<Config, CliError> {
        let volume = match (&self.compute.volume_pvc, &self.compute.volume_host_path) {
            (Some(pvc), None) => VolumeSource::Pvc(pvc.clone()),
            (None, Some(path)) => VolumeSource::HostPath(path.clone()),
            (None, None) => match self.embedded_root() {
                // Outside a cluster the engine's directory is the volume.
                Some(dir) => VolumeSource::HostPath(dir.to_string()),
                None => {
                    return Err(CliError::Usage(
                        "give the storage volume computes mount: --volume-pvc NAME or --volume-host-path PATH (with --storage embedded:DIR the default is DIR)".into(),
                    ))
                }
            },
            (Some(_), Some(_)) => {
                return Err(CliError::Usage(
                    "--volume-pvc and --volume-host-path are exclusive".into(),
                ))
            }
        };
        if !self.compute.volume_mount_path.starts_with('/') {
            return Err(CliError::Usage(format!(
                "--volume-mount-path {:?} must be absolute",
                self.compute.volume_mount_path
            )));
        }
        let colocate_with = match (
            &self.compute.compute_colocate_with,
            &self.compute.compute_colocate_namespace,
        ) {
            (Some(labels), Some(ns)) => Some(Colocation::parse(ns, labels).map_err(|e| {
                CliError::Usage(format!("--compute-colocate-with {labels:?}: {e}"))
            })?),
            _ => None,
        };
        Ok(Config {
            namespace: self.namespace.clone(),
            compute: ComputeConfig {
                default_image: self.compute.compute_image.clone(),
                volume,
                mount_path: self.compute.volume_mount_path.clone(),
                run_as_uid: self.compute.compute_uid,
                cluster_domain: self.compute.cluster_domain.clone(),
                default_resources: None,
                colocate_with,
                tls: TlsConfig {
                    enabled: self.compute.compute_tls,
                    cert_lifetime: Duration::from_secs(
                        self.compute.compute_cert_lifetime_seconds.max(60),
                    ),
                    ..TlsConfig::default()
                },
            },
            resync_interval: (self.resync_seconds > 0)
                .then(|| Duration::from_secs(self.resync_seconds)),
            instance: Some(self.identity()),
            snapshot_quota: self.snapshot_quota,
            concurrency: self.max_concurrent_reconciles,
            ..Config::default()
        })
    }

    /// The engine's configuration for `--storage embedded:DIR`: computes
    /// see the volume at --volume-mount-path, so that is the root written
    /// into their `archive_command`.
    fn engine_config(&self, dir: &str) -> EngineConfig {
        EngineConfig {
            root: std::path::PathBuf::from(dir),
            compute_root: Some(std::path::PathBuf::from(&self.compute.volume_mount_path)),
            run_as: self.storage_run_as.clone(),
            ..EngineConfig::default()
        }
    }

    /// DIR of `--storage embedded:DIR`.
    fn embedded_root(&self) -> Option<&str> {
        self.storage
            .trim()
            .strip_prefix("embedded:")
            .filter(|d| !d.is_empty())
    }

    /// This process's identity in the leader election: `<pod or host
    /// name>-<8 random hex digits>`, the same for the life of the process.
    pub fn identity(&self) -> String {
        self.identity
            .get_or_init(|| {
                let base = self
                    .pod_name
                    .clone()
                    .filter(|n| !n.trim().is_empty())
                    .or_else(host_name)
                    .unwrap_or_else(|| "pgbranch-operator".into());
                let suffix = uuid::Uuid::new_v4().simple().to_string();
                format!("{}-{}", base.trim(), &suffix[..8])
            })
            .clone()
    }

    fn lease_namespace(&self) -> String {
        self.lease_namespace.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "default".into())
        })
    }
}

/// Seconds a leader's Lease is valid after its last renewal: the longest a
/// dead leader (one that could not release the Lease) keeps the others
/// waiting.
pub const LEASE_SECONDS: u64 = 10;
/// The leader renews this many seconds before its Lease runs out.
pub const LEASE_GRACE_SECONDS: u64 = 3;
// Failover after a crash (Lease expiry + up to 1 s of jitter) stays under
// the 15 s the README promises, and a leader renews before expiry.
const _: () = assert!(LEASE_SECONDS + 1 < 15 && LEASE_GRACE_SECONDS < LEASE_SECONDS);

/// Whether computes built from `compute` can use what the storage layer
/// `info` makes: their data directories must be owned by the uid they run
/// as, and the engine must write the volume's path as computes mount it
/// into their `archive_command`. The error says how to make them agree.
pub fn storage_agrees(info: &StorageInfo, compute: &ComputeConfig) -> Result<(), String> {
    if let Some(uid) = info.data_uid {
        if i64::from(uid) != compute.run_as_uid {
            return Err(format!(
                "the storage engine runs PostgreSQL as uid {uid}, which owns every data directory, but computes would run as uid {} (--compute-uid): they could not use their data directories. Pass --compute-uid {uid}, or run the engine as a user whose uid is {} (--storage-run-as USER for embedded storage, `pgbranch storage serve --run-as USER`)",
                compute.run_as_uid, compute.run_as_uid
            ));
        }
    }
    if let Some(root) = &info.compute_root {
        let norm = |p: &str| p.trim_end_matches('/').to_string();
        if norm(root) != norm(&compute.mount_path) {
            return Err(format!(
                "the storage engine writes {root} (its compute root) into every compute's archive_command, but computes mount the volume at {} (--volume-mount-path): archiving would fail inside every compute and copies of running branches would never finish. Make them the same: `pgbranch storage serve --compute-root {}`, or --volume-mount-path {root}",
                compute.mount_path, compute.mount_path
            ));
        }
    }
    Ok(())
}

/// Opens the storage layer and checks it agrees with the computes: an
/// embedded engine is checked before it is opened (nothing is written for
/// a configuration that cannot work); a storage service that answers is
/// refused on a mismatch, one that does not answer yet is checked in the
/// background (the returned receiver yields the refusal, if any).
async fn open_storage(
    args: &OperatorArgs,
    config: &Config,
    token: Option<String>,
) -> Result<(Arc<dyn Storage>, tokio::sync::oneshot::Receiver<String>), CliError> {
    let (refuse_tx, refuse_rx) = tokio::sync::oneshot::channel();
    if let Some(dir) = args.embedded_root() {
        let cfg = args.engine_config(dir);
        let planned = StorageInfo {
            driver: crate::storage::DriverKind::Copy,
            pg_major: 0,
            root: dir.to_string(),
            compute_root: cfg.compute_root.as_ref().map(|p| p.display().to_string()),
            data_uid: Some(cfg.postgres_uid()?),
            volume_total_bytes: None,
            volume_used_bytes: None,
            wal_archive_bytes: None,
        };
        storage_agrees(&planned, &config.compute).map_err(CliError::Usage)?;
        let engine = Engine::open(cfg).await?;
        return Ok((Arc::new(engine), refuse_rx));
    }
    let storage = connect_storage(&args.storage, token).await?;
    match tokio::time::timeout(Duration::from_secs(10), storage.info()).await {
        Ok(Ok(info)) => storage_agrees(&info, &config.compute).map_err(CliError::Usage)?,
        answer => {
            let why = match answer {
                Ok(Err(e)) => e.to_string(),
                _ => "no answer in 10 s".into(),
            };
            tracing::warn!(error = %why, "storage does not answer yet; checking it agrees with the computes once it does");
            let storage = storage.clone();
            let compute = config.compute.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    if let Ok(info) = storage.info().await {
                        if let Err(m) = storage_agrees(&info, &compute) {
                            let _ = refuse_tx.send(m);
                        }
                        return;
                    }
                }
            });
        }
    }
    Ok((storage, refuse_rx))
}

/// `$HOSTNAME`, else the kernel's host name.
fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

#[derive(Clone)]
struct HealthState {
    metrics: Metrics,
    ready: Arc<AtomicBool>,
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(s): State<HealthState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(s): State<HealthState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// The health and metrics router.
pub fn health_router(metrics_: Metrics, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(HealthState {
            metrics: metrics_,
            ready,
        })
}

/// Installs ring as the process-wide rustls provider. kube and reqwest
/// compile in two providers (ring, aws-lc-rs), and kube-client's TLS setup
/// panics when the process has no default. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub async fn run(args: OperatorArgs) -> Result<(), CliError> {
    install_crypto_provider();
    let config = args.config()?;
    let token = match &args.storage_token_file {
        Some(p) => Some(std::fs::read_to_string(p)?.trim().to_string()),
        None => None,
    };
    let (storage, refused) = open_storage(&args, &config, token).await?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| CliError::Other(format!("cannot reach the Kubernetes API: {e}")))?;
    let metrics_ = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();

    let listener = tokio::net::TcpListener::bind(args.metrics_addr).await?;
    tracing::info!(addr = %args.metrics_addr, "serving /healthz, /readyz, /metrics");
    let router = health_router(metrics_.clone(), ready.clone());
    let http_stop = stop.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .await
    });

    {
        let stop = stop.clone();
        tokio::spawn(async move {
            super::shutdown_signal().await;
            stop.cancel();
        });
    }
    // A storage service that answered late and does not agree with the
    // computes stops the operator.
    let refusal = Arc::new(OnceLock::new());
    {
        let (stop, refusal) = (stop.clone(), refusal.clone());
        tokio::spawn(async move {
            if let Ok(m) = refused.await {
                tracing::error!(error = %m, "storage does not agree with the computes, stopping");
                let _ = refusal.set(m);
                stop.cancel();
            }
        });
    }
    let refused = move || refusal.get().map(|m: &String| CliError::Usage(m.clone()));

    // Leader election: reconcile only while holding the Lease.
    let mut lease = None;
    if args.leader_election {
        let identity = args.identity();
        let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
            .with_namespace(args.lease_namespace())
            .with_identity(identity.clone())
            .with_duration(LEASE_SECONDS)
            .with_grace(LEASE_GRACE_SECONDS)
            .build()
            .await
            .map_err(|e| CliError::Other(format!("leader election: {e}")))?;
        let (mut leader, task) = manager.watch().await;
        tracing::info!(%identity, lease = %args.lease_name, "waiting to become the leader");
        // Ready (for the Service/rollout) as soon as we take part in the election.
        ready.store(true, Ordering::Relaxed);
        loop {
            if *leader.borrow_and_update() {
                break;
            }
            tokio::select! {
                r = leader.changed() => if r.is_err() {
                    return Err(CliError::Other("leader election stopped".into()));
                },
                _ = stop.cancelled() => {
                    drop(leader);
                    let _ = task.await;
                    let _ = http.await;
                    return refused().map_or(Ok(()), Err);
                }
            }
        }
        tracing::info!(%identity, "became the leader");
        metrics_.set_leader(true);
        lease = Some((leader, task));
    } else {
        ready.store(true, Ordering::Relaxed);
        metrics_.set_leader(true);
    }

    // Stop on a signal, or when the Lease is lost (another replica takes
    // over; this process exits and restarts as a follower).
    let lost = CancellationToken::new();
    if let Some((leader, _)) = &mut lease {
        let mut leader = leader.clone();
        let lost = lost.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = leader.changed() => {
                        if r.is_err() || !*leader.borrow_and_update() {
                            tracing::error!("lost the leader Lease, stopping");
                            lost.cancel();
                            stop.cancel();
                            return;
                        }
                    }
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
    let ctx = Context::new(
        client,
        storage,
        config,
        metrics_.clone(),
        Arc::new(ClusterDns),
    );
    let shutdown = {
        let stop = stop.clone();
        async move { stop.cancelled().await }
    };
    controller::run(ctx, shutdown).await;
    tracing::info!("controllers stopped");
    metrics_.set_leader(false);
    stop.cancel();
    if let Some((leader, task)) = lease {
        drop(leader);
        match task.await {
            Ok(Ok(_)) => tracing::info!("released the leader Lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not release the Lease"),
            Err(e) => tracing::warn!(error = %e, "lease task failed"),
        }
    }
    let _ = http.await;
    if let Some(e) = refused() {
        return Err(e);
    }
    if lost.is_cancelled() {
        return Err(CliError::Other("lost leadership".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        args: OperatorArgs,
    }

    #[test]
    fn flags_build_the_config() {
        let t = T::try_parse_from([
            "x",
            "--storage",
            "http://storage:7432",
            "--volume-pvc",
            "pgdata",
            "--namespace",
            "dev",
            "--compute-image",
            "postgres:16",
        ])
        .unwrap();
        let c = t.args.config().unwrap();
        assert_eq!(c.namespace.as_deref(), Some("dev"));
        assert_eq!(c.compute.default_image, "postgres:16");
        assert_eq!(c.compute.volume, VolumeSource::Pvc("pgdata".into()));
        assert!(c.resync_interval.is_none());
        assert_eq!(c.concurrency, controller::DEFAULT_CONCURRENCY);
        let t = T::try_parse_from([
            "x",
            "--storage",
            "http://s:1",
            "--volume-pvc",
            "pgdata",
            "--max-concurrent-reconciles",
            "0",
        ])
        .unwrap();
        assert_eq!(t.args.config().unwrap().concurrency, 0, "0: unbounded");
    }

    #[test]
    fn computes_can_be_colocated_with_the_storage_pod() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["x", "--storage", "http://s:1", "--volume-host-path", "/srv"];
            argv.extend_from_slice(extra);
            T::try_parse_from(argv)
        };
        let t = parse(&[
            "--compute-colocate-with",
            "app.kubernetes.io/component=storage, app.kubernetes.io/instance=pgb",
            "--compute-colocate-namespace",
            "pgbranch-system",
        ])
        .unwrap();
        let c = t.args.config().unwrap().compute.colocate_with.unwrap();
        assert_eq!(c.namespace, "pgbranch-system");
        assert_eq!(c.labels["app.kubernetes.io/component"], "storage");
        assert_eq!(c.labels["app.kubernetes.io/instance"], "pgb");
        // Labels without a namespace, or malformed, are refused.
        assert!(parse(&["--compute-colocate-with", "a=b"]).is_err());
        let t = parse(&[
            "--compute-colocate-with",
            "storage",
            "--compute-colocate-namespace",
            "ns",
        ])
        .unwrap();
        assert!(matches!(t.args.config(), Err(CliError::Usage(m)) if m.contains("key=value")));
        let t = parse(&[]).unwrap();
        assert!(t.args.config().unwrap().compute.colocate_with.is_none());
    }

    /// The operator flags the kustomize install ships are flags this
    /// binary takes and builds a configuration from.
    #[test]
    fn the_shipped_manager_manifest_parses() {
        let text = include_str!("../../config/manager/manager.yaml");
        let doc: serde_yaml::Value = serde_yaml::from_str(
            text.split("\n---")
                .find(|d| d.contains("kind: Deployment"))
                .unwrap(),
        )
        .unwrap();
        let args: Vec<String> = doc["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        assert_eq!(args[0], "operator");
        let argv = std::iter::once("x".to_string()).chain(args[1..].iter().cloned());
        let t = T::try_parse_from(argv).unwrap();
        let c = t.args.config().unwrap();
        let colocate = c.compute.colocate_with.unwrap();
        assert_eq!(colocate.labels["app.kubernetes.io/component"], "storage");
    }

    /// Two processes with the same pod (or host) name still take part in
    /// the election under different identities; one process keeps its own.
    #[test]
    fn every_process_has_its_own_identity() {
        let args = || {
            T::try_parse_from([
                "x",
                "--storage",
                "http://s:1",
                "--volume-pvc",
                "v",
                "--pod-name",
                "op-0",
            ])
            .unwrap()
            .args
        };
        let (one, two) = (args(), args());
        assert_ne!(one.identity(), two.identity());
        assert_eq!(one.identity(), one.identity());
        assert!(one.identity().starts_with("op-0-"), "{}", one.identity());
    }

    #[test]
    fn a_volume_is_required() {
        let t = T::try_parse_from(["x", "--storage", "http://s:1"]).unwrap();
        assert!(
            matches!(t.args.config(), Err(CliError::Usage(m)) if m.contains("--volume-host-path"))
        );
    }

    fn info(compute_root: &str, uid: u32) -> StorageInfo {
        StorageInfo {
            driver: crate::storage::DriverKind::Copy,
            pg_major: 15,
            root: "/srv/x".into(),
            compute_root: Some(compute_root.into()),
            data_uid: Some(uid),
            volume_total_bytes: None,
            volume_used_bytes: None,
            wal_archive_bytes: None,
        }
    }

    /// The engine's data directories must be the computes' (same uid) and
    /// its archive_command must name the volume where computes mount it.
    #[test]
    fn storage_must_agree_with_the_computes() {
        let t = T::try_parse_from(["x", "--storage", "http://s:1", "--volume-pvc", "v"]).unwrap();
        let c = t.args.config().unwrap().compute;
        assert_eq!(
            (c.run_as_uid, c.mount_path.as_str()),
            (999, "/var/lib/pgbranch")
        );
        assert_eq!(storage_agrees(&info("/var/lib/pgbranch", 999), &c), Ok(()));
        assert_eq!(storage_agrees(&info("/var/lib/pgbranch/", 999), &c), Ok(()));
        let m = storage_agrees(&info("/var/lib/pgbranch", 101), &c).unwrap_err();
        assert!(
            m.contains("uid 101") && m.contains("--compute-uid 101"),
            "{m}"
        );
        let m = storage_agrees(&info("/var/lib/X", 999), &c).unwrap_err();
        assert!(
            m.contains("/var/lib/X") && m.contains("/var/lib/pgbranch"),
            "{m}"
        );
        assert!(m.contains("--compute-root /var/lib/pgbranch"), "{m}");
        // An engine that does not report them is not refused.
        let old = StorageInfo {
            compute_root: None,
            data_uid: None,
            ..info("/", 0)
        };
        assert_eq!(storage_agrees(&old, &c), Ok(()));
    }

    /// An embedded engine writes the computes' mount path, not its own
    /// directory, into their archive_command.
    #[test]
    fn embedded_engine_uses_the_computes_mount_path() {
        let t = T::try_parse_from([
            "x",
            "--storage",
            "embedded:/var/lib/X",
            "--volume-host-path",
            "/var/lib/X",
            "--storage-run-as",
            "pg",
        ])
        .unwrap();
        let cfg = t.args.engine_config("/var/lib/X");
        assert_eq!(cfg.root, std::path::PathBuf::from("/var/lib/X"));
        assert_eq!(
            cfg.compute_root,
            Some(std::path::PathBuf::from("/var/lib/pgbranch"))
        );
        assert_eq!(cfg.run_as.as_deref(), Some("pg"));
    }

    /// `--storage embedded:DIR` alone starts: computes mount DIR from the
    /// host; an explicit volume flag still wins.
    #[test]
    fn embedded_storage_defaults_to_its_directory_as_the_volume() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["x", "--storage", "embedded:/srv/pgbranch"];
            argv.extend_from_slice(extra);
            T::try_parse_from(argv).unwrap().args.config().unwrap()
        };
        assert_eq!(
            parse(&[]).compute.volume,
            VolumeSource::HostPath("/srv/pgbranch".into())
        );
        assert_eq!(
            parse(&["--volume-pvc", "pgdata"]).compute.volume,
            VolumeSource::Pvc("pgdata".into())
        );
        assert_eq!(
            parse(&["--volume-host-path", "/mnt/x"]).compute.volume,
            VolumeSource::HostPath("/mnt/x".into())
        );
    }

    #[tokio::test]
    async fn health_endpoints_answer() {
        let m = Metrics::new();
        m.reconciled("Branch", Duration::from_millis(3));
        let ready = Arc::new(AtomicBool::new(false));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, health_router(m, ready.clone()))
                .await
                .unwrap()
        });
        let base = format!("http://{addr}");
        let c = reqwest::Client::new();
        let r = c.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = c.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 503);
        let body = c
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            body.contains("pgbranch_reconciles_total{kind=\"Branch\"} 1"),
            "{body}"
        );
        server.abort();
    }
}
