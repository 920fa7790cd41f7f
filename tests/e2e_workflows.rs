//! Tier 5: the seed workflows end to end on a real cluster with pgbranch
//! installed (operator, storage service, compute pods running stock
//! PostgreSQL), as a user drives them: objects created through the API,
//! SQL through each branch's Service with the credentials of its Secret.
//!
//! Runs only when `PGBRANCH_E2E_KUBECONFIG` names the cluster's kubeconfig
//! (`scripts/e2e.sh` sets one up on kind or k3d); otherwise each test prints
//! `skipped: PGBRANCH_E2E_KUBECONFIG not set` and passes. Run them one at a
//! time (`--test-threads=1`): they share the cluster's one storage node.
//! What each test proves: docs/e2e.md.

mod e2e;

use e2e::*;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::DeleteParams;
use kube::{Api, ResourceExt};
use pgbranch::api::{
    Branch, RestorePhase, RestoreSource, Retention, Snapshot, SnapshotRestore, SnapshotRestoreSpec,
    SnapshotSchedule, SnapshotScheduleSpec, LABEL_RESTORE_BACKUP_OF,
};
use serde_json::json;

fn restore(name: &str, source: RestoreSource, target: &str, finalize: bool) -> SnapshotRestore {
    SnapshotRestore::new(
        name,
        SnapshotRestoreSpec {
            source,
            target: Some(target.into()),
            finalize,
            ..Default::default()
        },
    )
}

fn from_snapshot(s: &str) -> RestoreSource {
    RestoreSource {
        snapshot: Some(s.into()),
        ..Default::default()
    }
}

fn status_of(b: &Branch) -> pgbranch::api::BranchStatus {
    b.status.clone().expect("Ready branch has a status")
}

