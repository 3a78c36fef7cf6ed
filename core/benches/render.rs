//! Rendering is on every reconcile's hot path: one node configuration for a 50-mirror cluster,
//! per flavor, from resolved mirrors (resolution is measured separately).

use criterion::{criterion_group, criterion_main, Criterion};
use regmirror_core::api::{
    CaRef, Endpoint, EndpointAuth, EndpointTls, RegistryMirror, RegistryMirrorSpec,
};
use regmirror_core::assemble::assemble;
use regmirror_core::model::ResolvedMirror;
use regmirror_core::node::{Flavor, NodeInfo};
use regmirror_core::render::render;
use regmirror_core::resolve::resolve;
use regmirror_core::sources::{RefPolicy, SourceKind, SourceObject, Sources};

const NS: &str = "regmirror-system";

/// 50 mirrors, each with two endpoints, half with credentials and a CA, on 10 mirror hosts.
fn cluster() -> (Vec<RegistryMirror>, Sources) {
    let mut sources = Sources::new();
    let data = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    };
    let mirrors = (0..50)
        .map(|i| {
            let host = i % 10;
            let secured = host % 2 == 0;
            let secret = format!("pull-{host}");
            sources.insert(
                SourceKind::Secret,
                NS,
                &secret,
                SourceObject {
                    type_: Some("kubernetes.io/basic-auth".into()),
                    data: data(&[("username", "u"), ("password", "p")]),
                    ..SourceObject::default()
                }
                .allowing_hosts(format!("mirror-{host}.example.com:5000")),
            );
            let endpoint = Endpoint {
                url: format!("https://mirror-{host}.example.com:5000/v2/proxy-{i}"),
                auth: secured.then(|| EndpointAuth::from_secret(secret.clone())),
                tls: secured.then(|| EndpointTls::with_ca(CaRef::from_config_map("ca"))),
            };
            let fallback = Endpoint {
                url: format!("https://fallback-{host}.example.com"),
                auth: None,
                tls: None,
            };
            let spec = RegistryMirrorSpec {
                cache: None,
                embedded_registry: false,
                registry: format!("registry-{i}.example.org"),
                endpoints: vec![endpoint, fallback],
                rewrites: vec![],
                node_selector: None,
            };
            RegistryMirror::new(&format!("mirror-{i:02}"), spec)
        })
        .collect();
    // The CA must parse: take the examples' certificate.
    let pem = include_str!("../../examples/registry-credentials.yaml");
    let start = pem.find("-----BEGIN").unwrap();
    let end = pem.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    let cert: String = pem[start..end]
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    sources.insert(
        SourceKind::ConfigMap,
        NS,
        "ca",
        SourceObject {
            type_: None,
            data: data(&[("ca.crt", &cert)]),
            ..SourceObject::default()
        },
    );
    (mirrors, sources)
}

fn bench(c: &mut Criterion) {
    let (mirrors, sources) = cluster();
    let policy = RefPolicy::new(NS);
    let resolved: Vec<ResolvedMirror> = mirrors
        .iter()
        .map(|m| resolve(m, &sources, &policy).expect("valid"))
        .collect();
    c.bench_function("resolve 50 mirrors", |b| {
        b.iter(|| {
            mirrors
                .iter()
                .map(|m| resolve(m, &sources, &policy).unwrap())
                .collect::<Vec<_>>()
        })
    });
    for flavor in ["k3s", "containerd", "cri-o"] {
        let node = NodeInfo {
            name: "n".into(),
            labels: Default::default(),
            flavor: flavor.parse::<Flavor>().unwrap(),
        };
        let files = render(&assemble(&resolved, &node).mirrors, &node.flavor)
            .unwrap()
            .files
            .len();
        c.bench_function(
            &format!("assemble+render 50 mirrors, {flavor} ({files} files)"),
            |b| {
                b.iter(|| {
                    render(&assemble(&resolved, &node).mirrors, &node.flavor)
                        .unwrap()
                        .digest()
                })
            },
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
