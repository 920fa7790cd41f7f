//! Tier 4 (a real control plane): no secret leaks (issue 17). A full
//! scenario (a root branch, a child, a snapshot, a restore with finalize, a
//! SnapshotSchedule run; TLS on, so a namespace CA and per-branch
//! certificates) runs with every log line of the operator and the storage
//! engine captured in memory; then every password and private key the
//! scenario created is searched for in those logs, in every status of every
//! kind, in every Event of the namespace and in the operator's `/metrics`.
//! None may appear.
//!
//! The world runs the engine in-process (no storage API, so no storage
//! token to look for).

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use pgbranch::api::{
    Branch, BranchSpec, ParentRef, RestoreSource, RoleSpec, Snapshot, SnapshotRestore,
    SnapshotRestoreSpec, SnapshotSchedule, SnapshotSpec,
};
use serde_json::json;
use support::times::{next_utc, plus};
use support::world::*;

/// Every byte the tracing subscriber writes.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = CaptureWriter;
    fn make_writer(&'a self) -> Self::Writer {
        CaptureWriter(self.0.clone())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Installs the capturing subscriber: the operator and the engine at TRACE
/// (every field of every span and event, as JSON), everything else at
/// INFO. It must be the process's subscriber, so it is installed before
/// the world (which only `try_init`s one when `TEST_LOG` is set).
fn capture_logs() -> Capture {
    let cap = Capture::default();
    tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(true)
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "info,pgbranch=trace,kube=debug",
        ))
        .with_writer(cap.clone())
        .try_init()
        .expect("the leak test's subscriber is the first one installed");
    cap
}

/// A secret value and where it came from (`<Secret>/<key>`).
#[derive(Debug, Clone)]
struct Found {
    origin: String,
    value: String,
}

/// Values shorter than this are user names, ports, `require`...: not
/// secrets worth searching for (a random password is longer).
const MIN_SECRET: usize = 12;

const SECRET_KEYS: &[&str] = &["password", "tls.key", "ca.key", "token"];

/// Every secret value in the namespace's Secrets, keyed by value (a value
/// seen under several names is searched once).
async fn collect_secrets(client: &Client, into: &mut BTreeMap<String, Found>) {
    let api: Api<Secret> = Api::default_namespaced(client.clone());
    for s in api
        .list(&ListParams::default())
        .await
        .expect("list secrets")
    {
        let name = s.name_any();
        for (key, v) in s.data.clone().unwrap_or_default() {
            let is_secret = SECRET_KEYS.contains(&key.as_str()) || key.ends_with(".key");
            if !is_secret {
                continue;
            }
            let Ok(value) = String::from_utf8(v.0) else {
                continue;
            };
            let value = value.trim().to_string();
            if value.len() < MIN_SECRET {
                continue;
            }
            into.entry(value.clone()).or_insert(Found {
                origin: format!("Secret {name}/{key}"),
                value,
            });
        }
    }
}

/// What to look for of one secret: the value, its base64, and for a PEM
/// its body lines (a log that prints a key line by line still leaks it).
fn needles(value: &str) -> Vec<String> {
    let mut v = vec![
        value.to_string(),
        base64::engine::general_purpose::STANDARD.encode(value),
    ];
    if value.contains("-----BEGIN") {
        v.extend(
            value
                .lines()
                .map(str::trim)
                .filter(|l| !l.starts_with("-----") && l.len() >= 16)
                .map(String::from),
        );
    }
    v
}

/// The first characters of a needle, enough to tell which one without
/// printing it.
fn hint(s: &str) -> String {
    format!("{}…", s.chars().take(4).collect::<String>())
}

/// `(location, text)` of every status of every kind in the namespace.
async fn statuses(client: &Client) -> Vec<(String, String)> {
    let mut out = Vec::new();
    macro_rules! of_kind {
        ($k:ty, $kind:literal) => {
            let api: Api<$k> = Api::default_namespaced(client.clone());
            for o in api.list(&ListParams::default()).await.expect("list") {
                let text = serde_json::to_string(&o.status).expect("status to JSON");
                out.push((format!("{} {} status", $kind, o.name_any()), text));
                // Annotations are what a user sees next to the status.
                let ann = serde_json::to_string(o.annotations()).expect("annotations");
                out.push((format!("{} {} annotations", $kind, o.name_any()), ann));
            }
        };
    }
    of_kind!(Branch, "Branch");
    of_kind!(Snapshot, "Snapshot");
    of_kind!(SnapshotRestore, "SnapshotRestore");
    of_kind!(SnapshotSchedule, "SnapshotSchedule");
    out
}

