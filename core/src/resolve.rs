//! Resolving a RegistryMirror: parse its URLs, compile its rewrites, look its references up in
//! a [`Sources`] snapshot and check what they hold. Pure: every problem comes back as a
//! [`FieldError`] naming the field, and nothing half-resolved escapes.

use std::sync::LazyLock;

use regex::Regex;
use serde::Deserialize;

use crate::api::{CaRef, Endpoint, EndpointAuth, EndpointTls, KeyRef, ObjectRef, RegistryMirror};
use crate::model::{
    ClientCert, Credentials, EndpointUrl, HostSettings, ResolvedEndpoint, ResolvedMirror,
    ResolvedTls, Scheme,
};
use crate::problem::{FieldError, Reason};
use crate::select;
use crate::sources::{RefPolicy, SourceKind, SourceObject, Sources};

/// The registry names the API accepts: a DNS name or IPv4 address with an optional port, a
/// bracketed IPv6 literal with an optional port, or `*`. Checked here as well as in the CRD's
/// CEL rule because the name becomes a directory name on the node.
static REGISTRY_NAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(\*|([a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?)(\.[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?)*(:[0-9]{1,5})?|\[[0-9a-fA-F:.]+\](:[0-9]{1,5})?)$")
        .expect("registry name pattern is valid")
});

/// Resolves one RegistryMirror against `sources`, or says everything that is wrong with it.
pub fn resolve(
    mirror: &RegistryMirror,
    sources: &Sources,
    policy: &RefPolicy,
) -> Result<ResolvedMirror, Vec<FieldError>> {
    let spec = &mirror.spec;
    let mut errors = Vec::new();

    if !REGISTRY_NAME.is_match(&spec.registry) {
        errors.push(FieldError::new(
            "spec.registry",
            Reason::Schema(format!(
                "{:?} is not a registry host name with an optional port, or '*'",
                spec.registry
            )),
        ));
    }
    // The schema's bounds (maxItems), for input that did not come through the API server.
    for (field, len, max) in [
        ("spec.endpoints", spec.endpoints.len(), 16),
        ("spec.rewrites", spec.rewrites.len(), 32),
    ] {
        if len > max {
            errors.push(FieldError::new(
                field,
                Reason::Schema(format!("lists {len} items; at most {max} are allowed")),
            ));
        }
    }
    if spec.endpoints.is_empty() {
        errors.push(FieldError::new(
            "spec.endpoints",
            Reason::Schema("must list at least one endpoint".into()),
        ));
    }

    let mut endpoints = Vec::with_capacity(spec.endpoints.len());
    for (i, endpoint) in spec.endpoints.iter().enumerate() {
        match resolve_endpoint(endpoint, &format!("spec.endpoints[{i}]"), sources, policy) {
            Ok(resolved) => endpoints.push(resolved),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        check_hosts_agree(&endpoints, &mut errors);
        for (i, endpoint) in endpoints.iter().enumerate() {
            if let Some(first) = endpoints[..i]
                .iter()
                .position(|e| e.url.same_endpoint(&endpoint.url))
            {
                errors.push(FieldError::new(
                    format!("spec.endpoints[{i}].url"),
                    Reason::Schema(format!("{} is already endpoints[{first}]", endpoint.url)),
                ));
            }
        }
    }

    let mut rewrites = Vec::with_capacity(spec.rewrites.len());
    for (i, rewrite) in spec.rewrites.iter().enumerate() {
        if let Some(first) = spec.rewrites[..i]
            .iter()
            .position(|r| r.pattern == rewrite.pattern)
        {
            errors.push(FieldError::new(
                format!("spec.rewrites[{i}].pattern"),
                Reason::Schema(format!(
                    "pattern {:?} is already rewrites[{first}]",
                    rewrite.pattern
                )),
            ));
            continue;
        }
        match Regex::new(&rewrite.pattern) {
            Ok(_) => rewrites.push((rewrite.pattern.clone(), rewrite.replacement.clone())),
            Err(e) => errors.push(FieldError::new(
                format!("spec.rewrites[{i}].pattern"),
                Reason::BadRegex {
                    pattern: rewrite.pattern.clone(),
                    detail: regex_error_summary(&e),
                },
            )),
        }
    }

    if let Some(selector) = &spec.node_selector {
        if let Err(detail) = select::check(selector) {
            errors.push(FieldError::new(
                "spec.nodeSelector",
                Reason::BadSelector(detail),
            ));
        }
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(ResolvedMirror {
        name: mirror.metadata.name.clone().unwrap_or_default(),
        registry: spec.registry.clone(),
        endpoints,
        rewrites,
        node_selector: spec.node_selector.clone(),
    })
}

/// Runtimes keep one set of credentials and TLS files per host: two endpoints of one mirror on
/// the same host must not ask for different ones.
fn check_hosts_agree(endpoints: &[ResolvedEndpoint], errors: &mut Vec<FieldError>) {
    for (i, endpoint) in endpoints.iter().enumerate() {
        if let Some(first) = endpoints[..i]
            .iter()
            .position(|e| e.url.host == endpoint.url.host && e.settings != endpoint.settings)
        {
            errors.push(FieldError::new(
                format!("spec.endpoints[{i}]"),
                Reason::HostSettingsDiffer {
                    host: endpoint.url.host.clone(),
                    other: first,
                },
            ));
        }
    }
}

fn resolve_endpoint(
    endpoint: &Endpoint,
    field: &str,
    sources: &Sources,
    policy: &RefPolicy,
) -> Result<ResolvedEndpoint, Vec<FieldError>> {
    let mut errors = Vec::new();
    let url = parse_endpoint_url(&endpoint.url)
        .map_err(|detail| {
            errors.push(FieldError::new(
                format!("{field}.url"),
                Reason::BadUrl {
                    url: endpoint.url.clone(),
                    detail,
                },
            ))
        })
        .ok();

    let auth = match &endpoint.auth {
        None => None,
        Some(auth) => resolve_auth(
            auth,
            url.as_ref(),
            &format!("{field}.auth.secretRef"),
            sources,
            policy,
        )
        .map_err(|e| errors.push(e))
        .ok(),
    };
    let tls = match &endpoint.tls {
        None => ResolvedTls::default(),
        Some(tls) => {
            if url.as_ref().is_some_and(|u| u.scheme == Scheme::Http)
                && *tls != EndpointTls::default()
            {
                errors.push(FieldError::new(
                    format!("{field}.tls"),
                    Reason::Schema(
                        "TLS settings given for an http:// endpoint; use https:// or drop tls"
                            .into(),
                    ),
                ));
            }
            resolve_tls(tls, &format!("{field}.tls"), sources, policy, &mut errors)
        }
    };

    match (url, errors.is_empty()) {
        (Some(url), true) => Ok(ResolvedEndpoint {
            url,
            settings: HostSettings {
                auth: auth.flatten(),
                tls,
            },
        }),
        _ => Err(errors),
    }
}

/// Parses an endpoint URL. A URL without a scheme means https; `http://` must be explicit.
pub fn parse_endpoint_url(raw: &str) -> Result<EndpointUrl, String> {
    let with_scheme = if raw.contains("://") {
        raw.to_owned()
    } else {
        format!("https://{raw}")
    };
    let url = url::Url::parse(&with_scheme).map_err(|e| e.to_string())?;
    let scheme = match url.scheme() {
        "https" => Scheme::Https,
        "http" => Scheme::Http,
        other => return Err(format!("scheme {other:?} is not http or https")),
    };
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or("no host")?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials belong in auth.secretRef, not in the URL".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a registry endpoint takes no query or fragment".into());
    }
    let host = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    // `/v2` is the API root every registry has: no path and `/v2` are the same endpoint.
    let path = url.path().trim_end_matches('/');
    let path = if path == "/v2" {
        String::new()
    } else {
        path.to_owned()
    };
    Ok(EndpointUrl { scheme, host, path })
}

