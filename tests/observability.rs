//! The chart's Grafana dashboard and alert rules
//! (`charts/pgbranch/files/observability/`): every expression parses as
//! PromQL (the promql-parser crate), and every metric it names is in what
//! the operator's `/metrics` serves after a real scenario on the real
//! control plane (a Ready branch, a Stalled one, a finalized restore),
//! with the storage figures (volume, WAL archive, per-branch exclusive
//! bytes) the storage poller reads.

mod support;

use std::collections::BTreeSet;

use pgbranch::api::{Branch, ParentRef, RestorePhase, RestoreSource, SnapshotRestoreSpec};
use support::traffic::Fault;
use support::world::*;

const DASHBOARD: &str = include_str!("../charts/pgbranch/files/observability/dashboard.json");
const ALERTS: &str = include_str!("../charts/pgbranch/files/observability/alerts.yaml");

/// Every PromQL expression of the dashboard's panels and of the rules,
/// named by where it is.
fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dash: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard is JSON");
    for p in dash["panels"].as_array().expect("panels") {
        let targets = p["targets"].as_array().expect("every panel has targets");
        assert!(!targets.is_empty(), "panel {} queries nothing", p["title"]);
        for t in targets {
            let e = t["expr"].as_str().expect("a target's expr");
            out.push((format!("panel {}", p["title"]), e.to_string()));
        }
    }
    let rules: serde_yaml::Value = serde_yaml::from_str(ALERTS).expect("alerts are YAML");
    for g in rules["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            let name = r["alert"].as_str().expect("an alert name");
            assert!(
                r["labels"]["severity"].as_str().is_some(),
                "alert {name} has no severity"
            );
            assert!(
                r["annotations"]["summary"].as_str().is_some(),
                "alert {name} has no summary"
            );
            if let Some(f) = r["for"].as_str() {
                promql_parser::util::parse_duration(f)
                    .unwrap_or_else(|e| panic!("alert {name}: for {f:?}: {e}"));
            }
            let e = r["expr"].as_str().expect("an alert's expr");
            out.push((format!("alert {name}"), e.to_string()));
        }
    }
    out
}

/// The `pgbranch_*` names an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("pgbranch_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.insert(expr[start..end].to_string());
        i = end;
    }
    names
}

fn shop_branch_child(name: &str, parent: &str) -> Branch {
    let mut b = shop_branch(name);
    b.spec.parent = Some(ParentRef {
        branch: parent.into(),
        ..Default::default()
    });
    b
}

