//! The CEL rules in the CRD schemas, evaluated locally with kube's CEL
//! validator (the same `x-kubernetes-validations` the apiserver runs).
//! Every rule has a case that passes and one that fails; transition rules
//! are checked with old and new objects.

use kube::core::cel::ValidationErrors;
use pgbranch::api::{
    validate_branch_name, Branch, Snapshot, SnapshotRestore, SnapshotSchedule, MAX_BRANCH_NAME_LEN,
};
use serde_json::{json, Value};

fn obj<T: serde::de::DeserializeOwned>(kind: &str, name: &str, spec: Value) -> T {
    serde_json::from_value(json!({
        "apiVersion": "pgbranch.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))
    .unwrap_or_else(|e| panic!("{kind} {spec}: {e}"))
}

fn branch(spec: Value) -> Branch {
    obj("Branch", "dev", spec)
}
fn snapshot(spec: Value) -> Snapshot {
    obj("Snapshot", "snap", spec)
}
fn restore(spec: Value) -> SnapshotRestore {
    obj("SnapshotRestore", "restore", spec)
}
fn schedule(spec: Value) -> SnapshotSchedule {
    obj("SnapshotSchedule", "nightly", spec)
}

/// Asserts the result failed and one of the messages contains `needle`.
#[track_caller]
fn assert_rejected(result: Result<(), ValidationErrors>, needle: &str) {
    match result {
        Ok(()) => panic!("accepted, but expected a rejection mentioning {needle:?}"),
        Err(errors) => {
            for e in errors.iter() {
                // A rule that fails to compile or evaluate is a bug in the
                // rule, not a rejection.
                assert_eq!(
                    e.kind,
                    kube::core::cel::ErrorKind::ValidationFailure,
                    "rule error instead of a verdict: {e:?}"
                );
            }
            assert!(
                errors.iter().any(|e| e.message.contains(needle)),
                "no message contains {needle:?}: {errors}"
            );
        }
    }
}

#[track_caller]
fn assert_ok(result: Result<(), ValidationErrors>) {
    if let Err(e) = result {
        panic!("rejected: {e}");
    }
}

// ---------------------------------------------------------------- Branch

#[test]
fn branch_points() {
    assert_ok(branch(json!({})).validate_cel());
    assert_ok(branch(json!({"parent": {"branch": "prod"}})).validate_cel());
    assert_ok(branch(json!({"parent": {"branch": "prod", "lsn": "16/B3733C50"}})).validate_cel());
    assert_ok(
        branch(json!({"parent": {"branch": "prod", "timestamp": "2026-01-02T15:04:05Z"}}))
            .validate_cel(),
    );
    assert_rejected(
        branch(json!({"parent": {"branch": "prod", "lsn": "0/1", "timestamp": "2026-01-02T15:04:05Z"}}))
            .validate_cel(),
        "mutually exclusive",
    );
}

#[test]
fn lsn_format() {
    for good in ["0/0", "16/B3733C50", "FFFFFFFF/ffffffff", "a/1"] {
        assert_ok(branch(json!({"parent": {"branch": "prod", "lsn": good}})).validate_cel());
    }
    for bad in [
        "16B3733C50",
        "123456789/0",
        "0/",
        "/0",
        "0x16/1",
        "16/G0",
        " 16/B3",
        "",
    ] {
        assert_rejected(
            branch(json!({"parent": {"branch": "prod", "lsn": bad}})).validate_cel(),
            "must be an LSN",
        );
    }
}

#[test]
fn timestamp_format() {
    for good in [
        "2026-01-02T15:04:05Z",
        "2026-01-02T15:04:05.123456+02:00",
        "2026-12-31t23:59:59-11:30",
    ] {
        assert_ok(branch(json!({"parent": {"branch": "prod", "timestamp": good}})).validate_cel());
        assert_ok(branch(json!({"expiresAt": good})).validate_cel());
    }
    for bad in [
        "yesterday",
        "2026-01-02",
        "2026-01-02 15:04:05Z",
        "2026-13-02T15:04:05Z",
        "2026-01-02T25:04:05Z",
        "2026-01-02T15:04:05",
        "1767366245",
    ] {
        assert_rejected(
            branch(json!({"parent": {"branch": "prod", "timestamp": bad}})).validate_cel(),
            "RFC 3339",
        );
        assert_rejected(branch(json!({"expiresAt": bad})).validate_cel(), "RFC 3339");
    }
}

#[test]
fn schema_only_needs_parent() {
    assert_ok(
        branch(json!({"parent": {"branch": "prod"}, "initSource": "schema-only"})).validate_cel(),
    );
    assert_ok(branch(json!({"initSource": "parent-data"})).validate_cel());
    assert_rejected(
        branch(json!({"initSource": "schema-only"})).validate_cel(),
        "needs a parent",
    );
}

#[test]
fn own_parent_and_schema_only_point() {
    let b: Branch = obj("Branch", "dev", json!({"parent": {"branch": "dev"}}));
    assert_rejected(b.validate_cel(), "cannot be its own parent");
    assert_rejected(
        branch(json!({"parent": {"branch": "prod", "lsn": "0/1"}, "initSource": "schema-only"}))
            .validate_cel(),
        "copies the parent's current schema",
    );
    assert_ok(
        branch(json!({"parent": {"branch": "prod", "lsn": "0/1"}, "initSource": "parent-data"}))
            .validate_cel(),
    );
}

#[test]
fn operator_managed_parameters_are_refused() {
    let with = |k: &str| {
        branch(json!({"compute": {"postgresParameters": {"shared_buffers": "256MB", k: "x"}}}))
    };
    for k in pgbranch::api::OPERATOR_PARAMETERS {
        assert_rejected(
            with(k).validate_cel(),
            "cannot set what the operator manages",
        );
    }
    for k in [
        "work_mem",
        "max_connections",
        "archive_timeout",
        "log_min_duration_statement",
        "shared_preload_libraries",
    ] {
        assert_ok(with(k).validate_cel());
    }
    // The rule lists exactly the constant the compute builder can use.
    let schema = pgbranch::api::crd_schema("Branch").unwrap();
    let rule = schema["properties"]["spec"]["properties"]["compute"]["properties"]
        ["postgresParameters"]["x-kubernetes-validations"][0]["rule"]
        .as_str()
        .unwrap()
        .to_string();
    let inside = &rule[rule.find('[').unwrap() + 1..rule.find(']').unwrap()];
    let mut listed: Vec<&str> = inside
        .split(',')
        .map(|s| s.trim().trim_matches('\''))
        .collect();
    let mut expected = pgbranch::api::OPERATOR_PARAMETERS.to_vec();
    listed.sort();
    expected.sort();
    assert_eq!(listed, expected);
}

#[test]
fn read_replicas_range() {
    for good in [0, 1, 5] {
        assert_ok(branch(json!({"compute": {"readReplicas": good}})).validate_cel());
    }
    for bad in [-1, 6, 100] {
        assert_rejected(
            branch(json!({"compute": {"readReplicas": bad}})).validate_cel(),
            "between 0 and 5",
        );
    }
}

#[test]
fn refresh_rules() {
    for good in ["0 2 * * *", "*/15 * * * 1-5", "@daily", "@hourly"] {
        assert_ok(
            branch(json!({"parent": {"branch": "prod"}, "refresh": {"schedule": good}}))
                .validate_cel(),
        );
    }
    for bad in ["0 2 * *", "every day", "@sometimes", "0 2 * * * * *"] {
        assert_rejected(
            branch(json!({"parent": {"branch": "prod"}, "refresh": {"schedule": bad}}))
                .validate_cel(),
            "cron expression",
        );
    }
    assert_rejected(
        branch(json!({"refresh": {"schedule": "0 2 * * *"}})).validate_cel(),
        "needs a parent",
    );
}

#[test]
fn backup_rules() {
    assert_ok(
        branch(
            json!({"backup": {"destination": "s3", "schedule": "0 3 * * *",
            "retention": {"count": 7, "maxAge": "30d"}}}),
        )
        .validate_cel(),
    );
    assert_ok(branch(json!({"backup": {"destination": "offsite.eu-1"}})).validate_cel());
    for (spec, needle) in [
        (
            json!({"destination": "S3_Bucket"}),
            "name of a BackupDestination",
        ),
        (
            json!({"destination": "s3", "schedule": "daily"}),
            "cron expression",
        ),
        (
            json!({"destination": "s3", "retention": {"count": 0}}),
            "between 1 and 1000",
        ),
        (
            json!({"destination": "s3", "retention": {"maxAge": "30 days"}}),
            "unit",
        ),
    ] {
        assert_rejected(branch(json!({"backup": spec})).validate_cel(), needle);
    }
}

#[test]
fn branch_names_leave_room_for_suffixes() {
    let max = "a".repeat(MAX_BRANCH_NAME_LEN);
    let over = "a".repeat(MAX_BRANCH_NAME_LEN + 1);
    // Names the apiserver lets through to the rules: DNS-1123 subdomains
    // (it rejects uppercase, '_', and a leading or trailing '-' itself).
    let cases = [
        ("prod", true),
        ("dev-2", true),
        ("a", true),
        (max.as_str(), true),
        (over.as_str(), false),
        ("2dev", false),
        ("0", false),
        ("dev.preview", false),
        ("dev.2", false),
    ];
    for (name, ok) in cases {
        let b: Branch = obj("Branch", name, json!({}));
        let cel = b.validate_cel();
        // The schema and the controller's pure check agree.
        assert_eq!(cel.is_ok(), ok, "CEL on {name:?}: {cel:?}");
        assert_eq!(
            validate_branch_name(name).is_ok(),
            ok,
            "validate_branch_name({name:?})"
        );
    }
    let b: Branch = obj("Branch", &over, json!({}));
    assert_rejected(b.validate_cel(), "at most 44 characters");
    let b: Branch = obj("Branch", "dev.preview", json!({}));
    assert_rejected(b.validate_cel(), "cannot contain '.'");
    let b: Branch = obj("Branch", "2dev", json!({}));
    assert_rejected(b.validate_cel(), "must start with a letter");
}

#[test]
fn branch_parent_is_immutable() {
    let at_lsn = branch(json!({"parent": {"branch": "prod", "lsn": "0/16B3748"}}));
    // Other fields may change.
    let mut protected = at_lsn.clone();
    protected.spec.protected = true;
    protected.spec.compute.read_replicas = 2;
    assert_ok(protected.validate_cel_update(&at_lsn));

    let moved = branch(json!({"parent": {"branch": "prod", "lsn": "0/16B3750"}}));
    assert_rejected(
        moved.validate_cel_update(&at_lsn),
        "spec.parent is immutable",
    );
    let other_parent = branch(json!({"parent": {"branch": "staging", "lsn": "0/16B3748"}}));
    assert_rejected(
        other_parent.validate_cel_update(&at_lsn),
        "spec.parent is immutable",
    );
    let to_timestamp =
        branch(json!({"parent": {"branch": "prod", "timestamp": "2026-01-02T15:04:05Z"}}));
    assert_rejected(
        to_timestamp.validate_cel_update(&at_lsn),
        "spec.parent is immutable",
    );
    let root = branch(json!({}));
    assert_rejected(
        root.validate_cel_update(&at_lsn),
        "spec.parent is immutable",
    );
    // A root branch cannot get a parent later either.
    assert_rejected(
        at_lsn.validate_cel_update(&root),
        "spec.parent is immutable",
    );
    assert_ok(root.validate_cel_update(&root));
}

#[test]
fn branch_init_source_is_immutable() {
    let plain = branch(json!({"parent": {"branch": "prod"}}));
    let explicit = branch(json!({"parent": {"branch": "prod"}, "initSource": "parent-data"}));
    let schema_only = branch(json!({"parent": {"branch": "prod"}, "initSource": "schema-only"}));
    // Writing out the default changes nothing.
    assert_ok(explicit.validate_cel_update(&plain));
    assert_ok(plain.validate_cel_update(&explicit));
    assert_rejected(
        schema_only.validate_cel_update(&plain),
        "initSource is immutable",
    );
    assert_rejected(
        plain.validate_cel_update(&schema_only),
        "initSource is immutable",
    );
    assert_rejected(
        explicit.validate_cel_update(&schema_only),
        "initSource is immutable",
    );
}

// ---------------------------------------------------------------- Snapshot

#[test]
fn snapshot_points() {
    assert_ok(snapshot(json!({"branch": "prod"})).validate_cel());
    assert_ok(snapshot(json!({"branch": "prod", "lsn": "0/16B3748"})).validate_cel());
    assert_ok(
        snapshot(json!({"branch": "prod", "timestamp": "2026-01-02T15:04:05Z", "expiresAt": "2026-02-02T00:00:00Z"}))
            .validate_cel(),
    );
    assert_rejected(
        snapshot(json!({"branch": "prod", "lsn": "0/1", "timestamp": "2026-01-02T15:04:05Z"}))
            .validate_cel(),
        "mutually exclusive",
    );
    assert_rejected(
        snapshot(json!({"branch": "prod", "lsn": "x"})).validate_cel(),
        "must be an LSN",
    );
    assert_rejected(
        snapshot(json!({"branch": "prod", "expiresAt": "tomorrow"})).validate_cel(),
        "RFC 3339",
    );
}

#[test]
fn snapshot_spec_is_immutable() {
    let old = snapshot(json!({"branch": "prod", "lsn": "0/16B3748"}));
    let mut same = old.clone();
    same.metadata.labels = Some([("team".to_string(), "a".to_string())].into());
    assert_ok(same.validate_cel_update(&old));
    for changed in [
        json!({"branch": "dev", "lsn": "0/16B3748"}),
        json!({"branch": "prod", "lsn": "0/16B3750"}),
        json!({"branch": "prod"}),
        json!({"branch": "prod", "lsn": "0/16B3748", "expiresAt": "2026-02-02T00:00:00Z"}),
        json!({"branch": "prod", "lsn": "0/16B3748", "deletionPolicy": "Retain"}),
    ] {
        assert_rejected(snapshot(changed).validate_cel_update(&old), "immutable");
    }
}

// ---------------------------------------------------------------- SnapshotRestore

#[test]
fn restore_source() {
    assert_ok(restore(json!({"source": {"snapshot": "snap"}})).validate_cel());
    assert_ok(restore(json!({"source": {"branch": "prod"}})).validate_cel());
    assert_ok(restore(json!({"source": {"branch": "prod", "lsn": "0/16B3748"}})).validate_cel());
    assert_ok(
        restore(json!({"source": {"branch": "prod", "timestamp": "2026-01-02T15:04:05Z"}}))
            .validate_cel(),
    );
    assert_rejected(
        restore(json!({"source": {}})).validate_cel(),
        "exactly one of",
    );
    assert_rejected(
        restore(json!({"source": {"snapshot": "snap", "branch": "prod"}})).validate_cel(),
        "exactly one of",
    );
    assert_rejected(
        restore(json!({"source": {"snapshot": "snap", "lsn": "0/1"}})).validate_cel(),
        "go with source.branch",
    );
    assert_rejected(
        restore(json!({"source": {"snapshot": "snap", "timestamp": "2026-01-02T15:04:05Z"}}))
            .validate_cel(),
        "go with source.branch",
    );
    assert_rejected(
        restore(json!({"source": {"branch": "prod", "lsn": "0/1", "timestamp": "2026-01-02T15:04:05Z"}}))
            .validate_cel(),
        "mutually exclusive",
    );
    assert_rejected(
        restore(json!({"source": {"branch": "prod", "lsn": "1-2"}})).validate_cel(),
        "must be an LSN",
    );
}

#[test]
fn restore_target_and_backup_name() {
    assert_ok(restore(json!({"source": {"snapshot": "s"}, "finalize": false})).validate_cel());
    assert_ok(
        restore(json!({"source": {"snapshot": "s"}, "target": "prod", "finalize": true}))
            .validate_cel(),
    );
    assert_rejected(
        restore(json!({"source": {"snapshot": "s"}, "finalize": true})).validate_cel(),
        "target is required",
    );
    assert_ok(
        restore(json!({"source": {"snapshot": "s"}, "target": "prod", "preserveUnderName": "prod-before-release"}))
            .validate_cel(),
    );
    assert_rejected(
        restore(json!({"source": {"snapshot": "s"}, "preserveUnderName": "prod-old"}))
            .validate_cel(),
        "needs a target",
    );
    assert_rejected(
        restore(
            json!({"source": {"snapshot": "s"}, "target": "prod", "preserveUnderName": "Prod_Old"}),
        )
        .validate_cel(),
        "lowercase letters",
    );
    assert_rejected(
        restore(json!({"source": {"snapshot": "s"}, "target": "prod", "preserveUnderName": "a".repeat(45)}))
            .validate_cel(),
        "at most 44",
    );
    // Restoring a branch to its own past needs a name for the backup.
    assert_rejected(
        restore(json!({"source": {"branch": "prod", "timestamp": "2026-01-02T15:04:05Z"}, "target": "prod", "finalize": true}))
            .validate_cel(),
        "own history needs preserveUnderName",
    );
    assert_ok(
        restore(json!({"source": {"branch": "prod", "timestamp": "2026-01-02T15:04:05Z"}, "target": "prod", "finalize": true, "preserveUnderName": "prod-before"}))
            .validate_cel(),
    );
}

#[test]
fn restore_finalize_only_goes_forward() {
    let preview =
        restore(json!({"source": {"snapshot": "s"}, "target": "prod", "finalize": false}));
    let finalized =
        restore(json!({"source": {"snapshot": "s"}, "target": "prod", "finalize": true}));
    assert_ok(finalized.validate_cel_update(&preview));
    assert_ok(finalized.validate_cel_update(&finalized));
    assert_ok(preview.validate_cel_update(&preview));
    assert_rejected(
        preview.validate_cel_update(&finalized),
        "cannot go back to false",
    );
    // Omitting finalize means false: also a step back.
    let omitted = restore(json!({"source": {"snapshot": "s"}, "target": "prod"}));
    assert_rejected(
        omitted.validate_cel_update(&finalized),
        "cannot go back to false",
    );
}

#[test]
fn restore_spec_is_immutable_except_finalize() {
    let old = restore(
        json!({"source": {"branch": "prod", "lsn": "0/1"}, "target": "prod", "preserveUnderName": "prod-before"}),
    );
    for changed in [
        json!({"source": {"branch": "prod", "lsn": "0/2"}, "target": "prod", "preserveUnderName": "prod-before"}),
        json!({"source": {"branch": "dev", "lsn": "0/1"}, "target": "prod", "preserveUnderName": "prod-before"}),
        json!({"source": {"branch": "prod", "lsn": "0/1"}, "target": "dev", "preserveUnderName": "prod-before"}),
        json!({"source": {"branch": "prod", "lsn": "0/1"}, "target": "prod", "preserveUnderName": "prod-after"}),
    ] {
        assert_rejected(
            restore(changed).validate_cel_update(&old),
            "immutable except finalize",
        );
    }
    // Adding a target or a backup name after creation is a change too.
    let no_target = restore(json!({"source": {"snapshot": "s"}}));
    let with_target = restore(json!({"source": {"snapshot": "s"}, "target": "prod"}));
    assert_rejected(
        with_target.validate_cel_update(&no_target),
        "immutable except finalize",
    );
    assert_rejected(
        no_target.validate_cel_update(&with_target),
        "immutable except finalize",
    );
}

// ---------------------------------------------------------------- SnapshotSchedule

#[test]
fn schedule_timing() {
    assert_ok(
        schedule(json!({"branch": "prod", "schedule": "0 2 * * *", "timeZone": "Europe/Berlin"}))
            .validate_cel(),
    );
    for good in ["30m", "12h", "1d", "4w", "90s"] {
        assert_ok(schedule(json!({"branch": "prod", "interval": good})).validate_cel());
    }
    assert_rejected(
        schedule(json!({"branch": "prod"})).validate_cel(),
        "exactly one of",
    );
    assert_rejected(
        schedule(json!({"branch": "prod", "schedule": "0 2 * * *", "interval": "1d"}))
            .validate_cel(),
        "exactly one of",
    );
    for bad in ["1.5h", "0h", "1y", "12 h", "1h30m", "01d"] {
        assert_rejected(
            schedule(json!({"branch": "prod", "interval": bad})).validate_cel(),
            "positive number followed by one unit",
        );
    }
    assert_rejected(
        schedule(json!({"branch": "prod", "schedule": "nightly"})).validate_cel(),
        "cron expression",
    );
    assert_rejected(
        schedule(json!({"branch": "prod", "interval": "1d", "timeZone": "UTC"})).validate_cel(),
        "timeZone goes with schedule",
    );
}

#[test]
fn schedule_retention() {
    assert_ok(
        schedule(json!({"branch": "prod", "interval": "1d", "retention": {"maxCount": 10, "maxAge": "4w"}, "snapshotTemplate": {"expiresAfter": "30d"}}))
            .validate_cel(),
    );
    assert_ok(
        schedule(json!({"branch": "prod", "interval": "1d", "retention": {"maxCount": 1}}))
            .validate_cel(),
    );
    for bad in [0, -3] {
        assert_rejected(
            schedule(json!({"branch": "prod", "interval": "1d", "retention": {"maxCount": bad}}))
                .validate_cel(),
            "at least 1",
        );
    }
    assert_rejected(
        schedule(json!({"branch": "prod", "interval": "1d", "retention": {"maxAge": "4 weeks"}}))
            .validate_cel(),
        "positive number followed by one unit",
    );
    assert_rejected(
        schedule(json!({"branch": "prod", "interval": "1d", "snapshotTemplate": {"expiresAfter": "1 month"}}))
            .validate_cel(),
        "positive number followed by one unit",
    );
}

/// The span rule in the schema and `api::parse_span` accept the same texts.
#[test]
fn span_rule_matches_parser() {
    for text in [
        "1s", "30m", "12h", "1d", "4w", "999999w", "0d", "1y", "1.5h", "01h", "1000000s", "h",
    ] {
        let cel = schedule(json!({"branch": "prod", "interval": text})).validate_cel();
        assert_eq!(
            cel.is_ok(),
            pgbranch::api::parse_span(text).is_ok(),
            "{text:?}: CEL {cel:?}"
        );
    }
}
