//! CRI-O: a containers-registries.conf(5) drop-in, a certs.d directory per endpoint host, and
//! an auth file that a crio.conf drop-in names as CRI-O's global auth file. CRI-O re-reads
//! registries.conf on reload (SIGHUP), so no restart is ever needed.
//!
//! The probe targets are the `[[registry.mirror]]` entries in order: containers/image reaches a
//! mirror's API at `/v2` on its host (a location's path is a repository prefix, not an API
//! root, so an endpoint's `/v2/<prefix>` API root becomes location `<host>/<prefix>`), trusting the `*.crt` files of its certs.d directory and presenting its
//! `client.cert` / `client.key`.

use std::collections::BTreeMap;

use base64::Engine;
use serde::Serialize;

use super::toml_text::quote;
use super::{
    default_server, hosts_toml, ClientFiles, Output, ProbeTarget, RenderError, RenderedFile,
    MANAGED_HEADER,
};
use crate::model::{api_host, Credentials, ResolvedEndpoint, ResolvedMirror, Scheme};

/// The registries.conf drop-in.
pub const REGISTRIES_CONF: &str = "/etc/containers/registries.conf.d/50-regmirror.conf";
/// Per-host certificate directories, the layout containers/image reads.
pub const CERTS_DIR: &str = "/etc/containers/certs.d";
/// The credentials file.
pub const AUTH_FILE: &str = "/etc/crio/regmirror/auth.json";
/// The crio.conf drop-in that points CRI-O at [`AUTH_FILE`].
pub const CRIO_CONF: &str = "/etc/crio/crio.conf.d/50-regmirror-auth.conf";

#[derive(Serialize)]
struct AuthFile {
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Serialize)]
struct AuthEntry {
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identitytoken: Option<String>,
}

