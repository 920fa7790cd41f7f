//! The compute Deployments of a branch: its primary on the timeline's data
//! directory and its read replicas, hot standbys of the primary, each on
//! its own copy-on-write copy.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
    HostPathVolumeSource, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::names::meta;
use super::tls::{
    copy_command, postgres_tls_settings, tls_secret_name, TLS_LIVE_DIR, TLS_SECRET_MOUNT,
};
use super::{
    deployment_name, primary_selector, replica_deployment_name, replica_selector, service_host,
    superuser_secret_name, Colocation, ComputeConfig, ComputeError, VolumeSource, PG_PORT,
};
use crate::api::{Branch, LABEL_COMPONENT};

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
    let mut conninfo = format!(
        "primary_conninfo=host={} port={PG_PORT} user=postgres application_name={deployment}",
        service_host(&name, &namespace)
    );
    if cfg.tls.enabled {
        // Replication over TLS, the primary checked against the namespace CA
        // under the Service's name.
        conninfo.push_str(&format!(
            " sslmode=verify-full sslrootcert={TLS_LIVE_DIR}/ca.crt"
        ));
    }
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

/// `archive_timeout` of a backed-up branch's compute (RPO target of
/// `spec.backup`): a WAL segment is closed, archived and uploaded at
/// most this long after a write.
pub const BACKUP_ARCHIVE_TIMEOUT: &str = "5s";

