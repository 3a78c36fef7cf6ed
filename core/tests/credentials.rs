//! Where credentials may go: only to endpoint hosts their Secret allows (issue 14.2), and never
//! over plain http unless the user wrote `http://` (issue 14.12).

use proptest::prelude::*;
use regmirror_core::api::{
    CaRef, Endpoint, EndpointAuth, EndpointTls, KeyRef, ObjectRef, RegistryMirror,
    RegistryMirrorSpec,
};
use regmirror_core::assemble::assemble;
use regmirror_core::model::{ResolvedMirror, Scheme};
use regmirror_core::node::{Flavor, NodeInfo};
use regmirror_core::problem::{FieldError, Reason};
use regmirror_core::render::{problems, render, RenderedConfig};
use regmirror_core::resolve::resolve;
use regmirror_core::sources::{RefPolicy, SourceKind, SourceObject, Sources, ALLOWED_HOSTS};

const NS: &str = "regmirror-system";

const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBlTCCATugAwIBAgIUXiPTDghu7FbVZKoOXjge0Lk8V60wCgYIKoZIzj0EAwIw
HzEdMBsGA1UEAwwUcmVnbWlycm9yIGV4YW1wbGUgQ0EwIBcNMjYxMTIyMjM1NzEw
WhgPMjEyNjEwMjkyMzU3MTBaMB8xHTAbBgNVBAMMFHJlZ21pcnJvciBleGFtcGxl
IENBMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEmIlEW4WEgeMeuUPSPT3hKn54
9iQpRWXXJqQ6YawmavibszOI005q/ouVfY9xkyl3KJp6fl0OhodmbrbrKJvRwKNT
MFEwHQYDVR0OBBYEFHVj5pOGfk38T95Ucovp2rSGnRR3MB8GA1UdIwQYMBaAFHVj
5pOGfk38T95Ucovp2rSGnRR3MA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwID
SAAwRQIhAPQOS/uDQHuqKYSTj8fzErzrHUELPsVpV5okSj8+Lk1gAiAyJJrYJAcA
EthyLiA6slpz//+uli5oXWHNnSsp7XQ+ZQ==
-----END CERTIFICATE-----
";

const CLIENT_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgXBS5F8elMMsi9abj
QjY5bcA7dHKCWeagjdUM6Ud2De+hRANCAAR1PVkNBOdpp7rlW8dsCHSNMi9tekzC
/Fejuqd6MloYvu/Dr4D1JxQQ3KZaB+vQsk+lAGD8gilnkeBis1mryEyL
-----END PRIVATE KEY-----
";

fn object(type_: Option<&str>, pairs: &[(&str, &str)], allowed: Option<&str>) -> SourceObject {
    SourceObject {
        type_: type_.map(str::to_owned),
        data: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        allowed_hosts: allowed.map(str::to_owned),
    }
}

fn basic(allowed: Option<&str>) -> SourceObject {
    object(
        Some("kubernetes.io/basic-auth"),
        &[("username", "puller"), ("password", "hunter2")],
        allowed,
    )
}

fn sources_with(name: &str, secret: SourceObject) -> Sources {
    let mut sources = Sources::new();
    sources.insert(SourceKind::Secret, NS, name, secret);
    sources.insert(
        SourceKind::Secret,
        NS,
        "client",
        object(
            Some("kubernetes.io/tls"),
            &[("tls.crt", CA), ("tls.key", CLIENT_KEY)],
            Some("mirror.example.com"),
        ),
    );
    // CAs are public: no opt-in.
    sources.insert(
        SourceKind::Secret,
        NS,
        "ca",
        object(None, &[("ca.crt", CA)], None),
    );
    sources
}

