//! The Branch lifecycle scenario: the real operator on a real control
//! plane, the real storage engine with the copy driver, real PostgreSQL
//! computes run by the test kubelet.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use pgbranch::api::{
    Branch, BranchPhase, BranchSpec, DatabaseSpec, ParentRef, RoleSpec, LABEL_BRANCH,
};
use pgbranch::storage::Storage;
use serde_json::json;

use super::world::*;

fn child(name: &str, parent: &str, lsn: Option<String>, timestamp: Option<String>) -> Branch {
    branch(
        name,
        BranchSpec {
            parent: Some(ParentRef {
                branch: parent.into(),
                lsn,
                timestamp,
            }),
            ..Default::default()
        },
    )
}

/// The whole Branch scenario; the world's operator must be running.
pub async fn run(h: &World) {
    let client = &h.client;
    let api = branches(client);
    let pp = PostParams::default();

    // A root branch with a database and a role.
    api.create(
        &pp,
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
    .expect("create main");
    // Ready=False from the start, then Ready.
    wait_branch(client, "main", "Ready=False reported", |b| {
        condition(b, "Ready").is_some_and(|c| c.0 == "False")
    })
    .await;
    let main = wait_ready(client, "main").await;
    let st = main.status.clone().expect("status");
    let main_tl = st.timeline_id.clone().expect("timelineId");
    eprintln!("main Ready on timeline {main_tl}");
    assert_eq!(st.phase, Some(BranchPhase::Ready));
    assert_eq!(st.service.as_deref(), Some("main"));
    assert_eq!(st.secret_name.as_deref(), Some("main-app"));
    assert_eq!(st.pg_major, Some(15));
    let conn = st.connection.clone().expect("connection");
    assert_eq!(conn.host, format!("main.{}.svc", h.ns));
    assert_eq!(
        (conn.port, conn.database.as_str(), conn.user.as_str()),
        (5432, "shop", "shop")
    );
    assert_eq!(
        secret_field(client, "main-app", "host").await,
        format!("main.{}.svc", h.ns)
    );
    assert_eq!(secret_field(client, "main-app", "type").await, "postgresql");

    // Rows through main's Service: a batch, a point in time, another batch.
    let app = h.connect_app("main").await;
    app.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, note text);
         INSERT INTO items SELECT g, 'first' FROM generate_series(1, 10) g;",
    )
    .await
    .expect("batch 1");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let between = jiff::Timestamp::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    app.batch_execute("INSERT INTO items SELECT g, 'second' FROM generate_series(11, 20) g;")
        .await
        .expect("batch 2");
    let main_su = secret_field(client, "main-superuser", "password").await;
    let su = h
        .connect("main", "postgres", &main_su, "postgres")
        .await
        .expect("superuser login to main");
    su.batch_execute("CREATE ROLE reporter LOGIN PASSWORD 'reporter-pw'")
        .await
        .expect("an undeclared login role");
    su.batch_execute("SELECT pg_switch_wal()")
        .await
        .expect("switch wal");
    assert_eq!(ids(&app).await, (1..=20).collect::<Vec<_>>());

    // A child at head and one at the time between the batches.
    api.create(&pp, &child("head", "main", None, None))
        .await
        .expect("create head");
    api.create(&pp, &child("past", "main", None, Some(between.to_string())))
        .await
        .expect("create past");
    let head = wait_ready(client, "head").await;
    let past = wait_ready(client, "past").await;
    let head_st = head.status.clone().expect("status");
    assert_ne!(head_st.timeline_id.as_deref(), Some(main_tl.as_str()));
    assert!(
        head_st.parent_lsn.is_some(),
        "parentLsn recorded: {head_st:?}"
    );
    assert_eq!(head_st.parent_branch.as_deref(), Some("main"));
    assert_eq!(
        head_st.parent_timeline_id.as_deref(),
        Some(main_tl.as_str())
    );
    assert_eq!(
        head_st
            .connection
            .as_ref()
            .map(|c| (c.user.as_str(), c.database.as_str())),
        Some(("shop", "shop")),
        "a child serves its parent's app user and database"
    );
    let head_app = h.connect_app("head").await;
    assert_eq!(
        ids(&head_app).await,
        (1..=20).collect::<Vec<_>>(),
        "head child has both batches"
    );
    let past_app = h.connect_app("past").await;
    eprintln!("head rows {:?}", ids(&head_app).await.len());
    eprintln!("past rows {:?}", ids(&past_app).await);
    assert_eq!(
        ids(&past_app).await,
        (1..=10).collect::<Vec<_>>(),
        "past child has the first batch only"
    );
    assert!(past
        .status
        .as_ref()
        .and_then(|s| s.timeline_id.clone())
        .is_some());

    // Children have their own passwords; the parent's do not work on them.
    let main_app_pw = secret_field(client, "main-app", "password").await;
    for c in ["head", "past"] {
        let pw = secret_field(client, &format!("{c}-app"), "password").await;
        assert_ne!(
            pw, main_app_pw,
            "{c} must not hold the parent's app password"
        );
        let su_pw = secret_field(client, &format!("{c}-superuser"), "password").await;
        assert_ne!(
            su_pw, main_su,
            "{c} must not hold the parent's superuser password"
        );
        assert_auth_fails(h, c, "shop", &main_app_pw, "shop").await;
        assert_auth_fails(h, c, "postgres", &main_su, "postgres").await;
        if c == "head" {
            // An undeclared user of the parent keeps no password on a child.
            assert!(h
                .connect(c, "reporter", "reporter-pw", "postgres")
                .await
                .is_err());
            h.connect("main", "reporter", "reporter-pw", "postgres")
                .await
                .expect("the parent's user is untouched");
        }
        h.connect(c, "postgres", &su_pw, "postgres")
            .await
            .unwrap_or_else(|e| panic!("{c}'s own superuser password works: {e}"));
    }
    // Writes on a child do not reach the parent.
    head_app
        .batch_execute("INSERT INTO items VALUES (100, 'child only')")
        .await
        .expect("child write");
    assert_eq!(ids(&app).await, (1..=20).collect::<Vec<_>>());
    drop((app, su, head_app, past_app));

    // A spec change is applied over SQL: a new database appears.
    api.patch(
        "main",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"databases": [
            {"name": "shop", "owner": "shop"},
            {"name": "reports", "owner": "shop"}
        ]}})),
    )
    .await
    .expect("add a database");
    wait_ready(client, "main").await;
    let pw = secret_field(client, "main-app", "password").await;
    h.connect("main", "shop", &pw, "reports")
        .await
        .expect("the declared database exists");

    // Steady state: resyncs every second, no writes.
    let before = h.metrics().reconcile_count("Branch");
    h.traffic.reset();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let reconciles = h.metrics().reconcile_count("Branch") - before;
    assert!(reconciles >= 6, "resyncs ran ({reconciles} reconciles)");
    let writes = h.traffic.writes();
    eprintln!(
        "steady state: {reconciles} reconciles, {} writes",
        writes.len()
    );
    assert!(writes.is_empty(), "writes in steady state: {writes:#?}");

    // Every transition left an Event on the Branch.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::default_namespaced(client.clone());
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("main"))
        .filter_map(|e| e.reason.clone())
        .collect();
    assert!(
        reasons.iter().any(|r| r == "Ready"),
        "events of main: {reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r != "Ready"),
        "a progressing event too: {reasons:?}"
    );

    // Suspend: the compute goes, the branch stays Ready (Suspended); resume
    // brings the same data back.
    api.patch(
        "head",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"compute": {"suspended": true}}})),
    )
    .await
    .expect("suspend");
    wait_branch(client, "head", "Suspended", |b| {
        b.status.as_ref().and_then(|s| s.phase) == Some(BranchPhase::Suspended)
            && b.status.as_ref().and_then(|s| s.observed_generation) == b.metadata.generation
    })
    .await;
    let head_tl = head_st.timeline_id.clone().expect("timeline");
    let start = Instant::now();
    while h.running_timelines().await.contains(&head_tl) {
        assert!(start.elapsed() < WAIT, "suspended compute still runs");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    api.patch(
        "head",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"compute": {"suspended": false}}})),
    )
    .await
    .expect("resume");
    wait_ready(client, "head").await;
    let head_app = h.connect_app("head").await;
    assert_eq!(
        ids(&head_app).await.len(),
        21,
        "resumed branch kept its rows"
    );
    drop(head_app);

    // expiresAt: the branch deletes itself when due.
    let mut temp = child("temp", "main", None, None);
    temp.spec.expires_at =
        Some((jiff::Timestamp::now() + jiff::SignedDuration::from_secs(15)).to_string());
    api.create(&pp, &temp).await.expect("create temp");
    wait_ready(client, "temp").await;
    wait_gone(&api, "temp").await;

    // Bad input is Stalled with a reason, nothing created.
    api.create(&pp, &child("orphan", "nope", None, None))
        .await
        .expect("create orphan");
    let b = wait_stalled(client, "orphan", "ParentNotFound").await;
    assert!(condition(&b, "Stalled").unwrap().2.contains("nope"));
    // Fixing the cause clears Stalled: the missing parent appears.
    api.create(&pp, &branch("nope", BranchSpec::default()))
        .await
        .expect("create nope");
    wait_ready(client, "orphan").await;
    api.create(
        &pp,
        &child("future", "main", Some("FF/FFFFFFFF".into()), None),
    )
    .await
    .expect("create future");
    let b = wait_stalled(client, "future", "PointOutsideRestoreWindow").await;
    assert!(
        condition(&b, "Stalled").unwrap().2.contains("window"),
        "the message names the restore window: {:?}",
        condition(&b, "Stalled")
    );
    assert!(b
        .status
        .as_ref()
        .and_then(|s| s.timeline_id.clone())
        .is_none());

    // A Service another tool manages is reported, never taken over.
    let svcs: Api<Service> = Api::default_namespaced(client.clone());
    let mut foreign = Service::default();
    foreign.metadata.name = Some("clash".into());
    foreign.metadata.labels = Some(
        [(
            "argocd.argoproj.io/instance".to_string(),
            "someone-else".to_string(),
        )]
        .into(),
    );
    foreign.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
        ports: Some(vec![k8s_openapi::api::core::v1::ServicePort {
            port: 80,
            ..Default::default()
        }]),
        ..Default::default()
    });
    svcs.create(&pp, &foreign).await.expect("foreign service");
    api.create(&pp, &branch("clash", BranchSpec::default()))
        .await
        .expect("create clash");
    let b = wait_stalled(client, "clash", "ObjectConflict").await;
    assert!(condition(&b, "Stalled").unwrap().2.contains("clash"));
    let svc = svcs.get("clash").await.unwrap();
    assert!(svc.metadata.owner_references.is_none(), "not adopted");
    assert_eq!(svc.spec.unwrap().ports.unwrap()[0].port, 80, "not changed");
    api.delete("clash", &DeleteParams::default())
        .await
        .expect("delete clash");
    wait_gone(&api, "clash").await;
    let svc = svcs
        .get("clash")
        .await
        .expect("the foreign Service is left alone");
    assert!(svc.metadata.deletion_timestamp.is_none());
    svcs.delete("clash", &DeleteParams::default())
        .await
        .expect("cleanup");

    // A protected branch is not deleted until unprotected.
    api.patch(
        "past",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"protected": true}})),
    )
    .await
    .expect("protect");
    api.delete("past", &DeleteParams::default())
        .await
        .expect("delete past");
    wait_stalled(client, "past", "BranchProtected").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        api.get_opt("past").await.unwrap().is_some(),
        "protected branch kept"
    );
    let past_port = h.port("past").await;
    assert!(past_port.is_some(), "protected branch keeps its compute");

    // A parent with children is not deleted.
    api.delete("main", &DeleteParams::default())
        .await
        .expect("delete main");
    let b = wait_stalled(client, "main", "HasChildren").await;
    let msg = condition(&b, "Stalled").unwrap().2;
    for c in ["future", "head", "past"] {
        assert!(msg.contains(c), "message names child {c}: {msg}");
    }
    assert!(
        h.connect_app("main")
            .await
            .query("SELECT 1", &[])
            .await
            .is_ok(),
        "main still serves"
    );
    // A child asked of a parent that is being deleted says so (the two
    // would otherwise wait for each other in silence).
    api.create(&pp, &child("late", "main", None, None))
        .await
        .expect("create late");
    let late = wait_stalled(client, "late", "ParentBeingDeleted").await;
    let msg = condition(&late, "Stalled").unwrap().2;
    assert!(
        msg.contains("main") && msg.contains("being deleted"),
        "{msg}"
    );
    api.delete("late", &DeleteParams::default())
        .await
        .expect("delete late");
    wait_gone(&api, "late").await;

    api.patch(
        "past",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"protected": false}})),
    )
    .await
    .expect("unprotect");
    for n in ["head", "future", "orphan"] {
        api.delete(n, &DeleteParams::default())
            .await
            .expect("delete");
    }
    for n in ["past", "head", "future", "orphan", "main"] {
        wait_gone(&api, n).await;
    }
    api.delete("nope", &DeleteParams::default())
        .await
        .expect("delete nope");
    wait_gone(&api, "nope").await;

    // Everything is gone: timelines, computes, Services, Secrets.
    let left = h.engine.list_timelines().await.expect("list timelines");
    assert!(left.is_empty(), "timelines left in storage: {left:?}");
    let sel = ListParams::default().labels(LABEL_BRANCH);
    let deps: Api<Deployment> = Api::default_namespaced(client.clone());
    let svcs: Api<Service> = Api::default_namespaced(client.clone());
    let secs: Api<Secret> = Api::default_namespaced(client.clone());
    assert!(
        deps.list(&sel).await.unwrap().items.is_empty(),
        "deployments left"
    );
    assert!(
        svcs.list(&sel).await.unwrap().items.is_empty(),
        "services left"
    );
    let names: Vec<String> = secs
        .list(&sel)
        .await
        .unwrap()
        .items
        .iter()
        .map(|s| s.name_any())
        .collect();
    assert!(names.is_empty(), "secrets left: {names:?}");
    let start = Instant::now();
    while !h.running_timelines().await.is_empty() {
        assert!(start.elapsed() < WAIT, "computes still running");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
