//! Restoring and AwaitingFinalize: the restored data comes up as an
//! ordinary Branch named like the restore; then either the preview waits
//! for `finalize: true` or the restore moves to Finalizing, after checking
//! that the target is still the one it resolved and that its Service is
//! the operator's to retarget.

use super::*;

/// Restoring / AwaitingFinalize. `Some(done)`: stop here this pass.
pub(super) async fn restoring(
    run: &mut Run<'_>,
    st: &mut SnapshotRestoreStatus,
) -> Result<Option<Done>, Error> {
    let ctx = run.ctx;
    let ns = run.ns.clone();
    let r = run.r;
    let branches = branch_api(ctx, &ns);
    let rname = st
        .restored_branch
        .clone()
        .unwrap_or_else(|| run.name.clone());
    let existing = ctx
        .get::<Branch>(&ns, "read restored branch", &rname)
        .await?;
    let rb = match existing {
        Some(b) => {
            let ours = b.labels().get(LABEL_RESTORE) == Some(&run.name)
                && b.owner_references()
                    .iter()
                    .any(|o| Some(&o.uid) == r.uid().as_ref());
            if !ours {
                return Err(Error::stalled(
                    "NameTaken",
                    format!("a Branch named {rname} already exists and was not made by this restore; the restored branch takes the restore's name: use another SnapshotRestore name"),
                ));
            }
            b
        }
        None => {
            let b = restored_branch_object(run, &rname).await?;
            tracing::info!(branch = %rname, "creating the restored branch");
            with_deadline(
                ctx,
                "create restored branch",
                branches.create(&PostParams::default(), &b),
            )
            .await?
        }
    };
    let rst = rb.status.clone().unwrap_or_default();
    if let Some(c) = rst
        .conditions
        .iter()
        .find(|c| c.type_ == STALLED && c.status == "True")
    {
        return Err(Error::stalled(
            "RestoredBranchFailed",
            format!(
                "the restored branch {rname} is stalled: {}: {}",
                c.reason, c.message
            ),
        ));
    }
    if !branch_ready(&rb) {
        st.progress = Some(format!(
            "waiting for the restored branch {rname} to be Ready"
        ));
        return Ok(Some(waiting(
            "Restoring",
            format!("restoring into branch {rname}"),
            ctx.config.poll_interval,
        )));
    }
    st.restored_timeline_id = rst.timeline_id.clone();
    if !r.spec.finalize {
        st.phase = Some(RestorePhase::AwaitingFinalize);
        st.progress = Some(format!(
            "preview branch {rname} is Ready; set spec.finalize: true to finalize"
        ));
        return Ok(Some(Done {
            outcome: Outcome::ready(
                "AwaitingFinalize",
                format!(
                    "the restored data is on branch {rname} (Service {}, Secret {}); set spec.finalize: true to move {} onto it",
                    service_name(&rname),
                    app_secret_name(&rname),
                    r.spec.target.clone().unwrap_or_else(|| "a target".into())
                ),
            ),
            requeue: Action::requeue(ctx.config.ready_requeue),
        }));
    }
    if r.spec.target.is_none() {
        return Err(Error::stalled(
            "TargetRequired",
            "finalize needs spec.target: the Branch to replace is never guessed",
        ));
    }
    if st.target_uid.is_none() {
        // A multi-step restore created without a target cannot get one
        // (the spec is immutable); CEL refuses this, check anyway.
        return Err(Error::stalled(
            "TargetRequired",
            "the target was not resolved when the restore started",
        ));
    }
    // Checked before the phase moves: a restore refused here is not
    // Finalizing (its deletion is not held back).
    precheck(run, st).await?;
    // Under the operation lock until the phase is recorded: no snapshot of
    // the target or the restored branch is being taken.
    let _guard = ctx.operations.take().await;
    let target = r.spec.target.clone().unwrap_or_default();
    if let Some((snap, b)) = snapshot_being_taken(ctx, &ns, &[target.as_str(), &rname]).await? {
        return Err(Error::Waiting(format!(
            "Snapshot {snap} of branch {b} is being taken; finalizing starts when it is ready"
        )));
    }
    st.phase = Some(RestorePhase::Finalizing);
    st.progress = Some("finalizing".into());
    run.save(st).await?;
    Ok(None)
}

/// The target is still the one resolved at the start (same UID, same
/// timeline) and its Service is the operator's to retarget.
async fn precheck(run: &Run<'_>, st: &SnapshotRestoreStatus) -> Result<(), Error> {
    let ctx = run.ctx;
    let tname = run.r.spec.target.clone().unwrap_or_default();
    let target = ctx.get::<Branch>(&run.ns, "read target", &tname).await?;
    let Some(target) = target.filter(|t| t.uid() == st.target_uid) else {
        return Err(Error::stalled(
            "TargetChanged",
            format!("branch {tname} was deleted or created again since the restore started; nothing was replaced"),
        ));
    };
    let current = target.status.as_ref().and_then(|s| s.timeline_id.clone());
    if current != st.target_timeline_id {
        return Err(Error::stalled(
            "TargetChanged",
            format!(
                "branch {tname} moved to timeline {} since the restore started (it was on {}); nothing was replaced",
                current.unwrap_or_default(),
                st.target_timeline_id.clone().unwrap_or_default()
            ),
        ));
    }
    let svc = ctx
        .get::<Service>(&run.ns, "read service", &service_name(&tname))
        .await?;
    check_service_owned(
        svc.as_ref(),
        &target,
        st.target_uid.as_deref().unwrap_or_default(),
    )
}

