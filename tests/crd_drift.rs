//! `crds/` is generated from the Rust types by `pgbranch crd`; these tests
//! fail when the checked-in files drift from the types.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use pgbranch::cli::crd::{check_dir, crds, render_all, write_dir, Drift, REGENERATE_COMMAND};
use serde::Deserialize;

fn crds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crds")
}

#[test]
fn checked_in_crds_match_the_types() {
    let drift = check_dir(&crds_dir()).expect("read crds/");
    let list: Vec<String> = drift.iter().map(|d| d.to_string()).collect();
    assert!(
        drift.is_empty(),
        "crds/ does not match the types in src/api:\n  {}\nregenerate with: {REGENERATE_COMMAND}",
        list.join("\n  ")
    );
}

#[test]
fn checked_in_files_are_the_generated_crds() {
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(crds_dir()).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            path.file_name().unwrap().to_string_lossy(),
            format!("{}.yaml", crd.metadata.name.as_deref().unwrap())
        );
        let generated = crds()
            .into_iter()
            .find(|c| c.metadata.name == crd.metadata.name)
            .expect("a generated CRD of that name");
        assert_eq!(crd, generated, "{}", path.display());
        kinds.push(crd.spec.names.kind);
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "BackupDestination",
            "Branch",
            "Snapshot",
            "SnapshotRestore",
            "SnapshotSchedule"
        ]
    );
}

#[test]
fn printed_stream_holds_every_crd() {
    let text = render_all().unwrap();
    let docs: Vec<CustomResourceDefinition> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| CustomResourceDefinition::deserialize(doc).unwrap())
        .collect();
    assert_eq!(docs, crds());
}

#[test]
fn check_names_each_difference() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path()).unwrap();
    assert_eq!(check_dir(dir.path()).unwrap(), vec![]);

    let branches = dir.path().join("branches.pgbranch.dev.yaml");
    let edited = std::fs::read_to_string(&branches)
        .unwrap()
        .replace("maxLength: 17", "maxLength: 18");
    std::fs::write(&branches, edited).unwrap();
    std::fs::remove_file(dir.path().join("snapshots.pgbranch.dev.yaml")).unwrap();
    std::fs::write(
        dir.path().join("olds.pgbranch.dev.yaml"),
        "kind: CustomResourceDefinition\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("README.md"), "not ours\n").unwrap();

    let mut drift = check_dir(dir.path()).unwrap();
    drift.sort_by_key(|d| d.to_string());
    assert_eq!(
        drift,
        vec![
            Drift::Differs("branches.pgbranch.dev.yaml".into()),
            Drift::Extra("olds.pgbranch.dev.yaml".into()),
            Drift::Missing("snapshots.pgbranch.dev.yaml".into()),
        ]
    );
}

#[test]
fn cli_check_and_out_dir() {
    let bin = env!("CARGO_BIN_EXE_pgbranch");
    let ok = Command::new(bin)
        .args(["crd", "--check"])
        .arg(crds_dir())
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin)
        .args(["crd", "--out-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 5);
    std::fs::write(
        dir.path().join("snapshotschedules.pgbranch.dev.yaml"),
        "stale\n",
    )
    .unwrap();
    let bad = Command::new(bin)
        .args(["crd", "--check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("snapshotschedules.pgbranch.dev.yaml"), "{err}");
    assert!(err.contains(REGENERATE_COMMAND), "{err}");

    let printed = Command::new(bin).arg("crd").output().unwrap();
    assert!(printed.status.success());
    assert_eq!(
        String::from_utf8(printed.stdout).unwrap(),
        render_all().unwrap()
    );
}
