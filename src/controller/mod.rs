//! The operator: one `kube_runtime::Controller` per kind.
//!
//! Every controller is a pipeline: observe (read the object, its relations
//! and the storage layer) → validate → desired (pure builders in
//! [`crate::compute`]) → apply (server-side apply, one field manager, skipped
//! when unchanged) → status ([`status::write_status`], only when changed).
//! Errors say whether a retry can help ([`Error::is_retryable`]); failures
//! that will not fix themselves are reported as a `Stalled` condition
//! (ARCHITECTURE.md, "The reconcile pipeline contract").
//!
//! The kit every controller shares, so none imports a sibling's internals:
//! [`runner`] (set-up, the reconcile span, finalizers, the error policy),
//! [`Context::api`], [`status`] (the status writer and Event publisher),
//! [`apply`], [`secrets`] (the Secret reader), [`sql`], [`tls`] (the
//! namespace CA, branch certificates, TLS to computes), [`operations`],
//! [`expiry`], [`scheduling`] and [`metrics`].

pub mod apply;
pub mod branch;
pub mod cache;
pub mod destination;
pub mod expiry;
pub mod metrics;
pub mod object_store;
pub mod operations;
pub mod restore;
pub mod runner;
pub mod schedule;
pub mod scheduling;
pub mod secrets;
pub mod snapshot;
pub mod sql;
pub mod status;
pub mod storage_poll;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kube::api::{ListParams, PostParams};
use kube::core::NamespaceResourceScope;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource};

use crate::compute::{ComputeConfig, PG_PORT};
use crate::storage::{Storage, StorageError};

pub use metrics::Metrics;
pub use runner::{
    backoff, controller_config, controller_for, controller_for_shared, drive, error_policy,
    finalizer_result, uid_of, until_stopped, with_finalizer, Drive, Shared, Shutdown,
};

/// A namespaced kind the controllers read and write, ours or a built-in
/// one (Deployment, Secret, ...): the bounds the kube client asks for,
/// named once.
pub trait Object:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + serde::Serialize
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Object for K where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// Operator settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Watch only this namespace (all namespaces when `None`).
    pub namespace: Option<String>,
    /// How computes are built.
    pub compute: ComputeConfig,
    /// How often a Ready object is looked at again (status is a cache).
    pub ready_requeue: Duration,
    /// Reconcile every object this often in addition to watch events
    /// (`None`: only on events and requeues).
    pub resync_interval: Option<Duration>,
    /// Deadline of each external step (storage call, SQL session).
    pub step_timeout: Duration,
    /// How long to wait between polls of something under way.
    pub poll_interval: Duration,
    /// How often the fast-moving status fields (`lsn`, sizes) are refreshed
    /// (at most); between refreshes an unchanged branch causes no writes.
    pub stats_interval: Duration,
    /// Name reported in Events.
    pub reporter: String,
    /// Instance reported in Events (the pod name).
    pub instance: Option<String>,
    /// Most Snapshot objects holding a stored snapshot per namespace; one
    /// more is Stalled `SnapshotQuotaExceeded` (default 10).
    pub snapshot_quota: u32,
    /// How long a compute Pod may fail to come up for a reason that does
    /// not fix itself (unschedulable, image pull, crash loop) before the
    /// Branch is Stalled with that reason (until then it is Reconciling
    /// with the same message).
    pub compute_start_deadline: Duration,
    /// Test hook: stop the operator right after a restore records this
    /// finalize step (see [`restore::FailPoint`]).
    pub restore_fail_point: Option<restore::FailPoint>,
    /// Most reconciles each controller runs at once (0: unbounded). Every
    /// reconcile in flight holds an HTTP/1 connection to the apiserver per
    /// request it makes; unbounded, thousands of new objects mean thousands
    /// of connections, memory to match and requests the apiserver's
    /// priority and fairness rejects (429).
    pub concurrency: u16,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: None,
            compute: ComputeConfig::default(),
            ready_requeue: Duration::from_secs(300),
            resync_interval: None,
            step_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_secs(2),
            stats_interval: Duration::from_secs(60),
            reporter: "pgbranch-operator".into(),
            instance: None,
            snapshot_quota: 10,
            compute_start_deadline: Duration::from_secs(300),
            restore_fail_point: None,
            concurrency: DEFAULT_CONCURRENCY,
        }
    }
}

