//! Finalizing: the six steps that move the target onto the restored data,
//! each recorded in `status.finalizeStep` as it completes, so a restarted
//! operator resumes at the next one. One function per step; what a step
//! decides from what it read is a pure function below, unit-tested.
//!
//! 1. [`passwords`]: the restored branch is marked as handing over to the
//!    target, and its database gets the target's passwords.
//! 2. [`backup`]: the backup branch takes over the target's old timeline.
//! 3. [`target`]: the target's `status.timelineId` moves to the restored
//!    timeline (with a history entry) and its Service's selector follows,
//!    in one patch.
//! 4. [`compute`]: waits until the target's controller has adopted the
//!    restored compute and stopped the old one.
//! 5. [`children`]: children of the old timeline now descend from the
//!    backup branch (by status).
//! 6. [`cleanup`]: the restored branch goes; its timeline and compute stay
//!    the target's.

use super::*;

/// What every step works on, read and checked once per pass.
struct Finalize {
    /// The target, re-read: still the one resolved at the start.
    target: Branch,
    tname: String,
    rname: String,
    bname: String,
    target_uid: String,
    /// The target's old timeline and the restored one.
    t_old: TimelineId,
    t_new: TimelineId,
    /// The target's Service as it is now.
    live_svc: Option<Service>,
}

fn last_step(st: &SnapshotRestoreStatus) -> Option<FinalizeStep> {
    st.finalize_step.as_deref().and_then(FinalizeStep::parse)
}

/// The steps still to do after `last` (all of them when none is done).
fn steps_after(last: Option<FinalizeStep>) -> impl Iterator<Item = FinalizeStep> {
    FinalizeStep::ALL
        .into_iter()
        .filter(move |s| last.is_none_or(|l| *s > l))
}

/// Whether the target sits where a finalize that did `last` expects it:
/// on the restored timeline, or — before step 3 — still on its old one.
fn target_where_expected(
    current: Option<&str>,
    t_old: &str,
    t_new: &str,
    last: Option<FinalizeStep>,
) -> bool {
    let target_done = last.is_some_and(|l| l >= FinalizeStep::Target);
    current == Some(t_new) || (!target_done && current == Some(t_old))
}

/// The merge patch of a Service's selector that makes it select exactly
/// `want` (keys of `old` that `want` lacks are removed).
fn selector_patch(
    want: &BTreeMap<String, String>,
    old: Option<&BTreeMap<String, String>>,
) -> serde_json::Map<String, Value> {
    let mut patch: serde_json::Map<String, Value> = want
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    for k in old.into_iter().flat_map(|o| o.keys()) {
        patch.entry(k.clone()).or_insert(Value::Null);
    }
    patch
}

/// Whether the target's controller has taken the compute over: its
/// Service selects the restored timeline, no compute of its own runs on
/// the old one, and (when it runs a compute) it owns one on the new one.
fn compute_handed_over(
    svc_timeline: Option<&str>,
    t_new: &str,
    old_compute_of_target: bool,
    target_runs: bool,
    owns_new_compute: bool,
) -> bool {
    svc_timeline == Some(t_new) && !old_compute_of_target && (!target_runs || owns_new_compute)
}

/// Records a finished step; honours the fail point.
async fn step_done(
    run: &mut Run<'_>,
    st: &mut SnapshotRestoreStatus,
    step: FinalizeStep,
) -> Result<(), Error> {
    st.finalize_step = Some(step.as_str().into());
    st.progress = Some(format!("finalize step {} done", step.as_str()));
    run.save(st).await?;
    tracing::info!(step = step.as_str(), "finalize step done");
    run.event(
        EventType::Normal,
        "FinalizeStep",
        &format!("finalize step {} done", step.as_str()),
    )
    .await;
    if let Some(fp) = &run.ctx.config.restore_fail_point {
        if fp.after_step == step {
            tracing::warn!(
                step = step.as_str(),
                "fail point reached: stopping the operator"
            );
            fp.crash.cancel();
            return Err(Error::Waiting(format!(
                "fail point after {}",
                step.as_str()
            )));
        }
    }
    Ok(())
}

