//! Inputs fuzzed (proptest): the point, LSN and time parsers, names,
//! schedules and spans, and the storage HTTP API's paths, queries and
//! bodies. The property everywhere: never a panic, and an error that names
//! what is wrong (the field and the text; a JSON body with a code and a
//! message and a 4xx status from the API). The corpus of known-tricky
//! inputs is kept in `tests/fuzz-corpus/` and run first; then a bounded
//! random pass (a few seconds). `PGBRANCH_FUZZ_CASES` raises the count for
//! a longer run.

use std::sync::Arc;

use axum::body::Body;
use http::{Method, Request, StatusCode};
use pgbranch::api::{parse_span, validate_branch_name, validate_dns_label};
use pgbranch::controller::scheduling::Cadence;
use pgbranch::point::{parse_lsn, parse_point, parse_point_word, parse_time};
use pgbranch::storage::engine::{Engine, EngineConfig};
use pgbranch::storage::http::server::{router, Auth};
use pgbranch::storage::DriverKind;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use tower::ServiceExt;

const TOKEN: &str = "fuzz-token-0123456789";

fn corpus(name: &str) -> Vec<String> {
    let path = format!("{}/tests/fuzz-corpus/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .map(String::from)
        .collect()
}

fn cases(default: u32) -> u32 {
    std::env::var("PGBRANCH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Text that looks like the inputs (digits, hex, '/', ':', '-', 'T', 'Z',
/// spaces, '*') more often than not, and anything at all otherwise.
fn texty() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9A-Fa-f/:+TZ .*@,-]{0,40}",
        "[0-9]{1,12}/[0-9A-F]{1,12}",
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?(Z|[+-][0-9]{2}:[0-9]{2})",
        "[0-9*/,-]{1,4} [0-9*/,-]{1,4} [0-9*/,-]{1,4} [0-9*/,-]{1,4} [0-9A-Z*/,-]{1,7}",
        "[0-9]{0,25}[smhdwy ]{0,2}",
        any::<String>(),
    ]
}

/// The error text names the field and shows the input.
fn names_input(msg: &str, field: &str, input: &str) -> bool {
    msg.contains(field) && msg.contains(&format!("{input:?}"))
}

fn check_point_parsers(s: &str) {
    if let Err(e) = parse_point_word("spec.point", s) {
        assert!(names_input(&e.to_string(), "spec.point", s), "{e}");
    }
    if let Err(e) = parse_lsn("spec.lsn", s) {
        assert!(names_input(&e.to_string(), "spec.lsn", s), "{e}");
    }
    if let Err(e) = parse_time("spec.timestamp", s) {
        assert!(names_input(&e.to_string(), "spec.timestamp", s), "{e}");
    }
    // The pair: an LSN field and a time field, one or both.
    let _ = parse_point("spec.parent.", Some(s), None);
    let _ = parse_point("spec.parent.", None, Some(s));
    assert!(parse_point("spec.parent.", Some(s), Some(s)).is_err());
}

fn check_names(s: &str) {
    for r in [validate_branch_name(s), validate_dns_label(s)] {
        if let Err(e) = r {
            let msg = e.to_string();
            assert!(s.is_empty() || msg.contains(&format!("{s:?}")), "{msg}");
        }
    }
}

fn check_schedules(s: &str) {
    let anchor = jiff::Timestamp::UNIX_EPOCH;
    for r in [
        Cadence::cron(s, None),
        Cadence::cron(s, Some(s)),
        Cadence::interval(s, anchor),
    ] {
        match r {
            Ok(c) => {
                // A schedule that parses can be asked for its times.
                let _ = c.next_after(anchor);
                let _ = c.latest_at_or_before(jiff::Timestamp::MAX);
            }
            Err(e) => assert!(e.to_string().contains(&format!("{s:?}")), "{e}"),
        }
    }
    if let Err(e) = parse_span(s) {
        assert!(!e.to_string().is_empty());
    }
}

