//! The embedded engine against real PostgreSQL on real filesystems.
//!
//! Every scenario runs on the `copy` driver in a temp dir, and on `btrfs` /
//! `reflink` when `PGBRANCH_TEST_BTRFS` / `PGBRANCH_TEST_XFS` name mounted
//! volumes (scripts/test-volumes.sh); otherwise those are skipped with a
//! printed notice.

use std::path::PathBuf;
use std::time::Duration;

use pgbranch::storage::engine::{Engine, EngineConfig, PgServer, StopMode};
use pgbranch::storage::wait::{wait_snapshot_ready, wait_timeline_ready};
use pgbranch::storage::{
    ConnInfo, CreateReplica, CreateSnapshot, CreateTimeline, DriverKind, Lsn, OpKey, Password,
    Point, Source, State, Storage, StorageError, TimelineId,
};

const PW: &str = "test-secret-pw";
const WAIT: Duration = Duration::from_secs(180);

struct Volume {
    kind: DriverKind,
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Drop for Volume {
    /// Read-only btrfs subvolumes (bases, snapshots) survive a plain
    /// recursive delete: remove every subvolume under the volume first, so
    /// the test filesystem does not fill up across tests.
    fn drop(&mut self) {
        if self.kind != DriverKind::Btrfs {
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let mut subvols: Vec<PathBuf> = walkdir::WalkDir::new(&self.root)
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_type().is_dir() && e.metadata().map(|m| m.ino() == 256).unwrap_or(false)
            })
            .map(|e| e.into_path())
            .collect();
        subvols.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in subvols {
            let _ = std::process::Command::new("btrfs")
                .args(["property", "set", "-ts"])
                .arg(&p)
                .args(["ro", "false"])
                .output();
            let _ = std::process::Command::new("btrfs")
                .args(["subvolume", "delete"])
                .arg(&p)
                .output();
        }
    }
}

/// One fresh volume root per available driver.
fn volumes(test: &str) -> Vec<Volume> {
    let mut out = Vec::new();
    let mut add = |kind: DriverKind, parent: Option<PathBuf>| {
        let dir = match parent {
            Some(p) => tempfile::tempdir_in(p).unwrap(),
            None => tempfile::tempdir().unwrap(),
        };
        let root = dir.path().join("vol");
        out.push(Volume {
            kind,
            _dir: dir,
            root,
        });
    };
    add(DriverKind::Copy, None);
    match std::env::var_os("PGBRANCH_TEST_BTRFS") {
        Some(p) => add(DriverKind::Btrfs, Some(p.into())),
        None => eprintln!("{test}: PGBRANCH_TEST_BTRFS not set: btrfs driver skipped"),
    }
    match std::env::var_os("PGBRANCH_TEST_XFS") {
        Some(p) => add(DriverKind::Reflink, Some(p.into())),
        None => eprintln!("{test}: PGBRANCH_TEST_XFS not set: reflink driver skipped"),
    }
    out
}

async fn open(v: &Volume) -> Engine {
    Engine::open(EngineConfig {
        root: v.root.clone(),
        driver: Some(v.kind),
        ..Default::default()
    })
    .await
    .unwrap()
}

