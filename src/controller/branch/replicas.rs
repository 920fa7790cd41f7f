//! Read replicas of a branch (`spec.compute.readReplicas`).
//!
//! Observe (the branch's replica Deployments, the storage replicas of its
//! current and replaced timelines) → decide ([`plan`], pure) → apply:
//! * once the primary is ready, replica `n` (n < N) of the current timeline
//!   is made by storage (a copy-on-write copy of the primary, taken through
//!   the primary's connection where the driver needs backup mode), then its
//!   Deployment `<branch>-<tl8>-r<n>` is applied;
//! * suspended: the Deployments of existing replicas are scaled to 0, data
//!   kept; they are scaled up again once the primary serves after a resume;
//!   compute disabled: no replica Deployments (data removed, as N = 0);
//! * Deployments of other timelines (after a restore or refresh) or of
//!   ordinals ≥ N are deleted; a storage replica is deleted only once no
//!   Deployment and no pod is left on it (storage also refuses, `Busy`,
//!   while its postgres still runs: the pass waits);
//! * a replica data directory another Branch's Deployment or pod holds (a
//!   restored branch handing its timeline over) is neither run nor removed
//!   until it goes: two servers on one data directory corrupt it;
//! * the Service `<branch>-ro` exists while N > 0.
//!
//! Nothing is written in steady state: Deployments and the Service carry
//! their content hash, and storage is only asked to create a replica it
//! does not list.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;

use super::super::apply::{apply_owned, delete_owned, holder, Holder};
use super::super::{with_deadline, Context, Error};
use super::deployment_ready;
use crate::api::{Branch, LABEL_BRANCH, LABEL_REPLICA_ORDINAL, LABEL_ROLE, LABEL_TIMELINE};
use crate::compute::{
    build_replica_deployment, build_ro_service, desired_replicas, ro_service_name, ReplicaTarget,
};
use crate::controller::secrets;
use crate::storage::{CreateReplica, Replica, State, StorageError, TimelineId};

/// A replica Deployment of the branch, as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SeenDeployment {
    pub name: String,
    pub timeline: String,
    pub ordinal: Option<u32>,
}

/// What the replica step sees.
#[derive(Debug, Clone)]
pub(super) struct Observed<'a> {
    pub current: &'a TimelineId,
    /// Replicas wanted (0 when the compute is disabled).
    pub wanted: u32,
    /// Not suspended.
    pub running: bool,
    /// The primary of the current timeline is ready and serves the Service.
    pub primary_ready: bool,
    pub deployments: Vec<SeenDeployment>,
    /// (timeline, ordinal) of replica Deployments of other Branches (a
    /// restored branch handing its timeline over, a backup branch): their
    /// data directories are not ours to run or remove while they exist.
    pub others: Vec<(String, u32)>,
    /// (timeline, ordinal) of every replica pod that still exists (a
    /// deleted Deployment's pods may still be stopping): a data directory
    /// is removed only once none runs on it.
    pub pods: Vec<(String, u32)>,
    /// Storage replicas of the current timeline and of replaced ones.
    pub stored: Vec<Replica>,
}

/// What to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Plan {
    pub delete_deployments: Vec<String>,
    pub delete_stored: Vec<(TimelineId, u32)>,
    /// Ordinals of the current timeline storage must make first.
    pub create: Vec<u32>,
    /// Ordinals of the current timeline whose Deployment is applied.
    pub apply: Vec<u32>,
    /// Ordinals held by another Branch's Deployment: wait for it to go.
    pub blocked: Vec<u32>,
    pub ro_service: bool,
}

