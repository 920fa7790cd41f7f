//! What the Branch controller does for snapshots and restores, kept apart
//! from the main reconcile so its call sites stay few.
//!
//! * **`spec.fromSnapshot`**: a branch whose data is a copy of a Snapshot
//!   ([`snapshot_source`]); its SQL step logs in with the superuser password
//!   of the snapshot's branch (the one the copied data holds) and sets its
//!   own.
//! * **Adopting a timeline** (`pgbranch.dev/adopt-timeline: <id>`): a
//!   restore's backup branch takes over the target's old timeline instead of
//!   creating one ([`check_adoption`], then the controller's adoption).
//!   Honoured only on a backup branch the operator made: one labelled
//!   `pgbranch.dev/restore-backup-of: <restore>` whose SnapshotRestore's
//!   status names it as `backupBranch` of that timeline (its old
//!   `targetTimelineId`), or one that a Branch's `status.history` (written
//!   only by the operator) names as the `backupBranch` of that timeline.
//!   Anything else is Stalled `AdoptTimelineRefused`: a user cannot take
//!   another branch's data by writing an annotation.
//! * **Handing a compute over** (`pgbranch.dev/handover-to: <branch>`, set
//!   by a restore on its restored branch R when finalizing): R's controller
//!   stops managing it ([`handed_over`]); the target branch T, once its
//!   `status.timelineId` is R's timeline, adopts R's running Deployment
//!   ([`compute_for_timeline`]: computes are found by their
//!   `pgbranch.dev/timeline` label, not by name) instead of starting a second
//!   postgres on the same data directory, and points its Service at that
//!   Deployment's pods ([`service_for`]). A Deployment serving the timeline
//!   that belongs to a branch which has not handed it over makes the
//!   controller wait: two servers on one data directory corrupt it. An
//!   adopted Deployment keeps running as it was started (its name and pod
//!   template stay R's: the handover restarts nothing). It is stamped with
//!   a hash of T's `spec.compute` ([`ANNOTATION_ADOPTED_COMPUTE`]); once
//!   that changes (say `suspended: true`, new resources), the adopted
//!   Deployment is retired ([`retire_adopted`]: scaled to zero, its pods
//!   gone, deleted) and T runs its own Deployment with its own spec.
//! * **Cleanup** never deletes a timeline another Branch claims
//!   ([`claimed_elsewhere`]), so removing R after a handover leaves T's data.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::{progressing, Done};
use crate::api::{
    Branch, Snapshot, SnapshotRestore, ANNOTATION_ADOPTED_COMPUTE, ANNOTATION_ADOPT_TIMELINE,
    ANNOTATION_HANDOVER_TO, FIELD_MANAGER, LABEL_BRANCH, LABEL_RESTORE_BACKUP_OF, LABEL_ROLE,
    LABEL_TIMELINE,
};
use crate::controller::apply::{holder, Holder};
use crate::controller::{with_deadline, Context, Error};
use crate::storage::{SnapshotId, Source, TimelineId};

/// The hash an adopted Deployment is stamped with: the part of
/// `spec.compute` the primary's pod is made from (`readReplicas` only
/// changes the replicas: scaling them must not restart the primary).
fn compute_hash(branch: &Branch) -> String {
    let mut primary = branch.spec.compute.clone();
    primary.read_replicas = 0;
    crate::compute::content_hash(&primary)
}

/// Whether the branch's `spec.compute` changed since it adopted `d` (a
/// Deployment adopted before the stamp existed is stamped now instead).
pub(super) fn adopted_outdated(d: &Deployment, branch: &Branch) -> Option<bool> {
    d.annotations()
        .get(ANNOTATION_ADOPTED_COMPUTE)
        .map(|h| *h != compute_hash(branch))
}

/// Merge-patches a compute Deployment with the operator's field manager.
async fn patch_deployment(
    ctx: &Context,
    ns: &str,
    name: &str,
    what: &'static str,
    patch: serde_json::Value,
) -> Result<Deployment, Error> {
    let api: Api<Deployment> = ctx.api(ns);
    with_deadline(
        ctx,
        what,
        api.patch(
            name,
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &Patch::Merge(&patch),
        ),
    )
    .await
}

