//! The HTTP face of the storage layer, over a real engine (copy driver):
//! authentication, JSON errors for bad input, path traversal refused,
//! transport failures reported as retryable.

#[path = "storage_http_support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use pgbranch::storage::http::server::Auth;
use pgbranch::storage::http::{connect_storage, ErrorBody, HttpStorage};
use pgbranch::storage::*;
use reqwest::StatusCode;
use support::*;

struct Fixture {
    srv: ServerGuard,
    engine: pgbranch::storage::engine::Engine,
    dir: TestDir,
    http: reqwest::Client,
}

async fn fixture() -> Fixture {
    let dir = temp_dir_in(None);
    let root = dir.path().join("volume");
    std::fs::create_dir(&root).unwrap();
    let engine = pgbranch::storage::engine::Engine::open(engine_config(&root, DriverKind::Copy))
        .await
        .unwrap();
    let srv = ServerGuard::start(Arc::new(engine.clone()), Auth::token(TOKEN).unwrap()).await;
    Fixture {
        srv,
        engine,
        dir,
        http: reqwest::Client::new(),
    }
}

impl Fixture {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.srv.url())
    }
    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path)).bearer_auth(TOKEN)
    }
    fn post(&self, path: &str, body: &str) -> reqwest::RequestBuilder {
        self.http
            .post(self.url(path))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
    }
}

