//! The `RegistryMirror` API (`regmirror.io/v1alpha1`): the Kubernetes-facing types only.
//!
//! Everything here is data. What the fields *mean* for a node lives in `resolve` (references
//! to Secrets and ConfigMaps), `select` (nodeSelector), and `render` (the files). The schema
//! carries CEL rules for whatever the API server can check at `kubectl apply` time; the same
//! rules run offline in `regmirror validate` through kube's CEL evaluator.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Deserializer, Serialize};

/// API group of every regmirror resource.
pub const GROUP: &str = "regmirror.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Registry configuration for one upstream registry name, distributed to every selected node.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "regmirror.io",
    version = "v1alpha1",
    kind = "RegistryMirror",
    plural = "registrymirrors",
    shortname = "rmir",
    category = "regmirror",
    cel,
    status = "RegistryMirrorStatus",
    printcolumn = r#"{"name":"Registry","type":"string","jsonPath":".spec.registry"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Targeted","type":"integer","jsonPath":".status.nodes.targeted"}"#,
    printcolumn = r#"{"name":"Updated","type":"integer","jsonPath":".status.nodes.updated"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.nodes.failed"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new(grammar::ENDPOINTS_RULE).message(grammar::ENDPOINTS_NONE),
    validation = Rule::new(grammar::CACHE_RULE).message(grammar::CACHE_WITHOUT_ENDPOINT),
    validation = Rule::new(grammar::CACHE_ONE_REGISTRY_RULE).message(grammar::CACHE_FOR_EVERY_REGISTRY)
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryMirrorSpec {
    /// The registry name as written in image references (`docker.io`, `quay.io`,
    /// `registry.example.com:5000`), or `*` for every registry. Lower case; Docker Hub is
    /// `docker.io`.
    #[x_kube(
        validation = Rule::new(grammar::registry_rule()).message(grammar::REGISTRY_FORMAT),
        validation = Rule::new(grammar::no_match("self", grammar::UPPER_CASE)).message(grammar::REGISTRY_CASE),
        validation = Rule::new(grammar::no_match("self", grammar::DOCKER_HUB_ALIAS)).message(grammar::REGISTRY_DOCKER_HUB)
    )]
    // Bounded so that the API server can estimate the CEL rules' cost.
    #[schemars(length(min = 1, max = 260))]
    pub registry: String,

    /// Endpoints tried in order before the registry itself, which always stays the last resort.
    /// At least one, unless `embeddedRegistry` is on.
    #[serde(default)]
    #[schemars(length(max = 16), transform = no_default)]
    pub endpoints: Vec<Endpoint>,

    /// Share this registry's images between nodes through k3s's (or RKE2's) embedded registry
    /// mirror (Spegel): the registry is listed in registries.yaml even with no endpoints, and
    /// the nodes try their peers first. Only for k3s and RKE2 nodes whose servers run with
    /// `--embedded-registry` (`embedded-registry: true`); other flavors refuse it, and the
    /// mirror's `EmbeddedRegistry` condition names the nodes that do not run it. On such a node
    /// k3s shares every registry registries.yaml lists, and regmirror leaves the hosts.toml
    /// files to k3s: every change to registries.yaml there takes a k3s restart.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub embedded_registry: bool,

    /// Run a pull-through cache in the cluster in front of the first endpoint: the operator
    /// runs a registry in proxy mode (a Deployment and a Service in the caches' namespace, TLS
    /// from a CA it creates and gives the nodes, credentials of its own), and the nodes try the
    /// cache first and the endpoints after it, so that pulls go on when the cache is down and
    /// the cache serves what it holds when the upstream is down. The first endpoint's Secret
    /// (basic credentials only) and CA are the cache's for its upstream. Not for `registry: "*"`:
    /// a cache proxies one upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,

    /// Image-name rewrites applied when pulling from an endpoint (k3s and RKE2 only; never
    /// applied to the registry itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub rewrites: Vec<Rewrite>,

    /// Which nodes get this configuration; empty or absent selects every node. Only
    /// `matchLabels` and `matchExpressions` (`key`, `operator`, `values`): anything else is
    /// refused, not ignored, since a mistyped selector would select every node.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict_selector"
    )]
    #[schemars(schema_with = "node_selector_schema")]
    pub node_selector: Option<LabelSelector>,
}

/// A mirror's pull-through cache.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheSpec {
    /// Where the cache keeps what it pulled; an emptyDir without a size limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<CacheStorage>,
}

