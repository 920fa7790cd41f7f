//! The objects we ship for users to copy — config/samples/, the chart's
//! Artifact Hub CRD examples and the Argo CD health test data — pass the
//! CRDs' CEL rules (evaluated locally with kube's validator, as the
//! apiserver would) and the Branch name rules. The offline schema checks in
//! scripts/check-manifests.sh cover the structural schema; this covers what
//! only CEL and our name rules say.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pgbranch::api::{validate_branch_name, Branch, Snapshot, SnapshotRestore, SnapshotSchedule};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every YAML document of a file, as JSON values.
fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml")
                && p.file_name()
                    .is_some_and(|n| n != "kustomization.yaml" && n != "health_test.yaml")
        })
        .collect();
    out.sort();
    out
}

fn name_of(doc: &Value) -> String {
    doc["metadata"]["name"].as_str().unwrap_or("?").to_string()
}

/// Runs the CEL rules of the object's kind; returns the kind.
fn validate(doc: &Value, origin: &str) -> String {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    let label = format!("{origin}: {kind}/{}", name_of(doc));
    let result = match kind.as_str() {
        "Branch" => {
            validate_branch_name(&name_of(doc)).unwrap_or_else(|e| panic!("{label}: {e}"));
            serde_json::from_value::<Branch>(doc.clone())
                .unwrap_or_else(|e| panic!("{label}: {e}"))
                .validate_cel()
        }
        "Snapshot" => serde_json::from_value::<Snapshot>(doc.clone())
            .unwrap_or_else(|e| panic!("{label}: {e}"))
            .validate_cel(),
        "SnapshotRestore" => {
            let r: SnapshotRestore =
                serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{label}: {e}"));
            // The backup branch it creates must be a valid Branch name.
            if let Some(n) = &r.spec.preserve_under_name {
                validate_branch_name(n)
                    .unwrap_or_else(|e| panic!("{label}: preserveUnderName: {e}"));
            }
            r.validate_cel()
        }
        "SnapshotSchedule" => serde_json::from_value::<SnapshotSchedule>(doc.clone())
            .unwrap_or_else(|e| panic!("{label}: {e}"))
            .validate_cel(),
        other => panic!("{label}: unexpected kind {other}"),
    };
    if let Err(e) = result {
        panic!("{label} is refused by the CRD's rules: {e}");
    }
    kind
}

#[test]
fn samples_pass_the_crd_rules_and_cover_every_kind() {
    let mut kinds = BTreeMap::new();
    let files = yaml_files(&repo().join("config/samples"));
    assert!(
        files.len() >= 5,
        "expected the seed workflow samples, found {files:?}"
    );
    for f in &files {
        for doc in docs(f) {
            let k = validate(&doc, &f.display().to_string());
            *kinds.entry(k).or_insert(0) += 1;
        }
    }
    for k in ["Branch", "Snapshot", "SnapshotRestore", "SnapshotSchedule"] {
        assert!(kinds.contains_key(k), "no {k} sample: {kinds:?}");
    }
}

#[test]
fn chart_crd_examples_pass_the_crd_rules() {
    let chart = docs(&repo().join("charts/pgbranch/Chart.yaml")).remove(0);
    let examples = chart["annotations"]["artifacthub.io/crdsExamples"]
        .as_str()
        .expect("artifacthub.io/crdsExamples annotation");
    let examples: Vec<serde_yaml::Value> = serde_yaml::from_str(examples).unwrap();
    assert_eq!(examples.len(), 5);
    for e in examples {
        validate(&serde_json::to_value(e).unwrap(), "Chart.yaml crdsExamples");
    }
}

#[test]
fn argo_health_test_data_pass_the_crd_rules() {
    let files = yaml_files(&repo().join("argo/resource_customizations/pgbranch.dev"));
    assert!(files.len() >= 20, "{files:?}");
    for f in &files {
        for doc in docs(f) {
            validate(&doc, &f.display().to_string());
        }
    }
}

