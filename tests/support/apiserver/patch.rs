//! JSON patch (RFC 6902), JSON merge patch (RFC 7386) and the field-path
//! helpers server-side apply uses. Written for the test API server only.

use serde_json::{Map, Value};

/// Why a JSON patch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The patch document is not a list of operations.
    #[error("invalid JSON patch: {0}")]
    Decode(String),
    /// An operation could not be applied (missing path, failed `test`).
    #[error("{0}")]
    Apply(String),
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// Splits an RFC 6901 pointer into unescaped tokens.
pub fn pointer_tokens(pointer: &str) -> Result<Vec<String>, PatchError> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let rest = pointer
        .strip_prefix('/')
        .ok_or_else(|| PatchError::Apply(format!("invalid pointer {pointer:?}")))?;
    Ok(rest.split('/').map(unescape).collect())
}

fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// The index of the element of an associative list (`x-kubernetes-list-type:
/// map`) named by a key token: the JSON object of its key fields, e.g.
/// `{"type":"Ready"}`. Used by server-side apply field paths only.
fn select(items: &[Value], token: &str) -> Option<usize> {
    if !token.starts_with('{') {
        return None;
    }
    let keys: Map<String, Value> = serde_json::from_str(token).ok()?;
    items
        .iter()
        .position(|item| keys.iter().all(|(k, v)| item.get(k) == Some(v)))
}

fn array_index(items: &[Value], token: &str) -> Option<usize> {
    select(items, token).or_else(|| token.parse().ok())
}

fn parent_mut<'a>(doc: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, PatchError> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(t)
                .ok_or_else(|| PatchError::Apply(format!("path segment {t:?} not found")))?,
            Value::Array(a) => {
                let i = array_index(a, t)
                    .ok_or_else(|| PatchError::Apply(format!("invalid array index {t:?}")))?;
                a.get_mut(i)
                    .ok_or_else(|| PatchError::Apply(format!("array index {i} out of bounds")))?
            }
            _ => return Err(PatchError::Apply(format!("path segment {t:?} not found"))),
        };
    }
    Ok(cur)
}

fn get<'a>(doc: &'a Value, tokens: &[String]) -> Option<&'a Value> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m.get(t)?,
            Value::Array(a) => a.get(array_index(a, t)?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn add(doc: &mut Value, tokens: &[String], value: Value) -> Result<(), PatchError> {
    let Some((last, parent)) = tokens.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent_mut(doc, parent)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
                return Ok(());
            }
            let i: usize = last
                .parse()
                .map_err(|_| PatchError::Apply(format!("invalid array index {last:?}")))?;
            if i > a.len() {
                return Err(PatchError::Apply(format!("array index {i} out of bounds")));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(PatchError::Apply(format!(
            "cannot add {last:?} to a scalar"
        ))),
    }
}

fn remove(doc: &mut Value, tokens: &[String]) -> Result<Value, PatchError> {
    let Some((last, parent)) = tokens.split_last() else {
        return Err(PatchError::Apply("cannot remove the whole document".into()));
    };
    match parent_mut(doc, parent)? {
        Value::Object(m) => m
            .remove(last)
            .ok_or_else(|| PatchError::Apply(format!("path {last:?} not found"))),
        Value::Array(a) => {
            let i = array_index(a, last)
                .ok_or_else(|| PatchError::Apply(format!("invalid array index {last:?}")))?;
            if i >= a.len() {
                return Err(PatchError::Apply(format!("array index {i} out of bounds")));
            }
            Ok(a.remove(i))
        }
        _ => Err(PatchError::Apply(format!("path {last:?} not found"))),
    }
}

