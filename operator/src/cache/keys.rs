//! The key material of the caches: the CA that signs their serving certificates (one for all,
//! created once), a serving certificate per cache for its cluster IP and Service names, and the
//! nodes' password for it. Random, so made here, in the writer's path, never in a decision.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use thiserror::Error;

/// How long the CA is valid: it is not renewed by regmirror (delete its Secret to make a new
/// one; the caches and nodes follow).
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a serving certificate is valid ...
const SERVING_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// ... and how long before its end a new one is issued.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why key material could not be made.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("the cache CA's key in Secret {secret} does not load: {source}")]
    BadCaKey {
        secret: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("the cache CA's certificate in Secret {secret} does not load: {source}")]
    BadCaCert {
        secret: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("could not make a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
}

/// A CA certificate and its key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct CaKeys {
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for CaKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaKeys")
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A serving certificate, its key (PEM), and when it ends (seconds since the epoch).
pub struct Serving {
    pub cert: String,
    pub key: String,
    pub not_after: u64,
}

/// The parameters of a CA the operator makes.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "regmirror cache CA");
    name.push(DnType::OrganizationName, "regmirror");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A new CA.
pub fn new_ca() -> Result<CaKeys, KeyError> {
    let key = KeyPair::generate()?;
    let mut params = ca_params();
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + CA_VALIDITY).into();
    let cert = params.self_signed(&key)?;
    Ok(CaKeys {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A serving certificate for a cache at `ip`, named `dns_names` too, signed by `ca` (whose
/// key comes from the Secret `ca_secret`, for messages).
pub fn issue_serving(
    ca: &CaKeys,
    ca_secret: &str,
    ip: IpAddr,
    dns_names: &[String],
) -> Result<Serving, KeyError> {
    let ca_key = KeyPair::from_pem(&ca.key).map_err(|source| KeyError::BadCaKey {
        secret: ca_secret.to_owned(),
        source,
    })?;
    // The issuer as the CA's own certificate names it: a CA someone put in the Secret works too.
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert, ca_key).map_err(|source| KeyError::BadCaCert {
            secret: ca_secret.to_owned(),
            source,
        })?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, dns_names.first().map_or("cache", |n| n));
    params.distinguished_name = name;
    params.subject_alt_names = std::iter::once(Ok(SanType::IpAddress(ip)))
        .chain(
            dns_names
                .iter()
                .map(|n| n.clone().try_into().map(SanType::DnsName)),
        )
        .collect::<Result<_, _>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = SystemTime::now();
    let not_after = now + SERVING_VALIDITY;
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = not_after.into();
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Serving {
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_after: not_after
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    })
}

/// Why `ca` cannot issue the caches' certificates: a certificate that is not a CA's (basic
/// constraints CA:TRUE, key usage keyCertSign when given), or a key that is not its own (the
/// certificates would not verify, and the nodes would quietly go past the caches), or either
/// one that does not load. A CA may come from a person (docs/operating.md), so each is said.
pub fn check_ca(ca: &CaKeys) -> Result<(), &'static str> {
    let key = KeyPair::from_pem(&ca.key).map_err(|_| {
        "tls.key is not a private key rcgen loads (PEM, PKCS#8: ECDSA P-256/P-384, Ed25519 or RSA)"
    })?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(ca.cert.as_bytes())
        .map_err(|_| "tls.crt is not a PEM certificate")?;
    let cert = pem
        .parse_x509()
        .map_err(|_| "tls.crt is not an X.509 certificate")?;
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|b| b.value.ca);
    if !is_ca {
        return Err("tls.crt is not a CA certificate (basicConstraints CA:TRUE)");
    }
    if let Ok(Some(usage)) = cert.key_usage() {
        if !usage.value.key_cert_sign() {
            return Err("tls.crt's key usage does not allow signing certificates (keyCertSign)");
        }
    }
    if *cert.public_key().subject_public_key.data != *key.public_key_raw() {
        return Err("tls.key is not the key of tls.crt");
    }
    Issuer::from_ca_cert_pem(&ca.cert, key)
        .map(drop)
        .map_err(|_| "tls.crt does not load as an issuer")
}

/// A new password for the nodes: 32 random bytes, base64url.
pub fn new_password() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system provides randomness");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A new bcrypt salt.
pub fn new_salt() -> [u8; 16] {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).expect("the operating system provides randomness");
    salt
}

/// Seconds since the epoch, now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_issues_only_with_its_own_key_and_only_as_a_ca() {
        let ca = new_ca().unwrap();
        assert_eq!(check_ca(&ca), Ok(()));
        let other = new_ca().unwrap();
        let swapped = CaKeys {
            cert: ca.cert.clone(),
            key: other.key,
        };
        assert_eq!(check_ca(&swapped), Err("tls.key is not the key of tls.crt"));
        let serving = issue_serving(&ca, "ns/ca", "10.0.0.1".parse().unwrap(), &[]).unwrap();
        let leaf = CaKeys {
            cert: serving.cert,
            key: serving.key,
        };
        assert_eq!(
            check_ca(&leaf),
            Err("tls.crt is not a CA certificate (basicConstraints CA:TRUE)")
        );
        let garbage = CaKeys {
            cert: "not pem".into(),
            key: ca.key,
        };
        assert_eq!(check_ca(&garbage), Err("tls.crt is not a PEM certificate"));
    }
}
