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
//! * [`local`]: local mode, the engine without Kubernetes (a daemon with
//!   real `postgres` computes behind fixed ports);
//! * [`point`]: the one parser of points (`lsn` / `timestamp`) and RFC 3339
//!   times, shared by the controllers, local mode and the command line;
//! * [`backup`]: object-storage destinations (S3 and compatible) and the
//!   backup tool (barman-cloud) the storage engine archives with;
//! * [`cli`]: the `pgbranch` command line.

pub mod api;
pub mod backup;
pub mod cli;
pub mod compute;
pub mod controller;
pub mod local;
pub mod point;
pub mod storage;
