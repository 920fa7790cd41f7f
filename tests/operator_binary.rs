//! Tier 4: the real `pgbranch operator` binary on a real control plane,
//! as its ServiceAccount with the RBAC we ship (`tests/support/binary.rs`):
//! leader election and health endpoints, a graceful stop on SIGTERM also
//! when it cannot list its kinds, one leader at a time with failover
//! within 15 s, `spec.expiresAt` refused when already past and told by an
//! Event when due, and a missing volume claim reported on the Branch.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use pgbranch::api::{Branch, BranchSpec, Snapshot, SnapshotSpec};
use serde_json::json;
use support::binary::{engine_uid, Proc};
use support::world::World;

/// A world without computes: the binaries here run no kubelet.
async fn world(name: &str) -> Option<World> {
    World::builder(name).without_computes().build().await
}

/// Storage nobody listens at: nothing gets created (leader-election tests).
const NO_STORAGE: &[&str] = &[
    "--storage",
    "http://127.0.0.1:9",
    "--volume-host-path",
    "/var/lib/pgbranch",
];

/// Polls `f` until it is `Some`; panics after 90 s with the log.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    log: &Proc,
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
            log.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether the Lease holder is the process started as `--pod-name name`
/// (its identity is the name plus a random suffix).
fn held_by(holder: Option<&str>, name: &str) -> bool {
    holder.is_some_and(|h| h.starts_with(&format!("{name}-")))
}

