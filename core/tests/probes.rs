//! The renderer says what to verify: every rendered configuration carries, per registry, the
//! mirror endpoints its runtime will try, in order, with the TLS files the runtime will use.
//! Shown here against the files themselves (the hosts.toml `[host]` tables, the
//! registries.conf mirrors) on hand-built and generated mirrors, for every flavor.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use regmirror_core::model::{
    api_host, ClientCert, EndpointUrl, HostSettings, ResolvedEndpoint, ResolvedMirror, ResolvedTls,
    Scheme,
};
use regmirror_core::node::Flavor;
use regmirror_core::render::{render, ClientFiles, ProbeTarget, RenderedConfig};

const CA: &str = "-----BEGIN CERTIFICATE-----\nQ0E=\n-----END CERTIFICATE-----\n";

fn url(scheme: Scheme, host: &str, path: &str) -> EndpointUrl {
    EndpointUrl {
        scheme,
        host: host.into(),
        path: path.into(),
    }
}

fn endpoint(url: EndpointUrl, settings: HostSettings) -> ResolvedEndpoint {
    ResolvedEndpoint {
        url,
        settings,
        credentials_from: None,
    }
}

fn mirror(registry: &str, endpoints: Vec<ResolvedEndpoint>) -> ResolvedMirror {
    ResolvedMirror {
        name: format!("m-{registry}"),
        registry: registry.into(),
        endpoints,
        rewrites: vec![],
        node_selector: None,
        embedded_registry: false,
    }
}

fn tls(ca: bool, client: bool, skip: bool) -> HostSettings {
    HostSettings {
        auth: None,
        tls: ResolvedTls {
            ca: ca.then(|| CA.to_owned()),
            client: client.then(|| ClientCert {
                cert: CA.to_owned(),
                key: "-----BEGIN PRIVATE KEY-----\nSw==\n-----END PRIVATE KEY-----\n".into(),
            }),
            insecure_skip_verify: skip,
        },
    }
}

fn target(url: &str, ca: Option<&str>, client: Option<(&str, &str)>, skip: bool) -> ProbeTarget {
    ProbeTarget {
        url: url.into(),
        ca_file: ca.map(String::from),
        client: client.map(|(cert, key)| ClientFiles {
            cert_file: cert.into(),
            key_file: key.into(),
        }),
        insecure_skip_verify: skip,
        rewrites: Default::default(),
        repository_prefix: None,
    }
}

/// docker.io through a mirror with a CA and a client certificate, an insecure one, a plain
/// http one on a path, and Docker Hub itself last; quay.io only with a CA for itself.
fn example() -> Vec<ResolvedMirror> {
    vec![
        mirror(
            "docker.io",
            vec![
                endpoint(
                    url(Scheme::Https, "m1.example.com:5000", ""),
                    tls(true, true, false),
                ),
                endpoint(
                    url(Scheme::Https, "m2.example.com", ""),
                    tls(false, false, true),
                ),
                endpoint(
                    url(Scheme::Http, "m3.example.com", "/v2/proxy/docker"),
                    HostSettings::default(),
                ),
                endpoint(
                    url(Scheme::Https, "registry-1.docker.io", ""),
                    HostSettings::default(),
                ),
            ],
        ),
        mirror(
            "quay.io",
            vec![endpoint(
                url(Scheme::Https, "quay.io", ""),
                tls(true, false, false),
            )],
        ),
    ]
}

fn rendered(mirrors: &[ResolvedMirror], flavor: &Flavor) -> RenderedConfig {
    let refs: Vec<&ResolvedMirror> = mirrors.iter().collect();
    render(&refs, flavor).unwrap()
}

