//! The pure pipeline — resolve, assemble, render — on hand-built inputs and on generated ones.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use proptest::prelude::*;
use regmirror_core::activation::{activation, Activation};
use regmirror_core::api::{
    Endpoint, EndpointAuth, ObjectRef, RegistryMirror, RegistryMirrorSpec, Rewrite,
};
use regmirror_core::assemble::{assemble, ConflictKind};
use regmirror_core::model::{Credentials, ResolvedMirror};
use regmirror_core::node::{Flavor, NodeInfo};
use regmirror_core::problem::Reason;
use regmirror_core::render::render;
use regmirror_core::resolve::resolve;
use regmirror_core::sources::{RefPolicy, SourceKind, SourceObject, Sources};

const NS: &str = "regmirror-system";

/// A credential Secret that lets endpoints below example.com use it.
fn secret(type_: &str, pairs: &[(&str, &str)]) -> SourceObject {
    SourceObject {
        type_: Some(type_.into()),
        data: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        allowed_hosts: Some("*.example.com".into()),
    }
}

fn mirror(name: &str, registry: &str, urls: &[&str], auth: Option<&str>) -> RegistryMirror {
    let endpoints = urls
        .iter()
        .map(|url| Endpoint {
            url: url.to_string(),
            auth: auth.map(EndpointAuth::from_secret),
            tls: None,
        })
        .collect();
    RegistryMirror::new(
        name,
        RegistryMirrorSpec {
            cache: None,
            embedded_registry: false,
            registry: registry.into(),
            endpoints,
            rewrites: vec![],
            node_selector: None,
        },
    )
}

fn credentials_from(object: SourceObject, url: &str) -> Result<Option<Credentials>, Reason> {
    let mut sources = Sources::new();
    sources.insert(SourceKind::Secret, NS, "pull", object);
    resolve(
        &mirror("m", "docker.io", &[url], Some("pull")),
        &sources,
        &RefPolicy::new(NS),
    )
    .map(|m| m.endpoints[0].settings.auth.clone())
    .map_err(|mut e| e.remove(0).reason)
}

#[test]
fn every_documented_credential_form_resolves() {
    let basic = Credentials::Basic {
        username: "u".into(),
        password: "p:w".into(),
    };
    let url = "https://mirror.example.com:5000";
    assert_eq!(
        credentials_from(
            secret(
                "kubernetes.io/basic-auth",
                &[("username", "u"), ("password", "p:w")]
            ),
            url
        ),
        Ok(Some(basic.clone()))
    );
    assert_eq!(
        credentials_from(
            secret("Opaque", &[("username", "u"), ("password", "p:w")]),
            url
        ),
        Ok(Some(basic.clone()))
    );
    assert_eq!(
        credentials_from(secret("Opaque", &[("auth", "dTpwOnc=")]), url),
        Ok(Some(basic.clone()))
    );
    assert_eq!(
        credentials_from(secret("Opaque", &[("identityToken", "tok")]), url),
        Ok(Some(Credentials::IdentityToken("tok".into())))
    );
    assert_eq!(
        credentials_from(secret("Opaque", &[("token", "tok")]), url),
        Ok(Some(Credentials::BearerToken("tok".into())))
    );
    // dockerconfigjson keys may be URLs; the entry for the endpoint's host is used.
    let json = r#"{"auths":{"https://other.example.com/v1/":{"auth":"eDp5"},"https://mirror.example.com:5000":{"username":"u","password":"p:w"}}}"#;
    assert_eq!(
        credentials_from(
            secret(
                "kubernetes.io/dockerconfigjson",
                &[(".dockerconfigjson", json)]
            ),
            url
        ),
        Ok(Some(basic))
    );
}

#[test]
fn unusable_credentials_are_refused_with_the_reason() {
    let url = "https://mirror.example.com:5000";
    let reason = |object| credentials_from(object, url).unwrap_err().to_string();
    assert!(
        reason(secret("Opaque", &[("username", "u"), ("token", "t")]))
            .contains("several kinds of credentials")
    );
    assert!(reason(secret("Opaque", &[("user", "u")]))
        .contains("needs username+password, auth, identityToken or token"));
    assert!(reason(secret("Opaque", &[("auth", "not base64!")])).contains("not base64"));
    assert!(reason(secret("kubernetes.io/tls", &[("tls.crt", "x")]))
        .contains("cannot hold registry credentials"));
    assert!(
        reason(secret("kubernetes.io/basic-auth", &[("username", "u")]))
            .contains("has no key \"password\"")
    );
    let json = r#"{"auths":{"elsewhere.example.com":{"auth":"eDp5"}}}"#;
    assert!(reason(secret(
        "kubernetes.io/dockerconfigjson",
        &[(".dockerconfigjson", json)]
    ))
    .contains("no entry for host \"mirror.example.com:5000\""));
}

