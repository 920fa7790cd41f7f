//! Tier 4 (a real control plane): the real operator (`controller::run()`)
//! with the real storage engine, on a clock the test moves.
//! SnapshotSchedules create Snapshot objects at the right (fake) times with
//! deterministic names, prune beyond maxCount, stop while suspended and
//! catch up with exactly one run after downtime.
//!
//! The Snapshot controller runs too: the Snapshots a schedule creates are
//! really taken (readyToUse), and the snapshot quota is the real one.

mod support;

use std::time::Duration;

use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::ResourceExt;
use pgbranch::api::{Snapshot, SnapshotSchedule};
use serde_json::json;
use support::times::{next_utc, plus, stamp};
use support::world::{eventually, World};

fn schedule(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "pgbranch.dev/v1alpha1", "kind": "SnapshotSchedule",
        "metadata": {"name": name},
        "spec": spec,
    })
}

async fn status_of(w: &World, name: &str) -> pgbranch::api::SnapshotScheduleStatus {
    w.api::<SnapshotSchedule>()
        .get(name)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

fn ready_reason(st: &pgbranch::api::SnapshotScheduleStatus) -> Option<(String, String)> {
    st.conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Waits until exactly `want` Snapshots exist, then checks it stays so
/// while the operator keeps reconciling (no duplicate, no burst).
async fn settle_on(w: &World, want: &[String]) {
    let mut want = want.to_vec();
    want.sort();
    eventually(20, &format!("snapshots {want:?}"), || async {
        (w.snapshot_names().await == want).then_some(())
    })
    .await;
    // Several reconciles happen in this second (requeue every 200 ms).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(w.snapshot_names().await, want, "and nothing more");
}

#[tokio::test]
async fn cron_schedule_creates_named_snapshots_at_the_right_times_and_prunes() {
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
    w.create::<SnapshotSchedule>(schedule(
        "nightly",
        json!({
            "branch": "prod", "schedule": "0 2 * * *",
            "retention": {"maxCount": 2},
            "snapshotTemplate": {"labels": {"team": "a"}, "expiresAfter": "30d", "deletionPolicy": "Retain"},
        }),
    ))
    .await;
    let s1 = next_utc(t0, 2, 0);
    let s = |k: i64| plus(s1, 86_400 * k);

    let st = eventually(20, "first status", || async {
        let st = status_of(&w, "nightly").await;
        st.next_schedule_time.is_some().then_some(st)
    })
    .await;
    assert_eq!(
        st.next_schedule_time.as_deref(),
        Some(s1.strftime("%Y-%m-%dT%H:%M:%SZ").to_string().as_str())
    );
    assert_eq!(st.last_schedule_time, None);
    assert_eq!(ready_reason(&st), Some(("True".into(), "Scheduled".into())));
    assert!(
        w.snapshot_names().await.is_empty(),
        "nothing runs before its slot"
    );

    // A minute before the slot: still nothing.
    w.clock().set(plus(s1, -60));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(w.snapshot_names().await.is_empty());

    // The slot passes: one Snapshot, named from the slot.
    let run1 = plus(s1, 30);
    w.clock().set(run1);
    let n1 = format!("nightly-{}", stamp(s1));
    settle_on(&w, std::slice::from_ref(&n1)).await;
    let snap = w.api::<Snapshot>().get(&n1).await.unwrap();
    assert_eq!(snap.spec.branch, "prod");
    assert_eq!(snap.labels().get("team").map(String::as_str), Some("a"));
    assert_eq!(
        snap.labels()
            .get("pgbranch.dev/schedule")
            .map(String::as_str),
        Some("nightly")
    );
    assert_eq!(
        snap.spec.expires_at.as_deref(),
        Some(
            plus(run1, 30 * 86_400)
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
                .as_str()
        )
    );
    assert_eq!(
        snap.spec.deletion_policy,
        pgbranch::api::DeletionPolicy::Retain
    );
    let owner = &snap.owner_references()[0];
    assert_eq!(owner.kind, "SnapshotSchedule");
    assert_eq!(owner.name, "nightly");
    assert_eq!(owner.controller, Some(true));
    let st = eventually(10, "status after the run", || async {
        let st = status_of(&w, "nightly").await;
        (st.active_snapshots == 1).then_some(st)
    })
    .await;
    assert_eq!(
        st.last_schedule_time,
        Some(s1.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
    );
    assert_eq!(
        st.next_schedule_time,
        Some(s(1).strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
    );
    w.wait_snapshot_ready(&n1).await;
    eventually(10, "lastSuccessfulTime", || async {
        status_of(&w, "nightly").await.last_successful_time
    })
    .await;

    // Two more nights; each Snapshot becomes ready. maxCount 2 keeps the
    // newest two ready ones; the user keeps the first one by label.
    let names: Vec<String> = (0..4).map(|k| format!("nightly-{}", stamp(s(k)))).collect();
    w.api::<Snapshot>()
        .patch(
            &n1,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"pgbranch.dev/keep": "true"}}})),
        )
        .await
        .unwrap();
    eventually(
        10,
        "the kept snapshot released from the schedule",
        || async {
            let s = w.api::<Snapshot>().get(&n1).await.unwrap();
            s.owner_references().is_empty().then_some(())
        },
    )
    .await;
    for k in 1..=3 {
        w.clock().set(plus(s(k), 5));
        eventually(20, &format!("run {k}"), || async {
            w.snapshot_names()
                .await
                .contains(&names[k as usize])
                .then_some(())
        })
        .await;
        w.wait_snapshot_ready(&names[k as usize]).await;
    }
    // Ready: n1 (kept), s1, s2, s3 → count keeps s2, s3; s1 pruned.
    settle_on(&w, &[names[0].clone(), names[2].clone(), names[3].clone()]).await;
    let st = eventually(10, "activeSnapshots", || async {
        let st = status_of(&w, "nightly").await;
        (st.active_snapshots == 2).then_some(st)
    })
    .await;
    assert_eq!(
        st.last_schedule_time,
        Some(s(3).strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
    );
    // Exactly four objects ever created: a retry (a reconcile on a cache
    // that has not seen the first create yet) meets 409 AlreadyExists on
    // the run's deterministic name and never makes a second object.
    let creates = w
        .traffic
        .writes()
        .into_iter()
        .filter(|r| r.verb == "create" && r.resource == "snapshots" && r.code == 201)
        .count();
    assert_eq!(creates, 4);
}

