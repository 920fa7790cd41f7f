//! ValidatingAdmissionPolicy evaluation (admissionregistration.k8s.io/v1),
//! through kube's client-side CEL engine.

use kube::core::cel::{
    AdmissionRequest, GroupVersionKind, GroupVersionResource, VapEvaluator, VapExpression,
};
use serde_json::{Map, Value};

/// What is being admitted.
pub struct Attributes<'a> {
    /// `CREATE`, `UPDATE` or `DELETE`.
    pub operation: &'a str,
    pub group: &'a str,
    pub version: &'a str,
    pub kind: &'a str,
    /// Resource plural, with `/status` for the status subresource.
    pub resource: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub object: Option<&'a Value>,
    pub old_object: Option<&'a Value>,
    /// The namespace object, for namespaced resources.
    pub namespace_object: Option<&'a Value>,
    pub dry_run: bool,
}

/// A denial: HTTP code, Status reason, message.
pub struct Denial {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

fn strs(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn any_or(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == "*" || x == want)
}

fn resource_matches(patterns: &[String], resource: &str) -> bool {
    let (main, sub) = match resource.split_once('/') {
        Some((m, s)) => (m, Some(s)),
        None => (resource, None),
    };
    patterns.iter().any(|p| match (p.split_once('/'), sub) {
        (None, None) => p == "*" || p == main,
        (None, Some(_)) => false,
        (Some((pm, ps)), Some(s)) => (pm == "*" || pm == main) && (ps == "*" || ps == s),
        (Some(_), None) => false,
    })
}

fn rule_matches(rule: &Value, a: &Attributes) -> bool {
    let names = strs(rule.get("resourceNames"));
    any_or(&strs(rule.get("apiGroups")), a.group)
        && any_or(&strs(rule.get("apiVersions")), a.version)
        && any_or(&strs(rule.get("operations")), a.operation)
        && resource_matches(&strs(rule.get("resources")), a.resource)
        && (names.is_empty() || names.iter().any(|n| n == a.name))
}

/// `metav1.LabelSelector` matching (matchLabels and matchExpressions).
pub fn selector_matches(sel: Option<&Value>, labels: &Map<String, Value>) -> bool {
    let Some(sel) = sel else {
        return true;
    };
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    if let Some(ml) = sel.get("matchLabels").and_then(Value::as_object) {
        if ml.iter().any(|(k, v)| get(k) != v.as_str()) {
            return false;
        }
    }
    if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
        for e in exprs {
            let key = e.get("key").and_then(Value::as_str).unwrap_or("");
            let values = strs(e.get("values"));
            let ok = match e.get("operator").and_then(Value::as_str) {
                Some("In") => get(key).is_some_and(|v| values.iter().any(|x| x == v)),
                Some("NotIn") => !get(key).is_some_and(|v| values.iter().any(|x| x == v)),
                Some("Exists") => get(key).is_some(),
                Some("DoesNotExist") => get(key).is_none(),
                _ => false,
            };
            if !ok {
                return false;
            }
        }
    }
    true
}