/// Reads the target and checks it is still the one the restore resolved,
/// where the finalize expects it.
async fn observe(run: &Run<'_>, st: &SnapshotRestoreStatus) -> Result<Finalize, Error> {
    let ctx = run.ctx;
    let bad = |what: &str| {
        Error::stalled(
            "InvalidStatus",
            format!("status.{what} is missing or invalid"),
        )
    };
    let t_new = st
        .restored_timeline_id
        .clone()
        .and_then(|t| TimelineId::new(t).ok())
        .ok_or_else(|| bad("restoredTimelineId"))?;
    let t_old = st
        .target_timeline_id
        .clone()
        .and_then(|t| TimelineId::new(t).ok())
        .ok_or_else(|| bad("targetTimelineId"))?;
    let target_uid = st.target_uid.clone().ok_or_else(|| bad("targetUid"))?;
    let tname = run.r.spec.target.clone().unwrap_or_default();
    let target = match with_deadline(
        ctx,
        "read target",
        branch_api(ctx, &run.ns).get_opt(&tname),
    )
    .await?
    {
        Some(t) if t.uid().as_deref() == Some(target_uid.as_str()) => t,
        Some(_) => {
            return Err(Error::stalled(
                "TargetChanged",
                format!("branch {tname} was deleted and created again since the restore started; nothing was replaced"),
            ))
        }
        None => {
            return Err(Error::stalled(
                "TargetChanged",
                format!("branch {tname} was deleted since the restore started; nothing was replaced"),
            ))
        }
    };
    let current = target.status.as_ref().and_then(|s| s.timeline_id.clone());
    if !target_where_expected(
        current.as_deref(),
        t_old.as_str(),
        t_new.as_str(),
        last_step(st),
    ) {
        return Err(Error::stalled(
            "TargetChanged",
            format!(
                "branch {tname} moved to timeline {} since the restore started (it was on {t_old}); nothing was replaced",
                current.unwrap_or_default()
            ),
        ));
    }
    let live_svc = ctx
        .get::<Service>(&run.ns, "read service", &service_name(&tname))
        .await?;
    if last_step(st).is_none_or(|l| l < FinalizeStep::Target) {
        check_service_owned(live_svc.as_ref(), &target, &target_uid)?;
    }
    Ok(Finalize {
        target,
        tname,
        rname: st.restored_branch.clone().unwrap_or_default(),
        bname: st.backup_branch.clone().unwrap_or_default(),
        target_uid,
        t_old,
        t_new,
        live_svc,
    })
}

pub(super) async fn finalizing(
    run: &mut Run<'_>,
    st: &mut SnapshotRestoreStatus,
) -> Result<Done, Error> {
    let f = observe(run, st).await?;
    for step in steps_after(last_step(st)).collect::<Vec<_>>() {
        let waiting = match step {
            FinalizeStep::Passwords => passwords(run, &f).await?,
            FinalizeStep::Backup => backup(run, &f).await?,
            FinalizeStep::Target => target(run, &f).await?,
            FinalizeStep::Compute => compute(run, &f).await?,
            FinalizeStep::Children => children(run, &f).await?,
            FinalizeStep::Cleanup => cleanup(run, &f).await?,
        };
        if let Some((progress, done)) = waiting {
            st.progress = Some(progress);
            return Ok(done);
        }
        step_done(run, st, step).await?;
    }
    st.phase = Some(RestorePhase::Completed);
    let now = jiff::Timestamp::now();
    st.completed_at = Some(now.to_string());
    if let Some(started) = st.started_at.as_deref().and_then(crate::point::read_time) {
        run.ctx
            .metrics
            .operation_done("restore", now.duration_since(started).unsigned_abs());
    }
    st.progress = None;
    Ok(Done {
        outcome: Outcome::ready("Completed", completed_message(run.r, st)),
        requeue: Action::await_change(),
    })
}

/// A step that is not done yet: the progress to record and the pass's end.
type Pending = Option<(String, Done)>;

/// Polls a waiting step again shortly.
fn wait_step(run: &Run<'_>, progress: String, message: String) -> Pending {
    Some((
        progress,
        waiting(
            "Finalizing",
            message,
            Duration::from_millis(500).min(run.ctx.config.poll_interval),
        ),
    ))
}

/// The restored branch, if it is still there.
async fn restored_branch(run: &Run<'_>, f: &Finalize) -> Result<Option<Branch>, Error> {
    run.ctx.get(&run.ns, "read restored branch", &f.rname).await
}