#[test]
fn secrets_never_show_in_debug_output() {
    let mut sources = Sources::new();
    sources.insert(
        SourceKind::Secret,
        NS,
        "pull",
        secret(
            "kubernetes.io/basic-auth",
            &[("username", "u"), ("password", "hunter2-secret")],
        ),
    );
    let resolved = resolve(
        &mirror("m", "docker.io", &["https://m.example.com"], Some("pull")),
        &sources,
        &RefPolicy::new(NS),
    )
    .unwrap();
    for flavor in [Flavor::K3S, Flavor::Crio, "containerd".parse().unwrap()] {
        let config = render(&[&resolved], &flavor).unwrap();
        let debug = format!("{resolved:?} {config:?} {sources:?}");
        assert!(!debug.contains("hunter2-secret"), "{flavor}: {debug}");
        assert!(
            !debug.contains(&base64_of("u:hunter2-secret")),
            "{flavor}: {debug}"
        );
        assert!(
            config.files.values().any(|f| f.mode == 0o600),
            "{flavor}: the credentials file must be 0600"
        );
    }
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn references_outside_allowed_namespaces_are_refused_even_if_the_secret_exists() {
    let mut sources = Sources::new();
    sources.insert(
        SourceKind::Secret,
        "kube-system",
        "pull",
        secret(
            "kubernetes.io/basic-auth",
            &[("username", "u"), ("password", "p")],
        ),
    );
    let mut m = mirror("m", "docker.io", &["https://m.example.com"], None);
    m.spec.endpoints[0].auth = Some(EndpointAuth {
        secret_ref: ObjectRef {
            name: "pull".into(),
            namespace: Some("kube-system".into()),
        },
    });
    let errors = resolve(&m, &sources, &RefPolicy::new(NS)).unwrap_err();
    assert_eq!(errors[0].field, "spec.endpoints[0].auth.secretRef");
    assert!(matches!(errors[0].reason, Reason::NamespaceRefused { .. }));
    let allowed = RefPolicy {
        operator_namespace: NS.into(),
        allowed_namespaces: vec!["kube-system".into()],
    };
    assert!(resolve(&m, &sources, &allowed).is_ok());
}

#[test]
fn cel_rules_run_offline_like_on_the_api_server() {
    assert!(mirror("ok", "docker.io", &["https://m.example.com"], None)
        .validate_cel()
        .is_ok());
    assert!(mirror("empty", "docker.io", &[], None)
        .validate_cel()
        .is_err());
    assert!(
        mirror("scheme", "docker.io", &["ftp://m.example.com"], None)
            .validate_cel()
            .is_err()
    );
    assert!(mirror(
        "name",
        "docker.io/library",
        &["https://m.example.com"],
        None
    )
    .validate_cel()
    .is_err());
    assert!(mirror("star", "*", &["m.example.com:5000"], None)
        .validate_cel()
        .is_ok());
}

fn node(labels: &[(&str, &str)], flavor: Flavor) -> NodeInfo {
    NodeInfo {
        name: "n".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        flavor,
    }
}

#[test]
fn conflicts_are_settled_by_name_and_keep_the_loser_off_the_node_entirely() {
    let sources = Sources::new();
    let policy = RefPolicy::new(NS);
    let resolved: Vec<ResolvedMirror> = [
        mirror("b-hub", "docker.io", &["https://b.example.com"], None),
        mirror("a-hub", "docker.io", &["https://a.example.com"], None),
        mirror("c-quay", "quay.io", &["https://q.example.com"], None),
    ]
    .iter()
    .map(|m| resolve(m, &sources, &policy).unwrap())
    .collect();
    let assembly = assemble(&resolved, &node(&[], Flavor::K3S));
    let names: Vec<&str> = assembly.mirrors.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["a-hub", "c-quay"]);
    assert_eq!(assembly.conflicts.len(), 1);
    assert_eq!(assembly.conflicts[0].mirror, "b-hub");
    assert_eq!(assembly.conflicts[0].winner, "a-hub");
    assert_eq!(
        assembly.conflicts[0].what,
        ConflictKind::Registry("docker.io".into())
    );
}

