//! Shared support of the tier-5 end-to-end tests (`tests/e2e_*.rs`): a
//! kube client from `PGBRANCH_E2E_KUBECONFIG`, a namespace per test that is
//! deleted at the end (also on panic), `kubectl wait`-like polling on
//! conditions, and SQL through a branch's Service by a short-lived `psql`
//! Pod that reads the branch's Secret.
//!
//! Without `PGBRANCH_E2E_KUBECONFIG` every test prints
//! `skipped: PGBRANCH_E2E_KUBECONFIG not set` and passes. See docs/e2e.md.

// Each e2e test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::Status;
use kube::{Api, Client, Resource, ResourceExt};
use pgbranch::api::{
    Branch, BranchSpec, ParentRef, RestorePhase, Snapshot, SnapshotRestore, SnapshotSchedule,
    SnapshotSpec,
};
use pgbranch::storage::http::client::HttpStorage;
use pgbranch::storage::Storage;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

/// The variable that turns tier 5 on.
pub const KUBECONFIG_VAR: &str = "PGBRANCH_E2E_KUBECONFIG";
/// Label on every namespace the tests create (to find leftovers).
pub const NAMESPACE_LABEL: &str = "pgbranch.dev/e2e";
/// How often waits poll.
const POLL: Duration = Duration::from_secs(1);

/// The cluster the tests run on.
#[derive(Clone)]
pub struct Env {
    pub client: Client,
    pub kubeconfig: PathBuf,
    /// Image of the `psql` Pods (the operator's compute image by default).
    pub psql_image: String,
    /// Upper bound of each wait.
    pub timeout: Duration,
    /// Keep a failed test's namespace for inspection.
    pub keep_failed: bool,
    /// The namespace pgbranch is installed in.
    pub operator_namespace: String,
    /// `PGBRANCH_E2E_CLAIM_HOST_PATH`: pgbranch mounts a claim in each
    /// branch's namespace (config/default); each test namespace gets one,
    /// bound to a hostPath PersistentVolume on this directory.
    pub claim_host_path: Option<String>,
    /// `PGBRANCH_E2E_CHECK_STORAGE=1`: the storage Service's ClusterIP is
    /// reachable from here (the k8s-node kit); every test then checks that
    /// no timeline or snapshot of its namespace is left in storage.
    pub check_storage: bool,
}

/// The e2e environment, or `None` (after printing the skip notice) when
/// `PGBRANCH_E2E_KUBECONFIG` is not set. A set variable that does not lead
/// to a cluster with pgbranch installed fails the test: that is a broken
/// run, not a skipped one.
pub async fn env(test: &str) -> Option<Env> {
    let Some(path) = std::env::var_os(KUBECONFIG_VAR).filter(|v| !v.is_empty()) else {
        eprintln!("{test}: skipped: {KUBECONFIG_VAR} not set");
        return None;
    };
    // kube and reqwest both compile in a rustls provider; pick one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = PathBuf::from(path);
    let client = client_from(&kubeconfig).await;
    let timeout = Duration::from_secs(
        std::env::var("PGBRANCH_E2E_TIMEOUT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300),
    );
    // pgbranch must be installed: the CRDs are served.
    let branches: Api<Branch> = Api::all(client.clone());
    if let Err(e) = branches.list(&ListParams::default().limit(1)).await {
        panic!(
            "{KUBECONFIG_VAR}={} but listing Branches failed ({e}): is pgbranch installed? (scripts/e2e.sh up)",
            kubeconfig.display()
        );
    }
    let psql_image = match std::env::var("PGBRANCH_E2E_PSQL_IMAGE") {
        Ok(i) if !i.is_empty() => i,
        _ => operator_compute_image(&client)
            .await
            .unwrap_or_else(|| "postgres:15".to_string()),
    };
    let keep_failed = std::env::var("PGBRANCH_E2E_KEEP_NAMESPACES").is_ok_and(|v| v == "1");
    let claim_host_path = std::env::var("PGBRANCH_E2E_CLAIM_HOST_PATH")
        .ok()
        .filter(|v| !v.is_empty());
    let check_storage = std::env::var("PGBRANCH_E2E_CHECK_STORAGE").is_ok_and(|v| v == "1");
    eprintln!(
        "{test}: e2e on {} (psql image {psql_image}, waits up to {timeout:?})",
        kubeconfig.display()
    );
    Some(Env {
        client,
        kubeconfig,
        psql_image,
        timeout,
        keep_failed,
        operator_namespace: operator_namespace(),
        claim_host_path,
        check_storage,
    })
}

/// `PGBRANCH_E2E_OPERATOR_NAMESPACE`, default `pgbranch-system`.
pub fn operator_namespace() -> String {
    std::env::var("PGBRANCH_E2E_OPERATOR_NAMESPACE")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "pgbranch-system".to_string())
}

async fn client_from(path: &Path) -> Client {
    let kc = Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("reading kubeconfig {}: {e}", path.display()));
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", path.display()));
    Client::try_from(config).expect("kube client")
}

/// The `--compute-image=` the installed operator runs with.
async fn operator_compute_image(client: &Client) -> Option<String> {
    operator_arg(client, "--compute-image=").await
}

