//! Checking a configuration after it is on disk, the way the runtime will use it: every mirror
//! endpoint in the hosts.toml files answers the registry API over TLS with the CA and client
//! certificate configured for it.
//!
//! containerd reads hosts.toml at every pull and never says that a file is wrong: a CA path
//! that does not exist, a CA that does not match, or an endpoint that does not answer only
//! show up as failed pulls later. The agent finds them now, so that it can roll back and
//! report, and the operator can stop the rollout.
//!
//! A registry's configuration is broken when a TLS file it names cannot be used, or when none
//! of its endpoints answers; one endpoint down among others that answer is what fallback is
//! for, and only a warning.
//!
//! Only the `[host."…"]` mirrors are probed, never a file's `server`: that is the registry's
//! default endpoint (public, or reached in ways the agent cannot see — k3s even derives its
//! scheme from the name), so air-gapped nodes verify fine. A registry configured only with
//! credentials or TLS for itself therefore goes unprobed. Without a configured CA the certificate
//! chain is not judged here (the host's own trust store, which the agent cannot see, decides).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use regmirror_core::render::RenderedConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Why a configuration does not work.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum VerifyError {
    #[error("{file}: not valid hosts.toml: {detail}")]
    BadHostsFile { file: String, detail: String },
    #[error("{endpoint}: {what} file {path}: {detail}")]
    BadTlsFile {
        endpoint: String,
        what: &'static str,
        path: String,
        detail: String,
    },
    #[error("{endpoint}: {detail}")]
    Unreachable { endpoint: String, detail: String },
    #[error("{endpoint}: answered {status} to GET /v2/, not the registry API")]
    NotARegistry { endpoint: String, status: u16 },
    #[error("no endpoint in {file} answers: {}", reasons.join("; "))]
    NoEndpointAnswers { file: String, reasons: Vec<String> },
}

/// The endpoints one hosts.toml file configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostsFile {
    /// Its path on the host.
    pub path: String,
    pub endpoints: Vec<Endpoint>,
}

/// One endpoint as a hosts.toml file configures it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The URL as written, e.g. `https://mirror:5000/v2`.
    pub url: String,
    /// CA files, as host paths.
    pub ca: Vec<String>,
    /// Client certificate and key, as host paths.
    pub client: Option<(String, String)>,
    pub skip_verify: bool,
}

/// The endpoints `config`'s hosts.toml files configure, with their paths made absolute.
pub fn endpoints(config: &RenderedConfig) -> Result<Vec<HostsFile>, VerifyError> {
    let mut files = Vec::new();
    for (path, file) in &config.files {
        let mut all = Vec::new();
        if !path.ends_with("/hosts.toml") {
            continue;
        }
        let bad = |detail: String| VerifyError::BadHostsFile {
            file: path.clone(),
            detail,
        };
        let doc: toml::Table = toml::from_str(&file.content).map_err(|e| bad(e.to_string()))?;
        let dir = Path::new(path).parent().unwrap_or(Path::new("/"));
        if let Some(hosts) = doc.get("host").and_then(|h| h.as_table()) {
            for (url, table) in hosts {
                if let Some(table) = table.as_table() {
                    all.push(endpoint(url, table, dir).map_err(bad)?);
                }
            }
        }
        if !all.is_empty() {
            files.push(HostsFile {
                path: path.clone(),
                endpoints: all,
            });
        }
    }
    Ok(files)
}

fn endpoint(url: &str, table: &toml::Table, dir: &Path) -> Result<Endpoint, String> {
    let absolute = |p: &str| -> String {
        if p.starts_with('/') {
            p.to_owned()
        } else {
            dir.join(p).display().to_string()
        }
    };
    let strings = |v: &toml::Value| -> Vec<String> {
        match v {
            toml::Value::String(s) => vec![s.clone()],
            toml::Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str())
                .map(String::from)
                .collect(),
            _ => vec![],
        }
    };
    let ca = table.get("ca").map(strings).unwrap_or_default();
    let client = match table.get("client") {
        None => None,
        Some(toml::Value::Array(pairs)) => match pairs.first() {
            Some(toml::Value::Array(pair)) if pair.len() == 2 => Some((
                absolute(pair[0].as_str().unwrap_or_default()),
                absolute(pair[1].as_str().unwrap_or_default()),
            )),
            _ => return Err(format!("{url}: client must be [[cert, key]]")),
        },
        Some(_) => return Err(format!("{url}: client must be [[cert, key]]")),
    };
    Ok(Endpoint {
        url: url.to_owned(),
        ca: ca.iter().map(|p| absolute(p)).collect(),
        client,
        skip_verify: table
            .get("skip_verify")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
    })
}

