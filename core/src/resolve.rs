//! Resolving a RegistryMirror: parse its URLs, compile its rewrites, look its references up in
//! a [`Sources`] snapshot and check what they hold. Pure: every problem comes back as a
//! [`FieldError`] naming the field, and nothing half-resolved escapes.

use std::sync::LazyLock;

use regex::Regex;

use crate::api::{
    grammar, CaRef, CacheSpec, Endpoint, EndpointAuth, EndpointTls, KeyRef, ObjectRef,
    RegistryMirror,
};
use crate::cache::{self, CacheError, Upstream};
use crate::docker_config::{decode_auth, DockerConfig};
use crate::model::{
    ClientCert, Credentials, EndpointUrl, HostSettings, ResolvedEndpoint, ResolvedMirror,
    ResolvedTls, Scheme,
};
use crate::problem::{FieldError, Reason};
use crate::select;
use crate::sources::{
    parse_allowed_hosts, split_host_port, RefPolicy, SourceKind, SourceObject, Sources,
    ALLOWED_HOSTS,
};

/// One of the schema's regular expressions ([`grammar`]), compiled.
struct Grammar {
    registry: Regex,
    upper_case: Regex,
    docker_hub_alias: Regex,
    url: Regex,
    url_forbidden: Regex,
    dot_segment: Regex,
    encoded: Regex,
    control: Regex,
    backslash_or_quote: Regex,
}

/// The same expressions as the CRD's CEL rules: the API server and the operator refuse the
/// same names (the registry name becomes a directory name on the node, so it is checked here
/// too, for objects that did not come through an API server).
static GRAMMAR: LazyLock<Grammar> = LazyLock::new(|| {
    let re = |s: &str| Regex::new(s).expect("the grammar's expressions are valid");
    Grammar {
        registry: re(grammar::REGISTRY),
        upper_case: re(grammar::UPPER_CASE),
        docker_hub_alias: re(grammar::DOCKER_HUB_ALIAS),
        url: re(grammar::URL),
        url_forbidden: re(grammar::URL_FORBIDDEN_CHARACTER),
        dot_segment: re(grammar::DOT_SEGMENT),
        encoded: re(grammar::ENCODED_DOT_OR_SLASH),
        control: re(grammar::CONTROL_CHARACTER),
        backslash_or_quote: re(grammar::BACKSLASH_OR_QUOTE),
    }
});

/// The schema's bound on `spec.registry`.
const REGISTRY_MAX_LEN: usize = 260;
/// The schema's bound on an endpoint URL.
const URL_MAX_LEN: usize = 2048;

/// Resolves one RegistryMirror against `sources`, or says everything that is wrong with it.
pub fn resolve(
    mirror: &RegistryMirror,
    sources: &Sources,
    policy: &RefPolicy,
) -> Result<ResolvedMirror, Vec<FieldError>> {
    let (resolved, errors) = resolve_partially(mirror, sources, policy);
    if errors.is_empty() {
        Ok(resolved)
    } else {
        Err(errors)
    }
}

/// Whether `registry` is a valid `spec.registry`; the problems otherwise.
pub fn check_registry(registry: &str) -> Vec<String> {
    let g = &*GRAMMAR;
    let mut problems = Vec::new();
    if registry.is_empty() || registry.len() > REGISTRY_MAX_LEN {
        problems.push(format!(
            "registry must have 1 to {REGISTRY_MAX_LEN} characters, not {}",
            registry.len()
        ));
    }
    if registry != "*" && !g.registry.is_match(registry) {
        problems.push(grammar::REGISTRY_FORMAT.to_owned());
    }
    if g.upper_case.is_match(registry) {
        problems.push(grammar::REGISTRY_CASE.to_owned());
    }
    if g.docker_hub_alias.is_match(registry) {
        problems.push(grammar::REGISTRY_DOCKER_HUB.to_owned());
    }
    problems
}

