//! The types of the storage layer's backup calls (issue #16): where a
//! timeline is archived ([`BackupTarget`]), where its backup stands
//! ([`BackupStatus`]), a base backup ([`BaseBackup`]) and a request for one
//! ([`BaseBackupRequest`]), with the pure retention rule
//! ([`retention_keep`]). The engine implements them in
//! `engine/backup.rs`; the HTTP API carries them as JSON.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Lsn;
use crate::backup::{BackupError, ObjectStore};

/// Where and under which barman server name a timeline is backed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupTarget {
    /// The destination, with credentials (never logged: `ObjectStore`'s
    /// `Debug` redacts them).
    pub store: ObjectStore,
    /// The barman server name: one per backed-up timeline, never shared.
    pub server: String,
}

impl BackupTarget {
    /// Refuses a target the engine would hand to barman-cloud as anything
    /// but a server name and an S3 location: the server name goes into
    /// command lines and the `restore_command` of restored data
    /// directories, the bucket and prefix into `s3://` URLs. The operator
    /// only sends what the CRD accepted; this is the storage API's own
    /// check of the body it is given (a 400 with the reason).
    pub fn validate(&self) -> Result<(), super::StorageError> {
        let bad = |m: String| Err(super::StorageError::invalid(m));
        let s = &self.server;
        if s.is_empty()
            || s.len() > 64
            || !s
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            || s.starts_with('-')
        {
            return bad(format!(
                "backup server name {s:?}: 1 to 64 letters, digits, '-' or '_', not starting with '-'"
            ));
        }
        let b = &self.store.bucket;
        let bucket_char =
            |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-';
        if b.len() < 2
            || b.len() > 63
            || !b.bytes().all(bucket_char)
            || !b.starts_with(|c: char| c.is_ascii_alphanumeric())
            || !b.ends_with(|c: char| c.is_ascii_alphanumeric())
        {
            return bad(format!(
                "bucket {b:?}: an S3 bucket name (2 to 63 lowercase letters, digits, '.' and '-', starting and ending with a letter or digit)"
            ));
        }
        let p = &self.store.prefix;
        if p.starts_with('/')
            || p.ends_with('/')
            || p.contains("//")
            || p.split('/').any(|part| part == "..")
            || p.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return bad(format!(
                "prefix {p:?}: no leading or trailing '/', no '//', no '..' and no spaces"
            ));
        }
        let e = &self.store.endpoint;
        if !(e.starts_with("https://") || e.starts_with("http://"))
            || e.contains(char::is_whitespace)
        {
            return bad(format!("endpoint {e:?}: an http:// or https:// URL"));
        }
        Ok(())
    }
}

/// Where a timeline's backup stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// The barman server name.
    pub server: String,
    /// The newest WAL file uploaded, and when.
    #[serde(default)]
    pub last_archived_wal: Option<String>,
    #[serde(default)]
    pub last_archived_at: Option<jiff::Timestamp>,
    /// When PostgreSQL finished the newest uploaded WAL segment (its file's
    /// time in the local archive): every transaction committed before it
    /// is in the destination.
    #[serde(default)]
    pub last_segment_closed_at: Option<jiff::Timestamp>,
    /// WAL files of the local archive not uploaded yet.
    #[serde(default)]
    pub pending: usize,
    /// When the oldest of them was archived locally (absent: none waits).
    #[serde(default)]
    pub oldest_pending_since: Option<jiff::Timestamp>,
    /// The last failure of archiving (reason and message, without
    /// credentials); cleared by the next success.
    #[serde(default)]
    pub last_error: Option<BackupError>,
    /// The last base backup this engine took.
    #[serde(default)]
    pub last_base_backup: Option<BaseBackup>,
    /// The complete base backups in the destination, oldest first, as last
    /// listed (after enabling, and after each base backup and retention).
    #[serde(default)]
    pub base_backups: Vec<BaseBackup>,
    /// A base backup is being taken now.
    #[serde(default)]
    pub base_backup_running: bool,
    /// The key of the last base backup requested ([`BaseBackupRequest`]).
    #[serde(default)]
    pub base_backup_key: Option<String>,
    /// Why the last base backup (or its retention) failed; cleared by the
    /// next success.
    #[serde(default)]
    pub base_backup_error: Option<BackupError>,
}

impl BackupStatus {
    /// How long the oldest WAL file not yet in the destination has waited
    /// (zero when nothing waits).
    pub fn lag(&self, now: jiff::Timestamp) -> Duration {
        self.oldest_pending_since
            .filter(|_| self.pending > 0)
            .map(|t| now.duration_since(t).unsigned_abs())
            .unwrap_or(Duration::ZERO)
    }
}

/// One base backup in the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BaseBackup {
    /// barman's backup id.
    pub backup_id: String,
    /// The LSN the backup is consistent at.
    #[serde(default)]
    pub end_lsn: Option<Lsn>,
    /// When it ended.
    #[serde(default)]
    pub ended_at: Option<jiff::Timestamp>,
    /// How long it took (zero when only listed).
    #[serde(default)]
    pub duration: Duration,
    /// Its size as barman reports it.
    #[serde(default)]
    pub size_bytes: Option<u64>,
}

