//! `BackupDestination`: the CEL rules a real apiserver runs on it,
//! evaluated with kube's CEL validator (as tests/crd_validation.rs does
//! for the other kinds), and the defaults the operator derives.

use kube::core::cel::ValidationErrors;
use pgbranch::api::BackupDestination;
use serde_json::{json, Value};

fn dest(spec: Value) -> BackupDestination {
    serde_json::from_value(json!({
        "apiVersion": "pgbranch.dev/v1alpha1",
        "kind": "BackupDestination",
        "metadata": {"name": "offsite", "namespace": "default"},
        "spec": spec,
    }))
    .unwrap()
}

fn spec(extra: Value) -> Value {
    let mut s = json!({
        "provider": "custom",
        "endpoint": "https://garage.storage.svc:3900",
        "bucket": "pg-backups",
        "credentials": {"secretName": "backup-creds"},
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            s.as_object_mut().unwrap().remove(k);
        } else {
            s[k] = v.clone();
        }
    }
    s
}

#[track_caller]
fn assert_rejected(result: Result<(), ValidationErrors>, needle: &str) {
    match result {
        Ok(()) => panic!("accepted, but expected a rejection mentioning {needle:?}"),
        Err(errors) => assert!(
            errors.iter().any(|e| e.message.contains(needle)),
            "no message contains {needle:?}: {errors}"
        ),
    }
}

#[track_caller]
fn assert_ok(result: Result<(), ValidationErrors>) {
    if let Err(e) = result {
        panic!("rejected: {e}");
    }
}

#[test]
fn endpoint_is_required_except_for_aws() {
    assert_ok(dest(spec(json!({}))).validate_cel());
    assert_rejected(
        dest(spec(json!({"endpoint": null}))).validate_cel(),
        "endpoint is required unless provider is s3",
    );
    let aws = dest(spec(
        json!({"provider": "s3", "endpoint": null, "region": "eu-west-1"}),
    ));
    assert_ok(aws.validate_cel());
    assert_eq!(
        aws.spec.effective_endpoint().as_deref(),
        Some("https://s3.eu-west-1.amazonaws.com")
    );
    assert!(!aws.spec.effective_path_style());
    assert_rejected(
        dest(spec(json!({"endpoint": "ftp://example.com"}))).validate_cel(),
        "http:// or https:// URL",
    );
}

#[test]
fn bucket_names_and_ca_bundles_are_checked() {
    assert_rejected(
        dest(spec(json!({"bucket": "Not_A_Bucket"}))).validate_cel(),
        "must be an S3 bucket name",
    );
    assert_rejected(
        dest(spec(json!({"caBundle": "hello"}))).validate_cel(),
        "must hold PEM certificates",
    );
    assert_rejected(
        dest(spec(json!({"pathPrefix": "a/../b"}))).validate_cel(),
        "must not contain '..'",
    );
}

#[test]
fn path_style_defaults_by_provider_and_is_refused_where_it_does_not_exist() {
    let custom = dest(spec(json!({})));
    assert!(custom.spec.effective_path_style());
    assert_eq!(custom.spec.effective_region(), "us-east-1");
    let r2 = dest(spec(
        json!({"provider": "r2", "endpoint": "https://acct.r2.cloudflarestorage.com"}),
    ));
    assert_ok(r2.validate_cel());
    assert!(!r2.spec.effective_path_style());
    assert_eq!(r2.spec.effective_region(), "auto");
    assert_rejected(
        dest(spec(json!({"provider": "b2", "pathStyle": true}))).validate_cel(),
        "pathStyle is for s3, minio and custom endpoints",
    );
}
