//! When a branch's compute may stop after its Service moved to another one.
//!
//! Moving a Service's selector is one API write, but clients follow it only
//! once the EndpointSlice controller has rewritten the Service's
//! EndpointSlices and every node's kube-proxy has rewritten its rules from
//! them. Until then new connections still go to the old compute; stopping
//! it earlier refuses them ("connection refused", "the database system is
//! shutting down"). So after a switch (a restore's finalize, a timeline
//! swap) the Branch controller stops the old compute only once the
//! EndpointSlices of the branch's Service list the new compute's pods alone
//! ([`switched`]), then waits [`KUBE_PROXY_SETTLE`] for kube-proxy to have
//! applied that (its rules follow the slices after at most its
//! `minSyncPeriod`, 1 s by default). It waits at most [`SWITCH_TIMEOUT`].
//!
//! Where nothing routes through EndpointSlices — the compute has no pods
//! (a test harness that runs computes itself), or the API server does not
//! serve `discovery.k8s.io/v1` — there is nothing to wait for.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;

use crate::api::LABEL_SERVICE_NAME;
use crate::controller::{Context, Error};

/// How long kube-proxy may take to apply EndpointSlices it has seen: its
/// default `iptables.minSyncPeriod` / `nftables.minSyncPeriod` (1 s) plus
/// the rule rewrite itself.
pub const KUBE_PROXY_SETTLE: Duration = Duration::from_millis(1500);

/// The longest the old compute waits for the EndpointSlices to switch:
/// past it (slices that never list the new compute alone, say another pod
/// carrying the compute's labels) it is stopped anyway, with a warning,
/// rather than a restore never finishing.
pub const SWITCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Since when each branch (by UID) waits for its Service's endpoints to
/// switch, and since when they have switched (kube-proxy's settle time is
/// counted from then). In memory: a restarted operator waits afresh.
#[derive(Debug, Default)]
pub struct SwitchWaits {
    waiting: Mutex<HashMap<String, Instant>>,
    switched: Mutex<HashMap<String, Instant>>,
}

fn since(m: &Mutex<HashMap<String, Instant>>, uid: &str) -> Duration {
    let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
    m.entry(uid.to_string())
        .or_insert_with(Instant::now)
        .elapsed()
}

impl SwitchWaits {
    /// How long `uid` has been waiting (0 the first time it asks).
    pub fn waited(&self, uid: &str) -> Duration {
        since(&self.waiting, uid)
    }

    /// How long ago `uid`'s endpoints were first seen switched (0 the
    /// first time).
    pub fn settled(&self, uid: &str) -> Duration {
        since(&self.switched, uid)
    }

    /// `uid` is not waiting (any more).
    pub fn done(&self, uid: &str) {
        for m in [&self.waiting, &self.switched] {
            m.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
        }
    }
}

/// What the EndpointSlices of a Service say about a switch to a compute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Switch {
    /// They list ready pods of the compute and nothing else: the old
    /// compute may stop once kube-proxy caught up ([`KUBE_PROXY_SETTLE`]).
    Done,
    /// Nothing routes to the compute through EndpointSlices (it has no
    /// pods, or slices are not served): the old compute may stop now.
    NotRouted,
    /// Not yet; why.
    Pending(String),
}

/// One endpoint of a slice: the pod it points at and whether it is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub pod: Option<String>,
    pub ready: bool,
}

/// The endpoints of `slices`.
pub fn endpoints(slices: &[EndpointSlice]) -> Vec<Endpoint> {
    slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .map(|e| Endpoint {
            pod: e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone()),
            // Absent means ready (discovery.k8s.io/v1 semantics).
            ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
        })
        .collect()
}

/// The decision, from the Service's endpoints and the names of the pods of
/// the compute it should select now (pure; see [`switched`]).
pub fn decide(service: &str, endpoints: &[Endpoint], compute_pods: &BTreeSet<String>) -> Switch {
    if compute_pods.is_empty() {
        // No pods: nothing reaches this compute through endpoints.
        return Switch::NotRouted;
    }
    if let Some(other) = endpoints
        .iter()
        .find(|e| !e.pod.as_ref().is_some_and(|p| compute_pods.contains(p)))
    {
        return Switch::Pending(format!(
            "the EndpointSlices of Service {service} still list {}",
            other
                .pod
                .as_deref()
                .map_or("an endpoint that is not a pod".to_string(), |p| format!(
                    "pod {p}"
                ))
        ));
    }
    if !endpoints.iter().any(|e| e.ready) {
        return Switch::Pending(format!(
            "the EndpointSlices of Service {service} list no ready pod of the new compute yet"
        ));
    }
    Switch::Done
}