/// Default of [`Config::concurrency`].
pub const DEFAULT_CONCURRENCY: u16 = 16;

/// Turns a branch's Service into an address the operator can connect to.
#[async_trait]
pub trait ComputeResolver: Send + Sync + 'static {
    /// `(host, port)` of the compute the Service `service` in `namespace`
    /// selects.
    async fn resolve(&self, namespace: &str, service: &str) -> Result<(String, u16), Error>;
}

/// In a cluster: the Service's DNS name on the PostgreSQL port.
#[derive(Debug, Clone, Default)]
pub struct ClusterDns;

#[async_trait]
impl ComputeResolver for ClusterDns {
    async fn resolve(&self, namespace: &str, service: &str) -> Result<(String, u16), Error> {
        Ok((format!("{service}.{namespace}.svc"), PG_PORT as u16))
    }
}

/// What every reconcile gets.
pub struct Context {
    pub client: Client,
    pub storage: Arc<dyn Storage>,
    pub config: Config,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub resolver: Arc<dyn ComputeResolver>,
    /// The time schedules run by (tests move it by hand).
    pub clock: Arc<dyn schedule::Clock>,
    /// Consecutive failures per object, for the error policy's backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// When each object's status stats were last refreshed (by UID).
    stats: Mutex<HashMap<String, std::time::Instant>>,
    /// Branches waiting for their Service's endpoints to switch.
    pub(crate) switch_waits: branch::endpoints::SwitchWaits,
    /// One data-changing operation per branch ([`operations`]).
    pub operations: operations::OperationLock,
    /// The watch caches of the objects branches own ([`cache`]).
    pub cache: cache::Cache,
    /// Certificates confirmed served by a branch's compute ([`tls`]).
    pub(crate) tls_served: tls::ServedCache,
}

impl Context {
    pub fn new(
        client: Client,
        storage: Arc<dyn Storage>,
        config: Config,
        metrics: Metrics,
        resolver: Arc<dyn ComputeResolver>,
    ) -> Arc<Self> {
        Self::with_clock(
            client,
            storage,
            config,
            metrics,
            resolver,
            Arc::new(schedule::SystemClock),
        )
    }

