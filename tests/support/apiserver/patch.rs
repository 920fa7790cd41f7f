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

fn parent_mut<'a>(doc: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, PatchError> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(t)
                .ok_or_else(|| PatchError::Apply(format!("path segment {t:?} not found")))?,
            Value::Array(a) => {
                let i: usize = t
                    .parse()
                    .map_err(|_| PatchError::Apply(format!("invalid array index {t:?}")))?;
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
            Value::Array(a) => a.get(t.parse::<usize>().ok()?)?,
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
            let i: usize = last
                .parse()
                .map_err(|_| PatchError::Apply(format!("invalid array index {last:?}")))?;
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

/// Leaf fields of `v` as JSON pointer → value. Objects are walked; arrays
/// and scalars are leaves (lists are atomic for field ownership).
pub fn leaves(v: &Value, prefix: &str, out: &mut std::collections::BTreeMap<String, Value>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                leaves(child, &format!("{prefix}/{}", escape(k)), out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

/// Removes the field at `pointer` if present, then removes parent objects
/// that became empty (down to, not including, the top level).
pub fn remove_path(doc: &mut Value, pointer: &str) {
    let Ok(tokens) = pointer_tokens(pointer) else {
        return;
    };
    if tokens.is_empty() {
        return;
    }
    let _ = remove(doc, &tokens);
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

/// Value at a JSON pointer.
pub fn get_path<'a>(doc: &'a Value, pointer: &str) -> Option<&'a Value> {
    get(doc, &pointer_tokens(pointer).ok()?)
}
