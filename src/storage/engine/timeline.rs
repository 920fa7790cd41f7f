//! Timelines: planning a create from its source, building it in the
//! background (initdb, head copy, replay, snapshot clone, schema only),
//! resuming an interrupted create under the same key, the view callers
//! get, and deleting one.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::layout::pg_major_of;
use super::locks::{base_keys, InUse};
use super::meta::{BaseRow, Recorded, TimelineRow};
use super::pg::StopMode;
use super::server::pid_alive;
use super::{io_err, Engine, StoredRequest};
use crate::storage::{
    ConnInfo, CreateTimeline, Lineage, Lsn, Password, Point, Progress, SnapshotId, Source, State,
    Storage, StorageError, Timeline, TimelineId,
};

#[derive(Debug, Clone)]
pub(super) enum TlPlan {
    Empty {
        password: Option<Password>,
    },
    SchemaOnly {
        src: TimelineId,
        conn: Option<ConnInfo>,
    },
    Head {
        src: TimelineId,
        conn: Option<ConnInfo>,
    },
    /// `base.timeline` is the source or, for a point before the source
    /// was made, the ancestor whose archive is replayed.
    Replay {
        base: BaseRow,
        target: Lsn,
    },
    Snapshot {
        snap: SnapshotId,
    },
}

fn identity_timeline(s: &Source) -> String {
    match s {
        Source::Empty { superuser_password } => {
            format!("timeline:empty:password={}", superuser_password.is_some())
        }
        Source::SchemaOnly { timeline } => format!("timeline:schema-only:{timeline}"),
        Source::Timeline { timeline, point } => {
            format!("timeline:timeline:{timeline}:{}", point_key(point))
        }
        Source::Snapshot { snapshot } => format!("timeline:snapshot:{snapshot}"),
    }
}

pub(super) fn point_key(p: &Point) -> String {
    match p {
        Point::Head => "head".into(),
        Point::Lsn(l) => format!("lsn:{l}"),
        Point::Timestamp(t) => format!("ts:{}", t.as_microsecond()),
    }
}

fn stripped(s: &Source) -> Source {
    match s {
        Source::Empty { .. } => Source::Empty {
            superuser_password: None,
        },
        other => other.clone(),
    }
}

impl Engine {
    pub(super) async fn plan_timeline(
        &self,
        req: &CreateTimeline,
    ) -> Result<(TlPlan, Lineage, InUse), StorageError> {
        let conn = req.source_connection.clone();
        match &req.source {
            Source::Empty { superuser_password } => Ok((
                TlPlan::Empty {
                    password: superuser_password.clone(),
                },
                Lineage {
                    parent: None,
                    snapshot: None,
                    point: None,
                    parent_lsn: None,
                    schema_only: false,
                },
                self.acquire(vec![]),
            )),
            Source::SchemaOnly { timeline } => {
                let guard = self.acquire(vec![format!("t:{timeline}")]);
                self.ready(timeline).await?;
                self.check_copyable(timeline, conn.as_ref())?;
                Ok((
                    TlPlan::SchemaOnly {
                        src: timeline.clone(),
                        conn,
                    },
                    Lineage {
                        parent: Some(timeline.clone()),
                        snapshot: None,
                        point: Some(Point::Head),
                        parent_lsn: None,
                        schema_only: true,
                    },
                    guard,
                ))
            }
            Source::Timeline { timeline, point } => {
                let guard = self.acquire(vec![format!("t:{timeline}")]);
                let row = self.ready(timeline).await?;
                let lineage = Lineage {
                    parent: Some(timeline.clone()),
                    snapshot: None,
                    point: Some(*point),
                    parent_lsn: None,
                    schema_only: false,
                };
                if *point == Point::Head {
                    self.check_copyable(timeline, conn.as_ref())?;
                    return Ok((
                        TlPlan::Head {
                            src: timeline.clone(),
                            conn,
                        },
                        lineage,
                        guard,
                    ));
                }
                let (base, target) = self.resolve_target(&row, point, conn.as_ref()).await?;
                let guard = self.join(guard, base_keys(&base));
                let lineage = Lineage {
                    parent_lsn: Some(target),
                    ..lineage
                };
                Ok((TlPlan::Replay { base, target }, lineage, guard))
            }
            Source::Snapshot { snapshot } => {
                let guard = self.acquire(vec![format!("s:{snapshot}")]);
                let s = self.ready(snapshot).await?;
                Ok((
                    TlPlan::Snapshot {
                        snap: snapshot.clone(),
                    },
                    Lineage {
                        parent: Some(s.timeline.clone()),
                        snapshot: Some(snapshot.clone()),
                        point: Some(s.point),
                        parent_lsn: s.lsn,
                        schema_only: false,
                    },
                    guard,
                ))
            }
        }
    }

