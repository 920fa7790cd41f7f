//! Tier 3: the operator killed in the middle of creating a branch and
//! started again finishes the job with the same timeline (idempotent by the
//! Branch UID), the child still gets its own passwords, and a branch created
//! while no operator ran is picked up. Status is a cache: a fresh operator
//! on Ready branches makes no writes.

mod support;

use std::time::Duration;

use kube::api::{DeleteParams, PostParams};
use kube::CustomResourceExt;
use pgbranch::api::{Branch, BranchSpec, DatabaseSpec, ParentRef, RoleSpec};
use pgbranch::storage::Storage;
use support::apiserver::ApiServer;
use support::branch_scenario::{
    assert_auth_fails, branch, branches, condition, connect_app, secret_field, wait_branch,
    wait_gone, wait_ready, Harness, NS,
};

fn child(name: &str) -> Branch {
    branch(
        name,
        BranchSpec {
            parent: Some(ParentRef {
                branch: "main".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_operator_resumes_without_duplicates_or_writes() {
    let server = ApiServer::new();
    server.install_crd(&Branch::crd());
    server.create_namespace(NS);
    let mut h = Harness::start(server.client()).await;
    let client = h.client.clone();
    let api = branches(&client);
    api.create(
        &PostParams::default(),
        &branch(
            "main",
            BranchSpec {
                databases: vec![DatabaseSpec {
                    name: "shop".into(),
                    owner: Some("shop".into()),
                }],
                roles: vec![RoleSpec {
                    name: "shop".into(),
                }],
                ..Default::default()
            },
        ),
    )
    .await
    .unwrap();
    wait_ready(&client, "main").await;

    // Crash while the child is half done (timeline recorded, not Ready).
    api.create(&PostParams::default(), &child("dev"))
        .await
        .unwrap();
    wait_branch(&client, "dev", "a timeline, not Ready yet", |b| {
        b.status
            .as_ref()
            .and_then(|s| s.timeline_id.as_ref())
            .is_some()
            && condition(b, "Ready").is_some_and(|c| c.0 == "False")
    })
    .await;
    h.crash_operator().await;

    // A branch created while no operator runs.
    api.create(&PostParams::default(), &child("qa"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;

    h.start_operator();
    let dev = wait_ready(&client, "dev").await;
    wait_ready(&client, "qa").await;
    assert_eq!(
        h.engine.list_timelines().await.unwrap().len(),
        3,
        "one timeline per branch, none duplicated by the restart"
    );
    assert!(dev.status.unwrap().timeline_id.is_some());
    let main_pw = secret_field(&client, "main-app", "password").await;
    for c in ["dev", "qa"] {
        assert_ne!(
            secret_field(&client, &format!("{c}-app"), "password").await,
            main_pw
        );
        assert_auth_fails(&h, c, "shop", &main_pw, "shop").await;
        connect_app(&h, c)
            .await
            .query("SELECT 1", &[])
            .await
            .unwrap();
    }

    // A fresh operator over Ready branches: reconciles, no writes.
    h.crash_operator().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.reset_counts();
    h.start_operator();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(h.metrics.reconcile_count("Branch") >= 6);
    assert_eq!(server.write_count(), 0, "{:#?}", server.writes());

    for n in ["dev", "qa"] {
        api.delete(n, &DeleteParams::default()).await.unwrap();
    }
    for n in ["dev", "qa"] {
        wait_gone(&client, n).await;
    }
    api.delete("main", &DeleteParams::default()).await.unwrap();
    wait_gone(&client, "main").await;
    assert!(h.engine.list_timelines().await.unwrap().is_empty());
    h.shutdown().await;
}