/// Applies an RFC 6902 JSON patch; all or nothing.
pub fn json_patch(doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| PatchError::Decode("a JSON patch must be a list".into()))?;
    let mut out = doc.clone();
    for op in ops {
        let name = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or_else(|| PatchError::Decode("operation without \"op\"".into()))?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| PatchError::Decode("operation without \"path\"".into()))?;
        let tokens = pointer_tokens(path)?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| PatchError::Decode(format!("{name} operation without \"value\"")))
        };
        let from = || -> Result<Vec<String>, PatchError> {
            let f = op
                .get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| PatchError::Decode(format!("{name} operation without \"from\"")))?;
            pointer_tokens(f)
        };
        match name {
            "add" => add(&mut out, &tokens, value()?)?,
            "remove" => {
                remove(&mut out, &tokens)?;
            }
            "replace" => {
                let v = value()?;
                remove(&mut out, &tokens)?;
                add(&mut out, &tokens, v)?;
            }
            "move" => {
                let v = remove(&mut out, &from()?)?;
                add(&mut out, &tokens, v)?;
            }
            "copy" => {
                let v = get(&out, &from()?)
                    .cloned()
                    .ok_or_else(|| PatchError::Apply("copy source not found".into()))?;
                add(&mut out, &tokens, v)?;
            }
            "test" => {
                let expected = value()?;
                // As in the apiserver's JSON patch library, a missing
                // field tests equal to null (kube's finalizer helper
                // relies on it).
                let actual = get(&out, &tokens).unwrap_or(&Value::Null);
                if *actual != expected {
                    return Err(PatchError::Apply(format!(
                        "testing value {path} failed: the value is not {expected}"
                    )));
                }
            }
            other => return Err(PatchError::Decode(format!("unknown operation {other:?}"))),
        }
    }
    Ok(out)
}