/// Stamps an adopted Deployment with the branch's current compute hash.
pub(super) async fn stamp_adopted(
    ctx: &Context,
    branch: &Branch,
    d: &Deployment,
) -> Result<Deployment, Error> {
    let patch =
        json!({"metadata": {"annotations": {ANNOTATION_ADOPTED_COMPUTE: compute_hash(branch)}}});
    patch_deployment(
        ctx,
        &branch.namespace().unwrap_or_default(),
        &d.name_any(),
        "stamp adopted compute",
        patch,
    )
    .await
}

/// Retires an adopted Deployment whose branch's compute spec changed: scale
/// it to zero, wait until none of its pods is left (two servers on one
/// data directory corrupt it), then delete it. `Waiting` until done.
pub(super) async fn retire_adopted(
    ctx: &Context,
    branch: &Branch,
    d: &Deployment,
    uid: &str,
) -> Result<(), Error> {
    let ns = branch.namespace().unwrap_or_default();
    let dname = d.name_any();
    if d.spec.as_ref().and_then(|s| s.replicas) != Some(0) {
        tracing::info!(deployment = %dname, "spec.compute changed: stopping the compute adopted from a restore");
        let patch = json!({"spec": {"replicas": 0}});
        patch_deployment(ctx, &ns, &dname, "stop adopted compute", patch).await?;
        return Err(Error::Waiting(format!(
            "stopping Deployment {dname} (adopted from a restore) to apply the new spec.compute"
        )));
    }
    if d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0) > 0 {
        return Err(Error::Waiting(format!(
            "waiting for Deployment {dname} (adopted from a restore) to stop"
        )));
    }
    let selector = d
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    if !selector.is_empty() {
        let left = ctx
            .list::<k8s_openapi::api::core::v1::Pod>(&ns, "list pods", &selector)
            .await?;
        if !left.is_empty() {
            return Err(Error::Waiting(format!(
                "waiting for {} pod(s) of Deployment {dname} to terminate",
                left.len()
            )));
        }
    }
    if crate::controller::apply::delete_owned::<Deployment>(ctx, &ns, &dname, uid).await? {
        Ok(())
    } else {
        Err(Error::Waiting(format!(
            "waiting for Deployment {dname} (adopted from a restore) to be deleted"
        )))
    }
}

fn annotation<'a>(b: &'a Branch, key: &str) -> Option<&'a str> {
    b.annotations().get(key).map(String::as_str)
}

/// The branch this one's compute and timeline are being handed to, if any.
pub fn handed_over(branch: &Branch) -> Option<&str> {
    annotation(branch, ANNOTATION_HANDOVER_TO)
}

/// Where a `fromSnapshot` branch's data comes from. `None`: not a
/// fromSnapshot branch; `Some(Err(done))`: wait (snapshot not ready yet).
pub(super) async fn snapshot_source(
    ctx: &Context,
    branch: &Branch,
) -> Result<Option<Result<Source, Done>>, Error> {
    let Some(name) = &branch.spec.from_snapshot else {
        return Ok(None);
    };
    let ns = branch.namespace().unwrap_or_default();
    let Some(snap) = ctx.get::<Snapshot>(&ns, "read snapshot", name).await? else {
        return Err(Error::stalled(
            "SnapshotNotFound",
            format!("snapshot {name:?} (spec.fromSnapshot) not found in namespace {ns}"),
        ));
    };
    let st = snap.status.unwrap_or_default();
    let Some(id) = st.snapshot_id.filter(|_| st.ready_to_use) else {
        return Ok(Some(Err(progressing(
            "WaitingForSnapshot",
            format!("waiting for snapshot {name} to be ready to use"),
            ctx.config.poll_interval,
        ))));
    };
    let snapshot = SnapshotId::new(id).map_err(|e| {
        Error::stalled(
            "SnapshotNotFound",
            format!("snapshot {name} has an invalid status.snapshotId: {e}"),
        )
    })?;
    Ok(Some(Ok(Source::Snapshot { snapshot })))
}

