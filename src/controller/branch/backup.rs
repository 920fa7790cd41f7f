//! `spec.backup`: continuous archiving of the branch's current timeline to
//! a BackupDestination, base backups at once and on the schedule, and the
//! `BackupHealthy` condition.
//!
//! Every pass (once the timeline is Ready) the destination and its Secret
//! are read and the target handed to the storage layer again
//! (`Storage::set_backup` is idempotent, and a restarted engine, which
//! keeps credentials only in memory, resumes). The target is
//! `<pathPrefix>/<branch UID>` with the timeline id as barman server name:
//! each branch has its own prefix, each timeline its own archive, so a
//! restore that gives the branch a new timeline archives that one next to
//! the old (never into it: the shared-archive trap of STORAGE-FACTS.md),
//! takes its first base backup at once, and stops archiving the replaced
//! timeline.
//!
//! A destination that fails never stops the branch: the compute keeps
//! serving, the WAL waits in the engine's local archive and is uploaded
//! when the destination is back; only `BackupHealthy` (False, with the
//! reason), an Event on each change and the `pgbranch_backup_unhealthy`
//! metric say so. The decisions ([`health`], [`base_backup_due`],
//! [`summarize`]) are pure and unit-tested.

use std::time::Duration;

use jiff::Timestamp;
use kube::runtime::events::EventType;
use kube::ResourceExt;

use super::super::object_store::for_destination;
use super::super::scheduling::{self, Cadence};
use super::super::status::publish;
use super::{with_deadline, Context, Error};
use crate::api::conditions::{condition, get_condition, remove_condition, set_condition};
use crate::api::{
    BackupDestination, BackupSpec, BaseBackupStatus, Branch, BranchBackupStatus, BranchStatus,
    FALSE, READY, TRUE,
};
use crate::backup::Failure;
use crate::storage::{
    BackupStatus, BackupTarget, BaseBackup, BaseBackupRequest, StorageError, TimelineId,
};

/// The condition type.
pub const BACKUP_HEALTHY: &str = "BackupHealthy";
/// How often a backed-up branch's status is refreshed from the engine.
pub const BACKUP_POLL: Duration = Duration::from_secs(10);
/// WAL waiting longer than this for upload makes the backup unhealthy
/// even without an error (the engine tries every second).
pub const LAG_LIMIT: Duration = Duration::from_secs(60);
/// The idempotency key of a timeline's first base backup.
const INITIAL_KEY: &str = "initial";

/// What `BackupHealthy` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    pub reason: String,
    pub message: String,
}

impl Health {
    fn bad(reason: &str, message: String) -> Self {
        Self {
            healthy: false,
            reason: reason.to_string(),
            message,
        }
    }
}

/// The reason a storage error of a backup call carries: the object store's
/// failure when its message names one (`EndpointUnreachable: ...`), else
/// the storage error's own.
fn storage_reason(e: &StorageError) -> String {
    Failure::named_in(&e.to_string())
        .map(|f| f.reason().to_string())
        .unwrap_or_else(|| format!("Storage{}", e.reason()))
}

