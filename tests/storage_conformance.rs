//! One set of scenarios against `Arc<dyn Storage>`, run on the in-process
//! engine and on the HTTP client talking to a real server over the same
//! engine: both must behave alike. Every driver available here runs (copy
//! always; btrfs and reflink with PGBRANCH_TEST_BTRFS / PGBRANCH_TEST_XFS).

#[allow(dead_code)]
#[path = "support/object_store.rs"]
mod object_store;
#[path = "storage_http_support/mod.rs"]
mod support;

use std::time::Duration;

use futures::future::BoxFuture;
use pgbranch::storage::engine::StopMode;
use pgbranch::storage::*;
use support::*;

type Scenario = for<'a> fn(&'a Backend) -> BoxFuture<'a, ()>;

async fn run_on_every_driver(name: &str, http: bool, scenario: Scenario) {
    for (driver, parent) in drivers_to_test(name) {
        let b = Backend::new(driver, parent.as_deref(), http).await;
        eprintln!("{name}: running on {}", b.name);
        scenario(&b).await;
    }
}

macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => { $(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::run_on_every_driver(stringify!($scenario), false, |b| Box::pin(super::$scenario(b))).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn http() {
                super::run_on_every_driver(stringify!($scenario), true, |b| Box::pin(super::$scenario(b))).await
            }
        }
    )* };
}

conformance!(
    branches_and_snapshots,
    idempotency_keys,
    refusals,
    read_replicas,
    backups
);

fn assert_not_found<T: std::fmt::Debug>(r: Result<T, StorageError>, what: &str) {
    match r {
        Err(StorageError::NotFound { .. }) => {}
        other => panic!("{what}: expected NotFound, got {other:?}"),
    }
}

/// Polls until a deleted timeline is gone (a `Deleting` state may show
/// for a while).
async fn wait_timeline_gone(s: &dyn Storage, id: &TimelineId) {
    for _ in 0..600 {
        match s.get_timeline(id).await {
            Err(StorageError::NotFound { .. }) => return,
            Ok(t) if t.state == State::Deleting => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("timeline {id} after delete: {other:?}"),
        }
    }
    panic!("timeline {id} still there 60 s after delete");
}

async fn wait_snapshot_gone(s: &dyn Storage, id: &SnapshotId) {
    for _ in 0..600 {
        match s.get_snapshot(id).await {
            Err(StorageError::NotFound { .. }) => return,
            Ok(t) if t.state == State::Deleting => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("snapshot {id} after delete: {other:?}"),
        }
    }
    panic!("snapshot {id} still there 60 s after delete");
}

/// Root timeline, rows written by a real postgres, a head copy, a snapshot,
/// a timeline from the snapshot: each holds exactly the parent's rows and
/// diverges on its own; deletes are idempotent and a parent's deletion
/// leaves its children whole.
async fn branches_and_snapshots(b: &Backend) {
    let s = &*b.storage;
    let root = create_ready_timeline(s, "root", empty_source())
        .await
        .unwrap();
    assert_eq!(root.state, State::Ready);
    assert_eq!(root.lineage.parent, None);
    assert_eq!(root.pg_major, 15);
    assert!(root.logical_size_bytes > 0, "{root:?}");

    let port = free_port();
    let pg = b.engine.start_postgres(&root.id, port).await.unwrap();
    let c = connect(port).await;
    c.batch_execute(
        "CREATE TABLE t (i int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100);",
    )
    .await
    .unwrap();
    drop(c);
    pg.stop(StopMode::Fast).await.unwrap();

    let child = create_ready_timeline(
        s,
        "child",
        Source::Timeline {
            timeline: root.id.clone(),
            point: Point::Head,
        },
    )
    .await
    .unwrap();
    assert_ne!(child.id, root.id);
    assert_eq!(child.lineage.parent.as_ref(), Some(&root.id));

    let snap = create_ready_snapshot(s, "snap", &root.id, Point::Head)
        .await
        .unwrap();
    assert_eq!(snap.timeline, root.id);
    assert_eq!(snap.state, State::Ready);
    assert!(snap.size_bytes > 0, "{snap:?}");

    let from_snap = create_ready_timeline(
        s,
        "from-snap",
        Source::Snapshot {
            snapshot: snap.id.clone(),
        },
    )
    .await
    .unwrap();
    assert_eq!(from_snap.lineage.snapshot.as_ref(), Some(&snap.id));

    let ids: Vec<TimelineId> = s
        .list_timelines()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    for id in [&root.id, &child.id, &from_snap.id] {
        assert!(ids.contains(id), "{id} missing from {ids:?}");
    }
    let snaps = s.list_snapshots().await.unwrap();
    assert!(snaps.iter().any(|x| x.id == snap.id), "{snaps:?}");

    // The child diverges without touching its parent.
    let port = free_port();
    let pg = b.engine.start_postgres(&child.id, port).await.unwrap();
    let c = connect(port).await;
    assert_eq!(count_rows(&c, "t").await, 100);
    c.batch_execute("INSERT INTO t SELECT generate_series(101, 150)")
        .await
        .unwrap();
    assert_eq!(count_rows(&c, "t").await, 150);
    drop(c);
    pg.stop(StopMode::Fast).await.unwrap();

    for id in [&root.id, &from_snap.id] {
        let port = free_port();
        let pg = b.engine.start_postgres(id, port).await.unwrap();
        let c = connect(port).await;
        assert_eq!(count_rows(&c, "t").await, 100, "timeline {id}");
        drop(c);
        pg.stop(StopMode::Fast).await.unwrap();
    }

    // Deletes are idempotent and make the object unreachable.
    s.delete_timeline(&from_snap.id).await.unwrap();
    s.delete_timeline(&from_snap.id).await.unwrap();
    wait_timeline_gone(s, &from_snap.id).await;
    s.delete_snapshot(&snap.id).await.unwrap();
    s.delete_snapshot(&snap.id).await.unwrap();
    wait_snapshot_gone(s, &snap.id).await;

    // Deleting the parent leaves the child whole.
    s.delete_timeline(&root.id).await.unwrap();
    wait_timeline_gone(s, &root.id).await;
    let child = s.get_timeline(&child.id).await.unwrap();
    assert_eq!(child.state, State::Ready);
    let port = free_port();
    let pg = b.engine.start_postgres(&child.id, port).await.unwrap();
    let c = connect(port).await;
    assert_eq!(count_rows(&c, "t").await, 150);
    drop(c);
    pg.stop(StopMode::Fast).await.unwrap();
}

