//! The applied-content hash: an object the operator applies carries a hash
//! of its desired content, so an unchanged object is never re-applied (no
//! write in steady state).

use std::collections::BTreeMap;

use kube::Resource;

use crate::api::ANNOTATION_APPLIED_HASH;

/// A stable hash of an object's desired content (FNV-1a over its JSON), put
/// in [`ANNOTATION_APPLIED_HASH`] so unchanged objects are not re-applied.
pub fn content_hash<T: serde::Serialize>(obj: &T) -> String {
    let bytes = serde_json::to_vec(obj).unwrap_or_default();
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Sets [`ANNOTATION_APPLIED_HASH`] on an object to the hash of its content.
pub fn stamp_hash<K: Resource + serde::Serialize>(mut obj: K) -> K {
    let hash = content_hash(&obj);
    obj.meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_APPLIED_HASH.into(), hash);
    obj
}

/// Whether an existing object already carries the desired object's hash.
pub fn is_up_to_date<K: Resource>(existing: &K, desired: &K) -> bool {
    let get = |k: &K| {
        k.meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_APPLIED_HASH))
            .cloned()
    };
    matches!((get(existing), get(desired)), (Some(a), Some(b)) if a == b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::build_service;
    use crate::compute::fixtures::branch;

    #[test]
    fn hash_stamp_detects_changes() {
        let b = branch("dev");
        let a = stamp_hash(build_service(&b, "aaaa").unwrap());
        let same = stamp_hash(build_service(&b, "aaaa").unwrap());
        let other = stamp_hash(build_service(&b, "bbbb").unwrap());
        assert!(is_up_to_date(&a, &same));
        assert!(!is_up_to_date(&a, &other));
        let unstamped = build_service(&b, "aaaa").unwrap();
        assert!(!is_up_to_date(&unstamped, &a));
    }
}
