//! Tier 4 (a real control plane): scheduled refresh of a Branch from its
//! parent, with the real operator (`controller::run()`: Branch, Snapshot,
//! SnapshotRestore and the refresh controllers), the real storage engine,
//! real postgres computes and a clock the test moves. One SnapshotRestore
//! per slot that really resets the branch to its parent's data behind the
//! same Service and credentials, none while another operation on the branch
//! is under way (the slot is skipped, the next one runs), one catch-up run
//! after downtime, the pre-refresh backup deleted unless used.

mod support;

use std::time::Duration;

use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::ResourceExt;
use pgbranch::api::{Branch, RestorePhase, SnapshotRestore};
use serde_json::json;
use support::times::{next_utc, plus, stamp};
use support::world::{eventually, World};

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

async fn wait_phase(w: &World, name: &str, phase: RestorePhase) -> SnapshotRestore {
    eventually(
        180,
        &format!("SnapshotRestore {name} {phase:?}"),
        || async {
            let r = w.api::<SnapshotRestore>().get_opt(name).await.unwrap()?;
            let p = r.status.as_ref().and_then(|s| s.phase);
            if p == Some(RestorePhase::Failed) {
                panic!("restore {name} failed: {:?}", r.status);
            }
            (p == Some(phase)).then_some(r)
        },
    )
    .await
}

