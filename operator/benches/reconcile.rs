//! CPU time of the operator's passes over a simulated cluster: 5,000 k3s nodes in 20 pools,
//! 50 RegistryMirrors (10 for every node, 40 for one pool each), so 20 distinct configs.
//!
//! - a first pass and a settled pass are whole passes: snapshot the caches (Node → view,
//!   Secrets → sources, stored configs opened), place every node (resolve, select, render once
//!   per group), conclude (plan, statuses);
//! - one agent's report is what the controller does when only a Node's state changed: take
//!   that Node into the snapshot and conclude on the placement it keeps.
//!
//! Allocations per pass are counted by a counting allocator and printed once.
//!
//! `cargo bench -p regmirror --bench reconcile`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{criterion_group, criterion_main, Criterion};
use regmirror::controller::Snapshot;
use regmirror_core::contract::{MESSAGE, STATE};
use regmirror_core::decide::Decision;
use regmirror_core::plan::MaxUnavailable;
use regmirror_core::sources::RefPolicy;
use regmirror_testbed::cluster::Cluster;

/// Counts allocations, to report how many a pass makes.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const NS: &str = "regmirror-system";
const NOW: &str = "2026-11-23T00:00:00Z";

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

/// A whole pass from scratch: what the controller's first pass as leader does.
fn pass(cluster: &Cluster, max_unavailable: MaxUnavailable) -> Decision {
    let policy = RefPolicy::new(NS);
    let snapshot = snapshot(cluster);
    let placement = snapshot.place(&policy);
    snapshot.conclude(&placement, &policy, max_unavailable, NOW)
}

/// A whole pass after an earlier one (a resync, or a change that may move nodes): the
/// snapshot reuses the views and opened configs of objects that did not change, the
/// placement the renderings of unchanged groups.
fn pass_after(
    cluster: &Cluster,
    (previous, placed): (Snapshot, regmirror_core::decide::Placement),
) -> Decision {
    let policy = RefPolicy::new(NS);
    let snapshot = Snapshot::reusing(
        previous,
        &cluster.mirrors,
        &cluster.nodes,
        &cluster.secrets,
        &cluster.config_maps,
        cluster.role.as_ref(),
        NS,
    );
    let placement = snapshot.place_reusing(&policy, Some(&placed));
    snapshot.conclude(&placement, &policy, MaxUnavailable::Percent(10), NOW)
}

fn settled_cluster() -> Cluster {
    let mut cluster = Cluster::synthetic(5_000, 50, 20, NS);
    for _ in 0..50 {
        let decision = pass(&cluster, MaxUnavailable::Percent(100));
        if decision.writes() == 0 {
            return cluster;
        }
        cluster.settle(&decision, "regmirror-agent-configs");
    }
    panic!("the synthetic cluster does not settle");
}

fn allocations(f: impl FnOnce() -> usize) -> (usize, usize) {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let writes = f();
    (ALLOCATIONS.load(Ordering::Relaxed) - before, writes)
}

fn bench(c: &mut Criterion) {
    let policy = RefPolicy::new(NS);
    let fresh = Cluster::synthetic(5_000, 50, 20, NS);
    let mut settled = settled_cluster();
    for (i, node) in settled.nodes.iter_mut().enumerate() {
        node.metadata.resource_version = Some(format!("{i}"));
    }
    for (i, secret) in settled.secrets.iter_mut().enumerate() {
        secret.metadata.resource_version = Some(format!("{i}"));
    }
    let last_pass = || {
        let snapshot = snapshot(&settled);
        let placement = snapshot.place(&policy);
        (snapshot, placement)
    };

    // One agent reports (its message changes): the controller's nodes-only pass.
    let mut kept = snapshot(&settled);
    let placement = kept.place(&policy);
    let mut reporting = settled.nodes[1234].clone();
    let annotations = reporting
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    annotations.insert(STATE.into(), "Applied".into());
    annotations.insert(
        MESSAGE.into(),
        "applied again after an agent restart".into(),
    );
    let report = |kept: &mut Snapshot| {
        assert!(kept.update_node(&reporting));
        kept.conclude(&placement, &policy, MaxUnavailable::Percent(10), NOW)
            .writes()
    };

    for (what, (count, writes)) in [
        (
            "first pass",
            allocations(|| pass(&fresh, MaxUnavailable::Percent(10)).writes()),
        ),
        (
            "settled pass from scratch",
            allocations(|| pass(&settled, MaxUnavailable::Percent(10)).writes()),
        ),
        ("settled pass after a pass", {
            let last = last_pass();
            let settled = &settled;
            allocations(move || pass_after(settled, last).writes())
        }),
        ("one agent's report", allocations(|| report(&mut kept))),
    ] {
        println!("allocations per {what}: {count} ({writes} writes decided)");
    }

    let mut group = c.benchmark_group("reconcile 5000 nodes, 50 mirrors, 20 groups");
    group.sample_size(20);
    group.bench_function("first pass (everything to roll out)", |b| {
        b.iter(|| pass(&fresh, MaxUnavailable::Percent(10)).writes())
    });
    group.bench_function("settled pass from scratch (nothing to write)", |b| {
        b.iter(|| pass(&settled, MaxUnavailable::Percent(10)).writes())
    });
    group.bench_function("settled pass after a pass (nothing to write)", |b| {
        b.iter_batched(
            last_pass,
            |last| pass_after(&settled, last).writes(),
            criterion::BatchSize::LargeInput,
        )
    });
    group.bench_function("one agent's report (conclude on the kept placement)", |b| {
        b.iter(|| report(&mut kept))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
