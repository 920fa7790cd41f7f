//! Harness of the snapshot and restore scenarios (tier 3): the real
//! `controller::run()` against the in-process API server, the real engine
//! (copy driver) and real PostgreSQL computes from the local compute runner.
//! Unlike `branch_scenario::Harness` the operator can be stopped and started
//! again on the same storage (crash injection) and configured per test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use pgbranch::api::{
    Branch, BranchSpec, DatabaseSpec, RoleSpec, Snapshot, SnapshotRestore, SnapshotRestoreSpec,
    SnapshotSpec,
};
use pgbranch::controller::{self, Config, Context, Metrics};
use pgbranch::storage::engine::{Engine, EngineConfig};
use pgbranch::storage::{DriverKind, Storage};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use super::apiserver::ApiServer;
use super::compute_runner::ComputeRunner;

pub const NS: &str = "team";
pub const WAIT: Duration = Duration::from_secs(180);

struct Operator {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Engine, compute runner and a restartable operator. Dropping it aborts
/// the operator and stops every postgres.
pub struct Harness {
    pub server: ApiServer,
    pub client: Client,
    pub engine: Engine,
    pub runner: Option<ComputeRunner>,
    op: Option<Operator>,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            op.task.abort();
        }
    }
}

/// The test configuration: namespace `NS`, fast polls, resync every second.
pub fn test_config() -> Config {
    Config {
        namespace: Some(NS.into()),
        resync_interval: Some(Duration::from_secs(1)),
        poll_interval: Duration::from_millis(300),
        step_timeout: Duration::from_secs(120),
        ..Config::default()
    }
}

