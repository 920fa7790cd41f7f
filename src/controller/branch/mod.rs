//! The Branch controller.
//!
//! Apply: validate → parent → credentials Secrets (before any data exists,
//! so a password is never lost) → timeline (idempotent by the Branch UID,
//! polled until Ready, never waited on) → compute Deployment and Service →
//! once the compute is ready, credentials and declarative roles/databases
//! over SQL → read replicas and the `-ro` Service ([`replicas`]) → Ready
//! (its message counts the ready replicas, e.g. `2/2 read replicas ready`).
//!
//! The branch's current timeline is `status.timelineId`. When it changes (a
//! restore moves the branch to a new timeline), the controller brings up the
//! new timeline's compute, switches the Service selector only once that
//! compute is ready, then removes the old timeline's compute, and re-applies
//! the branch's passwords to the new data. A restore therefore only has to
//! write `status.timelineId`.
//!
//! Cleanup (finalizer): refused while `spec.protected` (Stalled
//! BranchProtected) or while other Branches name this one as parent (Stalled
//! HasChildren); otherwise the compute is removed, then the timeline, then
//! the Service and Secrets, then the finalizer.

pub mod handover;
pub mod refresh;
pub mod replicas;
pub mod sql;
pub mod validate;
mod volume;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, Controller};
use kube::{Api, ResourceExt};

use super::apply::{apply_owned, delete_owned, holder, Holder};
use super::expiry::{self, Expiry};
use super::status::{apply_outcome, write_status, Outcome};
use super::{error_policy, with_deadline, Context, Error};
use crate::api::{
    Branch, BranchStatus, ConnectionStatus, CredentialsPolicy, InitSource, LABEL_BRANCH,
    LABEL_TIMELINE,
};
use crate::compute::{
    app_secret_name, build_credentials_secret, build_deployment, build_service, content_hash,
    ro_service_name, role_secret_name, secret_value, service_host, service_name,
    superuser_secret_name, ComputeTarget, RoleCredentials, ANNOTATION_SQL_APPLIED, PG_PORT,
};
use crate::storage::{
    ConnInfo, CreateTimeline, OpKey, Password, Source, State, StorageError, Timeline, TimelineId,
};
use validate::{app_identity, generate_password, parse_expires, parse_point, secret_suffix};

/// Annotation on a new Branch naming an existing timeline to take over
/// instead of creating one (a restore's backup branch keeps the replaced
/// timeline this way). Read only while `status.timelineId` is empty.
pub const ANNOTATION_ADOPT_TIMELINE: &str = "pgbranch.dev/adopt-timeline";

/// The finalizer the Branch controller puts on every Branch.
pub const FINALIZER: &str = "pgbranch.dev/branch-cleanup";
const KIND: &str = "Branch";

/// Runs the Branch controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (branches, deployments, services, secrets): (
        Api<Branch>,
        Api<Deployment>,
        Api<Service>,
        Api<Secret>,
    ) = match &ctx.config.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let owned = watcher::Config::default().labels(LABEL_BRANCH);
    let controller = Controller::new(branches.clone(), watcher::Config::default());
    let store = controller.store();
    let own_store = store.clone();
    let mut controller = controller
        .owns(deployments, owned.clone())
        .owns(services, owned.clone())
        .owns(secrets, owned)
        // A branch's changes wake its parent (which may wait for its
        // children to go) and its children (which may wait for it to be
        // Ready, or for it to exist).
        .watches(branches, watcher::Config::default(), move |b: Branch| {
            related_branches(&b, &store.state())
        })
        .graceful_shutdown_on(shutdown.clone());
    if let Some(every) = ctx.config.resync_interval {
        let ticks = futures::stream::unfold((), move |()| async move {
            tokio::time::sleep(every).await;
            Some(((), ()))
        });
        controller = controller.reconcile_all_on(ticks);
    }
    let running = controller
        .run(reconcile, error_policy::<Branch>, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile did not complete"),
            }
        });
    // Without the Branch CRD installed the store never fills and
    // kube-runtime would never finish a graceful shutdown.
    super::until_stopped(KIND, own_store, shutdown, running).await;
}

/// The Branch holding the data `b` was copied from: `status.parentBranch`
/// (moved by a restore of the parent to its backup branch), else
/// `spec.parent.branch`.
pub fn effective_parent(b: &Branch) -> Option<String> {
    b.status
        .as_ref()
        .and_then(|s| s.parent_branch.clone())
        .or_else(|| b.spec.parent.as_ref().map(|p| p.branch.clone()))
}

/// The parent and the children of `b` (children found in `known`, the
/// controller's cache of Branches).
fn related_branches(b: &Branch, known: &[Arc<Branch>]) -> Vec<ObjectRef<Branch>> {
    let Some(ns) = b.namespace() else {
        return vec![];
    };
    let name = b.name_any();
    let mut out: Vec<ObjectRef<Branch>> = b
        .spec
        .parent
        .iter()
        .map(|p| p.branch.clone())
        .chain(effective_parent(b))
        .map(|p| ObjectRef::new(&p).within(&ns))
        .collect();
    out.dedup();
    out.extend(
        known
            .iter()
            .filter(|c| c.namespace().as_deref() == Some(ns.as_str()))
            .filter(|c| {
                c.spec.parent.as_ref().is_some_and(|p| p.branch == name)
                    || effective_parent(c).as_deref() == Some(name.as_str())
            })
            .map(|c| ObjectRef::from_obj(c.as_ref())),
    );
    out
}

async fn reconcile(branch: Arc<Branch>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = branch.namespace().unwrap_or_default();
    let api: Api<Branch> = Api::namespaced(ctx.client.clone(), &ns);
    let res = super::finalizer_result(
        finalizer(&api, FINALIZER, branch.clone(), |ev| async {
            match ev {
                FinalizerEvent::Apply(b) => reconcile_apply(b, &ctx).await,
                FinalizerEvent::Cleanup(b) => reconcile_cleanup(b, &ctx).await,
            }
        })
        .await,
    );
    ctx.metrics.reconciled(KIND, started.elapsed());
    if res.is_ok() {
        ctx.record_success(branch.as_ref());
    }
    res
}

/// The end of one pass: what to report and when to look again.
struct Done {
    outcome: Outcome,
    phase: &'static str,
    requeue: Action,
}

fn progressing(reason: &str, message: impl Into<String>, after: Duration) -> Done {
    Done {
        outcome: Outcome::progressing(reason, message),
        phase: "Creating",
        requeue: Action::requeue(after),
    }
}

