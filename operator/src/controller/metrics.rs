//! The operator's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use regmirror_core::decide::Decision;

use super::writer::{WriteFailure, WriteKind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PassLabel {
    /// `full` (every node placed again) or `nodes_only` (only node states changed).
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabel {
    pub kind: String,
    /// `not_found`, `conflict`, `forbidden`, `timeout`, `transport`, `server_error`, ...
    pub reason: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Counter,
    pub passes: Family<PassLabel, Counter>,
    pub errors: Counter,
    pub duration: Histogram,
    pub writes: Family<WriteLabel, Counter>,
    pub write_failures: Family<FailureLabel, Counter>,
    pub nodes: Family<StateLabel, Gauge>,
    pub leader: Gauge,
}

impl Metrics {
    /// The metrics, registered under `regmirror_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            // 1 ms .. ~16 s
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            reconciles: Counter::default(),
            passes: Family::default(),
            errors: Counter::default(),
            writes: Family::default(),
            write_failures: Family::default(),
            nodes: Family::default(),
            leader: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("regmirror");
        r.register(
            "reconciles",
            "Reconcile passes run",
            metrics.reconciles.clone(),
        );
        r.register(
            "passes",
            "Reconcile passes by kind: full, or on the last placement when only node states changed",
            metrics.passes.clone(),
        );
        r.register(
            "reconcile_errors",
            "Reconcile passes that failed",
            metrics.errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time a reconcile pass takes, writes included",
            metrics.duration.clone(),
        );
        r.register(
            "writes",
            "API writes that went through, by kind",
            metrics.writes.clone(),
        );
        r.register(
            "write_failures",
            "API writes that failed, by kind and reason (API errors and timeouts apart)",
            metrics.write_failures.clone(),
        );
        r.register(
            "nodes",
            "Nodes by the state their agent reports",
            metrics.nodes.clone(),
        );
        r.register(
            "leader",
            "1 while this replica leads",
            metrics.leader.clone(),
        );
        metrics
    }

    /// Counts a pass of `kind`.
    pub fn passes(&self, kind: &str) {
        self.passes
            .get_or_create(&PassLabel { kind: kind.into() })
            .inc();
    }

    /// Counts one write that completed, or failed.
    pub fn written(&self, kind: WriteKind, failure: Option<&WriteFailure>) {
        match failure {
            None => self
                .writes
                .get_or_create(&WriteLabel {
                    kind: kind.as_str().into(),
                })
                .inc(),
            Some(f) => self
                .write_failures
                .get_or_create(&FailureLabel {
                    kind: kind.as_str().into(),
                    reason: f.reason().into(),
                })
                .inc(),
        };
    }

    /// Records the node states a pass saw.
    pub fn observe(&self, decision: &Decision) {
        self.nodes.clear();
        for (state, n) in &decision.nodes_by_state {
            self.nodes
                .get_or_create(&StateLabel {
                    state: (*state).into(),
                })
                .set(*n as i64);
        }
    }
}
