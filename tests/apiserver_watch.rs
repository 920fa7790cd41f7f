//! Watch streams of the in-process API server through the real
//! kube::Client and the real kube_runtime watcher.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use serde_json::json;
use support::apiserver::{ApiServer, ChangeKind, Delay, Failure};

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(name.into());
    cm.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    cm.data = Some(BTreeMap::from([("k".to_string(), "v".to_string())]));
    cm
}

/// The next watch event, bookmarks included, or a panic after 5 s.
async fn next_any<S>(stream: &mut S) -> WatchEvent<ConfigMap>
where
    S: futures::Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a watch event within 5 s")
        .expect("the stream is open")
        .expect("a decodable event")
}

/// The next watch event that is not a bookmark.
async fn next<S>(stream: &mut S) -> WatchEvent<ConfigMap>
where
    S: futures::Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin,
{
    loop {
        let ev = next_any(stream).await;
        if !matches!(ev, WatchEvent::Bookmark(_)) {
            return ev;
        }
    }
}

fn describe(ev: &WatchEvent<ConfigMap>) -> String {
    match ev {
        WatchEvent::Added(o) => format!("ADDED {}", o.name_any()),
        WatchEvent::Modified(o) => format!("MODIFIED {}", o.name_any()),
        WatchEvent::Deleted(o) => format!("DELETED {}", o.name_any()),
        WatchEvent::Bookmark(_) => "BOOKMARK".into(),
        WatchEvent::Error(e) => format!("ERROR {}", e.code),
    }
}

#[tokio::test]
async fn watch_streams_added_modified_deleted() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let pp = PostParams::default();
    cms.create(&pp, &cm("before", &[])).await.unwrap();

    let mut stream = cms
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    assert_eq!(describe(&next(&mut stream).await), "ADDED before");

    cms.create(&pp, &cm("live", &[])).await.unwrap();
    assert_eq!(describe(&next(&mut stream).await), "ADDED live");
    cms.patch(
        "live",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "w"}})),
    )
    .await
    .unwrap();
    let ev = next(&mut stream).await;
    assert_eq!(describe(&ev), "MODIFIED live");
    if let WatchEvent::Modified(o) = &ev {
        assert_eq!(o.data.as_ref().unwrap()["k"], "w");
    }
    cms.delete("live", &DeleteParams::default()).await.unwrap();
    assert_eq!(describe(&next(&mut stream).await), "DELETED live");

    // another namespace is not seen by a namespaced watch
    server.create_namespace("other");
    let other: Api<ConfigMap> = Api::namespaced(server.client(), "other");
    other.create(&pp, &cm("elsewhere", &[])).await.unwrap();
    cms.create(&pp, &cm("after", &[])).await.unwrap();
    assert_eq!(describe(&next(&mut stream).await), "ADDED after");
}

#[tokio::test]
async fn watch_from_a_resource_version_replays_history_and_410s_when_compacted() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let pp = PostParams::default();
    let a = cms.create(&pp, &cm("a", &[])).await.unwrap();
    let rv = a.resource_version().unwrap();
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "2"}})),
    )
    .await
    .unwrap();
    cms.create(&pp, &cm("b", &[])).await.unwrap();

    let mut stream = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    assert_eq!(describe(&next(&mut stream).await), "MODIFIED a");
    assert_eq!(describe(&next(&mut stream).await), "ADDED b");
    drop(stream);

    server.compact_history();
    let mut stream = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match next(&mut stream).await {
        WatchEvent::Error(e) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => panic!("expected 410 Expired, got {}", describe(&other)),
    }
    assert!(
        stream.next().await.is_none(),
        "the stream ends after the error"
    );

    // a watch from the current version still works after compaction
    let now = server.resource_version().to_string();
    let mut stream = cms
        .watch(&WatchParams::default(), &now)
        .await
        .unwrap()
        .boxed();
    cms.create(&pp, &cm("c", &[])).await.unwrap();
    assert_eq!(describe(&next(&mut stream).await), "ADDED c");
}

