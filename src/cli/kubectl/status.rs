//! `kubectl pgbranch status`: the branch tree of a namespace, built from
//! the Branches, Snapshots and SnapshotRestores listed once — lineage,
//! timeline, point, size, replicas, Ready or Stalled with the reason, and
//! the operations under way. A pure function of the lists, so it is
//! unit-tested without a cluster; `-o json|yaml` prints the same rows.

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;
use serde::Serialize;

use crate::api::{
    get_condition, Branch, RestorePhase, Snapshot, SnapshotRestore, READY, RECONCILING, STALLED,
};

/// One branch of the tree.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BranchRow {
    pub name: String,
    /// The branch its data was copied from (`status.parentBranch`, else the spec's parent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Depth in the tree (roots: 0).
    pub depth: usize,
    /// The lines drawn before the name (`├─ `, `│  └─ `, ...).
    #[serde(skip)]
    pub drawn: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    pub ready: bool,
    /// `Stalled` or `Reconciling` reason, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<String>,
    /// Where it was taken from its parent: `head`, `lsn X`, `time T`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    pub read_replicas: i32,
    pub compute: &'static str,
    pub snapshots: usize,
    /// Restores under way that touch this branch.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub operations: Vec<String>,
}

/// The rows of the tree, parents before their children, siblings by name.
/// `only`: that branch and its descendants.
pub fn tree(
    branches: &[Branch],
    snapshots: &[Snapshot],
    restores: &[SnapshotRestore],
    only: Option<&str>,
) -> Vec<BranchRow> {
    let names: BTreeSet<String> = branches.iter().map(|b| b.name_any()).collect();
    let parent_of = |b: &Branch| -> Option<String> {
        b.status
            .as_ref()
            .and_then(|s| s.parent_branch.clone())
            .or_else(|| b.spec.parent.as_ref().map(|p| p.branch.clone()))
    };
    let mut children: BTreeMap<Option<String>, Vec<&Branch>> = BTreeMap::new();
    for b in branches {
        // A parent that is gone (or in no list) makes its child a root here.
        let p = parent_of(b).filter(|p| names.contains(p));
        children.entry(p).or_default().push(b);
    }
    for v in children.values_mut() {
        v.sort_by_key(|b| b.name_any());
    }
    let mut rows = Vec::new();
    let starts: Vec<&Branch> = match only {
        Some(n) => branches.iter().filter(|b| b.name_any() == n).collect(),
        None => children.get(&None).cloned().unwrap_or_default(),
    };
    // (branch, depth, what its children's lines start with, what its own does)
    let mut stack: Vec<(&Branch, usize, String, String)> = starts
        .into_iter()
        .rev()
        .map(|b| (b, 0, String::new(), String::new()))
        .collect();
    while let Some((b, depth, inherited, drawn)) = stack.pop() {
        let mut r = row(b, depth, parent_of(b), snapshots, restores);
        r.drawn = drawn;
        rows.push(r);
        if let Some(kids) = children.get(&Some(b.name_any())) {
            for (i, k) in kids.iter().enumerate().rev() {
                let last = i + 1 == kids.len();
                let (own, below) = if last {
                    ("└─ ", "   ")
                } else {
                    ("├─ ", "│  ")
                };
                stack.push((
                    k,
                    depth + 1,
                    format!("{inherited}{below}"),
                    format!("{inherited}{own}"),
                ));
            }
        }
    }
    rows
}

