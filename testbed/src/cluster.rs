//! Kubernetes objects for operator tests and benchmarks: a synthetic cluster of any size, and
//! what the API server and the agents would make of the operator's writes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Node, NodeCondition, NodeStatus, Secret};
use k8s_openapi::api::rbac::v1::Role;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::ByteString;
use regmirror_core::api::RegistryMirrorStatus;
use regmirror_core::api::{Endpoint, EndpointAuth, RegistryMirror, RegistryMirrorSpec};
use regmirror_core::contract::{self, CURRENT_CONFIG, DESIRED_CONFIG, FLAVOR, PUBLIC_KEY, STATE};
use regmirror_core::decide::{Advance, Decision};
use regmirror_core::render::RenderedConfig;

use crate::simulator::{take, Takes};
use regmirror_core::seal::{NodeKey, NodePublicKey, SealingKey};

/// The objects of a cluster, as the API server holds them.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    pub mirrors: Vec<RegistryMirror>,
    pub nodes: Vec<Node>,
    pub secrets: Vec<Secret>,
    pub config_maps: Vec<ConfigMap>,
    /// The agents' Role.
    pub role: Option<Role>,
    /// The operator's namespace.
    pub namespace: String,
    /// The name of the agents' Role, as the operator writes it.
    pub agent_role_name: String,
}

impl Takes for Cluster {
    fn store_config(&mut self, name: &str, config: &RenderedConfig) {
        let mut secret = contract::config_secret(name, sealing_key().seal_config(name, config));
        secret.metadata.namespace = Some(self.namespace.clone());
        self.secrets.push(secret);
    }

    fn grant(&mut self, names: &[String]) {
        let mut role = contract::agent_role(&self.agent_role_name, names);
        role.metadata.namespace = Some(self.namespace.clone());
        self.role = Some(role);
    }

    /// Told nodes get the operator's annotations, and their agents apply at once.
    fn tell(&mut self, advances: &[&Advance]) {
        let by_name: BTreeMap<&str, &Advance> =
            advances.iter().map(|a| (a.node.as_str(), *a)).collect();
        for node in &mut self.nodes {
            let Some(advance) = by_name.get(node.metadata.name.as_deref().unwrap_or_default())
            else {
                continue;
            };
            let a = node
                .metadata
                .annotations
                .get_or_insert_with(Default::default);
            for (key, value) in told(advance) {
                a.insert(key.into(), value);
            }
            a.insert(CURRENT_CONFIG.into(), advance.config.clone());
            a.insert(STATE.into(), "Applied".into());
        }
    }

    fn set_status(&mut self, mirror: &str, status: &RegistryMirrorStatus) {
        crate::simulator::set_status(&mut self.mirrors, mirror, status);
    }

    fn delete_config(&mut self, name: &str) {
        self.secrets
            .retain(|s| s.metadata.name.as_deref() != Some(name));
    }
}

impl Cluster {
    /// `nodes` k3s nodes spread over `pools` node pools (label `pool`), and `mirrors`
    /// RegistryMirrors: a fifth of them for every node, the rest each for one pool. Every
    /// mirror authenticates with its own Secret. Nodes look like a kubelet's: conditions,
    /// addresses, node info, a list of cached images and managed fields.
    pub fn synthetic(nodes: usize, mirrors: usize, pools: usize, namespace: &str) -> Cluster {
        let mut cluster = Cluster {
            namespace: namespace.into(),
            ..Cluster::default()
        };
        let global = mirrors / 5;
        for m in 0..mirrors {
            let mut mirror = RegistryMirror::new(
                &format!("mirror-{m:03}"),
                RegistryMirrorSpec {
                    cache: None,
                    embedded_registry: false,
                    registry: format!("registry-{m:03}.example.com"),
                    endpoints: vec![Endpoint {
                        url: format!("https://mirror-{m:03}.internal.example.com:5000"),
                        auth: Some(EndpointAuth::from_secret(format!("pull-{m:03}"))),
                        tls: None,
                    }],
                    rewrites: vec![],
                    node_selector: (m >= global).then(|| LabelSelector {
                        match_labels: Some(BTreeMap::from([(
                            "pool".to_owned(),
                            format!("p{:02}", m % pools),
                        )])),
                        match_expressions: None,
                    }),
                },
            );
            mirror.metadata.generation = Some(1);
            mirror.metadata.uid = Some(format!("uid-mirror-{m:03}"));
            cluster.mirrors.push(mirror);
            cluster.secrets.push(Secret {
                metadata: ObjectMeta {
                    name: Some(format!("pull-{m:03}")),
                    namespace: Some(namespace.into()),
                    ..ObjectMeta::default()
                },
                type_: Some("kubernetes.io/basic-auth".into()),
                data: Some(BTreeMap::from([
                    ("username".into(), ByteString(b"puller".to_vec())),
                    (
                        "password".into(),
                        ByteString(format!("password-{m}").into_bytes()),
                    ),
                ])),
                ..Secret::default()
            });
        }
        cluster.nodes = (0..nodes).map(|n| kubelet_node(n, pools)).collect();
        cluster.secrets.push(sealing_key_secret(namespace));
        cluster
    }

