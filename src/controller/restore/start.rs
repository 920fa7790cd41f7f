//! Pending: validation, re-checked until it passes, then the target is
//! resolved and recorded and the restore moves to Restoring (under the
//! operator's operation lock).

use super::*;

/// Pending: validate, resolve the target, record, move to Restoring.
pub(super) async fn start(run: &mut Run<'_>, st: &mut SnapshotRestoreStatus) -> Result<(), Error> {
    let ctx = run.ctx;
    let ns = run.ns.clone();
    let r = run.r;
    let spec = &r.spec;
    let restore_name = run.name.clone();
    // The operation lock, once the restore knows the branch it changes.
    let mut guard = None;
    check_name(&restore_name)?;

    // Source.
    let source_major = match (&spec.source.snapshot, &spec.source.branch) {
        (Some(s), None) => {
            let Some(snap) = ctx.get::<Snapshot>(&ns, "read snapshot", s).await? else {
                return Err(Error::stalled(
                    "SourceNotFound",
                    format!("snapshot {s:?} not found in namespace {ns}"),
                ));
            };
            let sst = snap.status.unwrap_or_default();
            if !sst.ready_to_use {
                return Err(Error::Waiting(format!(
                    "waiting for snapshot {s} to be ready to use"
                )));
            }
            sst.pg_major
        }
        (None, Some(b)) => {
            let Some(src) = ctx.get::<Branch>(&ns, "read branch", b).await? else {
                return Err(Error::stalled(
                    "SourceNotFound",
                    format!("branch {b:?} not found in namespace {ns}"),
                ));
            };
            if !branch_ready(&src) {
                return Err(Error::Waiting(format!(
                    "waiting for source branch {b} to be Ready"
                )));
            }
            crate::point::parse_point(
                "spec.source.",
                spec.source.lsn.as_deref(),
                spec.source.timestamp.as_deref(),
            )
            .map_err(|e| Error::stalled("InvalidPoint", e.to_string()))?;
            pg_major_of_branch(&src)
        }
        _ => {
            return Err(Error::stalled(
                "InvalidSource",
                "set exactly one of source.snapshot and source.branch",
            ))
        }
    };

    // Target.
    if spec.finalize && spec.target.is_none() {
        return Err(Error::stalled(
            "TargetRequired",
            "finalize needs spec.target: the Branch to replace is never guessed",
        ));
    }
    let now = jiff::Timestamp::now();
    if let Some(t) = &spec.target {
        let Some(target) = ctx.get::<Branch>(&ns, "read target", t).await? else {
            return Err(Error::stalled(
                "TargetNotFound",
                format!("target branch {t:?} not found in namespace {ns}"),
            ));
        };
        check_target(spec, &target, source_major)?;
        let backup = spec
            .preserve_under_name
            .clone()
            .unwrap_or_else(|| default_backup_name(t, now));
        if let Some(b) = ctx.get::<Branch>(&ns, "read backup", &backup).await? {
            if b.labels().get(LABEL_RESTORE_BACKUP_OF) != Some(&restore_name) {
                return Err(Error::stalled(
                    "BackupNameTaken",
                    format!(
                        "a Branch named {backup} already exists; choose another preserveUnderName"
                    ),
                ));
            }
        }
        // One data-changing operation per branch (controller::operations):
        // under the operation lock until the phase is recorded.
        guard = Some(ctx.operations.take().await);
        let mut touched = vec![t.as_str()];
        touched.extend(spec.source.branch.as_deref());
        if let Some((snap, b)) = snapshot_being_taken(ctx, &ns, &touched).await? {
            return Err(Error::Waiting(format!(
                "Snapshot {snap} of branch {b} is being taken; the restore starts when it is ready"
            )));
        }
        let others = ctx
            .list::<SnapshotRestore>(&ns, "list restores", "")
            .await?;
        if let Some(o) = others.iter().find(|o| {
            o.uid() != r.uid()
                && o.spec.target.as_deref() == Some(t.as_str())
                && o.status.as_ref().and_then(|s| s.phase) == Some(RestorePhase::Finalizing)
        }) {
            return Err(Error::Waiting(format!(
                "SnapshotRestore {} is finalizing branch {t}",
                o.name_any()
            )));
        }
        let tst = target.status.clone().unwrap_or_default();
        st.target_uid = target.uid();
        st.target_timeline_id = tst.timeline_id;
        st.backup_branch = Some(backup);
    }
    st.restored_branch = Some(restore_name);
    st.started_at = Some(now.to_string());
    st.phase = Some(RestorePhase::Restoring);
    st.progress = Some("creating the restored branch".into());
    run.save(st).await?;
    drop(guard);
    Ok(())
}

/// The restored branch takes the restore's name: it must be a Branch name.
fn check_name(name: &str) -> Result<(), Error> {
    if name.len() > 44 || name.contains('.') || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(Error::stalled(
            "InvalidName",
            "the restored branch is named like the SnapshotRestore: use a name of at most 44 characters, without '.', starting with a letter",
        ));
    }
    Ok(())
}

