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

    // And then, once the compute rolled back and serves, nothing more to do.
    eventually(120, "the compute rolled back and ready", || async {
        let d = deployments.get(&deploy.name_any()).await.ok()?;
        let st = d.status.clone()?;
        (st.observed_generation == d.metadata.generation
            && st.ready_replicas == Some(1)
            && st.updated_replicas == Some(1)
            && st.replicas == Some(1))
        .then_some(())
    })
    .await;
    wait_ready(&w.client, "main").await;
    w.connect_app("main")
        .await
        .query("SELECT 1", &[])
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    w.traffic.reset();
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert!(w.traffic.writes().is_empty(), "{:#?}", w.traffic.writes());
    w.shutdown().await;
}

/// A compute that cannot start says why, in the kubelet's words, and after
/// the deadline the Branch is Stalled with that reason; fixing the cause
/// brings it back. An image the node cannot pull; a postgres that exits at
/// start (a broken setting), with postgres's own last log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compute_that_cannot_start_says_why() {
    use kube::api::{Patch, PatchParams};
    use pgbranch::api::{Branch, BranchSpec};
    use pgbranch::storage::TimelineId;
    use serde_json::json;
    use support::world::*;

    let Some(mut w) = World::new("stuck-compute").await else {
        return;
    };
    w.start_operator(pgbranch::controller::Config {
        compute_start_deadline: std::time::Duration::from_secs(8),
        ..w.config()
    });
    let api = branches(&w.client);
    let pp = PatchParams::default();

    // An image this node does not have.
    let mut img = Branch::new("img", BranchSpec::default());
    img.spec.compute.image = Some("postgres:99".into());
    create_branch(&w.client, &img).await;
    let b = wait_branch(&w.client, "img", "ComputeImagePullBackOff", |b| {
        condition(b, "Reconciling")
            .is_some_and(|c| c.0 == "True" && c.1 == "ComputeImagePullBackOff")
    })
    .await;
    let msg = condition(&b, "Reconciling").unwrap().2;
    assert!(
        msg.contains("Back-off pulling image \"postgres:99\""),
        "{msg}"
    );
    let b = wait_stalled(&w.client, "img", "ComputeImagePullBackOff").await;
    let msg = condition(&b, "Stalled").unwrap().2;
    assert!(
        msg.contains("has not started in 8s") && msg.contains("postgres:99"),
        "{msg}"
    );
    api.patch(
        "img",
        &pp,
        &Patch::Merge(json!({"spec": {"compute": {"image": null}}})),
    )
    .await
    .unwrap();
    wait_ready(&w.client, "img").await;

    // A setting postgres refuses at start.
    create_branch(&w.client, &Branch::new("crash", BranchSpec::default())).await;
    let b = wait_ready(&w.client, "crash").await;
    let tl = TimelineId::new(b.status.unwrap().timeline_id.unwrap()).unwrap();
    let suspend = |on: bool| {
        let api = api.clone();
        async move {
            api.patch(
                "crash",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"compute": {"suspended": on}}})),
            )
            .await
            .unwrap();
        }
    };
    suspend(true).await;
    eventually(60, "the compute stopped", || async {
        (!w.running_timelines().await.contains(&tl.to_string())).then_some(())
    })
    .await;
    let auto_conf = w.engine.data_dir(&tl).join("postgresql.auto.conf");
    let good = std::fs::read_to_string(&auto_conf).unwrap();
    std::fs::write(&auto_conf, format!("{good}\nshared_buffers = 'lots'\n")).unwrap();
    suspend(false).await;
    let b = wait_branch(&w.client, "crash", "ComputeCrashLoopBackOff", |b| {
        condition(b, "Reconciling")
            .is_some_and(|c| c.0 == "True" && c.1 == "ComputeCrashLoopBackOff")
    })
    .await;
    let msg = condition(&b, "Reconciling").unwrap().2;
    assert!(
        msg.contains("shared_buffers"),
        "postgres's last words: {msg}"
    );
    wait_stalled(&w.client, "crash", "ComputeCrashLoopBackOff").await;
    std::fs::write(&auto_conf, good).unwrap();
    let b = wait_ready(&w.client, "crash").await;
    assert!(condition(&b, "Stalled").is_some_and(|c| c.0 == "False"));

    // Suspend and resume at once: the new compute waits for the old one to
    // be gone (scaling up does not wait for terminating Pods), so postgres
    // never finds its data directory in use.
    let ready_since = std::time::Instant::now();
    eventually(30, "the compute of crash running", || async {
        w.running_timelines()
            .await
            .contains(&tl.to_string())
            .then_some(())
    })
    .await;
    suspend(true).await;
    eventually(30, "the old compute is stopping", || async {
        let pods = w.api::<k8s_openapi::api::core::v1::Pod>();
        let l = pods
            .list(&kube::api::ListParams::default().labels(&format!("pgbranch.dev/timeline={tl}")))
            .await
            .ok()?;
        l.items
            .iter()
            .any(|p| p.metadata.deletion_timestamp.is_some())
            .then_some(())
    })
    .await;
    suspend(false).await;
    wait_branch(&w.client, "crash", "Ready after a quick resume", |b| {
        condition(b, "Ready").is_some_and(|c| c.0 == "True")
            && b.status.as_ref().and_then(|s| s.observed_generation) == b.metadata.generation
            && b.status.as_ref().and_then(|s| s.phase) == Some(pgbranch::api::BranchPhase::Ready)
    })
    .await;
    let events = w.api::<k8s_openapi::api::events::v1::Event>();
    let crashes: Vec<_> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("ComputeCrashLoopBackOff"))
        .filter(|e| {
            e.event_time
                .as_ref()
                .is_some_and(|t| t.0 > jiff::Timestamp::now() - ready_since.elapsed())
        })
        .collect();
    assert!(
        crashes.is_empty(),
        "a second postgres met the first: {crashes:#?}"
    );
    w.connect_app("crash")
        .await
        .query("SELECT 1", &[])
        .await
        .unwrap();
    w.shutdown().await;
}