#[test]
fn k3s_and_rke2_probe_the_hosts_toml_mirrors_with_the_certificates_under_their_config_dir() {
    for (flavor, dir) in [(Flavor::K3S, "k3s"), (Flavor::RKE2, "rke2")] {
        let certs = format!("/etc/rancher/{dir}/regmirror-certs");
        let config = rendered(&example(), &flavor);
        let expected = BTreeMap::from([(
            "docker.io".to_owned(),
            vec![
                target(
                    "https://m1.example.com:5000/v2",
                    Some(&format!("{certs}/m1.example.com:5000/ca.crt")),
                    Some((
                        &format!("{certs}/m1.example.com:5000/client.crt"),
                        &format!("{certs}/m1.example.com:5000/client.key"),
                    )),
                    false,
                ),
                target("https://m2.example.com/v2", None, None, true),
                target("http://m3.example.com/v2/proxy/docker", None, None, false),
            ],
        )]);
        assert_eq!(config.probes, expected, "{flavor}");
        assert_tls_files_are_in_the_config(&config);
    }
}

#[test]
fn containerd_probes_with_the_certificates_beside_each_hosts_toml() {
    let flavor = Flavor::Containerd {
        hosts_dir: "/etc/containerd/certs.d".into(),
    };
    let config = rendered(&example(), &flavor);
    let dir = "/etc/containerd/certs.d/docker.io/m1.example.com:5000";
    let expected = BTreeMap::from([(
        "docker.io".to_owned(),
        vec![
            target(
                "https://m1.example.com:5000/v2",
                Some(&format!("{dir}/ca.crt")),
                Some((&format!("{dir}/client.crt"), &format!("{dir}/client.key"))),
                false,
            ),
            target("https://m2.example.com/v2", None, None, true),
            target("http://m3.example.com/v2/proxy/docker", None, None, false),
        ],
    )]);
    assert_eq!(config.probes, expected);
    assert_tls_files_are_in_the_config(&config);
}

#[test]
fn crio_probes_each_mirror_api_root_with_its_certs_d_files() {
    let config = rendered(&example(), &Flavor::Crio);
    let dir = "/etc/containers/certs.d/m1.example.com:5000";
    let expected = BTreeMap::from([(
        "docker.io".to_owned(),
        vec![
            target(
                "https://m1.example.com:5000/v2",
                Some(&format!("{dir}/ca.crt")),
                Some((&format!("{dir}/client.cert"), &format!("{dir}/client.key"))),
                false,
            ),
            target("https://m2.example.com/v2", None, None, true),
            // A location's path is a repository prefix: the API root is the host's /v2.
            ProbeTarget {
                repository_prefix: Some("proxy/docker".into()),
                ..target("http://m3.example.com/v2", None, None, false)
            },
        ],
    )]);
    assert_eq!(config.probes, expected);
    assert_tls_files_are_in_the_config(&config);
}

#[test]
fn probes_travel_in_the_json_and_an_empty_list_leaves_the_digest_as_it_was() {
    let config = rendered(&example(), &Flavor::Crio);
    let json = serde_json::to_value(&config).unwrap();
    assert!(
        json["probes"]["docker.io"][0]["caFile"].is_string(),
        "{json}"
    );
    let back: RenderedConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back, config);
    assert_eq!(back.digest(), config.digest());

    // No mirror endpoint to probe: the JSON (and so the digest and the Secret's name) is what
    // it was before configs carried probes.
    let quay_only = rendered(&example()[1..], &Flavor::K3S);
    assert!(quay_only.probes.is_empty());
    let json = serde_json::to_value(&quay_only).unwrap();
    assert!(json.get("probes").is_none(), "{json}");
    // And a config written before probes existed reads back with none.
    let mut old = json.clone();
    old.as_object_mut().unwrap().remove("probes");
    let old: RenderedConfig = serde_json::from_value(old).unwrap();
    assert_eq!(old, quay_only);
}

/// Every TLS path a probe names is a file of the configuration.
fn assert_tls_files_are_in_the_config(config: &RenderedConfig) {
    for target in config.probes.values().flatten() {
        let client = target
            .client
            .iter()
            .flat_map(|c| [&c.cert_file, &c.key_file]);
        for path in target.ca_file.iter().chain(client) {
            assert!(
                config.files.contains_key(path),
                "{} names {path}, which the config does not write",
                target.url
            );
        }
    }
}

