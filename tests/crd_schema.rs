//! The generated CRDs are ones a real apiserver accepts and serves well:
//! structural schemas, rules that compile and stay cheap, status subresource,
//! printer columns, short names, and a description on every field (they are
//! `kubectl explain`).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use pgbranch::cli::crd::crds;
use serde_json::Value;

fn schema(crd: &CustomResourceDefinition) -> Value {
    let version = &crd.spec.versions[0];
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("schema");
    serde_json::to_value(schema).unwrap()
}

fn crd(kind: &str) -> CustomResourceDefinition {
    crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"))
}

/// Calls `f(path, node)` for every schema node.
fn walk(path: &str, node: &Value, f: &mut dyn FnMut(&str, &Value)) {
    f(path, node);
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            walk(&format!("{path}.{name}"), child, f);
        }
    }
    if let Some(items) = node.get("items") {
        walk(&format!("{path}[]"), items, f);
    }
    if let Some(add) = node.get("additionalProperties").filter(|a| a.is_object()) {
        walk(&format!("{path}{{}}"), add, f);
    }
}

fn is_true(node: &Value, key: &str) -> bool {
    node.get(key).and_then(Value::as_bool) == Some(true)
}

/// The parts of "structural schema" (apiextensions) a derive can get wrong.
#[test]
fn schemas_are_structural() {
    for crd in crds() {
        let kind = crd.spec.names.kind.clone();
        let mut problems = Vec::new();
        walk("", &schema(&crd), &mut |path, node| {
            let int_or_string = is_true(node, "x-kubernetes-int-or-string");
            let preserve = is_true(node, "x-kubernetes-preserve-unknown-fields");
            for forbidden in [
                "$ref",
                "$schema",
                "definitions",
                "$defs",
                "anyOf",
                "oneOf",
                "allOf",
                "not",
            ] {
                if node.get(forbidden).is_some() {
                    problems.push(format!("{path}: has {forbidden}"));
                }
            }
            let ty = node.get("type").and_then(Value::as_str);
            if ty.is_none() && !int_or_string && !preserve {
                problems.push(format!("{path}: no type"));
            }
            if ty == Some("object") {
                let props = node.get("properties").is_some();
                let add = node.get("additionalProperties");
                if !props && add.is_none() && !preserve {
                    problems.push(format!(
                        "{path}: object without properties (everything would be pruned)"
                    ));
                }
                if props && add.is_some() {
                    problems.push(format!("{path}: both properties and additionalProperties"));
                }
                if add == Some(&Value::Bool(false)) {
                    problems.push(format!("{path}: additionalProperties: false"));
                }
            }
            if ty == Some("array") && node.get("items").is_none() {
                problems.push(format!("{path}: array without items"));
            }
            if node.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
                let required: Vec<&str> = node["items"]["required"]
                    .as_array()
                    .map(|r| r.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                for key in node["x-kubernetes-list-map-keys"].as_array().unwrap() {
                    if !required.contains(&key.as_str().unwrap()) {
                        problems.push(format!("{path}: list-map key {key} is not required"));
                    }
                }
            }
        });
        assert!(problems.is_empty(), "{kind}: {problems:#?}");
    }
}

#[test]
fn every_field_is_described() {
    for crd in crds() {
        let kind = crd.spec.names.kind.clone();
        let mut missing = Vec::new();
        walk("", &schema(&crd), &mut |path, node| {
            let described = node
                .get("description")
                .and_then(Value::as_str)
                .is_some_and(|d| !d.trim().is_empty());
            // Map values ({}) and list items ([]) are described by their field.
            if !path.is_empty() && !path.ends_with("{}") && !path.ends_with("[]") && !described {
                missing.push(path.to_string());
            }
        });
        assert!(
            missing.is_empty(),
            "{kind}: fields without a description: {missing:#?}"
        );
    }
}

