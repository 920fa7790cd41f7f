//! The Kubernetes objects a branch owns, built as pure functions.
//!
//! Nothing here talks to the API server: the Branch controller reads what it
//! needs (the Branch, its timeline, the passwords already stored), calls these
//! builders for the desired objects and applies them with one field manager.
//!
//! A branch owns:
//! * one compute `Deployment` per live timeline, `<branch>-<timeline prefix>`,
//!   running stock `postgres` on the timeline's data directory;
//! * the `Service` `<branch>`, selecting the primary of the branch's current
//!   timeline (a restore retargets this selector);
//! * the `Secret` `<branch>-app` with the connection keys CloudNativePG and
//!   Crunchy users expect plus the Service Binding `type`/`provider` keys;
//! * the `Secret` `<branch>-superuser` with the `postgres` role's password;
//! * a `Secret` `<branch>-<role>` for every further declared role;
//! * with compute TLS, the `Secret` `<branch>-tls` (its server certificate,
//!   the namespace CA's `ca.crt`, the `pg_hba.conf` its computes run with),
//!   mounted by every compute of the branch ([`tls`]).
//!
//! * for `spec.compute.readReplicas: N`, N replica Deployments
//!   `<branch>-<timeline prefix>-r<n>` (n = 0..N-1), each running postgres as
//!   a hot standby on its own copy-on-write copy of the primary's data
//!   directory (made by the storage layer, `timelines/<id>/replicas/<n>`),
//!   streaming from the Service `<branch>` (`primary_conninfo` on the command
//!   line, the superuser password as `PGPASSWORD` from the
//!   `<branch>-superuser` Secret: never in arguments or data directories);
//! * when N > 0, the Service `<branch>-ro`, selecting the replicas of the
//!   current timeline (and the `ro-host`/`ro-uri` keys in the credentials
//!   Secrets).
//!
//! By concern: [`names`] (names, labels, selectors, metadata),
//! [`deployment`] (primary and replica Deployments), [`service`],
//! [`credentials`] (Secrets and their connection keys), [`hash`] (skip
//! unchanged applies), [`health`] (why a compute Pod does not come up),
//! [`tls`] (the namespace CA, the branch's server certificate
//! `<branch>-tls`, the `pg_hba.conf` that requires TLS).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, PodAffinity, PodAffinityTerm, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub mod credentials;
pub mod deployment;
pub mod hash;
pub mod health;
pub mod names;
pub mod service;
pub mod tls;

pub use credentials::*;
pub use deployment::*;
pub use hash::*;
pub use names::*;
pub use service::*;
pub use tls::{tls_secret_name, TlsConfig, CA_SECRET};

/// The port every compute listens on and every Service exposes.
pub const PG_PORT: i32 = 5432;
/// Default compute image (stock PostgreSQL; its major must match the data).
pub const DEFAULT_IMAGE: &str = "postgres:15";
/// Where compute pods find the storage volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    /// A directory on the node (single-node storage, kind, tests).
    HostPath(String),
    /// A PersistentVolumeClaim (ReadWriteMany when computes run on several
    /// nodes).
    Pvc(String),
}

/// Operator-wide settings of the computes it creates.
#[derive(Debug, Clone, PartialEq)]
pub struct ComputeConfig {
    /// Image when the Branch does not name one.
    pub default_image: String,
    /// The storage volume.
    pub volume: VolumeSource,
    /// Where the volume is mounted in the pod (the engine's `compute_root`):
    /// a timeline's data directory is `<mount_path>/<timeline data_path>`.
    pub mount_path: String,
    /// The uid (and gid) postgres runs as; it owns the data directories.
    pub run_as_uid: i64,
    /// Cluster DNS domain for the `fqdn-*` keys.
    pub cluster_domain: String,
    /// Resources when the Branch gives none.
    pub default_resources: Option<ResourceRequirements>,
    /// Run computes on the node of the pod that holds the storage volume
    /// (a hostPath or ReadWriteOnce volume is only there): that pod's
    /// labels and namespace. `None`: schedule anywhere (a volume every
    /// node can mount, or a single-node cluster).
    pub colocate_with: Option<Colocation>,
    /// TLS on the computes ([`tls`]).
    pub tls: TlsConfig,
}

