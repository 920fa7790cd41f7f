//! Names, labels and selectors of a branch's child objects, and the
//! metadata every one of them carries (owner reference, propagated labels).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use super::ComputeError;
use crate::api::{
    Branch, LABEL_BRANCH, LABEL_MANAGED_BY, LABEL_REPLICA_ORDINAL, LABEL_ROLE, LABEL_TIMELINE,
    TRACKING_LABELS,
};

/// Name of the compute Deployment of a branch's timeline.
pub fn deployment_name(branch: &str, timeline_id: &str) -> String {
    let prefix: String = timeline_id.chars().take(8).collect();
    format!("{branch}-{prefix}")
}

/// Name of the Deployment of read replica `ordinal` of a branch's timeline:
/// `<branch>-<timeline prefix>-r<ordinal>` (44 + 1 + 8 + 3 characters at
/// most: a valid DNS label).
pub fn replica_deployment_name(branch: &str, timeline_id: &str, ordinal: u32) -> String {
    format!("{}-r{ordinal}", deployment_name(branch, timeline_id))
}

/// Name of the read-only Service of a branch (its replicas).
pub fn ro_service_name(branch: &str) -> String {
    format!("{branch}-ro")
}

/// Name of the Service of a branch (its stable address).
pub fn service_name(branch: &str) -> String {
    branch.to_string()
}

/// Name of the Secret with the application connection.
pub fn app_secret_name(branch: &str) -> String {
    format!("{branch}-app")
}

/// Name of the Secret with the `postgres` superuser's password.
pub fn superuser_secret_name(branch: &str) -> String {
    format!("{branch}-superuser")
}

/// Name of the Secret of a declared role that is not the app role.
pub fn role_secret_name(branch: &str, role: &str) -> String {
    format!("{branch}-{role}")
}

/// The part of a role's Secret name derived from the role (lower-cased,
/// `_` and other characters Kubernetes refuses become `-`).
pub fn secret_suffix(role: &str) -> String {
    role.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// The in-cluster DNS name of a branch's Service (`<svc>.<ns>.svc`).
pub fn service_host(branch: &str, namespace: &str) -> String {
    format!("{}.{namespace}.svc", service_name(branch))
}

/// Labels every object of a branch carries (and selects by).
pub fn branch_labels(branch: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_BRANCH.to_string(), branch.to_string()),
        (LABEL_MANAGED_BY.to_string(), "pgbranch".to_string()),
    ])
}

/// The selector of the primary compute of a timeline. Computes are
/// selected by timeline and role only: a timeline's data directory has one
/// primary whatever branch it serves, so the Service of a branch that took
/// over another branch's compute (a restore's finalize) selects it without
/// naming that branch. The pods' `pgbranch.dev/branch` label names the
/// branch they serve and may change (the operator relabels adopted pods,
/// which needs no restart).
pub fn primary_selector(timeline_id: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_TIMELINE.to_string(), timeline_id.to_string()),
        (LABEL_ROLE.to_string(), "primary".to_string()),
    ])
}

/// The selector of read replica `ordinal` of a timeline.
pub fn replica_selector(timeline_id: &str, ordinal: u32) -> BTreeMap<String, String> {
    let mut sel = replicas_selector(timeline_id);
    sel.insert(LABEL_REPLICA_ORDINAL.to_string(), ordinal.to_string());
    sel
}

/// The selector of every read replica of a timeline (the `-ro` Service's).
pub fn replicas_selector(timeline_id: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_TIMELINE.to_string(), timeline_id.to_string()),
        (LABEL_ROLE.to_string(), "replica".to_string()),
    ])
}

/// How many replica Deployments a branch wants, and whether they run:
/// `spec.compute.readReplicas` when the compute is enabled (0 otherwise);
/// running unless suspended.
pub fn desired_replicas(branch: &Branch) -> (u32, bool) {
    let c = &branch.spec.compute;
    if !c.enabled {
        return (0, false);
    }
    (u32::try_from(c.read_replicas).unwrap_or(0), !c.suspended)
}