/// `(location, text)` of every Event in the namespace (both APIs).
async fn events(client: &Client) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let api: Api<Event> = Api::default_namespaced(client.clone());
    for e in api.list(&ListParams::default()).await.expect("list events") {
        let what = e
            .regarding
            .as_ref()
            .map(|r| {
                format!(
                    "{}/{}",
                    r.kind.clone().unwrap_or_default(),
                    r.name.clone().unwrap_or_default()
                )
            })
            .unwrap_or_default();
        let text = format!(
            "{} {} {} {}",
            e.reason.clone().unwrap_or_default(),
            e.note.clone().unwrap_or_default(),
            e.action.clone().unwrap_or_default(),
            serde_json::to_string(&e.metadata.annotations).unwrap_or_default(),
        );
        out.push((format!("Event {} about {what}", e.name_any()), text));
    }
    let api: Api<CoreEvent> = Api::default_namespaced(client.clone());
    for e in api.list(&ListParams::default()).await.expect("list events") {
        let text = format!(
            "{} {}",
            e.reason.clone().unwrap_or_default(),
            e.message.clone().unwrap_or_default()
        );
        out.push((format!("core Event {}", e.name_any()), text));
    }
    out
}

async fn snapshot_of(client: &Client, name: &str, branch: &str) {
    create_snapshot(
        client,
        name,
        SnapshotSpec {
            branch: branch.into(),
            ..Default::default()
        },
    )
    .await;
    wait_snapshot_ready(client, name).await;
}