/// The value of an `--flag=` argument of the installed operator.
pub async fn operator_arg(client: &Client, prefix: &str) -> Option<String> {
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &operator_namespace());
    let list = deploys
        .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await
        .ok()?;
    list.items
        .iter()
        .filter_map(|d| d.spec.as_ref())
        .flat_map(|s| s.template.spec.iter())
        .flat_map(|p| p.containers.iter())
        .flat_map(|c| c.args.iter().flatten())
        .find_map(|a| a.strip_prefix(prefix).map(str::to_string))
}

// ---------------------------------------------------------------------------
// A namespace per test.

/// A fresh namespace, deleted when the test ends. `delete_and_wait` at the
/// end of a passing test deletes it and checks everything in it goes away
/// (the operator's finalizers finish); on a panic, `Drop` starts the
/// deletion without waiting (or keeps it with PGBRANCH_E2E_KEEP_NAMESPACES=1).
pub struct TestNamespace {
    pub name: String,
    kubeconfig: PathBuf,
    keep_failed: bool,
    done: bool,
    /// The hostPath PersistentVolume made for the namespace's claim.
    volume: Option<String>,
    /// When the test made it (the test's wall time is printed at the end).
    started: Instant,
}

impl TestNamespace {
    /// Creates `pgbranch-e2e-<prefix>-<random>`. Computes mount the storage
    /// volume by hostPath (single-node install), which only the
    /// `privileged` Pod Security level admits.
    pub async fn create(env: &Env, prefix: &str) -> Self {
        let started = Instant::now();
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
        let name = format!("pgbranch-e2e-{prefix}-{suffix}");
        let ns: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "labels": {
                    NAMESPACE_LABEL: "true",
                    "pod-security.kubernetes.io/enforce": "privileged",
                },
            },
        }))
        .expect("namespace object");
        Api::<Namespace>::all(env.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        // Pods are refused until the namespace's default ServiceAccount
        // exists (the ServiceAccount admission plugin); it comes a moment
        // after the namespace.
        let sas: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &name);
        let start = Instant::now();
        while sas.get_opt("default").await.ok().flatten().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "namespace {name}: no default ServiceAccount after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let volume = match &env.claim_host_path {
            Some(dir) => Some(storage_claim(env, &name, dir).await),
            None => None,
        };
        eprintln!("namespace {name}");
        Self {
            name,
            kubeconfig: env.kubeconfig.clone(),
            keep_failed: env.keep_failed,
            done: false,
            volume,
            started,
        }
    }

    /// Deletes the namespace (unprotecting its protected Branches first:
    /// the admission policy refuses their deletion, also by a namespace
    /// deletion) and waits until it is gone. Fails the test, listing what
    /// is left, when something is stuck (e.g. a finalizer that never ends).
    pub async fn delete_and_wait(mut self, env: &Env) {
        self.done = true;
        delete_namespace(&env.client, &self.name).await;
        let nss: Api<Namespace> = Api::all(env.client.clone());
        let start = Instant::now();
        while nss
            .get_opt(&self.name)
            .await
            .expect("get namespace")
            .is_some()
        {
            if start.elapsed() > env.timeout {
                let left = describe_namespace(env, &self.name).await;
                panic!(
                    "namespace {} not gone after {:?}; left:\n{left}",
                    self.name, env.timeout
                );
            }
            tokio::time::sleep(POLL).await;
        }
        eprintln!(
            "namespace {} deleted; the test took {:.0} s",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
        if let Some(pv) = &self.volume {
            delete_volume(&env.client, pv).await;
        }
        // Nothing of the namespace is left in storage: every timeline and
        // snapshot went with its Branch or Snapshot.
        if let Some(storage) = storage(env).await {
            let left = stored_in(&storage, &self.name).await;
            assert!(
                left.is_empty(),
                "orphans in storage after namespace {} was deleted: {left:?}",
                self.name
            );
            eprintln!("storage: no timeline or snapshot of {} left", self.name);
        }
    }
}

/// A hostPath PersistentVolume on `dir` and the claim the operator's
/// `--volume-pvc` names, bound to it, in namespace `ns` (config/default
/// mounts the storage volume in each branch's namespace by that claim).
/// Returns the volume's name.
async fn storage_claim(env: &Env, ns: &str, dir: &str) -> String {
    let claim = operator_arg(&env.client, "--volume-pvc=")
        .await
        .unwrap_or_else(|| {
            panic!("PGBRANCH_E2E_CLAIM_HOST_PATH is set but the operator has no --volume-pvc")
        });
    let pv_name = format!("pgbranch-e2e-{ns}");
    let pv: k8s_openapi::api::core::v1::PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv_name, "labels": {NAMESPACE_LABEL: "true"}},
        "spec": {
            "capacity": {"storage": "50Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "claimRef": {"namespace": ns, "name": claim},
            "hostPath": {"path": dir, "type": "Directory"},
        },
    }))
    .expect("volume object");
    Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(env.client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .unwrap_or_else(|e| panic!("create volume {pv_name}: {e}"));
    let pvc: k8s_openapi::api::core::v1::PersistentVolumeClaim = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "",
            "volumeName": pv_name,
            "resources": {"requests": {"storage": "50Gi"}},
        },
    }))
    .expect("claim object");
    create(env, ns, pvc).await;
    eprintln!("namespace {ns}: claim {claim} on volume {pv_name} ({dir})");
    pv_name
}

async fn delete_volume(client: &Client, name: &str) {
    let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(client.clone());
    match pvs.delete(name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.is_not_found() => {}
        Err(e) => eprintln!("deleting volume {name}: {e}"),
    }
}

