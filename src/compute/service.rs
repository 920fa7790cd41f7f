//! The Services of a branch: `<branch>`, its stable address, and
//! `<branch>-ro`, its read replicas.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::names::meta;
use super::{
    primary_selector, replicas_selector, ro_service_name, service_name, ComputeError, PG_PORT,
};
use crate::api::{Branch, LABEL_COMPONENT};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{LABEL_REPLICA_ORDINAL, LABEL_ROLE};
    use crate::compute::fixtures::{branch, cfg, replica_target, target, with_replicas};
    use crate::compute::{build_deployment, build_replica_deployment, ReplicaTarget};

    #[test]
    fn service_is_named_after_the_branch() {
        let s = build_service(&branch("dev"), "a1b2c3d4e5f60718").unwrap();
        assert_eq!(s.metadata.name.as_deref(), Some("dev"));
        let ports = s.spec.unwrap().ports.unwrap();
        assert_eq!(ports[0].port, 5432);
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
}
