//! The operator's whole decision, pure: from every RegistryMirror, the Secrets and ConfigMaps
//! they reference, every Node as the operator sees it and the configs already stored, what to
//! write now. It reads as [`decide`] tells it: [`place`] every node (resolve the mirrors,
//! select them per node, render once per group — `placement`), then [`conclude`]: advance the
//! nodes the restart budget lets go and reseal keys for nodes with new ones (`rollout`), keep
//! only live configs, and write each mirror's status (`status`).
//!
//! Nodes are grouped by what they get (their flavor and the mirrors assembled for them), so a
//! config is rendered once per group, not once per node, and stored once under a name derived
//! from its content. A node whose mirrors include one that is invalid, cannot be rendered for
//! its flavor, or is paused is *held*: it keeps the config it was told to have, so bad input
//! never reaches a node and a paused rollout stays where it is.
//!
//! Everything the decision writes differs from what is there already: given its own output
//! applied, it decides nothing. That is what makes a reconcile with nothing changed write
//! nothing.

mod placement;
mod rollout;
mod status;

use std::collections::{BTreeMap, HashMap};

use crate::activation::{activation, Activation};
use crate::api::{RegistryMirror, RegistryMirrorStatus};
use crate::contract::NodeState;
use crate::node::Flavor;
use crate::plan::MaxUnavailable;
use crate::render::RenderedConfig;
use crate::sources::{RefPolicy, Sources};

pub use placement::{is_paused, place, place_reusing, Placement};

/// The agents' Role must never have an empty `resourceNames`: RBAC reads that as "every
/// Secret". This name is never a config's, so it grants nothing.
pub const NO_CONFIG_PLACEHOLDER: &str = "regmirror-config-none";

/// The most a config Secret may hold, sealed: a Secret's data is limited to 1 MiB.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024 - 1024;

/// How many failures a status lists; the count says how many there are.
pub const MAX_LISTED_FAILURES: usize = 10;

/// What moving a node from the config it runs to a group's config takes: the same for every
/// node making that move, so worked out once per (running config, group) in a pass, for the
/// rollout and for the statuses alike.
#[derive(Default)]
struct Steps<'v>(HashMap<(Option<&'v str>, usize), Activation>);

impl<'v> Steps<'v> {
    fn of(
        &mut self,
        view: &ClusterView<'v>,
        node: &'v NodeView,
        g: usize,
        group: &placement::Group,
    ) -> Activation {
        *self
            .0
            .entry((node.current.as_deref(), g))
            .or_insert_with(|| {
                activation(
                    node.current.as_ref().and_then(|c| view.stored.get(c)),
                    &group.config,
                )
            })
    }
}

/// Everything the decision reads.
#[derive(Debug, Clone, Copy)]
pub struct ClusterView<'a> {
    pub mirrors: &'a [RegistryMirror],
    pub sources: &'a Sources,
    pub policy: &'a RefPolicy,
    pub nodes: &'a [NodeView],
    /// The config Secrets that exist, by name, decoded.
    pub stored: &'a BTreeMap<String, RenderedConfig>,
    /// The `resourceNames` of the agents' Role, if the Role exists.
    pub agent_role: Option<&'a [String]>,
    pub max_unavailable: MaxUnavailable,
    /// RFC 3339 time stamped on conditions that change now.
    pub now: &'a str,
}

/// One Node, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub control_plane: bool,
    pub ready: bool,
    /// What the agent detected; `None` until an agent has reported.
    pub flavor: Option<Flavor>,
    pub desired: Option<String>,
    pub current: Option<String>,
    pub state: Option<NodeState>,
    /// The agent's explanation of its state.
    pub message: Option<String>,
    /// The node's public key (`regmirror.io/public-key`), which configs are sealed to; `None`
    /// until an agent has reported.
    pub public_key: Option<String>,
    /// The public key the node's `regmirror.io/config-key` was sealed to.
    pub key_recipient: Option<String>,
    /// The step the operator budgeted for the node's move to `desired`.
    pub desired_activation: Option<Activation>,
}