/// Applies an RFC 7386 JSON merge patch (`null` deletes, objects merge,
/// everything else replaces).
pub fn merge_patch(doc: &mut Value, patch: &Value) {
    let Value::Object(pm) = patch else {
        *doc = patch.clone();
        return;
    };
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    if let Value::Object(dm) = doc {
        for (k, v) in pm {
            if v.is_null() {
                dm.remove(k);
            } else {
                merge_patch(dm.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// The schema of a property of an object schema.
pub fn child_schema<'a>(schema: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    let s = schema?;
    s.get("properties")
        .and_then(|p| p.get(key))
        .or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
}

/// The key fields of an associative list schema (`x-kubernetes-list-type:
/// map`), if it is one.
fn map_keys(schema: Option<&Value>) -> Option<Vec<String>> {
    let s = schema?;
    if s.get("x-kubernetes-list-type").and_then(Value::as_str) != Some("map") {
        return None;
    }
    let keys: Vec<String> = s
        .get("x-kubernetes-list-map-keys")?
        .as_array()?
        .iter()
        .filter_map(|k| k.as_str().map(String::from))
        .collect();
    (!keys.is_empty()).then_some(keys)
}

/// The key token of an element of an associative list.
fn key_token(item: &Value, keys: &[String]) -> Option<String> {
    let mut sel = Map::new();
    for k in keys {
        sel.insert(k.clone(), item.get(k)?.clone());
    }
    serde_json::to_string(&Value::Object(sel)).ok()
}

/// Leaf fields of `v` as JSON pointer → value. Objects are walked; so are
/// associative lists (`x-kubernetes-list-type: map` in `schema`), whose
/// elements are named by their keys; other lists and scalars are leaves.
pub fn leaves(
    v: &Value,
    schema: Option<&Value>,
    prefix: &str,
    out: &mut std::collections::BTreeMap<String, Value>,
) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                leaves(
                    child,
                    child_schema(schema, k),
                    &format!("{prefix}/{}", escape(k)),
                    out,
                );
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let keys = map_keys(schema);
            let tokens: Option<Vec<String>> = keys
                .as_ref()
                .and_then(|ks| items.iter().map(|i| key_token(i, ks)).collect());
            match tokens {
                Some(tokens) => {
                    let item_schema = schema.and_then(|s| s.get("items"));
                    for (item, token) in items.iter().zip(tokens) {
                        leaves(
                            item,
                            item_schema,
                            &format!("{prefix}/{}", escape(&token)),
                            out,
                        );
                    }
                }
                None => {
                    out.insert(prefix.to_string(), v.clone());
                }
            }
        }
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

/// Merges an applied configuration into a live object: objects merge,
/// associative lists merge element by element (matched by their keys),
/// `null` removes, everything else replaces.
pub fn merge_apply(live: &mut Value, cfg: &Value, schema: Option<&Value>) {
    match (&mut *live, cfg) {
        (Value::Object(lm), Value::Object(cm)) => {
            for (k, cv) in cm {
                if cv.is_null() {
                    lm.remove(k);
                    continue;
                }
                let sub = child_schema(schema, k);
                match lm.get_mut(k) {
                    Some(lv) => merge_apply(lv, cv, sub),
                    None => {
                        let mut fresh = Value::Null;
                        merge_apply(&mut fresh, cv, sub);
                        lm.insert(k.clone(), fresh);
                    }
                }
            }
        }
        (Value::Array(la), Value::Array(ca)) if map_keys(schema).is_some() => {
            let keys = map_keys(schema).unwrap_or_default();
            let item_schema = schema.and_then(|s| s.get("items"));
            for ce in ca {
                let found = key_token(ce, &keys).and_then(|t| select(la, &t));
                match found {
                    Some(i) => merge_apply(&mut la[i], ce, item_schema),
                    None => la.push(ce.clone()),
                }
            }
        }
        (l, Value::Object(_)) => {
            *l = Value::Object(Map::new());
            merge_apply(l, cfg, schema);
        }
        (l, c) => *l = c.clone(),
    }
}

/// A pointer's tokens with associative-list keys resolved to indices, if
/// the field exists.
fn resolve(doc: &Value, pointer: &str) -> Option<Vec<String>> {
    let tokens = pointer_tokens(pointer).ok()?;
    let mut resolved = Vec::with_capacity(tokens.len());
    let mut cur = doc;
    for t in &tokens {
        let (token, next) = match cur {
            Value::Object(m) => (t.clone(), m.get(t)?),
            Value::Array(a) => {
                let i = array_index(a, t)?;
                (i.to_string(), a.get(i)?)
            }
            _ => return None,
        };
        resolved.push(token);
        cur = next;
    }
    Some(resolved)
}

fn remove_resolved(doc: &mut Value, tokens: &[String]) {
    if tokens.is_empty() {
        return;
    }
    let _ = remove(doc, tokens);
    for depth in (1..tokens.len()).rev() {
        let parent = &tokens[..depth];
        match get(doc, parent) {
            Some(Value::Object(m)) if m.is_empty() => {
                let _ = remove(doc, parent);
            }
            _ => break,
        }
    }
}

fn cmp_tokens(a: &[String], b: &[String]) -> std::cmp::Ordering {
    for (x, y) in a.iter().zip(b) {
        let o = match (x.parse::<usize>(), y.parse::<usize>()) {
            (Ok(i), Ok(j)) => i.cmp(&j),
            _ => x.cmp(y),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

/// Removes the fields at `pointers` that are present (associative-list
/// elements addressed by key), then the objects and list elements that
/// became empty (down to, not including, the top level).
pub fn remove_paths(doc: &mut Value, pointers: &[String]) {
    let mut all: Vec<Vec<String>> = pointers.iter().filter_map(|p| resolve(doc, p)).collect();
    // Highest indices first, so removing an element never shifts another
    // path's index.
    all.sort_by(|a, b| cmp_tokens(b, a));
    all.dedup();
    for tokens in all {
        remove_resolved(doc, &tokens);
    }
}

/// Removes one field (see [`remove_paths`]).
pub fn remove_path(doc: &mut Value, pointer: &str) {
    remove_paths(doc, &[pointer.to_string()]);
}

/// Value at a JSON pointer.
pub fn get_path<'a>(doc: &'a Value, pointer: &str) -> Option<&'a Value> {
    get(doc, &pointer_tokens(pointer).ok()?)
}
