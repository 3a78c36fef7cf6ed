//! Docker config files — a `kubernetes.io/dockerconfigjson` Secret's `.dockerconfigjson`, what
//! `docker login` and `skopeo login` write — and the credentials they hold for a registry host.
//! Read in one place for the operator's Secrets and `sync-images`' auth files.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::model::Credentials;

/// The `auths` of a docker config file.
#[derive(Debug, Deserialize)]
pub struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Debug, Deserialize)]
struct Entry {
    username: Option<String>,
    password: Option<String>,
    auth: Option<String>,
    identitytoken: Option<String>,
    registrytoken: Option<String>,
}

impl DockerConfig {
    /// Parses the JSON; the error says where it is wrong, never what is there (a password).
    pub fn parse(json: &str) -> Result<DockerConfig, String> {
        serde_json::from_str(json).map_err(|e| {
            format!(
                "{:?} error at line {}, column {}",
                e.classify(),
                e.line(),
                e.column()
            )
        })
    }

    /// The keys of its entries, as written.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.auths.keys().map(String::as_str)
    }

    /// The credentials of the first entry whose host (`host[:port]` of a key that may be
    /// written as a URL, `https://index.docker.io/v1/`) `matches`; `None` when no entry does.
    pub fn credentials(
        &self,
        matches: impl Fn(&str) -> bool,
    ) -> Option<Result<Credentials, String>> {
        let (_, entry) = self.auths.iter().find(|(key, _)| matches(&key_host(key)))?;
        Some(entry.credentials())
    }
}

impl Entry {
    fn credentials(&self) -> Result<Credentials, String> {
        if let (Some(username), Some(password)) = (&self.username, &self.password) {
            return Ok(Credentials::Basic {
                username: username.clone(),
                password: password.clone(),
            });
        }
        if let Some(auth) = self.auth.as_deref().filter(|a| !a.is_empty()) {
            return decode_auth(auth);
        }
        if let Some(token) = &self.identitytoken {
            return Ok(Credentials::IdentityToken(token.clone()));
        }
        if let Some(token) = &self.registrytoken {
            return Ok(Credentials::BearerToken(token.clone()));
        }
        Err("has no username/password, auth or token".into())
    }
}

/// `host[:port]` of a key, lower case.
fn key_host(key: &str) -> String {
    let without_scheme = key.split_once("://").map_or(key, |(_, rest)| rest);
    without_scheme
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// Decodes an `auth` value: base64 of `username:password`.
pub fn decode_auth(auth: &str) -> Result<Credentials, String> {
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| "auth is not base64 of username:password".to_owned())?;
    let decoded =
        String::from_utf8(decoded).map_err(|_| "auth does not decode to UTF-8 text".to_owned())?;
    let (username, password) = decoded
        .split_once(':')
        .ok_or("auth does not decode to username:password")?;
    Ok(Credentials::Basic {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}