/// A cache's storage: exactly one of an emptyDir (lost when the pod moves) or an existing
/// PersistentVolumeClaim in the caches' namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default)]
#[x_kube(
    validation = Rule::new("has(self.emptyDir) != has(self.persistentVolumeClaim)")
        .message("storage needs exactly one of emptyDir or persistentVolumeClaim")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheStorage {
    /// A volume that lives as long as the cache's pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirStorage>,
    /// A PersistentVolumeClaim in the caches' namespace (`regmirror-cache`), created beforehand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<ClaimStorage>,
}

/// An emptyDir for a cache.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmptyDirStorage {
    /// The most the cache may store (a quantity: `20Gi`); the kubelet evicts the pod beyond it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new(grammar::must_match("self", grammar::QUANTITY)).message(grammar::QUANTITY_FORMAT)
    )]
    #[schemars(length(min = 1, max = 64))]
    pub size_limit: Option<String>,
}

/// A PersistentVolumeClaim for a cache.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimStorage {
    /// The claim's name, in the caches' namespace.
    #[x_kube(
        validation = Rule::new(grammar::must_match("self", grammar::DNS_SUBDOMAIN)).message(grammar::CLAIM_NAME_FORMAT)
    )]
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
}

/// Leaves a field without a schema default: the API server would store it into every object
/// that omits the field, and GitOps tools would see objects differ from what they applied.
fn no_default(schema: &mut schemars::Schema) {
    schema.remove("default");
}

/// A `nodeSelector` as written: Kubernetes' LabelSelector, refusing unknown fields.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StrictSelector {
    #[serde(default)]
    match_labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    match_expressions: Option<Vec<StrictRequirement>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictRequirement {
    key: String,
    operator: String,
    #[serde(default)]
    values: Option<Vec<String>>,
}

fn strict_selector<'de, D: Deserializer<'de>>(de: D) -> Result<Option<LabelSelector>, D::Error> {
    let selector = Option::<StrictSelector>::deserialize(de)?;
    Ok(selector.map(|s| LabelSelector {
        match_labels: s.match_labels,
        match_expressions: s.match_expressions.map(|es| {
            es.into_iter()
                .map(|e| LabelSelectorRequirement {
                    key: e.key,
                    operator: e.operator,
                    values: e.values,
                })
                .collect()
        }),
    }))
}

/// The schema of `nodeSelector`. The API server prunes unknown fields silently, so a typo
/// (`matchLabel`, a Pod-style `{region: eu}`) would leave an empty selector: every node.
/// Unknown fields are therefore kept (`x-kubernetes-preserve-unknown-fields`) and refused by
/// `anyOf` branches that allow no key beyond the known ones (`required` + `maxProperties`:
/// CEL cannot see fields the schema does not declare).
fn node_selector_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let only = |known: &[&str]| {
        // Every subset of `known`, each with exactly its keys.
        let mut branches = Vec::new();
        for mask in 0u32..(1 << known.len()) {
            let required: Vec<&str> = known
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, k)| *k)
                .collect();
            let mut branch = serde_json::json!({"maxProperties": required.len()});
            if !required.is_empty() {
                branch["required"] = serde_json::json!(required);
            }
            branches.push(branch);
        }
        branches
    };
    // `key` and `operator` are required, so only `values` varies.
    let requirement_branches = vec![
        serde_json::json!({"maxProperties": 2}),
        serde_json::json!({"required": ["values"], "maxProperties": 3}),
    ];
    let schema = serde_json::json!({
        "description": "Which nodes get this configuration; empty or absent selects every node. \
            Only matchLabels and matchExpressions (key, operator, values): anything else is \
            refused, not ignored, since a mistyped selector would select every node.",
        "nullable": true,
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "anyOf": only(&["matchLabels", "matchExpressions"]),
        "properties": {
            "matchLabels": {
                "description": "Labels a node must have, with these values.",
                "type": "object",
                "additionalProperties": {"type": "string"}
            },
            "matchExpressions": {
                "description": "Label requirements a node must meet, all of them.",
                "type": "array",
                "items": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": true,
                    "anyOf": requirement_branches,
                    "required": ["key", "operator"],
                    "properties": {
                        "key": {"description": "The label key.", "type": "string"},
                        "operator": {
                            "description": "In, NotIn, Exists or DoesNotExist.",
                            "type": "string",
                            "enum": ["In", "NotIn", "Exists", "DoesNotExist"]
                        },
                        "values": {
                            "description": "The values for In and NotIn; none for Exists and DoesNotExist.",
                            "type": "array",
                            "items": {"type": "string"}
                        }
                    },
                    "x-kubernetes-validations": [{
                        "rule": "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
                        "message": "operators In and NotIn need values; Exists and DoesNotExist take none"
                    }]
                }
            }
        }
    });
    schemars::Schema::try_from(schema).expect("the nodeSelector schema is an object")
}

