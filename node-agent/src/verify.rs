//! Checking a configuration after it is on disk, the way the runtime will use it: every mirror
//! endpoint the configuration lists answers the registry API, over TLS with the CA and client
//! certificate files configured for it.
//!
//! containerd reads hosts.toml at every pull and never says that a file is wrong; CRI-O takes a
//! registries.conf on reload just as quietly: a CA path that does not exist, a CA that does not
//! match, or an endpoint that does not answer only show up as failed pulls later. The agent
//! finds them now, so that it can roll back and report, and the operator can stop the rollout.
//!
//! What to probe comes with the configuration ([`RenderedConfig::probes`]): the renderer lists,
//! per registry and for every flavor, the mirror endpoints in the order the runtime tries them
//! and the host paths of the TLS files it will use. Nothing is parsed back from the runtime's
//! files. The registry's own default endpoint is never among them (it is public, or reached in
//! ways the agent cannot see — k3s even derives its scheme from the name), so air-gapped nodes
//! verify fine; a registry configured only with credentials or TLS for itself therefore goes
//! unprobed. A configuration made by an operator older than probe targets carries none, and is
//! not probed.
//!
//! A registry's configuration is broken when a TLS file it names cannot be used, or when none
//! of its endpoints answers; one endpoint down among others that answer is what fallback is
//! for, and only a warning. Without a configured CA the certificate chain is not judged here
//! (the host's own trust store, which the agent cannot see, decides).
//!
//! Requests go through hyper's client (hyper-util's legacy client over hyper-rustls, with the
//! ring provider the agent's rustls already uses), one client per endpoint since each has its
//! own TLS files: `GET <API root>/` must answer 200 or 401.

use std::error::Error as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{Request, Uri};
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use regmirror_core::render::{ProbeTarget, RenderedConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use thiserror::Error;

/// Why a configuration does not work.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum VerifyError {
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
    #[error("no endpoint in the configuration of {registry} answers: {}", reasons.join("; "))]
    NoEndpointAnswers {
        registry: String,
        reasons: Vec<String>,
    },
}

/// Probes the targets of `config` (TLS files read under `root`), registry by registry. Returns
/// warnings about endpoints that do not answer while another one for the same registry does.
pub async fn verify(
    config: &RenderedConfig,
    root: &Path,
    timeout: Duration,
) -> Result<Vec<String>, VerifyError> {
    let mut warnings = Vec::new();
    for (registry, targets) in &config.probes {
        let mut reasons = Vec::new();
        for target in targets {
            match probe(target, root, timeout).await {
                Ok(()) => {}
                Err(e @ VerifyError::BadTlsFile { .. }) => return Err(e),
                Err(e) => reasons.push(e.to_string()),
            }
        }
        if !targets.is_empty() && reasons.len() == targets.len() {
            return Err(VerifyError::NoEndpointAnswers {
                registry: registry.clone(),
                reasons,
            });
        }
        warnings.extend(reasons);
    }
    Ok(warnings)
}

/// Asks one endpoint for `GET <API root>/`: a registry answered if the status is 200 or 401, or
/// if the answer carries the registry API's version header whatever its status — an endpoint
/// used with its own path (`https://mirror/v2/quay`, containerd's `override_path`) is a place
/// in a registry's namespace, not its API root, and a registry answers 404 there.
pub async fn probe(
    target: &ProbeTarget,
    root: &Path,
    timeout: Duration,
) -> Result<(), VerifyError> {
    let unreachable = |detail: String| VerifyError::Unreachable {
        endpoint: target.url.clone(),
        detail,
    };
    let uri: Uri = format!("{}/", target.url.trim_end_matches('/'))
        .parse()
        .map_err(|e| unreachable(format!("bad URL: {e}")))?;
    let authority = uri
        .authority()
        .ok_or_else(|| unreachable("URL has no host".into()))?
        .to_string();
    let answer = match uri.scheme_str() {
        Some("http") => get(HttpConnector::new(), uri, timeout).await,
        Some("https") => {
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls_config(target, root)?)
                .https_only()
                .enable_http1()
                .build();
            get(connector, uri, timeout).await
        }
        _ => return Err(unreachable("not an http or https URL".into())),
    };
    let answer = match answer {
        Some(Ok(answer)) => answer,
        Some(Err(e)) => return Err(unreachable(describe(&e, &authority))),
        None => {
            return Err(unreachable(format!(
                "no answer within {}s",
                timeout.as_secs()
            )))
        }
    };
    if matches!(answer.status, 200 | 401) || answer.registry {
        Ok(())
    } else {
        Err(VerifyError::NotARegistry {
            endpoint: target.url.clone(),
            status: answer.status,
        })
    }
}

/// What an endpoint answered, as far as the probe cares.
struct Answer {
    status: u16,
    /// It carries `Docker-Distribution-Api-Version`, as every registry API answer does.
    registry: bool,
}

/// Sends `GET uri` through `connector`; the answer, or `None` when nothing came back within
/// `timeout` (connecting included).
async fn get<C>(
    connector: C,
    uri: Uri,
    timeout: Duration,
) -> Option<Result<Answer, hyper_util::client::legacy::Error>>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let client: Client<C, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector);
    let request = Request::get(uri)
        .header(hyper::header::USER_AGENT, "regmirror-agent")
        .body(Empty::new())
        .expect("a GET with a parsed URI is a valid request");
    tokio::time::timeout(timeout, client.request(request))
        .await
        .ok()
        .map(|answer| {
            answer.map(|response| Answer {
                status: response.status().as_u16(),
                registry: response
                    .headers()
                    .contains_key("docker-distribution-api-version"),
            })
        })
}

/// What went wrong, for people: the TLS error if the handshake failed, "cannot connect" if the
/// connection could not be made, else the error's causes.
fn describe(error: &hyper_util::client::legacy::Error, authority: &str) -> String {
    let mut causes = Vec::new();
    let mut tls = None;
    let mut source = error.source();
    while let Some(cause) = source {
        causes.push(cause.to_string());
        if let Some(e) = rustls_error(cause) {
            tls.get_or_insert_with(|| e.to_string());
        }
        source = cause.source();
    }
    let causes = if causes.is_empty() {
        error.to_string()
    } else {
        causes.join(": ")
    };
    match tls {
        Some(tls) => format!("TLS: {tls}"),
        None if error.is_connect() => format!("cannot connect to {authority}: {causes}"),
        None => causes,
    }
}

/// The rustls error in `error`, also when it travels inside `io::Error`s (as tokio-rustls and
/// hyper-rustls pass it on).
fn rustls_error<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e rustls::Error> {
    if let Some(tls) = error.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    let inner = error.downcast_ref::<std::io::Error>()?.get_ref()?;
    rustls_error(inner)
}

fn tls_config(target: &ProbeTarget, root: &Path) -> Result<ClientConfig, VerifyError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let bad_file = |what: &'static str, path: &str, detail: String| VerifyError::BadTlsFile {
        endpoint: target.url.clone(),
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
    let builder = match (&target.ca_file, target.insecure_skip_verify) {
        (Some(path), false) => {
            let pem = read("CA", path)?;
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad_file("CA", path, e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| bad_file("CA", path, e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad_file("CA", path, "holds no PEM certificate".into()));
            }
            builder.with_root_certificates(roots)
        }
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider))),
    };
    match &target.client {
        None => Ok(builder.with_no_client_auth()),
        Some(client) => {
            let (cert, key) = (&client.cert_file, &client.key_file);
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
