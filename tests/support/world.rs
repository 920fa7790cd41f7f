//! One test world for every operator test (tiers 3 and 4): a namespace of
//! its own on the binary's real control plane ([`super::cluster`]), the
//! real storage engine in a temp dir, the test kubelet running real
//! PostgreSQL for the compute Pods ([`super::kubelet`]), and the real
//! operator (`controller::run()`, or one controller) started, stopped or
//! crashed at will.
//!
//! The operator talks to the apiserver as the ServiceAccount
//! `pgbranch-operator` of the test's namespace, bound to the ClusterRole we
//! ship (`config/rbac/role.yaml`): a permission the operator lacks fails
//! the test as it would fail in a cluster. Its requests go through a
//! [`Traffic`] recorder (steady-state write counts, injected faults).
//!
//! ```ignore
//! let Some(mut w) = World::new("restore-promotion").await else { return };
//! w.start_operator(w.config());
//! w.create(&shop_branch("prod")).await;
//! wait_ready(&w.client, "prod").await;
//! let c = w.connect_app("prod").await;
//! ```
//!
//! The helpers below take `&Client` and work in the client's default
//! namespace: the world's client has the test's namespace as its default.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::NamespaceResourceScope;
use kube::{Client, CustomResourceExt, Resource, ResourceExt};
use pgbranch::api::{
    Branch, BranchSpec, DatabaseSpec, RoleSpec, Snapshot, SnapshotRestore, SnapshotSchedule,
};
use pgbranch::controller::schedule::{Clock, ManualClock, SystemClock};
use pgbranch::controller::{self, Config, Context, Metrics};
use pgbranch::storage::engine::{Engine, EngineConfig};
use pgbranch::storage::{DriverKind, Storage};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::cluster::{control_plane, ControlPlane};
use super::kubelet::Kubelet;
pub use super::tls::any_tls;
use super::traffic::Traffic;

/// How long a wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(180);

/// The operator's ServiceAccount in every test namespace.
pub const OPERATOR_SA: &str = "pgbranch-operator";

/// Which controllers an operator runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controllers {
    /// `controller::run()`: every controller.
    All,
    /// Only the Snapshot controller.
    Snapshot,
    /// Only the SnapshotRestore controller.
    Restore,
}

/// A running operator; aborted when dropped (also on panic).
pub struct Operator {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    pub metrics: Metrics,
}

