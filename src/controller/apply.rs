//! Server-side apply of owned objects with one field manager, skipped when
//! the object already carries the desired content's hash (no write in steady
//! state), and a check that the object is ours to change.

use std::fmt::Debug;

use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{with_deadline, Context, Error};
use crate::api::FIELD_MANAGER;
use crate::compute::{is_up_to_date, stamp_hash};

/// Labels and annotations that say a GitOps tool or Helm manages an object:
/// such an object is reported, never adopted.
const FOREIGN_MARKERS: &[&str] = &[
    "app.kubernetes.io/instance",
    "argocd.argoproj.io/instance",
    "argocd.argoproj.io/tracking-id",
    "meta.helm.sh/release-name",
    "kustomize.toolkit.fluxcd.io/name",
    "helm.toolkit.fluxcd.io/name",
];

/// Who holds an existing object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Controlled by the given owner.
    Owner,
    /// No controller and no GitOps tool: may be adopted.
    Nobody,
    /// Someone else: described for the Stalled message.
    Other(String),
}

/// Who holds `obj`, from the point of view of the owner with `owner_uid`.
pub fn holder<K: Resource>(obj: &K, owner_uid: &str) -> Holder {
    let meta = obj.meta();
    if let Some(c) = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    {
        return if c.uid == owner_uid {
            Holder::Owner
        } else {
            Holder::Other(format!("controlled by {} {}", c.kind, c.name))
        };
    }
    let marked = FOREIGN_MARKERS.iter().find(|m| {
        meta.labels.as_ref().is_some_and(|l| l.contains_key(**m))
            || meta
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(**m))
    });
    match marked {
        Some(m) => Holder::Other(format!("managed by another tool ({m})")),
        None => Holder::Nobody,
    }
}

/// Applies `desired` (stamped with its hash) unless the live object already
/// matches; adopts an object nobody controls; refuses, as Stalled
/// `ObjectConflict`, one that belongs to someone else. Returns the live
/// object.
pub async fn apply_owned<K>(ctx: &Context, desired: K, owner_uid: &str) -> Result<K, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
{
    let ns = desired.namespace().unwrap_or_default();
    let name = desired.name_any();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let desired = stamp_hash(desired);
    if let Some(existing) = with_deadline(ctx, "read child object", api.get_opt(&name)).await? {
        if let Holder::Other(who) = holder(&existing, owner_uid) {
            return Err(Error::stalled(
                "ObjectConflict",
                format!(
                    "{} {ns}/{name} already exists and is {who}; rename or remove it",
                    K::kind(&())
                ),
            ));
        }
        if is_up_to_date(&existing, &desired) {
            return Ok(existing);
        }
    }
    tracing::info!(kind = %K::kind(&()), namespace = %ns, name = %name, "applying");
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let live = with_deadline(
        ctx,
        "apply child object",
        api.patch(&name, &params, &Patch::Apply(&desired)),
    )
    .await?;
    Ok(live)
}

/// Deletes an object if it exists and is controlled by `owner_uid`.
/// Returns true when it is gone (or was never there).
pub async fn delete_owned<K>(
    ctx: &Context,
    ns: &str,
    name: &str,
    owner_uid: &str,
) -> Result<bool, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let Some(existing) = with_deadline(ctx, "read child object", api.get_opt(name)).await? else {
        return Ok(true);
    };
    if holder(&existing, owner_uid) != Holder::Owner {
        // Not ours: leave it alone.
        return Ok(true);
    }
    if existing.meta().deletion_timestamp.is_none() {
        tracing::info!(kind = %K::kind(&()), namespace = %ns, name = %name, "deleting");
        match with_deadline(
            ctx,
            "delete child object",
            api.delete(name, &DeleteParams::background()),
        )
        .await
        {
            Ok(_) => {}
            Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => return Ok(true),
            Err(e) => return Err(e),
        }
    }
    Ok(with_deadline(ctx, "read child object", api.get_opt(name))
        .await?
        .is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use std::collections::BTreeMap;

    fn svc(owner: Option<&str>, labels: &[(&str, &str)]) -> Service {
        let mut s = Service::default();
        s.metadata.name = Some("dev".into());
        s.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        );
        if let Some(uid) = owner {
            s.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "pgbranch.dev/v1alpha1".into(),
                kind: "Branch".into(),
                name: "dev".into(),
                uid: uid.into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]);
        }
        s
    }

    #[test]
    fn holder_tells_ours_free_and_foreign() {
        assert_eq!(holder(&svc(Some("u1"), &[]), "u1"), Holder::Owner);
        assert!(matches!(
            holder(&svc(Some("u2"), &[]), "u1"),
            Holder::Other(_)
        ));
        assert_eq!(holder(&svc(None, &[("team", "a")]), "u1"), Holder::Nobody);
        assert!(matches!(
            holder(&svc(None, &[("argocd.argoproj.io/instance", "x")]), "u1"),
            Holder::Other(_)
        ));
    }
}
