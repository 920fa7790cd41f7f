//! Tier 4 (a real control plane): the SnapshotRestore controller with the
//! real operator, engine (copy driver) and PostgreSQL — the seeds'
//! workflows: promotion of a dev snapshot onto prod with rollback and a
//! refresh of dev, a multi-step restore with preview, and a branch restored
//! to its own past; what is refused (TargetChanged, ServiceNotOwned,
//! NameTaken, PgMajorMismatch, a user's adopt annotation); the operator
//! stopped after each finalize step.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};

use kube::{Api, ResourceExt};
use pgbranch::api::{
    RestorePhase, RestoreSource, SnapshotRestore, SnapshotRestoreSpec, SnapshotSpec,
    LABEL_RESTORE_BACKUP_OF, LABEL_TIMELINE,
};
use pgbranch::storage::Storage;
use serde_json::json;
use support::world::*;

fn from_snapshot(snapshot: &str, target: &str, finalize: bool) -> SnapshotRestoreSpec {
    SnapshotRestoreSpec {
        source: RestoreSource {
            snapshot: Some(snapshot.into()),
            ..Default::default()
        },
        target: Some(target.into()),
        finalize,
        preserve_under_name: None,
    }
}

fn phase(r: &SnapshotRestore) -> Option<RestorePhase> {
    r.status.as_ref().and_then(|s| s.phase)
}

/// Connects through a Service with a fixed set of credentials in a loop and
/// records the longest stretch during which it could not run `SELECT 1`.
struct ClientLoop {
    stop: Arc<AtomicBool>,
    drops: Arc<std::sync::atomic::AtomicUsize>,
    longest: Arc<Mutex<Duration>>,
    task: tokio::task::JoinHandle<()>,
}

impl ClientLoop {
    fn start(h: &World, service: &str, creds: (String, String, String)) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let longest = Arc::new(Mutex::new(Duration::ZERO));
        let drops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s, l, d) = (stop.clone(), longest.clone(), drops.clone());
        let runner = h.kubelet().resolver();
        let ns = h.ns.clone();
        let service = service.to_string();
        let task = tokio::spawn(async move {
            use pgbranch::controller::ComputeResolver;
            let mut down_since: Option<Instant> = None;
            let mut conn: Option<tokio_postgres::Client> = None;
            while !s.load(Ordering::Relaxed) {
                let mut ok = false;
                if let Some(c) = &conn {
                    ok = c.simple_query("SELECT 1").await.is_ok();
                    if !ok {
                        // The connection dropped: down from now until a
                        // new one answers.
                        conn = None;
                        d.fetch_add(1, Ordering::Relaxed);
                        down_since.get_or_insert_with(Instant::now);
                    }
                }
                if !ok {
                    if let Ok((host, port)) = runner.resolve(&ns, &service).await {
                        let r = tokio_postgres::Config::new()
                            .host(&host)
                            .port(port)
                            .user(&creds.0)
                            .password(&creds.1)
                            .dbname(&creds.2)
                            .connect_timeout(Duration::from_secs(2))
                            .connect(support::world::any_tls())
                            .await;
                        if let Ok((c, cn)) = r {
                            tokio::spawn(async move {
                                let _ = cn.await;
                            });
                            ok = c.simple_query("SELECT 1").await.is_ok();
                            conn = Some(c);
                        }
                    }
                }
                match (ok, down_since) {
                    (false, None) => down_since = Some(Instant::now()),
                    (true, Some(t)) => {
                        // `t` may be from a dropped connection this round.
                        let d = t.elapsed();
                        let mut m = l.lock().unwrap();
                        if d > *m {
                            *m = d;
                        }
                        down_since = None;
                    }
                    _ => {}
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Some(t) = down_since {
                let mut m = l.lock().unwrap();
                *m = (*m).max(t.elapsed());
            }
        });
        Self {
            stop,
            drops,
            longest,
            task,
        }
    }

    /// (longest time without a working connection, connections dropped).
    async fn finish(self) -> (Duration, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let d = *self.longest.lock().unwrap();
        (d, self.drops.load(Ordering::Relaxed))
    }
}

/// Rows `ids` in a new table `items` of branch `dev`, then the Snapshot
/// `dev-snap` of it, Ready.
async fn dev_snapshot_with_items(h: &World, ids: std::ops::RangeInclusive<i32>) {
    exec(
        h,
        "dev",
        &format!(
            "CREATE TABLE items (id int); INSERT INTO items SELECT generate_series({}, {});",
            ids.start(),
            ids.end()
        ),
    )
    .await;
    create_snapshot(
        &h.client,
        "dev-snap",
        SnapshotSpec {
            branch: "dev".into(),
            ..Default::default()
        },
    )
    .await;
    wait_snapshot_ready(&h.client, "dev-snap").await;
}

async fn exec(h: &World, branch: &str, sql: &str) {
    h.connect_app(branch)
        .await
        .batch_execute(sql)
        .await
        .unwrap();
}

