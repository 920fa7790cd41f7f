//! Real kube_runtime machinery against the in-process API server: a
//! Controller with the finalizer helper and server-side apply, the event
//! Recorder, and kube-lease-manager.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::watcher;
use kube::{CustomResourceExt, Resource, ResourceExt};
use serde_json::json;
use support::apiserver::ApiServer;
use support::widget::{widget, Widget};

const MANAGER: &str = "widget-controller";
const FINALIZER: &str = "test.pgbranch.dev/cleanup";

struct Ctx {
    client: kube::Client,
    cleaned: Mutex<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
enum ReconcileError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// Keeps a ConfigMap `<widget>-cm` holding the widget's size, and
/// `status.ready`/`observed_generation`; writes only on differences.
async fn apply_widget(w: Arc<Widget>, ctx: &Ctx) -> Result<Action, ReconcileError> {
    let ns = w.namespace().unwrap_or_default();
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let name = format!("{}-cm", w.name_any());
    let want = BTreeMap::from([("size".to_string(), w.spec.size.to_string())]);
    let current = cms.get_opt(&name).await?;
    if current.as_ref().and_then(|c| c.data.as_ref()) != Some(&want) {
        let oref = w.controller_owner_ref(&()).expect("a widget has a uid");
        let cm = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "ownerReferences": [oref]},
            "data": want,
        });
        cms.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&cm),
        )
        .await?;
    }
    let generation = w.metadata.generation;
    let status = w.status.clone().unwrap_or_default();
    if !status.ready || status.observed_generation != generation {
        let widgets: Api<Widget> = Api::namespaced(ctx.client.clone(), &ns);
        let st = json!({
            "apiVersion": "test.pgbranch.dev/v1", "kind": "Widget",
            "status": {"ready": true, "observed_generation": generation},
        });
        widgets
            .patch_status(
                &w.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&st),
            )
            .await?;
    }
    // Re-reconcile often, so the steady-state check below sees any write
    // a reconcile of an unchanged widget would make.
    Ok(Action::requeue(Duration::from_millis(200)))
}

async fn reconcile(
    w: Arc<Widget>,
    ctx: Arc<Ctx>,
) -> Result<Action, kube::runtime::finalizer::Error<ReconcileError>> {
    let api: Api<Widget> = Api::namespaced(ctx.client.clone(), &w.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, w, |ev| async {
        match ev {
            FinalizerEvent::Apply(w) => apply_widget(w, &ctx).await,
            FinalizerEvent::Cleanup(w) => {
                ctx.cleaned.lock().unwrap().push(w.name_any());
                Ok(Action::await_change())
            }
        }
    })
    .await
}

fn error_policy(
    _: Arc<Widget>,
    _: &kube::runtime::finalizer::Error<ReconcileError>,
    _: Arc<Ctx>,
) -> Action {
    Action::requeue(Duration::from_millis(200))
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test]
async fn controller_with_finalizer_and_ssa_reconciles_settles_and_cleans_up() {
    let server = ApiServer::new();
    server.install_crd(&Widget::crd());
    let client = server.client();
    let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        cleaned: Mutex::new(Vec::new()),
    });

    let controller = Controller::new(
        Api::<Widget>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default(),
    )
    .run(reconcile, error_policy, ctx.clone())
    .for_each(|r| async move {
        if let Err(e) = r {
            eprintln!("reconcile error: {e}");
        }
    });
    let handle = tokio::spawn(controller);

    widgets
        .create(&PostParams::default(), &widget("w1", 3))
        .await
        .unwrap();
    eventually("w1 ready with its ConfigMap", || async {
        let w = widgets.get("w1").await.unwrap();
        let cm = cms.get_opt("w1-cm").await.unwrap();
        w.status
            .as_ref()
            .is_some_and(|s| s.ready && s.observed_generation == Some(1))
            && w.finalizers().contains(&FINALIZER.to_string())
            && cm.and_then(|c| c.data).is_some_and(|d| d["size"] == "3")
    })
    .await;

    // a spec change bumps generation and is reconciled
    widgets
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 5}})),
        )
        .await
        .unwrap();
    eventually("w1 at generation 2", || async {
        let w = widgets.get("w1").await.unwrap();
        let cm = cms.get_opt("w1-cm").await.unwrap();
        w.status.is_some_and(|s| s.observed_generation == Some(2))
            && cm.and_then(|c| c.data).is_some_and(|d| d["size"] == "5")
    })
    .await;

    // someone edits the owned ConfigMap: the controller (via .owns) puts it back
    cms.patch(
        "w1-cm",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"size": "999"}})),
    )
    .await
    .unwrap();
    eventually("the ConfigMap repaired", || async {
        cms.get("w1-cm")
            .await
            .unwrap()
            .data
            .is_some_and(|d| d["size"] == "5")
    })
    .await;

    // steady state: no writes at all
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = server.writes_during(Duration::from_secs(2)).await;
    assert!(writes.is_empty(), "steady-state writes: {writes:?}");

    // delete: the finalizer runs cleanup, then the widget and (by cascade) its ConfigMap go
    widgets
        .delete("w1", &DeleteParams::default())
        .await
        .unwrap();
    eventually("w1 gone", || async {
        widgets.get_opt("w1").await.unwrap().is_none()
    })
    .await;
    assert_eq!(*ctx.cleaned.lock().unwrap(), ["w1"]);
    assert!(cms.get_opt("w1-cm").await.unwrap().is_none());

    handle.abort();
}