/// A root branch, its Service and Secret; a child at head and one at a
/// timestamp with the rows of those points; own credentials per branch;
/// isolation of writes; deletion refused while children exist; owned
/// objects gone after deletion.
#[tokio::test]
async fn branch_at_head_and_at_timestamp() {
    let Some(env) = env("branch_at_head_and_at_timestamp").await else {
        return;
    };
    let ns = TestNamespace::create(&env, "branch").await;
    let n = ns.name.as_str();
    let branches: Api<Branch> = Api::namespaced(env.client.clone(), n);

    // A root branch: Ready for its generation, with its Service and Secret.
    create(&env, n, root("main")).await;
    // Ready is reported from the first status on (False while working).
    let first = wait_for(&env, &branches, "main", "a first status", |b| {
        !conditions(b).is_empty()
    })
    .await;
    let ready0 = condition(&first, "Ready").expect("Ready condition from the first status");
    eprintln!("main first Ready={} ({})", ready0.status, ready0.reason);
    let main = wait_ready(&env, &branches, "main").await;
    let events = event_lines(&env, n, "main").await.expect("list events");
    assert!(!events.is_empty(), "transitions of main emit Events");
    let st = status_of(&main);
    let main_tl = st.timeline_id.clone().expect("status.timelineId");
    assert_eq!(st.service.as_deref(), Some("main"), "status.service");
    assert_eq!(
        st.secret_name.as_deref(),
        Some("main-app"),
        "status.secretName"
    );
    let conn = st.connection.clone().expect("status.connection");
    assert_eq!(conn.host, format!("main.{n}.svc"));
    let secret = secret_data(&env, n, "main-app").await;
    for key in ["host", "port", "dbname", "user", "password", "uri"] {
        assert!(
            secret.contains_key(key),
            "main-app has no {key}: keys {:?}",
            secret.keys()
        );
    }
    assert_eq!(
        secret["host"], conn.host,
        "Secret host is the Service's DNS name"
    );
    assert_eq!(secret["port"], conn.port.to_string());
    assert_eq!(secret["dbname"], conn.database);
    assert_eq!(secret["user"], conn.user);
    assert!(
        !serde_json::to_string(&main.status)
            .unwrap()
            .contains(&secret["password"]),
        "the password must not appear in status"
    );
    assert_eq!(
        service_timeline(&env, n, "main").await.as_deref(),
        Some(main_tl.as_str()),
        "Service main selects the branch's timeline"
    );

    // Rows through the Service: a batch, a point in time, another batch.
    let point = write_two_batches(&env, n, "main").await;
    eprintln!("point between the batches: {point}");
    let all = [rows(1..=10, "first"), rows(11..=20, "second")].concat();
    assert_eq!(items(&env, n, "main").await, all);

    // A child at head and a child at the point.
    create(&env, n, child("head", "main", None)).await;
    create(&env, n, child("past", "main", Some(point.clone()))).await;
    let head = wait_ready(&env, &branches, "head").await;
    let past = wait_ready(&env, &branches, "past").await;
    let head_tl = status_of(&head).timeline_id.expect("head timeline");
    let past_tl = status_of(&past).timeline_id.expect("past timeline");
    assert_ne!(head_tl, main_tl, "a child has its own timeline");
    assert_ne!(past_tl, main_tl, "a child has its own timeline");
    assert!(
        status_of(&head).parent_lsn.is_some(),
        "head records status.parentLsn"
    );
    assert_eq!(items(&env, n, "head").await, all, "head: both batches");
    assert_eq!(
        items(&env, n, "past").await,
        rows(1..=10, "first"),
        "past (at {point}): the first batch only"
    );

    // Each child has its own password; the parent's does not open it.
    let head_secret = secret_data(&env, n, "head-app").await;
    assert_eq!(head_secret["host"], format!("head.{n}.svc"));
    assert_ne!(
        head_secret["password"], secret["password"],
        "a child must not hold its parent's password"
    );
    let parents_pw_on_head = format!(
        "postgresql://{}:{}@{}:{}/{}",
        pct(&head_secret["user"]),
        pct(&secret["password"]),
        head_secret["host"],
        head_secret["port"],
        pct(&head_secret["dbname"]),
    );
    uri_secret(
        &env,
        n,
        "parent-password-on-head",
        &parents_pw_on_head,
        head_secret.get("ca.crt"),
    )
    .await;
    let mut run = run_sql_pod(&env, n, "parent-password-on-head", &["SELECT 1"]).await;
    for _ in 0..3 {
        // Retry what is not an answer from PostgreSQL (DNS, endpoints).
        if run.exit_code != 2 || run.output.contains("password authentication failed") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        run = run_sql_pod(&env, n, "parent-password-on-head", &["SELECT 1"]).await;
    }
    assert_eq!(
        run.exit_code, 2,
        "the parent's password must be refused by the child: {run:?}"
    );
    assert!(
        run.output.contains("password authentication failed"),
        "refused for the password: {}",
        run.output
    );

    // Writes are isolated: a row on head shows on neither main nor past.
    sql(
        &env,
        n,
        "head",
        &["INSERT INTO items VALUES (100, 'head only')"],
    )
    .await;
    assert_eq!(items(&env, n, "main").await, all);
    assert_eq!(items(&env, n, "past").await, rows(1..=10, "first"));

    // Argo CD / Flux view: everything healthy for its generation.
    wait_namespace_healthy(&env, n).await;

    // A branch with children is not deleted: the request is accepted, the
    // operator's finalizer holds it, says why, and main keeps serving.
    branches
        .delete("main", &DeleteParams::default())
        .await
        .expect("delete request for main");
    let held = wait_for(
        &env,
        &branches,
        "main",
        "Stalled while it has children",
        |b| {
            b.metadata.deletion_timestamp.is_some()
                && condition(b, "Stalled").is_some_and(|c| c.status == "True")
        },
    )
    .await;
    let why = condition(&held, "Stalled").unwrap();
    eprintln!("main held: {}: {}", why.reason, why.message);
    assert_eq!(
        items(&env, n, "main").await,
        all,
        "main still serves its data"
    );

    // Children deleted: their Services and Secrets go with them; then main.
    for c in ["head", "past"] {
        branches
            .delete(c, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete {c}: {e}"));
    }
    let services: Api<Service> = Api::namespaced(env.client.clone(), n);
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), n);
    for c in ["head", "past"] {
        wait_gone(&env, &branches, c).await;
        wait_gone(&env, &services, c).await;
        wait_gone(&env, &secrets, &format!("{c}-app")).await;
    }
    wait_gone(&env, &branches, "main").await;
    wait_gone(&env, &services, "main").await;
    wait_gone(&env, &secrets, "main-app").await;

    ns.delete_and_wait(&env).await;
}

