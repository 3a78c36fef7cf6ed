//! Kubernetes objects, as the pure decision reads them. Plain conversions, no I/O.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
use k8s_openapi::api::rbac::v1::Role;
use regmirror_core::api::RegistryMirror;
use regmirror_core::contract::{
    self, is_config_name, node_ready, sealed_config, NodeState, CONFIG_KEY, CURRENT_CONFIG,
    DESIRED_ACTIVATION, DESIRED_CONFIG, FLAVOR, MESSAGE, PUBLIC_KEY, SEALING_KEY_DATA,
    SEALING_KEY_SECRET, STATE,
};
use regmirror_core::decide::NodeView;
use regmirror_core::render::RenderedConfig;
use regmirror_core::seal::{self, SealingKey};
use regmirror_core::sources::SourceObject;

/// A Node as the planner sees it: labels, role, readiness and the agent's annotations.
pub fn node_view(node: &Node) -> NodeView {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let annotations = node.metadata.annotations.as_ref();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).cloned();
    let ready = node_ready(node);
    NodeView {
        name: node.metadata.name.clone().unwrap_or_default(),
        control_plane: contract::is_control_plane(&labels),
        labels,
        ready,
        flavor: annotation(FLAVOR).and_then(|f| f.parse().ok()),
        desired: annotation(DESIRED_CONFIG),
        current: annotation(CURRENT_CONFIG),
        state: annotation(STATE).and_then(|s| NodeState::parse(&s)),
        message: annotation(MESSAGE),
        public_key: annotation(PUBLIC_KEY),
        key_recipient: annotation(CONFIG_KEY).and_then(|k| seal::recipient(&k).map(str::to_owned)),
        desired_activation: annotation(DESIRED_ACTIVATION).and_then(|a| a.parse().ok()),
    }
}

/// Keeps of a Node only what [`node_view`] reads, so the operator's cache of a large cluster
/// stays small: managed fields, images, addresses and the rest are dropped as they arrive.
pub fn slim_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    if let Some(annotations) = node.metadata.annotations.as_mut() {
        annotations.retain(|k, _| k.starts_with("regmirror.io/"));
    }
    node.spec = None;
    if let Some(status) = node.status.as_mut() {
        let ready = status
            .conditions
            .take()
            .map(|cs| cs.into_iter().filter(|c| c.type_ == "Ready").collect());
        *status = Default::default();
        status.conditions = ready;
    }
}

/// What of a RegistryMirror decides anything: its spec (by generation) and annotations (the
/// pause). Not its status: the operator's own status writes need no new pass.
pub fn mirror_fingerprint(mirror: &RegistryMirror) -> u64 {
    super::hash(&(mirror.metadata.generation, &mirror.metadata.annotations))
}

/// What of a Node the operator reads, in two parts: what decides where the node goes (labels,
/// flavor, whether it has a key) and what is only its state (readiness and the rest of
/// regmirror's annotations, after [`slim_node`] dropped everything else). A change of the
/// second alone lets the operator keep its placement.
pub fn node_fingerprints(node: &Node) -> (u64, u64) {
    let view = node_view(node);
    let placement = super::hash(&(
        &view.labels,
        view.flavor.as_ref().map(ToString::to_string),
        view.public_key.is_some(),
    ));
    (
        placement,
        super::hash(&(view.ready, &node.metadata.annotations)),
    )
}

/// A Secret's type, data, and the hosts it allows its credentials to be sent to (its
/// `regmirror.io/allowed-hosts` annotation; no other annotation is kept).
pub fn secret_source(secret: &Secret) -> SourceObject {
    SourceObject {
        type_: secret.type_.clone(),
        data: secret
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect(),
        allowed_hosts: SourceObject::allowed_hosts_of(secret.metadata.annotations.as_ref()),
    }
}

/// A ConfigMap's data and binary data.
pub fn config_map_source(config_map: &ConfigMap) -> SourceObject {
    let text = config_map
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()));
    let binary = config_map
        .binary_data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()));
    SourceObject {
        type_: None,
        data: text.chain(binary).collect(),
        allowed_hosts: None,
    }
}

/// Whether a Secret is one of the operator's rendered configs.
pub fn is_config(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(contract::CONFIG_LABEL))
}

