//! Plain data of the storage contract: identifiers, points, LSNs, and the
//! timeline and snapshot records every implementation returns.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::StorageError;

/// Checks an identifier or idempotency key: 1–63 characters of `[a-z0-9-]`,
/// starting and ending alphanumeric. Keeps every input out of path traversal.
pub fn validate_id(kind: &str, s: &str) -> Result<(), StorageError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(StorageError::invalid(format!(
            "{kind} {s:?} is not a valid identifier (1-63 characters of a-z, 0-9 and '-', alphanumeric at both ends)"
        )))
    }
}

macro_rules! id_type {
    ($name:ident, $kind:literal) => {
        #[doc = concat!("Identifier of a ", $kind, ", validated on construction.")]
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Result<Self, StorageError> {
                let s = s.into();
                validate_id($kind, &s)?;
                Ok(Self(s))
            }
            /// A fresh random identifier.
            pub fn generate() -> Self {
                Self(uuid::Uuid::new_v4().simple().to_string()[..16].to_string())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = StorageError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(TimelineId, "timeline");
id_type!(SnapshotId, "snapshot");
id_type!(OpKey, "key");

/// A PostgreSQL write-ahead-log position, written `XXXXXXXX/XXXXXXXX` in hex
/// (e.g. `16/B3733C50`) as PostgreSQL prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl FromStr for Lsn {
    type Err = StorageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            StorageError::invalid(format!(
                "{s:?} is not an LSN: expected two hexadecimal numbers of 1-8 digits separated by '/', like 16/B3733C50"
            ))
        };
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u64::from_str_radix(p, 16).map_err(|_| bad())
        };
        Ok(Lsn((part(hi)? << 32) | part(lo)?))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where in a timeline's history a copy is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "camelCase")]
pub enum Point {
    /// The current state.
    Head,
    /// Everything up to and including the WAL record at this LSN
    /// (`recovery_target_inclusive = true`).
    Lsn(Lsn),
    /// Every transaction committed at or before this instant.
    Timestamp(jiff::Timestamp),
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Point::Head => f.write_str("head"),
            Point::Lsn(l) => write!(f, "lsn {l}"),
            Point::Timestamp(t) => write!(f, "timestamp {t}"),
        }
    }
}

/// A password, never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Password(pub String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// How to reach a running server of a timeline, so the engine can ask for a
/// `CHECKPOINT` (or backup mode) before copying it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<Password>,
    pub dbname: String,
}

/// Where a new timeline's data comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Source {
    /// A fresh `initdb`. The superuser is `postgres`, with this password
    /// when given (scram-sha-256), else reachable only over the local socket.
    Empty {
        #[serde(default)]
        superuser_password: Option<Password>,
    },
    /// The schema (roles, databases, DDL) of another timeline, no rows.
    #[serde(rename_all = "camelCase")]
    SchemaOnly { timeline: TimelineId },
    /// A copy of another timeline at a point of its history.
    #[serde(rename_all = "camelCase")]
    Timeline { timeline: TimelineId, point: Point },
    /// A copy of a snapshot.
    #[serde(rename_all = "camelCase")]
    Snapshot { snapshot: SnapshotId },
}

/// Request to create a timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateTimeline {
    /// Idempotency key (the caller's object UID, or any stable name).
    pub key: OpKey,
    pub source: Source,
    /// A connection to the running source's compute, used to `CHECKPOINT`
    /// it before a head copy. Without it a running source is copied
    /// crash-consistently (atomic drivers) or refused (`Busy`).
    #[serde(default)]
    pub source_connection: Option<ConnInfo>,
    /// A free-form label stored with the timeline (e.g. `ns/branch`).
    #[serde(default)]
    pub label: Option<String>,
}

/// Request to create a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateSnapshot {
    pub key: OpKey,
    pub timeline: TimelineId,
    pub point: Point,
    #[serde(default)]
    pub source_connection: Option<ConnInfo>,
    #[serde(default)]
    pub label: Option<String>,
}

/// Life-cycle of a timeline or snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub enum State {
    Creating,
    Ready,
    Failed,
    Deleting,
}

