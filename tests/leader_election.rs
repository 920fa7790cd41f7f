//! Leader election between real `pgbranch operator` processes on a real
//! kube-apiserver (etcd + kube-apiserver from `$KUBEBUILDER_ASSETS`; without
//! it the test prints "skipped: KUBEBUILDER_ASSETS not set" and passes).
//!
//! Both processes run on the same host with neither `POD_NAME` nor
//! `HOSTNAME` set, as a developer would start them: each must still take
//! part under its own identity, so only one leads at a time, the second
//! takes over when the first stops (SIGTERM, Lease released) or dies
//! (SIGKILL, Lease left to expire), in both cases within 15 s.

mod control_plane;

use std::time::{Duration, Instant};

use control_plane::{ControlPlane, Proc};

const FAILOVER_LIMIT: Duration = Duration::from_secs(15);

/// `pgbranch_leader` from the operator's /metrics (None: not answering).
async fn leading(port: u16) -> Option<bool> {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let line = body.lines().find(|l| l.starts_with("pgbranch_leader "))?;
    Some(line.trim_end().ends_with(" 1"))
}

/// Waits until `cond` holds; returns how long it took.
async fn until<F, Fut>(what: &str, limit: Duration, logs: &[&Proc], mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        if start.elapsed() > limit {
            let logs: Vec<String> = logs.iter().map(|p| p.log()).collect();
            panic!("{what}: not within {limit:?}\n{}", logs.join("\n-----\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_failover_within_15_s() {
    let Some(cp) = ControlPlane::start().await else {
        return;
    };

    // The first process leads.
    let (a, a_port) = cp.operator("a");
    until(
        "process a leads",
        Duration::from_secs(60),
        &[&a],
        || async { leading(a_port).await == Some(true) && cp.holder().await.is_some() },
    )
    .await;
    let a_id = cp.holder().await.unwrap();

    // The second one waits: it answers /metrics but does not lead, and the
    // Lease stays with the first, past a full Lease duration.
    let (b, b_port) = cp.operator("b");
    until(
        "process b answers",
        Duration::from_secs(30),
        &[&b],
        || async { leading(b_port).await.is_some() },
    )
    .await;
    let watch_until = Instant::now() + Duration::from_secs(13);
    while Instant::now() < watch_until {
        assert_eq!(
            leading(b_port).await,
            Some(false),
            "a second process leads while the first holds the Lease:\n{}",
            b.log()
        );
        assert_eq!(leading(a_port).await, Some(true), "{}", a.log());
        assert_eq!(cp.holder().await.as_deref(), Some(a_id.as_str()));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!b.log().contains("became the leader"), "{}", b.log());

    // The first stops (SIGTERM): it releases the Lease and exits cleanly;
    // the second takes over in time and keeps running.
    a.signal(nix::sys::signal::Signal::SIGTERM);
    let mut a = a;
    let status = tokio::task::spawn_blocking(move || {
        let s = a.child.wait().unwrap();
        (s, a)
    });
    let (status, a) = tokio::time::timeout(Duration::from_secs(30), status)
        .await
        .expect("process a exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "process a: {status}\n{}", a.log());
    let took = until("process b takes over", FAILOVER_LIMIT, &[&b], || async {
        leading(b_port).await == Some(true)
    })
    .await;
    eprintln!("failover after SIGTERM: {took:?}");
    let b_id = cp.holder().await.unwrap();
    assert_ne!(b_id, a_id, "the Lease must name the new leader");

    // A third process waits; the leader dies without releasing the Lease
    // (SIGKILL, like a force-deleted Pod): the third takes over once the
    // Lease expires, still within 15 s.
    let (c, c_port) = cp.operator("c");
    until(
        "process c answers",
        Duration::from_secs(30),
        &[&c],
        || async { leading(c_port).await == Some(false) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(leading(c_port).await, Some(false), "{}", c.log());
    b.signal(nix::sys::signal::Signal::SIGKILL);
    let took = until(
        "process c takes over a dead leader's Lease",
        FAILOVER_LIMIT,
        &[&c],
        || async { leading(c_port).await == Some(true) },
    )
    .await;
    eprintln!("failover after SIGKILL: {took:?}");
    let c_id = cp.holder().await.unwrap();
    assert!(c_id != b_id && c_id != a_id, "{c_id}");
    assert!(!c.log().contains("lost"), "{}", c.log());
}