/// A client of the installed storage service, when
/// `PGBRANCH_E2E_CHECK_STORAGE=1` (its ClusterIP is reachable from here):
/// the Service the operator's `--storage=` URL names, with the token of
/// the operator's storage-token Secret.
pub async fn storage(env: &Env) -> Option<HttpStorage> {
    if !env.check_storage {
        return None;
    }
    let url = operator_arg(&env.client, "--storage=")
        .await
        .expect("the operator's --storage= argument");
    let rest = url.strip_prefix("http://").expect("--storage is http://");
    let (host, port) = rest.split_once(':').expect("--storage=http://host:port");
    let port = port.trim_end_matches('/');
    let mut parts = host.split('.');
    let (svc_name, svc_ns) = (
        parts.next().expect("service name"),
        parts.next().unwrap_or("default"),
    );
    let svc = Api::<Service>::namespaced(env.client.clone(), svc_ns)
        .get(svc_name)
        .await
        .unwrap_or_else(|e| panic!("storage Service {svc_ns}/{svc_name}: {e}"));
    let ip = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("the storage Service has a ClusterIP");
    let deploys: Api<Deployment> = Api::namespaced(env.client.clone(), &env.operator_namespace);
    let secret_name = deploys
        .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await
        .expect("list operator Deployments")
        .items
        .iter()
        .filter_map(|d| d.spec.as_ref())
        .flat_map(|s| s.template.spec.iter())
        .flat_map(|p| p.volumes.iter().flatten())
        .find(|v| v.name == "storage-token")
        .and_then(|v| v.secret.as_ref())
        .and_then(|s| s.secret_name.clone())
        .expect("the operator mounts a storage-token Secret");
    let token = secret_data(env, &env.operator_namespace, &secret_name).await["token"]
        .trim()
        .to_string();
    Some(
        HttpStorage::with_timeout(
            &format!("http://{ip}:{port}"),
            Some(token),
            Duration::from_secs(10),
        )
        .expect("storage client"),
    )
}

/// Labels (`<namespace>/<name>`) of the timelines and snapshots storage
/// holds for namespace `ns`.
pub async fn stored_in(storage: &HttpStorage, ns: &str) -> Vec<String> {
    let prefix = format!("{ns}/");
    let timelines = storage.list_timelines().await.expect("list timelines");
    let snapshots = storage.list_snapshots().await.expect("list snapshots");
    timelines
        .iter()
        .filter_map(|t| t.label.as_deref())
        .filter(|l| l.starts_with(&prefix))
        .map(|l| format!("timeline {l}"))
        .chain(
            snapshots
                .iter()
                .filter_map(|s| s.label.as_deref())
                .filter(|l| l.starts_with(&prefix))
                .map(|l| format!("snapshot {l}")),
        )
        .collect()
}

/// Timelines storage holds for `ns` that no Branch of `ns` has as its
/// `status.timelineId` (ids with their labels).
pub async fn orphan_timelines(env: &Env, storage: &HttpStorage, ns: &str) -> Vec<String> {
    let prefix = format!("{ns}/");
    let branches: Api<Branch> = Api::namespaced(env.client.clone(), ns);
    let used: Vec<String> = branches
        .list(&ListParams::default())
        .await
        .expect("list branches")
        .items
        .iter()
        .filter_map(|b| b.status.as_ref().and_then(|s| s.timeline_id.clone()))
        .collect();
    storage
        .list_timelines()
        .await
        .expect("list timelines")
        .iter()
        .filter(|t| t.label.as_deref().is_some_and(|l| l.starts_with(&prefix)))
        .filter(|t| !used.contains(&t.id.to_string()))
        .map(|t| format!("{} ({})", t.id, t.label.clone().unwrap_or_default()))
        .collect()
}

async fn delete_namespace(client: &Client, name: &str) {
    let branches: Api<Branch> = Api::namespaced(client.clone(), name);
    if let Ok(list) = branches.list(&ListParams::default()).await {
        for b in list.items.iter().filter(|b| b.spec.protected) {
            let _ = branches
                .patch(
                    &b.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"protected": false}})),
                )
                .await;
        }
    }
    let nss: Api<Namespace> = Api::all(client.clone());
    match nss.delete(name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.is_not_found() => {}
        Err(e) => eprintln!("deleting namespace {name}: {e}"),
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if std::thread::panicking() && self.keep_failed {
            eprintln!(
                "kept namespace {} (PGBRANCH_E2E_KEEP_NAMESPACES=1)",
                self.name
            );
            return;
        }
        // The test's runtime cannot make progress while we block in Drop:
        // use a thread with its own runtime and client.
        let name = self.name.clone();
        let kubeconfig = self.kubeconfig.clone();
        let volume = self.volume.clone();
        let worker = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let client = client_from(&kubeconfig).await;
                delete_namespace(&client, &name).await;
                eprintln!("namespace {name}: deletion started");
                // Released once the namespace (and its claim) is gone;
                // deleted now, it goes then (pv-protection finalizer).
                if let Some(pv) = volume {
                    delete_volume(&client, &pv).await;
                }
            });
        });
        let _ = worker.join();
    }
}

// ---------------------------------------------------------------------------
// Objects and conditions.

