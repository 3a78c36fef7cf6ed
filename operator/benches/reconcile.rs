//! CPU time of one full reconcile pass over a simulated cluster: 5,000 k3s nodes in 20 pools,
//! 50 RegistryMirrors (10 for every node, 40 for one pool each), so 20 distinct configs.
//! A pass is: snapshot the caches (Node → view, Secrets → sources, stored configs decoded),
//! then decide (resolve, group, render once per group, plan, statuses).
//!
//! `cargo bench -p regmirror --bench reconcile`

use criterion::{criterion_group, criterion_main, Criterion};
use regmirror_core::plan::MaxUnavailable;
use regmirror_testbed::cluster::Cluster;

#[path = "support/mod.rs"]
mod support;
use support::decide_on;

const NS: &str = "regmirror-system";

fn pass(cluster: &Cluster) -> usize {
    decide_on(cluster, MaxUnavailable::Percent(10)).writes()
}

fn settled_cluster() -> Cluster {
    let mut cluster = Cluster::synthetic(5_000, 50, 20, NS);
    for _ in 0..50 {
        let decision = decide_on(&cluster, MaxUnavailable::Percent(100));
        if decision.writes() == 0 {
            return cluster;
        }
        cluster.settle(&decision, "regmirror-agent-configs");
    }
    panic!("the synthetic cluster does not settle");
}

fn bench(c: &mut Criterion) {
    let fresh = Cluster::synthetic(5_000, 50, 20, NS);
    let settled = settled_cluster();
    let mut group = c.benchmark_group("reconcile 5000 nodes, 50 mirrors, 20 groups");
    group.sample_size(20);
    group.bench_function("first pass (everything to roll out)", |b| {
        b.iter(|| pass(&fresh))
    });
    group.bench_function("settled pass (nothing to write)", |b| {
        b.iter(|| pass(&settled))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
