//! The in-process API server through the real kube::Client: CRUD,
//! selectors, conflicts, patches, the status subresource, finalizers,
//! owner cascade, server-side apply, failure injection and write counts.

mod support;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use kube::{CustomResourceExt, Resource, ResourceExt};
use serde_json::json;
use support::apiserver::{ApiServer, Failure};
use support::widget::{widget, Widget, WidgetStatus};

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(name.into());
    if !labels.is_empty() {
        cm.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
    }
    cm.data = Some(BTreeMap::from([("k".to_string(), name.to_string())]));
    cm
}

fn api_code(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn names<K: ResourceExt>(items: &[K]) -> Vec<String> {
    let mut n: Vec<String> = items.iter().map(|o| o.name_any()).collect();
    n.sort();
    n
}

#[tokio::test]
async fn configmap_crud_errors_and_resource_versions() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let pp = PostParams::default();

    let created = cms.create(&pp, &cm("one", &[])).await.unwrap();
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    let rv1: u64 = created.resource_version().unwrap().parse().unwrap();

    assert_eq!(
        api_code(cms.create(&pp, &cm("one", &[])).await.unwrap_err()),
        (409, "AlreadyExists".into())
    );
    assert_eq!(
        api_code(cms.get("nope").await.unwrap_err()),
        (404, "NotFound".into())
    );
    assert_eq!(
        api_code(cms.create(&pp, &cm("Bad_Name", &[])).await.unwrap_err()),
        (422, "Invalid".into())
    );
    let other_ns: Api<ConfigMap> = Api::namespaced(server.client(), "missing");
    assert_eq!(
        api_code(other_ns.create(&pp, &cm("x", &[])).await.unwrap_err()).0,
        404
    );

    // generateName
    let mut gen = ConfigMap::default();
    gen.metadata.generate_name = Some("gen-".into());
    let g = cms.create(&pp, &gen).await.unwrap();
    assert!(
        g.name_any().starts_with("gen-") && g.name_any().len() == 9,
        "{}",
        g.name_any()
    );

    // replace: fresh rv works and bumps rv; stale rv is a 409 Conflict
    let mut fresh = cms.get("one").await.unwrap();
    fresh.data = Some(BTreeMap::from([("k".into(), "changed".into())]));
    let replaced = cms.replace("one", &pp, &fresh).await.unwrap();
    let rv2: u64 = replaced.resource_version().unwrap().parse().unwrap();
    assert!(rv2 > rv1);
    let err = cms.replace("one", &pp, &fresh).await.unwrap_err();
    assert_eq!(api_code(err), (409, "Conflict".into()));

    // a replace that changes nothing does not bump the resourceVersion
    let same = cms.replace("one", &pp, &replaced).await.unwrap();
    assert_eq!(same.resource_version(), replaced.resource_version());

    // delete
    let res = cms.delete("one", &DeleteParams::default()).await.unwrap();
    assert!(res.is_right(), "immediate deletion answers a Status");
    assert_eq!(api_code(cms.get("one").await.unwrap_err()).0, 404);
    assert_eq!(
        api_code(
            cms.delete("one", &DeleteParams::default())
                .await
                .unwrap_err()
        )
        .0,
        404
    );

    // a raw request with an undecodable body is a 400 Status
    let req = http::Request::post("/api/v1/namespaces/default/configmaps")
        .header("content-type", "application/json")
        .body(b"{not json".to_vec())
        .unwrap();
    let err = server.client().request::<ConfigMap>(req).await.unwrap_err();
    assert_eq!(api_code(err), (400, "BadRequest".into()));
}

