//! Rendering: the exact files one node needs, from the mirrors assembled for it.
//!
//! Pure and byte-stable: the same mirrors and flavor always give the same bytes, so a
//! configuration can be named by its hash and compared without parsing. Each flavor has a
//! module; they share the hosts.toml writer because k3s and RKE2 also get the hosts.toml files
//! they would generate themselves.

mod crio;
mod hosts_toml;
pub(crate) mod k3s;
mod toml_text;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::model::{api_host, EndpointUrl, ResolvedMirror, Scheme};
use crate::node::Flavor;

/// First line of every file regmirror writes.
pub const MANAGED_HEADER: &str = "# Managed by regmirror: edit RegistryMirror objects, not this file; changes here are overwritten.";

/// Mode of files holding credentials or keys.
pub const SECRET_MODE: u32 = 0o600;
/// Mode of every other file.
pub const PUBLIC_MODE: u32 = 0o644;

/// The files for one node, keyed by absolute path on the host.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct RenderedConfig {
    /// The flavor it was rendered for (`Flavor`'s display form).
    pub flavor: String,
    /// Absolute host path → file.
    pub files: BTreeMap<String, RenderedFile>,
    /// Digest of the part of the configuration the runtime reads only when it starts. Two
    /// configurations with equal keys can replace each other without a restart.
    pub restart_key: String,
    /// Per RegistryMirror in it: the digest of that mirror rendered alone for this flavor.
    /// Lets the operator tell which mirrors a node runs the latest of, when several share a
    /// config. Filled by the operator; empty from `render`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parts: BTreeMap<String, String>,
    /// What to verify once the files are on the host: per registry (as in image refs, `*` for
    /// every registry), the mirror endpoints its runtime will try, in order, each with the TLS
    /// files the runtime will use for it. Computed by the renderer from the mirrors, so the
    /// agent never parses a runtime's files back. The registry's own default endpoint is never
    /// among them (it is public, or reached in ways a node cannot judge), and a registry with
    /// no mirror endpoint is not listed. Empty, it is left out of the JSON: a config without
    /// mirror endpoints keeps the digest it had before probes existed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub probes: BTreeMap<String, Vec<ProbeTarget>>,
    /// Per endpoint host the runtime sends credentials to: the Secret they come from
    /// (`namespace/name`), never their values; what `resolve` names. Empty, it is left out of
    /// the JSON like `probes`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub credential_sources: BTreeMap<String, String>,
    /// The registries (`*` for every registry) whose images this node pulls from its peers
    /// first, through k3s's embedded registry mirror: every registry registries.yaml lists, on
    /// a node that runs it. Empty, it is left out of the JSON like `probes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_registries: Vec<String>,
}

/// One endpoint to check after an apply: `GET <url>/` must answer like a registry's API root,
/// over TLS with the files the runtime itself will use.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ProbeTarget {
    /// The endpoint's API root as the runtime reaches it, e.g. `https://mirror:5000/v2`, or an
    /// endpoint's own path where the runtime uses it verbatim (containerd's `override_path`).
    pub url: String,
    /// Host path of the CA bundle the runtime trusts for it; none: the host's trust store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Host paths of the client certificate and key the runtime presents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientFiles>,
    /// The runtime does not verify the server's certificate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
    /// Image-name rewrites the runtime applies to requests to this endpoint (k3s and RKE2),
    /// pattern → replacement, as its hosts.toml lists them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rewrites: BTreeMap<String, String>,
    /// A prefix the runtime puts before the image's repository at this endpoint (the path of
    /// a CRI-O mirror `location`), without slashes around it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_prefix: Option<String>,
}

/// Where a client certificate and its key are, as host paths.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ClientFiles {
    pub cert_file: String,
    pub key_file: String,
}

/// One file: its mode and content.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedFile {
    pub mode: u32,
    pub content: String,
}

// A 0600 file holds credentials or a key: Debug never shows its content.
impl fmt::Debug for RenderedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let content: &dyn fmt::Debug = if self.mode == SECRET_MODE {
            &"<redacted>"
        } else {
            &self.content
        };
        f.debug_struct("RenderedFile")
            .field("mode", &format_args!("{:04o}", self.mode))
            .field("content", content)
            .finish()
    }
}

impl RenderedFile {
    fn public(content: String) -> Self {
        Self {
            mode: PUBLIC_MODE,
            content,
        }
    }
    fn secret(content: String) -> Self {
        Self {
            mode: SECRET_MODE,
            content,
        }
    }
}

impl RenderedConfig {
    /// The bytes its config Secret holds: the JSON, sealed (a nonce and a tag more).
    pub fn sealed_size(&self) -> usize {
        serde_json::to_vec(self).map_or(usize::MAX, |json| json.len() + 40)
    }

    /// Content digest (hex SHA-256 of the canonical JSON form): equal configs, equal digests.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).expect("a rendered config always serializes");
        hex(&Sha256::digest(json))
    }
}

