//! The operator refuses to start when the storage engine and the computes
//! it would create disagree: data directories owned by another uid than the
//! computes run as, or an `archive_command` naming the engine's own path
//! instead of where computes mount the volume. Real `pgbranch operator` and
//! `pgbranch storage serve` binaries on real PostgreSQL; the checks run
//! before the operator needs the Kubernetes API, which is not there
//! (KUBECONFIG names a missing file), so an operator that passes them stops
//! with "cannot reach the Kubernetes API" instead.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_pgbranch");

/// The uid the engine runs PostgreSQL as: `postgres` under root, else us.
fn engine_uid() -> u32 {
    if nix::unistd::geteuid().is_root() {
        nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("a postgres user (scripts/setup.sh installs PostgreSQL)")
            .uid
            .as_raw()
    } else {
        nix::unistd::geteuid().as_raw()
    }
}

/// Runs the operator to its exit (it must exit by itself, within 60 s).
fn operator(args: &[&str], dir: &std::path::Path) -> Output {
    let mut child = Command::new(BIN)
        .arg("operator")
        .args(args)
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--leader-election",
            "false",
        ])
        .env("KUBECONFIG", dir.join("no-such-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("PGBRANCH_STORAGE_RUN_AS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the operator did not exit: {:?}", child.wait_with_output());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `pgbranch storage serve` on a fresh volume; killed on drop.
struct Serve {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Serve {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(BIN)
            .args(["storage", "serve", "--no-auth", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("vol"))
            .args(extra)
            .env_remove("PGBRANCH_STORAGE_TOKEN")
            .env_remove("PGBRANCH_COMPUTE_ROOT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("storage serve printed {line:?}"))
            .to_string();
        Serve {
            child,
            addr,
            _dir: dir,
        }
    }
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const NO_API: &str = "cannot reach the Kubernetes API";

#[test]
fn embedded_engine_uid_must_be_the_compute_uid() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("vol");
    let storage = format!("embedded:{}", vol.display());
    let uid = engine_uid();
    let other = (uid + 1).to_string();

    // Run as root, the engine's initdb runs as `postgres`; computes that
    // run as another uid could not use the data directories.
    let o = operator(
        &["--storage", &storage, "--compute-uid", &other],
        dir.path(),
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!("uid {uid}")) && err.contains(&format!("--compute-uid {uid}")),
        "{err}"
    );
    assert!(!err.contains(NO_API), "{err}");
    assert!(
        !vol.join("meta.sqlite").exists(),
        "the engine must not be opened for a configuration that cannot work"
    );

    // The matching uid passes the check (and stops at the missing API).
    let o = operator(
        &["--storage", &storage, "--compute-uid", &uid.to_string()],
        dir.path(),
    );
    assert!(stderr(&o).contains(NO_API), "{}", stderr(&o));
}

#[test]
fn storage_service_must_agree_on_uid_and_compute_root() {
    let dir = tempfile::tempdir().unwrap();
    let uid = engine_uid().to_string();
    let other = (engine_uid() + 1).to_string();

    // The engine's own path in computes' archive_command, where computes
    // mount the volume at the default /var/lib/pgbranch: refused, naming
    // both paths.
    let s = Serve::start(&[]);
    let o = operator(
        &[
            "--storage",
            &s.url(),
            "--volume-host-path",
            "/var/lib/X",
            "--compute-uid",
            &uid,
        ],
        dir.path(),
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    let engine_root = s._dir.path().join("vol").canonicalize().unwrap();
    assert!(
        err.contains(&engine_root.display().to_string()) && err.contains("/var/lib/pgbranch"),
        "{err}"
    );
    drop(s);

    // With --compute-root set to the computes' mount path it agrees...
    let s = Serve::start(&["--compute-root", "/var/lib/pgbranch"]);
    let o = operator(
        &[
            "--storage",
            &s.url(),
            "--volume-host-path",
            "/var/lib/X",
            "--compute-uid",
            &uid,
        ],
        dir.path(),
    );
    assert!(stderr(&o).contains(NO_API), "{}", stderr(&o));
    // ... unless the computes run as another uid than the engine.
    let o = operator(
        &[
            "--storage",
            &s.url(),
            "--volume-host-path",
            "/var/lib/X",
            "--compute-uid",
            &other,
        ],
        dir.path(),
    );
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains(&format!("--compute-uid {uid}")),
        "{err}"
    );
}
