//! Reads of the objects a branch owns, served from the operator's watch
//! caches instead of the API server.
//!
//! The Branch controller watches the Deployments, Services, Secrets and
//! compute Pods that carry [`LABEL_BRANCH`]; those
//! watches feed one `kube_runtime` reflector store per kind, kept here, and
//! [`Context::get`] and [`Context::list`] answer from them once the store
//! holds its first full list. Without this, every reconcile read each of
//! its objects from the API server again: ~23 requests per branch while
//! thousands are created, and lists whose cost grows with the namespace
//! (a fleet of 10,000 branches never became Ready; see the README's scale
//! table).
//!
//! A watch cache lags the API server by a few milliseconds, so the rules
//! are:
//! - a **hit** is trusted: an object we find existed a moment ago, and if
//!   its content is older than the live one the worst outcome is one
//!   redundant, idempotent server-side apply;
//! - a **miss** of [`Context::get`] is confirmed by a live GET, because
//!   callers act on absence (a missing credentials Secret means a new
//!   password: a stale miss must never overwrite one), and because objects
//!   without our label (a hand-made Service in the way) are not cached;
//! - a miss of [`Context::get_cached`] is trusted: only for callers whose
//!   action on absence is harmless when wrong (deleting what is already
//!   gone — if the object does appear, its watch event wakes the owner);
//! - a list is served from the cache when its selector is a conjunction of
//!   `key=value` terms: a cached list may lack an object created a moment
//!   ago, which only delays a clean-up to the next reconcile (that
//!   object's own watch event).
//!
//! Lists by branch use an index from (namespace, branch) to object names,
//! so a reconcile's list costs its own objects, not the fleet's.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use futures::{FutureExt, Stream, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};

use super::Object;
use crate::api::LABEL_BRANCH;

/// (namespace, branch) → names of the objects labelled with that branch.
type Index = HashMap<(String, String), BTreeSet<String>>;

/// The objects of one kind the operator watches, by branch.
struct Kind<K: Object> {
    /// The store the current watch fills (a new one for each watch, so a
    /// stopped and restarted controller never serves the old one's state).
    store: Mutex<Store<K>>,
    /// (namespace, branch) → names ever seen with that branch label. A
    /// superset (entries of objects that vanished while the watch was
    /// down stay until seen deleted); every name is checked in the store.
    index: Arc<Mutex<Index>>,
}

impl<K: Object> Kind<K> {
    fn new() -> Self {
        // Never ready until a watch replaces it.
        let (store, _writer) = reflector::store();
        Self {
            store: Mutex::new(store),
            index: Default::default(),
        }
    }
}

/// The watch caches of the kinds a branch owns (see the module doc).
pub struct Cache {
    kinds: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    /// The namespace the watches cover (`None`: every namespace).
    namespace: Option<String>,
}

impl Cache {
    /// Empty caches for Deployments, Services, Secrets and Pods of the
    /// namespace `namespace` (every one when `None`); nothing is served
    /// until [`Cache::watch`] fills them. (EndpointSlices are watched but
    /// not cached: the switch that reads them reads live.)
    pub fn new(namespace: Option<String>) -> Self {
        let mut kinds: HashMap<TypeId, Box<dyn Any + Send + Sync>> = HashMap::new();
        fn add<K: Object>(m: &mut HashMap<TypeId, Box<dyn Any + Send + Sync>>) {
            m.insert(TypeId::of::<K>(), Box::new(Kind::<K>::new()));
        }
        add::<Deployment>(&mut kinds);
        add::<Service>(&mut kinds);
        add::<Secret>(&mut kinds);
        add::<Pod>(&mut kinds);
        Self { kinds, namespace }
    }

    fn kind<K: Object>(&self) -> Option<&Kind<K>> {
        self.kinds
            .get(&TypeId::of::<K>())
            .and_then(|k| k.downcast_ref::<Kind<K>>())
    }