/// The same key twice gives the same object, never a second copy; the same
/// key for a different request is a conflict.
async fn idempotency_keys(b: &Backend) {
    let s = &*b.storage;
    let req = CreateTimeline {
        key: key("uid-1"),
        source: empty_source(),
        source_connection: None,
        label: Some("ns/main".into()),
    };
    let first = s.create_timeline(req.clone()).await.unwrap();
    let second = s.create_timeline(req.clone()).await.unwrap();
    assert_eq!(first.id, second.id);
    let ready = pgbranch::storage::wait::wait_timeline_ready(s, &first.id, READY_TIMEOUT)
        .await
        .unwrap();
    let third = s.create_timeline(req.clone()).await.unwrap();
    assert_eq!(third.id, first.id);
    assert_eq!(third.state, State::Ready);
    assert_eq!(third.key, req.key);
    assert_eq!(
        s.list_timelines()
            .await
            .unwrap()
            .iter()
            .filter(|t| t.key == req.key)
            .count(),
        1
    );

    let conflicting = CreateTimeline {
        source: Source::Timeline {
            timeline: ready.id.clone(),
            point: Point::Head,
        },
        ..req.clone()
    };
    match s.create_timeline(conflicting).await {
        Err(StorageError::Conflict { message }) => {
            assert!(
                message.contains("uid-1"),
                "message names the key: {message}"
            )
        }
        other => panic!("reused key with another source: {other:?}"),
    }

    let sreq = CreateSnapshot {
        key: key("snap-uid"),
        timeline: ready.id.clone(),
        point: Point::Head,
        source_connection: None,
        label: None,
    };
    let s1 = s.create_snapshot(sreq.clone()).await.unwrap();
    let s2 = s.create_snapshot(sreq.clone()).await.unwrap();
    assert_eq!(s1.id, s2.id);
    pgbranch::storage::wait::wait_snapshot_ready(s, &s1.id, READY_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(s.create_snapshot(sreq.clone()).await.unwrap().id, s1.id);
    assert_eq!(s.list_snapshots().await.unwrap().len(), 1);

    // A snapshot key reused for a timeline's snapshot at another point.
    let other = CreateSnapshot {
        point: Point::Lsn(Lsn(1)),
        ..sreq
    };
    assert!(
        matches!(
            s.create_snapshot(other).await,
            Err(StorageError::Conflict { .. })
        ),
        "reused snapshot key with another point must conflict"
    );
}

/// Missing objects are NotFound, unreachable points are InvalidPoint,
/// refused synchronously with a typed error.
async fn refusals(b: &Backend) {
    let s = &*b.storage;
    let ghost = TimelineId::new("no-such-timeline").unwrap();
    let ghost_snap = SnapshotId::new("no-such-snapshot").unwrap();
    assert_not_found(s.get_timeline(&ghost).await, "get missing timeline");
    assert_not_found(s.get_snapshot(&ghost_snap).await, "get missing snapshot");
    assert_not_found(
        s.resolve_point(&ghost, jiff::Timestamp::now()).await,
        "resolve on missing timeline",
    );
    s.delete_timeline(&ghost).await.unwrap();
    s.delete_snapshot(&ghost_snap).await.unwrap();
    assert_not_found(
        s.create_timeline(CreateTimeline {
            key: key("from-ghost"),
            source: Source::Timeline {
                timeline: ghost.clone(),
                point: Point::Head,
            },
            source_connection: None,
            label: None,
        })
        .await,
        "branch of a missing timeline",
    );
    assert_not_found(
        s.create_timeline(CreateTimeline {
            key: key("from-ghost-snap"),
            source: Source::Snapshot {
                snapshot: ghost_snap.clone(),
            },
            source_connection: None,
            label: None,
        })
        .await,
        "timeline from a missing snapshot",
    );
    assert_not_found(
        s.create_snapshot(CreateSnapshot {
            key: key("snap-of-ghost"),
            timeline: ghost.clone(),
            point: Point::Head,
            source_connection: None,
            label: None,
        })
        .await,
        "snapshot of a missing timeline",
    );

    let root = create_ready_timeline(s, "root", empty_source())
        .await
        .unwrap();
    let past = "2001-01-01T00:00:00Z".parse::<jiff::Timestamp>().unwrap();
    let future = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24);
    for (i, (what, point)) in [
        ("an LSN far ahead", Point::Lsn(Lsn(0xFF_0000_0000))),
        (
            "a timestamp before the timeline existed",
            Point::Timestamp(past),
        ),
        ("a timestamp in the future", Point::Timestamp(future)),
    ]
    .into_iter()
    .enumerate()
    {
        let r = s
            .create_timeline(CreateTimeline {
                key: key(&format!("bad-point-{i}")),
                source: Source::Timeline {
                    timeline: root.id.clone(),
                    point,
                },
                source_connection: None,
                label: None,
            })
            .await;
        assert!(
            matches!(r, Err(StorageError::InvalidPoint { .. })),
            "branch at {what}: {r:?}"
        );
        let r = s
            .create_snapshot(CreateSnapshot {
                key: key(&format!("bad-snap-point-{i}")),
                timeline: root.id.clone(),
                point,
                source_connection: None,
                label: None,
            })
            .await;
        assert!(
            matches!(r, Err(StorageError::InvalidPoint { .. })),
            "snapshot at {what}: {r:?}"
        );
    }
    let r = s.resolve_point(&root.id, past).await;
    assert!(
        matches!(r, Err(StorageError::InvalidPoint { .. })),
        "resolve before the window: {r:?}"
    );
    // Refused requests left nothing behind.
    let tls = s.list_timelines().await.unwrap();
    assert_eq!(tls.len(), 1, "{tls:?}");
    assert!(s.list_snapshots().await.unwrap().is_empty());
}