fn key(s: &str) -> OpKey {
    OpKey::new(s).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn conn(srv: &PgServer) -> ConnInfo {
    ConnInfo {
        host: "127.0.0.1".into(),
        port: srv.port,
        user: "postgres".into(),
        password: Some(Password(PW.into())),
        dbname: "postgres".into(),
    }
}

async fn root_timeline(e: &Engine, k: &str) -> TimelineId {
    let t = e
        .create_timeline(CreateTimeline {
            key: key(k),
            source: Source::Empty {
                superuser_password: Some(Password(PW.into())),
            },
            source_connection: None,
            label: Some("test/root".into()),
        })
        .await
        .unwrap();
    assert_eq!(t.state, State::Creating);
    assert!(t.progress.is_some(), "a creating timeline reports progress");
    wait_timeline_ready(e, &t.id, WAIT).await.unwrap().id
}

async fn branch(
    e: &Engine,
    k: &str,
    from: &TimelineId,
    point: Point,
    c: Option<ConnInfo>,
) -> Result<TimelineId, StorageError> {
    let t = e
        .create_timeline(CreateTimeline {
            key: key(k),
            source: Source::Timeline {
                timeline: from.clone(),
                point,
            },
            source_connection: c,
            label: None,
        })
        .await?;
    Ok(wait_timeline_ready(e, &t.id, WAIT).await?.id)
}

async fn sql(srv: &PgServer, q: &str) {
    let c = srv.connect("postgres").await.unwrap();
    c.batch_execute(q).await.unwrap();
}

async fn ids(srv: &PgServer) -> Vec<i32> {
    let c = srv.connect("postgres").await.unwrap();
    c.query("SELECT id FROM t ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Branches `from` at `point` (key `k`, no source connection), starts the
/// branch, and returns it with the ids of its table `t` (server stopped).
async fn rows_at(e: &Engine, k: &str, from: &TimelineId, point: Point) -> (TimelineId, Vec<i32>) {
    let b = branch(e, k, from, point, None).await.unwrap();
    let s = e.start_postgres(&b, free_port()).await.unwrap();
    let rows = ids(&s).await;
    s.stop(StopMode::Fast).await.unwrap();
    (b, rows)
}

async fn one_str(srv: &PgServer, q: &str) -> String {
    let c = srv.connect("postgres").await.unwrap();
    c.query_one(q, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_branch_of_running_server_is_independent() {
    for v in volumes("head_branch") {
        eprintln!("driver {}", v.kind);
        let e = open(&v).await;
        assert_eq!(e.driver(), v.kind);
        let root = root_timeline(&e, "root").await;
        let p = e.start_postgres(&root, free_port()).await.unwrap();
        sql(
            &p,
            "CREATE TABLE t (id int primary key); INSERT INTO t SELECT generate_series(1, 100);",
        )
        .await;

        // No connection: crash-consistent on btrfs, refused elsewhere.
        let r = branch(&e, "nocon", &root, Point::Head, None).await;
        match v.kind {
            DriverKind::Btrfs => {
                let b = r.unwrap();
                let s = e.start_postgres(&b, free_port()).await.unwrap();
                assert_eq!(ids(&s).await.len(), 100);
                s.stop(StopMode::Fast).await.unwrap();
            }
            _ => assert!(matches!(r, Err(StorageError::Busy { .. })), "{r:?}"),
        }

        let b = branch(&e, "child", &root, Point::Head, Some(conn(&p)))
            .await
            .unwrap();
        let info = e.get_timeline(&b).await.unwrap();
        assert_eq!(info.lineage.parent.as_ref(), Some(&root));
        assert!(info.logical_size_bytes > 1_000_000);
        let s = e.start_postgres(&b, free_port()).await.unwrap();
        assert_eq!(ids(&s).await, (1..=100).collect::<Vec<_>>());
        // Independently writable, both ways.
        sql(&s, "INSERT INTO t VALUES (1000)").await;
        sql(&p, "INSERT INTO t VALUES (2000)").await;
        assert!(ids(&s).await.contains(&1000) && !ids(&s).await.contains(&2000));
        assert!(ids(&p).await.contains(&2000) && !ids(&p).await.contains(&1000));
        // The branch archives into its own archive, not the parent's.
        let conf = std::fs::read_to_string(e.data_dir(&b).join("pgbranch.conf")).unwrap();
        assert!(conf.contains(&format!("wal/{b}")) && !conf.contains(&format!("wal/{root}")));
        assert!(!e.data_dir(&b).join("postmaster.pid").exists() || s.port > 0);
        // A running timeline cannot be deleted.
        assert!(matches!(
            e.delete_timeline(&b).await,
            Err(StorageError::Busy { .. })
        ));
        s.stop(StopMode::Fast).await.unwrap();

        // Archiving set by the user on the parent is never inherited.
        sql(&p, "ALTER SYSTEM SET archive_command = '/bin/true'").await;
        sql(&p, "SELECT pg_reload_conf()").await;
        let b2 = branch(&e, "child-2", &root, Point::Head, Some(conn(&p)))
            .await
            .unwrap();
        let s = e.start_postgres(&b2, free_port()).await.unwrap();
        let ac = one_str(&s, "SHOW archive_command").await;
        assert!(ac.contains(&format!("wal/{b2}")), "{ac}");
        s.stop(StopMode::Fast).await.unwrap();
        p.stop(StopMode::Immediate).await.unwrap();

        // WAL kept outside the data directory is refused, not shared.
        let data = e.data_dir(&root);
        let moved = data.join("wal-elsewhere");
        std::fs::rename(data.join("pg_wal"), &moved).unwrap();
        std::os::unix::fs::symlink(&moved, data.join("pg_wal")).unwrap();
        let err = branch(&e, "symlinked", &root, Point::Head, None)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::InvalidArgument { .. }), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_branches_hold_exactly_the_commits() {
    for v in volumes("pitr") {
        eprintln!("driver {}", v.kind);
        let e = open(&v).await;
        let root = root_timeline(&e, "root").await;
        let p = e.start_postgres(&root, free_port()).await.unwrap();
        sql(&p, "CREATE TABLE t (id int primary key)").await;
        let mut lsns = Vec::new();
        let mut times = Vec::new();
        for batch in 0..4 {
            let lo = batch * 10 + 1;
            sql(
                &p,
                &format!("INSERT INTO t SELECT generate_series({lo}, {})", lo + 9),
            )
            .await;
            let lsn: Lsn = one_str(&p, "SELECT pg_current_wal_lsn()::text")
                .await
                .parse()
                .unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
            let ts: jiff::Timestamp = one_str(
                &p,
                "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            )
            .await
            .parse()
            .unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
            lsns.push(lsn);
            times.push(ts);
        }
        sql(&p, "SELECT pg_switch_wal()").await;
        let c = conn(&p);
        let mut first_lsn_branch = None;
        for k in [0usize, 2] {
            let b = branch(
                &e,
                &format!("lsn-{k}"),
                &root,
                Point::Lsn(lsns[k]),
                Some(c.clone()),
            )
            .await
            .unwrap();
            let s = e.start_postgres(&b, free_port()).await.unwrap();
            assert_eq!(
                ids(&s).await,
                (1..=(k as i32 + 1) * 10).collect::<Vec<_>>(),
                "at {}",
                lsns[k]
            );
            s.stop(StopMode::Fast).await.unwrap();
            let info = e.get_timeline(&b).await.unwrap();
            assert_eq!(info.lineage.parent_lsn, Some(lsns[k]));
            first_lsn_branch.get_or_insert(b);
        }
        let mut pitr_branch = None;
        for k in [1usize, 3] {
            let b = branch(
                &e,
                &format!("ts-{k}"),
                &root,
                Point::Timestamp(times[k]),
                Some(c.clone()),
            )
            .await
            .unwrap();
            let s = e.start_postgres(&b, free_port()).await.unwrap();
            assert_eq!(
                ids(&s).await,
                (1..=(k as i32 + 1) * 10).collect::<Vec<_>>(),
                "at {}",
                times[k]
            );
            // A PITR branch is writable and has its own history to branch
            // from (a PostgreSQL timeline > 1, its own archive).
            sql(&s, "INSERT INTO t VALUES (9999)").await;
            let mid: Lsn = one_str(&s, "SELECT pg_current_wal_lsn()::text")
                .await
                .parse()
                .unwrap();
            sql(&s, "INSERT INTO t VALUES (10000)").await;
            s.stop(StopMode::Fast).await.unwrap();
            pitr_branch = Some((b, mid, k));
        }
        let (b, mid, k) = pitr_branch.unwrap();
        let bb = branch(&e, "pitr-of-pitr", &b, Point::Lsn(mid), None)
            .await
            .unwrap();
        let s = e.start_postgres(&bb, free_port()).await.unwrap();
        let mut want: Vec<i32> = (1..=(k as i32 + 1) * 10).collect();
        want.push(9999);
        assert_eq!(ids(&s).await, want);
        s.stop(StopMode::Fast).await.unwrap();

        // Lineage: points before a branch was made are in its parent's
        // history up to the branch point (at an LSN and at a time).
        let bw = e.get_timeline(&b).await.unwrap().restore_window.unwrap();
        let rw = e.get_timeline(&root).await.unwrap().restore_window.unwrap();
        assert_eq!(
            bw.oldest, rw.oldest,
            "window of {b} does not reach back through its parent"
        );
        for (key, point, n) in [
            ("anc-lsn", Point::Lsn(lsns[1]), 20),
            ("anc-ts", Point::Timestamp(times[0]), 10),
        ] {
            let old = branch(&e, key, &b, point, None).await.unwrap();
            let s = e.start_postgres(&old, free_port()).await.unwrap();
            assert_eq!(ids(&s).await, (1..=n).collect::<Vec<_>>(), "{key}");
            s.stop(StopMode::Fast).await.unwrap();
        }
        // ...but never the parent's history after the branch point.
        let early = first_lsn_branch.unwrap();
        match branch(&e, "after-bp", &early, Point::Lsn(lsns[2]), None).await {
            Err(StorageError::InvalidPoint { .. }) => {}
            Ok(t) => {
                let s = e.start_postgres(&t, free_port()).await.unwrap();
                assert_eq!(ids(&s).await, (1..=10).collect::<Vec<_>>());
                s.stop(StopMode::Fast).await.unwrap();
            }
            Err(other) => panic!("{other}"),
        }
        // The volume belongs to one engine at a time.
        let second = Engine::open(EngineConfig {
            root: v.root.clone(),
            driver: Some(v.kind),
            ..Default::default()
        })
        .await;
        assert!(
            matches!(second, Err(StorageError::Busy { .. })),
            "{second:?}"
        );
        // resolve_point agrees with the branches.
        let l1 = e.resolve_point(&root, times[1]).await.unwrap();
        assert!(
            l1 > lsns[0] && l1 <= lsns[1],
            "{l1} not in ({}, {}]",
            lsns[0],
            lsns[1]
        );

        // Refused points, with typed errors and the window.
        let w = e.get_timeline(&root).await.unwrap().restore_window.unwrap();
        assert!(w.oldest.lsn < lsns[0] && w.newest.lsn >= lsns[3], "{w}");
        let err = branch(
            &e,
            "future-lsn",
            &root,
            Point::Lsn(Lsn(0xFFFF_0000_0000)),
            Some(c.clone()),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::InvalidPoint {
                    window: Some(_),
                    ..
                }
            ),
            "{err}"
        );
        let err = branch(&e, "old-lsn", &root, Point::Lsn(Lsn(0x10)), None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::InvalidPoint {
                    window: Some(_),
                    ..
                }
            ),
            "{err}"
        );
        let future = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600);
        let err = branch(&e, "future-ts", &root, Point::Timestamp(future), None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("future"), "{err}");
        let past = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(86400);
        let err = e.resolve_point(&root, past).await.unwrap_err();
        assert!(matches!(err, StorageError::InvalidPoint { .. }), "{err}");
        assert!(matches!(
            "16/XYZ".parse::<Lsn>(),
            Err(StorageError::InvalidArgument { .. })
        ));
        let missing = TimelineId::new("nope").unwrap();
        let err = branch(&e, "missing", &missing, Point::Head, None)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::NotFound { .. }), "{err}");
        p.stop(StopMode::Fast).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_keys_deletes_and_sizes() {
    for v in volumes("chains") {
        eprintln!("driver {}", v.kind);
        let e = open(&v).await;
        let info = e.info().await.unwrap();
        assert_eq!(info.driver, v.kind);
        if v.kind != DriverKind::Copy {
            // Probing finds the copy-on-write method of the filesystem.
            let probed = Engine::open(EngineConfig {
                root: v.root.with_file_name("probe"),
                ..Default::default()
            })
            .await
            .unwrap();
            assert_eq!(probed.driver(), v.kind);
        }
        assert!(info.pg_major >= 14, "{info:?}");
        let root = root_timeline(&e, "root").await;
        // Idempotent keys.
        let again = e
            .create_timeline(CreateTimeline {
                key: key("root"),
                source: Source::Empty {
                    superuser_password: Some(Password(PW.into())),
                },
                source_connection: None,
                label: None,
            })
            .await
            .unwrap();
        assert_eq!(again.id, root);
        let conflict = e
            .create_timeline(CreateTimeline {
                key: key("root"),
                source: Source::Timeline {
                    timeline: root.clone(),
                    point: Point::Head,
                },
                source_connection: None,
                label: None,
            })
            .await;
        assert!(
            matches!(conflict, Err(StorageError::Conflict { .. })),
            "{conflict:?}"
        );
        let snap_conflict = e
            .create_snapshot(CreateSnapshot {
                key: key("root"),
                timeline: root.clone(),
                point: Point::Head,
                source_connection: None,
                label: None,
            })
            .await;
        assert!(matches!(snap_conflict, Err(StorageError::Conflict { .. })));

        // A branch of a branch of a branch, each adding a row (stopped sources).
        let s = e.start_postgres(&root, free_port()).await.unwrap();
        sql(
            &s,
            "CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1)",
        )
        .await;
        s.stop(StopMode::Fast).await.unwrap();
        let mut chain = vec![root.clone()];
        for n in 2..=4 {
            let parent = chain.last().unwrap().clone();
            let b = branch(&e, &format!("gen-{n}"), &parent, Point::Head, None)
                .await
                .unwrap();
            let again = branch(&e, &format!("gen-{n}"), &parent, Point::Head, None)
                .await
                .unwrap();
            assert_eq!(again, b, "same key made a second timeline");
            let s = e.start_postgres(&b, free_port()).await.unwrap();
            sql(&s, &format!("INSERT INTO t VALUES ({n})")).await;
            s.stop(StopMode::Fast).await.unwrap();
            chain.push(b);
        }
        assert_eq!(e.list_timelines().await.unwrap().len(), 4);

        // "Now" on a stopped timeline: everything it wrote is archived, so
        // a time after its last commit is reachable without a connection.
        let now = branch(
            &e,
            "at-now",
            &chain[3],
            Point::Timestamp(jiff::Timestamp::now()),
            None,
        )
        .await
        .unwrap();
        let s = e.start_postgres(&now, free_port()).await.unwrap();
        assert_eq!(ids(&s).await, vec![1, 2, 3, 4]);
        s.stop(StopMode::Fast).await.unwrap();
        e.delete_timeline(&now).await.unwrap();

        // Sizes, then deleting the parents leaves the grandchild whole.
        let leaf = chain[3].clone();
        let t = e.get_timeline(&leaf).await.unwrap();
        assert!(
            t.logical_size_bytes > 10_000_000,
            "{}",
            t.logical_size_bytes
        );
        match v.kind {
            DriverKind::Copy => assert!(t.exclusive_bytes.unwrap() >= t.logical_size_bytes),
            DriverKind::Reflink => assert_eq!(t.exclusive_bytes, None),
            // Measured in the background: it lands within a few polls.
            DriverKind::Btrfs => {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                let mut excl = t.exclusive_bytes;
                while excl.is_none() && std::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    excl = e.get_timeline(&leaf).await.unwrap().exclusive_bytes;
                }
                assert!(excl.is_some(), "btrfs exclusive bytes never measured");
            }
        }
        for id in &chain[..3] {
            e.delete_timeline(id).await.unwrap();
            assert!(!e.data_dir(id).exists());
            assert!(!v.root.join("wal").join(id.as_str()).exists());
            e.delete_timeline(id).await.unwrap(); // idempotent
        }
        assert!(matches!(
            e.get_timeline(&chain[0]).await,
            Err(StorageError::NotFound { .. })
        ));
        let s = e.start_postgres(&leaf, free_port()).await.unwrap();
        assert_eq!(ids(&s).await, vec![1, 2, 3, 4]);
        s.stop(StopMode::Fast).await.unwrap();
        // Reopening the engine keeps everything.
        drop(e);
        let e = open(&v).await;
        assert_eq!(e.list_timelines().await.unwrap().len(), 1);
        e.delete_timeline(&leaf).await.unwrap();
        let left: Vec<_> = std::fs::read_dir(v.root.join("timelines"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "space not given back: {left:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_restore_twice_and_at_points() {
    for v in volumes("snapshots") {
        eprintln!("driver {}", v.kind);
        let e = open(&v).await;
        let root = root_timeline(&e, "root").await;
        let p = e.start_postgres(&root, free_port()).await.unwrap();
        sql(
            &p,
            "CREATE TABLE t (id int primary key); INSERT INTO t SELECT generate_series(1, 10)",
        )
        .await;
        let snap = e
            .create_snapshot(CreateSnapshot {
                key: key("snap-head"),
                timeline: root.clone(),
                point: Point::Head,
                source_connection: Some(conn(&p)),
                label: None,
            })
            .await
            .unwrap();
        let snap = wait_snapshot_ready(&e, &snap.id, WAIT).await.unwrap();
        assert!(snap.lsn.is_some() && snap.size_bytes > 1_000_000);

        // Without a connection: crash-consistent on btrfs, refused elsewhere.
        let r = e
            .create_snapshot(CreateSnapshot {
                key: key("snap-nocon"),
                timeline: root.clone(),
                point: Point::Head,
                source_connection: None,
                label: None,
            })
            .await;
        match v.kind {
            DriverKind::Btrfs => {
                let s = wait_snapshot_ready(&e, &r.unwrap().id, WAIT).await.unwrap();
                let t = e
                    .create_timeline(CreateTimeline {
                        key: key("restore-nocon"),
                        source: Source::Snapshot {
                            snapshot: s.id.clone(),
                        },
                        source_connection: None,
                        label: None,
                    })
                    .await
                    .unwrap();
                let t = wait_timeline_ready(&e, &t.id, WAIT).await.unwrap();
                let srv = e.start_postgres(&t.id, free_port()).await.unwrap();
                assert_eq!(ids(&srv).await, (1..=10).collect::<Vec<_>>());
                srv.stop(StopMode::Fast).await.unwrap();
            }
            _ => assert!(matches!(r, Err(StorageError::Busy { .. })), "{r:?}"),
        }
        sql(&p, "INSERT INTO t SELECT generate_series(11, 20)").await;
        let lsn20: Lsn = one_str(&p, "SELECT pg_current_wal_lsn()::text")
            .await
            .parse()
            .unwrap();
        sql(&p, "INSERT INTO t SELECT generate_series(21, 30)").await;

        // Restored twice: two independent timelines with the snapshot's rows.
        let mut restored = Vec::new();
        for k in ["restore-a", "restore-b"] {
            let t = e
                .create_timeline(CreateTimeline {
                    key: key(k),
                    source: Source::Snapshot {
                        snapshot: snap.id.clone(),
                    },
                    source_connection: None,
                    label: None,
                })
                .await
                .unwrap();
            restored.push(wait_timeline_ready(&e, &t.id, WAIT).await.unwrap().id);
        }
        let a = e.start_postgres(&restored[0], free_port()).await.unwrap();
        let b = e.start_postgres(&restored[1], free_port()).await.unwrap();
        sql(&a, "DELETE FROM t").await;
        assert!(ids(&a).await.is_empty());
        assert_eq!(ids(&b).await, (1..=10).collect::<Vec<_>>());
        a.stop(StopMode::Fast).await.unwrap();
        b.stop(StopMode::Fast).await.unwrap();

        // A snapshot at a past LSN (the head snapshot serves as its base).
        let past = e
            .create_snapshot(CreateSnapshot {
                key: key("snap-lsn"),
                timeline: root.clone(),
                point: Point::Lsn(lsn20),
                source_connection: Some(conn(&p)),
                label: None,
            })
            .await
            .unwrap();
        let past = wait_snapshot_ready(&e, &past.id, WAIT).await.unwrap();
        assert_eq!(past.lsn, Some(lsn20));
        let t = e
            .create_timeline(CreateTimeline {
                key: key("restore-lsn"),
                source: Source::Snapshot {
                    snapshot: past.id.clone(),
                },
                source_connection: None,
                label: None,
            })
            .await
            .unwrap();
        let t = wait_timeline_ready(&e, &t.id, WAIT).await.unwrap();
        let s = e.start_postgres(&t.id, free_port()).await.unwrap();
        assert_eq!(ids(&s).await, (1..=20).collect::<Vec<_>>());
        s.stop(StopMode::Fast).await.unwrap();

        // Deleting the snapshot's timeline and the snapshot.
        p.stop(StopMode::Fast).await.unwrap();
        e.delete_snapshot(&snap.id).await.unwrap();
        assert!(matches!(
            e.get_snapshot(&snap.id).await,
            Err(StorageError::NotFound { .. })
        ));
        assert!(!v.root.join("snapshots").join(snap.id.as_str()).exists());
        e.delete_timeline(&root).await.unwrap();
        let s = e.start_postgres(&restored[1], free_port()).await.unwrap();
        assert_eq!(ids(&s).await.len(), 10);
        s.stop(StopMode::Fast).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_only_copies_structure_without_rows() {
    let v = volumes("schema_only").remove(0);
    let e = open(&v).await;
    let root = root_timeline(&e, "root").await;
    let p = e.start_postgres(&root, free_port()).await.unwrap();
    sql(
        &p,
        "CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1), (2)",
    )
    .await;
    p.stop(StopMode::Fast).await.unwrap();
    let t = e
        .create_timeline(CreateTimeline {
            key: key("schema"),
            source: Source::SchemaOnly {
                timeline: root.clone(),
            },
            source_connection: None,
            label: None,
        })
        .await
        .unwrap();
    let t = wait_timeline_ready(&e, &t.id, WAIT).await.unwrap();
    assert!(t.lineage.schema_only);
    let s = e.start_postgres(&t.id, free_port()).await.unwrap();
    assert!(ids(&s).await.is_empty());
    s.stop(StopMode::Fast).await.unwrap();
}

// ------------------------------------------------------------ crash safety

/// Not a test on its own: the engine process the crash tests kill. Runs
/// one create and waits to be killed by `PGBRANCH_ENGINE_CRASH_AT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process of crash_mid_operation_then_retry_with_same_key"]
async fn crash_child() {
    let Ok(root) = std::env::var("CRASH_ROOT") else {
        eprintln!(
            "crash_child runs only as the child of crash_mid_operation_then_retry_with_same_key"
        );
        return;
    };
    let kind: DriverKind = std::env::var("CRASH_DRIVER").unwrap().parse().unwrap();
    let e = Engine::open(EngineConfig {
        root: root.into(),
        driver: Some(kind),
        ..Default::default()
    })
    .await
    .unwrap();
    let req = crash_request(
        &std::env::var("CRASH_OP").unwrap(),
        &std::env::var("CRASH_SOURCE").unwrap(),
    );
    match req {
        CrashReq::Timeline(r) => {
            let t = e.create_timeline(r).await.unwrap();
            wait_timeline_ready(&e, &t.id, WAIT).await.unwrap();
        }
        CrashReq::Snapshot(r) => {
            let s = e.create_snapshot(r).await.unwrap();
            wait_snapshot_ready(&e, &s.id, WAIT).await.unwrap();
        }
        CrashReq::Replica(r) => {
            e.create_replica(r).await.unwrap();
        }
    }
    // Reaching here means the crash point was never hit.
    std::process::exit(3);
}

enum CrashReq {
    Timeline(CreateTimeline),
    Snapshot(CreateSnapshot),
    Replica(CreateReplica),
}

fn crash_request(op: &str, source: &str) -> CrashReq {
    let src = TimelineId::new(source).unwrap();
    let (kind, arg) = op.split_once(':').unwrap();
    let tl = |source| {
        CrashReq::Timeline(CreateTimeline {
            key: key(&format!("crash-{}", kind)),
            source,
            source_connection: None,
            label: None,
        })
    };
    match kind {
        "empty" => tl(Source::Empty {
            superuser_password: Some(Password(PW.into())),
        }),
        "head" => tl(Source::Timeline {
            timeline: src,
            point: Point::Head,
        }),
        "lsn" => tl(Source::Timeline {
            timeline: src,
            point: Point::Lsn(arg.parse().unwrap()),
        }),
        "snapshot" => CrashReq::Snapshot(CreateSnapshot {
            key: key("crash-snapshot"),
            timeline: src,
            point: Point::Head,
            source_connection: None,
            label: None,
        }),
        "replica" => CrashReq::Replica(CreateReplica {
            timeline: src,
            ordinal: 0,
            source_connection: None,
        }),
        _ => panic!("unknown op {op}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_operation_then_retry_with_same_key() {
    use std::os::unix::process::ExitStatusExt;
    for v in volumes("crash") {
        eprintln!("driver {}", v.kind);
        let e = open(&v).await;
        let root = root_timeline(&e, "root").await;
        let p = e.start_postgres(&root, free_port()).await.unwrap();
        sql(
            &p,
            "CREATE TABLE t (id int primary key); INSERT INTO t SELECT generate_series(1, 5)",
        )
        .await;
        let lsn5: Lsn = one_str(&p, "SELECT pg_current_wal_lsn()::text")
            .await
            .parse()
            .unwrap();
        sql(&p, "INSERT INTO t SELECT generate_series(6, 10)").await;
        p.stop(StopMode::Fast).await.unwrap(); // archives everything
        drop(e);

        let cases = [
            ("empty:", "initdb", None),
            ("head:", "copying the source", Some(10)),
            ("head:", "keeping a base copy", Some(10)),
            (&*format!("lsn:{lsn5}"), "replaying WAL", Some(5)),
            (&*format!("lsn:{lsn5}"), "private server running", Some(5)),
            ("snapshot:", "copying the source", Some(10)),
            ("replica:", "configuring the replica", Some(10)),
        ];
        for (op, step, rows) in cases {
            eprintln!("crash during {op} at {step:?}");
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--ignored",
                    "--exact",
                    "crash_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("CRASH_ROOT", &v.root)
                .env("CRASH_DRIVER", v.kind.to_string())
                .env("CRASH_OP", op)
                .env("CRASH_SOURCE", root.as_str())
                .env("PGBRANCH_ENGINE_CRASH_AT", step)
                .status()
                .unwrap();
            assert_eq!(
                status.signal(),
                Some(9),
                "engine was not killed at {step:?}: {status:?}"
            );
            // No server of the dead engine is left running on the volume.
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(
                postgres_processes_under(&v.root),
                0,
                "a postgres outlived the engine"
            );

            // Restart: unfinished work is cleaned up and resumed (or waits
            // for the same key), and a retry with the same key works.
            let e = open(&v).await;
            assert!(std::fs::read_dir(v.root.join("tmp"))
                .unwrap()
                .next()
                .is_none());
            match crash_request(op, root.as_str()) {
                CrashReq::Timeline(r) => {
                    let before = e.list_timelines().await.unwrap().len();
                    let t = e.create_timeline(r.clone()).await.unwrap();
                    let t = wait_timeline_ready(&e, &t.id, WAIT).await.unwrap();
                    let again = e.create_timeline(r).await.unwrap();
                    assert_eq!(again.id, t.id);
                    assert_eq!(e.list_timelines().await.unwrap().len(), before);
                    let s = e.start_postgres(&t.id, free_port()).await.unwrap();
                    match rows {
                        Some(n) => assert_eq!(ids(&s).await, (1..=n).collect::<Vec<_>>()),
                        None => {
                            assert_eq!(one_str(&s, "SELECT current_user::text").await, "postgres")
                        }
                    }
                    s.stop(StopMode::Fast).await.unwrap();
                    e.delete_timeline(&t.id).await.unwrap();
                }
                CrashReq::Snapshot(r) => {
                    let before = e.list_snapshots().await.unwrap().len();
                    let s = e.create_snapshot(r.clone()).await.unwrap();
                    let s = wait_snapshot_ready(&e, &s.id, WAIT).await.unwrap();
                    assert_eq!(e.create_snapshot(r).await.unwrap().id, s.id);
                    assert_eq!(e.list_snapshots().await.unwrap().len(), before);
                    e.delete_snapshot(&s.id).await.unwrap();
                }
                CrashReq::Replica(r) => {
                    // The half-made replica is gone, directory and all.
                    assert!(e.list_replicas(&root).await.unwrap().is_empty());
                    let dir = v.root.join(format!("timelines/{root}/replicas/0"));
                    assert!(!dir.exists(), "{} survived the restart", dir.display());
                    let made = e.create_replica(r.clone()).await.unwrap();
                    assert_eq!(made.state, State::Ready);
                    assert!(v.root.join(&made.data_path).join("standby.signal").exists());
                    assert_eq!(e.create_replica(r).await.unwrap(), made);
                    assert_eq!(e.list_replicas(&root).await.unwrap().len(), 1);
                    e.delete_replica(&root, 0).await.unwrap();
                }
            }
        }
    }
}

/// Number of running processes whose command line mentions `dir`.
fn postgres_processes_under(dir: &std::path::Path) -> usize {
    let needle = dir.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("postgres") && c.contains(&needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_archive_is_an_invalid_point_not_a_wrong_copy() {
    let v = volumes("damaged_archive").remove(0);
    let e = open(&v).await;
    let root = root_timeline(&e, "root").await;
    let p = e.start_postgres(&root, free_port()).await.unwrap();
    sql(
        &p,
        "CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1)",
    )
    .await;
    sql(&p, "SELECT pg_switch_wal()").await;
    sql(&p, "INSERT INTO t VALUES (2)").await;
    let lsn: Lsn = one_str(&p, "SELECT pg_current_wal_lsn()::text")
        .await
        .parse()
        .unwrap();
    p.stop(StopMode::Fast).await.unwrap(); // archives everything
    let w = e.get_timeline(&root).await.unwrap().restore_window.unwrap();
    assert!(w.newest.lsn >= lsn, "{w}");
    // Lose the first archived segment: replay cannot reach the point.
    let wal = v.root.join("wal").join(root.as_str());
    let mut segs: Vec<_> = std::fs::read_dir(&wal)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.len() == 24)
        .collect();
    segs.sort();
    std::fs::remove_file(wal.join(&segs[0])).unwrap();
    let err = branch(&e, "damaged", &root, Point::Lsn(lsn), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::InvalidPoint { .. }), "{err}");
    // The failed attempt left nothing behind but its record.
    let failed: Vec<_> = e
        .list_timelines()
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.state == State::Failed)
        .collect();
    assert_eq!(failed.len(), 1);
    assert!(!e.data_dir(&failed[0].id).exists());
    e.delete_timeline(&failed[0].id).await.unwrap();
}

/// Several backup-mode head copies of one running server at once, while it
/// writes, checkpoints and switches WAL: every copy must start. Each
/// backup's start checkpoint (or a timed one) may recycle WAL segments
/// another copy still holds in an older state; the engine refills those
/// from the archive (seen failing with "WAL ends before end of online
/// backup" before that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_head_copies_under_checkpoints_all_start() {
    for v in volumes("concurrent_head_copies") {
        eprintln!("driver {}", v.kind);
        let e = open(&v).await;
        let root = root_timeline(&e, "root").await;
        let p = e.start_postgres(&root, free_port()).await.unwrap();
        sql(
            &p,
            "CREATE TABLE t (id int primary key); INSERT INTO t SELECT generate_series(1, 1000);",
        )
        .await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let c = p.connect("postgres").await.unwrap();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut n = 1000;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let q = format!(
                        "INSERT INTO t SELECT generate_series({n}*100, {n}*100+99); CHECKPOINT; SELECT pg_switch_wal();"
                    );
                    if c.batch_execute(&q).await.is_err() {
                        break;
                    }
                }
            })
        };
        let copies = futures::future::join_all(
            ["c1", "c2", "c3"]
                .into_iter()
                .map(|k| branch(&e, k, &root, Point::Head, Some(conn(&p)))),
        )
        .await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.await.unwrap();
        for (i, c) in copies.into_iter().enumerate() {
            let id = c.unwrap_or_else(|err| panic!("copy {i} failed: {err}"));
            let s = e.start_postgres(&id, free_port()).await.unwrap();
            let rows = ids(&s).await;
            assert!(rows.len() >= 1000, "copy {i} lost committed rows");
            assert_eq!(&rows[..1000], &(1..=1000).collect::<Vec<_>>()[..]);
            s.stop(StopMode::Fast).await.unwrap();
        }
        p.stop(StopMode::Immediate).await.unwrap();
    }
}

/// The LSN where the replay that made a timeline started ("redo starts at
/// X" in the log of the engine's private server).
fn replay_started_at(e: &Engine, id: &TimelineId) -> Lsn {
    let log = e.data_dir(id).parent().unwrap().join("engine.log");
    let text = std::fs::read_to_string(&log).unwrap();
    text.lines()
        .rev()
        .filter_map(|l| l.split("redo starts at ").nth(1))
        .filter_map(|l| l.split_whitespace().next())
        .find_map(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("no replay in {}: {text}", log.display()))
}

/// Deletes a timeline, retrying while the base roller works on it (`Busy`
/// is the engine's "retry": the operator does the same).
async fn delete_when_free(e: &Engine, id: &TimelineId) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        match e.delete_timeline(id).await {
            Ok(()) => return,
            Err(StorageError::Busy { message }) if std::time::Instant::now() < deadline => {
                eprintln!("delete {id}: {message}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => panic!("deleting {id}: {err}"),
        }
    }
}

/// Rolled bases (the engine's background replay of a timeline's archive
/// onto a newer base) keep point-in-time copies exact, make later points
/// start from them instead of the creation base, are pruned to the newest
/// few, survive a restart, and go with their timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_bases_keep_point_in_time_copies_exact_and_short() {
    for v in volumes("rolled_bases") {
        eprintln!("driver {}", v.kind);
        let cfg = EngineConfig {
            root: v.root.clone(),
            driver: Some(v.kind),
            base_roll_wal_bytes: Some(1),
            base_roll_check: Some(Duration::from_millis(200)),
            base_roll_keep: Some(2),
            ..Default::default()
        };
        let e = Engine::open(cfg.clone()).await.unwrap();
        let root = root_timeline(&e, "root").await;
        let bases_dir = v.root.join("timelines").join(root.as_str()).join("bases");
        let rolled = || -> Vec<Lsn> {
            let mut l: Vec<Lsn> = std::fs::read_dir(&bases_dir)
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|d| {
                            u64::from_str_radix(&d.file_name().to_string_lossy(), 16).ok()
                        })
                        .map(Lsn)
                        .collect()
                })
                .unwrap_or_default();
            l.sort();
            l
        };
        let p = e.start_postgres(&root, free_port()).await.unwrap();
        sql(&p, "CREATE TABLE t (id int primary key)").await;
        // Four batches of ten rows; after each, its LSN, then the segment
        // is archived and a base rolled past it.
        let mut lsns = Vec::new();
        for b in 0..4 {
            sql(
                &p,
                &format!(
                    "INSERT INTO t SELECT generate_series({}, {})",
                    b * 10 + 1,
                    b * 10 + 10
                ),
            )
            .await;
            let l: Lsn = one_str(&p, "SELECT pg_current_wal_lsn()::text")
                .await
                .parse()
                .unwrap();
            lsns.push(l);
            // A rolled base restarts replay at the newest checkpoint before
            // its point (restartpoints happen only at checkpoint records):
            // a checkpoint stands for the server's timed ones.
            sql(&p, "CHECKPOINT").await;
            sql(&p, "SELECT pg_switch_wal()").await;
            let deadline = std::time::Instant::now() + Duration::from_secs(90);
            while !rolled().iter().any(|r| *r >= l) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no base rolled past {l}: {:?}",
                    rolled()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Pruned to the newest two (a pruned directory goes a pass later).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while rolled().len() > 2 {
            assert!(std::time::Instant::now() < deadline, "{:?}", rolled());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let kept = rolled();
        assert!(
            kept[0] > lsns[1],
            "the newest two are kept: {kept:?} {lsns:?}"
        );

        // Exact rows at every batch's LSN: the first ones replay from the
        // creation base, the last from a rolled one (its replay starts at
        // the checkpoint after the third batch).
        for (i, l) in lsns.iter().enumerate() {
            let (b, rows) = rows_at(&e, &format!("at-{i}"), &root, Point::Lsn(*l)).await;
            let want: Vec<i32> = (1..=(i as i32 + 1) * 10).collect();
            assert_eq!(rows, want, "rows at batch {i} ({l})");
            let from = replay_started_at(&e, &b);
            if i == 3 {
                assert!(
                    from >= lsns[2],
                    "batch 3 replayed from {from}, not from a rolled base past {}",
                    lsns[2]
                );
            }
            if i == 0 {
                assert!(from < lsns[0], "batch 0 replayed from {from}");
            }
            delete_when_free(&e, &b).await;
        }
        // A time after the last batch: all forty rows.
        let now = jiff::Timestamp::now();
        p.stop(StopMode::Fast).await.unwrap();
        let (b, rows) = rows_at(&e, "at-time", &root, Point::Timestamp(now)).await;
        assert_eq!(rows, (1..=40).collect::<Vec<_>>());
        delete_when_free(&e, &b).await;

        // A restart keeps the rolled bases usable.
        drop(e);
        let e = Engine::open(cfg).await.unwrap();
        let (b, rows) = rows_at(&e, "after-restart", &root, Point::Lsn(lsns[3])).await;
        assert_eq!(rows, (1..=40).collect::<Vec<_>>());
        delete_when_free(&e, &b).await;

        // Deleting the timeline gives every base back.
        delete_when_free(&e, &root).await;
        assert!(!bases_dir.exists());
        let left: Vec<_> = std::fs::read_dir(v.root.join("timelines"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "space not given back: {left:?}");
    }
}

/// The child of `a_roll_killed_before_keeping_its_base_heals`: rolls the
/// bases of the volume in `ROLL_CRASH_ROOT` and is killed on the way
/// (`PGBRANCH_ENGINE_CRASH_AT`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process of a_roll_killed_before_keeping_its_base_heals"]
async fn roll_crash_child() {
    let Ok(root) = std::env::var("ROLL_CRASH_ROOT") else {
        return;
    };
    let kind: DriverKind = std::env::var("ROLL_CRASH_DRIVER").unwrap().parse().unwrap();
    let e = Engine::open(EngineConfig {
        root: root.into(),
        driver: Some(kind),
        base_roll_wal_bytes: Some(1),
        base_roll_check: Some(Duration::from_secs(3600)),
        ..Default::default()
    })
    .await
    .unwrap();
    e.roll_bases_now().await;
    // Reaching here means the crash point was never hit.
    std::process::exit(3);
}

/// An engine killed after copying a rolled base but before recording it
/// leaves a directory without metadata: the next engine deletes it and
/// rolls again, and point-in-time copies stay exact throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roll_killed_before_keeping_its_base_heals() {
    use std::os::unix::process::ExitStatusExt;
    for v in volumes("roll_crash") {
        eprintln!("driver {}", v.kind);
        let quiet = EngineConfig {
            root: v.root.clone(),
            driver: Some(v.kind),
            base_roll_wal_bytes: Some(0),
            ..Default::default()
        };
        let e = Engine::open(quiet).await.unwrap();
        let root = root_timeline(&e, "root").await;
        let p = e.start_postgres(&root, free_port()).await.unwrap();
        sql(
            &p,
            "CREATE TABLE t (id int primary key); INSERT INTO t SELECT generate_series(1, 5)",
        )
        .await;
        let lsn5: Lsn = one_str(&p, "SELECT pg_current_wal_lsn()::text")
            .await
            .parse()
            .unwrap();
        sql(
            &p,
            "CHECKPOINT; INSERT INTO t SELECT generate_series(6, 10)",
        )
        .await;
        let lsn10: Lsn = one_str(&p, "SELECT pg_current_wal_lsn()::text")
            .await
            .parse()
            .unwrap();
        p.stop(StopMode::Fast).await.unwrap(); // archives everything
        drop(e);

        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "roll_crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("ROLL_CRASH_ROOT", &v.root)
            .env("ROLL_CRASH_DRIVER", v.kind.to_string())
            .env("PGBRANCH_ENGINE_CRASH_AT", "keeping a rolled base")
            .status()
            .unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "the roll was not killed: {status:?}"
        );
        let bases_dir = v.root.join("timelines").join(root.as_str()).join("bases");
        let left: Vec<_> = std::fs::read_dir(&bases_dir).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "the killed roll left its copy: {left:?}");

        // Rows are exact before anything is healed...
        let e = Engine::open(EngineConfig {
            root: v.root.clone(),
            driver: Some(v.kind),
            base_roll_wal_bytes: Some(1),
            base_roll_check: Some(Duration::from_secs(3600)),
            ..Default::default()
        })
        .await
        .unwrap();
        for (k, l, n) in [("at-5", lsn5, 5), ("at-10", lsn10, 10)] {
            let (b, rows) = rows_at(&e, k, &root, Point::Lsn(l)).await;
            assert_eq!(rows, (1..=n).collect::<Vec<_>>(), "rows at {l}");
            e.delete_timeline(&b).await.unwrap();
        }
        // ...and after a pass: the base is rolled again and kept, once.
        e.roll_bases_now().await;
        let kept: Vec<_> = std::fs::read_dir(&bases_dir).unwrap().flatten().collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        let (b, rows) = rows_at(&e, "at-10-again", &root, Point::Lsn(lsn10)).await;
        assert_eq!(rows, (1..=10).collect::<Vec<_>>());
        e.delete_timeline(&b).await.unwrap();
        e.delete_timeline(&root).await.unwrap();
    }
}
