//! Copy-on-write drivers: how a data directory is created, cloned and
//! deleted on the volume.
//!
//! * `btrfs`: every data directory is a subvolume; a clone is a subvolume
//!   snapshot (`-r` for read-only copies): atomic and O(1), so it may be
//!   taken of a running server (crash-consistent).
//! * `reflink`: a walk of the tree cloning each file with `FICLONE`
//!   (XFS with reflink=1, btrfs): O(files), not atomic.
//! * `copy`: a walk of the tree copying bytes: O(bytes), not atomic.
//!
//! The walking drivers keep modes and ownership and skip files that vanish
//! during the walk (a running server recycles WAL); they are used on a
//! running server only inside backup mode.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use crate::storage::DriverKind;

pub(crate) trait Driver: Send + Sync {
    fn kind(&self) -> DriverKind;
    /// Whether a clone is a point-in-time image of the whole directory.
    fn atomic(&self) -> bool;
    /// Creates an empty directory that can later be cloned.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Clones `src` to the new path `dst` (which must not exist).
    fn clone_dir(&self, src: &Path, dst: &Path, readonly: bool) -> io::Result<()>;
    /// Deletes a directory made by `create_dir` or `clone_dir` (or a plain
    /// directory). A missing path is not an error.
    fn delete_dir(&self, path: &Path) -> io::Result<()>;
    /// Bytes only this directory holds, where the driver can tell.
    fn exclusive_bytes(&self, path: &Path) -> Option<u64>;
    /// Whether [`Driver::exclusive_bytes`] costs time that grows with the
    /// data (btrfs reads every extent): then it is measured in the
    /// background, never on a caller's path.
    fn exclusive_bytes_is_slow(&self) -> bool {
        false
    }
}

pub(crate) fn make_driver(kind: DriverKind) -> Box<dyn Driver> {
    match kind {
        DriverKind::Btrfs => Box::new(Btrfs),
        DriverKind::Reflink => Box::new(Walk { reflink: true }),
        DriverKind::Copy => Box::new(Walk { reflink: false }),
    }
}

fn on_btrfs(path: &Path) -> bool {
    match nix::sys::statfs::statfs(path) {
        Ok(s) => s.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC,
        Err(_) => false,
    }
}