#[tokio::test]
async fn suspend_stops_runs_and_resume_makes_one_catch_up_run() {
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
    let sched = w
        .create::<SnapshotSchedule>(schedule(
            "hourly",
            json!({"branch": "prod", "interval": "1h", "suspend": true, "retention": {"maxCount": 5}}),
        ))
        .await;
    let created = sched.metadata.creation_timestamp.unwrap().0;
    let st = eventually(20, "suspended status", || async {
        let st = status_of(&w, "hourly").await;
        (!st.conditions.is_empty()).then_some(st)
    })
    .await;
    assert_eq!(ready_reason(&st), Some(("True".into(), "Suspended".into())));
    assert_eq!(st.next_schedule_time, None);

    // Three slots pass while suspended: nothing.
    w.clock().set(plus(created, 3 * 3600 + 120));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(w.snapshot_names().await.is_empty(), "suspended: no runs");

    // Resumed: one catch-up run (the latest slot), never three.
    w.api::<SnapshotSchedule>()
        .patch(
            "hourly",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": false}})),
        )
        .await
        .unwrap();
    let latest = plus(created, 3 * 3600);
    settle_on(&w, &[format!("hourly-{}", stamp(latest))]).await;
    let st = status_of(&w, "hourly").await;
    assert_eq!(
        st.next_schedule_time,
        Some(
            plus(created, 4 * 3600)
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
        )
    );
}