/// Checks that an adopt annotation was put there by the operator (see the
/// module doc), and waits while a restore's target still claims the
/// timeline (the restore moves the target off it next).
pub(super) async fn check_adoption(ctx: &Context, branch: &Branch, id: &str) -> Result<(), Error> {
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let refuse = |why: String| {
        Error::stalled(
            "AdoptTimelineRefused",
            format!("annotation {ANNOTATION_ADOPT_TIMELINE} is honoured only on a backup branch the operator made: {why}"),
        )
    };
    if let Some(restore) = branch.labels().get(LABEL_RESTORE_BACKUP_OF) {
        let Some(r) = ctx
            .get::<SnapshotRestore>(&ns, "read restore", restore)
            .await?
        else {
            return Err(refuse(format!("SnapshotRestore {restore} not found")));
        };
        let st = r.status.unwrap_or_default();
        if st.backup_branch.as_deref() != Some(name.as_str())
            || st.target_timeline_id.as_deref() != Some(id)
        {
            return Err(refuse(format!(
                "SnapshotRestore {restore} did not make this branch the backup of timeline {id}"
            )));
        }
        if let Some(target) = &r.spec.target {
            if let Some(t) = ctx.get::<Branch>(&ns, "read branch", target).await? {
                if t.status.as_ref().and_then(|s| s.timeline_id.as_deref()) == Some(id) {
                    return Err(Error::Waiting(format!(
                        "timeline {id} is still branch {target}'s; restore {restore} moves it next"
                    )));
                }
            }
        }
        return Ok(());
    }
    // Otherwise a Branch's status history (written only by the operator)
    // must name this branch as the backup of that timeline. A timeline
    // another Branch serves is reported by the adoption itself.
    let all = ctx.list::<Branch>(&ns, "list branches", "").await?;
    let served = all.iter().any(|b| {
        b.uid() != branch.uid()
            && b.status.as_ref().and_then(|s| s.timeline_id.as_deref()) == Some(id)
    });
    let recorded = all.iter().any(|b| {
        b.status.as_ref().is_some_and(|s| {
            s.history
                .iter()
                .any(|h| h.timeline_id == id && h.backup_branch.as_deref() == Some(name.as_str()))
        })
    });
    if served || recorded {
        Ok(())
    } else {
        Err(refuse(format!(
            "no {LABEL_RESTORE_BACKUP_OF} label, and no Branch's status.history names {name} as the backup of timeline {id}"
        )))
    }
}

/// The Deployment already serving `tl` that this branch must use instead of
/// building its own: `Some` for a Deployment handed over to this branch
/// (adopted here: owner reference and branch label move to this branch, the
/// pods keep running). `None`: no other Deployment serves the timeline, go
/// on as usual. Waits while another branch's Deployment still serves it.
pub(super) async fn compute_for_timeline(
    ctx: &Context,
    branch: &Branch,
    tl: &TimelineId,
    uid: &str,
) -> Result<Option<Deployment>, Error> {
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let own_name = crate::compute::deployment_name(&name, tl.as_str());
    let list = ctx
        .list::<Deployment>(&ns, "list computes", &format!("{LABEL_TIMELINE}={tl}"))
        .await?;
    for d in list {
        // Read replicas follow a primary; they are never the compute.
        if d.labels().get(LABEL_ROLE).map(String::as_str) == Some("replica") {
            continue;
        }
        let dname = d.name_any();
        let h = holder(&d, uid);
        if h == Holder::Owner {
            if dname == own_name {
                // Our own: the normal path keeps it applied.
                continue;
            }
            // Adopted earlier.
            return Ok(Some(d));
        }
        let owner = d
            .owner_references()
            .iter()
            .find(|o| o.controller == Some(true) && o.kind == "Branch")
            .map(|o| o.name.clone());
        let owner_branch = match &owner {
            Some(o) => ctx.get::<Branch>(&ns, "read branch", o).await?,
            None => None,
        };
        let handed = owner_branch
            .as_ref()
            .and_then(|b| handed_over(b))
            .is_some_and(|to| to == name);
        if !handed {
            if h == Holder::Nobody && dname == own_name {
                // Ours by name and nobody else's: the normal path adopts it.
                continue;
            }
            return Err(Error::Waiting(format!(
                "timeline {tl} is still served by Deployment {dname}{}; waiting for it to stop",
                owner.map(|o| format!(" of branch {o}")).unwrap_or_default()
            )));
        }
        let oref = branch
            .controller_owner_ref(&())
            .ok_or_else(|| Error::stalled("InvalidObject", "the Branch has no UID"))?;
        tracing::info!(deployment = %dname, timeline = %tl, "adopting the compute handed over by a restore");
        let patch = json!({
            "metadata": {
                "ownerReferences": [oref],
                "labels": { LABEL_BRANCH: name },
                "annotations": { ANNOTATION_ADOPTED_COMPUTE: compute_hash(branch) },
            }
        });
        let live = patch_deployment(ctx, &ns, &dname, "adopt compute", patch).await?;
        return Ok(Some(live));
    }
    Ok(None)
}

