//! What timelines and snapshots share in their lifecycle: the steps an
//! object being made records as its progress (where a crash test may stop
//! the engine), the `Ready` check of a source, and the `Deleting` mark.

use futures::future::BoxFuture;

use super::meta::{ObjectId, ObjectRow};
use super::pitr::OnPercent;
use super::{crash_point, Engine};
use crate::storage::{Progress, State, StorageError};

/// Refuses (`Conflict`) an object that is not `Ready`; `what` names it.
pub(super) fn must_be_ready(
    what: impl std::fmt::Display,
    state: State,
) -> Result<(), StorageError> {
    if state != State::Ready {
        return Err(StorageError::Conflict {
            message: format!("{what} is {state:?}, not Ready"),
        });
    }
    Ok(())
}

impl Engine {
    /// A stored timeline or snapshot, or `NotFound`.
    pub(super) async fn row<I: ObjectId>(&self, id: &I) -> Result<I::Row, StorageError> {
        self.inner
            .meta
            .get(id)
            .await?
            .ok_or_else(|| StorageError::not_found(I::KIND.name(), id))
    }

    /// A stored timeline or snapshot that is `Ready` (else `NotFound` or
    /// `Conflict`).
    pub(super) async fn ready<I: ObjectId>(&self, id: &I) -> Result<I::Row, StorageError> {
        let row = self.row(id).await?;
        must_be_ready(format_args!("{} {id}", I::KIND.name()), row.state())?;
        Ok(row)
    }

    /// Records the step an object being made enters; with
    /// `PGBRANCH_ENGINE_CRASH_AT` naming it, the engine dies there.
    pub(super) async fn step<I: ObjectId>(&self, id: &I, step: &str) {
        crash_point(step);
        tracing::debug!(kind = I::KIND.name(), id = %id, step, "operation step");
        let progress = Progress {
            step: step.to_string(),
            percent: None,
        };
        let _ = self.inner.meta.set_progress(id, Some(progress)).await;
    }

    /// What a replay of an object being made reports its percentage to:
    /// it records `step` with the percentage as the object's progress.
    pub(super) fn percent_of<I: ObjectId>(&self, id: &I, step: &'static str) -> Box<OnPercent> {
        let (me, id) = (self.clone(), id.clone());
        Box::new(move |percent| -> BoxFuture<'static, ()> {
            let (me, id) = (me.clone(), id.clone());
            Box::pin(async move {
                let progress = Progress {
                    step: step.to_string(),
                    percent,
                };
                let _ = me.inner.meta.set_progress(&id, Some(progress)).await;
            })
        })
    }

    /// Marks an object `Deleting`, unless an operation holds it (`key`):
    /// then its state goes back to `was` and the delete is refused
    /// (`Busy`). Marked first, so no operation starts on it between the
    /// check and the mark.
    pub(super) async fn mark_deleting<I: ObjectId>(
        &self,
        id: &I,
        key: &str,
        was: (State, Option<&str>),
    ) -> Result<(), StorageError> {
        self.inner.meta.set_state(id, State::Deleting, None).await?;
        if self.in_use(key) {
            self.inner.meta.set_state(id, was.0, was.1).await?;
            return Err(StorageError::Busy {
                message: format!(
                    "{} {id} is the source of an operation in progress",
                    I::KIND.name()
                ),
            });
        }
        Ok(())
    }
}