    pub(super) fn spawn_timeline(
        &self,
        id: TimelineId,
        plan: TlPlan,
        lineage: Lineage,
        guard: InUse,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let r = me.build_timeline(&id, plan, lineage).await;
            match r {
                Ok(()) => {
                    tracing::info!(timeline = %id, "timeline ready");
                    if let Err(e) = me.inner.meta.set_state(&id, State::Ready, None).await {
                        tracing::error!(timeline = %id, error = %e, "recording a ready timeline failed");
                    }
                }
                Err(e) => {
                    tracing::warn!(timeline = %id, error = %e, "creating a timeline failed");
                    me.remove_timeline_dirs(&id).await;
                    let _ = me
                        .inner
                        .meta
                        .set_state(&id, State::Failed, Some(&e.to_string()))
                        .await;
                }
            }
        });
    }

    pub(super) async fn remove_timeline_dirs(&self, id: &TimelineId) {
        let dir = self.tl_dir(id);
        self.remove_rolled_bases(id).await;
        for sub in ["pgdata", "base"] {
            if let Err(e) = self.remove_data_dir(&dir.join(sub)).await {
                tracing::warn!(timeline = %id, error = %e, "removing a data directory failed");
            }
        }
        let _ = self
            .remove_tree("removing a timeline directory", &dir)
            .await;
        let _ = self
            .remove_tree("removing a WAL archive", &self.wal_dir(id))
            .await;
    }

    async fn build_timeline(
        &self,
        id: &TimelineId,
        plan: TlPlan,
        mut lineage: Lineage,
    ) -> Result<(), StorageError> {
        let dir = self.tl_dir(id);
        fs::create_dir_all(&dir).map_err(|e| io_err("creating the timeline directory", e))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(|e| io_err("chmod", e))?;
        self.inner.pg.private_dir(&self.wal_dir(id))?;
        let data = dir.join("pgdata");
        let log = dir.join("engine.log");
        let label = format!("pgbranch-{id}");
        match plan {
            TlPlan::Empty { password } => {
                self.step(id, "initdb").await;
                self.create_data_dir(&data).await?;
                self.inner
                    .pg
                    .initdb(&data, password.as_ref().map(|p| p.0.as_str()), &self.tmp())
                    .await?;
                self.write_hba(&data)?;
                self.fixups(&data, Some(id))?;
            }
            TlPlan::Head { src, conn } => {
                self.step(id, "copying the source").await;
                let (_, lsn) = self
                    .copy_head(&src, &data, conn.as_ref(), false, false, &label)
                    .await?;
                lineage.parent_lsn = lsn;
                self.fixups(&data, Some(id))?;
                self.step(id, "recovering the copy").await;
                self.normalize(&data, Some(id), &log).await?;
            }
            TlPlan::Replay { base, target } => {
                self.step(id, "cloning the base").await;
                self.clone_dir(&self.inner.root.join(&base.path), &data, false)
                    .await?;
                self.fixups(&data, Some(id))?;
                if target > base.lsn || base.in_recovery {
                    self.step(id, "replaying WAL").await;
                    // The archive of the base's timeline: this source's, or
                    // an ancestor's for a point before the source was made.
                    let report = self.percent_of(id, "replaying WAL");
                    self.replay(&data, &base, target, Some(id), &log, &report)
                        .await?;
                } else {
                    self.normalize(&data, Some(id), &log).await?;
                }
            }
            TlPlan::Snapshot { snap } => {
                self.step(id, "cloning the snapshot").await;
                self.clone_dir(&self.snap_dir(&snap).join("pgdata"), &data, false)
                    .await?;
                self.fixups(&data, Some(id))?;
                self.step(id, "recovering the copy").await;
                self.normalize(&data, Some(id), &log).await?;
            }
            TlPlan::SchemaOnly { src, conn } => {
                self.build_schema_only(id, &src, conn.as_ref(), &data, &log)
                    .await?;
            }
        }
        let cd = self.inner.pg.controldata(&data).await?;
        if !cd.clean() {
            return Err(StorageError::internal(format!(
                "the new data directory is {:?}, not cleanly shut down",
                cd.state
            )));
        }
        self.inner
            .meta
            .set_timeline_pg(id, pg_major_of(&data), cd.tli, cd.seg_size)
            .await?;
        self.inner.meta.set_timeline_lineage(id, &lineage).await?;
        self.step(id, "keeping a base copy").await;
        self.clone_dir(&data, &dir.join("base"), true).await?;
        self.inner
            .meta
            .add_base(&BaseRow {
                path: format!("timelines/{id}/base"),
                timeline: id.clone(),
                snapshot: None,
                lsn: cd.checkpoint,
                time: jiff::Timestamp::now(),
                in_recovery: false,
            })
            .await?;
        Ok(())
    }

    async fn build_schema_only(
        &self,
        id: &TimelineId,
        src: &TimelineId,
        conn: Option<&ConnInfo>,
        data: &Path,
        log: &Path,
    ) -> Result<(), StorageError> {
        let work = self.tmp().join(format!("{id}-schema"));
        let dumpdir = self.tmp().join(format!("{id}-dump"));
        let r = async {
            self.step(id, "copying the source").await;
            self.copy_head(src, &work, conn, false, false, &format!("pgbranch-{id}"))
                .await?;
            self.fixups(&work, None)?;
            self.step(id, "dumping the schema").await;
            let srv = self.private_server(&work, None, log).await?;
            self.inner.pg.private_dir(&dumpdir)?;
            let dump = dumpdir.join("schema.sql");
            let mut cmd = self.inner.pg.command("pg_dumpall");
            cmd.arg("--schema-only")
                .arg("-h")
                .arg(&srv.socket_dir)
                .arg("-p")
                .arg(srv.port.to_string())
                .args(["-U", "postgres", "-f"])
                .arg(&dump);
            let dumped = self.inner.pg.run(cmd, "pg_dumpall --schema-only").await;
            srv.stop(StopMode::Immediate).await?;
            dumped?;
            self.step(id, "initdb").await;
            self.create_data_dir(data).await?;
            self.inner.pg.initdb(data, None, &self.tmp()).await?;
            self.write_hba(data)?;
            self.fixups(data, Some(id))?;
            self.step(id, "restoring the schema").await;
            let srv = self.private_server(data, Some(id), log).await?;
            let mut cmd = self.inner.pg.command("psql");
            cmd.args(["-X", "-q", "-h"])
                .arg(&srv.socket_dir)
                .arg("-p")
                .arg(srv.port.to_string())
                .args(["-U", "postgres", "-d", "postgres", "-f"])
                .arg(&dump);
            let restored = self.inner.pg.run(cmd, "psql (restoring the schema)").await;
            srv.stop(StopMode::Fast).await?;
            restored.map(|_| ())
        }
        .await;
        let _ = self.delete_dir(&work).await;
        let _ = self.remove_tree("removing a schema dump", &dumpdir).await;
        r
    }

    async fn existing_timeline(
        &self,
        kind: &str,
        identity: &str,
        object_id: &str,
        req: &CreateTimeline,
    ) -> Result<Timeline, StorageError> {
        if kind != "timeline" || identity != identity_timeline(&req.source) {
            return Err(StorageError::Conflict {
                message: format!(
                    "key {} was already used for a different request ({kind} {object_id})",
                    req.key
                ),
            });
        }
        let id = TimelineId::new(object_id)?;
        let row = self.row(&id).await?;
        let own = if row.state == State::Creating && row.interrupted {
            self.try_acquire(format!("t:{id}"))
        } else {
            None
        };
        if let Some(guard_self) = own {
            // Resume with the caller's secrets.
            let (plan, lineage, guard) = self.plan_timeline(req).await?;
            self.inner
                .meta
                .set_progress(
                    &id,
                    Some(Progress {
                        step: "resuming".into(),
                        percent: None,
                    }),
                )
                .await?;
            self.inner.meta.mark_resumed(&id).await?;
            self.remove_timeline_dirs(&id).await;
            let guard = self.join(guard, guard_self.keys.clone());
            drop(guard_self);
            self.spawn_timeline(id.clone(), plan, lineage, guard);
        }
        self.get_timeline(&id).await
    }

    pub(super) async fn timeline_view(&self, row: TimelineRow) -> Result<Timeline, StorageError> {
        let id = row.id.clone();
        let mut t = Timeline {
            id: id.clone(),
            key: row.key.clone(),
            label: row.label.clone(),
            state: row.state,
            error: row.error.clone(),
            progress: row.progress.clone(),
            lineage: row.lineage.clone(),
            created_at: row.created_at,
            data_path: format!("timelines/{id}/pgdata"),
            wal_archive_path: format!("wal/{id}"),
            pg_major: row.pg_major,
            lsn: None,
            logical_size_bytes: 0,
            exclusive_bytes: None,
            restore_window: None,
        };
        if row.state == State::Ready {
            let (logical, excl) = self
                .measured(
                    format!("t:{id}"),
                    self.data_dir(&id),
                    vec![self.tl_dir(&id).join("base")],
                )
                .await?;
            t.logical_size_bytes = logical;
            t.exclusive_bytes = excl;
            t.restore_window = self.reported_window(&row).await?;
            t.lsn = t.restore_window.as_ref().map(|w| w.newest.lsn);
        }
        Ok(t)
    }

    pub(super) async fn create_timeline_impl(
        &self,
        req: CreateTimeline,
    ) -> Result<Timeline, StorageError> {
        if let Some((kind, identity, object_id)) = self.inner.meta.find_op(&req.key).await? {
            return self
                .existing_timeline(&kind, &identity, &object_id, &req)
                .await;
        }
        let (plan, lineage, guard) = self.plan_timeline(&req).await?;
        let id = TimelineId::generate();
        let stored = StoredRequest {
            source: Some(stripped(&req.source)),
            had_password: matches!(
                req.source,
                Source::Empty {
                    superuser_password: Some(_)
                }
            ),
            had_connection: req.source_connection.is_some(),
        };
        let row = TimelineRow {
            id: id.clone(),
            key: req.key.clone(),
            label: req.label.clone(),
            state: State::Creating,
            error: None,
            progress: Some(Progress {
                step: "queued".into(),
                percent: None,
            }),
            lineage: lineage.clone(),
            request: serde_json::to_string(&stored).map_err(|e| io_err("encoding a request", e))?,
            created_at: jiff::Timestamp::now(),
            pg_major: self.inner.pg.major,
            pg_tli: None,
            wal_seg_size: None,
            interrupted: false,
        };
        match self
            .inner
            .meta
            .insert(&identity_timeline(&req.source), &row)
            .await?
        {
            Recorded::New => {
                tracing::info!(timeline = %id, key = %req.key, source = %identity_timeline(&req.source), "creating a timeline");
                let guard = self.join(guard, vec![format!("t:{id}")]);
                self.spawn_timeline(id.clone(), plan, lineage, guard);
                self.get_timeline(&id).await
            }
            Recorded::Existing {
                kind,
                identity,
                object_id,
            } => {
                drop(guard);
                self.existing_timeline(&kind, &identity, &object_id, &req)
                    .await
            }
        }
    }

    pub(super) async fn delete_timeline_impl(&self, id: &TimelineId) -> Result<(), StorageError> {
        let Some(row) = self.inner.meta.get(id).await? else {
            return Ok(());
        };
        if row.state == State::Creating && (!row.interrupted || self.in_use(&format!("t:{id}"))) {
            return Err(StorageError::Busy {
                message: format!("timeline {id} is still being created"),
            });
        }
        if pid_alive(&self.data_dir(id)) {
            return Err(StorageError::Busy {
                message: format!("timeline {id} has a running postgres; stop its compute first"),
            });
        }
        self.check_replicas_stopped(id).await?;
        self.mark_deleting(id, &format!("t:{id}"), (row.state, row.error.as_deref()))
            .await?;
        tracing::info!(timeline = %id, "deleting a timeline");
        // Nothing is left to archive (what is uploaded stays).
        self.disable_backup(id);
        self.forget_sizes(&format!("t:{id}"));
        self.remove_replicas(id).await?;
        self.remove_timeline_dirs(id).await;
        self.inner.meta.delete_timeline(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_identity_ignores_secrets_but_not_the_source() {
        let a = Source::Empty {
            superuser_password: Some(Password("one".into())),
        };
        let b = Source::Empty {
            superuser_password: Some(Password("two".into())),
        };
        assert_eq!(identity_timeline(&a), identity_timeline(&b));
        assert!(!identity_timeline(&a).contains("one"));
        let t = TimelineId::new("t").unwrap();
        let head = Source::Timeline {
            timeline: t.clone(),
            point: Point::Head,
        };
        let lsn = Source::Timeline {
            timeline: t,
            point: Point::Lsn(Lsn(5)),
        };
        assert_ne!(identity_timeline(&head), identity_timeline(&lsn));
    }
}
