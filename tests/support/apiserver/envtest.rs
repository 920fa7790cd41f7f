//! A real `etcd` + `kube-apiserver` for tests, started from the binaries in
//! `$KUBEBUILDER_ASSETS` (the envtest convention), and [`TestCluster`]: one
//! type for "the in-process server, or a real apiserver when available", so
//! a scenario is written once and run on both.
//!
//! ```ignore
//! for cluster in TestCluster::all().await {   // in-process, + real if KUBEBUILDER_ASSETS is set
//!     cluster.install_crds(&pgbranch::api::crds()).await;
//!     scenario(cluster.client()).await;
//! }
//! ```
//!
//! What a bare apiserver does not do (no kube-controller-manager runs):
//! no garbage collection of dependents, no namespace deletion, no
//! Deployment/ReplicaSet/Pod controllers, no ServiceAccount tokens (the
//! `ServiceAccount` admission plugin is disabled so Pods can be created).
//! Scenarios that rely on those belong to the in-process server only
//! (check [`TestCluster::server`]).
//!
//! Not run on the CI machine (it has no kube-apiserver); written to run
//! wherever `KUBEBUILDER_ASSETS` names a directory with `etcd` and
//! `kube-apiserver` (`setup-envtest use -p path`). Needs `openssl` on the
//! PATH for the service-account signing key.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};

use super::{install_crypto_provider, ApiServer};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// Kills a child process when dropped (also on panic).
struct ChildGuard {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(name: &'static str, bin: &Path, args: &[String], dir: &Path) -> ChildGuard {
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).expect("a log file in the temp dir");
    let err = out.try_clone().expect("a second handle on the log file");
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    ChildGuard { name, child, log }
}

/// A running etcd + kube-apiserver pair, stopped when dropped.
pub struct Envtest {
    // Field order = drop order: the apiserver stops before etcd, and the
    // directory goes last.
    apiserver: ChildGuard,
    etcd: ChildGuard,
    config: kube::Config,
    _dir: tempfile::TempDir,
}

impl Envtest {
    /// Starts etcd and kube-apiserver from `$KUBEBUILDER_ASSETS`, or prints
    /// `skipped: KUBEBUILDER_ASSETS not set` and returns `None`.
    ///
    /// # Panics
    /// When the variable is set but the binaries do not come up in 60 s
    /// (with the tail of their logs).
    pub async fn start() -> Option<Self> {
        let Some(assets) = std::env::var_os("KUBEBUILDER_ASSETS").filter(|a| !a.is_empty()) else {
            eprintln!(
                "skipped: KUBEBUILDER_ASSETS not set (a real kube-apiserver is not available)"
            );
            return None;
        };
        let assets = PathBuf::from(assets);
        let dir = tempfile::tempdir().expect("a temp dir");
        let d = dir.path();

        // Service-account signing key (the apiserver refuses to start without one).
        let key = d.join("sa.key");
        let status = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("skipped: openssl is needed to make the envtest service-account key");
            return None;
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        std::fs::write(
            d.join("tokens.csv"),
            format!("{token},envtest-admin,envtest-admin,\"system:masters\"\n"),
        )
        .expect("writing the token file");

        let (client_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = spawn(
            "etcd",
            &assets.join("etcd"),
            &[
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync=true".into(),
            ],
            d,
        );
        let apiserver = spawn(
            "kube-apiserver",
            &assets.join("kube-apiserver"),
            &[
                format!("--etcd-servers={etcd_url}"),
                format!("--cert-dir={}", d.join("certs").display()),
                format!("--secure-port={api_port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-account-key-file={}", key.display()),
                format!("--service-account-signing-key-file={}", key.display()),
                format!("--token-auth-file={}", d.join("tokens.csv").display()),
                "--authorization-mode=RBAC".into(),
                "--disable-admission-plugins=ServiceAccount".into(),
                "--allow-privileged=true".into(),
            ],
            d,
        );

        install_crypto_provider();
        let mut config = kube::Config::new(
            format!("https://127.0.0.1:{api_port}")
                .parse()
                .expect("a valid URL"),
        );
        // The apiserver serves a self-signed certificate it made in --cert-dir.
        config.accept_invalid_certs = true;
        config.auth_info.token = Some(token.into());
        config.read_timeout = Some(Duration::from_secs(300));

        let me = Self {
            apiserver,
            etcd,
            config,
            _dir: dir,
        };
        me.wait_ready().await;
        Some(me)
    }

    async fn wait_ready(&self) {
        let client = self.client();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("a request");
            if let Ok(body) = client.request_text(req).await {
                if body.trim() == "ok" {
                    // the bootstrap controller creates "default" shortly after /readyz
                    let nss: Api<Namespace> = Api::all(client.clone());
                    if nss.get_opt("default").await.ok().flatten().is_some() {
                        return;
                    }
                }
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "kube-apiserver did not become ready in 60 s\n--- {} ---\n{}\n--- {} ---\n{}",
                    self.etcd.name,
                    self.etcd.log_tail(),
                    self.apiserver.name,
                    self.apiserver.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The client configuration (cluster admin).
    pub fn config(&self) -> kube::Config {
        self.config.clone()
    }

    /// A client with cluster-admin rights, default namespace `default`.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config.clone()).expect("a client for the envtest apiserver")
    }
}

/// Where a scenario runs.
pub enum TestCluster {
    /// The in-process server (hooks available through [`TestCluster::server`]).
    InProcess(ApiServer),
    /// A real etcd + kube-apiserver.
    Envtest(Box<Envtest>),
}

impl TestCluster {
    /// The in-process server.
    pub fn in_process() -> Self {
        Self::InProcess(ApiServer::new())
    }

    /// A real apiserver, or `None` (with a printed notice) without
    /// `KUBEBUILDER_ASSETS`.
    pub async fn envtest() -> Option<Self> {
        Envtest::start().await.map(|e| Self::Envtest(Box::new(e)))
    }

    /// The in-process server, then a real apiserver when available.
    pub async fn all() -> Vec<Self> {
        let mut out = vec![Self::in_process()];
        out.extend(Self::envtest().await);
        out
    }

    /// `"in-process"` or `"kube-apiserver"`, for assertion messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::InProcess(_) => "in-process",
            Self::Envtest(_) => "kube-apiserver",
        }
    }

