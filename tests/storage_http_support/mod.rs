//! Shared by the storage HTTP, conformance and crash tests: real engines on
//! temp dirs, a real HTTP server in front of one, real postgres servers.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

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

/// A temp dir removed on drop, btrfs subvolumes inside it included (a
/// plain recursive remove cannot remove those).
pub struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    pub fn path(&self) -> &Path {
        self.0
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("/nonexistent"))
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let Some(d) = self.0.take() else { return };
        delete_subvolumes(d.path());
        drop(d);
    }
}

/// Deletes every btrfs subvolume under `dir`, deepest first.
fn delete_subvolumes(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let mut subvols: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_dir())
        .filter(|e| e.metadata().map(|m| m.ino() == 256).unwrap_or(false))
        .map(|e| e.into_path())
        .collect();
    subvols.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for sv in subvols {
        let _ = std::process::Command::new("btrfs")
            .args(["subvolume", "delete"])
            .arg(&sv)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A temp dir the `postgres` user can traverse.
pub fn temp_dir_in(parent: Option<&Path>) -> TestDir {
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
    TestDir(Some(d))
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
    pub dir: TestDir,
}

pub const TOKEN: &str = "test-token-0123456789";
pub const TOKEN_ENV: &str = "PGBRANCH_STORAGE_TOKEN";

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

/// A running `pgbranch storage serve`, SIGKILLed on drop.
pub struct Serve {
    pub child: tokio::process::Child,
    pub client: HttpStorage,
}

impl Serve {
    /// Starts the binary on `data` (copy driver), logging to
    /// `logs/serve.log`; the token comes from `token_file`, else from the
    /// environment variable.
    pub async fn start(data: &Path, logs: &Path, token_file: Option<&Path>) -> Serve {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join("serve.log"))
            .unwrap();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgbranch"));
        cmd.args(["storage", "serve"]);
        match token_file {
            Some(f) => {
                cmd.arg("--token-file").arg(f).env_remove(TOKEN_ENV);
            }
            None => {
                cmd.env(TOKEN_ENV, TOKEN);
            }
        }
        let mut child = cmd
            .args(["--listen", "127.0.0.1:0", "--driver", "copy"])
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .expect("server did not start in 120 s")
            .unwrap()
            .unwrap_or_else(|| {
                panic!(
                    "server exited: {}",
                    std::fs::read_to_string(logs.join("serve.log")).unwrap_or_default()
                )
            });
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let client = HttpStorage::new(&format!("http://{addr}"), Some(TOKEN.into())).unwrap();
        Serve { child, client }
    }

    pub async fn sigkill(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id().unwrap() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let st = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("server did not stop on SIGTERM")
            .unwrap();
        assert!(st.success(), "server exit status after SIGTERM: {st}");
    }
}