/// The Branch's own labels that may be propagated (everything but the GitOps
/// tracking labels), merged under ours.
fn propagated_labels(branch: &Branch) -> BTreeMap<String, String> {
    branch
        .labels()
        .iter()
        .filter(|(k, _)| !TRACKING_LABELS.contains(&k.as_str()))
        .filter(|(k, _)| !k.starts_with("pgbranch.dev/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn owner_ref(branch: &Branch) -> Result<OwnerReference, ComputeError> {
    branch
        .controller_owner_ref(&())
        .ok_or(ComputeError::MissingMeta("uid"))
}

pub(super) fn meta(
    branch: &Branch,
    name: String,
    extra_labels: BTreeMap<String, String>,
) -> Result<ObjectMeta, ComputeError> {
    let mut labels = propagated_labels(branch);
    labels.extend(branch_labels(&branch.name_any()));
    labels.extend(extra_labels);
    Ok(ObjectMeta {
        name: Some(name),
        namespace: branch.namespace(),
        labels: Some(labels),
        owner_references: Some(vec![owner_ref(branch)?]),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::compute::fixtures::{branch, cfg, target};
    use crate::compute::{
        app_secret_name, build_credentials_secret, build_deployment, build_service, RoleCredentials,
    };

    #[test]
    fn children_are_owned_and_do_not_copy_tracking_labels() {
        let b = branch("dev");
        let d = build_deployment(&b, &target(), &cfg()).unwrap();
        let s = build_service(&b, "a1b2c3d4e5f60718").unwrap();
        let creds = RoleCredentials {
            user: "app".into(),
            password: "pw".into(),
            database: "app".into(),
        };
        let sec = build_credentials_secret(
            &b,
            app_secret_name("dev"),
            &creds,
            &cfg(),
            BTreeMap::new(),
            None,
        )
        .unwrap();
        for m in [&d.metadata, &s.metadata, &sec.metadata] {
            let labels = m.labels.as_ref().unwrap();
            assert!(!labels.contains_key("app.kubernetes.io/instance"));
            assert!(!labels.contains_key("argocd.argoproj.io/instance"));
            assert_eq!(labels.get("team").map(String::as_str), Some("payments"));
            assert_eq!(labels.get(LABEL_BRANCH).map(String::as_str), Some("dev"));
            let owner = &m.owner_references.as_ref().unwrap()[0];
            assert_eq!(owner.kind, "Branch");
            assert_eq!(owner.name, "dev");
            assert_eq!(owner.uid, "0f3c6a8e-1111-2222-3333-444455556666");
            assert_eq!(owner.controller, Some(true));
        }
        let pod_labels = d.spec.unwrap().template.metadata.unwrap().labels.unwrap();
        assert!(!pod_labels.contains_key("app.kubernetes.io/instance"));
    }

    #[test]
    fn replica_names_fit_a_dns_label_for_the_longest_branch() {
        let name = "a".repeat(crate::api::names::MAX_BRANCH_NAME_LEN);
        let d = replica_deployment_name(
            &name,
            "0123456789abcdef",
            crate::storage::MAX_REPLICA_ORDINAL,
        );
        assert!(crate::api::names::validate_dns_label(&d).is_ok(), "{d}");
        assert!(crate::api::names::validate_dns_label(&ro_service_name(&name)).is_ok());
        assert_eq!(
            replica_deployment_name("dev", "0123456789abcdef", 0),
            "dev-01234567-r0"
        );
    }

    #[test]
    fn names_follow_the_convention() {
        assert_eq!(deployment_name("dev", "0123456789abcdef"), "dev-01234567");
        assert_eq!(superuser_secret_name("dev"), "dev-superuser");
        assert_eq!(role_secret_name("dev", "reporter"), "dev-reporter");
    }
}
