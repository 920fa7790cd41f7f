//! Scheduled refresh of a Branch from its parent (`spec.refresh`).
//!
//! Its own small controller over Branches (so a refresh problem never
//! blocks the Branch's own reconcile). At each slot of `spec.refresh.schedule`
//! (cron in `timeZone`, the same planning as SnapshotSchedules: see
//! [`crate::controller::scheduling`]) it creates one `SnapshotRestore`:
//! source the parent at its head, target this branch, `finalize: true`,
//! named `<branch>-refresh-<yyyymmddhhmm>` of the slot (a retry finds it),
//! owned by the branch and labelled `pgbranch.dev/refresh-of: <branch>`.
//! The SnapshotRestore controller does the rest; the connection string and
//! credentials do not change.
//!
//! * A slot runs only once announced: `status.nextRefreshTime` is written
//!   first, and a run happens when the clock passes it. Turning refresh on
//!   (or resuming it) therefore never refreshes at once — it waits for the
//!   next slot; after operator downtime the missed slots make (at most) one
//!   catch-up run, the latest.
//! * Never while another operation on the branch is under way (a
//!   SnapshotRestore targeting or reading it that has not completed or
//!   failed, a Snapshot of it being taken), nor while the branch or its
//!   parent is not Ready: the slot is skipped (Warning event
//!   `RefreshSkipped`) and the refresh waits for the next slot.
//! * `preserve: true` names the backup of the pre-refresh data
//!   `<branch>-old-<yyyymmddhhmmss>` of the slot (`preserveUnderName`). The
//!   restore controller always keeps a backup branch; with `preserve: false`
//!   (the default) this controller deletes that backup branch once the
//!   restore has completed — unless other branches now descend from it
//!   (their `status.parentBranch`), in which case it is kept and said so.
//! * Finished refresh restores beyond the newest [`KEEP_FINISHED`] are
//!   deleted (deleting a completed restore undoes nothing).
//!
//! Status: `lastRefreshTime` (the slot of the last refresh started) and
//! `nextRefreshTime` (absent while suspended or when the schedule is
//! invalid: the Branch is then `Stalled` with reason
//! `InvalidRefreshSchedule`, and a Warning event says why).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::api::{
    backup_branch_name, Branch, RestorePhase, RestoreSource, Snapshot, SnapshotRestore,
    SnapshotRestoreSpec, ANNOTATION_BACKUP_HANDLED, ANNOTATION_PRESERVE, ANNOTATION_SCHEDULED_AT,
    FIELD_MANAGER, LABEL_REFRESH_OF, LABEL_RESTORE_BACKUP_OF, MAX_BRANCH_NAME_LEN, READY, STALLED,
};
use crate::controller::apply::{holder, Holder};
use crate::controller::scheduling::{self as plan, Cadence};
use crate::controller::status::{self, Guard};
use crate::controller::{with_deadline, Context, Drive, Error, Shutdown};

/// Finished refresh restores kept per branch (for `kubectl get`).
pub const KEEP_FINISHED: usize = 3;

/// The name of the SnapshotRestore of the refresh of `branch` at `slot`
/// (a valid Branch name: the restore's preview branch takes it).
pub fn refresh_name(branch: &str, slot: jiff::Timestamp) -> String {
    plan::run_name_max(branch, "-refresh", slot, MAX_BRANCH_NAME_LEN)
}

/// The refresh controller on the operator's shared watch of Branches
/// (`branches`), as a future that runs it until `shutdown` resolves.
pub fn run(
    ctx: Arc<Context>,
    shutdown: impl Shutdown,
    branches: &crate::controller::Shared<Branch>,
) -> impl std::future::Future<Output = ()> {
    let controller = crate::controller::controller_for_shared(branches, &ctx.config).owns(
        ctx.watched::<SnapshotRestore>(),
        watcher::Config::default().labels(LABEL_REFRESH_OF),
    );
    let how = Drive {
        kind: "Branch",
        controller: "refresh",
        primary: false,
    };
    crate::controller::drive(controller, ctx, shutdown, how, reconcile)
}

