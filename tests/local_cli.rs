//! `pgbranch local` end to end: the real binary, its daemon, real
//! PostgreSQL computes, real clients on the branches' fixed ports.
//!
//! The scenario runs in a temp dir (driver probed: `copy` on a filesystem
//! without copy-on-write) and again on the btrfs / XFS volumes named by
//! `PGBRANCH_TEST_BTRFS` / `PGBRANCH_TEST_XFS` when they are set (else
//! skipped with a notice).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_pgbranch");

/// One local directory with its daemon; dropping it stops the daemon and
/// any compute it left (also when the test panics).
struct Local {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Local {
    fn new(parent: Option<&Path>) -> Local {
        let (tmp, dir) = match parent {
            // Short names on the test volumes: the engine's archive_command
            // holds the volume path seven times and PostgreSQL cuts archive
            // commands at 1023 bytes (reported to the engine's owner).
            Some(p) => {
                let tmp = tempfile::Builder::new().prefix("l").tempdir_in(p).unwrap();
                let dir = tmp.path().join("d");
                (tmp, dir)
            }
            None => {
                let tmp = tempfile::tempdir().unwrap();
                let dir = tmp.path().join(".pgbranch");
                (tmp, dir)
            }
        };
        Local { _tmp: tmp, dir }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("local")
            .arg("--dir")
            .arg(&self.dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "`pgbranch local {}` failed:\nstdout: {stdout}\nstderr: {stderr}\ndaemon log: {}",
            args.join(" "),
            self.log_tail()
        );
        stdout
    }

    /// Runs a command with `--output json` and parses its answer.
    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    /// Runs a command that must fail; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "`pgbranch local {}` succeeded: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn branch(&self, name: &str) -> Value {
        let list = self.json(&["branch", "list"]);
        list.as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no branch {name} in {list}"))
    }
}

/// Alive and not a zombie (a killed postmaster stays one until the daemon
/// that started it reaps it).
fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().next())
                    .is_some_and(|st| st != "Z" && st != "X")
            })
            .unwrap_or(false)
}

