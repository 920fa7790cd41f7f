//! PostgreSQL configuration the engine writes into its copies: the
//! timeline's own `pgbranch.conf` (archiving into its own archive), the
//! stripping of managed keys from `postgresql.auto.conf`, `pg_hba.conf` at
//! initdb, and the recovery settings of a replay (see "Fix-ups on every
//! writable copy" in [`super`]).

use std::fs;
use std::path::Path;

use super::copy::check_self_contained;
use super::{io_err, Engine};
use crate::storage::{Lsn, StorageError, TimelineId};

const MANAGED_KEYS: &[&str] = &[
    "archive_mode",
    "archive_command",
    "archive_library",
    "restore_command",
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_name",
    "recovery_target_inclusive",
    "recovery_target_timeline",
    "recovery_target_action",
    "primary_conninfo",
    "primary_slot_name",
];

impl Engine {
    /// The shell command that archives one WAL file into the timeline's own
    /// archive: never overwrites (an existing file must be identical),
    /// fsyncs the copy before an atomic rename, then fsyncs the directory.
    /// PostgreSQL cuts the expanded command off at 1024 bytes, so the
    /// archive path is written once, into a shell variable.
    fn archive_command(root: &Path, id: &TimelineId) -> String {
        let d = root.join("wal").join(id.as_str());
        let d = d.display();
        format!(
            "d=\"{d}\"; f=\"$d/%f\"; if [ -f \"$f\" ]; then cmp -s \"%p\" \"$f\"; else cp \"%p\" \"$f.tmp\" && sync \"$f.tmp\" && mv \"$f.tmp\" \"$f\" && sync \"$d\"; fi"
        )
    }

    /// Settings for servers the engine runs itself (archive into the local
    /// view of the volume).
    pub(super) fn local_settings(&self, archive: Option<&TimelineId>) -> Vec<(String, String)> {
        match archive {
            Some(id) => vec![(
                "archive_command".into(),
                Self::archive_command(&self.inner.root, id),
            )],
            None => vec![("archive_mode".into(), "off".into())],
        }
    }

    /// The fix-ups every writable copy gets (see the module docs).
    /// `archive`: the timeline whose archive this copy feeds (None: off).
    pub(super) fn fixups(
        &self,
        data: &Path,
        archive: Option<&TimelineId>,
    ) -> Result<(), StorageError> {
        self.clear_runtime_state(data)?;
        let mut conf = String::from(
            "# Written by pgbranch for this timeline; rewritten on every copy. Do not edit.\n",
        );
        conf.push_str("wal_level = replica\n");
        match archive {
            Some(id) => {
                conf.push_str("archive_mode = on\n");
                conf.push_str(&format!(
                    "archive_command = '{}'\n",
                    Self::archive_command(&self.inner.compute_root, id)
                ));
            }
            None => conf.push_str("archive_mode = off\n"),
        }
        conf.push_str("recovery_init_sync_method = syncfs\n");
        conf.push_str("listen_addresses = '*'\n");
        self.install_conf(data, &conf)
    }

