//! The same API scenarios on the in-process server and, when
//! `KUBEBUILDER_ASSETS` names envtest binaries, on a real kube-apiserver:
//! the in-process server is only useful where it behaves like the real one.
//! Assertions are on codes, reasons and stored state — never on messages.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::{CustomResourceExt, ResourceExt};
use serde_json::{json, Value};
use support::apiserver::envtest::TestCluster;
use support::widget::{widget, Widget};

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(name.into());
    cm.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    cm.data = Some(BTreeMap::from([("k".to_string(), "v".to_string())]));
    cm
}

fn code(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A namespace of its own per scenario, so runs never collide.
async fn namespace(cluster: &TestCluster) -> String {
    let ns = format!("parity-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    cluster.create_namespace(&ns).await;
    ns
}

#[tokio::test]
async fn crud_conflicts_and_selectors_match() {
    for cluster in TestCluster::all().await {
        let on = cluster.name();
        let ns = namespace(&cluster).await;
        let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), &ns);
        let pp = PostParams::default();
        let a = cms.create(&pp, &cm("a", &[("app", "db")])).await.unwrap();
        cms.create(&pp, &cm("b", &[("app", "web")])).await.unwrap();
        assert_eq!(
            code(cms.create(&pp, &cm("a", &[])).await.unwrap_err()),
            (409, "AlreadyExists".into()),
            "{on}"
        );
        assert_eq!(
            code(cms.get("nope").await.unwrap_err()),
            (404, "NotFound".into()),
            "{on}"
        );
        assert_eq!(
            code(cms.create(&pp, &cm("Bad_Name", &[])).await.unwrap_err()),
            (422, "Invalid".into()),
            "{on}"
        );

        // metadata is validated on every kind
        let bad_label = cm("l", &[("app", "has spaces")]);
        assert_eq!(
            code(cms.create(&pp, &bad_label).await.unwrap_err()),
            (422, "Invalid".into()),
            "{on}"
        );
        let long_value = "x".repeat(64);
        let bad_label = cm("l", &[("app", long_value.as_str())]);
        assert_eq!(
            code(cms.create(&pp, &bad_label).await.unwrap_err()).0,
            422,
            "{on}"
        );
        let mut bad_finalizer = cm("f", &[]);
        bad_finalizer.metadata.finalizers = Some(vec!["not a name".into()]);
        assert_eq!(
            code(cms.create(&pp, &bad_finalizer).await.unwrap_err()).0,
            422,
            "{on}"
        );
        let ok = cm("ok", &[("pgbranch.dev/branch", "main"), ("empty", "")]);
        cms.create(&pp, &ok).await.unwrap();

        let mut stale = a.clone();
        stale.data = Some(BTreeMap::from([("k".into(), "1".into())]));
        cms.replace("a", &pp, &stale).await.unwrap();
        assert_eq!(
            code(cms.replace("a", &pp, &stale).await.unwrap_err()),
            (409, "Conflict".into()),
            "{on}"
        );

        let l = cms
            .list(&ListParams::default().labels("app in (db)"))
            .await
            .unwrap();
        assert_eq!(
            l.items.iter().map(|o| o.name_any()).collect::<Vec<_>>(),
            ["a"],
            "{on}"
        );
        let f = cms
            .list(&ListParams::default().fields("metadata.name=b"))
            .await
            .unwrap();
        assert_eq!(f.items.len(), 1, "{on}");
        assert!(l.metadata.resource_version.is_some(), "{on}");
    }
}

#[tokio::test]
async fn patches_match() {
    for cluster in TestCluster::all().await {
        let on = cluster.name();
        let ns = namespace(&cluster).await;
        let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), &ns);
        cms.create(&PostParams::default(), &cm("p", &[("x", "1")]))
            .await
            .unwrap();
        let pp = PatchParams::default();
        let failing: Patch<()> = Patch::Json(
            serde_json::from_value(
                json!([{"op": "test", "path": "/metadata/labels/x", "value": "2"},
                                          {"op": "replace", "path": "/data/k", "value": "no"}]),
            )
            .unwrap(),
        );
        assert_eq!(
            code(cms.patch("p", &pp, &failing).await.unwrap_err()).0,
            422,
            "{on}"
        );
        // the finalizer helper's patch: test a missing field against null, then add
        let add: Patch<()> = Patch::Json(
            serde_json::from_value(json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
                                          {"op": "add", "path": "/metadata/finalizers", "value": ["test/f"]}]))
            .unwrap(),
        );
        let p = cms.patch("p", &pp, &add).await.unwrap();
        assert_eq!(p.finalizers(), ["test/f"], "{on}");
        let merged = cms
            .patch(
                "p",
                &pp,
                &Patch::Merge(json!({"metadata": {"labels": {"x": null}, "finalizers": null}})),
            )
            .await
            .unwrap();
        assert!(
            merged.labels().is_empty() && merged.finalizers().is_empty(),
            "{on}"
        );

        // server-side apply: create, drop a field, conflict, force
        let ap = |m: &str| PatchParams::apply(m);
        let v1 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "s"}, "data": {"a": "1", "b": "2"}});
        cms.patch("s", &ap("one"), &Patch::Apply(&v1))
            .await
            .unwrap();
        let v2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "s"}, "data": {"a": "1"}});
        let s = cms
            .patch("s", &ap("one"), &Patch::Apply(&v2))
            .await
            .unwrap();
        assert_eq!(s.data.unwrap().keys().collect::<Vec<_>>(), ["a"], "{on}");
        let other = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "s"}, "data": {"a": "x"}});
        assert_eq!(
            code(
                cms.patch("s", &ap("two"), &Patch::Apply(&other))
                    .await
                    .unwrap_err()
            ),
            (409, "Conflict".into()),
            "{on}"
        );
        let forced = cms
            .patch("s", &ap("two").force(), &Patch::Apply(&other))
            .await
            .unwrap();
        assert_eq!(forced.data.unwrap()["a"], "x", "{on}");
    }
}

