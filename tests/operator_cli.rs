//! Tier 4: the `pgbranch operator` binary on a real control plane, as its
//! ServiceAccount with the RBAC we ship (the operator's ClusterRole and the
//! leader-election Role): it takes the leader Lease, serves /healthz,
//! /readyz and /metrics, reconciles a Branch with the embedded engine, and
//! on SIGTERM stops, releases the Lease and exits 0.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use pgbranch::api::{Branch, BranchSpec};
use support::cluster::kubeconfig_yaml;
use support::world::World;

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

static LOG: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The shipped leader-election Role, in `ns`, bound to the ServiceAccount
/// `sa` of `ns`.
async fn grant_leader_election(w: &World, sa: &str) {
    let yaml = include_str!("../config/rbac/leader_election_role.yaml");
    let mut role: Role = serde_yaml::from_str(yaml).unwrap();
    role.metadata.namespace = Some(w.ns.clone());
    w.api::<Role>()
        .patch(
            "pgbranch-leader-election",
            &PatchParams::apply("pgbranch-tests"),
            &Patch::Apply(&role),
        )
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": format!("{sa}-leader-election")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "pgbranch-leader-election"},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": w.ns}],
    }))
    .unwrap();
    w.api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}

/// A kubeconfig file for the ServiceAccount `sa` of the world's namespace.
async fn kubeconfig_of(w: &World, sa: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let req = serde_json::from_value(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": 3600},
    }))
    .unwrap();
    let token = w
        .api::<ServiceAccount>()
        .create_token_request(sa, &PostParams::default(), &req)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let path = dir.join(format!("{sa}.kubeconfig"));
    std::fs::write(
        &path,
        kubeconfig_yaml(w.control_plane.server(), &token, &w.ns),
    )
    .unwrap();
    path
}

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
    let Some(w) = World::builder("operator-binary")
        .without_computes()
        .build()
        .await
    else {
        return;
    };
    grant_leader_election(&w, "pgbranch-operator").await;
    let dir = tempfile::Builder::new()
        .prefix("pgbranch-cli-")
        .tempdir()
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let kubeconfig = kubeconfig_of(&w, "pgbranch-operator", dir.path()).await;
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
            "--namespace",
            &w.ns,
            "--lease-namespace",
            &w.ns,
            "--pod-name",
            "operator-0",
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
    let leases: Api<Lease> = w.api();
    eventually("the Lease is held by operator-0", || async {
        let l = leases.get_opt("pgbranch-operator").await.ok()??;
        (l.spec?.holder_identity.as_deref() == Some("operator-0")).then_some(())
    })
    .await;

    // It reconciles: a root Branch gets a timeline and Ready=False (no
    // kubelet here, so its compute never becomes ready).
    let branches: Api<Branch> = w.api();
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
    assert_ne!(
        l.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("operator-0"),
        "the Lease was released"
    );
}

/// An operator that cannot list its kinds (its CRDs are not installed, or
/// here: its ServiceAccount has no RBAC for them, only the leader-election
/// Role) still stops on SIGTERM: kube-runtime alone would wait forever for
/// the never-filled stores of its controllers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_that_cannot_list_its_kinds_still_stops_on_sigterm() {
    let Some(w) = World::builder("operator-no-rbac")
        .without_computes()
        .build()
        .await
    else {
        return;
    };
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("unprivileged".into());
    w.api::<ServiceAccount>()
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    grant_leader_election(&w, "unprivileged").await;
    let dir = tempfile::Builder::new()
        .prefix("pgbranch-cli-")
        .tempdir()
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let kubeconfig = kubeconfig_of(&w, "unprivileged", dir.path()).await;
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
            "--namespace",
            &w.ns,
            "--lease-namespace",
            &w.ns,
            "--pod-name",
            "operator-0",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("operator.log")).unwrap())
        .spawn()
        .unwrap();
    let mut guard = Guard(Some(child));
    let leases: Api<Lease> = w.api();
    eventually("the Lease is held by operator-0", || async {
        let l = leases.get_opt("pgbranch-operator").await.ok()??;
        (l.spec?.holder_identity.as_deref() == Some("operator-0")).then_some(())
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