    /// Refuses a copy whose WAL or tablespaces live outside it, and removes
    /// what a copy must not inherit from its source's server: its pid file
    /// and options, recovery and standby signals, the engine's recovery
    /// settings, and its replication slots.
    pub(super) fn clear_runtime_state(&self, data: &Path) -> Result<(), StorageError> {
        check_self_contained(data)?;
        for f in [
            "postmaster.pid",
            "postmaster.opts",
            "recovery.signal",
            "standby.signal",
            "pgbranch.recovery.conf",
        ] {
            let p = data.join(f);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&format!("removing {}", p.display()), e)),
            }
        }
        if let Ok(rd) = fs::read_dir(data.join("pg_replslot")) {
            for e in rd.flatten() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        Ok(())
    }

    /// Writes the engine's settings `conf` as `pgbranch.conf`, includes it
    /// (and `pgbranch.recovery.conf`) from `postgresql.conf`, and strips the
    /// keys the engine manages from `postgresql.auto.conf`, so nothing of
    /// the source's archiving or recovery survives a copy.
    pub(super) fn install_conf(&self, data: &Path, conf: &str) -> Result<(), StorageError> {
        self.inner
            .pg
            .write_file(&data.join("pgbranch.conf"), conf)?;
        let main = data.join("postgresql.conf");
        let text = fs::read_to_string(&main).map_err(|e| io_err("reading postgresql.conf", e))?;
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("include_if_exists = 'pgbranch"))
            .map(|l| l.to_string())
            .collect();
        lines.push("include_if_exists = 'pgbranch.conf'".into());
        lines.push("include_if_exists = 'pgbranch.recovery.conf'".into());
        self.inner
            .pg
            .write_file(&main, &(lines.join("\n") + "\n"))?;

        let auto = data.join("postgresql.auto.conf");
        if let Ok(text) = fs::read_to_string(&auto) {
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    let k = l.split('=').next().unwrap_or("").trim();
                    !MANAGED_KEYS.contains(&k)
                })
                .collect();
            self.inner.pg.write_file(&auto, &(kept.join("\n") + "\n"))?;
        }
        Ok(())
    }

    pub(super) fn write_hba(&self, data: &Path) -> Result<(), StorageError> {
        let hba = "# Written by pgbranch at initdb.\n\
            local   all          all                 trust\n\
            local   replication  all                 trust\n\
            host    all          all  0.0.0.0/0      scram-sha-256\n\
            host    all          all  ::/0           scram-sha-256\n\
            host    replication  all  0.0.0.0/0      scram-sha-256\n\
            host    replication  all  ::/0           scram-sha-256\n";
        self.inner.pg.write_file(&data.join("pg_hba.conf"), hba)
    }

    /// Sets `data` up for a replay of `src`'s archive up to `target`
    /// (inclusive), ending with `action` (`promote`, or `shutdown` to stay
    /// in recovery); the settings are removed after the replay.
    pub(super) fn write_recovery(
        &self,
        data: &Path,
        src: &TimelineId,
        target: Lsn,
        action: &str,
    ) -> Result<(), StorageError> {
        let rc = format!(
            "# Written by pgbranch for a replay of the WAL archive; removed after it.\n\
             restore_command = 'cp \"{}/%f\" \"%p\"'\n\
             recovery_target_lsn = '{target}'\n\
             recovery_target_inclusive = on\n\
             recovery_target_timeline = 'current'\n\
             recovery_target_action = '{action}'\n",
            self.wal_dir(src).display()
        );
        self.inner
            .pg
            .write_file(&data.join("pgbranch.recovery.conf"), &rc)?;
        self.inner.pg.write_file(&data.join("recovery.signal"), "")
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn archive_command_is_durable_and_never_overwrites() {
        let id = TimelineId::new("abc").unwrap();
        let c = Engine::archive_command(Path::new("/vol"), &id);
        assert!(c.starts_with("d=\"/vol/wal/abc\"; f=\"$d/%f\";"));
        assert!(
            c.contains("cmp -s"),
            "an existing segment must be compared, not replaced"
        );
        assert!(c.contains("sync \"$f.tmp\"") && c.contains("mv \"$f.tmp\" \"$f\""));
        assert!(!c.contains('\''), "must embed in a single-quoted setting");
    }

    #[test]
    fn archive_command_fits_postgres_limit_with_long_roots() {
        // PostgreSQL truncates the expanded command at 1024 bytes; a long
        // volume path must not push it over (it did when the path was
        // repeated in every clause).
        let id = TimelineId::new("a".repeat(63)).unwrap();
        let root = PathBuf::from(format!("/{}", "r".repeat(400)));
        let c = Engine::archive_command(&root, &id);
        let expanded = c
            .replace("%f", "000000010000000000000001.partial")
            .replace("%p", "pg_wal/000000010000000000000001.partial");
        assert!(expanded.len() < 1024, "{} bytes", expanded.len());
        assert_eq!(c.matches(&*root.to_string_lossy()).count(), 1);
    }
}
