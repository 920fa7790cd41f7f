//! The Branch controller.
//!
//! Apply: validate → parent → the server certificate (compute TLS,
//! [`super::tls`]) → credentials Secrets (before any data exists,
//! so a password is never lost) → timeline (idempotent by the Branch UID,
//! polled until Ready, never waited on) → compute Deployment and Service →
//! once the compute is ready, credentials and declarative roles/databases
//! over SQL → a renewed certificate served (reloaded, no restart) → read
//! replicas and the `-ro` Service ([`replicas`]) → Ready.
//! Once the timeline is Ready, `spec.backup` archives it to its
//! destination ([`backup`]: `BackupHealthy`, `status.backup`) whatever the
//! compute does
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

mod backup;
mod cleanup;
mod compute;
mod credentials;
mod database;
pub mod endpoints;
pub mod handover;
pub mod refresh;
pub mod replicas;
mod timeline;
pub mod validate;
mod volume;

use super::{secrets, sql};
use cleanup::reconcile_cleanup;
use compute::{blocking_pod, deployment_ready};
use credentials::{fallback_superuser_passwords, Credentials};

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::Event as FinalizerEvent;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use super::apply::{apply_owned, delete_owned, holder, Holder};
use super::expiry::{self, Expiry};
use super::status::{conclude, Outcome};
use super::{with_deadline, Context, Drive, Error, Shutdown};
use crate::api::{
    Branch, BranchPhase, BranchStatus, ConnectionStatus, CredentialsPolicy, InitSource,
    ANNOTATION_ADOPT_TIMELINE, ANNOTATION_SQL_APPLIED, LABEL_BRANCH, LABEL_TIMELINE,
};
use crate::compute::{
    app_secret_name, build_credentials_secret, build_deployment, build_service, content_hash,
    ro_service_name, role_secret_name, secret_suffix, secret_value, service_host, service_name,
    superuser_secret_name, tls_secret_name, ComputeTarget, RoleCredentials, PG_PORT,
};
use crate::storage::{
    CreateTimeline, OpKey, Password, Source, State, StorageError, Timeline, TimelineId,
};
use validate::{app_identity, generate_password, parse_point};

/// The finalizer the Branch controller puts on every Branch.
pub const FINALIZER: &str = "pgbranch.dev/branch-cleanup";
const KIND: &str = "Branch";

/// The Branch controller on the operator's shared watch of Branches
/// (`branches`), as a future that runs it until `shutdown` resolves.
pub fn run(
    ctx: Arc<Context>,
    shutdown: impl Shutdown,
    branches: &super::Shared<Branch>,
) -> impl std::future::Future<Output = ()> {
    let controller = super::controller_for_shared(branches, &ctx.config);
    let store = branches.store.clone();
    // The owned kinds are watched once, into the operator's caches
    // ([`super::cache`]), which then serve the reads of every controller.
    let mut controller = controller;
    if let Some(s) = ctx.cache.watch(ctx.watched::<Deployment>()) {
        controller = controller.owns_stream(s);
    }
    if let Some(s) = ctx.cache.watch(ctx.watched::<Service>()) {
        controller = controller.owns_stream(s);
    }
    if let Some(s) = ctx.cache.watch(ctx.watched::<Secret>()) {
        controller = controller.owns_stream(s);
    }
    // Compute Pods (a Pod that cannot start makes the Branch Stalled) and
    // the EndpointSlices of a branch's Services (a switch waits for them,
    // see [`endpoints`]) carry the branch's label.
    if let Some(s) = ctx.cache.watch(ctx.watched::<Pod>()) {
        controller = controller.watches_stream(s, |p: Pod| branch_of(&p));
    }
    let controller = controller.watches(
        ctx.watched::<EndpointSlice>(),
        kube::runtime::watcher::Config::default().labels(LABEL_BRANCH),
        |e: EndpointSlice| branch_of(&e),
    );
    // A branch's changes wake its parent (which may wait for its children
    // to go) and its children (which may wait for it to be Ready, or for it
    // to exist). A watch of its own: the shared one does not pass deletions
    // on, and a parent being deleted waits for exactly those.
    let controller = controller.watches(
        ctx.watched::<Branch>(),
        kube::runtime::watcher::Config::default(),
        move |b: Branch| related_branches(&b, &store.state()),
    );
    let how = Drive::of(KIND, "branch");
    super::drive(controller, ctx, shutdown, how, reconcile)
}

/// The Branch an object is labelled with.
fn branch_of<K: kube::Resource>(o: &K) -> Option<ObjectRef<Branch>> {
    let ns = o.meta().namespace.clone()?;
    let b = o.meta().labels.as_ref()?.get(LABEL_BRANCH)?;
    Some(ObjectRef::new(b).within(&ns))
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
    super::with_finalizer(&ctx, FINALIZER, branch, |ev| async {
        match ev {
            FinalizerEvent::Apply(b) => reconcile_apply(b, &ctx).await,
            FinalizerEvent::Cleanup(b) => reconcile_cleanup(b, &ctx).await,
        }
    })
    .await
}

