//! What holding a 5,000-node cluster costs the operator, and what one mirror change writes.
//!
//! Resident memory: the operator's caches are kube reflector stores; this fills stores the same
//! way (each object trimmed as the controller trims it on arrival, then stored) with 5,000
//! kubelet-like Nodes, 50 RegistryMirrors, their Secrets and the 20 stored configs, and reads
//! VmRSS before and after. Writes: on the settled cluster, one pool's mirror changes its
//! endpoint; the decision's writes are counted by kind.
//!
//! `cargo bench -p regmirror --bench footprint`

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Secret};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher::Event;
use regmirror::controller::{snapshot as views, Snapshot};
use regmirror_core::api::RegistryMirror;
use regmirror_core::plan::MaxUnavailable;
use regmirror_core::sources::RefPolicy;
use regmirror_testbed::cluster::Cluster;

const NS: &str = "regmirror-system";

/// The snapshot a pass takes of `cluster`, as the controller's caches would hold it.
fn snapshot(c: &Cluster) -> Snapshot {
    Snapshot::from_objects(
        &c.mirrors,
        &c.nodes,
        &c.secrets,
        &c.config_maps,
        c.role.as_ref(),
        &c.namespace,
    )
}

fn decide_on(c: &Cluster, max_unavailable: MaxUnavailable) -> regmirror_core::decide::Decision {
    snapshot(c).decide(&RefPolicy::new(NS), max_unavailable, "2026-11-23T00:00:00Z")
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn fill<K>(writer: &mut Writer<K>, objects: Vec<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    writer.apply_watcher_event(&Event::Init);
    for object in objects {
        writer.apply_watcher_event(&Event::InitApply(object));
    }
    writer.apply_watcher_event(&Event::InitDone);
}

fn main() {
    // Settle the synthetic cluster first (configs stored, nodes annotated), then measure
    // only what the caches hold.
    let mut cluster = Cluster::synthetic(5_000, 50, 20, NS);
    loop {
        let d = decide_on(&cluster, MaxUnavailable::Percent(100));
        if d.writes() == 0 {
            break;
        }
        cluster.settle(&d, "regmirror-agent-configs");
    }
    let node_json: Vec<Vec<u8>> = cluster
        .nodes
        .iter()
        .map(|n| serde_json::to_vec(n).unwrap())
        .collect();
    let raw_node_bytes: usize = node_json.iter().map(Vec::len).sum();

    let before = rss_kib();
    let (nodes, mut node_writer) = reflector::store::<Node>();
    // As from a watch: each Node decoded from JSON, trimmed, stored.
    let decoded = node_json.iter().map(|j| {
        let mut n: Node = serde_json::from_slice(j).unwrap();
        views::slim_node(&mut n);
        n
    });
    fill(&mut node_writer, decoded.collect());
    drop(node_json);
    let (mirrors, mut mirror_writer) = reflector::store::<RegistryMirror>();
    fill(&mut mirror_writer, cluster.mirrors.clone());
    let (secrets, mut secret_writer) = reflector::store::<Secret>();
    fill(&mut secret_writer, cluster.secrets.clone());
    let after = rss_kib();
    let held: Vec<Arc<Node>> = nodes.state();
    println!(
        "cache: {} nodes ({} KiB as JSON from the API server), {} mirrors, {} secrets",
        held.len(),
        raw_node_bytes / 1024,
        mirrors.state().len(),
        secrets.state().len()
    );
    println!(
        "resident memory: {} KiB before filling caches, {} KiB after; caches take {} KiB",
        before,
        after,
        after.saturating_sub(before)
    );

    // One mirror of one pool changes its endpoint.
    let d = decide_on(&cluster, MaxUnavailable::Count(1));
    assert_eq!(d.writes(), 0, "settled");
    let pool_mirror = cluster
        .mirrors
        .iter_mut()
        .find(|m| m.spec.node_selector.is_some())
        .unwrap();
    // Same host (so the same credentials in k3s's CRI config): hot.
    let moved = format!("{}/v2/moved", pool_mirror.spec.endpoints[0].url);
    pool_mirror.spec.endpoints[0].url = moved;
    pool_mirror.metadata.generation = Some(2);
    let d = decide_on(&cluster, MaxUnavailable::Count(1));
    println!(
        "one pool mirror's endpoint changes: {} writes = {} config created + {} nodes annotated + {} status + {} agent Role + {} configs deleted (250 nodes in the pool; hot change, not held by the restart budget)",
        d.writes(), d.create.len(), d.advance.len(), d.statuses.len(), usize::from(d.agent_role.is_some()), d.delete.len()
    );
    let pool_mirror = cluster
        .mirrors
        .iter_mut()
        .find(|m| m.spec.node_selector.is_some())
        .unwrap();
    pool_mirror.spec.endpoints[0].auth = None;
    let d = decide_on(&cluster, MaxUnavailable::Count(1));
    println!(
        "the same mirror moves to another host, its credentials with it (k3s restart): {} writes = {} config created + {} nodes annotated (maxUnavailable 1) + {} status + {} agent Role",
        d.writes(), d.create.len(), d.advance.len(), d.statuses.len(), usize::from(d.agent_role.is_some())
    );
}
