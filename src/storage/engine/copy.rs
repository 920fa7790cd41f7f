//! Head copies of a (possibly running) timeline: plain, crash-consistent,
//! after a `CHECKPOINT`, or in backup mode through a source connection
//! (see "Copies of a running server" in [`super`]), and bringing a writable
//! copy to a cleanly shut down state.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use super::pg::{self, StopMode};
use super::{blocking, Engine};
use crate::storage::{ConnInfo, Lsn, StorageError, TimelineId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Consistency {
    Clean,
    Crash,
    Backup,
}

/// Refuses data directories whose WAL or tablespaces live elsewhere: a copy
/// would keep writing into the source's files.
pub(super) fn check_self_contained(data: &Path) -> Result<(), StorageError> {
    let wal = data.join("pg_wal");
    if let Ok(m) = fs::symlink_metadata(&wal) {
        if m.file_type().is_symlink() {
            return Err(StorageError::invalid(format!(
                "{} is a symbolic link: data directories with WAL outside them cannot be branched",
                wal.display()
            )));
        }
    }
    if let Ok(rd) = fs::read_dir(data.join("pg_tblspc")) {
        if let Some(e) = rd.flatten().next() {
            return Err(StorageError::invalid(format!(
                "the data directory has a tablespace ({}): tablespaces outside the data directory cannot be branched",
                e.path().display()
            )));
        }
    }
    Ok(())
}

pub(super) async fn connect_source(c: &ConnInfo) -> Result<tokio_postgres::Client, StorageError> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&c.host)
        .port(c.port)
        .user(&c.user)
        .dbname(&c.dbname)
        .connect_timeout(Duration::from_secs(10));
    if let Some(pw) = &c.password {
        cfg.password(pw.0.as_bytes());
    }
    // TLS when the server offers it (a compute with TLS on refuses
    // anything else), plaintext otherwise (local mode).
    cfg.ssl_mode(tokio_postgres::config::SslMode::Prefer);
    let (client, conn) = cfg
        .connect(crate::storage::tls::unverified_client()?)
        .await
        .map_err(|e| StorageError::Unavailable {
            message: format!(
                "cannot connect to the source at {}:{} as {}: {e}",
                c.host, c.port, c.user
            ),
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

pub(super) fn sql_err(what: &str, e: tokio_postgres::Error) -> StorageError {
    StorageError::Unavailable {
        message: format!("{what} on the source: {e}"),
    }
}

/// Copies the WAL segments (from the backup's start segment on, when
/// known) and history files of `src` over those in `dst`.
/// Re-copies the WAL a backup needs from the source's `pg_wal`, then fills
/// from the source's archive every segment from the backup's start that
/// `pg_wal` no longer had: a checkpoint during the copy (another backup's,
/// or a timed one) may recycle a segment the copy still holds in an older,
/// shorter state, and replay would then end before the backup's end.
/// `pg_backup_stop(true)` has waited for those segments to be archived.
fn recopy_wal(
    src: &Path,
    dst: &Path,
    start_seg: Option<&str>,
    archive: Option<&Path>,
) -> std::io::Result<()> {
    let mut refreshed = std::collections::HashSet::new();
    for e in fs::read_dir(src)? {
        let e = match e {
            Ok(e) => e,
            Err(_) => continue,
        };
        let name = e.file_name();
        let n = name.to_string_lossy();
        let segment = n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit());
        let needed = match start_seg {
            Some(s) if s.len() == 24 && segment => n[8..] >= s[8..],
            _ => true,
        };
        let wanted = (segment && needed) || n.ends_with(".history");
        if !wanted {
            continue;
        }
        let target = dst.join(&name);
        match fs::copy(e.path(), &target) {
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        }
        refreshed.insert(n.to_string());
        if let Ok(m) = e.metadata() {
            let _ = std::os::unix::fs::lchown(&target, Some(m.uid()), Some(m.gid()));
            let _ = fs::set_permissions(&target, fs::Permissions::from_mode(m.mode() & 0o7777));
        }
    }
    let (Some(archive), Some(start)) = (archive, start_seg.filter(|s| s.len() == 24)) else {
        return Ok(());
    };
    let Ok(rd) = fs::read_dir(archive) else {
        return Ok(());
    };
    let owner = fs::metadata(dst).ok();
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        let segment = n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit());
        if !segment || n[..8] != start[..8] || n[8..] < start[8..] || refreshed.contains(&n) {
            continue;
        }
        let target = dst.join(&n);
        fs::copy(e.path(), &target)?;
        if let Some(m) = &owner {
            let _ = std::os::unix::fs::lchown(&target, Some(m.uid()), Some(m.gid()));
            let _ = fs::set_permissions(&target, fs::Permissions::from_mode(0o600));
        }
    }
    Ok(())
}