/// An object with its name and namespace set.
pub fn in_ns<K: Resource>(mut obj: K, ns: &str) -> K {
    obj.meta_mut().namespace = Some(ns.to_string());
    obj
}

/// Creates an object, failing the test with the API's answer if refused.
pub async fn create<K>(env: &Env, ns: &str, obj: K) -> K
where
    K: Resource<Scope = kube::core::NamespaceResourceScope> + Clone + Debug,
    K: Serialize + DeserializeOwned,
    K::DynamicType: Default,
{
    let name = obj.name_any();
    let api: Api<K> = Api::namespaced(env.client.clone(), ns);
    api.create(&PostParams::default(), &in_ns(obj, ns))
        .await
        .unwrap_or_else(|e| panic!("create {} {name}: {e}", K::kind(&Default::default())))
}

/// A merge patch of an object.
pub async fn merge_patch<K>(api: &Api<K>, name: &str, patch: Value) -> kube::Result<K>
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
}

/// The `status.conditions` of any of our kinds (read through JSON, so one
/// helper serves every kind).
pub fn conditions<K: Serialize>(obj: &K) -> Vec<Condition> {
    let v = serde_json::to_value(obj).expect("serialize");
    v.pointer("/status/conditions")
        .cloned()
        .map(|c| serde_json::from_value(c).expect("conditions in metav1.Condition shape"))
        .unwrap_or_default()
}

pub fn condition<K: Serialize>(obj: &K, type_: &str) -> Option<Condition> {
    conditions(obj).into_iter().find(|c| c.type_ == type_)
}

pub fn observed_generation<K: Serialize>(obj: &K) -> Option<i64> {
    serde_json::to_value(obj)
        .expect("serialize")
        .pointer("/status/observedGeneration")
        .and_then(Value::as_i64)
}

/// The health Argo CD, Flux and `kubectl wait` read: the status describes
/// the current generation and `Ready` is `True` (for that generation, when
/// the condition records one), and nothing is `Stalled`.
pub fn health<K: Resource + Serialize>(obj: &K) -> Result<(), String> {
    let gen = obj.meta().generation;
    let observed = observed_generation(obj);
    if gen.is_none() || observed != gen {
        return Err(format!(
            "status.observedGeneration {observed:?} != metadata.generation {gen:?}"
        ));
    }
    if let Some(stalled) = condition(obj, "Stalled").filter(|c| c.status == "True") {
        return Err(format!("Stalled: {}: {}", stalled.reason, stalled.message));
    }
    match condition(obj, "Ready") {
        None => Err("no Ready condition".into()),
        Some(c) if c.status != "True" => Err(format!(
            "Ready={} reason={} message={}",
            c.status, c.reason, c.message
        )),
        Some(c) if c.observed_generation.is_some() && c.observed_generation != gen => Err(format!(
            "Ready condition's observedGeneration {:?} != generation {gen:?}",
            c.observed_generation
        )),
        Some(_) => Ok(()),
    }
}