/// The documented second step of a multi-step restore, `kubectl patch ...
/// {"spec":{"finalize":true}}`, is an update the CRD's transition rules allow.
#[test]
fn multi_step_restore_sample_can_be_finalized_by_patch() {
    let doc = docs(&repo().join("config/samples/restore-multi-step.yaml"))
        .into_iter()
        .find(|d| d["kind"] == "SnapshotRestore")
        .expect("a SnapshotRestore in the sample");
    let old: SnapshotRestore = serde_json::from_value(doc).unwrap();
    assert!(!old.spec.finalize, "the sample starts as a preview");
    let mut new = old.clone();
    new.spec.finalize = true;
    if let Err(e) = new.validate_cel_update(&old) {
        panic!("finalize false -> true refused: {e}");
    }
}

/// Every RFC 3339 time in a document, with its JSON path.
fn times_in(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::String(s) if s.parse::<jiff::Timestamp>().is_ok() => {
            out.push((path.to_string(), s.clone()))
        }
        Value::Object(m) => {
            for (k, v) in m {
                times_in(v, &format!("{path}.{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                times_in(v, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Samples are applied at any time after they were written: an absolute
/// `expiresAt` would one day lie before the object's creation (refused
/// ExpiresAtInPast, or deleted at once by an older operator), and an
/// absolute point (`timestamp`) before the branch existed. No sample
/// carries an absolute time; the comments say how to add one.
#[test]
fn samples_carry_no_absolute_time_that_rots() {
    let mut found = Vec::new();
    let mut check = |doc: &Value, origin: &str| {
        let mut times = Vec::new();
        times_in(doc, "", &mut times);
        for (path, t) in times {
            found.push(format!(
                "{origin}: {}/{}{path} = {t}",
                doc["kind"].as_str().unwrap_or("?"),
                name_of(doc)
            ));
        }
    };
    for f in yaml_files(&repo().join("config/samples")) {
        for doc in docs(&f) {
            check(&doc, &f.display().to_string());
        }
    }
    let chart = docs(&repo().join("charts/pgbranch/Chart.yaml")).remove(0);
    let examples: Vec<serde_yaml::Value> = serde_yaml::from_str(
        chart["annotations"]["artifacthub.io/crdsExamples"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    for e in examples {
        check(&serde_json::to_value(e).unwrap(), "Chart.yaml crdsExamples");
    }
    assert!(
        found.is_empty(),
        "samples with absolute times:\n{}",
        found.join("\n")
    );
}

fn wave(doc: &Value) -> i64 {
    doc["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]
        .as_str()
        .unwrap_or("0")
        .parse()
        .unwrap()
}

/// In the promotion cycle Argo CD applies wave after wave: everything an
/// object refers to must come in an earlier wave (or already exist), or the
/// restore would start before the snapshot it restores from.
#[test]
fn promotion_cycle_waves_follow_dependencies() {
    let docs = docs(&repo().join("config/samples/promotion-cycle.yaml"));
    let waves: BTreeMap<(String, String), i64> = docs
        .iter()
        .map(|d| {
            (
                (d["kind"].as_str().unwrap().to_string(), name_of(d)),
                wave(d),
            )
        })
        .collect();
    let before = |kind: &str, name: &str, w: i64, who: &str| {
        let dep = waves
            .get(&(kind.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("{who} refers to {kind}/{name}, not in the cycle"));
        assert!(
            *dep < w,
            "{who} (wave {w}) needs {kind}/{name} (wave {dep}) first"
        );
    };
    let mut restores = 0;
    for d in &docs {
        let who = format!("{}/{}", d["kind"].as_str().unwrap(), name_of(d));
        let w = wave(d);
        match d["kind"].as_str().unwrap() {
            "Snapshot" => before("Branch", d["spec"]["branch"].as_str().unwrap(), w, &who),
            "SnapshotRestore" => {
                restores += 1;
                before(
                    "Snapshot",
                    d["spec"]["source"]["snapshot"].as_str().unwrap(),
                    w,
                    &who,
                );
                before("Branch", d["spec"]["target"].as_str().unwrap(), w, &who);
                assert_eq!(
                    d["spec"]["finalize"],
                    Value::Bool(true),
                    "{who}: promotion is one step"
                );
            }
            _ => {}
        }
    }
    assert_eq!(restores, 1);
}
