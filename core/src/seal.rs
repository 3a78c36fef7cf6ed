//! Sealing: a rendered configuration is readable only by the nodes it is meant for.
//!
//! A config Secret holds credentials and client keys. The agents' RBAC can only say "these
//! Secrets", for one ServiceAccount shared by every node, so RBAC alone would let any node read
//! any node group's credentials. Instead each config is encrypted, and the key that opens it
//! travels to each targeted node sealed to that node's own public key:
//!
//! - the operator keeps one *sealing key* (32 random bytes in a Secret only it reads);
//! - a config's *content key* is derived from the sealing key and the config's name
//!   (HMAC-SHA256), so any operator replica can derive it again and nothing else is stored;
//! - the config Secret holds the config encrypted under its content key (XChaCha20-Poly1305,
//!   the name as associated data);
//! - each agent keeps an X25519 key pair on its host and publishes the public half on its own
//!   Node (which the admission policy confines it to); the operator seals the content key to
//!   that public key (X25519 + HKDF-SHA256 + ChaCha20-Poly1305) in the Node's
//!   `regmirror.io/config-key` annotation, written together with `desired-config`.
//!
//! An agent of node A can read node B's config Secret and Node, but opens neither without B's
//! private key or the operator's sealing key. Everything here is deterministic: sealing the
//! same config for the same node twice gives the same bytes (each derived key encrypts exactly
//! one message, so fixed nonces are safe), which keeps writes idempotent and tests exact.
//!
//! Pure: keys come in as bytes; drawing random ones is the caller's business.

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::contract::config_secret_name;
use crate::render::RenderedConfig;

/// Bytes of every key here.
pub const KEY_LEN: usize = 32;
/// Version prefix of a sealed config key, so the format can change.
const KEY_FORMAT: &str = "v1";

/// Why something does not open.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SealError {
    #[error("{0} is not valid base64 of {KEY_LEN} bytes")]
    BadKey(&'static str),
    #[error("the sealed config key is not in the form v1.<recipient>.<ephemeral>.<ciphertext>")]
    BadFormat,
    #[error("the config key was sealed for another node's key (this node's key changed?)")]
    OtherRecipient,
    #[error("the sealed config key does not open with this node's key")]
    KeyDoesNotOpen,
    #[error("config {0} does not open with its key (tampered, or sealed by another operator)")]
    ConfigDoesNotOpen(String),
    #[error("config {0} does not decode: {1}")]
    Decode(String, String),
    #[error("config {name} holds content whose digest names {actual}, not {name}")]
    DigestMismatch { name: String, actual: String },
}

/// The operator's sealing key.
#[derive(Clone, PartialEq, Eq)]
pub struct SealingKey([u8; KEY_LEN]);

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealingKey(<redacted>)")
    }
}

impl SealingKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        bytes
            .try_into()
            .map(SealingKey)
            .map_err(|_| SealError::BadKey("the sealing key"))
    }

    /// The content key of config `name`.
    pub fn config_key(&self, name: &str) -> ConfigKey {
        ConfigKey(hmac(&self.0, &[b"regmirror config key\0", name.as_bytes()]))
    }

    /// Encrypts `config`, stored as `name`, for the config Secret.
    pub fn seal_config(&self, name: &str, config: &RenderedConfig) -> Vec<u8> {
        let key = self.config_key(name);
        let nonce = &hmac(&key.0, &[b"nonce"])[..24];
        let json = serde_json::to_vec(config).expect("a rendered config always serializes");
        let sealed = XChaCha20Poly1305::new((&key.0).into())
            .encrypt(
                nonce.into(),
                Payload {
                    msg: &json,
                    aad: name.as_bytes(),
                },
            )
            .expect("encryption of a bounded message cannot fail");
        [nonce, &sealed].concat()
    }

    /// Seals config `name`'s content key to a node's public key: the value of the Node's
    /// `regmirror.io/config-key` annotation.
    pub fn seal_key_for(&self, name: &str, node: &NodePublicKey) -> String {
        let ephemeral = StaticSecret::from(hmac(
            &self.0,
            &[b"regmirror ephemeral\0", name.as_bytes(), b"\0", &node.0],
        ));
        let ephemeral_public = PublicKey::from(&ephemeral);
        let shared = ephemeral.diffie_hellman(&PublicKey::from(node.0));
        let wrap = wrapping_key(shared.as_bytes(), ephemeral_public.as_bytes(), &node.0);
        let sealed = ChaCha20Poly1305::new((&wrap).into())
            .encrypt(
                &[0u8; 12].into(),
                Payload {
                    msg: &self.config_key(name).0,
                    aad: name.as_bytes(),
                },
            )
            .expect("encryption of a bounded message cannot fail");
        format!(
            "{KEY_FORMAT}.{}.{}.{}",
            node.to_text(),
            B64.encode(ephemeral_public.as_bytes()),
            B64.encode(sealed)
        )
    }

    /// Opens a config Secret's content with the sealing key (the operator's own check).
    pub fn open_config(&self, name: &str, sealed: &[u8]) -> Result<RenderedConfig, SealError> {
        self.config_key(name).open_config(name, sealed)
    }
}

