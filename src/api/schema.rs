//! The CRDs generated from the types, and what a real apiserver does with
//! their schemas on a write: apply the schema's defaults and run its CEL
//! rules (`x-kubernetes-validations`, transition rules included).
//!
//! The in-process API server used in tests can call [`admit`] on every
//! create/update of our kinds to reject what a real apiserver would reject
//! (422 with the rule's message) and store what it would store (defaults
//! filled in). It does not check OpenAPI keywords such as `maxLength` or
//! `enum`: only defaults and CEL rules.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel::ValidationErrors;
use kube::CustomResourceExt;
use serde_json::Value;

use super::{Branch, Snapshot, SnapshotRestore, SnapshotSchedule};

/// Every CRD of the operator, in a fixed order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        Branch::crd(),
        Snapshot::crd(),
        SnapshotRestore::crd(),
        SnapshotSchedule::crd(),
    ]
}

/// The `openAPIV3Schema` of our kind `kind` (`"Branch"`, ...), as JSON.
pub fn crd_schema(kind: &str) -> Option<Value> {
    crds()
        .into_iter()
        .find(|crd| crd.spec.names.kind == kind)
        .and_then(|crd| crd.spec.versions.into_iter().next())
        .and_then(|v| v.schema)
        .and_then(|s| s.open_api_v3_schema)
        .and_then(|s| serde_json::to_value(s).ok())
}

/// Why [`admit`] refused an object.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// Not one of our kinds.
    #[error("{0} is not a pgbranch.dev kind")]
    UnknownKind(String),
    /// A rule of the schema failed; the messages are the rules' own.
    #[error("{kind} {name} is invalid: {errors}")]
    Invalid {
        kind: String,
        name: String,
        errors: ValidationErrors,
    },
}

/// What the apiserver does with a create (`old` = `None`) or update of one
/// of our kinds: fills in the schema's defaults, then runs its CEL rules
/// (transition rules against `old`). Returns the object as it would be
/// stored, or the rules' failures.
pub fn admit(kind: &str, obj: &Value, old: Option<&Value>) -> Result<Value, AdmitError> {
    let schema = crd_schema(kind).ok_or_else(|| AdmitError::UnknownKind(kind.to_string()))?;
    let defaulted = kube::core::cel::apply_defaults(&schema, obj);
    let old = old.map(|o| kube::core::cel::apply_defaults(&schema, o));
    kube::core::cel::Validator::new()
        .validate(&schema, &defaulted, old.as_ref())
        .map_err(|errors| AdmitError::Invalid {
            kind: kind.to_string(),
            name: obj["metadata"]["name"].as_str().unwrap_or("").to_string(),
            errors,
        })?;
    Ok(defaulted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn admit_defaults_and_validates() {
        let branch = json!({
            "apiVersion": "pgbranch.dev/v1alpha1", "kind": "Branch",
            "metadata": {"name": "dev"},
            "spec": {"parent": {"branch": "prod"}}
        });
        let stored = admit("Branch", &branch, None).unwrap();
        assert_eq!(stored["spec"]["protected"], false);
        assert_eq!(stored["spec"]["compute"]["enabled"], true);
        assert_eq!(stored["spec"]["compute"]["readReplicas"], 0);

        let mut moved = branch.clone();
        moved["spec"]["parent"]["lsn"] = json!("0/16B3748");
        let err = admit("Branch", &moved, Some(&stored)).unwrap_err();
        assert!(
            err.to_string().contains("spec.parent is immutable"),
            "{err}"
        );

        let mut long = branch.clone();
        long["metadata"]["name"] = json!("a".repeat(45));
        assert!(admit("Branch", &long, None).is_err());

        assert!(matches!(
            admit("Deployment", &branch, None),
            Err(AdmitError::UnknownKind(_))
        ));
    }

    #[test]
    fn every_kind_has_a_schema() {
        for kind in ["Branch", "Snapshot", "SnapshotRestore", "SnapshotSchedule"] {
            let schema = crd_schema(kind).unwrap();
            assert_eq!(schema["type"], "object", "{kind}");
        }
        assert!(crd_schema("Pod").is_none());
    }
}
