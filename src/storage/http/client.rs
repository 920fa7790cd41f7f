//! [`HttpStorage`]: the [`Storage`] trait over HTTP, talking to
//! `pgbranch storage serve`.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::server::ResolveResponse;
use super::ErrorBody;
use crate::storage::{
    BackupStatus, BackupTarget, BaseBackupRequest, CreateReplica, CreateSnapshot, CreateTimeline,
    Lsn, Replica, Snapshot, SnapshotId, Storage, StorageError, StorageInfo, Timeline, TimelineId,
};

/// Time allowed for one request, connection included, by default. Every
/// trait call returns quickly (long work is polled), so this is generous.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A storage layer reached over HTTP.
#[derive(Clone)]
pub struct HttpStorage {
    base: Url,
    token: Option<String>,
    client: reqwest::Client,
}

impl std::fmt::Debug for HttpStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStorage")
            .field("base", &self.base.as_str())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl HttpStorage {
    /// A client of the service at `base` (`http://host:port`, optionally
    /// with a path prefix), sending `token` as a bearer token.
    pub fn new(base: &str, token: Option<String>) -> Result<Self, StorageError> {
        Self::with_timeout(base, token, DEFAULT_TIMEOUT)
    }

    /// [`HttpStorage::new`] with a per-request timeout.
    pub fn with_timeout(
        base: &str,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<Self, StorageError> {
        let mut base: Url = base.parse().map_err(|e| {
            StorageError::invalid(format!("storage URL {base:?} is not a URL: {e}"))
        })?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(StorageError::invalid(format!(
                "storage URL {base} must use http or https"
            )));
        }
        if base.host_str().is_none() {
            return Err(StorageError::invalid(format!(
                "storage URL {base} has no host"
            )));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(StorageError::invalid(
                "storage URL must not carry credentials; pass a token instead",
            ));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(StorageError::invalid(format!(
                "storage URL {base} must not have a query or fragment"
            )));
        }
        // Join relative paths under the base, not beside its last segment.
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let token = token
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| StorageError::internal(format!("building the HTTP client: {e}")))?;
        Ok(HttpStorage {
            base,
            token,
            client,
        })
    }

    /// The base URL requests go to.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    fn url(&self, path: &str) -> Result<Url, StorageError> {
        self.base
            .join(path)
            .map_err(|e| StorageError::internal(format!("building URL for {path}: {e}")))
    }

    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<&(impl Serialize + Sync)>,
    ) -> Result<reqwest::Response, StorageError> {
        let mut rb = self.client.request(method.clone(), url.clone());
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| transport_error(&method, &url, e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(error_from_response(resp).await)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + Sync)>,
    ) -> Result<T, StorageError> {
        let url = self.url(path)?;
        let resp = self.send(method.clone(), url.clone(), body).await?;
        resp.json::<T>().await.map_err(|e| {
            if e.is_timeout() || e.is_body() {
                transport_error(&method, &url, e)
            } else {
                StorageError::internal(format!(
                    "storage service answered {method} {} with a body this client cannot read: {e}",
                    url.path()
                ))
            }
        })
    }

    async fn delete(&self, path: &str) -> Result<(), StorageError> {
        let url = self.url(path)?;
        self.send(Method::DELETE, url, None::<&()>).await?;
        Ok(())
    }
}

/// A request that got no answer: retryable.
fn transport_error(method: &Method, url: &Url, e: reqwest::Error) -> StorageError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    // reqwest's message names the URL; ours has no secrets in it.
    StorageError::Unavailable {
        message: format!(
            "storage service request {method} {} {what}: {e}",
            url.path()
        ),
    }
}

/// Rebuilds the [`StorageError`] of an error answer: from its JSON body
/// when it is ours, else from the status alone (a proxy's page, say).
async fn error_from_response(resp: reqwest::Response) -> StorageError {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if let Ok(body) = serde_json::from_str::<ErrorBody>(&text) {
        if let Some(e) = body.error {
            return e;
        }
        return error_from_code(&body.code, body.message, status);
    }
    let snippet: String = text.chars().take(200).collect();
    let message = format!("storage service answered {status}: {snippet}");
    error_from_code("", message, status)
}

fn error_from_code(code: &str, message: String, status: StatusCode) -> StorageError {
    match (code, status) {
        ("NotFound", _) | ("", StatusCode::NOT_FOUND) => StorageError::NotFound {
            kind: "object".into(),
            id: message,
        },
        ("InvalidPoint", _) => StorageError::InvalidPoint {
            message,
            window: None,
        },
        ("Conflict", _) | ("", StatusCode::CONFLICT) => StorageError::Conflict { message },
        ("Busy", _) | ("", StatusCode::LOCKED) | ("", StatusCode::TOO_MANY_REQUESTS) => {
            StorageError::Busy { message }
        }
        ("Unavailable", _)
        | ("", StatusCode::BAD_GATEWAY)
        | ("", StatusCode::SERVICE_UNAVAILABLE)
        | ("", StatusCode::GATEWAY_TIMEOUT) => StorageError::Unavailable { message },
        ("Unauthorized", _) | ("", StatusCode::UNAUTHORIZED) | ("", StatusCode::FORBIDDEN) => {
            StorageError::Unauthorized { message }
        }
        ("InvalidArgument", _) => StorageError::InvalidArgument { message },
        ("", s) if s.is_client_error() => StorageError::InvalidArgument { message },
        _ => StorageError::Internal { message },
    }
}