/// Polls `name` until `pred` holds (`kubectl wait` with a predicate).
/// Fails with the last seen status and the object's Events on timeout, or
/// early when the object stays `Stalled` for 30 s (a failure the operator
/// says will not fix itself).
pub async fn wait_for<K>(
    env: &Env,
    api: &Api<K>,
    name: &str,
    what: &str,
    pred: impl Fn(&K) -> bool,
) -> K
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    let start = Instant::now();
    let mut stalled_since: Option<Instant> = None;
    loop {
        let obj = api
            .get_opt(name)
            .await
            .unwrap_or_else(|e| panic!("get {name}: {e}"));
        if let Some(o) = &obj {
            if pred(o) {
                return o.clone();
            }
            let stalled = condition(o, "Stalled").is_some_and(|c| c.status == "True");
            stalled_since = match (stalled, stalled_since) {
                (true, None) => Some(Instant::now()),
                (true, s) => s,
                (false, _) => None,
            };
        }
        let stuck = stalled_since.is_some_and(|s| s.elapsed() > Duration::from_secs(30));
        if stuck || start.elapsed() > env.timeout {
            let ns = obj.as_ref().and_then(|o| o.namespace()).unwrap_or_default();
            let events = events_for(env, &ns, name).await;
            let status = obj.as_ref().map(|o| {
                serde_json::to_string_pretty(&serde_json::to_value(o).expect("serialize")["status"])
                    .expect("json")
            });
            panic!(
                "{name}: {what} not reached ({}, after {:?}); status: {}\nevents:\n{events}",
                if stuck { "Stalled for 30 s" } else { "timeout" },
                start.elapsed(),
                status.unwrap_or_else(|| "<object not found>".into()),
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `kubectl wait --for=condition=<type>=<status>`, for the current
/// generation.
pub async fn wait_for_condition<K>(
    env: &Env,
    api: &Api<K>,
    name: &str,
    type_: &str,
    status: &str,
) -> K
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    wait_for(env, api, name, &format!("{type_}={status}"), |o| {
        observed_generation(o) == o.meta().generation
            && condition(o, type_).is_some_and(|c| c.status == status)
    })
    .await
}

/// Waits until the object is Ready for its current generation.
pub async fn wait_ready<K>(env: &Env, api: &Api<K>, name: &str) -> K
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    wait_for(env, api, name, "Ready for its generation", |o| {
        health(o).is_ok()
    })
    .await
}

/// Waits until the object no longer exists.
pub async fn wait_gone<K>(env: &Env, api: &Api<K>, name: &str)
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    let start = Instant::now();
    loop {
        let obj = api.get_opt(name).await.expect("get");
        let Some(obj) = obj else { return };
        if start.elapsed() > env.timeout {
            let ns = obj.namespace().unwrap_or_default();
            panic!(
                "{name} still exists after {:?} (finalizers {:?}); status: {:?}\nevents:\n{}",
                env.timeout,
                obj.finalizers(),
                serde_json::to_value(&obj).expect("serialize")["status"],
                events_for(env, &ns, name).await
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until every Branch, Snapshot, SnapshotRestore and SnapshotSchedule
/// in the namespace is healthy (see [`health`]): the Argo CD / Flux view
/// of a finished sync.
pub async fn wait_namespace_healthy(env: &Env, ns: &str) {
    let start = Instant::now();
    loop {
        let problems = namespace_problems(env, ns).await;
        if problems.is_empty() {
            return;
        }
        if start.elapsed() > env.timeout {
            panic!(
                "objects in {ns} not healthy after {:?}:\n{}",
                env.timeout,
                problems.join("\n")
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn problems_of<K>(env: &Env, ns: &str, out: &mut Vec<String>)
where
    K: Resource<Scope = kube::core::NamespaceResourceScope> + Clone + Debug,
    K: Serialize + DeserializeOwned,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(env.client.clone(), ns);
    let kind = K::kind(&Default::default()).to_string();
    match api.list(&ListParams::default()).await {
        Ok(list) => {
            for o in &list.items {
                if let Err(e) = health(o) {
                    out.push(format!("{kind} {}: {e}", o.name_any()));
                }
            }
        }
        Err(e) => out.push(format!("list {kind}: {e}")),
    }
}

async fn namespace_problems(env: &Env, ns: &str) -> Vec<String> {
    let mut out = vec![];
    problems_of::<Branch>(env, ns, &mut out).await;
    problems_of::<Snapshot>(env, ns, &mut out).await;
    problems_of::<SnapshotRestore>(env, ns, &mut out).await;
    problems_of::<SnapshotSchedule>(env, ns, &mut out).await;
    out
}

/// The Events of an object, one line each: type, reason, message.
pub async fn event_lines(env: &Env, ns: &str, name: &str) -> kube::Result<Vec<String>> {
    let api: Api<Event> = Api::namespaced(env.client.clone(), ns);
    let lp = ListParams::default().fields(&format!("involvedObject.name={name}"));
    Ok(api
        .list(&lp)
        .await?
        .items
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e.type_.clone().unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
                e.message.clone().unwrap_or_default()
            )
        })
        .collect())
}

/// The Events of an object (for failure messages).
pub async fn events_for(env: &Env, ns: &str, name: &str) -> String {
    if ns.is_empty() {
        return String::new();
    }
    match event_lines(env, ns, name).await {
        Ok(lines) => lines
            .iter()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("  (events: {e})"),
    }
}

async fn describe_namespace(env: &Env, ns: &str) -> String {
    let mut out = vec![];
    let branches: Api<Branch> = Api::namespaced(env.client.clone(), ns);
    if let Ok(list) = branches.list(&ListParams::default()).await {
        for b in list.items {
            out.push(format!(
                "Branch {} finalizers {:?} conditions {:?}",
                b.name_any(),
                b.finalizers(),
                conditions(&b)
                    .iter()
                    .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
                    .collect::<Vec<_>>()
            ));
        }
    }
    for (kind, names) in [
        ("Snapshot", names_in::<Snapshot>(env, ns).await),
        (
            "SnapshotRestore",
            names_in::<SnapshotRestore>(env, ns).await,
        ),
        ("Pod", names_in::<Pod>(env, ns).await),
    ] {
        if !names.is_empty() {
            out.push(format!("{kind}: {names:?}"));
        }
    }
    out.join("\n")
}

async fn names_in<K>(env: &Env, ns: &str) -> Vec<String>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope> + Clone + Debug,
    K: DeserializeOwned,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(env.client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .map(|l| l.items.iter().map(|o| o.name_any()).collect())
        .unwrap_or_default()
}

/// The API's refusal of a request that must fail.
pub fn api_refusal<T: Debug>(res: kube::Result<T>, what: &str) -> Box<Status> {
    match res {
        Ok(v) => panic!("{what}: the API server accepted it: {v:?}"),
        Err(kube::Error::Api(s)) => s,
        Err(e) => panic!("{what}: failed, but not with an API status: {e}"),
    }
}

/// Asserts a request was refused with `code` and a message containing
/// `message`.
pub fn assert_refused<T: Debug>(res: kube::Result<T>, code: u16, message: &str, what: &str) {
    let s = api_refusal(res, what);
    assert_eq!(s.code, code, "{what}: status {s:?}");
    assert!(
        s.message.contains(message),
        "{what}: message {:?} does not contain {message:?}",
        s.message
    );
}

// ---------------------------------------------------------------------------
// Secrets, Services and SQL.

/// A Secret's data as strings.
pub async fn secret_data(env: &Env, ns: &str, name: &str) -> BTreeMap<String, String> {
    let api: Api<Secret> = Api::namespaced(env.client.clone(), ns);
    let s = api
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("secret {name}: {e}"));
    s.data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).expect("utf-8 secret value")))
        .collect()
}

