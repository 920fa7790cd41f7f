//! The branch's compute: the Deployment serving its timeline (its own,
//! or one a restore handed over), started or changed only when no other
//! postgres holds the data directory; the Service `<branch>`, moved to a
//! new timeline only once that timeline's compute is ready; computes of
//! replaced timelines removed; and, while the compute does not come up,
//! why (from its Pods).

use super::*;

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
pub(super) async fn compute_start_gate(
    ctx: &Context,
    desired: &Deployment,
    tl: &TimelineId,
) -> Result<Option<Done>, Error> {
    let ns = desired.namespace().unwrap_or_default();
    let own = desired.name_any();
    let live = ctx.get::<Deployment>(&ns, "read compute", &own).await?;
    if live
        .as_ref()
        .is_some_and(|l| !crate::controller::apply::needs_apply(desired, l))
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
    // Live, not from the watch cache: this guards one postgres per data
    // directory, and a cache may lag (or be stale while its watch
    // reconnects).
    let list = ctx
        .list_live::<k8s_openapi::api::core::v1::Pod>(ns, "list compute pods", selector)
        .await?;
    let prefix = format!("{own}-");
    Ok(list.iter().find_map(|p| {
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
pub(super) async fn compute_problem(
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
    let list = ctx
        .list::<k8s_openapi::api::core::v1::Pod>(
            &d.namespace().unwrap_or_default(),
            "list compute pods",
            &selector,
        )
        .await?;
    Ok(crate::compute::health::pod_problem(&list))
}

pub(super) fn deployment_ready(d: &Deployment) -> bool {
    let gen = d.metadata.generation.unwrap_or(0);
    d.status.as_ref().is_some_and(|s| {
        s.ready_replicas.unwrap_or(0) >= 1 && s.observed_generation.unwrap_or(0) >= gen
    })
}

/// Whether the pods of `d` mount the Secret `secret`.
pub(super) fn mounts_secret(d: &Deployment, secret: &str) -> bool {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.volumes.as_ref())
        .is_some_and(|v| {
            v.iter()
                .any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(secret))
        })
}

/// What the compute stage left running.
pub(super) struct Serving {
    /// The Deployment serving the branch's timeline (its own or one handed
    /// over by a restore), when the compute is enabled.
    pub current: Option<Deployment>,
    /// The timeline the branch's Service selects.
    pub service_timeline: String,
}

impl Serving {
    /// Whether the branch's timeline is served: its compute is ready and
    /// the Service selects it.
    pub fn serves(&self, tl: &TimelineId) -> bool {
        self.current.as_ref().is_some_and(deployment_ready) && self.service_timeline == tl.as_str()
    }
}

/// The timeline the branch's Service should select: it moves to the
/// branch's timeline only once that timeline's compute is ready (a timeline
/// swap keeps the old one served until then), or at once when no compute
/// runs or none was selected.
pub(super) fn service_timeline(
    selected: Option<&str>,
    timeline: &str,
    running: bool,
    compute_ready: bool,
) -> String {
    match selected {
        Some(old) if old != timeline && running && !compute_ready => old.to_string(),
        _ => timeline.to_string(),
    }
}

/// The compute stage: the volume claim, the Deployment serving the
/// timeline (adopted, or ours, started or changed only through
/// [`compute_start_gate`]), the Service, and the computes of replaced
/// timelines once the Service moved.
pub(super) async fn reconcile_compute(
    ctx: &Context,
    branch: &Branch,
    tl: &Timeline,
    uid: &str,
) -> Result<Step<Serving>, Error> {
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    let uid = uid.to_string();
    let compute = &branch.spec.compute;
    let running = compute.enabled && !compute.suspended;
    if running {
        if let Some(stalled) = volume::check_claim(ctx, &ns).await? {
            return Ok(Step::Stop(stalled));
        }
    }
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
                return Ok(Step::Stop(wait));
            }
        }
        Some(apply_owned(ctx, desired, &uid).await?)
    } else {
        None
    };
    let compute_ready = current.as_ref().is_some_and(deployment_ready);

    // The Service moves to a new timeline only once its compute is ready.
    // A branch without compute (`enabled: false`) has none: its connection
    // string names the Service, which is made when compute is enabled, and
    // a Service per storage-only branch would cost the control plane a
    // ClusterIP, Endpoints and an EndpointSlice for nothing.
    let live_svc = if compute.enabled {
        ctx.get::<Service>(&ns, "read service", &service_name(&name))
            .await?
    } else {
        delete_owned::<Service>(ctx, &ns, &service_name(&name), &uid).await?;
        None
    };
    let selected = live_svc
        .as_ref()
        .filter(|s| holder(*s, &uid) == Holder::Owner)
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.selector.as_ref())
        .and_then(|s| s.get(LABEL_TIMELINE))
        .cloned();
    let svc_timeline =
        service_timeline(selected.as_deref(), tl.id.as_str(), running, compute_ready);
    if compute.enabled {
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
    }

    // Computes of other timelines (after a swap) go once the Service moved
    // and its clients followed: its EndpointSlices list the current
    // compute alone and kube-proxy had time to apply them.
    if svc_timeline == tl.id.as_str() {
        let others = ctx
            .list::<Deployment>(&ns, "list computes", &format!("{LABEL_BRANCH}={name}"))
            .await?;
        let stale: Vec<Deployment> = others
            .into_iter()
            .filter(|d| {
                let tl_label = d.labels().get(LABEL_TIMELINE).cloned().unwrap_or_default();
                let keep = current.is_some() && tl_label == tl.id.as_str();
                !keep && holder(d, &uid) == Holder::Owner
            })
            .collect();
        let stopping = stale
            .iter()
            .all(|d| d.metadata.deletion_timestamp.is_some());
        if let (Some(cur), false) = (current.as_ref().filter(|_| running), stopping) {
            if let Some(wait) = endpoints_wait(ctx, branch, cur, &tl.id, &uid).await? {
                return Ok(Step::Stop(wait));
            }
        }
        ctx.switch_waits.done(&uid);
        for d in stale {
            delete_owned::<Deployment>(ctx, &ns, &d.name_any(), &uid).await?;
        }
    }

    Ok(Step::Next(Serving {
        current,
        service_timeline: svc_timeline,
    }))
}

