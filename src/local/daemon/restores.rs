//! Restores: one-step (the restored timeline replaces the target at once)
//! and multi-step (a preview branch first, switched in by finalize). The
//! switch keeps the target's fixed port and password, points its proxy at
//! the restored compute, and keeps the old timeline as a backup branch.

use super::compute::local_addr;
use super::{check_name, now_stamp, short_id, Daemon, CREATE_TIMEOUT};
use crate::local::api::{FinalizeRequest, RestoreRequest, RestoreView};
use crate::local::proxy::{Backend, Proxy};
use crate::local::store::{Finalize, RestoreRow, FAILED, RESTORING};
use crate::local::{random_password, LocalError};
use crate::storage::engine::StopMode;
use crate::storage::wait::wait_timeline_ready;
use crate::storage::{ConnInfo, CreateTimeline, OpKey, Source, State, Storage, TimelineId};

impl Daemon {
    /// Starts a restore: one-step in the background, or a preview branch.
    pub(super) async fn restore(&self, req: RestoreRequest) -> Result<RestoreView, LocalError> {
        let _g = self.inner.ops.lock().await;
        let target = self.branch(&req.target)?;
        Self::ready_timeline(&target)?;
        let (source, desc, parent, point) = match (&req.snapshot, &req.source_branch) {
            (Some(s), None) => {
                let row = self.snapshot(s)?;
                let snap = self.engine_snapshot(&row).await?;
                let Some(snap) = snap.filter(|x| x.state == State::Ready) else {
                    return Err(LocalError::Conflict(format!("snapshot {s:?} is not ready")));
                };
                (
                    Source::Snapshot { snapshot: snap.id },
                    format!("snapshot {s}"),
                    None,
                    None,
                )
            }
            (None, Some(bname)) => {
                let sb = self.branch(bname)?;
                if *bname == req.target && req.preserve_under_name.is_none() {
                    return Err(LocalError::Invalid(format!(
                        "restoring {bname:?} to its own past replaces its data: pass --preserve-under-name NAME to keep its current state as a backup branch"
                    )));
                }
                (
                    Source::Timeline {
                        timeline: Self::ready_timeline(&sb)?,
                        point: req.point,
                    },
                    format!("{bname}@{}", req.point),
                    Some(bname.clone()),
                    Some(req.point),
                )
            }
            _ => {
                return Err(LocalError::Invalid(
                    "give exactly one source: a snapshot, or a branch and a point".into(),
                ))
            }
        };
        if let Some(p) = &req.preserve_under_name {
            self.check_new_branch(p)?;
        }
        let id = short_id();
        let mut row = RestoreRow {
            id: id.clone(),
            target: req.target.clone(),
            source: desc,
            finalize: req.finalize,
            preserve: req.preserve_under_name.clone(),
            restored_branch: None,
            timeline: None,
            backup_branch: None,
            state: RESTORING.into(),
            error: None,
            started_at: jiff::Timestamp::now(),
            completed_at: None,
        };
        if req.finalize {
            let conn = self.source_connection_of(&source).await?;
            self.store().insert_restore(&row)?;
            tokio::spawn(self.clone().one_step(id.clone(), source, conn));
        } else {
            let name = req
                .name
                .clone()
                .unwrap_or_else(|| format!("{}-restore-{}", req.target, now_stamp()));
            self.check_new_branch(&name)?;
            row.restored_branch = Some(name.clone());
            self.store().insert_restore(&row)?;
            self.insert_creating(
                &name,
                source,
                parent,
                point,
                false,
                Some(req.target.clone()),
            )?;
        }
        drop(_g);
        self.restore_view(&row).await
    }

    /// The background part of a one-step restore: the restored timeline,
    /// then the switch; on failure the restore is failed and the timeline
    /// made for it removed.
    async fn one_step(self, id: String, source: Source, conn: Option<ConnInfo>) {
        let mut created: Option<TimelineId> = None;
        let r = async {
            let row = self.restore_row(&id)?;
            let tl = self
                .engine()
                .create_timeline(CreateTimeline {
                    key: OpKey::new(format!("restore-{id}"))?,
                    source,
                    source_connection: conn,
                    label: Some(format!("local/{} restore {id}", row.target)),
                })
                .await?;
            created = Some(tl.id.clone());
            self.store().set_restore_timeline(&id, &tl.id)?;
            wait_timeline_ready(self.engine(), &tl.id, CREATE_TIMEOUT).await?;
            let _g = self.inner.ops.lock().await;
            self.finalize_locked(&row, &tl.id, None).await
        }
        .await;
        if let Err(e) = r {
            tracing::error!(restore = %id, error = %e, "restore failed");
            let _ = self
                .store()
                .set_restore_state(&id, FAILED, Some(&e.to_string()));
            if let Some(tl) = created {
                let _ = self.stop_compute(&tl, StopMode::Immediate).await;
                let _ = self.engine().delete_timeline(&tl).await;
            }
        }
    }