/// 1. The restored branch hands over to the target; its database takes the
///    target's passwords.
async fn passwords(run: &Run<'_>, f: &Finalize) -> Result<Pending, Error> {
    let ctx = run.ctx;
    let branches = branch_api(ctx, &run.ns);
    let Some(rb) = restored_branch(run, f).await? else {
        return Err(Error::stalled(
            "RestoredBranchFailed",
            format!("the restored branch {} is gone", f.rname),
        ));
    };
    if rb.annotations().get(ANNOTATION_HANDOVER_TO) != Some(&f.tname) {
        let patch = json!({"metadata": {"annotations": {ANNOTATION_HANDOVER_TO: f.tname}}});
        with_deadline(
            ctx,
            "mark restored branch",
            branches.patch(&f.rname, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await?;
    }
    set_target_passwords(run, &f.target, &f.rname).await?;
    Ok(None)
}

/// 2. The backup branch takes over the target's old timeline.
async fn backup(run: &Run<'_>, f: &Finalize) -> Result<Pending, Error> {
    create_backup(run, &f.target, &f.bname).await?;
    Ok(None)
}

/// 3. The target points at the restored timeline; its Service follows.
async fn target(run: &Run<'_>, f: &Finalize) -> Result<Pending, Error> {
    let ctx = run.ctx;
    check_service_owned(f.live_svc.as_ref(), &f.target, &f.target_uid)?;
    if f.target
        .status
        .as_ref()
        .and_then(|s| s.timeline_id.as_deref())
        != Some(f.t_new.as_str())
    {
        let mut history = f.target.status.clone().unwrap_or_default().history;
        history.insert(
            0,
            TimelineHistoryEntry {
                timeline_id: f.t_old.to_string(),
                replaced_by: run.name.clone(),
                replaced_at: jiff::Timestamp::now().to_string(),
                backup_branch: Some(f.bname.clone()),
            },
        );
        history.truncate(HISTORY_LEN);
        let fields = json!({"timelineId": f.t_new.to_string(), "history": history});
        tracing::info!(target = %f.tname, from = %f.t_old, to = %f.t_new, "moving the target to the restored timeline");
        status::patch_status(
            ctx,
            &f.target,
            "move target",
            fields,
            Guard::ResourceVersion,
        )
        .await?;
    }
    // The selector of the Deployment that serves t_new, in one patch.
    let list = ctx
        .list::<Deployment>(
            &run.ns,
            "list computes",
            &format!(
                // Read replicas follow a primary: never the compute.
                "{LABEL_TIMELINE}={},{LABEL_ROLE}!=replica",
                f.t_new
            ),
        )
        .await?;
    let sel = list
        .iter()
        .find(|d| d.metadata.deletion_timestamp.is_none())
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.selector.match_labels.clone());
    if let (Some(sel), Some(svc)) = (sel, f.live_svc.as_ref()) {
        let want = selector_patch(&sel, svc.spec.as_ref().and_then(|s| s.selector.as_ref()));
        let services: Api<Service> = ctx.api(&run.ns);
        with_deadline(
            ctx,
            "retarget service",
            services.patch(
                &service_name(&f.tname),
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &Patch::Merge(&json!({"spec": {"selector": want}})),
            ),
        )
        .await?;
    }
    Ok(None)
}

/// 4. The target's controller adopts the compute and stops the old one.
async fn compute(run: &Run<'_>, f: &Finalize) -> Result<Pending, Error> {
    let ctx = run.ctx;
    let deploys: Api<Deployment> = ctx.api(&run.ns);
    let svc = ctx
        .get::<Service>(&run.ns, "read service", &service_name(&f.tname))
        .await?;
    // Read replicas follow a primary: never the compute.
    let primaries = |tl: &TimelineId| {
        ListParams::default().labels(&format!("{LABEL_TIMELINE}={tl},{LABEL_ROLE}!=replica"))
    };
    let old = with_deadline(ctx, "list computes", deploys.list(&primaries(&f.t_old))).await?;
    let new = with_deadline(ctx, "list computes", deploys.list(&primaries(&f.t_new))).await?;
    let runs = f.target.spec.compute.enabled && !f.target.spec.compute.suspended;
    // A target without compute has no Service: it selects nothing to move.
    let svc_timeline = match svc.as_ref() {
        Some(s) => svc_selector_timeline(s),
        None if !f.target.spec.compute.enabled => Some(f.t_new.to_string()),
        None => None,
    };
    if compute_handed_over(
        svc_timeline.as_deref(),
        f.t_new.as_str(),
        old.items
            .iter()
            .any(|d| d.labels().get(LABEL_BRANCH) == Some(&f.tname)),
        runs,
        new.items
            .iter()
            .any(|d| holder(d, &f.target_uid) == Holder::Owner),
    ) {
        return Ok(None);
    }
    Ok(wait_step(
        run,
        format!(
            "waiting for branch {} to take over the compute of timeline {} and stop the one of {}",
            f.tname, f.t_new, f.t_old
        ),
        format!(
            "handing the compute of timeline {} to branch {}",
            f.t_new, f.tname
        ),
    ))
}

/// 5. Children of the old timeline now descend from the backup branch.
async fn children(run: &Run<'_>, f: &Finalize) -> Result<Pending, Error> {
    reparent_children(run, &f.tname, &f.rname, &f.bname, &f.t_old).await?;
    Ok(None)
}

/// 6. The restored branch goes (its timeline and compute stay the target's).
async fn cleanup(run: &Run<'_>, f: &Finalize) -> Result<Pending, Error> {
    let ctx = run.ctx;
    let branches = branch_api(ctx, &run.ns);
    let Some(rb) = restored_branch(run, f).await? else {
        return Ok(None);
    };
    if rb.labels().get(LABEL_RESTORE) != Some(&run.name) {
        return Ok(None);
    }
    if rb.metadata.deletion_timestamp.is_none() {
        with_deadline(
            ctx,
            "delete restored branch",
            branches.delete(&f.rname, &DeleteParams::background()),
        )
        .await?;
    }
    let what = format!("removing the restored branch {}", f.rname);
    Ok(wait_step(run, what.clone(), what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finalize_resumes_after_its_last_recorded_step() {
        assert_eq!(steps_after(None).count(), 6);
        let rest: Vec<_> = steps_after(Some(FinalizeStep::Target)).collect();
        assert_eq!(
            rest,
            vec![
                FinalizeStep::Compute,
                FinalizeStep::Children,
                FinalizeStep::Cleanup
            ]
        );
        assert_eq!(steps_after(Some(FinalizeStep::Cleanup)).count(), 0);
    }

    #[test]
    fn the_target_may_be_on_its_old_timeline_only_before_step_3() {
        let (old, new) = ("aaaa", "bbbb");
        assert!(target_where_expected(Some(old), old, new, None));
        assert!(target_where_expected(
            Some(old),
            old,
            new,
            Some(FinalizeStep::Backup)
        ));
        assert!(!target_where_expected(
            Some(old),
            old,
            new,
            Some(FinalizeStep::Target)
        ));
        // Moved by the operator before it recorded step 3: fine.
        assert!(target_where_expected(
            Some(new),
            old,
            new,
            Some(FinalizeStep::Backup)
        ));
        // Moved elsewhere (another restore): the target changed.
        assert!(!target_where_expected(Some("cccc"), old, new, None));
        assert!(!target_where_expected(None, old, new, None));
    }

    #[test]
    fn the_service_selects_exactly_the_new_computes_labels() {
        let want = BTreeMap::from([
            ("pgbranch.dev/timeline".to_string(), "bbbb".to_string()),
            ("pgbranch.dev/role".to_string(), "primary".to_string()),
        ]);
        let old = BTreeMap::from([
            ("pgbranch.dev/timeline".to_string(), "aaaa".to_string()),
            ("pgbranch.dev/branch".to_string(), "prod".to_string()),
        ]);
        let p = selector_patch(&want, Some(&old));
        assert_eq!(p["pgbranch.dev/timeline"], "bbbb");
        assert_eq!(p["pgbranch.dev/role"], "primary");
        assert_eq!(p["pgbranch.dev/branch"], Value::Null, "removed");
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn the_compute_is_handed_over_once_the_target_serves_the_new_timeline_alone() {
        let ok = |svc, old, runs, owns| compute_handed_over(svc, "bbbb", old, runs, owns);
        assert!(ok(Some("bbbb"), false, true, true));
        assert!(
            !ok(Some("aaaa"), false, true, true),
            "Service not moved yet"
        );
        assert!(
            !ok(Some("bbbb"), true, true, true),
            "old compute still runs"
        );
        assert!(!ok(Some("bbbb"), false, true, false), "not adopted yet");
        assert!(
            ok(Some("bbbb"), false, false, false),
            "a suspended target adopts nothing"
        );
    }
}
