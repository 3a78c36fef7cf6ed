//! The node's key pair: configs are sealed to its public half (see `regmirror_core::seal`),
//! which the agent publishes on its own Node; the private half stays in the host's state
//! directory (mode 0600) and nowhere else. A host whose state directory is lost gets a new
//! pair, and the operator seals the node's config to it again.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use regmirror_core::seal::{NodeKey, KEY_LEN};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::hostfs::{HostError, HostFs};

/// The state file holding the private key.
const KEY_FILE: &str = "node-key.json";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyFile {
    private_key: String,
}

#[derive(Debug, Error)]
pub enum NodeKeyError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("the node key file under the state directory is damaged; remove it to make a new key")]
    Damaged,
}

/// The node's key pair, made and stored on first use.
pub fn load_or_create(host: &HostFs) -> Result<NodeKey, NodeKeyError> {
    if let Some(file) = host.read_state::<KeyFile>(KEY_FILE)? {
        let bytes = B64
            .decode(&file.private_key)
            .map_err(|_| NodeKeyError::Damaged)?;
        return NodeKey::from_bytes(&bytes).map_err(|_| NodeKeyError::Damaged);
    }
    let mut bytes = [0u8; KEY_LEN];
    getrandom::fill(&mut bytes).expect("the operating system provides randomness");
    let key = NodeKey::from_bytes(&bytes).expect("32 bytes make a key");
    host.write_state(
        KEY_FILE,
        &KeyFile {
            private_key: B64.encode(key.to_bytes()),
        },
    )?;
    tracing::info!(public_key = %key.public().to_text(), "made this node's key pair");
    Ok(key)
}