/// One endpoint to pull from.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(
    validation = Rule::new(grammar::HTTP_WITHOUT_TLS_RULE).message(grammar::HTTP_WITH_TLS)
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// `https://host[:port][/path]`; `http://` must be written out, and a URL without a scheme
    /// means https.
    #[x_kube(
        validation = Rule::new(grammar::SCHEME_RULE).message(grammar::URL_SCHEME),
        validation = Rule::new(grammar::no_match("self", grammar::URL_FORBIDDEN_CHARACTER)).message(grammar::URL_CHARACTERS),
        validation = Rule::new(grammar::must_match("self", grammar::URL)).message(grammar::URL_FORMAT),
        validation = Rule::new(grammar::url_path_rule()).message(grammar::URL_PATH)
    )]
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,

    /// Credentials for this endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<EndpointAuth>,

    /// TLS settings for this endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<EndpointTls>,
}

/// Where an endpoint's credentials come from.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointAuth {
    /// A Secret of type `kubernetes.io/basic-auth` (username, password),
    /// `kubernetes.io/dockerconfigjson` (the entry for this endpoint's host), or `Opaque` with
    /// `username`+`password`, `auth`, `identityToken` or `token`.
    pub secret_ref: ObjectRef,
}

/// TLS settings of one endpoint.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointTls {
    /// The CA bundle (PEM) that signs the endpoint's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_ref: Option<CaRef>,

    /// A `kubernetes.io/tls` Secret whose `tls.crt` / `tls.key` authenticate the node (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<ObjectRef>,

    /// Do not verify the endpoint's certificate. For tests and emergencies only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

/// A CA bundle in exactly one of a Secret or a ConfigMap.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(
    validation = Rule::new("has(self.secretRef) != has(self.configMapRef)")
        .message("caRef needs exactly one of secretRef or configMapRef")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaRef {
    /// A Secret holding the CA bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<KeyRef>,
    /// A ConfigMap holding the CA bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<KeyRef>,
}

/// A reference to a Secret or ConfigMap by name.
#[derive(
    KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectRef {
    /// Name of the object.
    pub name: String,
    /// Namespace of the object; defaults to the operator's namespace. Any other namespace must
    /// be on the operator's allow-list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A reference to one key of a Secret or ConfigMap.
#[derive(
    KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyRef {
    /// Name of the object.
    pub name: String,
    /// Namespace of the object; defaults to the operator's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The key holding the PEM bundle; defaults to `ca.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl ObjectRef {
    /// A reference by name into the operator's namespace.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            namespace: None,
        }
    }
}

impl EndpointAuth {
    /// Credentials from the Secret `name` in the operator's namespace.
    pub fn from_secret(name: impl Into<String>) -> Self {
        Self {
            secret_ref: ObjectRef::named(name),
        }
    }
}

impl CaRef {
    /// The `ca.crt` key of the ConfigMap `name` in the operator's namespace.
    pub fn from_config_map(name: impl Into<String>) -> Self {
        Self {
            secret_ref: None,
            config_map_ref: Some(KeyRef {
                name: name.into(),
                namespace: None,
                key: None,
            }),
        }
    }
}

impl EndpointTls {
    /// Verify the endpoint against `ca`, nothing else.
    pub fn with_ca(ca: CaRef) -> Self {
        Self {
            ca_ref: Some(ca),
            ..Default::default()
        }
    }
}

impl KeyRef {
    /// The key to read, with its documented default.
    pub fn key_or_default(&self) -> &str {
        self.key.as_deref().unwrap_or("ca.crt")
    }
}

/// A k3s/RKE2 image-name rewrite: `pattern` is a regular expression over the repository path,
/// `replacement` may use `$1`-style groups.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rewrite {
    /// Regular expression (Go RE2 syntax) matched against the repository path.
    #[x_kube(
        validation = Rule::new(grammar::no_match("self", grammar::CONTROL_CHARACTER)).message(grammar::PATTERN_CONTROL),
        validation = Rule::new(grammar::no_match("self", grammar::BACKSLASH_OR_QUOTE)).message(grammar::PATTERN_ESCAPES)
    )]
    #[schemars(length(min = 1, max = 1024))]
    pub pattern: String,
    /// What the matched repository path becomes.
    #[x_kube(
        validation = Rule::new(grammar::no_match("self", grammar::CONTROL_CHARACTER)).message(grammar::REPLACEMENT_CONTROL),
        validation = Rule::new(grammar::no_match("self", grammar::BACKSLASH_OR_QUOTE)).message(grammar::REPLACEMENT_ESCAPES)
    )]
    #[schemars(length(max = 1024))]
    pub replacement: String,
}

