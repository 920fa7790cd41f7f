//! The CRD schema pass of the in-process API server: pruning, defaults,
//! structural checks and CEL rules (transition rules included), through
//! the real kube::Client.

mod support;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::{json, Value};
use support::apiserver::ApiServer;

fn gadget_crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "gadgets.test.pgbranch.dev"},
        "spec": {
            "group": "test.pgbranch.dev",
            "scope": "Namespaced",
            "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "required": ["mode"],
                            "properties": {
                                "mode": {"type": "string", "enum": ["fast", "slow"]},
                                "replicas": {"type": "integer", "default": 1, "minimum": 0, "maximum": 5},
                                "lsn": {"type": "string", "nullable": true},
                                "timestamp": {"type": "string"},
                                "origin": {"type": "string",
                                    "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "origin is immutable"}]},
                                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                                "params": {
                                    "type": "array",
                                    "x-kubernetes-list-type": "map",
                                    "x-kubernetes-list-map-keys": ["name"],
                                    "items": {"type": "object", "properties": {
                                        "name": {"type": "string"}, "value": {"type": "string"},
                                    }},
                                },
                            },
                            "x-kubernetes-validations": [
                                {"rule": "!(has(self.lsn) && has(self.timestamp))", "message": "lsn and timestamp are mutually exclusive"}
                            ],
                        },
                        "status": {"type": "object", "properties": {
                            "phase": {"type": "string"},
                            "conditions": {
                                "type": "array",
                                "x-kubernetes-list-type": "map",
                                "x-kubernetes-list-map-keys": ["type"],
                                "items": {"type": "object", "required": ["type", "status"], "properties": {
                                    "type": {"type": "string"}, "status": {"type": "string"}, "reason": {"type": "string"},
                                }},
                            },
                        }},
                    },
                }},
            }],
        },
    }))
    .unwrap()
}

fn gadgets(server: &ApiServer) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("test.pgbranch.dev", "v1", "Gadget");
    Api::namespaced_with(server.client(), "default", &ApiResource::from_gvk(&gvk))
}

fn gadget(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "test.pgbranch.dev/v1", "kind": "Gadget",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

fn invalid(err: kube::Error) -> String {
    match err {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"), "{s:?}");
            s.message.clone()
        }
        other => panic!("expected 422 Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn defaults_pruning_and_structural_checks() {
    let server = ApiServer::new();
    server.install_crd(&gadget_crd());
    let api = gadgets(&server);
    let pp = PostParams::default();

    let created = api
        .create(
            &pp,
            &gadget(
                "g",
                json!({"mode": "fast", "unknown": 1, "free": {"any": {"thing": true}}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(created.data["spec"]["replicas"], 1, "defaulted");
    assert!(created.data["spec"].get("unknown").is_none(), "pruned");
    assert_eq!(
        created.data["spec"]["free"]["any"]["thing"], true,
        "preserved"
    );

    let m = invalid(
        api.create(&pp, &gadget("a", json!({"mode": "medium"})))
            .await
            .unwrap_err(),
    );
    assert!(
        m.contains("spec.mode") && m.contains("Unsupported value"),
        "{m}"
    );
    let m = invalid(api.create(&pp, &gadget("b", json!({}))).await.unwrap_err());
    assert!(m.contains("spec.mode: Required value"), "{m}");
    let m = invalid(
        api.create(
            &pp,
            &gadget("c", json!({"mode": "fast", "replicas": "two"})),
        )
        .await
        .unwrap_err(),
    );
    assert!(m.contains("spec.replicas"), "{m}");
    let m = invalid(
        api.create(&pp, &gadget("d", json!({"mode": "fast", "replicas": 9})))
            .await
            .unwrap_err(),
    );
    assert!(m.contains("spec.replicas"), "{m}");
    // null on a nullable field is kept; on a non-nullable one it is dropped
    let n = api
        .create(
            &pp,
            &gadget("n", json!({"mode": "slow", "lsn": null, "timestamp": null})),
        )
        .await
        .unwrap();
    assert!(n.data["spec"].get("timestamp").is_none());

    // the schema also applies to status writes
    let st = api
        .patch_status(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Ready", "junk": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(st.data["status"], json!({"phase": "Ready"}));
}

#[tokio::test]
async fn cel_rules_and_transition_rules() {
    let server = ApiServer::new();
    server.install_crd(&gadget_crd());
    let api = gadgets(&server);
    let pp = PostParams::default();

    let m = invalid(
        api.create(
            &pp,
            &gadget(
                "x",
                json!({"mode": "fast", "lsn": "0/1", "timestamp": "2026-01-01T00:00:00Z"}),
            ),
        )
        .await
        .unwrap_err(),
    );
    assert!(
        m.contains("lsn and timestamp are mutually exclusive"),
        "{m}"
    );

    api.create(&pp, &gadget("y", json!({"mode": "fast", "origin": "here"})))
        .await
        .unwrap();
    let err = api
        .patch(
            "y",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"origin": "there"}})),
        )
        .await
        .unwrap_err();
    assert!(invalid(err).contains("origin is immutable"));
    // other changes pass the transition rule
    let ok = api
        .patch(
            "y",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"mode": "slow"}})),
        )
        .await
        .unwrap();
    assert_eq!(ok.data["spec"]["mode"], "slow");
    assert_eq!(ok.metadata.generation, Some(2));

    // the pass can be switched off
    server.set_schema_validation(false);
    api.create(&pp, &gadget("z", json!({"mode": "nonsense"})))
        .await
        .unwrap();
}

