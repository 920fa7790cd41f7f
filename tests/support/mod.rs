//! Shared support of the operator tests (tiers 3 and 4), in one place:
//! * [`cluster`]: the binary's real control plane (etcd, kube-apiserver,
//!   kube-controller-manager);
//! * [`kubelet`]: the one stand-in, running real PostgreSQL for compute Pods;
//! * [`pod_volumes`]: the kubelet's Secret and emptyDir volumes and init
//!   containers;
//! * [`traffic`]: the operator's requests recorded, faults injected;
//! * [`world`]: one test's world (namespace, engine, kubelet, operator) and
//!   the helpers every scenario uses;
//! * [`binary`]: the real `pgbranch operator` binary in a world;
//! * [`branch_scenario`]: the Branch lifecycle scenario;
//! * [`times`]: calendar helpers of the schedule tests;
//! * [`tls`]: TLS clients and `psql` for tests of compute TLS;
//! * [`object_store`]: a real S3-compatible object store (Garage).
//!
//! Each test binary compiles this module and uses a part of it.
#![allow(dead_code)]

pub mod binary;
pub mod branch_scenario;
pub mod cluster;
pub mod kubelet;
pub mod object_store;
pub mod pod_volumes;
pub mod times;
pub mod tls;
pub mod traffic;
pub mod world;

/// kube and reqwest compile in two rustls crypto providers; a process
/// must pick one before it makes a TLS client.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
