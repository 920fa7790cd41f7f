//! How every controller runs, written once: the watch of its kind (a cache
//! without `managedFields`), the resync ticks, graceful shutdown, the
//! reconcile span (kind, namespace, name), the bookkeeping around each
//! reconcile (duration, failures), the finalizer wrapper and the shared
//! error policy.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::{reflector, watcher, Controller, WatchStreamExt};
use kube::{Api, Resource, ResourceExt};
use tracing::Instrument;

use super::{Config, Context, Error, Object};

/// The kube-runtime settings every controller runs with.
pub fn controller_config(config: &Config) -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(config.concurrency)
}

/// A controller of every `K` `api` lists, run with [`controller_config`].
/// Its cache keeps the objects without `metadata.managedFields`: nothing
/// reads them from the cache, and they are most of a cached object's
/// memory (a Branch's status alone is a tree of a dozen maps there), which
/// at 10,000 Branches is most of the operator's.
pub fn controller_for<K>(api: kube::Api<K>, config: &Config) -> Controller<K>
where
    K: Object,
{
    let (reader, writer) = reflector::store();
    let trigger = watcher(api, watcher::Config::default())
        .modify(|o: &mut K| o.meta_mut().managed_fields = None)
        .reflect(writer)
        .applied_objects();
    Controller::for_stream(trigger, reader).with_config(controller_config(config))
}

/// One watch and one cache of `K` for several controllers: the store every
/// one of them reads, and a trigger for each (`ReflectHandle`s of one
/// shared reflector). [`Shared::feed`] drives the watch; it must run for
/// any of them to see a change.
pub struct Shared<K: Object> {
    pub store: reflector::Store<K>,
    writer: reflector::store::Writer<K>,
}

/// How many changes the shared watch holds for a trigger that lags.
const SHARED_BUFFER: usize = 1024;

impl<K: Object> Shared<K> {
    pub fn new() -> Self {
        let (store, writer) = reflector::store_shared(SHARED_BUFFER);
        Self { store, writer }
    }

    /// A trigger: every object the watch applies, from now on.
    pub fn subscribe(&self) -> impl futures::Stream<Item = Arc<K>> + Send + 'static {
        // `None` only for a store made without `store_shared`: not this one.
        self.writer
            .subscribe()
            .map(StreamExt::boxed)
            .unwrap_or_else(|| futures::stream::empty().boxed())
    }

    /// Runs the watch of `api` (objects kept without `managedFields`) until
    /// `shutdown` resolves.
    pub async fn feed(self, api: kube::Api<K>, shutdown: impl Future<Output = ()>) {
        let watch = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|o: &mut K| o.meta_mut().managed_fields = None)
            .reflect_shared(self.writer)
            .for_each(|ev| async move {
                if let Err(e) = ev {
                    tracing::warn!(kind = %K::kind(&()), error = %e, "watch failed; retrying");
                }
            });
        tokio::select! {
            () = watch => {}
            () = shutdown => {}
        }
    }
}

impl<K: Object> Default for Shared<K> {
    fn default() -> Self {
        Self::new()
    }
}

/// A controller of `K` on a [`Shared`] watch, run with [`controller_config`].
pub fn controller_for_shared<K: Object>(shared: &Shared<K>, config: &Config) -> Controller<K> {
    Controller::for_shared_stream(shared.subscribe(), shared.store.clone())
        .with_config(controller_config(config))
}

/// What a controller runs until: a future that resolves at shutdown.
pub trait Shutdown: Future<Output = ()> + Send + Sync + 'static {}
impl<F: Future<Output = ()> + Send + Sync + 'static> Shutdown for F {}

/// How [`drive`] runs a controller.
#[derive(Debug, Clone, Copy)]
pub struct Drive {
    /// The kind reconciled: the reconcile span's `kind`, the metrics'.
    pub kind: &'static str,
    /// The controller's name in the span and logs (`branch`, `refresh`...).
    pub controller: &'static str,
    /// Whether this is the kind's own controller: every object is then
    /// reconciled again each [`Config::resync_interval`] and each reconcile's
    /// duration is recorded under the kind. A second controller of the same
    /// kind (the Branch refresh) does neither.
    pub primary: bool,
}

impl Drive {
    /// The kind's own controller, named `controller`.
    pub fn of(kind: &'static str, controller: &'static str) -> Self {
        Drive {
            kind,
            controller,
            primary: true,
        }
    }
}

/// The UID of an object, which a stored object always has (one without is
/// Stalled `InvalidObject`).
pub fn uid_of<K: Resource<DynamicType = ()>>(obj: &K) -> Result<String, Error> {
    obj.uid()
        .ok_or_else(|| Error::stalled("InvalidObject", format!("the {} has no UID", K::kind(&()))))
}

