//! barman-cloud, the backup format and transfer (Debian `barman-cli-cloud`).
//!
//! Every tool runs with the destination in its arguments (`--endpoint-url`,
//! `s3://bucket/prefix`, the server name) and the credentials in its
//! environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`): arguments
//! are visible to every user of the machine (`ps`), the environment only to
//! the process's own user. The addressing style and the region go in an
//! AWS config file, the CA bundle in a PEM file, both in a private
//! directory ([`Barman::new`]); the machine's own AWS configuration and
//! credential files are never read.
//!
//! Layout in the bucket (barman-cloud's own):
//! `<prefix>/<server>/base/<backup id>/{backup.info,data.tar[.gz]}` and
//! `<prefix>/<server>/wals/<timeline+log>/<segment>[.gz]`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;

use super::{BackupError, Failure, ObjectStore};

/// Where the tools are looked for when `PGBRANCH_BARMAN_BIN_DIR` is unset.
pub const DEFAULT_BIN_DIR: &str = "/usr/bin";

/// How long one tool run may take before it is killed.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(3600);

/// A uid/gid to run the tools as (the engine's PostgreSQL user, who owns
/// the data directories and the WAL archive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// barman-cloud's tools bound to one object store.
#[derive(Debug, Clone)]
pub struct Barman {
    store: ObjectStore,
    bin_dir: PathBuf,
    run_as: Option<RunAs>,
    conf_dir: PathBuf,
}

/// One base backup as `barman-cloud-backup-list --format json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BackupEntry {
    pub backup_id: String,
    /// `DONE` for a complete backup.
    pub status: String,
    /// The LSN the backup is consistent at (`0/5000000`).
    #[serde(default)]
    pub end_xlog: Option<String>,
    /// When it ended, as barman prints it (`Mon Dec  7 10:10:46 2026`, UTC).
    #[serde(default)]
    pub end_time: Option<String>,
    #[serde(default)]
    pub begin_xlog: Option<String>,
    #[serde(default)]
    pub begin_time: Option<String>,
    #[serde(default)]
    pub timeline: Option<u32>,
    #[serde(default)]
    pub size: Option<u64>,
}

impl BackupEntry {
    /// Whether the backup finished.
    pub fn done(&self) -> bool {
        self.status == "DONE"
    }

    /// When it ended.
    pub fn ended(&self) -> Option<jiff::Timestamp> {
        parse_barman_time(self.end_time.as_deref()?)
    }

    /// The LSN it is consistent at.
    pub fn end_lsn(&self) -> Option<crate::storage::Lsn> {
        self.end_xlog.as_deref()?.parse().ok()
    }
}

#[derive(Debug, Deserialize)]
struct BackupList {
    backups_list: Vec<BackupEntry>,
}

/// barman's `%a %b %e %H:%M:%S %Y` times (in UTC: the tools run with
/// `TZ=UTC`).
pub fn parse_barman_time(s: &str) -> Option<jiff::Timestamp> {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let dt = jiff::civil::DateTime::strptime("%a %b %d %H:%M:%S %Y", &s).ok()?;
    dt.to_zoned(jiff::tz::TimeZone::UTC)
        .ok()
        .map(|z| z.timestamp())
}

