//! Tier 5: running pgbranch, on a real cluster — what an operations team
//! sees: the finalize outage measured through a Service and kube-proxy,
//! suspend and resume, the operator or storage pod deleted in the middle of
//! work, the operator uninstalled and installed again with branches live,
//! and the shipped samples applied as they are.
//!
//! Runs only when `PGBRANCH_E2E_KUBECONFIG` is set (see docs/e2e.md);
//! otherwise each test prints `skipped: PGBRANCH_E2E_KUBECONFIG not set`.
//! One at a time (`--test-threads=1`): some delete the operator's pods.

mod e2e;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e::*;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};
use pgbranch::api::{
    Branch, RestorePhase, RestoreSource, Snapshot, SnapshotRestore, SnapshotRestoreSpec,
    LABEL_BRANCH,
};
use serde_json::json;

/// A one-step restore of `snap` onto `target`, the old data kept as `backup`.
fn restore_from(name: &str, snap: &str, target: &str, backup: &str) -> SnapshotRestore {
    SnapshotRestore::new(
        name,
        SnapshotRestoreSpec {
            source: RestoreSource {
                snapshot: Some(snap.into()),
                ..Default::default()
            },
            target: Some(target.into()),
            finalize: true,
            preserve_under_name: Some(backup.into()),
        },
    )
}

fn timeline_of(b: &Branch) -> String {
    b.status
        .as_ref()
        .and_then(|s| s.timeline_id.clone())
        .expect("a Ready branch has status.timelineId")
}

/// Creates `items` on `branch` with rows 1..=n noted `note`.
async fn seed(env: &Env, ns: &str, branch: &str, n: i32, note: &str) {
    sql(
        env,
        ns,
        branch,
        &[
            "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL)",
            &format!("INSERT INTO items SELECT g, '{note}' FROM generate_series(1, {n}) g"),
        ],
    )
    .await;
}

/// Asserts storage holds no timeline of `ns` that no Branch serves.
async fn assert_no_orphan_timelines(env: &Env, ns: &str) {
    if let Some(storage) = storage(env).await {
        let orphans = orphan_timelines(env, &storage, ns).await;
        assert!(
            orphans.is_empty(),
            "timelines of {ns} in storage that no Branch serves: {orphans:?}"
        );
        eprintln!("storage: every timeline of {ns} is a Branch's");
    } else {
        eprintln!("orphan check skipped: PGBRANCH_E2E_CHECK_STORAGE not set");
    }
}

/// The pods of a component of the installed operator (`operator`, `storage`).
async fn component_pods(env: &Env, component: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.operator_namespace);
    pods.list(&ListParams::default().labels(&format!("app.kubernetes.io/component={component}")))
        .await
        .expect("list pods")
        .items
}

fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until a Ready pod of `component` runs that is none of `old`.
async fn wait_replaced(env: &Env, component: &str, old: &[String]) -> String {
    let start = Instant::now();
    loop {
        let pods = component_pods(env, component).await;
        if let Some(p) = pods
            .iter()
            .find(|p| pod_ready(p) && !old.contains(&p.name_any()))
        {
            return p.name_any();
        }
        assert!(
            start.elapsed() < env.timeout,
            "no new Ready {component} pod after {:?}: {:?}",
            env.timeout,
            pods.iter().map(|p| p.name_any()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Deletes the pods of a component as `kubectl delete pod` does (graceful).
async fn delete_component_pods(env: &Env, component: &str) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.operator_namespace);
    let mut names = vec![];
    for p in component_pods(env, component).await {
        let name = p.name_any();
        pods.delete(&name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete pod {name}: {e}"));
        names.push(name);
    }
    assert!(!names.is_empty(), "no {component} pod to delete");
    names
}

/// A restore with `finalize: true` while a client Pod opens a new
/// connection through the target's Service every ~150 ms: per finalize,
/// how many connections failed and the longest time without one, measured
/// through the Service's ClusterIP and kube-proxy. At most one failed
/// connection per finalize; the numbers are printed (docs/e2e.md and the
/// README quote them).
#[tokio::test]
async fn finalize_outage_through_kube_proxy() {
    let Some(env) = env("finalize_outage_through_kube_proxy").await else {
        return;
    };
    let ns = TestNamespace::create(&env, "outage").await;
    let n = ns.name.as_str();
    let branches: Api<Branch> = Api::namespaced(env.client.clone(), n);
    let snapshots: Api<Snapshot> = Api::namespaced(env.client.clone(), n);
    let restores: Api<SnapshotRestore> = Api::namespaced(env.client.clone(), n);

    create(&env, n, root("prod")).await;
    wait_ready(&env, &branches, "prod").await;
    seed(&env, n, "prod", 5, "snapshot").await;
    create(&env, n, snapshot("prod-snap", "prod")).await;
    wait_ready(&env, &snapshots, "prod-snap").await;
    sql(
        &env,
        n,
        "prod",
        &["INSERT INTO items SELECT g, 'later' FROM generate_series(6, 10) g"],
    )
    .await;
    let secret = secret_data(&env, n, "prod-app").await;

    const ROUNDS: usize = 2;
    let mut lines = vec![];
    for round in 1..=ROUNDS {
        let before = timeline_of(&branches.get("prod").await.unwrap());
        let prober = Prober::start(&env, n, "prod-app").await;
        let name = format!("restore-{round}");
        let started = Instant::now();
        create(
            &env,
            n,
            restore_from(&name, "prod-snap", "prod", &format!("prod-before-{round}")),
        )
        .await;
        wait_phase(&env, &restores, &name, RestorePhase::Completed).await;
        let took = started.elapsed();
        wait_moved(&env, &branches, "prod", &before).await;
        // Let the prober see the settled state.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let r = prober.stop(&env).await;
        let line = format!(
            "finalize {round}: restore {:.1} s; through Service prod: {} connections, {} failed, switch gap {} ms (last answer of the old compute to first of the new), longest gap {} ms, slowest attempt {} ms",
            took.as_secs_f64(),
            r.ok + r.failed,
            r.failed,
            r.switch_gap_ms.map_or("-".into(), |g| g.to_string()),
            r.longest_gap_ms,
            r.slowest_attempt_ms,
        );
        eprintln!("{line}");
        lines.push(line);
        assert!(r.last_ok, "connections work after finalize {round}: {r:?}");
        assert!(
            r.servers.len() == 2,
            "the prober saw the old compute, then the new one: {r:?}"
        );
        assert!(
            r.failed <= 1,
            "finalize {round}: at most one dropped connection, saw {} failed: {r:?}",
            r.failed
        );
        assert_eq!(
            items(&env, n, "prod").await,
            rows(1..=5, "snapshot"),
            "prod holds the snapshot's rows after finalize {round}"
        );
    }
    eprintln!("finalize outage summary:\n  {}", lines.join("\n  "));
    assert_eq!(
        secret_data(&env, n, "prod-app").await,
        secret,
        "prod's Secret is unchanged"
    );
    wait_namespace_healthy(&env, n).await;
    assert_no_orphan_timelines(&env, n).await;
    ns.delete_and_wait(&env).await;
}

/// `spec.compute.suspended: true` stops the compute (the Service refuses
/// connections, the branch is Ready with reason Suspended); `false` brings
/// it back on the same data, Service and Secret.
#[tokio::test]
async fn suspend_and_resume_keep_data_and_secret() {
    let Some(env) = env("suspend_and_resume_keep_data_and_secret").await else {
        return;
    };
    let ns = TestNamespace::create(&env, "suspend").await;
    let n = ns.name.as_str();
    let branches: Api<Branch> = Api::namespaced(env.client.clone(), n);
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), n);
    create(&env, n, root("main")).await;
    wait_ready(&env, &branches, "main").await;
    seed(&env, n, "main", 7, "kept").await;
    let secret = secret_data(&env, n, "main-app").await;
    let b0 = branches.get("main").await.unwrap();
    let tl = timeline_of(&b0);

    merge_patch(
        &branches,
        "main",
        json!({"spec": {"compute": {"suspended": true}}}),
    )
    .await
    .expect("suspend");
    let suspended = wait_for(&env, &branches, "main", "Ready, reason Suspended", |b| {
        health(b).is_ok() && condition(b, "Ready").is_some_and(|c| c.reason == "Suspended")
    })
    .await;
    assert_eq!(timeline_of(&suspended), tl, "suspending keeps the timeline");
    let start = Instant::now();
    loop {
        let left = pods
            .list(&ListParams::default().labels(&format!("{LABEL_BRANCH}=main")))
            .await
            .unwrap()
            .items;
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < env.timeout,
            "compute pods still there while suspended: {:?}",
            left.iter().map(|p| p.name_any()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let run = run_sql_pod(&env, n, "main-app", &["SELECT 1"]).await;
    assert_eq!(
        run.exit_code, 2,
        "a suspended branch refuses connections: {run:?}"
    );
    eprintln!("while suspended: {}", run.output.trim());

    merge_patch(
        &branches,
        "main",
        json!({"spec": {"compute": {"suspended": false}}}),
    )
    .await
    .expect("resume");
    let resumed = wait_for(&env, &branches, "main", "Ready, reason Ready", |b| {
        health(b).is_ok() && condition(b, "Ready").is_some_and(|c| c.reason == "Ready")
    })
    .await;
    assert_eq!(timeline_of(&resumed), tl);
    assert_eq!(items(&env, n, "main").await, rows(1..=7, "kept"));
    assert_eq!(secret_data(&env, n, "main-app").await, secret);
    assert_eq!(
        resumed.status.as_ref().and_then(|s| s.connection.clone()),
        b0.status.as_ref().and_then(|s| s.connection.clone()),
        "same connection after resume"
    );
    wait_namespace_healthy(&env, n).await;
    ns.delete_and_wait(&env).await;
}

/// The operator's pod is deleted while a restore is finalizing: the new
/// pod finishes it — the target serves the snapshot's rows with its old
/// Secret, the backup branch the newer ones, and no timeline is orphaned.
#[tokio::test]
async fn operator_pod_deleted_mid_restore() {
    let Some(env) = env("operator_pod_deleted_mid_restore").await else {
        return;
    };
    let ns = TestNamespace::create(&env, "opkill").await;
    let n = ns.name.as_str();
    let branches: Api<Branch> = Api::namespaced(env.client.clone(), n);
    let snapshots: Api<Snapshot> = Api::namespaced(env.client.clone(), n);
    let restores: Api<SnapshotRestore> = Api::namespaced(env.client.clone(), n);

    create(&env, n, root("prod")).await;
    wait_ready(&env, &branches, "prod").await;
    seed(&env, n, "prod", 5, "snapshot").await;
    create(&env, n, snapshot("prod-snap", "prod")).await;
    wait_ready(&env, &snapshots, "prod-snap").await;
    sql(
        &env,
        n,
        "prod",
        &["INSERT INTO items SELECT g, 'later' FROM generate_series(6, 10) g"],
    )
    .await;
    let all = [rows(1..=5, "snapshot"), rows(6..=10, "later")].concat();
    let secret = secret_data(&env, n, "prod-app").await;
    let tl0 = timeline_of(&branches.get("prod").await.unwrap());

    create(
        &env,
        n,
        restore_from("undo", "prod-snap", "prod", "prod-before"),
    )
    .await;
    // Delete the operator's pod as soon as the restore is finalizing.
    let start = Instant::now();
    let step = loop {
        let r = restores.get("undo").await.unwrap();
        let st = r.status.clone().unwrap_or_default();
        match st.phase {
            Some(RestorePhase::Finalizing) => break st.finalize_step,
            Some(RestorePhase::Completed) | Some(RestorePhase::Failed) => panic!(
                "restore went to {:?} before it was seen Finalizing (polled every 100 ms)",
                st.phase
            ),
            _ => {}
        }
        assert!(
            start.elapsed() < env.timeout,
            "restore never Finalizing: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let old = delete_component_pods(&env, "operator").await;
    eprintln!(
        "deleted operator pod(s) {old:?} with the restore Finalizing (last step done: {step:?})"
    );
    let new = wait_replaced(&env, "operator", &old).await;
    eprintln!("operator pod {new} Ready");

    let done = wait_phase(&env, &restores, "undo", RestorePhase::Completed).await;
    assert!(health(&done).is_ok(), "undo: {:?}", health(&done));
    wait_moved(&env, &branches, "prod", &tl0).await;
    assert_eq!(items(&env, n, "prod").await, rows(1..=5, "snapshot"));
    assert_eq!(secret_data(&env, n, "prod-app").await, secret);
    wait_ready(&env, &branches, "prod-before").await;
    assert_eq!(items(&env, n, "prod-before").await, all);
    wait_namespace_healthy(&env, n).await;
    assert_no_orphan_timelines(&env, n).await;
    ns.delete_and_wait(&env).await;
}

/// The storage pod is deleted while it creates a point-in-time branch:
/// once the StatefulSet's new pod is up, the branch becomes Ready with
/// exactly the rows of that point, and no half-made timeline is left.
#[tokio::test]
async fn storage_pod_deleted_mid_branch_creation() {
    let Some(env) = env("storage_pod_deleted_mid_branch_creation").await else {
        return;
    };
    let ns = TestNamespace::create(&env, "storagekill").await;
    let n = ns.name.as_str();
    let branches: Api<Branch> = Api::namespaced(env.client.clone(), n);

    create(&env, n, root("main")).await;
    wait_ready(&env, &branches, "main").await;
    // WAL to replay before the point: the creation takes a few seconds.
    sql(
        &env,
        n,
        "main",
        &[
            "CREATE TABLE filler (id int, pad text)",
            "INSERT INTO filler SELECT g, repeat('x', 200) FROM generate_series(1, 50000) g",
        ],
    )
    .await;
    let point = write_two_batches(&env, n, "main").await;

    create(&env, n, child("past", "main", Some(point.clone()))).await;
    let start = Instant::now();
    let seen = loop {
        let b = branches.get("past").await.unwrap();
        if let Some(c) = condition(&b, "Ready") {
            if c.reason == "CreatingTimeline" {
                break c.message;
            }
            assert!(
                c.status != "True",
                "past was Ready before storage was seen creating it: {c:?}"
            );
        }
        assert!(start.elapsed() < env.timeout, "past never CreatingTimeline");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let old = delete_component_pods(&env, "storage").await;
    eprintln!("deleted storage pod(s) {old:?} while: {seen}");
    let sts: Api<StatefulSet> = Api::namespaced(env.client.clone(), &env.operator_namespace);
    let new = wait_replaced(&env, "storage", &[]).await;
    eprintln!(
        "storage pod {new} Ready again (StatefulSet {:?})",
        sts.list(&ListParams::default()).await.map(|l| l
            .items
            .iter()
            .map(|s| s.name_any())
            .collect::<Vec<_>>())
    );

    let past = wait_ready(&env, &branches, "past").await;
    eprintln!("past Ready on timeline {}", timeline_of(&past));
    assert_eq!(
        items(&env, n, "past").await,
        rows(1..=10, "first"),
        "past (at {point}) holds the first batch only"
    );
    assert_no_orphan_timelines(&env, n).await;
    wait_namespace_healthy(&env, n).await;
    ns.delete_and_wait(&env).await;
}

/// What an application and a GitOps tool hold of a branch.
#[derive(Debug, PartialEq)]
struct Held {
    timeline: String,
    connection: Option<pgbranch::api::ConnectionStatus>,
    secret: BTreeMap<String, String>,
    service_uid: Option<String>,
    ready_since: Option<String>,
}

async fn held(env: &Env, ns: &str, name: &str) -> Held {
    let b = Api::<Branch>::namespaced(env.client.clone(), ns)
        .get(name)
        .await
        .unwrap();
    let svc = Api::<Service>::namespaced(env.client.clone(), ns)
        .get(name)
        .await
        .unwrap();
    Held {
        timeline: timeline_of(&b),
        connection: b.status.as_ref().and_then(|s| s.connection.clone()),
        secret: secret_data(env, ns, &format!("{name}-app")).await,
        service_uid: svc.metadata.uid,
        ready_since: condition(&b, "Ready").map(|c| c.last_transition_time.0.to_string()),
    }
}

/// Runs `scripts/e2e.sh <what>` (the installer of this run).
fn installer(script: &str, what: &str) {
    eprintln!("running {script} {what}");
    let status = std::process::Command::new("bash")
        .arg(script)
        .arg(what)
        .status()
        .unwrap_or_else(|e| panic!("running {script} {what}: {e}"));
    assert!(status.success(), "{script} {what} failed: {status}");
}

/// The operator is uninstalled (as `helm uninstall` does: CRDs kept) and
/// installed again while branches run: the CRDs and Branches stay, the
/// computes keep serving meanwhile, and afterwards every branch is Ready
/// with the same timeline, data, Service and Secret — and the new operator
/// branches them.
#[tokio::test]
async fn reinstall_keeps_branches_and_data() {
    let Some(env) = env("reinstall_keeps_branches_and_data").await else {
        return;
    };
    let Some(script) = std::env::var("PGBRANCH_E2E_INSTALLER")
        .ok()
        .filter(|s| !s.is_empty())
    else {
        eprintln!("reinstall_keeps_branches_and_data: skipped: PGBRANCH_E2E_INSTALLER not set (scripts/e2e.sh sets it)");
        return;
    };
    let ns = TestNamespace::create(&env, "reinstall").await;
    let n = ns.name.as_str();
    let branches: Api<Branch> = Api::namespaced(env.client.clone(), n);
    create(&env, n, root("main")).await;
    wait_ready(&env, &branches, "main").await;
    seed(&env, n, "main", 4, "main").await;
    create(&env, n, child("dev", "main", None)).await;
    wait_ready(&env, &branches, "dev").await;
    sql(&env, n, "dev", &["INSERT INTO items VALUES (5, 'dev')"]).await;
    let dev_rows = [rows(1..=4, "main"), rows(5..=5, "dev")].concat();
    let before = [held(&env, n, "main").await, held(&env, n, "dev").await];

    installer(&script, "uninstall");
    let deploys: Api<Deployment> = Api::namespaced(env.client.clone(), &env.operator_namespace);
    assert!(
        deploys
            .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
            .await
            .unwrap()
            .items
            .is_empty(),
        "the operator is gone"
    );
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    for crd in [
        "branches.pgbranch.dev",
        "snapshots.pgbranch.dev",
        "snapshotrestores.pgbranch.dev",
        "snapshotschedules.pgbranch.dev",
    ] {
        assert!(
            crds.get_opt(crd).await.unwrap().is_some(),
            "CRD {crd} survives the uninstall"
        );
    }
    // The computes belong to the Branches, not to the operator: they serve.
    assert_eq!(items(&env, n, "main").await, rows(1..=4, "main"));
    assert_eq!(items(&env, n, "dev").await, dev_rows);

    installer(&script, "install");
    for (name, was) in ["main", "dev"].iter().zip(before.iter()) {
        wait_ready(&env, &branches, name).await;
        assert_eq!(
            &held(&env, n, name).await,
            was,
            "{name}: timeline, connection, Secret, Service and Ready unchanged"
        );
    }
    assert_eq!(items(&env, n, "main").await, rows(1..=4, "main"));
    assert_eq!(items(&env, n, "dev").await, dev_rows);
    // The new operator and storage work on the old data: a new branch.
    create(&env, n, child("after", "dev", None)).await;
    wait_ready(&env, &branches, "after").await;
    assert_eq!(items(&env, n, "after").await, dev_rows);
    wait_namespace_healthy(&env, n).await;
    assert_no_orphan_timelines(&env, n).await;
    ns.delete_and_wait(&env).await;
}

// ---------------------------------------------------------------------------
// The shipped samples, applied as they are.

/// What a sample object should come to.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Healthy,
    /// Deleted by the operator (an `expiresAt` in the past).
    Gone,
    /// `Stalled=True` with this reason.
    Stalled(&'static str),
}

/// One object of config/samples.
struct Sample {
    file: String,
    kind: String,
    name: String,
    doc: serde_json::Value,
}

fn load_samples() -> Vec<Sample> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/samples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut out = vec![];
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for de in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_json::Value = serde::Deserialize::deserialize(de).unwrap();
            if v.is_null() {
                continue;
            }
            out.push(Sample {
                file: f.file_name().unwrap().to_string_lossy().into_owned(),
                kind: v["kind"].as_str().unwrap().to_string(),
                name: v["metadata"]["name"].as_str().unwrap().to_string(),
                doc: v,
            });
        }
    }
    out
}

fn ts(v: &serde_json::Value) -> Option<jiff::Timestamp> {
    v.as_str().map(|s| {
        s.parse()
            .unwrap_or_else(|e| panic!("sample timestamp {s:?}: {e}"))
    })
}

/// Creates a sample object (typed: the CRDs' schemas apply).
async fn create_sample(env: &Env, ns: &str, s: &Sample) {
    let doc = s.doc.clone();
    match s.kind.as_str() {
        "Branch" => drop(create(env, ns, serde_json::from_value::<Branch>(doc).unwrap()).await),
        "Snapshot" => drop(create(env, ns, serde_json::from_value::<Snapshot>(doc).unwrap()).await),
        "SnapshotRestore" => drop(
            create(
                env,
                ns,
                serde_json::from_value::<SnapshotRestore>(doc).unwrap(),
            )
            .await,
        ),
        "SnapshotSchedule" => drop(
            create(
                env,
                ns,
                serde_json::from_value::<pgbranch::api::SnapshotSchedule>(doc).unwrap(),
            )
            .await,
        ),
        k => panic!("{}: unexpected kind {k} in config/samples", s.file),
    }
}

/// Health of one object by kind and name: Ok(None) gone, Ok(Some(Ok))
/// healthy, Ok(Some(Err(reason))) Stalled with that reason, Err(what) still
/// working on it.
async fn state_of(
    env: &Env,
    ns: &str,
    kind: &str,
    name: &str,
) -> Result<Option<Result<(), String>>, String> {
    async fn one<K>(env: &Env, ns: &str, name: &str) -> Result<Option<Result<(), String>>, String>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
        K: Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
    {
        let api: Api<K> = Api::namespaced(env.client.clone(), ns);
        let Some(o) = api.get_opt(name).await.expect("get") else {
            return Ok(None);
        };
        if let Some(s) = condition(&o, "Stalled").filter(|c| c.status == "True") {
            if observed_generation(&o) == o.meta().generation {
                return Ok(Some(Err(s.reason)));
            }
        }
        match health(&o) {
            Ok(()) => Ok(Some(Ok(()))),
            Err(e) => Err(e),
        }
    }
    match kind {
        "Branch" => one::<Branch>(env, ns, name).await,
        "Snapshot" => one::<Snapshot>(env, ns, name).await,
        "SnapshotRestore" => one::<SnapshotRestore>(env, ns, name).await,
        "SnapshotSchedule" => one::<pgbranch::api::SnapshotSchedule>(env, ns, name).await,
        k => panic!("kind {k}"),
    }
}

/// Every object of `config/samples`, applied file by file (in name order,
/// each file at once, as a GitOps commit would) into one namespace, comes
/// to the state it should: Ready — or, where a sample's fixed date makes
/// it so, deleted (an `expiresAt` in the past), Stalled `SourceNotFound`
/// (a restore of such a snapshot), Stalled `RestoredBranchFailed` /
/// `PointOutsideRestoreWindow` (a point before its branch existed). The
/// expectation is computed from the sample's dates and this cluster's
/// objects, never from what the operator did; the table is printed.
#[tokio::test]
async fn samples_reach_their_expected_state() {
    let Some(env) = env("samples_reach_their_expected_state").await else {
        return;
    };
    let ns = TestNamespace::create(&env, "samples").await;
    let n = ns.name.as_str();
    let samples = load_samples();
    assert!(!samples.is_empty(), "config/samples has objects");

    let mut files: Vec<String> = samples.iter().map(|s| s.file.clone()).collect();
    files.dedup();
    for file in &files {
        let these: Vec<&Sample> = samples.iter().filter(|s| &s.file == file).collect();
        for s in &these {
            create_sample(&env, n, s).await;
        }
        // Settled: healthy, Stalled or gone.
        let start = Instant::now();
        loop {
            let mut busy = vec![];
            for s in &these {
                if let Err(e) = state_of(&env, n, &s.kind, &s.name).await {
                    busy.push(format!("{} {}: {e}", s.kind, s.name));
                }
            }
            if busy.is_empty() {
                break;
            }
            assert!(
                start.elapsed() < env.timeout,
                "{file}: not settled after {:?}: {busy:?}",
                env.timeout
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        eprintln!(
            "{file}: settled after {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }

    // What each sample should have come to, from its dates and the times
    // its branches were created here.
    let now = jiff::Timestamp::now();
    let branches: Api<Branch> = Api::namespaced(env.client.clone(), n);
    let created = |name: &str| {
        let branches = branches.clone();
        let name = name.to_string();
        async move {
            branches
                .get_opt(&name)
                .await
                .unwrap()
                .and_then(|b| b.metadata.creation_timestamp)
                .map(|t| t.0.to_string().parse::<jiff::Timestamp>().unwrap())
        }
    };
    let expired = |s: &Sample| ts(&s.doc["spec"]["expiresAt"]).is_some_and(|t| t <= now);
    let mut expect: Vec<(String, String, Expect, &'static str)> = vec![];
    for s in &samples {
        let spec = &s.doc["spec"];
        let (e, why) = match s.kind.as_str() {
            "Branch" | "Snapshot" if expired(s) => (Expect::Gone, "expiresAt is past"),
            "Branch" => match (
                spec["parent"]["branch"].as_str(),
                ts(&spec["parent"]["timestamp"]),
            ) {
                (Some(p), Some(t)) if created(p).await.is_some_and(|c| t < c) => (
                    Expect::Stalled("PointOutsideRestoreWindow"),
                    "parent.timestamp is before the parent existed",
                ),
                _ => (Expect::Healthy, ""),
            },
            "SnapshotRestore" => {
                let src = &spec["source"];
                if let Some(snap) = src["snapshot"].as_str() {
                    let gone = samples
                        .iter()
                        .find(|o| o.kind == "Snapshot" && o.name == snap)
                        .is_none_or(expired);
                    if gone {
                        (
                            Expect::Stalled("SourceNotFound"),
                            "its source snapshot expired",
                        )
                    } else {
                        (Expect::Healthy, "")
                    }
                } else {
                    let b = src["branch"].as_str().unwrap_or_default();
                    match ts(&src["timestamp"]) {
                        Some(t) if created(b).await.is_some_and(|c| t < c) => (
                            Expect::Stalled("RestoredBranchFailed"),
                            "source.timestamp is before the branch existed",
                        ),
                        _ => (Expect::Healthy, ""),
                    }
                }
            }
            _ => (Expect::Healthy, ""),
        };
        // A restore that cannot branch its point leaves its restored
        // branch (named like the restore) Stalled for the same reason.
        if e == Expect::Stalled("RestoredBranchFailed") {
            expect.push((
                "Branch".into(),
                s.name.clone(),
                Expect::Stalled("PointOutsideRestoreWindow"),
                "restored branch of a point before its branch existed",
            ));
        }
        expect.push((s.kind.clone(), s.name.clone(), e, why));
    }
    // Branches the operator made (backup branches of finalized restores).
    for b in branches.list(&ListParams::default()).await.unwrap().items {
        if !expect
            .iter()
            .any(|(k, name, ..)| k == "Branch" && *name == b.name_any())
        {
            expect.push((
                "Branch".into(),
                b.name_any(),
                Expect::Healthy,
                "made by a restore",
            ));
        }
    }

    // Everything settles (backup branches start their computes last).
    let start = Instant::now();
    let mut got_all = vec![];
    loop {
        got_all.clear();
        for (kind, name, ..) in &expect {
            got_all.push(state_of(&env, n, kind, name).await);
        }
        if got_all.iter().all(|g| g.is_ok()) || start.elapsed() > env.timeout {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut table = vec![];
    let mut wrong = vec![];
    for ((kind, name, want, why), got) in expect.iter().zip(got_all) {
        let ok = matches!(
            (want, &got),
            (Expect::Healthy, Ok(Some(Ok(())))) | (Expect::Gone, Ok(None))
        ) || matches!((want, &got), (Expect::Stalled(r), Ok(Some(Err(g)))) if r == g);
        let line = format!(
            "{kind} {name}: {} (expected {want:?}{})",
            match &got {
                Ok(None) => "gone".to_string(),
                Ok(Some(Ok(()))) => "Ready".to_string(),
                Ok(Some(Err(r))) => format!("Stalled {r}"),
                Err(e) => format!("not settled: {e}"),
            },
            if why.is_empty() {
                String::new()
            } else {
                format!(": {why}")
            }
        );
        if !ok {
            wrong.push(line.clone());
        }
        table.push(line);
    }
    eprintln!("samples:\n  {}", table.join("\n  "));
    assert!(
        wrong.is_empty(),
        "samples not in their expected state:\n{}",
        wrong.join("\n")
    );
    ns.delete_and_wait(&env).await;
}