/// The `pgbranch.dev/timeline` the Service selects.
pub async fn service_timeline(env: &Env, ns: &str, name: &str) -> Option<String> {
    let api: Api<Service> = Api::namespaced(env.client.clone(), ns);
    let svc = api
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("service {name}: {e}"));
    svc.spec?
        .selector?
        .get(pgbranch::api::LABEL_TIMELINE)
        .cloned()
}

/// What a `psql` Pod did.
#[derive(Debug)]
pub struct SqlRun {
    /// psql's exit code: 0 ok, 1 fatal, 2 connection failed or lost, 3 an
    /// error in a statement.
    pub exit_code: i32,
    /// Standard output and error (query results, unaligned, one row a line,
    /// `|` between columns).
    pub output: String,
}

static POD_SEQ: AtomicU64 = AtomicU64::new(0);

/// Kubernetes expands `$(VAR)` in `args`; `$$` keeps a `$`.
pub fn escape_args(s: &str) -> String {
    s.replace('$', "$$")
}

/// The `psql` Pod of [`run_sql_pod`]: restricted security context, the
/// Secret's `uri` in an environment variable that Kubernetes expands into
/// psql's `-d` (the URI never appears in the Pod spec), each statement its
/// own `-c`. The Secret's `ca.crt` (compute TLS: the URI asks for
/// `sslmode=verify-full`) is mounted as libpq's root certificate, as an
/// application would.
pub fn psql_pod(name: &str, image: &str, secret: &str, statements: &[&str]) -> Pod {
    let mut args: Vec<String> = [
        "-X",
        "-q",
        "-A",
        "-t",
        "-F",
        "|",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        "$(PGBRANCH_URI)",
        "-c",
        "SET client_min_messages = warning",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for s in statements {
        args.push("-c".into());
        args.push(escape_args(s));
    }
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/name": "pgbranch-e2e-psql"},
        },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "terminationGracePeriodSeconds": 0,
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 999,
                "runAsGroup": 999,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumes": [{"name": "ca", "secret": {
                "secretName": secret,
                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                "optional": true,
            }}],
            "containers": [{
                "name": "psql",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["psql"],
                "args": args,
                "env": [
                    {"name": "PGBRANCH_URI", "valueFrom": {"secretKeyRef": {"name": secret, "key": "uri"}}},
                    {"name": "PGCONNECT_TIMEOUT", "value": "10"},
                    {"name": "PGAPPNAME", "value": "pgbranch-e2e"},
                    {"name": "PGSSLROOTCERT", "value": "/etc/pgbranch-ca/ca.crt"},
                ],
                "volumeMounts": [{"name": "ca", "mountPath": "/etc/pgbranch-ca", "readOnly": true}],
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": {"drop": ["ALL"]},
                    "readOnlyRootFilesystem": true,
                },
                "resources": {
                    "requests": {"cpu": "10m", "memory": "16Mi"},
                    "limits": {"memory": "128Mi"},
                },
            }],
        },
    }))
    .expect("pod object")
}