fn phase_done(r: &SnapshotRestore) -> bool {
    matches!(
        r.status.as_ref().and_then(|s| s.phase),
        Some(RestorePhase::Completed | RestorePhase::Failed)
    )
}

fn is_ready(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == READY && c.status == "True")
}

async fn publish(ctx: &Context, branch: &Branch, type_: EventType, reason: &str, note: String) {
    status::publish(ctx, branch, type_, reason, "Refresh", &note).await;
}

async fn reconcile(branch: Arc<Branch>, ctx: Arc<Context>) -> Result<Action, Error> {
    if branch.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    reconcile_refresh(&branch, &ctx).await
}

/// What keeps a refresh from running now, if anything.
async fn blocker(
    ctx: &Context,
    branch: &Branch,
    parent: &str,
    restores: &[SnapshotRestore],
) -> Result<Option<String>, Error> {
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    if !is_ready(&branch.status.clone().unwrap_or_default().conditions) {
        return Ok(Some(format!("branch {name} is not Ready")));
    }
    match ctx.get::<Branch>(&ns, "read parent", parent).await? {
        None => return Ok(Some(format!("the parent branch {parent} does not exist"))),
        Some(p) if !is_ready(&p.status.clone().unwrap_or_default().conditions) => {
            return Ok(Some(format!("the parent branch {parent} is not Ready")))
        }
        Some(_) => {}
    }
    let list = ctx.list::<Snapshot>(&ns, "list snapshots", "").await?;
    Ok(operation_under_way(&name, restores, &list))
}

/// Another operation on branch `name`, if one is under way: a
/// SnapshotRestore that targets it or reads it and has neither completed
/// nor failed (pending, restoring, awaiting finalize or finalizing), or a
/// Snapshot of it that is neither ready nor stalled.
pub fn operation_under_way(
    name: &str,
    restores: &[SnapshotRestore],
    snapshots: &[Snapshot],
) -> Option<String> {
    let busy_restore = restores.iter().find(|r| {
        !phase_done(r)
            && r.meta().deletion_timestamp.is_none()
            && (r.spec.target.as_deref() == Some(name)
                || r.spec.source.branch.as_deref() == Some(name))
    });
    if let Some(r) = busy_restore {
        return Some(format!(
            "SnapshotRestore {} on this branch is under way",
            r.name_any()
        ));
    }
    let busy_snap = snapshots.iter().find(|s| {
        s.spec.branch == name
            && s.meta().deletion_timestamp.is_none()
            && s.status.as_ref().is_none_or(|st| {
                !st.ready_to_use
                    && !st
                        .conditions
                        .iter()
                        .any(|c| c.type_ == STALLED && c.status == "True")
            })
    });
    busy_snap.map(|s| format!("Snapshot {} of this branch is being taken", s.name_any()))
}

