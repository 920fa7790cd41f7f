//! The `bases`, `wal_index` and `commits` tables: where point-in-time
//! copies of a timeline can start, and what has been read from its WAL
//! archive (commit records with their times).

use rusqlite::{params, OptionalExtension};

use super::{bad_value, str_to_ts, ts_to_str, Meta};
use crate::storage::{Lsn, SnapshotId, StorageError, TimelineId};

/// A base a point-in-time copy can start from.
#[derive(Debug, Clone)]
pub(crate) struct BaseRow {
    /// Relative to the volume root.
    pub path: String,
    pub timeline: TimelineId,
    pub snapshot: Option<SnapshotId>,
    pub lsn: Lsn,
    pub time: jiff::Timestamp,
    /// A base rolled forward by replay and stopped in recovery: it must be
    /// replayed (never merely started) and is consistent from `lsn` on.
    pub in_recovery: bool,
}

/// What has been read from a timeline's archive.
#[derive(Debug, Clone, Default)]
pub(crate) struct WalIndexRow {
    pub scanned_upto: u64,
    pub last_lsn: Option<Lsn>,
    pub last_segment: Option<String>,
    /// Every commit before this instant is known to be archived.
    pub complete_time: Option<jiff::Timestamp>,
}

impl Meta {
    pub async fn add_base(&self, b: &BaseRow) -> Result<(), StorageError> {
        self.execute(
            "INSERT OR REPLACE INTO bases (path, timeline, snapshot, lsn, time, in_recovery) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            vec![
                b.path.clone().into(),
                b.timeline.to_string().into(),
                b.snapshot.as_ref().map(|s| s.to_string()).into(),
                (b.lsn.0 as i64).into(),
                ts_to_str(b.time).into(),
                b.in_recovery.into(),
            ],
        )
        .await
    }

    /// Forgets one base (its directory is the caller's to delete).
    pub async fn delete_base(&self, path: &str) -> Result<(), StorageError> {
        self.execute(
            "DELETE FROM bases WHERE path = ?1",
            vec![path.to_string().into()],
        )
        .await
    }

    /// Bases of a timeline, oldest LSN first.
    pub async fn bases(&self, timeline: &TimelineId) -> Result<Vec<BaseRow>, StorageError> {
        let timeline = timeline.clone();
        self.with(move |c| {
            let mut st = c.prepare(
                "SELECT path, timeline, snapshot, lsn, time, in_recovery FROM bases WHERE timeline = ?1 ORDER BY lsn, time",
            )?;
            let rows = st.query_map(params![timeline.as_str()], |r| {
                let snap: Option<String> = r.get(2)?;
                let time: String = r.get(4)?;
                Ok(BaseRow {
                    path: r.get(0)?,
                    timeline: TimelineId::new(r.get::<_, String>(1)?).map_err(bad_value)?,
                    snapshot: snap.map(SnapshotId::new).transpose().map_err(bad_value)?,
                    lsn: Lsn(r.get::<_, i64>(3)? as u64),
                    time: str_to_ts(&time),
                    in_recovery: r.get(5)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    pub async fn wal_index(&self, timeline: &TimelineId) -> Result<WalIndexRow, StorageError> {
        let timeline = timeline.clone();
        self.with(move |c| {
            c.query_row(
                "SELECT scanned_upto, last_lsn, last_segment, complete_time FROM wal_index WHERE timeline = ?1",
                params![timeline.as_str()],
                |r| {
                    let ct: Option<String> = r.get(3)?;
                    Ok(WalIndexRow {
                        scanned_upto: r.get::<_, i64>(0)? as u64,
                        last_lsn: r.get::<_, Option<i64>>(1)?.map(|v| Lsn(v as u64)),
                        last_segment: r.get(2)?,
                        complete_time: ct.map(|s| str_to_ts(&s)),
                    })
                },
            )
            .optional()
            .map(|o| o.unwrap_or_default())
        })
        .await
    }

    /// Stores newly read commit records and the new scan position.
    pub async fn record_wal_scan(
        &self,
        timeline: &TimelineId,
        idx: &WalIndexRow,
        commits: &[(Lsn, jiff::Timestamp)],
    ) -> Result<(), StorageError> {
        let (timeline, idx, commits) = (timeline.clone(), idx.clone(), commits.to_vec());
        self.with(move |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare(
                    "INSERT OR IGNORE INTO commits (timeline, lsn, time_us) VALUES (?1, ?2, ?3)",
                )?;
                for (lsn, t) in &commits {
                    st.execute(params![
                        timeline.as_str(),
                        lsn.0 as i64,
                        t.as_microsecond()
                    ])?;
                }
            }
            tx.execute(
                "INSERT OR REPLACE INTO wal_index (timeline, scanned_upto, last_lsn, last_segment, complete_time) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    timeline.as_str(),
                    idx.scanned_upto as i64,
                    idx.last_lsn.map(|l| l.0 as i64),
                    idx.last_segment,
                    idx.complete_time.map(ts_to_str)
                ],
            )?;
            tx.commit()
        })
        .await
    }

    /// The newest commit record of a timeline (LSN, time).
    pub async fn last_commit(
        &self,
        timeline: &TimelineId,
    ) -> Result<Option<(Lsn, jiff::Timestamp)>, StorageError> {
        let timeline = timeline.clone();
        self.with(move |c| {
            c.query_row(
                "SELECT lsn, time_us FROM commits WHERE timeline = ?1 ORDER BY lsn DESC LIMIT 1",
                params![timeline.as_str()],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()
        })
        .await
        .map(|o| {
            o.map(|(l, t)| {
                (
                    Lsn(l as u64),
                    jiff::Timestamp::from_microsecond(t).unwrap_or(jiff::Timestamp::UNIX_EPOCH),
                )
            })
        })
    }

    /// The time of the newest commit that starts before `lsn`.
    pub async fn commit_time_before(
        &self,
        timeline: &TimelineId,
        lsn: Lsn,
    ) -> Result<Option<jiff::Timestamp>, StorageError> {
        let timeline = timeline.clone();
        self.with(move |c| {
            c.query_row(
                "SELECT time_us FROM commits WHERE timeline = ?1 AND lsn < ?2 ORDER BY lsn DESC LIMIT 1",
                params![timeline.as_str(), lsn.0 as i64],
                |r| r.get::<_, i64>(0),
            )
            .optional()
        })
        .await
        .map(|o| o.and_then(|t| jiff::Timestamp::from_microsecond(t).ok()))
    }

    /// The newest commit record with a commit time at or before `t`.
    pub async fn commit_at_or_before(
        &self,
        timeline: &TimelineId,
        t: jiff::Timestamp,
    ) -> Result<Option<Lsn>, StorageError> {
        let timeline = timeline.clone();
        self.with(move |c| {
            c.query_row(
                "SELECT lsn FROM commits WHERE timeline = ?1 AND time_us <= ?2 ORDER BY lsn DESC LIMIT 1",
                params![timeline.as_str(), t.as_microsecond()],
                |r| r.get::<_, i64>(0),
            )
            .optional()
        })
        .await
        .map(|o| o.map(|l| Lsn(l as u64)))
    }
}