/// Writes the status of a pass (Stalled for terminal errors, the error as
/// Reconciling for retryable ones) and returns the requeue.
async fn finish(
    ctx: &Context,
    branch: &Branch,
    mut status: BranchStatus,
    result: Result<Done, Error>,
) -> Result<Action, Error> {
    let (done, err) = match result {
        Ok(d) => (d, None),
        Err(Error::Stalled { reason, message }) => {
            tracing::warn!(branch = %branch.name_any(), %reason, %message, "stalled");
            (
                Done {
                    outcome: Outcome::Stalled { reason, message },
                    phase: "Failed",
                    requeue: Action::requeue(ctx.config.ready_requeue),
                },
                None,
            )
        }
        // Our own status write raced with another writer: re-read first.
        Err(e @ Error::Kube(kube::Error::Api(_))) if e.reason() == "Conflict" => return Err(e),
        Err(Error::Waiting(what)) => (progressing("Waiting", what, ctx.config.poll_interval), None),
        // A hiccup (storage or API unreachable, a timeout) on a branch that
        // is serving does not make it unready: retry without a status write.
        Err(e)
            if e.is_retryable()
                && branch.status.as_ref().is_some_and(|s| {
                    crate::api::conditions::is_ready_for(&s.conditions, branch.metadata.generation)
                }) =>
        {
            return Err(e)
        }
        Err(e) => (
            Done {
                outcome: Outcome::progressing(e.reason(), e.to_string()),
                phase: status.phase.clone().map_or("Creating", |p| {
                    if p == "Deleting" {
                        "Deleting"
                    } else {
                        "Creating"
                    }
                }),
                requeue: Action::await_change(),
            },
            Some(e),
        ),
    };
    let generation = branch.metadata.generation;
    status.observed_generation = generation;
    status.phase = Some(done.phase.to_string());
    apply_outcome(
        &mut status.conditions,
        &done.outcome,
        generation,
        jiff::Timestamp::now(),
    );
    write_status(ctx, branch, branch.status.as_ref(), &status, &done.outcome).await?;
    match err {
        Some(e) => Err(e),
        None => Ok(done.requeue),
    }
}

async fn reconcile_apply(branch: Arc<Branch>, ctx: &Context) -> Result<Action, Error> {
    let mut status = branch.status.clone().unwrap_or_default();
    let result = apply_steps(&branch, ctx, &mut status).await;
    finish(ctx, &branch, status, result).await
}

/// Passwords the branch's Secrets hold (read or newly generated).
struct Credentials {
    superuser: String,
    app: RoleCredentials,
    extra_roles: Vec<RoleCredentials>,
    /// The SQL-applied marker currently on the app Secret.
    sql_marker: Option<String>,
}

async fn get_secret(ctx: &Context, ns: &str, name: &str) -> Result<Option<Secret>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    with_deadline(ctx, "read secret", api.get_opt(name)).await
}

async fn secret_password(ctx: &Context, ns: &str, name: &str) -> Result<Option<String>, Error> {
    Ok(get_secret(ctx, ns, name)
        .await?
        .and_then(|s| secret_value(&s, "password")))
}

/// A role's password: the branch's Secret's (when it is for that user),
/// else (inherit) the parent's for the same role, else a new one.
async fn role_password(
    ctx: &Context,
    ns: &str,
    inherit: bool,
    secret: String,
    parent_secret: Option<String>,
    user: &str,
) -> Result<String, Error> {
    let candidates = std::iter::once(Some(secret))
        .chain(std::iter::once(parent_secret.filter(|_| inherit)))
        .flatten();
    for name in candidates {
        if let Some(s) = get_secret(ctx, ns, &name).await? {
            if secret_value(&s, "user").as_deref() == Some(user) {
                if let Some(pw) = secret_value(&s, "password") {
                    return Ok(pw);
                }
            }
        }
    }
    Ok(generate_password())
}

/// Reads or creates the branch's credential Secrets. Each password is
/// stored before any database holds it.
async fn ensure_credentials(
    ctx: &Context,
    branch: &Branch,
    parent: Option<&Branch>,
    uid: &str,
) -> Result<Credentials, Error> {
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let inherit = parent.is_some() && branch.spec.credentials == Some(CredentialsPolicy::Inherit);
    let parent_name = parent.map(|p| p.name_any());
    let cfg = &ctx.config.compute;

    // The superuser.
    let su_name = superuser_secret_name(&name);
    let superuser = match secret_password(ctx, &ns, &su_name).await? {
        Some(pw) => pw,
        None if inherit => {
            let pname = parent_name.clone().unwrap_or_default();
            secret_password(ctx, &ns, &superuser_secret_name(&pname))
                .await?
                .ok_or_else(|| {
                    Error::Waiting(format!(
                        "the parent's Secret {} is not there yet",
                        superuser_secret_name(&pname)
                    ))
                })?
        }
        None => generate_password(),
    };
    let su_creds = RoleCredentials {
        user: "postgres".into(),
        password: superuser.clone(),
        database: "postgres".into(),
    };
    apply_owned(
        ctx,
        build_credentials_secret(branch, su_name, &su_creds, cfg, Default::default())?,
        uid,
    )
    .await?;

    // A role's password: the branch's Secret's, else (inherit) the parent's
    // for the same role, else a new one.
    // The app role (the superuser itself when no role is declared anywhere).
    let (app_user, app_db) = app_identity(branch, parent);
    let app_password = if app_user == "postgres" {
        superuser.clone()
    } else {
        role_password(
            ctx,
            &ns,
            inherit,
            app_secret_name(&name),
            parent_name.as_deref().map(app_secret_name),
            &app_user,
        )
        .await?
    };
    let app = RoleCredentials {
        user: app_user,
        password: app_password,
        database: app_db.clone(),
    };
    let existing_app = get_secret(ctx, &ns, &app_secret_name(&name)).await?;
    let sql_marker = existing_app
        .as_ref()
        .filter(|s| holder(*s, uid) == Holder::Owner)
        .and_then(|s| s.metadata.annotations.as_ref())
        .and_then(|a| a.get(ANNOTATION_SQL_APPLIED))
        .cloned();
    let mut annotations = std::collections::BTreeMap::new();
    if let Some(m) = &sql_marker {
        annotations.insert(ANNOTATION_SQL_APPLIED.to_string(), m.clone());
    }
    apply_owned(
        ctx,
        build_credentials_secret(branch, app_secret_name(&name), &app, cfg, annotations)?,
        uid,
    )
    .await?;

    let mut extra_roles = vec![];
    for role in branch.spec.roles.iter().skip(1) {
        let secret = role_secret_name(&name, &secret_suffix(&role.name));
        let parent_secret = parent_name
            .as_deref()
            .map(|p| role_secret_name(p, &secret_suffix(&role.name)));
        let password =
            role_password(ctx, &ns, inherit, secret.clone(), parent_secret, &role.name).await?;
        let creds = RoleCredentials {
            user: role.name.clone(),
            password,
            database: app_db.clone(),
        };
        apply_owned(
            ctx,
            build_credentials_secret(branch, secret, &creds, cfg, Default::default())?,
            uid,
        )
        .await?;
        extra_roles.push(creds);
    }
    remove_stale_role_secrets(ctx, branch, &extra_roles, uid).await?;
    Ok(Credentials {
        superuser,
        app,
        extra_roles,
        sql_marker,
    })
}

