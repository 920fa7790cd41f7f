//! The Branch lifecycle with the real operator (`controller::run()`) on a
//! real control plane (kube-apiserver + kube-controller-manager), the real
//! storage engine (copy driver in a temp dir) and real PostgreSQL computes
//! run by the test kubelet: root, children at head and in the past, own
//! passwords, SQL-applied spec changes, steady state, suspend, expiry, bad
//! input, foreign objects, protection and deletion rules.

mod support;

use support::branch_scenario;
use support::world::World;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn branch_lifecycle_on_real_postgres() {
    let Some(mut w) = World::new("branch-lifecycle").await else {
        return;
    };
    w.start_operator(w.config());
    branch_scenario::run(&w).await;
    w.shutdown().await;
}

/// What a real apiserver does now and then, injected on the operator's
/// client: status writes refused with 409 Conflict, Deployment and Secret
/// writes failing with 500, and every watch stream cut. The operator
/// retries, re-reads and re-watches: the branch becomes Ready, a later
/// spec change is still seen and applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_rides_out_conflicts_server_errors_and_dropped_watches() {
    use pgbranch::api::{Branch, BranchSpec, DatabaseSpec, RoleSpec};
    use support::traffic::Fault;
    use support::world::*;

    let Some(mut w) = World::new("faults").await else {
        return;
    };
    w.traffic.inject(
        Fault::new("patch", "branches")
            .subresource("status")
            .code(409)
            .times(3),
    );
    w.traffic
        .inject(Fault::new("patch", "deployments").code(500).times(2));
    w.traffic
        .inject(Fault::new("patch", "secrets").code(500).times(2));
    w.start_operator(w.config());
    let cut = {
        let t = w.traffic.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
                t.break_watches();
            }
        })
    };
    create_branch(&w.client, &shop_branch("main")).await;
    wait_ready(&w.client, "main").await;
    assert_eq!(
        w.traffic.faults_pending(),
        0,
        "every injected fault was hit"
    );
    let injected: Vec<_> = w
        .traffic
        .requests()
        .into_iter()
        .filter(|r| r.injected)
        .map(|r| (r.resource, r.code))
        .collect();
    assert_eq!(injected.len(), 7, "{injected:?}");
    let watches = w
        .traffic
        .requests()
        .iter()
        .filter(|r| r.verb == "watch" && r.resource == "branches")
        .count();
    assert!(
        watches >= 2,
        "the Branch watch was cut and restarted ({watches} watches)"
    );

    // A change made while watches keep being cut is still applied.
    let api = branches(&w.client);
    let mut b: Branch = api.get("main").await.unwrap();
    b.spec = BranchSpec {
        databases: vec![
            DatabaseSpec {
                name: "shop".into(),
                owner: Some("shop".into()),
            },
            DatabaseSpec {
                name: "reports".into(),
                owner: Some("shop".into()),
            },
        ],
        roles: vec![RoleSpec {
            name: "shop".into(),
        }],
        ..b.spec
    };
    api.replace("main", &Default::default(), &b).await.unwrap();
    wait_ready(&w.client, "main").await;
    let pw = secret_field(&w.client, "main-app", "password").await;
    w.connect("main", "shop", &pw, "reports")
        .await
        .expect("the database added under faults exists");
    cut.abort();
    w.shutdown().await;
}