/// A position in history: an LSN and, when known, the commit time there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointInfo {
    pub lsn: Lsn,
    #[serde(default)]
    pub time: Option<jiff::Timestamp>,
}

/// How far back a timeline can be branched, snapshotted or restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreWindow {
    pub oldest: PointInfo,
    pub newest: PointInfo,
}

impl fmt::Display for RestoreWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = |p: &PointInfo| match p.time {
            Some(t) => format!("{} ({t})", p.lsn),
            None => p.lsn.to_string(),
        };
        write!(f, "{} .. {}", t(&self.oldest), t(&self.newest))
    }
}

/// Progress of a long operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// What is being done now, e.g. "replaying WAL".
    pub step: String,
    /// 0–100 when it can be told.
    #[serde(default)]
    pub percent: Option<u8>,
}

/// Where a timeline came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lineage {
    /// The parent timeline, or none for an empty or snapshot-born timeline.
    #[serde(default)]
    pub parent: Option<TimelineId>,
    /// The snapshot it was made from, if any.
    #[serde(default)]
    pub snapshot: Option<SnapshotId>,
    /// The point asked for.
    pub point: Option<Point>,
    /// The LSN of the parent at which this timeline branched off.
    #[serde(default)]
    pub parent_lsn: Option<Lsn>,
    pub schema_only: bool,
}

/// A timeline: one data directory with its own WAL archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeline {
    pub id: TimelineId,
    pub key: OpKey,
    pub label: Option<String>,
    pub state: State,
    /// Why it failed, when `state == Failed`.
    pub error: Option<String>,
    pub progress: Option<Progress>,
    pub lineage: Lineage,
    pub created_at: jiff::Timestamp,
    /// The data directory, relative to the storage volume's root
    /// (e.g. `timelines/<id>/pgdata`): what a compute mounts.
    pub data_path: String,
    /// The WAL archive directory, relative to the volume root.
    pub wal_archive_path: String,
    /// PostgreSQL major version of the data directory (`PG_VERSION`).
    pub pg_major: u32,
    /// The newest known LSN (last checkpoint or archived WAL).
    pub lsn: Option<Lsn>,
    /// Sum of the sizes of the files of the data directory.
    pub logical_size_bytes: u64,
    /// Bytes this timeline alone holds (data directory and base), where the
    /// driver can tell. On btrfs it is measured in the background (it reads
    /// every extent): `None` until the first measurement lands.
    pub exclusive_bytes: Option<u64>,
    pub restore_window: Option<RestoreWindow>,
}

/// A read-only copy of a timeline at a point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub id: SnapshotId,
    pub key: OpKey,
    pub label: Option<String>,
    pub timeline: TimelineId,
    pub point: Point,
    pub state: State,
    pub error: Option<String>,
    pub progress: Option<Progress>,
    /// The LSN the snapshot holds everything up to.
    pub lsn: Option<Lsn>,
    pub created_at: jiff::Timestamp,
    pub pg_major: u32,
    pub size_bytes: u64,
    pub exclusive_bytes: Option<u64>,
}

/// The highest replica ordinal a timeline may have (ordinals run 0..=15).
pub const MAX_REPLICA_ORDINAL: u32 = 15;

/// Checks a replica ordinal against [`MAX_REPLICA_ORDINAL`].
pub fn validate_replica_ordinal(ordinal: u32) -> Result<(), StorageError> {
    if ordinal > MAX_REPLICA_ORDINAL {
        return Err(StorageError::invalid(format!(
            "replica ordinal {ordinal} is out of range (0-{MAX_REPLICA_ORDINAL})"
        )));
    }
    Ok(())
}

/// Request to create (or find) the read replica `ordinal` of a timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateReplica {
    pub timeline: TimelineId,
    pub ordinal: u32,
    /// A connection to the timeline's running compute: on drivers that
    /// cannot snapshot a running server atomically, the copy is taken in
    /// backup mode through it. Without it a running primary is copied
    /// crash-consistently (atomic drivers) or refused (`Busy`).
    #[serde(default)]
    pub source_connection: Option<ConnInfo>,
}

