//! The contract between operator and node agent: the Node annotations each side writes, and
//! how a rendered configuration travels in an immutable, content-addressed Secret.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeCondition, Secret};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use thiserror::Error;

use crate::render::RenderedConfig;

/// On a Node, written by the operator: the name of the config Secret the node should apply.
pub const DESIRED_CONFIG: &str = "regmirror.io/desired-config";
/// On a Node, written by the agent: the config Secret the node runs now.
pub const CURRENT_CONFIG: &str = "regmirror.io/current-config";
/// On a Node, written by the agent: one of [`NodeState`].
pub const STATE: &str = "regmirror.io/state";
/// On a Node, written by the agent: why the state is what it is (failures, unsupported setups).
pub const MESSAGE: &str = "regmirror.io/message";
/// On a Node, written by the agent: the detected flavor, in `Flavor`'s display form.
pub const FLAVOR: &str = "regmirror.io/flavor";
/// On a RegistryMirror: `"true"` freezes its rollout where it is.
pub const PAUSED: &str = "regmirror.io/paused";

/// On a Node, written by the operator with `desired-config`: the step it budgeted for the move
/// (`Hot`, `Reload` or `Restart`, see [`crate::activation`]). The agent carries out exactly
/// this step.
pub const DESIRED_ACTIVATION: &str = "regmirror.io/desired-activation";
/// On a Node, written by the operator with `desired-config`: the desired config's key, sealed
/// to the node's public key (see [`crate::seal`]).
pub const CONFIG_KEY: &str = "regmirror.io/config-key";
/// On a Node, written by the agent: the public half of the node's key pair.
pub const PUBLIC_KEY: &str = "regmirror.io/public-key";

/// The key of a config Secret holding the sealed [`RenderedConfig`].
pub const SEALED_CONFIG_KEY: &str = "config.sealed";
/// Label on every config Secret, for the operator's watch and garbage collection.
pub const CONFIG_LABEL: &str = "regmirror.io/config";

/// The type of config Secrets.
pub const CONFIG_SECRET_TYPE: &str = "regmirror.io/config";

/// The Secret (in the operator's namespace) holding the operator's sealing key; agents are
/// never granted it.
pub const SEALING_KEY_SECRET: &str = "regmirror-sealing-key";
/// Its data key.
pub const SEALING_KEY_DATA: &str = "key";

/// The prefix of every config Secret's name.
pub const CONFIG_NAME_PREFIX: &str = "regmirror-config-";
/// Hex digits of the content digest in a config Secret's name.
const CONFIG_NAME_DIGITS: usize = 20;

/// The immutable Secret that carries a config, sealed, under `name`.
pub fn config_secret(name: &str, sealed: Vec<u8>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(managed_by([(CONFIG_LABEL, "true")])),
            ..ObjectMeta::default()
        },
        type_: Some(CONFIG_SECRET_TYPE.to_owned()),
        immutable: Some(true),
        data: Some(BTreeMap::from([(
            SEALED_CONFIG_KEY.to_owned(),
            ByteString(sealed),
        )])),
        ..Secret::default()
    }
}

/// Why a Secret does not carry a config.
#[derive(Debug, Error)]
pub enum ConfigSecretError {
    #[error("the config Secret has no {SEALED_CONFIG_KEY}")]
    MissingKey,
}

/// The sealed config a config Secret carries.
pub fn sealed_config(secret: &Secret) -> Result<&[u8], ConfigSecretError> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(SEALED_CONFIG_KEY))
        .map(|b| b.0.as_slice())
        .ok_or(ConfigSecretError::MissingKey)
}

/// Whether `name` has the form of a config Secret's name (`regmirror-config-` and 20
/// lower-case hex digits). Nothing else is ever granted to the agents.
pub fn is_config_name(name: &str) -> bool {
    name.strip_prefix(CONFIG_NAME_PREFIX).is_some_and(|digest| {
        digest.len() == CONFIG_NAME_DIGITS
            && digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The Role `name` through which the agents may `get` exactly the config Secrets `configs`.
pub fn agent_role(name: &str, configs: &[String]) -> Role {
    Role {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(managed_by([])),
            ..ObjectMeta::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".to_owned()]),
            verbs: vec!["get".to_owned()],
            resource_names: Some(configs.to_vec()),
            ..PolicyRule::default()
        }]),
    }
}

/// The label on every object regmirror makes, and its value: the operator's watches of the
/// caches' namespace select by it.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "regmirror";

/// The label selector for objects regmirror makes.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY}={MANAGER}")
}

/// `labels`, and the label saying regmirror manages the object.
fn managed_by<const N: usize>(labels: [(&str, &str); N]) -> BTreeMap<String, String> {
    labels
        .into_iter()
        .chain([(MANAGED_BY, MANAGER)])
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Role labels of nodes that run the control plane (`master` on older k3s/RKE2) or are members
/// of its etcd (k3s/RKE2 etcd-only servers): restarting two of them at once can lose etcd's
/// quorum, so they restart one at a time.
pub const CONTROL_PLANE_LABELS: [&str; 3] = [
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
    "node-role.kubernetes.io/etcd",
];

/// Whether a node with these labels counts as control plane for restarts.
pub fn is_control_plane(labels: &BTreeMap<String, String>) -> bool {
    CONTROL_PLANE_LABELS.iter().any(|l| labels.contains_key(*l))
}

/// A Node's `Ready` condition, as its kubelet last posted it.
pub fn ready_condition(node: &Node) -> Option<&NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

/// Whether a Node is Ready.
pub fn node_ready(node: &Node) -> bool {
    ready_condition(node).is_some_and(|c| c.status == "True")
}

/// The name of the Secret that carries `config`: derived from its content, so equal
/// configurations share one Secret and a Secret never changes.
pub fn config_secret_name(config: &RenderedConfig) -> String {
    format!(
        "{CONFIG_NAME_PREFIX}{}",
        &config.digest()[..CONFIG_NAME_DIGITS]
    )
}

/// What the agent reports about its node.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum NodeState {
    /// Writing files, restarting or verifying.
    Applying,
    /// The current config is applied and verified.
    Applied,
    /// Applying failed; the previous config was restored.
    Failed,
    /// This node cannot take regmirror's configuration (e.g. k3s with an external runtime).
    Unsupported,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Applying => "Applying",
            NodeState::Applied => "Applied",
            NodeState::Failed => "Failed",
            NodeState::Unsupported => "Unsupported",
        }
    }

    pub fn parse(s: &str) -> Option<NodeState> {
        [
            NodeState::Applying,
            NodeState::Applied,
            NodeState::Failed,
            NodeState::Unsupported,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}
