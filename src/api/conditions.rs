//! The status contract shared by every kind: `Ready`, `Reconciling` and
//! `Stalled` conditions in the `metav1.Condition` shape.

/// Condition type: the object is usable.
pub const READY: &str = "Ready";
/// Condition type: work is under way.
pub const RECONCILING: &str = "Reconciling";
/// Condition type: a failure that will not fix itself.
pub const STALLED: &str = "Stalled";