#[tokio::test]
async fn a_restart_after_downtime_makes_exactly_one_catch_up_run() {
    let t0 = jiff::Timestamp::now();
    let Some(w) = World::builder(module_path!())
        .clock(t0)
        .without_computes()
        .build()
        .await
    else {
        return;
    };
    let op = w.start();
    w.branch("prod", None).await;
    w.create::<SnapshotSchedule>(schedule(
        "hourly",
        json!({"branch": "prod", "schedule": "15 * * * *"}),
    ))
    .await;
    let first = {
        let mut t = next_utc(t0, 0, 15);
        // The next hh:15 after t0.
        while plus(t, -3600) > t0 {
            t = plus(t, -3600);
        }
        t
    };
    w.clock().set(plus(first, 1));
    let n1 = format!("hourly-{}", stamp(first));
    settle_on(&w, std::slice::from_ref(&n1)).await;

    // The operator is down for five hours and ten minutes.
    op.stop().await;
    w.clock().set(plus(first, 5 * 3600 + 600));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.snapshot_names().await, vec![n1.clone()]);

    // Back up: one run for the latest missed slot, not five.
    let _op = w.start();
    let latest = plus(first, 5 * 3600);
    settle_on(&w, &[n1.clone(), format!("hourly-{}", stamp(latest))]).await;
    let st = status_of(&w, "hourly").await;
    assert_eq!(
        st.last_schedule_time,
        Some(latest.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
    );
}

#[tokio::test]
async fn a_run_blocked_by_the_quota_warns_and_retention_still_prunes() {
    let t0 = jiff::Timestamp::now();
    let Some(w) = World::builder(module_path!())
        .clock(t0)
        .without_computes()
        .build()
        .await
    else {
        return;
    };
    // Room for two stored snapshots in the namespace.
    let _op = w.start_with(|c| c.snapshot_quota = 2);
    w.branch("prod", None).await;
    let sched = w
        .create::<SnapshotSchedule>(schedule(
            "every2h",
            json!({"branch": "prod", "interval": "2h", "retention": {"maxAge": "5h"}}),
        ))
        .await;
    let created = sched.metadata.creation_timestamp.unwrap().0;
    let slot = |k: i64| plus(created, 2 * 3600 * k);
    let name = |k: i64| format!("every2h-{}", stamp(slot(k)));
    for k in 1..=2 {
        w.clock().set(plus(slot(k), 1));
        eventually(20, &format!("run {k}"), || async {
            w.snapshot_names().await.contains(&name(k)).then_some(())
        })
        .await;
        w.wait_snapshot_ready(&name(k)).await;
    }
    // Run 3 is refused by the quota (the Snapshot controller's verdict).
    w.clock().set(plus(slot(3), 1));
    let st = eventually(30, "Stalled SnapshotQuotaExceeded", || async {
        let st = status_of(&w, "every2h").await;
        st.conditions
            .iter()
            .any(|c| {
                c.type_ == "Stalled" && c.status == "True" && c.reason == "SnapshotQuotaExceeded"
            })
            .then_some(st)
    })
    .await;
    assert_eq!(ready_reason(&st).unwrap().0, "False");
    let events: Api<K8sEvent> = w.api();
    eventually(10, "a Warning event on the schedule", || async {
        let list = events.list(&ListParams::default()).await.unwrap();
        list.items
            .iter()
            .any(|e| {
                e.type_.as_deref() == Some("Warning")
                    && e.reason.as_deref() == Some("SnapshotQuotaExceeded")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("every2h")
            })
            .then_some(())
    })
    .await;
    // Retention still prunes: an hour later run 1 is over 5h old and goes,
    // which frees a place: run 3 is taken after all, and the schedule is
    // healthy again.
    w.clock().set(plus(slot(3), 3600 + 2));
    settle_on(&w, &[name(2), name(3)]).await;
    w.wait_snapshot_ready(&name(3)).await;
    eventually(20, "Ready again", || async {
        let st = status_of(&w, "every2h").await;
        (ready_reason(&st) == Some(("True".into(), "Scheduled".into()))).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_unknown_time_zone_is_reported_as_stalled() {
    let Some(w) = World::builder(module_path!())
        .clock(jiff::Timestamp::now())
        .without_computes()
        .build()
        .await
    else {
        return;
    };
    let _op = w.start();
    w.branch("prod", None).await;
    w.create::<SnapshotSchedule>(schedule(
        "zoned",
        json!({"branch": "prod", "schedule": "0 2 * * *", "timeZone": "Europe/Atlantis"}),
    ))
    .await;
    let st = eventually(20, "Stalled", || async {
        let st = status_of(&w, "zoned").await;
        st.conditions
            .iter()
            .find(|c| c.type_ == "Stalled" && c.status == "True")
            .cloned()
    })
    .await;
    assert_eq!(st.reason, "UnknownTimeZone");
    assert!(st.message.contains("Europe/Atlantis"), "{}", st.message);
}
