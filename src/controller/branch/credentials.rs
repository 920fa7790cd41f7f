//! The branch's credential Secrets: read or created before any data
//! exists (so a password is never lost), the parent's when the branch
//! inherits, new ones otherwise; Secrets of roles no longer declared go.
//! Also the passwords a copied data directory may still hold.

use super::*;

/// Passwords the branch's Secrets hold (read or newly generated).
pub(super) struct Credentials {
    pub superuser: String,
    pub app: RoleCredentials,
    pub extra_roles: Vec<RoleCredentials>,
    /// The SQL-applied marker currently on the app Secret.
    pub sql_marker: Option<String>,
    /// The namespace CA the Secrets carry as `ca.crt` (compute TLS on).
    pub ca_pem: Option<String>,
}

/// A role's password: the branch's Secret's (when it is for that user),
/// else (inherit) the parent's for the same role, else a new one.
pub(super) async fn role_password(
    ctx: &Context,
    ns: &str,
    inherit: bool,
    secret: String,
    parent_secret: Option<String>,
    user: &str,
) -> Result<String, Error> {
    let candidates = std::iter::once(Some(secret))
        .chain(std::iter::once(parent_secret.filter(|_| inherit)))
        .flatten();
    for name in candidates {
        if let Some(s) = secrets::get(ctx, ns, &name).await? {
            if secret_value(&s, "user").as_deref() == Some(user) {
                if let Some(pw) = secret_value(&s, "password") {
                    return Ok(pw);
                }
            }
        }
    }
    Ok(generate_password())
}

/// Reads or creates the branch's credential Secrets. Each password is
/// stored before any database holds it.
pub(super) async fn ensure_credentials(
    ctx: &Context,
    branch: &Branch,
    parent: Option<&Branch>,
    uid: &str,
    ca_pem: Option<&str>,
) -> Result<Credentials, Error> {
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let inherit = parent.is_some() && branch.spec.credentials == Some(CredentialsPolicy::Inherit);
    let parent_name = parent.map(|p| p.name_any());
    let cfg = &ctx.config.compute;

    // The superuser.
    let su_name = superuser_secret_name(&name);
    let superuser = match secrets::password(ctx, &ns, &su_name).await? {
        Some(pw) => pw,
        None if inherit => {
            let pname = parent_name.clone().unwrap_or_default();
            secrets::password(ctx, &ns, &superuser_secret_name(&pname))
                .await?
                .ok_or_else(|| {
                    Error::Waiting(format!(
                        "the parent's Secret {} is not there yet",
                        superuser_secret_name(&pname)
                    ))
                })?
        }
        None => generate_password(),
    };
    let su_creds = RoleCredentials {
        user: "postgres".into(),
        password: superuser.clone(),
        database: "postgres".into(),
    };
    apply_owned(
        ctx,
        build_credentials_secret(branch, su_name, &su_creds, cfg, Default::default(), ca_pem)?,
        uid,
    )
    .await?;

    // A role's password: the branch's Secret's, else (inherit) the parent's
    // for the same role, else a new one.
    // The app role (the superuser itself when no role is declared anywhere).
    let (app_user, app_db) = app_identity(branch, parent);
    let app_password = if app_user == "postgres" {
        superuser.clone()
    } else {
        role_password(
            ctx,
            &ns,
            inherit,
            app_secret_name(&name),
            parent_name.as_deref().map(app_secret_name),
            &app_user,
        )
        .await?
    };
    let app = RoleCredentials {
        user: app_user,
        password: app_password,
        database: app_db.clone(),
    };
    let existing_app = secrets::get(ctx, &ns, &app_secret_name(&name)).await?;
    let sql_marker = existing_app
        .as_ref()
        .filter(|s| holder(*s, uid) == Holder::Owner)
        .and_then(|s| s.metadata.annotations.as_ref())
        .and_then(|a| a.get(ANNOTATION_SQL_APPLIED))
        .cloned();
    let mut annotations = std::collections::BTreeMap::new();
    if let Some(m) = &sql_marker {
        annotations.insert(ANNOTATION_SQL_APPLIED.to_string(), m.clone());
    }
    apply_owned(
        ctx,
        build_credentials_secret(
            branch,
            app_secret_name(&name),
            &app,
            cfg,
            annotations,
            ca_pem,
        )?,
        uid,
    )
    .await?;

    let mut extra_roles = vec![];
    for role in branch.spec.roles.iter().skip(1) {
        let secret = role_secret_name(&name, &secret_suffix(&role.name));
        let parent_secret = parent_name
            .as_deref()
            .map(|p| role_secret_name(p, &secret_suffix(&role.name)));
        let password =
            role_password(ctx, &ns, inherit, secret.clone(), parent_secret, &role.name).await?;
        let creds = RoleCredentials {
            user: role.name.clone(),
            password,
            database: app_db.clone(),
        };
        apply_owned(
            ctx,
            build_credentials_secret(branch, secret, &creds, cfg, Default::default(), ca_pem)?,
            uid,
        )
        .await?;
        extra_roles.push(creds);
    }
    remove_stale_role_secrets(ctx, branch, &extra_roles, uid).await?;
    Ok(Credentials {
        superuser,
        app,
        extra_roles,
        sql_marker,
        ca_pem: ca_pem.map(str::to_string),
    })
}

