//! The storage poller: every `Config::stats_interval` the leader asks the
//! storage layer for its `info` (the volume's usage, the WAL archive's
//! size) and its timelines (their exclusive bytes), and hands the reading
//! to the metrics (`controller/metrics.rs`), which serve it at scrape time
//! as `pgbranch_storage_up`, `pgbranch_storage_volume_bytes`,
//! `pgbranch_wal_archive_bytes` and `pgbranch_branch_exclusive_bytes`.
//! A scrape never waits on the storage layer.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::metrics::StorageReading;
use super::{Context, Shutdown};
use crate::storage::{Storage, StorageError, StorageInfo, Timeline};

/// The reading from what the storage layer answered (`None`: no answer):
/// no `info` means the storage is down (and no figure is known); no
/// timeline list only loses the per-branch figures.
pub fn reading(info: Option<StorageInfo>, timelines: Option<Vec<Timeline>>) -> StorageReading {
    let Some(info) = info else {
        return StorageReading::default();
    };
    let exclusive_by_timeline = timelines
        .unwrap_or_default()
        .into_iter()
        .filter_map(|t| Some((t.id.as_str().to_string(), t.exclusive_bytes?)))
        .collect();
    StorageReading {
        up: true,
        volume_total_bytes: info.volume_total_bytes,
        volume_used_bytes: info.volume_used_bytes,
        wal_archive_bytes: info.wal_archive_bytes,
        exclusive_by_timeline,
    }
}

/// One call under `deadline`; a failure is logged and is `None`.
async fn answer<T>(
    what: &'static str,
    deadline: Duration,
    call: impl Future<Output = Result<T, StorageError>>,
) -> Option<T> {
    match tokio::time::timeout(deadline, call).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "{what} for the metrics failed");
            None
        }
        Err(_) => {
            tracing::warn!(
                secs = deadline.as_secs(),
                "{what} for the metrics: no answer in time"
            );
            None
        }
    }
}

/// One poll of the storage layer, each call under `deadline`.
pub async fn poll(storage: &dyn Storage, deadline: Duration) -> StorageReading {
    let info = answer("reading the storage info", deadline, storage.info()).await;
    // Not asked when the storage did not answer the first question.
    let timelines = match info {
        Some(_) => answer("listing the timelines", deadline, storage.list_timelines()).await,
        None => None,
    };
    reading(info, timelines)
}

/// Polls until shutdown, the first time at once, each call under the
/// step deadline.
pub async fn run(ctx: Arc<Context>, shutdown: impl Shutdown) {
    let every = ctx.config.stats_interval.max(Duration::from_millis(100));
    let polling = async {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let r = poll(ctx.storage.as_ref(), ctx.config.step_timeout).await;
            ctx.metrics.set_storage(r);
        }
    };
    tokio::select! {
        () = shutdown => {}
        () = polling => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::Metrics;
    use crate::storage::http::HttpStorage;
    use crate::storage::{DriverKind, Lineage, OpKey, State, TimelineId};

    fn info() -> StorageInfo {
        StorageInfo {
            driver: DriverKind::Copy,
            pg_major: 15,
            root: "/srv".into(),
            compute_root: None,
            data_uid: None,
            volume_total_bytes: Some(100),
            volume_used_bytes: Some(40),
            wal_archive_bytes: Some(16),
        }
    }

    fn timeline(id: &str, exclusive: Option<u64>) -> Timeline {
        Timeline {
            id: TimelineId::new(id).unwrap(),
            key: OpKey::new("k").unwrap(),
            label: None,
            state: State::Ready,
            error: None,
            progress: None,
            lineage: Lineage {
                parent: None,
                snapshot: None,
                point: None,
                parent_lsn: None,
                schema_only: false,
            },
            created_at: jiff::Timestamp::UNIX_EPOCH,
            data_path: "d".into(),
            wal_archive_path: "w".into(),
            pg_major: 15,
            lsn: None,
            logical_size_bytes: 0,
            exclusive_bytes: exclusive,
            restore_window: None,
        }
    }

    #[test]
    fn a_reading_is_what_the_storage_answered() {
        let r = reading(
            Some(info()),
            Some(vec![timeline("t1", Some(5)), timeline("t2", None)]),
        );
        assert!(r.up);
        assert_eq!(
            (
                r.volume_total_bytes,
                r.volume_used_bytes,
                r.wal_archive_bytes
            ),
            (Some(100), Some(40), Some(16))
        );
        assert_eq!(r.exclusive_by_timeline.len(), 1);
        assert_eq!(r.exclusive_by_timeline.get("t1"), Some(&5));
        // Timelines not listed: still up, no per-branch figures.
        let r = reading(Some(info()), None);
        assert!(r.up && r.exclusive_by_timeline.is_empty());
        // No answer: down, nothing known.
        assert_eq!(reading(None, None), StorageReading::default());
    }

    /// A storage service nobody listens on: the poll says it is down and
    /// the scrape shows it.
    #[tokio::test]
    async fn an_unreachable_storage_is_down() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let client = HttpStorage::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
        let r = poll(&client, Duration::from_secs(10)).await;
        assert_eq!(r, StorageReading::default());
        let m = Metrics::new();
        m.set_storage(r);
        let text = m.encode();
        assert!(text.contains("pgbranch_storage_up{} 0"), "{text}");
    }
}
