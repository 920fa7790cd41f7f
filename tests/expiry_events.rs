//! `spec.expiresAt` on a real kube-apiserver with the real operator binary
//! (`$KUBEBUILDER_ASSETS`; without it: "skipped" and passes).
//!
//! An expiresAt already past when a Branch or Snapshot is created (a sample
//! applied after its date) is refused: the object stays, Stalled with
//! reason ExpiresAtInPast and a Warning Event. An expiresAt that comes due
//! after the creation deletes the object, and says so in a Normal Event
//! with reason Expired in the object's namespace.

mod control_plane;

use std::time::Duration;

use control_plane::ControlPlane;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use pgbranch::api::{Branch, BranchSpec, Snapshot, SnapshotSpec};
use serde_json::json;

const NS: &str = "expiry";

fn ago(secs: i64) -> String {
    (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(secs)).to_string()
}

fn in_(secs: i64) -> String {
    (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(secs)).to_string()
}

/// The `(reason, message)` of the object's Stalled condition when True.
fn stalled<K: serde::Serialize>(obj: &K) -> Option<(String, String)> {
    let v = serde_json::to_value(obj).unwrap();
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

async fn events_for(client: &kube::Client, name: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), NS);
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

async fn eventually<F, Fut>(what: &str, log: &dyn Fn() -> String, mut f: F)
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
    let Some(cp) = ControlPlane::start().await else {
        return;
    };
    let client = cp.client.clone();
    let nss: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(NS.into());
    nss.create(&PostParams::default(), &ns).await.unwrap();
    let (op, _) = cp.operator_with(
        "operator",
        &["--leader-election", "false", "--namespace", NS],
    );
    let log = || op.log();
    let branches: Api<Branch> = Api::namespaced(client.clone(), NS);
    let snapshots: Api<Snapshot> = Api::namespaced(client.clone(), NS);
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
    eventually("Branch stale is Stalled ExpiresAtInPast", &log, || async {
        let b = branches.get_opt("stale").await.unwrap().expect("kept");
        stalled(&b).is_some_and(|(r, m)| r == "ExpiresAtInPast" && m.contains("creation"))
    })
    .await;
    eventually("Snapshot old is Stalled ExpiresAtInPast", &log, || async {
        let s = snapshots.get_opt("old").await.unwrap().expect("kept");
        stalled(&s).is_some_and(|(r, _)| r == "ExpiresAtInPast")
    })
    .await;
    for name in ["stale", "old"] {
        eventually(&format!("a Warning Event on {name}"), &log, || async {
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
        eventually(
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
    eventually("temp and temp-branch deleted", &log, || async {
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
