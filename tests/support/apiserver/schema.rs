//! What a real apiserver does with a CRD's structural `openAPIV3Schema` on
//! every write of a custom resource: drop nulls of non-nullable fields,
//! prune unknown fields, apply defaults, check types / required / enum /
//! bounds, then evaluate the CEL `x-kubernetes-validations` rules (with the
//! old object for transition rules) through kube's client-side CEL engine.

use serde_json::{Map, Value};

/// One validation failure, as a Status cause.
#[derive(Debug, Clone)]
pub struct Cause {
    /// `FieldValueRequired`, `FieldValueInvalid`, ...
    pub reason: &'static str,
    /// The field path, e.g. `spec.parent.lsn`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn preserve_unknown(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Drops nulls of non-nullable fields and unknown fields, in place.
fn prune(schema: &Value, value: &mut Value, root: bool) {
    match value {
        Value::Object(m) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let embedded = schema
                .get("x-kubernetes-embedded-resource")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let keep_unknown =
                preserve_unknown(schema) || (props.is_none() && additional.is_none());
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                if (root || embedded) && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let sub = props.and_then(|p| p.get(&k)).or(additional);
                match sub {
                    Some(s) => {
                        let nullable = s.get("nullable").and_then(Value::as_bool).unwrap_or(false);
                        if m.get(&k).is_some_and(Value::is_null) && !nullable {
                            m.remove(&k);
                        } else if let Some(child) = m.get_mut(&k) {
                            prune(s, child, false);
                        }
                    }
                    None if keep_unknown => {}
                    None => {
                        m.remove(&k);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for item in items {
                    prune(s, item, false);
                }
            }
        }
        _ => {}
    }
}

fn type_ok(schema: &Value, v: &Value) -> bool {
    if v.is_null() {
        return schema
            .get("nullable")
            .and_then(Value::as_bool)
            .unwrap_or(false);
    }
    if schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        return v.is_string() || v.is_i64() || v.is_u64();
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    }
}

fn check(schema: &Value, v: &Value, path: &str, out: &mut Vec<Cause>) {
    let shown = if path.is_empty() { "<root>" } else { path };
    if !type_ok(schema, v) {
        out.push(Cause {
            reason: "FieldValueTypeInvalid",
            field: path.into(),
            message: format!(
                "{shown}: Invalid value: {v}: must be of type {}",
                schema.get("type").and_then(Value::as_str).unwrap_or("?")
            ),
        });
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !v.is_null() && !allowed.contains(v) {
            out.push(Cause {
                reason: "FieldValueNotSupported",
                field: path.into(),
                message: format!(
                    "{shown}: Unsupported value: {v}: supported values: {}",
                    Value::Array(allowed.clone())
                ),
            });
        }
    }
    let num = |k: &str| schema.get(k).and_then(Value::as_f64);
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as f64;
        if num("maxLength").is_some_and(|m| len > m) || num("minLength").is_some_and(|m| len < m) {
            out.push(Cause {
                reason: "FieldValueInvalid",
                field: path.into(),
                message: format!(
                    "{shown}: Invalid value: {v}: length must be within the schema bounds"
                ),
            });
        }
    }
    if let Some(x) = v.as_f64() {
        if num("maximum").is_some_and(|m| x > m) || num("minimum").is_some_and(|m| x < m) {
            out.push(Cause {
                reason: "FieldValueInvalid",
                field: path.into(),
                message: format!("{shown}: Invalid value: {v}: must be within the schema bounds"),
            });
        }
    }
    match v {
        Value::Object(m) => {
            if let Some(req) = schema.get("required").and_then(Value::as_array) {
                for r in req.iter().filter_map(Value::as_str) {
                    if !m.contains_key(r) {
                        out.push(Cause {
                            reason: "FieldValueRequired",
                            field: join(path, r),
                            message: format!("{}: Required value", join(path, r)),
                        });
                    }
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, child) in m {
                if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(s) = props.and_then(|p| p.get(k)).or(additional) {
                    check(s, child, &join(path, k), out);
                }
            }
            if let Some(max) = num("maxProperties") {
                if m.len() as f64 > max {
                    out.push(Cause {
                        reason: "TooMany",
                        field: path.into(),
                        message: format!(
                            "{shown}: Too many: {}: must have at most {max} items",
                            m.len()
                        ),
                    });
                }
            }
        }
        Value::Array(items) => {
            if num("maxItems").is_some_and(|m| items.len() as f64 > m) {
                out.push(Cause {
                    reason: "TooMany",
                    field: path.into(),
                    message: format!(
                        "{shown}: Too many: {}: must have at most {} items",
                        items.len(),
                        num("maxItems").unwrap_or(0.0)
                    ),
                });
            }
            if num("minItems").is_some_and(|m| (items.len() as f64) < m) {
                out.push(Cause {
                    reason: "FieldValueInvalid",
                    field: path.into(),
                    message: format!(
                        "{shown}: Invalid value: must have at least {} items",
                        num("minItems").unwrap_or(0.0)
                    ),
                });
            }
            if let Some(s) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(s, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// Prunes, defaults and validates `obj` (a whole custom resource) against
/// `schema`; `old` is the stored object on updates. Returns the object as
/// it would be stored, or the causes of refusal.
pub fn admit(schema: &Value, obj: &Value, old: Option<&Value>) -> Result<Value, Vec<Cause>> {
    let mut pruned = obj.clone();
    prune(schema, &mut pruned, true);
    let defaulted = kube::core::cel::apply_defaults(schema, &pruned);
    let mut causes = Vec::new();
    check(schema, &defaulted, "", &mut causes);
    if !causes.is_empty() {
        return Err(causes);
    }
    let old = old.map(|o| kube::core::cel::apply_defaults(schema, o));
    if let Err(errors) =
        kube::core::cel::Validator::new().validate(schema, &defaulted, old.as_ref())
    {
        return Err(errors
            .into_vec()
            .into_iter()
            .map(|e| Cause {
                reason: "FieldValueInvalid",
                field: e.field_path.clone(),
                message: if e.field_path.is_empty() {
                    format!("<root>: Invalid value: {}", e.message)
                } else {
                    format!("{}: Invalid value: {}", e.field_path, e.message)
                },
            })
            .collect());
    }
    Ok(defaulted)
}

/// The `openAPIV3Schema` of each version of a CRD object.
pub fn schemas_of(crd: &Value) -> Map<String, Value> {
    let mut out = Map::new();
    if let Some(versions) = crd.pointer("/spec/versions").and_then(Value::as_array) {
        for v in versions {
            if let (Some(name), Some(s)) = (
                v.get("name").and_then(Value::as_str),
                v.pointer("/schema/openAPIV3Schema"),
            ) {
                out.insert(name.to_string(), s.clone());
            }
        }
    }
    out
}