fn labels_of(v: Option<&Value>) -> Map<String, Value> {
    v.and_then(|o| o.pointer("/metadata/labels"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

/// Whether `matchConstraints` / `matchResources` select this request.
fn resources_match(m: &Value, a: &Attributes) -> bool {
    let rules = m.get("resourceRules").and_then(Value::as_array);
    let included = rules.is_none_or(|rs| rs.iter().any(|r| rule_matches(r, a)));
    let excluded = m
        .get("excludeResourceRules")
        .and_then(Value::as_array)
        .is_some_and(|rs| rs.iter().any(|r| rule_matches(r, a)));
    if !included || excluded {
        return false;
    }
    if !a.namespace.is_empty()
        && !selector_matches(m.get("namespaceSelector"), &labels_of(a.namespace_object))
    {
        return false;
    }
    let obj_sel = m.get("objectSelector");
    selector_matches(obj_sel, &labels_of(a.object))
        || selector_matches(obj_sel, &labels_of(a.old_object))
}

fn reason_code(reason: Option<&str>) -> (u16, &'static str) {
    match reason {
        Some("Forbidden") => (403, "Forbidden"),
        Some("Unauthorized") => (401, "Unauthorized"),
        Some("RequestEntityTooLarge") => (413, "RequestEntityTooLarge"),
        _ => (422, "Invalid"),
    }
}

fn expressions(list: Option<&Value>, field: &str) -> Vec<(VapExpression, Option<String>)> {
    list.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|v| {
                    (
                        VapExpression {
                            expression: v
                                .get(field)
                                .and_then(Value::as_str)
                                .unwrap_or("false")
                                .to_string(),
                            message: v.get("message").and_then(Value::as_str).map(String::from),
                            message_expression: v
                                .get("messageExpression")
                                .and_then(Value::as_str)
                                .map(String::from),
                        },
                        v.get("reason").and_then(Value::as_str).map(String::from),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Evaluates every binding with a `Deny` action against the request.
/// `lookup_policy` finds a policy object by name.
pub fn check(
    bindings: &[Value],
    lookup_policy: impl Fn(&str) -> Option<Value>,
    a: &Attributes,
) -> Result<(), Denial> {
    for binding in bindings {
        let bname = binding
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let spec = binding.get("spec").cloned().unwrap_or(Value::Null);
        if !strs(spec.get("validationActions"))
            .iter()
            .any(|x| x == "Deny")
        {
            continue;
        }
        let pname = spec.get("policyName").and_then(Value::as_str).unwrap_or("");
        let Some(policy) = lookup_policy(pname) else {
            continue;
        };
        let pspec = policy.get("spec").cloned().unwrap_or(Value::Null);
        if pspec.get("paramKind").is_some() {
            continue; // parameterised policies are not supported
        }
        let constraints = pspec
            .get("matchConstraints")
            .cloned()
            .unwrap_or(Value::Null);
        if !resources_match(&constraints, a) {
            continue;
        }
        if let Some(mr) = spec.get("matchResources") {
            if !resources_match(mr, a) {
                continue;
            }
        }
        let fail_closed = pspec.get("failurePolicy").and_then(Value::as_str) != Some("Ignore");
        let mut builder = VapEvaluator::builder()
            .object(a.object.cloned().unwrap_or(Value::Null))
            .request(AdmissionRequest {
                operation: a.operation.into(),
                username: "system:admin".into(),
                uid: String::new(),
                groups: vec!["system:masters".into(), "system:authenticated".into()],
                name: a.name.into(),
                namespace: a.namespace.into(),
                dry_run: a.dry_run,
                kind: GroupVersionKind {
                    group: a.group.into(),
                    version: a.version.into(),
                    kind: a.kind.into(),
                },
                resource: GroupVersionResource {
                    group: a.group.into(),
                    version: a.version.into(),
                    resource: a.resource.split('/').next().unwrap_or("").into(),
                },
            });
        if let Some(old) = a.old_object {
            builder = builder.old_object(old.clone());
        }
        if let Some(ns) = a.namespace_object {
            builder = builder.namespace_object(ns.clone());
        }
        let eval = builder.build();
        let is_error = |m: &Option<String>| {
            m.as_deref().is_some_and(|m| {
                m.starts_with("evaluation error")
                    || m.starts_with("expression returned non-boolean")
                    || m.starts_with("failed to compile")
            })
        };
        let denied = |message: String, reason: Option<&str>| {
            let (code, reason) = reason_code(reason);
            Denial {
                code,
                reason,
                message: format!("ValidatingAdmissionPolicy '{pname}' with binding '{bname}' denied request: {message}"),
            }
        };
        // matchConditions: all must hold for the policy to apply.
        let conditions = expressions(pspec.get("matchConditions"), "expression");
        let exprs: Vec<VapExpression> = conditions.iter().map(|(e, _)| e.clone()).collect();
        let mut applies = true;
        for r in eval.evaluate(&exprs) {
            if !r.passed {
                if is_error(&r.message) && fail_closed {
                    return Err(denied(r.message.unwrap_or_default(), None));
                }
                applies = false;
            }
        }
        if !applies {
            continue;
        }
        let validations = expressions(pspec.get("validations"), "expression");
        let exprs: Vec<VapExpression> = validations.iter().map(|(e, _)| e.clone()).collect();
        for (r, (_, reason)) in eval.evaluate(&exprs).into_iter().zip(validations.iter()) {
            if r.passed || (is_error(&r.message) && !fail_closed) {
                continue;
            }
            return Err(denied(r.message.unwrap_or_default(), reason.as_deref()));
        }
    }
    Ok(())
}