#[tokio::test]
async fn list_with_label_and_field_selectors_across_namespaces() {
    let server = ApiServer::new();
    server.create_namespace("other");
    let client = server.client();
    let default: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let other: Api<ConfigMap> = Api::namespaced(client.clone(), "other");
    let all: Api<ConfigMap> = Api::all(client);
    let pp = PostParams::default();
    default
        .create(&pp, &cm("a", &[("app", "db"), ("tier", "1")]))
        .await
        .unwrap();
    default
        .create(&pp, &cm("b", &[("app", "web")]))
        .await
        .unwrap();
    default.create(&pp, &cm("c", &[])).await.unwrap();
    other.create(&pp, &cm("a", &[("app", "db")])).await.unwrap();

    let l = |s: &str| ListParams::default().labels(s);
    assert_eq!(
        names(&default.list(&l("app=db")).await.unwrap().items),
        ["a"]
    );
    assert_eq!(
        names(&default.list(&l("app!=db")).await.unwrap().items),
        ["b", "c"]
    );
    assert_eq!(
        names(&default.list(&l("app in (db,web)")).await.unwrap().items),
        ["a", "b"]
    );
    assert_eq!(
        names(&default.list(&l("app notin (db)")).await.unwrap().items),
        ["b", "c"]
    );
    assert_eq!(
        names(&default.list(&l("app")).await.unwrap().items),
        ["a", "b"]
    );
    assert_eq!(names(&default.list(&l("!app")).await.unwrap().items), ["c"]);
    assert_eq!(
        names(&default.list(&l("app=db,tier=1")).await.unwrap().items),
        ["a"]
    );

    let everything = all.list(&ListParams::default()).await.unwrap();
    assert_eq!(everything.items.len(), 4);
    let list_rv: u64 = everything
        .metadata
        .resource_version
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(list_rv, server.resource_version());

    let f = |s: &str| ListParams::default().fields(s);
    let by_name = all.list(&f("metadata.name=a")).await.unwrap().items;
    assert_eq!(by_name.len(), 2);
    let by_ns = all
        .list(&f("metadata.namespace=other"))
        .await
        .unwrap()
        .items;
    assert_eq!(by_ns.len(), 1);
    assert_eq!(by_ns[0].namespace().as_deref(), Some("other"));
    assert_eq!(
        names(&default.list(&f("metadata.name!=a")).await.unwrap().items),
        ["b", "c"]
    );
}

#[tokio::test]
async fn json_patch_test_op_merge_patch_and_strategic_patch() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    cms.create(&PostParams::default(), &cm("p", &[("x", "1")]))
        .await
        .unwrap();
    let pp = PatchParams::default();

    // a failing `test` op rejects the whole patch with 422 and changes nothing
    let failing: Patch<()> = Patch::Json(
        serde_json::from_value(json!([
            {"op": "replace", "path": "/data/k", "value": "new"},
            {"op": "test", "path": "/metadata/labels/x", "value": "2"},
        ]))
        .unwrap(),
    );
    let err = cms.patch("p", &pp, &failing).await.unwrap_err();
    assert_eq!(api_code(err), (422, "Invalid".into()));
    assert_eq!(cms.get("p").await.unwrap().data.unwrap()["k"], "p");

    let passing: Patch<()> = Patch::Json(
        serde_json::from_value(json!([
            {"op": "test", "path": "/metadata/labels/x", "value": "1"},
            {"op": "replace", "path": "/data/k", "value": "new"},
            {"op": "add", "path": "/metadata/finalizers", "value": ["a/b"]},
            {"op": "add", "path": "/metadata/finalizers/-", "value": "c/d"},
        ]))
        .unwrap(),
    );
    let p = cms.patch("p", &pp, &passing).await.unwrap();
    assert_eq!(p.data.unwrap()["k"], "new");
    assert_eq!(p.metadata.finalizers.unwrap(), ["a/b", "c/d"]);

    // merge patch: null removes, maps merge
    let merged = cms
        .patch("p", &pp, &Patch::Merge(json!({"metadata": {"labels": {"x": null, "y": "2"}, "finalizers": null}, "data": {"z": "3"}})))
        .await
        .unwrap();
    assert_eq!(merged.labels().get("y").map(String::as_str), Some("2"));
    assert!(!merged.labels().contains_key("x"));
    assert_eq!(merged.data.as_ref().unwrap().len(), 2);
    assert!(merged.metadata.finalizers.is_none());

    // strategic merge is a merge
    let s = cms
        .patch("p", &pp, &Patch::Strategic(json!({"data": {"k": "s"}})))
        .await
        .unwrap();
    assert_eq!(s.data.unwrap()["k"], "s");

    // a merge patch carrying a stale resourceVersion is a 409
    let stale = cms
        .patch(
            "p",
            &pp,
            &Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "data": {"k": "t"}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(stale), (409, "Conflict".into()));
    assert_eq!(
        api_code(
            cms.patch("missing", &pp, &Patch::Merge(json!({})))
                .await
                .unwrap_err()
        )
        .0,
        404
    );
}