#[test]
fn rules_compile_have_plain_messages_and_bounded_strings() {
    for crd in crds() {
        let kind = crd.spec.names.kind.clone();
        let mut problems = Vec::new();
        let mut count = 0;
        walk("", &schema(&crd), &mut |path, node| {
            let Some(rules) = node
                .get("x-kubernetes-validations")
                .and_then(Value::as_array)
            else {
                return;
            };
            // Compile this node's rules on their own.
            let mut alone = node.clone();
            alone.as_object_mut().unwrap().remove("properties");
            let compiled = kube::core::cel::compile_schema(&alone);
            for e in compiled.compilation_errors() {
                problems.push(format!("{path}: does not compile: {e}"));
            }
            for rule in rules {
                count += 1;
                let text = rule["rule"].as_str().unwrap();
                let message = rule.get("message").and_then(Value::as_str);
                if message.is_none_or(|m| m.trim().is_empty() || m.contains('\n')) {
                    problems.push(format!("{path}: {text:?} needs a one-line message"));
                }
                // ARCHITECTURE.md, "CEL rules a real apiserver accepts": a
                // real apiserver refuses string(<int>) in messageExpression
                // and drops oldSelf ones under optionalOldSelf.
                if let Some(expr) = rule.get("messageExpression").and_then(Value::as_str) {
                    if expr.contains("string(") {
                        problems.push(format!("{path}: messageExpression uses string(): {expr}"));
                    }
                    if is_true(rule, "optionalOldSelf") && expr.contains("oldSelf") {
                        problems.push(format!(
                            "{path}: messageExpression reads oldSelf under optionalOldSelf"
                        ));
                    }
                }
                // Regexes over unbounded strings blow the apiserver's cost
                // estimate; metadata.name is bounded by the apiserver itself.
                let on_string = node.get("type").and_then(Value::as_str) == Some("string");
                if on_string && text.contains("matches(") && node.get("maxLength").is_none() {
                    problems.push(format!(
                        "{path}: {text:?} runs a regex on a string without maxLength"
                    ));
                }
            }
        });
        assert!(problems.is_empty(), "{kind}: {problems:#?}");
        assert!(count >= 4, "{kind}: only {count} rules");
    }
}

/// Transition rules must sit where old and new values correlate: not inside
/// a list (apiserver: only map-lists correlate; we keep them out of lists).
#[test]
fn transition_rules_are_outside_lists() {
    for crd in crds() {
        walk("", &schema(&crd), &mut |path, node| {
            if let Some(rules) = node
                .get("x-kubernetes-validations")
                .and_then(Value::as_array)
            {
                for rule in rules {
                    let text = rule["rule"].as_str().unwrap();
                    if text.contains("oldSelf") {
                        assert!(
                            !path.contains("[]"),
                            "{path}: transition rule in a list: {text}"
                        );
                    }
                }
            }
        });
    }
}

#[test]
fn conditions_and_k8s_types_render() {
    for crd in crds() {
        let s = schema(&crd);
        let conditions = &s["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["type"], "array", "{}", crd.spec.names.kind);
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
        let item = &conditions["items"];
        let mut required: Vec<&str> = item["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        required.sort();
        assert_eq!(
            required,
            ["lastTransitionTime", "message", "reason", "status", "type"]
        );
        assert_eq!(item["properties"]["lastTransitionTime"]["type"], "string");
        assert_eq!(
            item["properties"]["lastTransitionTime"]["format"],
            "date-time"
        );
        assert_eq!(item["properties"]["observedGeneration"]["type"], "integer");
        let observed = &s["properties"]["status"]["properties"]["observedGeneration"];
        assert_eq!(observed["type"], "integer");
    }
    let s = schema(&crd("Branch"));
    let resources = &s["properties"]["spec"]["properties"]["compute"]["properties"]["resources"];
    assert_eq!(resources["type"], "object");
    for key in ["limits", "requests"] {
        let quantity = &resources["properties"][key]["additionalProperties"];
        assert_eq!(
            quantity["x-kubernetes-int-or-string"], true,
            "{key}: {quantity}"
        );
        assert!(quantity.get("type").is_none(), "{key}: {quantity}");
    }
    assert_eq!(
        resources["properties"]["claims"]["items"]["required"],
        serde_json::json!(["name"])
    );
}

#[test]
fn names_subresources_and_columns() {
    let expect: [(&str, &str, &[&str], &[&str]); 5] = [
        (
            "Branch",
            "branches",
            &["br", "pgbranch"],
            &[
                "Ready", "Phase", "Parent", "Point", "Timeline", "Size", "Age",
            ],
        ),
        (
            "Snapshot",
            "snapshots",
            &["pgsnap"],
            &["Branch", "LSN", "Size", "Ready", "Age"],
        ),
        (
            "SnapshotRestore",
            "snapshotrestores",
            &["pgrestore"],
            &["Phase", "Source", "Target", "Restored", "Age"],
        ),
        (
            "SnapshotSchedule",
            "snapshotschedules",
            &["pgsched"],
            &["Branch", "Schedule", "Last", "Next", "Active", "Age"],
        ),
        (
            "BackupDestination",
            "backupdestinations",
            &["pgdest"],
            &["Provider", "Bucket", "Ready", "Reason", "Age"],
        ),
    ];
    for (kind, plural, short, columns) in expect {
        let crd = crd(kind);
        assert_eq!(crd.spec.group, "pgbranch.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.plural, plural);
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(format!("{plural}.pgbranch.dev").as_str())
        );
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&short.iter().map(|s| s.to_string()).collect::<Vec<_>>()[..])
        );
        assert_eq!(
            crd.spec.names.categories,
            Some(vec!["pgbranch".to_string()])
        );
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        let sub = version.subresources.as_ref().expect("subresources");
        assert!(sub.status.is_some(), "{kind}: status subresource");
        let cols = version
            .additional_printer_columns
            .as_ref()
            .expect("columns");
        // The default (priority 0) columns, in order.
        let shown: Vec<&str> = cols
            .iter()
            .filter(|c| c.priority.unwrap_or(0) == 0)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(shown, columns, "{kind}");
        for c in cols {
            assert!(
                c.json_path.starts_with('.'),
                "{kind} {}: {}",
                c.name,
                c.json_path
            );
            assert!(
                ["string", "integer", "number", "boolean", "date"].contains(&c.type_.as_str()),
                "{kind} {}: type {}",
                c.name,
                c.type_
            );
        }
    }
    let ready = crd("Branch").spec.versions[0]
        .additional_printer_columns
        .clone()
        .unwrap();
    assert_eq!(
        ready[0].json_path,
        r#".status.conditions[?(@.type=="Ready")].status"#
    );
}