fn btrfs_tool_works() -> bool {
    Command::new("btrfs")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn reflink_works(scratch: &Path) -> bool {
    let src = scratch.join(".reflink-probe-src");
    let dst = scratch.join(".reflink-probe-dst");
    let _ = fs::remove_file(&dst);
    let ok = fs::write(&src, b"pgbranch reflink probe").is_ok()
        && reflink_copy::reflink(&src, &dst).is_ok();
    let _ = fs::remove_file(&src);
    let _ = fs::remove_file(&dst);
    ok
}

/// Picks the driver for a volume: btrfs when the root is on btrfs, else
/// reflink when a probe clone works, else copy. A forced kind is checked.
pub(crate) fn probe(
    root: &Path,
    scratch: &Path,
    forced: Option<DriverKind>,
) -> Result<DriverKind, String> {
    match forced {
        Some(DriverKind::Btrfs) => {
            if !on_btrfs(root) {
                return Err(format!(
                    "driver btrfs asked for, but {} is not on btrfs",
                    root.display()
                ));
            }
            if !btrfs_tool_works() {
                return Err("driver btrfs asked for, but the btrfs tool is not installed".into());
            }
            Ok(DriverKind::Btrfs)
        }
        Some(DriverKind::Reflink) => {
            if reflink_works(scratch) {
                Ok(DriverKind::Reflink)
            } else {
                Err(format!(
                    "driver reflink asked for, but {} does not support file clones (FICLONE)",
                    root.display()
                ))
            }
        }
        Some(DriverKind::Copy) => Ok(DriverKind::Copy),
        None => {
            if on_btrfs(root) && btrfs_tool_works() {
                Ok(DriverKind::Btrfs)
            } else if reflink_works(scratch) {
                Ok(DriverKind::Reflink)
            } else {
                Ok(DriverKind::Copy)
            }
        }
    }
}

fn run(cmd: &mut Command) -> io::Result<String> {
    let out = cmd.output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

struct Btrfs;

fn is_subvolume(path: &Path) -> bool {
    // The root directory of a btrfs subvolume has inode number 256.
    fs::symlink_metadata(path)
        .map(|m| m.is_dir() && m.ino() == 256 && on_btrfs(path))
        .unwrap_or(false)
}

impl Driver for Btrfs {
    fn kind(&self) -> DriverKind {
        DriverKind::Btrfs
    }
    fn atomic(&self) -> bool {
        true
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        run(Command::new("btrfs")
            .args(["subvolume", "create"])
            .arg(path))
        .map(|_| ())
    }
    fn clone_dir(&self, src: &Path, dst: &Path, readonly: bool) -> io::Result<()> {
        if !is_subvolume(src) {
            // A plain directory (e.g. made before the volume was btrfs):
            // fall back to a per-file clone.
            return Walk { reflink: true }.clone_dir(src, dst, readonly);
        }
        let mut cmd = Command::new("btrfs");
        cmd.args(["subvolume", "snapshot"]);
        if readonly {
            cmd.arg("-r");
        }
        run(cmd.arg(src).arg(dst)).map(|_| ())
    }
    fn delete_dir(&self, path: &Path) -> io::Result<()> {
        if fs::symlink_metadata(path).is_err() {
            return Ok(());
        }
        if is_subvolume(path) {
            // A read-only snapshot must be made writable before deletion
            // when not root; as root `subvolume delete` works either way.
            let _ = run(Command::new("btrfs")
                .args(["property", "set", "-ts"])
                .arg(path)
                .args(["ro", "false"]));
            run(Command::new("btrfs")
                .args(["subvolume", "delete"])
                .arg(path))
            .map(|_| ())
        } else {
            fs::remove_dir_all(path)
        }
    }
    fn exclusive_bytes_is_slow(&self) -> bool {
        true
    }
    fn exclusive_bytes(&self, path: &Path) -> Option<u64> {
        let out = run(Command::new("btrfs")
            .args(["filesystem", "du", "-s", "--raw"])
            .arg(path))
        .ok()?;
        // "Total  Exclusive  Set shared  Filename" then one line of numbers.
        let line = out.lines().last()?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
}

struct Walk {
    reflink: bool,
}

fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

impl Walk {
    fn copy_tree(&self, src: &Path, dst: &Path) -> io::Result<()> {
        for entry in walkdir::WalkDir::new(src).follow_links(false) {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    if e.io_error().map(vanished).unwrap_or(false) {
                        continue;
                    }
                    return Err(io::Error::other(e.to_string()));
                }
            };
            let rel = match entry.path().strip_prefix(src) {
                Ok(r) => r,
                Err(_) => continue,
            };
            let target = dst.join(rel);
            let meta = match entry.path().symlink_metadata() {
                Ok(m) => m,
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(e),
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                if rel.as_os_str().is_empty() {
                    fs::create_dir(&target)?;
                } else {
                    match fs::create_dir(&target) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(e),
                    }
                }
                fs::set_permissions(&target, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            } else if ft.is_file() {
                let r = if self.reflink {
                    reflink_copy::reflink(entry.path(), &target)
                } else {
                    fs::copy(entry.path(), &target).map(|_| ())
                };
                match r {
                    Ok(()) => {}
                    Err(e) if vanished(&e) => continue,
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("copying {}: {e}", entry.path().display()),
                        ))
                    }
                }
                fs::set_permissions(&target, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            } else if ft.is_symlink() {
                let link = match fs::read_link(entry.path()) {
                    Ok(l) => l,
                    Err(e) if vanished(&e) => continue,
                    Err(e) => return Err(e),
                };
                std::os::unix::fs::symlink(link, &target)?;
            } else {
                // Sockets, fifos, devices: not part of a data directory.
                continue;
            }
            let _ = std::os::unix::fs::lchown(&target, Some(meta.uid()), Some(meta.gid()));
        }
        Ok(())
    }
}

impl Driver for Walk {
    fn kind(&self) -> DriverKind {
        if self.reflink {
            DriverKind::Reflink
        } else {
            DriverKind::Copy
        }
    }
    fn atomic(&self) -> bool {
        false
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)
    }
    fn clone_dir(&self, src: &Path, dst: &Path, _readonly: bool) -> io::Result<()> {
        if fs::symlink_metadata(dst).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists", dst.display()),
            ));
        }
        let r = self.copy_tree(src, dst);
        if r.is_err() {
            let _ = fs::remove_dir_all(dst);
        }
        r
    }
    fn delete_dir(&self, path: &Path) -> io::Result<()> {
        match fs::remove_dir_all(path) {
            Ok(()) => Ok(()),
            Err(e) if vanished(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
    fn exclusive_bytes(&self, path: &Path) -> Option<u64> {
        if self.reflink {
            None
        } else {
            Some(tree_size(path))
        }
    }
}

/// Sum of the sizes of the regular files under `path`.
pub(crate) fn tree_size(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .follow_links(false)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}