/// Issue 4's promotion cycle: snapshot prod (rollback point), snapshot dev,
/// one-step restore of dev's snapshot onto prod — prod's Service and Secret
/// unchanged, rows now dev's, the old data kept as a backup branch — then
/// roll back, then refresh dev from prod.
#[tokio::test]
async fn promotion_cycle_keeps_the_connection_string() {
    let Some(env) = env("promotion_cycle_keeps_the_connection_string").await else {
        return;
    };
    let ns = TestNamespace::create(&env, "promote").await;
    let n = ns.name.as_str();
    let branches: Api<Branch> = Api::namespaced(env.client.clone(), n);
    let snapshots: Api<Snapshot> = Api::namespaced(env.client.clone(), n);
    let restores: Api<SnapshotRestore> = Api::namespaced(env.client.clone(), n);
    let services: Api<Service> = Api::namespaced(env.client.clone(), n);

    create(&env, n, root("prod")).await;
    create(&env, n, root("dev")).await;
    wait_ready(&env, &branches, "prod").await;
    wait_ready(&env, &branches, "dev").await;
    let table = "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL)";
    sql(
        &env,
        n,
        "prod",
        &[
            table,
            "INSERT INTO items SELECT g, 'prod' FROM generate_series(1, 5) g",
        ],
    )
    .await;
    sql(
        &env,
        n,
        "dev",
        &[
            table,
            "INSERT INTO items SELECT g, 'dev' FROM generate_series(1, 8) g",
        ],
    )
    .await;
    let prod_rows = rows(1..=5, "prod");
    let dev_rows = rows(1..=8, "dev");

    // What an application of prod holds: these must not change.
    let prod_secret = secret_data(&env, n, "prod-app").await;
    let dev_secret = secret_data(&env, n, "dev-app").await;
    let prod0 = branches.get("prod").await.unwrap();
    let prod_conn = status_of(&prod0).connection;
    let prod_tl0 = status_of(&prod0).timeline_id.expect("timeline");
    let prod_svc_uid = services.get("prod").await.unwrap().uid();
    let dev_tl0 = status_of(&branches.get("dev").await.unwrap())
        .timeline_id
        .expect("timeline");

    // Rollback point and candidate.
    create(&env, n, snapshot("prod-rollback", "prod")).await;
    create(&env, n, snapshot("dev-candidate", "dev")).await;
    for s in ["prod-rollback", "dev-candidate"] {
        let snap = wait_ready(&env, &snapshots, s).await;
        let st = snap.status.expect("status");
        assert!(st.ready_to_use, "{s}: readyToUse");
        assert!(st.snapshot_id.is_some() && st.lsn.is_some(), "{s}: {st:?}");
    }

    // One-step restore of dev's snapshot onto prod, while a client keeps
    // connecting through prod's Service with prod's Secret.
    let prober = Prober::start(&env, n, "prod-app").await;
    create(
        &env,
        n,
        restore("promote", from_snapshot("dev-candidate"), "prod", true),
    )
    .await;
    let promote = wait_phase(&env, &restores, "promote", RestorePhase::Completed).await;
    assert!(health(&promote).is_ok(), "promote: {:?}", health(&promote));
    let pst = promote.status.clone().unwrap();
    assert!(
        pst.started_at.is_some() && pst.completed_at.is_some(),
        "{pst:?}"
    );
    let backup = pst.backup_branch.clone().expect("status.backupBranch");
    let stamp = backup.strip_prefix("prod-old-").unwrap_or_else(|| {
        panic!("default backup name is prod-old-<yyyymmddhhmmss>, got {backup}")
    });
    assert!(
        stamp.len() == 14 && stamp.bytes().all(|b| b.is_ascii_digit()),
        "backup name {backup}"
    );

    let prod1 = wait_moved(&env, &branches, "prod", &prod_tl0).await;
    let prod_tl1 = status_of(&prod1).timeline_id.expect("timeline");
    assert_eq!(
        status_of(&prod1).connection,
        prod_conn,
        "connection unchanged"
    );
    assert_eq!(
        secret_data(&env, n, "prod-app").await,
        prod_secret,
        "prod's Secret is unchanged by the restore"
    );
    assert_eq!(
        services.get("prod").await.unwrap().uid(),
        prod_svc_uid,
        "prod's Service is the same object"
    );
    assert_eq!(
        service_timeline(&env, n, "prod").await.as_deref(),
        Some(prod_tl1.as_str()),
        "prod's Service selects the restored timeline"
    );
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let probes = prober.stop(&env).await;
    eprintln!(
        "clients through Service prod during the promotion: {} connections, {} refused, longest outage {} ms",
        probes.ok, probes.failed, probes.longest_outage_ms
    );
    assert!(
        probes.last_ok,
        "connections through prod work after the restore: {probes:?}"
    );
    // Same Secret, new data: the application's credentials work on it.
    assert_eq!(
        items(&env, n, "prod").await,
        dev_rows,
        "prod now has dev's rows"
    );
    let history = status_of(&prod1).history;
    assert!(
        history.iter().any(|h| h.timeline_id == prod_tl0
            && h.replaced_by == "promote"
            && h.backup_branch.as_deref() == Some(backup.as_str())),
        "prod's status.history records the replaced timeline: {history:?}"
    );

    // The old prod lives on as the backup branch, with its own Service.
    let b = wait_ready(&env, &branches, &backup).await;
    assert_eq!(
        b.labels().get(LABEL_RESTORE_BACKUP_OF).map(String::as_str),
        Some("promote"),
        "backup branch labelled with its restore"
    );
    assert_eq!(
        status_of(&b).timeline_id.as_deref(),
        Some(prod_tl0.as_str()),
        "the backup branch holds prod's old timeline"
    );
    assert_eq!(
        items(&env, n, &backup).await,
        prod_rows,
        "backup has the old rows"
    );
    assert_eq!(items(&env, n, "dev").await, dev_rows, "dev untouched");

    // Roll back with the first snapshot (backup under a chosen name).
    let mut rollback = restore("rollback", from_snapshot("prod-rollback"), "prod", true);
    rollback.spec.preserve_under_name = Some("prod-promoted".into());
    create(&env, n, rollback).await;
    let rb = wait_phase(&env, &restores, "rollback", RestorePhase::Completed).await;
    assert_eq!(
        rb.status.unwrap().backup_branch.as_deref(),
        Some("prod-promoted")
    );
    wait_moved(&env, &branches, "prod", &prod_tl1).await;
    assert_eq!(items(&env, n, "prod").await, prod_rows, "prod rolled back");
    assert_eq!(secret_data(&env, n, "prod-app").await, prod_secret);
    wait_ready(&env, &branches, "prod-promoted").await;
    assert_eq!(items(&env, n, "prod-promoted").await, dev_rows);

    // Refresh dev from prod's head; dev keeps its own connection string.
    create(
        &env,
        n,
        restore(
            "refresh-dev",
            RestoreSource {
                branch: Some("prod".into()),
                ..Default::default()
            },
            "dev",
            true,
        ),
    )
    .await;
    wait_phase(&env, &restores, "refresh-dev", RestorePhase::Completed).await;
    wait_moved(&env, &branches, "dev", &dev_tl0).await;
    assert_eq!(
        items(&env, n, "dev").await,
        prod_rows,
        "dev refreshed from prod"
    );
    assert_eq!(
        secret_data(&env, n, "dev-app").await,
        dev_secret,
        "dev's Secret is unchanged by the refresh"
    );

    wait_namespace_healthy(&env, n).await;
    ns.delete_and_wait(&env).await;
}