/// Deletes the credential Secrets of roles no longer in `spec.roles` (the
/// role itself is dropped by the SQL step).
async fn remove_stale_role_secrets(
    ctx: &Context,
    branch: &Branch,
    extra_roles: &[RoleCredentials],
    uid: &str,
) -> Result<(), Error> {
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let mut keep = vec![superuser_secret_name(&name), app_secret_name(&name)];
    keep.extend(
        extra_roles
            .iter()
            .map(|r| role_secret_name(&name, &secret_suffix(&r.user))),
    );
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = format!(
        "{LABEL_BRANCH}={name},{}=credentials",
        crate::compute::LABEL_COMPONENT
    );
    let list = with_deadline(
        ctx,
        "list credential secrets",
        api.list(&ListParams::default().labels(&selector)),
    )
    .await?;
    for s in list.items {
        let sname = s.name_any();
        if !keep.contains(&sname) && holder(&s, uid) == Holder::Owner {
            tracing::info!(branch = %name, secret = %sname, "deleting the Secret of a role removed from spec.roles");
            delete_owned::<Secret>(ctx, &ns, &sname, uid).await?;
        }
    }
    Ok(())
}

fn storage_stalled(e: StorageError) -> Error {
    match &e {
        StorageError::InvalidPoint { .. } => Error::stalled(
            "PointOutsideRestoreWindow",
            format!("the parent cannot be branched at that point: {e}"),
        ),
        StorageError::InvalidArgument { .. } => Error::stalled("InvalidPoint", e.to_string()),
        StorageError::NotFound { .. } => Error::stalled(
            "ParentTimelineNotFound",
            format!("the parent's timeline is gone from storage: {e}"),
        ),
        StorageError::Conflict { .. } => Error::stalled("TimelineConflict", e.to_string()),
        StorageError::Unauthorized { .. } => Error::stalled("StorageUnauthorized", e.to_string()),
        _ => Error::Storage(e),
    }
}

/// The Stalled reason of a timeline that storage could not create: a
/// source whose WAL archiving fails has its own (the message carries the
/// archiver's state).
fn timeline_failed_reason(error: &str) -> &'static str {
    if error.contains(crate::storage::ARCHIVING_FAILED) {
        "SourceArchivingFailed"
    } else {
        "TimelineFailed"
    }
}

/// How to reach a running compute of `branch` as its superuser, to let the
/// storage layer CHECKPOINT it before copying. None when it is not running.
async fn compute_conn(ctx: &Context, branch: &Branch) -> Result<Option<ConnInfo>, Error> {
    if !branch.spec.compute.enabled || branch.spec.compute.suspended {
        return Ok(None);
    }
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let Some(password) = secret_password(ctx, &ns, &superuser_secret_name(&name)).await? else {
        return Ok(None);
    };
    let (host, port) = ctx.resolver.resolve(&ns, &service_name(&name)).await?;
    Ok(Some(ConnInfo {
        host,
        port,
        user: "postgres".into(),
        password: Some(Password(password)),
        dbname: "postgres".into(),
    }))
}

/// Takes over an existing timeline named by [`ANNOTATION_ADOPT_TIMELINE`]
/// (a restore's backup branch, an imported timeline) instead of creating
/// one, unless another Branch already serves it.
async fn adopt_timeline(
    ctx: &Context,
    branch: &Branch,
    id: &str,
    status: &mut BranchStatus,
) -> Result<Timeline, Error> {
    let id = TimelineId::new(id.to_string()).map_err(|e| {
        Error::stalled(
            "InvalidAnnotation",
            format!("annotation {ANNOTATION_ADOPT_TIMELINE}: {e}"),
        )
    })?;
    let ns = branch.namespace().unwrap_or_default();
    let branches: Api<Branch> = Api::namespaced(ctx.client.clone(), &ns);
    let all = with_deadline(ctx, "list branches", branches.list(&ListParams::default())).await?;
    if let Some(other) = all.items.iter().find(|b| {
        b.uid() != branch.uid()
            && b.status.as_ref().and_then(|s| s.timeline_id.as_deref()) == Some(id.as_str())
    }) {
        return Err(Error::stalled(
            "TimelineInUse",
            format!(
                "timeline {id} named by {ANNOTATION_ADOPT_TIMELINE} is the timeline of branch {}",
                other.name_any()
            ),
        ));
    }
    match with_deadline(ctx, "get timeline", ctx.storage.get_timeline(&id)).await {
        Ok(tl) => {
            tracing::info!(branch = %branch.name_any(), timeline = %id, "adopting timeline");
            status.timeline_id = Some(tl.id.to_string());
            Ok(tl)
        }
        Err(Error::Storage(StorageError::NotFound { .. })) => Err(Error::stalled(
            "TimelineNotFound",
            format!("timeline {id} named by {ANNOTATION_ADOPT_TIMELINE} does not exist in storage"),
        )),
        Err(e) => Err(e),
    }
}