/// Before the computes of replaced timelines stop: wait (at most
/// [`endpoints::SWITCH_TIMEOUT`]) until the Service's EndpointSlices list
/// the current compute alone, then give kube-proxy its sync period.
async fn endpoints_wait(
    ctx: &Context,
    branch: &Branch,
    current: &Deployment,
    tl: &TimelineId,
    uid: &str,
) -> Result<Option<Done>, Error> {
    let ns = branch.namespace().unwrap_or_default();
    let name = branch.name_any();
    match endpoints::switched(ctx, &ns, &service_name(&name), current).await? {
        endpoints::Switch::Pending(why) => {
            let waited = ctx.switch_waits.waited(uid);
            if waited < endpoints::SWITCH_TIMEOUT {
                return Ok(Some(progressing(
                    "SwitchingEndpoints",
                    why,
                    Duration::from_millis(250).min(ctx.config.poll_interval),
                )));
            }
            tracing::warn!(timeline = %tl, waited_s = waited.as_secs(), reason = %why,
                "the Service's EndpointSlices did not switch to the new compute; stopping the old one anyway");
        }
        endpoints::Switch::Done => {
            // kube-proxy applies the slices within its sync period: look
            // again once that passed, instead of holding the reconcile.
            let settled = ctx.switch_waits.settled(uid);
            if settled < endpoints::KUBE_PROXY_SETTLE {
                if settled.is_zero() {
                    tracing::info!(timeline = %tl, settle_ms = endpoints::KUBE_PROXY_SETTLE.as_millis() as u64,
                        "Service endpoints list the new compute alone; stopping the old one after kube-proxy's sync");
                }
                return Ok(Some(progressing(
                    "SwitchingEndpoints",
                    "the Service's endpoints list the new compute alone; waiting for kube-proxy to apply them",
                    endpoints::KUBE_PROXY_SETTLE - settled,
                )));
            }
        }
        endpoints::Switch::NotRouted => {}
    }
    Ok(None)
}

/// Why the branch's timeline is not served yet: the compute Pods' own
/// reason when they will not come up by themselves (Stalled after
/// `compute_start_deadline`), else that it is starting.
pub(super) async fn not_serving(
    ctx: &Context,
    serving: &Serving,
    tl: &TimelineId,
    now: jiff::Timestamp,
) -> Result<Done, Error> {
    let ready = serving.current.as_ref().is_some_and(deployment_ready);
    if let Some(d) = serving.current.as_ref().filter(|_| !ready) {
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
                        "the compute of timeline {tl} has not started in {}s: {}",
                        deadline.as_secs(),
                        p.message
                    ),
                ));
            }
            return Ok(progressing(
                p.reason,
                format!(
                    "the compute of timeline {tl} is not starting: {}",
                    p.message
                ),
                ctx.config.poll_interval,
            ));
        }
    }
    Ok(progressing(
        "StartingCompute",
        format!("waiting for the compute of timeline {tl} to be ready"),
        ctx.config.poll_interval,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compute_mounts_its_own_certificate_unless_adopted() {
        use crate::compute::fixtures::{branch, cfg, target};
        let d = build_deployment(&branch("prod"), &target(), &cfg()).unwrap();
        assert!(mounts_secret(&d, "prod-tls"));
        // A restored branch's compute, handed over to prod.
        let r = build_deployment(&branch("prod-restore"), &target(), &cfg()).unwrap();
        assert!(!mounts_secret(&r, "prod-tls"));
    }

    #[test]
    fn the_service_moves_to_a_new_timeline_once_its_compute_is_ready() {
        // A swap: the old timeline stays served while the new compute starts.
        assert_eq!(service_timeline(Some("old"), "new", true, false), "old");
        assert_eq!(service_timeline(Some("old"), "new", true, true), "new");
        // Nothing runs: nothing to keep serving.
        assert_eq!(service_timeline(Some("old"), "new", false, false), "new");
        // A first Service, or one already on the timeline.
        assert_eq!(service_timeline(None, "new", true, false), "new");
        assert_eq!(service_timeline(Some("new"), "new", true, false), "new");
    }
}