    /// The switch of a restore (ops lock held): the restored timeline's
    /// compute is started with the target's password and made the target
    /// port's backend; the old compute is stopped; the old timeline stays
    /// as the backup branch.
    async fn finalize_locked(
        &self,
        r: &RestoreRow,
        new_tl: &TimelineId,
        preview: Option<&str>,
    ) -> Result<(), LocalError> {
        let target = self.branch(&r.target)?;
        let old_tl = Self::ready_timeline(&target)?;
        let backup = r
            .preserve
            .clone()
            .unwrap_or_else(|| format!("{}-old-{}", r.target, now_stamp()));
        self.check_new_branch(&backup)?;
        let (listener, backup_port) = self.alloc_port()?;
        let new_running = self.inner.computes.lock().await.contains_key(new_tl);
        let backend = if target.want_running || new_running {
            let port = self.start_compute(new_tl, &target.password).await?;
            Backend::Up(local_addr(port))
        } else {
            Backend::Down
        };
        self.set_backend(&r.target, backend);
        if let Err(e) = self.stop_compute(&old_tl, StopMode::Immediate).await {
            tracing::warn!(timeline = %old_tl, error = %e, "old compute did not stop cleanly");
        }
        if let Some(p) = preview {
            self.remove_proxy(p);
        }
        self.store().finalize(&Finalize {
            target: &r.target,
            new_timeline: new_tl,
            preview,
            backup_name: &backup,
            backup_port,
            backup_password: &random_password(),
            restore_id: &r.id,
        })?;
        let proxy = Proxy::serve(listener, Backend::Down)
            .map_err(|e| LocalError::io("starting the backup branch's proxy", e))?;
        self.set_proxy(&backup, proxy);
        tracing::info!(target = %r.target, backup = %backup, "restore finalized");
        Ok(())
    }

    /// Finalize of a multi-step restore: its preview becomes the target.
    pub(super) async fn finalize(
        &self,
        preview: &str,
        req: FinalizeRequest,
    ) -> Result<RestoreView, LocalError> {
        let _g = self.inner.ops.lock().await;
        let b = self.branch(preview)?;
        let mut r = self.store().restore_of_preview(preview)?.ok_or_else(|| {
            LocalError::Conflict(format!(
                "branch {preview:?} is not the preview of a restore waiting to be finalized"
            ))
        })?;
        let tl = Self::ready_timeline(&b)?;
        if let Some(p) = req.preserve_under_name {
            check_name("branch", &p)?;
            r.preserve = Some(p);
        }
        self.finalize_locked(&r, &tl, Some(preview)).await?;
        drop(_g);
        let r = self.restore_row(&r.id)?;
        self.restore_view(&r).await
    }

    /// A restore as shown, with its progress while it runs.
    pub(super) async fn restore_view(&self, r: &RestoreRow) -> Result<RestoreView, LocalError> {
        let tl = match (&r.timeline, &r.restored_branch) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(b)) => self.store().branch(b)?.and_then(|b| b.timeline),
            _ => None,
        };
        let progress = match (&tl, r.state.as_str()) {
            (Some(t), RESTORING) => self
                .engine()
                .get_timeline(t)
                .await
                .ok()
                .and_then(|t| t.progress),
            _ => None,
        };
        Ok(RestoreView {
            id: r.id.clone(),
            target: r.target.clone(),
            source: r.source.clone(),
            finalize: r.finalize,
            state: r.state.clone(),
            error: r.error.clone(),
            progress,
            restored_branch: r.restored_branch.clone(),
            backup_branch: r.backup_branch.clone(),
            started_at: r.started_at,
            completed_at: r.completed_at,
        })
    }
}
