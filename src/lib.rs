//! pgbranch: PostgreSQL branches, snapshots and restores as Kubernetes
//! custom resources.
//!
//! Modules follow the architecture in `DESIGN.md`:
//! * [`api`]: the CRD types (`pgbranch.dev/v1alpha1`);
//! * [`controller`]: one controller per kind, on `kube_runtime::Controller`;
//! * [`compute`]: the Kubernetes objects a branch owns (Deployment, Service,
//!   Secret), built as pure functions;
//! * [`storage`]: the `Storage` trait, the copy-on-write engine and its HTTP
//!   service and client;
//! * [`cli`]: the `pgbranch` command line.

pub mod api;
pub mod cli;
pub mod compute;
pub mod controller;
pub mod local;
pub mod storage;
