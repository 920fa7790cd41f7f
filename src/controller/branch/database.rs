//! What the branch declares inside PostgreSQL, applied over SQL once the
//! compute serves and whenever it changes: its own passwords, the
//! declared roles (removed ones dropped, or kept NOLOGIN and reported in
//! the `RolesRetained` condition) and databases.

use super::*;

/// The condition type that reports roles removed from `spec.roles` that
/// PostgreSQL would not drop.
pub const ROLES_RETAINED: &str = "RolesRetained";

/// Records roles removed from the spec but kept (they own objects or hold
/// privileges) as the `RolesRetained` condition, with a Warning Event;
/// clears the condition once none is kept.
pub(super) async fn record_retained_roles(
    ctx: &Context,
    branch: &Branch,
    status: &mut BranchStatus,
    retained: &[(String, String)],
    now: jiff::Timestamp,
) {
    if retained.is_empty() {
        crate::api::conditions::remove_condition(&mut status.conditions, ROLES_RETAINED);
        return;
    }
    let message = format!(
        "removed from spec.roles but kept as NOLOGIN without a password: {}; reassign or drop what they own (REASSIGN OWNED / DROP OWNED), then they are dropped at the next change",
        retained
            .iter()
            .map(|(r, why)| format!("{r} ({why})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    crate::api::conditions::set_condition(
        &mut status.conditions,
        crate::api::conditions::condition(
            ROLES_RETAINED,
            "True",
            "RolesOwnObjects",
            &message,
            branch.metadata.generation,
            now,
        ),
    );
    let ev = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Warning,
        reason: "RolesRetained".into(),
        note: Some(message.chars().take(1000).collect()),
        action: "DropRoles".into(),
        secondary: None,
    };
    if let Err(e) = ctx
        .recorder
        .publish(&ev, &kube::Resource::object_ref(branch, &()))
        .await
    {
        tracing::warn!(error = %e, "could not publish event");
    }
}

/// The marker of what the SQL step applied: the timeline, the spec's
/// generation and the passwords. The step runs again when it changes.
pub(super) fn sql_marker(tl: &TimelineId, generation: Option<i64>, creds: &Credentials) -> String {
    content_hash(&(
        tl.as_str(),
        generation,
        &creds.superuser,
        &creds.app.user,
        &creds.app.password,
        creds
            .extra_roles
            .iter()
            .map(|r| (&r.user, &r.password))
            .collect::<Vec<_>>(),
    ))
}

/// The database stage: once per change (see [`sql_marker`]), the branch's
/// passwords, declared roles and databases over SQL; the marker is then
/// recorded on the app Secret.
#[allow(clippy::too_many_arguments)]
pub(super) async fn apply_database(
    ctx: &Context,
    branch: &Branch,
    parent: Option<&Branch>,
    creds: &Credentials,
    tl: &Timeline,
    uid: &str,
    status: &mut BranchStatus,
    now: jiff::Timestamp,
) -> Result<(), Error> {
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let marker = sql_marker(&tl.id, branch.metadata.generation, creds);
    if creds.sql_marker.as_deref() != Some(marker.as_str()) {
        let (host, port) = ctx.resolver.resolve(&ns, &service_name(&name)).await?;
        let fallback = fallback_superuser_passwords(ctx, branch, parent, tl).await?;
        let mut roles = vec![];
        if creds.app.user != "postgres" {
            roles.push((creds.app.user.clone(), creds.app.password.clone()));
        }
        roles.extend(
            creds
                .extra_roles
                .iter()
                .map(|r| (r.user.clone(), r.password.clone())),
        );
        let plan = sql::SqlPlan {
            host,
            port,
            superuser_password: creds.superuser.clone(),
            fallback_passwords: fallback,
            roles,
            databases: branch
                .spec
                .databases
                .iter()
                .map(|d| (d.name.clone(), d.owner.clone()))
                .collect(),
            // A child's own copy (not data a restore brought in): users of
            // the parent it did not declare lose the parent's passwords.
            reset_other_logins: branch.spec.parent.is_some()
                && branch.spec.credentials != Some(CredentialsPolicy::Inherit)
                && tl.key.as_str() == uid,
            manage_roles_of: Some(uid.to_string()),
            tls: creds
                .ca_pem
                .as_ref()
                .map(|ca| crate::controller::tls::ClientTls {
                    ca_pem: ca.clone(),
                    server_name: crate::compute::service_host(&service_name(&name), &ns),
                }),
        };
        let timeout = ctx.config.step_timeout;
        let report = match tokio::time::timeout(timeout, sql::apply(&plan, timeout)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::Timeout {
                    step: "apply roles and databases",
                    secs: timeout.as_secs(),
                })
            }
        };
        tracing::info!(
            rotated_superuser = report.rotated_superuser,
            roles_created = ?report.roles_created,
            databases_created = ?report.databases_created,
            passwords_removed = ?report.passwords_removed,
            roles_dropped = ?report.roles_dropped,
            roles_retained = ?report.roles_retained.iter().map(|r| &r.0).collect::<Vec<_>>(),
            "applied credentials, roles and databases"
        );
        record_retained_roles(ctx, branch, status, &report.roles_retained, now).await;
        let annotations =
            std::collections::BTreeMap::from([(ANNOTATION_SQL_APPLIED.to_string(), marker)]);
        apply_owned(
            ctx,
            build_credentials_secret(
                branch,
                app_secret_name(&name),
                &creds.app,
                &ctx.config.compute,
                annotations,
                creds.ca_pem.as_deref(),
            )?,
            uid,
        )
        .await?;
    }

    Ok(())
}