/// Decides the replica step from what was observed.
pub(super) fn plan(o: &Observed<'_>) -> Plan {
    let current = o.current.as_str();
    let wanted = |tl: &str, n: Option<u32>| tl == current && n.is_some_and(|n| n < o.wanted);
    let delete_deployments = o
        .deployments
        .iter()
        .filter(|d| !wanted(&d.timeline, d.ordinal))
        .map(|d| d.name.clone())
        .collect();
    let foreign = |tl: &str, n: u32| o.others.iter().any(|(t, m)| t == tl && *m == n);
    let pod_on = |tl: &str, n: u32| o.pods.iter().any(|(t, m)| t == tl && *m == n);
    let delete_stored = o
        .stored
        .iter()
        .filter(|r| !wanted(r.timeline.as_str(), Some(r.ordinal)))
        .filter(|r| {
            !o.deployments
                .iter()
                .any(|d| d.timeline == r.timeline.as_str() && d.ordinal == Some(r.ordinal))
                && !foreign(r.timeline.as_str(), r.ordinal)
                && !pod_on(r.timeline.as_str(), r.ordinal)
        })
        .map(|r| (r.timeline.clone(), r.ordinal))
        .collect();
    let blocked: Vec<u32> = (0..o.wanted).filter(|n| foreign(current, *n)).collect();
    let ready_stored = |n: u32| {
        o.stored
            .iter()
            .any(|r| r.timeline == *o.current && r.ordinal == n && r.state == State::Ready)
    };
    let (create, apply): (Vec<u32>, Vec<u32>) = match (o.running, o.primary_ready) {
        (true, true) => (
            (0..o.wanted).filter(|n| !ready_stored(*n)).collect(),
            (0..o.wanted).collect(),
        ),
        // Suspended: existing replicas are scaled to zero, data kept.
        (false, _) => (vec![], (0..o.wanted).filter(|n| ready_stored(*n)).collect()),
        // The primary is starting (or moving): replicas are left as they
        // are until it serves.
        (true, false) => (vec![], vec![]),
    };
    let free = |v: Vec<u32>| v.into_iter().filter(|n| !blocked.contains(n)).collect();
    Plan {
        delete_deployments,
        delete_stored,
        create: free(create),
        apply: free(apply),
        blocked,
        ro_service: o.wanted > 0,
    }
}

/// Replicas wanted and ready after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Report {
    pub wanted: u32,
    pub ready: u32,
    /// Something is still under way (a deletion waiting for a pod).
    pub pending: bool,
}

impl Report {
    /// For the Ready condition's message (empty without replicas).
    pub fn note(&self) -> String {
        if self.wanted == 0 {
            String::new()
        } else {
            format!("; {}/{} read replicas ready", self.ready, self.wanted)
        }
    }

    pub fn settled(&self) -> bool {
        !self.pending && self.ready == self.wanted
    }
}

