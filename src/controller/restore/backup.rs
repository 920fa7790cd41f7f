//! The backup branch that keeps the target's old timeline, and the
//! children of that timeline re-parented onto it (by status only).

use super::*;

/// Step 2: Secrets with the target's passwords, then the backup Branch.
pub(super) async fn create_backup(
    run: &Run<'_>,
    target: &Branch,
    bname: &str,
) -> Result<(), Error> {
    let ctx = run.ctx;
    let ns = &run.ns;
    let branches = branch_api(ctx, ns);
    let existing = ctx.get::<Branch>(ns, "read backup", bname).await?;
    if let Some(b) = &existing {
        if b.labels().get(LABEL_RESTORE_BACKUP_OF) != Some(&run.name) {
            return Err(Error::stalled(
                "BackupNameTaken",
                format!("a Branch named {bname} already exists; it was not made by this restore"),
            ));
        }
        return Ok(());
    }
    let secrets: Api<Secret> = ctx.api(ns);
    for (suffix, user, pw) in target_credentials(ctx, ns, target).await? {
        let name = match suffix.as_str() {
            "superuser" => superuser_secret_name(bname),
            "app" => app_secret_name(bname),
            s => role_secret_name(bname, s),
        };
        if secrets::get(ctx, ns, &name).await?.is_some() {
            continue;
        }
        // Same type as the target's (a Secret's type is immutable, and the
        // backup branch's controller re-applies its own Secrets).
        let source = match suffix.as_str() {
            "superuser" => superuser_secret_name(&target.name_any()),
            "app" => app_secret_name(&target.name_any()),
            s => role_secret_name(&target.name_any(), s),
        };
        let type_ = secrets::get(ctx, ns, &source)
            .await?
            .and_then(|s| s.type_)
            .unwrap_or_else(|| "Opaque".into());
        let s = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(BTreeMap::from([(
                    LABEL_BRANCH.to_string(),
                    bname.to_string(),
                )])),
                ..Default::default()
            },
            type_: Some(type_),
            data: Some(BTreeMap::from([
                ("user".to_string(), ByteString(user.into_bytes())),
                ("password".to_string(), ByteString(pw.into_bytes())),
            ])),
            ..Default::default()
        };
        match with_deadline(
            ctx,
            "create secret",
            secrets.create(&PostParams::default(), &s),
        )
        .await
        {
            Ok(_) => {}
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    let spec = BranchSpec {
        compute: target.spec.compute.clone(),
        roles: target.spec.roles.clone(),
        databases: target.spec.databases.clone(),
        ..Default::default()
    };
    let mut b = Branch::new(bname, spec);
    b.metadata.namespace = Some(ns.clone());
    b.metadata.labels = Some(BTreeMap::from([(
        LABEL_RESTORE_BACKUP_OF.to_string(),
        run.name.clone(),
    )]));
    let t_old = target
        .status
        .as_ref()
        .and_then(|s| s.timeline_id.clone())
        .unwrap_or_default();
    b.metadata.annotations = Some(BTreeMap::from([(
        ANNOTATION_ADOPT_TIMELINE.to_string(),
        t_old,
    )]));
    tracing::info!(backup = %bname, "creating the backup branch");
    match with_deadline(
        ctx,
        "create backup branch",
        branches.create(&PostParams::default(), &b),
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Step 5: branches copied from the target's old timeline now descend from
/// the backup branch (status only).
pub(super) async fn reparent_children(
    run: &Run<'_>,
    tname: &str,
    rname: &str,
    bname: &str,
    t_old: &TimelineId,
) -> Result<(), Error> {
    let ctx = run.ctx;
    let branches = branch_api(ctx, &run.ns);
    let all = with_deadline(ctx, "list branches", branches.list(&ListParams::default())).await?;
    for b in all.items {
        let name = b.name_any();
        if name == tname || name == rname || name == bname {
            continue;
        }
        let st = b.status.clone().unwrap_or_default();
        let parent = st
            .parent_branch
            .clone()
            .or_else(|| b.spec.parent.as_ref().map(|p| p.branch.clone()));
        if parent.as_deref() != Some(tname) {
            continue;
        }
        let from_old = match &st.parent_timeline_id {
            Some(p) => p == t_old.as_str(),
            None => match st.timeline_id.clone().and_then(|t| TimelineId::new(t).ok()) {
                Some(tl) => {
                    match with_deadline(ctx, "get timeline", ctx.storage.get_timeline(&tl)).await {
                        Ok(t) => t.lineage.parent.as_ref() == Some(t_old),
                        Err(_) => false,
                    }
                }
                None => false,
            },
        };
        if !from_old {
            continue;
        }
        tracing::info!(child = %name, backup = %bname, "re-parenting child branch to the backup");
        let fields = json!({"parentBranch": bname, "parentTimelineId": t_old.to_string()});
        status::patch_status(ctx, &b, "re-parent child", fields, Guard::ResourceVersion).await?;
    }
    Ok(())
}
