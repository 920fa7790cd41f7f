//! The size cache: logical and exclusive bytes of timelines and snapshots,
//! measured at most every [`SIZE_TTL`] because callers poll, the slow
//! measurements (btrfs extents) in the background; the WAL archive's total
//! (at most every [`WAL_TTL`]) and the volume's usage (`statvfs`) for
//! `info`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{driver, Engine, Inner};
use crate::storage::StorageError;

/// Logical and exclusive bytes of an object.
pub(super) type Sizes = (u64, Option<u64>);

/// How long measured sizes are reused.
const SIZE_TTL: Duration = Duration::from_secs(10);

/// How long the WAL archive's total size is reused (the operator polls
/// `info` every minute or so; anyone else may poll more often).
const WAL_TTL: Duration = Duration::from_secs(30);

/// The size cache's key of the WAL archive's total.
const WAL_KEY: &str = "wal";

/// Total and used bytes of a filesystem from its `statvfs` figures: blocks,
/// free blocks (the root-reserved ones included, as `df` counts "used") and
/// the fragment size they are counted in.
pub(super) fn volume_bytes(blocks: u64, free: u64, fragment: u64) -> (u64, u64) {
    let total = blocks.saturating_mul(fragment);
    let used = blocks.saturating_sub(free).saturating_mul(fragment);
    (total, used)
}

/// The sizes last measured of one timeline or snapshot.
#[derive(Debug, Default)]
pub(super) struct SizeEntry {
    logical: Option<(std::time::Instant, u64)>,
    exclusive: Option<(std::time::Instant, Option<u64>)>,
    /// A background measurement of the exclusive bytes is under way.
    measuring: bool,
}

/// Bytes only `data` (plus the `extra` directories that belong to the same
/// object, e.g. a timeline's base) holds; `None` when the driver can't tell.
fn exclusive_of(i: &Inner, data: &Path, extra: &[PathBuf]) -> Option<u64> {
    let mut total = i.driver.exclusive_bytes(data)?;
    for p in extra {
        total += i.driver.exclusive_bytes(p).unwrap_or(0);
    }
    Some(total)
}

impl Engine {
    /// Sizes of an object (`data`, plus `extra` directories counted in its
    /// exclusive bytes), measured at most every [`SIZE_TTL`] because callers
    /// poll. The logical size is a walk of `stat` calls (cheap whatever the
    /// data's size) and is measured on the caller's path. Exclusive bytes
    /// that cost time growing with the data (btrfs reads every extent) are
    /// measured in the background: the caller gets the last value, `None`
    /// until the first measurement lands. So a new timeline is `Ready` for
    /// its caller as soon as it is made, at any size.
    pub(super) async fn measured(
        &self,
        key: String,
        data: PathBuf,
        extra: Vec<PathBuf>,
    ) -> Result<Sizes, StorageError> {
        let slow = self.inner.driver.exclusive_bytes_is_slow();
        let (fresh_logical, cached_excl, start_bg) = {
            let mut c = self
                .inner
                .sizes
                .lock()
                .map_err(|_| StorageError::internal("the size cache is poisoned"))?;
            let e = c.entry(key.clone()).or_default();
            let fresh = |at: &std::time::Instant| at.elapsed() < SIZE_TTL;
            let fresh_logical = e.logical.filter(|(at, _)| fresh(at)).map(|(_, v)| v);
            let cached_excl = e.exclusive.map(|(at, v)| (fresh(&at), v));
            let start_bg = slow && !matches!(cached_excl, Some((true, _))) && !e.measuring;
            if start_bg {
                e.measuring = true;
            }
            (fresh_logical, cached_excl, start_bg)
        };
        if start_bg {
            let me = self.clone();
            let (k, d, x) = (key.clone(), data.clone(), extra.clone());
            tokio::spawn(async move {
                let v = me
                    .blocking("measuring exclusive bytes", move |i| {
                        Ok(exclusive_of(i, &d, &x))
                    })
                    .await;
                if let Ok(mut c) = me.inner.sizes.lock() {
                    // No entry: the object was deleted meanwhile.
                    if let Some(e) = c.get_mut(&k) {
                        e.measuring = false;
                        if let Ok(v) = v {
                            e.exclusive = Some((std::time::Instant::now(), v));
                        }
                    }
                }
            });
        }
        let excl_now = !slow && !matches!(cached_excl, Some((true, _)));
        let last_excl = cached_excl.and_then(|(_, v)| v);
        if let (Some(l), false) = (fresh_logical, excl_now) {
            return Ok((l, last_excl));
        }
        let (l, ex) = self
            .blocking("measuring sizes", move |i| {
                let l = match fresh_logical {
                    Some(l) => l,
                    None => driver::tree_size(&data),
                };
                let ex = excl_now.then(|| exclusive_of(i, &data, &extra));
                Ok((l, ex))
            })
            .await?;
        if let Ok(mut c) = self.inner.sizes.lock() {
            let e = c.entry(key).or_default();
            let now = std::time::Instant::now();
            e.logical = Some((now, l));
            if let Some(ex) = ex {
                e.exclusive = Some((now, ex));
            }
        }
        Ok((l, ex.unwrap_or(last_excl)))
    }

    /// Total and used bytes of the filesystem holding the volume root.
    pub(super) async fn volume_usage(&self) -> Result<(u64, u64), StorageError> {
        self.blocking("reading the volume's usage", |i| {
            let s = nix::sys::statvfs::statvfs(&i.root).map_err(std::io::Error::from)?;
            Ok(volume_bytes(
                s.blocks() as u64,
                s.blocks_free() as u64,
                s.fragment_size() as u64,
            ))
        })
        .await
    }

    /// Bytes of every timeline's WAL archive together (`wal/` under the
    /// root), from the size cache when measured less than [`WAL_TTL`] ago:
    /// a walk of `stat` calls, off the runtime's threads.
    pub(super) async fn wal_archive_bytes(&self) -> Result<u64, StorageError> {
        let cached = self
            .inner
            .sizes
            .lock()
            .map_err(|_| StorageError::internal("the size cache is poisoned"))?
            .get(WAL_KEY)
            .and_then(|e| e.logical)
            .filter(|(at, _)| at.elapsed() < WAL_TTL)
            .map(|(_, v)| v);
        if let Some(v) = cached {
            return Ok(v);
        }
        let v = self
            .blocking("measuring the WAL archive", |i| {
                Ok(driver::tree_size(&i.root.join("wal")))
            })
            .await?;
        if let Ok(mut c) = self.inner.sizes.lock() {
            c.entry(WAL_KEY.to_string()).or_default().logical =
                Some((std::time::Instant::now(), v));
        }
        Ok(v)
    }

    pub(super) fn forget_sizes(&self, key: &str) {
        if let Ok(mut c) = self.inner.sizes.lock() {
            c.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_bytes_count_in_fragments() {
        assert_eq!(volume_bytes(100, 25, 4096), (409_600, 307_200));
        // Figures a filesystem should never give do not wrap.
        assert_eq!(volume_bytes(10, 20, 4096), (40_960, 0));
        assert_eq!(volume_bytes(u64::MAX, 0, 4096), (u64::MAX, u64::MAX));
    }
}
