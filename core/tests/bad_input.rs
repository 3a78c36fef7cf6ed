//! Bad input is refused where it is written, naming the field (issue 14.7, 14.8, 14.10):
//! selector typos, registry names that are not the name images use, and strings that would
//! corrupt or escape the generated files.

use regmirror_core::api::{Endpoint, EndpointAuth, RegistryMirror, RegistryMirrorSpec, Rewrite};
use regmirror_core::assemble::{assemble, possible_conflicts};
use regmirror_core::node::{Flavor, NodeInfo};
use regmirror_core::problem::FieldError;
use regmirror_core::resolve::{parse_endpoint_url, resolve};
use regmirror_core::sources::{RefPolicy, SourceKind, SourceObject, Sources};
use serde_json::{json, Value};

const NS: &str = "regmirror-system";

fn mirror(registry: &str, urls: &[&str]) -> RegistryMirror {
    RegistryMirror::new(
        "m",
        RegistryMirrorSpec {
            cache: None,
            embedded_registry: false,
            registry: registry.into(),
            endpoints: urls
                .iter()
                .map(|u| Endpoint {
                    url: u.to_string(),
                    auth: None,
                    tls: None,
                })
                .collect(),
            rewrites: vec![],
            node_selector: None,
        },
    )
}

fn errors(m: &RegistryMirror) -> Vec<FieldError> {
    resolve(m, &Sources::new(), &RefPolicy::new(NS))
        .err()
        .unwrap_or_default()
}