/// `BackupHealthy` from what was observed: a problem found before the
/// engine was reached (`problem`: reason, message), the destination's own
/// Ready condition (`dest_ready`: ready, reason, message), and the engine's
/// status.
pub fn health(
    destination: &str,
    problem: Option<(String, String)>,
    dest_ready: Option<(bool, String, String)>,
    engine: Option<&BackupStatus>,
    now: Timestamp,
) -> Health {
    if let Some((reason, message)) = problem {
        return Health::bad(&reason, message);
    }
    let Some(st) = engine else {
        return Health::bad(
            "NotArchiving",
            "the storage engine is not archiving this branch's timeline yet".into(),
        );
    };
    let lag = st.lag(now);
    let waiting = format!(
        "{} WAL file(s) wait on the storage volume{}; the database keeps serving and archiving catches up when the destination is back",
        st.pending,
        if st.pending > 0 {
            format!(" (oldest for {} s)", lag.as_secs())
        } else {
            String::new()
        }
    );
    if let Some(e) = &st.last_error {
        return Health::bad(
            e.failure.reason(),
            format!(
                "uploading WAL to destination {destination} fails: {}; {waiting}",
                e.message
            ),
        );
    }
    if let Some((false, reason, message)) = &dest_ready {
        return Health::bad(
            "DestinationNotReady",
            format!(
                "BackupDestination {destination} is not Ready ({reason}: {message}); {waiting}"
            ),
        );
    }
    if lag > LAG_LIMIT {
        return Health::bad(
            "ArchiveLagging",
            format!("uploading WAL to destination {destination} is behind: {waiting}"),
        );
    }
    if let Some(e) = &st.base_backup_error {
        return Health::bad(
            "BaseBackupFailed",
            format!(
                "the last base backup to destination {destination} failed ({}: {}); WAL archiving goes on",
                e.failure.reason(),
                e.message
            ),
        );
    }
    if st.base_backups.is_empty() {
        return Health::bad(
            "WaitingForBaseBackup",
            format!(
                "WAL is archived to destination {destination}; the first base backup is {}",
                if st.base_backup_running {
                    "being taken"
                } else {
                    "not taken yet"
                }
            ),
        );
    }
    Health {
        healthy: true,
        reason: "Archiving".into(),
        message: format!(
            "WAL archived to destination {destination} up to {}; {} base backup(s), recoverable from {}",
            st.last_archived_wal.as_deref().unwrap_or("(nothing yet)"),
            st.base_backups.len(),
            st.base_backups
                .first()
                .and_then(|b| b.ended_at)
                .map(scheduling::rfc3339)
                .unwrap_or_else(|| "(unknown)".into())
        ),
    }
}

/// The base backup to ask for now, if any: the timeline's first one (no
/// complete base backup in the destination and none requested), else the
/// schedule's due slot. Returns (request key, slot to record as the last
/// scheduled one, next slot). Nothing is asked while one runs; the slot is
/// asked for once it finished.
pub fn base_backup_due(
    cadence: Option<&Cadence>,
    engine: &BackupStatus,
    last_slot: Option<Timestamp>,
    created: Timestamp,
    now: Timestamp,
) -> (Option<String>, Option<Timestamp>, Option<Timestamp>) {
    let next = cadence.and_then(|c| c.next_after(now));
    if engine.base_backup_running {
        return (None, last_slot, next);
    }
    let due = cadence.and_then(|c| scheduling::due(c, false, last_slot, created, now).run);
    if engine.base_backups.is_empty() && engine.base_backup_key.is_none() {
        // The first one also stands for a slot already due.
        return (Some(INITIAL_KEY.into()), due.or(last_slot), next);
    }
    match due {
        Some(slot) => (Some(scheduling::rfc3339(slot)), Some(slot), next),
        None => (None, last_slot, next),
    }
}

fn base_status(b: &BaseBackup) -> BaseBackupStatus {
    BaseBackupStatus {
        id: b.backup_id.clone(),
        time: b.ended_at.map(scheduling::rfc3339),
        lsn: b.end_lsn.map(|l| l.to_string()),
        size_bytes: b.size_bytes.and_then(|s| i64::try_from(s).ok()),
        duration_seconds: (!b.duration.is_zero())
            .then(|| (b.duration.as_secs_f64() * 10.0).round() / 10.0),
    }
}

/// `status.backup` from the engine's status.
pub fn summarize(
    spec: &BackupSpec,
    timeline: &TimelineId,
    location: Option<String>,
    engine: Option<&BackupStatus>,
    now: Timestamp,
) -> BranchBackupStatus {
    let mut out = BranchBackupStatus {
        destination: spec.destination.clone(),
        timeline_id: Some(timeline.to_string()),
        location,
        ..Default::default()
    };
    let Some(st) = engine else {
        return out;
    };
    let oldest = st.base_backups.first();
    out.first_recoverable_time = oldest.and_then(|b| b.ended_at).map(scheduling::rfc3339);
    out.first_recoverable_lsn = oldest.and_then(|b| b.end_lsn).map(|l| l.to_string());
    out.last_recoverable_time = oldest
        .and(st.last_segment_closed_at)
        .map(scheduling::rfc3339);
    out.last_archived_wal = st.last_archived_wal.clone();
    out.last_archived_time = st.last_archived_at.map(scheduling::rfc3339);
    out.archive_lag_seconds = i64::try_from(st.lag(now).as_secs()).unwrap_or(i64::MAX);
    out.pending_wal_files = i64::try_from(st.pending).unwrap_or(i64::MAX);
    // The engine's own record (with its duration) when it is the newest.
    let newest = match (&st.last_base_backup, st.base_backups.last()) {
        (Some(own), Some(listed)) if own.backup_id == listed.backup_id => Some(own),
        (_, Some(listed)) => Some(listed),
        (own, None) => own.as_ref(),
    };
    out.last_base_backup = newest.map(base_status);
    out.base_backups = i64::try_from(st.base_backups.len()).unwrap_or(i64::MAX);
    out
}