// ---- against the files, on generated mirrors ----

/// The `[host."…"]` tables of a hosts.toml, in file order, as containerd reads them: relative
/// paths are relative to the file's directory.
fn hosts_toml_targets(path: &str, text: &str) -> Vec<ProbeTarget> {
    let doc: toml::Table = toml::from_str(text).unwrap();
    let dir = Path::new(path).parent().unwrap();
    let absolute = |p: &str| {
        if p.starts_with('/') {
            p.to_owned()
        } else {
            dir.join(p).display().to_string()
        }
    };
    let hosts = doc.get("host").and_then(|h| h.as_table());
    text.lines()
        .filter_map(|line| line.strip_prefix("[host.")?.strip_suffix(']'))
        .map(|quoted| {
            let key: toml::Table = toml::from_str(&format!("k = {quoted}")).unwrap();
            let url = key["k"].as_str().unwrap().to_owned();
            let table = hosts.unwrap()[&url].as_table().unwrap();
            ProbeTarget {
                ca_file: table
                    .get("ca")
                    .map(|ca| absolute(ca.as_array().unwrap()[0].as_str().unwrap())),
                client: table.get("client").map(|client| {
                    let pair = client.as_array().unwrap()[0].as_array().unwrap();
                    ClientFiles {
                        cert_file: absolute(pair[0].as_str().unwrap()),
                        key_file: absolute(pair[1].as_str().unwrap()),
                    }
                }),
                insecure_skip_verify: table
                    .get("skip_verify")
                    .is_some_and(|v| v.as_bool().unwrap()),
                rewrites: table
                    .get("rewrite")
                    .map(|r| {
                        r.as_table()
                            .unwrap()
                            .iter()
                            .map(|(p, r)| (p.clone(), r.as_str().unwrap().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default(),
                repository_prefix: None,
                url,
            }
        })
        .collect()
}

/// The hosts.toml of `registry` in a config.
fn hosts_toml_of<'c>(config: &'c RenderedConfig, registry: &str) -> (&'c String, &'c str) {
    let dir = if registry == "*" {
        "_default"
    } else {
        registry
    };
    let suffix = format!("/{dir}/hosts.toml");
    config
        .files
        .iter()
        .find(|(path, _)| path.ends_with(&suffix))
        .map(|(path, file)| (path, file.content.as_str()))
        .unwrap_or_else(|| panic!("no hosts.toml for {registry}"))
}

fn host() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![
            "m1.example.com",
            "m2.example.com",
            "127.0.0.1",
            "registry-1.docker.io",
            "quay.io",
        ]),
        prop::option::of(prop::sample::select(vec![443u16, 5000])),
    )
        .prop_map(|(h, port)| port.map_or(h.to_owned(), |p| format!("{h}:{p}")))
}

fn endpoint_url() -> impl Strategy<Value = EndpointUrl> {
    (
        prop::sample::select(vec![Scheme::Https, Scheme::Http]),
        host(),
        prop::sample::select(vec!["", "/v2", "/proxy/docker"]),
    )
        .prop_map(|(scheme, host, path)| url(scheme, &host, path))
}