fn mirror(registry: &str, endpoints: Vec<Endpoint>) -> RegistryMirror {
    RegistryMirror::new(
        "m",
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

fn with_auth(url: &str) -> Endpoint {
    Endpoint {
        url: url.into(),
        auth: Some(EndpointAuth::from_secret("pull")),
        tls: None,
    }
}

fn resolve_one(url: &str, secret: SourceObject) -> Result<ResolvedMirror, Vec<FieldError>> {
    resolve(
        &mirror("docker.io", vec![with_auth(url)]),
        &sources_with("pull", secret),
        &RefPolicy::new(NS),
    )
}

fn refusal(url: &str, secret: SourceObject) -> FieldError {
    let mut errors = resolve_one(url, secret).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    errors.remove(0)
}

#[test]
fn a_secret_without_the_annotation_serves_no_mirror() {
    let e = refusal("https://mirror.example.com:5000", basic(None));
    assert_eq!(e.field, "spec.endpoints[0].auth.secretRef");
    let message = e.to_string();
    for part in [
        "Secret regmirror-system/pull",
        "https://mirror.example.com:5000",
        ALLOWED_HOSTS,
        "\"mirror.example.com:5000\"",
        "it has none",
    ] {
        assert!(message.contains(part), "{part:?} missing from {message}");
    }
    assert!(!message.contains("hunter2"));
}

#[test]
fn a_mirror_author_cannot_send_credentials_to_a_host_of_their_choice() {
    let secret = || basic(Some("mirror.example.com:5000, *.internal.example.com"));
    assert!(resolve_one("https://mirror.example.com:5000", secret()).is_ok());
    assert!(resolve_one("https://cache.internal.example.com", secret()).is_ok());
    for elsewhere in [
        "https://attacker.example.net",
        "https://mirror.example.com:5001",
        "https://mirror.example.com",
        "https://internal.example.com",
        "https://mirror.example.com.attacker.net:5000",
        // Same host, plain http: a different destination for the credentials.
        "http://mirror.example.com:5000",
    ] {
        let e = refusal(elsewhere, secret());
        assert!(
            matches!(e.reason, Reason::NotAllowedHost { .. }),
            "{elsewhere}: {e}"
        );
        assert!(
            e.to_string()
                .contains("now \"mirror.example.com:5000, *.internal.example.com\""),
            "{e}"
        );
    }
    let e = refusal("http://mirror.example.com:5000", secret());
    assert!(
        e.to_string()
            .contains("add \"http://mirror.example.com:5000\""),
        "{e}"
    );
    assert!(resolve_one(
        "http://mirror.example.com:5000",
        basic(Some("http://mirror.example.com:5000"))
    )
    .is_ok());
}

#[test]
fn every_kind_of_credential_secret_needs_consent_before_its_content_is_read() {
    let docker = r#"{"auths":{"attacker.example.net":{"auth":"dTpw"}}}"#;
    for secret in [
        object(
            Some("kubernetes.io/dockerconfigjson"),
            &[(".dockerconfigjson", docker)],
            None,
        ),
        object(Some("Opaque"), &[("token", "t")], Some("other.example.com")),
        object(Some("Opaque"), &[("identityToken", "t")], Some("")),
        // Content that does not even parse: consent is checked first, and nothing is quoted.
        object(Some("Opaque"), &[("auth", "not base64 at all")], None),
    ] {
        let e = refusal("https://attacker.example.net", secret);
        assert!(matches!(e.reason, Reason::NotAllowedHost { .. }), "{e}");
    }
}

#[test]
fn entries_that_are_not_host_patterns_allow_nothing_and_are_named() {
    let e = refusal(
        "https://mirror.example.com",
        basic(Some(
            "*, https://mirror.example.com/path, mirror.example.com:x",
        )),
    );
    let message = e.to_string();
    assert!(
        message.contains("not host patterns, so allowing nothing: *, https://mirror.example.com/path, mirror.example.com:x"),
        "{message}"
    );
}

#[test]
fn a_client_certificate_needs_consent_too_but_a_ca_does_not() {
    let tls = |client: bool| EndpointTls {
        ca_ref: Some(CaRef {
            secret_ref: Some(KeyRef {
                name: "ca".into(),
                namespace: None,
                key: None,
            }),
            config_map_ref: None,
        }),
        client_cert_secret_ref: client.then(|| ObjectRef::named("client")),
        insecure_skip_verify: false,
    };
    let endpoint = |url: &str, client| Endpoint {
        url: url.into(),
        auth: None,
        tls: Some(tls(client)),
    };
    let sources = sources_with("pull", basic(None));
    let policy = RefPolicy::new(NS);
    assert!(resolve(
        &mirror(
            "quay.io",
            vec![endpoint("https://elsewhere.example.com", false)]
        ),
        &sources,
        &policy
    )
    .is_ok());
    assert!(resolve(
        &mirror(
            "quay.io",
            vec![endpoint("https://mirror.example.com", true)]
        ),
        &sources,
        &policy
    )
    .is_ok());
    let errors = resolve(
        &mirror(
            "quay.io",
            vec![endpoint("https://elsewhere.example.com", true)],
        ),
        &sources,
        &policy,
    )
    .unwrap_err();
    assert_eq!(errors[0].field, "spec.endpoints[0].tls.clientCertSecretRef");
    assert!(errors[0]
        .to_string()
        .contains("Secret regmirror-system/client does not allow"));
}

#[test]
fn credentials_that_would_corrupt_generated_files_are_refused_without_being_quoted() {
    let allowed = Some("mirror.example.com");
    for (pairs, expect) in [
        (
            vec![("username", "puller"), ("password", "line\nbreak-xyzzy")],
            "control characters",
        ),
        (
            vec![("username", "pul:ler"), ("password", "x-xyzzy")],
            "contains ':'",
        ),
        (vec![("token", "tok\r\n-xyzzy")], "control characters"),
    ] {
        let secret = object(Some("Opaque"), &pairs, allowed);
        let message = refusal("https://mirror.example.com", secret).to_string();
        assert!(message.contains(expect), "{message}");
        assert!(
            !message.contains("xyzzy") && !message.contains("pul:ler"),
            "{message} quotes the Secret's content"
        );
    }
}

// ---- plain http ----

fn node(flavor: &Flavor) -> NodeInfo {
    NodeInfo {
        name: "n".into(),
        labels: Default::default(),
        flavor: flavor.clone(),
    }
}

fn containerd() -> Flavor {
    "containerd".parse().unwrap()
}

fn resolved(registry: &str, endpoints: Vec<Endpoint>, allowed: &str) -> ResolvedMirror {
    resolve(
        &mirror(registry, endpoints),
        &sources_with("pull", basic(Some(allowed))),
        &RefPolicy::new(NS),
    )
    .unwrap()
}

/// `(section URL, has an Authorization header)` of every section of a hosts.toml.
fn sections(hosts_toml: &str) -> Vec<(String, bool)> {
    let doc: toml::Table = toml::from_str(hosts_toml).unwrap();
    let mut out = Vec::new();
    if let Some(server) = doc.get("server").and_then(|s| s.as_str()) {
        out.push((server.to_owned(), doc.contains_key("header")));
    }
    for (url, table) in doc
        .get("host")
        .and_then(|h| h.as_table())
        .into_iter()
        .flatten()
    {
        out.push((url.clone(), table.get("header").is_some()));
    }
    out
}

fn file<'c>(config: &'c RenderedConfig, suffix: &str) -> &'c str {
    &config
        .files
        .iter()
        .find(|(path, _)| path.ends_with(suffix))
        .unwrap_or_else(|| panic!("no {suffix} in {:?}", config.files.keys()))
        .1
        .content
}