#[tokio::test]
async fn crd_status_subresource_and_generation() {
    let server = ApiServer::new();
    server.install_crd(&Widget::crd());
    let widgets: Api<Widget> = Api::namespaced(server.client(), "default");
    let pp = PostParams::default();

    let mut w = widget("w", 1);
    w.status = Some(WidgetStatus {
        ready: true,
        observed_generation: Some(9),
    });
    let created = widgets.create(&pp, &w).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.status.is_none(), "status is dropped on create");

    // status writes do not bump generation
    let st = widgets
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"ready": true, "observed_generation": 1}, "spec": {"size": 100}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(st.metadata.generation, Some(1));
    assert_eq!(st.spec.size, 1, "the status endpoint ignores spec");
    assert!(st.status.as_ref().unwrap().ready);

    // spec writes bump generation and ignore status
    let mut cur = widgets.get("w").await.unwrap();
    cur.spec.size = 2;
    cur.status = Some(WidgetStatus {
        ready: false,
        observed_generation: None,
    });
    let replaced = widgets.replace("w", &pp, &cur).await.unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));
    assert!(
        replaced.status.unwrap().ready,
        "the main endpoint ignores status"
    );

    // metadata-only changes do not bump generation
    let labelled = widgets
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap();
    assert_eq!(labelled.metadata.generation, Some(2));

    // replace_status with a stale resourceVersion is a conflict
    let mut stale = cur.clone();
    stale.status = Some(WidgetStatus {
        ready: false,
        observed_generation: Some(2),
    });
    let err = widgets.replace_status("w", &pp, &stale).await.unwrap_err();
    assert_eq!(api_code(err).0, 409);
    let fresh = widgets.get("w").await.unwrap();
    let mut fresh2 = fresh.clone();
    fresh2.status = Some(WidgetStatus {
        ready: false,
        observed_generation: Some(2),
    });
    let ok = widgets.replace_status("w", &pp, &fresh2).await.unwrap();
    assert!(!ok.status.unwrap().ready);
    assert_eq!(ok.metadata.generation, Some(2));

    // the pgbranch CRDs register too, and serve their kind
    server.install_crd(&pgbranch::api::Branch::crd());
    let branches: Api<pgbranch::api::Branch> = Api::namespaced(server.client(), "default");
    assert!(branches
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());
    // discovery sees both groups
    let discovery = kube::Discovery::new(server.client()).run().await.unwrap();
    assert!(discovery.has_group("test.pgbranch.dev"));
    assert!(discovery.has_group("pgbranch.dev"));
    // a dynamic client works too
    let gvk = GroupVersionKind::gvk("test.pgbranch.dev", "v1", "Widget");
    let dynapi: Api<DynamicObject> =
        Api::namespaced_with(server.client(), "default", &ApiResource::from_gvk(&gvk));
    assert_eq!(
        dynapi
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
}