impl Engine {
    /// Brings a writable copy to a clean shutdown state: crash or backup
    /// recovery in a stand-alone backend, or, should that not leave it
    /// clean, by a private start and a fast stop.
    pub(super) async fn normalize(
        &self,
        data: &Path,
        archive: Option<&TimelineId>,
        log: &Path,
    ) -> Result<pg::ControlData, StorageError> {
        let is_clean = |cd: &pg::ControlData| cd.clean() && !data.join("backup_label").exists();
        let cd = self.inner.pg.controldata(data).await?;
        if is_clean(&cd) {
            return Ok(cd);
        }
        let settings = self.local_settings(archive);
        let started = std::time::Instant::now();
        match self
            .inner
            .pg
            .recover_single_user(data, &settings, log, Duration::from_secs(3600))
            .await
        {
            Ok(()) => {
                tracing::debug!(data = %data.display(), elapsed_ms = started.elapsed().as_millis() as u64, "stand-alone recovery done");
                let cd = self.inner.pg.controldata(data).await?;
                if is_clean(&cd) {
                    return Ok(cd);
                }
                tracing::warn!(data = %data.display(), state = %cd.state, "stand-alone recovery did not leave a clean copy; starting a private server");
            }
            Err(e) => {
                tracing::warn!(data = %data.display(), error = %e, "stand-alone recovery failed; starting a private server");
            }
        }
        let srv = self.private_server(data, archive, log).await?;
        srv.stop(StopMode::Fast).await?;
        self.inner.pg.controldata(data).await
    }

    /// Copies the head of a (possibly running) data directory into `dst`.
    pub(super) async fn copy_head(
        &self,
        source: &TimelineId,
        dst: &Path,
        conn: Option<&ConnInfo>,
        want_backup: bool,
        readonly: bool,
        label: &str,
    ) -> Result<(Consistency, Option<Lsn>), StorageError> {
        let src_dir = self.data_dir(source);
        let src = src_dir.as_path();
        check_self_contained(src)?;
        let atomic = self.inner.driver.atomic();
        let running = src.join("postmaster.pid").exists();
        if !running {
            self.clone_dir(src, dst, readonly).await?;
            let cd = self.inner.pg.controldata(dst).await?;
            return Ok((Consistency::Clean, Some(cd.checkpoint)));
        }
        let Some(conn) = conn else {
            if atomic {
                self.clone_dir(src, dst, readonly).await?;
                return Ok((Consistency::Crash, None));
            }
            return Err(StorageError::Busy {
                message: format!(
                    "the source's server is running (postmaster.pid present) and the {} driver cannot copy a running server without a source connection for backup mode; pass source_connection or stop the compute",
                    self.inner.driver.kind()
                ),
            });
        };
        let client = connect_source(conn).await?;
        if atomic && !want_backup {
            client
                .batch_execute("CHECKPOINT")
                .await
                .map_err(|e| sql_err("CHECKPOINT", e))?;
            let lsn: String = client
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .map_err(|e| sql_err("pg_current_wal_lsn()", e))?
                .get(0);
            self.clone_dir(src, dst, readonly).await?;
            return Ok((Consistency::Crash, lsn.parse().ok()));
        }
        let ver: String = client
            .query_one("SHOW server_version_num", &[])
            .await
            .map_err(|e| sql_err("SHOW server_version_num", e))?
            .get(0);
        let v15 = ver.parse::<u32>().unwrap_or(150000) >= 150000;
        let start_sql = if v15 {
            "SELECT pg_backup_start($1, true)::text"
        } else {
            "SELECT pg_start_backup($1, true, false)::text"
        };
        client
            .query_one(start_sql, &[&label])
            .await
            .map_err(|e| sql_err("starting backup mode", e))?;
        let work = if readonly && atomic {
            self.tmp().join(format!("{label}-backup"))
        } else {
            dst.to_path_buf()
        };
        let copied = self.clone_dir(src, &work, false).await;
        let stop_sql = if v15 {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(true)"
        } else {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, true)"
        };
        let wait = self.inner.archive_wait;
        let stopped = super::archiver::stop_backup(&client, conn, stop_sql, wait).await;
        copied?;
        let row = stopped?;
        let lsn: String = row.get(0);
        let labelfile: String = row.get(1);
        let spcmap: Option<String> = row.get(2);
        self.inner
            .pg
            .write_file(&work.join("backup_label"), &labelfile)?;
        if let Some(m) = spcmap.filter(|m| !m.trim().is_empty()) {
            self.inner.pg.write_file(&work.join("tablespace_map"), &m)?;
        }
        let _ = fs::remove_file(work.join("postmaster.pid"));
        // WAL written during the copy, up to the backup's end.
        let (s, w) = (src.join("pg_wal"), work.join("pg_wal"));
        // "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)"
        let start_seg = labelfile
            .lines()
            .find_map(|l| l.strip_prefix("START WAL LOCATION:"))
            .and_then(|l| l.split("(file ").nth(1))
            .map(|f| f.trim_end_matches(')').trim().to_string());
        let archive = self.wal_dir(source);
        self.blocking("re-copying pg_wal", move |_| {
            recopy_wal(&s, &w, start_seg.as_deref(), Some(&archive))
        })
        .await?;
        let (pg, w) = (self.inner.pg.clone(), work.join("pg_wal"));
        blocking("giving pg_wal to the run_as user", move || {
            pg.chown_tree(&w)
        })
        .await?;
        if work != dst {
            self.clone_dir(&work, dst, true).await?;
            self.delete_dir(&work).await?;
        }
        Ok((Consistency::Backup, lsn.parse().ok()))
    }

    pub(super) fn check_copyable(
        &self,
        src: &TimelineId,
        conn: Option<&ConnInfo>,
    ) -> Result<(), StorageError> {
        let data = self.data_dir(src);
        if conn.is_none() && !self.inner.driver.atomic() && data.join("postmaster.pid").exists() {
            return Err(StorageError::Busy {
                message: format!(
                    "timeline {src} looks running (postmaster.pid present) and the {} driver cannot copy a running server without a source connection; pass source_connection or stop its compute",
                    self.inner.driver.kind()
                ),
            });
        }
        check_self_contained(&data)
    }
}
