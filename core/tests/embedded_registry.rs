//! k3s's embedded registry mirror (Spegel): what a RegistryMirror asking for it renders to on
//! each flavor, and how a change reaches a node that runs it.

use regmirror_core::activation::{activation, Activation};
use regmirror_core::api::{Endpoint, RegistryMirror, RegistryMirrorSpec};
use regmirror_core::model::ResolvedMirror;
use regmirror_core::node::Flavor;
use regmirror_core::render::{problems, render, RenderedConfig};
use regmirror_core::resolve::resolve;
use regmirror_core::route::route;
use regmirror_core::sources::{RefPolicy, Sources};

const NS: &str = "regmirror-system";

fn mirror(name: &str, registry: &str, urls: &[&str], embedded_registry: bool) -> RegistryMirror {
    RegistryMirror::new(
        name,
        RegistryMirrorSpec {
            cache: None,
            embedded_registry,
            registry: registry.into(),
            endpoints: urls
                .iter()
                .map(|url| Endpoint {
                    url: url.to_string(),
                    auth: None,
                    tls: None,
                })
                .collect(),
            rewrites: vec![],
            node_selector: None,
        },
    )
}

fn resolved(mirror: &RegistryMirror) -> ResolvedMirror {
    resolve(mirror, &Sources::new(), &RefPolicy::new(NS)).expect("a valid mirror")
}

fn registries_yaml(config: &RenderedConfig, dist: &str) -> String {
    config.files[&format!("/etc/rancher/{dist}/registries.yaml")]
        .content
        .clone()
}

fn hosts_files(config: &RenderedConfig) -> Vec<&String> {
    config
        .files
        .keys()
        .filter(|p| p.ends_with("/hosts.toml"))
        .collect()
}

const K3S_P2P: Flavor = Flavor::K3s {
    embedded_registry: true,
};
const RKE2_P2P: Flavor = Flavor::Rke2 {
    embedded_registry: true,
};

#[test]
fn a_registry_without_endpoints_is_listed_for_the_embedded_registry_alone() {
    let hub = resolved(&mirror("hub", "docker.io", &[], true));
    let everything = resolved(&mirror("all", "*", &[], true));
    for (flavor, dist) in [(K3S_P2P, "k3s"), (RKE2_P2P, "rke2")] {
        let config = render(&[&hub, &everything], &flavor).unwrap();
        let yaml: serde_yaml::Value =
            serde_yaml::from_str(&registries_yaml(&config, dist)).unwrap();
        // As the k3s documentation writes it: listed, with no endpoint.
        for registry in ["docker.io", "*"] {
            let entry = &yaml["mirrors"][registry];
            assert!(entry.is_mapping(), "{dist}: {registry} listed: {yaml:?}");
            assert!(entry.get("endpoint").is_none(), "{dist}: {yaml:?}");
        }
        assert_eq!(config.flavor, format!("{dist}+embedded-registry"));
        assert!(config.probes.is_empty(), "no endpoint of ours to probe");
    }
    // The `*` key is quoted, as k3s requires.
    let config = render(&[&everything], &K3S_P2P).unwrap();
    assert!(
        registries_yaml(&config, "k3s").contains("'*': {}"),
        "{}",
        registries_yaml(&config, "k3s")
    );
}

#[test]
fn where_k3s_runs_the_embedded_registry_regmirror_writes_no_hosts_toml_and_every_change_restarts() {
    let before = resolved(&mirror(
        "hub",
        "docker.io",
        &["https://mirror-a.example.com"],
        false,
    ));
    let after = resolved(&mirror(
        "hub",
        "docker.io",
        &["https://mirror-b.example.com"],
        false,
    ));

    // Without it, k3s's hosts.toml files are written, and an endpoint change is live.
    let (old, new) = (
        render(&[&before], &Flavor::K3S).unwrap(),
        render(&[&after], &Flavor::K3S).unwrap(),
    );
    assert_eq!(
        hosts_files(&new),
        ["/var/lib/rancher/k3s/agent/etc/containerd/certs.d/docker.io/hosts.toml"]
    );
    assert_eq!(activation(Some(&old), &new), Activation::Hot);

    // With it, k3s alone writes them (its P2P endpoint first): regmirror's would drop that
    // endpoint. The same change then takes a restart, and so does a first config.
    let (old, new) = (
        render(&[&before], &K3S_P2P).unwrap(),
        render(&[&after], &K3S_P2P).unwrap(),
    );
    assert!(hosts_files(&old).is_empty(), "{:?}", old.files.keys());
    assert!(hosts_files(&new).is_empty(), "{:?}", new.files.keys());
    assert!(registries_yaml(&new, "k3s").contains("https://mirror-b.example.com"));
    assert_eq!(activation(Some(&old), &new), Activation::Restart);
    assert_eq!(activation(None, &new), Activation::Restart);
    assert_eq!(activation(Some(&new), &new), Activation::Hot);
    // What the node will try after its peers is still checked once k3s is back.
    assert_eq!(
        new.probes["docker.io"]
            .iter()
            .map(|p| p.url.as_str())
            .collect::<Vec<_>>(),
        ["https://mirror-b.example.com/v2"]
    );

    // A node that turns the embedded registry on moves to a config without our hosts.toml
    // files, by a restart after which k3s writes its own.
    let plain = render(&[&before], &Flavor::K3S).unwrap();
    assert_eq!(activation(Some(&plain), &old), Activation::Restart);
}

