//! Tier 4 (a real control plane): read replicas
//! (`spec.compute.readReplicas`) with the real operator
//! (`controller::run()`) on a real control plane, the real storage engine
//! (copy driver) and real PostgreSQL: the primary and hot standbys
//! streaming from it, run by the test kubelet.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use pgbranch::api::{Branch, BranchSpec, ComputeSpec, LABEL_BRANCH, LABEL_ROLE};
use pgbranch::storage::{Storage, TimelineId};
use serde_json::json;
use support::world::*;

const WAIT: Duration = Duration::from_secs(120);

fn ready_with(b: &Branch, note: &str) -> bool {
    condition(b, "Ready").is_some_and(|c| c.0 == "True" && c.2.contains(note))
        && b.status.as_ref().and_then(|s| s.observed_generation) == b.metadata.generation
}

async fn set_compute(h: &World, name: &str, compute: serde_json::Value) {
    set_compute_rh(&h.client, name, compute).await;
}

async fn set_compute_rh(client: &kube::Client, name: &str, compute: serde_json::Value) {
    branches(client)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"compute": compute}})),
        )
        .await
        .expect("patch spec.compute");
}

async fn set_replicas(h: &World, name: &str, n: i32) {
    set_compute(h, name, json!({"readReplicas": n})).await;
}