/// A base backup to take in the background, then retention.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BaseBackupRequest {
    /// Idempotency key (the caller's schedule slot): a request with the key
    /// of the running or last base backup does nothing.
    pub key: String,
    /// Retention afterwards: keep at most this many base backups.
    #[serde(default)]
    pub keep_count: Option<u32>,
    /// Retention afterwards: delete base backups that ended longer ago than
    /// this (the newest is always kept).
    #[serde(default)]
    pub max_age: Option<Duration>,
}

/// How many of the newest complete base backups retention keeps, given
/// their end times (any order): at most `count`, and none that ended
/// before `now - max_age` — but never fewer than one. `None`: keep all.
pub fn retention_keep(
    ended: &[Option<jiff::Timestamp>],
    count: Option<u32>,
    max_age: Option<Duration>,
    now: jiff::Timestamp,
) -> Option<u32> {
    if count.is_none() && max_age.is_none() {
        return None;
    }
    let total = u32::try_from(ended.len()).unwrap_or(u32::MAX);
    let mut keep = count.unwrap_or(total).min(total);
    if let Some(age) = max_age {
        let max = i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
        let young = ended
            .iter()
            .filter(|t| t.is_some_and(|t| now.as_second().saturating_sub(t.as_second()) <= max))
            .count();
        keep = keep.min(u32::try_from(young).unwrap_or(u32::MAX));
    }
    Some(keep.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn retention_keeps_by_count_and_age_never_none() {
        let now = ts("2026-01-10T00:00:00Z");
        let ended = [
            Some(ts("2026-01-01T00:00:00Z")),
            Some(ts("2026-01-08T00:00:00Z")),
            Some(ts("2026-01-09T00:00:00Z")),
        ];
        assert_eq!(retention_keep(&ended, None, None, now), None);
        assert_eq!(retention_keep(&ended, Some(2), None, now), Some(2));
        assert_eq!(retention_keep(&ended, Some(5), None, now), Some(3));
        let day = Duration::from_secs(86_400);
        assert_eq!(retention_keep(&ended, None, Some(day * 3), now), Some(2));
        assert_eq!(retention_keep(&ended, Some(1), Some(day * 3), now), Some(1));
        // All too old: the newest stays.
        assert_eq!(retention_keep(&ended, None, Some(day / 2), now), Some(1));
        assert_eq!(retention_keep(&[], Some(3), None, now), Some(1));
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_waiting_file() {
        let now = ts("2026-01-10T00:00:10Z");
        let mut st = BackupStatus {
            pending: 2,
            oldest_pending_since: Some(ts("2026-01-10T00:00:00Z")),
            ..Default::default()
        };
        assert_eq!(st.lag(now), Duration::from_secs(10));
        st.pending = 0;
        assert_eq!(st.lag(now), Duration::ZERO);
    }

    fn target() -> BackupTarget {
        BackupTarget {
            store: ObjectStore {
                endpoint: "http://127.0.0.1:3900".into(),
                bucket: "backups".into(),
                region: "garage".into(),
                prefix: "p/uid".into(),
                path_style: true,
                ca_bundle: None,
                credentials: crate::backup::Credentials {
                    access_key_id: "GKabc".into(),
                    secret_access_key: "s3cr3t-value".into(),
                },
            },
            server: "0123456789abcdef".into(),
        }
    }

    #[test]
    fn targets_round_trip_as_json_and_debug_hides_the_secret() {
        let t = target();
        let back: BackupTarget = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        assert!(!format!("{t:?}").contains("s3cr3t-value"));
    }

    #[test]
    fn a_target_barman_could_misread_is_refused_with_the_reason() {
        assert!(target().validate().is_ok());
        let mut empty_prefix = target();
        empty_prefix.store.prefix.clear();
        assert!(empty_prefix.validate().is_ok(), "the bucket's root is fine");
        type Spoil = fn(&mut BackupTarget);
        let cases: Vec<(&str, Spoil)> = vec![
            ("server name", |t| t.server = "../other".into()),
            ("server name", |t| t.server = "--help".into()),
            ("server name", |t| t.server = "a'; rm".into()),
            ("server name", |t| t.server = String::new()),
            ("bucket", |t| t.store.bucket = "Backups".into()),
            ("bucket", |t| t.store.bucket = "b/x".into()),
            ("prefix", |t| t.store.prefix = "/p".into()),
            ("prefix", |t| t.store.prefix = "p/../q".into()),
            ("prefix", |t| t.store.prefix = "p q".into()),
            ("endpoint", |t| t.store.endpoint = "ftp://x".into()),
        ];
        for (what, spoil) in cases {
            let mut t = target();
            spoil(&mut t);
            let e = t.validate().expect_err(what);
            assert!(
                matches!(e, crate::storage::StorageError::InvalidArgument { .. }),
                "{what}: {e:?}"
            );
            assert!(e.to_string().contains(what), "{what}: {e}");
            assert!(!e.to_string().contains("s3cr3t"), "{e}");
        }
    }
}
