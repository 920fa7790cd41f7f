//! The operator: one controller per kind.
