//! The HTTP server: any [`Storage`] as the JSON API described in
//! [`super`], with bearer-token authentication, JSON errors, a request body
//! limit and one tracing span per request.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;
use tracing::Instrument;

use super::{status_of, ErrorBody};
use crate::storage::{
    BackupTarget, BaseBackupRequest, CreateSnapshot, CreateTimeline, SnapshotId, Storage,
    StorageError, TimelineId,
};

/// Largest request body accepted (requests are small JSON documents).
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;

/// Seconds a client is told to wait before retrying a `Busy` or
/// `Unavailable` answer.
const RETRY_AFTER_SECS: &str = "2";

/// Who may call the API.
#[derive(Clone)]
pub enum Auth {
    /// Every `/v1` request must carry `Authorization: Bearer <token>`.
    Token(Arc<str>),
    /// No authentication (only for a loopback listener or tests).
    Disabled,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Token(_) => f.write_str("Auth::Token(<redacted>)"),
            Auth::Disabled => f.write_str("Auth::Disabled"),
        }
    }
}

impl Auth {
    /// A token auth, refusing an empty token.
    pub fn token(t: &str) -> Result<Self, StorageError> {
        let t = t.trim();
        if t.is_empty() {
            return Err(StorageError::invalid("the storage API token is empty"));
        }
        Ok(Auth::Token(Arc::from(t)))
    }
}

#[derive(Clone)]
struct AppState {
    storage: Arc<dyn Storage>,
    auth: Auth,
}

/// An error answered as [`ErrorBody`] JSON with its status.
struct ApiError {
    status: StatusCode,
    error: StorageError,
}

impl From<StorageError> for ApiError {
    fn from(error: StorageError) -> Self {
        ApiError {
            status: status_of(&error),
            error,
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError {
            status: r.status(),
            error: StorageError::invalid(format!("request body: {}", r.body_text())),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: StorageError::invalid(format!("path: {}", r.body_text())),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: StorageError::invalid(format!("query: {}", r.body_text())),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(ErrorBody::from_error(&self.error))).into_response();
        let h = resp.headers_mut();
        match &self.error {
            StorageError::Busy { .. } | StorageError::Unavailable { .. } => {
                h.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECS),
                );
            }
            StorageError::Unauthorized { .. } => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"pgbranch-storage\""),
                );
            }
            _ => {}
        }
        resp
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The router: the whole trait under `/v1`, `/healthz` without auth.
pub fn router(storage: Arc<dyn Storage>, auth: Auth) -> Router {
    router_with_limit(storage, auth, DEFAULT_BODY_LIMIT)
}

/// [`router`] with a chosen request body limit (bytes).
pub fn router_with_limit(storage: Arc<dyn Storage>, auth: Auth, body_limit: usize) -> Router {
    let state = AppState { storage, auth };
    let v1 = Router::new()
        .route("/v1/info", get(info))
        .route("/v1/timelines", get(list_timelines).post(create_timeline))
        .route(
            "/v1/timelines/{id}",
            get(get_timeline).delete(delete_timeline),
        )
        .route("/v1/timelines/{id}/resolve", get(resolve_point))
        .route(
            "/v1/timelines/{id}/backup",
            get(get_backup).put(put_backup).delete(delete_backup),
        )
        .route("/v1/timelines/{id}/base-backups", post(start_base_backup))
        .route("/v1/timelines/{id}/replicas", get(list_replicas))
        .route(
            "/v1/timelines/{id}/replicas/{ordinal}",
            put(create_replica).delete(delete_replica),
        )
        .route("/v1/snapshots", get(list_snapshots).post(create_snapshot))
        .route(
            "/v1/snapshots/{id}",
            get(get_snapshot).delete(delete_snapshot),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(v1)
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(trace_request))
        .with_state(state)
}

/// Serves `storage` on `listener` until `shutdown` resolves, then lets
/// requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    storage: Arc<dyn Storage>,
    auth: Auth,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(storage, auth);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Byte-wise comparison whose time does not depend on where the inputs
/// differ (only on their lengths).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let Auth::Token(expected) = &st.auth else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    let problem = match given {
        None => "missing bearer token (Authorization: Bearer <token>)",
        Some(t) if constant_time_eq(t.as_bytes(), expected.as_bytes()) => {
            return next.run(req).await;
        }
        Some(_) => "wrong bearer token",
    };
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    tracing::warn!(peer = peer.as_deref(), problem, "request refused");
    ApiError::from(StorageError::Unauthorized {
        message: problem.to_string(),
    })
    .into_response()
}

/// One span per request: method, route, status and duration; never headers
/// or bodies (tokens and passwords travel there).
async fn trace_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    // The path holds only identifiers; cut it short in case of garbage.
    let path: String = req.uri().path().chars().take(200).collect();
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    let span = tracing::info_span!("http", %method, path = %path, peer = peer.as_deref());
    let start = Instant::now();
    async move {
        let resp = next.run(req).await;
        let status = resp.status().as_u16();
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        if resp.status().is_server_error() {
            tracing::warn!(status, ms, "request failed");
        } else {
            tracing::info!(status, ms, "request");
        }
        resp
    }
    .instrument(span)
    .await
}

async fn unknown_route() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        error: StorageError::not_found("route", "(no such API path)"),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        error: StorageError::invalid("method not allowed on this path"),
    }
}

fn timeline_id(p: Result<Path<String>, PathRejection>) -> ApiResult<TimelineId> {
    let Path(s) = p?;
    Ok(TimelineId::new(s)?)
}

