//! containerd's hosts.toml (`<config_path>/<registry>/hosts.toml`), written the way k3s writes
//! it: for k3s and RKE2 these files must be byte-identical to what k3s regenerates from
//! registries.yaml at its next start, so a hot-applied change and a restart agree.
//!
//! The plain containerd flavor uses the same layout, plus what only it needs: credentials as
//! an `Authorization` header (containerd has no other place for them in hosts.toml) and
//! certificate paths relative to the registry's directory, so the tree is self-contained.

use std::collections::BTreeMap;

use base64::Engine;

use super::toml_text::quote;
use super::{
    credentials_over_http_written, default_server, registry_dir, ClientFiles, Output, ProbeTarget,
    RenderError, RenderedFile, MANAGED_HEADER,
};
use crate::model::{api_host, Credentials, EndpointUrl, HostSettings, ResolvedMirror, Scheme};

/// Where the TLS files of one endpoint host are, as hosts.toml refers to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct TlsPaths {
    pub ca: Option<String>,
    pub client: Option<(String, String)>,
    pub skip_verify: bool,
}

/// How one flavor's hosts.toml differs.
pub(super) struct Style<'a> {
    /// The first line of each file.
    pub header: &'a str,
    /// Credentials go into a header (containerd) or elsewhere (k3s: the CRI config).
    pub auth_headers: bool,
    /// Rewrites are written (k3s's containerd understands them).
    pub rewrites: bool,
    /// The flavor's name, for errors.
    pub flavor: &'static str,
}

/// The `[host]` URL containerd should use and whether the path is taken as given: no path
/// means the `/v2` API root; any other path than `/v2` is used verbatim (`override_path`).
/// Docker Hub's API host stands for `docker.io`, as in containerd.
fn host_url(url: &EndpointUrl) -> (String, bool) {
    let url = EndpointUrl {
        host: api_host(&url.host),
        ..url.clone()
    };
    match url.path.as_str() {
        "" => (format!("{url}/v2"), false),
        "/v2" => (url.to_string(), false),
        _ => (url.to_string(), true),
    }
}

/// One rendered hosts.toml.
pub(super) struct HostsDoc {
    pub text: String,
    /// It carries credentials (an `Authorization` header): mode 0600.
    pub has_secret: bool,
    /// The hosts whose TLS files it refers to.
    pub tls_hosts: Vec<String>,
    /// The registry it configures mirrors for; `None` for the file of an endpoint host.
    pub registry: Option<String>,
    /// Its `[host."…"]` endpoints in file order, the way containerd tries them, with the TLS
    /// paths as written (relative ones are relative to the file's directory).
    pub probes: Vec<ProbeTarget>,
}