/// Asserts a JSON error answer and returns it.
async fn error_body(resp: reqwest::Response, status: StatusCode, code: &str) -> ErrorBody {
    assert_eq!(resp.status(), status);
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(ct.as_deref(), Some("application/json"));
    let body: ErrorBody = resp.json().await.unwrap();
    assert_eq!(body.code, code, "{body:?}");
    assert!(!body.message.is_empty());
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_right_token_are_refused() {
    let f = fixture().await;
    // Health needs no token.
    let r = f.http.get(f.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    for path in ["/v1/info", "/v1/timelines", "/v1/snapshots/abc"] {
        let r = f.http.get(f.url(path)).send().await.unwrap();
        assert!(r.headers().contains_key("www-authenticate"));
        let b = error_body(r, StatusCode::UNAUTHORIZED, "Unauthorized").await;
        assert!(b.message.contains("missing"), "{b:?}");

        let r = f
            .http
            .get(f.url(path))
            .bearer_auth("wrong-token")
            .send()
            .await
            .unwrap();
        let b = error_body(r, StatusCode::UNAUTHORIZED, "Unauthorized").await;
        assert!(b.message.contains("wrong"), "{b:?}");
        assert!(!b.message.contains(TOKEN));
    }
    // A mutating call with a wrong token changes nothing.
    let r = f
        .http
        .post(f.url("/v1/timelines"))
        .bearer_auth("wrong-token")
        .json(&serde_json::json!({"key": "k1", "source": {"type": "empty"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = f.get("/v1/timelines").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let list: Vec<Timeline> = r.json().await.unwrap();
    assert!(list.is_empty(), "{list:?}");

    // The client surfaces the same as a typed error.
    let bad = HttpStorage::new(&f.srv.url(), Some("nope".into())).unwrap();
    assert!(matches!(
        bad.info().await,
        Err(StorageError::Unauthorized { .. })
    ));
    let none = HttpStorage::new(&f.srv.url(), None).unwrap();
    assert!(matches!(
        none.list_timelines().await,
        Err(StorageError::Unauthorized { .. })
    ));
    let good = HttpStorage::new(&f.srv.url(), Some(TOKEN.into())).unwrap();
    let info = good.info().await.unwrap();
    assert_eq!(info.driver, DriverKind::Copy);
    // The volume's usage and the WAL archive's size come through as the
    // engine reports them.
    let (total, used) = (
        info.volume_total_bytes.unwrap(),
        info.volume_used_bytes.unwrap(),
    );
    assert!(total > 0 && used > 0 && used <= total, "{info:?}");
    assert!(info.wal_archive_bytes.is_some(), "{info:?}");
    let raw: serde_json::Value = f
        .get("/v1/info")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(raw["volumeTotalBytes"].as_u64(), Some(total), "{raw}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_error_naming_the_problem() {
    let f = fixture().await;

    let r = f.post("/v1/timelines", "{not json").send().await.unwrap();
    let b = error_body(r, StatusCode::BAD_REQUEST, "InvalidArgument").await;
    assert!(b.message.contains("request body"), "{b:?}");

    let r = f
        .post("/v1/timelines", r#"{"source": {"type": "empty"}}"#)
        .send()
        .await
        .unwrap();
    let b = error_body(r, StatusCode::UNPROCESSABLE_ENTITY, "InvalidArgument").await;
    assert!(b.message.contains("key"), "names the missing field: {b:?}");

    let r = f
        .post(
            "/v1/timelines",
            r#"{"key": "../../etc", "source": {"type": "empty"}}"#,
        )
        .send()
        .await
        .unwrap();
    let b = error_body(r, StatusCode::UNPROCESSABLE_ENTITY, "InvalidArgument").await;
    assert!(b.message.contains("not a valid identifier"), "{b:?}");

    let r = f
        .post(
            "/v1/timelines",
            r#"{"key": "k", "source": {"type": "timeline", "timeline": "abc", "point": {"kind": "lsn", "value": "16/ZZ"}}}"#,
        )
        .send()
        .await
        .unwrap();
    let b = error_body(r, StatusCode::UNPROCESSABLE_ENTITY, "InvalidArgument").await;
    assert!(b.message.contains("not an LSN"), "{b:?}");

    let r = f
        .post(
            "/v1/snapshots",
            r#"{"key": "k", "timeline": "abc", "point": {"kind": "yesterday"}}"#,
        )
        .send()
        .await
        .unwrap();
    let b = error_body(r, StatusCode::UNPROCESSABLE_ENTITY, "InvalidArgument").await;
    assert!(b.message.contains("yesterday"), "{b:?}");

    // Not JSON at all.
    let r = f
        .http
        .post(f.url("/v1/timelines"))
        .bearer_auth(TOKEN)
        .body("key=k")
        .send()
        .await
        .unwrap();
    let b = error_body(r, StatusCode::UNSUPPORTED_MEDIA_TYPE, "InvalidArgument").await;
    assert!(b.message.to_lowercase().contains("content-type"), "{b:?}");

    let r = f
        .get("/v1/timelines/abc/resolve?timestamp=yesterday")
        .send()
        .await
        .unwrap();
    let b = error_body(r, StatusCode::BAD_REQUEST, "InvalidArgument").await;
    assert!(b.message.contains("RFC 3339"), "{b:?}");

    let r = f.get("/v1/timelines/abc/resolve").send().await.unwrap();
    let b = error_body(r, StatusCode::BAD_REQUEST, "InvalidArgument").await;
    assert!(b.message.contains("timestamp"), "{b:?}");

    // Larger than the body limit.
    let big = format!(
        r#"{{"key": "k", "label": "{}", "source": {{"type": "empty"}}}}"#,
        "x".repeat(200 * 1024)
    );
    let r = f.post("/v1/timelines", &big).send().await.unwrap();
    error_body(r, StatusCode::PAYLOAD_TOO_LARGE, "InvalidArgument").await;

    // A backup target barman-cloud could misread (its server name goes
    // into command lines and restore_command): refused before anything
    // runs, the secret not echoed.
    let target = pgbranch::storage::backups::BackupTarget {
        store: pgbranch::backup::ObjectStore {
            endpoint: "http://127.0.0.1:9".into(),
            bucket: "backups".into(),
            region: "r".into(),
            prefix: String::new(),
            path_style: true,
            ca_bundle: None,
            credentials: pgbranch::backup::Credentials {
                access_key_id: "GKid".into(),
                secret_access_key: "never-echoed-secret".into(),
            },
        },
        server: "x'; touch /tmp/pwned; '".into(),
    };
    let r = f
        .http
        .put(f.url("/v1/timelines/abc/backup"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(serde_json::to_string(&target).unwrap())
        .send()
        .await
        .unwrap();
    let b = error_body(r, StatusCode::BAD_REQUEST, "InvalidArgument").await;
    assert!(b.message.contains("server name"), "{b:?}");
    assert!(!b.message.contains("never-echoed-secret"), "{b:?}");

    // Replica ordinals: numbers within range only.
    for (ordinal, says) in [
        ("abc", "not a number"),
        ("-1", "not a number"),
        ("99", "out of range"),
        ("4294967296", "not a number"),
    ] {
        for method in [reqwest::Method::PUT, reqwest::Method::DELETE] {
            let r = f
                .http
                .request(
                    method.clone(),
                    f.url(&format!("/v1/timelines/abc/replicas/{ordinal}")),
                )
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let b = error_body(r, StatusCode::BAD_REQUEST, "InvalidArgument").await;
            assert!(b.message.contains(says), "{method} {ordinal}: {b:?}");
        }
    }
    // A replica of a missing timeline.
    let r = f
        .http
        .put(f.url("/v1/timelines/no-such/replicas/0"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    error_body(r, StatusCode::NOT_FOUND, "NotFound").await;

    let r = f.get("/v1/no/such/route").send().await.unwrap();
    error_body(r, StatusCode::NOT_FOUND, "NotFound").await;

    let r = f
        .http
        .put(f.url("/v1/timelines"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    error_body(r, StatusCode::METHOD_NOT_ALLOWED, "InvalidArgument").await;

    // Nothing was created by any of it.
    let list: Vec<Timeline> = f
        .get("/v1/timelines")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(list.is_empty(), "{list:?}");
    let r = f.get("/v1/timelines/no-such").send().await.unwrap();
    let b = error_body(r, StatusCode::NOT_FOUND, "NotFound").await;
    assert!(b.message.contains("no-such"), "{b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_traversal_is_refused() {
    let f = fixture().await;
    // A file beside the volume that traversal would reach.
    let victim = f.dir.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("keep"), "x").unwrap();

    for id in [
        "..%2Fvictim",
        "..%2F..%2Fvictim",
        "%2E%2E%2Fvictim",
        "..",
        "%2e%2e",
        "victim%00",
        "Victim",
        "a%2Fb",
        "-a",
    ] {
        for (method, path) in [
            (reqwest::Method::GET, format!("/v1/timelines/{id}")),
            (reqwest::Method::DELETE, format!("/v1/timelines/{id}")),
            (reqwest::Method::GET, format!("/v1/snapshots/{id}")),
            (reqwest::Method::DELETE, format!("/v1/snapshots/{id}")),
            (reqwest::Method::GET, format!("/v1/timelines/{id}/replicas")),
            (
                reqwest::Method::PUT,
                format!("/v1/timelines/{id}/replicas/0"),
            ),
            (
                reqwest::Method::DELETE,
                format!("/v1/timelines/{id}/replicas/0"),
            ),
        ] {
            let r = f
                .http
                .request(method.clone(), f.url(&path))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            let status = r.status();
            assert!(status.is_client_error(), "{method} {path}: {status}");
            let b: ErrorBody = r.json().await.unwrap();
            if status == StatusCode::BAD_REQUEST {
                assert!(b.message.contains("not a valid identifier"), "{b:?}");
            }
        }
    }
    // Raw `..` segments (not normalised by the server) reach no handler.
    let r = f.get("/v1/timelines/../../victim").send().await.unwrap();
    assert!(r.status().is_client_error());
    assert!(
        victim.join("keep").exists(),
        "traversal reached outside the volume"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_failures_are_retryable() {
    // Nothing listens on this port.
    let port = free_port();
    let c = HttpStorage::with_timeout(
        &format!("http://127.0.0.1:{port}"),
        Some(TOKEN.into()),
        Duration::from_secs(2),
    )
    .unwrap();
    let e = c.info().await.unwrap_err();
    assert!(matches!(e, StorageError::Unavailable { .. }), "{e:?}");
    assert!(e.is_retryable());

    // A server that accepts and never answers: the per-request timeout.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (sock, _) = l.accept().await.unwrap();
            held.push(sock);
        }
    });
    let c = HttpStorage::with_timeout(&format!("http://{addr}"), None, Duration::from_millis(500))
        .unwrap();
    let start = std::time::Instant::now();
    let e = c
        .get_timeline(&TimelineId::new("abc").unwrap())
        .await
        .unwrap_err();
    hold.abort();
    assert!(matches!(e, StorageError::Unavailable { .. }), "{e:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_spec_selects_the_implementation() {
    for bad in ["", "foo", "embedded:", "embedded:relative/path", "ftp://x"] {
        let r = connect_storage(bad, None).await;
        assert!(
            matches!(r, Err(StorageError::InvalidArgument { .. })),
            "{bad:?}: {:?}",
            r.err()
        );
    }
    let f = fixture().await;
    let s = connect_storage(&f.srv.url(), Some(TOKEN.into()))
        .await
        .unwrap();
    assert_eq!(s.info().await.unwrap().driver, DriverKind::Copy);

    let dir = temp_dir_in(None);
    let spec = format!("embedded:{}", dir.path().display());
    let s = connect_storage(&spec, None).await.unwrap();
    let info = s.info().await.unwrap();
    assert_eq!(
        std::path::Path::new(&info.root).canonicalize().unwrap(),
        dir.path().canonicalize().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_and_conflict_statuses() {
    let f = fixture().await;
    let s = HttpStorage::new(&f.srv.url(), Some(TOKEN.into())).unwrap();
    let root = create_ready_timeline(&s, "root", empty_source())
        .await
        .unwrap();

    // The same key for another request: 409 Conflict.
    let body = serde_json::json!({
        "key": "root",
        "source": {"type": "schemaOnly", "timeline": root.id.as_str()},
    });
    let r = f
        .post("/v1/timelines", &body.to_string())
        .send()
        .await
        .unwrap();
    error_body(r, StatusCode::CONFLICT, "Conflict").await;

    // Deleting a timeline whose compute runs: 423 with Retry-After, a
    // retryable Busy for the client; fine once the compute stops.
    let port = free_port();
    let pg = f.engine.start_postgres(&root.id, port).await.unwrap();
    let r = f
        .http
        .delete(f.url(&format!("/v1/timelines/{}", root.id)))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    error_body(r, StatusCode::LOCKED, "Busy").await;
    let e = s.delete_timeline(&root.id).await.unwrap_err();
    assert!(
        matches!(e, StorageError::Busy { .. }) && e.is_retryable(),
        "{e:?}"
    );
    assert_eq!(s.get_timeline(&root.id).await.unwrap().state, State::Ready);
    pg.stop(pgbranch::storage::engine::StopMode::Fast)
        .await
        .unwrap();
    let r = f
        .http
        .delete(f.url(&format!("/v1/timelines/{}", root.id)))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

/// The real binary: token from the environment, requests carrying
/// passwords are served and logged without them, SIGTERM stops it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_binary_keeps_secrets_out_of_its_log() {
    let dir = temp_dir_in(None);
    let data = dir.path().join("volume");
    std::fs::create_dir(&data).unwrap();
    let srv = Serve::start(&data, dir.path(), None).await;
    let secret = "pw-SECRET-4711";
    let t = srv
        .client
        .create_timeline(CreateTimeline {
            key: key("root"),
            source: Source::Empty {
                superuser_password: Some(Password(secret.into())),
            },
            source_connection: None,
            label: None,
        })
        .await
        .unwrap();
    let t = pgbranch::storage::wait::wait_timeline_ready(&srv.client, &t.id, READY_TIMEOUT)
        .await
        .unwrap();
    // A head copy naming a source connection with a password (the source
    // is not running: the engine copies it stopped).
    let b = srv
        .client
        .create_timeline(CreateTimeline {
            key: key("child"),
            source: Source::Timeline {
                timeline: t.id.clone(),
                point: Point::Head,
            },
            source_connection: Some(ConnInfo {
                host: "127.0.0.1".into(),
                port: free_port(),
                user: "postgres".into(),
                password: Some(Password(secret.into())),
                dbname: "postgres".into(),
            }),
            label: None,
        })
        .await
        .unwrap();
    let _ = pgbranch::storage::wait::wait_timeline_ready(&srv.client, &b.id, READY_TIMEOUT).await;
    let unauthorized = HttpStorage::new(
        srv.client.base_url().as_ref(),
        Some("wrong-token-XYZ".into()),
    )
    .unwrap()
    .info()
    .await;
    assert!(matches!(
        unauthorized,
        Err(StorageError::Unauthorized { .. })
    ));
    srv.stop().await;

    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(log.contains("storage service listening"), "{log}");
    assert!(log.contains("/v1/timelines"), "requests are logged: {log}");
    assert!(
        log.contains("request refused"),
        "refusals are logged: {log}"
    );
    assert!(
        log.contains("storage service stopped"),
        "graceful stop: {log}"
    );
    assert!(!log.contains(secret), "a password reached the log");
    assert!(!log.contains(TOKEN), "the token reached the log");
    assert!(
        !log.contains("wrong-token-XYZ"),
        "a presented token reached the log"
    );
}
