//! Each timeline's own WAL archive: indexing it with `pg_waldump` (commit
//! records and their times, in the metadata store), the restore window it
//! gives, and making sure recent commits are archived (a stopped server's
//! archive is complete; `pg_switch_wal()` on a running one).

use std::fs;
use std::time::Duration;

use super::copy::{connect_source, sql_err};
use super::meta::TimelineRow;
use super::{io_err, pg, Engine};
use crate::storage::{ConnInfo, Lsn, PointInfo, RestoreWindow, StorageError};

/// Segment number of a 24-hex-digit WAL file name.
fn segno_of(name: &str, seg_size: u64) -> Option<u64> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let hi = u64::from_str_radix(&name[8..16], 16).ok()?;
    let lo = u64::from_str_radix(&name[16..24], 16).ok()?;
    Some(hi * (0x1_0000_0000 / seg_size) + lo)
}

impl Engine {
    /// Reads new segments of a timeline's archive with `pg_waldump`.
    pub(super) async fn index_archive(&self, t: &TimelineRow) -> Result<(), StorageError> {
        let (Some(tli), Some(seg)) = (t.pg_tli, t.wal_seg_size) else {
            return Ok(());
        };
        let _g = self.inner.index_lock.lock().await;
        let dir = self.wal_dir(&t.id);
        let prefix = format!("{tli:08X}");
        let listing = self
            .blocking("listing the WAL archive", {
                let dir = dir.clone();
                move |_| {
                    Ok(fs::read_dir(&dir).ok().map(|rd| {
                        rd.flatten()
                            .map(|e| e.file_name().to_string_lossy().to_string())
                            .collect::<Vec<_>>()
                    }))
                }
            })
            .await?;
        let Some(names) = listing else {
            return Ok(());
        };
        let mut segs: Vec<String> = names
            .into_iter()
            .filter(|n| n.len() == 24 && n.starts_with(&prefix) && segno_of(n, seg).is_some())
            .collect();
        segs.sort();
        let Some(newest) = segs.last().cloned() else {
            return Ok(());
        };
        let mut idx = self.inner.meta.wal_index(&t.id).await?;
        if idx.last_segment.as_deref() == Some(newest.as_str()) {
            return Ok(());
        }
        let base_lsn = self
            .inner
            .meta
            .bases(&t.id)
            .await?
            .first()
            .map(|b| b.lsn.0)
            .unwrap_or(0);
        let mut start = idx.scanned_upto.max(base_lsn);
        let start_seg = start / seg;
        match segs
            .iter()
            .filter_map(|n| segno_of(n, seg))
            .find(|s| *s >= start_seg)
        {
            Some(s) if s > start_seg => start = s * seg,
            Some(_) => {}
            None => return Ok(()),
        }
        let mut cmd = self.inner.pg.command("pg_waldump");
        cmd.arg("-p")
            .arg(&dir)
            .arg("-t")
            .arg(tli.to_string())
            .arg("-s")
            .arg(Lsn(start).to_string());
        // Without an end, pg_waldump waits ~5 s for the segment after the
        // newest one to appear; stop at the end of the newest archived one.
        if let Some(end_seg) = segno_of(&newest, seg) {
            cmd.arg("-e").arg(Lsn((end_seg + 1) * seg).to_string());
        }
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let out = cmd
            .output()
            .await
            .map_err(|e| io_err("running pg_waldump", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut commits = Vec::new();
        let mut last = None;
        for line in text.lines() {
            if let Some((lsn, time)) = pg::parse_waldump_line(line) {
                last = Some(lsn);
                if let Some(t) = time {
                    commits.push((lsn, t));
                }
            }
        }
        if let Some(l) = last {
            idx.scanned_upto = l.0 + 1;
            idx.last_lsn = Some(l);
        }
        idx.last_segment = Some(newest);
        self.inner
            .meta
            .record_wal_scan(&t.id, &idx, &commits)
            .await?;
        Ok(())
    }

    pub(super) async fn window(
        &self,
        t: &TimelineRow,
    ) -> Result<Option<RestoreWindow>, StorageError> {
        if let Err(e) = self.index_archive(t).await {
            tracing::warn!(timeline = %t.id, error = %e, "reading the WAL archive failed");
        }
        let bases = self.inner.meta.bases(&t.id).await?;
        let Some(oldest) = bases.first() else {
            return Ok(None);
        };
        let idx = self.inner.meta.wal_index(&t.id).await?;
        let last_commit = self.inner.meta.last_commit(&t.id).await?;
        let base_newest_lsn = bases.iter().map(|b| b.lsn).max().unwrap_or(oldest.lsn);
        let base_newest_time = bases.iter().map(|b| b.time).max().unwrap_or(oldest.time);
        let newest_lsn = idx
            .last_lsn
            .map_or(base_newest_lsn, |l| l.max(base_newest_lsn));
        let mut newest_time = base_newest_time;
        if let Some((_, t)) = last_commit {
            newest_time = newest_time.max(t);
        }
        if let Some(t) = idx.complete_time {
            newest_time = newest_time.max(t);
        }
        Ok(Some(RestoreWindow {
            oldest: PointInfo {
                lsn: oldest.lsn,
                time: Some(oldest.time),
            },
            newest: PointInfo {
                lsn: newest_lsn,
                time: Some(newest_time),
            },
        }))
    }

    /// When the timeline's server is stopped (no `postmaster.pid`) and
    /// every WAL segment it wrote is archived (no `.ready` status file),
    /// its archive holds every commit ever made: records that as of now.
    pub(super) async fn archive_complete_if_stopped(
        &self,
        t: &TimelineRow,
    ) -> Result<bool, StorageError> {
        let data = self.data_dir(&t.id);
        if data.join("postmaster.pid").exists() {
            return Ok(false);
        }
        let pending = fs::read_dir(data.join("pg_wal").join("archive_status"))
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".ready"))
            })
            .unwrap_or(true);
        if pending {
            return Ok(false);
        }
        let now = jiff::Timestamp::now();
        let _g = self.inner.index_lock.lock().await;
        let mut idx = self.inner.meta.wal_index(&t.id).await?;
        idx.complete_time = Some(idx.complete_time.map_or(now, |c| c.max(now)));
        self.inner.meta.record_wal_scan(&t.id, &idx, &[]).await?;
        Ok(true)
    }

    /// `pg_switch_wal()` on the source and wait for the segment to reach the
    /// archive, so every commit before now is archived.
    pub(super) async fn switch_wal(
        &self,
        t: &TimelineRow,
        conn: &ConnInfo,
    ) -> Result<(), StorageError> {
        let asked = jiff::Timestamp::now();
        let client = connect_source(conn).await?;
        let name: String = client
            .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
            .await
            .map_err(|e| sql_err("pg_switch_wal()", e))?
            .get(0);
        let path = self.wal_dir(&t.id).join(&name);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !path.exists() {
            if std::time::Instant::now() > deadline {
                return Err(StorageError::Unavailable {
                    message: format!(
                        "{}: WAL segment {name} of timeline {} was not archived within 60 s; {}",
                        crate::storage::ARCHIVING_FAILED,
                        t.id,
                        super::archiver::archiver_state(conn).await
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _g = self.inner.index_lock.lock().await;
        let mut idx = self.inner.meta.wal_index(&t.id).await?;
        idx.complete_time = Some(idx.complete_time.map_or(asked, |c| c.max(asked)));
        self.inner.meta.record_wal_scan(&t.id, &idx, &[]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_segment_numbers() {
        let seg = 16 * 1024 * 1024;
        assert_eq!(segno_of("000000010000000000000001", seg), Some(1));
        assert_eq!(segno_of("0000000200000001000000FF", seg), Some(256 + 255));
        assert_eq!(segno_of("000000010000000000000001.partial", seg), None);
        assert_eq!(segno_of("00000002.history", seg), None);
    }
}
