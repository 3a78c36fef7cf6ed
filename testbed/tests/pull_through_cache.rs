//! The pull-through cache with real parts on loopback (issue 12 item 1, its node side): a
//! distribution registry in proxy mode with the configuration `regmirror_core::cache` makes, in
//! front of a TLS + basic-auth upstream; containerd pulling through the hosts.toml regmirror
//! renders with the cache first and the upstream after it. A pull goes through the cache; with
//! the upstream stopped the same image still pulls (from the cache); with the cache stopped,
//! pulls fall through to the upstream.

use regmirror_core::node::Flavor;
use regmirror_core::render::render;
use regmirror_testbed::cache::{write_under, Cache};
use regmirror_testbed::world::{secure, World};
use regmirror_testbed::{Containerd, Pki, Registry};

#[test]
fn containerd_pulls_through_the_cache_and_falls_back_both_ways() {
    let world = World::new(secure());
    let pki = Pki {
        dir: world.dir.path().join("pki"),
    };
    let upstream_dir = world.dir.path().join("registry");
    let upstream_port = world.registry.port;
    let mut cache = Cache::start(&world);

    // The node's configuration: the cache first, the upstream (its credentials, its CA) after.
    // That is what `resolve` makes of a mirror asking for a cache, given where it runs.
    let mirror = world.resolved_with_cache(
        vec![world.endpoint(true, Some("mirror-pull"))],
        cache.site(),
    );
    assert_eq!(mirror.endpoints[0].url.to_string(), cache.site().url);
    assert_eq!(mirror.endpoints.len(), 2);
    let node_config = render(&[&mirror], &"containerd".parse::<Flavor>().unwrap()).unwrap();
    let root = tempfile::tempdir().unwrap();
    write_under(root.path(), &node_config);
    let hosts_dir = root.path().join("etc/containerd/certs.d");
    let containerd = Containerd::start(&root.path().join("containerd"));
    let pull = |image: &str| containerd.pull(&hosts_dir, image);
    let cache_log =
        |cache: &Cache| std::fs::read_to_string(cache.dir.join("registry.log")).unwrap_or_default();

    // Through the cache: it fetched the image from the upstream and keeps it.
    let first = pull(&world.image);
    assert!(first.ok, "{}", first.output);
    assert!(
        cache.repository("library/hello").is_dir(),
        "the cache holds library/hello; pull: {}\ncache log:\n{}",
        first.output,
        cache_log(&cache)
    );

    // The upstream stopped: the same image, tag and all, comes from the cache.
    let World {
        dir: _kept,
        registry,
        image,
        ..
    } = world;
    drop(registry);
    let offline = pull(&image);
    assert!(
        offline.ok,
        "the cache serves what it holds with its upstream down: {}\ncache log:\n{}",
        offline.output,
        cache_log(&cache)
    );

    // The upstream back, the cache stopped: containerd falls through to the upstream.
    let upstream = Registry::start_on(&upstream_dir, &pki, secure(), upstream_port);
    cache.stop();
    let through = pull(&image);
    assert!(
        through.ok,
        "with the cache down the upstream serves: {}",
        through.output
    );

    // The cache back and the upstream gone again: the cache serves from its storage.
    cache.resume();
    drop(upstream);
    let again = pull(&image);
    assert!(again.ok, "the restarted cache serves: {}", again.output);
    // The cache runs in the world's directory: stopped before that goes.
    drop(cache);
}
