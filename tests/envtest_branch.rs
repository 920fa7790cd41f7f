//! Tier 4: the Branch scenario against a real kube-apiserver.
//!
//! Runs when `KUBEBUILDER_ASSETS` names a directory holding `etcd` and
//! `kube-apiserver` (the envtest convention, e.g. from `setup-envtest use`).
//! Starts etcd and kube-apiserver on free local ports in a temp dir: the
//! apiserver makes its own self-signed serving certificate (`--cert-dir`),
//! clients authenticate with a static token (`--token-auth-file`, group
//! `system:masters`), the service-account signing key is made with the
//! `openssl` CLI. Installs the CRDs generated from the Rust types, then runs
//! the same scenario as tier 3. Without the variable it prints
//! "skipped: KUBEBUILDER_ASSETS not set" and passes.
//!
//! There is no controller-manager: no garbage collector (the operator
//! deletes what it owns itself) and no kubelet (the local compute runner
//! plays it, as in tier 3).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, CustomResourceExt, Resource, ResourceExt};
use pgbranch::api::Branch;
use serde::de::DeserializeOwned;
use support::branch_scenario::{self, Harness, WriteCounter, NS};
use tokio::sync::Mutex;

/// A child process killed (and waited for) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Cluster {
    client: Client,
    _apiserver: Proc,
    _etcd: Proc,
    _dir: tempfile::TempDir,
}

async fn start_cluster(assets: &Path) -> Cluster {
    let dir = tempfile::Builder::new()
        .prefix("pgbranch-envtest-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
    let log = |name: &str| std::fs::File::create(d.join(format!("{name}.log"))).unwrap();
    let etcd = Proc(
        Command::new(assets.join("etcd"))
            .args([
                "--data-dir",
                d.join("etcd").to_str().unwrap(),
                "--listen-client-urls",
                &format!("http://127.0.0.1:{etcd_port}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{etcd_port}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
                "--unsafe-no-fsync",
            ])
            .stdout(Stdio::null())
            .stderr(log("etcd"))
            .spawn()
            .expect("start etcd"),
    );
    let sa_key = d.join("sa.key");
    let ok = Command::new("openssl")
        .args(["genrsa", "-out", sa_key.to_str().unwrap(), "2048"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl")
        .success();
    assert!(ok, "openssl genrsa failed");
    let token = format!("{:032x}", rand_u128());
    std::fs::write(
        d.join("tokens.csv"),
        format!("{token},admin,admin-uid,\"system:masters\"\n"),
    )
    .unwrap();
    let cert_dir = d.join("certs");
    let apiserver = Proc(
        Command::new(assets.join("kube-apiserver"))
            .args([
                "--etcd-servers",
                &format!("http://127.0.0.1:{etcd_port}"),
                "--cert-dir",
                cert_dir.to_str().unwrap(),
                "--secure-port",
                &api_port.to_string(),
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
                "--token-auth-file",
                d.join("tokens.csv").to_str().unwrap(),
                "--authorization-mode",
                "RBAC",
                "--service-account-issuer",
                &format!("https://127.0.0.1:{api_port}"),
                "--service-account-key-file",
                sa_key.to_str().unwrap(),
                "--service-account-signing-key-file",
                sa_key.to_str().unwrap(),
                "--service-cluster-ip-range",
                "10.0.0.0/24",
                "--disable-admission-plugins",
                "ServiceAccount",
                "--allow-privileged=true",
            ])
            .stdout(Stdio::null())
            .stderr(log("kube-apiserver"))
            .spawn()
            .expect("start kube-apiserver"),
    );
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: envtest\n  cluster:\n    server: https://127.0.0.1:{api_port}\n    insecure-skip-tls-verify: true\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: envtest\n  context:\n    cluster: envtest\n    user: admin\n    namespace: default\ncurrent-context: envtest\n"
    );
    let kc = Kubeconfig::from_yaml(&kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    let client = Client::try_from(config).unwrap();
    // Wait for the apiserver to answer and the default namespace to exist.
    let start = Instant::now();
    loop {
        let ns: Api<Namespace> = Api::all(client.clone());
        if ns.get_opt("default").await.ok().flatten().is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "kube-apiserver did not come up; see {}",
            d.join("kube-apiserver.log").display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Cluster {
        client,
        _apiserver: apiserver,
        _etcd: etcd,
        _dir: dir,
    }
}

fn rand_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    (u128::from(h.finish()) << 64) | u128::from(std::process::id())
}

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = Branch::crd();
    let name = crd.name_any();
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("create CRD");
    let start = Instant::now();
    loop {
        let c = crds.get(&name).await.unwrap();
        let established = c
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "CRD not established"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Discovery of the new kind can lag behind Established.
    let branches: Api<Branch> = Api::namespaced(client.clone(), "default");
    while branches.list(&ListParams::default()).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "Branch kind not served"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

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

fn assets() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("KUBEBUILDER_ASSETS")?);
    if dir.join("kube-apiserver").is_file() && dir.join("etcd").is_file() {
        Some(dir)
    } else {
        panic!(
            "KUBEBUILDER_ASSETS={} has no kube-apiserver and etcd",
            dir.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn branch_lifecycle_on_a_real_apiserver() {
    let Some(assets) = assets() else {
        println!("skipped: KUBEBUILDER_ASSETS not set");
        return;
    };
    pgbranch::cli::operator::install_crypto_provider();
    let cluster = start_cluster(&assets).await;
    install_crds(&cluster.client).await;
    let nss: Api<Namespace> = Api::all(cluster.client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(NS.into());
    nss.create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    let h = Harness::start(cluster.client.clone()).await;
    let writes = VersionWrites {
        client: cluster.client.clone(),
        base: Mutex::new(BTreeMap::new()),
    };
    branch_scenario::run(&h, &writes).await;
    h.shutdown().await;
}
