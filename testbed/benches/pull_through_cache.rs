//! Cache hit latency against the upstream (issue 12 item 1): containerd pulling a 32 MiB
//! one-layer image on loopback, through the hosts.toml regmirror renders,
//! - straight from the upstream (a docker-registry with TLS and basic auth), and
//! - from the pull-through cache (distribution v3 in proxy mode, as `regmirror_core::cache`
//!   configures it) in front of that upstream, once it holds the image.
//!
//! The first pull through the cache (a miss: the cache fetches from the upstream as it serves)
//! is timed once and printed. Each pull starts from an empty containerd content store.
//!
//! `cargo bench -p regmirror-testbed --bench pull_through_cache`

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use regmirror_core::node::Flavor;
use regmirror_core::render::render;
use regmirror_testbed::cache::{write_under, Cache};
use regmirror_testbed::world::{secure, World};
use regmirror_testbed::{oci_layout, push, Containerd, Pki};

const LAYER_MIB: usize = 32;

fn pulls(c: &mut Criterion) {
    let world = World::new(secure());
    // A layer of incompressible bytes, pushed beside the world's small image.
    let layout = world.dir.path().join("big");
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let payload: String = (0..LAYER_MIB << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'!' + (state % 94) as u8)
        })
        .collect();
    oci_layout(&layout, "v1", &payload);
    let pki = Pki {
        dir: world.dir.path().join("pki"),
    };
    push(
        &layout,
        "v1",
        &world.registry,
        "library/big",
        &pki.dir,
        &world.dir.path().join("push-big"),
    );
    let image = world.image.replace("library/hello", "library/big");
    let cache = Cache::start(&world);
    let flavor: Flavor = "containerd".parse().unwrap();
    let hosts = |name: &str, mirror| {
        let root = world.dir.path().join(name);
        let config = render(&[&mirror], &flavor).unwrap();
        write_under(&root, &config);
        root.join("etc/containerd/certs.d")
    };
    let upstream = || vec![world.endpoint(true, Some("mirror-pull"))];
    let direct = hosts("direct", world.resolved(upstream()));
    // The cache alone (what resolve puts first): a pull it cannot serve fails instead of
    // falling through to the upstream, so the hits below are hits.
    let mut cache_only = world.resolved_with_cache(upstream(), cache.site());
    cache_only.endpoints.truncate(1);
    let cached = hosts("cached", cache_only);
    let containerd = Containerd::start(&world.dir.path().join("containerd"));

    let started = Instant::now();
    let first = containerd.pull(&cached, &image);
    assert!(first.ok, "{}", first.output);
    assert!(
        cache.repository("library/big").is_dir(),
        "pulled through the cache"
    );
    println!(
        "first pull through the cache (a miss, {LAYER_MIB} MiB): {:?}",
        started.elapsed()
    );

    let mut group = c.benchmark_group(format!("pull {LAYER_MIB} MiB"));
    group.sample_size(20);
    group.measurement_time(std::time::Duration::from_secs(10));
    group.bench_function("from the upstream (TLS, basic auth)", |b| {
        b.iter(|| assert!(containerd.pull(&direct, &image).ok))
    });
    group.bench_function("from the cache (hit)", |b| {
        b.iter(|| assert!(containerd.pull(&cached, &image).ok))
    });
    group.finish();
}

criterion_group!(benches, pulls);
criterion_main!(benches);