#[tokio::test]
async fn finalizers_keep_a_deleted_object_until_removed() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let mut c = cm("f", &[]);
    c.metadata.finalizers = Some(vec!["test/hold".into()]);
    cms.create(&PostParams::default(), &c).await.unwrap();

    let res = cms.delete("f", &DeleteParams::default()).await.unwrap();
    let marked = res
        .left()
        .expect("the object comes back while finalizers remain");
    assert!(marked.metadata.deletion_timestamp.is_some());
    let still = cms.get("f").await.unwrap();
    assert!(still.metadata.deletion_timestamp.is_some());

    // no new finalizers while deleting
    let err = cms
        .patch(
            "f",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["test/hold", "test/new"]}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(err), (422, "Invalid".into()));
    // other changes are still allowed
    cms.patch(
        "f",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "v"}})),
    )
    .await
    .unwrap();

    // removing the last finalizer deletes it
    cms.patch(
        "f",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert_eq!(api_code(cms.get("f").await.unwrap_err()).0, 404);

    // delete preconditions
    cms.create(&PostParams::default(), &cm("g", &[]))
        .await
        .unwrap();
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some("other".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    assert_eq!(api_code(cms.delete("g", &dp).await.unwrap_err()).0, 409);
}

#[tokio::test]
async fn deleting_an_owner_cascades_to_dependents() {
    let server = ApiServer::new();
    let client = server.client();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    let owner = cms.create(&pp, &cm("owner", &[])).await.unwrap();
    let oref: OwnerReference = owner.controller_owner_ref(&()).unwrap();

    let child = |name: &str, finalizer: bool| {
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        s.metadata.owner_references = Some(vec![oref.clone()]);
        if finalizer {
            s.metadata.finalizers = Some(vec!["test/hold".into()]);
        }
        s
    };
    secrets.create(&pp, &child("plain", false)).await.unwrap();
    secrets.create(&pp, &child("held", true)).await.unwrap();
    // a grandchild owned by the secret
    let plain = secrets.get("plain").await.unwrap();
    let mut grandchild = cm("grandchild", &[]);
    grandchild.metadata.owner_references = Some(vec![plain.controller_owner_ref(&()).unwrap()]);
    cms.create(&pp, &grandchild).await.unwrap();
    // an unrelated one
    secrets
        .create(&pp, &{
            let mut s = Secret::default();
            s.metadata.name = Some("free".into());
            s
        })
        .await
        .unwrap();

    cms.delete("owner", &DeleteParams::background())
        .await
        .unwrap();
    assert_eq!(api_code(secrets.get("plain").await.unwrap_err()).0, 404);
    assert_eq!(api_code(cms.get("grandchild").await.unwrap_err()).0, 404);
    let held = secrets.get("held").await.unwrap();
    assert!(
        held.metadata.deletion_timestamp.is_some(),
        "a dependent with a finalizer is marked, not removed"
    );
    secrets.get("free").await.unwrap();

    // orphan: dependents stay, without the owner reference
    let owner2 = cms.create(&pp, &cm("owner2", &[])).await.unwrap();
    let mut orphan = Secret::default();
    orphan.metadata.name = Some("orphan".into());
    orphan.metadata.owner_references = Some(vec![owner2.controller_owner_ref(&()).unwrap()]);
    secrets.create(&pp, &orphan).await.unwrap();
    cms.delete("owner2", &DeleteParams::orphan()).await.unwrap();
    let o = secrets.get("orphan").await.unwrap();
    assert!(o.metadata.owner_references.unwrap_or_default().is_empty());

    // deleting a namespace deletes its contents
    server.create_namespace("doomed");
    let doomed: Api<ConfigMap> = Api::namespaced(client.clone(), "doomed");
    doomed.create(&pp, &cm("x", &[])).await.unwrap();
    let nss: Api<Namespace> = Api::all(client);
    nss.delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(api_code(doomed.get("x").await.unwrap_err()).0, 404);
    assert_eq!(api_code(nss.get("doomed").await.unwrap_err()).0, 404);
}

#[tokio::test]
async fn server_side_apply_create_update_conflict_and_force() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let apply = |m: &str| PatchParams::apply(m);

    let first = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa", "labels": {"a": "1", "b": "2"}}, "data": {"x": "1", "y": "2"}});
    let created = cms
        .patch("ssa", &apply("mgr-a"), &Patch::Apply(&first))
        .await
        .unwrap();
    assert_eq!(created.data.as_ref().unwrap().len(), 2);
    let rv = created.resource_version();

    // the same apply again is a no-op
    let again = cms
        .patch("ssa", &apply("mgr-a"), &Patch::Apply(&first))
        .await
        .unwrap();
    assert_eq!(again.resource_version(), rv);

    // dropping a field from the applied config removes it
    let second = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa", "labels": {"a": "1"}}, "data": {"x": "1"}});
    let updated = cms
        .patch("ssa", &apply("mgr-a"), &Patch::Apply(&second))
        .await
        .unwrap();
    assert_eq!(
        updated.data.as_ref().unwrap().keys().collect::<Vec<_>>(),
        ["x"]
    );
    assert!(!updated.labels().contains_key("b"));

    // another manager changing an owned field conflicts, unless forced
    let other = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"x": "other"}});
    let err = cms
        .patch("ssa", &apply("mgr-b"), &Patch::Apply(&other))
        .await
        .unwrap_err();
    assert_eq!(api_code(err), (409, "Conflict".into()));
    // another manager setting the same value shares the field; a new field is fine
    let share = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"x": "1", "z": "b"}});
    cms.patch("ssa", &apply("mgr-b"), &Patch::Apply(&share))
        .await
        .unwrap();
    let forced = cms
        .patch("ssa", &apply("mgr-b").force(), &Patch::Apply(&other))
        .await
        .unwrap();
    assert_eq!(forced.data.as_ref().unwrap()["x"], "other");
    assert!(
        !forced.data.as_ref().unwrap().contains_key("z"),
        "mgr-b no longer applies z"
    );
    // mgr-a no longer owns x: re-applying without x leaves it alone
    let third =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {}});
    let after = cms
        .patch("ssa", &apply("mgr-a"), &Patch::Apply(&third))
        .await
        .unwrap();
    assert_eq!(after.data.as_ref().unwrap()["x"], "other");

    // a fieldManager is required
    let err = cms
        .patch("ssa", &PatchParams::default(), &Patch::Apply(&third))
        .await
        .unwrap_err();
    assert_eq!(api_code(err).0, 422);

    // apply to the status subresource of a CRD
    server.install_crd(&Widget::crd());
    let widgets: Api<Widget> = Api::namespaced(server.client(), "default");
    let w = json!({"apiVersion": "test.pgbranch.dev/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 3}});
    let created = widgets
        .patch("w", &apply("op"), &Patch::Apply(&w))
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let st = json!({"apiVersion": "test.pgbranch.dev/v1", "kind": "Widget", "status": {"ready": true, "observed_generation": 1}});
    let with_status = widgets
        .patch_status("w", &apply("op"), &Patch::Apply(&st))
        .await
        .unwrap();
    assert!(with_status.status.unwrap().ready);
    assert_eq!(with_status.metadata.generation, Some(1));
    // re-applying the spec keeps the status
    let again = widgets
        .patch("w", &apply("op"), &Patch::Apply(&w))
        .await
        .unwrap();
    assert!(again.status.unwrap().ready);
}

#[tokio::test]
async fn injected_failures_and_write_counts() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    server.fail(Failure::new("create", "configmaps").times(2).code(500));
    for _ in 0..2 {
        let err = cms
            .create(&PostParams::default(), &cm("c", &[]))
            .await
            .unwrap_err();
        assert_eq!(api_code(err), (500, "InternalError".into()));
    }
    cms.create(&PostParams::default(), &cm("c", &[]))
        .await
        .unwrap();
    server.fail(Failure::new("patch", "*").code(409).name("c"));
    let err = cms
        .patch("c", &PatchParams::default(), &Patch::Merge(json!({})))
        .await
        .unwrap_err();
    assert_eq!(api_code(err), (409, "Conflict".into()));

    server.reset_counts();
    cms.get("c").await.unwrap();
    cms.list(&ListParams::default()).await.unwrap();
    assert_eq!(server.write_count(), 0);
    cms.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "c"}})),
    )
    .await
    .unwrap();
    assert_eq!(
        server.write_count(),
        1,
        "a no-op patch is still a write request"
    );
    assert_eq!(server.mutation_count(), 0, "but changes nothing");
    cms.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "d"}})),
    )
    .await
    .unwrap();
    assert_eq!(server.mutation_count(), 1);
    let by = server.writes_by_verb();
    assert_eq!(
        by.get(&("patch".to_string(), "configmaps".to_string())),
        Some(&2)
    );
    assert_eq!(server.requests().len(), 4);
}

