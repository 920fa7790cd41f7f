//! Branches: a creation is recorded at once (name, fixed port, password)
//! and carried out in the background (the engine's copy or replay, then
//! the compute's start); deleting refuses protected branches and branches
//! others depend on; a branch's view adds the compute's state and the
//! engine's measurements to its record.

use super::compute::postmaster_alive;
use super::{short_id, Daemon, CREATE_TIMEOUT};
use crate::local::api::{BranchView, CreateBranchRequest};
use crate::local::proxy::{Backend, Proxy};
use crate::local::store::{BranchRow, AWAITING_FINALIZE, CREATING, FAILED, READY};
use crate::local::{connection_string, random_password, LocalError};
use crate::storage::engine::StopMode;
use crate::storage::wait::wait_timeline_ready;
use crate::storage::{
    CreateTimeline, OpKey, Password, Point, Source, State, Storage, StorageError,
};

impl Daemon {
    /// Records a new branch and starts its creation in the background.
    pub(super) async fn create_branch(
        &self,
        req: CreateBranchRequest,
    ) -> Result<BranchView, LocalError> {
        let _g = self.inner.ops.lock().await;
        self.check_new_branch(&req.name)?;
        let source = match &req.parent {
            Some(p) => {
                let pb = self.branch(p)?;
                Source::Timeline {
                    timeline: Self::ready_timeline(&pb)?,
                    point: req.point,
                }
            }
            None => {
                if req.point != Point::Head {
                    return Err(LocalError::Invalid(
                        "a root branch (no parent) cannot be taken at a point".into(),
                    ));
                }
                Source::Empty {
                    superuser_password: None,
                }
            }
        };
        let point = req.parent.as_ref().map(|_| req.point);
        self.insert_creating(
            &req.name,
            source,
            req.parent.clone(),
            point,
            req.protected,
            None,
        )?;
        drop(_g);
        self.view(&self.branch(&req.name)?, true).await
    }

    /// Inserts a `creating` branch, binds its port and spawns its creation.
    pub(super) fn insert_creating(
        &self,
        name: &str,
        source: Source,
        parent: Option<String>,
        point: Option<Point>,
        protected: bool,
        restore_target: Option<String>,
    ) -> Result<(), LocalError> {
        let (listener, port) = self.alloc_port()?;
        let row = BranchRow {
            name: name.to_string(),
            timeline: None,
            op_key: format!("branch-{}", short_id()),
            source,
            parent,
            point,
            port,
            password: random_password(),
            protected,
            want_running: true,
            state: CREATING.into(),
            error: None,
            restore_target,
            created_at: jiff::Timestamp::now(),
        };
        self.store().insert_branch(&row)?;
        let proxy = Proxy::serve(listener, Backend::Starting)
            .map_err(|e| LocalError::io("starting the branch's proxy", e))?;
        self.set_proxy(name, proxy);
        tokio::spawn(self.clone().create_task(name.to_string()));
        Ok(())
    }

    /// The background part of a creation; a failure is recorded on the
    /// branch (and on the restore it is the preview of).
    pub(super) async fn create_task(self, name: String) {
        if let Err(e) = self.materialize(&name).await {
            tracing::error!(branch = %name, error = %e, "branch creation failed");
            self.set_backend(&name, Backend::Down);
            let _ = self
                .store()
                .set_branch_state(&name, FAILED, Some(&e.to_string()));
            if let Ok(Some(r)) = self.store().restore_of_preview(&name) {
                let _ = self
                    .store()
                    .set_restore_state(&r.id, FAILED, Some(&e.to_string()));
            }
        }
    }