/// The branch's Service, selecting the pods of an adopted Deployment when
/// it serves `timeline` (their pod labels are the handing branch's).
pub(super) fn service_for(
    mut svc: Service,
    adopted: Option<&Deployment>,
    timeline: &str,
) -> Service {
    let Some(d) = adopted else { return svc };
    let tl = d.labels().get(LABEL_TIMELINE).map(String::as_str);
    if tl != Some(timeline) {
        return svc;
    }
    let sel = d
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone());
    if let (Some(spec), Some(sel)) = (svc.spec.as_mut(), sel) {
        spec.selector = Some(sel);
    }
    svc
}

/// Gives the pods of an adopted Deployment the adopting branch's name in
/// their `pgbranch.dev/branch` label (they were started under the restored
/// branch's), so `kubectl get pods -l pgbranch.dev/branch=<branch>` finds
/// the branch's compute. A label change restarts nothing. Only for a
/// Deployment whose selector does not name the branch: relabelling the pod
/// of one that does would take it from its ReplicaSet.
pub(super) async fn relabel_adopted_pods(
    ctx: &Context,
    branch: &Branch,
    d: &Deployment,
) -> Result<(), Error> {
    let Some(sel) = d
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
    else {
        return Ok(());
    };
    if sel.contains_key(LABEL_BRANCH) || sel.is_empty() {
        return Ok(());
    }
    let name = branch.name_any();
    let ns = branch.namespace().unwrap_or_default();
    let selector = sel
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = ctx.api(&ns);
    let list = ctx.list::<Pod>(&ns, "list compute pods", &selector).await?;
    for p in list {
        if p.labels().get(LABEL_BRANCH) == Some(&name) || p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        tracing::info!(pod = %p.name_any(), "labelling an adopted compute pod with its branch");
        let patch = json!({"metadata": {"labels": {LABEL_BRANCH: name}}});
        match with_deadline(
            ctx,
            "label compute pod",
            pods.patch(
                &p.name_any(),
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &Patch::Merge(&patch),
            ),
        )
        .await
        {
            Ok(_) => {}
            // Gone meanwhile: nothing to label.
            Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether a Branch other than `uid` has `tl` as its current timeline.
pub(super) fn claimed_elsewhere(all: &[Branch], uid: &str, tl: &TimelineId) -> bool {
    all.iter().any(|b| {
        b.uid().as_deref() != Some(uid)
            && b.status.as_ref().and_then(|s| s.timeline_id.as_deref()) == Some(tl.as_str())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_replicas_does_not_outdate_an_adopted_primary() {
        let mut b = Branch::new("prod", Default::default());
        let before = compute_hash(&b);
        b.spec.compute.read_replicas = 2;
        assert_eq!(compute_hash(&b), before, "readReplicas restarts no primary");
        b.spec.compute.suspended = true;
        assert_ne!(compute_hash(&b), before);
    }
}
