//! Tier 5: what the API server itself refuses, on a real cluster with
//! pgbranch installed — the ValidatingAdmissionPolicy that keeps protected
//! branches, and the CRDs' CEL rules (422 with the rule's message).
//!
//! Runs only when `PGBRANCH_E2E_KUBECONFIG` is set (see docs/e2e.md);
//! otherwise each test prints `skipped: PGBRANCH_E2E_KUBECONFIG not set`.

mod e2e;

use e2e::*;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::DeleteParams;
use kube::Api;
use pgbranch::api::{
    Branch, BranchSpec, ComputeSpec, ParentRef, RestoreSource, Snapshot, SnapshotRestore,
    SnapshotRestoreSpec, SnapshotSpec, MSG_LSN, MSG_POINT_EXCLUSIVE,
};
use serde_json::json;

/// 422 Unprocessable Entity: what a CEL rule's refusal comes back as.
const INVALID: u16 = 422;

/// Deleting a protected Branch is denied by the chart's
/// ValidatingAdmissionPolicy with its message; nothing happens to the
/// branch. After `protected: false` the same delete goes through and the
/// branch's Service and Secret go with it.
#[tokio::test]
async fn protected_branch_delete_is_denied() {
    let Some(env) = env("protected_branch_delete_is_denied").await else {
        return;
    };
    let ns = TestNamespace::create(&env, "protected").await;
    let n = ns.name.as_str();
    let branches: Api<Branch> = Api::namespaced(env.client.clone(), n);

    create(
        &env,
        n,
        Branch::new(
            "prod",
            BranchSpec {
                protected: true,
                ..Default::default()
            },
        ),
    )
    .await;
    wait_ready(&env, &branches, "prod").await;
    sql(
        &env,
        n,
        "prod",
        &[
            "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL)",
            "INSERT INTO items VALUES (1, 'kept')",
        ],
    )
    .await;

    let denied = branches.delete("prod", &DeleteParams::default()).await;
    let status = api_refusal(denied, "delete a protected branch");
    assert_eq!(
        status.code, 403,
        "the policy's reason is Forbidden: {status:?}"
    );
    assert!(
        status.message.contains(
            "Branch prod is protected: set spec.protected to false first, then delete it"
        ),
        "the policy's message: {:?}",
        status.message
    );
    let prod = branches.get("prod").await.expect("prod still exists");
    assert!(
        prod.metadata.deletion_timestamp.is_none(),
        "a denied delete leaves no deletionTimestamp"
    );
    assert_eq!(items(&env, n, "prod").await, vec!["1|kept".to_string()]);

    // Unprotect (a new generation the operator reports on), then delete.
    merge_patch(&branches, "prod", json!({"spec": {"protected": false}}))
        .await
        .expect("unprotect");
    let prod = wait_ready(&env, &branches, "prod").await;
    assert_eq!(prod.metadata.generation, Some(2));
    branches
        .delete("prod", &DeleteParams::default())
        .await
        .expect("delete after unprotecting");
    wait_gone(&env, &branches, "prod").await;
    let services: Api<Service> = Api::namespaced(env.client.clone(), n);
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), n);
    wait_gone(&env, &services, "prod").await;
    wait_gone(&env, &secrets, "prod-app").await;

    ns.delete_and_wait(&env).await;
}