fn row(
    b: &Branch,
    depth: usize,
    parent: Option<String>,
    snapshots: &[Snapshot],
    restores: &[SnapshotRestore],
) -> BranchRow {
    let name = b.name_any();
    let st = b.status.as_ref();
    let conds = st.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let ready = get_condition(conds, READY).is_some_and(|c| c.status == "True");
    let problem = [STALLED, RECONCILING]
        .iter()
        .find_map(|t| get_condition(conds, t).filter(|c| c.status == "True"));
    let point = b
        .spec
        .parent
        .as_ref()
        .map(|p| match (&p.lsn, &p.timestamp) {
            (Some(l), _) => format!("lsn {l}"),
            (None, Some(t)) => format!("time {t}"),
            (None, None) => "head".into(),
        });
    let operations = restores
        .iter()
        .filter(|r| {
            !matches!(
                r.status.as_ref().and_then(|s| s.phase),
                Some(RestorePhase::Completed | RestorePhase::Failed)
            )
        })
        .filter(|r| {
            r.spec.target.as_deref() == Some(name.as_str())
                || r.spec.source.branch.as_deref() == Some(name.as_str())
        })
        .map(|r| {
            let st = r.status.as_ref();
            let phase = st
                .and_then(|s| s.phase)
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "Pending".into());
            let progress = st
                .and_then(|s| s.progress.clone())
                .map(|p| format!(": {p}"))
                .unwrap_or_default();
            format!("restore {} {phase}{progress}", r.name_any())
        })
        .collect();
    let compute = if !b.spec.compute.enabled {
        "disabled"
    } else if b.spec.compute.suspended {
        "suspended"
    } else {
        "running"
    };
    BranchRow {
        name: name.clone(),
        parent,
        depth,
        drawn: String::new(),
        phase: st.and_then(|s| s.phase).map(|p| format!("{p:?}")),
        ready,
        reason: problem.map(|c| c.reason.clone()),
        message: problem.map(|c| c.message.clone()).filter(|m| !m.is_empty()),
        timeline: st.and_then(|s| s.timeline_id.clone()),
        point,
        size_bytes: st.and_then(|s| s.logical_size_bytes),
        read_replicas: b.spec.compute.read_replicas,
        compute,
        snapshots: snapshots.iter().filter(|s| s.spec.branch == name).count(),
        operations,
    }
}

