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
//! * a `Secret` `<branch>-<role>` for every further declared role.
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

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction,
    HostPathVolumeSource, PersistentVolumeClaimVolumeSource, PodAffinity, PodAffinityTerm,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    Secret, SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec, TCPSocketAction,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use kube::{Resource, ResourceExt};

pub mod health;

use crate::api::{Branch, LABEL_BRANCH, LABEL_ROLE, LABEL_TIMELINE};

/// The port every compute listens on and every Service exposes.
pub const PG_PORT: i32 = 5432;
/// Default compute image (stock PostgreSQL; its major must match the data).
pub const DEFAULT_IMAGE: &str = "postgres:15";
/// Label naming the component of an object (`compute`, `credentials`).
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// Label naming who manages an object.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Annotation holding a hash of what the operator last applied, so an
/// unchanged object is never re-applied (no write in steady state).
pub const ANNOTATION_APPLIED_HASH: &str = "pgbranch.dev/applied-hash";
/// Annotation on the app Secret: the `<timeline>/<generation>` on which the
/// declarative roles, databases and passwords were last applied over SQL.
pub const ANNOTATION_SQL_APPLIED: &str = "pgbranch.dev/sql-applied";
/// Labels a Branch may carry that must never be copied onto its children
/// (Argo CD and Helm tracking: a copy would make the tool prune or claim them).
const TRACKING_LABELS: &[&str] = &[
    "app.kubernetes.io/instance",
    "argocd.argoproj.io/instance",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
];

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
        }
    }
}

/// Errors of the builders: a Branch that lacks what a child object needs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ComputeError {
    #[error("the Branch has no {0} yet (not stored by the API server)")]
    MissingMeta(&'static str),
}

/// Name of the compute Deployment of a branch's timeline.
pub fn deployment_name(branch: &str, timeline_id: &str) -> String {
    let prefix: String = timeline_id.chars().take(8).collect();
    format!("{branch}-{prefix}")
}

/// Label on a replica compute: its ordinal (`0`, `1`, ...).
pub const LABEL_REPLICA_ORDINAL: &str = "pgbranch.dev/replica-ordinal";

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

fn meta(
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

/// What a compute Deployment runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComputeTarget<'a> {
    /// The timeline served.
    pub timeline_id: &'a str,
    /// The timeline's data directory relative to the volume root
    /// (`timelines/<id>/pgdata`).
    pub data_path: &'a str,
}

/// The compute Deployment of a branch's timeline: stock postgres on the
/// timeline's data directory; one replica (0 when suspended); `Recreate`, so
/// two servers never share a data directory.
pub fn build_deployment(
    branch: &Branch,
    target: &ComputeTarget<'_>,
    cfg: &ComputeConfig,
) -> Result<Deployment, ComputeError> {
    let name = branch.name_any();
    compute_deployment(
        branch,
        PodPlan {
            name: deployment_name(&name, target.timeline_id),
            selector: primary_selector(target.timeline_id),
            data_path: target.data_path,
            extra_args: vec![],
            extra_env: vec![],
        },
        cfg,
    )
}

/// What a read replica Deployment runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaTarget<'a> {
    /// The timeline whose primary it follows.
    pub timeline_id: &'a str,
    pub ordinal: u32,
    /// The replica's data directory relative to the volume root
    /// (`timelines/<id>/replicas/<n>/pgdata`).
    pub data_path: &'a str,
}