/// A read replica of a timeline: a copy-on-write copy of its data
/// directory set up as a hot standby (`standby.signal`, `restore_command`
/// from the timeline's archive). The compute that runs it passes
/// `primary_conninfo` (and the password, in the environment); nothing
/// secret is written into the data directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Replica {
    pub timeline: TimelineId,
    pub ordinal: u32,
    pub state: State,
    /// The data directory relative to the volume root
    /// (`timelines/<id>/replicas/<ordinal>/pgdata`).
    pub data_path: String,
    pub created_at: jiff::Timestamp,
}

/// Copy-on-write method in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    Btrfs,
    Reflink,
    Copy,
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriverKind::Btrfs => "btrfs",
            DriverKind::Reflink => "reflink",
            DriverKind::Copy => "copy",
        })
    }
}

impl FromStr for DriverKind {
    type Err = StorageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "btrfs" => Ok(DriverKind::Btrfs),
            "reflink" => Ok(DriverKind::Reflink),
            "copy" => Ok(DriverKind::Copy),
            _ => Err(StorageError::invalid(format!(
                "unknown driver {s:?}: expected btrfs, reflink or copy"
            ))),
        }
    }
}

/// What a storage layer is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageInfo {
    pub driver: DriverKind,
    /// PostgreSQL major version of the engine's binaries.
    pub pg_major: u32,
    /// Absolute path of the volume root, as the engine sees it.
    pub root: String,
    /// The volume root as computes mount it: the path written into the
    /// `archive_command` and `restore_command` of every data directory.
    /// `None` from an engine that does not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_root: Option<String>,
    /// The uid owning the data directories (PostgreSQL runs as it); a
    /// compute must run as the same uid. `None` from an engine that does
    /// not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_uid: Option<u32>,
    /// Size of the filesystem holding the volume root (`statvfs`), in
    /// bytes. `None` from an engine that does not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_total_bytes: Option<u64>,
    /// Bytes in use on that filesystem (whoever wrote them). `None` from
    /// an engine that does not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_used_bytes: Option<u64>,
    /// Bytes of every timeline's WAL archive together (measured at most
    /// every few seconds). `None` from an engine that does not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_archive_bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_postgres_format() {
        let l: Lsn = "16/B3733C50".parse().unwrap();
        assert_eq!(l.0, (0x16 << 32) | 0xB3733C50);
        assert_eq!(l.to_string(), "16/B3733C50");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn(0));
    }

    #[test]
    fn storage_info_of_an_older_engine_still_parses() {
        let old = r#"{"driver":"copy","pgMajor":15,"root":"/srv"}"#;
        let i: StorageInfo = serde_json::from_str(old).unwrap();
        assert_eq!(i.volume_total_bytes, None);
        assert_eq!(i.wal_archive_bytes, None);
        let new = StorageInfo {
            volume_total_bytes: Some(10),
            volume_used_bytes: Some(4),
            wal_archive_bytes: Some(3),
            ..i
        };
        let json = serde_json::to_string(&new).unwrap();
        assert!(json.contains(r#""volumeUsedBytes":4"#), "{json}");
        assert_eq!(serde_json::from_str::<StorageInfo>(&json).unwrap(), new);
    }

    #[test]
    fn lsn_rejects_malformed() {
        for bad in ["", "16", "16/", "/1", "G/1", "123456789/0", "1/2/3", " 1/2"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ids_refuse_path_traversal() {
        for bad in ["..", "../x", "a/b", "A", "", "-a", "a-", &"a".repeat(64)] {
            assert!(TimelineId::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(TimelineId::new("abc-123").is_ok());
        let g = TimelineId::generate();
        assert!(TimelineId::new(g.as_str()).is_ok());
    }

    #[test]
    fn password_is_redacted_in_debug() {
        let c = ConnInfo {
            host: "h".into(),
            port: 5432,
            user: "u".into(),
            password: Some(Password("s3cret".into())),
            dbname: "d".into(),
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