#[tokio::test]
async fn bookmarks_and_selector_transitions() {
    let server = ApiServer::new();
    server.set_bookmark_interval(Duration::from_millis(100));
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let pp = PostParams::default();
    cms.create(&pp, &cm("m", &[("app", "db")])).await.unwrap();
    cms.create(&pp, &cm("n", &[("app", "web")])).await.unwrap();

    let wp = WatchParams::default().labels("app=db");
    let mut stream = cms.watch(&wp, "0").await.unwrap().boxed();
    assert_eq!(describe(&next(&mut stream).await), "ADDED m");
    // bookmarks carry the resourceVersion the watch has seen
    match next_any(&mut stream).await {
        WatchEvent::Bookmark(b) => {
            assert_eq!(
                b.metadata.resource_version,
                server.resource_version().to_string()
            );
        }
        other => panic!("expected a bookmark, got {}", describe(&other)),
    }
    // leaving the selector arrives as DELETED, entering it as ADDED
    cms.patch(
        "m",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "other"}}})),
    )
    .await
    .unwrap();
    cms.patch(
        "n",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "db"}}})),
    )
    .await
    .unwrap();
    let seen = [
        describe(&next(&mut stream).await),
        describe(&next(&mut stream).await),
    ];
    assert_eq!(seen, ["DELETED m", "ADDED n"]);

    // sendInitialEvents: state, then the initial-events-end bookmark
    let wp = WatchParams::streaming_lists();
    let mut stream = cms.watch(&wp, "").await.unwrap().boxed();
    assert_eq!(describe(&next(&mut stream).await), "ADDED m");
    assert_eq!(describe(&next(&mut stream).await), "ADDED n");
    match next_any(&mut stream).await {
        WatchEvent::Bookmark(b) => assert_eq!(
            b.metadata
                .annotations
                .get("k8s.io/initial-events-end")
                .map(String::as_str),
            Some("true")
        ),
        other => panic!(
            "expected the initial-events-end bookmark, got {}",
            describe(&other)
        ),
    }
}

#[tokio::test]
async fn runtime_watcher_lists_watches_and_relists_after_410() {
    let server = ApiServer::new();
    // no bookmarks during the test, so the watcher's resourceVersion falls behind
    server.set_bookmark_interval(Duration::from_secs(3600));
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let pp = PostParams::default();
    cms.create(&pp, &cm("first", &[])).await.unwrap();

    let cfg = watcher::Config::default().timeout(1);
    let mut events = watcher(cms.clone(), cfg).boxed();
    let mut inits = 0;
    let mut seen = Vec::new();
    let step = |ev: watcher::Event<ConfigMap>, inits: &mut i32, seen: &mut Vec<String>| match ev {
        watcher::Event::Init => *inits += 1,
        watcher::Event::InitApply(o) => seen.push(format!("init {}", o.name_any())),
        watcher::Event::InitDone => {}
        watcher::Event::Apply(o) => seen.push(format!("apply {}", o.name_any())),
        watcher::Event::Delete(o) => seen.push(format!("delete {}", o.name_any())),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut created = false;
    while tokio::time::Instant::now() < deadline {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.try_next())
            .await
            .expect("watcher event")
            .expect("no watcher error")
            .expect("stream open");
        step(ev, &mut inits, &mut seen);
        if seen.contains(&"init first".to_string()) && !created {
            created = true;
            cms.create(&pp, &cm("second", &[])).await.unwrap();
        }
        if seen.contains(&"apply second".to_string()) {
            break;
        }
    }
    assert_eq!(inits, 1);
    assert!(seen.contains(&"apply second".to_string()), "{seen:?}");

    // A change the watcher does not see, then compaction: its next watch
    // (after the 1 s timeout) gets 410 and it relists.
    server.create_namespace("elsewhere");
    server.compact_history();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut expired = 0;
    let relisted = |seen: &Vec<String>| seen.iter().filter(|s| s.starts_with("init")).count() == 3;
    while !(inits == 2 && relisted(&seen)) && tokio::time::Instant::now() < deadline {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("watcher event")
            .expect("stream open");
        match ev {
            Ok(ev) => step(ev, &mut inits, &mut seen),
            // the watcher reports the 410 once, then relists
            Err(watcher::Error::WatchError(s)) if s.code == 410 => expired += 1,
            Err(e) => panic!("unexpected watcher error {e}"),
        }
    }
    assert_eq!(expired, 1);
    assert_eq!(inits, 2, "the watcher relisted after 410 Expired");
    let relisted: Vec<_> = seen.iter().filter(|s| s.starts_with("init")).collect();
    assert_eq!(relisted, ["init first", "init first", "init second"]);
}