    /// Has the engine make the branch's timeline, waits until it is ready,
    /// then starts its compute when the branch wants to run.
    async fn materialize(&self, name: &str) -> Result<(), LocalError> {
        let b = self.branch(name)?;
        let source = match &b.source {
            Source::Empty { .. } => Source::Empty {
                superuser_password: Some(Password(b.password.clone())),
            },
            s => s.clone(),
        };
        let conn = self.source_connection_of(&source).await?;
        let tl = self
            .engine()
            .create_timeline(CreateTimeline {
                key: OpKey::new(b.op_key.clone())?,
                source,
                source_connection: conn,
                label: Some(format!("local/{name}")),
            })
            .await?;
        self.store().set_branch_timeline(name, &tl.id)?;
        wait_timeline_ready(self.engine(), &tl.id, CREATE_TIMEOUT).await?;
        if b.want_running {
            // Never seen as `stopped` between ready and started.
            self.starting(name, true);
        }
        self.store().set_branch_state(name, READY, None)?;
        if let Some(r) = self.store().restore_of_preview(name)? {
            self.store()
                .set_restore_state(&r.id, AWAITING_FINALIZE, None)?;
        }
        tracing::info!(branch = name, timeline = %tl.id, "branch created");
        if b.want_running {
            let r = self.start_branch(name).await;
            self.starting(name, false);
            r?;
        }
        Ok(())
    }

    pub(super) async fn delete_branch(&self, name: &str) -> Result<(), LocalError> {
        let _g = self.inner.ops.lock().await;
        let b = self.branch(name)?;
        if b.protected {
            return Err(LocalError::Conflict(format!(
                "branch {name:?} is protected: unprotect it first (branch set {name} --protected false)"
            )));
        }
        let mut children = self.store().children(name)?;
        children.extend(
            self.store()
                .branches()?
                .into_iter()
                .filter(|c| c.restore_target.as_deref() == Some(name))
                .map(|c| c.name),
        );
        if !children.is_empty() {
            return Err(LocalError::Conflict(format!(
                "branch {name:?} has child branches ({}): delete them first",
                children.join(", ")
            )));
        }
        if b.state == CREATING {
            return Err(LocalError::Conflict(format!(
                "branch {name:?} is still being created; delete it once it is ready or failed"
            )));
        }
        self.remove_proxy(name);
        if let Some(tl) = &b.timeline {
            let _ = self.stop_compute(tl, StopMode::Immediate).await;
            self.engine().delete_timeline(tl).await?;
        }
        if let Some(r) = self.store().restore_of_preview(name)? {
            self.store().set_restore_state(
                &r.id,
                FAILED,
                Some("its preview branch was deleted"),
            )?;
        }
        self.store().delete_branch(name)?;
        tracing::info!(branch = name, "branch deleted");
        Ok(())
    }

    /// A branch as shown. `brief` skips the storage's measurements (size,
    /// LSN), which can take a while; progress is always there.
    pub(super) async fn view(&self, b: &BranchRow, brief: bool) -> Result<BranchView, LocalError> {
        let tl = match &b.timeline {
            Some(id) if !brief || b.state == CREATING => match self.engine().get_timeline(id).await
            {
                Ok(t) => Some(t),
                Err(StorageError::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            },
            _ => None,
        };
        let (running, exited) = match &b.timeline {
            Some(id) => match self.inner.computes.lock().await.get(id) {
                Some(s) if postmaster_alive(&s.data_dir) => (true, None),
                Some(s) => (
                    false,
                    Some(format!(
                        "its postgres exited (log: {}); `pgbranch local start {}` starts it again",
                        s.log.display(),
                        b.name
                    )),
                ),
                None => (false, None),
            },
            None => (false, None),
        };
        let state = if b.state == READY {
            if self.is_starting(&b.name) {
                "starting"
            } else if running {
                "running"
            } else if exited.is_some() {
                "exited"
            } else {
                "stopped"
            }
        } else {
            b.state.as_str()
        };
        Ok(BranchView {
            name: b.name.clone(),
            timeline: b.timeline.as_ref().map(|t| t.to_string()),
            parent: b.parent.clone(),
            point: b.point,
            parent_lsn: tl.as_ref().and_then(|t| t.lineage.parent_lsn),
            lsn: tl.as_ref().and_then(|t| t.lsn),
            logical_size_bytes: tl.as_ref().map(|t| t.logical_size_bytes).unwrap_or(0),
            port: b.port,
            state: state.to_string(),
            protected: b.protected,
            error: b.error.clone().or(exited).or_else(|| {
                self.inner
                    .port_errors
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&b.name).cloned())
            }),
            progress: tl
                .as_ref()
                .filter(|t| t.state == State::Creating)
                .and_then(|t| t.progress.clone()),
            restore_target: b.restore_target.clone(),
            created_at: b.created_at,
            connection_string: connection_string(b.port, &b.password),
        })
    }
}
