//! Tier 3: the `pgbranch operator` binary against the in-process API server
//! served on a local port: it takes the leader Lease, serves /healthz,
//! /readyz and /metrics, reconciles a Branch with the embedded engine, and
//! on SIGTERM stops, releases the Lease and exits 0.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::PostParams;
use kube::{Api, CustomResourceExt};
use pgbranch::api::{Branch, BranchSpec};
use support::apiserver::ApiServer;

/// Kills the operator if the test fails before it exits.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The uid the embedded engine runs PostgreSQL as (`postgres` under root,
/// else us): computes must run as it, or the operator refuses to start.
fn engine_uid() -> String {
    if nix::unistd::geteuid().is_root() {
        nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("a postgres user")
            .uid
            .to_string()
    } else {
        nix::unistd::geteuid().to_string()
    }
}

/// This operator's identity: its pod name plus a random suffix.
fn is_operator_0(holder: Option<&str>) -> bool {
    holder.is_some_and(|h| h.starts_with("operator-0-"))
}

static LOG: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{what} did not happen; operator log:\n{}",
            LOG.get()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_binary_elects_serves_health_reconciles_and_stops_on_sigterm() {
    let server = ApiServer::new();
    server.install_crd(&Branch::crd());
    let served = server.serve().await;
    let dir = tempfile::Builder::new()
        .prefix("pgbranch-cli-")
        .tempdir()
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, served.kubeconfig_yaml()).unwrap();
    let _ = LOG.set(dir.path().join("operator.log"));
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_pgbranch"))
        .args([
            "operator",
            "--storage",
            &format!("embedded:{}", dir.path().join("volume").display()),
            "--volume-host-path",
            "/srv/pgbranch",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--lease-namespace",
            "default",
            "--pod-name",
            "operator-0",
            "--compute-uid",
            &engine_uid(),
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("operator.log")).unwrap())
        .spawn()
        .unwrap();
    let mut guard = Guard(Some(child));
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");

    eventually("/healthz answers", || async {
        let r = http.get(format!("{base}/healthz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    eventually("/readyz is ready", || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let client = server.client();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    eventually("the Lease is held by operator-0", || async {
        let l = leases.get_opt("pgbranch-operator").await.ok()??;
        is_operator_0(l.spec?.holder_identity.as_deref()).then_some(())
    })
    .await;

    // It reconciles: a root Branch gets a timeline and Ready=False (no
    // kubelet here, so its compute never becomes ready).
    let branches: Api<Branch> = Api::namespaced(client.clone(), "default");
    branches
        .create(
            &PostParams::default(),
            &Branch::new("solo", BranchSpec::default()),
        )
        .await
        .unwrap();
    let b = eventually("the Branch gets a timeline", || async {
        let b = branches.get("solo").await.ok()?;
        b.status.as_ref()?.timeline_id.as_ref()?;
        Some(b)
    })
    .await;
    let ready = b
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pgbranch_reconciles_total{kind=\"Branch\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("pgbranch_reconcile_duration_seconds"));

    // SIGTERM: graceful stop, Lease released, exit 0.
    let mut child = guard.0.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("operator did not exit after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        std::fs::read_to_string(dir.path().join("operator.log")).unwrap_or_default()
    );
    let l = leases.get("pgbranch-operator").await.unwrap();
    assert!(
        !is_operator_0(l.spec.and_then(|s| s.holder_identity).as_deref()),
        "the Lease was released"
    );
    drop(served);
}

/// An operator started before its CRDs are installed (or without RBAC to
/// list them) still stops on SIGTERM: kube-runtime alone would wait forever
/// for the never-filled stores of its controllers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_without_crds_still_stops_on_sigterm() {
    let server = ApiServer::new();
    let served = server.serve().await;
    let dir = tempfile::Builder::new()
        .prefix("pgbranch-cli-")
        .tempdir()
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, served.kubeconfig_yaml()).unwrap();
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_pgbranch"))
        .args([
            "operator",
            "--storage",
            &format!("embedded:{}", dir.path().join("volume").display()),
            "--volume-host-path",
            "/srv/pgbranch",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--lease-namespace",
            "default",
            "--pod-name",
            "operator-0",
            "--compute-uid",
            &engine_uid(),
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("operator.log")).unwrap())
        .spawn()
        .unwrap();
    let mut guard = Guard(Some(child));
    let leases: Api<Lease> = Api::namespaced(server.client(), "default");
    eventually("the Lease is held by operator-0", || async {
        let l = leases.get_opt("pgbranch-operator").await.ok()??;
        is_operator_0(l.spec?.holder_identity.as_deref()).then_some(())
    })
    .await;
    // Let the controllers start and fail to list their kinds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut child = guard.0.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let log = std::fs::read_to_string(dir.path().join("operator.log")).unwrap_or_default();
            panic!("operator without CRDs did not exit after SIGTERM; log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "exit status {status}");
}