/// Why a configuration cannot be rendered for a flavor.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("RegistryMirror {mirror}: {field}: {flavor} cannot express {what}")]
pub struct RenderError {
    pub mirror: String,
    pub field: String,
    pub flavor: &'static str,
    pub what: String,
}

/// Renders the files a node of `flavor` needs for `mirrors` (already assembled: no conflicts),
/// or says the first thing the flavor cannot express.
pub fn render(mirrors: &[&ResolvedMirror], flavor: &Flavor) -> Result<RenderedConfig, RenderError> {
    render_checked(mirrors, flavor).map_err(|mut problems| problems.swap_remove(0))
}

/// Everything `flavor` cannot express of `mirrors`, in the order [`render`] meets it: empty
/// when they render. What `regmirror validate` reports.
pub fn problems(mirrors: &[&ResolvedMirror], flavor: &Flavor) -> Vec<RenderError> {
    render_checked(mirrors, flavor).err().unwrap_or_default()
}

fn render_checked(
    mirrors: &[&ResolvedMirror],
    flavor: &Flavor,
) -> Result<RenderedConfig, Vec<RenderError>> {
    let mut sorted = mirrors.to_vec();
    sorted.sort_by(|a, b| {
        a.registry
            .cmp(&b.registry)
            .then_with(|| a.name.cmp(&b.name))
    });
    let Output {
        files,
        restart_key,
        probes,
    } = match flavor {
        Flavor::K3s { embedded_registry } => {
            k3s::render(&sorted, &k3s::Layout::K3S, *embedded_registry)?
        }
        Flavor::Rke2 { embedded_registry } => {
            k3s::render(&sorted, &k3s::Layout::RKE2, *embedded_registry)?
        }
        Flavor::Containerd { hosts_dir } => {
            no_embedded_registry(&sorted, flavor)?;
            hosts_toml::render_containerd(&sorted, hosts_dir)?
        }
        Flavor::Crio => {
            no_embedded_registry(&sorted, flavor)?;
            crio::render(&sorted)?
        }
    };
    let credential_sources = sorted
        .iter()
        .flat_map(|m| &m.endpoints)
        .filter(|e| e.settings.auth.is_some())
        .filter_map(|e| Some((e.url.host.clone(), e.credentials_from.clone()?)))
        .collect();
    let mut peer_registries: Vec<String> = if flavor.embedded_registry() {
        sorted.iter().map(|m| m.registry.clone()).collect()
    } else {
        Vec::new()
    };
    peer_registries.dedup();
    Ok(RenderedConfig {
        flavor: flavor.to_string(),
        files,
        restart_key,
        parts: BTreeMap::new(),
        probes,
        credential_sources,
        peer_registries,
    })
}

/// Refuses mirrors that ask for k3s's embedded registry mirror on a flavor without one.
fn no_embedded_registry(
    mirrors: &[&ResolvedMirror],
    flavor: &Flavor,
) -> Result<(), Vec<RenderError>> {
    let problems: Vec<RenderError> = mirrors
        .iter()
        .filter(|m| m.embedded_registry)
        .map(|m| RenderError {
            mirror: m.name.clone(),
            field: "spec.embeddedRegistry".into(),
            flavor: flavor.name(),
            what: "k3s's embedded registry mirror (only k3s and RKE2 nodes run one): select k3s or RKE2 nodes with nodeSelector".into(),
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// What a flavor's renderer makes.
struct Output {
    files: BTreeMap<String, RenderedFile>,
    /// Empty for flavors that never restart for a change.
    restart_key: String,
    probes: BTreeMap<String, Vec<ProbeTarget>>,
}

/// The directory name containerd and CRI-O use for a registry: `_default` stands for `*`.
fn registry_dir(registry: &str) -> &str {
    if registry == "*" {
        "_default"
    } else {
        registry
    }
}

/// Where a registry is reached when no mirror answers: containerd's (and k3s's) default
/// endpoint. Docker Hub's API lives on `registry-1.docker.io`; a loopback registry on a port
/// other than 443 is spoken to in plain http, as containerd does.
pub(crate) fn default_server(registry: &str) -> Option<EndpointUrl> {
    if registry == "*" {
        return None;
    }
    let host = api_host(registry);
    let scheme = if is_loopback_with_port(&host) {
        Scheme::Http
    } else {
        Scheme::Https
    };
    Some(EndpointUrl {
        scheme,
        host,
        path: String::new(),
    })
}

/// Whether the user wrote `http://host` for an endpoint with credentials: then, and only
/// then, may credentials for `host` travel in plain http. Elsewhere http comes from
/// containerd's and k3s's defaults (a loopback registry on a port), never chosen by the user.
fn credentials_over_http_written(mirrors: &[&ResolvedMirror], host: &str) -> bool {
    mirrors
        .iter()
        .flat_map(|m| &m.endpoints)
        .any(|e| e.url.scheme == Scheme::Http && e.url.host == host && e.settings.auth.is_some())
}

/// `localhost` or a loopback address, with a port other than 443.
fn is_loopback_with_port(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !port.contains(']') => (name, Some(port)),
        _ => (host, None),
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let loopback = name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback && port.is_some_and(|p| p != "443")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}
