//! Server-side apply of owned objects with one field manager, skipped when
//! the object already carries the desired content's hash and nobody changed
//! what we set (no write in steady state), and a check that the object is
//! ours to change.
//!
//! Drift: every field the desired object sets is compared with the live
//! object ([`drift`]); a hand edit of one of them (a Service's selector, a
//! Deployment's image, a Secret's password) is put back at the next
//! reconcile — owned objects are watched, so within seconds — with an Event
//! on the owner naming the fields that were reverted. Fields we do not set
//! (defaults, what other controllers add) are left alone.

use std::fmt::Debug;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::{with_deadline, Context, Error, Object};
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
    K: Object,
{
    let ns = desired.namespace().unwrap_or_default();
    let name = desired.name_any();
    let api: Api<K> = ctx.api(&ns);
    let mut desired = stamp_hash(desired);
    if let Some(existing) = ctx.get::<K>(&ns, "read child object", &name).await? {
        desired = keep_immutable(desired, &existing)?;
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
            let changed = drift(
                &serde_json::to_value(&desired)?,
                &serde_json::to_value(&existing)?,
            );
            if changed.is_empty() {
                return Ok(existing);
            }
            revert_event(ctx, &desired, &changed).await;
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

/// Whether applying `desired` would change `live`: its content changed
/// since it was last applied, or someone changed what it sets.
pub fn needs_apply<K>(desired: &K, live: &K) -> bool
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned,
{
    let desired = stamp_hash(desired.clone());
    let Ok(desired) = keep_immutable(desired, live) else {
        return true;
    };
    if !is_up_to_date(live, &desired) {
        return true;
    }
    match (serde_json::to_value(&desired), serde_json::to_value(live)) {
        (Ok(d), Ok(l)) => !drift(&d, &l).is_empty(),
        _ => true,
    }
}

/// A Deployment's `spec.selector` cannot change: one made before the
/// selectors changed keeps its own (its pods carry both label sets).
fn keep_immutable<K>(desired: K, existing: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned,
{
    if K::kind(&()) != "Deployment" {
        return Ok(desired);
    }
    let live = serde_json::to_value(existing)?;
    let mut want = serde_json::to_value(&desired)?;
    let live_sel = &live["spec"]["selector"];
    if live_sel.is_null() || *live_sel == want["spec"]["selector"] {
        return Ok(desired);
    }
    want["spec"]["selector"] = live_sel.clone();
    Ok(serde_json::from_value(want)?)
}

/// Tells the owner of `desired` (its controller reference) that a hand edit
/// of these fields is being put back.
async fn revert_event<K>(ctx: &Context, desired: &K, fields: &[String])
where
    K: Resource<DynamicType = ()>,
{
    let kind = K::kind(&()).to_string();
    let name = desired.name_any();
    tracing::info!(%kind, namespace = ?desired.namespace(), %name, ?fields, "reverting a change made by hand");
    let Some(owner) = desired
        .meta()
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return;
    };
    let regarding = ObjectReference {
        api_version: Some(owner.api_version.clone()),
        kind: Some(owner.kind.clone()),
        name: Some(owner.name.clone()),
        namespace: desired.namespace(),
        uid: Some(owner.uid.clone()),
        ..Default::default()
    };
    let mut note = format!(
        "{kind} {name} was changed outside the operator ({}); put back",
        fields.join(", ")
    );
    // Event notes are limited to 1 KiB.
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    // The reverted object as the related one: Events of one reason on one
    // owner are folded into a series unless they relate to different
    // objects.
    let related = ObjectReference {
        api_version: Some(K::api_version(&()).to_string()),
        kind: Some(kind.clone()),
        name: Some(name.clone()),
        namespace: desired.namespace(),
        ..Default::default()
    };
    let ev = Event {
        type_: EventType::Warning,
        reason: "DriftReverted".into(),
        note: Some(note),
        action: "Revert".into(),
        secondary: Some(related),
    };
    if let Err(e) = ctx.recorder.publish(&ev, &regarding).await {
        tracing::warn!(error = %e, "could not publish event");
    }
}

/// The fields `desired` sets that `live` lacks or holds otherwise, as
/// dotted paths (`spec.selector.pgbranch.dev/timeline`,
/// `spec.template.spec.containers[0].image`). Only `metadata.labels`,
/// `metadata.annotations` and `metadata.ownerReferences` of the metadata
/// are compared; a field `desired` leaves out or empty is never drift, nor
/// a zero value (`false`, `0`, `""`) the live object omits;
/// lists must have the same length and match element by element;
/// quantities (`"1Gi"` and `"1024Mi"`) compare by value, as the apiserver
/// normalizes them.
pub fn drift(desired: &Value, live: &Value) -> Vec<String> {
    let mut out = vec![];
    let (Value::Object(d), Value::Object(l)) = (desired, live) else {
        return out;
    };
    for (k, dv) in d {
        match k.as_str() {
            "apiVersion" | "kind" | "status" => {}
            "metadata" => {
                for f in ["labels", "annotations", "ownerReferences"] {
                    diff_into(
                        &dv[f],
                        &l.get("metadata").map_or(Value::Null, |m| m[f].clone()),
                        &format!("metadata.{f}"),
                        &mut out,
                    );
                }
            }
            _ => diff_into(dv, l.get(k).unwrap_or(&Value::Null), k, &mut out),
        }
    }
    out
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// A zero value the apiserver drops on the way to storage (Go's
/// `omitempty`): `false`, `0`, `""`.
fn is_zero(v: &Value) -> bool {
    match v {
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

fn diff_into(d: &Value, l: &Value, path: &str, out: &mut Vec<String>) {
    if is_empty(d) || (l.is_null() && is_zero(d)) {
        return;
    }
    match (d, l) {
        (Value::Object(dm), Value::Object(lm)) => {
            for (k, dv) in dm {
                diff_into(
                    dv,
                    lm.get(k).unwrap_or(&Value::Null),
                    &format!("{path}.{k}"),
                    out,
                );
            }
        }
        (Value::Array(da), Value::Array(la)) if da.len() == la.len() => {
            for (i, (dv, lv)) in da.iter().zip(la).enumerate() {
                diff_into(dv, lv, &format!("{path}[{i}]"), out);
            }
        }
        (Value::String(a), Value::String(b)) if a != b => {
            if !matches!((quantity(a), quantity(b)), (Some(x), Some(y)) if (x - y).abs() <= x.abs() * 1e-9)
            {
                out.push(path.to_string());
            }
        }
        _ if d == l => {}
        (Value::String(_), Value::String(_)) => {}
        _ => out.push(path.to_string()),
    }
}

/// A Kubernetes quantity (`250m`, `1.5Gi`, `2e3`) as a number.
fn quantity(s: &str) -> Option<f64> {
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (num, mult) = SUFFIXES
        .iter()
        .find_map(|(sfx, m)| s.strip_suffix(sfx).map(|n| (n, *m)))
        .unwrap_or((s, 1.0));
    if num.is_empty()
        || !num.starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == '-' || c == '+')
    {
        return None;
    }
    num.parse::<f64>().ok().map(|n| n * mult)
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
    K: Object,
{
    let api: Api<K> = ctx.api(ns);
    // A cached "not there" is enough: if the object does appear, its watch
    // event wakes the owner, which deletes it then.
    let Some(existing) = ctx.get_cached::<K>(ns, "read child object", name).await? else {
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
    Ok(ctx.get::<K>(ns, "read child object", name).await?.is_none())
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
    fn drift_sees_hand_edits_of_what_we_set_only() {
        use serde_json::json;
        let desired = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "main", "labels": {"pgbranch.dev/branch": "main"},
                         "annotations": {}},
            "spec": {"selector": {"pgbranch.dev/timeline": "a1", "pgbranch.dev/role": "primary"},
                     "ports": [{"name": "postgres", "port": 5432, "targetPort": 5432}]},
        });
        let mut live = desired.clone();
        // What the apiserver and other controllers add is not drift.
        live["metadata"]["uid"] = json!("u");
        live["metadata"]["labels"]["team"] = json!("a");
        live["spec"]["clusterIP"] = json!("10.0.0.7");
        live["spec"]["ports"][0]["protocol"] = json!("TCP");
        live["status"] = json!({"loadBalancer": {}});
        assert!(drift(&desired, &live).is_empty());
        // A `false` the apiserver dropped (omitempty) is not drift either.
        let mut d2 = desired.clone();
        d2["spec"]["publishNotReadyAddresses"] = json!(false);
        assert!(drift(&d2, &live).is_empty());
        live["spec"]["publishNotReadyAddresses"] = json!(true);
        assert_eq!(drift(&d2, &live), vec!["spec.publishNotReadyAddresses"]);
        live["spec"]
            .as_object_mut()
            .unwrap()
            .remove("publishNotReadyAddresses");
        // A hand edit of the selector is.
        live["spec"]["selector"]["pgbranch.dev/timeline"] = json!("zz");
        assert_eq!(
            drift(&desired, &live),
            vec!["spec.selector.pgbranch.dev/timeline".to_string()]
        );
        // So is a removed label, and an extra port.
        live["spec"]["selector"]["pgbranch.dev/timeline"] = json!("a1");
        live["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove("pgbranch.dev/branch");
        live["spec"]["ports"]
            .as_array_mut()
            .unwrap()
            .push(json!({"port": 80}));
        assert_eq!(
            drift(&desired, &live),
            vec![
                "metadata.labels.pgbranch.dev/branch".to_string(),
                "spec.ports".to_string()
            ]
        );
    }

    #[test]
    fn quantities_compare_by_value() {
        use serde_json::json;
        let d = json!({"spec": {"r": {"memory": "1024Mi", "cpu": "0.5", "n": "7"}}});
        let l = json!({"spec": {"r": {"memory": "1Gi", "cpu": "500m", "n": "7"}}});
        assert!(drift(&d, &l).is_empty());
        let l = json!({"spec": {"r": {"memory": "2Gi", "cpu": "500m", "n": "8"}}});
        assert_eq!(drift(&d, &l), vec!["spec.r.memory", "spec.r.n"]);
        assert_eq!(quantity("abc"), None);
        assert_eq!(quantity("Mi"), None);
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
