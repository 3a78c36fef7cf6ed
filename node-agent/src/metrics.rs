//! The agent's Prometheus metrics.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::agent::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub applies: Family<ResultLabel, Counter>,
    pub rollbacks: Counter,
    pub duration: Histogram,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            applies: Family::default(),
            rollbacks: Counter::default(),
            // 1 ms .. ~30 min: a restart waits for the node to come back.
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 22)),
        };
        let r = registry.sub_registry_with_prefix("regmirror_agent");
        r.register(
            "applies",
            "Configurations applied, by result",
            metrics.applies.clone(),
        );
        r.register(
            "rollbacks",
            "Rollbacks to the last good configuration",
            metrics.rollbacks.clone(),
        );
        r.register(
            "apply_duration_seconds",
            "Time from reading a configuration to verified (or rolled back)",
            metrics.duration.clone(),
        );
        metrics
    }

    pub fn observe(&self, outcome: &Outcome, took: Duration) {
        self.applies
            .get_or_create(&ResultLabel {
                result: outcome.state.as_str().to_lowercase(),
            })
            .inc();
        if outcome.rolled_back {
            self.rollbacks.inc();
        }
        self.duration.observe(took.as_secs_f64());
    }
}
