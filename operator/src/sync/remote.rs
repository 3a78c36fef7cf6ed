//! One registry as `sync-images` speaks to it: an `oci-client` client with that registry's CA
//! and credentials. Credentials come from the mirror's Secrets (resolved like the operator
//! does) or a docker config file; they are never printed.

use std::path::Path;
use std::sync::Once;
use std::time::Duration;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use regmirror_core::docker_config::DockerConfig;
use regmirror_core::model::{Credentials, HostSettings, Scheme};

use super::SyncError;

/// How to reach one registry host.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// `host[:port]`.
    pub host: String,
    pub plain_http: bool,
    /// CA bundle (PEM) to trust besides the system's.
    pub ca: Option<String>,
    pub insecure_skip_verify: bool,
    pub credentials: Option<Credentials>,
    /// Where the credentials come from, for messages (`Secret ns/name`, a file): never the
    /// values.
    pub credentials_from: Option<String>,
    /// The endpoint wants a client certificate (mutual TLS).
    pub client_cert: bool,
}

impl Access {
    /// An endpoint's settings as the mirror's Secrets resolved them.
    pub fn of_endpoint(
        host: &str,
        scheme: Scheme,
        settings: &HostSettings,
        from: Option<String>,
    ) -> Access {
        Access {
            host: host.to_owned(),
            plain_http: scheme == Scheme::Http,
            ca: settings.tls.ca.clone(),
            insecure_skip_verify: settings.tls.insecure_skip_verify,
            credentials: settings.auth.clone(),
            credentials_from: from,
            client_cert: settings.tls.client.is_some(),
        }
    }
}

/// A registry to read from or write to.
pub struct Remote {
    /// `host[:port]`, for messages.
    pub host: String,
    pub client: Client,
    pub auth: RegistryAuth,
}

impl Remote {
    pub fn connect(access: &Access) -> Result<Remote, SyncError> {
        static PROVIDER: Once = Once::new();
        // reqwest is built without a default crypto provider: ring, as kube's client uses.
        PROVIDER.call_once(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        let refuse = |reason: String| SyncError::Client {
            registry: access.host.clone(),
            reason,
        };
        if access.client_cert {
            return Err(refuse(
                "the endpoint wants a client certificate (mutual TLS), which sync-images cannot present yet".into(),
            ));
        }
        let auth = match &access.credentials {
            None => RegistryAuth::Anonymous,
            Some(Credentials::Basic { username, password }) => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Some(Credentials::BearerToken(token)) => RegistryAuth::Bearer(token.clone()),
            Some(Credentials::IdentityToken(_)) => {
                return Err(refuse(format!(
                    "the credentials{} are an identity token, which sync-images cannot exchange; use username and password",
                    access
                        .credentials_from
                        .as_deref()
                        .map(|from| format!(" from {from}"))
                        .unwrap_or_default()
                )))
            }
        };
        let config = ClientConfig {
            protocol: if access.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            extra_root_certificates: access
                .ca
                .iter()
                .map(|pem| Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: pem.as_bytes().to_vec(),
                })
                .collect(),
            accept_invalid_certificates: access.insecure_skip_verify,
            // One PUT per blob, its body streamed from the source.
            use_monolithic_push: true,
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(300)),
            ..ClientConfig::default()
        };
        let client = Client::try_from(config).map_err(|e| refuse(super::chain(&e)))?;
        Ok(Remote {
            host: access.host.clone(),
            client,
            auth,
        })
    }
}

/// Whether two `host[:port]` names are one registry (Docker Hub has several names).
pub fn same_registry(a: &str, b: &str) -> bool {
    fn canonical(host: &str) -> String {
        let host = host.to_ascii_lowercase();
        match host.as_str() {
            "docker.io" | "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
            _ => host,
        }
    }
    canonical(a) == canonical(b)
}

/// The credentials a docker config file (`~/.docker/config.json`, what `docker login` and
/// `skopeo login` write) holds for `registry`; none when it has no entry for it.
pub fn auth_file_credentials(path: &Path, registry: &str) -> Result<Option<Credentials>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let config = DockerConfig::parse(&text)
        .map_err(|e| format!("{}: not a docker config file ({e})", path.display()))?;
    config
        .credentials(|host| same_registry(host, registry))
        .transpose()
        .map_err(|e| format!("{}: the entry for {registry} {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_files_are_read_like_docker_does() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.json");
        std::fs::write(
            &file,
            r#"{"auths": {"https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
                "127.0.0.1:5000": {"username": "u", "password": "p"}}}"#,
        )
        .unwrap();
        let basic = |u: &str, p: &str| {
            Some(Credentials::Basic {
                username: u.into(),
                password: p.into(),
            })
        };
        assert_eq!(
            auth_file_credentials(&file, "docker.io").unwrap(),
            basic("user", "pass")
        );
        assert_eq!(
            auth_file_credentials(&file, "127.0.0.1:5000").unwrap(),
            basic("u", "p")
        );
        assert_eq!(auth_file_credentials(&file, "quay.io").unwrap(), None);
        std::fs::write(&file, r#"{"auths": {"quay.io": {"auth": "c2VjcmV0"}}}"#).unwrap();
        let e = auth_file_credentials(&file, "quay.io").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }
}
