//! A real Kubernetes control plane for the operator tests: etcd,
//! kube-apiserver and kube-controller-manager from `$KUBEBUILDER_ASSETS`
//! (the envtest layout; `scripts/setup.sh` unpacks `../shared/envtest` into
//! `.envtest`, elsewhere `setup-envtest use 1.36 -p path` gives the same
//! binaries).
//!
//! One control plane per test binary, started by the first test that asks
//! for it ([`control_plane`]) and shared by every test of the binary; each
//! test works in a namespace of its own ([`ControlPlane::namespace`]).
//!
//! What runs, as in a cluster: the garbage collector (owner references),
//! namespace deletion, Deployment → ReplicaSet → Pod, EndpointSlices of
//! Services, ServiceAccounts and their tokens, RBAC, admission (CEL rules of
//! the CRDs, ValidatingAdmissionPolicy). What does not: a scheduler and a
//! kubelet — `super::kubelet` plays both for the compute Pods (it binds
//! them to its Node and runs real PostgreSQL for them) — and kube-proxy
//! (tests follow a Service's EndpointSlices to the compute, as kube-proxy
//! would). The node lifecycle controller is off: the test node sends no
//! heartbeats.
//!
//! The processes are children of a thread that lives as long as the test
//! binary, with `PR_SET_PDEATHSIG`: they die with the binary, even when it
//! is killed. Their directory `$TMPDIR/pgbranch-cp-<pid>` is removed by the
//! next binary that starts once that pid is gone.
//!
//! Without `KUBEBUILDER_ASSETS` the tests that need it print
//! `skipped: KUBEBUILDER_ASSETS not set` and pass — unless
//! `PGBRANCH_REQUIRE_CONTROL_PLANE=1` (set by scripts/test.sh when it
//! installed the binaries), where a missing control plane fails the test.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::ResourceExt;

/// The node the test kubelet binds compute Pods to.
pub const NODE: &str = "pgbranch-test-node";

/// A running control plane (shared by a test binary).
pub struct ControlPlane {
    server: String,
    token: String,
    dir: PathBuf,
    kubeconfig: PathBuf,
    logs: Vec<(&'static str, PathBuf)>,
}

static CONTROL_PLANE: OnceLock<Option<ControlPlane>> = OnceLock::new();
static NAMESPACES: AtomicU32 = AtomicU32::new(0);

/// The binary's control plane, started on first use; `None` (after the
/// skip notice) without `KUBEBUILDER_ASSETS`.
///
/// # Panics
/// When the binaries are there but do not come up (with their log tails),
/// or when they are required (`PGBRANCH_REQUIRE_CONTROL_PLANE=1`) and
/// missing.
pub fn control_plane() -> Option<&'static ControlPlane> {
    CONTROL_PLANE.get_or_init(start).as_ref()
}