/// Polls `f` until it returns `Some`; panics after [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < WAIT, "{what}: not reached in {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A session on a local port as the branch's app user.
async fn connect_port(h: &World, name: &str, port: u16) -> tokio_postgres::Client {
    let secret = format!("{name}-app");
    let user = secret_field(&h.client, &secret, "user").await;
    let pw = secret_field(&h.client, &secret, "password").await;
    let db = secret_field(&h.client, &secret, "dbname").await;
    let (c, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(&user)
        .password(&pw)
        .dbname(&db)
        .connect(any_tls())
        .await
        .unwrap_or_else(|e| panic!("connect to port {port}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

async fn count(c: &tokio_postgres::Client) -> Option<i64> {
    c.query_one("SELECT count(*) FROM items", &[])
        .await
        .ok()
        .map(|r| r.get(0))
}

async fn replica_deployments(h: &World, name: &str) -> Vec<String> {
    let api: Api<Deployment> = Api::default_namespaced(h.client.clone());
    api.list(&ListParams::default().labels(&format!("{LABEL_BRANCH}={name},{LABEL_ROLE}=replica")))
        .await
        .expect("list deployments")
        .items
        .iter()
        .map(|d| d.name_any())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_replicas_stream_from_the_primary_and_scale() {
    let Some(mut h) = World::new("standbys").await else {
        return;
    };
    h.start_operator(h.config());
    let client = &h.client;
    let spec = BranchSpec {
        compute: ComputeSpec {
            read_replicas: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    branches(client)
        .create(&PostParams::default(), &branch("main", spec))
        .await
        .expect("create main");
    let b = wait_branch(client, "main", "Ready with 1/1 replicas", |b| {
        ready_with(b, "1/1 read replicas ready")
    })
    .await;
    let tl = TimelineId::new(b.status.unwrap().timeline_id.unwrap()).unwrap();
    assert_eq!(
        secret_field(client, "main-app", "ro-host").await,
        format!("main-ro.{}.svc", h.ns)
    );

    // Rows written through <branch> appear through <branch>-ro.
    let primary = h.connect_app("main").await;
    primary
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items SELECT generate_series(1, 10);",
        )
        .await
        .expect("write on the primary");
    let user = secret_field(client, "main-app", "user").await;
    let pw = secret_field(client, "main-app", "password").await;
    let db = secret_field(client, "main-app", "dbname").await;
    let ro = h
        .connect("main-ro", &user, &pw, &db)
        .await
        .expect("connect through main-ro");
    eventually("rows on the replica", || async {
        (count(&ro).await == Some(10)).then_some(())
    })
    .await;
    let in_recovery: bool = ro
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "main-ro serves a standby");
    let err = ro
        .batch_execute("INSERT INTO items VALUES (1000)")
        .await
        .expect_err("a write through main-ro must fail");
    assert!(
        format!("{err:?}").contains("read-only transaction"),
        "{err:?}"
    );
    // The primary's Service still reaches the primary.
    let in_recovery: bool = primary
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!in_recovery);

    // Suspended: the replica is scaled to zero and keeps its data; resumed,
    // it serves again from the same data directory (not a new copy).
    let prefix = &tl.as_str()[..8];
    let r0 = format!("main-{prefix}-r0");
    let kept = h.engine.replica_data_dir(&tl, 0).join("pgbranch-test-kept");
    std::fs::write(&kept, "kept").unwrap();
    drop((primary, ro));
    set_compute(&h, "main", json!({"suspended": true})).await;
    wait_branch(client, "main", "Suspended", |b| {
        condition(b, "Ready").is_some_and(|c| c.1 == "Suspended")
            && b.status.as_ref().and_then(|s| s.observed_generation) == b.metadata.generation
    })
    .await;
    let deploys: Api<Deployment> = Api::default_namespaced(client.clone());
    eventually("the replica scaled to zero", || async {
        let d = deploys.get(&r0).await.unwrap();
        let zero = d.spec.and_then(|s| s.replicas) == Some(0);
        (zero && h.kubelet().deployment_port(&r0).is_none()).then_some(())
    })
    .await;
    assert_eq!(h.engine.list_replicas(&tl).await.unwrap().len(), 1);
    assert!(kept.exists(), "the replica's data is kept while suspended");
    set_compute(&h, "main", json!({"suspended": false})).await;
    wait_branch(client, "main", "resumed with 1/1 replicas", |b| {
        ready_with(b, "1/1 read replicas ready")
    })
    .await;
    assert!(kept.exists(), "resumed on the same data directory");
    let primary = h.connect_app("main").await;
    let ro = h
        .connect("main-ro", &user, &pw, &db)
        .await
        .expect("connect through main-ro after resume");
    assert_eq!(count(&ro).await, Some(10));

    // Two replicas, both serving.
    set_replicas(&h, "main", 2).await;
    wait_branch(client, "main", "Ready with 2/2 replicas", |b| {
        ready_with(b, "2/2 read replicas ready")
    })
    .await;
    let mut names = replica_deployments(&h, "main").await;
    names.sort();
    assert_eq!(
        names,
        vec![format!("main-{prefix}-r0"), format!("main-{prefix}-r1")]
    );
    primary
        .batch_execute("INSERT INTO items SELECT generate_series(11, 20)")
        .await
        .unwrap();
    for n in &names {
        let port = eventually(&format!("{n} running"), || async {
            h.kubelet().deployment_port(n)
        })
        .await;
        let c = connect_port(&h, "main", port).await;
        eventually(&format!("rows on {n}"), || async {
            (count(&c).await == Some(20)).then_some(())
        })
        .await;
    }
    assert_eq!(h.engine.list_replicas(&tl).await.unwrap().len(), 2);

    // Steady state: no API writes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.traffic.reset();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        h.traffic.writes().len(),
        0,
        "writes in steady state: {:#?}",
        h.traffic.writes()
    );

    // Zero: Deployments, the -ro Service and the storage replicas go.
    set_replicas(&h, "main", 0).await;
    let b = wait_branch(client, "main", "Ready without replicas", |b| {
        ready_with(b, "branch is ready") && !ready_with(b, "read replicas")
    })
    .await;
    assert!(!condition(&b, "Ready").unwrap().2.contains("replica"));
    let services: Api<Service> = Api::default_namespaced(client.clone());
    eventually("replicas removed", || async {
        let deployments = replica_deployments(&h, "main").await;
        let svc = services.get_opt("main-ro").await.unwrap();
        let stored = h.engine.list_replicas(&tl).await.unwrap();
        (deployments.is_empty() && svc.is_none() && stored.is_empty()).then_some(())
    })
    .await;
    // The primary kept serving throughout.
    assert_eq!(count(&primary).await, Some(20));
    drop((primary, ro));
    h.shutdown().await;
}

/// A branch moved to another timeline (what a restore's finalize writes)
/// gets replicas of the new data; the old timeline's replicas go, from the
/// cluster and from storage. A child of a branch with replicas has none
/// unless it asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_follow_a_timeline_change_and_are_not_inherited() {
    let Some(mut h) = World::new("standbys").await else {
        return;
    };
    h.start_operator(h.config());
    let client = &h.client;
    let api = branches(client);
    let spec = BranchSpec {
        compute: ComputeSpec {
            read_replicas: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &branch("prod", spec))
        .await
        .expect("create prod");
    let b = wait_branch(client, "prod", "Ready with 1/1 replicas", |b| {
        ready_with(b, "1/1 read replicas ready")
    })
    .await;
    let old_tl = TimelineId::new(b.status.unwrap().timeline_id.unwrap()).unwrap();
    let primary = h.connect_app("prod").await;
    primary
        .batch_execute(
            "CREATE TABLE items (id int); INSERT INTO items SELECT generate_series(1, 3);",
        )
        .await
        .unwrap();

    // A child without readReplicas: no replicas of its own.
    api.create(
        &PostParams::default(),
        &branch(
            "dev",
            BranchSpec {
                parent: Some(pgbranch::api::ParentRef {
                    branch: "prod".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
    )
    .await
    .expect("create dev");
    let dev = wait_branch(client, "dev", "Ready", |b| ready_with(b, "branch is ready")).await;
    assert!(!condition(&dev, "Ready").unwrap().2.contains("replica"));
    assert!(replica_deployments(&h, "dev").await.is_empty());
    let services: Api<Service> = Api::default_namespaced(client.clone());
    assert!(services.get_opt("dev-ro").await.unwrap().is_none());
    let dev_tl = TimelineId::new(dev.status.unwrap().timeline_id.unwrap()).unwrap();
    assert!(h.engine.list_replicas(&dev_tl).await.unwrap().is_empty());
    api.delete("dev", &Default::default()).await.unwrap();
    wait_gone(&branches(client), "dev").await;

    // Copy prod's data (rows 1-3) into a new timeline, then write row 4 on
    // the old one only.
    let su = secret_field(client, "prod-superuser", "password").await;
    let port = h.port("prod").await.unwrap();
    let copy = h
        .engine
        .create_timeline(pgbranch::storage::CreateTimeline {
            key: pgbranch::storage::OpKey::new("swap-with-replicas").unwrap(),
            source: pgbranch::storage::Source::Timeline {
                timeline: old_tl.clone(),
                point: pgbranch::storage::Point::Head,
            },
            source_connection: Some(pgbranch::storage::ConnInfo {
                host: "127.0.0.1".into(),
                port,
                user: "postgres".into(),
                password: Some(pgbranch::storage::Password(su)),
                dbname: "postgres".into(),
            }),
            label: None,
        })
        .await
        .unwrap();
    pgbranch::storage::wait::wait_timeline_ready(&h.engine, &copy.id, WAIT)
        .await
        .unwrap();
    primary
        .batch_execute("INSERT INTO items VALUES (4)")
        .await
        .unwrap();
    drop(primary);
    api.patch_status(
        "prod",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "timelineId": copy.id.to_string(),
            "history": [{
                "timelineId": old_tl.to_string(),
                "replacedBy": "restore-1",
                "replacedAt": jiff::Timestamp::now().to_string(),
            }],
        }})),
    )
    .await
    .unwrap();
    wait_branch(
        client,
        "prod",
        "Ready on the new timeline with 1/1 replicas",
        |b| ready_with(b, copy.id.as_str()) && ready_with(b, "1/1 read replicas ready"),
    )
    .await;
    assert_eq!(
        replica_deployments(&h, "prod").await,
        vec![format!("prod-{}-r0", &copy.id.as_str()[..8])]
    );
    let user = secret_field(client, "prod-app", "user").await;
    let pw = secret_field(client, "prod-app", "password").await;
    let db = secret_field(client, "prod-app", "dbname").await;
    // The -ro Service reaches a replica of the new data (rows 1-3, not 4).
    let rows = eventually("the new replica serves the new data", || async {
        let port = h
            .kubelet()
            .deployment_port(&format!("prod-{}-r0", &copy.id.as_str()[..8]))?;
        let c = connect_port(&h, "prod", port).await;
        count(&c).await
    })
    .await;
    assert_eq!(rows, 3);
    let ro = h.connect("prod-ro", &user, &pw, &db).await.unwrap();
    assert_eq!(count(&ro).await, Some(3));
    eventually(
        "the old timeline's replicas removed from storage",
        || async {
            h.engine
                .list_replicas(&old_tl)
                .await
                .unwrap()
                .is_empty()
                .then_some(())
        },
    )
    .await;
    assert_eq!(h.engine.list_replicas(&copy.id).await.unwrap().len(), 1);
    drop(ro);

    // Deleting the branch stops its replicas and removes its timeline with
    // them.
    let replica_dir = h.engine.replica_data_dir(&copy.id, 0);
    assert!(replica_dir.exists());
    api.delete("prod", &Default::default()).await.unwrap();
    wait_gone(&branches(client), "prod").await;
    assert!(matches!(
        h.engine.get_timeline(&copy.id).await,
        Err(pgbranch::storage::StorageError::NotFound { .. })
    ));
    assert!(!replica_dir.exists(), "the replica outlived its branch");
    assert!(services.get_opt("prod-ro").await.unwrap().is_none());
    h.shutdown().await;
}

/// A finalized restore onto a branch with replicas: the branch's Service
/// keeps selecting the primary (never a replica of the restored data), and
/// the branch ends with replicas of the restored data behind `-ro`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restore_gives_the_target_replicas_of_the_restored_data() {
    let Some(mut h) = World::new("standbys").await else {
        return;
    };
    h.start_operator(h.config());
    let client = h.client.clone();
    let mut prod = shop_branch("prod");
    prod.spec.compute.read_replicas = 1;
    create_branch(&client, &prod).await;
    create_branch(&client, &shop_branch("dev")).await;
    let before = wait_branch(&client, "prod", "Ready with 1/1 replicas", |b| {
        ready_with(b, "1/1 read replicas ready")
    })
    .await;
    let old_tl = before.status.unwrap().timeline_id.unwrap();
    wait_branch_ready(&client, "dev").await;
    let exec = |branch: &'static str, sql: &'static str| {
        let h = &h;
        async move {
            h.connect_app(branch)
                .await
                .batch_execute(sql)
                .await
                .unwrap()
        }
    };
    exec(
        "prod",
        "CREATE TABLE items (id int); INSERT INTO items SELECT generate_series(1, 3);",
    )
    .await;
    exec(
        "dev",
        "CREATE TABLE items (id int); INSERT INTO items SELECT generate_series(101, 105);",
    )
    .await;
    create_snapshot(
        &client,
        "dev-ready",
        pgbranch::api::SnapshotSpec {
            branch: "dev".into(),
            ..Default::default()
        },
    )
    .await;
    wait_snapshot_ready(&client, "dev-ready").await;
    create_restore(
        &client,
        "promote",
        pgbranch::api::SnapshotRestoreSpec {
            source: pgbranch::api::RestoreSource {
                snapshot: Some("dev-ready".into()),
                ..Default::default()
            },
            target: Some("prod".into()),
            finalize: true,
            preserve_under_name: None,
        },
    )
    .await;
    wait_completed(&client, "promote").await;
    let after = wait_branch(
        &client,
        "prod",
        "Ready on new data with 1/1 replicas",
        |b| {
            ready_with(b, "1/1 read replicas ready")
                && b.status.as_ref().and_then(|s| s.timeline_id.as_deref()) != Some(old_tl.as_str())
        },
    )
    .await;
    let new_tl = after.status.unwrap().timeline_id.unwrap();

    // The branch's Service reaches the primary of the restored data.
    let (user, pw, db) = app_credentials(&client, "prod").await;
    let primary = h.connect_app("prod").await;
    let in_recovery: bool = primary
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!in_recovery, "prod's Service selects a standby");
    assert_eq!(ids(&primary).await, (101..=105).collect::<Vec<_>>());
    primary
        .batch_execute("INSERT INTO items VALUES (106)")
        .await
        .expect("a write through prod");

    // -ro: a replica of the restored data, following the primary.
    let replica = format!("prod-{}-r0", &new_tl[..8]);
    let runner = h.kubelet();
    let port = eventually(&format!("{replica} running"), || async {
        runner.deployment_port(&replica)
    })
    .await;
    let ro = eventually("connect to the replica", || async {
        tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(port)
            .user(&user)
            .password(&pw)
            .dbname(&db)
            .connect(any_tls())
            .await
            .ok()
            .map(|(c, conn)| {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                c
            })
    })
    .await;
    eventually("restored rows and the new write on the replica", || async {
        let ids = ro
            .query("SELECT id FROM items ORDER BY id", &[])
            .await
            .ok()?
            .iter()
            .map(|r| r.get::<_, i32>(0))
            .collect::<Vec<_>>();
        (ids == (101..=106).collect::<Vec<_>>()).then_some(())
    })
    .await;
    let via_ro = h.connect("prod-ro", &user, &pw, &db).await.unwrap();
    let in_recovery: bool = via_ro
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "prod-ro selects a standby");

    // Scaling the replicas of a branch running a compute adopted from the
    // restore leaves its primary running.
    let started = |c: tokio_postgres::Client| async move {
        c.query_one("SELECT pg_postmaster_start_time()::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    let before = started(primary).await;
    set_compute_rh(&client, "prod", json!({"readReplicas": 2})).await;
    wait_branch(&client, "prod", "Ready with 2/2 replicas", |b| {
        ready_with(b, "2/2 read replicas ready")
    })
    .await;
    let after = started(h.connect_app("prod").await).await;
    assert_eq!(before, after, "the primary was restarted");
    drop((ro, via_ro));
    h.shutdown().await;
}
