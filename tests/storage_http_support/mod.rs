//! Shared by the storage HTTP, conformance and crash tests: real engines on
//! temp dirs, a real HTTP server in front of one, real postgres servers.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pgbranch::storage::engine::{Engine, EngineConfig};
use pgbranch::storage::http::server::{self, Auth};
use pgbranch::storage::http::HttpStorage;
use pgbranch::storage::*;

pub const SUPERUSER_PASSWORD: &str = "conformance-pw";
pub const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// Copy-on-write drivers available here: `copy` always; `btrfs` and
/// `reflink` when the test volumes are mounted (else a printed notice).
pub fn drivers_to_test(test: &str) -> Vec<(DriverKind, Option<PathBuf>)> {
    let mut v = vec![(DriverKind::Copy, None)];
    for (kind, var) in [
        (DriverKind::Btrfs, "PGBRANCH_TEST_BTRFS"),
        (DriverKind::Reflink, "PGBRANCH_TEST_XFS"),
    ] {
        match std::env::var_os(var) {
            Some(p) => v.push((kind, Some(PathBuf::from(p)))),
            None => eprintln!("{test}: {var} not set: {kind} driver skipped"),
        }
    }
    v
}

/// A temp dir the `postgres` user can traverse.
pub fn temp_dir_in(parent: Option<&Path>) -> tempfile::TempDir {
    let d = match parent {
        Some(p) => tempfile::Builder::new()
            .prefix("pgbranch-test-")
            .tempdir_in(p)
            .unwrap(),
        None => tempfile::Builder::new()
            .prefix("pgbranch-test-")
            .tempdir()
            .unwrap(),
    };
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

pub fn engine_config(root: &Path, driver: DriverKind) -> EngineConfig {
    EngineConfig {
        root: root.to_path_buf(),
        driver: Some(driver),
        ..EngineConfig::default()
    }
}

/// A real HTTP server (the production router) on 127.0.0.1:0, stopped on
/// drop.
pub struct ServerGuard {
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerGuard {
    pub async fn start(storage: Arc<dyn Storage>, auth: Auth) -> ServerGuard {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server::serve(listener, storage, auth, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        ServerGuard {
            addr,
            stop: Some(tx),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

/// One storage under test: the engine itself, or an HTTP client of a server
/// over that engine. `engine` is kept for what is not in the trait
/// (starting a compute).
pub struct Backend {
    pub name: String,
    pub storage: Arc<dyn Storage>,
    pub engine: Engine,
    pub server: Option<ServerGuard>,
    pub dir: tempfile::TempDir,
}

pub const TOKEN: &str = "test-token-0123456789";

impl Backend {
    pub async fn new(driver: DriverKind, parent: Option<&Path>, http: bool) -> Backend {
        let dir = temp_dir_in(parent);
        let engine = Engine::open(engine_config(dir.path(), driver))
            .await
            .unwrap();
        let (storage, server, name): (Arc<dyn Storage>, _, _) = if http {
            let srv =
                ServerGuard::start(Arc::new(engine.clone()), Auth::token(TOKEN).unwrap()).await;
            let client = HttpStorage::new(&srv.url(), Some(TOKEN.to_string())).unwrap();
            (Arc::new(client), Some(srv), format!("{driver}+http"))
        } else {
            (Arc::new(engine.clone()), None, format!("{driver}+embedded"))
        };
        Backend {
            name,
            storage,
            engine,
            server,
            dir,
        }
    }
}

pub fn key(s: &str) -> OpKey {
    OpKey::new(s).unwrap()
}

pub fn empty_source() -> Source {
    Source::Empty {
        superuser_password: Some(Password(SUPERUSER_PASSWORD.into())),
    }
}

pub async fn create_ready_timeline(
    s: &dyn Storage,
    k: &str,
    source: Source,
) -> Result<Timeline, StorageError> {
    let t = s
        .create_timeline(CreateTimeline {
            key: key(k),
            source,
            source_connection: None,
            label: Some(format!("test/{k}")),
        })
        .await?;
    pgbranch::storage::wait::wait_timeline_ready(s, &t.id, READY_TIMEOUT).await
}

pub async fn create_ready_snapshot(
    s: &dyn Storage,
    k: &str,
    timeline: &TimelineId,
    point: Point,
) -> Result<Snapshot, StorageError> {
    let snap = s
        .create_snapshot(CreateSnapshot {
            key: key(k),
            timeline: timeline.clone(),
            point,
            source_connection: None,
            label: None,
        })
        .await?;
    pgbranch::storage::wait::wait_snapshot_ready(s, &snap.id, READY_TIMEOUT).await
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A client session to a compute started by the engine.
pub async fn connect(port: u16) -> tokio_postgres::Client {
    let mut last = None;
    for _ in 0..100 {
        match tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(port)
            .user("postgres")
            .password(SUPERUSER_PASSWORD)
            .dbname("postgres")
            .connect(tokio_postgres::NoTls)
            .await
        {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                return client;
            }
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("cannot connect to postgres on port {port}: {last:?}");
}

pub async fn count_rows(c: &tokio_postgres::Client, table: &str) -> i64 {
    c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}