#[tokio::test]
async fn updating_a_crd_updates_what_is_served() {
    let server = ApiServer::new();
    server.install_crd(&gadget_crd());
    let crds: Api<CustomResourceDefinition> = Api::all(server.client());
    // add a v2 version and a new enum value, as `kubectl apply` of a new CRD would
    let mut crd = crds.get("gadgets.test.pgbranch.dev").await.unwrap();
    let mut v2 = crd.spec.versions[0].clone();
    v2.name = "v2".into();
    v2.storage = false;
    crd.spec.versions.push(v2);
    let mut schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
    schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["mode"]["enum"] =
        json!(["fast", "slow", "medium"]);
    crd.spec.versions[0].schema = Some(serde_json::from_value(schema).unwrap());
    crds.replace("gadgets.test.pgbranch.dev", &PostParams::default(), &crd)
        .await
        .unwrap();

    gadgets(&server)
        .create(
            &PostParams::default(),
            &gadget("m", json!({"mode": "medium"})),
        )
        .await
        .unwrap();
    let gvk = GroupVersionKind::gvk("test.pgbranch.dev", "v2", "Gadget");
    let v2api: Api<DynamicObject> =
        Api::namespaced_with(server.client(), "default", &ApiResource::from_gvk(&gvk));
    let got = v2api.get("m").await.unwrap();
    assert_eq!(got.types.unwrap().api_version, "test.pgbranch.dev/v2");
}

#[tokio::test]
async fn apply_merges_associative_lists_by_key() {
    let server = ApiServer::new();
    server.install_crd(&gadget_crd());
    let api = gadgets(&server);
    api.create(
        &PostParams::default(),
        &gadget("g", json!({"mode": "fast"})),
    )
    .await
    .unwrap();
    let cond = |t: &str, st: &str| json!({"type": t, "status": st});
    let status = |conds: Vec<Value>| json!({"apiVersion": "test.pgbranch.dev/v1", "kind": "Gadget", "status": {"conditions": conds}});
    let ap = |m: &str| PatchParams::apply(m);
    api.patch_status(
        "g",
        &ap("branch-controller"),
        &Patch::Apply(status(vec![
            cond("Ready", "False"),
            cond("Reconciling", "True"),
        ])),
    )
    .await
    .unwrap();
    // another manager owns its own entry of the same list
    api.patch_status(
        "g",
        &ap("restore-controller"),
        &Patch::Apply(status(vec![cond("Restoring", "True")])),
    )
    .await
    .unwrap();
    let types = |o: &DynamicObject| -> Vec<String> {
        o.data["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                format!(
                    "{}={}",
                    c["type"].as_str().unwrap(),
                    c["status"].as_str().unwrap()
                )
            })
            .collect()
    };
    let both = api.get("g").await.unwrap();
    assert_eq!(
        types(&both),
        ["Ready=False", "Reconciling=True", "Restoring=True"]
    );

    // the first manager drops Reconciling and flips Ready: the other entry stays
    let after = api
        .patch_status(
            "g",
            &ap("branch-controller"),
            &Patch::Apply(status(vec![cond("Ready", "True")])),
        )
        .await
        .unwrap();
    assert_eq!(types(&after), ["Ready=True", "Restoring=True"]);

    // changing an entry another manager owns conflicts, unless forced
    let err = api
        .patch_status(
            "g",
            &ap("branch-controller"),
            &Patch::Apply(status(vec![
                cond("Ready", "True"),
                cond("Restoring", "False"),
            ])),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409));
    let forced = api
        .patch_status(
            "g",
            &ap("branch-controller").force(),
            &Patch::Apply(status(vec![
                cond("Ready", "True"),
                cond("Restoring", "False"),
            ])),
        )
        .await
        .unwrap();
    assert_eq!(types(&forced), ["Ready=True", "Restoring=False"]);
}

#[tokio::test]
async fn apply_drops_associative_list_entries_it_no_longer_applies() {
    let server = ApiServer::new();
    server.install_crd(&gadget_crd());
    let api = gadgets(&server);
    let spec = |params: Value| {
        json!({"apiVersion": "test.pgbranch.dev/v1", "kind": "Gadget", "metadata": {"name": "p"},
               "spec": {"mode": "fast", "params": params}})
    };
    let ap = PatchParams::apply("op");
    api.patch(
        "p",
        &ap,
        &Patch::Apply(spec(
            json!([{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]),
        )),
    )
    .await
    .unwrap();
    // a user adds an entry of their own with an update
    let mut live = api.get("p").await.unwrap();
    live.data["spec"]["params"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "user", "value": "u"}));
    api.replace("p", &PostParams::default(), &live)
        .await
        .unwrap();
    let after = api
        .patch(
            "p",
            &ap,
            &Patch::Apply(spec(json!([{"name": "a", "value": "1"}]))),
        )
        .await
        .unwrap();
    assert_eq!(
        after.data["spec"]["params"],
        json!([{"name": "a", "value": "1"}, {"name": "user", "value": "u"}])
    );
}
