//! Tier 4 (a real control plane) with a real object store (Garage on
//! 127.0.0.1): a BackupDestination is Ready only after the operator wrote,
//! read back and deleted a probe object in the bucket; wrong credentials,
//! a missing bucket, an endpoint that does not answer, one that does not
//! speak TLS and a missing Secret each give Stalled with their own reason;
//! fixing the Secret makes the destination Ready without touching it; no
//! credential appears in any status or Event.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{ListParams, Patch, PatchParams};
use pgbranch::api::BackupDestination;
use serde_json::{json, Value};
use support::object_store::Garage;
use support::world::{eventually, World};

fn destination(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "pgbranch.dev/v1alpha1", "kind": "BackupDestination",
        "metadata": {"name": name},
        "spec": spec,
    })
}

fn secret(name: &str, id: &str, key: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name},
        "stringData": {"accessKeyId": id, "secretAccessKey": key},
    })
}

/// (Ready status, reason, message) once the Ready condition is set for the
/// current generation and is `want_status`.
async fn wait_ready_condition(
    w: &World,
    name: &str,
    want_status: &str,
    secs: u64,
) -> (String, String) {
    eventually(
        secs,
        &format!("destination {name} Ready={want_status}"),
        || async {
            let d = w.api::<BackupDestination>().get(name).await.ok()?;
            let st = d.status?;
            let c = st.conditions.iter().find(|c| c.type_ == "Ready")?;
            (c.status == want_status && c.observed_generation == d.metadata.generation)
                .then(|| (c.reason.clone(), c.message.clone()))
        },
    )
    .await
}

#[tokio::test]
async fn destinations_are_probed_for_real_and_stalled_with_the_reason() {
    let started = std::time::Instant::now();
    let Some(g) = Garage::start(module_path!(), "backups") else {
        return;
    };
    let Some(w) = World::builder(module_path!())
        .without_computes()
        .build()
        .await
    else {
        return;
    };
    let _op = w.start();
    let wrong_secret = "definitely-not-the-secret-0123456789abcdef";
    w.create::<Secret>(secret("good", &g.access_key_id, &g.secret_access_key))
        .await;
    w.create::<Secret>(secret("wrong", &g.access_key_id, wrong_secret))
        .await;
    w.create::<Secret>(secret(
        "unknown",
        "GK00000000000000000000aaaa",
        wrong_secret,
    ))
    .await;
    let base = |endpoint: &str, bucket: &str, secret: &str| {
        json!({
            "provider": "custom", "endpoint": endpoint, "bucket": bucket,
            "region": g.region, "pathPrefix": "team/pg",
            "credentials": {"secretName": secret},
        })
    };
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cases = [
        (
            "ok",
            base(&g.endpoint, "backups", "good"),
            "True",
            "ProbeSucceeded",
        ),
        (
            "wrong-secret",
            base(&g.endpoint, "backups", "wrong"),
            "False",
            "AccessDenied",
        ),
        (
            "unknown-key",
            base(&g.endpoint, "backups", "unknown"),
            "False",
            "AccessDenied",
        ),
        (
            "no-bucket",
            base(&g.endpoint, "nosuchbucket", "good"),
            "False",
            "BucketNotFound",
        ),
        (
            "unreachable",
            base(
                &format!("http://127.0.0.1:{closed_port}"),
                "backups",
                "good",
            ),
            "False",
            "EndpointUnreachable",
        ),
        (
            "not-tls",
            base(
                &format!("https://127.0.0.1:{}", g.endpoint_port()),
                "backups",
                "good",
            ),
            "False",
            "TLSError",
        ),
        (
            "no-secret",
            base(&g.endpoint, "backups", "later"),
            "False",
            "CredentialsSecretNotFound",
        ),
    ];
    for (name, spec, _, _) in &cases {
        w.create::<BackupDestination>(destination(name, spec.clone()))
            .await;
    }
    let mut messages = Vec::new();
    for (name, _, status, reason) in &cases {
        let (got_reason, message) = wait_ready_condition(&w, name, status, 60).await;
        assert_eq!(&got_reason, reason, "{name}: {message}");
        if *status == "False" {
            let d = w.api::<BackupDestination>().get(name).await.unwrap();
            let stalled = d
                .status
                .unwrap()
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Stalled")
                .unwrap();
            assert_eq!(
                (stalled.status.as_str(), stalled.reason.as_str()),
                ("True", *reason),
                "{name}"
            );
        }
        eprintln!("{name}: {got_reason}: {message}");
        messages.push(message);
    }
    // The messages say where and what, for a person to act on.
    assert!(
        messages[0].contains("team/pg/.pgbranch-probe/"),
        "{}",
        messages[0]
    );
    assert!(messages[3].contains("nosuchbucket"), "{}", messages[3]);
    assert!(
        messages[4].contains(&closed_port.to_string()),
        "{}",
        messages[4]
    );

    // The probe cleaned up after itself: nothing is left in the bucket.
    // (Garage's bucket counters follow deletions a moment later.)
    let empty = |info: &str| {
        info.lines()
            .any(|l| l.trim().starts_with("Objects:") && l.trim().ends_with(" 0"))
    };
    let mut info = g.cli(&["bucket", "info", "backups"]);
    for _ in 0..40 {
        if empty(&info) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        info = g.cli(&["bucket", "info", "backups"]);
    }
    assert!(empty(&info), "the probe objects were deleted:\n{info}");

    // Fixing the Secret is enough: the destination follows it.
    w.api::<Secret>()
        .patch(
            "wrong",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"secretAccessKey": g.secret_access_key}})),
        )
        .await
        .unwrap();
    w.create::<Secret>(secret("later", &g.access_key_id, &g.secret_access_key))
        .await;
    for name in ["wrong-secret", "no-secret"] {
        let t = std::time::Instant::now();
        let (reason, _) = wait_ready_condition(&w, name, "True", 20).await;
        assert_eq!(reason, "ProbeSucceeded");
        eprintln!("{name}: Ready {:?} after its Secret was fixed", t.elapsed());
    }

    // No credential in any status, condition or Event.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dests = w
        .api::<BackupDestination>()
        .list(&ListParams::default())
        .await
        .unwrap();
    let events = w
        .api::<K8sEvent>()
        .list(&ListParams::default())
        .await
        .unwrap();
    let text = format!(
        "{}\n{}",
        serde_json::to_string(&dests.items.iter().map(|d| &d.status).collect::<Vec<_>>()).unwrap(),
        serde_json::to_string(&events.items).unwrap()
    );
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("AccessDenied")),
        "a Warning Event names the reason"
    );
    for s in [
        g.secret_access_key.as_str(),
        wrong_secret,
        g.access_key_id.as_str(),
    ] {
        assert!(
            !text.contains(s),
            "a credential leaked into status or Events"
        );
    }
    eprintln!("destination test took {:?}", started.elapsed());
}