/// The Deployment of a read replica: the primary's pod (image, parameters,
/// probes, security context, volume) on the replica's data directory, as a
/// hot standby streaming from the branch's Service. `primary_conninfo` has
/// no password: libpq reads `PGPASSWORD`, taken from the superuser Secret.
pub fn build_replica_deployment(
    branch: &Branch,
    target: &ReplicaTarget<'_>,
    cfg: &ComputeConfig,
) -> Result<Deployment, ComputeError> {
    let name = branch.name_any();
    let namespace = branch
        .namespace()
        .ok_or(ComputeError::MissingMeta("namespace"))?;
    let deployment = replica_deployment_name(&name, target.timeline_id, target.ordinal);
    let conninfo = format!(
        "primary_conninfo=host={} port={PG_PORT} user=postgres application_name={deployment}",
        service_host(&name, &namespace)
    );
    compute_deployment(
        branch,
        PodPlan {
            selector: replica_selector(target.timeline_id, target.ordinal),
            name: deployment,
            data_path: target.data_path,
            extra_args: vec!["-c".into(), conninfo],
            extra_env: vec![EnvVar {
                name: "PGPASSWORD".into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: superuser_secret_name(&name),
                        key: "password".into(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
        },
        cfg,
    )
}

/// The parts of a compute Deployment that differ between the primary and
/// its replicas.
struct PodPlan<'a> {
    name: String,
    /// The Deployment's selector; also on the pods and the Deployment,
    /// which carry the branch's labels besides.
    selector: BTreeMap<String, String>,
    data_path: &'a str,
    extra_args: Vec<String>,
    extra_env: Vec<EnvVar>,
}

/// A compute Deployment: stock postgres on a data directory of the storage
/// volume; one replica (0 when suspended or disabled); `Recreate`, so two
/// servers never share a data directory.
fn compute_deployment(
    branch: &Branch,
    plan: PodPlan<'_>,
    cfg: &ComputeConfig,
) -> Result<Deployment, ComputeError> {
    let selector = plan.selector;
    let mut labels = selector.clone();
    labels.insert(LABEL_COMPONENT.into(), "compute".into());
    let metadata = meta(branch, plan.name, labels.clone())?;
    let mut pod_labels = metadata.labels.clone().unwrap_or_default();
    pod_labels.extend(labels);

    let mount = cfg.mount_path.trim_end_matches('/');
    let pgdata = format!("{mount}/{}", plan.data_path.trim_start_matches('/'));
    let mut args = vec![
        "-D".to_string(),
        pgdata.clone(),
        "-c".to_string(),
        "listen_addresses=*".to_string(),
        "-c".to_string(),
        format!("port={PG_PORT}"),
    ];
    for (k, v) in &branch.spec.compute.postgres_parameters {
        args.push("-c".into());
        args.push(format!("{k}={v}"));
    }
    args.extend(plan.extra_args);
    let mut env = vec![EnvVar {
        name: "PGDATA".into(),
        value: Some(pgdata),
        ..Default::default()
    }];
    env.extend(plan.extra_env);
    let image = branch
        .spec
        .compute
        .image
        .clone()
        .unwrap_or_else(|| cfg.default_image.clone());
    let resources = branch
        .spec
        .compute
        .resources
        .clone()
        .or_else(|| cfg.default_resources.clone())
        .or_else(|| Some(default_resources()));
    let replicas = if branch.spec.compute.suspended || !branch.spec.compute.enabled {
        0
    } else {
        1
    };

    let volume = match &cfg.volume {
        VolumeSource::HostPath(path) => Volume {
            name: "storage".into(),
            host_path: Some(HostPathVolumeSource {
                path: path.clone(),
                type_: Some("Directory".into()),
            }),
            ..Default::default()
        },
        VolumeSource::Pvc(claim) => Volume {
            name: "storage".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(false),
            }),
            ..Default::default()
        },
    };
    let isready = |initial: i32, period: i32, failures: i32| Probe {
        exec: Some(ExecAction {
            command: Some(vec![
                "pg_isready".into(),
                "-h".into(),
                "127.0.0.1".into(),
                "-p".into(),
                PG_PORT.to_string(),
            ]),
        }),
        initial_delay_seconds: Some(initial),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    let container = Container {
        name: "postgres".into(),
        image: Some(image),
        command: Some(vec!["postgres".into()]),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("postgres".into()),
            container_port: PG_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(isready(2, 5, 3)),
        // Crash recovery after a hard stop can take a while: liveness only
        // checks the port and gives postgres time before restarting it.
        liveness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(PG_PORT),
                ..Default::default()
            }),
            initial_delay_seconds: Some(30),
            period_seconds: Some(10),
            timeout_seconds: Some(5),
            failure_threshold: Some(6),
            ..Default::default()
        }),
        resources,
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(cfg.run_as_uid),
            run_as_group: Some(cfg.run_as_uid),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "storage".into(),
            mount_path: mount.to_string(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    Ok(Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..Default::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(vec![volume]),
                    affinity: cfg.colocate_with.as_ref().map(Colocation::affinity),
                    // Fast shutdown: postgres' smart shutdown could wait for
                    // clients forever.
                    termination_grace_period_seconds: Some(30),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(cfg.run_as_uid),
                        run_as_group: Some(cfg.run_as_uid),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("100m".into())),
            ("memory".to_string(), Quantity("256Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("1Gi".into()),
        )])),
        ..Default::default()
    }
}