#[async_trait]
impl Storage for HttpStorage {
    async fn info(&self) -> Result<StorageInfo, StorageError> {
        self.call(Method::GET, "v1/info", None::<&()>).await
    }

    async fn create_timeline(&self, req: CreateTimeline) -> Result<Timeline, StorageError> {
        self.call(Method::POST, "v1/timelines", Some(&req)).await
    }

    async fn get_timeline(&self, id: &TimelineId) -> Result<Timeline, StorageError> {
        self.call(Method::GET, &format!("v1/timelines/{id}"), None::<&()>)
            .await
    }

    async fn list_timelines(&self) -> Result<Vec<Timeline>, StorageError> {
        self.call(Method::GET, "v1/timelines", None::<&()>).await
    }

    async fn delete_timeline(&self, id: &TimelineId) -> Result<(), StorageError> {
        self.delete(&format!("v1/timelines/{id}")).await
    }

    async fn create_snapshot(&self, req: CreateSnapshot) -> Result<Snapshot, StorageError> {
        self.call(Method::POST, "v1/snapshots", Some(&req)).await
    }

    async fn get_snapshot(&self, id: &SnapshotId) -> Result<Snapshot, StorageError> {
        self.call(Method::GET, &format!("v1/snapshots/{id}"), None::<&()>)
            .await
    }

    async fn list_snapshots(&self) -> Result<Vec<Snapshot>, StorageError> {
        self.call(Method::GET, "v1/snapshots", None::<&()>).await
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), StorageError> {
        self.delete(&format!("v1/snapshots/{id}")).await
    }

    async fn create_replica(&self, req: CreateReplica) -> Result<Replica, StorageError> {
        let body = super::server::CreateReplicaBody {
            source_connection: req.source_connection,
        };
        self.call(
            Method::PUT,
            &format!("v1/timelines/{}/replicas/{}", req.timeline, req.ordinal),
            Some(&body),
        )
        .await
    }

    async fn list_replicas(&self, timeline: &TimelineId) -> Result<Vec<Replica>, StorageError> {
        self.call(
            Method::GET,
            &format!("v1/timelines/{timeline}/replicas"),
            None::<&()>,
        )
        .await
    }

    async fn delete_replica(
        &self,
        timeline: &TimelineId,
        ordinal: u32,
    ) -> Result<(), StorageError> {
        self.delete(&format!("v1/timelines/{timeline}/replicas/{ordinal}"))
            .await
    }

    async fn set_backup(
        &self,
        timeline: &TimelineId,
        target: Option<BackupTarget>,
    ) -> Result<Option<BackupStatus>, StorageError> {
        let path = format!("v1/timelines/{timeline}/backup");
        match target {
            Some(t) => self.call(Method::PUT, &path, Some(&t)).await,
            None => self.delete(&path).await.map(|()| None),
        }
    }

    async fn get_backup(
        &self,
        timeline: &TimelineId,
    ) -> Result<Option<BackupStatus>, StorageError> {
        self.call(
            Method::GET,
            &format!("v1/timelines/{timeline}/backup"),
            None::<&()>,
        )
        .await
    }

    async fn start_base_backup(
        &self,
        timeline: &TimelineId,
        req: BaseBackupRequest,
    ) -> Result<BackupStatus, StorageError> {
        self.call(
            Method::POST,
            &format!("v1/timelines/{timeline}/base-backups"),
            Some(&req),
        )
        .await
    }

    async fn resolve_point(
        &self,
        timeline: &TimelineId,
        timestamp: jiff::Timestamp,
    ) -> Result<Lsn, StorageError> {
        let mut url = self.url(&format!("v1/timelines/{timeline}/resolve"))?;
        url.query_pairs_mut()
            .append_pair("timestamp", &timestamp.to_string());
        let resp = self.send(Method::GET, url.clone(), None::<&()>).await?;
        let r: ResolveResponse = resp.json().await.map_err(|e| {
            StorageError::internal(format!(
                "storage service answered resolve with a body this client cannot read: {e}"
            ))
        })?;
        Ok(r.lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_checks() {
        assert!(HttpStorage::new("ftp://x", None).is_err());
        assert!(HttpStorage::new("not a url", None).is_err());
        assert!(HttpStorage::new("http://u:p@host:1", None).is_err());
        let c = HttpStorage::new("http://host:7070/prefix", Some("t".into())).unwrap();
        assert_eq!(
            c.url("v1/info").unwrap().as_str(),
            "http://host:7070/prefix/v1/info"
        );
        assert!(!format!("{c:?}").contains("\"t\""));
    }

    #[test]
    fn statuses_without_our_body_map_to_variants() {
        let m = || "m".to_string();
        assert!(matches!(
            error_from_code("", m(), StatusCode::BAD_GATEWAY),
            StorageError::Unavailable { .. }
        ));
        assert!(matches!(
            error_from_code("", m(), StatusCode::UNAUTHORIZED),
            StorageError::Unauthorized { .. }
        ));
        assert!(matches!(
            error_from_code("", m(), StatusCode::PAYLOAD_TOO_LARGE),
            StorageError::InvalidArgument { .. }
        ));
        assert!(matches!(
            error_from_code("Busy", m(), StatusCode::LOCKED),
            StorageError::Busy { .. }
        ));
    }
}
