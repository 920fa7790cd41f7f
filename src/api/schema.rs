//! The CRDs generated from the types, and their schemas (the CRD tests
//! run the CEL rules of these schemas with kube's validator).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::Value;

use super::{BackupDestination, Branch, Snapshot, SnapshotRestore, SnapshotSchedule};

/// Every CRD of the operator, in a fixed order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        Branch::crd(),
        Snapshot::crd(),
        SnapshotRestore::crd(),
        SnapshotSchedule::crd(),
        BackupDestination::crd(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_schema() {
        for kind in [
            "Branch",
            "Snapshot",
            "SnapshotRestore",
            "SnapshotSchedule",
            "BackupDestination",
        ] {
            let schema = crd_schema(kind).unwrap();
            assert_eq!(schema["type"], "object", "{kind}");
        }
        assert!(crd_schema("Pod").is_none());
    }
}
