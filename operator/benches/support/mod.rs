//! What the operator's benchmarks and tests share: a testbed cluster as the controller's
//! caches would hold it, and one pass's decision on it.

use regmirror::controller::Snapshot;
use regmirror_core::decide::Decision;
use regmirror_core::plan::MaxUnavailable;
use regmirror_core::sources::RefPolicy;
use regmirror_testbed::cluster::Cluster;

/// The snapshot a pass takes of `cluster`.
pub fn snapshot(cluster: &Cluster) -> Snapshot {
    Snapshot::from_objects(
        &cluster.mirrors,
        &cluster.nodes,
        &cluster.secrets,
        &cluster.config_maps,
        cluster.role.as_ref(),
        &cluster.namespace,
    )
}

/// One pass's decision on `cluster`, as the controller makes it.
#[allow(dead_code)] // not every includer decides
pub fn decide_on(cluster: &Cluster, max_unavailable: MaxUnavailable) -> Decision {
    snapshot(cluster).decide(
        &RefPolicy::new(cluster.namespace.clone()),
        max_unavailable,
        "2026-11-23T00:00:00Z",
    )
}