/// A multi-step restore of prod to a point of its own past: the restored
/// data comes up as its own branch for preview while prod is untouched;
/// flipping `finalize` later moves prod onto it and keeps the newer data
/// under `preserveUnderName`.
#[tokio::test]
async fn multi_step_restore_to_own_past() {
    let Some(env) = env("multi_step_restore_to_own_past").await else {
        return;
    };
    let ns = TestNamespace::create(&env, "multistep").await;
    let n = ns.name.as_str();
    let branches: Api<Branch> = Api::namespaced(env.client.clone(), n);
    let restores: Api<SnapshotRestore> = Api::namespaced(env.client.clone(), n);

    create(&env, n, root("prod")).await;
    wait_ready(&env, &branches, "prod").await;
    let point = write_two_batches(&env, n, "prod").await;
    let first = rows(1..=10, "first");
    let all = [first.clone(), rows(11..=20, "second")].concat();
    let prod0 = branches.get("prod").await.unwrap();
    let prod_tl0 = status_of(&prod0).timeline_id.expect("timeline");
    let prod_secret = secret_data(&env, n, "prod-app").await;

    let mut rewind = restore(
        "rewind",
        RestoreSource {
            branch: Some("prod".into()),
            timestamp: Some(point.clone()),
            ..Default::default()
        },
        "prod",
        false,
    );
    rewind.spec.preserve_under_name = Some("prod-before-rewind".into());
    create(&env, n, rewind).await;

    // Preview: the restored data under its own name, Service and Secret.
    let waiting = wait_phase(&env, &restores, "rewind", RestorePhase::AwaitingFinalize).await;
    assert!(
        health(&waiting).is_ok(),
        "awaiting finalize is a healthy resting state: {:?}",
        health(&waiting)
    );
    let preview = waiting
        .status
        .as_ref()
        .and_then(|s| s.restored_branch.clone())
        .expect("status.restoredBranch");
    assert_ne!(preview, "prod");
    let pb = wait_ready(&env, &branches, &preview).await;
    let preview_secret = status_of(&pb)
        .secret_name
        .unwrap_or_else(|| format!("{preview}-app"));
    assert_eq!(
        sql_with_secret(
            &env,
            n,
            &preview_secret,
            &["SELECT id, note FROM items ORDER BY id"]
        )
        .await,
        first,
        "the preview holds prod as of {point}"
    );
    // prod is untouched until finalize.
    assert_eq!(items(&env, n, "prod").await, all);
    assert_eq!(
        status_of(&branches.get("prod").await.unwrap())
            .timeline_id
            .as_deref(),
        Some(prod_tl0.as_str())
    );
    assert_eq!(
        service_timeline(&env, n, "prod").await.as_deref(),
        Some(prod_tl0.as_str())
    );

    // Later (a Git commit, say): finalize.
    merge_patch(&restores, "rewind", json!({"spec": {"finalize": true}}))
        .await
        .expect("set finalize: true");
    let done = wait_phase(&env, &restores, "rewind", RestorePhase::Completed).await;
    assert!(health(&done).is_ok(), "rewind: {:?}", health(&done));
    assert_eq!(
        done.metadata.generation,
        Some(2),
        "finalize bumped the generation"
    );
    let dst = done.status.clone().unwrap();
    assert_eq!(dst.backup_branch.as_deref(), Some("prod-before-rewind"));

    let prod1 = wait_moved(&env, &branches, "prod", &prod_tl0).await;
    let prod_tl1 = status_of(&prod1).timeline_id.expect("timeline");
    if let Some(restored) = &dst.restored_timeline_id {
        assert_eq!(&prod_tl1, restored, "prod runs on the restored timeline");
    }
    assert_eq!(
        items(&env, n, "prod").await,
        first,
        "prod is back at {point}"
    );
    assert_eq!(
        secret_data(&env, n, "prod-app").await,
        prod_secret,
        "prod's Secret is unchanged"
    );
    wait_ready(&env, &branches, "prod-before-rewind").await;
    assert_eq!(
        items(&env, n, "prod-before-rewind").await,
        all,
        "the backup branch keeps the newer rows"
    );

    wait_namespace_healthy(&env, n).await;
    ns.delete_and_wait(&env).await;
}