/// Runs `statements` (each its own `-c`, so each commits on its own, in one
/// session) with `psql` in a short-lived Pod in `ns`, connecting with the
/// `uri` key of `secret` — through the Service named in it, as an
/// application in the cluster would. Returns psql's exit code and output.
pub async fn run_sql_pod(env: &Env, ns: &str, secret: &str, statements: &[&str]) -> SqlRun {
    let seq = POD_SEQ.fetch_add(1, Ordering::Relaxed);
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..5];
    let name = format!("psql-{seq}-{suffix}");
    let pod = psql_pod(&name, &env.psql_image, secret, statements);
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    pods.create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("create pod {name}: {e}"));

    let start = Instant::now();
    let exit_code = loop {
        let p = pods.get(&name).await.expect("get psql pod");
        let st = p.status.clone().unwrap_or_default();
        let cs = st
            .container_statuses
            .as_ref()
            .and_then(|c| c.first())
            .cloned();
        if let Some(t) = cs
            .as_ref()
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.as_ref())
        {
            break t.exit_code;
        }
        let waiting = cs
            .as_ref()
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.waiting.as_ref())
            .map(|w| {
                format!(
                    "{}: {}",
                    w.reason.clone().unwrap_or_default(),
                    w.message.clone().unwrap_or_default()
                )
            });
        let hopeless = waiting.as_deref().is_some_and(|w| {
            [
                "ErrImagePull",
                "ImagePullBackOff",
                "InvalidImageName",
                "CreateContainerConfigError",
            ]
            .iter()
            .any(|r| w.starts_with(r))
        }) && start.elapsed() > Duration::from_secs(60);
        if hopeless || start.elapsed() > env.timeout {
            let _ = pods.delete(&name, &DeleteParams::default()).await;
            panic!(
                "psql pod {name} (secret {secret}) did not finish: phase {:?}, waiting {waiting:?}",
                st.phase
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let output = pods
        .logs(&name, &LogParams::default())
        .await
        .unwrap_or_else(|e| panic!("logs of {name}: {e}"));
    let _ = pods
        .delete(&name, &DeleteParams::default().grace_period(0))
        .await;
    SqlRun { exit_code, output }
}

/// Runs statements against a branch as its application user (Secret
/// `<branch>-app`) and returns the output lines. A connection failure
/// (psql exit 2: nothing ran) is retried for up to a minute — a Service's
/// endpoints and DNS can trail a Ready compute by a moment; any other
/// failure fails the test.
pub async fn sql(env: &Env, ns: &str, branch: &str, statements: &[&str]) -> Vec<String> {
    sql_with_secret(env, ns, &format!("{branch}-app"), statements).await
}

pub async fn sql_with_secret(
    env: &Env,
    ns: &str,
    secret: &str,
    statements: &[&str],
) -> Vec<String> {
    let start = Instant::now();
    loop {
        let run = run_sql_pod(env, ns, secret, statements).await;
        match run.exit_code {
            0 => {
                return run
                    .output
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            2 if start.elapsed() < Duration::from_secs(60) => {
                eprintln!(
                    "psql via {secret}: connection failed, retrying: {}",
                    run.output.trim()
                );
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            code => panic!(
                "psql via {secret} failed (exit {code}) running {statements:?}:\n{}",
                run.output
            ),
        }
    }
}

/// The rows of the test table `items` as `id|note`, by id.
pub async fn items(env: &Env, ns: &str, branch: &str) -> Vec<String> {
    sql(env, ns, branch, &["SELECT id, note FROM items ORDER BY id"]).await
}

/// The rows `items` holds after inserting `ids` with `note`.
pub fn rows(ids: std::ops::RangeInclusive<i32>, note: &str) -> Vec<String> {
    ids.map(|i| format!("{i}|{note}")).collect()
}

/// Creates `items` on a branch with rows 1..=10 (`first`), then — with
/// 1.5 s on either side — reads the server's clock, then adds rows 11..=20
/// (`second`). Returns that time (RFC 3339, UTC, microseconds): a point
/// between the two batches, in the database's own clock.
pub async fn write_two_batches(env: &Env, ns: &str, branch: &str) -> String {
    let out = sql(
        env,
        ns,
        branch,
        &[
            "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL)",
            "INSERT INTO items SELECT g, 'first' FROM generate_series(1, 10) g",
            "SELECT pg_sleep(1.5)",
            "SELECT 'point=' || to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            "SELECT pg_sleep(1.5)",
            "INSERT INTO items SELECT g, 'second' FROM generate_series(11, 20) g",
        ],
    )
    .await;
    out.iter()
        .find_map(|l| l.strip_prefix("point="))
        .unwrap_or_else(|| panic!("no point in psql output {out:?}"))
        .to_string()
}

/// Percent-encodes a URI component (RFC 3986 unreserved characters kept).
pub fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Creates a Secret holding only a `uri` (and the CA its `verify-full` needs),
/// to try other credentials through
/// [`run_sql_pod`].
pub async fn uri_secret(env: &Env, ns: &str, name: &str, uri: &str, ca: Option<&String>) {
    // `ca.crt` (compute TLS) too: [`run_sql_pod`] points PGSSLROOTCERT at
    // it, and a `verify-full` URI cannot connect without it.
    let mut data = json!({"uri": uri});
    if let Some(ca) = ca {
        data["ca.crt"] = json!(ca);
    }
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "stringData": data,
    }))
    .expect("secret object");
    create(env, ns, secret).await;
}

// ---------------------------------------------------------------------------
// A client that keeps connecting through a Service (downtime of a finalize).

/// A Pod that opens a new connection through a Secret's `uri` every 100 ms
/// (plus psql's own start, ~50 ms) and logs `ok <ms> <server address>
/// <attempt ms>` or `fail <ms> <attempt ms>` (Unix milliseconds at the end
/// of the attempt, and how long it took).
pub struct Prober {
    pub pod: String,
    ns: String,
}

/// What a [`Prober`] saw.
#[derive(Debug)]
pub struct ProbeReport {
    pub ok: usize,
    pub failed: usize,
    /// The longest time between two successful connections that had failed
    /// ones in between (0 when none failed).
    pub longest_outage_ms: i64,
    /// The longest time between two successful connections, failed ones in
    /// between or not (a connection that hangs is an outage too); one
    /// probe's own period when nothing went wrong.
    pub longest_gap_ms: i64,
    /// The server addresses that answered, in order of first answer (a
    /// switch of computes shows as a second address).
    pub servers: Vec<String>,
    /// The time from the last connection the first server answered to the
    /// first one another server answered: the switch as clients saw it
    /// (`None` when only one server answered).
    pub switch_gap_ms: Option<i64>,
    /// The longest time a connection attempt took (psql's start included).
    pub slowest_attempt_ms: i64,
    /// The last attempt succeeded.
    pub last_ok: bool,
}