#[test]
fn containerd_never_puts_https_credentials_on_its_plain_http_default_server() {
    // A loopback registry on a port: containerd's default endpoint for it is http.
    let m = resolved(
        "localhost:5000",
        vec![with_auth("https://localhost:5000")],
        "localhost:5000",
    );
    let config = render(&[&m], &containerd()).unwrap();
    let registry = sections(file(&config, "/localhost:5000/hosts.toml"));
    assert_eq!(
        registry,
        [
            ("http://localhost:5000/v2".to_owned(), false),
            ("https://localhost:5000/v2".to_owned(), true)
        ]
    );

    // The same host used as a mirror of another registry gets a hosts.toml of its own, for
    // images named after it: its default server is http too, and gets no credentials.
    let m = resolved(
        "docker.io",
        vec![with_auth("https://127.0.0.1:5000")],
        "127.0.0.1",
    );
    let config = render(&[&m], &containerd()).unwrap();
    assert_eq!(
        sections(file(&config, "/127.0.0.1:5000/hosts.toml")),
        [("http://127.0.0.1:5000/v2".to_owned(), false)]
    );
    assert_eq!(
        sections(file(&config, "/docker.io/hosts.toml")),
        [
            ("https://registry-1.docker.io/v2".to_owned(), false),
            ("https://127.0.0.1:5000/v2".to_owned(), true)
        ]
    );

    // Written as http:// by the user (and allowed so by the Secret): then it is meant.
    let m = resolved(
        "localhost:5000",
        vec![with_auth("http://localhost:5000")],
        "http://localhost:5000",
    );
    let config = render(&[&m], &containerd()).unwrap();
    assert_eq!(
        sections(file(&config, "/localhost:5000/hosts.toml")),
        [("http://localhost:5000/v2".to_owned(), true)]
    );
}

