//! Tier 3: scheduled refresh of a Branch from its parent, with the real
//! operator (`controller::run()`), the in-process API server, the real
//! storage engine and a clock the test moves. One SnapshotRestore per slot,
//! none while another operation on the branch is under way (the slot is
//! skipped, the next one runs), one catch-up run after downtime.
//!
//! The SnapshotRestore controller is not part of this build: where a test
//! needs a restore to be finished it writes that status the way the restore
//! controller would.

#[path = "operator_schedule_support/mod.rs"]
mod harness;
mod support;

use std::time::Duration;

use harness::{eventually, next_utc, plus, stamp, World};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::ResourceExt;
use pgbranch::api::{Branch, Snapshot, SnapshotRestore};
use serde_json::json;

fn rfc(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

async fn restore_names(w: &World) -> Vec<String> {
    let mut v: Vec<String> = w
        .api::<SnapshotRestore>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|r| r.name_any())
        .collect();
    v.sort();
    v
}

async fn branch_status(w: &World, name: &str) -> pgbranch::api::BranchStatus {
    w.api::<Branch>()
        .get(name)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

async fn wait_ready(w: &World, name: &str) {
    eventually(60, &format!("branch {name} Ready"), || async {
        let st = branch_status(w, name).await;
        st.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await;
}

/// Waits until exactly `want` restores exist and checks it stays so.
async fn settle_on(w: &World, want: &[String]) {
    let mut want = want.to_vec();
    want.sort();
    eventually(20, &format!("restores {want:?}"), || async {
        (restore_names(w).await == want).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(restore_names(w).await, want, "and nothing more");
}

async fn finish_restore(w: &World, name: &str) {
    w.api::<SnapshotRestore>()
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Completed"}})),
        )
        .await
        .unwrap();
}

async fn skipped_events(w: &World) -> usize {
    let events: Api<K8sEvent> = Api::namespaced(w.client.clone(), "default");
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("RefreshSkipped"))
        .map(|e| e.series.as_ref().map_or(1, |s| s.count as usize))
        .sum()
}

#[tokio::test]
async fn refresh_runs_once_per_slot_and_never_over_another_operation() {
    let t0 = jiff::Timestamp::now();
    let w = World::new(t0).await;
    let op = w.start();
    w.branch("prod", None).await;
    w.branch("dev", Some("prod")).await;
    wait_ready(&w, "prod").await;
    wait_ready(&w, "dev").await;

    // Turning refresh on announces the next slot; nothing runs at once,
    // even though 03:00 of earlier days has passed.
    w.api::<Branch>()
        .patch(
            "dev",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"refresh": {"schedule": "0 3 * * *"}}})),
        )
        .await
        .unwrap();
    let s1 = next_utc(t0, 3, 0);
    let s = |k: i64| plus(s1, 86_400 * k);
    eventually(20, "nextRefreshTime", || async {
        (branch_status(&w, "dev").await.next_refresh_time == Some(rfc(s1))).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        restore_names(&w).await.is_empty(),
        "no refresh before its slot"
    );

    // Slot 1: one SnapshotRestore of the parent at head onto dev.
    w.clock.set(plus(s1, 20));
    let r1 = format!("dev-refresh-{}", stamp(s1));
    settle_on(&w, std::slice::from_ref(&r1)).await;
    let r = w.api::<SnapshotRestore>().get(&r1).await.unwrap();
    assert_eq!(r.spec.source.branch.as_deref(), Some("prod"));
    assert_eq!(r.spec.source.lsn, None);
    assert_eq!(r.spec.source.timestamp, None);
    assert_eq!(r.spec.target.as_deref(), Some("dev"));
    assert!(r.spec.finalize);
    assert_eq!(
        r.spec.preserve_under_name, None,
        "preserve is off by default"
    );
    assert_eq!(r.owner_references()[0].name, "dev");
    let st = branch_status(&w, "dev").await;
    assert_eq!(st.last_refresh_time, Some(rfc(s1)));
    assert_eq!(st.next_refresh_time, Some(rfc(s(1))));

    // Slot 2 while restore 1 is still under way: skipped, not queued.
    w.clock.set(plus(s(1), 20));
    eventually(
        10,
        "nextRefreshTime moves past the skipped slot",
        || async {
            (branch_status(&w, "dev").await.next_refresh_time == Some(rfc(s(2)))).then_some(())
        },
    )
    .await;
    settle_on(&w, std::slice::from_ref(&r1)).await;
    assert!(skipped_events(&w).await >= 1);
    assert_eq!(
        branch_status(&w, "dev").await.last_refresh_time,
        Some(rfc(s1))
    );
    // The restore finishes later that day: still no refresh until slot 3.
    finish_restore(&w, &r1).await;
    w.clock.set(plus(s(1), 3600));
    settle_on(&w, std::slice::from_ref(&r1)).await;

    // Slot 3 while a Snapshot of dev is being taken: skipped too.
    w.create::<Snapshot>(json!({
        "apiVersion": "pgbranch.dev/v1alpha1", "kind": "Snapshot",
        "metadata": {"name": "dev-manual", "namespace": "default"},
        "spec": {"branch": "dev"},
    }))
    .await;
    w.clock.set(plus(s(2), 20));
    eventually(10, "slot 3 skipped", || async {
        (branch_status(&w, "dev").await.next_refresh_time == Some(rfc(s(3)))).then_some(())
    })
    .await;
    settle_on(&w, std::slice::from_ref(&r1)).await;
    w.set_snapshot_status("dev-manual", true, None).await;

    // Slot 4, nothing under way: the second refresh.
    w.clock.set(plus(s(3), 20));
    let r4 = format!("dev-refresh-{}", stamp(s(3)));
    settle_on(&w, &[r1.clone(), r4.clone()]).await;
    finish_restore(&w, &r4).await;

    // Downtime over slots 5..7: one catch-up refresh (the latest), not three.
    op.stop().await;
    w.clock.set(plus(s(6), 7200));
    let _op = w.start();
    let r7 = format!("dev-refresh-{}", stamp(s(6)));
    settle_on(&w, &[r1, r4, r7]).await;
    let st = branch_status(&w, "dev").await;
    assert_eq!(st.last_refresh_time, Some(rfc(s(6))));
    assert_eq!(st.next_refresh_time, Some(rfc(s(7))));
}

