//! config/admission/protected-branch.yaml: a ValidatingAdmissionPolicy and
//! its Binding that deny deleting a Branch with `spec.protected: true`.
//! Parsed with the k8s-openapi types (a misspelled field shows up as a
//! round-trip difference) and its CEL evaluated locally on real Branch
//! objects.

use std::path::Path;

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use kube::core::cel::{AdmissionRequest, VapEvaluator, VapExpression};
use pgbranch::api::{Branch, BranchSpec, ParentRef};
use serde::Deserialize;
use serde_json::Value;

const PATH: &str = "config/admission/protected-branch.yaml";

fn documents() -> Vec<Value> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(PATH)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .collect()
}

/// Deserializes into the typed object and checks nothing was dropped.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> T {
    let obj: T = serde_json::from_value(doc.clone()).unwrap();
    assert_eq!(
        &serde_json::to_value(&obj).unwrap(),
        doc,
        "fields lost in a round trip: misspelled?"
    );
    obj
}

fn policy_and_binding() -> (ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding) {
    let docs = documents();
    assert_eq!(docs.len(), 2, "a policy and its binding");
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding"
        ]
    );
    for d in &docs {
        assert_eq!(d["apiVersion"], "admissionregistration.k8s.io/v1");
    }
    (typed(&docs[0]), typed(&docs[1]))
}

#[test]
fn policy_matches_branch_deletes_and_is_bound() {
    let (policy, binding) = policy_and_binding();
    let spec = policy.spec.as_ref().unwrap();
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
    let rules = spec
        .match_constraints
        .as_ref()
        .and_then(|m| m.resource_rules.as_ref())
        .unwrap();
    assert_eq!(rules.len(), 1);
    let rule = &rules[0];
    assert_eq!(
        rule.api_groups.as_deref(),
        Some(&["pgbranch.dev".to_string()][..])
    );
    assert_eq!(
        rule.resources.as_deref(),
        Some(&["branches".to_string()][..])
    );
    assert_eq!(
        rule.operations.as_deref(),
        Some(&["DELETE".to_string()][..])
    );

    let bspec = binding.spec.as_ref().unwrap();
    assert_eq!(bspec.policy_name, policy.metadata.name);
    assert_eq!(
        bspec.validation_actions.as_deref(),
        Some(&["Deny".to_string()][..])
    );
}

fn verdict(branch: &Branch) -> (bool, Option<String>) {
    let (policy, _) = policy_and_binding();
    let validations = policy.spec.unwrap().validations.unwrap();
    let expressions: Vec<VapExpression> = validations
        .iter()
        .map(|v| VapExpression {
            expression: v.expression.clone(),
            message: v.message.clone(),
            message_expression: v.message_expression.clone(),
        })
        .collect();
    // On DELETE the apiserver binds the stored object as oldObject and
    // object is null.
    let stored = serde_json::to_value(branch).unwrap();
    let evaluator = VapEvaluator::builder()
        .old_object(stored)
        .request(AdmissionRequest {
            operation: "DELETE".into(),
            name: branch.metadata.name.clone().unwrap(),
            namespace: "default".into(),
            ..Default::default()
        })
        .build();
    let results = evaluator.evaluate(&expressions);
    let denied = results.iter().find(|r| !r.passed);
    (denied.is_none(), denied.and_then(|r| r.message.clone()))
}

#[test]
fn deleting_a_protected_branch_is_denied_with_what_to_do() {
    let mut prod = Branch::new(
        "prod",
        BranchSpec {
            protected: true,
            ..Default::default()
        },
    );
    let (allowed, message) = verdict(&prod);
    assert!(!allowed);
    let message = message.unwrap();
    assert!(message.contains("Branch prod is protected"), "{message}");
    assert!(
        message.contains("set spec.protected to false first"),
        "{message}"
    );

    prod.spec.protected = false;
    assert_eq!(verdict(&prod), (true, None));

    // A child branch, unprotected (the field at its default).
    let dev = Branch::new(
        "dev",
        BranchSpec {
            parent: Some(ParentRef {
                branch: "prod".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    assert_eq!(verdict(&dev), (true, None));
}
