//! With `--volume-pvc NAME`, a Branch whose namespace has no claim NAME is
//! Stalled `VolumeClaimMissing` (naming the claim and the namespace) before
//! any compute Deployment exists, and goes on by itself once the claim is
//! created. The real operator binary with embedded storage (real
//! PostgreSQL) on a real kube-apiserver (`$KUBEBUILDER_ASSETS`; without it:
//! "skipped" and passes). No kubelet runs: the compute is not started, the
//! test stops at its Deployment.

mod control_plane;

use std::time::Duration;

use control_plane::ControlPlane;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim};
use kube::api::{Api, ListParams, PostParams};
use pgbranch::api::{Branch, BranchSpec};
use serde_json::json;

const NS: &str = "team-a";
const CLAIM: &str = "pgdata";

/// The uid the engine runs PostgreSQL as: `postgres` under root, else us.
fn engine_uid() -> u32 {
    if nix::unistd::geteuid().is_root() {
        nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("a postgres user (scripts/setup.sh installs PostgreSQL)")
            .uid
            .as_raw()
    } else {
        nix::unistd::geteuid().as_raw()
    }
}

fn stalled(b: &Branch) -> Option<(String, String)> {
    let v = serde_json::to_value(b).unwrap();
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
async fn a_missing_volume_claim_stalls_the_branch_until_it_appears() {
    let Some(cp) = ControlPlane::start().await else {
        return;
    };
    let client = cp.client.clone();
    let nss: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(NS.into());
    nss.create(&PostParams::default(), &ns).await.unwrap();
    let vol = tempfile::tempdir().unwrap();
    let storage = format!("embedded:{}", vol.path().join("vol").display());
    let uid = engine_uid().to_string();
    let (op, _) = cp.operator_args(
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
            NS,
        ],
    );
    let branches: Api<Branch> = Api::namespaced(client.clone(), NS);
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), NS);
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
            assert!(message.contains(CLAIM) && message.contains(NS), "{message}");
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
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
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