#[tokio::test]
async fn preserve_names_the_backup_and_suspend_stops_refreshes() {
    let t0 = jiff::Timestamp::now();
    let w = World::new(t0).await;
    let _op = w.start();
    w.branch("prod", None).await;
    w.branch("dev", Some("prod")).await;
    wait_ready(&w, "prod").await;
    wait_ready(&w, "dev").await;
    w.api::<Branch>()
        .patch(
            "dev",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"refresh": {
                "schedule": "0 3 * * *", "timeZone": "Europe/Berlin", "preserve": true,
            }}})),
        )
        .await
        .unwrap();
    let announced = eventually(20, "nextRefreshTime", || async {
        branch_status(&w, "dev").await.next_refresh_time
    })
    .await;
    let slot: jiff::Timestamp = announced.parse().unwrap();
    // 03:00 in Berlin is 01:00 or 02:00 UTC.
    let hour = slot.to_zoned(jiff::tz::TimeZone::UTC).hour();
    assert!(hour == 1 || hour == 2, "{announced}");
    w.clock.set(plus(slot, 5));
    let name = format!("dev-refresh-{}", stamp(slot));
    settle_on(&w, std::slice::from_ref(&name)).await;
    let r = w.api::<SnapshotRestore>().get(&name).await.unwrap();
    assert_eq!(
        r.spec.preserve_under_name,
        Some(format!("dev-old-{}", slot.strftime("%Y%m%d%H%M%S")))
    );
    finish_restore(&w, &name).await;

    // Suspended: no next refresh, and none runs.
    w.api::<Branch>()
        .patch(
            "dev",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"refresh": {"suspend": true}}})),
        )
        .await
        .unwrap();
    eventually(10, "nextRefreshTime cleared", || async {
        branch_status(&w, "dev")
            .await
            .next_refresh_time
            .is_none()
            .then_some(())
    })
    .await;
    w.clock.set(plus(slot, 3 * 86_400));
    settle_on(&w, std::slice::from_ref(&name)).await;
    // Resumed: the next slot is announced; nothing runs at once.
    w.api::<Branch>()
        .patch(
            "dev",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"refresh": {"suspend": false}}})),
        )
        .await
        .unwrap();
    eventually(10, "nextRefreshTime again", || async {
        branch_status(&w, "dev").await.next_refresh_time
    })
    .await;
    settle_on(&w, std::slice::from_ref(&name)).await;
}

