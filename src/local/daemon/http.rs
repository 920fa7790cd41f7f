//! The control API's routes (JSON over HTTP on the daemon's Unix socket):
//! each handler calls one of the daemon's operations and answers its view;
//! a [`LocalError`] becomes the HTTP status the client turns back into it.

use axum::extract::{Path as UrlPath, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::Daemon;
use crate::local::api::{
    BranchView, CreateBranchRequest, CreateSnapshotRequest, ErrorBody, FinalizeRequest,
    RestoreRequest, RestoreView, SetBranchRequest, SnapshotView, StatusView,
};
use crate::local::LocalError;
use crate::storage::StorageError;

struct ApiError(LocalError);

impl From<LocalError> for ApiError {
    fn from(e: LocalError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            LocalError::NotFound(_) => StatusCode::NOT_FOUND,
            LocalError::Invalid(_) => StatusCode::BAD_REQUEST,
            LocalError::Conflict(_) => StatusCode::CONFLICT,
            LocalError::Storage(e) => match e {
                StorageError::NotFound { .. } => StatusCode::NOT_FOUND,
                StorageError::InvalidArgument { .. } | StorageError::InvalidPoint { .. } => {
                    StatusCode::BAD_REQUEST
                }
                StorageError::Conflict { .. } | StorageError::Busy { .. } => StatusCode::CONFLICT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (
            status,
            Json(ErrorBody {
                error: self.0.to_string(),
            }),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// `?brief=true`: skip size and LSN (cheap, for polling).
#[derive(Debug, serde::Deserialize)]
struct ViewQuery {
    brief: Option<bool>,
}

/// The routes, served by `run`.
pub(super) fn router(d: Daemon) -> Router {
    Router::new()
        .route("/status", get(h_status))
        .route("/shutdown", post(h_shutdown))
        .route("/branches", get(h_branches).post(h_create_branch))
        .route(
            "/branches/{name}",
            get(h_branch).delete(h_delete_branch).patch(h_set_branch),
        )
        .route("/branches/{name}/start", post(h_start))
        .route("/branches/{name}/stop", post(h_stop))
        .route("/branches/{name}/finalize", post(h_finalize))
        .route("/snapshots", get(h_snapshots).post(h_create_snapshot))
        .route(
            "/snapshots/{name}",
            get(h_snapshot).delete(h_delete_snapshot),
        )
        .route("/restores", get(h_restores).post(h_restore))
        .route("/restores/{id}", get(h_restore_get))
        .with_state(d)
}

async fn h_status(AxState(d): AxState<Daemon>) -> ApiResult<StatusView> {
    Ok(Json(d.status().await?))
}

async fn h_shutdown(AxState(d): AxState<Daemon>) -> ApiResult<serde_json::Value> {
    d.inner.shutdown.cancel();
    Ok(Json(serde_json::json!({"stopping": true})))
}

async fn h_branches(
    AxState(d): AxState<Daemon>,
    Query(q): Query<ViewQuery>,
) -> ApiResult<Vec<BranchView>> {
    let brief = q.brief.unwrap_or(false);
    let rows = d.store().branches()?;
    let views = futures::future::join_all(rows.iter().map(|b| d.view(b, brief))).await;
    Ok(Json(views.into_iter().collect::<Result<Vec<_>, _>>()?))
}

async fn h_branch(
    AxState(d): AxState<Daemon>,
    Query(q): Query<ViewQuery>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<BranchView> {
    branch_view(&d, &name, &q).await
}

/// The answer of every call on one branch: its view, as it is now.
async fn branch_view(d: &Daemon, name: &str, q: &ViewQuery) -> ApiResult<BranchView> {
    let b = d.branch(name)?;
    Ok(Json(d.view(&b, q.brief.unwrap_or(false)).await?))
}

async fn h_create_branch(
    AxState(d): AxState<Daemon>,
    Json(req): Json<CreateBranchRequest>,
) -> ApiResult<BranchView> {
    Ok(Json(d.create_branch(req).await?))
}

async fn h_delete_branch(
    AxState(d): AxState<Daemon>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    d.delete_branch(&name).await?;
    Ok(Json(serde_json::json!({"deleted": name})))
}

async fn h_set_branch(
    AxState(d): AxState<Daemon>,
    Query(q): Query<ViewQuery>,
    UrlPath(name): UrlPath<String>,
    Json(req): Json<SetBranchRequest>,
) -> ApiResult<BranchView> {
    {
        let _g = d.inner.ops.lock().await;
        d.branch(&name)?;
        if let Some(p) = req.protected {
            d.store().set_protected(&name, p)?;
        }
    }
    branch_view(&d, &name, &q).await
}

async fn h_start(
    AxState(d): AxState<Daemon>,
    Query(q): Query<ViewQuery>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<BranchView> {
    d.start_branch(&name).await?;
    branch_view(&d, &name, &q).await
}

async fn h_stop(
    AxState(d): AxState<Daemon>,
    Query(q): Query<ViewQuery>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<BranchView> {
    d.stop_branch(&name).await?;
    branch_view(&d, &name, &q).await
}

async fn h_finalize(
    AxState(d): AxState<Daemon>,
    UrlPath(name): UrlPath<String>,
    Json(req): Json<FinalizeRequest>,
) -> ApiResult<RestoreView> {
    Ok(Json(d.finalize(&name, req).await?))
}

async fn h_snapshots(AxState(d): AxState<Daemon>) -> ApiResult<Vec<SnapshotView>> {
    let rows = d.store().snapshots()?;
    let views = futures::future::join_all(rows.iter().map(|s| d.snapshot_view(s))).await;
    Ok(Json(views.into_iter().collect::<Result<Vec<_>, _>>()?))
}

async fn h_snapshot(
    AxState(d): AxState<Daemon>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<SnapshotView> {
    let s = d.snapshot(&name)?;
    Ok(Json(d.snapshot_view(&s).await?))
}

async fn h_create_snapshot(
    AxState(d): AxState<Daemon>,
    Json(req): Json<CreateSnapshotRequest>,
) -> ApiResult<SnapshotView> {
    Ok(Json(d.create_snapshot(req).await?))
}

async fn h_delete_snapshot(
    AxState(d): AxState<Daemon>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    d.delete_snapshot(&name).await?;
    Ok(Json(serde_json::json!({"deleted": name})))
}

async fn h_restores(AxState(d): AxState<Daemon>) -> ApiResult<Vec<RestoreView>> {
    let mut out = Vec::new();
    for r in d.store().restores()? {
        out.push(d.restore_view(&r).await?);
    }
    Ok(Json(out))
}

async fn h_restore(
    AxState(d): AxState<Daemon>,
    Json(req): Json<RestoreRequest>,
) -> ApiResult<RestoreView> {
    Ok(Json(d.restore(req).await?))
}

async fn h_restore_get(
    AxState(d): AxState<Daemon>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<RestoreView> {
    let r = d.restore_row(&id)?;
    Ok(Json(d.restore_view(&r).await?))
}
