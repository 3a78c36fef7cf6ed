//! Time from reading a new configuration to its files on disk and live: decode the config
//! Secret's JSON, journal, write and fsync every file, rename into place, record it. For
//! containerd (and the hosts.toml half of k3s) that is all a hot apply takes; the endpoint
//! probes that follow are network round trips and are not included.
//!
//! `cargo bench -p regmirror-node-agent --bench apply`

use criterion::{criterion_group, criterion_main, Criterion};
use regmirror_core::api::{Endpoint, EndpointAuth, RegistryMirror, RegistryMirrorSpec};
use regmirror_core::model::ResolvedMirror;
use regmirror_core::node::Flavor;
use regmirror_core::render::{render, RenderedConfig};
use regmirror_core::resolve::resolve;
use regmirror_core::sources::{RefPolicy, SourceKind, SourceObject, Sources};
use regmirror_node_agent::hostfs::HostFs;

/// A node's config with `n` mirrored registries, each with credentials.
fn config(n: usize, flavor: &Flavor, password: &str) -> RenderedConfig {
    let mut sources = Sources::new();
    let secret = SourceObject {
        type_: Some("kubernetes.io/basic-auth".into()),
        data: [("username", "puller"), ("password", password)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.as_bytes().to_vec()))
            .collect(),
        ..SourceObject::default()
    }
    .allowing_hosts("*.internal.example.com:5000");
    sources.insert(SourceKind::Secret, "regmirror-system", "pull", secret);
    let mirrors: Vec<ResolvedMirror> = (0..n)
        .map(|i| {
            let spec = RegistryMirrorSpec {
                cache: None,
                embedded_registry: false,
                registry: format!("registry-{i}.example.com"),
                endpoints: vec![Endpoint {
                    url: format!("https://mirror-{i}.internal.example.com:5000"),
                    auth: Some(EndpointAuth::from_secret("pull")),
                    tls: None,
                }],
                rewrites: vec![],
                node_selector: None,
            };
            let mirror = RegistryMirror::new(&format!("m{i}"), spec);
            resolve(&mirror, &sources, &RefPolicy::new("regmirror-system")).unwrap()
        })
        .collect();
    let refs: Vec<&ResolvedMirror> = mirrors.iter().collect();
    render(&refs, flavor).unwrap()
}

fn bench(c: &mut Criterion) {
    let root = tempfile::tempdir().unwrap();
    let host = HostFs::new(root.path());
    let flavor = Flavor::Containerd {
        hosts_dir: "/etc/containerd/certs.d".into(),
    };
    // Alternate between two configs so every iteration really changes every file.
    let json = [
        serde_json::to_vec(&config(10, &flavor, "one")).unwrap(),
        serde_json::to_vec(&config(10, &flavor, "two")).unwrap(),
    ];
    let mut i = 0;
    c.bench_function(
        "decode + apply 10-registry containerd config (20 files, fsynced)",
        |b| {
            b.iter(|| {
                i += 1;
                let config: RenderedConfig = serde_json::from_slice(&json[i % 2]).unwrap();
                host.apply(&config).unwrap()
            })
        },
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