#[test]
fn other_flavors_refuse_a_mirror_that_asks_for_it_naming_the_field() {
    let hub = resolved(&mirror(
        "hub",
        "docker.io",
        &["https://mirror.example.com"],
        true,
    ));
    for flavor in ["containerd", "containerd:/opt/certs.d", "cri-o"] {
        let flavor: Flavor = flavor.parse().unwrap();
        let found = problems(&[&hub], &flavor);
        assert_eq!(found.len(), 1, "{flavor}: {found:?}");
        let message = found[0].to_string();
        assert!(
            message.starts_with("RegistryMirror hub: spec.embeddedRegistry: "),
            "{message}"
        );
        assert!(message.contains("only k3s and RKE2"), "{message}");
    }
    // k3s and RKE2 take it whether or not they run the embedded registry yet: the mirror's
    // status says which nodes do not.
    for flavor in [Flavor::K3S, Flavor::RKE2, K3S_P2P, RKE2_P2P] {
        assert!(problems(&[&hub], &flavor).is_empty(), "{flavor}");
    }
}

#[test]
fn no_endpoints_is_refused_unless_the_mirror_asks_for_the_embedded_registry() {
    let err = resolve(
        &mirror("none", "docker.io", &[], false),
        &Sources::new(),
        &RefPolicy::new(NS),
    )
    .unwrap_err();
    assert_eq!(err[0].field, "spec.endpoints");
    assert!(
        err[0]
            .to_string()
            .contains("unless embeddedRegistry is true"),
        "{}",
        err[0]
    );
    assert!(resolve(
        &mirror("none", "docker.io", &[], true),
        &Sources::new(),
        &RefPolicy::new(NS)
    )
    .is_ok());
}

#[test]
fn a_pull_on_such_a_node_asks_the_peers_first_except_for_latest() {
    let hub = resolved(&mirror(
        "hub",
        "docker.io",
        &["https://mirror.example.com"],
        true,
    ));
    let k8s = resolved(&mirror("k8s", "registry.k8s.io", &[], true));
    let config = render(&[&hub, &k8s], &K3S_P2P).unwrap();
    assert_eq!(config.peer_registries, ["docker.io", "registry.k8s.io"]);

    let nginx = route(&config, "nginx:1.27").unwrap();
    assert!(nginx.peers);
    assert_eq!(
        nginx
            .attempts
            .iter()
            .map(|a| (a.endpoint.as_str(), a.upstream))
            .collect::<Vec<_>>(),
        [
            ("https://mirror.example.com/v2", false),
            ("https://registry-1.docker.io/v2", true)
        ]
    );
    let shown = nginx.to_string();
    assert!(
        shown.starts_with("docker.io/library/nginx:1.27 on a k3s+embedded-registry node: this node's peers (k3s's embedded registry mirror), then the mirrors of \"docker.io\""),
        "{shown}"
    );
    assert!(shown.contains("\n  0. this node's peers"), "{shown}");

    // A registry listed for the peers alone: them, then the registry itself.
    let pause = route(&config, "registry.k8s.io/pause:3.10").unwrap();
    assert!(pause.peers);
    assert_eq!(pause.entry, None);
    assert_eq!(pause.attempts.len(), 1);
    assert!(pause.attempts[0].upstream);

    // k3s's embedded registry never serves `latest` from peers; nor does a node without it.
    assert!(!route(&config, "nginx").unwrap().peers);
    assert!(
        !route(&config, "quay.io/prometheus/prometheus:v3.0.0")
            .unwrap()
            .peers
    );
    let plain = render(&[&hub], &Flavor::K3S).unwrap();
    assert!(plain.peer_registries.is_empty());
    assert!(!route(&plain, "nginx:1.27").unwrap().peers);
}

#[test]
fn a_registry_listed_for_the_peers_alone_does_not_take_the_wildcards_endpoints() {
    // k3s writes docker.io a hosts.toml of its own (its peers, then the registry): containerd
    // never reads the wildcard's for it.
    let hub = resolved(&mirror("hub", "docker.io", &[], true));
    let all = resolved(&mirror("all", "*", &["https://mirror.example.com"], false));
    let config = render(&[&hub, &all], &K3S_P2P).unwrap();
    let nginx = route(&config, "nginx:1.27").unwrap();
    assert_eq!(nginx.entry, None);
    assert!(nginx.peers);
    assert_eq!(nginx.attempts.len(), 1);
    assert!(nginx.attempts[0].upstream);
    // Another registry goes through the wildcard, after the peers (`*` is listed too).
    let quay = route(&config, "quay.io/prometheus/prometheus:v3.0.0").unwrap();
    assert_eq!(quay.entry.as_deref(), Some("*"));
    assert!(quay.peers);
    assert_eq!(quay.attempts[0].endpoint, "https://mirror.example.com/v2");
}
