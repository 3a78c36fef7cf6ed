//! The pull-through cache with real parts on loopback (issue 12 item 1, its node side): a
//! docker-registry in proxy mode with the configuration `regmirror_core::cache` makes, in front
//! of a TLS + basic-auth upstream; containerd pulling through the hosts.toml regmirror renders
//! with the cache first and the upstream after it. A pull goes through the cache; with the
//! upstream stopped the same image still pulls (from the cache); with the cache stopped, pulls
//! fall through to the upstream.

use std::path::Path;

use regmirror_core::api::{CaRef, Endpoint, EndpointTls};
use regmirror_core::cache::{registry_config, Serving, Upstream};
use regmirror_core::model::Credentials;
use regmirror_core::node::Flavor;
use regmirror_core::render::{render, RenderedConfig};
use regmirror_testbed::serve_registry;
use regmirror_testbed::world::{secure, World, PASSWORD, USER};
use regmirror_testbed::{free_port, go_tool, Containerd, Registry};

/// Writes a rendered configuration's files under `root`, as the agent would on a host.
fn write(root: &Path, config: &RenderedConfig) {
    for (path, file) in &config.files {
        let target = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, &file.content).unwrap();
    }
}

/// Files under `dir`, recursively.
fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                files_under(&path)
            } else {
                1
            }
        })
        .sum()
}

#[test]
fn containerd_pulls_through_the_cache_and_falls_back_both_ways() {
    let world = World::new(secure());
    let pki = world.dir.path().join("pki");
    let upstream_dir = world.dir.path().join("registry");
    let upstream_port = world.registry.port;

    // The cache, configured as the operator would configure it, trusting the upstream's CA.
    let cache_dir = world.dir.path().join("cache");
    let cache_port = free_port();
    let config = registry_config(
        &Upstream {
            url: world.registry.url(),
            credentials: Some(Credentials::Basic {
                username: USER.into(),
                password: PASSWORD.into(),
            }),
        },
        &Serving {
            addr: format!("127.0.0.1:{cache_port}"),
            certificate: pki.join("server.crt").display().to_string(),
            key: pki.join("server.key").display().to_string(),
        },
        &cache_dir.join("storage").display().to_string(),
    )
    .unwrap();
    // distribution v3: Debian's 2.8 logs in to token-auth upstreams only (distribution#3153).
    let program = go_tool("registry");
    let start_cache = || {
        serve_registry(
            &program,
            &cache_dir,
            &config,
            cache_port,
            &[("SSL_CERT_FILE", &pki.join("ca.crt"))],
        )
    };
    let cache = start_cache();

    // The node's configuration: the cache first, the upstream (its credentials, its CA) after.
    let cache_endpoint = Endpoint {
        url: format!("https://127.0.0.1:{cache_port}"),
        auth: None,
        tls: Some(EndpointTls::with_ca(CaRef::from_config_map("registry-ca"))),
    };
    let mirror = world.resolved(vec![
        cache_endpoint,
        world.endpoint(true, Some("mirror-pull")),
    ]);
    let node_config = render(&[&mirror], &"containerd".parse::<Flavor>().unwrap()).unwrap();
    let root = tempfile::tempdir().unwrap();
    write(root.path(), &node_config);
    let hosts_dir = root.path().join("etc/containerd/certs.d");
    let containerd = Containerd::start(&root.path().join("containerd"));
    let pull = |image: &str| containerd.pull(&hosts_dir, image);

    // Through the cache: it fetched the image from the upstream and keeps it.
    let first = pull(&world.image);
    assert!(first.ok, "{}", first.output);
    let cached = cache_dir.join("storage/docker/registry/v2/repositories/library/hello");
    let cache_log = || std::fs::read_to_string(cache_dir.join("registry.log")).unwrap_or_default();
    assert!(
        cached.is_dir(),
        "the cache holds library/hello; pull: {}\ncache log:\n{}",
        first.output,
        cache_log()
    );
    let blobs = files_under(&cache_dir.join("storage/docker/registry/v2/blobs"));
    assert!(
        blobs >= 3,
        "manifest, config and layer cached: {blobs} blob files"
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
        "the cache serves what it holds with its upstream down: {}",
        offline.output
    );

    // The upstream back, the cache stopped: containerd falls through to the upstream.
    let pki_files = regmirror_testbed::Pki {
        dir: pki.to_owned(),
    };
    let upstream = Registry::start_on(&upstream_dir, &pki_files, secure(), upstream_port);
    drop(cache);
    let through = pull(&image);
    assert!(
        through.ok,
        "with the cache down the upstream serves: {}",
        through.output
    );

    // The cache back and the upstream gone again: the cache still serves from its storage.
    let _cache = start_cache();
    drop(upstream);
    let again = pull(&image);
    assert!(again.ok, "the restarted cache serves: {}", again.output);
}
