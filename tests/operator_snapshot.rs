//! Tier 4 (a real control plane): the Snapshot controller and
//! `Branch.spec.fromSnapshot` with the real operator, engine (copy driver)
//! and PostgreSQL.

mod support;

use std::time::Duration;

use kube::api::DeleteParams;
use pgbranch::api::{BranchSpec, DeletionPolicy, SnapshotSpec};
use pgbranch::storage::Storage;
use support::world::*;

fn snap(branch: &str) -> SnapshotSpec {
    SnapshotSpec {
        branch: branch.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_are_taken_once_restored_into_branches_limited_and_expired() {
    let Some(mut h) = World::new(module_path!()).await else {
        return;
    };
    h.start_operator(pgbranch::controller::Config {
        snapshot_quota: 2,
        ..h.config()
    });
    let client = h.client.clone();
    create_branch(&client, &shop_branch("prod")).await;
    wait_branch_ready(&client, "prod").await;
    h.connect_app("prod")
        .await
        .batch_execute(
            "CREATE TABLE items (id int); INSERT INTO items SELECT generate_series(1, 3);",
        )
        .await
        .unwrap();

    // A snapshot at head (the compute is CHECKPOINTed first: the rows are in).
    create_snapshot(&client, "before", snap("prod")).await;
    let s = wait_snapshot_ready(&client, "before").await;
    let st = s.status.clone().unwrap();
    let prod = branches(&client).get("prod").await.unwrap();
    assert_eq!(st.timeline_id, prod.status.as_ref().unwrap().timeline_id);
    assert!(st.lsn.is_some() && st.created_at.is_some());
    assert!(st.size_bytes.unwrap() > 0);
    assert_eq!(st.pg_major, prod.status.as_ref().unwrap().pg_major);
    assert_eq!(st.observed_generation, s.metadata.generation);
    let id = st.snapshot_id.clone().unwrap();
    assert_eq!(h.engine.list_snapshots().await.unwrap().len(), 1);

    h.connect_app("prod")
        .await
        .batch_execute("INSERT INTO items VALUES (4)")
        .await
        .unwrap();

    // A branch from the snapshot has the rows as they were, its own
    // passwords, and works through its own Service.
    let b = pgbranch::api::Branch::new(
        "from-before",
        BranchSpec {
            from_snapshot: Some("before".into()),
            roles: vec![pgbranch::api::RoleSpec {
                name: "shop".into(),
            }],
            databases: vec![pgbranch::api::DatabaseSpec {
                name: "shop".into(),
                owner: Some("shop".into()),
            }],
            ..Default::default()
        },
    );
    create_branch(&client, &b).await;
    wait_branch_ready(&client, "from-before").await;
    assert_eq!(
        ids(&h.connect_app("from-before").await).await,
        vec![1, 2, 3]
    );
    assert_eq!(ids(&h.connect_app("prod").await).await, vec![1, 2, 3, 4]);
    assert_ne!(
        secret_field(&client, "from-before-superuser", "password").await,
        secret_field(&client, "prod-superuser", "password").await
    );
    let prod_su = secret_field(&client, "prod-superuser", "password").await;
    assert!(
        h.connect("from-before", "postgres", &prod_su, "postgres")
            .await
            .is_err(),
        "a branch from prod's snapshot must not accept prod's superuser password"
    );

    // Quota 2: the third snapshot is Stalled and nothing is taken.
    create_snapshot(&client, "second", snap("prod")).await;
    wait_snapshot_ready(&client, "second").await;
    create_snapshot(&client, "third", snap("prod")).await;
    let third = wait_snapshot(&client, "third", "Stalled SnapshotQuotaExceeded", |s| {
        s.status.as_ref().is_some_and(|st| {
            cond(&st.conditions, "Stalled")
                .is_some_and(|c| c.0 == "True" && c.1 == "SnapshotQuotaExceeded")
        })
    })
    .await;
    let tst = third.status.unwrap();
    assert!(tst.snapshot_id.is_none() && !tst.ready_to_use);
    assert_eq!(cond(&tst.conditions, "Ready").unwrap().0, "False");
    assert_eq!(h.engine.list_snapshots().await.unwrap().len(), 2);

    // Deleting one (deletionPolicy Delete) frees the stored snapshot and
    // the place: the third is taken.
    let api = snapshots(&client);
    api.delete("second", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&api, "second").await;
    wait_snapshot_ready(&client, "third").await;
    assert_eq!(h.engine.list_snapshots().await.unwrap().len(), 2);

    // Bad branch, bad point: Stalled with a reason, nothing taken.
    api.delete("third", &DeleteParams::default()).await.unwrap();
    wait_gone(&api, "third").await;
    create_snapshot(&client, "nobranch", snap("nope")).await;
    create_snapshot(
        &client,
        "ancient",
        SnapshotSpec {
            timestamp: Some("2001-01-01T00:00:00Z".into()),
            ..snap("prod")
        },
    )
    .await;
    for (name, reason) in [
        ("nobranch", "BranchNotFound"),
        ("ancient", "PointOutsideRestoreWindow"),
    ] {
        wait_snapshot(&client, name, reason, |s| {
            s.status.as_ref().is_some_and(|st| {
                cond(&st.conditions, "Stalled").is_some_and(|c| c.0 == "True" && c.1 == reason)
            })
        })
        .await;
    }
    api.delete("nobranch", &DeleteParams::default())
        .await
        .unwrap();
    api.delete("ancient", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&api, "nobranch").await;
    wait_gone(&api, "ancient").await;
    assert_eq!(h.engine.list_snapshots().await.unwrap().len(), 1);

    // expiresAt with Retain: the object goes when due, the stored snapshot stays.
    let soon = (jiff::Timestamp::now() + Duration::from_secs(3)).to_string();
    create_snapshot(
        &client,
        "kept",
        SnapshotSpec {
            expires_at: Some(soon),
            deletion_policy: DeletionPolicy::Retain,
            ..snap("prod")
        },
    )
    .await;
    wait_gone(&api, "kept").await;
    assert_eq!(h.engine.list_snapshots().await.unwrap().len(), 2);

    // The first snapshot still backs nothing running: deleting it deletes it.
    branches(&client)
        .delete("from-before", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&branches(&client), "from-before").await;
    api.delete("before", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&api, "before").await;
    let left = h.engine.list_snapshots().await.unwrap();
    assert_eq!(left.len(), 1);
    assert_ne!(left[0].id.to_string(), id);
    h.shutdown().await;
}