fn run<S: Strategy>(n: u32, strategy: S, test: impl Fn(S::Value))
where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases: cases(n),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&strategy, |v| {
            test(v);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn points_lsns_and_times_never_panic_and_name_the_field() {
    for s in corpus("points.txt") {
        check_point_parsers(&s);
    }
    run(3000, texty(), |s| check_point_parsers(&s));
}

#[test]
fn names_never_panic_and_quote_the_name() {
    for s in corpus("names.txt") {
        check_names(&s);
    }
    run(3000, prop_oneof!["[a-z0-9-]{0,70}", any::<String>()], |s| {
        check_names(&s)
    });
}

#[test]
fn schedules_and_spans_never_panic_and_quote_the_input() {
    for s in corpus("schedules.txt") {
        check_schedules(&s);
    }
    run(2000, texty(), |s| check_schedules(&s));
}

/// One request to the storage API, in process.
async fn call(
    app: &axum::Router,
    method: Method,
    path: &str,
    body: String,
) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("a request");
    let resp = app.clone().oneshot(req).await.expect("the router answers");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("a body");
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// A 4xx (or a success) with a JSON error naming a code and a message.
fn judge(method: &Method, path: &str, status: StatusCode, body: &str) {
    assert!(
        !status.is_server_error(),
        "{method} {path}: {status}: {body}"
    );
    if status.is_client_error() {
        let v: serde_json::Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{method} {path}: {status}: not JSON ({e}): {body}"));
        assert!(
            v["code"].as_str().is_some_and(|c| !c.is_empty())
                && v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{method} {path}: {status}: {body}"
        );
    }
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storage_api_answers_bad_paths_and_bodies_with_a_4xx_and_a_message() {
    let dir = tempfile::Builder::new()
        .prefix("pgbranch-fuzz-")
        .tempdir()
        .expect("tempdir");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let engine = Engine::open(EngineConfig {
        root: dir.path().join("volume"),
        driver: Some(DriverKind::Copy),
        ..Default::default()
    })
    .await
    .expect("engine opens");
    let app = router(Arc::new(engine), Auth::token(TOKEN).unwrap());

    let bodies = corpus("http-bodies.txt");
    for path in corpus("http-paths.txt") {
        for m in [Method::GET, Method::POST, Method::PUT, Method::DELETE] {
            let (st, body) = call(&app, m.clone(), &path, String::new()).await;
            judge(&m, &path, st, &body);
        }
    }
    for b in &bodies {
        for path in ["/v1/timelines", "/v1/snapshots"] {
            let (st, body) = call(&app, Method::POST, path, b.clone()).await;
            judge(&Method::POST, path, st, &body);
            assert!(st.is_client_error(), "POST {path} {b:?}: {st}");
        }
    }

    // Random paths, queries and bodies. Bodies never carry a usable key,
    // so nothing is created: this is about refusals.
    let strategy = (
        prop_oneof![
            Just(Method::GET),
            Just(Method::POST),
            Just(Method::PUT),
            Just(Method::DELETE)
        ],
        prop_oneof![
            Just("timelines".to_string()),
            Just("snapshots".to_string()),
            Just("info".to_string()),
            "[a-z]{0,8}"
        ],
        proptest::option::of(any::<String>()),
        prop_oneof![
            Just(String::new()),
            Just("/resolve".to_string()),
            "/replicas/[0-9-]{0,22}",
            "/[a-z]{1,5}"
        ],
        proptest::option::of(("(lsn|timestamp|x)", texty())),
        prop_oneof![
            any::<String>(),
            "\\{\"source\": \\{\"type\": \"(empty|timeline|snapshot|x)\"\\}, \"key\": [0-9]{1,3}\\}",
            "\\{\"key\": \"[./ ]{1,5}\", \"source\": \\{\"type\": \"empty\"\\}\\}",
        ],
    );
    let mut runner = TestRunner::new(Config {
        cases: cases(400),
        failure_persistence: None,
        ..Config::default()
    });
    let cases: Vec<_> = (0..runner.config().cases)
        .map(|_| strategy.new_tree(&mut runner).expect("a case").current())
        .collect();
    for (m, kind, id, tail, query, body) in cases {
        let mut path = format!("/v1/{kind}");
        if let Some(id) = id {
            path.push('/');
            path.push_str(&pct(&id));
        }
        path.push_str(&tail);
        if let Some((k, v)) = query {
            path.push_str(&format!("?{k}={}", pct(&v)));
        }
        let (st, resp) = call(&app, m.clone(), &path, body).await;
        judge(&m, &path, st, &resp);
    }
}
