//! One set of scenarios against `Arc<dyn Storage>`, run on the in-process
//! engine and on the HTTP client talking to a real server over the same
//! engine: both must behave alike. Every driver available here runs (copy
//! always; btrfs and reflink with PGBRANCH_TEST_BTRFS / PGBRANCH_TEST_XFS).

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

conformance!(branches_and_snapshots, idempotency_keys, refusals);

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
