//! Telling the cluster what happened on this node: the agent's annotations on its own Node
//! (which the operator reads) and Events on the Node (which people read).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::api::{Api, Patch, PatchParams};
use regmirror_core::contract::{NodeState, CURRENT_CONFIG, FLAVOR, MESSAGE, PUBLIC_KEY, STATE};
use regmirror_process::events::{EventPublisher, Occurrence};
use serde_json::json;

/// Writes to the agent's own Node only.
pub struct NodeReporter {
    nodes: Api<Node>,
    events: EventPublisher,
    node: String,
}

impl NodeReporter {
    pub fn new(client: kube::Client, node: &str) -> Self {
        NodeReporter {
            nodes: Api::all(client.clone()),
            events: EventPublisher::new(client, "regmirror-agent", node),
            node: node.to_owned(),
        }
    }

    /// Sets the agent's annotations to `wanted`, writing only those `node` has otherwise.
    /// Returns whether anything was written.
    pub async fn annotate(
        &self,
        node: &Node,
        wanted: &BTreeMap<&'static str, String>,
    ) -> Result<bool, kube::Error> {
        let have = node.metadata.annotations.clone().unwrap_or_default();
        let changed: BTreeMap<&str, &String> = wanted
            .iter()
            .filter(|(k, v)| have.get(**k) != Some(*v))
            .map(|(k, v)| (*k, v))
            .collect();
        if changed.is_empty() {
            return Ok(false);
        }
        let patch = json!({"metadata": {"annotations": changed}});
        self.nodes
            .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(true)
    }

    /// Records an Event on the Node. A failure to record is logged, not fatal.
    pub async fn event(&self, node: &Node, warning: bool, reason: &str, note: &str) {
        let what = Occurrence {
            warning,
            reason,
            action: "Apply",
            note,
        };
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.node.clone()),
            uid: node.metadata.uid.clone(),
            ..ObjectReference::default()
        };
        if let Err(e) = self.events.publish(&what, &reference).await {
            tracing::warn!(error = %e, reason, "recording an Event failed");
        }
    }
}

/// What the agent says about its host with every report: the flavor it detected and the
/// public key configs are sealed to.
pub struct HostIdentity<'a> {
    pub flavor: &'a str,
    pub public_key: &'a str,
}

/// The agent's annotations for a state.
pub fn annotations(
    host: Option<&HostIdentity>,
    current: Option<&str>,
    state: NodeState,
    message: &str,
) -> BTreeMap<&'static str, String> {
    let mut wanted = BTreeMap::from([
        (STATE, state.as_str().to_owned()),
        (MESSAGE, message.to_owned()),
    ]);
    if let Some(host) = host {
        wanted.insert(FLAVOR, host.flavor.to_owned());
        wanted.insert(PUBLIC_KEY, host.public_key.to_owned());
    }
    if let Some(current) = current {
        wanted.insert(CURRENT_CONFIG, current.to_owned());
    }
    wanted
}
