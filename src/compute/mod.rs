//! The Kubernetes objects a branch owns, built as pure functions.
