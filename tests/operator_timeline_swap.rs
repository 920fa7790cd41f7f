//! Tier 4 (a real control plane): a Branch moved to another timeline by
//! writing `status.timelineId` (what a restore's finalize does) keeps its
//! name, Service and Secret: the controller starts the new timeline's
//! compute, switches the Service once it is ready, stops the old compute,
//! and puts the branch's own passwords on the new data (which came from
//! another branch, with that branch's passwords).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Api;
use pgbranch::api::ANNOTATION_ADOPT_TIMELINE;
use pgbranch::api::{Branch, BranchSpec, DatabaseSpec, RoleSpec, LABEL_BRANCH, LABEL_TIMELINE};
use pgbranch::storage::wait::wait_timeline_ready;
use pgbranch::storage::{
    ConnInfo, CreateTimeline, OpKey, Password, Point, Source, Storage, TimelineId,
};
use serde_json::json;
use support::world::*;

fn shop_branch(name: &str) -> Branch {
    branch(
        name,
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
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_branch_moved_to_another_timeline_keeps_its_address_and_credentials() {
    let Some(mut h) = World::new(module_path!()).await else {
        return;
    };
    h.start_operator(h.config());
    let client = &h.client;
    let api = branches(client);
    api.create(&PostParams::default(), &shop_branch("prod"))
        .await
        .unwrap();
    api.create(&PostParams::default(), &shop_branch("dev"))
        .await
        .unwrap();
    let prod = wait_ready(client, "prod").await;
    let dev = wait_ready(client, "dev").await;
    let prod_tl = prod.status.unwrap().timeline_id.unwrap();
    let dev_tl = dev.status.unwrap().timeline_id.unwrap();

    h.connect_app("prod")
        .await
        .batch_execute(
            "CREATE TABLE items (id int); INSERT INTO items SELECT generate_series(1, 3);",
        )
        .await
        .unwrap();
    h.connect_app("dev")
        .await
        .batch_execute(
            "CREATE TABLE items (id int); INSERT INTO items SELECT generate_series(101, 105);",
        )
        .await
        .unwrap();

    // Copy dev's data into a new timeline, as a restore would.
    let dev_su = secret_field(client, "dev-superuser", "password").await;
    let dev_port = h.port("dev").await.unwrap();
    let copy = h
        .engine
        .create_timeline(CreateTimeline {
            key: OpKey::new("swap-test").unwrap(),
            source: Source::Timeline {
                timeline: TimelineId::new(dev_tl.clone()).unwrap(),
                point: Point::Head,
            },
            source_connection: Some(ConnInfo {
                host: "127.0.0.1".into(),
                port: dev_port,
                user: "postgres".into(),
                password: Some(Password(dev_su.clone())),
                dbname: "postgres".into(),
            }),
            label: Some("restore of dev onto prod".into()),
        })
        .await
        .unwrap();
    wait_timeline_ready(&h.engine, &copy.id, Duration::from_secs(120))
        .await
        .unwrap();

    let prod_app_pw = secret_field(client, "prod-app", "password").await;
    let prod_su = secret_field(client, "prod-superuser", "password").await;
    api.patch_status(
        "prod",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "timelineId": copy.id.to_string(),
            "history": [{
                "timelineId": prod_tl,
                "replacedBy": "restore-1",
                "replacedAt": jiff::Timestamp::now().to_string(),
                "backupBranch": "prod-old",
            }],
        }})),
    )
    .await
    .unwrap();

    // The Service follows once the new compute is ready.
    let services: Api<Service> = Api::default_namespaced(client.clone());
    let start = Instant::now();
    loop {
        let svc = services.get("prod").await.unwrap();
        let sel = svc.spec.unwrap().selector.unwrap();
        if sel.get(LABEL_TIMELINE) == Some(&copy.id.to_string()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "Service never switched"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let b = wait_branch(client, "prod", "Ready on the new timeline", |b| {
        condition(b, "Ready").is_some_and(|c| c.0 == "True")
            && b.status.as_ref().and_then(|s| s.timeline_id.as_deref()) == Some(copy.id.as_str())
    })
    .await;
    assert_eq!(b.status.unwrap().service.as_deref(), Some("prod"));

    // Same Secret, same password; the data is dev's; dev's passwords do not
    // work on prod, prod's do (eventually: the SQL step runs right after the
    // switch).
    assert_eq!(
        secret_field(client, "prod-app", "password").await,
        prod_app_pw
    );
    assert_eq!(
        secret_field(client, "prod-superuser", "password").await,
        prod_su
    );
    let start = Instant::now();
    let rows = loop {
        match h.connect("prod", "shop", &prod_app_pw, "shop").await {
            Ok(c) => break ids(&c).await,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "prod's password never worked: {e}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    assert_eq!(rows, (101..=105).collect::<Vec<_>>());
    assert!(h
        .connect("prod", "postgres", &dev_su, "postgres")
        .await
        .is_err());
    h.connect("prod", "postgres", &prod_su, "postgres")
        .await
        .unwrap();

    // The old compute is gone; its timeline is left for a backup branch.
    let deploys: Api<Deployment> = Api::default_namespaced(client.clone());
    let start = Instant::now();
    loop {
        let left: Vec<String> = deploys
            .list(&ListParams::default().labels(&format!("{LABEL_BRANCH}=prod")))
            .await
            .unwrap()
            .items
            .iter()
            .filter_map(|d| d.metadata.labels.as_ref()?.get(LABEL_TIMELINE).cloned())
            .collect();
        if left == vec![copy.id.to_string()] && !h.running_timelines().await.contains(&prod_tl) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "old compute left: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(h
        .engine
        .get_timeline(&TimelineId::new(prod_tl.clone()).unwrap())
        .await
        .is_ok());

    // The replaced timeline comes up as a backup branch that adopts it: its
    // own Service and Secret, prod's old rows, and its own passwords (the
    // data held prod's, found through prod's history).
    let mut backup = shop_branch("prod-old");
    backup.metadata.annotations =
        Some([(ANNOTATION_ADOPT_TIMELINE.to_string(), prod_tl.clone())].into());
    api.create(&PostParams::default(), &backup).await.unwrap();
    let b = wait_ready(client, "prod-old").await;
    assert_eq!(
        b.status.unwrap().timeline_id.as_deref(),
        Some(prod_tl.as_str())
    );
    let start = Instant::now();
    let old_rows = loop {
        let pw = secret_field(client, "prod-old-app", "password").await;
        match h.connect("prod-old", "shop", &pw, "shop").await {
            Ok(c) => break ids(&c).await,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "backup login: {e}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    assert_eq!(old_rows, vec![1, 2, 3]);
    assert_ne!(
        secret_field(client, "prod-old-app", "password").await,
        prod_app_pw
    );
    assert!(h
        .connect("prod-old", "shop", &prod_app_pw, "shop")
        .await
        .is_err());

    // A second adopter of a served timeline is refused.
    let mut thief = shop_branch("thief");
    thief.metadata.annotations =
        Some([(ANNOTATION_ADOPT_TIMELINE.to_string(), prod_tl.clone())].into());
    api.create(&PostParams::default(), &thief).await.unwrap();
    wait_stalled(client, "thief", "TimelineInUse").await;

    for n in ["prod", "dev", "prod-old", "thief"] {
        api.delete(n, &DeleteParams::default()).await.unwrap();
    }
    for n in ["prod", "dev", "prod-old", "thief"] {
        wait_gone(&branches(client), n).await;
    }
    assert!(h.engine.list_timelines().await.unwrap().is_empty());
    h.shutdown().await;
}
