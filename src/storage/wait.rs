//! Polling helpers: wait until a timeline or snapshot is `Ready`.
//!
//! A `Failed` object is returned as an error rebuilt from its error text:
//! the text starts with the `Display` of the [`StorageError`] that failed it
//! (e.g. `invalid point: ...`), so the variant is recovered from that prefix
//! (`InvalidPoint`, `InvalidArgument`, `Busy`, `Unavailable`, `Conflict`,
//! `NotFound` as `Internal`), else `Internal`.

use std::future::Future;
use std::time::{Duration, Instant};

use super::{Progress, Snapshot, SnapshotId, State, Storage, StorageError, Timeline, TimelineId};

/// The error a failed object carries, typed again from its text.
pub fn failed_error(text: &str) -> StorageError {
    let strip = |p: &str| text.strip_prefix(p).map(|s| s.to_string());
    if let Some(m) = strip("invalid point: ") {
        StorageError::InvalidPoint {
            message: m,
            window: None,
        }
    } else if let Some(m) = strip("invalid argument: ") {
        StorageError::InvalidArgument { message: m }
    } else if let Some(m) = strip("busy: ") {
        StorageError::Busy { message: m }
    } else if let Some(m) = strip("unavailable: ") {
        StorageError::Unavailable { message: m }
    } else if let Some(m) = strip("conflict: ") {
        StorageError::Conflict { message: m }
    } else {
        StorageError::internal(text.strip_prefix("internal error: ").unwrap_or(text))
    }
}

/// Poll interval: fast in the first seconds (a head branch is ready in
/// well under a second), then gentle for long copies and replays.
fn poll_pause(waited: Duration) -> Duration {
    if waited < Duration::from_secs(3) {
        Duration::from_millis(20)
    } else {
        Duration::from_millis(100)
    }
}

/// Polls `get_timeline` until the timeline is `Ready` (returned), `Failed`
/// (its error), or `timeout` passes (`Unavailable`).
pub async fn wait_timeline_ready(
    storage: &dyn Storage,
    id: &TimelineId,
    timeout: Duration,
) -> Result<Timeline, StorageError> {
    let what = format!("timeline {id}");
    wait_ready(
        &what,
        timeout,
        || storage.get_timeline(id),
        |t| (t.state, t.error.as_deref(), t.progress.as_ref()),
    )
    .await
}

/// Polls `get_snapshot` like [`wait_timeline_ready`].
pub async fn wait_snapshot_ready(
    storage: &dyn Storage,
    id: &SnapshotId,
    timeout: Duration,
) -> Result<Snapshot, StorageError> {
    let what = format!("snapshot {id}");
    wait_ready(
        &what,
        timeout,
        || storage.get_snapshot(id),
        |s| (s.state, s.error.as_deref(), s.progress.as_ref()),
    )
    .await
}

/// Polls `get` until the object (`what`) is `Ready`; `status` reads its
/// state, error and progress.
async fn wait_ready<T, F>(
    what: &str,
    timeout: Duration,
    get: impl Fn() -> F,
    status: impl Fn(&T) -> (State, Option<&str>, Option<&Progress>),
) -> Result<T, StorageError>
where
    F: Future<Output = Result<T, StorageError>>,
{
    let start = Instant::now();
    loop {
        let o = get().await?;
        let (state, error, progress) = status(&o);
        match state {
            State::Ready => return Ok(o),
            State::Failed => return Err(failed_error(error.unwrap_or("failed"))),
            State::Deleting => {
                return Err(StorageError::Conflict {
                    message: format!("{what} is being deleted"),
                })
            }
            State::Creating => {}
        }
        if start.elapsed() > timeout {
            return Err(StorageError::Unavailable {
                message: format!(
                    "{what} not ready after {timeout:?} (step: {})",
                    progress.map(|p| p.step.as_str()).unwrap_or_default()
                ),
            });
        }
        tokio::time::sleep(poll_pause(start.elapsed())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_text_keeps_its_kind() {
        let e = StorageError::InvalidPoint {
            message: "x".into(),
            window: None,
        };
        assert!(matches!(
            failed_error(&e.to_string()),
            StorageError::InvalidPoint { .. }
        ));
        assert!(matches!(
            failed_error("boom"),
            StorageError::Internal { .. }
        ));
    }
}
