//! One table of registry names and endpoint URLs, run through both the CRD's schema (its CEL
//! rules, evaluated by kube's CEL evaluator as `regmirror validate` does, plus the OpenAPI
//! length bounds the API server checks before them) and the Rust validator the operator runs
//! (issue 13.7). Each row says what both must decide, or, where they differ, why that is right.

use kube::CustomResourceExt;
use regmirror_core::api::{Endpoint, RegistryMirror, RegistryMirrorSpec};
use regmirror_core::resolve::{check_registry, parse_endpoint_url};
use serde_json::Value;

/// What each side decides for a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Both accept.
    Valid,
    /// Both refuse.
    Invalid,
    /// The schema accepts, the operator refuses (with a condition on the object); the reason
    /// is in the row.
    OnlyRustRefuses(&'static str),
}
use Expect::*;

const LONG_LABEL_63: &str = "a23456789012345678901234567890123456789012345678901234567890123";
const LONG_LABEL_64: &str = "a234567890123456789012345678901234567890123456789012345678901234";

fn registry_rows() -> Vec<(String, Expect)> {
    let mut rows: Vec<(String, Expect)> = [
        ("docker.io", Valid),
        ("quay.io", Valid),
        ("registry.example.com:5000", Valid),
        ("*", Valid),
        ("localhost", Valid),
        ("localhost:5000", Valid),
        ("127.0.0.1:5000", Valid),
        ("[::1]:5000", Valid),
        ("[::1]", Valid),
        ("[fe80::1]:443", Valid),
        ("docker.io:443", Valid),
        ("xn--bcher-kva.example", Valid),
        ("a-b.example.com", Valid),
        ("registry.example.com:65535", Valid),
        ("registry.example.com:1", Valid),
        // Upper case: containerd looks registries up by the name images use.
        ("Docker.io", Invalid),
        ("QUAY.IO", Invalid),
        ("[FE80::1]", Invalid),
        // Docker Hub's other names.
        ("index.docker.io", Invalid),
        ("registry-1.docker.io", Invalid),
        ("index.docker.io:443", Invalid),
        // Ports.
        ("registry.example.com:0", Invalid),
        ("registry.example.com:65536", Invalid),
        ("registry.example.com:99999", Invalid),
        ("registry.example.com:", Invalid),
        ("registry.example.com:05000", Invalid),
        ("registry.example.com:http", Invalid),
        // Paths, wildcards, traversal.
        ("docker.io/library", Invalid),
        ("docker.io/", Invalid),
        ("*.example.com", Invalid),
        ("**", Invalid),
        ("..", Invalid),
        ("../../etc", Invalid),
        ("a..b", Invalid),
        (".docker.io", Invalid),
        ("%2e%2e", Invalid),
        // Trailing dot, empty, hyphens, non-ASCII, whitespace and control characters.
        ("docker.io.", Invalid),
        ("", Invalid),
        ("-a.example.com", Invalid),
        ("a-.example.com", Invalid),
        ("bücher.example", Invalid),
        (" docker.io", Invalid),
        ("docker.io\n", Invalid),
        ("docker\u{0}.io", Invalid),
        // IPv6 literals: the brackets, hex digits only; both sides read the text the same way
        // (neither parses the address, which is a directory name on the node, as written).
        ("[::1", Invalid),
        ("::1", Invalid),
        ("[zz::1]", Invalid),
        ("[1::2::3]", Valid),
    ]
    .into_iter()
    .map(|(r, e)| (r.to_owned(), e))
    .collect();
    rows.push((format!("{LONG_LABEL_63}.example.com"), Valid));
    rows.push((format!("{LONG_LABEL_64}.example.com"), Invalid));
    // 259 characters of valid labels: over no label limit, but over the schema's maxLength.
    let long = [LONG_LABEL_63; 4].join(".") + ".abc";
    assert_eq!(long.len(), 259);
    rows.push((long.clone(), Valid));
    rows.push((long + "de", Invalid));
    rows
}