/// Deletes the credential Secrets of roles no longer in `spec.roles` (the
/// role itself is dropped by the SQL step).
pub(super) async fn remove_stale_role_secrets(
    ctx: &Context,
    branch: &Branch,
    extra_roles: &[RoleCredentials],
    uid: &str,
) -> Result<(), Error> {
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let mut keep = vec![superuser_secret_name(&name), app_secret_name(&name)];
    keep.extend(
        extra_roles
            .iter()
            .map(|r| role_secret_name(&name, &secret_suffix(&r.user))),
    );
    let selector = format!(
        "{LABEL_BRANCH}={name},{}=credentials",
        crate::api::LABEL_COMPONENT
    );
    let list = ctx
        .list::<Secret>(&ns, "list credential secrets", &selector)
        .await?;
    for s in list {
        let sname = s.name_any();
        if !keep.contains(&sname) && holder(&s, uid) == Holder::Owner {
            tracing::info!(secret = %sname, "deleting the Secret of a role removed from spec.roles");
            delete_owned::<Secret>(ctx, &ns, &sname, uid).await?;
        }
    }
    Ok(())
}

/// Superuser passwords the data of `tl` may still carry besides the
/// branch's own: those of the branch it was copied from — the parent, the
/// Branch whose timeline is the timeline's lineage parent (a restore from
/// another branch), or the Branch a source Snapshot was taken of.
pub(super) async fn fallback_superuser_passwords(
    ctx: &Context,
    branch: &Branch,
    parent: Option<&Branch>,
    tl: &Timeline,
) -> Result<Vec<String>, Error> {
    let ns = branch.namespace().unwrap_or_default();
    let mut names: Vec<String> = parent.map(|p| p.name_any()).into_iter().collect();
    {
        let all = ctx.list::<Branch>(&ns, "list branches", "").await?;
        if let Some(ptl) = &tl.lineage.parent {
            names.extend(
                all.iter()
                    .filter(|b| {
                        b.status.as_ref().and_then(|s| s.timeline_id.as_deref())
                            == Some(ptl.as_str())
                    })
                    .map(|b| b.name_any()),
            );
        }
        // The branch that served this very timeline before a restore
        // replaced it (its passwords are in this data).
        names.extend(
            all.iter()
                .filter(|b| {
                    b.status
                        .as_ref()
                        .is_some_and(|s| s.history.iter().any(|h| h.timeline_id == tl.id.as_str()))
                })
                .map(|b| b.name_any()),
        );
        if let Some(snap) = &tl.lineage.snapshot {
            // The Snapshot kind may not be installed: then there is nothing to find.
            if let Ok(list) = ctx
                .list::<crate::api::Snapshot>(&ns, "list snapshots", "")
                .await
            {
                names.extend(
                    list.iter()
                        .filter(|s| {
                            s.status.as_ref().and_then(|st| st.snapshot_id.as_deref())
                                == Some(snap.as_str())
                        })
                        .map(|s| s.spec.branch.clone()),
                );
            }
        }
    }
    names.retain(|n| *n != branch.name_any());
    names.dedup();
    let mut out = vec![];
    for n in names {
        if let Some(pw) = secrets::password(ctx, &ns, &superuser_secret_name(&n)).await? {
            if !out.contains(&pw) {
                out.push(pw);
            }
        }
    }
    Ok(out)
}