#[tokio::test]
async fn status_generation_and_finalizers_match() {
    for cluster in TestCluster::all().await {
        let on = cluster.name();
        cluster.install_crds(&[Widget::crd()]).await;
        let ns = namespace(&cluster).await;
        let widgets: Api<Widget> = Api::namespaced(cluster.client(), &ns);
        let pp = PostParams::default();
        let mut w = widget("w", 1);
        w.metadata.finalizers = Some(vec!["test/hold".into()]);
        let created = widgets.create(&pp, &w).await.unwrap();
        assert_eq!(created.metadata.generation, Some(1), "{on}");

        let st = widgets
            .patch_status(
                "w",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"ready": true}})),
            )
            .await
            .unwrap();
        assert_eq!(
            st.metadata.generation,
            Some(1),
            "{on}: status does not bump generation"
        );
        let sp = widgets
            .patch(
                "w",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"size": 2}, "status": {"ready": false}})),
            )
            .await
            .unwrap();
        assert_eq!(sp.metadata.generation, Some(2), "{on}");
        assert!(
            sp.status.unwrap().ready,
            "{on}: the main endpoint ignores status"
        );

        // custom resources refuse strategic merge patches
        let err = widgets
            .patch(
                "w",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"size": 5}})),
            )
            .await
            .unwrap_err();
        assert_eq!(code(err).0, 415, "{on}");

        // custom resources refuse a PUT without resourceVersion
        let mut blind = widget("w", 3);
        blind.metadata.finalizers = Some(vec!["test/hold".into()]);
        assert_eq!(
            code(widgets.replace("w", &pp, &blind).await.unwrap_err()).0,
            422,
            "{on}"
        );

        widgets.delete("w", &DeleteParams::default()).await.unwrap();
        let marked = widgets.get("w").await.unwrap();
        assert!(marked.metadata.deletion_timestamp.is_some(), "{on}");
        let err = widgets
            .patch(
                "w",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": ["test/hold", "test/new"]}})),
            )
            .await
            .unwrap_err();
        assert_eq!(code(err).0, 422, "{on}: no new finalizers while deleting");
        widgets
            .patch(
                "w",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await
            .unwrap();
        assert!(widgets.get_opt("w").await.unwrap().is_none(), "{on}");
    }
}

#[tokio::test]
async fn watches_match() {
    for cluster in TestCluster::all().await {
        let on = cluster.name();
        let ns = namespace(&cluster).await;
        let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), &ns);
        let a = cms
            .create(&PostParams::default(), &cm("a", &[]))
            .await
            .unwrap();
        cms.patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": "2"}})),
        )
        .await
        .unwrap();
        cms.delete("a", &DeleteParams::default()).await.unwrap();
        let mut stream = cms
            .watch(&WatchParams::default(), &a.resource_version().unwrap())
            .await
            .unwrap()
            .boxed();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let ev = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
                .await
                .unwrap_or_else(|_| panic!("{on}: no watch event"))
                .unwrap()
                .unwrap();
            match ev {
                WatchEvent::Modified(o) => seen.push(format!("MODIFIED {}", o.name_any())),
                WatchEvent::Deleted(o) => seen.push(format!("DELETED {}", o.name_any())),
                WatchEvent::Added(o) => seen.push(format!("ADDED {}", o.name_any())),
                WatchEvent::Bookmark(_) => {}
                WatchEvent::Error(e) => panic!("{on}: {e:?}"),
            }
        }
        assert_eq!(seen, ["MODIFIED a", "DELETED a"], "{on}");
    }
}

#[tokio::test]
async fn built_in_validation_matches() {
    use k8s_openapi::api::apps::v1::Deployment;
    for cluster in TestCluster::all().await {
        let on = cluster.name();
        let ns = namespace(&cluster).await;
        let deployments: Api<Deployment> = Api::namespaced(cluster.client(), &ns);
        let deployment = |labels: Value, image: Value| -> Deployment {
            serde_json::from_value(json!({
                "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                "spec": {
                    "selector": {"matchLabels": {"app": "db"}},
                    "template": {"metadata": {"labels": labels},
                                 "spec": {"containers": [{"name": "postgres", "image": image}]}},
                },
            }))
            .unwrap()
        };
        let pp = PostParams::default();
        let mismatch = deployment(json!({"app": "web"}), json!("postgres:15"));
        assert_eq!(
            code(deployments.create(&pp, &mismatch).await.unwrap_err()),
            (422, "Invalid".into()),
            "{on}"
        );
        let no_image = deployment(json!({"app": "db"}), json!(null));
        assert_eq!(
            code(deployments.create(&pp, &no_image).await.unwrap_err()).0,
            422,
            "{on}"
        );
        deployments
            .create(&pp, &deployment(json!({"app": "db"}), json!("postgres:15")))
            .await
            .unwrap();
        let err = deployments
            .patch(
                "d",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"spec": {"selector": {"matchLabels": {"app": "db", "x": "y"}},
                "template": {"metadata": {"labels": {"app": "db", "x": "y"}}}}}),
                ),
            )
            .await
            .unwrap_err();
        assert_eq!(code(err).0, 422, "{on}: the selector is immutable");

        let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), &ns);
        let mut bad_key = cm("k", &[]);
        bad_key.data = Some(BTreeMap::from([("no spaces".to_string(), "v".to_string())]));
        assert_eq!(
            code(cms.create(&pp, &bad_key).await.unwrap_err()).0,
            422,
            "{on}"
        );
    }
}