fn url_rows() -> Vec<(&'static str, Expect)> {
    vec![
        ("https://mirror.example.com", Valid),
        ("https://mirror.example.com:5000/v2/proxy", Valid),
        ("mirror.example.com:5000", Valid),
        ("http://127.0.0.1:5000", Valid),
        ("https://[::1]:5000", Valid),
        ("https://localhost", Valid),
        // Host names are case-insensitive; the operator compares them lower-cased.
        ("https://Mirror.Example.COM", Valid),
        ("https://mirror.example.com/a.b/...", Valid),
        ("HTTPS://mirror.example.com", Invalid),
        ("ftp://mirror.example.com", Invalid),
        ("https://", Invalid),
        ("https://..", Invalid),
        ("https://%2e%2e", Invalid),
        ("https://a..b", Invalid),
        ("https://mirror.example.com.", Invalid),
        ("https://mirror.example.com/../x", Invalid),
        ("https://mirror.example.com/%2e%2e/x", Invalid),
        ("https://mirror.example.com/a/.", Invalid),
        ("https://mirror.example.com/a%2Fb", Invalid),
        ("https://mirror.example.com\\x", Invalid),
        ("https://mirror.example.com/a\nb", Invalid),
        ("https://mirror.example.com/a b", Invalid),
        ("https://user@mirror.example.com", Invalid),
        ("https://mirror.example.com/?q", Invalid),
        ("https://mirror.example.com#f", Invalid),
        ("https://mirror.example.com:0", Invalid),
        ("https://mirror.example.com:65536", Invalid),
        ("https://[zz::1]", Invalid),
        (
            "https://0x7f.1",
            OnlyRustRefuses("WHATWG URL parsing (containerd's Go parser differs) reads a host whose last label is a number as IPv4: 0x7f.1 is 127.0.0.1; a regular expression cannot"),
        ),
        (
            "https://1.2.3",
            OnlyRustRefuses("IPv4 shorthand: 1.2.3 is read as 1.2.0.3"),
        ),
        (
            "https://registry.123",
            OnlyRustRefuses("a numeric last label makes the host an IPv4 address, and this one is not"),
        ),
        (
            "https://[1::2::3]",
            OnlyRustRefuses("the URL parser checks IPv6 addresses; the schema checks the characters only"),
        ),
    ]
}

/// The schema of `spec` as the API server holds it.
fn spec_schema() -> Value {
    let crd = serde_json::to_value(RegistryMirror::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

/// What the API server decides for a string field: its OpenAPI length bounds, then the CEL
/// rules (kube's evaluator, as `regmirror validate` runs them).
fn schema_accepts(field_schema: &Value, value: &str, mirror: &RegistryMirror) -> bool {
    let len = value.chars().count() as u64;
    let min = field_schema["minLength"].as_u64().unwrap_or(0);
    let max = field_schema["maxLength"].as_u64().unwrap_or(u64::MAX);
    len >= min && len <= max && mirror.validate_cel().is_ok()
}

fn with(registry: &str, url: &str) -> RegistryMirror {
    RegistryMirror::new(
        "table",
        RegistryMirrorSpec {
            cache: None,
            embedded_registry: false,
            registry: registry.into(),
            endpoints: vec![Endpoint {
                url: url.into(),
                auth: None,
                tls: None,
            }],
            rewrites: vec![],
            node_selector: None,
        },
    )
}

fn check(rows: Vec<(String, Expect)>, schema: &dyn Fn(&str) -> bool, rust: &dyn Fn(&str) -> bool) {
    let mut wrong = Vec::new();
    for (value, expect) in rows {
        let (s, r) = (schema(&value), rust(&value));
        let expected = match expect {
            Valid => (true, true),
            Invalid => (false, false),
            OnlyRustRefuses(_) => (true, false),
        };
        if (s, r) != expected {
            wrong.push(format!(
                "{value:?}: schema {}, rust {}, expected {expect:?}",
                if s { "accepts" } else { "refuses" },
                if r { "accepts" } else { "refuses" },
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "rows where a side decides otherwise:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn registry_names_are_judged_alike_by_the_crd_and_the_operator() {
    let schema = spec_schema()["properties"]["registry"].clone();
    check(
        registry_rows(),
        &|r| schema_accepts(&schema, r, &with(r, "https://m.example.com")),
        &|r| check_registry(r).is_empty(),
    );
}

#[test]
fn endpoint_urls_are_judged_alike_by_the_crd_and_the_operator() {
    let schema = spec_schema()["properties"]["endpoints"]["items"]["properties"]["url"].clone();
    check(
        url_rows()
            .into_iter()
            .map(|(u, e)| (u.to_owned(), e))
            .collect(),
        &|u| schema_accepts(&schema, u, &with("docker.io", u)),
        &|u| parse_endpoint_url(u).is_ok(),
    );
}

#[test]
fn the_rust_refusals_the_schema_cannot_make_are_few_and_explained() {
    let only_rust: Vec<_> = url_rows()
        .into_iter()
        .filter(|(_, e)| matches!(e, OnlyRustRefuses(_)))
        .collect();
    assert!(only_rust.len() <= 4, "{only_rust:?}");
    assert!(registry_rows()
        .iter()
        .all(|(_, e)| !matches!(e, OnlyRustRefuses(_))));
}