/// The hosts.toml files for `mirrors`, keyed by the registry directory name (`_default` for
/// `*`), plus one per endpoint host that has credentials or TLS settings and no mirror of its
/// own, so pulling from the mirror host directly works too (as k3s does).
pub(super) fn hosts_files(
    mirrors: &[&ResolvedMirror],
    style: &Style<'_>,
    tls_paths: &dyn Fn(&str) -> TlsPaths,
) -> Result<BTreeMap<String, HostsDoc>, Vec<RenderError>> {
    let settings = host_settings(mirrors);
    // The settings the default server gets: its host's, except credentials when it is spoken
    // to in plain http (a loopback registry on a port) and the user never wrote http:// for
    // that host with them. containerd sends the header on the first request, and with TLS
    // settings it falls back from https to http for such a server.
    let server_settings = |url: &EndpointUrl, host: &str| {
        settings.get(host).map(|s| {
            if url.scheme == Scheme::Http
                && s.auth.is_some()
                && !credentials_over_http_written(mirrors, host)
            {
                HostSettings {
                    auth: None,
                    tls: s.tls.clone(),
                }
            } else {
                (*s).clone()
            }
        })
    };
    let mut problems = Vec::new();
    // The server's settings are those of its host; Docker Hub's may be keyed either way.
    let server_of = |registry: &str| {
        default_server(registry).map(|url| {
            let host = [url.host.as_str(), registry]
                .into_iter()
                .find(|h| settings.contains_key(h))
                .unwrap_or(registry)
                .to_owned();
            (url, host)
        })
    };
    let mut files = BTreeMap::new();
    for mirror in mirrors {
        if !style.rewrites && !mirror.rewrites.is_empty() {
            problems.push(RenderError {
                mirror: mirror.name.clone(),
                field: "spec.rewrites".into(),
                flavor: style.flavor,
                what: "image rewrites (only k3s and RKE2 support them)".into(),
            });
        }
        let server = server_of(&mirror.registry);
        let mut doc = HostsToml::new(style.header);
        let settings_of_server = server
            .as_ref()
            .and_then(|(url, host)| server_settings(url, host));
        doc.server(
            server.as_ref().map(|(url, host)| {
                (
                    url,
                    host.as_str(),
                    tls_paths(host),
                    settings_of_server.as_ref(),
                )
            }),
            style,
        );
        for (i, endpoint) in mirror.endpoints.iter().enumerate() {
            // A last endpoint that is the registry itself is the default endpoint, which
            // containerd tries last anyway: k3s folds it into `server`.
            let is_last = i + 1 == mirror.endpoints.len();
            if is_last
                && server
                    .as_ref()
                    .is_some_and(|(url, _)| host_url(url) == host_url(&endpoint.url))
            {
                continue;
            }
            doc.host(
                &endpoint.url,
                &tls_paths(&endpoint.url.host),
                &endpoint.settings,
                &mirror.rewrites,
                style,
            );
        }
        let doc = HostsDoc {
            registry: Some(mirror.registry.clone()),
            ..doc.finish()
        };
        files.insert(registry_dir(&mirror.registry).to_owned(), doc);
    }
    for (host, host_settings) in &settings {
        if files.contains_key(*host) || host_settings.is_empty() {
            continue;
        }
        let mut doc = HostsToml::new(style.header);
        let Some((url, _)) = server_of(host) else {
            continue; // an endpoint host is never '*'
        };
        let settings_of_server = server_settings(&url, host);
        doc.server(
            Some((&url, host, tls_paths(host), settings_of_server.as_ref())),
            style,
        );
        files.insert((*host).to_owned(), doc.finish());
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(files)
}

/// The settings of every endpoint host (assembled mirrors agree on them).
pub(super) fn host_settings<'m>(
    mirrors: &[&'m ResolvedMirror],
) -> BTreeMap<&'m str, &'m HostSettings> {
    mirrors
        .iter()
        .flat_map(|m| &m.endpoints)
        .map(|e| (e.url.host.as_str(), &e.settings))
        .collect()
}

/// The `Authorization` header value for credentials containerd can send as is; `None` for an
/// identity token, which must be exchanged first (see [`check_credentials`]).
fn authorization(credentials: &Credentials) -> Option<String> {
    match credentials {
        Credentials::Basic { username, password } => Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
        )),
        Credentials::BearerToken(token) => Some(format!("Bearer {token}")),
        Credentials::IdentityToken(_) => None,
    }
}

/// One hosts.toml being written.
struct HostsToml {
    doc: HostsDoc,
}

impl HostsToml {
    fn new(header: &str) -> Self {
        Self {
            doc: HostsDoc {
                text: format!("{header}\n"),
                has_secret: false,
                tls_hosts: Vec::new(),
                registry: None,
                probes: Vec::new(),
            },
        }
    }

