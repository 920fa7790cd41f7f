//! Crash safety of the storage service: the real `pgbranch storage serve`
//! binary is SIGKILLed while an operation of each kind is under way
//! (branch at head, branch at a timestamp, snapshot, delete), restarted on
//! the same data directory, and must show a consistent state (nothing
//! half-made shown as Ready, nothing left that blocks) and complete the
//! same call with the same key.
//!
//! Setup and checks that need a running compute use the engine in-process
//! while no server runs on the directory.

#[path = "storage_http_support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pgbranch::storage::engine::{Engine, StopMode};
use pgbranch::storage::http::HttpStorage;
use pgbranch::storage::*;
use support::*;

/// Rows in the big table: ~1 KiB each, so copies and replays take a
/// moment and the kill lands mid-way.
const BIG_ROWS: i64 = 120_000;

/// Kills, at the end of a test (also on panic), any postgres left running
/// on data directories under the test's dir (a compute or a recovery the
/// killed server had started).
struct StrayPostgresGuard(PathBuf);

impl Drop for StrayPostgresGuard {
    fn drop(&mut self) {
        for pid in postgres_pids_under(&self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// postmaster processes whose `-D` lies under `dir`.
fn postgres_pids_under(dir: &Path) -> Vec<i32> {
    let dir = dir.to_string_lossy().to_string();
    let mut pids = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("postgres"))
            && args.iter().any(|a| a.starts_with(&dir))
        {
            pids.push(pid);
        }
    }
    pids
}

struct Setup {
    dir: TestDir,
    data: PathBuf,
    token_file: PathBuf,
    _guard: StrayPostgresGuard,
    root: TimelineId,
    /// A time between the marker rows (included) and the late rows.
    between: jiff::Timestamp,
}

/// Runs `f` with the engine in-process on `data`, in a runtime of its own
/// that is dropped afterwards, so nothing of this engine outlives it.
fn with_engine<T: Send + 'static>(
    data: &Path,
    f: impl for<'a> FnOnce(&'a Engine) -> futures::future::BoxFuture<'a, T> + Send + 'static,
) -> T {
    let data = data.to_path_buf();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let out = rt.block_on(async move {
            let engine = Engine::open(engine_config(&data, DriverKind::Copy))
                .await
                .unwrap();
            f(&engine).await
        });
        rt.shutdown_timeout(Duration::from_secs(10));
        out
    })
    .join()
    .unwrap()
}

/// A root timeline with `marker` (100 rows), then `big` (~120 MB), a time
/// taken, then `late` (10 rows), WAL switched so all of it is archived.
fn setup() -> Setup {
    let dir = temp_dir_in(None);
    let data = dir.path().join("volume");
    std::fs::create_dir(&data).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let guard = StrayPostgresGuard(dir.path().to_path_buf());
    let (root, between) = with_engine(&data, |engine| {
        Box::pin(async move {
            let s: &dyn Storage = engine;
            let root = create_ready_timeline(s, "root", empty_source())
                .await
                .unwrap();
            let port = free_port();
            let pg = engine.start_postgres(&root.id, port).await.unwrap();
            let c = connect(port).await;
            c.batch_execute(&format!(
                "CREATE TABLE marker (i int);
                 INSERT INTO marker SELECT generate_series(1, 100);
                 CREATE TABLE big (i int, pad text);
                 INSERT INTO big SELECT g, repeat('x', 1000) FROM generate_series(1, {BIG_ROWS}) g;"
            ))
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let between = jiff::Timestamp::now();
            tokio::time::sleep(Duration::from_millis(1100)).await;
            c.batch_execute(
                "CREATE TABLE late (i int); INSERT INTO late SELECT generate_series(1, 10);
                 SELECT pg_switch_wal();",
            )
            .await
            .unwrap();
            drop(c);
            pg.stop(StopMode::Fast).await.unwrap();
            (root.id, between)
        })
    });
    Setup {
        dir,
        data,
        token_file,
        _guard: guard,
        root,
        between,
    }
}

/// Polls `get` every 10 ms until `classify` says the operation is under
/// way (`Some(true)`: kill now) or already over (`Some(false)`), at most
/// 60 s; returns whether it was caught under way.
async fn poll_until<T: std::fmt::Debug>(
    mut get: impl AsyncFnMut() -> Result<T, StorageError>,
    classify: impl Fn(&T) -> Option<bool>,
) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let x = get().await.unwrap_or_else(|e| panic!("polling: {e}"));
        if let Some(under_way) = classify(&x) {
            return under_way;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("operation neither started nor finished in 60 s");
}

