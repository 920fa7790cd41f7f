//! Backups at the storage-engine tier, on a real object store (Garage on
//! 127.0.0.1) with the real backup tool (barman-cloud) and PostgreSQL:
//!
//! * **Disaster**: a branch is backed up (continuous WAL archiving + a base
//!   backup taken from the engine's copy, not the compute), rows are
//!   committed one by one, then the engine's whole directory (timelines,
//!   local WAL archive, metadata) is deleted. A fresh engine on a fresh
//!   directory restores from the bucket alone at a timestamp, at an LSN and
//!   at the latest archived point: exactly the rows committed by then.
//! * **Without pgbranch**: the README's tool-only recovery commands (the
//!   block between `dba-restore` markers), run as written by the
//!   PostgreSQL user with barman-cloud and PostgreSQL alone, give the same
//!   rows.
//! * **Destination down**: the database serves, the WAL waits locally, the
//!   failure is reported; archiving catches up when the store is back.
//! * **Retention** keeps the newest base backups and the WAL they need;
//!   points before them are refused. **Never a shared archive**: a second
//!   timeline cannot archive into the first one's barman server.

#[path = "support/object_store.rs"]
#[allow(dead_code)]
mod object_store;

use std::time::{Duration, Instant};

use object_store::Garage;
use pgbranch::backup::{Credentials, ObjectStore};
use pgbranch::storage::engine::{
    BackupTarget, Engine, EngineConfig, PgServer, RestoreFromBackup, StopMode,
};
use pgbranch::storage::wait::wait_timeline_ready;
use pgbranch::storage::{
    CreateTimeline, DriverKind, Lsn, OpKey, Password, Point, Source, Storage, TimelineId,
};

const WAIT: Duration = Duration::from_secs(180);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn store(g: &Garage) -> ObjectStore {
    ObjectStore {
        endpoint: g.endpoint.clone(),
        bucket: g.bucket.clone(),
        region: g.region.clone(),
        prefix: "team/pgbranch".into(),
        path_style: true,
        ca_bundle: None,
        credentials: Credentials {
            access_key_id: g.access_key_id.clone(),
            secret_access_key: g.secret_access_key.clone(),
        },
    }
}