/// Polls `f` until it returns true (60 s).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..600 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not reached within 60 s");
}

/// Read replicas of a running primary: a copy that streams from it (rows
/// written after the copy appear), refuses writes, is made once per
/// ordinal, cannot be deleted while it runs, and goes with its timeline.
async fn read_replicas(b: &Backend) {
    let s = &*b.storage;
    let root = create_ready_timeline(s, "primary", empty_source())
        .await
        .unwrap();
    let pport = free_port();
    let primary = b.engine.start_postgres(&root.id, pport).await.unwrap();
    let c = connect(pport).await;
    c.batch_execute(
        "CREATE TABLE t (i int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100);",
    )
    .await
    .unwrap();
    let conn = ConnInfo {
        host: "127.0.0.1".into(),
        port: pport,
        user: "postgres".into(),
        password: Some(Password(SUPERUSER_PASSWORD.into())),
        dbname: "postgres".into(),
    };
    let req = |ordinal: u32, conn: Option<ConnInfo>| CreateReplica {
        timeline: root.id.clone(),
        ordinal,
        source_connection: conn,
    };

    if b.engine.driver() != DriverKind::Btrfs {
        // A running primary cannot be copied by a walking driver without
        // backup mode.
        match s.create_replica(req(0, None)).await {
            Err(StorageError::Busy { .. }) => {}
            other => panic!("replica of a running primary without a connection: {other:?}"),
        }
        assert!(s.list_replicas(&root.id).await.unwrap().is_empty());
    }
    match s.create_replica(req(MAX_REPLICA_ORDINAL + 1, None)).await {
        Err(StorageError::InvalidArgument { .. }) => {}
        other => panic!("out-of-range ordinal: {other:?}"),
    }

    let r0 = s.create_replica(req(0, Some(conn.clone()))).await.unwrap();
    assert_eq!(r0.state, State::Ready);
    assert_eq!(r0.ordinal, 0);
    assert_eq!(
        r0.data_path,
        format!("timelines/{}/replicas/0/pgdata", root.id)
    );
    let data = b.dir.path().join(&r0.data_path);
    assert!(data.join("standby.signal").exists());
    for f in ["pgbranch.conf", "postgresql.auto.conf", "postgresql.conf"] {
        let text = std::fs::read_to_string(data.join(f)).unwrap();
        assert!(!text.contains(SUPERUSER_PASSWORD), "{f} holds the password");
        assert!(
            !text
                .lines()
                .any(|l| l.trim_start().starts_with("primary_conninfo")),
            "{f} sets primary_conninfo"
        );
    }
    // Same ordinal again: the same replica, not a second copy.
    std::fs::write(data.join("pgbranch-test-marker"), "kept").unwrap();
    let again = s.create_replica(req(0, Some(conn.clone()))).await.unwrap();
    assert_eq!(again, r0);
    assert!(
        data.join("pgbranch-test-marker").exists(),
        "the replica was copied again"
    );
    std::fs::remove_file(data.join("pgbranch-test-marker")).unwrap();

    // Rows written after the copy reach the replica by streaming.
    c.batch_execute("INSERT INTO t SELECT generate_series(101, 200);")
        .await
        .unwrap();
    let rport = free_port();
    let conninfo = format!("host=127.0.0.1 port={pport} user=postgres application_name=replica-0");
    let replica = b
        .engine
        .start_replica_postgres(
            &root.id,
            0,
            rport,
            &conninfo,
            Some(&Password(SUPERUSER_PASSWORD.into())),
        )
        .await
        .unwrap();
    let rc = connect(rport).await;
    let in_recovery: bool = rc
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "a replica is a standby");
    eventually("rows written after the copy on the replica", || async {
        count_rows(&rc, "t").await == 200
    })
    .await;
    eventually("the replica streams from the primary", || async {
        c.query_opt(
            "SELECT 1 FROM pg_stat_replication WHERE application_name = 'replica-0' AND state = 'streaming'",
            &[],
        )
        .await
        .unwrap()
        .is_some()
    })
    .await;
    c.batch_execute("INSERT INTO t VALUES (201);")
        .await
        .unwrap();
    eventually("a row written while streaming", || async {
        count_rows(&rc, "t").await == 201
    })
    .await;
    let err = rc
        .batch_execute("INSERT INTO t VALUES (1000);")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("read-only transaction")
            || format!("{err:?}").contains("read-only transaction"),
        "{err:?}"
    );

    // A running replica can be neither deleted nor lose its timeline.
    match s.delete_replica(&root.id, 0).await {
        Err(StorageError::Busy { .. }) => {}
        other => panic!("delete of a running replica: {other:?}"),
    }
    let r1 = s.create_replica(req(1, Some(conn.clone()))).await.unwrap();
    let listed: Vec<u32> = s
        .list_replicas(&root.id)
        .await
        .unwrap()
        .iter()
        .map(|r| r.ordinal)
        .collect();
    assert_eq!(listed, vec![0, 1]);
    drop(rc);
    replica.stop(StopMode::Fast).await.unwrap();
    s.delete_replica(&root.id, 0).await.unwrap();
    s.delete_replica(&root.id, 0).await.unwrap();
    assert!(!data.exists(), "the replica's directory is gone");
    let listed: Vec<u32> = s
        .list_replicas(&root.id)
        .await
        .unwrap()
        .iter()
        .map(|r| r.ordinal)
        .collect();
    assert_eq!(listed, vec![1]);

    // Replica 1 never streams (its primary_conninfo leads nowhere): it
    // catches up from the timeline's WAL archive (restore_command).
    c.batch_execute("INSERT INTO t SELECT generate_series(300, 399);")
        .await
        .unwrap();
    c.batch_execute("SELECT pg_switch_wal();").await.unwrap();
    let lport = free_port();
    let nowhere = format!("host=127.0.0.1 port={} user=postgres", free_port());
    let lone = b
        .engine
        .start_replica_postgres(&root.id, 1, lport, &nowhere, None)
        .await
        .unwrap();
    let lc = connect(lport).await;
    eventually(
        "rows from the archive on a replica that cannot stream",
        || async { count_rows(&lc, "t").await == 301 },
    )
    .await;
    drop(lc);
    lone.stop(StopMode::Fast).await.unwrap();

    // A stopped primary is copied as it is; deleting the timeline takes
    // every replica with it.
    drop(c);
    primary.stop(StopMode::Fast).await.unwrap();
    let r2 = s.create_replica(req(2, None)).await.unwrap();
    assert_eq!(r2.state, State::Ready);
    s.delete_timeline(&root.id).await.unwrap();
    wait_timeline_gone(s, &root.id).await;
    assert!(s.list_replicas(&root.id).await.unwrap().is_empty());
    for r in [&r1, &r2] {
        assert!(
            !b.dir.path().join(&r.data_path).exists(),
            "{} survived its timeline",
            r.data_path
        );
    }
    match s.create_replica(req(0, None)).await {
        Err(StorageError::NotFound { .. }) => {}
        other => panic!("replica of a deleted timeline: {other:?}"),
    }
}