    /// The top of the file: the default endpoint (`None`: `*`, whose server is the image's own
    /// registry) with its host's TLS and, for containerd, credentials.
    fn server(
        &mut self,
        server: Option<(&EndpointUrl, &str, TlsPaths, Option<&HostSettings>)>,
        style: &Style<'_>,
    ) {
        let Some((url, host, tls, settings)) = server else {
            self.doc.text.push_str(
                "server = \"\"\ncapabilities = [\"pull\", \"resolve\", \"push\"]\n\n[host]\n",
            );
            return;
        };
        let (url, _) = host_url(url);
        self.doc.text.push_str(&format!(
            "server = {}\ncapabilities = [\"pull\", \"resolve\", \"push\"]\n",
            quote(&url)
        ));
        self.tls(host, &tls, "");
        if let (true, Some(auth)) = (style.auth_headers, settings.and_then(|s| s.auth.as_ref())) {
            self.header_table("header", auth, "");
        }
        self.doc.text.push_str("\n[host]\n");
    }

    fn host(
        &mut self,
        url: &EndpointUrl,
        tls: &TlsPaths,
        settings: &HostSettings,
        rewrites: &[(String, String)],
        style: &Style<'_>,
    ) {
        let url_host = url.host.clone();
        let (url, override_path) = host_url(url);
        let mut probe = tls.probe_target(url.clone());
        if style.rewrites {
            probe.rewrites = rewrites.iter().cloned().collect();
        }
        self.doc.probes.push(probe);
        let table = format!("host.{}", quote(&url));
        self.doc.text.push_str(&format!(
            "\n[{table}]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ));
        if override_path {
            self.doc.text.push_str("  override_path = true\n");
        }
        self.tls(&url_host, tls, "  ");
        if let (true, Some(auth)) = (style.auth_headers, &settings.auth) {
            self.header_table(&format!("{table}.header"), auth, "  ");
        }
        if style.rewrites && !rewrites.is_empty() {
            let sorted: BTreeMap<&str, &str> = rewrites
                .iter()
                .map(|(p, r)| (p.as_str(), r.as_str()))
                .collect();
            self.doc.text.push_str(&format!("  [{table}.rewrite]\n"));
            for (pattern, replacement) in sorted {
                self.doc.text.push_str(&format!(
                    "    {} = {}\n",
                    quote(pattern),
                    quote(replacement)
                ));
            }
        }
    }

    fn tls(&mut self, host: &str, tls: &TlsPaths, indent: &str) {
        if tls.ca.is_some() || tls.client.is_some() {
            self.doc.tls_hosts.push(host.to_owned());
        }
        if let Some(ca) = &tls.ca {
            self.doc
                .text
                .push_str(&format!("{indent}ca = [{}]\n", quote(ca)));
        }
        if let Some((cert, key)) = &tls.client {
            self.doc.text.push_str(&format!(
                "{indent}client = [[{}, {}]]\n",
                quote(cert),
                quote(key)
            ));
        }
        if tls.skip_verify {
            self.doc
                .text
                .push_str(&format!("{indent}skip_verify = true\n"));
        }
    }

    fn header_table(&mut self, table: &str, auth: &Credentials, indent: &str) {
        if let Some(value) = authorization(auth) {
            self.doc.text.push_str(&format!(
                "{indent}[{table}]\n{indent}  Authorization = [{}]\n",
                quote(&value)
            ));
            self.doc.has_secret = true;
        }
    }

    fn finish(self) -> HostsDoc {
        self.doc
    }
}

/// The containerd flavor: `<hosts_dir>/<registry>/hosts.toml`, with certificates beside it.
pub(super) fn render_containerd(
    mirrors: &[&ResolvedMirror],
    hosts_dir: &str,
) -> Result<Output, Vec<RenderError>> {
    let style = Style {
        header: MANAGED_HEADER,
        auth_headers: true,
        rewrites: false,
        flavor: "containerd",
    };
    let settings = host_settings(mirrors);
    // Certificates live in `<registry dir>/<endpoint host>/`, referred to by relative paths
    // (containerd resolves them against the hosts.toml directory).
    let tls_paths = |host: &str| TlsPaths::in_dir(host, settings.get(host).copied());
    let mut problems = check_credentials(mirrors, "containerd");
    let docs = match hosts_files(mirrors, &style, &tls_paths) {
        Ok(docs) => docs,
        Err(mut more) => {
            problems.append(&mut more);
            BTreeMap::new()
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut files = BTreeMap::new();
    let mut probes = BTreeMap::new();
    for (dir, doc) in docs {
        let base = format!("{hosts_dir}/{dir}");
        if let (Some(registry), false) = (doc.registry, doc.probes.is_empty()) {
            let targets = doc.probes.into_iter().map(|t| t.in_dir(&base)).collect();
            probes.insert(registry, targets);
        }
        for host in &doc.tls_hosts {
            for (name, file) in tls_files(settings[host.as_str()]) {
                files.insert(format!("{base}/{host}/{name}"), file);
            }
        }
        let file = if doc.has_secret {
            RenderedFile::secret(doc.text)
        } else {
            RenderedFile::public(doc.text)
        };
        files.insert(format!("{base}/hosts.toml"), file);
    }
    Ok(Output {
        files,
        restart_key: String::new(),
        probes,
    })
}

impl ProbeTarget {
    /// The target with its relative paths taken relative to `dir`, as containerd reads them.
    fn in_dir(self, dir: &str) -> ProbeTarget {
        let absolute = |path: String| {
            if path.starts_with('/') {
                path
            } else {
                format!("{dir}/{path}")
            }
        };
        ProbeTarget {
            ca_file: self.ca_file.map(absolute),
            client: self.client.map(|c| ClientFiles {
                cert_file: absolute(c.cert_file),
                key_file: absolute(c.key_file),
            }),
            ..self
        }
    }
}

/// Identity tokens cannot be sent by containerd from hosts.toml: refuse them up front, naming
/// the mirror and endpoint.
fn check_credentials(mirrors: &[&ResolvedMirror], flavor: &'static str) -> Vec<RenderError> {
    let mut problems = Vec::new();
    for mirror in mirrors {
        for (i, endpoint) in mirror.endpoints.iter().enumerate() {
            if endpoint
                .settings
                .auth
                .as_ref()
                .is_some_and(|auth| authorization(auth).is_none())
            {
                problems.push(RenderError {
                    mirror: mirror.name.clone(),
                    field: format!("spec.endpoints[{i}].auth"),
                    flavor,
                    what:
                        "an identity token in hosts.toml (use username/password or a static token)"
                            .into(),
                });
            }
        }
    }
    problems
}

impl TlsPaths {
    /// What to probe at `url` (an API root as hosts.toml names it) with these files.
    pub(super) fn probe_target(&self, url: String) -> ProbeTarget {
        ProbeTarget {
            url,
            ca_file: self.ca.clone(),
            client: self
                .client
                .clone()
                .map(|(cert_file, key_file)| ClientFiles {
                    cert_file,
                    key_file,
                }),
            insecure_skip_verify: self.skip_verify,
            rewrites: BTreeMap::new(),
            repository_prefix: None,
        }
    }

    /// Where the TLS files of a host with `settings` are, when they live in `dir`.
    pub(super) fn in_dir(dir: &str, settings: Option<&HostSettings>) -> TlsPaths {
        let Some(settings) = settings else {
            return TlsPaths::default();
        };
        TlsPaths {
            ca: settings.tls.ca.as_ref().map(|_| format!("{dir}/ca.crt")),
            client: settings
                .tls
                .client
                .as_ref()
                .map(|_| (format!("{dir}/client.crt"), format!("{dir}/client.key"))),
            skip_verify: settings.tls.insecure_skip_verify,
        }
    }
}

/// The TLS files of one host: file name → file. Keys are 0600, certificates 0644.
pub(super) fn tls_files(settings: &HostSettings) -> Vec<(&'static str, RenderedFile)> {
    let mut files = Vec::new();
    if let Some(ca) = &settings.tls.ca {
        files.push(("ca.crt", RenderedFile::public(ca.clone())));
    }
    if let Some(client) = &settings.tls.client {
        files.push(("client.crt", RenderedFile::public(client.cert.clone())));
        files.push(("client.key", RenderedFile::secret(client.key.clone())));
    }
    files
}