/// The key that opens one config.
#[derive(Clone, PartialEq, Eq)]
pub struct ConfigKey([u8; KEY_LEN]);

impl fmt::Debug for ConfigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConfigKey(<redacted>)")
    }
}

impl ConfigKey {
    /// Decrypts config `name` and checks that its content is what the name says: a config
    /// Secret's name is the digest of its content, so a swapped or altered one is refused.
    pub fn open_config(&self, name: &str, sealed: &[u8]) -> Result<RenderedConfig, SealError> {
        let does_not_open = || SealError::ConfigDoesNotOpen(name.to_owned());
        if sealed.len() < 24 {
            return Err(does_not_open());
        }
        let (nonce, ciphertext) = sealed.split_at(24);
        let json = XChaCha20Poly1305::new((&self.0).into())
            .decrypt(
                nonce.into(),
                Payload {
                    msg: ciphertext,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| does_not_open())?;
        let config: RenderedConfig = serde_json::from_slice(&json)
            .map_err(|e| SealError::Decode(name.to_owned(), e.to_string()))?;
        let actual = config_secret_name(&config);
        if actual != name {
            return Err(SealError::DigestMismatch {
                name: name.to_owned(),
                actual,
            });
        }
        Ok(config)
    }
}

/// A node agent's key pair; the private half never leaves the host.
pub struct NodeKey(StaticSecret);

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey(public: {})", self.public().to_text())
    }
}

impl NodeKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        let bytes: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| SealError::BadKey("the node key"))?;
        Ok(NodeKey(StaticSecret::from(bytes)))
    }

    /// The private key's bytes, for the host's key file.
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.0.to_bytes()
    }

    pub fn public(&self) -> NodePublicKey {
        NodePublicKey(PublicKey::from(&self.0).to_bytes())
    }

    /// Opens the content key of config `name` from a Node's `regmirror.io/config-key`.
    pub fn open_key(&self, name: &str, sealed_key: &str) -> Result<ConfigKey, SealError> {
        let parts: Vec<&str> = sealed_key.split('.').collect();
        let [KEY_FORMAT, recipient, ephemeral, ciphertext] = parts.as_slice() else {
            return Err(SealError::BadFormat);
        };
        let own = self.public();
        if NodePublicKey::from_text(recipient)? != own {
            return Err(SealError::OtherRecipient);
        }
        let ephemeral = decode_key(ephemeral, "the ephemeral key")?;
        let ciphertext = B64.decode(ciphertext).map_err(|_| SealError::BadFormat)?;
        let shared = self.0.diffie_hellman(&PublicKey::from(ephemeral));
        let wrap = wrapping_key(shared.as_bytes(), &ephemeral, &own.0);
        let key = ChaCha20Poly1305::new((&wrap).into())
            .decrypt(
                &[0u8; 12].into(),
                Payload {
                    msg: &ciphertext,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| SealError::KeyDoesNotOpen)?;
        let key: [u8; KEY_LEN] = key.try_into().map_err(|_| SealError::KeyDoesNotOpen)?;
        Ok(ConfigKey(key))
    }
}

/// A node's public key, as published on its Node.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct NodePublicKey([u8; KEY_LEN]);

impl NodePublicKey {
    pub fn from_text(text: &str) -> Result<Self, SealError> {
        decode_key(text, "the node's public key").map(NodePublicKey)
    }

    pub fn to_text(&self) -> String {
        B64.encode(self.0)
    }
}

/// The recipient (a node public key, as text) a sealed config key was made for.
pub fn recipient(sealed_key: &str) -> Option<&str> {
    let mut parts = sealed_key.split('.');
    (parts.next() == Some(KEY_FORMAT))
        .then(|| parts.next())
        .flatten()
}

fn decode_key(text: &str, what: &'static str) -> Result<[u8; KEY_LEN], SealError> {
    B64.decode(text)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(SealError::BadKey(what))
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn wrapping_key(shared: &[u8], ephemeral: &[u8], recipient: &[u8]) -> [u8; KEY_LEN] {
    let salt = [ephemeral, recipient].concat();
    let mut key = [0u8; KEY_LEN];
    Hkdf::<Sha256>::new(Some(&salt), shared)
        .expand(b"regmirror config key wrap v1", &mut key)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    key
}
