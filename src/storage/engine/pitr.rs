//! Points in the past: resolving a point (LSN or time) to a base and an
//! LSN to replay to, through the timeline's lineage when the point is
//! before its own window, and the replay itself (see "Points in the past"
//! in [`super`]).

use std::fs;
use std::path::Path;

use futures::future::BoxFuture;

use super::meta::{BaseRow, TimelineRow};
use super::pg::StopMode;
use super::Engine;
use crate::storage::{
    ConnInfo, Lsn, Point, PointInfo, RestoreWindow, State, StorageError, TimelineId,
};

/// Told a replay's progress in percent; what it returns (the progress
/// write) is awaited before the replay goes on.
pub(super) type OnPercent = dyn Fn(Option<u8>) -> BoxFuture<'static, ()> + Send + Sync;

/// Whether a point lies before the start of a window.
fn point_before(p: &Point, w: &RestoreWindow) -> bool {
    match p {
        Point::Head => false,
        Point::Lsn(l) => *l < w.oldest.lsn,
        Point::Timestamp(t) => w.oldest.time.is_some_and(|o| *t < o),
    }
}

impl Engine {
    /// Replays `src`'s archive on the writable base copy `data` up to
    /// `target` and promotes; leaves it cleanly shut down.
    pub(super) async fn replay(
        &self,
        data: &Path,
        base: &BaseRow,
        target: Lsn,
        archive: Option<&TimelineId>,
        log: &Path,
        report: &OnPercent,
    ) -> Result<(), StorageError> {
        let src = &base.timeline;
        let from = base.lsn.0;
        let on_lsn = move |l: Lsn| {
            let span = target.0.saturating_sub(from).max(1);
            let done = l.0.saturating_sub(from).min(span);
            report(Some((done * 100 / span) as u8))
        };
        self.write_recovery(data, src, target, "promote")?;
        let srv = match self
            .private_server_with(data, archive, log, Some(&on_lsn))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                // The whole log of this replay: the reason may be followed
                // by several lines of shutdown.
                let text = fs::read_to_string(log).unwrap_or_default();
                if text.contains("recovery ended before configured recovery target was reached")
                    || text.contains("before consistent recovery point")
                {
                    let window = match self.inner.meta.get(src).await? {
                        Some(row) => self.reported_window(&row).await.unwrap_or(None),
                        None => None,
                    };
                    return Err(StorageError::InvalidPoint {
                        message: format!(
                            "WAL replay ended before reaching {target}: the point is not in the archived WAL of timeline {src}"
                        ),
                        window,
                    });
                }
                return Err(e);
            }
        };
        srv.stop(StopMode::Fast).await?;
        for f in ["pgbranch.recovery.conf", "recovery.signal"] {
            let _ = fs::remove_file(data.join(f));
        }
        Ok(())
    }

    /// Checks a point against the window and finds the base and LSN to
    /// replay to.
    /// Like [`Self::resolve_own`], and for a point before the timeline's
    /// own window, follows lineage: the parent's history up to the branch
    /// point is this timeline's history too (replayed from the parent's
    /// bases and archive while the parent exists).
    pub(super) async fn resolve_target(
        &self,
        t: &TimelineRow,
        point: &Point,
        conn: Option<&ConnInfo>,
    ) -> Result<(BaseRow, Lsn), StorageError> {
        match self.resolve_own(t, point, conn).await {
            Err(StorageError::InvalidPoint {
                message,
                window: Some(w),
            }) if point_before(point, &w) => {
                if let Some(found) = self.resolve_in_parent(t, point).await? {
                    return Ok(found);
                }
                let window = self.reported_window(t).await?.or(Some(w));
                Err(StorageError::InvalidPoint { message, window })
            }
            r => r,
        }
    }

    fn resolve_in_parent<'a>(
        &'a self,
        t: &'a TimelineRow,
        point: &'a Point,
    ) -> futures::future::BoxFuture<'a, Result<Option<(BaseRow, Lsn)>, StorageError>> {
        Box::pin(async move {
            let Some(parent) = self.lineage_parent(t).await? else {
                return Ok(None);
            };
            let Ok((base, target)) = self.resolve_target(&parent, point, None).await else {
                return Ok(None);
            };
            // Only the parent's history up to the branch point is ours.
            let ours = match (t.lineage.parent_lsn, point) {
                (Some(bp), _) => target <= bp,
                // Crash-consistent head copies do not know their LSN: only
                // commits made before the copy was asked for are certain.
                (None, Point::Timestamp(ts)) => *ts <= t.created_at,
                (None, _) => false,
            };
            Ok(ours.then_some((base, target)))
        })
    }

    /// The parent whose history this timeline continues, if it still exists.
    async fn lineage_parent(&self, t: &TimelineRow) -> Result<Option<TimelineRow>, StorageError> {
        if t.lineage.schema_only {
            return Ok(None);
        }
        let Some(p) = &t.lineage.parent else {
            return Ok(None);
        };
        Ok(self
            .inner
            .meta
            .get(p)
            .await?
            .filter(|r| r.state == State::Ready))
    }

    /// The window a user can reach: the timeline's own, extended back
    /// through its ancestors' history while they exist.
    pub(super) async fn reported_window(
        &self,
        t: &TimelineRow,
    ) -> Result<Option<RestoreWindow>, StorageError> {
        let Some(mut w) = self.window(t).await? else {
            return Ok(None);
        };
        // The ancestors only lend their oldest point, which their bases
        // give: no need to read (index) their archives, which under a
        // parent's write load would put seconds of pg_waldump on every
        // child's status read.
        let mut at = self.lineage_parent(t).await?;
        while let Some(parent) = at {
            if let Some(oldest) = self.inner.meta.bases(&parent.id).await?.first() {
                if oldest.lsn < w.oldest.lsn || Some(oldest.time) < w.oldest.time {
                    w.oldest = PointInfo {
                        lsn: oldest.lsn,
                        time: Some(oldest.time),
                    };
                }
            }
            at = self.lineage_parent(&parent).await?;
        }
        Ok(Some(w))
    }

    /// Checks a point against the timeline's own window and finds the base
    /// and LSN to replay to.
    async fn resolve_own(
        &self,
        t: &TimelineRow,
        point: &Point,
        conn: Option<&ConnInfo>,
    ) -> Result<(BaseRow, Lsn), StorageError> {
        let no_window = || StorageError::InvalidPoint {
            message: format!("timeline {} has no restore window yet", t.id),
            window: None,
        };
        let mut w = self.window(t).await?.ok_or_else(no_window)?;
        let target = match point {
            Point::Head => {
                return Err(StorageError::internal("resolve_target called for head"));
            }
            Point::Lsn(x) => {
                if *x < w.oldest.lsn {
                    return Err(StorageError::InvalidPoint {
                        message: format!(
                            "LSN {x} is before the restore window of timeline {}",
                            t.id
                        ),
                        window: Some(w),
                    });
                }
                if *x > w.newest.lsn {
                    if let Some(c) = conn {
                        self.switch_wal(t, c).await?;
                        w = self.window(t).await?.ok_or_else(no_window)?;
                    }
                }
                if *x > w.newest.lsn {
                    return Err(StorageError::InvalidPoint {
                        message: format!(
                            "LSN {x} is after the newest archived WAL of timeline {} (in the future, or not archived yet)",
                            t.id
                        ),
                        window: Some(w),
                    });
                }
                *x
            }
            Point::Timestamp(ts) => {
                if *ts > jiff::Timestamp::now() {
                    return Err(StorageError::InvalidPoint {
                        message: format!("timestamp {ts} is in the future"),
                        window: Some(w),
                    });
                }
                if Some(*ts) < w.oldest.time {
                    return Err(StorageError::InvalidPoint {
                        message: format!(
                            "timestamp {ts} is before the restore window of timeline {}",
                            t.id
                        ),
                        window: Some(w),
                    });
                }
                if Some(*ts) > w.newest.time {
                    if self.archive_complete_if_stopped(t).await? {
                        // A stopped source has archived all it wrote.
                        w = self.window(t).await?.ok_or_else(no_window)?;
                    } else if let Some(c) = conn {
                        self.switch_wal(t, c).await?;
                        w = self.window(t).await?.ok_or_else(no_window)?;
                    }
                }
                if Some(*ts) > w.newest.time {
                    return Err(StorageError::InvalidPoint {
                        message: format!(
                            "timestamp {ts} is after the newest archived commit of timeline {} (pass a source connection so the engine can archive the current WAL, or retry later)",
                            t.id
                        ),
                        window: Some(w),
                    });
                }
                match self.inner.meta.commit_at_or_before(&t.id, *ts).await? {
                    Some(l) if l >= w.oldest.lsn => l,
                    _ => {
                        // No commit since the base: the newest base not after it.
                        let bases = self.inner.meta.bases(&t.id).await?;
                        // (A base stopped in recovery needs WAL after
                        // its point to replay to; a clean one does not.)
                        let b = bases
                            .iter()
                            .filter(|b| !b.in_recovery && b.time <= *ts)
                            .max_by_key(|b| b.lsn)
                            .or(bases.first())
                            .cloned()
                            .ok_or_else(no_window)?;
                        return Ok((b.clone(), b.lsn));
                    }
                }
            }
        };
        let bases = self.inner.meta.bases(&t.id).await?;
        // A base stopped in recovery is consistent at its LSN; replay
        // from it must go past that point.
        let base = bases
            .iter()
            .filter(|b| b.lsn < target || (b.lsn == target && !b.in_recovery))
            .max_by_key(|b| b.lsn)
            .cloned()
            .ok_or_else(|| StorageError::InvalidPoint {
                message: format!("no base at or before {target}"),
                window: Some(w.clone()),
            })?;
        Ok((base, target))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_before_a_window() {
        let w = RestoreWindow {
            oldest: PointInfo {
                lsn: Lsn(100),
                time: Some(jiff::Timestamp::from_second(1000).unwrap()),
            },
            newest: PointInfo {
                lsn: Lsn(200),
                time: Some(jiff::Timestamp::from_second(2000).unwrap()),
            },
        };
        assert!(point_before(&Point::Lsn(Lsn(99)), &w));
        assert!(!point_before(&Point::Lsn(Lsn(100)), &w));
        assert!(point_before(
            &Point::Timestamp(jiff::Timestamp::from_second(999).unwrap()),
            &w
        ));
        assert!(!point_before(&Point::Head, &w));
    }
}
