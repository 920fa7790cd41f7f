//! Tier 4 (a real control plane): the kubectl plugin end to end. The
//! binary runs as `kubectl-pgbranch` (the name kubectl gives plugins) with
//! a cluster-admin kubeconfig, against the real operator, engine and
//! PostgreSQL: create with `--wait`, a dry run applied as printed, a
//! Stalled reason as a failing exit, snapshot, restore, finalize, `status`
//! and `connection-string`.

mod support;

use std::path::PathBuf;
use std::process::Output;

use pgbranch::api::{Branch, RestorePhase};
use support::world::*;

/// `kubectl-pgbranch ARGS` in the test's namespace.
struct Plugin {
    exe: PathBuf,
    kubeconfig: PathBuf,
    ns: String,
    _dir: tempfile::TempDir,
}

impl Plugin {
    fn new(h: &World) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = dir.path().join("kubectl-pgbranch");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_pgbranch"), &exe).expect("symlink");
        Plugin {
            exe,
            kubeconfig: h.control_plane.kubeconfig().to_path_buf(),
            ns: h.ns.clone(),
            _dir: dir,
        }
    }

    async fn run(&self, args: &[&str]) -> Output {
        let out = tokio::process::Command::new(&self.exe)
            .args(args)
            .args(["-n", &self.ns])
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "warn")
            .output()
            .await
            .expect("run kubectl-pgbranch");
        eprintln!(
            "$ kubectl pgbranch {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs and expects success; its stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(out.status.success(), "kubectl pgbranch {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The ids in `items` of `branch`, read through its Service with its Secret.
async fn ids(h: &World, branch: &str) -> Vec<i32> {
    h.connect_app(branch)
        .await
        .query("SELECT id FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_plugin_creates_waits_restores_finalizes_and_draws_the_tree() {
    let Some(mut h) = World::new(module_path!()).await else {
        return;
    };
    h.start_operator(h.config());
    let k = Plugin::new(&h);
    assert!(k.kubeconfig.exists());

    // A root branch, waited for.
    let out = k.ok(&["branch", "create", "prod", "--wait"]).await;
    assert!(out.contains("branch.pgbranch.dev/prod created"), "{out}");
    assert!(out.contains("prod: Ready after"), "{out}");
    h.connect_app("prod")
        .await
        .batch_execute("CREATE TABLE items (id int); INSERT INTO items VALUES (1), (2);")
        .await
        .expect("write prod");

    // A client dry run prints what a GitOps user commits, and it applies
    // as printed.
    let yaml = k
        .ok(&[
            "branch",
            "create",
            "dev",
            "--parent",
            "prod",
            "--dry-run",
            "-o",
            "yaml",
        ])
        .await;
    assert!(branches(&h.client).get_opt("dev").await.unwrap().is_none());
    let printed: Branch = serde_yaml::from_str(&yaml).expect("the dry run is a Branch");
    assert_eq!(printed.spec.parent.as_ref().unwrap().branch, "prod");
    assert!(
        yaml.starts_with("apiVersion: pgbranch.dev/v1alpha1\nkind: Branch\n"),
        "{yaml}"
    );
    create_branch(&h.client, &printed).await;
    wait_ready(&h.client, "dev").await;
    let rows = ids(&h, "dev").await;
    assert_eq!(rows, [1, 2]);

    // A server dry run is validated by the apiserver (CEL rules included)
    // and stores nothing.
    let out = k
        .run(&[
            "restore",
            "--source",
            "prod",
            "--preserve-under-name",
            "x",
            "--target",
            "prod",
            "--dry-run=server",
        ])
        .await;
    assert!(out.status.success());
    let out = k
        .run(&[
            "restore",
            "--source",
            "prod",
            "--target",
            "prod",
            "--dry-run=server",
        ])
        .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs preserveUnderName"), "{err}");
    assert!(restores(&h.client)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .is_empty());

    // A point outside the parent's window: --wait fails with the reason.
    let out = k
        .run(&[
            "branch",
            "create",
            "early",
            "--parent",
            "prod",
            "--at",
            "0/1",
            "--wait",
            "--timeout",
            "120",
        ])
        .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Stalled: PointOutsideRestoreWindow"), "{err}");
    // A bad point never reaches the cluster.
    let out = k
        .run(&[
            "branch",
            "create",
            "typo",
            "--parent",
            "prod",
            "--at",
            "yesterday",
        ])
        .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--at \"yesterday\""));
    assert!(branches(&h.client).get_opt("typo").await.unwrap().is_none());

    // Snapshot of dev, then rows that the restore takes away.
    let out = k
        .ok(&["snapshot", "create", "s1", "--branch", "dev", "--wait"])
        .await;
    assert!(out.contains("s1: Ready after"), "{out}");
    h.connect_app("dev")
        .await
        .batch_execute("INSERT INTO items VALUES (3)")
        .await
        .unwrap();
    let uri_before = k.ok(&["connection-string", "dev"]).await;
    assert!(
        uri_before.trim().starts_with("postgresql://")
            || uri_before.trim().starts_with("postgres://"),
        "{uri_before}"
    );
    assert!(
        uri_before.contains(&format!("dev.{}", h.ns)),
        "{uri_before}"
    );

    // A two-step restore: --wait stops at AwaitingFinalize, then finalize.
    let out = k
        .ok(&[
            "restore",
            "--name",
            "undo",
            "--snapshot",
            "s1",
            "--target",
            "dev",
            "--preserve-under-name",
            "dev-before",
            "--wait",
        ])
        .await;
    assert!(out.contains("AwaitingFinalize"), "{out}");
    let tree = k.ok(&["status"]).await;
    assert!(tree.contains("restore undo AwaitingFinalize"), "{tree}");
    let out = k.ok(&["finalize", "undo", "--wait"]).await;
    assert!(out.contains("undo: Completed"), "{out}");
    let r = restores(&h.client).get("undo").await.unwrap();
    assert_eq!(r.status.unwrap().phase, Some(RestorePhase::Completed));
    wait_ready(&h.client, "dev").await;
    let rows = ids(&h, "dev").await;
    assert_eq!(rows, [1, 2], "dev is back at the snapshot");
    assert_eq!(k.ok(&["connection-string", "dev"]).await, uri_before);

    // The tree: prod at the root, dev under it, the failed child with its
    // reason; -o json carries the same rows.
    let tree = k.ok(&["status"]).await;
    let lines: Vec<&str> = tree.lines().collect();
    assert!(lines[0].starts_with("BRANCH"), "{tree}");
    let prod_at = lines
        .iter()
        .position(|l| l.starts_with("prod "))
        .expect("prod row");
    assert!(
        lines[prod_at + 1..]
            .iter()
            .any(|l| l.starts_with("├─ dev ")),
        "{tree}"
    );
    assert!(tree.contains("PointOutsideRestoreWindow"), "{tree}");
    assert!(tree.contains("dev-before"), "{tree}");
    let json: serde_json::Value =
        serde_json::from_str(&k.ok(&["status", "dev", "-o", "json"]).await)
            .expect("status -o json");
    assert_eq!(json[0]["name"], "dev");
    assert_eq!(json[0]["ready"], true);
    assert_eq!(json[0]["snapshots"], 1);
    let out = k.run(&["status", "nope"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("branch nope not found"));

    // Reset: dev gets prod's head again.
    h.connect_app("prod")
        .await
        .batch_execute("INSERT INTO items VALUES (10)")
        .await
        .unwrap();
    let out = k.ok(&["branch", "reset", "dev", "--wait"]).await;
    assert!(out.contains("Completed"), "{out}");
    wait_ready(&h.client, "dev").await;
    let rows = ids(&h, "dev").await;
    assert_eq!(rows, [1, 2, 10]);
    let out = k.run(&["branch", "reset", "prod"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no parent"));

    // A support bundle: the objects and Events, no secret of the namespace.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("report.tar.gz");
    let out = k.ok(&["report", "--file", file.to_str().unwrap()]).await;
    assert!(out.contains("secrets redacted"), "{out}");
    let unpacked = dir.path().join("x");
    std::fs::create_dir(&unpacked).unwrap();
    let st = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&file)
        .arg("-C")
        .arg(&unpacked)
        .status()
        .unwrap();
    assert!(st.success());
    let report = unpacked.join("report");
    let branches_yaml = std::fs::read_to_string(report.join("objects/branches.yaml")).unwrap();
    assert!(branches_yaml.contains("name: dev") && branches_yaml.contains("name: prod"));
    assert!(std::fs::read_to_string(report.join("status.txt"))
        .unwrap()
        .contains("├─ dev"));
    assert!(std::fs::read_to_string(report.join("events.yaml"))
        .unwrap()
        .contains("reason:"));
    let secrets_txt = std::fs::read_to_string(report.join("secrets.txt")).unwrap();
    assert!(secrets_txt.contains("dev-app"), "{secrets_txt}");
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(h.client.clone(), &h.ns);
    let mut values = Vec::new();
    for s in secrets.list(&Default::default()).await.unwrap().items {
        for (key, v) in s.data.unwrap_or_default() {
            let v = String::from_utf8_lossy(&v.0).into_owned();
            if key.contains("password") {
                assert!(v.len() >= 6);
                values.push(v);
            }
        }
    }
    assert!(!values.is_empty());
    for entry in walkdir::WalkDir::new(&report) {
        let entry = entry.unwrap();
        if entry.file_type().is_file() {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            for v in &values {
                assert!(
                    !text.contains(v.as_str()),
                    "{} holds a password",
                    entry.path().display()
                );
            }
        }
    }

    h.shutdown().await;
}