/// The one problem of `m`, as `field: reason`, after checking the CEL rules refuse it too.
fn refused(m: &RegistryMirror) -> String {
    let errors = errors(m);
    assert!(!errors.is_empty(), "{:?} was accepted", m.spec);
    assert!(
        m.validate_cel().is_err(),
        "the CRD's rules accept {:?}",
        m.spec
    );
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

// ---- nodeSelector ----

fn parse(selector: Value) -> Result<RegistryMirror, String> {
    let doc = json!({
        "apiVersion": "regmirror.io/v1alpha1",
        "kind": "RegistryMirror",
        "metadata": {"name": "m"},
        "spec": {
            "registry": "docker.io",
            "endpoints": [{"url": "https://m.example.com"}],
            "nodeSelector": selector,
        }
    });
    serde_json::from_value::<RegistryMirror>(doc).map_err(|e| e.to_string())
}

#[test]
fn selector_typos_are_refused_when_read_not_turned_into_every_node() {
    for (selector, field) in [
        (json!({"matchLabel": {"region": "eu"}}), "matchLabel"),
        (json!({"region": "eu"}), "region"),
        (
            json!({"matchLabels": {"region": "eu"}, "matchExpresions": []}),
            "matchExpresions",
        ),
        (
            json!({"matchExpressions": [{"key": "region", "operator": "In", "value": ["eu"]}]}),
            "value",
        ),
    ] {
        let e = parse(selector.clone()).unwrap_err();
        assert!(
            e.contains(&format!("unknown field `{field}`")),
            "{selector}: {e}"
        );
    }
    let m = parse(json!({"matchLabels": {"region": "eu"},
        "matchExpressions": [{"key": "tier", "operator": "Exists"}]}))
    .unwrap();
    let selector = m.spec.node_selector.unwrap();
    assert_eq!(selector.match_labels.unwrap()["region"], "eu");
    assert_eq!(selector.match_expressions.unwrap()[0].operator, "Exists");
    assert!(parse(Value::Null).unwrap().spec.node_selector.is_none());
}

/// OpenAPI's `anyOf` with `required` and `maxProperties`, the only keywords the schema uses
/// there: what the API server decides for an object's keys.
fn any_of_accepts(schema: &Value, object: &Value) -> bool {
    let keys = object.as_object().unwrap();
    schema["anyOf"].as_array().unwrap().iter().any(|branch| {
        let required = branch["required"].as_array().cloned().unwrap_or_default();
        required
            .iter()
            .all(|k| keys.contains_key(k.as_str().unwrap()))
            && branch["maxProperties"]
                .as_u64()
                .is_none_or(|max| keys.len() as u64 <= max)
    })
}

#[test]
fn the_crd_keeps_unknown_selector_fields_and_refuses_them_at_apply_time() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(RegistryMirror::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let selector = &spec["properties"]["nodeSelector"];
    // Without this the API server prunes a typo silently, before any rule sees it.
    assert_eq!(selector["x-kubernetes-preserve-unknown-fields"], true);
    let item = &selector["properties"]["matchExpressions"]["items"];
    assert_eq!(item["x-kubernetes-preserve-unknown-fields"], true);

    for ok in [
        json!({}),
        json!({"matchLabels": {}}),
        json!({"matchExpressions": []}),
        json!({"matchLabels": {}, "matchExpressions": []}),
    ] {
        assert!(any_of_accepts(selector, &ok), "{ok}");
    }
    for typo in [
        json!({"matchLabel": {"region": "eu"}}),
        json!({"region": "eu"}),
        json!({"matchLabels": {}, "region": "eu"}),
        json!({"matchLabels": {}, "matchExpressions": [], "x": 1}),
    ] {
        assert!(!any_of_accepts(selector, &typo), "{typo}");
    }
    assert!(any_of_accepts(
        item,
        &json!({"key": "a", "operator": "Exists"})
    ));
    assert!(any_of_accepts(
        item,
        &json!({"key": "a", "operator": "In", "values": ["b"]})
    ));
    assert!(!any_of_accepts(
        item,
        &json!({"key": "a", "operator": "In", "value": ["b"]})
    ));
    assert!(!any_of_accepts(
        item,
        &json!({"key": "a", "operator": "In", "values": ["b"], "x": 1})
    ));
}

#[test]
fn selector_operators_and_values_are_checked_by_both_sides() {
    for (expression, ok) in [
        (json!({"key": "a", "operator": "In", "values": ["b"]}), true),
        (json!({"key": "a", "operator": "Exists"}), true),
        (json!({"key": "a", "operator": "In"}), false),
        (
            json!({"key": "a", "operator": "Exists", "values": ["b"]}),
            false,
        ),
    ] {
        let m = parse(json!({"matchExpressions": [expression]})).unwrap();
        assert_eq!(m.validate_cel().is_ok(), ok, "CEL: {expression}");
        assert_eq!(errors(&m).is_empty(), ok, "resolve: {expression}");
    }
}

// ---- registry names ----

#[test]
fn registry_names_are_written_the_way_images_name_them() {
    for (registry, hint) in [
        ("Docker.io", "lower case"),
        ("QUAY.IO", "lower case"),
        ("index.docker.io", "write docker.io"),
        ("registry-1.docker.io", "write docker.io"),
        ("registry-1.docker.io:443", "write docker.io"),
    ] {
        let message = refused(&mirror(registry, &["https://m.example.com"]));
        assert!(message.starts_with("spec.registry: "), "{message}");
        assert!(message.contains(hint), "{registry}: {message}");
    }
}

#[test]
fn no_spelling_of_a_registry_escapes_the_duplicate_check() {
    let resolved: Vec<_> = ["docker.io", "Docker.io", "index.docker.io", "DOCKER.IO"]
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let mut m = mirror(r, &["https://m.example.com"]);
            m.metadata.name = Some(format!("m{i}"));
            resolve(&m, &Sources::new(), &RefPolicy::new(NS)).ok()
        })
        .collect();
    assert_eq!(resolved.len(), 1, "only docker.io itself resolves");
    assert!(possible_conflicts(&resolved).is_empty());
}

#[test]
fn endpoint_hosts_are_compared_without_regard_to_case() {
    let m = mirror(
        "docker.io",
        &[
            "https://Mirror.Example.COM:5000",
            "https://mirror.example.com:5000/v2/",
        ],
    );
    let message = errors(&m)
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(message.contains("is already endpoints[0]"), "{message}");

    // Two mirrors on one host with different credentials conflict, however it is spelled.
    let mut sources = Sources::new();
    for (name, user) in [("one", "u1"), ("two", "u2")] {
        sources.insert(
            SourceKind::Secret,
            NS,
            name,
            SourceObject {
                type_: Some("kubernetes.io/basic-auth".into()),
                data: [("username", user), ("password", "p")]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                    .collect(),
                allowed_hosts: Some("SHARED.example.com".into()),
            },
        );
    }
    let with = |name: &str, registry: &str, url: &str, secret: &str| {
        let mut m = mirror(registry, &[url]);
        m.metadata.name = Some(name.into());
        m.spec.endpoints[0].auth = Some(EndpointAuth::from_secret(secret));
        resolve(&m, &sources, &RefPolicy::new(NS)).unwrap()
    };
    let resolved = vec![
        with("a", "docker.io", "https://shared.example.com", "one"),
        with("b", "quay.io", "https://Shared.Example.com", "two"),
    ];
    let node = NodeInfo {
        name: "n".into(),
        labels: Default::default(),
        flavor: Flavor::K3S,
    };
    assert_eq!(assemble(&resolved, &node).conflicts.len(), 1);
}

