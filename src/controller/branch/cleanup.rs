//! Deletion (the finalizer): refused while protected or while children
//! exist; otherwise the compute goes, then the timeline, then the
//! Service and Secrets, then the finalizer.

use super::*;

pub(super) async fn reconcile_cleanup(branch: Arc<Branch>, ctx: &Context) -> Result<Action, Error> {
    let mut status = branch.status.clone().unwrap_or_default();
    let result = cleanup_steps(&branch, ctx, &mut status).await;
    let finished = matches!(result, Ok(None));
    let result = result.map(|o| {
        o.unwrap_or(Done {
            outcome: Outcome::progressing("Deleting", "compute and timeline removed"),
            phase: BranchPhase::Deleting,
            requeue: Action::await_change(),
        })
    });
    let stalled = matches!(result, Err(Error::Stalled { .. }));
    let waiting = matches!(result, Err(Error::Waiting(_)));
    let stalled_err = match &result {
        Err(Error::Stalled { reason, message }) => Some(Error::stalled(reason, message.clone())),
        Err(Error::Waiting(w)) => Some(Error::Waiting(w.clone())),
        _ => None,
    };
    if finished {
        // Everything is gone: the finalizer is removed next; no status write
        // (the object is about to disappear).
        return Ok(Action::await_change());
    }
    let under_way = match &result {
        Ok(done) => Some(crate::controller::status::message_of(&done.outcome).to_string()),
        Err(_) => None,
    };
    finish(ctx, &branch, status, result).await?;
    // The finalizer must stay while deletion is refused or under way: the
    // finalizer helper removes it on any `Ok`, so work left (a compute
    // still stopping) is an error that polls again, never an `Ok`.
    if stalled || waiting {
        return Err(stalled_err.unwrap_or_else(|| Error::Waiting("deleting".into())));
    }
    Err(Error::Waiting(
        under_way.unwrap_or_else(|| "deleting".into()),
    ))
}

/// Deletion. `Ok(None)`: everything is gone, the finalizer may go.
pub(super) async fn cleanup_steps(
    branch: &Branch,
    ctx: &Context,
    status: &mut BranchStatus,
) -> Result<Option<Done>, Error> {
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let uid = branch.uid().unwrap_or_default();
    if branch.spec.protected {
        return Err(Error::stalled(
            "BranchProtected",
            "the branch is protected: set spec.protected to false to delete it",
        ));
    }
    let all = ctx.list::<Branch>(&ns, "list branches", "").await?;
    let mut children: Vec<String> = all
        .iter()
        .filter(|b| effective_parent(b).as_deref() == Some(name.as_str()))
        .map(|b| b.name_any())
        .collect();
    children.sort();
    if !children.is_empty() {
        return Err(Error::stalled(
            "HasChildren",
            format!(
                "the branch has child branches ({}); delete them first",
                children.join(", ")
            ),
        ));
    }

    // Compute first: storage refuses to delete a timeline that still runs.
    let list = ctx
        .list::<Deployment>(&ns, "list computes", &format!("{LABEL_BRANCH}={name}"))
        .await?;
    let mut remaining = 0;
    for d in list.iter().filter(|d| holder(*d, &uid) == Holder::Owner) {
        if !delete_owned::<Deployment>(ctx, &ns, &d.name_any(), &uid).await? {
            remaining += 1;
        }
    }
    if remaining > 0 {
        status.phase = Some(BranchPhase::Deleting);
        return Ok(Some(Done {
            outcome: Outcome::progressing("Deleting", "stopping the compute"),
            phase: BranchPhase::Deleting,
            requeue: Action::requeue(ctx.config.poll_interval),
        }));
    }

    // The timeline: the one in status; if status was lost, the one created
    // with this Branch's UID as key unless another Branch now uses it
    // (a restore may have handed it to a backup branch).
    let mut timelines = vec![];
    if let Some(id) = &status.timeline_id {
        if let Ok(id) = TimelineId::new(id.clone()) {
            timelines.push(id);
        }
    } else {
        let used: Vec<String> = all
            .iter()
            .filter(|b| b.uid().as_deref() != Some(uid.as_str()))
            .filter_map(|b| b.status.as_ref().and_then(|s| s.timeline_id.clone()))
            .collect();
        let stored = with_deadline(ctx, "list timelines", ctx.storage.list_timelines()).await?;
        timelines.extend(
            stored
                .into_iter()
                .filter(|t| t.key.as_str() == uid && !used.contains(&t.id.to_string()))
                .map(|t| t.id),
        );
    }
    for id in timelines {
        if handover::claimed_elsewhere(&all, &uid, &id) {
            tracing::info!(timeline = %id, "timeline now belongs to another branch; keeping it");
            continue;
        }
        tracing::info!(timeline = %id, "deleting timeline");
        match with_deadline(ctx, "delete timeline", ctx.storage.delete_timeline(&id)).await {
            Ok(()) => {}
            Err(Error::Storage(StorageError::Busy { message })) => {
                return Err(Error::Waiting(format!(
                    "timeline {id} is still in use: {message}"
                )))
            }
            Err(e) => return Err(e),
        }
    }

    delete_owned::<Service>(ctx, &ns, &service_name(&name), &uid).await?;
    delete_owned::<Service>(ctx, &ns, &ro_service_name(&name), &uid).await?;
    let owned = ctx
        .list::<Secret>(&ns, "list secrets", &format!("{LABEL_BRANCH}={name}"))
        .await?;
    for s in owned {
        delete_owned::<Secret>(ctx, &ns, &s.name_any(), &uid).await?;
    }
    ctx.tls_served.forget(&uid);
    tracing::info!("branch deleted");
    Ok(None)
}
