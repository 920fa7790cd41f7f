//! Prometheus metrics of the controllers: reconciles, errors by reason,
//! durations, status writes, and whether this replica leads; the fleet as
//! the controllers' caches hold it (objects by kind and phase, each object
//! that is Stalled with its reason), read at scrape time, so the numbers
//! are those of the objects that exist; and how long operations took
//! (creation to first Ready, a restore from start to completion); and the
//! storage layer as the storage poller (`controller/storage_poll.rs`) last
//! read it: reachable or not, the volume's usage, the WAL archive's size,
//! and each branch's exclusive bytes (its timeline's, joined to the Branch
//! cache at scrape time); and backups of Branches (`BackupHealthy` False,
//! archive lag), also from the caches.
//!
//! The chart's Grafana dashboard and alert rules
//! (`charts/pgbranch/files/observability/`) use only these names;
//! `tests/observability.rs` checks them against a scrape.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde::Serialize;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// What the fleet gauges need of one object: its kind, where it is, its
/// `status.phase` and, when `Stalled` is True, the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectState {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub phase: Option<String>,
    pub stalled: Option<String>,
    /// `status.timelineId` (Branches).
    pub timeline: Option<String>,
    /// The reason of a `BackupHealthy` condition that is False (Branches
    /// with `spec.backup`).
    pub backup_unhealthy: Option<String>,
    /// `status.backup.archiveLagSeconds`, when backed up.
    pub archive_lag_seconds: Option<i64>,
}

/// What the storage poller last read of the storage layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StorageReading {
    /// The storage layer answered `info`.
    pub up: bool,
    pub volume_total_bytes: Option<u64>,
    pub volume_used_bytes: Option<u64>,
    pub wal_archive_bytes: Option<u64>,
    /// Exclusive bytes of each timeline whose driver tells them, by id.
    pub exclusive_by_timeline: HashMap<String, u64>,
}

/// The exclusive bytes of each object that points at a timeline storage
/// measured: (namespace, name, bytes), sorted.
pub fn branch_exclusive_bytes(
    states: &[ObjectState],
    by_timeline: &HashMap<String, u64>,
) -> Vec<(String, String, u64)> {
    let mut out: Vec<_> = states
        .iter()
        .filter_map(|o| {
            let bytes = by_timeline.get(o.timeline.as_deref()?)?;
            Some((o.namespace.clone(), o.name.clone(), *bytes))
        })
        .collect();
    out.sort();
    out
}