/// Creating with a progress step reported: the engine is at work.
fn timeline_under_way(t: &Timeline) -> Option<bool> {
    match t.state {
        State::Creating if t.progress.is_some() => Some(true),
        State::Creating => None,
        _ => Some(false),
    }
}

/// Row counts of a timeline, read by a compute the in-process engine starts
/// (no server running on the directory). `None` for a missing table.
fn counts(data: &Path, id: &TimelineId) -> Vec<Option<i64>> {
    let id = id.clone();
    with_engine(data, move |engine| {
        Box::pin(async move {
            let port = free_port();
            let pg = engine.start_postgres(&id, port).await.unwrap();
            let c = connect(port).await;
            let mut out = Vec::new();
            for t in ["marker", "big", "late"] {
                let exists: bool = c
                    .query_one("SELECT to_regclass($1) IS NOT NULL", &[&t])
                    .await
                    .unwrap()
                    .get(0);
                out.push(if exists {
                    Some(count_rows(&c, t).await)
                } else {
                    None
                });
            }
            drop(c);
            pg.stop(StopMode::Fast).await.unwrap();
            out
        })
    })
}

/// Directory entries under `<volume>/<sub>/` (timelines or snapshots).
fn entries(data: &Path, sub: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(data.join(sub))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// After a restart: whatever the state of `id`, it is not Ready unless
/// complete, and only known objects hold directories.
async fn check_consistent(s: &HttpStorage, data: &Path) {
    let tls = s.list_timelines().await.unwrap();
    let ids: Vec<String> = tls.iter().map(|t| t.id.to_string()).collect();
    for e in entries(data, "timelines") {
        assert!(
            ids.contains(&e),
            "timelines/{e} on disk is no timeline: {tls:?}"
        );
    }
    let snaps = s.list_snapshots().await.unwrap();
    let sids: Vec<String> = snaps.iter().map(|t| t.id.to_string()).collect();
    for e in entries(data, "snapshots") {
        assert!(
            sids.contains(&e),
            "snapshots/{e} on disk is no snapshot: {snaps:?}"
        );
    }
}

fn create_req(k: &str, source: Source) -> CreateTimeline {
    CreateTimeline {
        key: key(k),
        source,
        source_connection: None,
        label: None,
    }
}

/// Kills the server mid-branch, restarts, retries with the same key; the
/// branch ends Ready exactly once with `expect` row counts.
async fn crash_during_branch(point_of: fn(&Setup) -> Point, expect: Vec<Option<i64>>) {
    let su = tokio::task::spawn_blocking(setup).await.unwrap();
    let logs = su.dir.path();
    let req = create_req(
        "branch-uid",
        Source::Timeline {
            timeline: su.root.clone(),
            point: point_of(&su),
        },
    );

    let srv = Serve::start(&su.data, logs, Some(&su.token_file)).await;
    let t = srv.client.create_timeline(req.clone()).await.unwrap();
    let id = t.id.clone();
    let c = srv.client.clone();
    let mid = poll_until(async || c.get_timeline(&id).await, timeline_under_way).await;
    srv.sigkill().await;
    eprintln!(
        "killed {} the branch was done",
        if mid { "before" } else { "after" }
    );

    let srv = Serve::start(&su.data, logs, Some(&su.token_file)).await;
    // Whatever the engine did on restart, a Ready timeline must be whole;
    // the retry with the same key gives the same timeline.
    check_consistent(&srv.client, &su.data).await;
    let again = srv.client.create_timeline(req.clone()).await.unwrap();
    assert_eq!(again.id, id, "the retry made a second timeline");
    let ready = pgbranch::storage::wait::wait_timeline_ready(&srv.client, &id, READY_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(ready.state, State::Ready);
    let same_key: Vec<Timeline> = srv
        .client
        .list_timelines()
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.key == req.key)
        .collect();
    assert_eq!(same_key.len(), 1, "{same_key:?}");
    check_consistent(&srv.client, &su.data).await;
    srv.stop().await;

    assert_eq!(counts(&su.data, &id), expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_branch_at_head() {
    crash_during_branch(|_| Point::Head, vec![Some(100), Some(BIG_ROWS), Some(10)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_branch_at_timestamp() {
    // Every transaction committed by `between`: marker and big, not late.
    crash_during_branch(
        |su| Point::Timestamp(su.between),
        vec![Some(100), Some(BIG_ROWS), None],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_snapshot() {
    let su = tokio::task::spawn_blocking(setup).await.unwrap();
    let logs = su.dir.path();
    let req = CreateSnapshot {
        key: key("snap-uid"),
        timeline: su.root.clone(),
        point: Point::Head,
        source_connection: None,
        label: None,
    };
    let srv = Serve::start(&su.data, logs, Some(&su.token_file)).await;
    let snap = srv.client.create_snapshot(req.clone()).await.unwrap();
    let id = snap.id.clone();
    let c = srv.client.clone();
    let mid = poll_until(
        async || c.get_snapshot(&id).await,
        |s| match s.state {
            State::Creating if s.progress.is_some() => Some(true),
            State::Creating => None,
            _ => Some(false),
        },
    )
    .await;
    srv.sigkill().await;
    eprintln!(
        "killed {} the snapshot was done",
        if mid { "before" } else { "after" }
    );

    let srv = Serve::start(&su.data, logs, Some(&su.token_file)).await;
    check_consistent(&srv.client, &su.data).await;
    let again = srv.client.create_snapshot(req.clone()).await.unwrap();
    assert_eq!(again.id, id);
    pgbranch::storage::wait::wait_snapshot_ready(&srv.client, &id, READY_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(srv.client.list_snapshots().await.unwrap().len(), 1);
    // The snapshot is usable: a timeline from it holds all rows.
    let tl = srv
        .client
        .create_timeline(create_req(
            "from-snap",
            Source::Snapshot {
                snapshot: id.clone(),
            },
        ))
        .await
        .unwrap();
    pgbranch::storage::wait::wait_timeline_ready(&srv.client, &tl.id, READY_TIMEOUT)
        .await
        .unwrap();
    check_consistent(&srv.client, &su.data).await;
    srv.stop().await;
    assert_eq!(
        counts(&su.data, &tl.id),
        vec![Some(100), Some(BIG_ROWS), Some(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_delete() {
    let su = tokio::task::spawn_blocking(setup).await.unwrap();
    let logs = su.dir.path();
    // A branch to delete, and one that must survive.
    let srv = Serve::start(&su.data, logs, Some(&su.token_file)).await;
    let mut ids = Vec::new();
    for k in ["doomed", "survivor"] {
        let t = srv
            .client
            .create_timeline(create_req(
                k,
                Source::Timeline {
                    timeline: su.root.clone(),
                    point: Point::Head,
                },
            ))
            .await
            .unwrap();
        pgbranch::storage::wait::wait_timeline_ready(&srv.client, &t.id, READY_TIMEOUT)
            .await
            .unwrap();
        ids.push(t.id);
    }
    let (doomed, survivor) = (ids[0].clone(), ids[1].clone());
    srv.client.delete_timeline(&doomed).await.unwrap();
    let c = srv.client.clone();
    let mid = poll_until(
        async || {
            c.get_timeline(&doomed)
                .await
                .map(Some)
                .or_else(|e| match e {
                    StorageError::NotFound { .. } => Ok(None),
                    e => Err(e),
                })
        },
        |t| match t {
            Some(t) if t.state == State::Deleting => Some(true),
            Some(t) if t.state == State::Ready => None,
            _ => Some(false),
        },
    )
    .await;
    srv.sigkill().await;
    eprintln!(
        "killed {} the delete was done",
        if mid { "before" } else { "after" }
    );

    let srv = Serve::start(&su.data, logs, Some(&su.token_file)).await;
    check_consistent(&srv.client, &su.data).await;
    match srv.client.get_timeline(&doomed).await {
        Err(StorageError::NotFound { .. }) => {}
        Ok(t) => assert_ne!(t.state, State::Ready, "a deleted timeline came back Ready"),
        Err(e) => panic!("{e}"),
    }
    srv.client.delete_timeline(&doomed).await.unwrap();
    let start = Instant::now();
    loop {
        match srv.client.get_timeline(&doomed).await {
            Err(StorageError::NotFound { .. }) => break,
            Ok(t) if t.state == State::Deleting && start.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => panic!("after the retried delete: {other:?}"),
        }
    }
    assert!(
        !entries(&su.data, "timelines").contains(&doomed.to_string()),
        "the deleted timeline's directory is still there"
    );
    let s = srv.client.get_timeline(&survivor).await.unwrap();
    assert_eq!(s.state, State::Ready);
    check_consistent(&srv.client, &su.data).await;
    srv.stop().await;
    assert_eq!(
        counts(&su.data, &survivor),
        vec![Some(100), Some(BIG_ROWS), Some(10)]
    );
}