/// The `(reason, message)` of an object's Stalled condition when True.
fn stalled<K: serde::Serialize>(obj: &K) -> Option<(String, String)> {
    let v = serde_json::to_value(obj).ok()?;
    v["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Stalled" && c["status"] == "True")
        .map(|c| {
            (
                c["reason"].as_str().unwrap_or_default().to_string(),
                c["message"].as_str().unwrap_or_default().to_string(),
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_binary_elects_serves_health_reconciles_and_stops_on_sigterm() {
    let Some(w) = world("operator-binary").await else {
        return;
    };
    let vol = w.dir().join("operator-volume");
    let storage = format!("embedded:{}", vol.display());
    let uid = engine_uid().to_string();
    let (op, port) = w
        .operator_binary(
            "operator",
            &[
                "--storage",
                &storage,
                "--volume-host-path",
                "/srv/pgbranch",
                "--namespace",
                &w.ns,
                "--pod-name",
                "operator-0",
                "--compute-uid",
                &uid,
            ],
        )
        .await;
    let mut op = op;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    eventually("/healthz answers", &op, || async {
        let r = http.get(format!("{base}/healthz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    eventually("/readyz is ready", &op, || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    eventually("the Lease is held by operator-0", &op, || async {
        held_by(w.lease_holder().await.as_deref(), "operator-0").then_some(())
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
    let b = eventually("the Branch gets a timeline", &op, || async {
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
    op.signal(nix::sys::signal::Signal::SIGTERM);
    let status = op.wait(30).await.expect("the operator exits after SIGTERM");
    assert!(status.success(), "exit status {status}; log:\n{}", op.log());
    assert!(
        !held_by(w.lease_holder().await.as_deref(), "operator-0"),
        "the Lease was released"
    );
}

/// An operator that cannot list its kinds (its CRDs are not installed, or
/// here: its ServiceAccount has no RBAC for them, only the leader-election
/// Role) still stops on SIGTERM: kube-runtime alone would wait forever for
/// the never-filled stores of its controllers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_that_cannot_list_its_kinds_still_stops_on_sigterm() {
    let Some(w) = world("operator-no-rbac").await else {
        return;
    };
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("unprivileged".into());
    w.api::<ServiceAccount>()
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    w.grant_leader_election("unprivileged").await;
    let kubeconfig = w.kubeconfig_of("unprivileged").await;
    let mut args = NO_STORAGE.to_vec();
    args.extend(["--pod-name", "operator-0"]);
    let (mut op, _) = w.operator_binary_as("operator", &kubeconfig, &args);
    eventually("the Lease is held by operator-0", &op, || async {
        held_by(w.lease_holder().await.as_deref(), "operator-0").then_some(())
    })
    .await;
    // Let the controllers start and fail to list their kinds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    op.signal(nix::sys::signal::Signal::SIGTERM);
    let status = op
        .wait(30)
        .await
        .unwrap_or_else(|| panic!("no exit after SIGTERM; log:\n{}", op.log()));
    assert!(status.success(), "exit status {status}");
}

const FAILOVER_LIMIT: Duration = Duration::from_secs(15);

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
    let Some(w) = world("leader-election").await else {
        return;
    };

    // The first process leads.
    let (a, a_port) = w.operator_binary("a", NO_STORAGE).await;
    until(
        "process a leads",
        Duration::from_secs(60),
        &[&a],
        || async { leading(a_port).await == Some(true) && w.lease_holder().await.is_some() },
    )
    .await;
    let a_id = w.lease_holder().await.unwrap();

    // The second one waits: it answers /metrics but does not lead, and the
    // Lease stays with the first, past a full Lease duration.
    let (b, b_port) = w.operator_binary("b", NO_STORAGE).await;
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
        assert_eq!(w.lease_holder().await.as_deref(), Some(a_id.as_str()));
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
    let b_id = w.lease_holder().await.unwrap();
    assert_ne!(b_id, a_id, "the Lease must name the new leader");

    // A third process waits; the leader dies without releasing the Lease
    // (SIGKILL, like a force-deleted Pod): the third takes over once the
    // Lease expires, still within 15 s.
    let (c, c_port) = w.operator_binary("c", NO_STORAGE).await;
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
    let c_id = w.lease_holder().await.unwrap();
    assert!(c_id != b_id && c_id != a_id, "{c_id}");
    assert!(!c.log().contains("lost"), "{}", c.log());
}

fn ago(secs: i64) -> String {
    (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(secs)).to_string()
}

fn in_(secs: i64) -> String {
    (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(secs)).to_string()
}

async fn events_for(client: &kube::Client, name: &str) -> Vec<Event> {
    let api: Api<Event> = Api::default_namespaced(client.clone());
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

async fn until_true<F, Fut>(what: &str, log: &dyn Fn() -> String, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 60 s\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expires_at_in_the_past_is_refused_and_expiry_is_an_event() {
    let Some(w) = world("expiry").await else {
        return;
    };
    let client = w.client.clone();
    let mut args = NO_STORAGE.to_vec();
    args.extend(["--leader-election", "false", "--namespace", &w.ns]);
    let (op, _) = w.operator_binary("operator", &args).await;
    let log = || op.log();
    let branches: Api<Branch> = Api::default_namespaced(client.clone());
    let snapshots: Api<Snapshot> = Api::default_namespaced(client.clone());
    let pp = PostParams::default();

    // Created with an expiresAt a day ago: refused, kept, reported.
    let stale = Branch::new(
        "stale",
        BranchSpec {
            expires_at: Some(ago(86_400)),
            ..Default::default()
        },
    );
    branches.create(&pp, &stale).await.unwrap();
    let old = Snapshot::new(
        "old",
        SnapshotSpec {
            branch: "stale".into(),
            expires_at: Some(ago(86_400)),
            ..Default::default()
        },
    );
    snapshots.create(&pp, &old).await.unwrap();
    until_true("Branch stale is Stalled ExpiresAtInPast", &log, || async {
        let b = branches.get_opt("stale").await.unwrap().expect("kept");
        stalled(&b).is_some_and(|(r, m)| r == "ExpiresAtInPast" && m.contains("creation"))
    })
    .await;
    until_true("Snapshot old is Stalled ExpiresAtInPast", &log, || async {
        let s = snapshots.get_opt("old").await.unwrap().expect("kept");
        stalled(&s).is_some_and(|(r, _)| r == "ExpiresAtInPast")
    })
    .await;
    for name in ["stale", "old"] {
        until_true(&format!("a Warning Event on {name}"), &log, || async {
            events_for(&client, name).await.iter().any(|e| {
                e.reason.as_deref() == Some("ExpiresAtInPast")
                    && e.type_.as_deref() == Some("Warning")
            })
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(branches.get_opt("stale").await.unwrap().is_some());
    assert!(snapshots.get_opt("old").await.unwrap().is_some());

    // A Snapshot created to expire in a few seconds (its spec is
    // immutable), and a Branch created to expire in an hour whose expiresAt
    // is then moved to now (after its creation): both are deleted, each
    // with a Normal Event Expired.
    let temp = Snapshot::new(
        "temp",
        SnapshotSpec {
            branch: "stale".into(),
            expires_at: Some(in_(5)),
            ..Default::default()
        },
    );
    snapshots.create(&pp, &temp).await.unwrap();
    let temp_branch = Branch::new(
        "temp-branch",
        BranchSpec {
            expires_at: Some(in_(3600)),
            ..Default::default()
        },
    );
    branches.create(&pp, &temp_branch).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let now = json!({"spec": {"expiresAt": jiff::Timestamp::now().to_string()}});
    branches
        .patch("temp-branch", &PatchParams::default(), &Patch::Merge(&now))
        .await
        .unwrap();
    for name in ["temp", "temp-branch"] {
        until_true(
            &format!("a Normal Event Expired on {name}"),
            &log,
            || async {
                events_for(&client, name).await.iter().any(|e| {
                    e.reason.as_deref() == Some("Expired") && e.type_.as_deref() == Some("Normal")
                })
            },
        )
        .await;
    }
    until_true("temp and temp-branch deleted", &log, || async {
        let s = snapshots.get_opt("temp").await.unwrap();
        let b = branches.get_opt("temp-branch").await.unwrap();
        [
            s.map(|s| s.metadata.deletion_timestamp.is_some()),
            b.map(|b| b.metadata.deletion_timestamp.is_some()),
        ]
        .iter()
        .all(|d| d.unwrap_or(true))
    })
    .await;
}

/// The claim the computes mount (`--volume-pvc`).
const CLAIM: &str = "pgdata";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_volume_claim_stalls_the_branch_until_it_appears() {
    let Some(w) = world("volume-claim").await else {
        return;
    };
    let client = w.client.clone();
    let storage = format!("embedded:{}", w.dir().join("vol").display());
    let uid = engine_uid().to_string();
    let (op, _) = w
        .operator_binary(
            "operator",
            &[
                "--storage",
                &storage,
                "--volume-pvc",
                CLAIM,
                "--compute-uid",
                &uid,
                "--leader-election",
                "false",
                "--namespace",
                &w.ns,
            ],
        )
        .await;
    let branches: Api<Branch> = Api::default_namespaced(client.clone());
    let deploys: Api<Deployment> = Api::default_namespaced(client.clone());
    branches
        .create(
            &PostParams::default(),
            &Branch::new("main", BranchSpec::default()),
        )
        .await
        .unwrap();

    // No claim in the namespace: Stalled, naming it, and no compute.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let b = branches.get("main").await.unwrap();
        if let Some((reason, message)) = stalled(&b) {
            assert_eq!(reason, "VolumeClaimMissing", "{message}\n{}", op.log());
            assert!(
                message.contains(CLAIM) && message.contains(&w.ns),
                "{message}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not Stalled VolumeClaimMissing in 120 s: {:?}\n{}",
            b.status,
            op.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(deploys
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());

    // The claim appears: the branch goes on by itself (no change to it).
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": CLAIM},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "1Gi"}}
        }
    }))
    .unwrap();
    let pvcs: Api<PersistentVolumeClaim> = Api::default_namespaced(client.clone());
    pvcs.create(&PostParams::default(), &pvc).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let b = branches.get("main").await.unwrap();
        let d = deploys.list(&ListParams::default()).await.unwrap().items;
        if stalled(&b).is_none() && !d.is_empty() {
            let claim = serde_json::to_value(&d[0]).unwrap()["spec"]["template"]["spec"]["volumes"]
                .to_string();
            assert!(claim.contains(CLAIM), "{claim}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still stalled 60 s after the claim appeared: {:?}\n{}",
            b.status,
            op.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