fn child(name: &str, parent: &str) -> Branch {
    Branch::new(
        name,
        BranchSpec {
            parent: Some(ParentRef {
                branch: parent.into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
}

/// The CRDs' CEL rules as the real API server runs them: each refusal is a
/// 422 carrying the rule's message, on create and on update (transition
/// rules with `oldSelf`).
#[tokio::test]
async fn cel_rules_reject_with_422() {
    let Some(env) = env("cel_rules_reject_with_422").await else {
        return;
    };
    let ns = TestNamespace::create(&env, "cel").await;
    let n = ns.name.as_str();
    let branches: Api<Branch> = Api::namespaced(env.client.clone(), n);
    let snapshots: Api<Snapshot> = Api::namespaced(env.client.clone(), n);
    let restores: Api<SnapshotRestore> = Api::namespaced(env.client.clone(), n);
    let pp = kube::api::PostParams::default();

    // Create: lsn and timestamp together.
    let mut both = child("both", "main");
    if let Some(p) = both.spec.parent.as_mut() {
        p.lsn = Some("0/16B3740".into());
        p.timestamp = Some("2026-01-02T15:04:05Z".into());
    }
    assert_refused(
        branches.create(&pp, &in_ns(both, n)).await,
        INVALID,
        MSG_POINT_EXCLUSIVE,
        "Branch with parent.lsn and parent.timestamp",
    );
    // Create: a malformed LSN.
    let mut bad_lsn = child("bad-lsn", "main");
    if let Some(p) = bad_lsn.spec.parent.as_mut() {
        p.lsn = Some("16-B3733C50".into());
    }
    assert_refused(
        branches.create(&pp, &in_ns(bad_lsn, n)).await,
        INVALID,
        MSG_LSN,
        "Branch with a malformed LSN",
    );
    // Create: a name with no room for the operator's suffixes.
    assert_refused(
        branches
            .create(
                &pp,
                &in_ns(Branch::new(&"a".repeat(45), BranchSpec::default()), n),
            )
            .await,
        INVALID,
        "at most 44 characters",
        "Branch with a 45-character name",
    );

    // Update: the parent and point are immutable (a child whose parent does
    // not exist is enough: the rule is the API server's, not the operator's).
    create(&env, n, child("child", "main")).await;
    // (The operator says what is wrong with it: Stalled, naming the parent.)
    let stalled = wait_for(
        &env,
        &branches,
        "child",
        "Stalled for the missing parent",
        |b| {
            condition(b, "Stalled").is_some_and(|c| c.status == "True")
                && observed_generation(b) == b.metadata.generation
        },
    )
    .await;
    let why = condition(&stalled, "Stalled").unwrap();
    assert!(
        why.message.contains("main"),
        "Stalled message names the parent: {why:?}"
    );
    assert_eq!(
        condition(&stalled, "Ready").map(|c| c.status),
        Some("False".into())
    );
    for (patch, what) in [
        (
            json!({"spec": {"parent": {"branch": "other"}}}),
            "another parent",
        ),
        (
            json!({"spec": {"parent": {"lsn": "0/16B3740"}}}),
            "adding a point",
        ),
        (json!({"spec": {"parent": null}}), "removing the parent"),
    ] {
        assert_refused(
            merge_patch(&branches, "child", patch).await,
            INVALID,
            "spec.parent is immutable",
            what,
        );
    }
    // ... and a root cannot gain a parent.
    create(
        &env,
        n,
        Branch::new(
            "solo",
            BranchSpec {
                compute: ComputeSpec {
                    enabled: false,
                    ..Default::default()
                },
                ..Default::default()
            },
        ),
    )
    .await;
    assert_refused(
        merge_patch(
            &branches,
            "solo",
            json!({"spec": {"parent": {"branch": "child"}}}),
        )
        .await,
        INVALID,
        "spec.parent is immutable",
        "giving a root branch a parent",
    );
    // Mutable fields still are.
    merge_patch(
        &branches,
        "child",
        json!({"spec": {"protected": false, "expiresAt": "2099-01-01T00:00:00Z"}}),
    )
    .await
    .expect("expiresAt and protected can change");

    // Snapshot: point exclusivity on create; the spec is immutable.
    assert_refused(
        snapshots
            .create(
                &pp,
                &in_ns(
                    Snapshot::new(
                        "snap-both",
                        SnapshotSpec {
                            branch: "child".into(),
                            lsn: Some("0/1".into()),
                            timestamp: Some("2026-01-02T15:04:05Z".into()),
                            ..Default::default()
                        },
                    ),
                    n,
                ),
            )
            .await,
        INVALID,
        MSG_POINT_EXCLUSIVE,
        "Snapshot with lsn and timestamp",
    );
    create(
        &env,
        n,
        Snapshot::new(
            "snap",
            SnapshotSpec {
                branch: "child".into(),
                ..Default::default()
            },
        ),
    )
    .await;
    assert_refused(
        merge_patch(&snapshots, "snap", json!({"spec": {"branch": "solo"}})).await,
        INVALID,
        "a Snapshot's spec is immutable",
        "changing a Snapshot's branch",
    );

    // SnapshotRestore: target required to finalize; own history needs
    // preserveUnderName; spec immutable except finalize false -> true.
    let restore = |name: &str, source: RestoreSource, target: Option<&str>, finalize: bool| {
        in_ns(
            SnapshotRestore::new(
                name,
                SnapshotRestoreSpec {
                    source,
                    target: target.map(str::to_string),
                    finalize,
                    ..Default::default()
                },
            ),
            n,
        )
    };
    let snap_source = || RestoreSource {
        snapshot: Some("snap".into()),
        ..Default::default()
    };
    assert_refused(
        restores
            .create(&pp, &restore("no-target", snap_source(), None, true))
            .await,
        INVALID,
        "target is required when finalize is true",
        "finalize without a target",
    );
    assert_refused(
        restores
            .create(
                &pp,
                &restore(
                    "own-past",
                    RestoreSource {
                        branch: Some("solo".into()),
                        timestamp: Some("2026-01-02T15:04:05Z".into()),
                        ..Default::default()
                    },
                    Some("solo"),
                    true,
                ),
            )
            .await,
        INVALID,
        "restoring a branch to its own history needs preserveUnderName",
        "restore to own history without preserveUnderName",
    );
    restores
        .create(&pp, &restore("later", snap_source(), Some("solo"), false))
        .await
        .expect("a multi-step restore");
    assert_refused(
        merge_patch(&restores, "later", json!({"spec": {"target": "child"}})).await,
        INVALID,
        "spec is immutable except finalize",
        "changing a restore's target",
    );
    restores
        .create(&pp, &restore("at-once", snap_source(), Some("solo"), true))
        .await
        .expect("a one-step restore");
    assert_refused(
        merge_patch(&restores, "at-once", json!({"spec": {"finalize": false}})).await,
        INVALID,
        "finalize cannot go back to false once true",
        "finalize true -> false",
    );

    ns.delete_and_wait(&env).await;
}
