//! The branch's timeline in storage: found by `status.timelineId`,
//! adopted (a restore's backup branch), or created from the parent, a
//! snapshot or nothing, idempotently by the Branch UID; what storage
//! says about it is copied into status.

use super::*;

pub(super) fn storage_stalled(e: StorageError) -> Error {
    match &e {
        StorageError::InvalidPoint { .. } => Error::stalled(
            "PointOutsideRestoreWindow",
            format!("the parent cannot be branched at that point: {e}"),
        ),
        StorageError::InvalidArgument { .. } => Error::stalled("InvalidPoint", e.to_string()),
        StorageError::NotFound { .. } => Error::stalled(
            "ParentTimelineNotFound",
            format!("the parent's timeline is gone from storage: {e}"),
        ),
        StorageError::Conflict { .. } => Error::stalled("TimelineConflict", e.to_string()),
        StorageError::Unauthorized { .. } => Error::stalled("StorageUnauthorized", e.to_string()),
        _ => Error::Storage(e),
    }
}

/// The Stalled reason of a timeline that storage could not create: a
/// source whose WAL archiving fails has its own (the message carries the
/// archiver's state).
pub(super) fn timeline_failed_reason(error: &str) -> &'static str {
    if error.contains(crate::storage::ARCHIVING_FAILED) {
        "SourceArchivingFailed"
    } else {
        "TimelineFailed"
    }
}

/// Takes over an existing timeline named by [`ANNOTATION_ADOPT_TIMELINE`]
/// (a restore's backup branch, an imported timeline) instead of creating
/// one, unless another Branch already serves it.
pub(super) async fn adopt_timeline(
    ctx: &Context,
    branch: &Branch,
    id: &str,
    status: &mut BranchStatus,
) -> Result<Timeline, Error> {
    let id = TimelineId::new(id.to_string()).map_err(|e| {
        Error::stalled(
            "InvalidAnnotation",
            format!("annotation {ANNOTATION_ADOPT_TIMELINE}: {e}"),
        )
    })?;
    let ns = branch.namespace().unwrap_or_default();
    let all = ctx.list::<Branch>(&ns, "list branches", "").await?;
    if let Some(other) = all.iter().find(|b| {
        b.uid() != branch.uid()
            && b.status.as_ref().and_then(|s| s.timeline_id.as_deref()) == Some(id.as_str())
    }) {
        return Err(Error::stalled(
            "TimelineInUse",
            format!(
                "timeline {id} named by {ANNOTATION_ADOPT_TIMELINE} is the timeline of branch {}",
                other.name_any()
            ),
        ));
    }
    match with_deadline(ctx, "get timeline", ctx.storage.get_timeline(&id)).await {
        Ok(tl) => {
            tracing::info!(timeline = %id, "adopting timeline");
            status.timeline_id = Some(tl.id.to_string());
            Ok(tl)
        }
        Err(Error::Storage(StorageError::NotFound { .. })) => Err(Error::stalled(
            "TimelineNotFound",
            format!("timeline {id} named by {ANNOTATION_ADOPT_TIMELINE} does not exist in storage"),
        )),
        Err(e) => Err(e),
    }
}

/// Finds or creates the branch's timeline and records it in status.
pub(super) async fn ensure_timeline(
    ctx: &Context,
    branch: &Branch,
    parent: Option<&Branch>,
    creds: &Credentials,
    uid: &str,
    status: &mut BranchStatus,
) -> Result<Step<Timeline>, Error> {
    if let Some(id) = &status.timeline_id {
        let id = TimelineId::new(id.clone()).map_err(|e| {
            Error::stalled(
                "TimelineNotFound",
                format!("status.timelineId is invalid: {e}"),
            )
        })?;
        return match with_deadline(ctx, "get timeline", ctx.storage.get_timeline(&id)).await {
            // Still being created by us: ask again with the same key. A
            // creation that needs secrets (a superuser password, the
            // parent's connection) and was interrupted by a restart of
            // storage resumes only that way; otherwise storage returns it
            // as it is.
            Ok(tl) if tl.state == State::Creating && tl.key.as_str() == uid => {
                match create_timeline(ctx, branch, parent, creds, uid, true).await {
                    Ok(Step::Next(again)) if again.id == tl.id => Ok(Step::Next(again)),
                    Ok(Step::Next(other)) => {
                        tracing::warn!(timeline = %tl.id, other = %other.id, "storage answered the create with another timeline; keeping the recorded one");
                        Ok(Step::Next(tl))
                    }
                    // Waiting for the parent or another copy of it, or the
                    // request no longer matches (say the parent moved):
                    // keep polling the recorded timeline.
                    Ok(Step::Stop(_)) | Err(Error::Stalled { .. }) => Ok(Step::Next(tl)),
                    Err(e) => Err(e),
                }
            }
            Ok(tl) => Ok(Step::Next(tl)),
            Err(Error::Storage(StorageError::NotFound { .. })) => Err(Error::stalled(
                "TimelineNotFound",
                format!(
                    "timeline {id} of this branch no longer exists in storage; the data is gone"
                ),
            )),
            Err(e) => Err(e),
        };
    }
    if let Some(adopt) = branch.annotations().get(ANNOTATION_ADOPT_TIMELINE) {
        handover::check_adoption(ctx, branch, adopt).await?;
        return adopt_timeline(ctx, branch, adopt, status)
            .await
            .map(Step::Next);
    }
    let tl = match create_timeline(ctx, branch, parent, creds, uid, false).await? {
        Step::Next(tl) => tl,
        Step::Stop(done) => return Ok(Step::Stop(done)),
    };
    status.timeline_id = Some(tl.id.to_string());
    Ok(Step::Next(tl))
}