/// What the schema's CEL rules accept, as regular expressions that mean the same in Go's RE2
/// (the API server), Rust's regex crate (`resolve`, and kube's CEL evaluator behind
/// `regmirror validate`) and Python's `re` (the chart checks): one text, used by both sides, so
/// that `kubectl apply` and the operator agree on what a valid RegistryMirror is.
pub mod grammar {
    macro_rules! label {
        () => {
            "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
        };
    }
    macro_rules! host {
        () => {
            concat!("(", label!(), "([.]", label!(), ")*|\\[[0-9A-Fa-f:.]+\\])")
        };
    }
    macro_rules! port {
        () => {
            "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
        };
    }

    /// `host[:port]`: a DNS name or IPv4 address (labels of at most 63 characters, no
    /// trailing dot) or a bracketed IPv6 address, and a port from 1 to 65535.
    pub const REGISTRY: &str = concat!("^", host!(), "(:", port!(), ")?$");
    /// Registry names are lower case.
    pub const UPPER_CASE: &str = "[A-Z]";
    /// Docker Hub's other names.
    pub const DOCKER_HUB_ALIAS: &str = "^(index|registry-1)[.]docker[.]io(:[0-9]+)?$";
    /// `[scheme://]host[:port][/path]`, no user info, query or fragment.
    pub const URL: &str = concat!(
        "^([A-Za-z][A-Za-z0-9+.-]*://)?",
        host!(),
        "(:",
        port!(),
        ")?(/[^?#]*)?$"
    );
    /// Whitespace, control characters and backslashes (which URL parsers read as `/`).
    pub const URL_FORBIDDEN_CHARACTER: &str = r"[\x00-\x20\x7f-\x9f\\]";
    /// A `.` or `..` path segment.
    pub const DOT_SEGMENT: &str = "/[.]{1,2}(/|$)";
    /// A percent-encoded `.`, `/` or `\`.
    pub const ENCODED_DOT_OR_SLASH: &str = "%(2[EeFf]|5[Cc])";
    /// C0 and C1 control characters (a newline, a tab, ...).
    pub const CONTROL_CHARACTER: &str = r"[\x00-\x1f\x7f-\x9f]";
    /// What k3s copies into hosts.toml without escaping.
    pub const BACKSLASH_OR_QUOTE: &str = r#"["\\]"#;

    /// A Kubernetes quantity: a number and an optional suffix (`20Gi`, `500M`, `1e9`).
    pub const QUANTITY: &str = "^[0-9]+([.][0-9]+)?(([KMGTPE]i)|[kMGTPE]|[eE][0-9]+)?$";
    /// A DNS subdomain name (RFC 1123), as object names are.
    pub const DNS_SUBDOMAIN: &str =
        "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

    pub const ENDPOINTS_RULE: &str = "(has(self.endpoints) && size(self.endpoints) >= 1) || (has(self.embeddedRegistry) && self.embeddedRegistry)";
    pub const ENDPOINTS_NONE: &str = "endpoints must list at least one endpoint, unless embeddedRegistry is true (k3s's embedded registry mirror alone)";
    pub const QUANTITY_FORMAT: &str = "sizeLimit must be a quantity such as 20Gi, 500M or 1e9";
    pub const CLAIM_NAME_FORMAT: &str =
        "claimName must be a PersistentVolumeClaim name: lower-case letters, digits, '-' and '.'";
    pub const CACHE_RULE: &str =
        "!has(self.cache) || (has(self.endpoints) && size(self.endpoints) >= 1)";
    pub const CACHE_WITHOUT_ENDPOINT: &str =
        "cache needs an endpoint to proxy: list the upstream first in endpoints";
    /// A cache fronts one registry: containerd sends every registry's pulls to the hosts of
    /// `*` and names the registry only in `?ns=`, which distribution's proxy ignores, so a
    /// cache there would serve one registry's image under another's name.
    pub const CACHE_ONE_REGISTRY_RULE: &str = "!has(self.cache) || self.registry != '*'";
    pub const CACHE_FOR_EVERY_REGISTRY: &str = "cache is not for registry '*': a cache proxies one upstream and would serve every registry's pulls from it (quay.io/x/y as the upstream's x/y); give each registry its own mirror with a cache";
    pub const SCHEME_RULE: &str =
        "!self.contains('://') || self.startsWith('https://') || self.startsWith('http://')";
    pub const HTTP_WITHOUT_TLS_RULE: &str = "!self.url.startsWith('http://') || !has(self.tls) || (!has(self.tls.caRef) && !has(self.tls.clientCertSecretRef) && (!has(self.tls.insecureSkipVerify) || !self.tls.insecureSkipVerify))";