/// Parses prober log lines (`ok <unix ms> [<server address> [<attempt ms>]]`,
/// `fail <unix ms> [<attempt ms>]`; times at the end of the attempt).
pub fn probe_report(log: &str) -> ProbeReport {
    let mut r = ProbeReport {
        ok: 0,
        failed: 0,
        longest_outage_ms: 0,
        longest_gap_ms: 0,
        servers: vec![],
        switch_gap_ms: None,
        slowest_attempt_ms: 0,
        last_ok: false,
    };
    let mut last_first_server_at: Option<i64> = None;
    let mut last_ok_at: Option<i64> = None;
    let mut failing = false;
    for line in log.lines() {
        let mut parts = line.split_whitespace();
        let (Some(what), Some(Ok(at))) = (parts.next(), parts.next().map(str::parse::<i64>)) else {
            continue;
        };
        match what {
            "ok" => {
                r.ok += 1;
                if let Some(prev) = last_ok_at {
                    r.longest_gap_ms = r.longest_gap_ms.max(at - prev);
                    if failing {
                        r.longest_outage_ms = r.longest_outage_ms.max(at - prev);
                    }
                }
                if let Some(server) = parts.next() {
                    if !r.servers.iter().any(|s| s == server) {
                        r.servers.push(server.to_string());
                    }
                    if r.servers[0] == server {
                        last_first_server_at = Some(at);
                    } else if r.switch_gap_ms.is_none() {
                        r.switch_gap_ms = last_first_server_at.map(|l| at - l);
                    }
                }
                if let Some(Ok(took)) = parts.next().map(str::parse::<i64>) {
                    r.slowest_attempt_ms = r.slowest_attempt_ms.max(took);
                }
                failing = false;
                last_ok_at = Some(at);
                r.last_ok = true;
            }
            "fail" => {
                r.failed += 1;
                if let Some(Ok(took)) = parts.next().map(str::parse::<i64>) {
                    r.slowest_attempt_ms = r.slowest_attempt_ms.max(took);
                }
                failing = true;
                r.last_ok = false;
            }
            _ => {}
        }
    }
    r
}

impl Prober {
    /// Starts the prober and waits for its first successful connection.
    pub async fn start(env: &Env, ns: &str, secret: &str) -> Self {
        let seq = POD_SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "prober-{seq}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..5]
        );
        let script = "while true; do s=$(date +%s%3N); \
             if a=$(psql -X -Atq -d \"$PGBRANCH_URI\" -c 'SELECT inet_server_addr()' 2>/dev/null); \
             then e=$(date +%s%3N); echo \"ok $e $a $((e - s))\"; \
             else e=$(date +%s%3N); echo \"fail $e $((e - s))\"; fi; \
             sleep 0.1; done";
        let mut pod = psql_pod(&name, &env.psql_image, secret, &[]);
        if let Some(c) = pod.spec.as_mut().and_then(|s| s.containers.first_mut()) {
            c.command = Some(vec!["sh".into(), "-c".into()]);
            c.args = Some(vec![escape_args(script)]);
            // CPU enough that its own start-up is not what it measures
            // on a busy node (the psql Pods ask for 10m).
            c.resources = Some(
                serde_json::from_value(json!({
                    "requests": {"cpu": "250m", "memory": "16Mi"},
                    "limits": {"memory": "128Mi"},
                }))
                .expect("resources"),
            );
            if let Some(env_vars) = c.env.as_mut() {
                for e in env_vars
                    .iter_mut()
                    .filter(|e| e.name == "PGCONNECT_TIMEOUT")
                {
                    e.value = Some("2".into());
                }
            }
        }
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), ns);
        pods.create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("create prober {name}: {e}"));
        let start = Instant::now();
        loop {
            let log = pods
                .logs(&name, &LogParams::default())
                .await
                .unwrap_or_default();
            if log.lines().any(|l| l.starts_with("ok ")) {
                break;
            }
            assert!(
                start.elapsed() < env.timeout,
                "prober {name} never connected through {secret}: {log}"
            );
            tokio::time::sleep(POLL).await;
        }
        Self {
            pod: name,
            ns: ns.to_string(),
        }
    }

    /// Stops the prober and reports what it saw.
    pub async fn stop(self, env: &Env) -> ProbeReport {
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), &self.ns);
        let log = pods
            .logs(&self.pod, &LogParams::default())
            .await
            .unwrap_or_else(|e| panic!("logs of {}: {e}", self.pod));
        let _ = pods
            .delete(&self.pod, &DeleteParams::default().grace_period(0))
            .await;
        probe_report(&log)
    }
}

/// A root branch with defaults.
pub fn root(name: &str) -> Branch {
    Branch::new(name, BranchSpec::default())
}

/// A child of `parent`, at its head or at `timestamp`.
pub fn child(name: &str, parent: &str, timestamp: Option<String>) -> Branch {
    Branch::new(
        name,
        BranchSpec {
            parent: Some(ParentRef {
                branch: parent.into(),
                timestamp,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
}

/// A snapshot of `branch` at its head.
pub fn snapshot(name: &str, branch: &str) -> Snapshot {
    Snapshot::new(
        name,
        SnapshotSpec {
            branch: branch.into(),
            ..Default::default()
        },
    )
}

/// Waits until a branch is Ready on a timeline other than `old` (a
/// finalized restore moved it).
pub async fn wait_moved(env: &Env, api: &Api<Branch>, name: &str, old: &str) -> Branch {
    wait_for(
        env,
        api,
        name,
        &format!("Ready on a timeline other than {old}"),
        |b| {
            health(b).is_ok()
                && b.status
                    .as_ref()
                    .and_then(|s| s.timeline_id.as_deref())
                    .is_some_and(|t| t != old)
        },
    )
    .await
}

/// Waits for a restore to reach `phase` for its current generation.
pub async fn wait_phase(
    env: &Env,
    api: &Api<SnapshotRestore>,
    name: &str,
    phase: RestorePhase,
) -> SnapshotRestore {
    wait_for(env, api, name, &format!("phase {phase:?}"), |r| {
        observed_generation(r) == r.metadata.generation
            && r.status.as_ref().and_then(|s| s.phase) == Some(phase)
    })
    .await
}
