//! The contract between operator and node agent: the Node annotations each side writes, and
//! how a rendered configuration travels in an immutable, content-addressed Secret.

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

/// The key of a config Secret holding the JSON of a [`RenderedConfig`].
pub const CONFIG_KEY: &str = "config.json";
/// Label on every config Secret, for the operator's watch and garbage collection.
pub const CONFIG_LABEL: &str = "regmirror.io/config";

/// The name of the Secret that carries `config`: derived from its content, so equal
/// configurations share one Secret and a Secret never changes.
pub fn config_secret_name(config: &RenderedConfig) -> String {
    format!("regmirror-config-{}", &config.digest()[..20])
}

/// What the agent reports about its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