#[test]
fn one_host_with_two_credentials_is_a_conflict() {
    let mut sources = Sources::new();
    sources.insert(
        SourceKind::Secret,
        NS,
        "one",
        secret(
            "kubernetes.io/basic-auth",
            &[("username", "u1"), ("password", "p")],
        ),
    );
    sources.insert(
        SourceKind::Secret,
        NS,
        "two",
        secret(
            "kubernetes.io/basic-auth",
            &[("username", "u2"), ("password", "p")],
        ),
    );
    let policy = RefPolicy::new(NS);
    let resolved = vec![
        resolve(
            &mirror(
                "hub",
                "docker.io",
                &["https://shared.example.com"],
                Some("one"),
            ),
            &sources,
            &policy,
        )
        .unwrap(),
        resolve(
            &mirror(
                "quay",
                "quay.io",
                &["https://shared.example.com"],
                Some("two"),
            ),
            &sources,
            &policy,
        )
        .unwrap(),
    ];
    let assembly = assemble(&resolved, &node(&[], Flavor::K3S));
    assert_eq!(assembly.mirrors.len(), 1);
    assert_eq!(
        assembly.conflicts[0].what,
        ConflictKind::HostSettings("shared.example.com".into())
    );
}

#[test]
fn k3s_restarts_only_for_credential_changes() {
    let mut sources = Sources::new();
    sources.insert(
        SourceKind::Secret,
        NS,
        "pull",
        secret(
            "kubernetes.io/basic-auth",
            &[("username", "u"), ("password", "p1")],
        ),
    );
    let policy = RefPolicy::new(NS);
    let render_k3s = |m: &RegistryMirror, sources: &Sources| {
        render(&[&resolve(m, sources, &policy).unwrap()], &Flavor::K3S).unwrap()
    };
    let plain = render_k3s(
        &mirror("hub", "docker.io", &["https://a.example.com"], None),
        &sources,
    );
    let moved = render_k3s(
        &mirror(
            "hub",
            "docker.io",
            &["https://b.example.com", "https://a.example.com"],
            None,
        ),
        &sources,
    );
    let with_auth = render_k3s(
        &mirror("hub", "docker.io", &["https://a.example.com"], Some("pull")),
        &sources,
    );
    sources.insert(
        SourceKind::Secret,
        NS,
        "pull",
        secret(
            "kubernetes.io/basic-auth",
            &[("username", "u"), ("password", "p2")],
        ),
    );
    let rotated = render_k3s(
        &mirror("hub", "docker.io", &["https://a.example.com"], Some("pull")),
        &sources,
    );

    assert_eq!(
        activation(None, &plain),
        Activation::Hot,
        "a first config without credentials needs no restart"
    );
    assert_eq!(
        activation(Some(&plain), &moved),
        Activation::Hot,
        "endpoint changes are hot (hosts.toml)"
    );
    assert_eq!(
        activation(Some(&plain), &with_auth),
        Activation::Restart,
        "new credentials live in the CRI config"
    );
    assert_eq!(
        activation(Some(&with_auth), &rotated),
        Activation::Restart,
        "a rotated password too"
    );
    assert_eq!(activation(Some(&rotated), &rotated), Activation::Hot);
    assert_ne!(with_auth.digest(), rotated.digest());
}

#[test]
fn flavors_that_cannot_express_a_field_say_so() {
    let mut m = mirror("rancher", "docker.io", &["https://m.example.com"], None);
    m.spec.rewrites = vec![Rewrite {
        pattern: "^rancher/(.*)".into(),
        replacement: "mirror/$1".into(),
    }];
    let resolved = resolve(&m, &Sources::new(), &RefPolicy::new(NS)).unwrap();
    assert!(render(&[&resolved], &Flavor::K3S).is_ok());
    let e = render(&[&resolved], &Flavor::Crio).unwrap_err();
    assert_eq!(
        (e.mirror.as_str(), e.field.as_str(), e.flavor),
        ("rancher", "spec.rewrites", "cri-o")
    );
    let star = resolve(
        &mirror("all", "*", &["https://m.example.com"], None),
        &Sources::new(),
        &RefPolicy::new(NS),
    )
    .unwrap();
    assert!(render(&[&star], &Flavor::Crio)
        .unwrap_err()
        .to_string()
        .contains("'*'"));

    // k3s itself writes rewrites into hosts.toml unescaped, and only k3s and RKE2 take
    // rewrites: what k3s would break is refused for every flavor, up front.
    m.spec.rewrites[0].pattern = r"^rancher\.io/(.*)".into();
    let errors = resolve(&m, &Sources::new(), &RefPolicy::new(NS)).unwrap_err();
    assert_eq!(errors[0].field, "spec.rewrites[0].pattern");
    assert!(errors[0].to_string().contains("unescaped"), "{}", errors[0]);
    let (partial, _) =
        regmirror_core::resolve::resolve_partially(&m, &Sources::new(), &RefPolicy::new(NS));
    assert!(render(&[&partial], &Flavor::K3S)
        .unwrap_err()
        .what
        .contains("unescaped"));
}