// ---- strings that end up in files or paths ----

#[test]
fn endpoint_hosts_and_paths_that_escape_or_hide_are_refused() {
    for url in [
        "https://..",
        "https://../x",
        "https://%2e%2e",
        "https://%2e%2e/x",
        "https://a..b",
        "https://mirror.example.com.",
        "https://-mirror.example.com",
        "https://mirror.example.com/../../etc",
        "https://mirror.example.com/a/..",
        "https://mirror.example.com/./a",
        "https://mirror.example.com/%2e%2e/x",
        "https://mirror.example.com/%2E./x",
        "https://mirror.example.com/a%2fb",
        "https://mirror.example.com\\..\\x",
        "https://mirror.example.com/pa\nth",
        "https://mirror.example.com/\tpath",
        "https://mirror.example.com/p ath",
        "https://mirror.example.com\n",
        "https://user:pw@mirror.example.com",
        "https://mirror.example.com/x?y=1",
        "https://mirror.example.com:0",
        "https://mirror.example.com:65536",
        "HTTPS://mirror.example.com",
        "ftp://mirror.example.com",
    ] {
        let m = mirror("docker.io", &[url]);
        let message = refused(&m);
        assert!(
            message.starts_with("spec.endpoints[0].url: invalid URL"),
            "{url:?}: {message}"
        );
    }
    for url in [
        "https://mirror.example.com",
        "mirror.example.com:5000/proxy/docker",
        "http://127.0.0.1:5000",
        "https://[::1]:5000",
        "https://Mirror.Example.com/v2/",
        "https://mirror.example.com/a.b/..c/...",
    ] {
        let m = mirror("docker.io", &[url]);
        assert!(errors(&m).is_empty(), "{url}: {:?}", errors(&m));
        assert!(m.validate_cel().is_ok(), "{url}: {:?}", m.validate_cel());
    }
}

#[test]
fn a_host_that_url_parsing_would_read_as_another_is_refused() {
    // WHATWG URL parsing reads these as IPv4 addresses; the schema's rule cannot (see the
    // table in grammar_table.rs), the operator does.
    for url in ["https://0x7f.1", "https://1.2.3:5000"] {
        let e = parse_endpoint_url(url).unwrap_err();
        assert!(e.contains("would be read as"), "{url}: {e}");
    }
}

#[test]
fn rewrites_with_control_characters_or_escapes_are_refused_with_their_field() {
    for (pattern, replacement, field, what) in [
        (
            "^a/(.*)\n",
            "b/$1",
            "spec.rewrites[0].pattern",
            "control characters",
        ),
        (
            "^a/(.*)",
            "b/\t$1",
            "spec.rewrites[0].replacement",
            "control characters",
        ),
        (
            "^a/(.*)",
            "b/$1\u{85}",
            "spec.rewrites[0].replacement",
            "control characters",
        ),
        (
            r"^a\.b/(.*)",
            "b/$1",
            "spec.rewrites[0].pattern",
            "backslash",
        ),
        (
            "^a/(.*)",
            "b\"/$1",
            "spec.rewrites[0].replacement",
            "double quote",
        ),
    ] {
        let mut m = mirror("docker.io", &["https://m.example.com"]);
        m.spec.rewrites = vec![Rewrite {
            pattern: pattern.into(),
            replacement: replacement.into(),
        }];
        let message = refused(&m);
        assert!(
            message.starts_with(&format!("{field}: ")),
            "{pattern:?}: {message}"
        );
        assert!(message.contains(what), "{pattern:?}: {message}");
    }
}
