//! ValidatingAdmissionPolicy in the in-process API server, through the
//! real kube::Client.

mod support;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{json, Value};
use support::apiserver::ApiServer;

fn cm(name: &str, labels: &[(&str, &str)], data: &[(&str, &str)]) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(name.into());
    cm.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    cm.data = Some(
        data.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    );
    cm
}

async fn create_dynamic(server: &ApiServer, kind: &str, body: Value) {
    let gvk = GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind);
    let api: Api<DynamicObject> = Api::all_with(server.client(), &ApiResource::from_gvk(&gvk));
    api.create(
        &PostParams::default(),
        &serde_json::from_value(body).unwrap(),
    )
    .await
    .unwrap();
}

async fn policy(server: &ApiServer, name: &str, spec: Value, actions: &[&str]) {
    create_dynamic(
        server,
        "ValidatingAdmissionPolicy",
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
               "metadata": {"name": name}, "spec": spec}),
    )
    .await;
    create_dynamic(
        server,
        "ValidatingAdmissionPolicyBinding",
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
               "metadata": {"name": name}, "spec": {"policyName": name, "validationActions": actions}}),
    )
    .await;
}

fn status_of(err: kube::Error) -> (u16, String, String) {
    match err {
        kube::Error::Api(s) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn delete_policy_protects_objects_and_blocks_namespace_cleanup() {
    let server = ApiServer::new();
    policy(
        &server,
        "protected",
        json!({
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [
                {"apiGroups": [""], "apiVersions": ["*"], "operations": ["DELETE"], "resources": ["configmaps"]}
            ]},
            "validations": [{
                "expression": "!(has(oldObject.metadata.labels) && 'protected' in oldObject.metadata.labels && oldObject.metadata.labels['protected'] == 'true')",
                "messageExpression": "'ConfigMap ' + oldObject.metadata.name + ' is protected'",
                "reason": "Forbidden",
            }],
        }),
        &["Deny"],
    )
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let pp = PostParams::default();
    cms.create(&pp, &cm("safe", &[("protected", "true")], &[]))
        .await
        .unwrap();
    cms.create(&pp, &cm("free", &[], &[])).await.unwrap();

    let (code, reason, message) = status_of(
        cms.delete("safe", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (403, "Forbidden"));
    assert!(message.contains("ConfigMap safe is protected"), "{message}");
    assert!(
        message.contains("ValidatingAdmissionPolicy 'protected'"),
        "{message}"
    );
    cms.get("safe").await.unwrap();
    cms.delete("free", &DeleteParams::default()).await.unwrap();

    // unprotect, then delete works
    cms.patch(
        "safe",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"protected": "false"}}})),
    )
    .await
    .unwrap();
    cms.delete("safe", &DeleteParams::default()).await.unwrap();

    // a namespace holding a protected object stays Terminating
    server.create_namespace("team");
    let team: Api<ConfigMap> = Api::namespaced(server.client(), "team");
    team.create(&pp, &cm("keep", &[("protected", "true")], &[]))
        .await
        .unwrap();
    let nss: Api<Namespace> = Api::all(server.client());
    nss.delete("team", &DeleteParams::default()).await.unwrap();
    let ns = nss.get("team").await.unwrap();
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Terminating"));
    team.get("keep").await.unwrap();
}

#[tokio::test]
async fn create_update_policy_with_match_conditions_selectors_and_actions() {
    let server = ApiServer::new();
    policy(
        &server,
        "small-data",
        json!({
            "matchConstraints": {
                "resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["configmaps"]}],
                "namespaceSelector": {"matchLabels": {"policed": "yes"}},
            },
            "matchConditions": [{"name": "not-exempt", "expression": "!('exempt' in object.metadata.labels)"}],
            "validations": [{"expression": "!has(object.data) || size(object.data) <= 1", "message": "at most one key"}],
        }),
        &["Deny"],
    )
    .await;
    // a Warn-only binding never denies
    policy(
        &server,
        "warn-only",
        json!({
            "matchConstraints": {"resourceRules": [{"apiGroups": ["*"], "apiVersions": ["*"], "operations": ["*"], "resources": ["*"]}]},
            "validations": [{"expression": "false", "message": "never"}],
        }),
        &["Warn"],
    )
    .await;

    let nss: Api<Namespace> = Api::all(server.client());
    let mut ns = Namespace::default();
    ns.metadata.name = Some("policed".into());
    ns.metadata.labels = Some(BTreeMap::from([("policed".to_string(), "yes".to_string())]));
    nss.create(&PostParams::default(), &ns).await.unwrap();

    let policed: Api<ConfigMap> = Api::namespaced(server.client(), "policed");
    let default: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let pp = PostParams::default();
    let big = [("a", "1"), ("b", "2")];

    let (code, reason, message) = status_of(
        policed
            .create(&pp, &cm("big", &[], &big))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert!(message.contains("at most one key"), "{message}");
    // namespaceSelector: other namespaces are not policed
    default.create(&pp, &cm("big", &[], &big)).await.unwrap();
    // matchConditions: exempt objects are not policed
    policed
        .create(&pp, &cm("exempt", &[("exempt", "")], &big))
        .await
        .unwrap();
    // updates are checked too
    policed
        .create(&pp, &cm("small", &[], &[("a", "1")]))
        .await
        .unwrap();
    let err = policed
        .patch(
            "small",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"b": "2"}})),
        )
        .await
        .unwrap_err();
    assert_eq!(status_of(err).0, 422);
    assert_eq!(policed.get("small").await.unwrap().data.unwrap().len(), 1);
}

#[tokio::test]
async fn manifests_create_crds_and_policies_from_yaml() {
    let server = ApiServer::new();
    let manifest = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: from-yaml
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: first
  namespace: from-yaml
data:
  k: v
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: no-deletes
spec:
  matchConstraints:
    resourceRules:
      - apiGroups: [""]
        apiVersions: ["*"]
        operations: ["DELETE"]
        resources: ["configmaps"]
  validations:
    - expression: "false"
      message: "nothing is deleted here"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: no-deletes
spec:
  policyName: no-deletes
  validationActions: ["Deny"]
"#;
    let created = server.create_manifests(manifest).unwrap();
    assert_eq!(created.len(), 4);
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "from-yaml");
    assert_eq!(cms.get("first").await.unwrap().data.unwrap()["k"], "v");
    let (code, _, message) = status_of(
        cms.delete("first", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 422);
    assert!(message.contains("nothing is deleted here"));

    let err = server
        .create_manifests("apiVersion: v1\nkind: Nonsense\nmetadata: {name: x}\n")
        .unwrap_err();
    assert!(err.contains("unknown kind"), "{err}");
    // the CRDs of the crate install from their YAML form too
    let crd_yaml =
        serde_yaml::to_string(&<pgbranch::api::Branch as kube::CustomResourceExt>::crd()).unwrap();
    server.create_manifests(&crd_yaml).unwrap();
    assert!(server
        .object(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            None,
            "branches.pgbranch.dev"
        )
        .is_some());
}
