//! The names of the objects scheduled runs create: deterministic per slot
//! (a retried run finds its object instead of making a second one), and
//! shortened with a hash to fit Kubernetes' 63-character limits.

use jiff::Timestamp;

use crate::api::MAX_DNS_LABEL_LEN;

/// A stable 32-bit FNV-1a hash, for shortened names (the same in every
/// build, unlike `std`'s hasher).
fn fnv1a(text: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// `name` shortened to at most `max` characters: unchanged when it fits,
/// else a prefix and 8 hex digits of a hash of the whole name (two long
/// names sharing a prefix stay distinct). Never ends in `-` or `.`.
pub fn shorten(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_string();
    }
    let hash = format!("{:08x}", fnv1a(name));
    let keep = max.saturating_sub(hash.len() + 1);
    let mut end = keep.min(name.len());
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let prefix = name[..end].trim_end_matches(['-', '.']);
    if prefix.is_empty() {
        hash
    } else {
        format!("{prefix}-{hash}")
    }
}

/// The name of the object a run creates: `<owner>-<yyyymmddhhmm>` of the
/// run's slot in UTC (`<owner>` shortened so the name is at most 63
/// characters). The same slot always gives the same name, so a retried run
/// finds its object instead of making a second one.
pub fn run_name(owner: &str, slot: Timestamp) -> String {
    run_name_with(owner, "", slot)
}

/// [`run_name`] with an infix: `<owner><infix>-<yyyymmddhhmm>`.
pub fn run_name_with(owner: &str, infix: &str, slot: Timestamp) -> String {
    run_name_max(owner, infix, slot, MAX_DNS_LABEL_LEN)
}

/// [`run_name_with`] of at most `max` characters.
pub fn run_name_max(owner: &str, infix: &str, slot: Timestamp, max: usize) -> String {
    let stamp = slot.strftime("%Y%m%d%H%M").to_string();
    let room = max.saturating_sub(stamp.len() + 1);
    let base = shorten(&format!("{owner}{infix}"), room);
    format!("{base}-{stamp}")
}

/// A label value naming `name` (label values are at most 63 characters).
pub fn label_value(name: &str) -> String {
    shorten(name, MAX_DNS_LABEL_LEN)
}

#[cfg(test)]
mod tests {
    use super::super::ts;
    use super::*;

    #[test]
    fn run_names_are_deterministic_and_fit() {
        let t = ts("2026-03-29T01:00:00Z");
        assert_eq!(run_name("nightly", t), "nightly-202603290100");
        assert_eq!(run_name("nightly", t), run_name("nightly", t));
        assert_ne!(
            run_name("nightly", t),
            run_name("nightly", ts("2026-03-29T01:01:00Z"))
        );
        let long_a = format!("{}-a", "x".repeat(80));
        let long_b = format!("{}-b", "x".repeat(80));
        let (a, b) = (run_name(&long_a, t), run_name(&long_b, t));
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
        assert!(a.ends_with("-202603290100"));
        assert!(crate::api::validate_dns_label(&a).is_ok(), "{a}");
        let r = run_name_with("dev", "-refresh", t);
        assert_eq!(r, "dev-refresh-202603290100");
        assert!(label_value(&"y".repeat(100)).len() <= 63);
        assert_eq!(label_value("nightly"), "nightly");
    }
}