impl Barman {
    /// Binds the tools to `store`. `conf_dir` is made private (0700, owned
    /// by `run_as`) and receives the AWS config file and the CA bundle.
    pub fn new(
        store: ObjectStore,
        run_as: Option<RunAs>,
        conf_dir: &Path,
    ) -> Result<Self, BackupError> {
        let bin_dir = std::env::var_os("PGBRANCH_BARMAN_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BIN_DIR));
        let io = |what: &str, e: std::io::Error| {
            BackupError::new(
                Failure::ToolFailed,
                format!("{what} {}: {e}", conf_dir.display()),
            )
        };
        fs::create_dir_all(conf_dir).map_err(|e| io("creating", e))?;
        fs::set_permissions(conf_dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| io("chmod", e))?;
        let style = if store.path_style { "path" } else { "virtual" };
        let config = format!(
            "[default]\nregion = {}\ns3 =\n    addressing_style = {style}\n",
            store.region
        );
        let mut files = vec![("aws-config", config)];
        if let Some(pem) = &store.ca_bundle {
            files.push(("ca.pem", pem.clone()));
        }
        for (name, body) in &files {
            let p = conf_dir.join(name);
            fs::write(&p, body).map_err(|e| io("writing into", e))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600))
                .map_err(|e| io("chmod in", e))?;
        }
        if let Some(u) = run_as {
            for p in std::iter::once(conf_dir.to_path_buf())
                .chain(files.iter().map(|(n, _)| conf_dir.join(n)))
            {
                nix::unistd::chown(
                    &p,
                    Some(nix::unistd::Uid::from_raw(u.uid)),
                    Some(nix::unistd::Gid::from_raw(u.gid)),
                )
                .map_err(|e| io("chown in", std::io::Error::from(e)))?;
            }
        }
        Ok(Self {
            store,
            bin_dir,
            run_as,
            conf_dir: conf_dir.to_path_buf(),
        })
    }

    /// The store the tools are bound to.
    pub fn store(&self) -> &ObjectStore {
        &self.store
    }

    /// Removes the private configuration directory (the tools cannot run
    /// after this).
    pub fn remove_config(&self) {
        if let Err(e) = fs::remove_dir_all(&self.conf_dir) {
            tracing::debug!(dir = %self.conf_dir.display(), error = %e, "removing barman's configuration directory");
        }
    }

    /// The environment every tool (and a PostgreSQL whose
    /// `restore_command` runs one) needs: credentials, region, config
    /// files, UTC.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "AWS_ACCESS_KEY_ID".to_string(),
                self.store.credentials.access_key_id.clone(),
            ),
            (
                "AWS_SECRET_ACCESS_KEY".to_string(),
                self.store.credentials.secret_access_key.clone(),
            ),
            ("AWS_DEFAULT_REGION".into(), self.store.region.clone()),
            (
                "AWS_CONFIG_FILE".into(),
                self.conf_dir.join("aws-config").display().to_string(),
            ),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            ("TZ".into(), "UTC".into()),
        ];
        if self.store.ca_bundle.is_some() {
            env.push((
                "AWS_CA_BUNDLE".into(),
                self.conf_dir.join("ca.pem").display().to_string(),
            ));
        }
        env
    }

    /// The path of one tool.
    pub fn tool(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// A tool's command with the destination arguments every tool takes
    /// first (`--endpoint-url URL`), the environment, and the user.
    pub fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.tool(name));
        cmd.env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .envs(self.env())
            .current_dir("/")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(u) = self.run_as {
            cmd.uid(u.uid).gid(u.gid).env("HOME", "/tmp");
        }
        cmd.arg("--endpoint-url").arg(&self.store.endpoint);
        cmd
    }

    /// The `restore_command` of a recovery from `server`'s WAL archive (the
    /// server that runs it needs [`Barman::env`] in its environment).
    pub fn wal_restore_command(&self, server: &str) -> String {
        format!(
            "{} --endpoint-url {} {} {} %f %p",
            self.tool("barman-cloud-wal-restore").display(),
            self.store.endpoint,
            self.store.s3_url(),
            server
        )
    }

    /// Runs a command to its end; a failure is classified from its output.
    pub async fn run(&self, mut cmd: Command, what: &str) -> Result<String, BackupError> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let out = match tokio::time::timeout(TOOL_TIMEOUT, cmd.output()).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                return Err(BackupError::new(
                    Failure::ToolFailed,
                    format!(
                        "{what}: could not run barman-cloud (is barman-cli-cloud installed?): {e}"
                    ),
                ))
            }
            Err(_) => {
                return Err(BackupError::new(
                    Failure::ToolFailed,
                    format!("{what}: still running after {} s", TOOL_TIMEOUT.as_secs()),
                ))
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() {
            return Ok(stdout);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let text = format!("{stderr}\n{stdout}");
        let failure = classify_output(&text);
        let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = tail[tail.len().saturating_sub(4)..].join(" | ");
        Err(BackupError::new(
            failure,
            self.store.redact(&format!(
                "{what} in {} failed ({}): {}",
                self.store.describe(),
                out.status,
                super::probe::cut(&tail, 1500)
            )),
        ))
    }

    /// Uploads one WAL file (a segment, `.history` or `.backup` file) of
    /// `server`, gzip-compressed.
    pub async fn wal_archive(&self, server: &str, wal: &Path) -> Result<(), BackupError> {
        let mut cmd = self.command("barman-cloud-wal-archive");
        cmd.arg("--gzip")
            .arg(self.store.s3_url())
            .arg(server)
            .arg(wal);
        self.run(cmd, "archiving a WAL file").await.map(|_| ())
    }

    /// Fails when `server`'s WAL archive already holds WAL (of another
    /// cluster, or of another history of this one): an archive is never
    /// shared.
    pub async fn check_wal_archive(&self, server: &str) -> Result<(), BackupError> {
        let mut cmd = self.command("barman-cloud-check-wal-archive");
        cmd.arg(self.store.s3_url()).arg(server);
        self.run(cmd, "checking that the WAL archive is unused")
            .await
            .map(|_| ())
            .map_err(|e| match e.failure {
                Failure::ToolFailed => BackupError {
                message: format!(
                    "the WAL archive of barman server {server:?} already holds WAL (another timeline's, or another history's): a timeline never archives into an archive it does not own; {}",
                    e.message
                ),
                ..e
            },
                _ => e,
            })
    }

    /// Takes a base backup of the server at `socket_dir`:`port` (user
    /// `postgres`, trusted over the socket), reading its data directory
    /// from the local file system.
    pub async fn backup(
        &self,
        server: &str,
        socket_dir: &Path,
        port: u16,
    ) -> Result<String, BackupError> {
        let mut cmd = self.command("barman-cloud-backup");
        cmd.arg("--host")
            .arg(socket_dir)
            .arg("--port")
            .arg(port.to_string())
            .arg("--user")
            .arg("postgres")
            .arg("--immediate-checkpoint")
            .arg(self.store.s3_url())
            .arg(server);
        self.run(cmd, "taking a base backup").await
    }

    /// The base backups of `server`, oldest first.
    pub async fn list_backups(&self, server: &str) -> Result<Vec<BackupEntry>, BackupError> {
        let mut cmd = self.command("barman-cloud-backup-list");
        cmd.arg("--format")
            .arg("json")
            .arg(self.store.s3_url())
            .arg(server);
        let out = self.run(cmd, "listing base backups").await?;
        let list: BackupList = serde_json::from_str(&out).map_err(|e| {
            BackupError::new(
                Failure::ToolFailed,
                format!("barman-cloud-backup-list printed something else than its JSON: {e}"),
            )
        })?;
        let mut v = list.backups_list;
        v.sort_by(|a, b| a.backup_id.cmp(&b.backup_id));
        Ok(v)
    }

    /// Deletes the base backups of `server` beyond the newest `keep`, and
    /// the WAL only they needed (barman's `REDUNDANCY` retention policy:
    /// WAL that a kept backup needs is never deleted).
    pub async fn delete_beyond(&self, server: &str, keep: u32) -> Result<(), BackupError> {
        let mut cmd = self.command("barman-cloud-backup-delete");
        cmd.arg("--retention-policy")
            .arg(format!("REDUNDANCY {}", keep.max(1)))
            .arg(self.store.s3_url())
            .arg(server);
        self.run(cmd, "deleting base backups beyond retention")
            .await
            .map(|_| ())
    }

    /// Downloads base backup `backup_id` of `server` into `dest` (empty or
    /// missing).
    pub async fn restore(
        &self,
        server: &str,
        backup_id: &str,
        dest: &Path,
    ) -> Result<(), BackupError> {
        let mut cmd = self.command("barman-cloud-restore");
        cmd.arg(self.store.s3_url())
            .arg(server)
            .arg(backup_id)
            .arg(dest);
        self.run(cmd, "downloading a base backup").await.map(|_| ())
    }
}