/// Resolves what it can of one RegistryMirror: the endpoints, credentials, certificates and
/// rewrites that are valid, and every problem with the rest. For `validate`, which checks what
/// each flavor can express even of a mirror with other problems; the partial mirror is never
/// rendered for a node.
pub fn resolve_partially(
    mirror: &RegistryMirror,
    sources: &Sources,
    policy: &RefPolicy,
) -> (ResolvedMirror, Vec<FieldError>) {
    let spec = &mirror.spec;
    let mut errors = Vec::new();

    for problem in check_registry(&spec.registry) {
        errors.push(FieldError::new(
            "spec.registry",
            Reason::Schema(format!("{problem} (not {:?})", spec.registry)),
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
    if let Some(cache) = &spec.cache {
        check_cache_storage(cache, &mut errors);
    }
    if spec.endpoints.is_empty() && !spec.embedded_registry {
        errors.push(FieldError::new(
            "spec.endpoints",
            Reason::Schema(
                "must list at least one endpoint, unless embeddedRegistry is true".into(),
            ),
        ));
    }

    let mut endpoints = Vec::with_capacity(spec.endpoints.len());
    for (i, endpoint) in spec.endpoints.iter().enumerate() {
        let (resolved, mut problems) =
            resolve_endpoint(endpoint, &format!("spec.endpoints[{i}]"), sources, policy);
        endpoints.extend(resolved);
        errors.append(&mut problems);
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

    if spec.cache.is_some() {
        match for_every_registry(mirror) {
            Some(refused) => errors.push(refused),
            None => {
                let name = mirror.metadata.name.as_deref().unwrap_or_default();
                put_cache_first(name, &mut endpoints, sources, &mut errors);
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
        let g = &*GRAMMAR;
        for (field, value, control, escapes) in [
            (
                "pattern",
                &rewrite.pattern,
                grammar::PATTERN_CONTROL,
                grammar::PATTERN_ESCAPES,
            ),
            (
                "replacement",
                &rewrite.replacement,
                grammar::REPLACEMENT_CONTROL,
                grammar::REPLACEMENT_ESCAPES,
            ),
        ] {
            let field = format!("spec.rewrites[{i}].{field}");
            if g.control.is_match(value) {
                errors.push(FieldError::new(&field, Reason::Schema(control.into())));
            }
            if g.backslash_or_quote.is_match(value) {
                errors.push(FieldError::new(&field, Reason::Schema(escapes.into())));
            }
        }
        match Regex::new(&rewrite.pattern) {
            // Kept even with problems above, for the flavor checks: k3s and RKE2 take
            // rewrites, the other flavors refuse them.
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

    let resolved = ResolvedMirror {
        name: mirror.metadata.name.clone().unwrap_or_default(),
        registry: spec.registry.clone(),
        endpoints,
        rewrites,
        node_selector: spec.node_selector.clone(),
        embedded_registry: spec.embedded_registry,
    };
    (resolved, errors)
}

/// The schema's bounds on a cache's storage, for input that did not come through the API
/// server (its CEL rules run in `validate` through kube's evaluator, its length bounds do not).
fn check_cache_storage(cache: &CacheSpec, errors: &mut Vec<FieldError>) {
    let Some(storage) = &cache.storage else {
        return;
    };
    let field = "spec.cache.storage";
    let mut bounded = |field: String, value: &str, max: usize| {
        if value.is_empty() || value.len() > max {
            errors.push(FieldError::new(
                field,
                Reason::Schema(format!(
                    "must have 1 to {max} characters, not {}",
                    value.len()
                )),
            ));
        }
    };
    if let Some(size) = storage
        .empty_dir
        .as_ref()
        .and_then(|e| e.size_limit.as_ref())
    {
        bounded(format!("{field}.emptyDir.sizeLimit"), size, 64);
    }
    if let Some(claim) = &storage.persistent_volume_claim {
        bounded(
            format!("{field}.persistentVolumeClaim.claimName"),
            &claim.claim_name,
            253,
        );
    }
}

/// A cache refused whatever the endpoints: one for every registry (`*`), which would get every
/// registry's pulls while proxying one upstream.
fn for_every_registry(mirror: &RegistryMirror) -> Option<FieldError> {
    (mirror.spec.registry == "*")
        .then(|| FieldError::new("spec.cache", CacheError::EveryRegistry.into()))
}

/// A mirror with a cache: the cache, where `sources` says it is, before its endpoints — once
/// the endpoints are valid and the first of them is one a cache can proxy.
fn put_cache_first(
    mirror: &str,
    endpoints: &mut Vec<ResolvedEndpoint>,
    sources: &Sources,
    errors: &mut Vec<FieldError>,
) {
    if !errors.is_empty() {
        return;
    }
    let upstream = endpoints
        .first()
        .ok_or(CacheError::NoEndpoint)
        .and_then(Upstream::of);
    if let Err(e) = upstream {
        errors.push(FieldError::new("spec.cache", e.into()));
        return;
    }
    let Some(site) = sources.cache(mirror) else {
        let name = cache::object_name(mirror);
        let reason = match sources.cache_failure(mirror) {
            Some(detail) => Reason::CacheFailed {
                name,
                detail: detail.to_owned(),
            },
            None => Reason::CacheNotReady { name },
        };
        errors.push(FieldError::new("spec.cache", reason));
        return;
    };
    match parse_endpoint_url(&site.url) {
        Ok(url) => endpoints.insert(
            0,
            ResolvedEndpoint {
                url,
                settings: HostSettings {
                    auth: Some(site.credentials.clone()),
                    tls: ResolvedTls {
                        ca: Some(site.ca.clone()),
                        ..ResolvedTls::default()
                    },
                },
                credentials_from: Some(site.secret.clone()),
            },
        ),
        Err(detail) => errors.push(FieldError::new(
            "spec.cache",
            Reason::BadUrl {
                url: site.url.clone(),
                detail,
            },
        )),
    }
}

/// What the cache of `mirror` proxies: its first endpoint, resolved alone (the operator
/// configures the cache with it before the cache has an address for [`resolve`]).
pub fn cache_upstream(
    mirror: &RegistryMirror,
    sources: &Sources,
    policy: &RefPolicy,
) -> Result<Upstream, Vec<FieldError>> {
    if let Some(refused) = for_every_registry(mirror) {
        return Err(vec![refused]);
    }
    let Some(first) = mirror.spec.endpoints.first() else {
        return Err(vec![FieldError::new(
            "spec.cache",
            CacheError::NoEndpoint.into(),
        )]);
    };
    match resolve_endpoint(first, "spec.endpoints[0]", sources, policy) {
        (Some(endpoint), errors) if errors.is_empty() => {
            Upstream::of(&endpoint).map_err(|e| vec![FieldError::new("spec.cache", e.into())])
        }
        (_, errors) => Err(errors),
    }
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

/// One endpoint: what resolves of it (nothing if its URL does not parse), and its problems.
fn resolve_endpoint(
    endpoint: &Endpoint,
    field: &str,
    sources: &Sources,
    policy: &RefPolicy,
) -> (Option<ResolvedEndpoint>, Vec<FieldError>) {
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

    let auth = match (&endpoint.auth, &url) {
        (Some(auth), Some(url)) => resolve_auth(
            auth,
            url,
            &format!("{field}.auth.secretRef"),
            sources,
            policy,
        )
        .map_err(|e| errors.push(e))
        .ok(),
        // Without a URL there is no host to check the Secret's consent against; the URL's
        // error is reported already.
        _ => None,
    };
    let tls = match &endpoint.tls {
        None => ResolvedTls::default(),
        Some(tls) => {
            if url.as_ref().is_some_and(|u| u.scheme == Scheme::Http)
                && *tls != EndpointTls::default()
            {
                errors.push(FieldError::new(
                    format!("{field}.tls"),
                    Reason::Schema(grammar::HTTP_WITH_TLS.into()),
                ));
            }
            resolve_tls(
                tls,
                url.as_ref(),
                &format!("{field}.tls"),
                sources,
                policy,
                &mut errors,
            )
        }
    };

    let auth = auth.flatten();
    let credentials_from = match (&auth, &endpoint.auth) {
        (Some(_), Some(EndpointAuth { secret_ref })) => Some(format!(
            "{}/{}",
            secret_ref
                .namespace
                .as_deref()
                .unwrap_or(&policy.operator_namespace),
            secret_ref.name
        )),
        _ => None,
    };
    let resolved = url.map(|url| ResolvedEndpoint {
        url,
        settings: HostSettings { auth, tls },
        credentials_from,
    });
    (resolved, errors)
}

/// Parses an endpoint URL. A URL without a scheme means https; `http://` must be explicit.
/// Refuses what the schema's rules refuse, and a host that URL parsing would read as another
/// one (`0x7f.1` is `127.0.0.1`).
pub fn parse_endpoint_url(raw: &str) -> Result<EndpointUrl, String> {
    let g = &*GRAMMAR;
    if raw.is_empty() || raw.len() > URL_MAX_LEN {
        return Err(format!(
            "url must have 1 to {URL_MAX_LEN} characters, not {}",
            raw.len()
        ));
    }
    if g.url_forbidden.is_match(raw) {
        return Err(grammar::URL_CHARACTERS.into());
    }
    if raw.contains("://") && !(raw.starts_with("https://") || raw.starts_with("http://")) {
        return Err(grammar::URL_SCHEME.into());
    }
    if !g.url.is_match(raw) {
        return Err(grammar::URL_FORMAT.into());
    }
    if g.dot_segment.is_match(raw) || g.encoded.is_match(raw) {
        return Err(grammar::URL_PATH.into());
    }
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
    // The host as written (the grammar allows nothing before it but the scheme).
    let written = with_scheme
        .split_once("://")
        .map_or("", |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let written = split_host_port(written).map_or(written, |(name, _)| name);
    let same = match (
        written.strip_prefix('[').and_then(|w| w.strip_suffix(']')),
        host.strip_prefix('[').and_then(|h| h.strip_suffix(']')),
    ) {
        (Some(w), Some(h)) => w.parse::<std::net::Ipv6Addr>().ok() == h.parse().ok(),
        _ => written.eq_ignore_ascii_case(host),
    };
    if !same {
        return Err(format!(
            "host {written:?} would be read as {host:?}; write {host:?}"
        ));
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

/// A credential Secret may serve an endpoint only if its [`ALLOWED_HOSTS`] annotation lists
/// the endpoint's host: RegistryMirrors are cluster-scoped, so without the Secret's consent
/// whoever may write one could send the credentials anywhere.
fn check_allowed(
    secret: &SourceObject,
    namespace: &str,
    name: &str,
    url: &EndpointUrl,
    field: &str,
) -> Result<(), FieldError> {
    let (patterns, invalid) = secret
        .allowed_hosts
        .as_deref()
        .map(parse_allowed_hosts)
        .unwrap_or_default();
    if patterns.iter().any(|p| p.matches(url)) {
        return Ok(());
    }
    let entry = match url.scheme {
        Scheme::Https => url.host.clone(),
        Scheme::Http => format!("http://{}", url.host),
    };
    Err(FieldError::new(
        field,
        Reason::NotAllowedHost {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            endpoint: format!("{}://{}", url.scheme.as_str(), url.host),
            entry,
            annotation: ALLOWED_HOSTS,
            current: secret.allowed_hosts.clone(),
            invalid,
        },
    ))
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
    url: &EndpointUrl,
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
    check_allowed(secret, &namespace, name, url, field)?;
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

    let credentials = match secret.type_.as_deref().unwrap_or("Opaque") {
        "kubernetes.io/basic-auth" => Credentials::Basic { username: text("username")?, password: text("password")? },
        "kubernetes.io/dockerconfigjson" => {
            let json = text(".dockerconfigjson")?;
            docker_config_credentials(&json, &url.host).map_err(bad)?
        }
        "Opaque" => {
            let has = |key: &str| secret.data.contains_key(key);
            let forms: Vec<&str> = ["username", "auth", "identityToken", "token"].into_iter().filter(|k| has(k)).collect();
            match forms.as_slice() {
                ["username"] => Credentials::Basic { username: text("username")?, password: text("password")? },
                ["auth"] => decode_auth(&text("auth")?).map_err(bad)?,
                ["identityToken"] => Credentials::IdentityToken(text("identityToken")?),
                ["token"] => Credentials::BearerToken(text("token")?),
                [] => return Err(bad("an Opaque credentials Secret needs username+password, auth, identityToken or token".into())),
                several => return Err(bad(format!("holds several kinds of credentials ({}); keep exactly one", several.join(", ")))),
            }
        }
        other => return Err(bad(format!(
            "type {other:?} cannot hold registry credentials (use kubernetes.io/basic-auth, kubernetes.io/dockerconfigjson or Opaque)"
        ))),
    };
    check_credentials(&credentials).map_err(bad)?;
    Ok(Some(credentials))
}

/// Credentials end up in generated files (registries.yaml, hosts.toml headers, auth.json):
/// no control characters, never quoted back; a username with a colon cannot be sent as
/// basic auth (`user:password`).
fn check_credentials(credentials: &Credentials) -> Result<(), String> {
    let control = |s: &str| s.chars().any(char::is_control);
    let (what, bad) = match credentials {
        Credentials::Basic { username, password } => {
            if username.contains(':') {
                return Err(
                    "the username contains ':', which basic auth (user:password) cannot carry"
                        .into(),
                );
            }
            if username.is_empty() {
                return Err("the username is empty".into());
            }
            (
                "username or password",
                control(username) || control(password),
            )
        }
        Credentials::IdentityToken(token) | Credentials::BearerToken(token) => {
            ("token", control(token) || token.is_empty())
        }
    };
    if bad {
        return Err(format!(
            "the {what} is empty or contains control characters (a newline?), which would end up in the node's configuration files"
        ));
    }
    Ok(())
}

/// Picks the entry of a `.dockerconfigjson` for `host`.
fn docker_config_credentials(json: &str, host: &str) -> Result<Credentials, String> {
    let config = DockerConfig::parse(json)
        .map_err(|e| format!(".dockerconfigjson is not a docker config ({e})"))?;
    let host = host.to_ascii_lowercase();
    match config.credentials(|key_host| key_host == host) {
        Some(credentials) => {
            credentials.map_err(|e| format!(".dockerconfigjson entry for {host:?} {e}"))
        }
        None => {
            let known: Vec<&str> = config.keys().collect();
            Err(format!(
                ".dockerconfigjson has no entry for host {host:?} (entries: {})",
                known.join(", ")
            ))
        }
    }
}

fn resolve_tls(
    tls: &EndpointTls,
    url: Option<&EndpointUrl>,
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
    // A client key is a credential too; without a URL there is no host to check it for.
    let client = match (&tls.client_cert_secret_ref, url) {
        (Some(r), Some(url)) => resolve_client_cert(
            r,
            url,
            &format!("{field}.clientCertSecretRef"),
            sources,
            policy,
        )
        .map_err(|e| errors.push(e))
        .ok(),
        _ => None,
    };
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
    url: &EndpointUrl,
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
    check_allowed(secret, &namespace, &r.name, url, field)?;
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
