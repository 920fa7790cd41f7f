//! Objects in use: an operation holds keys (`t:<timeline>`, `s:<snapshot>`,
//! `b:<base path>`, `r:<timeline>:<ordinal>`, `roll:<timeline>`) from its
//! planning to its end, so a delete of something it reads is refused with
//! `Busy` instead of pulling the data from under it.

use std::sync::Arc;

use super::meta::BaseRow;
use super::{bases, Engine, Inner};

/// Holds objects in use by a running operation; released on drop.
pub(super) struct InUse {
    inner: Arc<Inner>,
    pub(super) keys: Vec<String>,
}

impl Drop for InUse {
    fn drop(&mut self) {
        if let Ok(mut m) = self.inner.in_use.lock() {
            for k in &self.keys {
                if let Some(n) = m.get_mut(k) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(k);
                    }
                }
            }
        }
    }
}

/// The objects a replay from `base` reads: its timeline's archive and, for
/// a snapshot base, the snapshot.
pub(super) fn base_keys(base: &BaseRow) -> Vec<String> {
    let mut keys = vec![format!("t:{}", base.timeline), bases::base_key(&base.path)];
    if let Some(s) = &base.snapshot {
        keys.push(format!("s:{s}"));
    }
    keys
}

impl Engine {
    pub(super) fn acquire(&self, keys: Vec<String>) -> InUse {
        if let Ok(mut m) = self.inner.in_use.lock() {
            for k in &keys {
                *m.entry(k.clone()).or_insert(0) += 1;
            }
        }
        InUse {
            inner: self.inner.clone(),
            keys,
        }
    }

    /// Takes `key` only when nobody holds it.
    pub(super) fn try_acquire(&self, key: String) -> Option<InUse> {
        let mut m = self.inner.in_use.lock().ok()?;
        if m.contains_key(&key) {
            return None;
        }
        m.insert(key.clone(), 1);
        drop(m);
        Some(InUse {
            inner: self.inner.clone(),
            keys: vec![key],
        })
    }

    /// One guard holding `guard`'s objects and `more`.
    pub(super) fn join(&self, guard: InUse, more: Vec<String>) -> InUse {
        let mut keys = guard.keys.clone();
        keys.extend(more);
        let joined = self.acquire(keys);
        drop(guard);
        joined
    }

    pub(super) fn in_use(&self, key: &str) -> bool {
        self.inner
            .in_use
            .lock()
            .map(|m| m.contains_key(key))
            .unwrap_or(true)
    }
}