/// The Service `<branch>`: the stable address, selecting the primary of the
/// branch's current timeline.
pub fn build_service(branch: &Branch, timeline_id: &str) -> Result<Service, ComputeError> {
    let name = branch.name_any();
    postgres_service(branch, service_name(&name), primary_selector(timeline_id))
}

/// The Service `<branch>-ro`: the read replicas of the branch's current
/// timeline.
pub fn build_ro_service(branch: &Branch, timeline_id: &str) -> Result<Service, ComputeError> {
    let name = branch.name_any();
    postgres_service(
        branch,
        ro_service_name(&name),
        replicas_selector(timeline_id),
    )
}

fn postgres_service(
    branch: &Branch,
    name: String,
    selector: BTreeMap<String, String>,
) -> Result<Service, ComputeError> {
    let metadata = meta(
        branch,
        name,
        BTreeMap::from([(LABEL_COMPONENT.to_string(), "compute".to_string())]),
    )?;
    Ok(Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("postgres".into()),
                port: PG_PORT,
                target_port: Some(IntOrString::String("postgres".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    })
}

/// Credentials of one role, as stored in a Secret.
#[derive(Clone, PartialEq, Eq)]
pub struct RoleCredentials {
    pub user: String,
    pub password: String,
    pub database: String,
}

impl std::fmt::Debug for RoleCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoleCredentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("database", &self.database)
            .finish()
    }
}

