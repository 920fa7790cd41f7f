//! Tier 4 (a real control plane): TLS on every compute (issue #17) with the
//! real operator, the real storage engine and real PostgreSQL run by the
//! test kubelet, which mounts the branch's certificate Secret and runs the
//! compute's init container as a kubelet would. Every handshake is real:
//! `psql` with `sslmode=verify-full` and the namespace CA, and rustls
//! clients.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use pgbranch::compute::tls::{build_ca_secret, cert_info, first_cert_der, Ca};
use pgbranch::compute::{service_host, CA_SECRET};
use pgbranch::controller::tls::connector;
use support::tls::{psql, write_pem};
use support::world::*;

/// `host=<Service DNS name> hostaddr=127.0.0.1 port=<the compute's>`:
/// the name TLS checks, the address the test kubelet's server has.
fn conninfo(h: &World, service: &str, port: u16, rest: &str) -> String {
    format!(
        "host={} hostaddr=127.0.0.1 port={port} {rest}",
        service_host(service, &h.ns)
    )
}

/// A verified rustls connection to `service` (namespace CA, the Service's
/// name), and the certificate it was served.
async fn verified(
    h: &World,
    service: &str,
    ca_pem: &str,
    user: &str,
    password: &str,
    db: &str,
) -> Result<(tokio_postgres::Client, Vec<u8>), String> {
    let port = h
        .port(service)
        .await
        .ok_or_else(|| format!("no compute behind {service}"))?;
    let (tls, served) = connector(ca_pem).map_err(|e| e.to_string())?;
    let (c, conn) = tokio_postgres::Config::new()
        .host(service_host(service, &h.ns))
        .hostaddr("127.0.0.1".parse().unwrap())
        .port(port)
        .user(user)
        .password(password)
        .dbname(db)
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(Duration::from_secs(5))
        .connect(tls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((c, served.get().ok_or("no certificate served")?))
}

fn secret_str(s: &Secret, k: &str) -> String {
    pgbranch::compute::secret_value(s, k).unwrap_or_else(|| panic!("no {k}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn computes_serve_tls_that_only_the_namespace_ca_verifies() {
    let Some(mut h) = World::new(module_path!()).await else {
        return;
    };
    // A CA the user put there is used as it is, never overwritten.
    let mine = Ca::generate(&h.ns, jiff::Timestamp::now(), Duration::from_secs(86400)).unwrap();
    let secrets: Api<Secret> = h.api();
    secrets
        .create(&PostParams::default(), &build_ca_secret(&h.ns, &mine))
        .await
        .unwrap();
    h.start_operator(h.config());
    let mut prod = shop_branch("prod");
    prod.spec.compute.read_replicas = 1;
    create_branch(&h.client, &prod).await;
    wait_for(&h.client, "prod", "1/1 read replicas ready").await;

    let ca = secrets.get(CA_SECRET).await.unwrap();
    assert_eq!(
        secret_str(&ca, "ca.crt"),
        mine.cert_pem,
        "the user's CA was kept"
    );
    let tls = secrets.get("prod-tls").await.unwrap();
    assert_eq!(tls.type_.as_deref(), Some("kubernetes.io/tls"));
    let names = cert_info(&secret_str(&tls, "tls.crt")).unwrap().names;
    for n in [
        "prod".to_string(),
        format!("prod.{}", h.ns),
        format!("prod.{}.svc", h.ns),
        format!("prod.{}.svc.cluster.local", h.ns),
        format!("prod-ro.{}.svc", h.ns),
    ] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }

    let app = secrets.get("prod-app").await.unwrap();
    let (user, pw, db) = (
        secret_str(&app, "user"),
        secret_str(&app, "password"),
        secret_str(&app, "dbname"),
    );
    assert_eq!(secret_str(&app, "ca.crt"), mine.cert_pem);
    assert_eq!(secret_str(&app, "sslmode"), "verify-full");
    let ca_file = write_pem(h.dir(), "ca.crt", &secret_str(&app, "ca.crt"));
    let port = h.port("prod").await.expect("prod's compute");
    let base = format!("user={user} dbname={db}");

    // verify-full with the namespace CA under the Service's name.
    let ok = psql(
        &conninfo(
            &h,
            "prod",
            port,
            &format!("{base} sslmode=verify-full sslrootcert={ca_file}"),
        ),
        &pw,
        "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .expect("verify-full with the namespace CA");
    assert!(ok.starts_with("t|TLSv1."), "{ok}");

    // Another CA: refused.
    let other = Ca::generate(&h.ns, jiff::Timestamp::now(), Duration::from_secs(86400)).unwrap();
    let other_file = write_pem(h.dir(), "other-ca.crt", &other.cert_pem);
    let err = psql(
        &conninfo(
            &h,
            "prod",
            port,
            &format!("{base} sslmode=verify-full sslrootcert={other_file}"),
        ),
        &pw,
        "SELECT 1",
    )
    .expect_err("another CA must not verify");
    assert!(err.contains("certificate verify failed"), "{err}");
    assert!(verified(&h, "prod", &other.cert_pem, &user, &pw, &db)
        .await
        .is_err());

    // A name the certificate does not carry: refused.
    let err = psql(
        &format!("host=db.example.com hostaddr=127.0.0.1 port={port} {base} sslmode=verify-full sslrootcert={ca_file}"),
        &pw,
        "SELECT 1",
    )
    .expect_err("a wrong name must not verify");
    assert!(err.contains("does not match host name"), "{err}");

    // Plaintext: refused by pg_hba.
    let err = psql(
        &conninfo(&h, "prod", port, &format!("{base} sslmode=disable")),
        &pw,
        "SELECT 1",
    )
    .expect_err("plaintext must be refused");
    assert!(err.contains("no encryption"), "{err}");

    // The Secret's own URI, as is, with verify-full (the address and the
    // CA file are what a pod would have from DNS and the mounted Secret).
    let uri = secret_str(&app, "uri");
    assert!(uri.ends_with("?sslmode=verify-full"), "{uri}");
    let local = format!("{uri}&hostaddr=127.0.0.1&port={port}&sslrootcert={ca_file}");
    assert_eq!(psql(&local, "", "SELECT current_user").unwrap(), user);
    assert!(secret_str(&app, "jdbc-uri").ends_with("&sslmode=verify-full"));

    // rustls, as the operator connects: verified under the -ro name too.
    let (c, _) = verified(&h, "prod", &mine.cert_pem, &user, &pw, &db)
        .await
        .unwrap();
    c.batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (7)")
        .await
        .unwrap();
    let (ro, _) = verified(&h, "prod-ro", &mine.cert_pem, &user, &pw, &db)
        .await
        .expect("the replica verifies under prod-ro");
    let v: i32 = wait_until(|| async {
        ro.query_opt("SELECT v FROM t", &[])
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0))
    })
    .await;
    assert_eq!(v, 7);

    // The replica streams over TLS.
    let su = h.secret_field("prod-superuser", "password").await;
    let (root, _) = verified(&h, "prod", &mine.cert_pem, "postgres", &su, "postgres")
        .await
        .unwrap();
    let row = root
        .query_one(
            "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s ON s.pid = r.pid",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "replication is over TLS");
    h.shutdown().await;
}

/// Polls `f` for up to 60 s.
async fn wait_until<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not reached in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the Branch `name` is Ready with `note` in its message.
async fn wait_for(client: &kube::Client, name: &str, note: &str) {
    let start = Instant::now();
    loop {
        let b = branches(client).get(name).await.unwrap();
        if condition(&b, "Ready").is_some_and(|c| c.0 == "True" && c.2.contains(note)) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "branch {name} not Ready with {note:?}: {:?}",
            condition(&b, "Ready")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_renew_under_a_client_loop_without_a_restart() {
    let Some(mut h) = World::new(module_path!()).await else {
        return;
    };
    let mut cfg = h.config();
    cfg.compute.tls.cert_lifetime = Duration::from_secs(30);
    h.start_operator(cfg);
    create_branch(&h.client, &shop_branch("prod")).await;
    wait_branch_ready(&h.client, "prod").await;

    let secrets: Api<Secret> = h.api();
    let ca = secret_str(&secrets.get(CA_SECRET).await.unwrap(), "ca.crt");
    let app = secrets.get("prod-app").await.unwrap();
    let (user, pw, db) = (
        secret_str(&app, "user"),
        secret_str(&app, "password"),
        secret_str(&app, "dbname"),
    );
    let uri = secret_str(&app, "uri");
    let pods: Api<Pod> = h.api();
    let pod_uids = || async {
        let mut v: Vec<String> = pods
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter_map(|p| p.uid())
            .collect();
        v.sort();
        v
    };
    let pods_before = pod_uids().await;
    let (long, first) = verified(&h, "prod", &ca, &user, &pw, &db).await.unwrap();
    let started: String = long
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0);
    let first_info = cert_info(&pem_of(&first)).unwrap();

    // A client loop: a new verified connection and a query every 200 ms
    // until two renewals were served.
    let start = Instant::now();
    let mut served = vec![first.clone()];
    let mut failures = vec![];
    while served.len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "two renewals not served in 120 s (served {}, failures {failures:?})",
            served.len()
        );
        match verified(&h, "prod", &ca, &user, &pw, &db).await {
            Ok((c, cert)) => {
                c.query_one("SELECT 1", &[]).await.unwrap();
                if served.last() != Some(&cert) {
                    served.push(cert);
                }
            }
            Err(e) => failures.push(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(failures.is_empty(), "failed connections: {failures:?}");
    let last_info = cert_info(&pem_of(served.last().unwrap())).unwrap();
    assert!(last_info.not_after > first_info.not_after);
    assert_eq!(last_info.names, first_info.names);

    // The session opened before the renewals still works; same server,
    // same pod, same connection strings.
    let again: String = long
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, started, "postgres was not restarted");
    assert_eq!(pod_uids().await, pods_before, "no pod was replaced");
    let app = secrets.get("prod-app").await.unwrap();
    assert_eq!(secret_str(&app, "uri"), uri);
    // The Secret holds what is served.
    let tls = secrets.get("prod-tls").await.unwrap();
    let in_secret = first_cert_der(&secret_str(&tls, "tls.crt")).unwrap();
    assert!(served.contains(&in_secret));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_finalize_the_same_verify_full_uri_reaches_the_restored_data() {
    use pgbranch::api::{RestoreSource, SnapshotRestoreSpec, SnapshotSpec};
    let Some(mut h) = World::new(module_path!()).await else {
        return;
    };
    h.start_operator(h.config());
    create_branch(&h.client, &shop_branch("prod")).await;
    wait_branch_ready(&h.client, "prod").await;
    let secrets: Api<Secret> = h.api();
    let app = secrets.get("prod-app").await.unwrap();
    let uri = secret_str(&app, "uri");
    let ca_file = write_pem(h.dir(), "ca.crt", &secret_str(&app, "ca.crt"));
    let via_uri = |port: u16, sql: &str| {
        psql(
            &format!("{uri}&hostaddr=127.0.0.1&port={port}&sslrootcert={ca_file}"),
            "",
            sql,
        )
    };
    let port = h.port("prod").await.unwrap();
    via_uri(port, "CREATE TABLE t (v int); INSERT INTO t VALUES (1)").unwrap();
    create_snapshot(
        &h.client,
        "s1",
        SnapshotSpec {
            branch: "prod".into(),
            ..Default::default()
        },
    )
    .await;
    h.wait_snapshot_ready("s1").await;
    via_uri(port, "INSERT INTO t VALUES (2)").unwrap();

    create_restore(
        &h.client,
        "back",
        SnapshotRestoreSpec {
            source: RestoreSource {
                snapshot: Some("s1".into()),
                ..Default::default()
            },
            target: Some("prod".into()),
            finalize: true,
            preserve_under_name: None,
        },
    )
    .await;
    wait_restore(&h.client, "back", "Completed", |r| {
        r.status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(|p| p == pgbranch::api::RestorePhase::Completed)
    })
    .await;
    wait_branch_ready(&h.client, "prod").await;

    // The same URI, verify-full under prod's name, reaches the restored rows.
    let rows = wait_until(|| async {
        let port = h.port("prod").await?;
        via_uri(port, "SELECT string_agg(v::text, ',' ORDER BY v) FROM t").ok()
    })
    .await;
    assert_eq!(rows, "1");
    assert_eq!(
        secret_str(&secrets.get("prod-app").await.unwrap(), "uri"),
        uri
    );
    h.shutdown().await;
}

/// A DER certificate as PEM.
fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// A namespace CA that cannot be read (a user's Secret `pgbranch-ca`
/// without a key) stops a new branch as Stalled `InvalidCA` naming the
/// Secret, before anything holding a password exists; the operator never
/// overwrites the user's Secret. Once the user removes it, the operator
/// makes its own CA and the branch becomes Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_namespace_ca_stalls_the_branch_and_is_never_overwritten() {
    let Some(mut h) = World::new(module_path!()).await else {
        return;
    };
    let secrets: Api<Secret> = Api::default_namespaced(h.client.clone());
    let bad: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": CA_SECRET},
        "stringData": {"ca.crt": "not a certificate"},
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &bad).await.unwrap();
    h.start_operator(h.config());
    let client = h.client.clone();
    create_branch(&client, &shop_branch("prod")).await;
    let b = wait_stalled(&client, "prod", "InvalidCA").await;
    let (_, _, message) = condition(&b, "Stalled").unwrap();
    assert!(message.contains(CA_SECRET), "{message}");
    assert!(
        secrets.get_opt("prod-app").await.unwrap().is_none(),
        "no credentials before the CA is usable"
    );
    let kept = secrets.get(CA_SECRET).await.unwrap();
    assert_eq!(secret_str(&kept, "ca.crt"), "not a certificate");

    secrets
        .delete(CA_SECRET, &Default::default())
        .await
        .unwrap();
    wait_branch_ready(&client, "prod").await;
    let ca = secrets.get(CA_SECRET).await.unwrap();
    assert!(first_cert_der(&secret_str(&ca, "ca.crt")).is_some());
    h.shutdown().await;
}
