//! A snapshot of the Secrets and ConfigMaps RegistryMirrors may reference, as plain data.
//!
//! The operator fills it from its watch caches; the CLI fills it from YAML files. Resolving
//! references against it is a pure lookup.

use std::collections::BTreeMap;
use std::fmt;

use crate::cache::CacheSite;
use crate::model::{EndpointUrl, Scheme};

/// The kind of a referenced object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceKind {
    Secret,
    ConfigMap,
}

impl SourceKind {
    /// The Kubernetes kind, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Secret => "Secret",
            SourceKind::ConfigMap => "ConfigMap",
        }
    }
}

/// The annotation by which a credential Secret (an endpoint's `auth.secretRef`, or its
/// `tls.clientCertSecretRef`) names the endpoint hosts allowed to use it: a comma-separated list
/// of host patterns (see [`HostPattern`]). Without it, no RegistryMirror may use the
/// Secret: RegistryMirrors are cluster-scoped, so whoever may write one could otherwise send
/// stored credentials to a host of their choice.
pub const ALLOWED_HOSTS: &str = "regmirror.io/allowed-hosts";

/// One Secret or ConfigMap: its type (Secrets only), its decoded data, and the one annotation
/// regmirror reads.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SourceObject {
    /// `type` of a Secret (`Opaque` when unset); `None` for ConfigMaps.
    pub type_: Option<String>,
    /// Decoded data (`data` and `stringData` of a Secret; `data` of a ConfigMap).
    pub data: BTreeMap<String, Vec<u8>>,
    /// The value of its [`ALLOWED_HOSTS`] annotation, as written. Only this annotation is
    /// kept: others may hold the Secret itself (`kubectl.kubernetes.io/last-applied-configuration`).
    pub allowed_hosts: Option<String>,
}

impl SourceObject {
    /// The same object, with `patterns` as its [`ALLOWED_HOSTS`] annotation.
    pub fn allowing_hosts(mut self, patterns: impl Into<String>) -> Self {
        self.allowed_hosts = Some(patterns.into());
        self
    }

    /// The [`ALLOWED_HOSTS`] annotation among an object's annotations.
    pub fn allowed_hosts_of(annotations: Option<&BTreeMap<String, String>>) -> Option<String> {
        annotations.and_then(|a| a.get(ALLOWED_HOSTS)).cloned()
    }
}

// Secret values never reach a log line: Debug shows keys only.
impl std::fmt::Debug for SourceObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceObject")
            .field("type_", &self.type_)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .field("allowed_hosts", &self.allowed_hosts)
            .finish()
    }
}

/// Address of a source object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceKey {
    pub kind: SourceKind,
    pub namespace: String,
    pub name: String,
}

/// All the objects references may resolve to, and where the caches that mirrors ask for are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    objects: BTreeMap<SourceKey, SourceObject>,
    caches: BTreeMap<String, CacheSite>,
    /// Why the operator's last attempt to set a mirror's cache up failed, by mirror.
    cache_failures: BTreeMap<String, String>,
}

impl Sources {
    /// An empty snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces one object.
    pub fn insert(&mut self, kind: SourceKind, namespace: &str, name: &str, object: SourceObject) {
        let key = SourceKey {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        self.objects.insert(key, object);
    }

    /// Looks one object up.
    pub fn get(&self, kind: SourceKind, namespace: &str, name: &str) -> Option<&SourceObject> {
        let key = SourceKey {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        self.objects.get(&key)
    }

    /// Every object, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&SourceKey, &SourceObject)> {
        self.objects.iter()
    }

    /// Records where the cache of the RegistryMirror `mirror` is.
    pub fn insert_cache(&mut self, mirror: &str, site: CacheSite) {
        self.caches.insert(mirror.to_owned(), site);
    }

    /// Where the cache of the RegistryMirror `mirror` is, once it runs.
    pub fn cache(&self, mirror: &str) -> Option<&CacheSite> {
        self.caches.get(mirror)
    }

    /// Records why setting up the cache of `mirror` failed (said while it has no site).
    pub fn insert_cache_failure(&mut self, mirror: &str, detail: String) {
        self.cache_failures.insert(mirror.to_owned(), detail);
    }

    /// Why setting up the cache of `mirror` failed last, if it did.
    pub fn cache_failure(&self, mirror: &str) -> Option<&str> {
        self.cache_failures.get(mirror).map(String::as_str)
    }
}

/// Which namespaces references may point into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefPolicy {
    /// The operator's own namespace: the default for references without one.
    pub operator_namespace: String,
    /// Further namespaces an administrator allowed explicitly.
    pub allowed_namespaces: Vec<String>,
}