impl Harness {
    /// API server with the CRDs and namespace, engine, runner; no operator.
    pub async fn new() -> Self {
        let server = ApiServer::new();
        server.install_crd(&Branch::crd());
        server.install_crd(&Snapshot::crd());
        server.install_crd(&SnapshotRestore::crd());
        server.create_namespace(NS);
        let client = server.client();
        let dir = tempfile::Builder::new()
            .prefix("pgbranch-restore-")
            .tempdir()
            .expect("tempdir");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod tempdir");
        }
        let engine = Engine::open(EngineConfig {
            root: dir.path().join("volume"),
            driver: Some(DriverKind::Copy),
            ..Default::default()
        })
        .await
        .expect("engine opens");
        let runner = ComputeRunner::start(client.clone(), engine.clone());
        Self {
            server,
            client,
            engine,
            runner: Some(runner),
            op: None,
            _dir: dir,
        }
    }

    fn runner(&self) -> &ComputeRunner {
        self.runner.as_ref().expect("runner running")
    }

    /// Starts the operator with `config`.
    pub fn start_operator(&mut self, config: Config) {
        assert!(self.op.is_none(), "operator already running");
        let storage: Arc<dyn Storage> = Arc::new(self.engine.clone());
        let ctx = Context::new(
            self.client.clone(),
            storage,
            config,
            Metrics::new(),
            Arc::new(self.runner().resolver()),
        );
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(controller::run(ctx, async move { s.cancelled().await }));
        self.op = Some(Operator { stop, task });
    }

    /// Starts the operator whose shutdown is `crash` (a fail point's token).
    pub fn start_operator_until(&mut self, config: Config, crash: CancellationToken) {
        assert!(self.op.is_none(), "operator already running");
        let storage: Arc<dyn Storage> = Arc::new(self.engine.clone());
        let ctx = Context::new(
            self.client.clone(),
            storage,
            config,
            Metrics::new(),
            Arc::new(self.runner().resolver()),
        );
        let c = crash.clone();
        let task = tokio::spawn(controller::run(ctx, async move { c.cancelled().await }));
        self.op = Some(Operator { stop: crash, task });
    }

    /// Starts only the Snapshot controller (to watch it wait for a restore
    /// that is stopped mid-way).
    pub fn start_snapshot_controller_only(&mut self, config: Config) {
        assert!(self.op.is_none(), "operator already running");
        let storage: Arc<dyn Storage> = Arc::new(self.engine.clone());
        let ctx = Context::new(
            self.client.clone(),
            storage,
            config,
            Metrics::new(),
            Arc::new(self.runner().resolver()),
        );
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(controller::snapshot::run(ctx, async move {
            s.cancelled().await
        }));
        self.op = Some(Operator { stop, task });
    }

    /// Starts only the SnapshotRestore controller (so a test can hold a
    /// Snapshot's or Branch's status still).
    pub fn start_restore_controller_only(&mut self, config: Config) {
        assert!(self.op.is_none(), "operator already running");
        let storage: Arc<dyn Storage> = Arc::new(self.engine.clone());
        let ctx = Context::new(
            self.client.clone(),
            storage,
            config,
            Metrics::new(),
            Arc::new(self.runner().resolver()),
        );
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(controller::restore::run(
            ctx,
            async move { s.cancelled().await },
        ));
        self.op = Some(Operator { stop, task });
    }

    /// Waits for the operator to end on its own (a fail point fired).
    pub async fn wait_operator_stopped(&mut self) {
        let op = self.op.take().expect("operator running");
        let start = Instant::now();
        while !op.stop.is_cancelled() {
            assert!(start.elapsed() < WAIT, "the fail point never fired");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::timeout(Duration::from_secs(60), op.task)
            .await
            .expect("operator stops after the fail point")
            .expect("operator task");
    }

    /// Stops the operator gracefully.
    pub async fn stop_operator(&mut self) {
        if let Some(op) = self.op.take() {
            op.stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(60), op.task).await;
        }
    }

    /// Stops the operator and every postgres.
    pub async fn shutdown(mut self) {
        self.stop_operator().await;
        if let Some(r) = self.runner.take() {
            r.shutdown().await;
        }
    }

    /// The local port of the compute behind a Service.
    pub async fn port(&self, service: &str) -> Option<u16> {
        self.runner().resolve_service(NS, service).await
    }

    pub async fn running_timelines(&self) -> Vec<String> {
        self.runner().running_timelines().await
    }

    /// Connects through a Service with explicit credentials.
    pub async fn connect(
        &self,
        service: &str,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, String> {
        let port = self
            .port(service)
            .await
            .ok_or_else(|| format!("no compute behind Service {service}"))?;
        let (c, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(port)
            .user(user)
            .password(password)
            .dbname(db)
            .connect_timeout(Duration::from_secs(5))
            .connect(NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(c)
    }

    /// Connects through the branch's Service with its `-app` Secret,
    /// retrying briefly (a compute may be moving).
    pub async fn connect_app(&self, branch: &str) -> tokio_postgres::Client {
        let start = Instant::now();
        loop {
            let c = app_credentials(&self.client, branch).await;
            match self.connect(branch, &c.0, &c.1, &c.2).await {
                Ok(client) => return client,
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(60),
                        "connect to {branch}: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// `(user, password, dbname)` of `<branch>-app`.
pub async fn app_credentials(client: &Client, branch: &str) -> (String, String, String) {
    let name = format!("{branch}-app");
    (
        secret_field(client, &name, "user").await,
        secret_field(client, &name, "password").await,
        secret_field(client, &name, "dbname").await,
    )
}

pub async fn secret_field(client: &Client, name: &str, key: &str) -> String {
    let api: Api<Secret> = Api::namespaced(client.clone(), NS);
    let s = api
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("secret {name}: {e}"));
    let bytes = s
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .unwrap_or_else(|| panic!("secret {name} has no {key}"));
    String::from_utf8(bytes.0.clone()).expect("utf-8")
}

pub fn branches(client: &Client) -> Api<Branch> {
    Api::namespaced(client.clone(), NS)
}
pub fn snapshots(client: &Client) -> Api<Snapshot> {
    Api::namespaced(client.clone(), NS)
}
pub fn restores(client: &Client) -> Api<SnapshotRestore> {
    Api::namespaced(client.clone(), NS)
}

/// A root branch with an app role and database `shop`.
pub fn shop_branch(name: &str) -> Branch {
    let mut b = Branch::new(
        name,
        BranchSpec {
            databases: vec![DatabaseSpec {
                name: "shop".into(),
                owner: Some("shop".into()),
            }],
            roles: vec![RoleSpec {
                name: "shop".into(),
            }],
            ..Default::default()
        },
    );
    b.metadata.namespace = Some(NS.into());
    b
}

pub async fn create_branch(client: &Client, b: &Branch) {
    branches(client)
        .create(&PostParams::default(), b)
        .await
        .unwrap_or_else(|e| panic!("create branch {}: {e}", b.name_any()));
}

pub async fn create_snapshot(client: &Client, name: &str, spec: SnapshotSpec) {
    let mut s = Snapshot::new(name, spec);
    s.metadata.namespace = Some(NS.into());
    snapshots(client)
        .create(&PostParams::default(), &s)
        .await
        .unwrap_or_else(|e| panic!("create snapshot {name}: {e}"));
}

pub async fn create_restore(client: &Client, name: &str, spec: SnapshotRestoreSpec) {
    let mut r = SnapshotRestore::new(name, spec);
    r.metadata.namespace = Some(NS.into());
    restores(client)
        .create(&PostParams::default(), &r)
        .await
        .unwrap_or_else(|e| panic!("create restore {name}: {e}"));
}

pub fn cond(
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(String, String, String)> {
    conds
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Polls `get` until `pred` holds; panics with the last value.
pub async fn wait_for<T: std::fmt::Debug, F, Fut>(
    what: &str,
    get: F,
    pred: impl Fn(&T) -> bool,
) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        let v = get().await;
        if let Some(v) = &v {
            if pred(v) {
                return get().await.expect("still there");
            }
        }
        if start.elapsed() > WAIT {
            panic!("{what} not reached in {WAIT:?}; last: {v:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the object `name` exists and satisfies `pred`.
pub async fn wait_object<K>(api: &Api<K>, name: &str, what: &str, pred: impl Fn(&K) -> bool) -> K
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_for(
        &format!("{} {name}: {what}", K::kind(&())),
        || {
            let api = api.clone();
            async move { api.get_opt(name).await.ok().flatten() }
        },
        pred,
    )
    .await
}

pub async fn wait_branch(
    client: &Client,
    name: &str,
    what: &str,
    pred: impl Fn(&Branch) -> bool,
) -> Branch {
    wait_object(&branches(client), name, what, pred).await
}

pub async fn wait_branch_ready(client: &Client, name: &str) -> Branch {
    wait_branch(client, name, "Ready", |b| {
        b.status.as_ref().is_some_and(|s| {
            cond(&s.conditions, "Ready").is_some_and(|c| c.0 == "True")
                && s.observed_generation == b.metadata.generation
        })
    })
    .await
}

pub async fn wait_snapshot(
    client: &Client,
    name: &str,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    wait_object(&snapshots(client), name, what, pred).await
}

pub async fn wait_snapshot_ready(client: &Client, name: &str) -> Snapshot {
    wait_snapshot(client, name, "readyToUse", |s| {
        s.status.as_ref().is_some_and(|st| {
            st.ready_to_use && cond(&st.conditions, "Ready").is_some_and(|c| c.0 == "True")
        })
    })
    .await
}

pub async fn wait_restore(
    client: &Client,
    name: &str,
    what: &str,
    pred: impl Fn(&SnapshotRestore) -> bool,
) -> SnapshotRestore {
    wait_object(&restores(client), name, what, pred).await
}

pub async fn wait_gone<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let start = Instant::now();
    while api.get_opt(name).await.expect("get").is_some() {
        assert!(start.elapsed() < WAIT, "{name} was not deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `SELECT id FROM items ORDER BY id`.
pub async fn ids(c: &tokio_postgres::Client) -> Vec<i32> {
    c.query("SELECT id FROM items ORDER BY id", &[])
        .await
        .expect("select")
        .iter()
        .map(|r| r.get(0))
        .collect()
}