/// Finds or creates the branch's timeline and records it in status.
async fn ensure_timeline(
    ctx: &Context,
    branch: &Branch,
    parent: Option<&Branch>,
    creds: &Credentials,
    uid: &str,
    status: &mut BranchStatus,
) -> Result<Result<Timeline, Done>, Error> {
    if let Some(id) = &status.timeline_id {
        let id = TimelineId::new(id.clone()).map_err(|e| {
            Error::stalled(
                "TimelineNotFound",
                format!("status.timelineId is invalid: {e}"),
            )
        })?;
        return match with_deadline(ctx, "get timeline", ctx.storage.get_timeline(&id)).await {
            Ok(tl) => Ok(Ok(tl)),
            Err(Error::Storage(StorageError::NotFound { .. })) => Err(Error::stalled(
                "TimelineNotFound",
                format!(
                    "timeline {id} of this branch no longer exists in storage; the data is gone"
                ),
            )),
            Err(e) => Err(e),
        };
    }
    if let Some(adopt) = branch.annotations().get(ANNOTATION_ADOPT_TIMELINE) {
        handover::check_adoption(ctx, branch, adopt).await?;
        return adopt_timeline(ctx, branch, adopt, status).await.map(Ok);
    }
    let key = OpKey::new(uid.to_string()).map_err(|e| {
        Error::stalled(
            "InvalidUid",
            format!("the Branch UID is not usable as a key: {e}"),
        )
    })?;
    let (source, source_connection) = match parent {
        None => match handover::snapshot_source(ctx, branch).await? {
            Some(Ok(source)) => (source, None),
            Some(Err(done)) => return Ok(Err(done)),
            None => (
                Source::Empty {
                    superuser_password: Some(Password(creds.superuser.clone())),
                },
                None,
            ),
        },
        Some(p) => {
            let ready = p
                .status
                .as_ref()
                .is_some_and(|s| super::status::is_ready(&s.conditions));
            let ptl = p.status.as_ref().and_then(|s| s.timeline_id.clone());
            if p.metadata.deletion_timestamp.is_some() {
                // The parent's deletion waits for its children (this one
                // included) to go, and this one waits for the parent: say so.
                return Err(Error::stalled(
                    "ParentBeingDeleted",
                    format!(
                        "the parent branch {} is being deleted, and its deletion waits for its children, this branch among them, to be deleted first; delete this Branch (or recreate it once the parent is gone)",
                        p.name_any()
                    ),
                ));
            }
            let Some(ptl) = ptl.filter(|_| ready) else {
                return Ok(Err(progressing(
                    "WaitingForParent",
                    format!("waiting for the parent branch {} to be Ready", p.name_any()),
                    ctx.config.poll_interval,
                )));
            };
            let ptl = TimelineId::new(ptl).map_err(storage_stalled)?;
            // One copy of a parent at a time: two backup-mode copies of one
            // running server at once have been seen to fail the first
            // ("WAL ends before end of online backup", copy driver).
            let stored = with_deadline(ctx, "list timelines", ctx.storage.list_timelines()).await?;
            if let Some(other) = stored.iter().find(|t| {
                t.state == State::Creating
                    && t.lineage.parent.as_ref() == Some(&ptl)
                    && t.key.as_str() != uid
            }) {
                return Ok(Err(progressing(
                    "WaitingForParentCopy",
                    format!(
                        "another copy of the parent branch {} is in progress (timeline {}); this one starts after it",
                        p.name_any(),
                        other.id
                    ),
                    ctx.config.poll_interval,
                )));
            }
            let source = if branch.spec.init_source == Some(InitSource::SchemaOnly) {
                Source::SchemaOnly { timeline: ptl }
            } else {
                let point = branch
                    .spec
                    .parent
                    .as_ref()
                    .map(parse_point)
                    .transpose()
                    .map_err(|i| Error::stalled(i.reason, i.message))?
                    .unwrap_or(crate::storage::Point::Head);
                Source::Timeline {
                    timeline: ptl,
                    point,
                }
            };
            (source, compute_conn(ctx, p).await?)
        }
    };
    let req = CreateTimeline {
        key,
        source,
        source_connection,
        label: Some(format!(
            "{}/{}",
            branch.namespace().unwrap_or_default(),
            branch.name_any()
        )),
    };
    tracing::info!(branch = %branch.name_any(), "creating timeline");
    let tl = with_deadline(ctx, "create timeline", ctx.storage.create_timeline(req))
        .await
        .map_err(|e| match e {
            Error::Storage(s) => storage_stalled(s),
            e => e,
        })?;
    status.timeline_id = Some(tl.id.to_string());
    Ok(Ok(tl))
}

/// Copies what storage says about the timeline into status. The fields
/// that move with every write (`lsn`, `logicalSizeBytes`) are taken only when
/// `refresh_stats` (first time, or the stats interval passed): a busy
/// database must not turn every reconcile into a status write.
fn record_timeline(status: &mut BranchStatus, tl: &Timeline, refresh_stats: bool) {
    status.timeline_id = Some(tl.id.to_string());
    status.parent_lsn = tl.lineage.parent_lsn.map(|l| l.to_string());
    if status.parent_timeline_id.is_none() {
        status.parent_timeline_id = tl.lineage.parent.as_ref().map(|p| p.to_string());
    }
    if refresh_stats || status.logical_size_bytes.is_none() {
        status.lsn = tl.lsn.map(|l| l.to_string());
        status.logical_size_bytes = Some(i64::try_from(tl.logical_size_bytes).unwrap_or(i64::MAX));
    }
    status.created_at = Some(tl.created_at.to_string());
    status.pg_major = Some(i64::from(tl.pg_major));
}

/// The condition type that reports roles removed from `spec.roles` that
/// PostgreSQL would not drop.
pub const ROLES_RETAINED: &str = "RolesRetained";

/// Records roles removed from the spec but kept (they own objects or hold
/// privileges) as the `RolesRetained` condition, with a Warning Event;
/// clears the condition once none is kept.
async fn record_retained_roles(
    ctx: &Context,
    branch: &Branch,
    status: &mut BranchStatus,
    retained: &[(String, String)],
    now: jiff::Timestamp,
) {
    if retained.is_empty() {
        crate::api::conditions::remove_condition(&mut status.conditions, ROLES_RETAINED);
        return;
    }
    let message = format!(
        "removed from spec.roles but kept as NOLOGIN without a password: {}; reassign or drop what they own (REASSIGN OWNED / DROP OWNED), then they are dropped at the next change",
        retained
            .iter()
            .map(|(r, why)| format!("{r} ({why})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    crate::api::conditions::set_condition(
        &mut status.conditions,
        crate::api::conditions::condition(
            ROLES_RETAINED,
            "True",
            "RolesOwnObjects",
            &message,
            branch.metadata.generation,
            now,
        ),
    );
    let ev = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Warning,
        reason: "RolesRetained".into(),
        note: Some(message.chars().take(1000).collect()),
        action: "DropRoles".into(),
        secondary: None,
    };
    if let Err(e) = ctx
        .recorder
        .publish(&ev, &kube::Resource::object_ref(branch, &()))
        .await
    {
        tracing::warn!(error = %e, "could not publish event");
    }
}

/// One postgres per data directory, whatever Kubernetes does. Scaling a
/// Deployment up does not wait for its terminating Pods (a resume right
/// after a suspend); a rollout flipped back before the Deployment
/// controller acted on the first change reuses a ReplicaSet whose Pod is
/// still stopping (a hand edit of the template, reverted at once); another
/// branch's compute of the timeline may still be stopping (a restore's
/// backup branch taking over the target's old timeline). So the compute
/// `desired` is created or changed only once the Deployment controller has
/// acted on its last change and no other Pod of the data directory is
/// left; until then this says what it waits for.
async fn compute_start_gate(
    ctx: &Context,
    desired: &Deployment,
    tl: &TimelineId,
) -> Result<Option<Done>, Error> {
    let ns = desired.namespace().unwrap_or_default();
    let own = desired.name_any();
    let deploys: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let live = with_deadline(ctx, "read compute", deploys.get_opt(&own)).await?;
    if live
        .as_ref()
        .is_some_and(|l| !super::apply::needs_apply(desired, l))
    {
        return Ok(None);
    }
    let wait = |what: String| {
        Some(progressing(
            "WaitingForPreviousCompute",
            format!("{what}; the compute of timeline {tl} starts once it is done"),
            ctx.config.poll_interval,
        ))
    };
    if let Some(l) = &live {
        let observed = l.status.as_ref().and_then(|s| s.observed_generation);
        if observed < l.metadata.generation {
            return Ok(wait(format!(
                "Deployment {own} is still rolling out its last change"
            )));
        }
    }
    let selector = format!("{LABEL_TIMELINE}={tl},{}=primary", crate::api::LABEL_ROLE);
    Ok(blocking_pod(ctx, &ns, &selector, &own)
        .await?
        .and_then(|pod| wait(format!("{pod} still runs postgres on its data directory"))))
}

/// A Pod matching `selector` that keeps the Deployment `own` from
/// starting its own: one still terminating, or one of another Deployment
/// (described for the message).
pub(super) async fn blocking_pod(
    ctx: &Context,
    ns: &str,
    selector: &str,
    own: &str,
) -> Result<Option<String>, Error> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(ctx.client.clone(), ns);
    let list = with_deadline(
        ctx,
        "list compute pods",
        pods.list(&ListParams::default().labels(selector)),
    )
    .await?;
    let prefix = format!("{own}-");
    Ok(list.items.iter().find_map(|p| {
        let ours = p
            .owner_references()
            .iter()
            .any(|o| o.kind == "ReplicaSet" && o.name.starts_with(&prefix));
        if p.metadata.deletion_timestamp.is_some() {
            Some(format!("pod {} (stopping)", p.name_any()))
        } else if !ours {
            Some(format!("pod {}", p.name_any()))
        } else {
            None
        }
    }))
}

