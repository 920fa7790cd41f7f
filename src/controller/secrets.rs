//! The one reader of Secrets for every controller: a Secret, its
//! `password`, its `user` and `password`, and the superuser connection to a
//! branch's running compute (its password is in `<branch>-superuser`).

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;

use super::{Context, Error};
use crate::api::Branch;
use crate::compute::{secret_value, service_name, superuser_secret_name};
use crate::storage::{ConnInfo, Password};

/// The Secret `name` of namespace `ns`, if it exists.
pub async fn get(ctx: &Context, ns: &str, name: &str) -> Result<Option<Secret>, Error> {
    ctx.get(ns, "read secret", name).await
}

/// The `password` key of a Secret, if the Secret exists and has one.
pub async fn password(ctx: &Context, ns: &str, name: &str) -> Result<Option<String>, Error> {
    Ok(get(ctx, ns, name)
        .await?
        .and_then(|s| secret_value(&s, "password")))
}

/// `(user, password)` of a credentials Secret, if it exists and has both.
pub async fn user_and_password(
    ctx: &Context,
    ns: &str,
    name: &str,
) -> Result<Option<(String, String)>, Error> {
    Ok(get(ctx, ns, name)
        .await?
        .and_then(|s| Some((secret_value(&s, "user")?, secret_value(&s, "password")?))))
}

/// How to reach the running compute of `branch` as its superuser (so the
/// storage layer can `CHECKPOINT` it before a head copy). `None` when no
/// compute runs or its Secret is not there.
pub async fn superuser_conn(ctx: &Context, branch: &Branch) -> Result<Option<ConnInfo>, Error> {
    if !branch.spec.compute.enabled || branch.spec.compute.suspended {
        return Ok(None);
    }
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let Some(password) = password(ctx, &ns, &superuser_secret_name(&name)).await? else {
        return Ok(None);
    };
    let (host, port) = ctx.resolver.resolve(&ns, &service_name(&name)).await?;
    Ok(Some(ConnInfo {
        host,
        port,
        user: "postgres".into(),
        password: Some(Password(password)),
        dbname: "postgres".into(),
    }))
}