    /// A client, default namespace `default`.
    pub fn client(&self) -> kube::Client {
        match self {
            Self::InProcess(s) => s.client(),
            Self::Envtest(e) => e.client(),
        }
    }

    /// The in-process server's test hooks, when this is one.
    pub fn server(&self) -> Option<&ApiServer> {
        match self {
            Self::InProcess(s) => Some(s),
            Self::Envtest(_) => None,
        }
    }

    /// Creates the CRDs through the API and waits until they are
    /// established.
    pub async fn install_crds(&self, crds: &[CustomResourceDefinition]) {
        let api: Api<CustomResourceDefinition> = Api::all(self.client());
        for crd in crds {
            let name = crd.metadata.name.clone().unwrap_or_default();
            if api.get_opt(&name).await.ok().flatten().is_none() {
                api.create(&PostParams::default(), crd)
                    .await
                    .unwrap_or_else(|e| panic!("creating CRD {name} on {}: {e}", self.name()));
            }
            let established = kube::runtime::wait::await_condition(
                api.clone(),
                &name,
                kube::runtime::wait::conditions::is_crd_established(),
            );
            tokio::time::timeout(Duration::from_secs(30), established)
                .await
                .unwrap_or_else(|_| panic!("CRD {name} not established in 30 s on {}", self.name()))
                .unwrap_or_else(|e| panic!("waiting for CRD {name} on {}: {e}", self.name()));
        }
        if matches!(self, Self::Envtest(_)) {
            // Discovery of a new group takes a moment on a real apiserver.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Creates a namespace (no-op when it exists).
    pub async fn create_namespace(&self, name: &str) {
        let api: Api<Namespace> = Api::all(self.client());
        if api.get_opt(name).await.ok().flatten().is_none() {
            let mut ns = Namespace::default();
            ns.metadata.name = Some(name.into());
            api.create(&PostParams::default(), &ns)
                .await
                .unwrap_or_else(|e| panic!("creating namespace {name} on {}: {e}", self.name()));
        }
    }
}