async fn ids(c: &tokio_postgres::Client) -> Vec<i32> {
    c.query("SELECT id FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn refresh_resets_the_branch_once_per_slot_and_never_over_another_operation() {
    let t0 = jiff::Timestamp::now();
    let Some(w) = World::builder(module_path!()).clock(t0).build().await else {
        return;
    };
    let op = w.start();
    w.branch_with_compute("prod", None).await;
    wait_ready(&w, "prod").await;
    let prod = w.connect_app("prod").await;
    prod.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items VALUES (1), (2);",
    )
    .await
    .unwrap();
    w.branch_with_compute("dev", Some("prod")).await;
    wait_ready(&w, "dev").await;
    // dev drifts away from prod; prod moves on.
    let dev = w.connect_app("dev").await;
    dev.batch_execute("INSERT INTO items VALUES (100); CREATE TABLE scratch (x int);")
        .await
        .unwrap();
    prod.execute("INSERT INTO items VALUES (3)", &[])
        .await
        .unwrap();
    let dev_password = w.secret_field("dev-app", "password").await;
    // A branch made from dev's current data: it will need dev's old data.
    w.branch("feature", Some("dev")).await;
    wait_ready(&w, "feature").await;

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
    w.clock().set(plus(s1, 20));
    let r1 = format!("dev-refresh-{}", stamp(s1));
    eventually(20, "refresh 1", || async {
        restore_names(&w).await.contains(&r1).then_some(())
    })
    .await;
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
    let done = wait_phase(&w, &r1, RestorePhase::Completed).await;
    wait_ready(&w, "dev").await;

    // dev holds prod's data now, behind the same Service and password.
    let dev = w.connect_app("dev").await;
    assert_eq!(ids(&dev).await, vec![1, 2, 3]);
    assert!(dev.query("SELECT 1 FROM scratch", &[]).await.is_err());
    assert_eq!(w.secret_field("dev-app", "password").await, dev_password);
    // The backup of dev's old data stays: feature descends from it.
    let b1 = done.status.and_then(|s| s.backup_branch).unwrap();
    eventually(30, "RefreshBackupKept", || async {
        (event_count(&w, "RefreshBackupKept").await > 0).then_some(())
    })
    .await;
    assert!(w.api::<Branch>().get_opt(&b1).await.unwrap().is_some());

    // Slot 2 while a restore of dev is pending: skipped, not queued.
    w.create::<SnapshotRestore>(json!({
        "apiVersion": "pgbranch.dev/v1alpha1", "kind": "SnapshotRestore",
        "metadata": {"name": "held"},
        "spec": {"source": {"snapshot": "not-taken-yet"}, "target": "dev", "finalize": false},
    }))
    .await;
    w.clock().set(plus(s(1), 20));
    eventually(
        20,
        "nextRefreshTime moves past the skipped slot",
        || async {
            (branch_status(&w, "dev").await.next_refresh_time == Some(rfc(s(2)))).then_some(())
        },
    )
    .await;
    settle_on(&w, &[r1.clone(), "held".to_string()]).await;
    assert!(event_count(&w, "RefreshSkipped").await >= 1);
    assert_eq!(
        branch_status(&w, "dev").await.last_refresh_time,
        Some(rfc(s1))
    );
    // The other operation goes away later that day: still nothing until
    // the next slot.
    w.api::<SnapshotRestore>()
        .delete("held", &Default::default())
        .await
        .unwrap();
    w.clock().set(plus(s(1), 3600));
    settle_on(&w, std::slice::from_ref(&r1)).await;

    // Slot 3, nothing under way: the second refresh; its backup is not
    // used by anyone and goes.
    prod.execute("INSERT INTO items VALUES (4)", &[])
        .await
        .unwrap();
    w.clock().set(plus(s(2), 20));
    let r3 = format!("dev-refresh-{}", stamp(s(2)));
    eventually(20, "refresh 3", || async {
        restore_names(&w).await.contains(&r3).then_some(())
    })
    .await;
    let done = wait_phase(&w, &r3, RestorePhase::Completed).await;
    wait_ready(&w, "dev").await;
    assert_eq!(ids(&w.connect_app("dev").await).await, vec![1, 2, 3, 4]);
    let b3 = done.status.and_then(|s| s.backup_branch).unwrap();
    eventually(120, "backup of refresh 3 deleted", || async {
        w.api::<Branch>()
            .get_opt(&b3)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(w.api::<Branch>().get_opt(&b1).await.unwrap().is_some());

    // Downtime over three slots: one catch-up refresh (the latest).
    op.stop().await;
    w.clock().set(plus(s(5), 7200));
    let _op = w.start();
    let r6 = format!("dev-refresh-{}", stamp(s(5)));
    settle_on(&w, &[r1, r3, r6]).await;
    let st = branch_status(&w, "dev").await;
    assert_eq!(st.last_refresh_time, Some(rfc(s(5))));
    assert_eq!(st.next_refresh_time, Some(rfc(s(6))));
}

#[tokio::test]
async fn preserve_names_the_backup_and_suspend_stops_refreshes() {
    let t0 = jiff::Timestamp::now();
    let Some(w) = World::builder(module_path!())
        .clock(t0)
        .without_computes()
        .build()
        .await
    else {
        return;
    };
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
    w.clock().set(plus(slot, 5));
    let name = format!("dev-refresh-{}", stamp(slot));
    settle_on(&w, std::slice::from_ref(&name)).await;
    let r = w.api::<SnapshotRestore>().get(&name).await.unwrap();
    assert_eq!(
        r.spec.preserve_under_name,
        Some(format!("dev-old-{}", slot.strftime("%Y%m%d%H%M%S")))
    );
    // The refresh completes (no compute: no SQL step) and its backup stays.
    let done = wait_phase(&w, &name, RestorePhase::Completed).await;
    let backup = format!("dev-old-{}", slot.strftime("%Y%m%d%H%M%S"));
    assert_eq!(
        done.status.and_then(|s| s.backup_branch),
        Some(backup.clone())
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(w.api::<Branch>().get_opt(&backup).await.unwrap().is_some());

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
    w.clock().set(plus(slot, 3 * 86_400));
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

/// How many times an event with `reason` was published (series included).
async fn event_count(w: &World, reason: &str) -> usize {
    let events: Api<K8sEvent> = w.api();
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

/// The Ready/Stalled condition of a branch, as (type, status, reason, message).
async fn condition(w: &World, name: &str, type_: &str) -> Option<(String, String, String)> {
    branch_status(w, name)
        .await
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status, c.reason, c.message))
}

/// A running branch whose refresh schedule is edited into something invalid
/// goes Stalled with a reason that names the field (its compute and data
/// untouched), is warned about once, never refreshes, and comes back Ready
/// once the schedule is fixed.
#[tokio::test]
async fn an_invalid_refresh_time_zone_stalls_the_branch_and_never_runs() {
    let t0 = jiff::Timestamp::now();
    let Some(w) = World::builder(module_path!())
        .clock(t0)
        .without_computes()
        .build()
        .await
    else {
        return;
    };
    let _op = w.start();
    w.branch("prod", None).await;
    w.create::<Branch>(json!({
        "apiVersion": "pgbranch.dev/v1alpha1", "kind": "Branch",
        "metadata": {"name": "dev"},
        "spec": {"parent": {"branch": "prod"}, "compute": {"enabled": false},
                 "refresh": {"schedule": "0 3 * * *", "timeZone": "Europe/Paris"}},
    }))
    .await;
    wait_ready(&w, "dev").await;
    let timeline = branch_status(&w, "dev").await.timeline_id;
    assert!(timeline.is_some());

    let patch = json!({"spec": {"refresh": {"timeZone": "Mars/Olympus_Mons"}}});
    w.api::<Branch>()
        .patch("dev", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let (status, reason, message) = eventually(20, "dev Stalled", || async {
        condition(&w, "dev", "Stalled")
            .await
            .filter(|(s, _, _)| s == "True")
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "InvalidRefreshSchedule")
    );
    assert!(message.contains("Mars/Olympus_Mons"), "{message}");
    eventually(20, "InvalidRefreshSchedule event", || async {
        (event_count(&w, "InvalidRefreshSchedule").await > 0).then_some(())
    })
    .await;
    w.clock().set(plus(t0, 3 * 86_400));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(event_count(&w, "InvalidRefreshSchedule").await, 1);
    assert!(restore_names(&w).await.is_empty());
    let st = branch_status(&w, "dev").await;
    assert_eq!(st.next_refresh_time, None);
    assert_eq!(st.timeline_id, timeline, "the data is untouched");

    let patch = json!({"spec": {"refresh": {"timeZone": "UTC"}}});
    w.api::<Branch>()
        .patch("dev", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_ready(&w, "dev").await;
    assert_eq!(
        condition(&w, "dev", "Stalled")
            .await
            .map(|c| c.0)
            .as_deref(),
        Some("False")
    );
}