/// What keeps a compute Deployment's Pods from becoming ready, if anything
/// that will not fix itself soon ([`crate::compute::health`]).
async fn compute_problem(
    ctx: &Context,
    d: &Deployment,
) -> Result<Option<crate::compute::health::PodProblem>, Error> {
    let Some(sel) = d
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.as_ref())
    else {
        return Ok(None);
    };
    let selector = sel
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
    let list = with_deadline(
        ctx,
        "list compute pods",
        pods.list(&ListParams::default().labels(&selector)),
    )
    .await?;
    Ok(crate::compute::health::pod_problem(&list.items))
}

fn deployment_ready(d: &Deployment) -> bool {
    let gen = d.metadata.generation.unwrap_or(0);
    d.status.as_ref().is_some_and(|s| {
        s.ready_replicas.unwrap_or(0) >= 1 && s.observed_generation.unwrap_or(0) >= gen
    })
}

async fn apply_steps(
    branch: &Branch,
    ctx: &Context,
    status: &mut BranchStatus,
) -> Result<Done, Error> {
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let uid = branch
        .uid()
        .ok_or_else(|| Error::stalled("InvalidObject", "the Branch has no UID"))?;
    let now = jiff::Timestamp::now();
    let branches: Api<Branch> = Api::namespaced(ctx.client.clone(), &ns);

    // Validate (pure).
    validate::validate_spec(branch).map_err(|i| Error::stalled(i.reason, i.message))?;
    if let Some(to) = handover::handed_over(branch) {
        return Ok(Done {
            outcome: Outcome::ready(
                "HandedOver",
                format!("a restore is handing this branch's timeline and compute to branch {to}"),
            ),
            phase: "Ready",
            requeue: Action::await_change(),
        });
    }
    let mut requeue = ctx.config.ready_requeue;
    let expires = parse_expires(branch).map_err(|i| Error::stalled(i.reason, i.message))?;
    let created = expiry::created(branch);
    match (expires, expiry::decide(expires, created, now)) {
        (Some(expires), Expiry::BeforeCreation) => {
            return Err(expiry::in_past("Branch", expires, created))
        }
        (Some(expires), Expiry::Due) => {
            if branch.spec.protected {
                return Err(Error::stalled(
                    "BranchProtected",
                    format!("the branch expired at {expires} but is protected; unprotect it to let it be deleted"),
                ));
            }
            tracing::info!(branch = %name, %expires, "branch expired, deleting it");
            expiry::publish_expired(ctx, branch, expires).await;
            with_deadline(
                ctx,
                "delete expired branch",
                branches.delete(&name, &Default::default()),
            )
            .await?;
            return Ok(Done {
                outcome: Outcome::progressing("Expired", format!("expired at {expires}; deleting")),
                phase: "Deleting",
                requeue: Action::await_change(),
            });
        }
        (_, Expiry::Later(until)) => requeue = requeue.min(until + Duration::from_secs(1)),
        _ => {}
    }

    // Parent.
    let parent = match &branch.spec.parent {
        None => None,
        Some(p) => match with_deadline(ctx, "read parent", branches.get_opt(&p.branch)).await? {
            Some(pb) => Some(pb),
            None => {
                return Err(Error::stalled(
                    "ParentNotFound",
                    format!("parent branch {:?} not found in namespace {ns}", p.branch),
                ))
            }
        },
    };

    // Credentials first: nothing that holds a password exists before its Secret.
    let creds = ensure_credentials(ctx, branch, parent.as_ref(), &uid).await?;

    // Timeline.
    let tl = match ensure_timeline(ctx, branch, parent.as_ref(), &creds, &uid, status).await? {
        Ok(tl) => tl,
        Err(done) => return Ok(done),
    };
    let moved = status.timeline_id.as_deref()
        != branch
            .status
            .as_ref()
            .and_then(|s| s.timeline_id.as_deref());
    let refresh = moved || ctx.stats_due(&uid, status.logical_size_bytes.is_some());
    record_timeline(status, &tl, refresh);
    if status.parent_branch.is_none() {
        // Set once; a restore of the parent moves it to the backup branch.
        status.parent_branch = branch.spec.parent.as_ref().map(|p| p.branch.clone());
    }
    match tl.state {
        State::Ready => {}
        State::Creating => {
            let what = tl
                .progress
                .as_ref()
                .map(|p| match p.percent {
                    Some(pc) => format!("{} ({pc}%)", p.step),
                    None => p.step.clone(),
                })
                .unwrap_or_else(|| "creating".into());
            return Ok(progressing(
                "CreatingTimeline",
                format!("storage is preparing timeline {}: {what}", tl.id),
                ctx.config.poll_interval,
            ));
        }
        State::Failed => {
            let why = tl.error.clone().unwrap_or_else(|| "no reason given".into());
            return Err(Error::stalled(
                timeline_failed_reason(&why),
                format!("storage could not create timeline {}: {why}", tl.id),
            ));
        }
        State::Deleting => {
            return Err(Error::stalled(
                "TimelineDeleting",
                format!("timeline {} is being deleted from storage", tl.id),
            ))
        }
    }

    // Compute.
    let compute = &branch.spec.compute;
    let running = compute.enabled && !compute.suspended;
    if running {
        if let Some(stalled) = volume::check_claim(ctx, &ns).await? {
            return Ok(stalled);
        }
    }
    let deploys: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let adopted = if compute.enabled {
        handover::compute_for_timeline(ctx, branch, &tl.id, &uid).await?
    } else {
        None
    };
    // A compute adopted from a restore runs as it was started until this
    // branch's compute spec changes; then it makes way for our own.
    let adopted = match adopted {
        Some(d) => match handover::adopted_outdated(&d, branch) {
            None => Some(handover::stamp_adopted(ctx, branch, &d).await?),
            Some(false) => Some(d),
            Some(true) => {
                handover::retire_adopted(ctx, branch, &d, &uid).await?;
                None
            }
        },
        None => None,
    };
    if let Some(d) = &adopted {
        handover::relabel_adopted_pods(ctx, branch, d).await?;
    }
    let current = if adopted.is_some() {
        adopted.clone()
    } else if compute.enabled {
        let target = ComputeTarget {
            timeline_id: tl.id.as_str(),
            data_path: &tl.data_path,
        };
        let desired = build_deployment(branch, &target, &ctx.config.compute)?;
        if running {
            if let Some(wait) = compute_start_gate(ctx, &desired, &tl.id).await? {
                return Ok(wait);
            }
        }
        Some(apply_owned(ctx, desired, &uid).await?)
    } else {
        None
    };
    let compute_ready = current.as_ref().is_some_and(deployment_ready);

    // The Service moves to a new timeline only once its compute is ready.
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let live_svc =
        with_deadline(ctx, "read service", services.get_opt(&service_name(&name))).await?;
    let selected = live_svc
        .as_ref()
        .filter(|s| holder(*s, &uid) == Holder::Owner)
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.selector.as_ref())
        .and_then(|s| s.get(LABEL_TIMELINE))
        .cloned();
    let svc_timeline = match selected {
        Some(old) if old != tl.id.as_str() && running && !compute_ready => old,
        _ => tl.id.to_string(),
    };
    apply_owned(
        ctx,
        handover::service_for(
            build_service(branch, &svc_timeline)?,
            adopted.as_ref(),
            &svc_timeline,
        ),
        &uid,
    )
    .await?;

    // Computes of other timelines (after a swap) go once the Service moved.
    if svc_timeline == tl.id.as_str() {
        let others = with_deadline(
            ctx,
            "list computes",
            deploys.list(&ListParams::default().labels(&format!("{LABEL_BRANCH}={name}"))),
        )
        .await?;
        for d in others.items {
            let tl_label = d.labels().get(LABEL_TIMELINE).cloned().unwrap_or_default();
            let keep = current.is_some() && tl_label == tl.id.as_str();
            if !keep && holder(&d, &uid) == Holder::Owner {
                delete_owned::<Deployment>(ctx, &ns, &d.name_any(), &uid).await?;
            }
        }
    }

    let (app_user, app_db) = (creds.app.user.clone(), creds.app.database.clone());
    status.service = Some(service_name(&name));
    status.secret_name = Some(app_secret_name(&name));
    status.connection = Some(ConnectionStatus {
        host: service_host(&name, &ns),
        port: PG_PORT,
        database: app_db.clone(),
        user: app_user.clone(),
    });

    let replaced = replaced_timelines(ctx, branch, status, &uid).await?;
    if !running {
        if replicas::reconcile(ctx, branch, &tl.id, &replaced, &uid, false)
            .await?
            .pending
        {
            requeue = requeue.min(ctx.config.poll_interval);
        }
        let (reason, phase) = if compute.enabled {
            ("Suspended", "Suspended")
        } else {
            ("ComputeDisabled", "Ready")
        };
        return Ok(Done {
            outcome: Outcome::ready(
                reason,
                "storage is ready; no compute runs (credentials and declared roles/databases are applied when it runs)",
            ),
            phase,
            requeue: Action::requeue(requeue),
        });
    }
    if !compute_ready || svc_timeline != tl.id.as_str() {
        replicas::reconcile(ctx, branch, &tl.id, &replaced, &uid, false).await?;
        if let Some(d) = current.as_ref().filter(|_| !compute_ready) {
            if let Some(p) = compute_problem(ctx, d).await? {
                let waited = p
                    .since
                    .map(|t| now.duration_since(t).unsigned_abs())
                    .unwrap_or_default();
                let deadline = ctx.config.compute_start_deadline;
                if waited >= deadline {
                    return Err(Error::stalled(
                        p.reason,
                        format!(
                            "the compute of timeline {} has not started in {}s: {}",
                            tl.id,
                            deadline.as_secs(),
                            p.message
                        ),
                    ));
                }
                return Ok(progressing(
                    p.reason,
                    format!(
                        "the compute of timeline {} is not starting: {}",
                        tl.id, p.message
                    ),
                    ctx.config.poll_interval,
                ));
            }
        }
        return Ok(progressing(
            "StartingCompute",
            format!("waiting for the compute of timeline {} to be ready", tl.id),
            ctx.config.poll_interval,
        ));
    }

    // SQL: own passwords, declared roles and databases; once per change.
    let marker = content_hash(&(
        tl.id.as_str(),
        branch.metadata.generation,
        &creds.superuser,
        &creds.app.user,
        &creds.app.password,
        creds
            .extra_roles
            .iter()
            .map(|r| (&r.user, &r.password))
            .collect::<Vec<_>>(),
    ));
    if creds.sql_marker.as_deref() != Some(marker.as_str()) {
        let (host, port) = ctx.resolver.resolve(&ns, &service_name(&name)).await?;
        let fallback = fallback_superuser_passwords(ctx, branch, parent.as_ref(), &tl).await?;
        let mut roles = vec![];
        if creds.app.user != "postgres" {
            roles.push((creds.app.user.clone(), creds.app.password.clone()));
        }
        roles.extend(
            creds
                .extra_roles
                .iter()
                .map(|r| (r.user.clone(), r.password.clone())),
        );
        let plan = sql::SqlPlan {
            host,
            port,
            superuser_password: creds.superuser.clone(),
            fallback_passwords: fallback,
            roles,
            databases: branch
                .spec
                .databases
                .iter()
                .map(|d| (d.name.clone(), d.owner.clone()))
                .collect(),
            // A child's own copy (not data a restore brought in): users of
            // the parent it did not declare lose the parent's passwords.
            reset_other_logins: branch.spec.parent.is_some()
                && branch.spec.credentials != Some(CredentialsPolicy::Inherit)
                && tl.key.as_str() == uid,
            manage_roles_of: Some(uid.clone()),
        };
        let timeout = ctx.config.step_timeout;
        let report = match tokio::time::timeout(timeout, sql::apply(&plan, timeout)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::Timeout {
                    step: "apply roles and databases",
                    secs: timeout.as_secs(),
                })
            }
        };
        tracing::info!(
            branch = %name,
            rotated_superuser = report.rotated_superuser,
            roles_created = ?report.roles_created,
            databases_created = ?report.databases_created,
            passwords_removed = ?report.passwords_removed,
            roles_dropped = ?report.roles_dropped,
            roles_retained = ?report.roles_retained.iter().map(|r| &r.0).collect::<Vec<_>>(),
            "applied credentials, roles and databases"
        );
        record_retained_roles(ctx, branch, status, &report.roles_retained, now).await;
        let annotations =
            std::collections::BTreeMap::from([(ANNOTATION_SQL_APPLIED.to_string(), marker)]);
        apply_owned(
            ctx,
            build_credentials_secret(
                branch,
                app_secret_name(&name),
                &creds.app,
                &ctx.config.compute,
                annotations,
            )?,
            &uid,
        )
        .await?;
    }

    let replicas = replicas::reconcile(ctx, branch, &tl.id, &replaced, &uid, true).await?;
    if !replicas.settled() {
        requeue = requeue.min(ctx.config.poll_interval);
    }
    Ok(Done {
        outcome: Outcome::ready(
            "Ready",
            format!(
                "branch is ready at {}:{PG_PORT} (timeline {}){}",
                service_host(&name, &ns),
                tl.id,
                replicas.note()
            ),
        ),
        phase: "Ready",
        requeue: Action::requeue(requeue),
    })
}