/// A byte count as a gauge's value (saturating: no volume is 8 EiB).
fn gauge_bytes(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl ObjectState {
    /// Reads the state from an object's status, whatever its kind (every
    /// kind has `phase` or the Ready/Stalled conditions in the same shape).
    pub fn of<K: Resource<DynamicType = ()> + Serialize>(obj: &K) -> ObjectState {
        let status = serde_json::to_value(obj)
            .ok()
            .and_then(|v| v.get("status").cloned())
            .unwrap_or_default();
        let conditions = status.get("conditions").and_then(|c| c.as_array());
        let find = |t: &str| {
            conditions.and_then(|cs| {
                cs.iter()
                    .find(|c| c.get("type").and_then(|x| x.as_str()) == Some(t))
            })
        };
        let stalled = find("Stalled")
            .filter(|c| c.get("status").and_then(|x| x.as_str()) == Some("True"))
            .and_then(|c| c.get("reason").and_then(|x| x.as_str()))
            .map(String::from);
        let phase = status
            .get("phase")
            .and_then(|p| p.as_str())
            .map(String::from)
            .or_else(|| {
                // Kinds without a phase (Snapshot, SnapshotSchedule): from
                // the conditions.
                let ready = find("Ready")
                    .is_some_and(|c| c.get("status").and_then(|x| x.as_str()) == Some("True"));
                Some(
                    if stalled.is_some() {
                        "Failed"
                    } else if ready {
                        "Ready"
                    } else {
                        "Pending"
                    }
                    .to_string(),
                )
            });
        let timeline = status
            .get("timelineId")
            .and_then(|t| t.as_str())
            .map(String::from);
        let backup_unhealthy = find("BackupHealthy")
            .filter(|c| c.get("status").and_then(|x| x.as_str()) == Some("False"))
            .and_then(|c| c.get("reason").and_then(|x| x.as_str()))
            .map(String::from);
        let archive_lag_seconds = status
            .get("backup")
            .and_then(|b| b.get("archiveLagSeconds"))
            .and_then(|l| l.as_i64());
        ObjectState {
            kind: K::kind(&()).to_string(),
            namespace: obj.namespace().unwrap_or_default(),
            name: obj.name_any(),
            phase,
            stalled,
            timeline,
            backup_unhealthy,
            archive_lag_seconds,
        }
    }
}

type Source = Box<dyn Fn() -> Vec<ObjectState> + Send + Sync>;

/// The operator's metrics and the registry that exposes them.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    reconciles: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    status_writes: Family<Labels, Counter>,
    durations: Family<Labels, Histogram>,
    leader: Gauge,
    objects: Family<Labels, Gauge>,
    stalled: Family<Labels, Gauge>,
    backup_unhealthy: Family<Labels, Gauge>,
    archive_lag: Family<Labels, Gauge>,
    operations: Family<Labels, Histogram>,
    storage_up: Family<Labels, Gauge>,
    volume_bytes: Family<Labels, Gauge>,
    wal_archive_bytes: Family<Labels, Gauge>,
    branch_exclusive: Family<Labels, Gauge>,
    /// What the storage poller last read; `None` before its first poll
    /// (and in a replica that does not lead): no storage series at all.
    storage: Arc<Mutex<Option<StorageReading>>>,
    /// The controllers' caches, read at scrape time.
    sources: Arc<Mutex<Vec<Source>>>,
    /// UIDs seen Ready by this process (an operation ends once).
    seen_ready: Arc<Mutex<HashSet<String>>>,
    /// One scrape at a time (the fleet gauges are rebuilt for each).
    scrape: Arc<Mutex<()>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn kind(k: &str) -> Labels {
    vec![("kind".into(), k.into())]
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pgbranch");
        let reconciles = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        let status_writes = Family::<Labels, Counter>::default();
        let durations = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        registry.register("reconciles", "Reconciles run, by kind", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by kind and reason",
            errors.clone(),
        );
        registry.register(
            "status_writes",
            "Status subresource writes, by kind",
            status_writes.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile, by kind",
            durations.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and reconciles, else 0",
            leader.clone(),
        );
        let objects = Family::<Labels, Gauge>::default();
        registry.register(
            "objects",
            "Objects the operator manages, by kind and status.phase (Snapshot and SnapshotSchedule: Ready, Pending or Failed from their conditions)",
            objects.clone(),
        );
        let stalled = Family::<Labels, Gauge>::default();
        registry.register(
            "stalled",
            "1 for each object whose Stalled condition is True, by kind, namespace, name and reason",
            stalled.clone(),
        );
        let backup_unhealthy = Family::<Labels, Gauge>::default();
        registry.register(
            "backup_unhealthy",
            "1 for each backed-up Branch whose BackupHealthy condition is False, by namespace, name and reason (the database keeps serving; WAL waits on the storage volume)",
            backup_unhealthy.clone(),
        );
        let archive_lag = Family::<Labels, Gauge>::default();
        registry.register(
            "backup_archive_lag_seconds",
            "How long the oldest WAL file of a backed-up Branch has waited for upload to its BackupDestination (0: none waits), by namespace and name",
            archive_lag.clone(),
        );
        // 0.25 s .. ~70 min.
        let operations = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.25, 2.0, 15))
        });
        registry.register(
            "operation_duration_seconds",
            "How long operations took: branch and snapshot from creation to first Ready, restore from start to Completed",
            operations.clone(),
        );
        // The storage series have no sample until the poller's first
        // reading: a standby replica does not say the storage is down.
        let storage_up = Family::<Labels, Gauge>::default();
        registry.register(
            "storage_up",
            "1 when the storage layer answered the operator's last poll, 0 when it did not",
            storage_up.clone(),
        );
        let volume_bytes = Family::<Labels, Gauge>::default();
        registry.register(
            "storage_volume_bytes",
            "The storage volume's filesystem, in bytes: kind=\"total\" its size, kind=\"used\" what is in use",
            volume_bytes.clone(),
        );
        let wal_archive_bytes = Family::<Labels, Gauge>::default();
        registry.register(
            "wal_archive_bytes",
            "Bytes of every timeline's WAL archive on the storage volume together",
            wal_archive_bytes.clone(),
        );
        let branch_exclusive = Family::<Labels, Gauge>::default();
        registry.register(
            "branch_exclusive_bytes",
            "Bytes only a branch's current timeline holds (what deleting it would free), where the storage driver can tell, by namespace and branch",
            branch_exclusive.clone(),
        );
        Self {
            registry: Arc::new(registry),
            reconciles,
            errors,
            status_writes,
            durations,
            leader,
            objects,
            stalled,
            backup_unhealthy,
            archive_lag,
            operations,
            storage_up,
            volume_bytes,
            wal_archive_bytes,
            branch_exclusive,
            storage: Arc::default(),
            sources: Arc::default(),
            seen_ready: Arc::default(),
            scrape: Arc::default(),
        }
    }

    pub fn reconciled(&self, k: &str, took: Duration) {
        self.reconciles.get_or_create(&kind(k)).inc();
        self.durations
            .get_or_create(&kind(k))
            .observe(took.as_secs_f64());
    }

    pub fn error(&self, k: &str, reason: &str) {
        let mut l = kind(k);
        l.push(("reason".into(), reason.into()));
        self.errors.get_or_create(&l).inc();
    }

    pub fn status_write(&self, k: &str) {
        self.status_writes.get_or_create(&kind(k)).inc();
    }

    /// Records whether this replica is the leader (reconciles).
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Counts the objects of a controller's cache at every scrape.
    pub fn track<K>(&self, store: Store<K>)
    where
        K: Resource<DynamicType = ()> + Serialize + Clone + Send + Sync + 'static,
    {
        let source: Source = Box::new(move || {
            store
                .state()
                .iter()
                .map(|o| ObjectState::of(o.as_ref()))
                .collect()
        });
        if let Ok(mut s) = self.sources.lock() {
            s.push(source);
        }
    }

    /// An operation of `operation` (`branch`, `snapshot`, `restore`) done
    /// after `took`.
    pub fn operation_done(&self, operation: &str, took: Duration) {
        self.operations
            .get_or_create(&vec![("operation".into(), operation.into())])
            .observe(took.as_secs_f64());
    }

    /// Records what the storage poller read.
    pub fn set_storage(&self, reading: StorageReading) {
        if let Ok(mut s) = self.storage.lock() {
            *s = Some(reading);
        }
    }

    /// Records `uid` as Ready; true the first time this process sees it
    /// (so an operation's end is counted once).
    pub fn first_ready(&self, uid: &str) -> bool {
        self.seen_ready
            .lock()
            .map(|mut s| s.insert(uid.to_string()))
            .unwrap_or(false)
    }

    fn refresh_fleet(&self) {
        let states: Vec<ObjectState> = match self.sources.lock() {
            Ok(s) => s.iter().flat_map(|f| f()).collect(),
            Err(_) => return,
        };
        self.refresh_storage(&states);
        let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
        self.stalled.clear();
        self.backup_unhealthy.clear();
        self.archive_lag.clear();
        for o in &states {
            let at = || {
                vec![
                    ("namespace".into(), o.namespace.clone()),
                    ("name".into(), o.name.clone()),
                ]
            };
            if let Some(reason) = &o.backup_unhealthy {
                let mut l = at();
                l.push(("reason".into(), reason.clone()));
                self.backup_unhealthy.get_or_create(&l).set(1);
            }
            if let Some(lag) = o.archive_lag_seconds {
                self.archive_lag.get_or_create(&at()).set(lag);
            }
            let phase = o.phase.clone().unwrap_or_else(|| "Pending".into());
            *counts.entry((o.kind.clone(), phase)).or_default() += 1;
            if let Some(reason) = &o.stalled {
                self.stalled
                    .get_or_create(&vec![
                        ("kind".into(), o.kind.clone()),
                        ("namespace".into(), o.namespace.clone()),
                        ("name".into(), o.name.clone()),
                        ("reason".into(), reason.clone()),
                    ])
                    .set(1);
            }
        }
        self.objects.clear();
        for ((kind, phase), n) in counts {
            self.objects
                .get_or_create(&vec![("kind".into(), kind), ("phase".into(), phase)])
                .set(n);
        }
    }

    /// The storage series from the last reading; a figure the storage did
    /// not give (unreachable, an older engine) has no sample.
    fn refresh_storage(&self, states: &[ObjectState]) {
        let reading = match self.storage.lock() {
            Ok(s) => s.clone(),
            Err(_) => return,
        };
        self.storage_up.clear();
        self.volume_bytes.clear();
        self.wal_archive_bytes.clear();
        self.branch_exclusive.clear();
        let Some(r) = reading else {
            return;
        };
        self.storage_up.get_or_create(&vec![]).set(i64::from(r.up));
        for (kind, v) in [
            ("total", r.volume_total_bytes),
            ("used", r.volume_used_bytes),
        ] {
            if let Some(v) = v {
                self.volume_bytes
                    .get_or_create(&vec![("kind".into(), kind.into())])
                    .set(gauge_bytes(v));
            }
        }
        if let Some(v) = r.wal_archive_bytes {
            self.wal_archive_bytes
                .get_or_create(&vec![])
                .set(gauge_bytes(v));
        }
        let branches: Vec<ObjectState> = states
            .iter()
            .filter(|o| o.kind == "Branch")
            .cloned()
            .collect();
        for (namespace, branch, bytes) in
            branch_exclusive_bytes(&branches, &r.exclusive_by_timeline)
        {
            self.branch_exclusive
                .get_or_create(&vec![
                    ("namespace".into(), namespace),
                    ("branch".into(), branch),
                ])
                .set(gauge_bytes(bytes));
        }
    }

    /// Reconciles of a kind so far.
    pub fn reconcile_count(&self, k: &str) -> u64 {
        self.reconciles.get_or_create(&kind(k)).get()
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let _one = self.scrape.lock();
        self.refresh_fleet();
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_counts_errors_and_durations() {
        let m = Metrics::new();
        m.reconciled("Branch", Duration::from_millis(12));
        m.reconciled("Branch", Duration::from_millis(40));
        m.error("Branch", "StorageUnavailable");
        let text = m.encode();
        assert!(
            text.contains("pgbranch_reconciles_total{kind=\"Branch\"} 2"),
            "{text}"
        );
        assert!(text.contains(
            "pgbranch_reconcile_errors_total{kind=\"Branch\",reason=\"StorageUnavailable\"} 1"
        ));
        assert!(text.contains("pgbranch_reconcile_duration_seconds_count{kind=\"Branch\"} 2"));
        assert_eq!(m.reconcile_count("Branch"), 2);
        assert!(text.contains("pgbranch_leader 0"), "{text}");
        m.set_leader(true);
        assert!(m.encode().contains("pgbranch_leader 1"));
        m.operation_done("restore", Duration::from_secs(3));
        assert!(m
            .encode()
            .contains("pgbranch_operation_duration_seconds_count{operation=\"restore\"} 1"));
        assert!(m.first_ready("u1"));
        assert!(!m.first_ready("u1"));
    }

    #[test]
    fn the_fleet_is_read_from_the_objects_status() {
        use crate::api::{condition, Branch, BranchPhase, BranchStatus, Snapshot, SnapshotStatus};
        let mut b = Branch::new("dev", Default::default());
        b.metadata.namespace = Some("team".into());
        b.status = Some(BranchStatus {
            phase: Some(BranchPhase::Failed),
            conditions: vec![condition(
                "Stalled",
                "True",
                "PointOutsideRestoreWindow",
                "",
                None,
                jiff::Timestamp::UNIX_EPOCH,
            )],
            ..Default::default()
        });
        let st = ObjectState::of(&b);
        assert_eq!(st.backup_unhealthy, None);
        assert_eq!(st.kind, "Branch");
        assert_eq!(st.phase.as_deref(), Some("Failed"));
        assert_eq!(st.stalled.as_deref(), Some("PointOutsideRestoreWindow"));
        let mut bb = Branch::new("prod", Default::default());
        bb.metadata.namespace = Some("team".into());
        bb.status = Some(BranchStatus {
            conditions: vec![condition(
                "BackupHealthy",
                "False",
                "EndpointUnreachable",
                "",
                None,
                jiff::Timestamp::UNIX_EPOCH,
            )],
            backup: Some(crate::api::BranchBackupStatus {
                archive_lag_seconds: 42,
                ..Default::default()
            }),
            ..Default::default()
        });
        let st = ObjectState::of(&bb);
        assert_eq!(st.backup_unhealthy.as_deref(), Some("EndpointUnreachable"));
        assert_eq!(st.archive_lag_seconds, Some(42));
        let m = Metrics::new();
        let one = std::sync::Arc::new(bb);
        if let Ok(mut s) = m.sources.lock() {
            s.push(Box::new(move || vec![ObjectState::of(one.as_ref())]));
        }
        let text = m.encode();
        assert!(text.contains("pgbranch_backup_unhealthy{namespace=\"team\",name=\"prod\",reason=\"EndpointUnreachable\"} 1"), "{text}");
        assert!(
            text.contains(
                "pgbranch_backup_archive_lag_seconds{namespace=\"team\",name=\"prod\"} 42"
            ),
            "{text}"
        );
        let mut s = Snapshot::new("s", Default::default());
        s.status = Some(SnapshotStatus {
            conditions: vec![condition(
                "Ready",
                "True",
                "Ready",
                "",
                None,
                jiff::Timestamp::UNIX_EPOCH,
            )],
            ..Default::default()
        });
        let st = ObjectState::of(&s);
        assert_eq!(st.phase.as_deref(), Some("Ready"));
        assert_eq!(st.stalled, None);
        assert_eq!(st.timeline, None);
    }

    #[test]
    fn branches_get_their_timelines_exclusive_bytes() {
        use crate::api::{Branch, BranchStatus};
        let branch = |name: &str, tl: Option<&str>| {
            let mut b = Branch::new(name, Default::default());
            b.metadata.namespace = Some("team".into());
            b.status = Some(BranchStatus {
                timeline_id: tl.map(String::from),
                ..Default::default()
            });
            ObjectState::of(&b)
        };
        let states = vec![
            branch("prod", Some("t1")),
            branch("dev", Some("t2")),
            // No timeline yet, or one the driver cannot measure: no series.
            branch("new", None),
            branch("reflinked", Some("t3")),
        ];
        assert_eq!(states[0].timeline.as_deref(), Some("t1"));
        let by_tl = HashMap::from([("t1".to_string(), 100), ("t2".to_string(), 7)]);
        assert_eq!(
            branch_exclusive_bytes(&states, &by_tl),
            vec![
                ("team".to_string(), "dev".to_string(), 7),
                ("team".to_string(), "prod".to_string(), 100),
            ]
        );
    }

    #[test]
    fn storage_series_follow_the_last_reading() {
        let m = Metrics::new();
        // Before the first poll (a standby replica): no sample at all.
        let text = m.encode();
        assert!(!text.contains("pgbranch_storage_up"), "{text}");
        m.set_storage(StorageReading {
            up: true,
            volume_total_bytes: Some(1000),
            volume_used_bytes: Some(250),
            wal_archive_bytes: Some(64),
            exclusive_by_timeline: HashMap::new(),
        });
        let text = m.encode();
        assert!(text.contains("pgbranch_storage_up{} 1"), "{text}");
        assert!(
            text.contains("pgbranch_storage_volume_bytes{kind=\"total\"} 1000"),
            "{text}"
        );
        assert!(
            text.contains("pgbranch_storage_volume_bytes{kind=\"used\"} 250"),
            "{text}"
        );
        assert!(text.contains("pgbranch_wal_archive_bytes{} 64"), "{text}");
        // Unreachable: down, and no stale figures.
        m.set_storage(StorageReading::default());
        let text = m.encode();
        assert!(text.contains("pgbranch_storage_up{} 0"), "{text}");
        assert!(!text.contains("pgbranch_storage_volume_bytes{"), "{text}");
        assert!(!text.contains("pgbranch_wal_archive_bytes{"), "{text}");
        assert_eq!(gauge_bytes(u64::MAX), i64::MAX);
    }
}
