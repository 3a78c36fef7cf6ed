//! The in-cluster pull-through cache in front of a mirror's endpoint: the CNCF distribution
//! registry v3 in proxy mode, configured here. (Version 2.8, Debian's `docker-registry`, logs in
//! to token-auth upstreams only: a basic-auth upstream answers it "unauthorized",
//! distribution#3153.)
//!
//! The cache serves what it fetched with the upstream's credentials to whoever reaches it, so
//! it takes credentials of its own (htpasswd), which the operator generates and gives the
//! nodes with its address and CA: a [`CacheSite`], which `resolve` puts before the mirror's
//! endpoints.
//!
//! Pure: from the upstream it proxies (an endpoint of the mirror, with that endpoint's
//! credentials), where it serves and where it stores, the registry's `config.yml`. The file
//! holds the upstream's password, so it travels in a Secret.
//!
//! distribution proxies exactly one upstream per registry process, so a cache serves one
//! endpoint. Nodes list the cache first and the mirror's endpoints after it: containerd falls
//! through to them when the cache does not answer, and the cache serves what it holds (tags
//! included) when the upstream does not.

use serde::Serialize;
use thiserror::Error;

use crate::model::{Credentials, ResolvedEndpoint};

/// The port a cache serves on, in its pod and on its Service.
pub const PORT: u16 = 5000;
/// The Secret (in the caches' namespace) holding the CA that signs every cache's serving
/// certificate (`tls.crt`, `tls.key`); its `tls.crt` goes to the nodes.
pub const CA_SECRET: &str = "regmirror-cache-ca";
/// The label on a cache's objects naming the RegistryMirror they serve.
pub const MIRROR_LABEL: &str = "regmirror.io/cache";
/// The user name nodes log in to a cache with.
pub const USERNAME: &str = "regmirror-node";

/// The namespace the caches run in unless told otherwise: their own, apart from the operator's,
/// so that the operator's right to make Deployments is confined to one the chart labels for
/// Pod Security `restricted` (no privileged pod, no host path, non-root).
pub const DEFAULT_NAMESPACE: &str = "regmirror-cache";

/// Lower-case hex SHA-256 of `bytes`.
pub fn hex_digest(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The name of a mirror's cache objects (Service, Deployment, Secret): `regmirror-cache-`, the
/// mirror's name made a DNS label (a Service name: no dots, at most 63 characters), and a
/// digest of the name, so that two mirrors never share one and no mirror's is [`CA_SECRET`].
pub fn object_name(mirror: &str) -> String {
    let suffix = &hex_digest(mirror.as_bytes())[..8];
    let label: String = mirror
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            _ => '-',
        })
        .take(63 - "regmirror-cache-".len() - 1 - suffix.len())
        .collect();
    let label = label.trim_matches('-');
    if label.is_empty() {
        format!("regmirror-cache-{suffix}")
    } else {
        format!("regmirror-cache-{label}-{suffix}")
    }
}

/// The URL nodes reach a cache at `address` (its Service's cluster IP) by.
pub fn site_url(address: &str) -> String {
    match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => format!("https://[{v6}]:{PORT}"),
        _ => format!("https://{address}:{PORT}"),
    }
}

/// Where the nodes find a mirror's cache: what `resolve` puts before the mirror's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSite {
    /// `https://<address>:<port>`: the Service's cluster IP, since nodes reach Services through
    /// kube-proxy but do not resolve cluster DNS names.
    pub url: String,
    /// The CA bundle (PEM) that signs the cache's certificate.
    pub ca: String,
    /// The nodes' credentials for the cache.
    pub credentials: Credentials,
    /// The Secret those come from (`namespace/name`), for messages.
    pub secret: String,
}

/// The upstream a cache proxies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The endpoint as resolved (`https://host[:port]`, scheme always written; a `/v2` path is
    /// taken off).
    pub url: String,
    pub credentials: Option<Credentials>,
    /// The CA bundle (PEM) the upstream's certificate is checked against, if not the system's.
    pub ca: Option<String>,
}

impl Upstream {
    /// The upstream of a cache in front of `endpoint`, if distribution can proxy it.
    pub fn of(endpoint: &ResolvedEndpoint) -> Result<Upstream, CacheError> {
        let url = endpoint.url.to_string();
        let tls = &endpoint.settings.tls;
        if tls.client.is_some() {
            return Err(CacheError::ClientCertificate { url });
        }
        if tls.insecure_skip_verify {
            return Err(CacheError::InsecureUpstream { url });
        }
        if !endpoint.url.path.trim_matches('/').is_empty() {
            return Err(CacheError::UpstreamPath { url });
        }
        if let Some(Credentials::IdentityToken(_) | Credentials::BearerToken(_)) =
            endpoint.settings.auth
        {
            return Err(CacheError::TokenCredentials { url });
        }
        Ok(Upstream {
            url,
            credentials: endpoint.settings.auth.clone(),
            ca: tls.ca.clone(),
        })
    }
}

