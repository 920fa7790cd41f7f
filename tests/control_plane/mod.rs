//! A real etcd + kube-apiserver for tests that run the real `pgbranch
//! operator` binary against it (started from `$KUBEBUILDER_ASSETS`; `None`
//! with a "skipped" notice without it), with the CRDs installed and a
//! kubeconfig file for the binaries. Self-contained on purpose (the shared
//! harness in tests/support is being reworked).

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};

pub const LEASE: &str = "pgbranch-operator";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// A child process killed when dropped, with its output in a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Self {
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
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
pub struct ControlPlane {
    _apiserver: Proc,
    _etcd: Proc,
    pub client: kube::Client,
    pub kubeconfig: PathBuf,
    pub dir: tempfile::TempDir,
}

impl ControlPlane {
    pub async fn start() -> Option<Self> {
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
    pub fn operator(&self, name: &str) -> (Proc, u16) {
        self.operator_with(name, &[])
    }

    /// [`Self::operator`] with more flags, on the default storage and volume
    /// (nothing listens at that storage: nothing gets created).
    pub fn operator_with(&self, name: &str, extra: &[&str]) -> (Proc, u16) {
        let mut args = vec![
            "--storage",
            "http://127.0.0.1:9",
            "--volume-host-path",
            "/var/lib/pgbranch",
        ];
        args.extend_from_slice(extra);
        self.operator_args(name, &args)
    }

    /// `pgbranch operator ARGS` (plus the Lease namespace and a metrics
    /// port, returned), as a developer would start it on one machine: no
    /// POD_NAME, no HOSTNAME.
    pub fn operator_args(&self, name: &str, args: &[&str]) -> (Proc, u16) {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgbranch"));
        cmd.arg("operator")
            .args(args)
            .args([
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

    pub async fn holder(&self) -> Option<String> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "default");
        let l = leases.get_opt(LEASE).await.unwrap()?;
        l.spec?.holder_identity.filter(|h| !h.is_empty())
    }
}