/// Asks storage for the branch's timeline, keyed by the Branch UID: starts
/// its creation, or returns it (resuming a creation a restart of storage
/// interrupted). `Stop`: not yet (parent not Ready, another copy of the
/// parent under way, the source snapshot not ready). `again`: the timeline
/// exists and is being created; this only looks it up (or resumes it).
async fn create_timeline(
    ctx: &Context,
    branch: &Branch,
    parent: Option<&Branch>,
    creds: &Credentials,
    uid: &str,
    again: bool,
) -> Result<Step<Timeline>, Error> {
    let key = OpKey::new(uid.to_string()).map_err(|e| {
        Error::stalled(
            "InvalidUid",
            format!("the Branch UID is not usable as a key: {e}"),
        )
    })?;
    let (source, source_connection) = match parent {
        None => match handover::snapshot_source(ctx, branch).await? {
            Some(Ok(source)) => (source, None),
            Some(Err(done)) => return Ok(Step::Stop(done)),
            None => (
                Source::Empty {
                    superuser_password: Some(Password(creds.superuser.clone())),
                },
                None,
            ),
        },
        Some(p) => {
            let ready = p
                .status
                .as_ref()
                .is_some_and(|s| crate::controller::status::is_ready(&s.conditions));
            let ptl = p.status.as_ref().and_then(|s| s.timeline_id.clone());
            if p.metadata.deletion_timestamp.is_some() {
                // The parent's deletion waits for its children (this one
                // included) to go, and this one waits for the parent: say so.
                return Err(Error::stalled(
                    "ParentBeingDeleted",
                    format!(
                        "the parent branch {} is being deleted, and its deletion waits for its children, this branch among them, to be deleted first; delete this Branch (or recreate it once the parent is gone)",
                        p.name_any()
                    ),
                ));
            }
            let Some(ptl) = ptl.filter(|_| ready) else {
                return Ok(Step::Stop(progressing(
                    "WaitingForParent",
                    format!("waiting for the parent branch {} to be Ready", p.name_any()),
                    ctx.config.poll_interval,
                )));
            };
            let ptl = TimelineId::new(ptl).map_err(storage_stalled)?;
            // One copy of a parent at a time: two backup-mode copies of one
            // running server at once have been seen to fail the first
            // ("WAL ends before end of online backup", copy driver).
            let stored = with_deadline(ctx, "list timelines", ctx.storage.list_timelines()).await?;
            if let Some(other) = stored.iter().find(|t| {
                t.state == State::Creating
                    && t.lineage.parent.as_ref() == Some(&ptl)
                    && t.key.as_str() != uid
            }) {
                return Ok(Step::Stop(progressing(
                    "WaitingForParentCopy",
                    format!(
                        "another copy of the parent branch {} is in progress (timeline {}); this one starts after it",
                        p.name_any(),
                        other.id
                    ),
                    ctx.config.poll_interval,
                )));
            }
            let source = if branch.spec.init_source == Some(InitSource::SchemaOnly) {
                Source::SchemaOnly { timeline: ptl }
            } else {
                let point = branch
                    .spec
                    .parent
                    .as_ref()
                    .map(parse_point)
                    .transpose()
                    .map_err(|i| Error::stalled(i.reason, i.message))?
                    .unwrap_or(crate::storage::Point::Head);
                Source::Timeline {
                    timeline: ptl,
                    point,
                }
            };
            (source, secrets::superuser_conn(ctx, p).await?)
        }
    };
    let req = CreateTimeline {
        key,
        source,
        source_connection,
        label: Some(format!(
            "{}/{}",
            branch.namespace().unwrap_or_default(),
            branch.name_any()
        )),
    };
    if again {
        tracing::debug!("asking storage again for the timeline being created");
    } else {
        tracing::info!("creating timeline");
    }
    let tl = with_deadline(ctx, "create timeline", ctx.storage.create_timeline(req))
        .await
        .map_err(|e| match e {
            Error::Storage(s) => storage_stalled(s),
            e => e,
        })?;
    Ok(Step::Next(tl))
}