/// Whether the EndpointSlices of Service `service` in `ns` list the pods of
/// `compute` alone (at least one of them ready).
pub async fn switched(
    ctx: &Context,
    ns: &str,
    service: &str,
    compute: &Deployment,
) -> Result<Switch, Error> {
    let selector = compute
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default();
    if selector.is_empty() {
        return Ok(Switch::NotRouted);
    }
    let selector = selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    // Live reads: a switch stops the old compute on what they say.
    let pods = match ctx
        .list_live::<Pod>(ns, "list compute pods", &selector)
        .await
    {
        Ok(l) => l,
        // An API server without pods (a test double): nothing routes.
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => return Ok(Switch::NotRouted),
        Err(e) => return Err(e),
    };
    let compute_pods: BTreeSet<String> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| p.name_any())
        .collect();
    if compute_pods.is_empty() {
        return Ok(Switch::NotRouted);
    }
    let slices = match ctx
        .list_live::<EndpointSlice>(
            ns,
            "list endpointslices",
            &format!("{LABEL_SERVICE_NAME}={service}"),
        )
        .await
    {
        Ok(l) => l,
        // No discovery.k8s.io/v1 here: nothing routes through slices.
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => {
            tracing::debug!(namespace = %ns, service = %service, "EndpointSlices not served; not waiting for them");
            return Ok(Switch::NotRouted);
        }
        Err(e) => return Err(e),
    };
    Ok(decide(service, &endpoints(&slices), &compute_pods))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "prod-abcde", "labels": {LABEL_SERVICE_NAME: "prod"}},
            "addressType": "IPv4",
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn ep(pod: &str, ready: Option<bool>) -> serde_json::Value {
        let mut e = json!({
            "addresses": ["10.244.0.20"],
            "targetRef": {"kind": "Pod", "name": pod, "namespace": "ns"},
        });
        if let Some(r) = ready {
            e["conditions"] = json!({"ready": r});
        }
        e
    }

    fn pods(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_old_compute_waits_while_a_slice_lists_its_pod() {
        let s = slice(json!([ep("old-1", Some(true)), ep("new-1", Some(true))]));
        let d = decide("prod", &endpoints(&[s]), &pods(&["new-1"]));
        assert_eq!(
            d,
            Switch::Pending("the EndpointSlices of Service prod still list pod old-1".into())
        );
    }

    #[test]
    fn the_old_compute_waits_until_the_new_one_is_listed_ready() {
        let empty = slice(json!([]));
        assert!(matches!(
            decide("prod", &endpoints(&[empty]), &pods(&["new-1"])),
            Switch::Pending(_)
        ));
        let not_ready = slice(json!([ep("new-1", Some(false))]));
        assert!(matches!(
            decide("prod", &endpoints(&[not_ready]), &pods(&["new-1"])),
            Switch::Pending(_)
        ));
    }

    #[test]
    fn the_new_compute_alone_and_ready_lets_the_old_one_stop() {
        // Ready absent means ready; endpoints may be spread over slices.
        let a = slice(json!([ep("new-1", None)]));
        let b = slice(json!([ep("new-1", Some(true))]));
        assert_eq!(
            decide("prod", &endpoints(&[a, b]), &pods(&["new-1"])),
            Switch::Done
        );
    }

    #[test]
    fn an_endpoint_without_a_pod_is_not_the_new_compute() {
        let s = slice(json!([{"addresses": ["10.0.0.9"]}, ep("new-1", Some(true))]));
        assert!(matches!(
            decide("prod", &endpoints(&[s]), &pods(&["new-1"])),
            Switch::Pending(m) if m.contains("not a pod")
        ));
    }

    #[test]
    fn a_wait_is_counted_from_its_first_ask_until_done() {
        let w = SwitchWaits::default();
        assert!(w.waited("a") < Duration::from_millis(20), "the first ask");
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            w.waited("a") >= Duration::from_millis(20),
            "still the first ask's"
        );
        assert!(w.waited("b") < Duration::from_millis(20), "per branch");
        w.done("a");
        assert!(
            w.waited("a") < Duration::from_millis(20),
            "afresh after done"
        );
        // The settle time after the switch is counted the same way, and
        // done() forgets it too.
        assert!(w.settled("a").is_zero() || w.settled("a") < Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(20));
        assert!(w.settled("a") >= Duration::from_millis(20));
        w.done("a");
        assert!(w.settled("a") < Duration::from_millis(20));
    }

    #[test]
    fn a_compute_without_pods_has_nothing_to_wait_for() {
        let s = slice(json!([ep("old-1", Some(true))]));
        assert_eq!(
            decide("prod", &endpoints(&[s]), &pods(&[])),
            Switch::NotRouted
        );
    }
}