#[test]
fn k3s_refuses_https_credentials_for_a_host_it_would_also_speak_http_to() {
    let m = resolved(
        "localhost:5000",
        vec![with_auth("https://localhost:5000")],
        "localhost:5000",
    );
    for flavor in [Flavor::K3S, Flavor::RKE2] {
        let e = render(&[&m], &flavor).unwrap_err();
        assert_eq!(e.field, "spec.endpoints[0].auth");
        assert!(e.what.contains("plain http"), "{e}");
    }
    // As a mirror of another registry, too: k3s generates a hosts.toml for the host itself.
    let m = resolved(
        "docker.io",
        vec![with_auth("https://[::1]:5000")],
        "[::1]:5000",
    );
    assert!(render(&[&m], &Flavor::K3S).is_err());
    // Loopback on 443 is https only; http written by the user is meant.
    let m = resolved(
        "localhost",
        vec![with_auth("https://localhost")],
        "localhost",
    );
    assert!(render(&[&m], &Flavor::K3S).is_ok());
    let m = resolved(
        "localhost:5000",
        vec![with_auth("http://localhost:5000")],
        "http://localhost:5000",
    );
    assert!(render(&[&m], &Flavor::K3S).is_ok());
}

#[test]
fn crio_refuses_credentials_for_an_insecure_https_mirror() {
    let mut endpoint = with_auth("https://mirror.example.com");
    endpoint.tls = Some(EndpointTls {
        insecure_skip_verify: true,
        ..Default::default()
    });
    let m = resolved("quay.io", vec![endpoint], "mirror.example.com");
    let e = render(&[&m], &Flavor::Crio).unwrap_err();
    assert_eq!(e.field, "spec.endpoints[0].tls.insecureSkipVerify");
    assert!(e.what.contains("plain http"), "{e}");
    // containerd and k3s never fall back from an https endpoint.
    assert!(render(&[&m], &Flavor::K3S).is_ok());
    assert!(render(&[&m], &containerd()).is_ok());
}

#[test]
fn crio_writes_the_credentials_of_an_endpoint_that_is_the_registry_itself() {
    let m = resolved("quay.io", vec![with_auth("https://quay.io")], "quay.io");
    let config = render(&[&m], &Flavor::Crio).unwrap();
    let auth: serde_json::Value = serde_json::from_str(file(&config, "auth.json")).unwrap();
    assert!(auth["auths"]["quay.io"]["auth"].is_string(), "{auth}");
    assert!(!file(&config, "50-regmirror.conf").contains("[[registry.mirror]]"));
}

#[test]
fn every_problem_of_a_flavor_is_reported_not_only_the_first() {
    let mut sources = sources_with(
        "pull",
        object(Some("Opaque"), &[("token", "t")], Some("*.example.com")),
    );
    sources.insert(
        SourceKind::Secret,
        NS,
        "other",
        object(Some("Opaque"), &[("token", "u")], Some("*.example.com")),
    );
    let mut m = mirror(
        "*",
        vec![
            with_auth("https://a.example.com"),
            Endpoint {
                auth: Some(EndpointAuth::from_secret("other")),
                ..with_auth("https://b.example.com")
            },
        ],
    );
    m.spec.rewrites = vec![regmirror_core::api::Rewrite {
        pattern: "^a/(.*)".into(),
        replacement: "b/$1".into(),
    }];
    let m = resolve(&m, &sources, &RefPolicy::new(NS)).unwrap();
    let fields: Vec<String> = problems(&[&m], &Flavor::Crio)
        .into_iter()
        .map(|e| e.field)
        .collect();
    assert_eq!(
        fields,
        [
            "spec.registry",
            "spec.rewrites",
            "spec.endpoints[0].auth",
            "spec.endpoints[1].auth"
        ]
    );
    assert_eq!(
        problems(&[&m], &Flavor::K3S).len(),
        2,
        "bearer tokens, twice"
    );
    assert_eq!(problems(&[&m], &containerd()).len(), 1, "rewrites");
}

// ---- generated: no path from https credentials to plain http ----