#[tokio::test]
async fn custom_resources_need_a_resource_version_to_replace_and_go_with_their_crd() {
    let server = ApiServer::new();
    server.install_crd(&Widget::crd());
    let client = server.client();
    let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
    widgets
        .create(&PostParams::default(), &widget("w", 1))
        .await
        .unwrap();

    // unconditional update: refused for custom resources (allowed for configmaps)
    let blind = widget("w", 2);
    let err = widgets
        .replace("w", &PostParams::default(), &blind)
        .await
        .unwrap_err();
    assert_eq!(api_code(err), (422, "Invalid".into()));
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("c", &[]))
        .await
        .unwrap();
    cms.replace("c", &PostParams::default(), &cm("c", &[("blind", "ok")]))
        .await
        .unwrap();

    // deleting the CRD deletes its objects and the kind
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    let crd = crds.get("widgets.test.pgbranch.dev").await.unwrap();
    let established = crd.status.unwrap().conditions.unwrap_or_default();
    assert!(established
        .iter()
        .any(|c| c.type_ == "Established" && c.status == "True"));
    crds.delete("widgets.test.pgbranch.dev", &DeleteParams::default())
        .await
        .unwrap();
    assert!(server.objects("test.pgbranch.dev", "widgets").is_empty());
    assert_eq!(
        api_code(widgets.list(&ListParams::default()).await.unwrap_err()).0,
        404
    );
}