async fn backup_branch(w: &World, name: &str, of: &str) {
    w.create::<Branch>(json!({
        "apiVersion": "pgbranch.dev/v1alpha1", "kind": "Branch",
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"pgbranch.dev/restore-backup-of": of}},
        "spec": {"compute": {"enabled": false}},
    }))
    .await;
}

async fn finish_with_backup(w: &World, restore: &str, backup: &str) {
    w.api::<SnapshotRestore>()
        .patch_status(
            restore,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Completed", "backupBranch": backup}})),
        )
        .await
        .unwrap();
}

async fn event_reasons(w: &World) -> Vec<String> {
    let events: Api<K8sEvent> = Api::namespaced(w.client.clone(), "default");
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|e| e.reason.clone())
        .collect()
}

#[tokio::test]
async fn without_preserve_the_backup_of_a_completed_refresh_is_deleted_unless_used() {
    let t0 = jiff::Timestamp::now();
    let w = World::new(t0).await;
    let _op = w.start();
    w.branch("prod", None).await;
    w.branch("dev", Some("prod")).await;
    wait_ready(&w, "prod").await;
    wait_ready(&w, "dev").await;
    w.api::<Branch>()
        .patch(
            "dev",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"refresh": {"schedule": "30 4 * * *"}}})),
        )
        .await
        .unwrap();
    let s1 = next_utc(t0, 4, 30);
    eventually(20, "nextRefreshTime", || async {
        (branch_status(&w, "dev").await.next_refresh_time == Some(rfc(s1))).then_some(())
    })
    .await;

    // Run 1 completes (as the restore controller would report it) and left
    // a backup branch nobody uses: it is deleted.
    w.clock.set(plus(s1, 10));
    let r1 = format!("dev-refresh-{}", stamp(s1));
    settle_on(&w, std::slice::from_ref(&r1)).await;
    backup_branch(&w, "dev-old-1", &r1).await;
    wait_ready(&w, "dev-old-1").await;
    finish_with_backup(&w, &r1, "dev-old-1").await;
    eventually(60, "backup dev-old-1 deleted", || async {
        w.api::<Branch>()
            .get_opt("dev-old-1")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(event_reasons(&w)
        .await
        .contains(&"RefreshBackupDeleted".to_string()));

    // Run 2's backup has a child branch: it stays, and a Warning says why.
    let s2 = plus(s1, 86_400);
    w.clock.set(plus(s2, 10));
    let r2 = format!("dev-refresh-{}", stamp(s2));
    settle_on(&w, &[r1.clone(), r2.clone()]).await;
    backup_branch(&w, "dev-old-2", &r2).await;
    w.branch("feature", Some("dev-old-2")).await;
    finish_with_backup(&w, &r2, "dev-old-2").await;
    eventually(20, "RefreshBackupKept", || async {
        event_reasons(&w)
            .await
            .contains(&"RefreshBackupKept".to_string())
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let kept = w.api::<Branch>().get("dev-old-2").await.unwrap();
    assert!(kept.metadata.deletion_timestamp.is_none());
    assert_eq!(event_count(&w, "RefreshBackupKept").await, 1, "warned once");
}

/// How many times an event with `reason` was published (series included).
async fn event_count(w: &World, reason: &str) -> usize {
    let events: Api<K8sEvent> = Api::namespaced(w.client.clone(), "default");
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| e.series.as_ref().map_or(1, |s| s.count as usize))
        .sum()
}

#[tokio::test]
async fn an_invalid_refresh_time_zone_is_warned_about_once_and_never_runs() {
    let t0 = jiff::Timestamp::now();
    let w = World::new(t0).await;
    let _op = w.start();
    w.branch("prod", None).await;
    w.create::<Branch>(json!({
        "apiVersion": "pgbranch.dev/v1alpha1", "kind": "Branch",
        "metadata": {"name": "dev", "namespace": "default"},
        "spec": {"parent": {"branch": "prod"}, "compute": {"enabled": false},
                 "refresh": {"schedule": "0 3 * * *", "timeZone": "Mars/Olympus_Mons"}},
    }))
    .await;
    wait_ready(&w, "dev").await;
    eventually(20, "InvalidRefreshSchedule", || async {
        (event_count(&w, "InvalidRefreshSchedule").await > 0).then_some(())
    })
    .await;
    w.clock.set(plus(t0, 3 * 86_400));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(event_count(&w, "InvalidRefreshSchedule").await, 1);
    assert!(restore_names(&w).await.is_empty());
    assert_eq!(branch_status(&w, "dev").await.next_refresh_time, None);
}