/// Timelines this branch served before a restore replaced them
/// (`status.history`) that no other Branch serves now: their read replicas
/// are this branch's to remove.
async fn replaced_timelines(
    ctx: &Context,
    branch: &Branch,
    status: &BranchStatus,
    uid: &str,
) -> Result<Vec<TimelineId>, Error> {
    let history: Vec<TimelineId> = status
        .history
        .iter()
        .filter_map(|h| TimelineId::new(h.timeline_id.clone()).ok())
        .collect();
    if history.is_empty() {
        return Ok(history);
    }
    let branches: Api<Branch> =
        Api::namespaced(ctx.client.clone(), &branch.namespace().unwrap_or_default());
    let all = with_deadline(ctx, "list branches", branches.list(&ListParams::default())).await?;
    Ok(history
        .into_iter()
        .filter(|t| !handover::claimed_elsewhere(&all.items, uid, t))
        .collect())
}

/// Superuser passwords the data of `tl` may still carry besides the
/// branch's own: those of the branch it was copied from — the parent, the
/// Branch whose timeline is the timeline's lineage parent (a restore from
/// another branch), or the Branch a source Snapshot was taken of.
async fn fallback_superuser_passwords(
    ctx: &Context,
    branch: &Branch,
    parent: Option<&Branch>,
    tl: &Timeline,
) -> Result<Vec<String>, Error> {
    let ns = branch.namespace().unwrap_or_default();
    let mut names: Vec<String> = parent.map(|p| p.name_any()).into_iter().collect();
    {
        let branches: Api<Branch> = Api::namespaced(ctx.client.clone(), &ns);
        let all =
            with_deadline(ctx, "list branches", branches.list(&ListParams::default())).await?;
        if let Some(ptl) = &tl.lineage.parent {
            names.extend(
                all.items
                    .iter()
                    .filter(|b| {
                        b.status.as_ref().and_then(|s| s.timeline_id.as_deref())
                            == Some(ptl.as_str())
                    })
                    .map(|b| b.name_any()),
            );
        }
        // The branch that served this very timeline before a restore
        // replaced it (its passwords are in this data).
        names.extend(
            all.items
                .iter()
                .filter(|b| {
                    b.status
                        .as_ref()
                        .is_some_and(|s| s.history.iter().any(|h| h.timeline_id == tl.id.as_str()))
                })
                .map(|b| b.name_any()),
        );
        if let Some(snap) = &tl.lineage.snapshot {
            let snapshots: Api<crate::api::Snapshot> = Api::namespaced(ctx.client.clone(), &ns);
            // The Snapshot kind may not be installed: then there is nothing to find.
            if let Ok(list) = with_deadline(
                ctx,
                "list snapshots",
                snapshots.list(&ListParams::default()),
            )
            .await
            {
                names.extend(
                    list.items
                        .iter()
                        .filter(|s| {
                            s.status.as_ref().and_then(|st| st.snapshot_id.as_deref())
                                == Some(snap.as_str())
                        })
                        .map(|s| s.spec.branch.clone()),
                );
            }
        }
    }
    names.retain(|n| *n != branch.name_any());
    names.dedup();
    let mut out = vec![];
    for n in names {
        if let Some(pw) = secret_password(ctx, &ns, &superuser_secret_name(&n)).await? {
            if !out.contains(&pw) {
                out.push(pw);
            }
        }
    }
    Ok(out)
}