/// The operator's sealing key, if the Secret holding it is among `secrets`.
pub fn sealing_key<'s>(secrets: impl IntoIterator<Item = &'s Secret>) -> Option<SealingKey> {
    let secret = secrets
        .into_iter()
        .find(|s| s.metadata.name.as_deref() == Some(SEALING_KEY_SECRET))?;
    let bytes = secret.data.as_ref()?.get(SEALING_KEY_DATA)?;
    match SealingKey::from_bytes(&bytes.0) {
        Ok(key) => Some(key),
        Err(e) => {
            tracing::error!(secret = SEALING_KEY_SECRET, error = %e, "the sealing key is unusable");
            None
        }
    }
}

/// The rendered configs among `secrets`, by name: those that carry the config label, a
/// config's name, and content that opens with the sealing key and whose digest is its name.
/// Anything else is left out (and logged): it is not the operator's, so it is neither
/// deleted, nor reused, nor granted to the agents.
pub fn stored_configs<'s>(
    secrets: impl IntoIterator<Item = &'s Secret>,
    key: &SealingKey,
) -> BTreeMap<String, RenderedConfig> {
    secrets
        .into_iter()
        .filter(|s| is_config(s))
        .filter_map(|s| {
            let name = s.metadata.name.clone()?;
            let opened = if is_config_name(&name) {
                sealed_config(s)
                    .map_err(|e| e.to_string())
                    .and_then(|sealed| key.open_config(&name, sealed).map_err(|e| e.to_string()))
            } else {
                Err("its name is not a config's".to_owned())
            };
            match opened {
                Ok(config) => Some((name, config)),
                Err(e) => {
                    tracing::warn!(secret = %name, error = %e, "not a config of ours; leaving it alone");
                    None
                }
            }
        })
        .collect()
}

/// The Secret names the agents' Role grants `get` on.
pub fn role_resource_names(role: &Role) -> Vec<String> {
    role.rules
        .iter()
        .flatten()
        .flat_map(|r| r.resource_names.iter().flatten().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerImage, NodeCondition, NodeStatus};

    fn node(ready: &str, heartbeat: &str, images: usize) -> Node {
        let mut node = Node::default();
        node.metadata.name = Some("n".into());
        node.metadata.labels = Some([("pool".to_owned(), "a".to_owned())].into());
        node.status = Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: ready.into(),
                last_heartbeat_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    heartbeat.parse().unwrap(),
                )),
                ..NodeCondition::default()
            }]),
            images: Some(vec![ContainerImage::default(); images]),
            ..NodeStatus::default()
        });
        slim_node(&mut node);
        node
    }

    #[test]
    fn a_kubelet_heartbeat_is_no_change_but_readiness_labels_and_our_annotations_are() {
        let base = node_fingerprints(&node("True", "2026-11-23T00:00:00Z", 3));
        assert_eq!(
            base,
            node_fingerprints(&node("True", "2026-11-23T00:05:00Z", 30))
        );
        let down = node_fingerprints(&node("False", "2026-11-23T00:00:00Z", 3));
        assert_eq!(down.0, base.0, "readiness is state, not placement");
        assert_ne!(down.1, base.1);
        let mut relabelled = node("True", "2026-11-23T00:00:00Z", 3);
        relabelled.metadata.labels = Some([("pool".to_owned(), "b".to_owned())].into());
        assert_ne!(
            base.0,
            node_fingerprints(&relabelled).0,
            "labels place nodes"
        );
        let mut reported = node("True", "2026-11-23T00:00:00Z", 3);
        reported.metadata.annotations = Some([(STATE.to_owned(), "Applied".to_owned())].into());
        let reported = node_fingerprints(&reported);
        assert_eq!(reported.0, base.0, "an agent's report is state");
        assert_ne!(reported.1, base.1);
        let mut keyed = node("True", "2026-11-23T00:00:00Z", 3);
        keyed.metadata.annotations = Some([(PUBLIC_KEY.to_owned(), "A".repeat(43) + "=")].into());
        assert_ne!(
            node_fingerprints(&keyed).0,
            base.0,
            "a first key places the node"
        );
    }
}