/// The failure a tool's output describes (botocore's and barman's words).
pub fn classify_output(text: &str) -> Failure {
    let t = text.to_ascii_lowercase();
    if t.contains("nosuchbucket") || t.contains("does not exist") && t.contains("bucket") {
        Failure::BucketNotFound
    } else if t.contains("accessdenied")
        || t.contains("invalidaccesskeyid")
        || t.contains("signaturedoesnotmatch")
        || t.contains("forbidden")
        || t.contains("(403)")
    {
        Failure::AccessDenied
    } else if t.contains("ssl") || t.contains("certificate") || t.contains("tls") {
        Failure::TlsError
    } else if t.contains("could not connect to the endpoint")
        || t.contains("endpointconnectionerror")
        || t.contains("connection refused")
        || t.contains("connect timeout")
        || t.contains("name or service not known")
    {
        Failure::EndpointUnreachable
    } else {
        Failure::ToolFailed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn barman_times_are_utc() {
        let t = parse_barman_time("Mon Dec  7 10:10:46 2026").unwrap();
        assert_eq!(t.to_string(), "2026-12-07T10:10:46Z");
        assert_eq!(parse_barman_time("garbage"), None);
    }

    #[test]
    fn tool_output_is_classified() {
        assert_eq!(
            classify_output("botocore.exceptions.ClientError: An error occurred (NoSuchBucket) when calling the PutObject operation"),
            Failure::BucketNotFound
        );
        assert_eq!(
            classify_output("An error occurred (InvalidAccessKeyId) when calling"),
            Failure::AccessDenied
        );
        assert_eq!(
            classify_output("Could not connect to the endpoint URL: \"http://127.0.0.1:1/b\""),
            Failure::EndpointUnreachable
        );
        assert_eq!(
            classify_output("SSL validation failed for https://x"),
            Failure::TlsError
        );
        assert_eq!(classify_output("something else"), Failure::ToolFailed);
    }
}