/// Probes the endpoints of `config` (files read under `root`). Returns warnings about
/// endpoints that do not answer while another one for the same registry does.
pub async fn verify(
    config: &RenderedConfig,
    root: &Path,
    timeout: Duration,
) -> Result<Vec<String>, VerifyError> {
    let mut warnings = Vec::new();
    for file in endpoints(config)? {
        let mut reasons = Vec::new();
        for endpoint in &file.endpoints {
            match probe(endpoint, root, timeout).await {
                Ok(()) => {}
                Err(e @ VerifyError::BadTlsFile { .. }) => return Err(e),
                Err(e) => reasons.push(e.to_string()),
            }
        }
        if reasons.len() == file.endpoints.len() {
            return Err(VerifyError::NoEndpointAnswers {
                file: file.path,
                reasons,
            });
        }
        warnings.extend(reasons);
    }
    Ok(warnings)
}

/// Asks one endpoint for `GET <path>/`, the registry API root: 200 or 401 means a registry
/// answered.
pub async fn probe(endpoint: &Endpoint, root: &Path, timeout: Duration) -> Result<(), VerifyError> {
    let unreachable = |detail: String| VerifyError::Unreachable {
        endpoint: endpoint.url.clone(),
        detail,
    };
    let url = url::Url::parse(&endpoint.url).map_err(|e| unreachable(format!("bad URL: {e}")))?;
    let host = url
        .host_str()
        .ok_or_else(|| unreachable("URL has no host".into()))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url.port_or_known_default().unwrap_or(443);
    let path = format!("{}/", url.path().trim_end_matches('/'));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: regmirror-agent\r\nConnection: close\r\n\r\n",
        url.host_str().unwrap_or_default()
    );

    let work = async {
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| unreachable(format!("cannot connect to {host}:{port}: {e}")))?;
        if url.scheme() == "http" {
            return exchange(tcp, &request)
                .await
                .map_err(|e| unreachable(e.to_string()));
        }
        let tls = tls_config(endpoint, root)?;
        let name = ServerName::try_from(host.clone())
            .map_err(|e| unreachable(format!("bad server name: {e}")))?;
        let stream = TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| unreachable(format!("TLS: {e}")))?;
        exchange(stream, &request)
            .await
            .map_err(|e| unreachable(e.to_string()))
    };
    let status = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| unreachable(format!("no answer within {}s", timeout.as_secs())))??;
    match status {
        200 | 401 => Ok(()),
        status => Err(VerifyError::NotARegistry {
            endpoint: endpoint.url.clone(),
            status,
        }),
    }
}

/// Sends the request; returns the HTTP status code.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &str,
) -> std::io::Result<u16> {
    stream.write_all(request.as_bytes()).await?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        let n = stream.read(&mut head[read..]).await?;
        if n == 0 {
            break;
        }
        read += n;
    }
    let line = String::from_utf8_lossy(&head[..read]);
    line.get(9..12)
        .and_then(|code| code.parse().ok())
        .filter(|_| line.starts_with("HTTP/1."))
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:?}")))
}

fn tls_config(endpoint: &Endpoint, root: &Path) -> Result<ClientConfig, VerifyError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let bad_file = |what: &'static str, path: &str, detail: String| VerifyError::BadTlsFile {
        endpoint: endpoint.url.clone(),
        what,
        path: path.to_owned(),
        detail,
    };
    let read = |what: &'static str, path: &str| -> Result<Vec<u8>, VerifyError> {
        std::fs::read(on_host(root, path)).map_err(|e| bad_file(what, path, e.to_string()))
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let builder = if endpoint.skip_verify || endpoint.ca.is_empty() {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
    } else {
        let mut roots = RootCertStore::empty();
        for path in &endpoint.ca {
            let pem = read("CA", path)?;
            let mut found = 0;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad_file("CA", path, e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| bad_file("CA", path, e.to_string()))?;
                found += 1;
            }
            if found == 0 {
                return Err(bad_file("CA", path, "holds no PEM certificate".into()));
            }
        }
        builder.with_root_certificates(roots)
    };
    match &endpoint.client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(&read("client certificate", cert)?)
                    .collect::<Result<_, _>>()
                    .map_err(|e| bad_file("client certificate", cert, e.to_string()))?;
            let private = PrivateKeyDer::from_pem_slice(&read("client key", key)?)
                .map_err(|e| bad_file("client key", key, e.to_string()))?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| bad_file("client key", key, e.to_string()))
        }
    }
}

fn on_host(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Accepts any certificate (for `skip_verify`, and where the host's trust store decides), but
/// still checks the handshake signatures.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
