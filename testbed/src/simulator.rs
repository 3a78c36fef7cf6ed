//! The one simulation of what the API server and the agents make of the operator's decisions,
//! shared by every test and benchmark that moves a cluster forward: [`take`] walks a
//! [`Decision`] in the order the operator's writer carries it out, onto any cluster that
//! [`Takes`] one — [`Simulation`] here, over the views the pure decision reads, or
//! [`crate::cluster::Cluster`], over the Kubernetes objects the controller reads.

use std::collections::BTreeMap;

use regmirror_core::api::{RegistryMirror, RegistryMirrorStatus};
use regmirror_core::contract::NodeState;
use regmirror_core::decide::{decide, place, Advance, ClusterView, Decision, NodeView, Placement};
use regmirror_core::plan::MaxUnavailable;
use regmirror_core::render::RenderedConfig;
use regmirror_core::sources::{RefPolicy, Sources};

/// A cluster that takes the operator's writes.
pub trait Takes {
    /// A config Secret is created.
    fn store_config(&mut self, name: &str, config: &RenderedConfig);
    /// The agents' Role now grants these configs.
    fn grant(&mut self, names: &[String]);
    /// Nodes are told where to go (`desired-config`, `desired-activation`, `config-key`).
    fn tell(&mut self, told: &[&Advance]);
    fn set_status(&mut self, mirror: &str, status: &RegistryMirrorStatus);
    /// A config Secret is deleted.
    fn delete_config(&mut self, name: &str);
}

/// What `cluster` holds after the operator's writer carried `decision` out, every write
/// accepted: configs, the Role, the nodes, statuses, deletions — in that order.
pub fn take(cluster: &mut impl Takes, decision: &Decision) {
    for (name, config) in &decision.create {
        cluster.store_config(name, config);
    }
    if let Some(names) = &decision.agent_role {
        cluster.grant(names);
    }
    let told: Vec<&Advance> = decision.advance.iter().chain(&decision.rekey).collect();
    cluster.tell(&told);
    for (mirror, status) in &decision.statuses {
        cluster.set_status(mirror, status);
    }
    for name in &decision.delete {
        cluster.delete_config(name);
    }
}

/// The operator's namespace in simulations.
pub const NS: &str = "regmirror-system";
/// The time stamped on conditions in simulations.
pub const NOW: &str = "2026-11-23T00:00:00Z";

/// A cluster as the pure decision sees it, moved forward by the tests: the operator decides,
/// the "API server" takes the decision, the "agents" apply what they are told.
#[derive(Debug, Clone)]
pub struct Simulation {
    pub mirrors: Vec<RegistryMirror>,
    pub sources: Sources,
    pub nodes: Vec<NodeView>,
    pub stored: BTreeMap<String, RenderedConfig>,
    pub agent_role: Option<Vec<String>>,
    pub max_unavailable: MaxUnavailable,
}

impl Simulation {
    /// These nodes, no mirror, `maxUnavailable` 1.
    pub fn new(nodes: Vec<NodeView>, sources: Sources) -> Self {
        Simulation {
            mirrors: vec![],
            sources,
            nodes,
            stored: BTreeMap::new(),
            agent_role: None,
            max_unavailable: MaxUnavailable::Count(1),
        }
    }

    /// What the decision reads.
    pub fn view<'a>(&'a self, policy: &'a RefPolicy) -> ClusterView<'a> {
        ClusterView {
            mirrors: &self.mirrors,
            sources: &self.sources,
            policy,
            nodes: &self.nodes,
            stored: &self.stored,
            agent_role: self.agent_role.as_deref(),
            max_unavailable: self.max_unavailable,
            now: NOW,
        }
    }

    pub fn decide(&self) -> Decision {
        decide(&self.view(&RefPolicy::new(NS)))
    }

    /// Where the nodes go, as of now.
    pub fn place(&self) -> Placement {
        place(
            &self.mirrors,
            &self.sources,
            &RefPolicy::new(NS),
            &self.nodes,
        )
    }

    /// What the API server holds after the operator's writes.
    pub fn apply(&mut self, decision: &Decision) {
        take(self, decision);
    }

    /// Every agent that was told something new applies it successfully.
    pub fn agents_succeed(&mut self) {
        for node in &mut self.nodes {
            if node.desired.is_some() && node.desired != node.current {
                node.current = node.desired.clone();
                node.state = Some(NodeState::Applied);
            }
        }
    }

    /// Decides and applies until nothing is left to do, with every agent succeeding; returns
    /// the number of rounds.
    pub fn converge(&mut self) -> usize {
        for round in 0..100 {
            let d = self.decide();
            if d.writes() == 0 {
                return round;
            }
            self.apply(&d);
            self.agents_succeed();
        }
        panic!("no convergence in 100 rounds");
    }

    pub fn node_mut(&mut self, name: &str) -> &mut NodeView {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("a node of that name")
    }

    pub fn status(&self, mirror: &str) -> &RegistryMirrorStatus {
        let m = self
            .mirrors
            .iter()
            .find(|m| m.metadata.name.as_deref() == Some(mirror));
        m.expect("a mirror of that name")
            .status
            .as_ref()
            .expect("a status")
    }

    /// A condition of a mirror's status: (status, reason, message).
    pub fn condition(&self, mirror: &str, type_: &str) -> (String, String, String) {
        let c = self
            .status(mirror)
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("a condition of that type");
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }
}

impl Takes for Simulation {
    fn store_config(&mut self, name: &str, config: &RenderedConfig) {
        self.stored.insert(name.to_owned(), config.clone());
    }

    fn grant(&mut self, names: &[String]) {
        self.agent_role = Some(names.to_vec());
    }

    fn tell(&mut self, told: &[&Advance]) {
        let by_name: BTreeMap<&str, &Advance> =
            told.iter().map(|a| (a.node.as_str(), *a)).collect();
        for node in &mut self.nodes {
            if let Some(a) = by_name.get(node.name.as_str()) {
                node.desired = Some(a.config.clone());
                node.desired_activation = Some(a.activation);
                node.key_recipient = Some(a.public_key.clone());
            }
        }
    }

    fn set_status(&mut self, mirror: &str, status: &RegistryMirrorStatus) {
        set_status(&mut self.mirrors, mirror, status);
    }

    fn delete_config(&mut self, name: &str) {
        self.stored.remove(name);
    }
}

/// Sets the status of the mirror named `mirror` among `mirrors` (the status subresource).
pub fn set_status(mirrors: &mut [RegistryMirror], mirror: &str, status: &RegistryMirrorStatus) {
    if let Some(m) = mirrors
        .iter_mut()
        .find(|m| m.metadata.name.as_deref() == Some(mirror))
    {
        m.status = Some(status.clone());
    }
}