// ---- generated inputs ----

fn host() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![
            "m1.example.com",
            "m2.example.com",
            "127.0.0.1",
            "mirror.internal",
        ]),
        prop::option::of(1u16..65535),
    )
        .prop_map(|(h, port)| port.map_or(h.to_owned(), |p| format!("{h}:{p}")))
}

fn endpoint_url() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["https://", "http://", ""]),
        host(),
        prop::sample::select(vec!["", "/v2", "/proxy/docker", "/"]),
    )
        .prop_map(|(s, h, p)| format!("{s}{h}{p}"))
}

fn mirrors() -> impl Strategy<Value = Vec<RegistryMirror>> {
    let one = (
        prop::sample::select(vec![
            "docker.io",
            "quay.io",
            "ghcr.io",
            "registry.k8s.io",
            "*",
            "127.0.0.1:5000",
        ]),
        prop::collection::vec(endpoint_url(), 1..4),
        prop::option::of(prop::sample::select(vec!["eu", "us"])),
    );
    prop::collection::vec(one, 0..8).prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (registry, urls, region))| {
                let mut m = mirror(
                    &format!("m{i}"),
                    registry,
                    &urls.iter().map(String::as_str).collect::<Vec<_>>(),
                    None,
                );
                m.spec.node_selector = region.map(|r| LabelSelector {
                    match_labels: Some(BTreeMap::from([("region".to_string(), r.to_string())])),
                    ..Default::default()
                });
                m
            })
            .collect()
    })
}

fn resolve_all(mirrors: &[RegistryMirror]) -> Vec<ResolvedMirror> {
    mirrors
        .iter()
        .filter_map(|m| resolve(m, &Sources::new(), &RefPolicy::new(NS)).ok())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the mirrors, rendering never panics, and every file parses as what it claims.
    #[test]
    fn rendered_files_always_parse(mirrors in mirrors(), region in prop::sample::select(vec!["eu", "us", "none"])) {
        let resolved = resolve_all(&mirrors);
        for flavor in [Flavor::K3S, Flavor::RKE2, "containerd".parse().unwrap(), Flavor::Crio] {
            let node = node(&[("region", region)], flavor.clone());
            let assembly = assemble(&resolved, &node);
            let Ok(config) = render(&assembly.mirrors, &flavor) else { continue };
            for (path, file) in &config.files {
                if path.ends_with(".toml") || path.ends_with(".conf") {
                    prop_assert!(toml::from_str::<toml::Table>(&file.content).is_ok(), "{path}:\n{}", file.content);
                } else if path.ends_with(".yaml") {
                    prop_assert!(serde_yaml::from_str::<serde_yaml::Value>(&file.content).is_ok(), "{path}");
                }
                prop_assert!(path.starts_with('/') && !path.contains("/../"), "{path}");
            }
        }
    }

    /// The order objects arrive in (watch events, file order) never changes the bytes.
    #[test]
    fn rendering_ignores_input_order(mirrors in mirrors()) {
        let resolved = resolve_all(&mirrors);
        let mut reversed = resolved.clone();
        reversed.reverse();
        for flavor in [Flavor::K3S, "containerd".parse().unwrap(), Flavor::Crio] {
            let node = node(&[("region", "eu")], flavor.clone());
            let a = render(&assemble(&resolved, &node).mirrors, &flavor);
            let b = render(&assemble(&reversed, &node).mirrors, &flavor);
            prop_assert_eq!(a.map(|c| c.digest()), b.map(|c| c.digest()));
        }
    }

    /// A node never gets two mirrors for one registry.
    #[test]
    fn a_node_gets_at_most_one_mirror_per_registry(mirrors in mirrors()) {
        let resolved = resolve_all(&mirrors);
        let assembly = assemble(&resolved, &node(&[("region", "eu")], Flavor::K3S));
        let mut registries: Vec<&str> = assembly.mirrors.iter().map(|m| m.registry.as_str()).collect();
        let before = registries.len();
        registries.dedup();
        prop_assert_eq!(before, registries.len());
    }
}

#[test]
fn a_malformed_docker_config_is_reported_without_its_content() {
    let object = secret(
        "kubernetes.io/dockerconfigjson",
        &[(
            ".dockerconfigjson",
            r#"{"auths":{"mirror.example.com:5000":"puller:hunter2"}}"#,
        )],
    );
    let reason = credentials_from(object, "https://mirror.example.com:5000")
        .unwrap_err()
        .to_string();
    assert!(reason.contains("is not a docker config"), "{reason}");
    assert!(!reason.contains("hunter2"), "the password leaked: {reason}");
}
