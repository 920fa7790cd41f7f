//! Tier 4: the Branch scenario against a real kube-apiserver.
//!
//! Runs when `KUBEBUILDER_ASSETS` names a directory holding `etcd` and
//! `kube-apiserver` (the envtest convention, e.g. from `setup-envtest use`),
//! started by the shared envtest harness (`support::apiserver::envtest`).
//! Installs the CRDs generated from the Rust types, then runs the same
//! scenario as tier 3. Without the variable it prints
//! "skipped: KUBEBUILDER_ASSETS not set" and passes.
//!
//! There is no controller-manager: no garbage collector (the operator
//! deletes what it owns itself) and no kubelet (the local compute runner
//! plays it, as in tier 3).

mod support;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, Client, CustomResourceExt, Resource, ResourceExt};
use pgbranch::api::Branch;
use serde::de::DeserializeOwned;
use support::apiserver::envtest::TestCluster;
use support::branch_scenario::{self, Harness, WriteCounter, NS};
use tokio::sync::Mutex;

/// Counts writes as resourceVersion changes of every kind the operator
/// writes in the namespace (a real apiserver gives an unchanged object no
/// new resourceVersion).
struct VersionWrites {
    client: Client,
    base: Mutex<BTreeMap<String, String>>,
}

async fn versions_of<K>(client: &Client, out: &mut BTreeMap<String, String>)
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), NS);
    for o in api.list(&ListParams::default()).await.unwrap().items {
        out.insert(
            format!("{}/{}", K::kind(&()), o.name_any()),
            o.resource_version().unwrap_or_default(),
        );
    }
}

impl VersionWrites {
    async fn snapshot(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        versions_of::<Branch>(&self.client, &mut m).await;
        versions_of::<Deployment>(&self.client, &mut m).await;
        versions_of::<Service>(&self.client, &mut m).await;
        versions_of::<Secret>(&self.client, &mut m).await;
        versions_of::<Event>(&self.client, &mut m).await;
        m
    }
    async fn changed(&self) -> Vec<String> {
        let now = self.snapshot().await;
        let base = self.base.lock().await;
        now.iter()
            .filter(|(k, v)| base.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .chain(base.keys().filter(|k| !now.contains_key(*k)).cloned())
            .collect()
    }
}

#[async_trait::async_trait]
impl WriteCounter for VersionWrites {
    async fn reset(&self) {
        let s = self.snapshot().await;
        *self.base.lock().await = s;
    }
    async fn count(&self) -> usize {
        self.changed().await.len()
    }
    async fn describe(&self) -> String {
        format!("changed objects: {:?}", self.changed().await)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn branch_lifecycle_on_a_real_apiserver() {
    support::apiserver::install_crypto_provider();
    // Prints "skipped: KUBEBUILDER_ASSETS not set ..." and passes without it.
    let Some(cluster) = TestCluster::envtest().await else {
        return;
    };
    cluster.install_crds(&[Branch::crd()]).await;
    cluster.create_namespace(NS).await;
    let client = cluster.client();
    let h = Harness::start(client.clone()).await;
    let writes = VersionWrites {
        client,
        base: Mutex::new(BTreeMap::new()),
    };
    branch_scenario::run(&h, &writes).await;
    h.shutdown().await;
}