/// The pod computes must share a node with (the storage service's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Colocation {
    /// Its namespace.
    pub namespace: String,
    /// Labels that select it.
    pub labels: BTreeMap<String, String>,
}

impl Colocation {
    /// Parses `key=value,key=value` (the operator's flag).
    pub fn parse(namespace: &str, labels: &str) -> Result<Colocation, String> {
        let mut out = BTreeMap::new();
        for pair in labels.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not key=value"))?;
            if k.trim().is_empty() {
                return Err(format!("{pair:?} has an empty key"));
            }
            out.insert(k.trim().to_string(), v.trim().to_string());
        }
        if out.is_empty() {
            return Err("no labels given".into());
        }
        if namespace.trim().is_empty() {
            return Err("no namespace given".into());
        }
        Ok(Colocation {
            namespace: namespace.trim().to_string(),
            labels: out,
        })
    }

    /// A required pod affinity to that pod's node.
    fn affinity(&self) -> Affinity {
        Affinity {
            pod_affinity: Some(PodAffinity {
                required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
                    label_selector: Some(LabelSelector {
                        match_labels: Some(self.labels.clone()),
                        ..Default::default()
                    }),
                    namespaces: Some(vec![self.namespace.clone()]),
                    topology_key: "kubernetes.io/hostname".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// The operator builds its configuration from its flags; this default
/// (a host directory, which needs nothing in the branch's namespace) is for
/// embedding and tests.
impl Default for ComputeConfig {
    fn default() -> Self {
        Self {
            default_image: DEFAULT_IMAGE.into(),
            volume: VolumeSource::HostPath("/var/lib/pgbranch".into()),
            mount_path: "/var/lib/pgbranch".into(),
            run_as_uid: 999,
            cluster_domain: "cluster.local".into(),
            default_resources: None,
            colocate_with: None,
            tls: TlsConfig::default(),
        }
    }
}

/// Errors of the builders: a Branch that lacks what a child object needs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ComputeError {
    #[error("the Branch has no {0} yet (not stored by the API server)")]
    MissingMeta(&'static str),
    #[error("TLS: {0}")]
    Tls(String),
}

#[cfg(test)]
pub(crate) mod fixtures {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::{Branch, BranchSpec};

    pub(crate) fn branch(name: &str) -> Branch {
        let mut b = Branch::new(name, BranchSpec::default());
        b.metadata.namespace = Some("team-a".into());
        b.metadata.uid = Some("0f3c6a8e-1111-2222-3333-444455556666".into());
        b.metadata.labels = Some(BTreeMap::from([
            ("app.kubernetes.io/instance".into(), "argo-app".into()),
            ("argocd.argoproj.io/instance".into(), "argo-app".into()),
            ("team".into(), "payments".into()),
        ]));
        b
    }

    pub(crate) fn cfg() -> ComputeConfig {
        ComputeConfig {
            volume: VolumeSource::HostPath("/srv/pgbranch".into()),
            mount_path: "/var/lib/pgbranch/".into(),
            ..Default::default()
        }
    }

    pub(crate) fn target() -> ComputeTarget<'static> {
        ComputeTarget {
            timeline_id: "a1b2c3d4e5f60718",
            data_path: "timelines/a1b2c3d4e5f60718/pgdata",
        }
    }

    pub(crate) fn replica_target() -> ReplicaTarget<'static> {
        ReplicaTarget {
            timeline_id: "a1b2c3d4e5f60718",
            ordinal: 1,
            data_path: "timelines/a1b2c3d4e5f60718/replicas/1/pgdata",
        }
    }

    pub(crate) fn with_replicas(name: &str, n: i32) -> Branch {
        let mut b = branch(name);
        b.spec.compute.read_replicas = n;
        b
    }
}