async fn reconcile_cleanup(branch: Arc<Branch>, ctx: &Context) -> Result<Action, Error> {
    let mut status = branch.status.clone().unwrap_or_default();
    let result = cleanup_steps(&branch, ctx, &mut status).await;
    let finished = matches!(result, Ok(None));
    let result = result.map(|o| {
        o.unwrap_or(Done {
            outcome: Outcome::progressing("Deleting", "compute and timeline removed"),
            phase: "Deleting",
            requeue: Action::await_change(),
        })
    });
    let stalled = matches!(result, Err(Error::Stalled { .. }));
    let waiting = matches!(result, Err(Error::Waiting(_)));
    let stalled_err = match &result {
        Err(Error::Stalled { reason, message }) => Some(Error::stalled(reason, message.clone())),
        Err(Error::Waiting(w)) => Some(Error::Waiting(w.clone())),
        _ => None,
    };
    if finished {
        // Everything is gone: the finalizer is removed next; no status write
        // (the object is about to disappear).
        return Ok(Action::await_change());
    }
    let action = finish(ctx, &branch, status, result).await?;
    // The finalizer must stay while deletion is refused or under way.
    if stalled || waiting {
        return Err(stalled_err.unwrap_or_else(|| Error::Waiting("deleting".into())));
    }
    Ok(action)
}