#[test]
fn every_expression_is_promql() {
    let exprs = expressions();
    assert!(exprs.len() >= 10, "{} expressions", exprs.len());
    for (where_, e) in &exprs {
        // Grafana's own variable, as Grafana substitutes it.
        let e = e.replace("$__rate_interval", "5m");
        promql_parser::parser::parse(&e).unwrap_or_else(|err| panic!("{where_}: {e}: {err}"));
        assert!(
            !metric_names(&e).is_empty(),
            "{where_} reads no pgbranch metric"
        );
    }
    // A typo is caught: the check above is not vacuous.
    assert!(promql_parser::parser::parse("sum by (kind (pgbranch_objects)").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_the_dashboard_and_alerts_read_is_exported() {
    let Some(mut h) = World::new(module_path!()).await else {
        return;
    };
    // An apiserver error on the way, so the error counter has a series.
    h.traffic
        .inject(Fault::new("patch", "deployments").code(500).times(1));
    // The storage poller every second, so the scrape has fresh figures.
    let mut config = h.config();
    config.stats_interval = std::time::Duration::from_secs(1);
    h.start_operator(config);
    let client = h.client.clone();
    create_branch(&client, &shop_branch("prod")).await;
    wait_branch_ready(&client, "prod").await;
    create_branch(&client, &shop_branch_child("dev", "prod")).await;
    wait_branch_ready(&client, "dev").await;
    // A child at a point before the parent's history: Stalled.
    let mut early = shop_branch_child("early", "prod");
    early.spec.parent.as_mut().unwrap().lsn = Some("0/1".into());
    create_branch(&client, &early).await;
    wait_stalled(&client, "early", "PointOutsideRestoreWindow").await;
    // A restore, finalized.
    create_restore(
        &client,
        "undo",
        SnapshotRestoreSpec {
            source: RestoreSource {
                branch: Some("prod".into()),
                ..Default::default()
            },
            target: Some("dev".into()),
            finalize: true,
            preserve_under_name: Some("dev-before".into()),
        },
    )
    .await;
    wait_restore(&client, "undo", "Completed", |r| {
        r.status.as_ref().and_then(|s| s.phase) == Some(RestorePhase::Completed)
    })
    .await;

    wait_branch_ready(&client, "dev-before").await;
    // A storage-only branch backed up to a destination that does not
    // exist: Ready, with BackupHealthy False (the backup metrics' series).
    let mut archived = Branch::new("archived", Default::default());
    archived.spec.compute.enabled = false;
    archived.spec.backup = Some(pgbranch::api::BackupSpec {
        destination: "nowhere".into(),
        ..Default::default()
    });
    create_branch(&client, &archived).await;
    wait_branch_ready(&client, "archived").await;
    eventually(60, "archived BackupHealthy=False", || async {
        let b = branches(&client).get("archived").await.ok()?;
        (condition(&b, "BackupHealthy")?.1 == "DestinationNotFound").then_some(())
    })
    .await;

    // The storage poller's next reading knows the branches' timelines.
    let prod_exclusive = format!(
        "pgbranch_branch_exclusive_bytes{{namespace=\"{}\",branch=\"prod\"}} ",
        h.ns
    );
    let start = std::time::Instant::now();
    let text = loop {
        let text = h.metrics().encode();
        if text.contains(&prod_exclusive) {
            break text;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "no exclusive bytes of prod:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    };
    // The series names a scrape gives: those with samples, and those a
    // family declares (a counter of no reason yet has no sample).
    let mut exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect();
    for l in text.lines() {
        let mut w = l.split(' ');
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (w.next(), w.next(), w.next(), w.next())
        {
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            exported.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
    }
    for (where_, e) in expressions() {
        for name in metric_names(&e) {
            assert!(
                exported.contains(&name),
                "{where_} reads {name}, which the operator does not export:\n{text}"
            );
        }
    }
    // The fleet as it is: three Ready branches and the backup, one Failed.
    assert!(
        text.contains("pgbranch_objects{kind=\"Branch\",phase=\"Ready\"} 4"),
        "{text}"
    );
    assert!(
        text.contains("pgbranch_objects{kind=\"Branch\",phase=\"Failed\"} 1"),
        "{text}"
    );
    let stalled = format!(
        "pgbranch_stalled{{kind=\"Branch\",namespace=\"{}\",name=\"early\",reason=\"PointOutsideRestoreWindow\"}} 1",
        h.ns
    );
    assert!(text.contains(&stalled), "{text}");
    let unhealthy = format!(
        "pgbranch_backup_unhealthy{{namespace=\"{}\",name=\"archived\",reason=\"DestinationNotFound\"}} 1",
        h.ns
    );
    assert!(text.contains(&unhealthy), "{text}");
    assert!(
        text.contains("pgbranch_operation_duration_seconds_count{operation=\"restore\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("pgbranch_operation_duration_seconds_count{operation=\"branch\"}"),
        "{text}"
    );
    // The storage figures are plausible.
    assert!(text.contains("pgbranch_storage_up{} 1"), "{text}");
    let total = sample(&text, "pgbranch_storage_volume_bytes{kind=\"total\"}");
    let used = sample(&text, "pgbranch_storage_volume_bytes{kind=\"used\"}");
    assert!(total > 0.0 && used > 0.0 && used <= total, "{text}");
    let wal = sample(&text, "pgbranch_wal_archive_bytes{}");
    assert!(wal >= 0.0 && wal <= used, "{text}");
    let prod = sample(&text, prod_exclusive.trim_end());
    assert!(prod > 0.0 && prod <= used, "{text}");
    h.shutdown().await;
}

/// The value of the one sample `series` (name and labels as exposed).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample of {series}:\n{text}"))
}