/// Where `secret` (any of its [`needles`]) appears among `places`, each
/// with the line it is on, the secret masked.
fn leaks_of(secret: &Found, places: &[(String, String)]) -> Vec<String> {
    let mut leaks = Vec::new();
    for n in needles(&secret.value) {
        for (place, text) in places {
            if let Some(at) = text.find(&n) {
                // The line it is on, with the needle masked, to find the
                // culprit without printing the secret.
                let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
                let line = text[start..end].replace(&n, "<SECRET>");
                let line: String = line.chars().take(600).collect();
                leaks.push(format!(
                    "{} ({}) appears in {place}: {line}",
                    secret.origin,
                    hint(&n)
                ));
            }
        }
    }
    leaks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_password_token_or_private_key_in_logs_status_events_or_metrics() {
    let logs = capture_logs();
    let canary = Found {
        origin: "the canary".into(),
        value: format!("canary-{}", uuid::Uuid::new_v4().simple()),
    };
    tracing::debug!(target: "pgbranch::leak_canary", "a deliberate leak: {}", canary.value);
    let t0 = jiff::Timestamp::now();
    let Some(mut h) = World::builder(module_path!()).clock(t0).build().await else {
        return;
    };
    h.start_operator(h.config());
    let client = h.client.clone();
    // Secrets that live only for a while (the restored branch's before a
    // finalize hands it over) are collected by a watcher listing them all
    // along, besides the collections at each stage's end.
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let watcher = {
        let (client, seen) = (client.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let mut now = BTreeMap::new();
                collect_secrets(&client, &mut now).await;
                {
                    let mut all = seen.lock().unwrap();
                    for (k, v) in now {
                        all.entry(k).or_insert(v);
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
        })
    };
    let mut secrets = BTreeMap::new();

    // A root with declared roles (the second has a Secret of its own) and
    // a database, and a child of it.
    let mut prod = shop_branch("prod");
    prod.spec.roles.push(RoleSpec {
        name: "reporter".into(),
    });
    create_branch(&client, &prod).await;
    wait_branch_ready(&client, "prod").await;
    let child = Branch::new(
        "feature",
        BranchSpec {
            parent: Some(ParentRef {
                branch: "prod".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    create_branch(&client, &child).await;
    wait_branch_ready(&client, "feature").await;
    // The operator's SQL and a client both really used the passwords.
    let c = h.connect_app("feature").await;
    c.batch_execute("CREATE TABLE items (id int); INSERT INTO items VALUES (1), (2);")
        .await
        .expect("write on feature");
    drop(c);
    collect_secrets(&client, &mut secrets).await;

    // A snapshot of the child, restored onto the root with finalize.
    snapshot_of(&client, "feature-snap", "feature").await;
    create_restore(
        &client,
        "promote",
        SnapshotRestoreSpec {
            source: RestoreSource {
                snapshot: Some("feature-snap".into()),
                ..Default::default()
            },
            target: Some("prod".into()),
            finalize: true,
            preserve_under_name: None,
        },
    )
    .await;
    wait_completed(&client, "promote").await;
    wait_branch_ready(&client, "prod").await;
    let c = h.connect_app("prod").await;
    assert_eq!(ids(&c).await, vec![1, 2], "prod serves the restored data");
    drop(c);
    collect_secrets(&client, &mut secrets).await;

    // A SnapshotSchedule run, on the world's clock.
    h.create::<SnapshotSchedule>(json!({
        "apiVersion": "pgbranch.dev/v1alpha1", "kind": "SnapshotSchedule",
        "metadata": {"name": "nightly"},
        "spec": {"branch": "prod", "schedule": "0 2 * * *", "retention": {"maxCount": 2}},
    }))
    .await;
    eventually(60, "the schedule's first status", || async {
        let s = h.api::<SnapshotSchedule>().get("nightly").await.ok()?;
        s.status?.next_schedule_time.map(|_| ())
    })
    .await;
    h.clock().set(plus(next_utc(t0, 2, 0), 30));
    let run = eventually(120, "a scheduled Snapshot", || async {
        let l = ListParams::default().labels("pgbranch.dev/schedule=nightly");
        let snaps = h.api::<Snapshot>().list(&l).await.ok()?;
        snaps.items.first().map(|s| s.name_any())
    })
    .await;
    wait_snapshot_ready(&client, &run).await;
    // Every Ready again after the clock moved (certificates re-planned).
    for b in ["prod", "feature"] {
        wait_branch_ready(&client, b).await;
    }
    collect_secrets(&client, &mut secrets).await;
    watcher.abort();
    for (k, v) in std::mem::take(&mut *seen.lock().unwrap()) {
        secrets.entry(k).or_insert(v);
    }

    // What the scenario created: enough secrets that the search means
    // something, among them every kind the issue names.
    let origins: Vec<&str> = secrets.values().map(|f| f.origin.as_str()).collect();
    println!("secrets searched for: {origins:#?}");
    assert!(
        secrets.len() >= 6,
        "only {} secrets collected: {origins:?}",
        secrets.len()
    );
    for want in [
        "Secret prod-app/password",
        "Secret prod-superuser/password",
        "Secret prod-reporter/password",
        "Secret feature-app/password",
        "Secret pgbranch-ca/ca.key",
        "Secret prod-tls/tls.key",
    ] {
        assert!(
            origins.contains(&want),
            "{want} not among the collected secrets: {origins:?}"
        );
    }

    // Where secrets must not be.
    let metrics = h.metrics().encode();
    h.shutdown().await;
    let log_text = logs.text();
    let lines = log_text.lines().count();
    println!("captured {lines} log lines, {} bytes", log_text.len());
    assert!(
        lines > 500,
        "only {lines} log lines captured: is the subscriber installed?"
    );
    for marker in [
        "\"prod\"",
        "feature",
        "promote",
        "nightly",
        "feature-snap",
        // Both the operator and the engine are in the capture.
        "\"target\":\"pgbranch::controller",
        "\"target\":\"pgbranch::storage",
    ] {
        assert!(
            log_text.contains(marker),
            "the captured logs never name {marker}: the capture misses the operator"
        );
    }
    assert!(
        metrics.contains("pgbranch_"),
        "the metrics scrape is empty:\n{metrics}"
    );

    let mut places: Vec<(String, String)> = vec![("the operator's logs".into(), log_text)];
    places.extend(statuses(&client).await);
    let evs = events(&client).await;
    assert!(!evs.is_empty(), "no Events in the namespace");
    places.extend(evs);
    places.push(("/metrics".into(), metrics));

    // The search finds a secret that did leak: a canary logged under the
    // operator's target at the start is reported, and only there.
    let canary_leaks = leaks_of(&canary, &places);
    assert!(
        canary_leaks.len() == 1 && canary_leaks[0].contains("the operator's logs"),
        "the canary logged at the start is not found exactly once: {canary_leaks:?}"
    );

    let leaks: Vec<String> = secrets
        .values()
        .flat_map(|f| leaks_of(f, &places))
        .collect();
    assert!(
        leaks.is_empty(),
        "{} secret leak(s):\n{}",
        leaks.len(),
        leaks.join("\n")
    );
}