/// The `archive_timeout` the compute runs with: [`BACKUP_ARCHIVE_TIMEOUT`]
/// while `spec.backup` is set, unless the user's `postgresParameters`
/// chose one; else PostgreSQL's default (none).
fn archive_timeout(branch: &Branch) -> Option<&'static str> {
    let own = branch
        .spec
        .compute
        .postgres_parameters
        .keys()
        .any(|k| k.eq_ignore_ascii_case("archive_timeout"));
    (branch.spec.backup.is_some() && !own).then_some(BACKUP_ARCHIVE_TIMEOUT)
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
    if cfg.tls.enabled {
        for (k, v) in postgres_tls_settings() {
            args.push("-c".into());
            args.push(format!("{k}={v}"));
        }
    }
    if let Some(t) = archive_timeout(branch) {
        args.push("-c".into());
        args.push(format!("archive_timeout={t}"));
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
    let security_context = SecurityContext {
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
    };
    let mut mounts = vec![VolumeMount {
        name: "storage".into(),
        mount_path: mount.to_string(),
        ..Default::default()
    }];
    let mut volumes = vec![volume];
    let mut init_containers = vec![];
    if cfg.tls.enabled {
        let tls_mounts = vec![
            VolumeMount {
                name: "tls-secret".into(),
                mount_path: TLS_SECRET_MOUNT.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: "tls".into(),
                mount_path: TLS_LIVE_DIR.into(),
                ..Default::default()
            },
        ];
        mounts.extend(tls_mounts.clone());
        volumes.push(Volume {
            name: "tls-secret".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls_secret_name(&branch.name_any())),
                // Root's files: readable, so the copy below can take them.
                default_mode: Some(0o444),
                optional: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "tls".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("1Mi".into())),
            }),
            ..Default::default()
        });
        // PostgreSQL wants its key file to be its own and private: copied
        // as the postgres user, mode 0600 (tls.rs, module docs).
        init_containers.push(Container {
            name: "tls".into(),
            image: Some(image.clone()),
            command: Some(vec![
                "sh".into(),
                "-c".into(),
                copy_command(TLS_SECRET_MOUNT, TLS_LIVE_DIR),
            ]),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_string(), Quantity("10m".into())),
                    ("memory".to_string(), Quantity("16Mi".into())),
                ])),
                limits: Some(BTreeMap::from([(
                    "memory".to_string(),
                    Quantity("64Mi".into()),
                )])),
                ..Default::default()
            }),
            security_context: Some(security_context.clone()),
            volume_mounts: Some(tls_mounts),
            ..Default::default()
        });
    }
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
        security_context: Some(security_context),
        volume_mounts: Some(mounts),
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
                    init_containers: (!init_containers.is_empty()).then_some(init_containers),
                    containers: vec![container],
                    volumes: Some(volumes),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::LABEL_REPLICA_ORDINAL;
    use crate::api::{ComputeSpec, LABEL_BRANCH, LABEL_ROLE, LABEL_TIMELINE};
    use crate::compute::fixtures::{branch, cfg, replica_target, target, with_replicas};
    use crate::compute::{build_service, desired_replicas};

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
    fn a_backed_up_branch_closes_wal_segments_every_five_seconds() {
        let args = |b: &Branch| {
            let d = build_deployment(b, &target(), &cfg()).unwrap();
            d.spec.unwrap().template.spec.unwrap().containers[0]
                .args
                .clone()
                .unwrap()
        };
        let mut b = branch("dev");
        assert!(!args(&b).iter().any(|a| a.starts_with("archive_timeout")));
        b.spec.backup = Some(crate::api::BackupSpec {
            destination: "s3".into(),
            ..Default::default()
        });
        assert!(args(&b).contains(&"archive_timeout=5s".to_string()));
        // The user's own setting wins.
        b.spec.compute.postgres_parameters =
            BTreeMap::from([("archive_timeout".to_string(), "30s".to_string())]);
        let a = args(&b);
        assert!(a.contains(&"archive_timeout=30s".to_string()), "{a:?}");
        assert!(!a.contains(&"archive_timeout=5s".to_string()), "{a:?}");
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
                &"primary_conninfo=host=dev.team-a.svc port=5432 user=postgres application_name=dev-a1b2c3d4-r1 sslmode=verify-full sslrootcert=/run/pgbranch/tls/ca.crt"
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
    fn with_tls_postgres_serves_the_branch_certificate_and_requires_tls() {
        let d = build_deployment(&branch("dev"), &target(), &cfg()).unwrap();
        let pod = d.spec.unwrap().template.spec.unwrap();
        let args = pod.containers[0].args.clone().unwrap();
        for want in [
            "ssl=on",
            "ssl_min_protocol_version=TLSv1.2",
            "ssl_cert_file=/run/pgbranch/tls/tls.crt",
            "ssl_key_file=/run/pgbranch/tls/tls.key",
            "hba_file=/etc/pgbranch/tls-secret/pg_hba.conf",
        ] {
            assert!(args.contains(&want.to_string()), "{want} in {args:?}");
        }
        let vols = pod.volumes.unwrap();
        let secret = vols.iter().find(|v| v.name == "tls-secret").unwrap();
        assert_eq!(
            secret.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("dev-tls")
        );
        let live = vols.iter().find(|v| v.name == "tls").unwrap();
        assert_eq!(
            live.empty_dir.as_ref().unwrap().medium.as_deref(),
            Some("Memory")
        );
        // The key is copied as the postgres user, with the same restricted
        // security context, before postgres starts.
        let init = &pod.init_containers.unwrap()[0];
        assert_eq!(init.security_context, pod.containers[0].security_context);
        let cmd = init.command.as_ref().unwrap();
        assert!(cmd[2].contains("umask 077"), "{cmd:?}");
        assert!(
            cmd[2].contains("/etc/pgbranch/tls-secret/tls.key"),
            "{cmd:?}"
        );

        // User parameters cannot turn TLS off: ours come after theirs.
        let mut b = branch("dev");
        b.spec.compute.postgres_parameters =
            BTreeMap::from([("ssl".to_string(), "off".to_string())]);
        let d = build_deployment(&b, &target(), &cfg()).unwrap();
        let args = d.spec.unwrap().template.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap();
        let off = args.iter().position(|a| a == "ssl=off").unwrap();
        let on = args.iter().position(|a| a == "ssl=on").unwrap();
        assert!(on > off);

        // TLS off: plaintext as before.
        let mut c = cfg();
        c.tls.enabled = false;
        let d = build_deployment(&branch("dev"), &target(), &c).unwrap();
        let pod = d.spec.unwrap().template.spec.unwrap();
        assert!(pod.init_containers.is_none());
        assert_eq!(pod.volumes.unwrap().len(), 1);
        assert!(!pod.containers[0]
            .args
            .clone()
            .unwrap()
            .contains(&"ssl=on".to_string()));
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
}
