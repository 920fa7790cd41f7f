//! The Branch lifecycle with the real operator (`controller::run()`) on a
//! real control plane (kube-apiserver + kube-controller-manager), the real
//! storage engine (copy driver in a temp dir) and real PostgreSQL computes
//! run by the test kubelet: root, children at head and in the past, own
//! passwords, SQL-applied spec changes, steady state, suspend, expiry, bad
//! input, foreign objects, protection and deletion rules.

mod support;

use support::branch_scenario;
use support::world::World;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn branch_lifecycle_on_real_postgres() {
    let Some(mut w) = World::new("branch-lifecycle").await else {
        return;
    };
    w.start_operator(w.config());
    branch_scenario::run(&w).await;
    w.shutdown().await;
}

/// What a real apiserver does now and then, injected on the operator's
/// client: status writes refused with 409 Conflict, Deployment and Secret
/// writes failing with 500, and every watch stream cut. The operator
/// retries, re-reads and re-watches: the branch becomes Ready, a later
/// spec change is still seen and applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_rides_out_conflicts_server_errors_and_dropped_watches() {
    use pgbranch::api::{Branch, BranchSpec, DatabaseSpec, RoleSpec};
    use support::traffic::Fault;
    use support::world::*;

    let Some(mut w) = World::new("faults").await else {
        return;
    };
    w.traffic.inject(
        Fault::new("patch", "branches")
            .subresource("status")
            .code(409)
            .times(3),
    );
    w.traffic
        .inject(Fault::new("patch", "deployments").code(500).times(2));
    w.traffic
        .inject(Fault::new("patch", "secrets").code(500).times(2));
    w.start_operator(w.config());
    let cut = {
        let t = w.traffic.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
                t.break_watches();
            }
        })
    };
    create_branch(&w.client, &shop_branch("main")).await;
    wait_ready(&w.client, "main").await;
    assert_eq!(
        w.traffic.faults_pending(),
        0,
        "every injected fault was hit"
    );
    let injected: Vec<_> = w
        .traffic
        .requests()
        .into_iter()
        .filter(|r| r.injected)
        .map(|r| (r.resource, r.code))
        .collect();
    assert_eq!(injected.len(), 7, "{injected:?}");
    let watches = w
        .traffic
        .requests()
        .iter()
        .filter(|r| r.verb == "watch" && r.resource == "branches")
        .count();
    assert!(
        watches >= 2,
        "the Branch watch was cut and restarted ({watches} watches)"
    );

    // A change made while watches keep being cut is still applied.
    let api = branches(&w.client);
    let mut b: Branch = api.get("main").await.unwrap();
    b.spec = BranchSpec {
        databases: vec![
            DatabaseSpec {
                name: "shop".into(),
                owner: Some("shop".into()),
            },
            DatabaseSpec {
                name: "reports".into(),
                owner: Some("shop".into()),
            },
        ],
        roles: vec![RoleSpec {
            name: "shop".into(),
        }],
        ..b.spec
    };
    api.replace("main", &Default::default(), &b).await.unwrap();
    wait_ready(&w.client, "main").await;
    let pw = secret_field(&w.client, "main-app", "password").await;
    w.connect("main", "shop", &pw, "reports")
        .await
        .expect("the database added under faults exists");
    cut.abort();
    w.shutdown().await;
}

/// Hand edits of what a branch owns are put back within seconds, with an
/// Event on the Branch naming what was reverted: the Service's selector
/// (`kubectl edit svc main`), the compute Deployment's image, a Secret's
/// host. What the operator does not set (a label someone adds) stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hand_edits_of_owned_objects_are_reverted_with_an_event() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Secret, Service};
    use k8s_openapi::api::events::v1::Event;
    use kube::api::{ListParams, Patch, PatchParams};
    use kube::ResourceExt;
    use serde_json::json;
    use support::world::*;

    let Some(mut w) = World::new("drift").await else {
        return;
    };
    w.start_operator(w.config());
    create_branch(&w.client, &shop_branch("main")).await;
    let b = wait_ready(&w.client, "main").await;
    let tl = b.status.unwrap().timeline_id.unwrap();
    let services = w.api::<Service>();
    let deployments = w.api::<Deployment>();
    let secrets = w.api::<Secret>();
    let pp = PatchParams::default();

    // kubectl edit svc main: the selector points at nothing.
    services
        .patch(
            "main",
            &pp,
            &Patch::Merge(json!({
                "metadata": {"labels": {"team": "payments"}},
                "spec": {"selector": {"pgbranch.dev/timeline": "0000000000000000"}},
            })),
        )
        .await
        .unwrap();
    let svc = eventually(15, "the Service selector put back", || async {
        let s = services.get("main").await.ok()?;
        let sel = s.spec.clone()?.selector?;
        (sel.get("pgbranch.dev/timeline") == Some(&tl)).then_some(s)
    })
    .await;
    assert_eq!(
        svc.labels().get("team").map(String::as_str),
        Some("payments"),
        "a label the operator does not set is left alone"
    );
    w.connect_app("main")
        .await
        .query("SELECT 1", &[])
        .await
        .unwrap();

    // The compute's image and the Secret's host.
    let deploy = deployments
        .list(&ListParams::default().labels("pgbranch.dev/branch=main"))
        .await
        .unwrap()
        .items
        .into_iter()
        .next()
        .expect("main's compute Deployment");
    let image = deploy
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image
        .clone();
    deployments
        .patch(
            &deploy.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([{"op": "replace",
                    "path": "/spec/template/spec/containers/0/image", "value": "postgres:99"}]))
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    secrets
        .patch(
            "main-app",
            &pp,
            &Patch::Merge(json!({"stringData": {"host": "elsewhere.example"}})),
        )
        .await
        .unwrap();
    eventually(15, "the image and the host put back", || async {
        let d = deployments.get(&deploy.name_any()).await.ok()?;
        let img = d.spec?.template.spec?.containers[0].image.clone();
        let host = secret_field(&w.client, "main-app", "host").await;
        (img == image && host == format!("main.{}.svc", w.ns)).then_some(())
    })
    .await;

    // Each revert is told on the Branch.
    let events = w.api::<Event>();
    let notes: Vec<String> = eventually(15, "DriftReverted events", || async {
        let notes: Vec<String> = events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("DriftReverted"))
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("main"))
            .filter_map(|e| e.note)
            .collect();
        (notes.len() >= 3).then_some(notes)
    })
    .await;
    for want in [
        "Service main",
        "spec.selector",
        "containers[0].image",
        "Secret main-app",
    ] {
        assert!(
            notes.iter().any(|n| n.contains(want)),
            "{want} in {notes:#?}"
        );
    }

    // And then nothing more to do.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    w.traffic.reset();
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert!(w.traffic.writes().is_empty(), "{:#?}", w.traffic.writes());
    w.shutdown().await;
}