/// Looks a referenced object up, refusing namespaces the policy does not allow.
fn lookup<'s>(
    kind: SourceKind,
    name: &str,
    namespace: Option<&str>,
    field: &str,
    sources: &'s Sources,
    policy: &RefPolicy,
) -> Result<(&'s SourceObject, String), FieldError> {
    let namespace = namespace.unwrap_or(&policy.operator_namespace).to_owned();
    if !policy.allows(&namespace) {
        return Err(FieldError::new(
            field,
            Reason::NamespaceRefused {
                kind: kind.as_str(),
                namespace,
                name: name.to_owned(),
                allowed: policy.describe(),
            },
        ));
    }
    match sources.get(kind, &namespace, name) {
        Some(object) => Ok((object, namespace)),
        None => Err(FieldError::new(
            field,
            Reason::MissingObject {
                kind: kind.as_str(),
                namespace,
                name: name.to_owned(),
            },
        )),
    }
}

/// Reads one key as UTF-8 text.
fn text_key(
    object: &SourceObject,
    kind: SourceKind,
    namespace: &str,
    name: &str,
    key: &str,
    field: &str,
) -> Result<String, FieldError> {
    let missing = || Reason::MissingKey {
        kind: kind.as_str(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        key: key.to_owned(),
    };
    let bytes = object
        .data
        .get(key)
        .ok_or_else(|| FieldError::new(field, missing()))?;
    String::from_utf8(bytes.clone()).map_err(|_| {
        FieldError::new(
            field,
            Reason::BadSecret {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                detail: format!("key {key:?} is not UTF-8 text"),
            },
        )
    })
}

fn resolve_auth(
    auth: &EndpointAuth,
    url: Option<&EndpointUrl>,
    field: &str,
    sources: &Sources,
    policy: &RefPolicy,
) -> Result<Option<Credentials>, FieldError> {
    let ObjectRef { name, namespace } = &auth.secret_ref;
    let (secret, namespace) = lookup(
        SourceKind::Secret,
        name,
        namespace.as_deref(),
        field,
        sources,
        policy,
    )?;
    let bad = |detail: String| {
        FieldError::new(
            field,
            Reason::BadSecret {
                namespace: namespace.clone(),
                name: name.clone(),
                detail,
            },
        )
    };
    let text = |key: &str| text_key(secret, SourceKind::Secret, &namespace, name, key, field);

    match secret.type_.as_deref().unwrap_or("Opaque") {
        "kubernetes.io/basic-auth" => Ok(Some(Credentials::Basic { username: text("username")?, password: text("password")? })),
        "kubernetes.io/dockerconfigjson" => {
            // Without a parsed URL there is no host to look up; the URL error is reported already.
            let Some(url) = url else { return Ok(None) };
            let json = text(".dockerconfigjson")?;
            docker_config_credentials(&json, &url.host).map(Some).map_err(bad)
        }
        "Opaque" => {
            let has = |key: &str| secret.data.contains_key(key);
            let forms: Vec<&str> = ["username", "auth", "identityToken", "token"].into_iter().filter(|k| has(k)).collect();
            match forms.as_slice() {
                ["username"] => Ok(Some(Credentials::Basic { username: text("username")?, password: text("password")? })),
                ["auth"] => decode_auth(&text("auth")?).map(Some).map_err(bad),
                ["identityToken"] => Ok(Some(Credentials::IdentityToken(text("identityToken")?))),
                ["token"] => Ok(Some(Credentials::BearerToken(text("token")?))),
                [] => Err(bad("an Opaque credentials Secret needs username+password, auth, identityToken or token".into())),
                several => Err(bad(format!("holds several kinds of credentials ({}); keep exactly one", several.join(", ")))),
            }
        }
        other => Err(bad(format!(
            "type {other:?} cannot hold registry credentials (use kubernetes.io/basic-auth, kubernetes.io/dockerconfigjson or Opaque)"
        ))),
    }
}

/// Decodes an `auth` value: base64 of `username:password`.
fn decode_auth(auth: &str) -> Result<Credentials, String> {
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| "auth is not base64 of username:password".to_owned())?;
    let decoded =
        String::from_utf8(decoded).map_err(|_| "auth does not decode to UTF-8 text".to_owned())?;
    let (username, password) = decoded
        .split_once(':')
        .ok_or("auth does not decode to username:password")?;
    Ok(Credentials::Basic {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, DockerAuthEntry>,
}

#[derive(Deserialize)]
struct DockerAuthEntry {
    username: Option<String>,
    password: Option<String>,
    auth: Option<String>,
    identitytoken: Option<String>,
    registrytoken: Option<String>,
}

/// Picks the entry of a `.dockerconfigjson` for `host`. Keys may be written as URLs
/// (`https://index.docker.io/v1/`), so they are compared by host only.
fn docker_config_credentials(json: &str, host: &str) -> Result<Credentials, String> {
    let config: DockerConfig = serde_json::from_str(json).map_err(|e| {
        // Not `{e}`: serde quotes the offending value, which may be a password.
        format!(
            ".dockerconfigjson is not a docker config ({:?} error at line {}, column {})",
            e.classify(),
            e.line(),
            e.column()
        )
    })?;
    let key_host = |key: &str| {
        let without_scheme = key.split_once("://").map_or(key, |(_, rest)| rest);
        without_scheme
            .split('/')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    let (_, entry) = config
        .auths
        .iter()
        .find(|(key, _)| key_host(key) == host.to_ascii_lowercase())
        .ok_or_else(|| {
            let known: Vec<&str> = config.auths.keys().map(String::as_str).collect();
            format!(
                ".dockerconfigjson has no entry for host {host:?} (entries: {})",
                known.join(", ")
            )
        })?;
    if let (Some(username), Some(password)) = (&entry.username, &entry.password) {
        return Ok(Credentials::Basic {
            username: username.clone(),
            password: password.clone(),
        });
    }
    if let Some(auth) = &entry.auth {
        return decode_auth(auth);
    }
    if let Some(token) = &entry.identitytoken {
        return Ok(Credentials::IdentityToken(token.clone()));
    }
    if let Some(token) = &entry.registrytoken {
        return Ok(Credentials::BearerToken(token.clone()));
    }
    Err(format!(
        ".dockerconfigjson entry for {host:?} has no username/password, auth or token"
    ))
}

fn resolve_tls(
    tls: &EndpointTls,
    field: &str,
    sources: &Sources,
    policy: &RefPolicy,
    errors: &mut Vec<FieldError>,
) -> ResolvedTls {
    let ca = tls.ca_ref.as_ref().and_then(|ca| {
        resolve_ca(ca, &format!("{field}.caRef"), sources, policy)
            .map_err(|e| errors.push(e))
            .ok()
    });
    let client = tls.client_cert_secret_ref.as_ref().and_then(|r| {
        resolve_client_cert(r, &format!("{field}.clientCertSecretRef"), sources, policy)
            .map_err(|e| errors.push(e))
            .ok()
    });
    ResolvedTls {
        ca,
        client,
        insecure_skip_verify: tls.insecure_skip_verify,
    }
}

fn resolve_ca(
    ca: &CaRef,
    field: &str,
    sources: &Sources,
    policy: &RefPolicy,
) -> Result<String, FieldError> {
    let (kind, key_ref, field) = match (&ca.secret_ref, &ca.config_map_ref) {
        (Some(r), None) => (SourceKind::Secret, r, format!("{field}.secretRef")),
        (None, Some(r)) => (SourceKind::ConfigMap, r, format!("{field}.configMapRef")),
        _ => {
            return Err(FieldError::new(
                field,
                Reason::Schema("caRef needs exactly one of secretRef or configMapRef".into()),
            ))
        }
    };
    let KeyRef {
        name, namespace, ..
    } = key_ref;
    let key = key_ref.key_or_default();
    let (object, namespace) = lookup(kind, name, namespace.as_deref(), &field, sources, policy)?;
    let pem = text_key(object, kind, &namespace, name, key, &field)?;
    check_pem(&pem, PemKind::Certificates).map_err(|detail| {
        FieldError::new(
            &field,
            Reason::BadPem {
                kind: kind.as_str(),
                namespace,
                name: name.clone(),
                key: key.to_owned(),
                expected: "certificate bundle",
                detail,
            },
        )
    })?;
    Ok(pem)
}

fn resolve_client_cert(
    r: &ObjectRef,
    field: &str,
    sources: &Sources,
    policy: &RefPolicy,
) -> Result<ClientCert, FieldError> {
    let kind = SourceKind::Secret;
    let (secret, namespace) = lookup(
        kind,
        &r.name,
        r.namespace.as_deref(),
        field,
        sources,
        policy,
    )?;
    let read = |key: &str, pem_kind: PemKind, expected: &'static str| {
        let pem = text_key(secret, kind, &namespace, &r.name, key, field)?;
        check_pem(&pem, pem_kind).map_err(|detail| {
            FieldError::new(
                field,
                Reason::BadPem {
                    kind: kind.as_str(),
                    namespace: namespace.clone(),
                    name: r.name.clone(),
                    key: key.to_owned(),
                    expected,
                    detail,
                },
            )
        })?;
        Ok(pem)
    };
    Ok(ClientCert {
        cert: read("tls.crt", PemKind::Certificates, "certificate")?,
        key: read("tls.key", PemKind::PrivateKey, "private key")?,
    })
}

#[derive(Clone, Copy)]
enum PemKind {
    Certificates,
    PrivateKey,
}

/// Checks that `text` is PEM of the expected kind: every block decodes, carries the right
/// label, and holds a DER SEQUENCE. Catches pasted garbage, truncation and swapped keys.
fn check_pem(text: &str, kind: PemKind) -> Result<(), String> {
    let blocks = pem::parse_many(text).map_err(|e| match e {
        // The base64 error names the offending byte: not for a private key's status message.
        pem::PemError::InvalidData(_) => "a PEM block's body is not valid base64".to_owned(),
        other => other.to_string(),
    })?;
    if blocks.is_empty() {
        return Err("no PEM block found".into());
    }
    if matches!(kind, PemKind::PrivateKey) && blocks.len() != 1 {
        return Err(format!(
            "expected one private key block, found {}",
            blocks.len()
        ));
    }
    for block in &blocks {
        let label_ok = match kind {
            PemKind::Certificates => block.tag() == "CERTIFICATE",
            PemKind::PrivateKey => block.tag().ends_with("PRIVATE KEY"),
        };
        if !label_ok {
            return Err(format!("unexpected block {:?}", block.tag()));
        }
        if block.contents().first() != Some(&0x30) {
            return Err(format!("block {:?} does not hold DER data", block.tag()));
        }
    }
    Ok(())
}

/// The regex crate explains errors over several lines, ending with the one that says what is wrong.
fn regex_error_summary(e: &regex::Error) -> String {
    let s = e.to_string();
    s.lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or(&s)
        .trim()
        .to_owned()
}