impl Operator {
    /// Stops it gracefully (reconciles in flight finish) and waits.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .is_err()
            {
                panic!("the operator did not stop within 60 s");
            }
        }
    }

    /// Kills it wherever it is (reconciles in flight are dropped at their
    /// next await), as a crash would.
    pub async fn crash(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// How a world is made.
pub struct WorldBuilder {
    name: String,
    computes: bool,
    clock: Option<jiff::Timestamp>,
    driver: Option<DriverKind>,
}

impl WorldBuilder {
    /// Without the test kubelet: compute Pods stay Pending (storage-only
    /// scenarios; branches are made with compute disabled).
    pub fn without_computes(mut self) -> Self {
        self.computes = false;
        self
    }

    /// Schedules run on a clock the test moves, starting at `start`.
    pub fn clock(mut self, start: jiff::Timestamp) -> Self {
        self.clock = Some(start);
        self
    }

    /// The engine's driver (default: the plain-copy driver).
    pub fn driver(mut self, d: DriverKind) -> Self {
        self.driver = Some(d);
        self
    }

    /// The world, or `None` (after the skip notice) without a control plane.
    pub async fn build(self) -> Option<World> {
        // `TEST_LOG=pgbranch=debug` shows the operator's and engine's logs.
        if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let cp = control_plane()?;
        Some(World::build(cp, self).await)
    }
}

/// One test's world; dropping it aborts the operator and stops every
/// postgres.
pub struct World {
    /// The test's namespace.
    pub ns: String,
    /// Cluster admin, default namespace [`World::ns`].
    pub client: Client,
    pub engine: Engine,
    pub storage: Arc<dyn Storage>,
    pub kubelet: Option<Kubelet>,
    /// Set when built with [`WorldBuilder::clock`].
    pub manual_clock: Option<Arc<ManualClock>>,
    /// The operator's requests.
    pub traffic: Traffic,
    pub control_plane: &'static ControlPlane,
    operator_config: kube::Config,
    op: Option<Operator>,
    _dir: tempfile::TempDir,
}

impl World {
    /// A world with computes on the binary's control plane, or `None`
    /// without one.
    pub async fn new(name: &str) -> Option<Self> {
        Self::builder(name).build().await
    }

    pub fn builder(name: &str) -> WorldBuilder {
        WorldBuilder {
            name: name.into(),
            computes: true,
            clock: None,
            driver: Some(DriverKind::Copy),
        }
    }

    async fn build(cp: &'static ControlPlane, b: WorldBuilder) -> Self {
        cp.install_crds(&[
            Branch::crd(),
            Snapshot::crd(),
            SnapshotRestore::crd(),
            SnapshotSchedule::crd(),
            pgbranch::api::BackupDestination::crd(),
        ])
        .await;
        let ns = cp.namespace(&b.name).await;
        let client = cp.client(&ns);
        let token = operator_token(&client, &ns).await;
        let operator_config = cp.config_as(Some(&token), &ns);

        let dir = tempfile::Builder::new()
            .prefix("pgbranch-world-")
            .tempdir()
            .expect("tempdir");
        // The engine runs postgres as a non-root user: it must traverse.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod tempdir");
        }
        let engine = Engine::open(EngineConfig {
            root: dir.path().join("volume"),
            driver: b.driver,
            ..Default::default()
        })
        .await
        .expect("engine opens");
        let kubelet = b
            .computes
            .then(|| Kubelet::start(client.clone(), &ns, engine.clone()));
        Self {
            ns,
            client,
            storage: Arc::new(engine.clone()),
            engine,
            kubelet,
            manual_clock: b.clock.map(|t| Arc::new(ManualClock::new(t))),
            traffic: Traffic::default(),
            control_plane: cp,
            operator_config,
            op: None,
            _dir: dir,
        }
    }

    /// The operator settings of tests: this namespace, fast polls, a
    /// resync every second, lsn/size refreshes out of steady-state windows.
    /// On a manual clock Ready objects are looked at every 200 ms, so moves
    /// of the clock are noticed at once.
    pub fn config(&self) -> Config {
        let mut c = Config {
            namespace: Some(self.ns.clone()),
            resync_interval: Some(Duration::from_secs(1)),
            poll_interval: Duration::from_millis(300),
            step_timeout: Duration::from_secs(120),
            stats_interval: Duration::from_secs(600),
            ..Config::default()
        };
        if self.manual_clock.is_some() {
            c.ready_requeue = Duration::from_millis(200);
            c.poll_interval = Duration::from_millis(200);
        }
        c
    }

    /// The clock the test moves (a world built with a clock).
    pub fn clock(&self) -> &ManualClock {
        self.manual_clock
            .as_deref()
            .expect("a world built with a clock")
    }

    /// A client as the operator's ServiceAccount, through [`World::traffic`].
    pub fn operator_client(&self) -> Client {
        self.traffic.client(self.operator_config.clone())
    }

    /// Starts an operator with `config` running `which` controllers until
    /// `stop` is cancelled.
    pub fn spawn(&self, config: Config, which: Controllers, stop: CancellationToken) -> Operator {
        let metrics = Metrics::new();
        let resolver: Arc<dyn controller::ComputeResolver> = match &self.kubelet {
            Some(k) => Arc::new(k.resolver()),
            None => Arc::new(controller::ClusterDns),
        };
        let clock: Arc<dyn Clock> = match &self.manual_clock {
            Some(c) => c.clone(),
            None => Arc::new(SystemClock),
        };
        let ctx = Context::with_clock(
            self.operator_client(),
            self.storage.clone(),
            config,
            metrics.clone(),
            resolver,
            clock,
        );
        let s = stop.clone();
        let shutdown = async move { s.cancelled().await };
        let task = match which {
            Controllers::All => tokio::spawn(controller::run(ctx, shutdown)),
            Controllers::Snapshot => tokio::spawn(controller::snapshot::run(ctx, shutdown)),
            Controllers::Restore => tokio::spawn(controller::restore::run(ctx, shutdown)),
        };
        Operator {
            stop,
            task: Some(task),
            metrics,
        }
    }

    /// An operator with [`World::config`] (the caller holds it).
    pub fn start(&self) -> Operator {
        self.start_with(|_| {})
    }

    /// An operator with [`World::config`] changed by `tweak` (the caller
    /// holds it).
    pub fn start_with(&self, tweak: impl FnOnce(&mut Config)) -> Operator {
        let mut config = self.config();
        tweak(&mut config);
        self.spawn(config, Controllers::All, CancellationToken::new())
    }

    /// Starts the world's own operator with `config`. Panics if one runs.
    pub fn start_operator(&mut self, config: Config) {
        self.start_controllers(config, Controllers::All);
    }

    /// Starts the world's own operator running `which`.
    pub fn start_controllers(&mut self, config: Config, which: Controllers) {
        assert!(self.op.is_none(), "an operator is already running");
        self.op = Some(self.spawn(config, which, CancellationToken::new()));
    }

    /// Starts the world's own operator running `which` (argument order of
    /// the older harness).
    pub fn start_controllers_with(&mut self, which: Controllers, config: Config) {
        self.start_controllers(config, which);
    }

    /// Starts the world's own operator that stops when `stop` is cancelled
    /// (a fail point's token).
    pub fn start_operator_until(&mut self, config: Config, stop: CancellationToken) {
        assert!(self.op.is_none(), "an operator is already running");
        self.op = Some(self.spawn(config, Controllers::All, stop));
    }

    /// The metrics of the world's own operator.
    pub fn metrics(&self) -> Metrics {
        self.op.as_ref().expect("an operator runs").metrics.clone()
    }

    /// Stops the world's own operator gracefully.
    pub async fn stop_operator(&mut self) {
        if let Some(op) = self.op.take() {
            op.stop().await;
        }
    }

    /// Kills the world's own operator, as a crash would.
    pub async fn crash_operator(&mut self) {
        if let Some(op) = self.op.take() {
            op.crash().await;
        }
    }

    /// Waits until the world's own operator ended by itself (its token was
    /// cancelled by a fail point).
    pub async fn wait_operator_stopped(&mut self) {
        let mut op = self.op.take().expect("an operator runs");
        let start = Instant::now();
        while !op.stop.is_cancelled() {
            assert!(start.elapsed() < WAIT, "the fail point never fired");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let task = op.task.take().expect("the operator task");
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the operator stops after the fail point")
            .expect("the operator task");
    }

    /// Stops the operator and every postgres, and checks that no two
    /// computes ever ran on one data directory.
    pub async fn shutdown(mut self) {
        self.stop_operator().await;
        if let Some(k) = self.kubelet.take() {
            let conflicts = k.conflicts();
            k.shutdown().await;
            assert!(
                conflicts.is_empty(),
                "two computes on one data directory: {conflicts:#?}"
            );
        }
    }

    /// A directory of this test's (logs, kubeconfigs); the engine's volume
    /// is under it.
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    pub fn kubelet(&self) -> &Kubelet {
        self.kubelet.as_ref().expect("a world with computes")
    }

    /// An API of this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::default_namespaced(self.client.clone())
    }

    /// Creates an object (its namespace: this world's).
    pub async fn create_obj<K>(&self, obj: &K) -> K
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Serialize
            + std::fmt::Debug,
    {
        self.api::<K>()
            .create(&PostParams::default(), obj)
            .await
            .unwrap_or_else(|e| panic!("create {} {}: {e}", K::kind(&()), obj.name_any()))
    }

    /// Creates an object from JSON.
    pub async fn create<K>(&self, obj: serde_json::Value) -> K
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Serialize
            + std::fmt::Debug,
    {
        let obj: K = serde_json::from_value(obj).expect("a valid object");
        self.create_obj(&obj).await
    }

    /// A Branch without compute (storage only), child of `parent`.
    pub async fn branch(&self, name: &str, parent: Option<&str>) -> Branch {
        let mut spec = serde_json::json!({"compute": {"enabled": false}});
        if let Some(p) = parent {
            spec["parent"] = serde_json::json!({"branch": p});
        }
        self.create(serde_json::json!({
            "apiVersion": "pgbranch.dev/v1alpha1", "kind": "Branch",
            "metadata": {"name": name}, "spec": spec,
        }))
        .await
    }

    /// A Branch with a compute, child of `parent`.
    pub async fn branch_with_compute(&self, name: &str, parent: Option<&str>) -> Branch {
        let mut spec = serde_json::json!({});
        if let Some(p) = parent {
            spec["parent"] = serde_json::json!({"branch": p});
        }
        self.create(serde_json::json!({
            "apiVersion": "pgbranch.dev/v1alpha1", "kind": "Branch",
            "metadata": {"name": name}, "spec": spec,
        }))
        .await
    }

    /// A field of a Secret of this namespace.
    pub async fn secret_field(&self, secret: &str, key: &str) -> String {
        secret_field(&self.client, secret, key).await
    }

    /// Waits until the Snapshot `name` is ready to use.
    pub async fn wait_snapshot_ready(&self, name: &str) -> Snapshot {
        wait_snapshot_ready(&self.client, name).await
    }

    /// Snapshot names, sorted.
    pub async fn snapshot_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .api::<Snapshot>()
            .list(&Default::default())
            .await
            .expect("list snapshots")
            .items
            .iter()
            .map(|s| s.name_any())
            .collect();
        v.sort();
        v
    }

    /// The local port of the compute behind a Service.
    pub async fn port(&self, service: &str) -> Option<u16> {
        self.kubelet().resolve_service(service).await
    }

    /// Timelines with a running compute.
    pub async fn running_timelines(&self) -> Vec<String> {
        self.kubelet().running_timelines().await
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
            .ok_or_else(|| format!("no ready compute behind Service {service}"))?;
        pg_connect(port, user, password, db)
            .await
            .map_err(|e| e.to_string())
    }

    /// Connects through a Service, as `pg_connect` does, keeping the
    /// postgres error (its SQLSTATE).
    pub async fn try_connect(
        &self,
        service: &str,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let port = self
            .port(service)
            .await
            .unwrap_or_else(|| panic!("no ready compute behind Service {service}"));
        pg_connect(port, user, password, db).await
    }

    /// Connects through the branch's Service with its `-app` Secret,
    /// retrying for a while (a compute may be moving).
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