    /// [`Context::new`] with the clock schedules run by.
    pub fn with_clock(
        client: Client,
        storage: Arc<dyn Storage>,
        config: Config,
        metrics: Metrics,
        resolver: Arc<dyn ComputeResolver>,
        clock: Arc<dyn schedule::Clock>,
    ) -> Arc<Self> {
        let config_namespace = config.namespace.clone();
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: config.reporter.clone(),
                instance: config.instance.clone(),
            },
        );
        Arc::new(Self {
            client,
            storage,
            config,
            metrics,
            recorder,
            resolver,
            clock,
            failures: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            switch_waits: Default::default(),
            operations: operations::OperationLock::default(),
            cache: cache::Cache::new(config_namespace),
            tls_served: Default::default(),
        })
    }

    /// The one way to an [`Api`]: the `K` objects of namespace `ns`.
    pub fn api<K>(&self, ns: &str) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
    {
        Api::namespaced(self.client.clone(), ns)
    }

    /// The `K` objects the operator watches: those of its namespace
    /// ([`Config::namespace`]), else of every namespace.
    pub fn watched<K>(&self) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
    {
        match &self.config.namespace {
            Some(ns) => self.api(ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// The `K` objects of namespace `ns` whose labels match `selector`
    /// (every one when it is empty): from the watch cache when it can
    /// answer ([`cache`]), else listed within the step deadline (`step`
    /// names it in a timeout).
    pub async fn list<K: Object>(
        &self,
        ns: &str,
        step: &'static str,
        selector: &str,
    ) -> Result<Vec<K>, Error> {
        if let Some(cached) = self.cache.list::<K>(ns, selector) {
            return Ok(cached);
        }
        self.list_live(ns, step, selector).await
    }

    /// [`Context::list`] from the API server, never the cache: for objects
    /// the cache does not hold (those without a branch label).
    pub async fn list_live<K: Object>(
        &self,
        ns: &str,
        step: &'static str,
        selector: &str,
    ) -> Result<Vec<K>, Error> {
        let mut params = ListParams::default();
        if !selector.is_empty() {
            params = params.labels(selector);
        }
        let api: Api<K> = self.api(ns);
        Ok(with_deadline(self, step, api.list(&params)).await?.items)
    }

    /// The `K` named `name` in namespace `ns`, if it exists: from the watch
    /// cache when it holds it, else read within the step deadline (a cache
    /// miss is always confirmed: callers act on absence).
    pub async fn get<K: Object>(
        &self,
        ns: &str,
        step: &'static str,
        name: &str,
    ) -> Result<Option<K>, Error> {
        if let Some(Some(hit)) = self.cache.get::<K>(ns, name) {
            return Ok(Some(hit));
        }
        with_deadline(self, step, self.api::<K>(ns).get_opt(name)).await
    }

    /// [`Context::get`] that trusts the cache's "not there" too: only for
    /// callers to whom a wrong "absent" is harmless (see [`cache`]).
    pub async fn get_cached<K: Object>(
        &self,
        ns: &str,
        step: &'static str,
        name: &str,
    ) -> Result<Option<K>, Error> {
        match self.cache.get::<K>(ns, name) {
            Some(known) => Ok(known),
            None => with_deadline(self, step, self.api::<K>(ns).get_opt(name)).await,
        }
    }

    /// Creates `obj` in namespace `ns` with the operator's field manager,
    /// within the step deadline (`step` names it in a timeout).
    pub async fn create<K: Object>(
        &self,
        ns: &str,
        step: &'static str,
        obj: &K,
    ) -> Result<K, Error> {
        let params = PostParams {
            field_manager: Some(crate::api::FIELD_MANAGER.into()),
            ..Default::default()
        };
        with_deadline(self, step, self.api::<K>(ns).create(&params, obj)).await
    }

    fn failures_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
        ObjectRef::from_obj(obj).to_string()
    }

    /// Records a failure of an object and returns how many in a row.
    fn record_failure<K: Resource<DynamicType = ()>>(&self, obj: &K) -> u32 {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(Self::failures_key(obj)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// Whether the stats of the object `uid` are due for a refresh:
    /// `stats_interval` passed since the last one. The first time an object
    /// is seen they are due only when its status has none (`has_stats`
    /// false): a restarted operator does not rewrite every status at once.
    /// Marks them refreshed when due.
    pub fn stats_due(&self, uid: &str, has_stats: bool) -> bool {
        let now = std::time::Instant::now();
        let mut m = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let due = match m.get(uid) {
            Some(last) => now.duration_since(*last) >= self.config.stats_interval,
            None => !has_stats,
        };
        if due || !m.contains_key(uid) {
            m.insert(uid.to_string(), now);
        }
        due
    }

    /// Forgets the failures of an object after a successful reconcile.
    fn record_success<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.remove(&Self::failures_key(obj));
    }
}

/// Errors of a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("building child objects: {0}")]
    Compute(#[from] crate::compute::ComputeError),
    #[error("serializing: {0}")]
    Json(#[from] serde_json::Error),
    #[error("postgres: {0}")]
    Sql(String),
    #[error("{step} did not finish within {secs}s")]
    Timeout { step: &'static str, secs: u64 },
    /// Something under way; look again shortly (not a failure).
    #[error("waiting: {0}")]
    Waiting(String),
    /// A failure that will not fix itself; already reported as Stalled.
    #[error("{reason}: {message}")]
    Stalled { reason: String, message: String },
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// Whether the same reconcile may succeed when retried.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Kube(e) => kube_retryable(e),
            Error::Storage(e) => e.is_retryable(),
            Error::Compute(_) | Error::Json(_) | Error::Stalled { .. } => false,
            Error::Sql(_) | Error::Timeout { .. } | Error::Waiting(_) => true,
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.is_retryable(),
                kube::runtime::finalizer::Error::AddFinalizer(e)
                | kube::runtime::finalizer::Error::RemoveFinalizer(e) => kube_retryable(e),
                _ => false,
            },
        }
    }

    /// A CamelCase reason for conditions and metrics.
    pub fn reason(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "Conflict".into(),
            Error::Kube(_) => "KubernetesApiError".into(),
            Error::Storage(e) => e.reason().into(),
            Error::Compute(_) => "InvalidObject".into(),
            Error::Json(_) => "SerializationError".into(),
            Error::Sql(_) => "PostgresError".into(),
            Error::Timeout { .. } => "Timeout".into(),
            Error::Waiting(_) => "Waiting".into(),
            Error::Stalled { reason, .. } => reason.clone(),
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.reason(),
                _ => "FinalizerError".into(),
            },
        }
    }

    pub fn stalled(reason: &str, message: impl Into<String>) -> Self {
        Error::Stalled {
            reason: reason.into(),
            message: message.into(),
        }
    }
}

