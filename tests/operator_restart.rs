//! Tier 4 (a real control plane): the operator killed in the middle of
//! creating a branch and started again finishes the job with the same
//! timeline (idempotent by the Branch UID), the child still gets its own
//! passwords, and a branch created while no operator ran is picked up.
//! Status is a cache: a fresh operator on Ready branches makes no writes.

mod support;

use std::time::Duration;

use kube::api::{DeleteParams, PostParams};
use pgbranch::api::{Branch, BranchSpec, DatabaseSpec, ParentRef, RoleSpec};
use pgbranch::storage::Storage;
use support::world::*;

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
    let Some(mut h) = World::new(module_path!()).await else {
        return;
    };
    h.start_operator(h.config());
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

    h.start_operator(h.config());
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
        h.connect_app(c).await.query("SELECT 1", &[]).await.unwrap();
    }

    // A fresh operator over Ready branches: reconciles, no writes.
    h.crash_operator().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.traffic.reset();
    h.start_operator(h.config());
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(h.metrics().reconcile_count("Branch") >= 6);
    assert_eq!(h.traffic.writes().len(), 0, "{:#?}", h.traffic.writes());

    for n in ["dev", "qa"] {
        api.delete(n, &DeleteParams::default()).await.unwrap();
    }
    for n in ["dev", "qa"] {
        wait_gone(&api, n).await;
    }
    api.delete("main", &DeleteParams::default()).await.unwrap();
    wait_gone(&api, "main").await;
    assert!(h.engine.list_timelines().await.unwrap().is_empty());
    h.shutdown().await;
}
