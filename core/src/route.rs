//! "Why does this pull go there?": the endpoints a node's runtime tries for one image, in
//! order, with the repository it asks each for, the credentials (by Secret name) and TLS files
//! it uses there, and the registry itself last.
//!
//! Read from the node's rendered configuration, not from the mirrors: the endpoint lists are
//! the renderer's probe targets, the same ones the agent verifies after an apply, so what
//! `regmirror resolve` (offline) and `regmirror-agent resolve` (on the node) show and what the
//! agent checks come from one decision.

use std::fmt;
use std::str::FromStr;

use oci_spec::distribution::Reference;
use regex::Regex;
use serde::Serialize;
use thiserror::Error;

use crate::model::api_host;
use crate::node::Flavor;
use crate::render::{default_server, ClientFiles, ProbeTarget, RenderedConfig};

/// Where one image's pull goes on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// The image, normalized as the runtime reads it (`nginx` → `docker.io/library/nginx:latest`).
    pub image: String,
    /// The flavor of the configuration it was read from.
    pub flavor: String,
    /// The configuration entry that applies: the image's registry, or `*`; none when no
    /// RegistryMirror on the node covers the image's registry.
    pub entry: Option<String>,
    /// The node asks its peers first, through k3s's embedded registry mirror (whose endpoint
    /// k3s writes itself, so it is not among `attempts`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub peers: bool,
    /// What the runtime tries, in order; the registry itself is the last one.
    pub attempts: Vec<Attempt>,
}

/// One endpoint the runtime tries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    /// The endpoint's API root.
    pub endpoint: String,
    /// The repository asked for there (rewritten, or prefixed, where the configuration says).
    pub repository: String,
    /// The rewrite that produced `repository`: pattern and replacement.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewritten_by: Option<(String, String)>,
    /// The manifest request the runtime makes first.
    pub request: String,
    /// The Secret (`namespace/name`) whose credentials are sent; none from regmirror if absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientFiles>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
    /// The registry itself: the last resort, never rewritten.
    pub upstream: bool,
}

/// An image reference that does not parse.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{image:?} is not an image reference: {reason}")]
pub struct BadImage {
    pub image: String,
    pub reason: String,
}

/// The route of `image` on a node running `config`.
pub fn route(config: &RenderedConfig, image: &str) -> Result<Route, BadImage> {
    let reference = Reference::from_str(image).map_err(|e| BadImage {
        image: image.to_owned(),
        reason: e.to_string(),
    })?;
    let registry = reference.registry().to_owned();
    let repository = reference.repository().to_owned();
    let object = reference
        .digest()
        .or(reference.tag())
        .unwrap_or("latest")
        .to_owned();
    let flavor = Flavor::from_str(&config.flavor).ok();
    // containerd and the k3s family tell a mirror which registry the image is from.
    let namespace_query = !matches!(flavor, Some(Flavor::Crio));

    let entry = entry_for(config, &registry);
    // k3s's embedded registry serves every registry it lists, but never the `latest` tag
    // (unless K3S_P2P_ENABLE_LATEST, which k3s advises against): a moving tag goes upstream.
    let peers = object != "latest"
        && config
            .peer_registries
            .iter()
            .any(|r| r == &registry || r == "*");
    let mut attempts: Vec<Attempt> = entry
        .as_ref()
        .map(|entry| &config.probes[entry])
        .into_iter()
        .flatten()
        .map(|probe| {
            let (repository, rewritten_by) = rewrite(probe, &repository);
            let query = if namespace_query {
                format!("?ns={registry}")
            } else {
                String::new()
            };
            Attempt {
                endpoint: probe.url.clone(),
                request: format!("{}/{repository}/manifests/{object}{query}", probe.url),
                repository,
                rewritten_by,
                credentials: credentials_for(config, &probe.url),
                ca_file: probe.ca_file.clone(),
                client: probe.client.clone(),
                insecure_skip_verify: probe.insecure_skip_verify,
                upstream: false,
            }
        })
        .collect();

    if let Some(server) = default_server(&registry) {
        let endpoint = format!("{server}/v2");
        // The registry's own TLS files, if it is also some mirror's endpoint host.
        let same_host = config
            .probes
            .values()
            .flatten()
            .find(|p| host_of(&p.url) == host_of(&endpoint));
        attempts.push(Attempt {
            request: format!("{endpoint}/{repository}/manifests/{object}"),
            credentials: credentials_for(config, &endpoint),
            ca_file: same_host.and_then(|p| p.ca_file.clone()),
            client: same_host.and_then(|p| p.client.clone()),
            insecure_skip_verify: same_host.is_some_and(|p| p.insecure_skip_verify),
            endpoint,
            repository,
            rewritten_by: None,
            upstream: true,
        });
    }
    Ok(Route {
        image: reference.whole(),
        flavor: config.flavor.clone(),
        entry,
        peers,
        attempts,
    })
}