impl Drop for Local {
    fn drop(&mut self) {
        if !self.dir.join("daemon.pid").exists() {
            return;
        }
        let _ = self.run(&["down"]);
        // If the daemon did not stop, kill it and the servers it left.
        if let Some(pid) = std::fs::read_to_string(self.dir.join("daemon.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            if pid_alive(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let timelines = self.dir.join("storage").join("timelines");
        for e in std::fs::read_dir(timelines).into_iter().flatten().flatten() {
            let pidfile = e.path().join("pgdata").join("postmaster.pid");
            if let Some(pid) = std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
            {
                if pid > 0 && pid_alive(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGQUIT,
                    );
                }
            }
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn count(url: &str) -> i64 {
    let c = connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    c.query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0)
}

fn url(b: &Value) -> String {
    b["connectionString"].as_str().unwrap().to_string()
}

fn password(url: &str) -> String {
    url.split_once("postgres:")
        .and_then(|(_, r)| r.split_once('@'))
        .map(|(p, _)| p.to_string())
        .unwrap()
}

/// The README walk-through, checked.
async fn scenario(parent: Option<&Path>, expect_driver: Option<&str>) {
    let local = Local::new(parent);
    let port_base = free_port().to_string();

    // init: engine + `main`, running, with a connection string.
    let main = local.json(&["init", "--port-base", &port_base]);
    assert_eq!(main["name"], "main");
    assert_eq!(main["state"], "running");
    let main_url = url(&main);
    let main_port = main["port"].as_u64().unwrap();
    assert!(main_url.contains(&format!(":{main_port}/")), "{main_url}");
    let status = local.json(&["status"]);
    if let Some(d) = expect_driver {
        assert_eq!(status["driver"], d, "{status}");
    }

    // Rows through main's port; remember a time between two batches.
    let c = connect(&main_url).await.unwrap();
    c.batch_execute("CREATE TABLE t (i int); INSERT INTO t VALUES (1), (2), (3);")
        .await
        .unwrap();
    let t1: String = c
        .query_one(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    c.batch_execute("INSERT INTO t VALUES (4), (5); SELECT pg_switch_wal();")
        .await
        .unwrap();
    drop(c);

    // A branch at that time holds the first batch only, and its own password.
    let dev = local.json(&["branch", "create", "dev", "--timestamp", &t1]);
    assert_eq!(dev["state"], "running", "{dev}");
    assert_eq!(dev["parent"], "main");
    let dev_url = url(&dev);
    assert_ne!(dev["port"], main["port"]);
    assert_eq!(count(&dev_url).await, 3);
    assert_eq!(count(&main_url).await, 5);
    assert_ne!(password(&dev_url), password(&main_url));
    let with_main_pw = dev_url.replace(&password(&dev_url), &password(&main_url));
    assert!(
        connect(&with_main_pw).await.is_err(),
        "a branch of main accepted main's password"
    );

    // Snapshot main (5 rows), then write a sixth row.
    let snap = local.json(&["snapshot", "create", "s1", "--branch", "main"]);
    assert_eq!(snap["state"], "ready", "{snap}");
    assert!(snap["lsn"].is_string(), "{snap}");
    let c = connect(&main_url).await.unwrap();
    c.batch_execute("INSERT INTO t VALUES (6)").await.unwrap();
    assert_eq!(count(&main_url).await, 6);
    let listed = local.json(&["snapshot", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);

    // One-step restore of the snapshot onto main: the same connection
    // string reaches the restored rows; the open connection is dropped.
    let r = local.json(&[
        "restore",
        "--snapshot",
        "s1",
        "--target",
        "main",
        "--finalize",
    ]);
    assert_eq!(r["state"], "completed", "{r}");
    let backup = r["backupBranch"].as_str().unwrap().to_string();
    assert!(backup.starts_with("main-old-"), "{backup}");
    assert!(
        c.query_one("SELECT count(*) FROM t", &[]).await.is_err(),
        "the connection to the old compute survived the switch"
    );
    assert_eq!(count(&main_url).await, 5);
    let main_after = local.branch("main");
    assert_eq!(main_after["port"], main["port"]);
    assert_eq!(url(&main_after), main_url);
    assert_ne!(main_after["timeline"], main["timeline"]);

    // The backup keeps the pre-restore data (6 rows) under its own
    // password; dev now hangs off it.
    let b = local.branch(&backup);
    assert_eq!(b["state"], "stopped");
    assert_eq!(b["timeline"], main["timeline"]);
    assert_eq!(local.branch("dev")["parent"], backup.as_str());
    let b = local.json(&["start", &backup]);
    assert_eq!(b["state"], "running");
    assert_ne!(password(&url(&b)), password(&main_url));
    assert_eq!(count(&url(&b)).await, 6);

    // Deletion rules: protected and parents are refused.
    local.json(&[
        "branch",
        "create",
        "prot",
        "--parent",
        "main",
        "--protected",
    ]);
    let err = local.fails(&["branch", "delete", "prot"]);
    assert!(err.contains("protected"), "{err}");
    let err = local.fails(&["branch", "delete", &backup]);
    assert!(err.contains("child"), "{err}");
    local.json(&["branch", "set", "prot", "--protected", "false"]);
    local.json(&["branch", "delete", "prot"]);
    assert!(local
        .json(&["branch", "list"])
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["name"] != "prot"));

    // Restoring a branch to its own past needs a name for the backup.
    let err = local.fails(&[
        "restore",
        "--source",
        "main@head",
        "--target",
        "main",
        "--finalize",
    ]);
    assert!(err.contains("preserve-under-name"), "{err}");

    // Human tables carry the columns.
    let table = local.ok(&["branch", "list"]);
    for col in ["NAME", "PARENT", "POINT", "LSN", "SIZE", "PORT", "STATE"] {
        assert!(table.contains(col), "{table}");
    }

    // down stops everything; up brings back every branch that was running,
    // on the same ports.
    local.json(&["down"]);
    assert!(
        connect(&main_url).await.is_err(),
        "main still served after down"
    );
    let err = local.fails(&["branch", "list"]);
    assert!(err.contains("not running"), "{err}");
    let up = local.json(&["up"]);
    let states: Vec<(String, String)> = up
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().into(),
                b["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    for name in ["main", "dev", backup.as_str()] {
        assert!(
            states.contains(&(name.to_string(), "running".to_string())),
            "{name} not running after up: {states:?}"
        );
    }
    assert_eq!(count(&main_url).await, 5);
    assert_eq!(count(&dev_url).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_on_a_plain_temp_dir() {
    scenario(None, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_on_btrfs() {
    match std::env::var_os("PGBRANCH_TEST_BTRFS") {
        Some(p) => scenario(Some(Path::new(&p)), Some("btrfs")).await,
        None => eprintln!("local_mode_on_btrfs: PGBRANCH_TEST_BTRFS not set: skipped"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_on_xfs_reflink() {
    match std::env::var_os("PGBRANCH_TEST_XFS") {
        Some(p) => scenario(Some(Path::new(&p)), Some("reflink")).await,
        None => eprintln!("local_mode_on_xfs_reflink: PGBRANCH_TEST_XFS not set: skipped"),
    }
}

/// Restoring a branch to its own past, a multi-step restore with a preview
/// branch, and a daemon killed with SIGKILL: `up` takes its computes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_and_multi_step_restores_survive_a_killed_daemon() {
    let local = Local::new(None);
    let port_base = free_port().to_string();
    let main = local.json(&["init", "--port-base", &port_base]);
    let main_url = url(&main);

    let c = connect(&main_url).await.unwrap();
    c.batch_execute("CREATE TABLE t (i int); INSERT INTO t VALUES (1), (2), (3);")
        .await
        .unwrap();
    let t1: String = c
        .query_one(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    c.batch_execute("INSERT INTO t VALUES (4), (5); SELECT pg_switch_wal();")
        .await
        .unwrap();
    drop(c);

    // A point outside the window is refused with the window, and leaves
    // no branch behind (the same command can be run again).
    let err = local.fails(&[
        "branch",
        "create",
        "early",
        "--timestamp",
        "2000-01-01T00:00:00Z",
    ]);
    assert!(err.contains("invalid point"), "{err}");
    assert!(local
        .json(&["branch", "list"])
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["name"] != "early"));

    // main back to t1, its present kept as `main-before`.
    let source = format!("main@{t1}");
    let r = local.json(&[
        "restore",
        "--source",
        &source,
        "--target",
        "main",
        "--finalize",
        "--preserve-under-name",
        "main-before",
    ]);
    assert_eq!(r["state"], "completed", "{r}");
    assert_eq!(r["backupBranch"], "main-before");
    assert_eq!(count(&main_url).await, 3);
    let before = local.branch("main-before");
    assert_eq!(before["timeline"], main["timeline"]);
    assert_eq!(before["state"], "stopped");

    // Multi-step: the snapshot comes up as a preview on its own port; main
    // is untouched until the finalize.
    local.json(&["snapshot", "create", "s1", "--branch", "main"]);
    let c = connect(&main_url).await.unwrap();
    c.batch_execute("INSERT INTO t VALUES (7)").await.unwrap();
    drop(c);
    let r = local.json(&[
        "restore",
        "--snapshot",
        "s1",
        "--target",
        "main",
        "--name",
        "preview",
    ]);
    assert_eq!(r["state"], "awaitingFinalize", "{r}");
    assert_eq!(r["restoredBranch"], "preview");
    let preview = local.branch("preview");
    assert_eq!(preview["state"], "running");
    assert_eq!(preview["restoreTarget"], "main");
    assert_ne!(preview["port"], main["port"]);
    assert_ne!(password(&url(&preview)), password(&main_url));
    assert_eq!(count(&url(&preview)).await, 3);
    assert_eq!(count(&main_url).await, 4);
    let err = local.fails(&["branch", "delete", "main"]);
    assert!(err.contains("preview"), "{err}");

    let r = local.json(&["restore", "finalize", "preview"]);
    assert_eq!(r["state"], "completed", "{r}");
    let backup = r["backupBranch"].as_str().unwrap().to_string();
    assert!(backup.starts_with("main-old-"), "{backup}");
    assert_eq!(count(&main_url).await, 3);
    let names: Vec<String> = local
        .json(&["branch", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!names.contains(&"preview".to_string()), "{names:?}");
    assert!(names.contains(&backup), "{names:?}");
    let restores = local.json(&["restore", "list"]);
    assert_eq!(restores.as_array().unwrap().len(), 2, "{restores}");

    // A compute that dies is shown as such, and `start` brings it back.
    let tl = local.branch("main")["timeline"]
        .as_str()
        .unwrap()
        .to_string();
    let pidfile = local
        .dir
        .join("storage/timelines")
        .join(&tl)
        .join("pgdata/postmaster.pid");
    let pm: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pm),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    while pid_alive(pm) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let m = local.branch("main");
    assert_eq!(m["state"], "exited", "{m}");
    let m = local.json(&["start", "main"]);
    assert_eq!(m["state"], "running", "{m}");
    assert_eq!(count(&main_url).await, 3);

    // The daemon dies hard; its computes are left behind. `up` stops them
    // and serves the branches again on the same ports.
    let pid: i32 = std::fs::read_to_string(local.dir.join("daemon.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    while pid_alive(pid) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(connect(&main_url).await.is_err());
    local.json(&["up"]);
    assert_eq!(count(&main_url).await, 3);
}
