//! The target's credentials on the restored data: the restored branch's
//! database is given the target's passwords before the target's Service
//! points at it, so clients reconnect with the credentials they have.

use super::*;

/// The target's credential Secrets: `(secret name suffix, user, password)`.
pub(super) async fn target_credentials(
    ctx: &Context,
    ns: &str,
    target: &Branch,
) -> Result<Vec<(String, String, String)>, Error> {
    let t = target.name_any();
    let mut out = vec![];
    let Some(su) = secrets::password(ctx, ns, &superuser_secret_name(&t)).await? else {
        return Err(Error::stalled(
            "SecretNotFound",
            format!(
                "the target's Secret {} is missing",
                superuser_secret_name(&t)
            ),
        ));
    };
    out.push(("superuser".to_string(), "postgres".to_string(), su));
    if let Some((u, p)) = secrets::user_and_password(ctx, ns, &app_secret_name(&t)).await? {
        out.push(("app".to_string(), u, p));
    }
    for role in target.spec.roles.iter().skip(1) {
        let suffix = secret_suffix(&role.name);
        if let Some((u, p)) =
            secrets::user_and_password(ctx, ns, &role_secret_name(&t, &suffix)).await?
        {
            out.push((suffix, u, p));
        }
    }
    Ok(out)
}

/// Step 1: the restored data gets the target's passwords.
pub(super) async fn set_target_passwords(
    run: &Run<'_>,
    target: &Branch,
    rname: &str,
) -> Result<(), Error> {
    let ctx = run.ctx;
    let ns = &run.ns;
    if !target.spec.compute.enabled || target.spec.compute.suspended {
        // The restored branch has the target's compute spec: nothing runs.
        // The target's controller sets its passwords when its compute next
        // starts (the data's source branch's password is its fallback).
        tracing::info!("no compute runs: passwords are set when the target's compute starts");
        return Ok(());
    }
    let all = target_credentials(ctx, ns, target).await?;
    let su = all[0].2.clone();
    let mut fallback = vec![];
    if let Some(p) = secrets::password(ctx, ns, &superuser_secret_name(rname)).await? {
        fallback.push(p);
    }
    let mut roles: Vec<(String, String)> = vec![];
    for (_, user, pw) in all.iter().skip(1) {
        if user != "postgres" && !roles.iter().any(|(u, _)| u == user) {
            roles.push((user.clone(), pw.clone()));
        }
    }
    let (host, port) = ctx.resolver.resolve(ns, &service_name(rname)).await?;
    let plan = sql::SqlPlan {
        host,
        port,
        superuser_password: su,
        fallback_passwords: fallback,
        roles,
        databases: vec![],
        reset_other_logins: false,
        manage_roles_of: None,
        tls: crate::controller::tls::client_tls(ctx, ns, &service_name(rname)).await?,
    };
    let timeout = ctx.config.step_timeout;
    match tokio::time::timeout(timeout, sql::apply(&plan, timeout)).await {
        Ok(r) => {
            r?;
        }
        Err(_) => {
            return Err(Error::Timeout {
                step: "set the target's passwords on the restored data",
                secs: timeout.as_secs(),
            })
        }
    }
    tracing::info!(branch = %rname, "the restored data holds the target's passwords");
    Ok(())
}