async fn open(root: &std::path::Path) -> Engine {
    Engine::open(EngineConfig {
        root: root.to_path_buf(),
        driver: Some(DriverKind::Copy),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn root_timeline(e: &Engine, k: &str) -> TimelineId {
    let t = e
        .create_timeline(CreateTimeline {
            key: OpKey::new(k).unwrap(),
            source: Source::Empty {
                superuser_password: Some(Password("pw-not-in-the-bucket".into())),
            },
            source_connection: None,
            label: None,
        })
        .await
        .unwrap();
    wait_timeline_ready(e, &t.id, WAIT).await.unwrap().id
}

async fn ids(srv: &PgServer) -> Vec<i32> {
    let c = srv.connect("postgres").await.unwrap();
    c.query("SELECT id FROM t ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn tools_present(test: &str) -> Option<()> {
    if object_store::barman_installed() {
        Some(())
    } else {
        object_store::skip_notice(
            test,
            "barman-cloud (Debian barman-cli-cloud) is not installed",
        )
    }
}

/// Waits until everything archived locally is in the bucket.
async fn wait_uploaded(e: &Engine, id: &TimelineId, through: &str) {
    let started = Instant::now();
    loop {
        let st = e.archive_now(id).await.unwrap();
        if st.pending == 0 && st.last_archived_wal.as_deref() >= Some(through) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "WAL up to {through} not uploaded: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaster_restore_from_the_bucket_at_a_time_an_lsn_and_the_latest_point() {
    let test = "disaster_restore";
    let started = Instant::now();
    if tools_present(test).is_none() {
        return;
    }
    let Some(g) = Garage::start(test, "backups") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let vol_a = dir.path().join("engine-a");
    let server_name = "branch-4b0d5c1e-uid";

    // A branch with rows, backed up.
    let e = open(&vol_a).await;
    let tl = root_timeline(&e, "main").await;
    let p = e.start_postgres(&tl, free_port()).await.unwrap();
    let c = p.connect("postgres").await.unwrap();
    c.batch_execute(
        "CREATE TABLE t (id int primary key); INSERT INTO t SELECT generate_series(1, 100);",
    )
    .await
    .unwrap();
    e.enable_backup(
        &tl,
        BackupTarget {
            store: store(&g),
            server: server_name.into(),
        },
    )
    .await
    .unwrap();
    let seg: String = c
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .unwrap()
        .get(0);
    wait_uploaded(&e, &tl, &seg).await;
    let t0 = Instant::now();
    let base = e.base_backup(&tl).await.unwrap();
    eprintln!("base backup {} took {:?}", base.backup_id, t0.elapsed());
    assert!(base.end_lsn.is_some(), "{base:?}");

    // Rows 101..=250, one transaction each; note a time after row 150's
    // commit (before 151's) and the LSN after row 200's.
    let mut at_time = None;
    let mut at_lsn = None;
    for i in 101..=250 {
        c.execute("INSERT INTO t VALUES ($1)", &[&i]).await.unwrap();
        if i == 150 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let now: String = c
                .query_one(
                    "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            at_time = Some(now.parse::<jiff::Timestamp>().unwrap());
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        if i == 200 {
            let l: String = c
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .unwrap()
                .get(0);
            at_lsn = Some(l.parse::<Lsn>().unwrap());
        }
    }
    let seg: String = c
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .unwrap()
        .get(0);
    wait_uploaded(&e, &tl, &seg).await;
    let st = e.backup_status(&tl).unwrap();
    assert!(st.last_error.is_none(), "{st:?}");
    assert_eq!(st.last_base_backup.as_ref(), Some(&base));

    // The disaster: the engine and its whole directory are gone.
    drop(c);
    p.stop(StopMode::Immediate).await.unwrap();
    e.disable_backup(&tl);
    drop(e);
    std::fs::remove_dir_all(&vol_a).unwrap();
    assert!(!vol_a.exists());

    // A fresh engine on a fresh directory, from the bucket alone.
    let fresh = open(&dir.path().join("engine-b")).await;
    let cases: [(&str, Point, Vec<i32>); 3] = [
        (
            "at-time",
            Point::Timestamp(at_time.unwrap()),
            (1..=150).collect(),
        ),
        ("at-lsn", Point::Lsn(at_lsn.unwrap()), (1..=200).collect()),
        ("latest", Point::Head, (1..=250).collect()),
    ];
    for (name, point, want) in cases {
        let t = Instant::now();
        let r = fresh
            .restore_from_backup(RestoreFromBackup {
                store: store(&g),
                server: server_name.into(),
                point,
                name: name.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("restore {name}: {e}"));
        let took = t.elapsed();
        assert_eq!(r.backup_id, base.backup_id);
        let s = fresh.start_restored(&r, free_port()).await.unwrap();
        let got = ids(&s).await;
        s.stop(StopMode::Fast).await.unwrap();
        assert_eq!(
            (got.len(), got.first(), got.last()),
            (want.len(), want.first(), want.last()),
            "{name}: the restored rows"
        );
        assert_eq!(got, want, "{name}");
        eprintln!("restore {name}: {} rows in {took:?}", got.len());
    }

    // The same from the README's commands, without pgbranch.
    let t = Instant::now();
    let target = format!(
        "recovery_target_time = '{}'",
        at_time.unwrap().strftime("%Y-%m-%d %H:%M:%S%.6f+00")
    );
    let got = dba_restore(&g, server_name, &target, &dir.path().join("dba")).await;
    assert_eq!(
        got,
        (1..=150).collect::<Vec<i32>>(),
        "the README's recovery"
    );
    eprintln!("README recovery: {} rows in {:?}", got.len(), t.elapsed());
    eprintln!("{test} took {:?}", started.elapsed());
}

/// The README's tool-only recovery block.
fn readme_recovery_block() -> String {
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let start = readme
        .find("<!-- dba-restore:begin -->")
        .expect("the README's recovery block");
    let end = readme.find("<!-- dba-restore:end -->").unwrap();
    readme[start..end]
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the README's recovery commands into `work/pgdata` as the
/// PostgreSQL user, then reads the rows of `t` and stops the server.
async fn dba_restore(g: &Garage, server: &str, target: &str, work: &std::path::Path) -> Vec<i32> {
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(work).unwrap();
    let user = nix::unistd::geteuid()
        .is_root()
        .then(|| nix::unistd::User::from_name("postgres").unwrap().unwrap());
    if let Some(u) = &user {
        nix::unistd::chown(work, Some(u.uid), Some(u.gid)).unwrap();
    }
    let config = work.join("aws-config");
    std::fs::write(&config, "[default]\ns3 =\n    addressing_style = path\n").unwrap();
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .unwrap()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("pg_ctl").exists())
        .max()
        .unwrap();
    let pgdata = work.join("pgdata");
    let port = free_port();
    let s = store(g);
    let env = |cmd: &mut std::process::Command| {
        cmd.env("AWS_ACCESS_KEY_ID", &s.credentials.access_key_id)
            .env("AWS_SECRET_ACCESS_KEY", &s.credentials.secret_access_key)
            .env("AWS_DEFAULT_REGION", &s.region)
            .env("AWS_CONFIG_FILE", &config)
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("ENDPOINT", &s.endpoint)
            .env("DEST", s.s3_url())
            .env("SERVER", server)
            .env("PGDATA", &pgdata)
            .env("PORT", port.to_string())
            .env("RECOVERY_TARGET", target)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("HOME", "/tmp")
            .current_dir(work);
        if let Some(u) = &user {
            cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        }
    };
    let mut cmd = std::process::Command::new("timeout");
    cmd.args(["300", "bash", "-euo", "pipefail", "-c"])
        .arg(readme_recovery_block());
    env(&mut cmd);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "the README's recovery failed: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(work.join("restore.log")).unwrap_or_default()
    );
    let mut cfg = tokio_postgres::Config::new();
    cfg.host_path(&pgdata)
        .port(port)
        .user("postgres")
        .dbname("postgres");
    let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let rows: Vec<i32> = c
        .query("SELECT id FROM t ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(c);
    let mut stop = std::process::Command::new(bin.join("pg_ctl"));
    stop.args(["stop", "-m", "fast", "-D"]).arg(&pgdata);
    env(&mut stop);
    let st = tokio::task::spawn_blocking(move || stop.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_destination_holds_wal_locally_and_archiving_catches_up() {
    let test = "destination_down";
    let started = Instant::now();
    if tools_present(test).is_none() {
        return;
    }
    let Some(mut g) = Garage::start(test, "backups") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let e = open(&dir.path().join("engine-a")).await;
    let tl = root_timeline(&e, "main").await;
    let p = e.start_postgres(&tl, free_port()).await.unwrap();
    let c = p.connect("postgres").await.unwrap();
    c.batch_execute("CREATE TABLE t (id int primary key)")
        .await
        .unwrap();
    let server = "branch-down";
    e.enable_backup(
        &tl,
        BackupTarget {
            store: store(&g),
            server: server.into(),
        },
    )
    .await
    .unwrap();
    let seg: String = c
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .unwrap()
        .get(0);
    wait_uploaded(&e, &tl, &seg).await;
    e.base_backup(&tl).await.unwrap();

    // The object store goes away; the database keeps serving and its WAL
    // waits in the local archive.
    g.stop();
    let mut last_seg = String::new();
    for batch in 0..4 {
        let from = batch * 100 + 1;
        c.execute(
            "INSERT INTO t SELECT generate_series($1::int, $1::int + 99)",
            &[&from],
        )
        .await
        .expect("the database serves while the destination is down");
        last_seg = c
            .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
            .await
            .unwrap()
            .get(0);
    }
    let st = loop {
        let st = e.backup_status(&tl).unwrap();
        if st.last_error.is_some() && st.pending > 0 {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "no failure reported while the destination is down: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let err = st.last_error.as_ref().unwrap();
    assert_eq!(err.failure.reason(), "EndpointUnreachable", "{err}");
    assert!(
        !err.message.contains(&g.secret_access_key) && !err.message.contains(&g.access_key_id),
        "no credential in the error"
    );
    eprintln!("while down: {} WAL files wait locally; {err}", st.pending);

    // It comes back: archiving catches up, and everything is recoverable.
    g.restart();
    let t = Instant::now();
    wait_uploaded(&e, &tl, &last_seg).await;
    eprintln!("caught up {:?} after the store came back", t.elapsed());
    assert!(e.backup_status(&tl).unwrap().last_error.is_none());
    drop(c);
    p.stop(StopMode::Immediate).await.unwrap();
    e.disable_backup(&tl);
    drop(e);
    let fresh = open(&dir.path().join("engine-b")).await;
    let r = fresh
        .restore_from_backup(RestoreFromBackup {
            store: store(&g),
            server: server.into(),
            point: Point::Head,
            name: "latest".into(),
        })
        .await
        .unwrap();
    let s = fresh.start_restored(&r, free_port()).await.unwrap();
    assert_eq!(ids(&s).await, (1..=400).collect::<Vec<i32>>());
    s.stop(StopMode::Fast).await.unwrap();
    eprintln!("{test} took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_base_backups_and_archives_are_never_shared() {
    let test = "retention";
    let started = Instant::now();
    if tools_present(test).is_none() {
        return;
    }
    let Some(g) = Garage::start(test, "backups") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let e = open(&dir.path().join("engine-a")).await;
    let tl = root_timeline(&e, "main").await;
    let p = e.start_postgres(&tl, free_port()).await.unwrap();
    let c = p.connect("postgres").await.unwrap();
    c.batch_execute("CREATE TABLE t (id int primary key)")
        .await
        .unwrap();
    let server = "branch-retention";
    e.enable_backup(
        &tl,
        BackupTarget {
            store: store(&g),
            server: server.into(),
        },
    )
    .await
    .unwrap();
    // A second timeline (a sibling branch) is refused this one's archive
    // once it holds WAL, and gets its own.
    let sibling = root_timeline(&e, "sibling").await;
    let target = |server: &str| BackupTarget {
        store: store(&g),
        server: server.into(),
    };
    // Three rounds of 100 rows, each followed by a base backup; then 100
    // more. `after[n]`: the LSN after round n's rows (n = 0, 1, 2).
    let mut after = Vec::new();
    let mut backups = Vec::new();
    for round in 0..4 {
        let from = round * 100 + 1;
        c.execute(
            "INSERT INTO t SELECT generate_series($1::int, $1::int + 99)",
            &[&from],
        )
        .await
        .unwrap();
        let lsn: String = c
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        after.push(lsn.parse::<Lsn>().unwrap());
        let seg: String = c
            .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
            .await
            .unwrap()
            .get(0);
        wait_uploaded(&e, &tl, &seg).await;
        if round == 0 {
            let err = e.enable_backup(&sibling, target(server)).await.unwrap_err();
            eprintln!("refused: {err}");
            assert!(
                err.to_string()
                    .contains(&format!("\"{server}\" already holds WAL")),
                "the refusal names the archive: {err}"
            );
            assert!(e.backup_status(&sibling).is_none());
            e.enable_backup(&sibling, target("branch-sibling"))
                .await
                .unwrap();
        }
        if round < 3 {
            // barman's backup ids are times to the second.
            tokio::time::sleep(Duration::from_millis(1100)).await;
            backups.push(e.base_backup(&tl).await.unwrap().backup_id);
        }
    }
    let kept = e.apply_retention(&tl, 2).await.unwrap();
    assert_eq!(
        kept.iter().map(|b| b.backup_id.clone()).collect::<Vec<_>>(),
        backups[1..].to_vec(),
        "the newest two are kept"
    );
    drop(c);
    p.stop(StopMode::Immediate).await.unwrap();
    e.disable_backup(&tl);
    e.disable_backup(&sibling);
    drop(e);

    let fresh = open(&dir.path().join("engine-b")).await;
    let restore = |name: &str, point: Point| RestoreFromBackup {
        store: store(&g),
        server: server.into(),
        point,
        name: name.into(),
    };
    // Before the oldest kept backup: no longer recoverable, and said so.
    let err = fresh
        .restore_from_backup(restore("before-window", Point::Lsn(after[1])))
        .await
        .unwrap_err();
    assert!(
        matches!(err, pgbranch::storage::StorageError::InvalidPoint { .. }),
        "{err}"
    );
    // Inside the window: from the oldest kept backup and the WAL after it.
    for (name, point, want) in [
        ("in-window", Point::Lsn(after[2]), 300),
        ("latest", Point::Head, 400),
    ] {
        let r = fresh
            .restore_from_backup(restore(name, point))
            .await
            .unwrap();
        let s = fresh.start_restored(&r, free_port()).await.unwrap();
        assert_eq!(ids(&s).await, (1..=want).collect::<Vec<i32>>(), "{name}");
        s.stop(StopMode::Fast).await.unwrap();
    }
    eprintln!("{test} took {:?}", started.elapsed());
}