/// A SnapshotSchedule every minute keeping at most two: it creates
/// Snapshots it owns, which become ready; a Snapshot the user labels
/// `pgbranch.dev/keep` is let go and never pruned; older ones are pruned.
#[tokio::test]
async fn snapshot_schedule_takes_and_prunes() {
    let Some(env) = env("snapshot_schedule_takes_and_prunes").await else {
        return;
    };
    let ns = TestNamespace::create(&env, "schedule").await;
    let n = ns.name.as_str();
    let branches: Api<Branch> = Api::namespaced(env.client.clone(), n);
    let snapshots: Api<Snapshot> = Api::namespaced(env.client.clone(), n);
    let schedules: Api<SnapshotSchedule> = Api::namespaced(env.client.clone(), n);

    create(&env, n, root("prod")).await;
    wait_ready(&env, &branches, "prod").await;
    sql(
        &env,
        n,
        "prod",
        &[
            "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL)",
            "INSERT INTO items VALUES (1, 'one')",
        ],
    )
    .await;
    create(
        &env,
        n,
        SnapshotSchedule::new(
            "every-minute",
            SnapshotScheduleSpec {
                branch: "prod".into(),
                interval: Some("1m".into()),
                retention: Retention {
                    max_count: Some(2),
                    max_age: None,
                },
                ..Default::default()
            },
        ),
    )
    .await;
    let owned_by_schedule = |s: &Snapshot| {
        s.owner_references().iter().any(|o| {
            o.kind == "SnapshotSchedule" && o.name == "every-minute" && o.controller == Some(true)
        })
    };

    // The first scheduled Snapshot becomes ready; keep it.
    let start = std::time::Instant::now();
    let first = loop {
        let list = snapshots.list(&Default::default()).await.unwrap();
        if let Some(s) = list
            .items
            .iter()
            .find(|s| owned_by_schedule(s) && health(*s).is_ok())
        {
            break s.clone();
        }
        assert!(
            start.elapsed() < env.timeout + std::time::Duration::from_secs(60),
            "no ready scheduled Snapshot after {:?}: {:?}",
            start.elapsed(),
            list.items
                .iter()
                .map(|s| (s.name_any(), health(s)))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    };
    let kept = first.name_any();
    assert_eq!(first.spec.branch, "prod");
    assert!(first.status.as_ref().is_some_and(|s| s.ready_to_use));
    merge_patch(
        &snapshots,
        &kept,
        json!({"metadata": {"labels": {pgbranch::api::LABEL_KEEP: "true"}}}),
    )
    .await
    .expect("label keep");

    // Three more runs: never more than two owned, the kept one stays.
    let mut seen = std::collections::BTreeSet::new();
    let start = std::time::Instant::now();
    loop {
        let list = snapshots.list(&Default::default()).await.unwrap();
        let owned: Vec<String> = list
            .items
            .iter()
            .filter(|s| owned_by_schedule(s) && s.metadata.deletion_timestamp.is_none())
            .map(|s| s.name_any())
            .collect();
        seen.extend(owned.iter().filter(|&s| *s != kept).cloned());
        let kept_obj = list.items.iter().find(|s| s.name_any() == kept);
        assert!(kept_obj.is_some(), "the kept Snapshot {kept} was pruned");
        if seen.len() >= 3 && owned.len() <= 2 && !owned.contains(&kept) {
            break;
        }
        assert!(
            start.elapsed() < env.timeout + std::time::Duration::from_secs(240),
            "after {:?}: seen {seen:?}, owned now {owned:?}",
            start.elapsed()
        );
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    }
    let kept_obj = snapshots.get(&kept).await.unwrap();
    assert!(
        !owned_by_schedule(&kept_obj),
        "a kept Snapshot is released from the schedule: {:?}",
        kept_obj.owner_references()
    );

    let sched = wait_ready(&env, &schedules, "every-minute").await;
    let st = sched.status.clone().expect("status");
    assert!(st.last_schedule_time.is_some(), "{st:?}");
    assert!(st.active_snapshots <= 2, "{st:?}");

    wait_namespace_healthy(&env, n).await;
    ns.delete_and_wait(&env).await;
}

// Offline checks of the e2e support itself (these run everywhere).

fn branch_with(generation: i64, status: serde_json::Value) -> Branch {
    serde_json::from_value(json!({
        "apiVersion": "pgbranch.dev/v1alpha1",
        "kind": "Branch",
        "metadata": {"name": "b", "namespace": "ns", "generation": generation},
        "spec": {},
        "status": status,
    }))
    .unwrap()
}

fn cond(type_: &str, status: &str, generation: i64) -> serde_json::Value {
    json!({
        "type": type_, "status": status, "reason": "Because", "message": "m",
        "observedGeneration": generation, "lastTransitionTime": "2026-01-01T00:00:00Z",
    })
}

#[test]
fn health_is_ready_for_the_current_generation_only() {
    let ready = |gen, observed, ready_gen| {
        branch_with(
            gen,
            json!({"observedGeneration": observed, "conditions": [cond("Ready", "True", ready_gen)]}),
        )
    };
    assert_eq!(health(&ready(2, 2, 2)), Ok(()));
    assert!(health(&ready(2, 1, 1)).is_err(), "stale status");
    assert!(health(&ready(2, 2, 1)).is_err(), "stale Ready condition");
    let not_ready = branch_with(
        1,
        json!({"observedGeneration": 1, "conditions": [cond("Ready", "False", 1)]}),
    );
    assert!(health(&not_ready).unwrap_err().contains("Ready=False"));
    let stalled = branch_with(
        1,
        json!({"observedGeneration": 1, "conditions": [cond("Ready", "True", 1), cond("Stalled", "True", 1)]}),
    );
    assert!(health(&stalled).unwrap_err().starts_with("Stalled"));
    assert!(health(&branch_with(1, json!({}))).is_err(), "no status");
}

#[test]
fn psql_pod_reads_the_uri_from_the_secret_and_keeps_sql_literal() {
    let pod = psql_pod(
        "p",
        "postgres:15",
        "prod-app",
        &["DO $$ BEGIN PERFORM 1; END $$", "SELECT '$(HOME)'"],
    );
    let spec = pod.spec.unwrap();
    let c = &spec.containers[0];
    let args = c.args.clone().unwrap();
    let d = args.iter().position(|a| a == "-d").unwrap();
    assert_eq!(args[d + 1], "$(PGBRANCH_URI)");
    // Kubernetes turns `$$` into `$` and expands `$(VAR)`: escaped, the SQL
    // reaches psql as written.
    assert!(args.contains(&"DO $$$$ BEGIN PERFORM 1; END $$$$".to_string()));
    assert!(args.contains(&"SELECT '$$(HOME)'".to_string()));
    let env = c.env.clone().unwrap();
    let uri = env.iter().find(|e| e.name == "PGBRANCH_URI").unwrap();
    let key = uri
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .unwrap();
    assert_eq!((key.name.as_str(), key.key.as_str()), ("prod-app", "uri"));
    assert!(uri.value.is_none(), "no credentials in the Pod spec");
    let sc = spec.security_context.unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
}

#[test]
fn probe_report_measures_the_longest_outage() {
    let r = probe_report("ok 1000\nok 1200\nfail 1400\nfail 1900\nok 2300\nnoise\nok 2500\n");
    assert_eq!(
        (r.ok, r.failed, r.longest_outage_ms, r.last_ok),
        (4, 2, 1100, true)
    );
    let r = probe_report("ok 1000\nfail 1200\n");
    assert_eq!(
        (r.ok, r.failed, r.longest_outage_ms, r.last_ok),
        (1, 1, 0, false)
    );
}

#[test]
fn probe_report_measures_the_switch_between_computes() {
    // Old compute .5 until 1400; a slow attempt; the new one .9 from 1750.
    let r = probe_report(
        "ok 1000 10.0.0.5 60\nok 1200 10.0.0.5 50\nok 1400 10.0.0.5 55\n\
         ok 1750 10.0.0.9 240\nok 2000 10.0.0.9 60\nok 2900 10.0.0.9 800\n",
    );
    assert_eq!(r.servers, ["10.0.0.5", "10.0.0.9"]);
    assert_eq!(
        r.switch_gap_ms,
        Some(350),
        "from the last old answer to the first new one"
    );
    assert_eq!(r.longest_gap_ms, 900, "a slow attempt is a gap too");
    assert_eq!((r.failed, r.longest_outage_ms), (0, 0));
    assert_eq!(r.slowest_attempt_ms, 800);
    let one = probe_report("ok 1000 10.0.0.5 50\nfail 1300 200\nok 1500 10.0.0.5 40\n");
    assert_eq!(one.switch_gap_ms, None, "one server: no switch");
    assert_eq!((one.failed, one.longest_outage_ms), (1, 500));
}

#[test]
fn pct_encodes_everything_but_unreserved() {
    assert_eq!(pct("aZ09-._~"), "aZ09-._~");
    assert_eq!(pct("p@ss:w/rd%"), "p%40ss%3Aw%2Frd%25");
}

/// `readReplicas`: a hot standby behind `<branch>-ro` (the Secret's
/// `ro-uri`) serves the primary's rows and refuses writes.
#[tokio::test]
async fn read_replica_serves_reads() {
    let Some(env) = env("read_replica_serves_reads").await else {
        return;
    };
    let ns = TestNamespace::create(&env, "replicas").await;
    let n = ns.name.as_str();
    let branches: Api<Branch> = Api::namespaced(env.client.clone(), n);
    let mut main = root("main");
    main.spec.compute.read_replicas = 1;
    create(&env, n, main).await;
    wait_for(&env, &branches, "main", "1/1 read replicas ready", |b| {
        condition(b, "Ready")
            .is_some_and(|c| c.status == "True" && c.message.contains("1/1 read replicas ready"))
    })
    .await;
    write_two_batches(&env, n, "main").await;
    let secret = secret_data(&env, n, "main-app").await;
    assert_eq!(secret["ro-host"], format!("main-ro.{n}.svc"));
    uri_secret(
        &env,
        n,
        "main-ro-uri",
        &secret["ro-uri"],
        secret.get("ca.crt"),
    )
    .await;
    let all = [rows(1..=10, "first"), rows(11..=20, "second")].concat();
    let start = std::time::Instant::now();
    loop {
        let run = run_sql_pod(
            &env,
            n,
            "main-ro-uri",
            &["SELECT id, note FROM items ORDER BY id"],
        )
        .await;
        let got: Vec<String> = run
            .output
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        if run.exit_code == 0 && got == all {
            break;
        }
        assert!(
            start.elapsed() < env.timeout,
            "main-ro never served the rows: {run:?}"
        );
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    }
    let run = run_sql_pod(
        &env,
        n,
        "main-ro-uri",
        &["INSERT INTO items VALUES (999, 'via ro')"],
    )
    .await;
    assert!(
        run.output.contains("read-only transaction"),
        "a write through main-ro must fail: {run:?}"
    );
    wait_namespace_healthy(&env, n).await;
    ns.delete_and_wait(&env).await;
}
