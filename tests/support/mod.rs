//! Shared support for integration tests. Each test binary compiles this
//! module and uses a part of it.
#![allow(dead_code)]

pub mod apiserver;
pub mod branch_scenario;
pub mod compute_runner;
pub mod restore_harness;
pub mod widget;