async fn create_refresh(
    ctx: &Context,
    branch: &Branch,
    parent: &str,
    slot: jiff::Timestamp,
    preserve: bool,
) -> Result<SnapshotRestore, Error> {
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let owner = branch
        .controller_owner_ref(&())
        .ok_or_else(|| Error::Waiting("the branch has no uid yet".into()))?;
    let rname = refresh_name(&name, slot);
    let restore = SnapshotRestore {
        metadata: ObjectMeta {
            name: Some(rname.clone()),
            namespace: Some(ns.clone()),
            labels: Some(BTreeMap::from([(
                LABEL_REFRESH_OF.to_string(),
                plan::label_value(&name),
            )])),
            annotations: Some(BTreeMap::from([
                (ANNOTATION_SCHEDULED_AT.to_string(), plan::rfc3339(slot)),
                (ANNOTATION_PRESERVE.to_string(), preserve.to_string()),
            ])),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: SnapshotRestoreSpec {
            source: RestoreSource {
                branch: Some(parent.to_string()),
                ..Default::default()
            },
            target: Some(name.clone()),
            finalize: true,
            preserve_under_name: preserve.then(|| backup_branch_name(&name, slot)),
        },
        status: None,
    };
    match ctx.create(&ns, "create restore", &restore).await {
        Ok(r) => {
            tracing::info!(restore = %rname, slot = %plan::rfc3339(slot), "refresh started");
            publish(
                ctx,
                branch,
                EventType::Normal,
                "RefreshStarted",
                format!(
                    "refreshing from {parent} (the run of {}): SnapshotRestore {rname}",
                    plan::rfc3339(slot)
                ),
            )
            .await;
            Ok(r)
        }
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 409 => ctx
            .get::<SnapshotRestore>(&ns, "read restore", &rname)
            .await?
            .ok_or_else(|| Error::Waiting(format!("SnapshotRestore {rname} is being replaced"))),
        Err(e) => Err(e),
    }
}

/// With `preserve: false`: deletes the backup branch a completed refresh
/// left, unless branches descend from it. Returns whether nothing is left
/// to do for this restore.
async fn drop_backup(ctx: &Context, branch: &Branch, r: &SnapshotRestore) -> Result<bool, Error> {
    let preserve = r
        .annotations()
        .get(ANNOTATION_PRESERVE)
        .is_none_or(|v| v != "false");
    let completed = matches!(
        r.status.as_ref().and_then(|s| s.phase),
        Some(RestorePhase::Completed)
    );
    let handled = r.annotations().contains_key(ANNOTATION_BACKUP_HANDLED);
    if preserve || !completed || handled {
        return Ok(true);
    }
    let Some(backup) = r.status.as_ref().and_then(|s| s.backup_branch.clone()) else {
        return Ok(true);
    };
    let ns = branch.namespace().unwrap_or_default();
    let branches: Api<Branch> = ctx.api(&ns);
    let Some(b) = ctx.get::<Branch>(&ns, "read backup", &backup).await? else {
        mark_handled(ctx, r, "deleted").await?;
        return Ok(true);
    };
    let made_by_it = b.labels().get(LABEL_RESTORE_BACKUP_OF) == Some(&r.name_any());
    if !made_by_it {
        mark_handled(ctx, r, "kept").await?;
        return Ok(true);
    }
    if b.meta().deletion_timestamp.is_some() {
        return Ok(false);
    }
    let all = ctx.list::<Branch>(&ns, "list branches", "").await?;
    let dependants: Vec<String> = all
        .iter()
        .filter(|c| {
            c.spec.parent.as_ref().is_some_and(|p| p.branch == backup)
                || c.status.as_ref().and_then(|s| s.parent_branch.as_deref())
                    == Some(backup.as_str())
        })
        .map(|c| c.name_any())
        .collect();
    if !dependants.is_empty() {
        publish(
            ctx,
            branch,
            EventType::Warning,
            "RefreshBackupKept",
            format!(
                "kept backup branch {backup} of refresh {} although preserve is false: branches {} descend from it",
                r.name_any(),
                dependants.join(", ")
            ),
        )
        .await;
        mark_handled(ctx, r, "kept").await?;
        return Ok(true);
    }
    tracing::info!(backup = %backup, "deleting the pre-refresh backup (preserve is false)");
    match with_deadline(
        ctx,
        "delete backup",
        branches.delete(&backup, &DeleteParams::background()),
    )
    .await
    {
        Ok(_) => {}
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => return Ok(true),
        Err(e) => return Err(e),
    }
    publish(
        ctx,
        branch,
        EventType::Normal,
        "RefreshBackupDeleted",
        format!(
            "deleted backup branch {backup} of refresh {} (preserve is false)",
            r.name_any()
        ),
    )
    .await;
    Ok(false)
}

/// Records on a refresh's SnapshotRestore that its backup was dealt with.
async fn mark_handled(ctx: &Context, r: &SnapshotRestore, how: &str) -> Result<(), Error> {
    let api: Api<SnapshotRestore> = ctx.api(&r.namespace().unwrap_or_default());
    let patch = json!({"metadata": {"annotations": {ANNOTATION_BACKUP_HANDLED: how}}});
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match with_deadline(
        ctx,
        "annotate restore",
        api.patch(&r.name_any(), &params, &Patch::Merge(&patch)),
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn reconcile_refresh(branch: &Branch, ctx: &Context) -> Result<Action, Error> {
    let now = ctx.clock.now();
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let uid = branch.uid().unwrap_or_default();
    let status = branch.status.clone().unwrap_or_default();
    // A branch that never had a refresh (no schedule, none announced, none
    // run) has no refresh restore to run or clean up: nothing to ask the
    // apiserver. Most branches are such; listing the namespace's restores
    // for each of them on every change (and again every ready_requeue) was
    // an eighth of the operator's requests at 10,000 Branches.
    if branch.spec.refresh.is_none()
        && status.last_refresh_time.is_none()
        && status.next_refresh_time.is_none()
    {
        return Ok(Action::await_change());
    }
    let restore_api: Api<SnapshotRestore> = ctx.api(&ns);
    let all_restores = ctx
        .list::<SnapshotRestore>(&ns, "list restores", "")
        .await?;
    let mut ours: Vec<&SnapshotRestore> = all_restores
        .iter()
        .filter(|r| r.labels().contains_key(LABEL_REFRESH_OF) && holder(*r, &uid) == Holder::Owner)
        .collect();

    // Finished refreshes: drop unwanted backups, keep the newest few.
    ours.sort_by_key(|r| {
        std::cmp::Reverse(
            r.annotations()
                .get(ANNOTATION_SCHEDULED_AT)
                .cloned()
                .unwrap_or_default(),
        )
    });
    let mut finished = 0;
    for r in &ours {
        if !phase_done(r) || r.meta().deletion_timestamp.is_some() {
            continue;
        }
        let settled = drop_backup(ctx, branch, r).await?;
        finished += 1;
        if finished > KEEP_FINISHED && settled {
            match with_deadline(
                ctx,
                "delete restore",
                restore_api.delete(&r.name_any(), &DeleteParams::background()),
            )
            .await
            {
                Ok(_) => {}
                Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }

    let mut last = status.last_refresh_time.clone();
    let mut next = None;
    let mut wait = ctx.config.ready_requeue;
    if let (Some(refresh), Some(parent)) = (&branch.spec.refresh, &branch.spec.parent) {
        match Cadence::cron(&refresh.schedule, refresh.time_zone.as_deref()) {
            // The Branch's own validation stalls it with the reason (and
            // its transition Event): nothing runs until it is fixed.
            Err(_) => {}
            Ok(_) if refresh.suspend => {}
            Ok(cadence) => {
                let announced = status
                    .next_refresh_time
                    .as_deref()
                    .and_then(crate::point::read_time);
                let slot = cadence.latest_at_or_before(now);
                if let (Some(a), Some(s)) = (announced, slot) {
                    let already = last.as_deref().and_then(crate::point::read_time) >= Some(s);
                    if a <= now && s >= a && !already {
                        let rname = refresh_name(&name, s);
                        // Our own run for this slot is not "another operation".
                        let mine = all_restores.iter().any(|r| r.name_any() == rname);
                        let blocked = if mine {
                            None
                        } else {
                            blocker(ctx, branch, &parent.branch, &all_restores).await?
                        };
                        match blocked {
                            None => {
                                create_refresh(ctx, branch, &parent.branch, s, refresh.preserve)
                                    .await?;
                                last = Some(plan::rfc3339(s));
                            }
                            Some(why) => {
                                tracing::info!(slot = %plan::rfc3339(s), reason = %why, "refresh skipped");
                                publish(
                                    ctx,
                                    branch,
                                    EventType::Warning,
                                    "RefreshSkipped",
                                    format!(
                                        "skipped the refresh of {}: {why}; waiting for the next slot",
                                        plan::rfc3339(s)
                                    ),
                                )
                                .await;
                            }
                        }
                    }
                }
                next = cadence.next_after(now);
                if let Some(n) = next {
                    wait = wait.min(plan::until(now, n).max(Duration::from_secs(1)));
                }
            }
        }
    }

    let next_text = next.map(plan::rfc3339);
    if last != status.last_refresh_time || next_text != status.next_refresh_time {
        let fields = json!({"lastRefreshTime": last, "nextRefreshTime": next_text});
        status::patch_status(ctx, branch, "write refresh status", fields, Guard::None).await?;
    }
    Ok(Action::requeue(wait))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{SnapshotRestoreStatus, SnapshotSpec, SnapshotStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn restore(
        name: &str,
        target: &str,
        source: &str,
        phase: Option<RestorePhase>,
    ) -> SnapshotRestore {
        let mut r = SnapshotRestore::new(
            name,
            SnapshotRestoreSpec {
                source: RestoreSource {
                    branch: Some(source.into()),
                    ..Default::default()
                },
                target: Some(target.into()),
                finalize: true,
                preserve_under_name: None,
            },
        );
        r.status = phase.map(|p| SnapshotRestoreStatus {
            phase: Some(p),
            ..Default::default()
        });
        r
    }

    fn snapshot(name: &str, branch: &str, ready: bool, stalled: bool) -> Snapshot {
        let mut s = Snapshot::new(
            name,
            SnapshotSpec {
                branch: branch.into(),
                ..Default::default()
            },
        );
        let mut st = SnapshotStatus {
            ready_to_use: ready,
            ..Default::default()
        };
        if stalled {
            st.conditions.push(Condition {
                type_: STALLED.into(),
                status: "True".into(),
                reason: "SnapshotQuotaExceeded".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
            });
        }
        s.status = Some(st);
        s
    }

    #[test]
    fn operations_that_block_a_refresh() {
        let none: &[Snapshot] = &[];
        assert_eq!(operation_under_way("dev", &[], none), None);
        for phase in [
            None,
            Some(RestorePhase::Pending),
            Some(RestorePhase::Restoring),
            Some(RestorePhase::AwaitingFinalize),
            Some(RestorePhase::Finalizing),
        ] {
            let onto = [restore("r", "dev", "prod", phase)];
            assert!(
                operation_under_way("dev", &onto, none).is_some(),
                "{phase:?}"
            );
            // dev as the source of a restore elsewhere also counts.
            let from = [restore("r", "qa", "dev", phase)];
            assert!(
                operation_under_way("dev", &from, none).is_some(),
                "{phase:?}"
            );
        }
        for phase in [RestorePhase::Completed, RestorePhase::Failed] {
            let done = [restore("r", "dev", "prod", Some(phase))];
            assert_eq!(operation_under_way("dev", &done, none), None);
        }
        let elsewhere = [restore("r", "qa", "prod", None)];
        assert_eq!(operation_under_way("dev", &elsewhere, none), None);

        let taking = [snapshot("s", "dev", false, false)];
        let msg = operation_under_way("dev", &[], &taking).unwrap();
        assert!(msg.contains("Snapshot s"), "{msg}");
        let mut unstarted = snapshot("s", "dev", false, false);
        unstarted.status = None;
        assert!(operation_under_way("dev", &[], &[unstarted]).is_some());
        assert_eq!(
            operation_under_way("dev", &[], &[snapshot("s", "dev", true, false)]),
            None
        );
        assert_eq!(
            operation_under_way("dev", &[], &[snapshot("s", "dev", false, true)]),
            None,
            "a stalled snapshot is not under way"
        );
        assert_eq!(
            operation_under_way("dev", &[], &[snapshot("s", "prod", false, false)]),
            None
        );
    }

    #[test]
    fn refresh_names_are_branch_names() {
        let t: jiff::Timestamp = "2026-03-29T01:00:00Z".parse().unwrap();
        assert_eq!(refresh_name("dev", t), "dev-refresh-202603290100");
        let long = "a".repeat(44);
        let n = refresh_name(&long, t);
        assert!(crate::api::validate_branch_name(&n).is_ok(), "{n}");
        assert_eq!(n, refresh_name(&long, t));
        assert_ne!(
            n,
            refresh_name(&long, "2026-03-30T01:00:00Z".parse().unwrap())
        );
    }
}