/// The backup stage of the pipeline (see the module docs). Returns when to
/// look again (None: not backed up).
pub(super) async fn reconcile_backup(
    ctx: &Context,
    branch: &Branch,
    timeline: &TimelineId,
    uid: &str,
    status: &mut BranchStatus,
    now: Timestamp,
) -> Result<Option<Duration>, Error> {
    let before = get_condition(&status.conditions, BACKUP_HEALTHY).cloned();
    // A replaced timeline (a restore moved the branch) or a removed
    // spec.backup: stop archiving what is no longer archived.
    let archived = status
        .backup
        .as_ref()
        .and_then(|b| b.timeline_id.as_deref())
        .and_then(|t| TimelineId::new(t).ok());
    if let Some(old) = archived.filter(|t| t != timeline || branch.spec.backup.is_none()) {
        match with_deadline(ctx, "stop archiving", ctx.storage.set_backup(&old, None)).await {
            Ok(_) | Err(Error::Storage(StorageError::NotFound { .. })) => {
                tracing::info!(timeline = %old, "archiving of a timeline this branch no longer uses stopped");
            }
            Err(e) => return Err(e),
        }
    }
    let Some(spec) = &branch.spec.backup else {
        status.backup = None;
        remove_condition(&mut status.conditions, BACKUP_HEALTHY);
        return Ok(None);
    };
    let ns = branch.namespace().unwrap_or_default();
    let mut problem = None;
    let mut dest_ready = None;
    let mut engine = None;
    let mut location = None;
    match ctx
        .get::<BackupDestination>(&ns, "read backup destination", &spec.destination)
        .await?
    {
        None => {
            problem = Some((
                "DestinationNotFound".to_string(),
                format!(
                    "BackupDestination {:?} does not exist in namespace {ns}; create it (nothing is archived meanwhile: the WAL waits on the storage volume)",
                    spec.destination
                ),
            ))
        }
        Some(d) => {
            dest_ready = d.status.as_ref().and_then(|s| {
                get_condition(&s.conditions, READY)
                    .map(|c| (c.status == TRUE, c.reason.clone(), c.message.clone()))
            });
            match for_destination(ctx, &d).await? {
                Err(p) => problem = Some(p),
                Ok(mut store) => {
                    store.prefix = if store.prefix.is_empty() {
                        uid.to_string()
                    } else {
                        format!("{}/{uid}", store.prefix)
                    };
                    location = Some(store.s3_url());
                    let target = BackupTarget {
                        store,
                        server: timeline.to_string(),
                    };
                    match with_deadline(
                        ctx,
                        "enable archiving",
                        ctx.storage.set_backup(timeline, Some(target)),
                    )
                    .await
                    {
                        Ok(st) => engine = st,
                        Err(Error::Storage(e)) => {
                            problem = Some((
                                storage_reason(&e),
                                format!("archiving to destination {} could not start: {e}", spec.destination),
                            ))
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    if engine.is_none() && problem.is_some() {
        // Archiving may still run with what it was given before.
        engine = with_deadline(ctx, "read backup status", ctx.storage.get_backup(timeline))
            .await
            .ok()
            .flatten();
    }
    // Base backups: the first one at once, then on the schedule.
    let cadence = match spec.schedule.as_deref().map(|e| Cadence::cron(e, None)) {
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            problem.get_or_insert((e.reason().to_string(), format!("spec.backup.schedule: {e}")));
            None
        }
        None => None,
    };
    let prev = status.backup.clone().unwrap_or_default();
    let last_slot = prev
        .last_scheduled_time
        .as_deref()
        .and_then(crate::point::read_time);
    let created = crate::controller::expiry::created(branch).unwrap_or(now);
    let mut recorded_slot = last_slot;
    let mut next = cadence.as_ref().and_then(|c| c.next_after(now));
    if let Some(st) = engine.as_mut() {
        let (key, slot, n) = base_backup_due(cadence.as_ref(), st, last_slot, created, now);
        next = n;
        if let Some(key) = key {
            let req = BaseBackupRequest {
                key,
                keep_count: spec
                    .retention
                    .as_ref()
                    .and_then(|r| r.count)
                    .and_then(|c| u32::try_from(c).ok()),
                max_age: spec
                    .retention
                    .as_ref()
                    .and_then(|r| r.max_age.as_deref())
                    .and_then(|a| crate::api::parse_span(a).ok()),
            };
            *st = with_deadline(
                ctx,
                "start a base backup",
                ctx.storage.start_base_backup(timeline, req),
            )
            .await?;
            recorded_slot = slot;
        }
    }

    let h = health(&spec.destination, problem, dest_ready, engine.as_ref(), now);
    let mut summary = summarize(spec, timeline, location, engine.as_ref(), now);
    summary.last_scheduled_time = recorded_slot.map(scheduling::rfc3339);
    summary.next_scheduled_time = next.map(scheduling::rfc3339);
    status.backup = Some(summary);
    let cond = condition(
        BACKUP_HEALTHY,
        if h.healthy { TRUE } else { FALSE },
        &h.reason,
        &h.message,
        branch.metadata.generation,
        now,
    );
    set_condition(&mut status.conditions, cond);
    let flipped = before
        .as_ref()
        .is_none_or(|c| c.reason != h.reason || (c.status == TRUE) != h.healthy);
    if flipped {
        if h.healthy {
            tracing::info!(reason = %h.reason, "backup healthy");
        } else {
            tracing::warn!(reason = %h.reason, message = %h.message, "backup unhealthy");
        }
        let type_ = if h.healthy {
            EventType::Normal
        } else {
            EventType::Warning
        };
        publish(ctx, branch, type_, &h.reason, "Backup", &h.message).await;
    }
    let mut again = BACKUP_POLL;
    if let Some(n) = next {
        again = again.min(scheduling::until(now, n) + Duration::from_secs(1));
    }
    Ok(Some(again))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::BackupError;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn listed(id: &str, ended: &str) -> BaseBackup {
        BaseBackup {
            backup_id: id.into(),
            end_lsn: Some("0/5000000".parse().unwrap()),
            ended_at: Some(ts(ended)),
            duration: Duration::ZERO,
            size_bytes: Some(1234),
        }
    }

    fn archiving() -> BackupStatus {
        BackupStatus {
            server: "tl".into(),
            last_archived_wal: Some("000000010000000000000003".into()),
            last_archived_at: Some(ts("2026-01-01T00:00:09Z")),
            last_segment_closed_at: Some(ts("2026-01-01T00:00:08Z")),
            base_backups: vec![listed("b1", "2026-01-01T00:00:05Z")],
            base_backup_key: Some("initial".into()),
            ..Default::default()
        }
    }

    #[test]
    fn health_names_the_first_problem() {
        let now = ts("2026-01-01T00:00:10Z");
        let ok = health(
            "s3",
            None,
            Some((true, "ProbeSucceeded".into(), String::new())),
            Some(&archiving()),
            now,
        );
        assert!(ok.healthy, "{ok:?}");
        assert_eq!(ok.reason, "Archiving");
        let missing = health(
            "s3",
            Some(("DestinationNotFound".into(), "no".into())),
            None,
            None,
            now,
        );
        assert_eq!(
            (missing.healthy, missing.reason.as_str()),
            (false, "DestinationNotFound")
        );
        let mut down = archiving();
        down.pending = 3;
        down.oldest_pending_since = Some(ts("2026-01-01T00:00:04Z"));
        down.last_error = Some(BackupError::new(
            Failure::EndpointUnreachable,
            "connection refused",
        ));
        let h = health("s3", None, None, Some(&down), now);
        assert_eq!(h.reason, "EndpointUnreachable");
        assert!(
            h.message.contains("3 WAL file(s) wait") && h.message.contains("6 s"),
            "{}",
            h.message
        );
        let stalled = health(
            "s3",
            None,
            Some((false, "EndpointUnreachable".into(), "down".into())),
            Some(&archiving()),
            now,
        );
        assert_eq!(stalled.reason, "DestinationNotReady");
        let mut lagging = archiving();
        lagging.pending = 1;
        lagging.oldest_pending_since = Some(ts("2025-12-31T23:58:00Z"));
        assert_eq!(
            health("s3", None, None, Some(&lagging), now).reason,
            "ArchiveLagging"
        );
        let mut first = archiving();
        first.base_backups.clear();
        first.base_backup_running = true;
        let h = health("s3", None, None, Some(&first), now);
        assert_eq!(
            (h.healthy, h.reason.as_str()),
            (false, "WaitingForBaseBackup")
        );
    }

    #[test]
    fn the_first_base_backup_is_at_once_then_on_the_schedule() {
        let c = Cadence::cron("0 * * * *", None).unwrap();
        let created = ts("2026-01-01T00:30:00Z");
        let none = BackupStatus::default();
        // First: at once, standing for nothing yet due.
        let (k, slot, next) =
            base_backup_due(Some(&c), &none, None, created, ts("2026-01-01T00:31:00Z"));
        assert_eq!(k.as_deref(), Some("initial"));
        assert_eq!(slot, None);
        assert_eq!(next, Some(ts("2026-01-01T01:00:00Z")));
        // Running: nothing asked.
        let running = BackupStatus {
            base_backup_running: true,
            ..Default::default()
        };
        assert_eq!(
            base_backup_due(
                Some(&c),
                &running,
                None,
                created,
                ts("2026-01-01T01:00:05Z")
            )
            .0,
            None
        );
        // Done, slot due: asked by its slot, recorded.
        let st = archiving();
        let (k, slot, _) =
            base_backup_due(Some(&c), &st, None, created, ts("2026-01-01T01:00:05Z"));
        assert_eq!(k.as_deref(), Some("2026-01-01T01:00:00Z"));
        assert_eq!(slot, Some(ts("2026-01-01T01:00:00Z")));
        // Recorded: not again until the next slot.
        let (k, slot, _) =
            base_backup_due(Some(&c), &st, slot, created, ts("2026-01-01T01:30:00Z"));
        assert_eq!((k, slot), (None, Some(ts("2026-01-01T01:00:00Z"))));
        // No schedule: only the first.
        assert_eq!(
            base_backup_due(None, &st, None, created, ts("2026-01-02T00:00:00Z")).0,
            None
        );
        // Backup turned on long after creation: the first consumes the due slot.
        let (k, slot, _) =
            base_backup_due(Some(&c), &none, None, created, ts("2026-01-01T05:10:00Z"));
        assert_eq!(
            (k.as_deref(), slot),
            (Some("initial"), Some(ts("2026-01-01T05:00:00Z")))
        );
    }

    #[test]
    fn status_summarizes_the_recoverable_window() {
        let spec = BackupSpec {
            destination: "s3".into(),
            ..Default::default()
        };
        let tl = TimelineId::new("abc").unwrap();
        let mut st = archiving();
        st.last_base_backup = Some(BaseBackup {
            duration: Duration::from_millis(2345),
            ..listed("b1", "2026-01-01T00:00:05Z")
        });
        let s = summarize(
            &spec,
            &tl,
            Some("s3://b/p/uid".into()),
            Some(&st),
            ts("2026-01-01T00:00:10Z"),
        );
        assert_eq!(
            s.first_recoverable_time.as_deref(),
            Some("2026-01-01T00:00:05Z")
        );
        assert_eq!(s.first_recoverable_lsn.as_deref(), Some("0/5000000"));
        assert_eq!(
            s.last_recoverable_time.as_deref(),
            Some("2026-01-01T00:00:08Z")
        );
        assert_eq!(
            s.last_archived_wal.as_deref(),
            Some("000000010000000000000003")
        );
        let b = s.last_base_backup.unwrap();
        assert_eq!(
            (b.id.as_str(), b.size_bytes, b.duration_seconds),
            ("b1", Some(1234), Some(2.3))
        );
        assert_eq!(s.base_backups, 1);
        // No base backup: nothing is recoverable yet.
        st.base_backups.clear();
        let s = summarize(&spec, &tl, None, Some(&st), ts("2026-01-01T00:00:10Z"));
        assert_eq!(
            (s.first_recoverable_time, s.last_recoverable_time),
            (None, None)
        );
    }

    #[test]
    fn storage_errors_carry_the_stores_reason() {
        let e = StorageError::Unavailable {
            message: "EndpointUnreachable: could not connect".into(),
        };
        assert_eq!(storage_reason(&e), "EndpointUnreachable");
        assert_eq!(
            storage_reason(&StorageError::invalid("x")),
            "StorageInvalidArgument"
        );
    }
}