/// Percent-encodes a URI userinfo or path component (RFC 3986 unreserved
/// characters stay as they are).
fn uri_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Escapes a `.pgpass` field (`:` and `\`).
fn pgpass_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace(':', "\\:")
}

/// The connection keys of a credentials Secret for `host` (the Service's DNS
/// name) and its fully qualified form.
pub fn connection_data(
    creds: &RoleCredentials,
    host: &str,
    fqdn_host: &str,
) -> BTreeMap<String, String> {
    let port = PG_PORT.to_string();
    let user = uri_escape(&creds.user);
    let pass = uri_escape(&creds.password);
    let db = uri_escape(&creds.database);
    let uri = |h: &str| format!("postgresql://{user}:{pass}@{h}:{port}/{db}");
    let jdbc = |h: &str| format!("jdbc:postgresql://{h}:{port}/{db}?password={pass}&user={user}");
    BTreeMap::from([
        ("host".into(), host.to_string()),
        ("port".into(), port.clone()),
        ("dbname".into(), creds.database.clone()),
        ("database".into(), creds.database.clone()),
        ("user".into(), creds.user.clone()),
        ("username".into(), creds.user.clone()),
        ("password".into(), creds.password.clone()),
        ("uri".into(), uri(host)),
        ("jdbc-uri".into(), jdbc(host)),
        ("fqdn-uri".into(), uri(fqdn_host)),
        ("fqdn-jdbc-uri".into(), jdbc(fqdn_host)),
        (
            "pgpass".into(),
            format!(
                "{}:{port}:{}:{}:{}\n",
                pgpass_escape(host),
                pgpass_escape(&creds.database),
                pgpass_escape(&creds.user),
                pgpass_escape(&creds.password)
            ),
        ),
        // Service Binding for Kubernetes (servicebinding.io) well-known keys.
        ("type".into(), "postgresql".into()),
        ("provider".into(), "pgbranch".into()),
    ])
}

/// A credentials Secret of a branch: `name` holds `creds` with every
/// connection key. `annotations` are extra (e.g. the SQL-applied marker).
pub fn build_credentials_secret(
    branch: &Branch,
    name: String,
    creds: &RoleCredentials,
    cfg: &ComputeConfig,
    annotations: BTreeMap<String, String>,
) -> Result<Secret, ComputeError> {
    let branch_name = branch.name_any();
    let namespace = branch
        .namespace()
        .ok_or(ComputeError::MissingMeta("namespace"))?;
    let host = service_host(&branch_name, &namespace);
    let fqdn = format!("{host}.{}", cfg.cluster_domain);
    let mut metadata = meta(
        branch,
        name,
        BTreeMap::from([(LABEL_COMPONENT.to_string(), "credentials".to_string())]),
    )?;
    if !annotations.is_empty() {
        metadata.annotations = Some(annotations);
    }
    let mut data = connection_data(creds, &host, &fqdn);
    if desired_replicas(branch).0 > 0 {
        let ro_host = format!("{}.{namespace}.svc", ro_service_name(&branch_name));
        let ro = connection_data(creds, &ro_host, &ro_host);
        data.insert("ro-host".into(), ro_host.clone());
        if let Some(uri) = ro.get("uri") {
            data.insert("ro-uri".into(), uri.clone());
        }
    }
    let data = data
        .into_iter()
        .map(|(k, v)| (k, ByteString(v.into_bytes())))
        .collect();
    Ok(Secret {
        metadata,
        type_: Some("servicebinding.io/postgresql".into()),
        data: Some(data),
        ..Default::default()
    })
}

/// Reads a key of a Secret as UTF-8.
pub fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key).cloned())
        })
}

/// A stable hash of an object's desired content (FNV-1a over its JSON), put
/// in [`ANNOTATION_APPLIED_HASH`] so unchanged objects are not re-applied.
pub fn content_hash<T: serde::Serialize>(obj: &T) -> String {
    let bytes = serde_json::to_vec(obj).unwrap_or_default();
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Sets [`ANNOTATION_APPLIED_HASH`] on an object to the hash of its content.
pub fn stamp_hash<K: Resource + serde::Serialize>(mut obj: K) -> K {
    let hash = content_hash(&obj);
    obj.meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_APPLIED_HASH.into(), hash);
    obj
}

/// Whether an existing object already carries the desired object's hash.
pub fn is_up_to_date<K: Resource>(existing: &K, desired: &K) -> bool {
    let get = |k: &K| {
        k.meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_APPLIED_HASH))
            .cloned()
    };
    matches!((get(existing), get(desired)), (Some(a), Some(b)) if a == b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BranchSpec, ComputeSpec};

    fn branch(name: &str) -> Branch {
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

    fn cfg() -> ComputeConfig {
        ComputeConfig {
            volume: VolumeSource::HostPath("/srv/pgbranch".into()),
            mount_path: "/var/lib/pgbranch/".into(),
            ..Default::default()
        }
    }

    fn target() -> ComputeTarget<'static> {
        ComputeTarget {
            timeline_id: "a1b2c3d4e5f60718",
            data_path: "timelines/a1b2c3d4e5f60718/pgdata",
        }
    }

    #[test]
    fn computes_share_the_storage_pods_node_when_asked() {
        let d = build_deployment(&branch("dev"), &target(), &cfg()).unwrap();
        assert!(d.spec.unwrap().template.spec.unwrap().affinity.is_none());
        let c = ComputeConfig {
            colocate_with: Some(
                Colocation::parse("pgbranch-system", "app.kubernetes.io/component=storage")
                    .unwrap(),
            ),
            ..cfg()
        };
        let d = build_deployment(&branch("dev"), &target(), &c).unwrap();
        let aff = d.spec.unwrap().template.spec.unwrap().affinity.unwrap();
        let terms = aff
            .pod_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap();
        assert_eq!(terms.len(), 1);
        assert_eq!(terms[0].topology_key, "kubernetes.io/hostname");
        assert_eq!(
            terms[0].namespaces.as_deref(),
            Some(&["pgbranch-system".to_string()][..])
        );
        let sel = terms[0]
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap();
        assert_eq!(sel["app.kubernetes.io/component"], "storage");
        assert!(Colocation::parse("ns", "").is_err());
        assert!(Colocation::parse("", "a=b").is_err());
    }

    #[test]
    fn deployment_runs_postgres_on_the_timeline_data_dir() {
        let d = build_deployment(&branch("dev"), &target(), &cfg()).unwrap();
        assert_eq!(d.metadata.name.as_deref(), Some("dev-a1b2c3d4"));
        assert_eq!(d.metadata.namespace.as_deref(), Some("team-a"));
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.strategy.unwrap().type_.as_deref(), Some("Recreate"));
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("postgres:15"));
        assert_eq!(c.command.as_ref().unwrap(), &vec!["postgres".to_string()]);
        let args = c.args.as_ref().unwrap();
        assert_eq!(args[0], "-D");
        assert_eq!(
            args[1],
            "/var/lib/pgbranch/timelines/a1b2c3d4e5f60718/pgdata"
        );
        assert!(args.contains(&"listen_addresses=*".to_string()));
        assert_eq!(
            c.volume_mounts.as_ref().unwrap()[0].mount_path,
            "/var/lib/pgbranch"
        );
        assert_eq!(
            pod.volumes.as_ref().unwrap()[0]
                .host_path
                .as_ref()
                .unwrap()
                .path,
            "/srv/pgbranch"
        );
        let probe = c.readiness_probe.as_ref().unwrap();
        assert_eq!(
            probe.exec.as_ref().unwrap().command.as_ref().unwrap()[0],
            "pg_isready"
        );
        assert!(c.liveness_probe.is_some());
        assert!(c.resources.as_ref().unwrap().requests.is_some());
    }

    #[test]
    fn deployment_selector_and_pod_labels_match_the_service() {
        let b = branch("dev");
        let d = build_deployment(&b, &target(), &cfg()).unwrap();
        let s = build_service(&b, target().timeline_id).unwrap();
        let svc_sel = s.spec.unwrap().selector.unwrap();
        let pod_labels = d
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap();
        for (k, v) in &svc_sel {
            assert_eq!(pod_labels.get(k), Some(v), "pod lacks {k}");
        }
        assert_eq!(svc_sel.get(LABEL_ROLE).map(String::as_str), Some("primary"));
        assert_eq!(
            svc_sel.get(LABEL_TIMELINE).map(String::as_str),
            Some("a1b2c3d4e5f60718")
        );
        let dsel = d.spec.unwrap().selector.match_labels.unwrap();
        assert_eq!(dsel, svc_sel);
        // Selected by timeline and role only; the pods name their branch.
        assert!(!svc_sel.contains_key(LABEL_BRANCH), "{svc_sel:?}");
        assert_eq!(
            pod_labels.get(LABEL_BRANCH).map(String::as_str),
            Some("dev")
        );
    }

    #[test]
    fn deployment_security_context_is_restricted() {
        let d = build_deployment(&branch("dev"), &target(), &cfg()).unwrap();
        let pod = d.spec.unwrap().template.spec.unwrap();
        let sc = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.run_as_user, Some(999));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.unwrap().drop.unwrap(),
            vec!["ALL".to_string()]
        );
        assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    }

    #[test]
    fn suspended_or_disabled_compute_has_no_replicas() {
        let mut b = branch("dev");
        b.spec.compute.suspended = true;
        let d = build_deployment(&b, &target(), &cfg()).unwrap();
        assert_eq!(d.spec.unwrap().replicas, Some(0));
        b.spec.compute = ComputeSpec {
            enabled: false,
            ..Default::default()
        };
        let d = build_deployment(&b, &target(), &cfg()).unwrap();
        assert_eq!(d.spec.unwrap().replicas, Some(0));
    }

    #[test]
    fn branch_image_parameters_and_pvc_are_used() {
        let mut b = branch("dev");
        b.spec.compute.image = Some("postgres:16.4".into());
        b.spec.compute.postgres_parameters =
            BTreeMap::from([("work_mem".to_string(), "64MB".to_string())]);
        let c = ComputeConfig {
            volume: VolumeSource::Pvc("pgdata".into()),
            ..cfg()
        };
        let d = build_deployment(&b, &target(), &c).unwrap();
        let pod = d.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.containers[0].image.as_deref(), Some("postgres:16.4"));
        assert!(pod.containers[0]
            .args
            .as_ref()
            .unwrap()
            .contains(&"work_mem=64MB".to_string()));
        assert_eq!(
            pod.volumes.unwrap()[0]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "pgdata"
        );
    }

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
        let sec =
            build_credentials_secret(&b, app_secret_name("dev"), &creds, &cfg(), BTreeMap::new())
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
    fn builders_refuse_a_branch_without_uid() {
        let mut b = branch("dev");
        b.metadata.uid = None;
        assert_eq!(
            build_service(&b, "x").unwrap_err(),
            ComputeError::MissingMeta("uid")
        );
    }

    #[test]
    fn service_is_named_after_the_branch() {
        let s = build_service(&branch("dev"), "a1b2c3d4e5f60718").unwrap();
        assert_eq!(s.metadata.name.as_deref(), Some("dev"));
        let ports = s.spec.unwrap().ports.unwrap();
        assert_eq!(ports[0].port, 5432);
    }

    #[test]
    fn app_secret_has_every_connection_key() {
        let creds = RoleCredentials {
            user: "app".into(),
            password: "p@ss:w/rd".into(),
            database: "shop".into(),
        };
        let sec = build_credentials_secret(
            &branch("dev"),
            app_secret_name("dev"),
            &creds,
            &cfg(),
            BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(sec.metadata.name.as_deref(), Some("dev-app"));
        let get = |k: &str| secret_value(&sec, k).unwrap_or_else(|| panic!("missing {k}"));
        assert_eq!(get("host"), "dev.team-a.svc");
        assert_eq!(get("port"), "5432");
        assert_eq!(get("dbname"), "shop");
        assert_eq!(get("user"), "app");
        assert_eq!(get("username"), "app");
        assert_eq!(get("password"), "p@ss:w/rd");
        assert_eq!(
            get("uri"),
            "postgresql://app:p%40ss%3Aw%2Frd@dev.team-a.svc:5432/shop"
        );
        assert_eq!(
            get("fqdn-uri"),
            "postgresql://app:p%40ss%3Aw%2Frd@dev.team-a.svc.cluster.local:5432/shop"
        );
        assert_eq!(
            get("jdbc-uri"),
            "jdbc:postgresql://dev.team-a.svc:5432/shop?password=p%40ss%3Aw%2Frd&user=app"
        );
        assert!(get("fqdn-jdbc-uri")
            .starts_with("jdbc:postgresql://dev.team-a.svc.cluster.local:5432/"));
        assert_eq!(get("pgpass"), "dev.team-a.svc:5432:shop:app:p@ss\\:w/rd\n");
        assert_eq!(get("type"), "postgresql");
        assert_eq!(get("provider"), "pgbranch");
    }

    #[test]
    fn hash_stamp_detects_changes() {
        let b = branch("dev");
        let a = stamp_hash(build_service(&b, "aaaa").unwrap());
        let same = stamp_hash(build_service(&b, "aaaa").unwrap());
        let other = stamp_hash(build_service(&b, "bbbb").unwrap());
        assert!(is_up_to_date(&a, &same));
        assert!(!is_up_to_date(&a, &other));
        let unstamped = build_service(&b, "aaaa").unwrap();
        assert!(!is_up_to_date(&unstamped, &a));
    }

    fn replica_target() -> ReplicaTarget<'static> {
        ReplicaTarget {
            timeline_id: "a1b2c3d4e5f60718",
            ordinal: 1,
            data_path: "timelines/a1b2c3d4e5f60718/replicas/1/pgdata",
        }
    }

    fn with_replicas(name: &str, n: i32) -> Branch {
        let mut b = branch(name);
        b.spec.compute.read_replicas = n;
        b
    }

    #[test]
    fn replica_deployment_is_a_standby_of_the_branch_service() {
        let b = with_replicas("dev", 2);
        let d = build_replica_deployment(&b, &replica_target(), &cfg()).unwrap();
        assert_eq!(d.metadata.name.as_deref(), Some("dev-a1b2c3d4-r1"));
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.strategy.unwrap().type_.as_deref(), Some("Recreate"));
        let sel = spec.selector.match_labels.unwrap();
        assert_eq!(sel.get(LABEL_ROLE).map(String::as_str), Some("replica"));
        assert_eq!(
            sel.get(LABEL_REPLICA_ORDINAL).map(String::as_str),
            Some("1")
        );
        assert_eq!(
            sel.get(LABEL_TIMELINE).map(String::as_str),
            Some("a1b2c3d4e5f60718")
        );
        let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
        for (k, v) in &sel {
            assert_eq!(pod_labels.get(k), Some(v), "pod lacks {k}");
        }
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        let args = c.args.as_ref().unwrap();
        assert_eq!(
            args[1],
            "/var/lib/pgbranch/timelines/a1b2c3d4e5f60718/replicas/1/pgdata"
        );
        assert!(
            args.contains(
                &"primary_conninfo=host=dev.team-a.svc port=5432 user=postgres application_name=dev-a1b2c3d4-r1"
                    .to_string()
            ),
            "{args:?}"
        );
        // Same pod as the primary otherwise.
        let primary = build_deployment(&b, &target(), &cfg()).unwrap();
        let ppod = primary.spec.unwrap().template.spec.unwrap();
        let pc = &ppod.containers[0];
        assert_eq!(c.security_context, pc.security_context);
        assert_eq!(c.readiness_probe, pc.readiness_probe);
        assert_eq!(c.liveness_probe, pc.liveness_probe);
        assert_eq!(c.image, pc.image);
        assert_eq!(pod.volumes, ppod.volumes);
        assert_eq!(pod.security_context, ppod.security_context);
    }

    #[test]
    fn replica_password_comes_from_the_superuser_secret_only() {
        let b = with_replicas("dev", 1);
        let d = build_replica_deployment(&b, &replica_target(), &cfg()).unwrap();
        let c = &d.spec.unwrap().template.spec.unwrap().containers[0];
        let env = c.env.as_ref().unwrap();
        let pw = env.iter().find(|e| e.name == "PGPASSWORD").unwrap();
        assert_eq!(pw.value, None, "no literal password in the pod spec");
        let r = pw
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(r.name, "dev-superuser");
        assert_eq!(r.key, "password");
        for a in c.args.as_ref().unwrap() {
            assert!(!a.contains("password"), "password in args: {a}");
        }
    }

    #[test]
    fn suspended_or_disabled_replicas_do_not_run() {
        let mut b = with_replicas("dev", 2);
        assert_eq!(desired_replicas(&b), (2, true));
        b.spec.compute.suspended = true;
        assert_eq!(desired_replicas(&b), (2, false));
        let d = build_replica_deployment(&b, &replica_target(), &cfg()).unwrap();
        assert_eq!(d.spec.unwrap().replicas, Some(0));
        b.spec.compute.suspended = false;
        b.spec.compute.enabled = false;
        assert_eq!(desired_replicas(&b), (0, false));
    }

    #[test]
    fn ro_service_selects_the_current_timelines_replicas() {
        let b = with_replicas("dev", 2);
        let s = build_ro_service(&b, "a1b2c3d4e5f60718").unwrap();
        assert_eq!(s.metadata.name.as_deref(), Some("dev-ro"));
        let spec = s.spec.unwrap();
        assert_eq!(spec.ports.unwrap()[0].port, 5432);
        let sel = spec.selector.unwrap();
        assert_eq!(sel, replicas_selector("a1b2c3d4e5f60718"));
        assert_eq!(sel.get(LABEL_ROLE).map(String::as_str), Some("replica"));
        assert!(
            !sel.contains_key(LABEL_REPLICA_ORDINAL),
            "selects every replica"
        );
        // Every replica's pods match it; the primary's do not.
        for n in 0..2 {
            let t = ReplicaTarget {
                ordinal: n,
                ..replica_target()
            };
            let d = build_replica_deployment(&b, &t, &cfg()).unwrap();
            let labels = d.spec.unwrap().template.metadata.unwrap().labels.unwrap();
            assert!(sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
        }
        let p = build_deployment(&b, &target(), &cfg()).unwrap();
        let labels = p.spec.unwrap().template.metadata.unwrap().labels.unwrap();
        assert!(!sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
    }

    #[test]
    fn credentials_name_the_ro_service_only_with_replicas() {
        let creds = RoleCredentials {
            user: "app".into(),
            password: "pw".into(),
            database: "shop".into(),
        };
        let mk = |b: &Branch| {
            build_credentials_secret(b, app_secret_name("dev"), &creds, &cfg(), BTreeMap::new())
                .unwrap()
        };
        let sec = mk(&with_replicas("dev", 1));
        assert_eq!(secret_value(&sec, "ro-host").unwrap(), "dev-ro.team-a.svc");
        assert_eq!(
            secret_value(&sec, "ro-uri").unwrap(),
            "postgresql://app:pw@dev-ro.team-a.svc:5432/shop"
        );
        let sec = mk(&branch("dev"));
        assert!(secret_value(&sec, "ro-host").is_none());
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