/// Exactly one compute per timeline, and the Service of `branch` selects a
/// running one.
async fn assert_one_compute_per_timeline(h: &World) {
    let deploys: Api<Deployment> = Api::default_namespaced(h.client.clone());
    let list = deploys.list(&ListParams::default()).await.unwrap();
    let mut tls: Vec<String> = list
        .items
        .iter()
        .filter(|d| d.metadata.deletion_timestamp.is_none())
        .filter_map(|d| d.metadata.labels.as_ref()?.get(LABEL_TIMELINE).cloned())
        .collect();
    let n = tls.len();
    tls.sort();
    tls.dedup();
    assert_eq!(tls.len(), n, "two Deployments on one timeline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promotion_rollback_and_refresh() {
    let Some(mut h) = World::new(module_path!()).await else {
        return;
    };
    h.start_operator(h.config());
    let client = h.client.clone();
    create_branch(&client, &shop_branch("prod")).await;
    create_branch(&client, &shop_branch("dev")).await;
    wait_branch_ready(&client, "prod").await;
    wait_branch_ready(&client, "dev").await;
    exec(
        &h,
        "prod",
        "CREATE TABLE items (id int); INSERT INTO items SELECT generate_series(1, 3);",
    )
    .await;
    exec(
        &h,
        "dev",
        "CREATE TABLE items (id int); INSERT INTO items SELECT generate_series(101, 105);",
    )
    .await;

    for (name, branch) in [("prod-rollback-point", "prod"), ("dev-ready", "dev")] {
        create_snapshot(
            &client,
            name,
            SnapshotSpec {
                branch: branch.into(),
                ..Default::default()
            },
        )
        .await;
    }
    wait_snapshot_ready(&client, "prod-rollback-point").await;
    wait_snapshot_ready(&client, "dev-ready").await;

    // A child of prod's current data: re-parented to the backup by status.
    let feature = pgbranch::api::Branch::new(
        "feature",
        pgbranch::api::BranchSpec {
            parent: Some(pgbranch::api::ParentRef {
                branch: "prod".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    create_branch(&client, &feature).await;
    wait_branch_ready(&client, "feature").await;

    let prod_app = app_credentials(&client, "prod").await;
    let prod_su = secret_field(&client, "prod-superuser", "password").await;
    let prod_before = branches(&client).get("prod").await.unwrap();
    let old_tl = prod_before.status.clone().unwrap().timeline_id.unwrap();

    // One-step restore of dev's snapshot onto prod.
    let probe = ClientLoop::start(&h, "prod", prod_app.clone());
    create_restore(&client, "promote", from_snapshot("dev-ready", "prod", true)).await;
    let r = wait_completed(&client, "promote").await;
    let (outage, drops) = probe.finish().await;
    println!("promotion: a client of prod's Service lost {drops} connection(s); longest time without a working one: {outage:?}");
    assert!(drops <= 2, "{drops} dropped connections");
    let st = r.status.unwrap();
    let backup = st.backup_branch.clone().unwrap();
    assert!(backup.starts_with("prod-old-"), "{backup}");
    assert_eq!(st.target_timeline_id.as_deref(), Some(old_tl.as_str()));
    assert_eq!(st.finalize_step.as_deref(), Some("Cleanup"));

    // Same Secret, same credentials, dev's rows.
    assert_eq!(app_credentials(&client, "prod").await, prod_app);
    assert_eq!(
        secret_field(&client, "prod-superuser", "password").await,
        prod_su
    );
    let c = h
        .connect("prod", &prod_app.0, &prod_app.1, &prod_app.2)
        .await
        .unwrap();
    assert_eq!(ids(&c).await, (101..=105).collect::<Vec<_>>());
    h.connect("prod", "postgres", &prod_su, "postgres")
        .await
        .unwrap();
    let dev_su = secret_field(&client, "dev-superuser", "password").await;
    assert!(h
        .connect("prod", "postgres", &dev_su, "postgres")
        .await
        .is_err());

    let prod = wait_branch_ready(&client, "prod").await;
    let pst = prod.status.unwrap();
    assert_eq!(pst.timeline_id, st.restored_timeline_id);
    assert_eq!(pst.history.len(), 1);
    assert_eq!(pst.history[0].timeline_id, old_tl);
    assert_eq!(pst.history[0].replaced_by, "promote");
    assert_eq!(
        pst.history[0].backup_branch.as_deref(),
        Some(backup.as_str())
    );
    // The restored branch is gone; the backup keeps prod's old rows and
    // credentials under its own name.
    wait_gone(&branches(&client), "promote").await;
    let b = wait_branch_ready(&client, &backup).await;
    assert_eq!(
        b.status.unwrap().timeline_id.as_deref(),
        Some(old_tl.as_str())
    );
    assert_eq!(
        b.metadata
            .labels
            .unwrap()
            .get(LABEL_RESTORE_BACKUP_OF)
            .map(String::as_str),
        Some("promote")
    );
    assert!(b.metadata.owner_references.unwrap_or_default().is_empty());
    assert_eq!(ids(&h.connect_app(&backup).await).await, vec![1, 2, 3]);
    assert_one_compute_per_timeline(&h).await;

    // prod's compute (the restored branch's, handed over) is found by
    // prod's name, without a restart; the Service selects by timeline and
    // role only.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::default_namespaced(client.clone());
    let new_tl = pst.timeline_id.clone().unwrap();
    let by_tl = ListParams::default().labels(&format!(
        "{LABEL_TIMELINE}={new_tl},pgbranch.dev/role=primary"
    ));
    let served = pods.list(&by_tl).await.unwrap().items;
    assert_eq!(served.len(), 1, "one primary pod of prod's timeline");
    let pod_uid = served[0].metadata.uid.clone();
    let labelled = eventually(15, "prod's pod labelled with its branch", || async {
        let l = pods
            .list(
                &ListParams::default().labels("pgbranch.dev/branch=prod,pgbranch.dev/role=primary"),
            )
            .await
            .ok()?
            .items;
        (l.len() == 1).then_some(l)
    })
    .await;
    assert_eq!(
        labelled[0].metadata.uid, pod_uid,
        "relabelled, not restarted"
    );
    let svc = Api::<k8s_openapi::api::core::v1::Service>::default_namespaced(client.clone())
        .get("prod")
        .await
        .unwrap();
    let sel = svc.spec.unwrap().selector.unwrap();
    assert!(!sel.contains_key("pgbranch.dev/branch"), "{sel:?}");
    assert_eq!(sel.get(LABEL_TIMELINE), Some(&new_tl));
    let f = branches(&client).get("feature").await.unwrap();
    assert_eq!(
        f.spec.parent.as_ref().unwrap().branch,
        "prod",
        "spec untouched"
    );
    let fst = f.status.unwrap();
    assert_eq!(fst.parent_branch.as_deref(), Some(backup.as_str()));
    assert_eq!(fst.parent_timeline_id.as_deref(), Some(old_tl.as_str()));
    assert_eq!(ids(&h.connect_app("feature").await).await, vec![1, 2, 3]);

    // Every transition was an Event on the restore.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::default_namespaced(client.clone());
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("promote"))
        .filter_map(|e| e.reason)
        .collect();
    for want in ["Restoring", "Finalizing", "FinalizeStep", "Completed"] {
        assert!(
            reasons.iter().any(|r| r == want),
            "no {want} event in {reasons:?}"
        );
    }

    // Re-applying does nothing; deleting the completed restore undoes nothing.
    let rv = restores(&client)
        .get("promote")
        .await
        .unwrap()
        .metadata
        .resource_version;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        restores(&client)
            .get("promote")
            .await
            .unwrap()
            .metadata
            .resource_version,
        rv
    );
    restores(&client)
        .delete("promote", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&restores(&client), "promote").await;
    assert!(branches(&client).get_opt(&backup).await.unwrap().is_some());
    assert_eq!(
        ids(&h.connect_app("prod").await).await,
        (101..=105).collect::<Vec<_>>()
    );

    // Roll back with the first snapshot.
    create_restore(
        &client,
        "rollback",
        from_snapshot("prod-rollback-point", "prod", true),
    )
    .await;
    wait_completed(&client, "rollback").await;
    assert_eq!(app_credentials(&client, "prod").await, prod_app);
    assert_eq!(ids(&h.connect_app("prod").await).await, vec![1, 2, 3]);

    // Refresh dev from prod's head.
    let dev_app = app_credentials(&client, "dev").await;
    create_restore(
        &client,
        "refresh-dev",
        SnapshotRestoreSpec {
            source: RestoreSource {
                branch: Some("prod".into()),
                ..Default::default()
            },
            target: Some("dev".into()),
            finalize: true,
            preserve_under_name: None,
        },
    )
    .await;
    wait_completed(&client, "refresh-dev").await;
    assert_eq!(app_credentials(&client, "dev").await, dev_app);
    assert_eq!(ids(&h.connect_app("dev").await).await, vec![1, 2, 3]);
    assert_eq!(ids(&h.connect_app("prod").await).await, vec![1, 2, 3]);
    assert_one_compute_per_timeline(&h).await;
    h.shutdown().await;
}

async fn set_finalize(client: &kube::Client, name: &str) {
    restores(client)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"finalize": true}})),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_step_preview_then_finalize_and_what_is_refused() {
    let Some(mut h) = World::new(module_path!()).await else {
        return;
    };
    h.start_operator(h.config());
    let client = h.client.clone();
    create_branch(&client, &shop_branch("prod")).await;
    create_branch(&client, &shop_branch("dev")).await;
    wait_branch_ready(&client, "prod").await;
    wait_branch_ready(&client, "dev").await;
    exec(
        &h,
        "prod",
        "CREATE TABLE items (id int); INSERT INTO items SELECT generate_series(1, 3);",
    )
    .await;
    dev_snapshot_with_items(&h, 101..=105).await;
    let prod_app = app_credentials(&client, "prod").await;

    // Preview: the restored data under its own name, Service and Secret.
    create_restore(&client, "preview", from_snapshot("dev-snap", "prod", false)).await;
    let r = wait_restore(&client, "preview", "AwaitingFinalize", |r| {
        phase(r) == Some(RestorePhase::AwaitingFinalize)
    })
    .await;
    let st = r.status.unwrap();
    let ready = cond(&st.conditions, "Ready").unwrap();
    assert_eq!(
        (ready.0.as_str(), ready.1.as_str()),
        ("True", "AwaitingFinalize")
    );
    assert_eq!(st.restored_branch.as_deref(), Some("preview"));
    let preview_app = app_credentials(&client, "preview").await;
    assert_ne!(
        preview_app.1, prod_app.1,
        "a preview never holds prod's password"
    );
    assert_eq!(
        ids(&h.connect_app("preview").await).await,
        (101..=105).collect::<Vec<_>>()
    );
    assert_eq!(ids(&h.connect_app("prod").await).await, vec![1, 2, 3]);

    // Finalize: prod serves the previewed data with its own credentials.
    set_finalize(&client, "preview").await;
    wait_completed(&client, "preview").await;
    assert_eq!(app_credentials(&client, "prod").await, prod_app);
    let c = h
        .connect("prod", &prod_app.0, &prod_app.1, &prod_app.2)
        .await
        .unwrap();
    assert_eq!(ids(&c).await, (101..=105).collect::<Vec<_>>());
    wait_gone(&branches(&client), "preview").await;
    exec(&h, "prod", "INSERT INTO items VALUES (106)").await;

    // prod runs the compute it adopted from the preview (no restart at the
    // handover). Suspending prod stops it and hands the timeline to prod's
    // own Deployment, scaled to zero; resuming runs prod's own compute on
    // the same data.
    let deploys: Api<Deployment> = Api::default_namespaced(client.clone());
    let prod_tl = branches(&client)
        .get("prod")
        .await
        .unwrap()
        .status
        .unwrap()
        .timeline_id
        .unwrap();
    let serving = |tl: String| {
        let deploys = deploys.clone();
        async move {
            deploys
                .list(&ListParams::default().labels(&format!("{LABEL_TIMELINE}={tl}")))
                .await
                .unwrap()
                .items
                .into_iter()
                .filter(|d| d.metadata.deletion_timestamp.is_none())
                .map(|d| d.name_any())
                .collect::<Vec<_>>()
        }
    };
    let adopted = serving(prod_tl.clone()).await;
    assert!(
        adopted.len() == 1 && adopted[0].starts_with("preview-"),
        "{adopted:?}"
    );
    let suspend = |on: bool| json!({"spec": {"compute": {"suspended": on}}});
    branches(&client)
        .patch(
            "prod",
            &PatchParams::default(),
            &Patch::Merge(suspend(true)),
        )
        .await
        .unwrap();
    wait_branch(&client, "prod", "Suspended", |b| {
        b.status.as_ref().and_then(|s| s.phase) == Some(pgbranch::api::BranchPhase::Suspended)
    })
    .await;
    let own = serving(prod_tl.clone()).await;
    assert!(
        own.len() == 1 && own[0].starts_with("prod-"),
        "the adopted compute made way for prod's own: {own:?}"
    );
    let d = deploys.get(&own[0]).await.unwrap();
    assert_eq!(d.spec.unwrap().replicas, Some(0));
    assert!(
        !h.running_timelines().await.contains(&prod_tl),
        "no postgres runs for a suspended branch"
    );
    branches(&client)
        .patch(
            "prod",
            &PatchParams::default(),
            &Patch::Merge(suspend(false)),
        )
        .await
        .unwrap();
    wait_branch_ready(&client, "prod").await;
    assert_eq!(
        ids(&h.connect_app("prod").await).await,
        (101..=106).collect::<Vec<_>>()
    );
    exec(&h, "prod", "DELETE FROM items WHERE id = 106").await;

    // A preview whose target moved meanwhile is refused at finalize.
    create_restore(&client, "stale", from_snapshot("dev-snap", "prod", false)).await;
    wait_restore(&client, "stale", "AwaitingFinalize", |r| {
        phase(r) == Some(RestorePhase::AwaitingFinalize)
    })
    .await;
    create_restore(
        &client,
        "winner",
        SnapshotRestoreSpec {
            source: RestoreSource {
                branch: Some("dev".into()),
                ..Default::default()
            },
            target: Some("prod".into()),
            finalize: true,
            preserve_under_name: None,
        },
    )
    .await;
    let winner = wait_completed(&client, "winner").await;
    set_finalize(&client, "stale").await;
    let stale = wait_restore(&client, "stale", "Failed", |r| {
        phase(r) == Some(RestorePhase::Failed)
    })
    .await;
    let stalled = cond(&stale.status.as_ref().unwrap().conditions, "Stalled").unwrap();
    assert_eq!(
        (stalled.0.as_str(), stalled.1.as_str()),
        ("True", "TargetChanged"),
        "{}",
        stalled.2
    );
    assert!(stale.status.unwrap().backup_branch.is_some());
    let prod = branches(&client).get("prod").await.unwrap();
    assert_eq!(
        prod.status.unwrap().timeline_id,
        winner.status.unwrap().restored_timeline_id,
        "nothing replaced by the stale restore"
    );
    assert_eq!(
        ids(&h.connect_app("prod").await).await,
        (101..=105).collect::<Vec<_>>()
    );
    assert_one_compute_per_timeline(&h).await;

    // A Service someone else took over is never retargeted.
    create_restore(&client, "blocked", from_snapshot("dev-snap", "dev", false)).await;
    wait_restore(&client, "blocked", "AwaitingFinalize", |r| {
        phase(r) == Some(RestorePhase::AwaitingFinalize)
    })
    .await;
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::default_namespaced(client.clone());
    let dev_sel = services.get("dev").await.unwrap().spec.unwrap().selector;
    services
        .patch(
            "dev",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {
                "ownerReferences": null,
                "labels": {"argocd.argoproj.io/instance": "shop"},
            }})),
        )
        .await
        .unwrap();
    set_finalize(&client, "blocked").await;
    let r = wait_restore(&client, "blocked", "Stalled ServiceNotOwned", |r| {
        r.status.as_ref().is_some_and(|s| {
            cond(&s.conditions, "Stalled")
                .is_some_and(|c| c.0 == "True" && c.1 == "ServiceNotOwned")
        })
    })
    .await;
    assert_eq!(phase(&r), Some(RestorePhase::AwaitingFinalize));
    assert!(r.status.unwrap().finalize_step.is_none());
    assert_eq!(
        services.get("dev").await.unwrap().spec.unwrap().selector,
        dev_sel
    );
    // Not finalizing: deleting it is not held back.
    restores(&client)
        .delete("blocked", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&restores(&client), "blocked").await;

    // The restored branch takes the restore's name: a taken name fails.
    let taken = pgbranch::api::Branch::new(
        "taken",
        pgbranch::api::BranchSpec {
            compute: pgbranch::api::ComputeSpec {
                enabled: false,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    create_branch(&client, &taken).await;
    create_restore(&client, "taken", from_snapshot("dev-snap", "prod", false)).await;
    let r = wait_restore(&client, "taken", "Failed", |r| {
        phase(r) == Some(RestorePhase::Failed)
    })
    .await;
    let c = cond(&r.status.unwrap().conditions, "Stalled").unwrap();
    assert_eq!(c.1, "NameTaken", "{}", c.2);

    // The adopt annotation written by a user on a branch the operator did
    // not make is refused: nobody takes a timeline by annotation.
    let orphan = h
        .engine
        .create_timeline(pgbranch::storage::CreateTimeline {
            key: pgbranch::storage::OpKey::new("orphan").unwrap(),
            source: pgbranch::storage::Source::Empty {
                superuser_password: None,
            },
            source_connection: None,
            label: None,
        })
        .await
        .unwrap();
    let mut intruder = pgbranch::api::Branch::new(
        "intruder",
        pgbranch::api::BranchSpec {
            compute: pgbranch::api::ComputeSpec {
                enabled: false,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    intruder.metadata.annotations = Some(
        [(
            pgbranch::api::ANNOTATION_ADOPT_TIMELINE.to_string(),
            orphan.id.to_string(),
        )]
        .into(),
    );
    create_branch(&client, &intruder).await;
    let b = wait_branch(&client, "intruder", "Stalled AdoptTimelineRefused", |b| {
        b.status.as_ref().is_some_and(|s| {
            cond(&s.conditions, "Stalled")
                .is_some_and(|c| c.0 == "True" && c.1 == "AdoptTimelineRefused")
        })
    })
    .await;
    assert!(b.status.unwrap().timeline_id.is_none());

    // A source of another PostgreSQL major is refused up front. (Only
    // PostgreSQL 15 is here: the snapshot's recorded major is changed while
    // only the restore controller runs, so nothing rewrites it.)
    h.stop_operator().await;
    snapshots(&client)
        .patch_status(
            "dev-snap",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"pgMajor": 14}})),
        )
        .await
        .unwrap();
    h.start_controllers_with(Controllers::Restore, h.config());
    create_restore(&client, "major", from_snapshot("dev-snap", "prod", true)).await;
    let r = wait_restore(&client, "major", "Stalled PgMajorMismatch", |r| {
        r.status.as_ref().is_some_and(|s| {
            cond(&s.conditions, "Stalled")
                .is_some_and(|c| c.0 == "True" && c.1 == "PgMajorMismatch")
        })
    })
    .await;
    assert_eq!(phase(&r), Some(RestorePhase::Pending));
    assert!(branches(&client).get_opt("major").await.unwrap().is_none());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_branch_restored_to_its_own_past_keeps_its_newer_rows_in_the_backup() {
    let Some(mut h) = World::new(module_path!()).await else {
        return;
    };
    h.start_operator(h.config());
    let client = h.client.clone();
    create_branch(&client, &shop_branch("prod")).await;
    wait_branch_ready(&client, "prod").await;
    exec(
        &h,
        "prod",
        "CREATE TABLE items (id int); INSERT INTO items SELECT generate_series(1, 3);",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = jiff::Timestamp::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    exec(
        &h,
        "prod",
        "INSERT INTO items SELECT generate_series(4, 6);",
    )
    .await;
    let prod_app = app_credentials(&client, "prod").await;

    let own_past = |preserve: Option<&str>| SnapshotRestoreSpec {
        source: RestoreSource {
            branch: Some("prod".into()),
            timestamp: Some(before.to_string()),
            ..Default::default()
        },
        target: Some("prod".into()),
        finalize: true,
        preserve_under_name: preserve.map(String::from),
    };
    // Without preserveUnderName the API refuses it (CEL).
    let bad = SnapshotRestore::new("no-backup-name", own_past(None));
    let err = restores(&client)
        .create(&Default::default(), &bad)
        .await
        .expect_err("own history without preserveUnderName is refused");
    assert!(err.to_string().contains("preserveUnderName"), "{err}");

    let probe = ClientLoop::start(&h, "prod", prod_app.clone());
    create_restore(&client, "rewind", own_past(Some("prod-before-rewind"))).await;
    let r = wait_completed(&client, "rewind").await;
    let (outage, drops) = probe.finish().await;
    println!("restore to own past: a client of prod's Service lost {drops} connection(s); longest time without a working one: {outage:?}");
    assert_eq!(
        r.status.unwrap().backup_branch.as_deref(),
        Some("prod-before-rewind")
    );
    assert_eq!(app_credentials(&client, "prod").await, prod_app);
    assert_eq!(ids(&h.connect_app("prod").await).await, vec![1, 2, 3]);
    wait_branch_ready(&client, "prod-before-rewind").await;
    assert_eq!(
        ids(&h.connect_app("prod-before-rewind").await).await,
        vec![1, 2, 3, 4, 5, 6]
    );
    assert_one_compute_per_timeline(&h).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finalize_resumes_after_the_operator_stops_at_each_step() {
    use pgbranch::controller::restore::{FailPoint, FinalizeStep};
    use tokio_util::sync::CancellationToken;

    let Some(mut h) = World::new(module_path!()).await else {
        return;
    };
    h.start_operator(h.config());
    let client = h.client.clone();
    create_branch(&client, &shop_branch("prod")).await;
    wait_branch_ready(&client, "prod").await;
    exec(
        &h,
        "prod",
        "CREATE TABLE items (id int); INSERT INTO items SELECT generate_series(1, 3);",
    )
    .await;
    let snap = |b: &str| SnapshotSpec {
        branch: b.into(),
        ..Default::default()
    };
    create_snapshot(&client, "three", snap("prod")).await;
    wait_snapshot_ready(&client, "three").await;
    exec(&h, "prod", "INSERT INTO items VALUES (4)").await;
    create_snapshot(&client, "four", snap("prod")).await;
    wait_snapshot_ready(&client, "four").await;
    let prod_app = app_credentials(&client, "prod").await;
    h.stop_operator().await;

    for (i, step) in FinalizeStep::ALL.into_iter().enumerate() {
        let (source, rows) = if i % 2 == 0 {
            ("three", vec![1, 2, 3])
        } else {
            ("four", vec![1, 2, 3, 4])
        };
        let name = format!("crash-{}", step.as_str().to_lowercase());
        let crash = CancellationToken::new();
        h.start_operator_until(
            pgbranch::controller::Config {
                restore_fail_point: Some(FailPoint {
                    after_step: step,
                    crash: crash.clone(),
                }),
                ..h.config()
            },
            crash,
        );
        create_restore(&client, &name, from_snapshot(source, "prod", true)).await;
        h.wait_operator_stopped().await;
        let r = restores(&client).get(&name).await.unwrap();
        let st = r.status.clone().unwrap();
        assert_eq!(st.finalize_step.as_deref(), Some(step.as_str()));
        assert_eq!(phase(&r), Some(RestorePhase::Finalizing));
        // Stopped mid-finalize: prod's Service still reaches a live
        // compute, with prod's credentials.
        let c = h
            .connect("prod", &prod_app.0, &prod_app.1, &prod_app.2)
            .await;
        assert!(c.is_ok(), "after {}: {:?}", step.as_str(), c.err());
        assert_one_compute_per_timeline(&h).await;

        if step == FinalizeStep::Passwords {
            // One data-changing operation per branch: a snapshot of prod
            // waits while the restore is finalizing it.
            h.start_controllers_with(Controllers::Snapshot, h.config());
            create_snapshot(&client, "during", snap("prod")).await;
            let s = wait_snapshot(&client, "during", "WaitingForRestore", |s| {
                s.status.as_ref().is_some_and(|st| {
                    cond(&st.conditions, "Reconciling")
                        .is_some_and(|c| c.0 == "True" && c.1 == "WaitingForRestore")
                })
            })
            .await;
            let msg = cond(&s.status.unwrap().conditions, "Reconciling")
                .unwrap()
                .2;
            assert!(msg.contains(&name), "{msg}");
            h.stop_operator().await;
            assert_eq!(h.engine.list_snapshots().await.unwrap().len(), 2);
        }

        // Once (stopped after Target), the restore is deleted while the
        // operator is down: its finalizer holds it until the finalize ran to
        // its end.
        let deleted_mid_way = step == FinalizeStep::Target;
        if deleted_mid_way {
            restores(&client)
                .delete(&name, &DeleteParams::default())
                .await
                .unwrap();
            assert!(restores(&client).get_opt(&name).await.unwrap().is_some());
        }
        h.start_operator(h.config());
        let (restored_tl, backup) = if deleted_mid_way {
            wait_gone(&restores(&client), &name).await;
            (
                st.restored_timeline_id.clone(),
                st.backup_branch.clone().unwrap(),
            )
        } else {
            let r = wait_completed(&client, &name).await;
            let done = r.status.unwrap();
            (done.restored_timeline_id, done.backup_branch.unwrap())
        };
        assert_eq!(app_credentials(&client, "prod").await, prod_app);
        assert_eq!(
            ids(&h.connect_app("prod").await).await,
            rows,
            "after a stop at {}",
            step.as_str()
        );
        let prod = wait_branch_ready(&client, "prod").await;
        assert_eq!(prod.status.unwrap().timeline_id, restored_tl);
        assert!(branches(&client).get_opt(&name).await.unwrap().is_none());
        assert_one_compute_per_timeline(&h).await;
        // The backup is an ordinary branch: deleting it leaves prod alone.
        wait_branch_ready(&client, &backup).await;
        branches(&client)
            .delete(&backup, &DeleteParams::default())
            .await
            .unwrap();
        wait_gone(&branches(&client), &backup).await;
        assert_eq!(ids(&h.connect_app("prod").await).await, rows);
        if step == FinalizeStep::Passwords {
            // The waiting snapshot is taken once the restore is done: of
            // prod's restored data.
            wait_snapshot_ready(&client, "during").await;
        }
        h.stop_operator().await;
    }
    h.shutdown().await;
}

/// Finalizing a restore onto a suspended branch: the branch gets the
/// restored data, no compute runs for it (the restored branch's compute is
/// not kept running on its behalf), and resuming it serves the restored
/// rows with the branch's own credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finalize_onto_a_suspended_target() {
    let Some(mut h) = World::new(module_path!()).await else {
        return;
    };
    h.start_operator(h.config());
    let client = h.client.clone();
    create_branch(&client, &shop_branch("dev")).await;
    let mut prod = shop_branch("prod");
    prod.spec.compute.suspended = true;
    create_branch(&client, &prod).await;
    wait_branch_ready(&client, "dev").await;
    let before = wait_branch(&client, "prod", "Suspended", |b| {
        b.status.as_ref().and_then(|s| s.phase) == Some(pgbranch::api::BranchPhase::Suspended)
    })
    .await;
    dev_snapshot_with_items(&h, 201..=204).await;

    create_restore(
        &client,
        "onto-suspended",
        from_snapshot("dev-snap", "prod", true),
    )
    .await;
    let r = wait_completed(&client, "onto-suspended").await;
    let restored = r.status.unwrap().restored_timeline_id;
    let prod = wait_branch(
        &client,
        "prod",
        "on the restored timeline, Suspended",
        |b| {
            b.status.as_ref().is_some_and(|s| {
                s.timeline_id == restored && s.phase == Some(pgbranch::api::BranchPhase::Suspended)
            })
        },
    )
    .await;
    assert_ne!(
        prod.status.unwrap().timeline_id,
        before.status.unwrap().timeline_id
    );
    // Nothing runs for it, now or a moment later.
    let restored = restored.unwrap();
    for _ in 0..10 {
        assert!(
            !h.running_timelines().await.contains(&restored),
            "a compute runs for a suspended branch"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deploys: Api<Deployment> = Api::default_namespaced(client.clone());
    for d in deploys
        .list(&ListParams::default().labels(&format!("{LABEL_TIMELINE}={restored}")))
        .await
        .unwrap()
        .items
    {
        assert_eq!(
            d.spec.unwrap().replicas,
            Some(0),
            "{}",
            d.metadata.name.unwrap()
        );
    }

    let prod_app = app_credentials(&client, "prod").await;
    branches(&client)
        .patch(
            "prod",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"compute": {"suspended": false}}})),
        )
        .await
        .unwrap();
    wait_branch_ready(&client, "prod").await;
    assert_eq!(app_credentials(&client, "prod").await, prod_app);
    let c = h
        .connect("prod", &prod_app.0, &prod_app.1, &prod_app.2)
        .await
        .unwrap();
    assert_eq!(ids(&c).await, (201..=204).collect::<Vec<_>>());
    assert_one_compute_per_timeline(&h).await;
    h.shutdown().await;
}

/// A branch without compute (`enabled: false`) has no Service — nothing
/// to select, and one per storage-only branch costs the control plane a
/// ClusterIP, Endpoints and an EndpointSlice — yet a restore finalizes onto
/// it, and enabling its compute later gives it its Service and the
/// restored rows under the same connection string.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_branch_without_compute_has_no_service_and_still_takes_a_restore() {
    let Some(mut h) = World::new(module_path!()).await else {
        return;
    };
    h.start_operator(h.config());
    let client = h.client.clone();
    let services: Api<Service> = Api::default_namespaced(client.clone());
    create_branch(&client, &shop_branch("dev")).await;
    let mut archive = shop_branch("archive");
    archive.spec.compute.enabled = false;
    create_branch(&client, &archive).await;
    wait_branch_ready(&client, "dev").await;
    let before = wait_branch_ready(&client, "archive").await;
    let st = before.status.clone().unwrap();
    assert_eq!(
        st.service, None,
        "status.service of a branch without compute"
    );
    assert_eq!(
        st.connection.as_ref().map(|c| c.host.as_str()),
        Some(format!("archive.{}.svc", h.ns).as_str()),
        "the connection string still names the Service it will have"
    );
    assert!(services.get_opt("archive").await.unwrap().is_none());
    let uri_before = app_credentials(&client, "archive").await;

    dev_snapshot_with_items(&h, 301..=303).await;
    create_restore(
        &client,
        "onto-archive",
        from_snapshot("dev-snap", "archive", true),
    )
    .await;
    let r = wait_completed(&client, "onto-archive").await;
    let restored = r.status.unwrap().restored_timeline_id;
    wait_branch(&client, "archive", "on the restored timeline", |b| {
        b.status
            .as_ref()
            .is_some_and(|s| s.timeline_id == restored && s.service.is_none())
    })
    .await;
    assert!(
        services.get_opt("archive").await.unwrap().is_none(),
        "a restore gives a branch without compute no Service"
    );

    // Compute on: the Service appears, the connection string is the same,
    // and it serves the restored rows.
    branches(&client)
        .patch(
            "archive",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"compute": {"enabled": true}}})),
        )
        .await
        .unwrap();
    let on = wait_branch(&client, "archive", "Ready with its Service", |b| {
        b.status.as_ref().is_some_and(|s| {
            s.service.as_deref() == Some("archive")
                && s.phase == Some(pgbranch::api::BranchPhase::Ready)
        })
    })
    .await;
    assert!(services.get_opt("archive").await.unwrap().is_some());
    assert_eq!(app_credentials(&client, "archive").await, uri_before);
    assert_eq!(on.status.unwrap().timeline_id, restored);
    let c = h
        .connect("archive", &uri_before.0, &uri_before.1, &uri_before.2)
        .await
        .unwrap();
    assert_eq!(ids(&c).await, (301..=303).collect::<Vec<_>>());
    drop(c);

    // Compute off again: the Service goes with it.
    branches(&client)
        .patch(
            "archive",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"compute": {"enabled": false}}})),
        )
        .await
        .unwrap();
    wait_branch(&client, "archive", "without its Service", |b| {
        b.status.as_ref().is_some_and(|s| s.service.is_none())
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while services.get_opt("archive").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the Service outlived the compute"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.shutdown().await;
}

/// A Snapshot and a SnapshotRestore of one branch applied at the same
/// moment, many times over, in both orders: one always goes first and the
/// other waits for it. A snapshot is taken of the branch either before the
/// restore started (the old timeline) or after it completed (the restored
/// timeline) — never while the restore held the branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_and_a_restore_applied_together_are_serialized() {
    let Some(mut h) = World::new("op-lock").await else {
        return;
    };
    // As in a cluster: no periodic resync, only watch events and requeues
    // (a resync would hide a branch that is not looked at again).
    h.start_operator(pgbranch::controller::Config {
        resync_interval: None,
        ..h.config()
    });
    let client = h.client.clone();
    create_branch(&client, &shop_branch("prod")).await;
    create_branch(&client, &shop_branch("dev")).await;
    wait_branch_ready(&client, "prod").await;
    wait_branch_ready(&client, "dev").await;
    exec(
        &h,
        "prod",
        "CREATE TABLE items (id int); INSERT INTO items VALUES (1);",
    )
    .await;
    exec(
        &h,
        "dev",
        "CREATE TABLE items (id int); INSERT INTO items VALUES (101);",
    )
    .await;
    create_snapshot(
        &client,
        "dev-ready",
        SnapshotSpec {
            branch: "dev".into(),
            ..Default::default()
        },
    )
    .await;
    wait_snapshot_ready(&client, "dev-ready").await;

    let mut orders = vec![];
    for i in 0..6 {
        let before = wait_branch_ready(&client, "prod").await;
        let old_tl = before.status.unwrap().timeline_id.unwrap();
        let snap_name = format!("s-{i}");
        let restore_name = format!("r-{i}");
        let snap = async {
            create_snapshot(
                &client,
                &snap_name,
                SnapshotSpec {
                    branch: "prod".into(),
                    ..Default::default()
                },
            )
            .await
        };
        let mut spec = from_snapshot("dev-ready", "prod", true);
        spec.preserve_under_name = Some(format!("prod-before-{i}"));
        let restore = async { create_restore(&client, &restore_name, spec).await };
        // At once, the restore first, the snapshot first.
        match i % 3 {
            0 => {
                tokio::join!(snap, restore);
            }
            1 => {
                // The restore already holds prod: the snapshot must say it
                // waits, and wait.
                restore.await;
                wait_restore(&client, &restore_name, "Restoring", |r| {
                    phase(r) == Some(RestorePhase::Restoring)
                })
                .await;
                snap.await;
                let s = wait_snapshot(&client, &snap_name, "WaitingForRestore", |s| {
                    s.status.as_ref().is_some_and(|st| {
                        st.ready_to_use
                            || cond(&st.conditions, "Reconciling")
                                .is_some_and(|c| c.1 == "WaitingForRestore")
                    })
                })
                .await;
                let st = s.status.unwrap();
                assert!(
                    !st.ready_to_use,
                    "round {i}: the snapshot was taken while the restore held prod"
                );
                assert!(
                    cond(&st.conditions, "Reconciling")
                        .unwrap()
                        .2
                        .contains(&restore_name),
                    "the message names the restore"
                );
            }
            _ => {
                snap.await;
                restore.await
            }
        }
        let s = wait_snapshot_ready(&client, &snap_name).await;
        let r = wait_completed(&client, &restore_name).await;
        // Ready follows the handed-over compute within seconds.
        let completed_at = Instant::now();
        wait_branch_ready(&client, "prod").await;
        let lag = completed_at.elapsed();
        assert!(
            lag < Duration::from_secs(10),
            "round {i}: prod Ready {lag:?} after its restore completed"
        );
        let sst = s.status.unwrap();
        let rst = r.status.unwrap();
        let taken: jiff::Timestamp = sst.created_at.unwrap().parse().unwrap();
        let started: jiff::Timestamp = rst.started_at.unwrap().parse().unwrap();
        let completed: jiff::Timestamp = rst.completed_at.unwrap().parse().unwrap();
        let new_tl = rst.restored_timeline_id.unwrap();
        let tl = sst.timeline_id.unwrap();
        if tl == old_tl {
            assert!(
                taken <= started,
                "round {i}: snapshot taken at {taken} of the old timeline after the restore started at {started}"
            );
            orders.push("snapshot first");
        } else {
            assert_eq!(
                tl, new_tl,
                "round {i}: the snapshot is of prod's old or new data"
            );
            assert!(
                taken >= completed,
                "round {i}: snapshot taken at {taken} before the restore completed at {completed}"
            );
            orders.push("restore first");
        }
        // Free the quota and the backup's compute for the next round.
        snapshots(&client)
            .delete(&snap_name, &Default::default())
            .await
            .unwrap();
        branches(&client)
            .delete(&format!("prod-before-{i}"), &Default::default())
            .await
            .unwrap();
        wait_gone(&snapshots(&client), &snap_name).await;
    }
    eprintln!("orders: {orders:?}");
    h.shutdown().await;
}
