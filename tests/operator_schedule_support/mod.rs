//! Runs the real operator (`controller::run()`, every controller) against
//! the in-process API server with the real storage engine, on a clock the
//! test moves by hand. Shared by the schedule and refresh tests.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, PostParams};
use kube::CustomResourceExt;
use pgbranch::api::{Branch, Snapshot, SnapshotRestore, SnapshotSchedule};
use pgbranch::controller::schedule::ManualClock;
use pgbranch::controller::{self, ClusterDns, Config, Context, Metrics};
use pgbranch::storage::engine::{Engine, EngineConfig};
use pgbranch::storage::Storage;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::support::apiserver::ApiServer;
use crate::support::compute_runner::ComputeRunner;

/// One test's world: API server, storage volume, clock.
pub struct World {
    pub server: ApiServer,
    pub client: kube::Client,
    pub clock: Arc<ManualClock>,
    pub storage: Arc<dyn Storage>,
    pub engine: Engine,
    /// Runs a real postgres per compute Deployment (only when asked for).
    pub runner: Option<ComputeRunner>,
    _dir: tempfile::TempDir,
}

impl World {
    /// A world whose branches run no compute (storage only).
    pub async fn new(start: jiff::Timestamp) -> Self {
        Self::build(start, false).await
    }

    /// A world where compute Deployments run a real postgres.
    pub async fn with_computes(start: jiff::Timestamp) -> Self {
        Self::build(start, true).await
    }

    async fn build(start: jiff::Timestamp, computes: bool) -> Self {
        let server = ApiServer::new();
        for crd in [
            Branch::crd(),
            Snapshot::crd(),
            SnapshotRestore::crd(),
            SnapshotSchedule::crd(),
        ] {
            server.install_crd(&crd);
        }
        let dir = tempfile::tempdir().unwrap();
        // The engine runs postgres as a non-root user: it must traverse.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let engine = Engine::open(EngineConfig {
            root: dir.path().join("vol"),
            ..Default::default()
        })
        .await
        .unwrap();
        let client = server.client();
        let runner = computes.then(|| ComputeRunner::start(client.clone(), engine.clone()));
        Self {
            client,
            server,
            clock: Arc::new(ManualClock::new(start)),
            storage: Arc::new(engine.clone()),
            engine,
            runner,
            _dir: dir,
        }
    }

    /// Starts the operator (all controllers), polling often so moves of the
    /// clock are noticed within a fraction of a second.
    pub fn start(&self) -> Operator {
        self.start_with(|_| {})
    }

    /// [`World::start`] with changes to the operator's settings.
    pub fn start_with(&self, tweak: impl FnOnce(&mut Config)) -> Operator {
        let mut config = Config {
            namespace: Some("default".into()),
            ready_requeue: Duration::from_millis(200),
            poll_interval: Duration::from_millis(200),
            step_timeout: Duration::from_secs(120),
            ..Default::default()
        };
        tweak(&mut config);
        let resolver: Arc<dyn controller::ComputeResolver> = match &self.runner {
            Some(r) => Arc::new(r.resolver()),
            None => Arc::new(ClusterDns),
        };
        let ctx = Context::with_clock(
            self.client.clone(),
            self.storage.clone(),
            config,
            Metrics::new(),
            resolver,
            self.clock.clone(),
        );
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(controller::run(ctx, async move {
            let _ = rx.await;
        }));
        Operator {
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), "default")
    }

    /// Creates an object from JSON.
    pub async fn create<K>(&self, obj: Value) -> K
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let obj: K = serde_json::from_value(obj).unwrap();
        self.api::<K>()
            .create(&PostParams::default(), &obj)
            .await
            .unwrap()
    }

    /// A Branch without compute (storage only): enough for schedules.
    pub async fn branch(&self, name: &str, parent: Option<&str>) -> Branch {
        let mut spec = json!({"compute": {"enabled": false}});
        if let Some(p) = parent {
            spec["parent"] = json!({"branch": p});
        }
        self.create(json!({
            "apiVersion": "pgbranch.dev/v1alpha1", "kind": "Branch",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        }))
        .await
    }

    /// A Branch with a running compute (needs [`World::with_computes`]).
    pub async fn branch_with_compute(&self, name: &str, parent: Option<&str>) -> Branch {
        let mut spec = json!({});
        if let Some(p) = parent {
            spec["parent"] = json!({"branch": p});
        }
        self.create(json!({
            "apiVersion": "pgbranch.dev/v1alpha1", "kind": "Branch",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        }))
        .await
    }

    /// A field of a Secret.
    pub async fn secret_field(&self, secret: &str, key: &str) -> String {
        let s = self
            .api::<k8s_openapi::api::core::v1::Secret>()
            .get(secret)
            .await
            .unwrap();
        let bytes = s.data.unwrap_or_default().remove(key).unwrap();
        String::from_utf8(bytes.0).unwrap()
    }

    /// Connects to `branch` through its Service with its `<branch>-app`
    /// Secret, as an application would.
    pub async fn connect_app(&self, branch: &str) -> tokio_postgres::Client {
        let runner = self.runner.as_ref().expect("a world with computes");
        let port = runner
            .resolve_service("default", branch)
            .await
            .unwrap_or_else(|| panic!("no compute behind Service {branch}"));
        let secret = format!("{branch}-app");
        let (c, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(port)
            .user(self.secret_field(&secret, "user").await)
            .password(self.secret_field(&secret, "password").await)
            .dbname(self.secret_field(&secret, "dbname").await)
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {branch}: {e}"));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        c
    }

    /// Waits until the Snapshot `name` is ready to use (taken by the real
    /// Snapshot controller).
    pub async fn wait_snapshot_ready(&self, name: &str) {
        eventually(60, &format!("Snapshot {name} readyToUse"), || async {
            let s = self.api::<Snapshot>().get_opt(name).await.unwrap()?;
            s.status.filter(|st| st.ready_to_use).map(|_| ())
        })
        .await;
    }

    /// Snapshot names, sorted.
    pub async fn snapshot_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .api::<Snapshot>()
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|s| kube::ResourceExt::name_any(&s))
            .collect();
        v.sort();
        v
    }
}

/// A running operator; stopped on drop (also on panic).
pub struct Operator {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Operator {
    /// Stops it and waits until it is gone ("downtime" begins).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .is_err()
            {
                panic!("the operator did not stop within 20s");
            }
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Polls `check` until it returns `Some` (or panics after `secs`).
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `t` truncated to the minute, as run names show it.
pub fn stamp(t: jiff::Timestamp) -> String {
    t.strftime("%Y%m%d%H%M").to_string()
}

/// The next `hh:mm` UTC strictly after `t`, computed on the calendar.
pub fn next_utc(t: jiff::Timestamp, hour: i8, minute: i8) -> jiff::Timestamp {
    let z = t.to_zoned(jiff::tz::TimeZone::UTC);
    let today = z
        .date()
        .at(hour, minute, 0, 0)
        .to_zoned(jiff::tz::TimeZone::UTC)
        .unwrap();
    let cand = today.timestamp();
    if cand > t {
        cand
    } else {
        cand.checked_add(jiff::SignedDuration::from_hours(24))
            .unwrap()
    }
}

pub fn plus(t: jiff::Timestamp, secs: i64) -> jiff::Timestamp {
    t.checked_add(jiff::SignedDuration::from_secs(secs))
        .unwrap()
}
