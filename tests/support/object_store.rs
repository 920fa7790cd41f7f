//! A real S3-compatible object store for the backup tests: Garage
//! (crates.io `garage`, pinned and installed by `scripts/setup.sh` into
//! `.tools/bin/garage`), one single-node instance per test on 127.0.0.1
//! ports of its own, with a bucket and an access key.
//!
//! Without the binary the tests print a skip notice and pass, unless
//! `PGBRANCH_REQUIRE_OBJECT_STORE=1` (scripts/test.sh sets it when setup.sh
//! installed Garage): then a missing store is a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Garage node.
pub struct Garage {
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// The S3 region Garage signs for.
    pub region: String,
    /// A bucket that exists, and a key allowed to read and write it.
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The Garage binary: `PGBRANCH_GARAGE`, else `.tools/bin/garage` of this
/// checkout, else `garage` on the PATH.
pub fn garage_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PGBRANCH_GARAGE") {
        return Some(PathBuf::from(p));
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/garage");
    if local.exists() {
        return Some(local);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("garage"))
            .find(|p| p.exists())
    })
}

/// Whether barman-cloud (Debian `barman-cli-cloud`) is installed.
pub fn barman_installed() -> bool {
    Path::new("/usr/bin/barman-cloud-wal-archive").exists()
}

/// `None` (with a printed notice) when the store cannot run here and the
/// environment does not require it.
pub fn skip_notice(test: &str, what: &str) -> Option<()> {
    if std::env::var("PGBRANCH_REQUIRE_OBJECT_STORE").as_deref() == Ok("1") {
        panic!("{test}: {what} (PGBRANCH_REQUIRE_OBJECT_STORE=1: run scripts/setup.sh)");
    }
    eprintln!("{test}: skipped: {what} (scripts/setup.sh installs it)");
    None
}

impl Garage {
    /// Starts a node with bucket `bucket` and one key; `None` when Garage
    /// is not installed (see the module docs).
    pub fn start(test: &str, bucket: &str) -> Option<Garage> {
        let Some(bin) = garage_binary() else {
            skip_notice(test, "the Garage object store is not installed")?;
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("pgbranch-garage-")
            .tempdir()
            .unwrap();
        let (s3, rpc, admin) = (free_port(), free_port(), free_port());
        let secret: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\n\
                 data_dir = \"{d}/data\"\n\
                 db_engine = \"sqlite\"\n\
                 replication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n\
                 [s3_api]\n\
                 s3_region = \"garage\"\n\
                 api_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\
                 [admin]\n\
                 api_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let mut g = Garage {
            dir,
            bin,
            config,
            child: None,
            endpoint: format!("http://127.0.0.1:{s3}"),
            region: "garage".into(),
            bucket: bucket.into(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
        };
        g.run_server();
        let started = Instant::now();
        let id = loop {
            match g.try_cli(&["node", "id", "-q"]) {
                Ok(out) if out.contains('@') => break out.trim().to_string(),
                r if started.elapsed() > Duration::from_secs(30) => {
                    panic!("garage did not come up: {r:?}\n{}", g.log())
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        let node = id.split('@').next().unwrap().to_string();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.create_bucket(bucket);
        let (id, secret) = g.create_key("pgbranch-test");
        g.allow(bucket, &id);
        g.access_key_id = id;
        g.secret_access_key = secret;
        Some(g)
    }

    fn run_server(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("garage.log"))
            .unwrap();
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting garage");
        self.child = Some(child);
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).to_string())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Runs `garage <args>` against this node.
    pub fn cli(&self, args: &[&str]) -> String {
        // Right after start the layout may take a moment to spread.
        let started = Instant::now();
        loop {
            match self.try_cli(args) {
                Ok(out) => return out,
                Err(e) if started.elapsed() > Duration::from_secs(30) => {
                    panic!("garage {args:?} failed: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    }

    pub fn create_bucket(&self, name: &str) {
        self.cli(&["bucket", "create", name]);
    }

    /// A new key: (access key id, secret).
    pub fn create_key(&self, name: &str) -> (String, String) {
        let out = self.cli(&["key", "create", name]);
        let field = |label: &str| {
            out.lines()
                .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no {label:?} in garage key create output:\n{out}"))
        };
        (field("Key ID:"), field("Secret key:"))
    }

    pub fn allow(&self, bucket: &str, key_id: &str) {
        self.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", bucket, "--key", key_id,
        ]);
    }

    /// Stops the server (SIGKILL): the endpoint refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same data and ports.
    pub fn restart(&mut self) {
        self.stop();
        self.run_server();
        let started = Instant::now();
        while self.try_cli(&["bucket", "list"]).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "garage did not come back:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The S3 API's port.
    pub fn endpoint_port(&self) -> u16 {
        self.endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}
