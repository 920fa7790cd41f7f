//! `Branch.spec.fromSnapshot`: the CEL rules a real apiserver runs on it
//! (exclusive with `parent`, immutable), evaluated with kube's CEL
//! validator like tests/crd_validation.rs does for the other rules.

use kube::core::cel::ValidationErrors;
use pgbranch::api::Branch;
use serde_json::{json, Value};

fn branch(spec: Value) -> Branch {
    serde_json::from_value(json!({
        "apiVersion": "pgbranch.dev/v1alpha1",
        "kind": "Branch",
        "metadata": {"name": "dev", "namespace": "default"},
        "spec": spec,
    }))
    .unwrap()
}

#[track_caller]
fn assert_rejected(result: Result<(), ValidationErrors>, needle: &str) {
    match result {
        Ok(()) => panic!("accepted, but expected a rejection mentioning {needle:?}"),
        Err(errors) => {
            for e in errors.iter() {
                assert_eq!(
                    e.kind,
                    kube::core::cel::ErrorKind::ValidationFailure,
                    "rule error instead of a verdict: {e:?}"
                );
            }
            assert!(
                errors.iter().any(|e| e.message.contains(needle)),
                "no message contains {needle:?}: {errors}"
            );
        }
    }
}

#[track_caller]
fn assert_ok(result: Result<(), ValidationErrors>) {
    if let Err(e) = result {
        panic!("rejected: {e}");
    }
}

#[test]
fn from_snapshot_is_exclusive_with_parent() {
    assert_ok(branch(json!({"fromSnapshot": "before-migration"})).validate_cel());
    assert_rejected(
        branch(json!({"fromSnapshot": "s1", "parent": {"branch": "prod"}})).validate_cel(),
        "parent and fromSnapshot are mutually exclusive",
    );
    // schema-only copies a parent's schema: not a snapshot's.
    assert_rejected(
        branch(json!({"fromSnapshot": "s1", "initSource": "schema-only"})).validate_cel(),
        "needs a parent",
    );
}

#[test]
fn from_snapshot_is_immutable() {
    let a = branch(json!({"fromSnapshot": "s1"}));
    let mut other_fields = a.clone();
    other_fields.spec.protected = true;
    assert_ok(other_fields.validate_cel_update(&a));
    assert_rejected(
        branch(json!({"fromSnapshot": "s2"})).validate_cel_update(&a),
        "spec.fromSnapshot is immutable",
    );
    let root = branch(json!({}));
    assert_rejected(
        root.validate_cel_update(&a),
        "spec.fromSnapshot is immutable",
    );
    assert_rejected(
        a.validate_cel_update(&root),
        "spec.fromSnapshot is immutable",
    );
    assert_ok(a.validate_cel_update(&a));
}

#[test]
fn from_snapshot_is_in_the_generated_crd() {
    let crd = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/branches.pgbranch.dev.yaml"
    ))
    .unwrap();
    assert!(crd.contains("fromSnapshot:"), "crds/ not regenerated");
    assert!(crd.contains("parent and fromSnapshot are mutually exclusive"));
}