/// The tree as a table for people: the lineage drawn with indentation,
/// and, under a branch, its reason and operations.
pub fn render(rows: &[BranchRow]) -> String {
    let mut table = vec![[
        "BRANCH".to_string(),
        "PHASE".into(),
        "READY".into(),
        "TIMELINE".into(),
        "POINT".into(),
        "SIZE".into(),
        "COMPUTE".into(),
        "SNAPSHOTS".into(),
    ]];
    let mut notes: Vec<Vec<String>> = vec![Vec::new()];
    for r in rows {
        let indent = &r.drawn;
        let compute = if r.read_replicas > 0 {
            format!("{} +{} ro", r.compute, r.read_replicas)
        } else {
            r.compute.to_string()
        };
        table.push([
            format!("{indent}{}", r.name),
            r.phase.clone().unwrap_or_else(|| "-".into()),
            if r.ready { "True" } else { "False" }.into(),
            r.timeline.clone().unwrap_or_else(|| "-".into()),
            r.point.clone().unwrap_or_else(|| "root".into()),
            r.size_bytes
                .map(|n| crate::cli::human_bytes(u64::try_from(n).unwrap_or(0)))
                .unwrap_or_else(|| "-".into()),
            compute,
            r.snapshots.to_string(),
        ]);
        let pad = "   ".repeat(r.depth + 1);
        let mut n = Vec::new();
        if let Some(reason) = &r.reason {
            let msg = r
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            n.push(format!("{pad}{reason}{msg}"));
        }
        for op in &r.operations {
            n.push(format!("{pad}{op}"));
        }
        notes.push(n);
    }
    let mut widths = [0usize; 8];
    for line in &table {
        for (i, cell) in line.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (line, n) in table.iter().zip(&notes) {
        let cells: Vec<String> = line
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        for note in n {
            out.push_str(note);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        condition, BranchPhase, BranchSpec, BranchStatus, ParentRef, RestoreSource,
        SnapshotRestoreSpec, SnapshotRestoreStatus, SnapshotSpec,
    };

    fn b(name: &str, parent: Option<&str>, ready: bool) -> Branch {
        let mut b = Branch::new(
            name,
            BranchSpec {
                parent: parent.map(|p| ParentRef {
                    branch: p.into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        let conditions = if ready {
            vec![condition(
                READY,
                "True",
                "Ready",
                "",
                None,
                jiff::Timestamp::UNIX_EPOCH,
            )]
        } else {
            vec![
                condition(
                    READY,
                    "False",
                    "Stalled",
                    "",
                    None,
                    jiff::Timestamp::UNIX_EPOCH,
                ),
                condition(
                    STALLED,
                    "True",
                    "PointOutsideRestoreWindow",
                    "the parent cannot be branched at that point",
                    None,
                    jiff::Timestamp::UNIX_EPOCH,
                ),
            ]
        };
        b.status = Some(BranchStatus {
            phase: Some(if ready {
                BranchPhase::Ready
            } else {
                BranchPhase::Failed
            }),
            timeline_id: Some(format!("tl-{name}")),
            logical_size_bytes: Some(40 * 1024 * 1024),
            parent_branch: parent.map(String::from),
            conditions,
            ..Default::default()
        });
        b
    }

    #[test]
    fn the_tree_puts_children_under_their_parent_with_reasons_and_operations() {
        let branches = vec![
            b("staging", Some("prod"), true),
            b("prod", None, true),
            b("dev", Some("prod"), true),
            b("pitr", Some("dev"), false),
            b("orphan", Some("gone"), true),
        ];
        let snaps = vec![Snapshot::new(
            "nightly",
            SnapshotSpec {
                branch: "prod".into(),
                ..Default::default()
            },
        )];
        let mut running = SnapshotRestore::new(
            "undo",
            SnapshotRestoreSpec {
                source: RestoreSource {
                    snapshot: Some("nightly".into()),
                    ..Default::default()
                },
                target: Some("dev".into()),
                finalize: true,
                preserve_under_name: None,
            },
        );
        running.status = Some(SnapshotRestoreStatus {
            phase: Some(RestorePhase::Finalizing),
            progress: Some("switching the Service".into()),
            ..Default::default()
        });
        let mut done = running.clone();
        done.metadata.name = Some("old".into());
        done.status.as_mut().unwrap().phase = Some(RestorePhase::Completed);

        let rows = tree(&branches, &snaps, &[running, done], None);
        let order: Vec<(&str, usize)> = rows.iter().map(|r| (r.name.as_str(), r.depth)).collect();
        assert_eq!(
            order,
            [
                ("orphan", 0),
                ("prod", 0),
                ("dev", 1),
                ("pitr", 2),
                ("staging", 1)
            ]
        );
        let prod = &rows[1];
        assert_eq!(prod.snapshots, 1);
        assert_eq!(prod.point, None);
        let dev = &rows[2];
        assert_eq!(dev.point.as_deref(), Some("head"));
        assert_eq!(
            dev.operations,
            ["restore undo Finalizing: switching the Service"]
        );
        let pitr = &rows[3];
        assert!(!pitr.ready);
        assert_eq!(pitr.reason.as_deref(), Some("PointOutsideRestoreWindow"));

        let text = render(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("BRANCH"), "{text}");
        assert!(text.contains("\n├─ dev "), "{text}");
        assert!(text.contains("\n│  └─ pitr "), "{text}");
        assert!(text.contains("\n└─ staging "), "{text}");
        assert!(
            text.contains("PointOutsideRestoreWindow: the parent cannot be branched"),
            "{text}"
        );
        assert!(text.contains("restore undo Finalizing"), "{text}");
        assert!(text.contains("40.0 MiB"), "{text}");

        let only = tree(&branches, &snaps, &[], Some("dev"));
        let names: Vec<&str> = only.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["dev", "pitr"]);
    }
}
