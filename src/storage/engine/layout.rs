//! Where things are on the volume root (see the layout in [`super`]), and
//! the directory operations the engine does through its driver: create,
//! clone and delete data directories, off the runtime's threads.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{io_err, pg, Engine};
use crate::storage::{DriverKind, SnapshotId, StorageError, TimelineId};

/// The PostgreSQL major version a data directory was made by (0: unknown).
pub(super) fn pg_major_of(data: &Path) -> u32 {
    fs::read_to_string(data.join("PG_VERSION"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Adds o+x to the root and to its ancestors we own, so the run_as user can
/// reach the data directories.
pub(super) fn make_traversable(root: &Path) -> Result<(), StorageError> {
    let me = nix::unistd::geteuid().as_raw();
    let mut p = Some(root);
    while let Some(dir) = p {
        if let Ok(m) = fs::metadata(dir) {
            if m.uid() == me && m.mode() & 0o001 == 0 {
                tracing::warn!(dir = %dir.display(), "adding o+x so the run_as user can reach the volume");
                fs::set_permissions(dir, fs::Permissions::from_mode((m.mode() & 0o7777) | 0o011))
                    .map_err(|e| io_err(&format!("making {} traversable", dir.display()), e))?;
            }
        }
        p = dir.parent();
    }
    Ok(())
}

impl Engine {
    /// The driver in use.
    pub fn driver(&self) -> DriverKind {
        self.inner.driver.kind()
    }

    /// The absolute data directory of a timeline.
    pub fn data_dir(&self, id: &TimelineId) -> PathBuf {
        self.tl_dir(id).join("pgdata")
    }

    pub(super) fn tl_dir(&self, id: &TimelineId) -> PathBuf {
        self.inner.root.join("timelines").join(id.as_str())
    }

    pub(super) fn snap_dir(&self, id: &SnapshotId) -> PathBuf {
        self.inner.root.join("snapshots").join(id.as_str())
    }

    pub(super) fn wal_dir(&self, id: &TimelineId) -> PathBuf {
        self.inner.root.join("wal").join(id.as_str())
    }

    pub(super) fn tmp(&self) -> PathBuf {
        self.inner.root.join("tmp")
    }

    pub(super) async fn clone_dir(
        &self,
        src: &Path,
        dst: &Path,
        readonly: bool,
    ) -> Result<(), StorageError> {
        let (s, d) = (src.to_path_buf(), dst.to_path_buf());
        self.blocking("cloning a data directory", move |i| {
            i.driver.clone_dir(&s, &d, readonly)
        })
        .await
    }

    pub(super) async fn delete_dir(&self, p: &Path) -> Result<(), StorageError> {
        let p = p.to_path_buf();
        self.blocking("deleting a data directory", move |i| {
            i.driver.delete_dir(&p)
        })
        .await
    }

    /// Stops a postgres an interrupted operation left running on the data
    /// directory `p` (which can take seconds), then deletes `p`.
    pub(super) async fn remove_data_dir(&self, p: &Path) -> Result<(), StorageError> {
        let p = p.to_path_buf();
        self.blocking("deleting a data directory", move |i| {
            pg::kill_leftover(&p);
            i.driver.delete_dir(&p)
        })
        .await
    }

    /// Removes a plain directory tree (a timeline's WAL archive, what is
    /// left of an object's directory once its data directory is gone); a
    /// missing one is no error.
    pub(super) async fn remove_tree(
        &self,
        what: &'static str,
        p: &Path,
    ) -> Result<(), StorageError> {
        let p = p.to_path_buf();
        self.blocking(what, move |_| match fs::remove_dir_all(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        })
        .await
    }

    pub(super) async fn create_data_dir(&self, data: &Path) -> Result<(), StorageError> {
        let d = data.to_path_buf();
        self.blocking("creating a data directory", move |i| {
            i.driver.create_dir(&d)
        })
        .await?;
        fs::set_permissions(data, fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err("chmod", e))?;
        self.inner.pg.chown(data)
    }
}