fn snapshot_id(p: Result<Path<String>, PathRejection>) -> ApiResult<SnapshotId> {
    let Path(s) = p?;
    Ok(SnapshotId::new(s)?)
}

async fn info(State(st): State<AppState>) -> ApiResult<Response> {
    Ok(Json(st.storage.info().await?).into_response())
}

async fn create_timeline(
    State(st): State<AppState>,
    body: Result<Json<CreateTimeline>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(req) = body?;
    tracing::info!(key = %req.key, source = ?req.source, "create timeline");
    Ok(Json(st.storage.create_timeline(req).await?).into_response())
}

async fn list_timelines(State(st): State<AppState>) -> ApiResult<Response> {
    Ok(Json(st.storage.list_timelines().await?).into_response())
}

async fn get_timeline(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = timeline_id(p)?;
    Ok(Json(st.storage.get_timeline(&id).await?).into_response())
}

async fn delete_timeline(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = timeline_id(p)?;
    tracing::info!(timeline = %id, "delete timeline");
    st.storage.delete_timeline(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct ResolveQuery {
    timestamp: String,
}

async fn resolve_point(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<ResolveQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let id = timeline_id(p)?;
    let Query(q) = q?;
    let ts: jiff::Timestamp = q.timestamp.parse().map_err(|e| {
        StorageError::invalid(format!(
            "timestamp {:?} is not an RFC 3339 instant like 2024-05-01T12:00:00Z: {e}",
            q.timestamp
        ))
    })?;
    let lsn = st.storage.resolve_point(&id, ts).await?;
    Ok(Json(ResolveResponse { lsn }).into_response())
}

/// The answer of `GET /v1/timelines/{id}/resolve`.
#[derive(Debug, serde::Serialize, Deserialize)]
pub struct ResolveResponse {
    pub lsn: crate::storage::Lsn,
}

/// Turns archiving on; the body holds credentials, so nothing of it is
/// logged but the server name.
async fn put_backup(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    body: Result<Json<BackupTarget>, JsonRejection>,
) -> ApiResult<Response> {
    let id = timeline_id(p)?;
    let Json(target) = body?;
    tracing::info!(timeline = %id, server = %target.server, "enable backup");
    Ok(Json(st.storage.set_backup(&id, Some(target)).await?).into_response())
}

async fn get_backup(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = timeline_id(p)?;
    Ok(Json(st.storage.get_backup(&id).await?).into_response())
}

async fn delete_backup(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = timeline_id(p)?;
    tracing::info!(timeline = %id, "disable backup");
    st.storage.set_backup(&id, None).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn start_base_backup(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    body: Result<Json<BaseBackupRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let id = timeline_id(p)?;
    let Json(req) = body?;
    Ok(Json(st.storage.start_base_backup(&id, req).await?).into_response())
}

/// Timeline id and replica ordinal of a replica route.
fn replica_path(p: Result<Path<(String, String)>, PathRejection>) -> ApiResult<(TimelineId, u32)> {
    let Path((id, ordinal)) = p?;
    let id = TimelineId::new(id)?;
    let ordinal: u32 = ordinal.parse().map_err(|_| {
        StorageError::invalid(format!(
            "replica ordinal {ordinal:?} is not a number (0-{})",
            crate::storage::MAX_REPLICA_ORDINAL
        ))
    })?;
    crate::storage::validate_replica_ordinal(ordinal)?;
    Ok((id, ordinal))
}

/// The body of `PUT /v1/timelines/{id}/replicas/{ordinal}`.
#[derive(Debug, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateReplicaBody {
    #[serde(default)]
    pub source_connection: Option<crate::storage::ConnInfo>,
}

async fn create_replica(
    State(st): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<CreateReplicaBody>, JsonRejection>,
) -> ApiResult<Response> {
    let (timeline, ordinal) = replica_path(p)?;
    let Json(body) = body?;
    tracing::info!(timeline = %timeline, ordinal, "create replica");
    let req = crate::storage::CreateReplica {
        timeline,
        ordinal,
        source_connection: body.source_connection,
    };
    Ok(Json(st.storage.create_replica(req).await?).into_response())
}

async fn list_replicas(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = timeline_id(p)?;
    Ok(Json(st.storage.list_replicas(&id).await?).into_response())
}

async fn delete_replica(
    State(st): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Response> {
    let (timeline, ordinal) = replica_path(p)?;
    tracing::info!(timeline = %timeline, ordinal, "delete replica");
    st.storage.delete_replica(&timeline, ordinal).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn create_snapshot(
    State(st): State<AppState>,
    body: Result<Json<CreateSnapshot>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(req) = body?;
    tracing::info!(key = %req.key, timeline = %req.timeline, point = %req.point, "create snapshot");
    Ok(Json(st.storage.create_snapshot(req).await?).into_response())
}

async fn list_snapshots(State(st): State<AppState>) -> ApiResult<Response> {
    Ok(Json(st.storage.list_snapshots().await?).into_response())
}

async fn get_snapshot(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = snapshot_id(p)?;
    Ok(Json(st.storage.get_snapshot(&id).await?).into_response())
}

async fn delete_snapshot(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = snapshot_id(p)?;
    tracing::info!(snapshot = %id, "delete snapshot");
    st.storage.delete_snapshot(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn empty_token_refused() {
        assert!(Auth::token("  \n").is_err());
        assert!(matches!(Auth::token("t\n").unwrap(), Auth::Token(t) if &*t == "t"));
    }

    #[test]
    fn auth_debug_hides_token() {
        let a = Auth::token("s3cret").unwrap();
        assert!(!format!("{a:?}").contains("s3cret"));
    }
}
