//! Tier 4 (a real control plane): a Branch without a refresh schedule
//! costs the refresh controller nothing — no list of the namespace's
//! SnapshotRestores on each of its changes. At 10,000 Branches those lists
//! were an eighth of the operator's requests (`benches/control_plane`).

mod support;

use std::time::Duration;

use support::world::{wait_ready, World};

#[tokio::test]
async fn a_branch_without_refresh_makes_the_refresh_controller_list_nothing() {
    let Some(mut w) = World::builder("refresh-idle")
        .without_computes()
        .build()
        .await
    else {
        return;
    };
    w.start_operator(w.config());
    // The controllers' own first lists are done before the branch exists.
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.traffic.reset();

    w.branch("plain", None).await;
    wait_ready(&w.client, "plain").await;
    // Its later changes (finalizer, status) have been seen by now.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let lists: Vec<_> = w
        .traffic
        .requests()
        .into_iter()
        .filter(|r| r.verb == "list" && r.resource == "snapshotrestores")
        .collect();
    assert!(
        lists.is_empty(),
        "a branch without spec.refresh made the operator list SnapshotRestores {} times",
        lists.len()
    );
    w.shutdown().await;
}