impl RefPolicy {
    /// A policy that allows only the operator's namespace.
    pub fn new(operator_namespace: impl Into<String>) -> Self {
        Self {
            operator_namespace: operator_namespace.into(),
            allowed_namespaces: Vec::new(),
        }
    }

    /// Whether objects in `namespace` may be referenced.
    pub fn allows(&self, namespace: &str) -> bool {
        namespace == self.operator_namespace
            || self.allowed_namespaces.iter().any(|n| n == namespace)
    }

    /// The allowed namespaces, for messages.
    pub fn describe(&self) -> String {
        let mut all = vec![self.operator_namespace.clone()];
        all.extend(self.allowed_namespaces.iter().cloned());
        all.join(", ")
    }
}

/// One entry of an [`ALLOWED_HOSTS`] annotation: which endpoints may use a credential Secret.
///
/// `[http://|https://]host[:port]`, where `host` is a DNS name, an IPv4 address, a bracketed
/// IPv6 address, or `*.` followed by a DNS name:
///
/// - `mirror.example.com` matches exactly that host (case-insensitive), on any port;
/// - `*.example.com` matches any name below `example.com` (`a.example.com`,
///   `a.b.example.com`), but not `example.com` itself;
/// - a port, when given, must be the endpoint's (443 for `https://` endpoints without one);
/// - without a scheme, or with `https://`, only https endpoints match: credentials go over
///   plain http only to entries written `http://host…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    scheme: Scheme,
    /// `*.` + `name`.
    wildcard: bool,
    /// Lower case; IPv6 in brackets, as URLs write it.
    name: String,
    port: Option<u16>,
}

/// The entries of an [`ALLOWED_HOSTS`] annotation: the patterns, and the entries that are not
/// patterns (which allow nothing).
pub fn parse_allowed_hosts(value: &str) -> (Vec<HostPattern>, Vec<String>) {
    let mut patterns = Vec::new();
    let mut invalid = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        match entry.parse::<HostPattern>() {
            Ok(pattern) => patterns.push(pattern),
            Err(()) => invalid.push(entry.to_owned()),
        }
    }
    (patterns, invalid)
}

/// `name` and `port` of `host[:port]`, IPv6 literals in brackets.
pub(crate) fn split_host_port(host: &str) -> Option<(&str, Option<&str>)> {
    if host.starts_with('[') {
        let end = host.find(']')?;
        let (name, rest) = host.split_at(end + 1);
        match rest {
            "" => Some((name, None)),
            _ => rest.strip_prefix(':').map(|port| (name, Some(port))),
        }
    } else {
        match host.split_once(':') {
            Some((name, port)) => Some((name, Some(port))),
            None => Some((host, None)),
        }
    }
}

fn is_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl std::str::FromStr for HostPattern {
    type Err = ();

    fn from_str(entry: &str) -> Result<Self, ()> {
        let entry = entry.to_ascii_lowercase();
        let (scheme, rest) = if let Some(rest) = entry.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else if let Some(rest) = entry.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else if entry.contains("://") {
            return Err(());
        } else {
            (Scheme::Https, entry.as_str())
        };
        let (name, port) = split_host_port(rest).ok_or(())?;
        let port = match port {
            None => None,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or(())?)
            }
            Some(_) => return Err(()),
        };
        let (wildcard, name) = match name.strip_prefix("*.") {
            Some(suffix) => (true, suffix),
            None => (false, name),
        };
        let name = if let Some(ip) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
            if wildcard {
                return Err(());
            }
            // As URLs write it: `[0:0::1]` is `[::1]`.
            format!("[{}]", ip.parse::<std::net::Ipv6Addr>().map_err(|_| ())?)
        } else if is_dns_name(name) {
            name.to_owned()
        } else {
            return Err(());
        };
        Ok(HostPattern {
            scheme,
            wildcard,
            name,
            port,
        })
    }
}