fn start() -> Option<ControlPlane> {
    let assets = std::env::var_os("KUBEBUILDER_ASSETS").filter(|a| !a.is_empty());
    let Some(assets) = assets.map(PathBuf::from) else {
        if std::env::var("PGBRANCH_REQUIRE_CONTROL_PLANE").as_deref() == Ok("1") {
            panic!("PGBRANCH_REQUIRE_CONTROL_PLANE=1 but KUBEBUILDER_ASSETS is not set");
        }
        eprintln!("skipped: KUBEBUILDER_ASSETS not set (no real kube-apiserver for this test)");
        return None;
    };
    // The processes must be children of a thread that outlives every test
    // (PR_SET_PDEATHSIG fires when the spawning *thread* ends).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("control-plane".into())
        .spawn(move || {
            let started = std::panic::catch_unwind(|| launch(&assets));
            let children = match started {
                Ok(Ok((cp, children))) => {
                    let _ = tx.send(Ok(cp));
                    children
                }
                Ok(Err(e)) => {
                    let _ = tx.send(Err(e));
                    return;
                }
                Err(_) => {
                    let _ = tx.send(Err("starting the control plane panicked".into()));
                    return;
                }
            };
            // Keep the children (and this thread) alive until the process ends.
            let _children = children;
            loop {
                std::thread::park();
            }
        })
        .expect("a thread for the control plane");
    match rx.recv() {
        Ok(Ok(cp)) => Some(cp),
        Ok(Err(e)) => panic!("{e}"),
        Err(_) => panic!("the control-plane thread died"),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Child, String> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    cmd.spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Removes the directories of earlier binaries whose process is gone.
fn remove_stale_dirs(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(pid) = name.strip_prefix("pgbranch-cp-") {
            if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn launch(assets: &Path) -> Result<(ControlPlane, Vec<Child>), String> {
    for bin in ["etcd", "kube-apiserver", "kube-controller-manager"] {
        if !assets.join(bin).exists() {
            return Err(format!(
                "KUBEBUILDER_ASSETS={} has no {bin}: the operator tests need etcd, \
                 kube-apiserver and kube-controller-manager there (see the README, \
                 \"A real control plane for the operator tests\")",
                assets.display()
            ));
        }
    }
    let tmp = std::env::temp_dir();
    remove_stale_dirs(&tmp);
    let dir = tmp.join(format!("pgbranch-cp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;

    let key = dir.join("sa.key");
    let ok = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&key)
        .arg("2048")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err("openssl genrsa failed (the service-account signing key)".into());
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    std::fs::write(
        dir.join("tokens.csv"),
        format!("{token},test-admin,test-admin,\"system:masters\"\n"),
    )
    .map_err(|e| e.to_string())?;

    let (client_port, peer_port, api_port) = (free_port(), free_port(), free_port());
    let etcd_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let server = format!("https://127.0.0.1:{api_port}");
    let mut children = vec![];
    let mut logs = vec![];

    let etcd_log = dir.join("etcd.log");
    children.push(spawn(
        &assets.join("etcd"),
        &[
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--unsafe-no-fsync=true".into(),
        ],
        &etcd_log,
    )?);
    logs.push(("etcd", etcd_log));

    let api_log = dir.join("kube-apiserver.log");
    children.push(spawn(
        &assets.join("kube-apiserver"),
        &[
            format!("--etcd-servers={etcd_url}"),
            format!("--cert-dir={}", dir.join("certs").display()),
            format!("--secure-port={api_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            "--service-cluster-ip-range=10.0.0.0/16".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", key.display()),
            format!("--service-account-signing-key-file={}", key.display()),
            format!("--token-auth-file={}", dir.join("tokens.csv").display()),
            "--authorization-mode=RBAC".into(),
            "--allow-privileged=true".into(),
            // Tests make many requests at once; no priority-and-fairness
            // queueing in the way.
            "--max-requests-inflight=1000".into(),
            "--max-mutating-requests-inflight=500".into(),
        ],
        &api_log,
    )?);
    logs.push(("kube-apiserver", api_log));

    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(&server, &token, "default"))
        .map_err(|e| e.to_string())?;

    let cp = ControlPlane {
        server,
        token,
        dir: dir.clone(),
        kubeconfig: kubeconfig.clone(),
        logs,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    if let Err(e) = rt.block_on(cp.wait_apiserver()) {
        drop(children);
        return Err(e);
    }

    let kcm_log = dir.join("kube-controller-manager.log");
    let kc = kubeconfig.display().to_string();
    children.push(spawn(
        &assets.join("kube-controller-manager"),
        &[
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            format!("--service-account-private-key-file={}", key.display()),
            format!(
                "--root-ca-file={}",
                dir.join("certs").join("apiserver.crt").display()
            ),
            "--use-service-account-credentials=false".into(),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
            "--controllers=*,-nodelifecycle".into(),
            "--kube-api-qps=500".into(),
            "--kube-api-burst=1000".into(),
            "--concurrent-deployment-syncs=10".into(),
            "--concurrent-replicaset-syncs=10".into(),
            "--concurrent-service-endpoint-syncs=10".into(),
            "--concurrent-gc-syncs=10".into(),
        ],
        &kcm_log,
    )?);
    let mut cp = cp;
    cp.logs.push(("kube-controller-manager", kcm_log));
    rt.block_on(cp.wait_controller_manager())?;
    rt.block_on(cp.create_node())?;
    // Straight to stderr, past the test harness's capture: the run's log
    // shows which control plane the operator tests ran on.
    let _ = writeln!(
        std::io::stderr(),
        "control plane: kube-apiserver {} + kube-controller-manager + etcd (from {}), in {}",
        cp.server,
        assets.display(),
        dir.display()
    );
    Ok((cp, children))
}

/// A kubeconfig for `server` with a bearer token (the apiserver's
/// certificate is self-signed).
pub fn kubeconfig_yaml(server: &str, token: &str, namespace: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\n\
         clusters: [{{name: test, cluster: {{server: \"{server}\", insecure-skip-tls-verify: true}}}}]\n\
         users: [{{name: test, user: {{token: \"{token}\"}}}}]\n\
         contexts: [{{name: test, context: {{cluster: test, user: test, namespace: \"{namespace}\"}}}}]\n\
         current-context: test\n"
    )
}

impl ControlPlane {
    /// The apiserver's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// A cluster-admin kubeconfig file (namespace `default`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The directory of its state and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A client configuration with `token` (cluster admin when `None`) and
    /// `namespace` as its default namespace.
    pub fn config_as(&self, token: Option<&str>, namespace: &str) -> kube::Config {
        super::install_crypto_provider();
        let mut config = kube::Config::new(self.server.parse().expect("a valid URL"));
        config.accept_invalid_certs = true;
        config.auth_info.token = Some(token.unwrap_or(&self.token).to_string().into());
        config.default_namespace = namespace.to_string();
        config.read_timeout = Some(Duration::from_secs(300));
        config
    }

    /// A cluster-admin client whose default namespace is `namespace`.
    pub fn client(&self, namespace: &str) -> kube::Client {
        kube::Client::try_from(self.config_as(None, namespace)).expect("a kube client")
    }

    /// The last lines of each component's log (for failure messages).
    pub fn log_tails(&self) -> String {
        self.logs
            .iter()
            .map(|(name, path)| format!("--- {name} ---\n{}", tail(path)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Creates a fresh namespace named after `hint` and waits until its
    /// `default` ServiceAccount exists (Pods cannot be created before).
    pub async fn namespace(&self, hint: &str) -> String {
        let n = NAMESPACES.fetch_add(1, Ordering::Relaxed);
        let clean: String = hint
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        let name = format!("{}-{n}", clean.trim_matches('-'));
        let client = self.client("default");
        let api: Api<Namespace> = Api::all(client.clone());
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.clone());
        api.create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client, &name);
        let start = Instant::now();
        while sas.get_opt("default").await.ok().flatten().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the default ServiceAccount of {name} did not appear\n{}",
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        name
    }

    /// Creates (or updates) the CRDs and waits until they are established
    /// and served.
    pub async fn install_crds(&self, crds: &[CustomResourceDefinition]) {
        let client = self.client("default");
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in crds {
            let name = crd.name_any();
            api.patch(
                &name,
                &PatchParams::apply("pgbranch-tests").force(),
                &Patch::Apply(crd),
            )
            .await
            .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
            let established = kube::runtime::wait::await_condition(
                api.clone(),
                &name,
                kube::runtime::wait::conditions::is_crd_established(),
            );
            tokio::time::timeout(Duration::from_secs(30), established)
                .await
                .unwrap_or_else(|_| panic!("CRD {name} not established in 30 s"))
                .unwrap_or_else(|e| panic!("waiting for CRD {name}: {e}"));
        }
        // Established is not yet served: wait until a list of each kind works.
        for crd in crds {
            let spec = &crd.spec;
            let version = spec
                .versions
                .iter()
                .find(|v| v.served)
                .map(|v| v.name.clone())
                .unwrap_or_default();
            let path = format!(
                "/apis/{}/{version}/{}?limit=1",
                spec.group, spec.names.plural
            );
            let start = Instant::now();
            loop {
                let req = http::Request::get(&path)
                    .body(Vec::new())
                    .expect("a request");
                if client.request_text(req).await.is_ok() {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "{path} not served in 30 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    async fn wait_apiserver(&self) -> Result<(), String> {
        let client = self.client("default");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("a request");
            if let Ok(body) = client.request_text(req).await {
                if body.trim() == "ok" {
                    let nss: Api<Namespace> = Api::all(client.clone());
                    if nss.get_opt("default").await.ok().flatten().is_some() {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "kube-apiserver did not become ready in 60 s\n{}",
                    self.log_tails()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the controller manager works: the `default`
    /// ServiceAccount of `default` exists (made by its serviceaccount
    /// controller).
    async fn wait_controller_manager(&self) -> Result<(), String> {
        let client = self.client("default");
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client, "default");
        let deadline = Instant::now() + Duration::from_secs(60);
        while sas.get_opt("default").await.ok().flatten().is_none() {
            if Instant::now() > deadline {
                return Err(format!(
                    "kube-controller-manager did not start in 60 s\n{}",
                    self.log_tails()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// The Node the test kubelet binds Pods to, Ready.
    async fn create_node(&self) -> Result<(), String> {
        let api: Api<Node> = Api::all(self.client("default"));
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        }))
        .map_err(|e| e.to_string())?;
        api.create(&PostParams::default(), &node)
            .await
            .map_err(|e| format!("creating node {NODE}: {e}"))?;
        let now = jiff::Timestamp::now().to_string();
        let status = serde_json::json!({"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "the pgbranch test kubelet", "lastHeartbeatTime": now,
                "lastTransitionTime": now}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": NODE}],
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "1000"},
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "1000"},
        }});
        api.patch_status(NODE, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(|e| format!("node status: {e}"))?;
        Ok(())
    }
}