/// Continuous archiving and base backups through the trait, on a real
/// object store (Garage) with barman-cloud: archiving is turned on (twice:
/// idempotent), a switched WAL segment is uploaded, a base backup runs in
/// the background once per key with its size, and archiving turns off.
/// Refusals: a missing timeline, a base backup of a timeline not archiving.
async fn backups(b: &Backend) {
    if !object_store::barman_installed() {
        object_store::skip_notice("backups", "barman-cloud is not installed");
        return;
    }
    let Some(g) = object_store::Garage::start("conformance-backups", "backups") else {
        return;
    };
    let s = &*b.storage;
    let target = BackupTarget {
        store: pgbranch::backup::ObjectStore {
            endpoint: g.endpoint.clone(),
            bucket: g.bucket.clone(),
            region: g.region.clone(),
            prefix: "conformance/branch-uid".into(),
            path_style: true,
            ca_bundle: None,
            credentials: pgbranch::backup::Credentials {
                access_key_id: g.access_key_id.clone(),
                secret_access_key: g.secret_access_key.clone(),
            },
        },
        server: "tl".into(),
    };
    let ghost = TimelineId::new("no-such-timeline").unwrap();
    assert_not_found(
        s.set_backup(&ghost, Some(target.clone())).await,
        "archiving a missing timeline",
    );
    assert_eq!(s.get_backup(&ghost).await.unwrap(), None);

    let root = create_ready_timeline(s, "backed-up", empty_source())
        .await
        .unwrap();
    match s
        .start_base_backup(&root.id, BaseBackupRequest::default())
        .await
    {
        Err(StorageError::InvalidArgument { .. }) => {}
        other => panic!("a base backup of a timeline not archiving: {other:?}"),
    }
    let st = s
        .set_backup(&root.id, Some(target.clone()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st.server, "tl");
    s.set_backup(&root.id, Some(target.clone())).await.unwrap();

    let port = free_port();
    let pg = b.engine.start_postgres(&root.id, port).await.unwrap();
    let c = connect(port).await;
    c.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let seg: String = c
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .unwrap()
        .get(0);
    eventually("the switched segment is uploaded", || async {
        let st = s.get_backup(&root.id).await.unwrap().unwrap();
        st.last_archived_wal.as_deref() >= Some(seg.as_str()) && st.last_error.is_none()
    })
    .await;

    let req = BaseBackupRequest {
        key: "slot-1".into(),
        keep_count: Some(2),
        max_age: None,
    };
    let st = s.start_base_backup(&root.id, req.clone()).await.unwrap();
    assert_eq!(st.base_backup_key.as_deref(), Some("slot-1"));
    eventually("the base backup is taken", || async {
        let st = s.get_backup(&root.id).await.unwrap().unwrap();
        !st.base_backup_running && st.base_backups.len() == 1
    })
    .await;
    let st = s.get_backup(&root.id).await.unwrap().unwrap();
    assert_eq!(st.base_backup_error, None);
    let last = st.last_base_backup.clone().unwrap();
    assert!(
        last.size_bytes.unwrap_or(0) > 0 && last.end_lsn.is_some(),
        "{last:?}"
    );
    // The same key again: nothing new.
    let again = s.start_base_backup(&root.id, req).await.unwrap();
    assert!(!again.base_backup_running, "{again:?}");
    assert_eq!(again.base_backups.len(), 1);

    assert_eq!(s.set_backup(&root.id, None).await.unwrap(), None);
    assert_eq!(s.get_backup(&root.id).await.unwrap(), None);
    drop(c);
    pg.stop(StopMode::Fast).await.unwrap();
}