/// bcrypt's cost for the nodes' password. distribution checks the password on every request
/// of every pull; at the default cost (10) that is tens of milliseconds of CPU each. The cost
/// is there to slow down guessing a person's password; the operator's are 256 random bits,
/// which no cost makes weaker or stronger. So the lowest.
const BCRYPT_COST: u32 = 4;

/// The htpasswd line distribution checks the nodes' password against: bcrypt, with `salt`
/// (random, chosen by the caller: this stays pure).
pub fn htpasswd_entry(username: &str, password: &str, salt: [u8; 16]) -> String {
    let hash = bcrypt::hash_with_salt(password, BCRYPT_COST, salt)
        .expect("bcrypt takes any password at cost 4");
    format!(
        "{username}:{}\n",
        hash.format_for_version(bcrypt::Version::TwoY)
    )
}

/// Where a cache serves, with its TLS key pair and the htpasswd file of the credentials it
/// takes (paths inside the cache's container).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    /// `host:port` to listen on (`:5000` in a pod).
    pub addr: String,
    pub certificate: String,
    pub key: String,
    pub htpasswd: Option<String>,
}

/// Why a cache cannot proxy an endpoint.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CacheError {
    #[error("the cache's upstream {url} takes a bearer or identity token; distribution's proxy mode logs in with a username and password only")]
    TokenCredentials { url: String },
    #[error("the cache's upstream {url} has a path; distribution's proxy mode reaches a registry at the root of its host (/v2/)")]
    UpstreamPath { url: String },
    #[error("the cache's upstream {url} asks for a client certificate; distribution's proxy mode cannot present one")]
    ClientCertificate { url: String },
    #[error("the cache's upstream {url} has insecureSkipVerify; the cache verifies its upstream (give its CA in tls.caRef)")]
    InsecureUpstream { url: String },
    #[error("{}", crate::api::grammar::CACHE_WITHOUT_ENDPOINT)]
    NoEndpoint,
    #[error("{}", crate::api::grammar::CACHE_FOR_EVERY_REGISTRY)]
    EveryRegistry,
}

/// distribution's configuration, as much of it as a cache sets.
#[derive(Serialize)]
struct Config<'a> {
    version: &'static str,
    log: Log,
    storage: Storage<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<Auth<'a>>,
    http: Http<'a>,
    proxy: Proxy<'a>,
}

#[derive(Serialize)]
struct Log {
    level: &'static str,
}

#[derive(Serialize)]
struct Storage<'a> {
    filesystem: Filesystem<'a>,
    /// Expired blobs are deleted by the proxy's scheduler.
    delete: Enabled,
}

#[derive(Serialize)]
struct Filesystem<'a> {
    rootdirectory: &'a str,
}

#[derive(Serialize)]
struct Enabled {
    enabled: bool,
}

#[derive(Serialize)]
struct Auth<'a> {
    htpasswd: Htpasswd<'a>,
}

#[derive(Serialize)]
struct Htpasswd<'a> {
    realm: &'static str,
    path: &'a str,
}

#[derive(Serialize)]
struct Http<'a> {
    addr: &'a str,
    tls: Tls<'a>,
}

#[derive(Serialize)]
struct Tls<'a> {
    certificate: &'a str,
    key: &'a str,
}

#[derive(Serialize)]
struct Proxy<'a> {
    remoteurl: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<&'a str>,
    /// How long content stays after its last pull: a week, as distribution's default.
    ttl: &'static str,
}

