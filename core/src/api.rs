//! The `RegistryMirror` API (`regmirror.io/v1alpha1`): the Kubernetes-facing types only.
//!
//! Everything here is data. What the fields *mean* for a node lives in `resolve` (references
//! to Secrets and ConfigMaps), `select` (nodeSelector), and `render` (the files). The schema
//! carries CEL rules for whatever the API server can check at `kubectl apply` time; the same
//! rules run offline in `regmirror validate` through kube's CEL evaluator.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

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
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryMirrorSpec {
    /// The registry name as written in image references (`docker.io`, `quay.io`,
    /// `registry.example.com:5000`), or `*` for every registry.
    #[x_kube(validation = Rule::new(
        "self == '*' || self.matches('^([a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?)(\\\\.[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?)*(:[0-9]{1,5})?$')"
    ).message("registry must be a host name with an optional port (docker.io, registry.example.com:5000), or '*'"))]
    // Bounded so that the API server can estimate the CEL rules' cost.
    #[schemars(length(min = 1, max = 260))]
    pub registry: String,

    /// Endpoints tried in order before the registry itself, which always stays the last resort.
    #[x_kube(validation = Rule::new("size(self) >= 1").message("endpoints must list at least one endpoint"))]
    #[schemars(length(max = 16))]
    pub endpoints: Vec<Endpoint>,

    /// Image-name rewrites applied when pulling from an endpoint (k3s and RKE2 only; never
    /// applied to the registry itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub rewrites: Vec<Rewrite>,

    /// Which nodes get this configuration; empty or absent selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

/// One endpoint to pull from.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// `https://host[:port][/path]`; `http://` must be written out, and a URL without a scheme
    /// means https.
    #[x_kube(validation = Rule::new(
        "!self.contains('://') || self.startsWith('https://') || self.startsWith('http://')"
    ).message("url scheme must be https:// or http://"))]
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
    #[schemars(length(min = 1, max = 1024))]
    pub pattern: String,
    /// What the matched repository path becomes.
    #[schemars(length(max = 1024))]
    pub replacement: String,
}

/// Observed state, written by the operator only.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RegistryMirrorStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, as kstatus (Flux) and Argo CD read them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// How far the configuration has reached.
    #[serde(default)]
    pub nodes: NodeCounts,
    /// Nodes that failed to apply, with their reason (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<NodeFailure>,
}

/// A status condition in the shape of `metav1.Condition`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Progressing` or `Degraded`.
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