impl HostPattern {
    /// Whether an endpoint at `url` may use the Secret this pattern comes from.
    pub fn matches(&self, url: &EndpointUrl) -> bool {
        let Some((name, port)) = split_host_port(&url.host) else {
            return false;
        };
        let name = name.to_ascii_lowercase();
        let port = match port {
            Some(p) => p.parse::<u16>().ok(),
            None => Some(match url.scheme {
                Scheme::Https => 443,
                Scheme::Http => 80,
            }),
        };
        let name_matches = if self.wildcard {
            name.strip_suffix(&self.name)
                .is_some_and(|below| below.len() > 1 && below.ends_with('.'))
        } else {
            name == self.name
        };
        self.scheme == url.scheme && name_matches && self.port.is_none_or(|p| Some(p) == port)
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.scheme == Scheme::Http {
            f.write_str("http://")?;
        }
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::parse_endpoint_url;

    fn allows(annotation: &str, url: &str) -> bool {
        let url = parse_endpoint_url(url).unwrap();
        parse_allowed_hosts(annotation)
            .0
            .iter()
            .any(|p| p.matches(&url))
    }

    #[test]
    fn exact_hosts_match_on_any_port_unless_one_is_given() {
        assert!(allows("mirror.example.com", "https://mirror.example.com"));
        assert!(allows(
            "mirror.example.com",
            "https://mirror.example.com:5000/v2/x"
        ));
        assert!(allows("Mirror.Example.com", "https://MIRROR.example.COM"));
        assert!(allows(
            "mirror.example.com:5000",
            "https://mirror.example.com:5000"
        ));
        assert!(!allows(
            "mirror.example.com:5000",
            "https://mirror.example.com:5001"
        ));
        assert!(!allows(
            "mirror.example.com:5000",
            "https://mirror.example.com"
        ));
        assert!(allows(
            "mirror.example.com:443",
            "https://mirror.example.com"
        ));
        assert!(!allows("mirror.example.com", "https://evil.example.com"));
        assert!(!allows(
            "mirror.example.com",
            "https://mirror.example.com.evil.net"
        ));
        assert!(!allows("mirror.example.com", "https://xmirror.example.com"));
    }

    #[test]
    fn a_leading_star_matches_any_subdomain_but_not_the_domain() {
        assert!(allows("*.example.com", "https://a.example.com"));
        assert!(allows("*.example.com", "https://a.b.example.com:5000"));
        assert!(!allows("*.example.com", "https://example.com"));
        assert!(!allows("*.example.com", "https://badexample.com"));
        assert!(!allows("*.example.com", "https://a.example.com.evil.net"));
        assert!(allows("*.example.com:5000", "https://a.example.com:5000"));
        assert!(!allows("*.example.com:5000", "https://a.example.com:443"));
    }

    #[test]
    fn plain_http_needs_an_entry_that_says_http() {
        assert!(!allows("mirror.example.com", "http://mirror.example.com"));
        assert!(!allows(
            "https://mirror.example.com",
            "http://mirror.example.com"
        ));
        assert!(allows(
            "http://mirror.example.com",
            "http://mirror.example.com:5000"
        ));
        assert!(!allows(
            "http://mirror.example.com",
            "https://mirror.example.com"
        ));
        assert!(allows(
            "http://mirror.example.com, mirror.example.com",
            "https://mirror.example.com"
        ));
    }

    #[test]
    fn lists_addresses_and_bad_entries() {
        assert!(allows(
            "a.example.com, 10.0.0.1:5000",
            "https://10.0.0.1:5000"
        ));
        assert!(allows(" [::1]:5000 ,", "https://[::1]:5000"));
        assert!(allows("[0:0::1]", "https://[::1]:5000"));
        let (patterns, invalid) = parse_allowed_hosts(
            "*, *example.com, a.*.com, https://x/path, ftp://x, x:0, x:y, ok.example.com",
        );
        assert_eq!(patterns.len(), 1);
        assert_eq!(
            invalid,
            [
                "*",
                "*example.com",
                "a.*.com",
                "https://x/path",
                "ftp://x",
                "x:0",
                "x:y"
            ]
        );
        assert!(parse_allowed_hosts("").0.is_empty());
    }
}