#[tokio::test]
async fn metadata_only_get_list_and_watch() {
    use futures::StreamExt;
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    cms.create(&PostParams::default(), &cm("m", &[("app", "x")]))
        .await
        .unwrap();
    let meta = cms.get_metadata("m").await.unwrap();
    assert_eq!(meta.labels().get("app").map(String::as_str), Some("x"));
    let list = cms.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let metas: Api<kube::core::PartialObjectMeta<ConfigMap>> =
        Api::namespaced(server.client(), "default");
    let stream = kube::runtime::watcher(metas, kube::runtime::watcher::Config::default());
    let mut stream = Box::pin(stream);
    let mut names = Vec::new();
    while let Some(ev) = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next())
        .await
        .unwrap()
    {
        if let kube::runtime::watcher::Event::InitApply(o) = ev.unwrap() {
            names.push(o.name_any());
        } else if !names.is_empty() {
            break;
        }
    }
    assert_eq!(names, ["m"]);
}

#[tokio::test]
async fn foreground_deletion_waits_for_dependents() {
    let server = ApiServer::new();
    let client = server.client();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    let owner = cms.create(&pp, &cm("fg-owner", &[])).await.unwrap();
    let mut dep = Secret::default();
    dep.metadata.name = Some("fg-dep".into());
    dep.metadata.owner_references = Some(vec![owner.controller_owner_ref(&()).unwrap()]);
    dep.metadata.finalizers = Some(vec!["test/hold".into()]);
    secrets.create(&pp, &dep).await.unwrap();

    cms.delete("fg-owner", &DeleteParams::foreground())
        .await
        .unwrap();
    let waiting = cms.get("fg-owner").await.unwrap();
    assert!(waiting.metadata.deletion_timestamp.is_some());
    assert!(waiting
        .finalizers()
        .contains(&"foregroundDeletion".to_string()));
    assert!(secrets
        .get("fg-dep")
        .await
        .unwrap()
        .metadata
        .deletion_timestamp
        .is_some());

    // releasing the dependent lets the owner go
    secrets
        .patch(
            "fg-dep",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    assert_eq!(api_code(secrets.get("fg-dep").await.unwrap_err()).0, 404);
    assert_eq!(api_code(cms.get("fg-owner").await.unwrap_err()).0, 404);

    // without dependents, foreground deletion is immediate
    cms.create(&pp, &cm("alone", &[])).await.unwrap();
    cms.delete("alone", &DeleteParams::foreground())
        .await
        .unwrap();
    assert_eq!(api_code(cms.get("alone").await.unwrap_err()).0, 404);
}

#[tokio::test]
async fn dry_run_delete_collection_and_racing_writers() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let would = cms.create(&dry, &cm("dry", &[])).await.unwrap();
    assert_eq!(would.name_any(), "dry");
    assert!(
        cms.get_opt("dry").await.unwrap().is_none(),
        "dry run stores nothing"
    );

    let pp = PostParams::default();
    for n in ["r1", "r2", "keep"] {
        let labels: &[(&str, &str)] = if n == "keep" { &[] } else { &[("race", "yes")] };
        cms.create(&pp, &cm(n, labels)).await.unwrap();
    }

    // two writers race on one resourceVersion: exactly one wins
    let base = cms.get("r1").await.unwrap();
    let mut results = Vec::new();
    let mut handles = Vec::new();
    for v in ["a", "b"] {
        let cms = cms.clone();
        let mut mine = base.clone();
        mine.data = Some(BTreeMap::from([("k".to_string(), v.to_string())]));
        handles.push(tokio::spawn(async move {
            cms.replace("r1", &PostParams::default(), &mine).await
        }));
    }
    for h in handles {
        results.push(h.await.unwrap());
    }
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    let loser = results.into_iter().find_map(Result::err).unwrap();
    assert_eq!(api_code(loser), (409, "Conflict".into()));

    let gone = cms
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("race=yes"),
        )
        .await
        .unwrap();
    assert_eq!(names(&gone.left().unwrap().items), ["r1", "r2"]);
    assert_eq!(
        names(&cms.list(&ListParams::default()).await.unwrap().items),
        ["keep"]
    );
}

