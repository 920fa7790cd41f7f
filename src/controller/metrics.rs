//! Prometheus metrics of the controllers: reconciles, errors by reason,
//! durations, status writes, and whether this replica leads.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// The operator's metrics and the registry that exposes them.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    reconciles: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    status_writes: Family<Labels, Counter>,
    durations: Family<Labels, Histogram>,
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn kind(k: &str) -> Labels {
    vec![("kind".into(), k.into())]
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pgbranch");
        let reconciles = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        let status_writes = Family::<Labels, Counter>::default();
        let durations = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        registry.register("reconciles", "Reconciles run, by kind", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by kind and reason",
            errors.clone(),
        );
        registry.register(
            "status_writes",
            "Status subresource writes, by kind",
            status_writes.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile, by kind",
            durations.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and reconciles, else 0",
            leader.clone(),
        );
        Self {
            registry: Arc::new(registry),
            reconciles,
            errors,
            status_writes,
            durations,
            leader,
        }
    }

    pub fn reconciled(&self, k: &str, took: Duration) {
        self.reconciles.get_or_create(&kind(k)).inc();
        self.durations
            .get_or_create(&kind(k))
            .observe(took.as_secs_f64());
    }

    pub fn error(&self, k: &str, reason: &str) {
        let mut l = kind(k);
        l.push(("reason".into(), reason.into()));
        self.errors.get_or_create(&l).inc();
    }

    pub fn status_write(&self, k: &str) {
        self.status_writes.get_or_create(&kind(k)).inc();
    }

    /// Records whether this replica is the leader (reconciles).
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Reconciles of a kind so far.
    pub fn reconcile_count(&self, k: &str) -> u64 {
        self.reconciles.get_or_create(&kind(k)).get()
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_counts_errors_and_durations() {
        let m = Metrics::new();
        m.reconciled("Branch", Duration::from_millis(12));
        m.reconciled("Branch", Duration::from_millis(40));
        m.error("Branch", "StorageUnavailable");
        let text = m.encode();
        assert!(
            text.contains("pgbranch_reconciles_total{kind=\"Branch\"} 2"),
            "{text}"
        );
        assert!(text.contains(
            "pgbranch_reconcile_errors_total{kind=\"Branch\",reason=\"StorageUnavailable\"} 1"
        ));
        assert!(text.contains("pgbranch_reconcile_duration_seconds_count{kind=\"Branch\"} 2"));
        assert_eq!(m.reconcile_count("Branch"), 2);
        assert!(text.contains("pgbranch_leader 0"), "{text}");
        m.set_leader(true);
        assert!(m.encode().contains("pgbranch_leader 1"));
    }
}