/// Roles removed from `spec.roles` are dropped, with their Secrets; one
/// that still owns objects is made NOLOGIN without a password and
/// reported in the `RolesRetained` condition until its objects are gone.
/// A child's copy of its parent's roles is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn roles_removed_from_the_spec_are_dropped_or_disabled() {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Patch, PatchParams};
    use pgbranch::api::{Branch, BranchSpec, DatabaseSpec, ParentRef, RoleSpec};
    use serde_json::json;
    use support::world::*;

    let Some(mut w) = World::new("roles").await else {
        return;
    };
    w.start_operator(w.config());
    let roles = |names: &[&str]| -> Vec<RoleSpec> {
        names
            .iter()
            .map(|n| RoleSpec {
                name: n.to_string(),
            })
            .collect()
    };
    let main = Branch::new(
        "main",
        BranchSpec {
            roles: roles(&["app", "reader", "writer"]),
            databases: vec![DatabaseSpec {
                name: "shop".into(),
                owner: Some("app".into()),
            }],
            ..Default::default()
        },
    );
    create_branch(&w.client, &main).await;
    wait_ready(&w.client, "main").await;
    let su_pw = secret_field(&w.client, "main-superuser", "password").await;
    let su = w.connect("main", "postgres", &su_pw, "shop").await.unwrap();
    su.batch_execute("CREATE TABLE ledger (id int); ALTER TABLE ledger OWNER TO writer;")
        .await
        .unwrap();
    // A child's copy of main's roles.
    let kid = Branch::new(
        "kid",
        BranchSpec {
            parent: Some(ParentRef {
                branch: "main".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    create_branch(&w.client, &kid).await;
    wait_ready(&w.client, "kid").await;

    let api = branches(&w.client);
    api.patch(
        "main",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"roles": [{"name": "app"}]}})),
    )
    .await
    .unwrap();
    let b = wait_branch(&w.client, "main", "RolesRetained", |b| {
        condition(b, "RolesRetained").is_some_and(|c| c.0 == "True")
            && condition(b, "Ready").is_some_and(|c| c.0 == "True")
    })
    .await;
    let msg = condition(&b, "RolesRetained").unwrap().2;
    assert!(msg.contains("writer") && !msg.contains("reader"), "{msg}");
    let role = |c: tokio_postgres::Client, r: &'static str| async move {
        c.query_opt(
            "SELECT rolcanlogin, rolpassword IS NOT NULL FROM pg_authid WHERE rolname = $1",
            &[&r],
        )
        .await
        .unwrap()
        .map(|row| (row.get::<_, bool>(0), row.get::<_, bool>(1)))
    };
    let su = w.connect("main", "postgres", &su_pw, "shop").await.unwrap();
    assert_eq!(role(su, "reader").await, None, "reader dropped");
    let su = w.connect("main", "postgres", &su_pw, "shop").await.unwrap();
    assert_eq!(
        role(su, "writer").await,
        Some((false, false)),
        "writer disabled"
    );
    let secrets = w.api::<Secret>();
    for gone in ["main-reader", "main-writer"] {
        eventually(15, &format!("Secret {gone} deleted"), || async {
            secrets.get_opt(gone).await.unwrap().is_none().then_some(())
        })
        .await;
    }
    let kid_su = secret_field(&w.client, "kid-superuser", "password").await;
    let k = w.connect("kid", "postgres", &kid_su, "shop").await.unwrap();
    assert!(
        role(k, "reader").await.is_some(),
        "the child's copy is untouched"
    );

    // Once writer owns nothing, the next change drops it.
    let su = w.connect("main", "postgres", &su_pw, "shop").await.unwrap();
    su.batch_execute("REASSIGN OWNED BY writer TO app")
        .await
        .unwrap();
    api.patch(
        "main",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"databases": [
            {"name": "shop", "owner": "app"}, {"name": "more", "owner": "app"}]}})),
    )
    .await
    .unwrap();
    wait_branch(&w.client, "main", "RolesRetained cleared", |b| {
        condition(b, "RolesRetained").is_none()
            && condition(b, "Ready").is_some_and(|c| c.0 == "True")
            && b.status.as_ref().and_then(|s| s.observed_generation) == b.metadata.generation
    })
    .await;
    let su = w.connect("main", "postgres", &su_pw, "shop").await.unwrap();
    assert_eq!(role(su, "writer").await, None, "writer dropped at last");
    w.shutdown().await;
}