#[tokio::test]
async fn secrets_fold_string_data_and_services_get_cluster_ips() {
    use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
    use k8s_openapi::ByteString;
    let server = ApiServer::new();
    let client = server.client();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let mut s = Secret::default();
    s.metadata.name = Some("creds".into());
    s.string_data = Some(BTreeMap::from([(
        "password".to_string(),
        "hunter2".to_string(),
    )]));
    let created = secrets.create(&PostParams::default(), &s).await.unwrap();
    assert!(created.string_data.is_none());
    assert_eq!(
        created.data.unwrap()["password"],
        ByteString(b"hunter2".to_vec())
    );
    assert_eq!(created.type_.as_deref(), Some("Opaque"));
    // applying the same stringData again changes nothing
    let cfg = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"password": "hunter2"}});
    let rv = secrets.get("creds").await.unwrap().resource_version();
    let again = secrets
        .patch(
            "creds",
            &PatchParams::apply("op").force(),
            &Patch::Apply(&cfg),
        )
        .await
        .unwrap();
    assert_eq!(again.resource_version(), rv);

    let services: Api<Service> = Api::namespaced(client, "default");
    let svc = Service {
        metadata: kube::api::ObjectMeta {
            name: Some("db".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([("app".to_string(), "db".to_string())])),
            ports: Some(vec![ServicePort {
                port: 5432,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = services.create(&PostParams::default(), &svc).await.unwrap();
    let spec = created.spec.unwrap();
    let ip = spec.cluster_ip.clone().unwrap();
    assert!(ip.starts_with("10.96."), "{ip}");
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    let port = &spec.ports.unwrap()[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"));
    assert!(port.target_port.is_some());
    // an update without clusterIP keeps it
    let updated = services
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"clusterIP": null, "selector": {"app": "db2"}}})),
        )
        .await
        .unwrap();
    assert_eq!(updated.spec.unwrap().cluster_ip, Some(ip));
}

#[tokio::test]
async fn workloads_get_the_defaults_a_real_apiserver_stores() {
    use k8s_openapi::api::apps::v1::Deployment;
    let server = ApiServer::new();
    let deployments: Api<Deployment> = Api::namespaced(server.client(), "default");
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {
            "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{
                "name": "postgres", "image": "postgres:15", "ports": [{"containerPort": 5432}],
                "readinessProbe": {"exec": {"command": ["pg_isready"]}},
            }]}},
        },
    }))
    .unwrap();
    let created = deployments
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
    let spec = created.spec.unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.revision_history_limit, Some(10));
    assert_eq!(
        spec.strategy.unwrap().type_.as_deref(),
        Some("RollingUpdate")
    );
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Always"));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirst"));
    let c = &pod.containers[0];
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(
        c.termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );
    assert_eq!(
        c.ports.as_ref().unwrap()[0].protocol.as_deref(),
        Some("TCP")
    );
    assert_eq!(c.readiness_probe.as_ref().unwrap().period_seconds, Some(10));

    // applying the same desired state again (without the defaults) is a no-op
    let rv = created.metadata.resource_version.clone();
    let cfg = serde_json::to_value(&d).unwrap();
    let again = deployments
        .patch("d", &PatchParams::apply("op").force(), &Patch::Apply(&cfg))
        .await
        .unwrap();
    assert_eq!(again.metadata.resource_version, rv);
}
