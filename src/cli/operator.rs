//! `pgbranch operator`: runs the controllers.
//!
//! One process per replica; the replicas elect a leader through a `Lease` in
//! the operator's namespace and only the leader reconciles. `/healthz`,
//! `/readyz` and Prometheus `/metrics` are served on `--metrics-addr`.
//! SIGTERM/SIGINT stop the controllers gracefully (reconciles in flight
//! finish) and release the Lease.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;

use super::CliError;
use crate::compute::{Colocation, ComputeConfig, VolumeSource, DEFAULT_IMAGE};
use crate::controller::{self, ClusterDns, Config, Context, Metrics};
use crate::storage::http::connect_storage;

#[derive(Debug, clap::Args)]
pub struct OperatorArgs {
    /// The storage layer: `embedded:/path` (in-process engine on a local
    /// volume) or `http://host:port` (a `pgbranch storage serve`).
    #[arg(long, env = "PGBRANCH_STORAGE")]
    pub storage: String,
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
    /// This replica's identity (default: the pod name / host name).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Seconds between full resyncs of every object (0: off).
    #[arg(long, env = "PGBRANCH_RESYNC_SECONDS", default_value_t = 0)]
    pub resync_seconds: u64,
    /// Most Snapshots (holding a stored snapshot) per namespace; one more is
    /// Stalled with reason SnapshotQuotaExceeded.
    #[arg(long, env = "PGBRANCH_SNAPSHOT_QUOTA", default_value_t = 10)]
    pub snapshot_quota: u32,
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
    /// The storage volume as a directory on the node.
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
}

impl OperatorArgs {
    /// The controllers' configuration from the flags.
    pub fn config(&self) -> Result<Config, CliError> {
        let volume = match (&self.compute.volume_pvc, &self.compute.volume_host_path) {
            (Some(pvc), None) => VolumeSource::Pvc(pvc.clone()),
            (None, Some(path)) => VolumeSource::HostPath(path.clone()),
            (None, None) => {
                return Err(CliError::Usage(
                    "give the storage volume computes mount: --volume-pvc NAME or --volume-host-path PATH".into(),
                ))
            }
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
            },
            resync_interval: (self.resync_seconds > 0)
                .then(|| Duration::from_secs(self.resync_seconds)),
            instance: Some(self.identity()),
            snapshot_quota: self.snapshot_quota,
            ..Config::default()
        })
    }

    fn identity(&self) -> String {
        self.pod_name.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME").unwrap_or_else(|_| "pgbranch-operator".into())
        })
    }

    fn lease_namespace(&self) -> String {
        self.lease_namespace.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "default".into())
        })
    }
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
    let storage = connect_storage(&args.storage, token).await?;
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

    // Leader election: reconcile only while holding the Lease.
    let mut lease = None;
    if args.leader_election {
        let identity = args.identity();
        let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
            .with_namespace(args.lease_namespace())
            .with_identity(identity.clone())
            .with_duration(15)
            .with_grace(5)
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
                    return Ok(());
                }
            }
        }
        tracing::info!(%identity, "became the leader");
        lease = Some((leader, task));
    } else {
        ready.store(true, Ordering::Relaxed);
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
    let ctx = Context::new(client, storage, config, metrics_, Arc::new(ClusterDns));
    let shutdown = {
        let stop = stop.clone();
        async move { stop.cancelled().await }
    };
    controller::run(ctx, shutdown).await;
    tracing::info!("controllers stopped");
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

    #[test]
    fn a_volume_is_required() {
        let t = T::try_parse_from(["x", "--storage", "http://s:1"]).unwrap();
        assert!(matches!(t.args.config(), Err(CliError::Usage(_))));
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