/// The end of one pass: what to report and when to look again.
struct Done {
    outcome: Outcome,
    phase: BranchPhase,
    requeue: Action,
}

fn progressing(reason: &str, message: impl Into<String>, after: Duration) -> Done {
    Done {
        outcome: Outcome::progressing(reason, message),
        phase: BranchPhase::Creating,
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
            tracing::warn!(%reason, %message, "stalled");
            (
                Done {
                    outcome: Outcome::Stalled { reason, message },
                    phase: BranchPhase::Failed,
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
                phase: match status.phase {
                    Some(BranchPhase::Deleting) => BranchPhase::Deleting,
                    _ => BranchPhase::Creating,
                },
                requeue: Action::await_change(),
            },
            Some(e),
        ),
    };
    status.phase = Some(done.phase);
    conclude(
        ctx,
        branch,
        branch.status.as_ref(),
        &mut status,
        &done.outcome,
    )
    .await?;
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

/// A stage of the pipeline: go on with what it found, or end this pass.
enum Step<T> {
    Next(T),
    Stop(Done),
}

/// One pass over a Branch that is not being deleted: validate → expiry →
/// parent → credentials → timeline → compute → database → replicas →
/// Ready. Each stage observes what it needs, decides with a pure function
/// and applies; a stage that has to wait ends the pass with its outcome.
async fn apply_steps(
    branch: &Branch,
    ctx: &Context,
    status: &mut BranchStatus,
) -> Result<Done, Error> {
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let uid = super::uid_of(branch)?;
    let now = jiff::Timestamp::now();

    validate::validate_spec(branch).map_err(|i| Error::stalled(i.reason, i.message))?;
    if let Some(to) = handover::handed_over(branch) {
        return Ok(Done {
            outcome: Outcome::ready(
                "HandedOver",
                format!("a restore is handing this branch's timeline and compute to branch {to}"),
            ),
            phase: BranchPhase::Ready,
            requeue: Action::await_change(),
        });
    }
    let mut requeue = match expire(ctx, branch, now).await? {
        Step::Next(r) => r,
        Step::Stop(done) => return Ok(done),
    };
    let parent = read_parent(ctx, branch).await?;

    // The server certificate (compute TLS): before the Secrets that carry
    // the CA and before any compute that mounts it.
    let tls = super::tls::ensure_branch_cert(ctx, branch, &uid, now).await?;
    if let Some(t) = &tls {
        requeue = requeue.min(until(now, t.renew_at));
    }
    // Credentials first: nothing that holds a password exists before its Secret.
    let creds = credentials::ensure_credentials(
        ctx,
        branch,
        parent.as_ref(),
        &uid,
        tls.as_ref().map(|t| t.ca.cert_pem.as_str()),
    )
    .await?;

    let tl = match timeline::ensure_timeline(ctx, branch, parent.as_ref(), &creds, &uid, status)
        .await?
    {
        Step::Next(tl) => tl,
        Step::Stop(done) => return Ok(done),
    };
    let moved = status.timeline_id.as_deref()
        != branch
            .status
            .as_ref()
            .and_then(|s| s.timeline_id.as_deref());
    let refresh = moved || ctx.stats_due(&uid, status.logical_size_bytes.is_some());
    timeline::record_timeline(status, &tl, refresh);
    if status.parent_branch.is_none() {
        // Set once; a restore of the parent moves it to the backup branch.
        status.parent_branch = branch.spec.parent.as_ref().map(|p| p.branch.clone());
    }
    if let Some(step) = timeline::not_ready(&tl, ctx.config.poll_interval)? {
        return Ok(step);
    }
    // Archiving does not wait for the compute, and never stops the branch.
    if let Some(again) = backup::reconcile_backup(ctx, branch, &tl.id, &uid, status, now).await? {
        requeue = requeue.min(again);
    }

    let serving = match compute::reconcile_compute(ctx, branch, &tl, &uid).await? {
        Step::Next(s) => s,
        Step::Stop(done) => return Ok(done),
    };
    status.service = branch.spec.compute.enabled.then(|| service_name(&name));
    status.secret_name = Some(app_secret_name(&name));
    status.connection = Some(ConnectionStatus {
        host: service_host(&name, &ns),
        port: PG_PORT,
        database: creds.app.database.clone(),
        user: creds.app.user.clone(),
    });

    let replaced = replaced_timelines(ctx, branch, status, &uid).await?;
    let compute = &branch.spec.compute;
    if !compute.enabled || compute.suspended {
        if replicas::reconcile(ctx, branch, &tl.id, &replaced, &uid, false)
            .await?
            .pending
        {
            requeue = requeue.min(ctx.config.poll_interval);
        }
        let (reason, phase) = if compute.enabled {
            ("Suspended", BranchPhase::Suspended)
        } else {
            ("ComputeDisabled", BranchPhase::Ready)
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
    if !serving.serves(&tl.id) {
        replicas::reconcile(ctx, branch, &tl.id, &replaced, &uid, false).await?;
        return compute::not_serving(ctx, &serving, &tl.id, now).await;
    }

    database::apply_database(ctx, branch, parent.as_ref(), &creds, &tl, &uid, status, now).await?;
    // A compute handed over by a restore mounts the restored branch's
    // certificate (which covers this branch's names too): it serves that
    // one until this branch's compute spec changes.
    let mounts_own = serving
        .current
        .as_ref()
        .is_some_and(|d| compute::mounts_secret(d, &tls_secret_name(&name)));
    if let Some(t) = tls.as_ref().filter(|_| mounts_own) {
        let svc = service_name(&name);
        if let Some(again) =
            super::tls::ensure_served(ctx, branch, &svc, &uid, t, &creds.superuser).await?
        {
            requeue = requeue.min(again);
        }
    }

    let replicas = replicas::reconcile(ctx, branch, &tl.id, &replaced, &uid, true).await?;
    if !replicas.settled() {
        requeue = requeue.min(ctx.config.poll_interval);
    } else if let Some(t) = tls.as_ref().filter(|_| compute.read_replicas > 0) {
        // The replicas behind `-ro` (one per pass, as the Service picks);
        // a replica not reachable yet does not make the branch unready.
        let ro = ro_service_name(&name);
        match super::tls::ensure_served(ctx, branch, &ro, &uid, t, &creds.superuser).await {
            Ok(None) => {}
            Ok(Some(again)) => requeue = requeue.min(again),
            Err(e) => {
                tracing::debug!(error = %e, "the read replicas' certificate is checked again shortly");
                requeue = requeue.min(ctx.config.poll_interval);
            }
        }
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
        phase: BranchPhase::Ready,
        requeue: Action::requeue(requeue),
    })
}

/// How long from `now` until `at` (at least a second, so a due renewal is
/// looked at again at once but not in a busy loop).
fn until(now: jiff::Timestamp, at: jiff::Timestamp) -> Duration {
    let ms = at.as_millisecond() - now.as_millisecond();
    Duration::from_millis(ms.max(1000) as u64)
}

/// `spec.expiresAt`: refused when already past at creation, the branch
/// deleted (with an Event) when due; otherwise when to look again.
async fn expire(
    ctx: &Context,
    branch: &Branch,
    now: jiff::Timestamp,
) -> Result<Step<Duration>, Error> {
    let name = branch.name_any();
    let mut requeue = ctx.config.ready_requeue;
    let expires =
        validate::parse_expires(branch).map_err(|i| Error::stalled(i.reason, i.message))?;
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
            tracing::info!(%expires, "branch expired, deleting it");
            expiry::publish_expired(ctx, branch, expires).await;
            let branches: Api<Branch> = ctx.api(&branch.namespace().unwrap_or_default());
            with_deadline(
                ctx,
                "delete expired branch",
                branches.delete(&name, &Default::default()),
            )
            .await?;
            return Ok(Step::Stop(Done {
                outcome: Outcome::progressing("Expired", format!("expired at {expires}; deleting")),
                phase: BranchPhase::Deleting,
                requeue: Action::await_change(),
            }));
        }
        (_, Expiry::Later(until)) => requeue = requeue.min(until + Duration::from_secs(1)),
        _ => {}
    }
    Ok(Step::Next(requeue))
}

/// The parent Branch named by `spec.parent` (Stalled `ParentNotFound`
/// when it does not exist).
async fn read_parent(ctx: &Context, branch: &Branch) -> Result<Option<Branch>, Error> {
    let Some(p) = &branch.spec.parent else {
        return Ok(None);
    };
    let ns = branch.namespace().unwrap_or_default();
    match ctx.get::<Branch>(&ns, "read parent", &p.branch).await? {
        Some(pb) => Ok(Some(pb)),
        None => Err(Error::stalled(
            "ParentNotFound",
            format!("parent branch {:?} not found in namespace {ns}", p.branch),
        )),
    }
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
    let all = ctx
        .list::<Branch>(&branch.namespace().unwrap_or_default(), "list branches", "")
        .await?;
    Ok(history
        .into_iter()
        .filter(|t| !handover::claimed_elsewhere(&all, uid, t))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_is_looked_at_when_due_and_never_in_a_busy_loop() {
        let now: jiff::Timestamp = "2026-12-07T12:00:00Z".parse().unwrap();
        let later = now + jiff::SignedDuration::from_secs(20);
        assert_eq!(until(now, later), Duration::from_secs(20));
        assert_eq!(until(later, now), Duration::from_secs(1));
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
}
