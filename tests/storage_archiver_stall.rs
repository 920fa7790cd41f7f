//! A copy of a running source whose WAL archiving fails ends, after the
//! engine's deadline, in a failed timeline whose error names the
//! archiver's failure, instead of waiting in "copying the source" forever.
//! Real PostgreSQL, the embedded engine on the plain-copy driver (the one
//! that copies a running server in backup mode).

use std::time::Duration;

use pgbranch::storage::engine::{Engine, EngineConfig, StopMode};
use pgbranch::storage::wait::wait_timeline_ready;
use pgbranch::storage::{
    ConnInfo, CreateTimeline, DriverKind, OpKey, Password, Point, Source, State, Storage,
    ARCHIVING_FAILED,
};

const PW: &str = "test-secret-pw";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_source_that_cannot_archive_fails_naming_the_archiver() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(EngineConfig {
        root: dir.path().join("vol"),
        driver: Some(DriverKind::Copy),
        archive_wait: Some(Duration::from_secs(5)),
        ..Default::default()
    })
    .await
    .unwrap();
    let root = e
        .create_timeline(CreateTimeline {
            key: OpKey::new("root").unwrap(),
            source: Source::Empty {
                superuser_password: Some(Password(PW.into())),
            },
            source_connection: None,
            label: None,
        })
        .await
        .unwrap();
    let root = wait_timeline_ready(&e, &root.id, Duration::from_secs(120))
        .await
        .unwrap()
        .id;
    let p = e.start_postgres(&root, free_port()).await.unwrap();
    let c = p.connect("postgres").await.unwrap();
    c.batch_execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS id")
        .await
        .unwrap();
    // What a compute sees when its archive_command names a path that does
    // not exist where it runs: the archive directory is not there (a file
    // stands in its place, so nothing can create it either).
    let rel = e.get_timeline(&root).await.unwrap().wal_archive_path;
    let wal = dir.path().join("vol").canonicalize().unwrap().join(rel);
    let moved = dir.path().join("wal-moved");
    std::fs::rename(&wal, &moved).unwrap();
    std::fs::write(&wal, b"not a directory").unwrap();
    let t = e
        .create_timeline(CreateTimeline {
            key: OpKey::new("child").unwrap(),
            source: Source::Timeline {
                timeline: root.clone(),
                point: Point::Head,
            },
            source_connection: Some(ConnInfo {
                host: "127.0.0.1".into(),
                port: p.port,
                user: "postgres".into(),
                password: Some(Password(PW.into())),
                dbname: "postgres".into(),
            }),
            label: None,
        })
        .await
        .unwrap();
    // Without the deadline the copy never ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let failed = loop {
        let now = e.get_timeline(&t.id).await.unwrap();
        match now.state {
            State::Failed => break now,
            State::Creating => {}
            other => panic!("the copy ended {other:?}: {now:?}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the copy still waits for the archiver after 90 s: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let err = failed.error.unwrap_or_default();
    eprintln!("{err}");
    assert!(err.contains(ARCHIVING_FAILED), "{err}");
    assert!(err.contains(&wal.display().to_string()), "{err}");
    assert!(err.contains("failed") && err.contains("WAL file"), "{err}");

    // The source left backup mode and serves on; once its archiving works
    // again, the same copy succeeds.
    std::fs::remove_file(&wal).unwrap();
    std::fs::rename(&moved, &wal).unwrap();
    let c2 = p.connect("postgres").await.unwrap();
    let in_backup: bool = c2
        .query_one(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'client backend' AND state = 'active' AND query ILIKE '%pg_backup_stop%' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!in_backup, "pg_backup_stop still waits on the source");
    let t2 = e
        .create_timeline(CreateTimeline {
            key: OpKey::new("child-2").unwrap(),
            source: Source::Timeline {
                timeline: root.clone(),
                point: Point::Head,
            },
            source_connection: Some(ConnInfo {
                host: "127.0.0.1".into(),
                port: p.port,
                user: "postgres".into(),
                password: Some(Password(PW.into())),
                dbname: "postgres".into(),
            }),
            label: None,
        })
        .await
        .unwrap();
    wait_timeline_ready(&e, &t2.id, Duration::from_secs(120))
        .await
        .unwrap();
    drop(c);
    p.stop(StopMode::Fast).await.unwrap();
}