/// What the target (read) must be for `spec` to replace it: not a backup
/// or a preview branch, Ready, of the source's PostgreSQL major; a branch
/// restored to its own history needs a point and a backup name.
fn check_target(
    spec: &crate::api::SnapshotRestoreSpec,
    target: &Branch,
    source_major: Option<i64>,
) -> Result<(), Error> {
    let t = target.name_any();
    if let Some(of) = target.labels().get(LABEL_RESTORE_BACKUP_OF) {
        return Err(Error::stalled(
        "TargetIsBackup",
        format!("branch {t} is the backup made by restore {of}; name the branch to replace, not a backup"),
        ));
    }
    if target.labels().contains_key(LABEL_RESTORE) {
        return Err(Error::stalled(
            "TargetIsRestore",
            format!("branch {t} is a restore's preview branch; name the branch to replace"),
        ));
    }
    if spec.source.branch.as_deref() == Some(t.as_str()) {
        if spec.preserve_under_name.is_none() {
            return Err(Error::stalled(
            "PreserveUnderNameRequired",
            "restoring a branch to its own history needs preserveUnderName: the name of the backup of its current data",
        ));
        }
        if spec.source.lsn.is_none() && spec.source.timestamp.is_none() {
            return Err(Error::stalled(
                "PointRequired",
                "restoring a branch to its own history needs source.lsn or source.timestamp",
            ));
        }
    }
    if !branch_ready(target) {
        return Err(Error::Waiting(format!(
            "waiting for target branch {t} to be Ready"
        )));
    }
    let target_major = pg_major_of_branch(target);
    if let (Some(s), Some(tm)) = (source_major, target_major) {
        if s != tm {
            return Err(Error::stalled(
            "PgMajorMismatch",
            format!("the source holds PostgreSQL {s} data but branch {t} runs PostgreSQL {tm}; restore into a branch of the same major version"),
        ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BranchStatus, RestoreSource};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn ready(name: &str, major: i64) -> Branch {
        let mut b = Branch::new(name, Default::default());
        b.status = Some(BranchStatus {
            timeline_id: Some("a1b2c3d4e5f60718".into()),
            pg_major: Some(major),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "Ready".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
            }],
            ..Default::default()
        });
        b
    }

    fn spec(
        source_branch: Option<&str>,
        lsn: Option<&str>,
        backup: Option<&str>,
    ) -> crate::api::SnapshotRestoreSpec {
        crate::api::SnapshotRestoreSpec {
            source: RestoreSource {
                snapshot: source_branch.is_none().then(|| "snap".to_string()),
                branch: source_branch.map(Into::into),
                lsn: lsn.map(Into::into),
                ..Default::default()
            },
            target: Some("prod".into()),
            finalize: true,
            preserve_under_name: backup.map(Into::into),
        }
    }

    fn reason(r: Result<(), Error>) -> Option<String> {
        r.err().map(|e| e.reason())
    }

    #[test]
    fn restore_names_are_branch_names() {
        assert!(check_name("promote").is_ok());
        for bad in ["a.b", "1st", &"x".repeat(45)] {
            assert_eq!(
                reason(check_name(bad)).as_deref(),
                Some("InvalidName"),
                "{bad}"
            );
        }
    }

    #[test]
    fn what_a_target_must_be() {
        let prod = ready("prod", 15);
        assert_eq!(
            reason(check_target(&spec(None, None, None), &prod, Some(15))),
            None
        );
        assert_eq!(
            reason(check_target(&spec(None, None, None), &prod, Some(16))).as_deref(),
            Some("PgMajorMismatch")
        );
        let mut backup = prod.clone();
        backup.metadata.labels =
            Some([(LABEL_RESTORE_BACKUP_OF.to_string(), "r1".to_string())].into());
        assert_eq!(
            reason(check_target(&spec(None, None, None), &backup, Some(15))).as_deref(),
            Some("TargetIsBackup")
        );
        let mut preview = prod.clone();
        preview.metadata.labels = Some([(LABEL_RESTORE.to_string(), "r1".to_string())].into());
        assert_eq!(
            reason(check_target(&spec(None, None, None), &preview, Some(15))).as_deref(),
            Some("TargetIsRestore")
        );
        // Its own history: a point and a backup name.
        assert_eq!(
            reason(check_target(
                &spec(Some("prod"), Some("0/1"), None),
                &prod,
                Some(15)
            ))
            .as_deref(),
            Some("PreserveUnderNameRequired")
        );
        assert_eq!(
            reason(check_target(
                &spec(Some("prod"), None, Some("old")),
                &prod,
                Some(15)
            ))
            .as_deref(),
            Some("PointRequired")
        );
        assert_eq!(
            reason(check_target(
                &spec(Some("prod"), Some("0/1"), Some("old")),
                &prod,
                Some(15)
            )),
            None
        );
        // Not Ready yet: wait, not stall.
        let mut starting = prod.clone();
        starting.status.as_mut().unwrap().conditions.clear();
        assert_eq!(
            reason(check_target(&spec(None, None, None), &starting, Some(15))).as_deref(),
            Some("Waiting")
        );
    }
}