/// Resolves a printer-column or selectable-field JSON path against the
/// schema: `.a.b`, `.a[?(...)].b` (list items) and `.a['x','y']` (union).
/// Returns the leaf schemas, or the first segment that does not exist.
fn resolve<'a>(schema: &'a Value, path: &str) -> Result<Vec<&'a Value>, String> {
    let mut nodes = vec![schema];
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("[?(") {
            let end = r.find(")]").ok_or(format!("unclosed filter in {path}"))?;
            rest = &r[end + 2..];
            nodes = nodes
                .into_iter()
                .map(|n| {
                    n.get("items")
                        .ok_or(format!("{path}: filter on a non-list"))
                })
                .collect::<Result<_, _>>()?;
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']').ok_or(format!("unclosed union in {path}"))?;
            let names: Vec<&str> = r[..end]
                .split(',')
                .map(|s| s.trim().trim_matches('\''))
                .collect();
            rest = &r[end + 1..];
            let mut next = Vec::new();
            for n in nodes {
                for name in &names {
                    next.push(
                        n["properties"]
                            .get(*name)
                            .ok_or(format!("{path}: no field {name}"))?,
                    );
                }
            }
            nodes = next;
        } else if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let name = &r[..end];
            rest = &r[end..];
            nodes = nodes
                .into_iter()
                .map(|n| {
                    n["properties"]
                        .get(name)
                        .ok_or(format!("{path}: no field {name}"))
                })
                .collect::<Result<_, _>>()?;
        } else {
            return Err(format!("cannot read {path} at {rest}"));
        }
    }
    Ok(nodes)
}

#[test]
fn columns_and_selectable_fields_point_at_fields_of_their_type() {
    for crd in crds() {
        let kind = crd.spec.names.kind.clone();
        let s = schema(&crd);
        let version = &crd.spec.versions[0];
        for col in version.additional_printer_columns.as_ref().unwrap() {
            if col.json_path == ".metadata.creationTimestamp" {
                continue;
            }
            let leaves = resolve(&s, &col.json_path).unwrap_or_else(|e| panic!("{kind}: {e}"));
            for leaf in leaves {
                let ty = leaf["type"].as_str().unwrap_or("?");
                let ok = match col.type_.as_str() {
                    "date" => ty == "string",
                    other => ty == other,
                };
                assert!(ok, "{kind} column {}: {} is {ty}", col.name, col.json_path);
            }
        }
        let selectable = version
            .selectable_fields
            .as_ref()
            .expect("selectable fields");
        for field in selectable {
            let leaves = resolve(&s, &field.json_path).unwrap_or_else(|e| panic!("{kind}: {e}"));
            for leaf in leaves {
                assert_eq!(leaf["type"], "string", "{kind}: {}", field.json_path);
            }
        }
    }
    // The resolver itself catches a typo.
    let s = schema(&crd("Branch"));
    assert!(resolve(&s, ".status.timelineID").is_err());
    assert!(resolve(&s, ".spec.parent['lsn','time']").is_err());
}