#[tokio::test]
async fn controller_retries_through_injected_failures() {
    let server = ApiServer::new();
    server.install_crd(&Widget::crd());
    let client = server.client();
    let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        cleaned: Mutex::new(Vec::new()),
    });
    // the first two status writes fail with 500
    server.fail(
        support::apiserver::Failure::new("patch", "widgets")
            .times(2)
            .code(500),
    );
    let controller = Controller::new(
        Api::<Widget>::all(client.clone()),
        watcher::Config::default(),
    )
    .run(reconcile, error_policy, ctx)
    .for_each(|_| async {});
    let handle = tokio::spawn(controller);
    widgets
        .create(&PostParams::default(), &widget("w2", 1))
        .await
        .unwrap();
    eventually("w2 ready despite failures", || async {
        widgets
            .get("w2")
            .await
            .unwrap()
            .status
            .is_some_and(|s| s.ready)
    })
    .await;
    let injected = server.requests().iter().filter(|r| r.injected).count();
    assert_eq!(injected, 2);
    handle.abort();
}

#[tokio::test]
async fn recorder_publishes_events_and_series() {
    let server = ApiServer::new();
    let client = server.client();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut c = ConfigMap::default();
    c.metadata.name = Some("subject".into());
    let subject = cms.create(&PostParams::default(), &c).await.unwrap();

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "test-controller".into(),
            instance: None,
        },
    );
    let ev = Event {
        type_: EventType::Normal,
        reason: "Tested".into(),
        note: Some("it works".into()),
        action: "Test".into(),
        secondary: None,
    };
    let reference = subject.object_ref(&());
    recorder.publish(&ev, &reference).await.unwrap();
    recorder.publish(&ev, &reference).await.unwrap();

    let events: Api<K8sEvent> = Api::namespaced(client, "default");
    let list = events.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(list.len(), 1, "a repeated event becomes a series");
    let e = &list[0];
    assert_eq!(e.reason.as_deref(), Some("Tested"));
    assert_eq!(
        e.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("subject")
    );
    assert_eq!(e.series.as_ref().map(|s| s.count), Some(2));
}

#[tokio::test]
async fn lease_manager_acquires_and_hands_over_a_lease() {
    use kube_lease_manager::LeaseManagerBuilder;
    let server = ApiServer::new();
    let client = server.client();
    let first = LeaseManagerBuilder::new(client.clone(), "leader")
        .with_identity("first")
        .with_duration(5)
        .with_grace(2)
        .build()
        .await
        .unwrap();
    let second = LeaseManagerBuilder::new(client.clone(), "leader")
        .with_identity("second")
        .with_duration(5)
        .with_grace(2)
        .build()
        .await
        .unwrap();

    let acquired = tokio::time::timeout(Duration::from_secs(10), first.changed())
        .await
        .expect("first acquires within 10 s")
        .unwrap();
    assert!(acquired);
    let lease = server
        .object("coordination.k8s.io", "leases", Some("default"), "leader")
        .expect("the Lease exists");
    assert_eq!(lease["spec"]["holderIdentity"], "first");

    // the second cannot take it while the first holds it
    let blocked = tokio::time::timeout(Duration::from_secs(1), second.changed()).await;
    assert!(blocked.is_err(), "second must not acquire a held lease");

    // once released, the second acquires it
    first.release().await.unwrap();
    let acquired = tokio::time::timeout(Duration::from_secs(15), second.changed())
        .await
        .expect("second acquires after release")
        .unwrap();
    assert!(acquired);
    let lease = server
        .object("coordination.k8s.io", "leases", Some("default"), "leader")
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "second");
}

#[tokio::test]
async fn served_over_tcp_with_a_kubeconfig() {
    let server = ApiServer::new();
    let served = server.serve().await;
    assert_eq!(
        served.config().cluster_url.to_string(),
        format!("{}/", served.url())
    );
    assert!(served
        .kubeconfig_yaml()
        .contains(&format!("server: {}", served.url())));
    // kube's own client over TCP
    let cms: Api<ConfigMap> = Api::namespaced(served.client(), "default");
    let mut first = ConfigMap::default();
    first.metadata.name = Some("via-kube".into());
    cms.create(&PostParams::default(), &first).await.unwrap();
    let mut w = cms
        .watch(&kube::api::WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(ev, kube::api::WatchEvent::Added(o) if o.metadata.name.as_deref() == Some("via-kube"))
    );
    // and plain HTTP
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/namespaces/default/configmaps", served.url());
    let created = http
        .post(&url)
        .json(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "over-tcp"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    assert!(server
        .object("", "configmaps", Some("default"), "over-tcp")
        .is_some());
    let missing = http.get(format!("{url}/nope")).send().await.unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    let status: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(status["reason"], "NotFound");
    // a watch streams over TCP too
    let mut watch = http
        .get(format!("{url}?watch=true&resourceVersion=0"))
        .send()
        .await
        .unwrap();
    let chunk = tokio::time::timeout(Duration::from_secs(5), watch.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let line: serde_json::Value = serde_json::from_slice(chunk.trim_ascii_end()).unwrap();
    assert_eq!(line["type"], "ADDED");
}