/// Runs `controller` (its watches already set up) until `shutdown`
/// resolves: each reconcile in a span naming the object, its duration
/// recorded, its failures forgotten once it succeeds; errors go through
/// [`error_policy`]; the controller stops cleanly even when its kind could
/// never be listed ([`until_stopped`]).
pub async fn drive<K, R, Fut>(
    controller: Controller<K>,
    ctx: Arc<Context>,
    shutdown: impl Shutdown,
    how: Drive,
    mut reconcile: R,
) where
    K: Object,
    R: FnMut(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let mut controller = controller.graceful_shutdown_on(shutdown.clone());
    if let (true, Some(every)) = (how.primary, ctx.config.resync_interval) {
        let ticks = futures::stream::unfold((), move |()| async move {
            tokio::time::sleep(every).await;
            Some(((), ()))
        });
        controller = controller.reconcile_all_on(ticks);
    }
    let store = controller.store();
    if how.primary {
        // The fleet gauges (objects by phase, Stalled objects) read this cache.
        ctx.metrics.track(store.clone());
    }
    let reconcile = move |obj: Arc<K>, ctx: Arc<Context>| {
        let span = tracing::info_span!(
            "reconcile",
            controller = how.controller,
            kind = how.kind,
            namespace = %obj.namespace().unwrap_or_default(),
            name = %obj.name_any(),
        );
        let started = Instant::now();
        let fut = reconcile(obj.clone(), ctx.clone());
        async move {
            let res = fut.await;
            if how.primary {
                ctx.metrics.reconciled(how.kind, started.elapsed());
            }
            if res.is_ok() {
                ctx.record_success(obj.as_ref());
            }
            res
        }
        .instrument(span)
    };
    let running = controller
        .run(reconcile, error_policy::<K>, ctx)
        .for_each(move |res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(controller = how.controller, object = %obj, "reconciled"),
                Err(e) => tracing::debug!(controller = how.controller, error = %e, "reconcile did not complete"),
            }
        });
    until_stopped(how.kind, store, shutdown, running).await;
}

/// Runs `reconcile` under the finalizer `name` of `obj` (kube-runtime's
/// helper: the finalizer is added first, `Cleanup` runs once the object
/// is being deleted, the finalizer goes when it succeeds).
pub async fn with_finalizer<K, F, Fut>(
    ctx: &Context,
    name: &str,
    obj: Arc<K>,
    reconcile: F,
) -> Result<Action, Error>
where
    K: Object,
    F: FnOnce(FinalizerEvent<K>) -> Fut,
    Fut: Future<Output = Result<Action, Error>>,
{
    let api: Api<K> = ctx.api(&obj.namespace().unwrap_or_default());
    finalizer_result(finalizer(&api, name, obj, reconcile).await)
}

/// The result of kube-runtime's finalizer helper as a reconcile result. An
/// object that is gone by the time its finalizer is removed (its deletion
/// raced with ours, as for a restore's restored branch) is done, not an
/// error.
pub fn finalizer_result(
    res: Result<Action, kube::runtime::finalizer::Error<Error>>,
) -> Result<Action, Error> {
    match res {
        Err(kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(s)))
            if s.code == 404 =>
        {
            tracing::debug!("the object was gone before its finalizer was removed");
            Ok(Action::await_change())
        }
        r => r.map_err(|e| Error::Finalizer(Box::new(e))),
    }
}

/// Backoff after `n` consecutive failures: 1 s doubling to 5 min.
pub fn backoff(n: u32) -> Duration {
    let secs = 1u64 << n.saturating_sub(1).min(9);
    Duration::from_secs(secs.min(300))
}

/// The error policy shared by the controllers: short fixed polls while
/// waiting, exponential backoff for retryable errors, a long requeue for
/// terminal ones (they are reported as Stalled and re-checked on change).
pub fn error_policy<K>(obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    let kind = K::kind(&()).to_string();
    if let Error::Waiting(what) = err {
        tracing::debug!(object = %obj.name_any(), %what, "waiting");
        return Action::requeue(ctx.config.poll_interval);
    }
    ctx.metrics.error(&kind, &err.reason());
    if err.reason() == "Conflict" {
        // Our write raced with another writer (the restore writing a
        // branch's timeline, the status of a fresh object): not a failure,
        // re-read and go on at once. Backing off here kept a branch
        // un-Ready for half a minute after a finalize.
        tracing::debug!(kind, object = %obj.name_any(), error = %err, "conflict, re-reading");
        return Action::requeue(Duration::from_millis(200));
    }
    let n = ctx.record_failure(obj.as_ref());
    if err.is_retryable() {
        tracing::warn!(kind, object = %obj.name_any(), error = %err, attempt = n, "reconcile failed, retrying");
        Action::requeue(backoff(n))
    } else {
        tracing::error!(kind, object = %obj.name_any(), error = %err, "reconcile failed");
        Action::requeue(Duration::from_secs(300).max(backoff(n)))
    }
}

/// Awaits a controller's run (`running`: its stream driven to the end),
/// but once `shutdown` has fired, returns at once if the controller's
/// store was never filled — its kind could not be listed (its CRD is not
/// installed, or RBAC forbids it). kube-runtime holds a controller's runner
/// until its store is ready, so such a controller would never finish its
/// graceful shutdown (the operator would hang on SIGTERM); with nothing ever
/// listed, no reconcile can be in flight.
pub async fn until_stopped<K>(
    kind: &'static str,
    store: kube::runtime::reflector::Store<K>,
    shutdown: impl Future<Output = ()>,
    running: impl Future<Output = ()>,
) where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let never_listed = async {
        shutdown.await;
        if futures::FutureExt::now_or_never(store.wait_until_ready()).is_none() {
            tracing::warn!(
                kind,
                "stopping a controller whose kind was never listed (is its CRD installed?)"
            );
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = running => {}
        () = never_listed => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(40), Duration::from_secs(300));
    }
}
