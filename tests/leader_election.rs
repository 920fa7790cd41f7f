//! Leader election between real `pgbranch operator` processes on a real
//! kube-apiserver (etcd + kube-apiserver from `$KUBEBUILDER_ASSETS`; without
//! it the test prints "skipped: KUBEBUILDER_ASSETS not set" and passes).
//!
//! Both processes run on the same host with neither `POD_NAME` nor
//! `HOSTNAME` set, as a developer would start them: each must still take
//! part under its own identity, so only one leads at a time, the second
//! takes over when the first stops (SIGTERM, Lease released) or dies
//! (SIGKILL, Lease left to expire), in both cases within 15 s.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};

const LEASE: &str = "pgbranch-operator";
const FAILOVER_LIMIT: Duration = Duration::from_secs(15);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// A child process killed when dropped, with its output in a log file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// etcd + kube-apiserver, and a kubeconfig file for the operator binaries.
struct ControlPlane {
    _apiserver: Proc,
    _etcd: Proc,
    client: kube::Client,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl ControlPlane {
    async fn start() -> Option<Self> {
        let Some(assets) = std::env::var_os("KUBEBUILDER_ASSETS").filter(|a| !a.is_empty()) else {
            eprintln!(
                "skipped: KUBEBUILDER_ASSETS not set (a real kube-apiserver is not available)"
            );
            return None;
        };
        let assets = PathBuf::from(assets);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = d.join("sa.key");
        let ok = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: openssl is needed to make the service-account key");
            return None;
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        std::fs::write(
            d.join("tokens.csv"),
            format!("{token},admin,admin,\"system:masters\"\n"),
        )
        .unwrap();
        let (client_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = Command::new(assets.join("etcd"));
        etcd.args([
            format!("--data-dir={}", d.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--unsafe-no-fsync=true".into(),
        ]);
        let etcd = Proc::spawn(etcd, d.join("etcd.log"));
        let mut api = Command::new(assets.join("kube-apiserver"));
        api.args([
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
        ]);
        let apiserver = Proc::spawn(api, d.join("kube-apiserver.log"));

        let _ = rustls::crypto::ring::default_provider().install_default();
        let server = format!("https://127.0.0.1:{api_port}");
        let mut config = kube::Config::new(server.parse().unwrap());
        config.accept_invalid_certs = true;
        config.auth_info.token = Some(token.clone().into());
        let client = kube::Client::try_from(config).unwrap();
        let kubeconfig = d.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: envtest\n  cluster:\n    server: {server}\n    insecure-skip-tls-verify: true\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: envtest\n  context: {{cluster: envtest, user: admin, namespace: default}}\ncurrent-context: envtest\n"
            ),
        )
        .unwrap();

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let nss: Api<Namespace> = Api::all(client.clone());
            if let Ok(Some(_)) = nss.get_opt("default").await {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver did not come up in 60 s:\n{}",
                apiserver.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in pgbranch::api::crds() {
            crds.create(&PostParams::default(), &crd).await.unwrap();
        }
        Some(Self {
            _apiserver: apiserver,
            _etcd: etcd,
            client,
            kubeconfig,
            dir,
        })
    }

    /// Starts `pgbranch operator` as a developer would on one machine: no
    /// POD_NAME, no HOSTNAME.
    fn operator(&self, name: &str) -> (Proc, u16) {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgbranch"));
        cmd.args([
            "operator",
            "--storage",
            // Nothing listens there: no objects exist, nothing is reconciled.
            "http://127.0.0.1:9",
            "--volume-host-path",
            "/var/lib/pgbranch",
            "--lease-namespace",
            "default",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .env("KUBECONFIG", &self.kubeconfig)
        .env("RUST_LOG", "info")
        .env_remove("POD_NAME")
        .env_remove("HOSTNAME")
        .env_remove("POD_NAMESPACE");
        (
            Proc::spawn(cmd, self.dir.path().join(format!("{name}.log"))),
            port,
        )
    }

    async fn holder(&self) -> Option<String> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "default");
        let l = leases.get_opt(LEASE).await.unwrap()?;
        l.spec?.holder_identity.filter(|h| !h.is_empty())
    }
}

/// `pgbranch_leader` from the operator's /metrics (None: not answering).
async fn leading(port: u16) -> Option<bool> {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let line = body.lines().find(|l| l.starts_with("pgbranch_leader "))?;
    Some(line.trim_end().ends_with(" 1"))
}

/// Waits until `cond` holds; returns how long it took.
async fn until<F, Fut>(what: &str, limit: Duration, logs: &[&Proc], mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        if start.elapsed() > limit {
            let logs: Vec<String> = logs.iter().map(|p| p.log()).collect();
            panic!("{what}: not within {limit:?}\n{}", logs.join("\n-----\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_failover_within_15_s() {
    let Some(cp) = ControlPlane::start().await else {
        return;
    };

    // The first process leads.
    let (a, a_port) = cp.operator("a");
    until(
        "process a leads",
        Duration::from_secs(60),
        &[&a],
        || async { leading(a_port).await == Some(true) && cp.holder().await.is_some() },
    )
    .await;
    let a_id = cp.holder().await.unwrap();

    // The second one waits: it answers /metrics but does not lead, and the
    // Lease stays with the first, past a full Lease duration.
    let (b, b_port) = cp.operator("b");
    until(
        "process b answers",
        Duration::from_secs(30),
        &[&b],
        || async { leading(b_port).await.is_some() },
    )
    .await;
    let watch_until = Instant::now() + Duration::from_secs(13);
    while Instant::now() < watch_until {
        assert_eq!(
            leading(b_port).await,
            Some(false),
            "a second process leads while the first holds the Lease:\n{}",
            b.log()
        );
        assert_eq!(leading(a_port).await, Some(true), "{}", a.log());
        assert_eq!(cp.holder().await.as_deref(), Some(a_id.as_str()));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!b.log().contains("became the leader"), "{}", b.log());

    // The first stops (SIGTERM): it releases the Lease and exits cleanly;
    // the second takes over in time and keeps running.
    a.signal(nix::sys::signal::Signal::SIGTERM);
    let mut a = a;
    let status = tokio::task::spawn_blocking(move || {
        let s = a.child.wait().unwrap();
        (s, a)
    });
    let (status, a) = tokio::time::timeout(Duration::from_secs(30), status)
        .await
        .expect("process a exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "process a: {status}\n{}", a.log());
    let took = until("process b takes over", FAILOVER_LIMIT, &[&b], || async {
        leading(b_port).await == Some(true)
    })
    .await;
    eprintln!("failover after SIGTERM: {took:?}");
    let b_id = cp.holder().await.unwrap();
    assert_ne!(b_id, a_id, "the Lease must name the new leader");

    // A third process waits; the leader dies without releasing the Lease
    // (SIGKILL, like a force-deleted Pod): the third takes over once the
    // Lease expires, still within 15 s.
    let (c, c_port) = cp.operator("c");
    until(
        "process c answers",
        Duration::from_secs(30),
        &[&c],
        || async { leading(c_port).await == Some(false) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(leading(c_port).await, Some(false), "{}", c.log());
    b.signal(nix::sys::signal::Signal::SIGKILL);
    let took = until(
        "process c takes over a dead leader's Lease",
        FAILOVER_LIMIT,
        &[&c],
        || async { leading(c_port).await == Some(true) },
    )
    .await;
    eprintln!("failover after SIGKILL: {took:?}");
    let c_id = cp.holder().await.unwrap();
    assert!(c_id != b_id && c_id != a_id, "{c_id}");
    assert!(!c.log().contains("lost"), "{}", c.log());
}