/// The `config.yml` of a cache proxying `upstream`, serving as `serving` says, storing under
/// `storage_dir`.
pub fn registry_config(
    upstream: &Upstream,
    serving: &Serving,
    storage_dir: &str,
) -> Result<String, CacheError> {
    let path = upstream
        .url
        .split_once("://")
        .map_or(upstream.url.as_str(), |(_, rest)| rest)
        .split_once('/')
        .map_or("", |(_, path)| path);
    if !path.trim_matches('/').is_empty() && path.trim_matches('/') != "v2" {
        return Err(CacheError::UpstreamPath {
            url: upstream.url.clone(),
        });
    }
    let remoteurl = upstream
        .url
        .trim_end_matches('/')
        .trim_end_matches("/v2")
        .trim_end_matches('/');
    let (username, password) = match &upstream.credentials {
        None => (None, None),
        Some(Credentials::Basic { username, password }) => {
            (Some(username.as_str()), Some(password.as_str()))
        }
        Some(Credentials::IdentityToken(_) | Credentials::BearerToken(_)) => {
            return Err(CacheError::TokenCredentials {
                url: upstream.url.clone(),
            })
        }
    };
    let config = Config {
        version: "0.1",
        log: Log { level: "info" },
        storage: Storage {
            filesystem: Filesystem {
                rootdirectory: storage_dir,
            },
            delete: Enabled { enabled: true },
        },
        auth: serving.htpasswd.as_deref().map(|path| Auth {
            htpasswd: Htpasswd {
                realm: "regmirror-cache",
                path,
            },
        }),
        http: Http {
            addr: &serving.addr,
            tls: Tls {
                certificate: &serving.certificate,
                key: &serving.key,
            },
        },
        proxy: Proxy {
            remoteurl,
            username,
            password,
            ttl: "168h",
        },
    };
    Ok(serde_yaml::to_string(&config).expect("a cache config serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serving() -> Serving {
        Serving {
            addr: ":5000".into(),
            certificate: "/tls/tls.crt".into(),
            key: "/tls/tls.key".into(),
            htpasswd: Some("/etc/cache/htpasswd".into()),
        }
    }

    #[test]
    fn a_cache_proxies_the_root_of_its_upstream_with_its_password() {
        let upstream = Upstream {
            url: "https://mirror.example.com:5000/v2".into(),
            credentials: Some(Credentials::Basic {
                username: "puller".into(),
                password: "p: 'quoted\"".into(),
            }),
            ca: None,
        };
        let text = registry_config(&upstream, &serving(), "/var/lib/registry").unwrap();
        let yaml: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(
            yaml["proxy"]["remoteurl"],
            "https://mirror.example.com:5000"
        );
        assert_eq!(yaml["proxy"]["username"], "puller");
        assert_eq!(yaml["proxy"]["password"], "p: 'quoted\"", "{text}");
        assert_eq!(yaml["http"]["addr"], ":5000");
        assert_eq!(yaml["http"]["tls"]["certificate"], "/tls/tls.crt");
        assert_eq!(
            yaml["storage"]["filesystem"]["rootdirectory"],
            "/var/lib/registry"
        );
        assert_eq!(yaml["version"], "0.1");
    }

    #[test]
    fn an_anonymous_upstream_has_no_credentials_and_tokens_or_paths_are_refused() {
        let anonymous = Upstream {
            url: "https://registry-1.docker.io".into(),
            credentials: None,
            ca: None,
        };
        let text = registry_config(&anonymous, &serving(), "/data").unwrap();
        assert!(
            !text.contains("username") && !text.contains("password"),
            "{text}"
        );

        let token = Upstream {
            url: "https://mirror.example.com".into(),
            credentials: Some(Credentials::BearerToken("t".into())),
            ca: None,
        };
        assert!(matches!(
            registry_config(&token, &serving(), "/data"),
            Err(CacheError::TokenCredentials { .. })
        ));
        let path = Upstream {
            url: "https://harbor.example.com/v2/dockerhub".into(),
            credentials: None,
            ca: None,
        };
        assert!(matches!(
            registry_config(&path, &serving(), "/data"),
            Err(CacheError::UpstreamPath { .. })
        ));
    }

    #[test]
    fn an_htpasswd_line_checks_the_password_it_was_made_from() {
        let line = htpasswd_entry(USERNAME, "node-pass", [3; 16]);
        let (user, hash) = line.trim_end().split_once(':').unwrap();
        assert_eq!(user, USERNAME);
        assert!(hash.starts_with("$2y$04$"), "{hash}");
        assert!(bcrypt::verify("node-pass", hash).unwrap());
        assert!(!bcrypt::verify("other", hash).unwrap());
    }

    #[test]
    fn a_cache_site_url_brackets_ipv6() {
        assert_eq!(site_url("10.43.0.5"), "https://10.43.0.5:5000");
        assert_eq!(site_url("fd00::10"), "https://[fd00::10]:5000");
    }

    proptest::proptest! {
        /// Object names are Service names (DNS-1035 labels), one per mirror, never the CA's.
        #[test]
        fn object_names_are_service_names_of_their_own(
            a in "[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?",
            b in "[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?",
        ) {
            let label = regex::Regex::new("^[a-z]([-a-z0-9]*[a-z0-9])?$").unwrap();
            for name in [&a, &b] {
                let object = object_name(name);
                proptest::prop_assert!(object.len() <= 63, "{object}");
                proptest::prop_assert!(label.is_match(&object), "{object}");
                proptest::prop_assert_ne!(&object, CA_SECRET);
            }
            if a != b {
                proptest::prop_assert_ne!(object_name(&a), object_name(&b));
            }
        }
    }
}