/// Mirrors for distinct registries; each endpoint host has one set of TLS settings, drawn
/// from `flags` by the host's name, as assembled mirrors do.
fn mirrors() -> impl Strategy<Value = Vec<ResolvedMirror>> {
    (
        prop::collection::btree_map(
            prop::sample::select(vec!["docker.io", "quay.io", "ghcr.io", "*"]),
            prop::collection::vec(endpoint_url(), 1..4),
            0..4,
        ),
        prop::collection::vec((any::<bool>(), any::<bool>(), any::<bool>()), 8),
    )
        .prop_map(|(by_registry, flags)| {
            let settings = |host: &str| {
                let i = host.bytes().map(usize::from).sum::<usize>() % flags.len();
                let (ca, client, skip) = flags[i];
                tls(ca, client, skip)
            };
            by_registry
                .into_iter()
                .map(|(registry, mut urls)| {
                    // One endpoint per API root, as resolving demands.
                    let root = |u: &EndpointUrl| {
                        let path = if u.path == "/v2" { "" } else { u.path.as_str() };
                        (u.scheme, api_host(&u.host), path.to_owned())
                    };
                    let mut seen = std::collections::BTreeSet::new();
                    urls.retain(|u| seen.insert(root(u)));
                    let endpoints = urls
                        .into_iter()
                        .map(|u| {
                            let s = settings(&u.host);
                            endpoint(u, s)
                        })
                        .collect();
                    mirror(registry, endpoints)
                })
                .collect()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// For k3s, RKE2 and containerd the probes are exactly the `[host]` tables of each
    /// registry's hosts.toml, in order, with the files they name.
    #[test]
    fn hosts_toml_flavors_probe_exactly_what_the_files_configure(mirrors in mirrors()) {
        for flavor in [Flavor::K3S, Flavor::RKE2, "containerd".parse().unwrap()] {
            let refs: Vec<&ResolvedMirror> = mirrors.iter().collect();
            let Ok(config) = render(&refs, &flavor) else { continue };
            for mirror in &mirrors {
                let (path, text) = hosts_toml_of(&config, &mirror.registry);
                let from_file = hosts_toml_targets(path, text);
                let listed = config.probes.get(&mirror.registry).cloned().unwrap_or_default();
                prop_assert_eq!(&listed, &from_file, "{} {}:\n{}", flavor, path, text);
            }
            prop_assert!(config.probes.keys().all(|r| mirrors.iter().any(|m| &m.registry == r)));
            prop_assert!(config.probes.values().all(|targets| !targets.is_empty()));
            assert_tls_files_are_in_the_config(&config);
        }
    }

    /// For CRI-O the probes are the `[[registry.mirror]]` entries of registries.conf, in
    /// order: the same host, insecure exactly when plain http or skip-verify, and the CA and
    /// client files of that host's certs.d directory.
    #[test]
    fn crio_probes_exactly_the_registries_conf_mirrors(mirrors in mirrors()) {
        let refs: Vec<&ResolvedMirror> = mirrors.iter().collect();
        let Ok(config) = render(&refs, &Flavor::Crio) else { return Ok(()) };
        let conf: toml::Table = toml::from_str(
            &config.files["/etc/containers/registries.conf.d/50-regmirror.conf"].content,
        )
        .unwrap();
        let registries = conf.get("registry").and_then(|r| r.as_array()).cloned().unwrap_or_default();
        prop_assert_eq!(registries.len(), mirrors.len());
        for registry in registries {
            let prefix = registry["prefix"].as_str().unwrap();
            let entries = registry.get("mirror").and_then(|m| m.as_array()).cloned().unwrap_or_default();
            let listed = config.probes.get(prefix).cloned().unwrap_or_default();
            prop_assert_eq!(listed.len(), entries.len(), "{}", prefix);
            for (entry, target) in entries.iter().zip(&listed) {
                let location = entry["location"].as_str().unwrap();
                let host = location.split('/').next().unwrap();
                let api = if host == "docker.io" { "registry-1.docker.io" } else { host };
                let (scheme, rest) = target.url.split_once("://").unwrap();
                prop_assert_eq!(rest, format!("{api}/v2"));
                prop_assert_eq!(
                    entry["insecure"].as_bool().unwrap(),
                    scheme == "http" || target.insecure_skip_verify
                );
                let dir = format!("/etc/containers/certs.d/{host}");
                prop_assert_eq!(
                    target.ca_file.clone(),
                    config.files.contains_key(&format!("{dir}/ca.crt")).then(|| format!("{dir}/ca.crt"))
                );
                prop_assert_eq!(
                    target.client.as_ref().map(|c| c.cert_file.clone()),
                    config.files.contains_key(&format!("{dir}/client.cert")).then(|| format!("{dir}/client.cert"))
                );
            }
        }
        assert_tls_files_are_in_the_config(&config);
    }
}
