//! pgbranch: PostgreSQL branches, snapshots and restores as Kubernetes
//! custom resources.
//!
//! Modules follow the layers in `ARCHITECTURE.md` (`cli` → `controller` →
//! {`compute`, `local`, `point`} → {`storage`, `api`}):
//! * [`api`]: the CRD types (`pgbranch.dev/v1alpha1`), conditions, names,
//!   labels and annotations;
//! * [`cli`]: the `pgbranch` command line (`operator`, `storage`, `local`,
//!   `crd`);
//! * [`compute`]: the Kubernetes objects a branch owns (Deployments,
//!   Services, Secrets), built as pure functions;
//! * [`controller`]: the operator, one controller per kind on
//!   `kube_runtime::Controller`, and the kit they share;
//! * [`local`]: local mode, the engine without Kubernetes (a daemon with
//!   real `postgres` computes behind fixed ports);
//! * [`point`]: the one parser of points (`lsn` / `timestamp`) and RFC 3339
//!   times, shared by the controllers, local mode and the command line;
//! * [`backup`]: object-storage destinations (S3 and compatible) and the
//!   backup tool (barman-cloud) the storage engine archives with;
//! * [`storage`]: the `Storage` trait, the copy-on-write engine and its HTTP
//!   service and client.

pub mod api;
pub mod backup;
pub mod cli;
pub mod compute;
pub mod controller;
pub mod local;
pub mod point;
pub mod storage;