fn kube_retryable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 409 || s.code == 429 || s.code >= 500,
        // Transport, TLS, timeouts: the API server may be back soon.
        _ => true,
    }
}

/// Runs `fut` with the configured deadline of an external step.
pub async fn with_deadline<T, E>(
    ctx: &Context,
    step: &'static str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, Error>
where
    Error: From<E>,
{
    match tokio::time::timeout(ctx.config.step_timeout, fut).await {
        Ok(r) => r.map_err(Error::from),
        Err(_) => Err(Error::Timeout {
            step,
            secs: ctx.config.step_timeout.as_secs(),
        }),
    }
}

/// Starts every controller, and the storage poller of the metrics, and runs
/// until `shutdown` resolves (then lets reconciles in flight finish).
pub async fn run(ctx: Arc<Context>, shutdown: impl Shutdown) {
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    // One watch and one cache of Branches for the Branch controller (its
    // trigger, and the wake-ups of parents and children) and the refresh
    // controller: at 10,000 Branches a second cache was a third of the
    // operator's memory.
    let branches = Shared::<crate::api::Branch>::new();
    let branch_controller = branch::run(ctx.clone(), shutdown.clone(), &branches);
    let refresh_controller = branch::refresh::run(ctx.clone(), shutdown.clone(), &branches);
    let feed = branches.feed(ctx.watched(), shutdown.clone());
    tokio::join!(
        feed,
        branch_controller,
        refresh_controller,
        snapshot::run(ctx.clone(), shutdown.clone()),
        restore::run(ctx.clone(), shutdown.clone()),
        schedule::run(ctx.clone(), shutdown.clone()),
        destination::run(ctx.clone(), shutdown.clone()),
        storage_poll::run(ctx, shutdown),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_errors_map_to_retry_or_terminal() {
        let busy = Error::Storage(StorageError::Busy {
            message: "x".into(),
        });
        assert!(busy.is_retryable());
        assert_eq!(busy.reason(), "Busy");
        let bad = Error::Storage(StorageError::invalid("bad"));
        assert!(!bad.is_retryable());
        assert!(!Error::stalled("ParentNotFound", "x").is_retryable());
        assert!(Error::Timeout { step: "s", secs: 1 }.is_retryable());
    }
}