/// A parent and its child deleted together (a namespace deletion, `kubectl
/// delete branches --all`): the parent's deletion waits for the child, and
/// the child's going wakes the parent at once — not at its next periodic
/// look (no resync here, Ready objects looked at every 5 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parent_deleted_with_its_child_goes_as_soon_as_the_child_is_gone() {
    use kube::api::DeleteParams;
    use pgbranch::api::ParentRef;
    use std::time::{Duration, Instant};
    use support::world::*;

    let Some(mut w) = World::new("parent-and-child").await else {
        return;
    };
    let mut config = w.config();
    config.resync_interval = None;
    config.ready_requeue = Duration::from_secs(300);
    w.start_operator(config);
    let client = w.client.clone();
    let mut main = shop_branch("main");
    main.spec.compute.enabled = false;
    create_branch(&client, &main).await;
    wait_branch_ready(&client, "main").await;
    let mut dev = shop_branch("dev");
    dev.spec.compute.enabled = false;
    dev.spec.parent = Some(ParentRef {
        branch: "main".into(),
        ..Default::default()
    });
    create_branch(&client, &dev).await;
    wait_branch_ready(&client, "dev").await;

    let api = branches(&client);
    api.delete("main", &DeleteParams::default()).await.unwrap();
    api.delete("dev", &DeleteParams::default()).await.unwrap();
    let started = Instant::now();
    loop {
        let left = api.list(&Default::default()).await.unwrap().items.len();
        if left == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{left} branches still there after 60 s: the parent was not woken when its child went"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    w.shutdown().await;
}