/// The configuration entry for `registry`: its own, else the wildcard, unless the runtime has
/// a hosts.toml of the registry's own (written for its credentials or TLS as some mirror's
/// endpoint host, or by k3s for its embedded registry): containerd then reads that file and
/// never the wildcard's.
fn entry_for(config: &RenderedConfig, registry: &str) -> Option<String> {
    if config.probes.contains_key(registry) {
        return Some(registry.to_owned());
    }
    // Listed for k3s's embedded registry alone: k3s writes it a hosts.toml of its own (its
    // peers, then the registry), so the wildcard's is not read either.
    if config.peer_registries.iter().any(|r| r == registry) {
        return None;
    }
    let own_hosts_file = format!("/{registry}/hosts.toml");
    if config
        .files
        .keys()
        .any(|path| path.ends_with(&own_hosts_file))
    {
        return None;
    }
    config.probes.contains_key("*").then(|| "*".to_owned())
}

/// The repository asked of the endpoint, and the rewrite that made it. Like k3s's containerd,
/// the first pattern (in the order hosts.toml lists them) that changes the name applies,
/// replacing every match.
fn rewrite(probe: &ProbeTarget, repository: &str) -> (String, Option<(String, String)>) {
    let prefixed = |name: String| match &probe.repository_prefix {
        Some(prefix) => format!("{prefix}/{name}"),
        None => name,
    };
    for (pattern, replacement) in &probe.rewrites {
        // Patterns were checked when the mirror was resolved; one that no longer compiles
        // cannot have been applied by the runtime either.
        let Ok(regex) = Regex::new(pattern) else {
            continue;
        };
        let rewritten = regex.replace_all(repository, replacement.as_str());
        if rewritten != repository {
            return (
                prefixed(rewritten.into_owned()),
                Some((pattern.clone(), replacement.clone())),
            );
        }
    }
    (prefixed(repository.to_owned()), None)
}

/// The Secret whose credentials go to the host of `url`.
fn credentials_for(config: &RenderedConfig, url: &str) -> Option<String> {
    let host = host_of(url);
    config
        .credential_sources
        .iter()
        .find(|(h, _)| api_host(h) == host)
        .map(|(_, secret)| secret.clone())
}

/// `host[:port]` of `scheme://host[:port]/path`.
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

/// What a person reads: one numbered line per attempt, the details under it.
impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let peers = if self.peers {
            "this node's peers (k3s's embedded registry mirror), then "
        } else {
            ""
        };
        match &self.entry {
            Some(entry) => writeln!(
                f,
                "{} on a {} node: {peers}the mirrors of {entry:?}, then the registry itself",
                self.image, self.flavor
            )?,
            None if self.peers => writeln!(
                f,
                "{} on a {} node: {peers}the registry itself",
                self.image, self.flavor
            )?,
            None => writeln!(
                f,
                "{} on a {} node: no RegistryMirror covers its registry; the registry itself",
                self.image, self.flavor
            )?,
        }
        if self.peers {
            writeln!(
                f,
                "  0. this node's peers, through the P2P endpoint k3s puts first in the hosts.toml it writes"
            )?;
        }
        for (i, attempt) in self.attempts.iter().enumerate() {
            let last = if attempt.upstream {
                " (the registry itself: last resort)"
            } else {
                ""
            };
            writeln!(f, "  {}. {}{last}", i + 1, attempt.request)?;
            match &attempt.rewritten_by {
                Some((pattern, replacement)) => writeln!(
                    f,
                    "     repository: {} (rewritten by {pattern:?} -> {replacement:?})",
                    attempt.repository
                )?,
                None => writeln!(f, "     repository: {}", attempt.repository)?,
            }
            match &attempt.credentials {
                Some(secret) => writeln!(f, "     credentials: Secret {secret}")?,
                None => writeln!(f, "     credentials: none from regmirror")?,
            }
            let mut tls = Vec::new();
            if let Some(ca) = &attempt.ca_file {
                tls.push(format!("CA {ca}"));
            }
            if let Some(client) = &attempt.client {
                tls.push(format!(
                    "client certificate {} (key {})",
                    client.cert_file, client.key_file
                ));
            }
            if attempt.insecure_skip_verify {
                tls.push("certificate not verified (insecureSkipVerify)".into());
            }
            if !tls.is_empty() {
                writeln!(f, "     tls: {}", tls.join(", "))?;
            } else if attempt.endpoint.starts_with("https://") {
                writeln!(f, "     tls: the host's trust store")?;
            }
        }
        Ok(())
    }
}