/// The replica step: observe, plan, apply.
pub(super) async fn reconcile(
    ctx: &Context,
    branch: &Branch,
    current: &TimelineId,
    replaced: &[TimelineId],
    uid: &str,
    primary_ready: bool,
) -> Result<Report, Error> {
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let (wanted, running) = desired_replicas(branch);

    // Observe.
    let listed = ctx
        .list::<Deployment>(
            &ns,
            "list replica computes",
            &format!("{LABEL_ROLE}=replica"),
        )
        .await?;
    let seen = |d: &Deployment| SeenDeployment {
        name: d.name_any(),
        timeline: d.labels().get(LABEL_TIMELINE).cloned().unwrap_or_default(),
        ordinal: d
            .labels()
            .get(LABEL_REPLICA_ORDINAL)
            .and_then(|o| o.parse().ok()),
    };
    let ours = |d: &Deployment| {
        d.labels().get(LABEL_BRANCH) == Some(&name) && holder(d, uid) == Holder::Owner
    };
    let deployments: Vec<SeenDeployment> = listed.iter().filter(|d| ours(d)).map(seen).collect();
    let mut others: Vec<(String, u32)> = listed
        .iter()
        .filter(|d| !ours(d))
        .map(seen)
        .filter_map(|d| Some((d.timeline, d.ordinal?)))
        .collect();
    // Pods outlive their Deployment while they stop: another Branch's
    // replica pod still holds its data directory.
    let pod_list = ctx
        .list::<Pod>(&ns, "list replica pods", &format!("{LABEL_ROLE}=replica"))
        .await?;
    let mut pods = vec![];
    for p in &pod_list {
        let l = p.labels();
        let (Some(t), Some(n)) = (
            l.get(LABEL_TIMELINE),
            l.get(LABEL_REPLICA_ORDINAL).and_then(|o| o.parse().ok()),
        ) else {
            continue;
        };
        if l.get(LABEL_BRANCH) != Some(&name) {
            others.push((t.clone(), n));
        }
        pods.push((t.clone(), n));
    }
    let mut stored = vec![];
    for tl in std::iter::once(current).chain(replaced.iter().filter(|t| *t != current)) {
        match with_deadline(ctx, "list replicas", ctx.storage.list_replicas(tl)).await {
            Ok(r) => stored.extend(r),
            Err(Error::Storage(StorageError::NotFound { .. })) => {}
            Err(e) => return Err(e),
        }
    }
    let observed = Observed {
        current,
        wanted,
        running,
        primary_ready,
        deployments,
        others,
        pods,
        stored,
    };
    let plan = plan(&observed);

    // Apply.
    let mut pending = !plan.blocked.is_empty();
    if pending {
        tracing::info!(timeline = %current, ordinals = ?plan.blocked, "read replicas wait for another branch's replica computes to go");
    }
    for d in &plan.delete_deployments {
        if !delete_owned::<Deployment>(ctx, &ns, d, uid).await? {
            pending = true;
        }
    }
    for (tl, n) in &plan.delete_stored {
        tracing::info!(timeline = %tl, ordinal = n, "deleting read replica");
        match with_deadline(ctx, "delete replica", ctx.storage.delete_replica(tl, *n)).await {
            Ok(()) => {}
            Err(Error::Storage(StorageError::Busy { .. })) => pending = true,
            Err(e) => return Err(e),
        }
    }
    let mut made: Vec<Replica> = observed
        .stored
        .into_iter()
        .filter(|r| r.timeline == *current && r.state == State::Ready)
        .collect();
    if !plan.create.is_empty() {
        // The primary's connection: backup mode on drivers that cannot
        // snapshot a running server atomically.
        let conn = secrets::superuser_conn(ctx, branch).await?;
        for n in &plan.create {
            tracing::info!(timeline = %current, ordinal = n, "creating read replica");
            let req = CreateReplica {
                timeline: current.clone(),
                ordinal: *n,
                source_connection: conn.clone(),
            };
            made.push(with_deadline(ctx, "create replica", ctx.storage.create_replica(req)).await?);
        }
    }
    let mut ready = 0;
    for n in &plan.apply {
        let Some(r) = made.iter().find(|r| r.ordinal == *n) else {
            continue;
        };
        if running {
            // As for the primary: no start or change while a Pod of the
            // replica's data directory is stopping or belongs to another
            // Deployment.
            let dname = crate::compute::replica_deployment_name(&name, current.as_str(), *n);
            let settled = ctx
                .get::<Deployment>(&ns, "read replica", &dname)
                .await?
                .is_some_and(|d| {
                    d.spec.as_ref().and_then(|s| s.replicas) != Some(0) && deployment_ready(&d)
                });
            let selector = crate::compute::replica_selector(current.as_str(), *n)
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            if !settled
                && super::blocking_pod(ctx, &ns, &selector, &dname)
                    .await?
                    .is_some()
            {
                pending = true;
                continue;
            }
        }
        let target = ReplicaTarget {
            timeline_id: current.as_str(),
            ordinal: *n,
            data_path: &r.data_path,
        };
        let live = apply_owned(
            ctx,
            build_replica_deployment(branch, &target, &ctx.config.compute)?,
            uid,
        )
        .await?;
        if running && deployment_ready(&live) {
            ready += 1;
        }
    }
    if plan.ro_service {
        apply_owned(ctx, build_ro_service(branch, current.as_str())?, uid).await?;
    } else if !delete_owned::<Service>(ctx, &ns, &ro_service_name(&name), uid).await? {
        pending = true;
    }
    Ok(Report {
        wanted,
        ready,
        pending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::replica_deployment_name;

    fn tl(s: &str) -> TimelineId {
        TimelineId::new(s).unwrap()
    }

    fn stored(t: &str, n: u32) -> Replica {
        Replica {
            timeline: tl(t),
            ordinal: n,
            state: State::Ready,
            data_path: format!("timelines/{t}/replicas/{n}/pgdata"),
            created_at: jiff::Timestamp::UNIX_EPOCH,
        }
    }

    fn seen(t: &str, n: u32) -> SeenDeployment {
        SeenDeployment {
            name: replica_deployment_name("dev", t, n),
            timeline: t.into(),
            ordinal: Some(n),
        }
    }

    fn observed(current: &TimelineId, wanted: u32) -> Observed<'_> {
        Observed {
            current,
            wanted,
            running: true,
            primary_ready: true,
            deployments: vec![],
            others: vec![],
            pods: vec![],
            stored: vec![],
        }
    }

    #[test]
    fn replicas_are_made_once_the_primary_is_ready() {
        let cur = tl("aaaa");
        let mut o = observed(&cur, 2);
        o.stored = vec![stored("aaaa", 0)];
        let p = plan(&o);
        assert_eq!(p.create, vec![1], "only the missing one is copied");
        assert_eq!(p.apply, vec![0, 1]);
        assert!(p.ro_service);
        o.primary_ready = false;
        let p = plan(&o);
        assert!(p.create.is_empty(), "no copy before the primary is ready");
        assert!(p.apply.is_empty(), "replicas wait for the primary");
        assert!(p.delete_deployments.is_empty() && p.delete_stored.is_empty());
    }

    #[test]
    fn scaling_down_deletes_the_deployment_then_the_data() {
        let cur = tl("aaaa");
        let mut o = observed(&cur, 1);
        o.stored = vec![stored("aaaa", 0), stored("aaaa", 1)];
        o.deployments = vec![seen("aaaa", 0), seen("aaaa", 1)];
        let p = plan(&o);
        assert_eq!(p.delete_deployments, vec!["dev-aaaa-r1".to_string()]);
        assert!(
            p.delete_stored.is_empty(),
            "data stays while its Deployment is there"
        );
        o.deployments = vec![seen("aaaa", 0)];
        let p = plan(&o);
        assert_eq!(p.delete_stored, vec![(tl("aaaa"), 1)]);
        assert!(p.delete_deployments.is_empty());
    }

    #[test]
    fn zero_replicas_means_no_ro_service_and_nothing_kept() {
        let cur = tl("aaaa");
        let mut o = observed(&cur, 0);
        o.stored = vec![stored("aaaa", 0)];
        let p = plan(&o);
        assert!(!p.ro_service);
        assert_eq!(p.delete_stored, vec![(tl("aaaa"), 0)]);
        assert!(p.apply.is_empty() && p.create.is_empty());
    }

    #[test]
    fn suspended_keeps_data_and_scales_existing_deployments() {
        let cur = tl("aaaa");
        let mut o = observed(&cur, 2);
        o.running = false;
        o.stored = vec![stored("aaaa", 0)];
        o.deployments = vec![seen("aaaa", 0)];
        let p = plan(&o);
        assert!(p.create.is_empty());
        assert_eq!(p.apply, vec![0]);
        assert!(p.delete_stored.is_empty() && p.delete_deployments.is_empty());
    }

    #[test]
    fn a_new_timeline_replaces_the_old_ones_replicas() {
        let cur = tl("bbbb");
        let mut o = observed(&cur, 1);
        o.stored = vec![stored("aaaa", 0)];
        o.deployments = vec![seen("aaaa", 0)];
        let p = plan(&o);
        assert_eq!(p.delete_deployments, vec!["dev-aaaa-r0".to_string()]);
        assert_eq!(p.create, vec![0]);
        assert!(p.delete_stored.is_empty());
        o.deployments = vec![];
        assert_eq!(plan(&o).delete_stored, vec![(tl("aaaa"), 0)]);
    }

    #[test]
    fn another_branchs_replica_compute_blocks_its_data_directory() {
        let cur = tl("aaaa");
        let mut o = observed(&cur, 2);
        o.stored = vec![stored("aaaa", 0)];
        o.others = vec![("aaaa".into(), 0)];
        let p = plan(&o);
        assert_eq!(p.blocked, vec![0]);
        assert_eq!(
            p.apply,
            vec![1],
            "not run while another Deployment holds it"
        );
        assert_eq!(p.create, vec![1]);
        // Nor removed: a backup branch wanting none waits for ours to go.
        o.wanted = 0;
        let p = plan(&o);
        assert!(p.delete_stored.is_empty());
        o.others.clear();
        assert_eq!(plan(&o).delete_stored, vec![(tl("aaaa"), 0)]);
    }

    #[test]
    fn data_stays_while_a_pod_still_runs_on_it() {
        let cur = tl("aaaa");
        let mut o = observed(&cur, 0);
        o.stored = vec![stored("aaaa", 0)];
        o.pods = vec![("aaaa".into(), 0)];
        assert!(plan(&o).delete_stored.is_empty());
        o.pods.clear();
        assert_eq!(plan(&o).delete_stored, vec![(tl("aaaa"), 0)]);
    }

    #[test]
    fn ready_note() {
        let r = Report {
            wanted: 2,
            ready: 1,
            pending: false,
        };
        assert_eq!(r.note(), "; 1/2 read replicas ready");
        assert!(!r.settled());
        let none = Report {
            wanted: 0,
            ready: 0,
            pending: false,
        };
        assert_eq!(none.note(), "");
        assert!(none.settled());
    }
}