/// A node to be (re)told where to go: the annotations `desired-config`,
/// `desired-activation` and `config-key` (sealed to `public_key`), written together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advance {
    pub node: String,
    pub config: String,
    pub activation: Activation,
    pub public_key: String,
}

/// What to write, in the order it must be written: configs before the nodes that name them,
/// deletions last.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// Config Secrets to create.
    pub create: BTreeMap<String, RenderedConfig>,
    /// Nodes to point at a new config, in name order.
    pub advance: Vec<Advance>,
    /// Nodes whose desired config stays, but whose sealed key must be made again: the node
    /// has a new key pair (its agent lost its state), so it cannot open the one it has.
    pub rekey: Vec<Advance>,
    /// Statuses that differ from the stored ones, by mirror name.
    pub statuses: BTreeMap<String, RegistryMirrorStatus>,
    /// New `resourceNames` for the agents' Role, when they change.
    pub agent_role: Option<Vec<String>>,
    /// Config Secrets no node has or is told to have.
    pub delete: Vec<String>,
    /// What happened, worth an Event.
    pub notices: Vec<Notice>,
    /// Nodes by reported state, for metrics.
    pub nodes_by_state: BTreeMap<&'static str, usize>,
}

impl Decision {
    /// The number of API writes this decision takes (Events excluded).
    pub fn writes(&self) -> usize {
        self.create.len()
            + self.advance.len()
            + self.rekey.len()
            + self.statuses.len()
            + usize::from(self.agent_role.is_some())
            + self.delete.len()
    }
}

/// Something worth a Kubernetes Event on a RegistryMirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub mirror: String,
    pub warning: bool,
    pub reason: &'static str,
    /// What the operator was doing: `Rollout` or `Reconcile`.
    pub action: &'static str,
    pub note: String,
}

/// Why a mirror reaches no node now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Problem {
    /// Its spec or what it references is wrong (resolve errors, or the flavor cannot express it).
    Invalid(String),
    /// Another mirror won on some node.
    Conflict(String),
    /// A configuration holding it is too large to store.
    TooLarge(String),
    /// Its cache has no address yet: its nodes wait for it (a step of the rollout, not a
    /// fault).
    CacheStarting(String),
    /// Not a problem: it won a conflict, which its status mentions (the loser is Degraded).
    Won(String),
}

/// Decides what to write: where each node should end up (its placement), how far the
/// rollout may take it now, and what each mirror's status says.
pub fn decide(view: &ClusterView) -> Decision {
    let placement = place(view.mirrors, view.sources, view.policy, view.nodes);
    conclude(&placement, view)
}

/// The rest of a decision, on a placement made from the same mirrors, sources and nodes (the
/// same nodes, in the same order, with the same labels, flavors and keys). What may differ
/// since is everything else the view holds — what agents report, readiness, the stored
/// configs, the Role — so a controller that sees only those change concludes again on the
/// placement it has, in a fraction of a whole decision.
pub fn conclude(placement: &Placement, view: &ClusterView) -> Decision {
    assert_eq!(
        placement.nodes(),
        view.nodes.len(),
        "a placement concludes only on the nodes it was made for"
    );
    let mut decision = Decision::default();
    rollout::advance_nodes(placement, view, &mut decision);
    rollout::reseal_for_new_keys(view, &mut decision);
    rollout::keep_only_live_configs(placement, view, &mut decision);
    status::write_statuses(placement, view, &mut decision);
    for node in view.nodes {
        let state = node.state.map_or("Unknown", NodeState::as_str);
        *decision.nodes_by_state.entry(state).or_default() += 1;
    }
    decision
}

fn mirror_name(mirror: &RegistryMirror) -> String {
    mirror.metadata.name.clone().unwrap_or_default()
}