fn loopback_or_not() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![
            "localhost",
            "127.0.0.1",
            "[::1]",
            "mirror.example.com",
            "quay.io",
        ]),
        prop::sample::select(vec![None, Some(443u16), Some(5000), Some(80)]),
    )
        .prop_map(|(h, p)| p.map_or(h.to_owned(), |p| format!("{h}:{p}")))
}

fn endpoint_spec() -> impl Strategy<Value = (String, bool, bool)> {
    (
        prop::sample::select(vec!["https://", "http://", ""]),
        loopback_or_not(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(s, h, auth, skip)| (format!("{s}{h}"), auth, skip))
}

/// Whether the user wrote `http://host` with credentials on some endpoint.
fn http_written(mirrors: &[&ResolvedMirror], host: &str) -> bool {
    mirrors
        .iter()
        .flat_map(|m| &m.endpoints)
        .any(|e| e.url.scheme == Scheme::Http && e.url.host == host && e.settings.auth.is_some())
}

/// The `host[:port]` of a URL as written (containerd keys credentials by it).
fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or_default().to_owned()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the mirrors, a rendered file lets credentials go over plain http only to a
    /// host the user wrote `http://` for, with those credentials.
    #[test]
    fn credentials_go_over_http_only_where_written(
        specs in prop::collection::vec(
            (
                prop::sample::select(vec!["docker.io", "quay.io", "localhost:5000", "127.0.0.1:5000", "[::1]:5000", "localhost"]),
                prop::collection::vec(endpoint_spec(), 1..3),
            ),
            1..4,
        )
    ) {
        let sources = sources_with(
            "pull",
            basic(Some("localhost, 127.0.0.1, [::1], mirror.example.com, quay.io, http://localhost, http://127.0.0.1, http://[::1], http://mirror.example.com, http://quay.io")),
        );
        let resolved: Vec<ResolvedMirror> = specs
            .iter()
            .enumerate()
            .filter_map(|(i, (registry, endpoints))| {
                let endpoints = endpoints
                    .iter()
                    .map(|(url, auth, skip)| Endpoint {
                        url: url.clone(),
                        auth: auth.then(|| EndpointAuth::from_secret("pull")),
                        tls: (*skip && url.starts_with("https")).then(|| EndpointTls {
                            insecure_skip_verify: true,
                            ..Default::default()
                        }),
                    })
                    .collect();
                let mut m = mirror(registry, endpoints);
                m.metadata.name = Some(format!("m{i}"));
                resolve(&m, &sources, &RefPolicy::new(NS)).ok()
            })
            .collect();
        for flavor in [Flavor::K3S, Flavor::RKE2, containerd(), Flavor::Crio] {
            let assembly = assemble(&resolved, &node(&flavor));
            let mirrors = &assembly.mirrors;
            let Ok(config) = render(mirrors, &flavor) else { continue };
            for (path, file) in &config.files {
                if path.ends_with("hosts.toml") {
                    for (url, header) in sections(&file.content) {
                        if url.starts_with("http://") {
                            let host = host_of(&url);
                            if header {
                                prop_assert!(http_written(mirrors, &host), "{flavor}: {path}: header on {url}");
                            }
                            // k3s and RKE2 keep credentials in their CRI config, by host.
                            if matches!(flavor, Flavor::K3s { .. } | Flavor::Rke2 { .. }) {
                                let has_credentials = mirrors.iter().flat_map(|m| &m.endpoints)
                                    .any(|e| e.url.host == host && e.settings.auth.is_some());
                                prop_assert!(!has_credentials || http_written(mirrors, &host), "{flavor}: {path}: {url} with credentials for its host");
                            }
                        }
                    }
                }
                if path.ends_with("50-regmirror.conf") {
                    let conf: toml::Table = toml::from_str(&file.content).unwrap();
                    for registry in conf.get("registry").and_then(|r| r.as_array()).into_iter().flatten() {
                        for m in registry.get("mirror").and_then(|m| m.as_array()).into_iter().flatten() {
                            let location = m["location"].as_str().unwrap();
                            let host = location.split('/').next().unwrap();
                            let has_credentials = mirrors.iter().flat_map(|m| &m.endpoints)
                                .any(|e| e.url.host == host && e.settings.auth.is_some());
                            if m["insecure"].as_bool() == Some(true) && has_credentials {
                                prop_assert!(http_written(mirrors, host), "cri-o: insecure {location} with credentials");
                            }
                        }
                    }
                }
            }
        }
    }
}
