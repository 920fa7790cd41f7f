//! The objects the plugin's commands create: exactly what a GitOps user
//! would commit (`apiVersion`, `kind`, `metadata.name`, `spec`; no status,
//! no server fields). Pure functions of the command line, so
//! `--dry-run -o yaml` and a real create are the same object.

use kube::ResourceExt;

use crate::api::{
    Branch, BranchSpec, ParentRef, RestoreSource, Snapshot, SnapshotRestore, SnapshotRestoreSpec,
    SnapshotSpec,
};
use crate::point::{parse_point_word, PointError};
use crate::storage::Point;

/// A point as the spec's `lsn` / `timestamp` pair (head: neither).
fn point_fields(
    field: &str,
    at: Option<&str>,
) -> Result<(Option<String>, Option<String>), PointError> {
    match at.map(|a| parse_point_word(field, a)).transpose()? {
        None | Some(Point::Head) => Ok((None, None)),
        Some(Point::Lsn(l)) => Ok((Some(l.to_string()), None)),
        Some(Point::Timestamp(t)) => Ok((None, Some(t.to_string()))),
    }
}

/// `branch create NAME --parent P [--at POINT]`: a child of `parent` at its
/// head, an LSN or a time; without a parent, a new root branch.
pub fn branch(name: &str, parent: Option<&str>, at: Option<&str>) -> Result<Branch, PointError> {
    let (lsn, timestamp) = point_fields("--at", at)?;
    Ok(Branch::new(
        name,
        BranchSpec {
            parent: parent.map(|p| ParentRef {
                branch: p.to_string(),
                lsn,
                timestamp,
            }),
            ..Default::default()
        },
    ))
}

/// `snapshot create NAME --branch B [--at POINT]`.
pub fn snapshot(name: &str, branch: &str, at: Option<&str>) -> Result<Snapshot, PointError> {
    let (lsn, timestamp) = point_fields("--at", at)?;
    Ok(Snapshot::new(
        name,
        SnapshotSpec {
            branch: branch.to_string(),
            lsn,
            timestamp,
            ..Default::default()
        },
    ))
}

/// Where a restore takes its data: `--snapshot S`, or `--source B[@POINT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreFrom {
    Snapshot(String),
    Branch { branch: String, at: Option<String> },
}

impl RestoreFrom {
    /// Reads `BRANCH` or `BRANCH@POINT` (POINT: `head`, an LSN or an RFC
    /// 3339 time).
    pub fn source(text: &str) -> RestoreFrom {
        match text.split_once('@') {
            Some((b, at)) => RestoreFrom::Branch {
                branch: b.to_string(),
                at: Some(at.to_string()),
            },
            None => RestoreFrom::Branch {
                branch: text.to_string(),
                at: None,
            },
        }
    }
}

/// What a restore asks for, beyond its source.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub target: Option<String>,
    pub finalize: bool,
    pub preserve_under_name: Option<String>,
}

/// `restore --snapshot S|--source B@POINT --target T [--finalize]
/// [--preserve-under-name N]`.
pub fn restore(
    name: &str,
    from: &RestoreFrom,
    opts: &RestoreOptions,
) -> Result<SnapshotRestore, PointError> {
    let source = match from {
        RestoreFrom::Snapshot(s) => RestoreSource {
            snapshot: Some(s.clone()),
            ..Default::default()
        },
        RestoreFrom::Branch { branch, at } => {
            let (lsn, timestamp) = point_fields("--source", at.as_deref())?;
            RestoreSource {
                branch: Some(branch.clone()),
                lsn,
                timestamp,
                ..Default::default()
            }
        }
    };
    Ok(SnapshotRestore::new(
        name,
        SnapshotRestoreSpec {
            source,
            target: opts.target.clone(),
            finalize: opts.finalize,
            preserve_under_name: opts.preserve_under_name.clone(),
        },
    ))
}

/// `branch reset NAME`: the branch's data replaced by its parent's head,
/// finalized at once (the same restore a `spec.refresh` run makes). The
/// replaced data lives on as the backup branch, as with every finalize.
pub fn reset(name: &str, restore_name: &str, target: &Branch) -> Option<SnapshotRestore> {
    let parent = target
        .spec
        .parent
        .as_ref()
        .map(|p| p.branch.clone())
        .or_else(|| target.status.as_ref()?.parent_branch.clone())?;
    let mut r = SnapshotRestore::new(
        restore_name,
        SnapshotRestoreSpec {
            source: RestoreSource {
                branch: Some(parent),
                ..Default::default()
            },
            target: Some(target.name_any()),
            finalize: true,
            preserve_under_name: None,
        },
    );
    r.metadata.labels = Some(
        [(crate::api::LABEL_BRANCH.to_string(), name.to_string())]
            .into_iter()
            .collect(),
    );
    Some(r)
}

