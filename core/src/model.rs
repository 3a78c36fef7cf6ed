//! RegistryMirrors after their references are resolved: everything a renderer needs, nothing
//! it has to look up. Secret material in here never shows in `Debug` output.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A RegistryMirror whose endpoints, credentials and certificates are known and valid.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedMirror {
    /// `metadata.name` of the RegistryMirror.
    pub name: String,
    /// The registry name, or `*`.
    pub registry: String,
    /// Endpoints in the order they are tried.
    pub endpoints: Vec<ResolvedEndpoint>,
    /// `(pattern, replacement)` pairs, in the order written.
    pub rewrites: Vec<(String, String)>,
    /// Which nodes get it (already checked to be evaluable).
    pub node_selector: Option<LabelSelector>,
    /// Listed for k3s's embedded registry mirror (`spec.embeddedRegistry`).
    pub embedded_registry: bool,
}

/// One endpoint, fully resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedEndpoint {
    pub url: EndpointUrl,
    pub settings: HostSettings,
    /// The Secret its credentials come from (`namespace/name`), if it has any: named where a
    /// person asks which credentials a pull uses, never its values.
    pub credentials_from: Option<String>,
}

/// What a node holds per endpoint host: one set of credentials and TLS settings. Container
/// runtimes key these by host, so two endpoints on one host must agree on them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostSettings {
    pub auth: Option<Credentials>,
    pub tls: ResolvedTls,
}

impl HostSettings {
    /// Whether there is anything to write for this host beyond its URL.
    pub fn is_empty(&self) -> bool {
        self.auth.is_none() && self.tls == ResolvedTls::default()
    }
}

/// http or https.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// A parsed endpoint URL: scheme, `host[:port]` and an optional path prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointUrl {
    pub scheme: Scheme,
    /// `host` or `host:port`, IPv6 literals in brackets.
    pub host: String,
    /// Empty (the `/v2` API root), or a path starting with `/` and not ending with one.
    pub path: String,
}

/// The host that serves a registry's API: Docker Hub's differs from its name.
pub fn api_host(host: &str) -> String {
    if host == "docker.io" {
        "registry-1.docker.io".into()
    } else {
        host.to_owned()
    }
}

impl EndpointUrl {
    /// Whether two URLs reach the same API root (`docker.io` is `registry-1.docker.io`).
    pub fn same_endpoint(&self, other: &EndpointUrl) -> bool {
        self.scheme == other.scheme
            && api_host(&self.host) == api_host(&other.host)
            && self.path == other.path
    }
}

impl fmt::Display for EndpointUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme.as_str(), self.host, self.path)
    }
}

/// Credentials for one registry host.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Username and password (also what an `auth` value decodes to).
    Basic { username: String, password: String },
    /// An OAuth2 refresh token exchanged for access tokens (`identity_token` in k3s).
    IdentityToken(String),
    /// A static bearer token sent as is.
    BearerToken(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Basic { username, .. } => {
                write!(
                    f,
                    "Basic {{ username: {username:?}, password: <redacted> }}"
                )
            }
            Credentials::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
            Credentials::BearerToken(_) => f.write_str("BearerToken(<redacted>)"),
        }
    }
}

/// TLS settings for one registry host, with PEM contents in hand.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolvedTls {
    /// CA bundle (PEM).
    pub ca: Option<String>,
    /// Client certificate and key for mutual TLS.
    pub client: Option<ClientCert>,
    pub insecure_skip_verify: bool,
}

/// A client certificate (PEM) and its key (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: String,
    pub key: String,
}

impl fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCert")
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .finish()
    }
}