    /// The watch of the `K` objects labelled with a branch in `api`,
    /// filling this cache (from now on, a fresh store) as it is polled.
    /// Its items are what `Controller::owns_stream` and `watches_stream`
    /// take. `None` for a kind that is not cached.
    pub fn watch<K: Object>(
        &self,
        api: Api<K>,
    ) -> Option<impl Stream<Item = Result<K, watcher::Error>> + Send + 'static> {
        let kind = self.kind::<K>()?;
        let (store, writer) = reflector::store();
        *kind.store.lock().unwrap_or_else(|p| p.into_inner()) = store;
        let index = kind.index.clone();
        index.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let config = watcher::Config::default().labels(LABEL_BRANCH);
        Some(
            watcher(api, config)
                .modify(|o: &mut K| o.meta_mut().managed_fields = None)
                .inspect_ok(move |ev| index_event(&index, ev))
                .reflect(writer)
                .applied_objects(),
        )
    }

    /// Fills the cache of `K` as a first full list of `objs` would.
    #[cfg(test)]
    fn fill<K: Object>(&self, objs: Vec<K>) {
        let kind = self.kind::<K>().expect("a cached kind");
        let (store, mut writer) = reflector::store();
        let mut events = vec![watcher::Event::Init];
        events.extend(objs.into_iter().map(watcher::Event::InitApply));
        events.push(watcher::Event::InitDone);
        for ev in &events {
            index_event(&kind.index, ev);
            writer.apply_watcher_event(ev);
        }
        *kind.store.lock().expect("lock") = store;
        // The store stays ready (and stale) without its writer.
        drop(writer);
    }

    /// The store of `K` when it answers for namespace `ns`: the kind is
    /// cached, its watch covers `ns` and has listed everything once.
    fn ready<K: Object>(&self, ns: &str) -> Option<(&Kind<K>, Store<K>)> {
        if self.namespace.as_deref().is_some_and(|n| n != ns) {
            return None;
        }
        let kind = self.kind::<K>()?;
        let store = kind.store.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match store.wait_until_ready().now_or_never() {
            Some(Ok(())) => Some((kind, store)),
            _ => None,
        }
    }

    /// What the cache knows of the `K` named `name` in `ns`: `None` when it
    /// cannot answer, `Some(None)` when it holds no such object.
    pub fn get<K: Object>(&self, ns: &str, name: &str) -> Option<Option<K>> {
        let (_, store) = self.ready::<K>(ns)?;
        let key = ObjectRef::<K>::new(name).within(ns);
        Some(store.get(&key).map(|o| (*o).clone()))
    }

    /// The cached `K` objects of `ns` matching `selector` (`key=value`
    /// terms joined by commas); `None` when the cache cannot answer (kind
    /// not cached or not ready, or another kind of selector).
    pub fn list<K: Object>(&self, ns: &str, selector: &str) -> Option<Vec<K>> {
        let terms = equality_terms(selector)?;
        let (kind, store) = self.ready::<K>(ns)?;
        let matches = |o: &K| {
            o.namespace().as_deref() == Some(ns)
                && terms
                    .iter()
                    .all(|(k, v)| o.labels().get(k.as_str()) == Some(v))
        };
        let out = match terms.get(LABEL_BRANCH) {
            Some(branch) => {
                let names: Vec<String> = kind
                    .index
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&(ns.to_string(), branch.clone()))
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default();
                names
                    .iter()
                    .filter_map(|n| store.get(&ObjectRef::<K>::new(n).within(ns)))
                    .filter(|o| matches(o))
                    .map(|o| (*o).clone())
                    .collect()
            }
            None => store
                .state()
                .into_iter()
                .filter(|o| matches(o))
                .map(|o| (*o).clone())
                .collect(),
        };
        Some(out)
    }
}

/// Keeps the by-branch index of a kind up to date with one watch event.
fn index_event<K: Object>(index: &Mutex<Index>, ev: &watcher::Event<K>) {
    let (obj, add) = match ev {
        watcher::Event::Apply(o) | watcher::Event::InitApply(o) => (o, true),
        watcher::Event::Delete(o) => (o, false),
        watcher::Event::Init | watcher::Event::InitDone => return,
    };
    let (Some(ns), Some(branch)) = (obj.namespace(), obj.labels().get(LABEL_BRANCH).cloned())
    else {
        return;
    };
    let mut index = index.lock().unwrap_or_else(|p| p.into_inner());
    let key = (ns, branch);
    if add {
        index.entry(key).or_default().insert(obj.name_any());
    } else if let Some(names) = index.get_mut(&key) {
        names.remove(&obj.name_any());
        if names.is_empty() {
            index.remove(&key);
        }
    }
}

