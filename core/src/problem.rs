//! What can be wrong with a RegistryMirror, said so that a person can fix it: the field, and why.

use thiserror::Error;

/// One problem with one field of one RegistryMirror.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.endpoints[0].auth.secretRef`.
    pub field: String,
    /// Why it is wrong.
    pub reason: Reason,
}

impl FieldError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, reason: Reason) -> Self {
        Self {
            field: field.into(),
            reason,
        }
    }
}

/// Why a field is wrong.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The schema (including its CEL rules) refuses the value.
    #[error("{0}")]
    Schema(String),
    /// The URL does not parse or is not usable as a registry endpoint.
    #[error("invalid URL {url:?}: {detail}")]
    BadUrl { url: String, detail: String },
    /// A rewrite pattern is not a valid regular expression.
    #[error("pattern {pattern:?} does not compile: {detail}")]
    BadRegex { pattern: String, detail: String },
    /// The nodeSelector cannot be evaluated.
    #[error("invalid nodeSelector: {0}")]
    BadSelector(String),
    /// A reference points outside the namespaces the operator may read.
    #[error(
        "{kind} {namespace}/{name} is in a namespace regmirror may not read (allowed: {allowed})"
    )]
    NamespaceRefused {
        kind: &'static str,
        namespace: String,
        name: String,
        allowed: String,
    },
    /// The referenced Secret or ConfigMap does not exist.
    #[error("{kind} {namespace}/{name} not found")]
    MissingObject {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    /// The referenced object lacks the key.
    #[error("{kind} {namespace}/{name} has no key {key:?}")]
    MissingKey {
        kind: &'static str,
        namespace: String,
        name: String,
        key: String,
    },
    /// A key holds something that is not the PEM it must be.
    #[error("{kind} {namespace}/{name} key {key:?} is not a valid PEM {expected}: {detail}")]
    BadPem {
        kind: &'static str,
        namespace: String,
        name: String,
        key: String,
        expected: &'static str,
        detail: String,
    },
    /// A Secret's type or content cannot serve as credentials or certificates.
    #[error("Secret {namespace}/{name}: {detail}")]
    BadSecret {
        namespace: String,
        name: String,
        detail: String,
    },
    /// A credential Secret does not list the endpoint's host in its allowed-hosts annotation.
    #[error("Secret {namespace}/{name} does not allow its credentials to be sent to {endpoint}: add {entry:?} to its annotation {annotation} ({})", describe_allowed(current.as_deref(), invalid))]
    NotAllowedHost {
        namespace: String,
        name: String,
        /// `scheme://host[:port]`.
        endpoint: String,
        /// The entry that would allow it.
        entry: String,
        annotation: &'static str,
        /// The annotation's value, if any.
        current: Option<String>,
        /// Entries of it that are not host patterns.
        invalid: Vec<String>,
    },
    /// The mirror's cache cannot proxy its first endpoint.
    #[error("{0}")]
    Cache(#[from] crate::cache::CacheError),
    /// The mirror's cache has no address (or certificate for it) yet: its nodes wait.
    #[error("waiting for the cache {name} to get its cluster IP and certificate")]
    CacheNotReady { name: String },
    /// The operator could not set the mirror's cache up (its last attempt's error).
    #[error("the cache {name} could not be set up: {detail}")]
    CacheFailed { name: String, detail: String },
    /// Two endpoints of one RegistryMirror name the same host with different settings.
    #[error("host {host:?} is also endpoint {other} with different credentials or TLS settings; a node can hold only one per host")]
    HostSettingsDiffer { host: String, other: usize },
}

fn describe_allowed(current: Option<&str>, invalid: &[String]) -> String {
    let now = match current {
        None => "it has none".to_owned(),
        Some(value) => format!("now {value:?}"),
    };
    if invalid.is_empty() {
        now
    } else {
        format!(
            "{now}; not host patterns, so allowing nothing: {}",
            invalid.join(", ")
        )
    }
}