    /// The cluster after the API server took `decision` and every agent applied what it was
    /// told ([`crate::simulator::take`]; here the agents apply as soon as they are told).
    pub fn settle(&mut self, decision: &Decision, agent_role: &str) {
        self.agent_role_name = agent_role.to_owned();
        take(self, decision);
    }

    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .expect("a node of that name")
    }
}

/// The sealing key of every test cluster.
pub fn sealing_key() -> SealingKey {
    SealingKey::from_bytes(&[7; 32]).expect("32 bytes")
}

/// The Secret holding [`sealing_key`], in `namespace`.
pub fn sealing_key_secret(namespace: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(contract::SEALING_KEY_SECRET.into()),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            contract::SEALING_KEY_DATA.into(),
            ByteString(vec![7; 32]),
        )])),
        ..Secret::default()
    }
}

/// The key pair of the agent on Node `name` (derived from the name, so tests are exact).
pub fn node_key(name: &str) -> NodeKey {
    use sha2::Digest;
    NodeKey::from_bytes(&sha2::Sha256::digest(name.as_bytes())).expect("32 bytes")
}

/// The annotations the operator writes on a Node it points at a config.
pub fn told(advance: &Advance) -> [(&'static str, String); 3] {
    let public = NodePublicKey::from_text(&advance.public_key).expect("a test node's key");
    [
        (DESIRED_CONFIG, advance.config.clone()),
        (
            contract::DESIRED_ACTIVATION,
            advance.activation.as_str().to_owned(),
        ),
        (
            contract::CONFIG_KEY,
            sealing_key().seal_key_for(&advance.config, &public),
        ),
    ]
}

/// A Node as a kubelet reports it, with the agent's flavor and public key annotations.
pub fn kubelet_node(n: usize, pools: usize) -> Node {
    let name = format!("node-{n:05}");
    let conditions: Vec<serde_json::Value> = ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"]
        .iter()
        .map(|t| {
            serde_json::json!({
                "type": t, "status": if *t == "Ready" { "True" } else { "False" },
                "lastHeartbeatTime": "2026-11-23T00:00:00Z", "lastTransitionTime": "2026-11-20T00:00:00Z",
                "reason": format!("Kubelet{t}"), "message": format!("kubelet reports {t}"),
            })
        })
        .collect();
    let json = serde_json::json!({
        "metadata": {
            "name": name,
            "uid": format!("uid-{name}"),
            "resourceVersion": "123456",
            "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "k3s", "topology.kubernetes.io/region": "eu-west",
                "pool": format!("p{:02}", n % pools),
            },
            "annotations": {
                FLAVOR: "k3s",
                PUBLIC_KEY: node_key(&name).public().to_text(),
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                "k3s.io/node-args": "[\"agent\",\"--node-label\",\"pool=p00\",\"--server\",\"https://10.0.0.1:6443\"]",
                "k3s.io/internal-ip": format!("10.1.{}.{}", n / 250, n % 250),
                "flannel.alpha.coreos.com/public-ip": format!("10.1.{}.{}", n / 250, n % 250),
            },
            "managedFields": (0..4).map(|i| serde_json::json!({
                "manager": format!("manager-{i}"), "operation": "Update", "apiVersion": "v1",
                "time": "2026-11-23T00:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:k3s.io/internal-ip": {}}, "f:labels": {"f:pool": {}}},
                             "f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {"f:lastHeartbeatTime": {}, "f:status": {}}}}},
            })).collect::<Vec<_>>(),
        },
        "spec": {"podCIDR": "10.42.0.0/24", "podCIDRs": ["10.42.0.0/24"], "providerID": format!("k3s://{name}")},
        "status": {
            "capacity": {"cpu": "4", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"},
            "allocatable": {"cpu": "4", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"},
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "10.1.0.1"}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": "0123456789abcdef0123456789abcdef", "systemUUID": "01234567-89ab-cdef-0123-456789abcdef",
                "bootID": "01234567-89ab-cdef-0123-456789abcdef", "kernelVersion": "6.1.0-27-amd64",
                "osImage": "Debian GNU/Linux 12 (bookworm)", "containerRuntimeVersion": "containerd://1.7.23-k3s2",
                "kubeletVersion": "v1.31.4+k3s1", "kubeProxyVersion": "v1.31.4+k3s1",
                "operatingSystem": "linux", "architecture": "amd64",
            },
            "images": (0..30).map(|i| serde_json::json!({
                "names": [format!("docker.io/library/image-{i}@sha256:{:064x}", i), format!("docker.io/library/image-{i}:v1.{i}")],
                "sizeBytes": 12345678 + i,
            })).collect::<Vec<_>>(),
        }
    });
    serde_json::from_value(json).expect("a valid Node")
}

/// A Ready Node with only the agent's flavor and public key annotations.
pub fn ready_node(name: &str, flavor: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            annotations: Some(BTreeMap::from([
                (FLAVOR.into(), flavor.into()),
                (PUBLIC_KEY.into(), node_key(name).public().to_text()),
            ])),
            ..ObjectMeta::default()
        },
        status: Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}