    pub const REGISTRY_FORMAT: &str = "registry must be a host name or IP address with an optional port (docker.io, registry.example.com:5000, [::1]:5000), or '*'";
    pub const REGISTRY_CASE: &str = "registry must be lower case, as image references name it: containerd looks its configuration up by that name";
    pub const REGISTRY_DOCKER_HUB: &str = "write docker.io: index.docker.io and registry-1.docker.io are other names of Docker Hub, whose images are named docker.io/...";
    pub const URL_SCHEME: &str = "url scheme must be https:// or http://";
    pub const URL_CHARACTERS: &str =
        "url must not contain spaces, control characters or backslashes";
    pub const URL_FORMAT: &str = "url must be [https://|http://]host[:port][/path]: a DNS name, IPv4 or [IPv6] host, a port from 1 to 65535, no user info, query or fragment";
    pub const URL_PATH: &str = "url path must not contain '.' or '..' segments, nor percent-encoded dots, slashes or backslashes";
    pub const HTTP_WITH_TLS: &str =
        "TLS settings given for an http:// endpoint; use https:// or drop tls";
    pub const PATTERN_CONTROL: &str =
        "pattern must not contain control characters (a newline, a tab, ...)";
    pub const PATTERN_ESCAPES: &str = "pattern must not contain a backslash or a double quote: k3s and RKE2, the only flavors with rewrites, copy them into hosts.toml unescaped (write [.] instead of \\.)";
    pub const REPLACEMENT_CONTROL: &str =
        "replacement must not contain control characters (a newline, a tab, ...)";
    pub const REPLACEMENT_ESCAPES: &str = "replacement must not contain a backslash or a double quote: k3s and RKE2, the only flavors with rewrites, copy them into hosts.toml unescaped";

    /// `re` as a CEL string literal.
    pub fn cel_string(re: &str) -> String {
        format!("'{}'", re.replace('\\', "\\\\").replace('\'', "\\'"))
    }

    /// A CEL rule: `value` matches `re`.
    pub fn must_match(value: &str, re: &str) -> String {
        format!("{value}.matches({})", cel_string(re))
    }

    /// A CEL rule: `value` does not match `re`.
    pub fn no_match(value: &str, re: &str) -> String {
        format!("!{}", must_match(value, re))
    }

    /// The CEL rule for `spec.registry`'s form.
    pub fn registry_rule() -> String {
        format!("self == '*' || {}", must_match("self", REGISTRY))
    }

    /// The CEL rule for an endpoint URL's path.
    pub fn url_path_rule() -> String {
        format!(
            "{} && {}",
            no_match("self", DOT_SEGMENT),
            no_match("self", ENCODED_DOT_OR_SLASH)
        )
    }
}

/// Observed state, written by the operator only.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RegistryMirrorStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded` and `Stalled` (what Degraded says, for kstatus, which
    /// reads Stalled=True as Failed), as kstatus (Flux) and Argo CD read them; and
    /// `EmbeddedRegistry` for a mirror with `embeddedRegistry`: whether its k3s/RKE2 nodes run
    /// k3s's embedded registry mirror (False names those that do not; it never makes the mirror
    /// un-Ready).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// How far the configuration has reached.
    #[serde(default)]
    pub nodes: NodeCounts,
    /// Nodes that failed to apply, with their reason (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<NodeFailure>,
    /// While nodes are still to move: what their moves take (live, a runtime reload, a
    /// runtime restart) and in how many `maxUnavailable` waves the restarts go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::impact::Impact>,
}

/// A status condition in the shape of `metav1.Condition`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Progressing`, `Degraded`, `Stalled` or `EmbeddedRegistry`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason.
    pub reason: String,
    /// A human-readable message naming the field and the problem.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// The generation this condition describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Node counts of a rollout.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    /// Nodes the nodeSelector selects.
    pub targeted: u32,
    /// Nodes running the newest configuration.
    pub updated: u32,
    /// Nodes still to move.
    pub pending: u32,
    /// Nodes that failed to apply it.
    pub failed: u32,
}

/// One node's failure.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeFailure {
    /// The node's name.
    pub node: String,
    /// What the node agent reported.
    pub reason: String,
}

/// The CustomResourceDefinition as YAML, exactly as checked in under `crds/`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let yaml = serde_yaml::to_string(&RegistryMirror::crd()).expect("the CRD serializes");
    format!("# Generated by `regmirror crdgen`; do not edit.\n{yaml}")
}
