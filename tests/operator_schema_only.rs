//! Tier 4 (a real control plane): a schema-only child gets the parent's
//! schema, roles and databases without rows, and its own passwords.

mod support;

use kube::api::{DeleteParams, PostParams};
use pgbranch::api::{BranchSpec, DatabaseSpec, InitSource, ParentRef, RoleSpec};
use pgbranch::storage::Storage;
use support::world::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schema_only_child_has_tables_but_no_rows() {
    let Some(mut h) = World::new(module_path!()).await else {
        return;
    };
    h.start_operator(h.config());
    let client = h.client.clone();
    let api = branches(&client);
    api.create(
        &PostParams::default(),
        &branch(
            "main",
            BranchSpec {
                databases: vec![DatabaseSpec {
                    name: "shop".into(),
                    owner: Some("shop".into()),
                }],
                roles: vec![RoleSpec {
                    name: "shop".into(),
                }],
                ..Default::default()
            },
        ),
    )
    .await
    .unwrap();
    wait_ready(&client, "main").await;
    h.connect_app("main")
        .await
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, note text);
             INSERT INTO items SELECT g, 'x' FROM generate_series(1, 50) g;",
        )
        .await
        .unwrap();

    api.create(
        &PostParams::default(),
        &branch(
            "shape",
            BranchSpec {
                parent: Some(ParentRef {
                    branch: "main".into(),
                    ..Default::default()
                }),
                init_source: Some(InitSource::SchemaOnly),
                ..Default::default()
            },
        ),
    )
    .await
    .unwrap();
    wait_ready(&client, "shape").await;
    let c = h.connect_app("shape").await;
    assert_eq!(
        ids(&c).await,
        Vec::<i32>::new(),
        "the table is there, empty"
    );
    c.batch_execute("INSERT INTO items VALUES (1, 'fresh')")
        .await
        .expect("the primary key and columns came along");
    let main_pw = secret_field(&client, "main-app", "password").await;
    assert_ne!(
        secret_field(&client, "shape-app", "password").await,
        main_pw
    );
    assert_auth_fails(&h, "shape", "shop", &main_pw, "shop").await;
    drop(c);

    api.delete("shape", &DeleteParams::default()).await.unwrap();
    wait_gone(&api, "shape").await;
    api.delete("main", &DeleteParams::default()).await.unwrap();
    wait_gone(&api, "main").await;
    assert!(h.engine.list_timelines().await.unwrap().is_empty());
    h.shutdown().await;
}