/// The restored Branch R.
async fn restored_branch_object(run: &Run<'_>, rname: &str) -> Result<Branch, Error> {
    let ctx = run.ctx;
    let r = run.r;
    // Compute, roles and databases: the target's, else the source branch's.
    let like = match (&r.spec.target, &r.spec.source.branch) {
        (Some(t), _) | (None, Some(t)) => ctx.get::<Branch>(&run.ns, "read branch", t).await?,
        _ => None,
    };
    let mut spec = BranchSpec::default();
    if let Some(l) = &like {
        spec.compute = l.spec.compute.clone();
        spec.roles = l.spec.roles.clone();
        spec.databases = l.spec.databases.clone();
    }
    if let Some(s) = &r.spec.source.snapshot {
        spec.from_snapshot = Some(s.clone());
    }
    if let Some(b) = &r.spec.source.branch {
        spec.parent = Some(ParentRef {
            branch: b.clone(),
            lsn: r.spec.source.lsn.clone(),
            timestamp: r.spec.source.timestamp.clone(),
        });
    }
    let mut b = Branch::new(rname, spec);
    b.metadata.namespace = Some(run.ns.clone());
    b.metadata.labels = Some(BTreeMap::from([(
        LABEL_RESTORE.to_string(),
        run.name.clone(),
    )]));
    if let Some(t) = &r.spec.target {
        // Its compute may be handed to the target at finalize: its
        // certificate covers the target's names too (compute/tls.rs).
        b.metadata.annotations = Some(BTreeMap::from([(
            crate::compute::tls::ANNOTATION_TLS_ALSO_FOR.to_string(),
            t.clone(),
        )]));
    }
    let oref = r
        .controller_owner_ref(&())
        .ok_or_else(|| Error::stalled("InvalidObject", "the SnapshotRestore has no UID"))?;
    b.metadata.owner_references = Some(vec![oref]);
    Ok(b)
}

pub(super) fn svc_selector_timeline(svc: &Service) -> Option<String> {
    svc.spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .and_then(|s| s.get(LABEL_TIMELINE))
        .cloned()
}

/// The target's Service must be the operator's to retarget.
pub(super) fn check_service_owned(
    svc: Option<&Service>,
    target: &Branch,
    uid: &str,
) -> Result<(), Error> {
    let name = target.name_any();
    let Some(svc) = svc else {
        if !target.spec.compute.enabled {
            // A branch without compute has no Service: nothing to retarget.
            return Ok(());
        }
        return Err(Error::stalled(
            "ServiceNotOwned",
            format!("branch {name} has no Service {name} to retarget"),
        ));
    };
    if holder(svc, uid) != Holder::Owner {
        return Err(Error::stalled(
            "ServiceNotOwned",
            format!("Service {name} is not controlled by branch {name}; the operator never retargets a Service it does not own"),
        ));
    }
    let foreign = svc.managed_fields().iter().find(|m| {
        m.manager.as_deref() != Some(FIELD_MANAGER)
            && m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.to_string().contains("f:selector"))
    });
    if let Some(m) = foreign {
        return Err(Error::stalled(
            "ServiceNotOwned",
            format!(
                "the selector of Service {name} is also managed by {:?}; the operator never retargets a Service another tool manages",
                m.manager.clone().unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc_of(owner_uid: Option<&str>, manager: Option<(&str, &str)>) -> Service {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
            FieldsV1, ManagedFieldsEntry, OwnerReference,
        };
        let mut s = Service::default();
        s.metadata.name = Some("prod".into());
        if let Some(uid) = owner_uid {
            s.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "pgbranch.dev/v1alpha1".into(),
                kind: "Branch".into(),
                name: "prod".into(),
                uid: uid.into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]);
        }
        if let Some((m, fields)) = manager {
            s.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
                manager: Some(m.into()),
                fields_v1: Some(FieldsV1(serde_json::from_str(fields).unwrap())),
                ..Default::default()
            }]);
        }
        s
    }

    #[test]
    fn only_the_operators_service_is_retargeted() {
        let t = Branch::new("prod", BranchSpec::default());
        let reason = |r: Result<(), Error>| r.err().map(|e| e.reason());
        assert_eq!(
            reason(check_service_owned(None, &t, "u1")).as_deref(),
            Some("ServiceNotOwned")
        );
        assert_eq!(
            reason(check_service_owned(
                Some(&svc_of(Some("u1"), None)),
                &t,
                "u1"
            )),
            None
        );
        assert_eq!(
            reason(check_service_owned(
                Some(&svc_of(Some("u2"), None)),
                &t,
                "u1"
            ))
            .as_deref(),
            Some("ServiceNotOwned")
        );
        assert_eq!(
            reason(check_service_owned(Some(&svc_of(None, None)), &t, "u1")).as_deref(),
            Some("ServiceNotOwned")
        );
        let ours = r#"{"f:spec":{"f:selector":{}}}"#;
        assert_eq!(
            reason(check_service_owned(
                Some(&svc_of(Some("u1"), Some((FIELD_MANAGER, ours)))),
                &t,
                "u1"
            )),
            None
        );
        assert_eq!(
            reason(check_service_owned(
                Some(&svc_of(Some("u1"), Some(("argocd-controller", ours)))),
                &t,
                "u1"
            ))
            .as_deref(),
            Some("ServiceNotOwned")
        );
        let labels_only = r#"{"f:metadata":{"f:labels":{"f:team":{}}}}"#;
        assert_eq!(
            reason(check_service_owned(
                Some(&svc_of(Some("u1"), Some(("kubectl", labels_only)))),
                &t,
                "u1"
            )),
            None
        );
    }
}