/// The operator's ServiceAccount in `ns`, bound to the shipped ClusterRole
/// (applied from config/rbac/role.yaml), and a token for it.
async fn operator_token(client: &Client, ns: &str) -> String {
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let yaml = include_str!("../../config/rbac/role.yaml");
    let role: ClusterRole = serde_yaml::from_str(yaml).expect("config/rbac/role.yaml");
    roles
        .patch(
            &role.name_any(),
            &PatchParams::apply("pgbranch-tests").force(),
            &Patch::Apply(&role),
        )
        .await
        .expect("apply the operator's ClusterRole");
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some(OPERATOR_SA.into());
    sas.create(&PostParams::default(), &sa)
        .await
        .expect("create the operator's ServiceAccount");
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": OPERATOR_SA, "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": role.name_any()},
        "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": ns}],
    }))
    .expect("a RoleBinding");
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .expect("bind the operator's ClusterRole");
    let req = serde_json::from_value(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": 86400},
    }))
    .expect("a TokenRequest");
    let tr = sas
        .create_token_request(OPERATOR_SA, &PostParams::default(), &req)
        .await
        .expect("a token for the operator");
    tr.status.expect("a token").token
}

/// Connects to a local postgres (over TLS when it offers it).
pub async fn pg_connect(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname(db)
        .connect_timeout(Duration::from_secs(5))
        .connect(any_tls())
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

pub fn branches(client: &Client) -> Api<Branch> {
    Api::default_namespaced(client.clone())
}
pub fn snapshots(client: &Client) -> Api<Snapshot> {
    Api::default_namespaced(client.clone())
}
pub fn restores(client: &Client) -> Api<SnapshotRestore> {
    Api::default_namespaced(client.clone())
}
pub fn schedules(client: &Client) -> Api<SnapshotSchedule> {
    Api::default_namespaced(client.clone())
}

/// A Branch (namespace: the client's).
pub fn branch(name: &str, spec: BranchSpec) -> Branch {
    Branch::new(name, spec)
}

/// A root branch with an app role and database `shop`.
pub fn shop_branch(name: &str) -> Branch {
    branch(
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
    )
}

pub async fn create_branch(client: &Client, b: &Branch) {
    branches(client)
        .create(&PostParams::default(), b)
        .await
        .unwrap_or_else(|e| panic!("create branch {}: {e}", b.name_any()));
}

pub async fn create_snapshot(client: &Client, name: &str, spec: pgbranch::api::SnapshotSpec) {
    snapshots(client)
        .create(&PostParams::default(), &Snapshot::new(name, spec))
        .await
        .unwrap_or_else(|e| panic!("create snapshot {name}: {e}"));
}

pub async fn create_restore(client: &Client, name: &str, spec: pgbranch::api::SnapshotRestoreSpec) {
    restores(client)
        .create(&PostParams::default(), &SnapshotRestore::new(name, spec))
        .await
        .unwrap_or_else(|e| panic!("create restore {name}: {e}"));
}

/// `(status, reason, message)` of a condition.
pub fn cond(
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(String, String, String)> {
    conds
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// A Branch's condition.
pub fn condition(b: &Branch, type_: &str) -> Option<(String, String, String)> {
    cond(&b.status.as_ref()?.conditions, type_)
}

/// Polls `check` until it returns `Some`; panics after `secs`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {secs} s waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `get` until `pred` holds; panics with the last value.
pub async fn wait_for<T: std::fmt::Debug, F, Fut>(
    what: &str,
    get: F,
    pred: impl Fn(&T) -> bool,
) -> T
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        let v = get().await;
        if let Some(v) = v {
            if pred(&v) {
                return v;
            }
            if start.elapsed() > WAIT {
                panic!("{what} not reached in {WAIT:?}; last: {v:#?}");
            }
        } else if start.elapsed() > WAIT {
            panic!("{what} not reached in {WAIT:?}; the object does not exist");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the object `name` exists and satisfies `pred`; a failure
/// shows its status (and any deletion timestamp).
pub async fn wait_object<K>(api: &Api<K>, name: &str, what: &str, pred: impl Fn(&K) -> bool) -> K
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let what = format!("{} {name}: {what}", K::kind(&()));
    let start = Instant::now();
    loop {
        let v = api.get_opt(name).await.ok().flatten();
        if let Some(v) = &v {
            if pred(v) {
                return v.clone();
            }
        }
        if start.elapsed() > WAIT {
            let shown = v.map(|o| {
                let j = serde_json::to_value(&o).unwrap_or_default();
                serde_json::to_string_pretty(&serde_json::json!({
                    "deletionTimestamp": j["metadata"]["deletionTimestamp"],
                    "status": j["status"],
                }))
                .unwrap_or_default()
            });
            panic!(
                "{what} not reached in {WAIT:?}; last: {}",
                shown.unwrap_or_else(|| "the object does not exist".into())
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn wait_branch(
    client: &Client,
    name: &str,
    what: &str,
    pred: impl Fn(&Branch) -> bool,
) -> Branch {
    wait_object(&branches(client), name, what, pred).await
}

/// Ready=True at the current generation.
pub async fn wait_ready(client: &Client, name: &str) -> Branch {
    wait_branch(client, name, "Ready", |b| {
        condition(b, "Ready").is_some_and(|c| c.0 == "True")
            && b.status.as_ref().and_then(|s| s.observed_generation) == b.metadata.generation
    })
    .await
}

/// Ready=True at the current generation.
pub async fn wait_branch_ready(client: &Client, name: &str) -> Branch {
    wait_ready(client, name).await
}

pub async fn wait_stalled(client: &Client, name: &str, reason: &str) -> Branch {
    wait_branch(client, name, &format!("Stalled {reason}"), |b| {
        condition(b, "Stalled").is_some_and(|c| c.0 == "True" && c.1 == reason)
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

/// Waits until the restore `name` ends and asserts it Completed (Ready
/// True, `completedAt` set); a Failed one fails the test with its status.
pub async fn wait_completed(client: &Client, name: &str) -> SnapshotRestore {
    use pgbranch::api::RestorePhase;
    let phase = |r: &SnapshotRestore| r.status.as_ref().and_then(|s| s.phase);
    let r = wait_restore(client, name, "Completed or Failed", |r| {
        matches!(
            phase(r),
            Some(RestorePhase::Completed) | Some(RestorePhase::Failed)
        )
    })
    .await;
    assert_eq!(phase(&r), Some(RestorePhase::Completed), "{:#?}", r.status);
    let st = r.status.clone().unwrap_or_default();
    assert_eq!(
        cond(&st.conditions, "Ready").map(|c| c.0).as_deref(),
        Some("True")
    );
    assert!(st.completed_at.is_some());
    r
}

/// Waits until the object is gone.
pub async fn wait_gone<K>(api: &Api<K>, name: &str)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let start = Instant::now();
    while api.get_opt(name).await.expect("get").is_some() {
        assert!(start.elapsed() < WAIT, "{name} was not deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A field of a Secret.
pub async fn secret_field(client: &Client, name: &str, key: &str) -> String {
    let api: Api<Secret> = Api::default_namespaced(client.clone());
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

/// `(user, password, dbname)` of `<branch>-app`.
pub async fn app_credentials(client: &Client, branch: &str) -> (String, String, String) {
    let name = format!("{branch}-app");
    (
        secret_field(client, &name, "user").await,
        secret_field(client, &name, "password").await,
        secret_field(client, &name, "dbname").await,
    )
}

/// Asserts that `user` cannot log in to `service` with `password`.
pub async fn assert_auth_fails(w: &World, service: &str, user: &str, password: &str, db: &str) {
    match w.try_connect(service, user, password, db).await {
        Ok(_) => panic!("{user} logged in to {service} with a password it must not accept"),
        Err(e) => assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
            "unexpected error: {e}"
        ),
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