/// `a=b,c=d` as a map; `None` for anything else (set-based terms,
/// inequalities, existence), which the cache does not answer.
fn equality_terms(selector: &str) -> Option<BTreeMap<String, String>> {
    let mut terms = BTreeMap::new();
    for term in selector.split(',').filter(|t| !t.trim().is_empty()) {
        let (k, v) = term.split_once('=')?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || k.ends_with('!') || v.starts_with('=') || k.contains(' ') {
            return None;
        }
        terms.insert(k.to_string(), v.to_string());
    }
    Some(terms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn secret(name: &str, branch: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some(
                    [(LABEL_BRANCH.to_string(), branch.to_string())]
                        .into_iter()
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn selectors_the_cache_answers() {
        let t = equality_terms("a=b, c=d").expect("equality terms");
        assert_eq!(t.get("a").map(String::as_str), Some("b"));
        assert_eq!(t.get("c").map(String::as_str), Some("d"));
        assert_eq!(equality_terms(""), Some(BTreeMap::new()));
        for other in ["a!=b", "a==b", "a in (b)", "a", "!a"] {
            assert_eq!(equality_terms(other), None, "{other}");
        }
    }

    #[test]
    fn the_index_follows_applies_and_deletes() {
        let index = Mutex::new(HashMap::new());
        index_event(&index, &watcher::Event::Apply(secret("a-app", "a")));
        index_event(&index, &watcher::Event::InitApply(secret("a-su", "a")));
        index_event(&index, &watcher::Event::Apply(secret("b-app", "b")));
        let key = |b: &str| ("ns".to_string(), b.to_string());
        {
            let m = index.lock().expect("lock");
            assert_eq!(m[&key("a")].len(), 2);
            assert_eq!(m[&key("b")].len(), 1);
        }
        index_event(&index, &watcher::Event::Delete(secret("b-app", "b")));
        index_event(&index, &watcher::Event::Delete(secret("a-su", "a")));
        let m = index.lock().expect("lock");
        assert!(
            !m.contains_key(&key("b")),
            "an emptied branch leaves the index"
        );
        assert_eq!(m[&key("a")].iter().collect::<Vec<_>>(), vec!["a-app"]);
    }

    #[test]
    fn a_filled_cache_answers_gets_and_lists() {
        let cache = Cache::new(Some("ns".into()));
        let mut other = secret("a-x", "a");
        other
            .metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert("role".into(), "x".into());
        cache.fill(vec![secret("a-app", "a"), other, secret("b-app", "b")]);
        let hit = cache.get::<Secret>("ns", "a-app").expect("answers");
        assert_eq!(hit.map(|s| s.name_any()).as_deref(), Some("a-app"));
        assert!(
            matches!(cache.get::<Secret>("ns", "gone"), Some(None)),
            "a miss is an answer"
        );
        let names = |v: Vec<Secret>| v.iter().map(|s| s.name_any()).collect::<Vec<_>>();
        let of_a = cache.list::<Secret>("ns", &format!("{LABEL_BRANCH}=a"));
        assert_eq!(of_a.map(names), Some(vec!["a-app".into(), "a-x".into()]));
        let x = cache.list::<Secret>("ns", &format!("{LABEL_BRANCH}=a,role=x"));
        assert_eq!(x.map(names), Some(vec!["a-x".to_string()]));
        let role = cache.list::<Secret>("ns", "role=x");
        assert_eq!(role.map(names), Some(vec!["a-x".to_string()]));
        assert!(cache.list::<Secret>("ns", "role!=x").is_none());
        assert!(
            cache.get::<Service>("ns", "a").is_none(),
            "a kind not yet listed is not answered"
        );
    }

    #[test]
    fn nothing_is_served_before_the_first_list() {
        let cache = Cache::new(None);
        assert!(cache.get::<Secret>("ns", "a-app").is_none());
        assert!(cache.list::<Secret>("ns", "x=y").is_none());
        let scoped = Cache::new(Some("ns".into()));
        assert!(scoped.get::<Secret>("other", "a").is_none());
    }
}