/// Deletion. `Ok(None)`: everything is gone, the finalizer may go.
async fn cleanup_steps(
    branch: &Branch,
    ctx: &Context,
    status: &mut BranchStatus,
) -> Result<Option<Done>, Error> {
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let uid = branch.uid().unwrap_or_default();
    if branch.spec.protected {
        return Err(Error::stalled(
            "BranchProtected",
            "the branch is protected: set spec.protected to false to delete it",
        ));
    }
    let branches: Api<Branch> = Api::namespaced(ctx.client.clone(), &ns);
    let all = with_deadline(ctx, "list branches", branches.list(&ListParams::default())).await?;
    let mut children: Vec<String> = all
        .items
        .iter()
        .filter(|b| effective_parent(b).as_deref() == Some(name.as_str()))
        .map(|b| b.name_any())
        .collect();
    children.sort();
    if !children.is_empty() {
        return Err(Error::stalled(
            "HasChildren",
            format!(
                "the branch has child branches ({}); delete them first",
                children.join(", ")
            ),
        ));
    }

    // Compute first: storage refuses to delete a timeline that still runs.
    let deploys: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let list = with_deadline(
        ctx,
        "list computes",
        deploys.list(&ListParams::default().labels(&format!("{LABEL_BRANCH}={name}"))),
    )
    .await?;
    let mut remaining = 0;
    for d in list
        .items
        .iter()
        .filter(|d| holder(*d, &uid) == Holder::Owner)
    {
        if !delete_owned::<Deployment>(ctx, &ns, &d.name_any(), &uid).await? {
            remaining += 1;
        }
    }
    if remaining > 0 {
        status.phase = Some("Deleting".into());
        return Ok(Some(Done {
            outcome: Outcome::progressing("Deleting", "stopping the compute"),
            phase: "Deleting",
            requeue: Action::requeue(ctx.config.poll_interval),
        }));
    }

    // The timeline: the one in status; if status was lost, the one created
    // with this Branch's UID as key unless another Branch now uses it
    // (a restore may have handed it to a backup branch).
    let mut timelines = vec![];
    if let Some(id) = &status.timeline_id {
        if let Ok(id) = TimelineId::new(id.clone()) {
            timelines.push(id);
        }
    } else {
        let used: Vec<String> = all
            .items
            .iter()
            .filter(|b| b.uid().as_deref() != Some(uid.as_str()))
            .filter_map(|b| b.status.as_ref().and_then(|s| s.timeline_id.clone()))
            .collect();
        let stored = with_deadline(ctx, "list timelines", ctx.storage.list_timelines()).await?;
        timelines.extend(
            stored
                .into_iter()
                .filter(|t| t.key.as_str() == uid && !used.contains(&t.id.to_string()))
                .map(|t| t.id),
        );
    }
    for id in timelines {
        if handover::claimed_elsewhere(&all.items, &uid, &id) {
            tracing::info!(branch = %name, timeline = %id, "timeline now belongs to another branch; keeping it");
            continue;
        }
        tracing::info!(branch = %name, timeline = %id, "deleting timeline");
        match with_deadline(ctx, "delete timeline", ctx.storage.delete_timeline(&id)).await {
            Ok(()) => {}
            Err(Error::Storage(StorageError::Busy { message })) => {
                return Err(Error::Waiting(format!(
                    "timeline {id} is still in use: {message}"
                )))
            }
            Err(e) => return Err(e),
        }
    }

    delete_owned::<Service>(ctx, &ns, &service_name(&name), &uid).await?;
    delete_owned::<Service>(ctx, &ns, &ro_service_name(&name), &uid).await?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let owned = with_deadline(
        ctx,
        "list secrets",
        secrets.list(&ListParams::default().labels(&format!("{LABEL_BRANCH}={name}"))),
    )
    .await?;
    for s in owned.items {
        delete_owned::<Secret>(ctx, &ns, &s.name_any(), &uid).await?;
    }
    tracing::info!(branch = %name, "branch deleted");
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Lineage, Lsn};

    fn timeline(size: u64, lsn: u64) -> Timeline {
        Timeline {
            id: TimelineId::new("abcdef0123456789").unwrap(),
            key: OpKey::new("k").unwrap(),
            label: None,
            state: State::Ready,
            error: None,
            progress: None,
            lineage: Lineage {
                parent: None,
                snapshot: None,
                point: None,
                parent_lsn: Some(Lsn(0x1_0000_0010)),
                schema_only: false,
            },
            created_at: jiff::Timestamp::from_second(1_700_000_000).unwrap(),
            data_path: "timelines/abcdef0123456789/pgdata".into(),
            wal_archive_path: "wal/abcdef0123456789".into(),
            pg_major: 15,
            lsn: Some(Lsn(lsn)),
            logical_size_bytes: size,
            exclusive_bytes: None,
            restore_window: None,
        }
    }

    #[test]
    fn a_source_that_cannot_archive_has_its_own_reason() {
        let e = format!(
            "unavailable: {}: the copy waited 60 s ...",
            crate::storage::ARCHIVING_FAILED
        );
        assert_eq!(timeline_failed_reason(&e), "SourceArchivingFailed");
        assert_eq!(timeline_failed_reason("disk full"), "TimelineFailed");
    }

    #[test]
    fn related_branches_are_parent_and_children() {
        use crate::api::{BranchSpec, ParentRef};
        let mk = |name: &str, ns: &str, parent: Option<&str>| {
            let mut b = Branch::new(
                name,
                BranchSpec {
                    parent: parent.map(|p| ParentRef {
                        branch: p.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            );
            b.metadata.namespace = Some(ns.into());
            Arc::new(b)
        };
        let known = vec![
            mk("main", "a", None),
            mk("dev", "a", Some("main")),
            mk("dev2", "a", Some("main")),
            mk("other", "b", Some("main")),
            mk("grandchild", "a", Some("dev")),
        ];
        let mut names: Vec<String> = related_branches(&known[0], &known)
            .iter()
            .map(|r| r.name.clone())
            .collect();
        names.sort();
        assert_eq!(names, vec!["dev", "dev2"]);
        let names: Vec<String> = related_branches(&known[1], &known)
            .iter()
            .map(|r| r.name.clone())
            .collect();
        assert_eq!(names, vec!["main", "grandchild"]);
    }

    #[test]
    fn a_restore_moves_the_effective_parent() {
        use crate::api::{BranchSpec, ParentRef};
        let mut b = Branch::new(
            "dev",
            BranchSpec {
                parent: Some(ParentRef {
                    branch: "prod".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        assert_eq!(effective_parent(&b).as_deref(), Some("prod"));
        b.status = Some(BranchStatus {
            parent_branch: Some("prod-old-20240101000000".into()),
            ..Default::default()
        });
        assert_eq!(
            effective_parent(&b).as_deref(),
            Some("prod-old-20240101000000")
        );
        assert_eq!(
            effective_parent(&Branch::new("root", BranchSpec::default())),
            None
        );
    }

    #[test]
    fn status_records_timeline_and_refreshes_stats_only_when_due() {
        let mut st = BranchStatus::default();
        record_timeline(&mut st, &timeline(1_000_000, 100), false);
        assert_eq!(st.timeline_id.as_deref(), Some("abcdef0123456789"));
        assert_eq!(st.parent_lsn.as_deref(), Some("1/10"));
        assert_eq!(st.pg_major, Some(15));
        assert_eq!(st.logical_size_bytes, Some(1_000_000), "first time: taken");
        assert_eq!(st.lsn.as_deref(), Some("0/64"));
        record_timeline(&mut st, &timeline(2_000_000, 200), false);
        assert_eq!(st.logical_size_bytes, Some(1_000_000), "not due: kept");
        assert_eq!(st.lsn.as_deref(), Some("0/64"));
        record_timeline(&mut st, &timeline(2_000_000, 200), true);
        assert_eq!(st.logical_size_bytes, Some(2_000_000));
        assert_eq!(st.lsn.as_deref(), Some("0/C8"));
    }
}