/// A name for an object the user did not name: `<base>-<suffix>`, cut so
/// it stays a valid object name.
pub fn generated_name(base: &str, suffix: &str) -> String {
    let room = 63usize.saturating_sub(suffix.len() + 1);
    let base: String = base.chars().take(room).collect();
    format!("{}-{suffix}", base.trim_end_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_at_an_lsn_or_a_time_fills_the_matching_field() {
        let b = branch("dev", Some("prod"), Some("0/16B3748")).unwrap();
        let p = b.spec.parent.unwrap();
        assert_eq!(p.branch, "prod");
        assert_eq!(p.lsn.as_deref(), Some("0/16B3748"));
        assert_eq!(p.timestamp, None);

        let b = branch("dev", Some("prod"), Some("2026-12-07T10:00:00+01:00")).unwrap();
        let p = b.spec.parent.unwrap();
        assert_eq!(p.lsn, None);
        assert_eq!(p.timestamp.as_deref(), Some("2026-12-07T09:00:00Z"));

        let b = branch("dev", Some("prod"), Some("head")).unwrap();
        assert_eq!(b.spec.parent.unwrap().lsn, None);
    }

    #[test]
    fn a_bad_point_is_refused_naming_the_flag() {
        let e = branch("dev", Some("prod"), Some("yesterday")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("--at") && msg.contains("yesterday"), "{msg}");
        let e = restore(
            "r",
            &RestoreFrom::source("prod@soon"),
            &RestoreOptions::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--source"), "{e}");
    }

    #[test]
    fn a_restore_from_a_branch_point_or_a_snapshot() {
        let opts = RestoreOptions {
            target: Some("prod".into()),
            finalize: true,
            preserve_under_name: Some("prod-before".into()),
        };
        let r = restore("r1", &RestoreFrom::source("prod@0/3000000"), &opts).unwrap();
        assert_eq!(r.spec.source.branch.as_deref(), Some("prod"));
        assert_eq!(r.spec.source.lsn.as_deref(), Some("0/3000000"));
        assert_eq!(r.spec.target.as_deref(), Some("prod"));
        assert!(r.spec.finalize);
        assert_eq!(r.spec.preserve_under_name.as_deref(), Some("prod-before"));

        let r = restore(
            "r2",
            &RestoreFrom::Snapshot("nightly".into()),
            &RestoreOptions::default(),
        )
        .unwrap();
        assert_eq!(r.spec.source.snapshot.as_deref(), Some("nightly"));
        assert_eq!(r.spec.source.branch, None);
        assert!(!r.spec.finalize);
    }

    #[test]
    fn the_yaml_is_what_a_gitops_user_commits() {
        let b = branch("dev", Some("prod"), None).unwrap();
        let y = serde_yaml::to_string(&b).unwrap();
        assert!(
            y.starts_with("apiVersion: pgbranch.dev/v1alpha1\nkind: Branch\n"),
            "{y}"
        );
        assert!(!y.contains("status"), "{y}");
        assert!(!y.contains("uid") && !y.contains("resourceVersion"), "{y}");
    }

    #[test]
    fn a_reset_restores_the_parent_head_onto_the_branch() {
        let target = branch("dev", Some("prod"), Some("0/1000000")).unwrap();
        let r = reset("dev", "dev-reset-1", &target).unwrap();
        assert_eq!(r.spec.source.branch.as_deref(), Some("prod"));
        assert_eq!(r.spec.source.lsn, None);
        assert_eq!(r.spec.target.as_deref(), Some("dev"));
        assert!(r.spec.finalize);
        let root = branch("prod", None, None).unwrap();
        assert!(reset("prod", "x", &root).is_none());
    }

    #[test]
    fn generated_names_stay_valid() {
        assert_eq!(generated_name("dev", "reset-1"), "dev-reset-1");
        let long = "a".repeat(70);
        let n = generated_name(&long, "reset-20261207100000");
        assert!(n.len() <= 63, "{n}");
        assert!(n.ends_with("-reset-20261207100000"));
    }
}
