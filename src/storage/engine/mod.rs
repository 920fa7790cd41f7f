//! The embedded copy-on-write storage engine.