/// Copies what storage says about the timeline into status. The fields
/// that move with every write (`lsn`, `logicalSizeBytes`) are taken only when
/// `refresh_stats` (first time, or the stats interval passed): a busy
/// database must not turn every reconcile into a status write.
pub(super) fn record_timeline(status: &mut BranchStatus, tl: &Timeline, refresh_stats: bool) {
    status.timeline_id = Some(tl.id.to_string());
    status.parent_lsn = tl.lineage.parent_lsn.map(|l| l.to_string());
    if status.parent_timeline_id.is_none() {
        status.parent_timeline_id = tl.lineage.parent.as_ref().map(|p| p.to_string());
    }
    if refresh_stats || status.logical_size_bytes.is_none() {
        status.lsn = tl.lsn.map(|l| l.to_string());
        status.logical_size_bytes = Some(i64::try_from(tl.logical_size_bytes).unwrap_or(i64::MAX));
    }
    status.created_at = Some(tl.created_at.to_string());
    status.pg_major = Some(i64::from(tl.pg_major));
}

/// A timeline storage has not made ready: still being created (with its
/// progress), failed, or being deleted. `None` when Ready.
pub(super) fn not_ready(tl: &Timeline, poll: Duration) -> Result<Option<Done>, Error> {
    match tl.state {
        State::Ready => Ok(None),
        State::Creating => {
            let what = tl
                .progress
                .as_ref()
                .map(|p| match p.percent {
                    Some(pc) => format!("{} ({pc}%)", p.step),
                    None => p.step.clone(),
                })
                .unwrap_or_else(|| "creating".into());
            Ok(Some(progressing(
                "CreatingTimeline",
                format!("storage is preparing timeline {}: {what}", tl.id),
                poll,
            )))
        }
        State::Failed => {
            let why = tl.error.clone().unwrap_or_else(|| "no reason given".into());
            Err(Error::stalled(
                timeline_failed_reason(&why),
                format!("storage could not create timeline {}: {why}", tl.id),
            ))
        }
        State::Deleting => Err(Error::stalled(
            "TimelineDeleting",
            format!("timeline {} is being deleted from storage", tl.id),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Lineage, Lsn};

    fn timeline(size: u64, lsn: u64) -> Timeline {
        Timeline {
            id: TimelineId::new("abcdef0123456789").unwrap(),
            key: OpKey::new("k").unwrap(),
            label: None,
            state: State::Ready,
            error: None,
            progress: None,
            lineage: Lineage {
                parent: None,
                snapshot: None,
                point: None,
                parent_lsn: Some(Lsn(0x1_0000_0010)),
                schema_only: false,
            },
            created_at: jiff::Timestamp::from_second(1_700_000_000).unwrap(),
            data_path: "timelines/abcdef0123456789/pgdata".into(),
            wal_archive_path: "wal/abcdef0123456789".into(),
            pg_major: 15,
            lsn: Some(Lsn(lsn)),
            logical_size_bytes: size,
            exclusive_bytes: None,
            restore_window: None,
        }
    }

    #[test]
    fn a_source_that_cannot_archive_has_its_own_reason() {
        let e = format!(
            "unavailable: {}: the copy waited 60 s ...",
            crate::storage::ARCHIVING_FAILED
        );
        assert_eq!(timeline_failed_reason(&e), "SourceArchivingFailed");
        assert_eq!(timeline_failed_reason("disk full"), "TimelineFailed");
    }

    #[test]
    fn status_records_timeline_and_refreshes_stats_only_when_due() {
        let mut st = BranchStatus::default();
        record_timeline(&mut st, &timeline(1_000_000, 100), false);
        assert_eq!(st.timeline_id.as_deref(), Some("abcdef0123456789"));
        assert_eq!(st.parent_lsn.as_deref(), Some("1/10"));
        assert_eq!(st.pg_major, Some(15));
        assert_eq!(st.logical_size_bytes, Some(1_000_000), "first time: taken");
        assert_eq!(st.lsn.as_deref(), Some("0/64"));
        record_timeline(&mut st, &timeline(2_000_000, 200), false);
        assert_eq!(st.logical_size_bytes, Some(1_000_000), "not due: kept");
        assert_eq!(st.lsn.as_deref(), Some("0/64"));
        record_timeline(&mut st, &timeline(2_000_000, 200), true);
        assert_eq!(st.logical_size_bytes, Some(2_000_000));
        assert_eq!(st.lsn.as_deref(), Some("0/C8"));
    }
}
