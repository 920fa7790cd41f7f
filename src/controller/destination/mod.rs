//! The BackupDestination controller.
//!
//! Each pass reads the credentials Secret, then probes the bucket with a
//! real write, read-back and delete of an object under the destination's
//! prefix ([`crate::backup::probe`]). Ready only when all three succeed;
//! otherwise Stalled with the classified reason (`BucketNotFound`,
//! `AccessDenied`, `EndpointUnreachable`, `TLSError`, ...) and a message
//! that names the endpoint, bucket and prefix but never a credential.
//!
//! A destination is probed again every [`Config::ready_requeue`] while
//! Ready, every [`RETRY_STALLED`] while not (an outage ends, a bucket is
//! created), and at once when its spec or its Secret changes (Secrets are
//! watched by metadata only, so their data never sits in the operator's
//! cache).
//!
//! [`Config::ready_requeue`]: super::Config::ready_requeue

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Resource, ResourceExt};

use super::status::{apply_outcome, write_status, Outcome};
use super::{Context, Error};
use crate::api::destination::reasons;
use crate::api::{BackupDestination, BackupDestinationStatus};
use crate::backup::{probe, BackupError, Failure};

const KIND: &str = "BackupDestination";

/// How often a destination that is not Ready is probed again.
pub const RETRY_STALLED: Duration = Duration::from_secs(30);

/// Runs the BackupDestination controller until `shutdown` resolves. A
/// change of a Secret (its metadata is watched, never its data) wakes the
/// destinations that name it.
pub async fn run(ctx: Arc<Context>, shutdown: impl super::runner::Shutdown) {
    let secrets: Api<PartialObjectMeta<Secret>> = ctx.watched();
    let controller = super::controller_for(ctx.watched::<BackupDestination>(), &ctx.config);
    let lookup = controller.store();
    let secret_changes = watcher(secrets, watcher::Config::default()).touched_objects();
    let controller = controller.watches_stream(secret_changes, move |s| {
        let ns = s.namespace();
        let name = s.name_any();
        lookup
            .state()
            .into_iter()
            .filter(|d| d.namespace() == ns && d.spec.credentials.secret_name == name)
            .map(|d| ObjectRef::from_obj(d.as_ref()))
            .collect::<Vec<_>>()
    });
    let how = super::runner::Drive::of(KIND, "destination");
    super::drive(controller, ctx, shutdown, how, reconcile).await;
}

async fn reconcile(dest: Arc<BackupDestination>, ctx: Arc<Context>) -> Result<Action, Error> {
    if dest.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    reconcile_apply(&dest, &ctx).await
}

async fn reconcile_apply(dest: &BackupDestination, ctx: &Context) -> Result<Action, Error> {
    let now = ctx.clock.now();
    let old = dest.status.clone();
    let mut status = old.clone().unwrap_or_default();
    status.observed_generation = dest.meta().generation;
    status.last_probe_time = Some(crate::controller::scheduling::rfc3339(now));
    let (outcome, next) = match super::object_store::for_destination(ctx, dest).await? {
        Err((reason, message)) => {
            status.endpoint = dest.spec.effective_endpoint();
            (Outcome::stalled(reason, message), RETRY_STALLED)
        }
        Ok(store) => {
            status.endpoint = Some(store.endpoint.clone());
            let probed = tokio::time::timeout(probe::REQUEST_TIMEOUT * 4, probe::probe(&store))
                .await
                .unwrap_or_else(|_| {
                    Err(BackupError::new(
                        Failure::EndpointUnreachable,
                        format!("the probe of {} did not finish in time", store.describe()),
                    ))
                });
            match probed {
                Ok(report) => {
                    status.last_success_time = status.last_probe_time.clone();
                    (
                        Outcome::ready(
                            reasons::PROBE_SUCCEEDED,
                            format!(
                                "wrote, read back and deleted {} in {} at {} ({} ms)",
                                report.key,
                                store.bucket,
                                store.endpoint,
                                report.elapsed.as_millis()
                            ),
                        ),
                        ctx.config.ready_requeue,
                    )
                }
                Err(e) => {
                    tracing::info!(destination = %dest.name_any(), reason = e.failure.reason(), message = %e.message, "destination probe failed");
                    (
                        Outcome::stalled(e.failure.reason(), e.message),
                        RETRY_STALLED,
                    )
                }
            }
        }
    };
    apply_outcome(
        &mut status.conditions,
        &outcome,
        dest.meta().generation,
        now,
    );
    // The probe times change on every pass; write them only with a change
    // of anything else, or every few minutes, not on every probe.
    let mut comparable = status.clone();
    if let Some(o) = &old {
        let unchanged_but_times = BackupDestinationStatus {
            last_probe_time: o.last_probe_time.clone(),
            last_success_time: o.last_success_time.clone(),
            ..status.clone()
        } == *o;
        let fresh = o
            .last_probe_time
            .as_deref()
            .and_then(crate::point::read_time)
            .is_some_and(|t| now.duration_since(t).as_secs() < 240);
        if unchanged_but_times && fresh {
            comparable = o.clone();
        }
    }
    write_status(ctx, dest, old.as_ref(), &comparable, &outcome).await?;
    Ok(Action::requeue(next))
}