pub(super) fn render(mirrors: &[&ResolvedMirror]) -> Result<Output, Vec<RenderError>> {
    let mut problems = Vec::new();
    let unsupported = |mirror: &ResolvedMirror, field: &str, what: &str| RenderError {
        mirror: mirror.name.clone(),
        field: field.to_owned(),
        flavor: "cri-o",
        what: what.to_owned(),
    };
    let mut conf = format!("{MANAGED_HEADER}\n");
    let mut auths = BTreeMap::new();
    let mut probes = BTreeMap::new();
    for mirror in mirrors {
        if mirror.registry == "*" {
            problems.push(unsupported(
                mirror,
                "spec.registry",
                "a mirror for every registry ('*'); name the registry",
            ));
        }
        if !mirror.rewrites.is_empty() {
            problems.push(unsupported(
                mirror,
                "spec.rewrites",
                "image rewrites (only k3s and RKE2 support them)",
            ));
        }
        let upstream = default_server(&mirror.registry).map(|url| url.host);
        let mut targets = Vec::new();
        conf.push_str(&format!(
            "\n[[registry]]\nprefix = {}\nlocation = {}\n",
            quote(&mirror.registry),
            quote(&mirror.registry)
        ));
        for (i, endpoint) in mirror.endpoints.iter().enumerate() {
            let is_upstream = upstream.as_deref() == Some(api_host(&endpoint.url.host).as_str())
                && endpoint.url.path.is_empty();
            let insecure =
                endpoint.url.scheme == Scheme::Http || endpoint.settings.tls.insecure_skip_verify;
            // An insecure mirror falls back from https to plain http when https fails
            // (containers/image), taking the auth file's credentials along.
            if !is_upstream
                && endpoint.settings.auth.is_some()
                && endpoint.url.scheme == Scheme::Https
                && endpoint.settings.tls.insecure_skip_verify
            {
                problems.push(unsupported(
                    mirror,
                    &format!("spec.endpoints[{i}].tls.insecureSkipVerify"),
                    "credentials for an https endpoint with insecureSkipVerify: CRI-O marks the mirror insecure, and an insecure registry falls back to plain http when https fails, sending the credentials in clear text; trust its certificate with caRef instead",
                ));
            }
            // The registry itself is the last resort already; only its credentials are written.
            if !is_upstream {
                let Some(prefix) = repository_prefix(&endpoint.url.path) else {
                    problems.push(unsupported(
                        mirror,
                        &format!("spec.endpoints[{i}].url"),
                        "an endpoint whose API root is not /v2 or under it (containers/image always asks a mirror's host at /v2/; the path after /v2 becomes a repository prefix)",
                    ));
                    continue;
                };
                let location = match prefix {
                    "" => endpoint.url.host.clone(),
                    prefix => format!("{}/{prefix}", endpoint.url.host),
                };
                conf.push_str(&format!(
                    "\n[[registry.mirror]]\nlocation = {}\ninsecure = {insecure}\n",
                    quote(&location)
                ));
                targets.push(probe_target(endpoint));
            }
            if let Some(credentials) = &endpoint.settings.auth {
                let entry = match credentials {
                    Credentials::Basic { username, password } => AuthEntry {
                        auth: Some(
                            base64::engine::general_purpose::STANDARD
                                .encode(format!("{username}:{password}")),
                        ),
                        identitytoken: None,
                    },
                    Credentials::IdentityToken(token) => AuthEntry {
                        auth: None,
                        identitytoken: Some(token.clone()),
                    },
                    Credentials::BearerToken(_) => {
                        problems.push(unsupported(
                            mirror,
                            &format!("spec.endpoints[{i}].auth"),
                            "a static bearer token in an auth file",
                        ));
                        continue;
                    }
                };
                auths.insert(endpoint.url.host.clone(), entry);
            }
        }
        if !targets.is_empty() {
            probes.insert(mirror.registry.clone(), targets);
        }
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    let mut files = BTreeMap::new();
    files.insert(REGISTRIES_CONF.to_owned(), RenderedFile::public(conf));
    for (host, settings) in hosts_toml::host_settings(mirrors) {
        for (name, file) in hosts_toml::tls_files(settings) {
            // containers/image wants the client certificate as `client.cert`.
            let name = if name == "client.crt" {
                "client.cert"
            } else {
                name
            };
            files.insert(format!("{CERTS_DIR}/{host}/{name}"), file);
        }
    }
    if !auths.is_empty() {
        let json = serde_json::to_string_pretty(&AuthFile { auths }).expect("auth file serializes");
        files.insert(
            AUTH_FILE.to_owned(),
            RenderedFile::secret(format!("{json}\n")),
        );
        files.insert(
            CRIO_CONF.to_owned(),
            RenderedFile::public(format!(
                "{MANAGED_HEADER}\n[crio.image]\nglobal_auth_file = {}\n",
                quote(AUTH_FILE)
            )),
        );
    }
    Ok(Output {
        files,
        restart_key: String::new(),
        probes,
    })
}

/// The repository prefix that makes containers/image ask what containerd asks: an endpoint
/// path is its API root (`/v2/harbor-project` for a Harbor proxy-cache project), and
/// containers/image reaches every mirror at `/v2/` on its host, taking a location's path as a
/// prefix of the repository. `None`: an API root outside `/v2`, which CRI-O cannot reach.
fn repository_prefix(path: &str) -> Option<&str> {
    match path {
        "" | "/v2" => Some(""),
        path => path.strip_prefix("/v2/"),
    }
}

/// What to probe of a mirror endpoint: its host's API root, with the files written for the
/// host under [`CERTS_DIR`].
fn probe_target(endpoint: &ResolvedEndpoint) -> ProbeTarget {
    let host = &endpoint.url.host;
    let tls = &endpoint.settings.tls;
    let dir = format!("{CERTS_DIR}/{host}");
    ProbeTarget {
        url: format!("{}://{}/v2", endpoint.url.scheme.as_str(), api_host(host)),
        ca_file: tls.ca.as_ref().map(|_| format!("{dir}/ca.crt")),
        client: tls.client.as_ref().map(|_| ClientFiles {
            cert_file: format!("{dir}/client.cert"),
            key_file: format!("{dir}/client.key"),
        }),
        insecure_skip_verify: tls.insecure_skip_verify,
        rewrites: BTreeMap::new(),
        repository_prefix: repository_prefix(&endpoint.url.path)
            .filter(|p| !p.is_empty())
            .map(str::to_owned),
    }
}
