//! Waiting for a source's WAL archiver, with a deadline.
//!
//! `pg_backup_stop(true)` returns only once the source has archived the
//! WAL the backup needs. When the source's `archive_command` fails (a path
//! that does not exist in the compute, a full disk) it would wait forever
//! and the copy with it: after the deadline the wait is cancelled (which
//! ends backup mode on the source) and the copy fails with what
//! `pg_stat_archiver` and `archive_command` say, so the user sees why.

use std::time::Duration;

use tokio_postgres::{Client, Row};

use crate::storage::{ConnInfo, StorageError, ARCHIVING_FAILED};

/// How long a copy waits for the source's archiver when the engine's
/// configuration says nothing.
pub(super) const DEFAULT_ARCHIVE_WAIT: Duration = Duration::from_secs(60);

/// Runs `stop_sql` (`pg_backup_stop(true)` or the pre-15 form) on
/// `client`, giving up after `wait`.
pub(super) async fn stop_backup(
    client: &Client,
    conn: &ConnInfo,
    stop_sql: &str,
    wait: Duration,
) -> Result<Row, StorageError> {
    match tokio::time::timeout(wait, client.query_one(stop_sql, &[])).await {
        Ok(r) => r.map_err(|e| super::copy::sql_err("stopping backup mode", e)),
        Err(_) => {
            // The source's backend keeps waiting until told otherwise; the
            // session's end then aborts its backup mode.
            if let Err(e) = client
                .cancel_token()
                .cancel_query(tokio_postgres::NoTls)
                .await
            {
                tracing::warn!(error = %e, "cancelling pg_backup_stop on the source failed");
            }
            let state = archiver_state(conn).await;
            Err(StorageError::Unavailable {
                message: format!(
                    "{ARCHIVING_FAILED}: the copy waited {} s for the source to archive its WAL (pg_backup_stop); {state}",
                    wait.as_secs()
                ),
            })
        }
    }
}

/// What the source's archiver last did, as a sentence (read on a
/// connection of its own: the first one is busy waiting).
pub(super) async fn archiver_state(conn: &ConnInfo) -> String {
    let client = match super::copy::connect_source(conn).await {
        Ok(c) => c,
        Err(e) => return format!("the archiver's state could not be read: {e}"),
    };
    let row = client
        .query_one(
            "SELECT coalesce(last_failed_wal, ''), coalesce(last_failed_time::text, ''), \
             failed_count, coalesce(last_archived_wal, ''), current_setting('archive_command') \
             FROM pg_stat_archiver",
            &[],
        )
        .await;
    match row {
        Ok(r) => describe(
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get::<_, String>(4).as_str(),
        ),
        Err(e) => format!("pg_stat_archiver could not be read: {e}"),
    }
}

/// The archiver's state in words.
fn describe(
    last_failed_wal: &str,
    last_failed_time: &str,
    failed_count: i64,
    last_archived_wal: &str,
    archive_command: &str,
) -> String {
    let archived = if last_archived_wal.is_empty() {
        "nothing archived yet".to_string()
    } else {
        format!("last archived {last_archived_wal}")
    };
    if failed_count == 0 || last_failed_wal.is_empty() {
        return format!(
            "the archiver reports no failure ({archived}); archive_command = '{archive_command}'"
        );
    }
    format!(
        "the archiver failed {failed_count} times, last on WAL file {last_failed_wal} at {last_failed_time} ({archived}); archive_command = '{archive_command}' (its error is in the source's server log)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archivers_failure_is_named() {
        let s = describe(
            "000000010000000000000003",
            "2026-01-02 03:04:05+00",
            7,
            "000000010000000000000002",
            "cp %p /var/lib/X/wal/abc/%f",
        );
        assert!(s.contains("failed 7 times"), "{s}");
        assert!(s.contains("000000010000000000000003"), "{s}");
        assert!(s.contains("/var/lib/X/wal/abc"), "{s}");
        let s = describe("", "", 0, "", "cp %p x");
        assert!(
            s.contains("no failure") && s.contains("nothing archived"),
            "{s}"
        );
    }
}