#[tokio::test]
async fn subscribe_sees_every_stored_change() {
    let server = ApiServer::new();
    let mut changes = server.subscribe();
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    cms.create(&PostParams::default(), &cm("s", &[]))
        .await
        .unwrap();
    cms.delete("s", &DeleteParams::default()).await.unwrap();
    let a = changes.recv().await.unwrap();
    let d = changes.recv().await.unwrap();
    assert_eq!(
        (a.kind, a.name.as_str(), a.resource.as_str()),
        (ChangeKind::Added, "s", "configmaps")
    );
    assert_eq!(d.kind, ChangeKind::Deleted);
    assert!(d.resource_version > a.resource_version);
}

#[tokio::test]
async fn runtime_watcher_with_streaming_lists() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    cms.create(&PostParams::default(), &cm("streamed", &[]))
        .await
        .unwrap();
    let mut events = watcher(cms.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut seen = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.try_next())
            .await
            .expect("watcher event")
            .expect("no watcher error")
            .expect("stream open");
        match ev {
            watcher::Event::InitApply(o) => seen.push(o.name_any()),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(seen, ["streamed"]);
    cms.create(&PostParams::default(), &cm("later", &[]))
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(ev, watcher::Event::Apply(o) if o.name_any() == "later"));
}

#[tokio::test]
async fn wait_for_wakes_on_changes() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let waiter = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .wait_for(
                    "",
                    "configmaps",
                    Some("default"),
                    "awaited",
                    Duration::from_secs(5),
                    |o| o.is_some_and(|o| o["data"]["k"] == "ready"),
                )
                .await
        })
    };
    cms.create(&PostParams::default(), &cm("awaited", &[]))
        .await
        .unwrap();
    cms.patch(
        "awaited",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "ready"}})),
    )
    .await
    .unwrap();
    let got = waiter.await.unwrap().unwrap();
    assert_eq!(got["data"]["k"], "ready");
}

#[tokio::test]
async fn broken_watches_resume_without_losing_events_and_delays_apply() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let mut events = watcher(cms.clone(), watcher::Config::default()).boxed();
    // initial list
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if matches!(ev, watcher::Event::InitDone) {
            break;
        }
    }
    // the stream is lazy: once an event arrived, the watch is open
    cms.create(&PostParams::default(), &cm("before-break", &[]))
        .await
        .unwrap();
    let mut applied = Vec::new();
    while applied.is_empty() {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let watcher::Event::Apply(o) = ev {
            applied.push(o.name_any());
        }
    }
    server.break_watches();
    cms.create(&PostParams::default(), &cm("after-break", &[]))
        .await
        .unwrap();
    while applied.len() < 2 {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.try_next())
            .await
            .expect("the watcher resumes")
            .unwrap()
            .unwrap();
        if let watcher::Event::Apply(o) = ev {
            applied.push(o.name_any());
        }
    }
    assert_eq!(applied, ["before-break", "after-break"]);
    let watches = server
        .requests()
        .iter()
        .filter(|r| r.verb == "watch")
        .count();
    assert!(
        watches >= 2,
        "the watcher reconnected ({watches} watch requests)"
    );

    server.delay(Delay::new("get", "configmaps").by(Duration::from_millis(300)));
    let started = std::time::Instant::now();
    cms.get("after-break").await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    let started = std::time::Instant::now();
    cms.get("after-break").await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(300), "only once");
}

#[tokio::test]
async fn runtime_watcher_retries_injected_list_and_watch_failures() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    cms.create(&PostParams::default(), &cm("x", &[]))
        .await
        .unwrap();
    server.fail(Failure::new("list", "configmaps").code(503));
    server.fail(Failure::new("watch", "configmaps").code(500));
    let mut events = watcher(cms.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut seen = Vec::new();
    let mut errors = 0;
    while !seen.contains(&"apply y".to_string()) {
        let ev = tokio::time::timeout(Duration::from_secs(15), events.next())
            .await
            .expect("the watcher recovers")
            .expect("stream open");
        match ev {
            Ok(watcher::Event::InitApply(o)) => {
                seen.push(format!("init {}", o.name_any()));
                if seen.len() == 1 {
                    cms.create(&PostParams::default(), &cm("y", &[]))
                        .await
                        .unwrap();
                }
            }
            Ok(watcher::Event::Apply(o)) => seen.push(format!("apply {}", o.name_any())),
            Ok(_) => {}
            Err(_) => errors += 1,
        }
    }
    assert_eq!(errors, 2, "one failed list, one failed watch");
    assert_eq!(seen, ["init x", "apply y"]);
    let injected: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.injected)
        .map(|r| (r.verb, r.code))
        .collect();
    assert_eq!(
        injected,
        [("list".to_string(), 503), ("watch".to_string(), 500)]
    );
}
