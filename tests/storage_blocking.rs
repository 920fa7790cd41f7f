//! The storage server keeps answering while the engine waits on blocking
//! work. The engine's file-system walks, process waits and SQLite calls
//! run on tokio's blocking pool; one on a runtime thread would hold up
//! every request scheduled there. The server here runs on a runtime with a
//! single worker thread, and the engine waits for its metadata store,
//! whose write lock another process holds.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pgbranch::storage::engine::{Engine, EngineConfig};
use pgbranch::storage::http::server::{router, Auth};
use pgbranch::storage::wait::wait_timeline_ready;
use pgbranch::storage::{CreateTimeline, DriverKind, OpKey, Source, Storage, StorageError};

/// `GET path` over plain HTTP/1.1 from this (non-runtime) thread: the
/// response body.
fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

#[test]
fn health_check_answers_while_a_delete_waits_for_the_metadata_store() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("vol");
    let (engine, id, addr) = rt.block_on(async {
        let engine = Engine::open(EngineConfig {
            root: root.clone(),
            driver: Some(DriverKind::Copy),
            ..Default::default()
        })
        .await
        .unwrap();
        let t = engine
            .create_timeline(CreateTimeline {
                key: OpKey::new("blocking-delete").unwrap(),
                source: Source::Empty {
                    superuser_password: None,
                },
                source_connection: None,
                label: None,
            })
            .await
            .unwrap();
        wait_timeline_ready(&engine, &t.id, Duration::from_secs(180))
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(Arc::new(engine.clone()), Auth::Disabled);
        tokio::spawn(async move { axum::serve(listener, app).await });
        (engine, t.id, addr)
    });
    assert_eq!(get(addr, "/healthz"), "ok");

    // Another process takes the store's write lock: the delete's first
    // write waits for it (SQLite retries for up to 5 s, then fails).
    let lock = rusqlite::Connection::open(root.join("meta.sqlite")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let delete = rt.spawn({
        let (e, id) = (engine.clone(), id.clone());
        async move { e.delete_timeline(&id).await }
    });
    // Give the delete time to reach that write.
    std::thread::sleep(Duration::from_millis(500));

    // The health check answers while the delete still waits: had the wait
    // taken the only worker thread, the answer would come only once the
    // delete gave up on the lock.
    assert_eq!(get(addr, "/healthz"), "ok");
    assert!(
        !delete.is_finished(),
        "the delete should still be waiting for the lock"
    );
    lock.execute_batch("ROLLBACK").unwrap();
    rt.block_on(delete)
        .unwrap()
        .expect("the delete goes through once the lock is free");
    let gone = rt.block_on(engine.get_timeline(&id));
    assert!(
        matches!(gone, Err(StorageError::NotFound { .. })),
        "{gone:?}"
    );
}
