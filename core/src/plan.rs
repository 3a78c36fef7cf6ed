//! Rollout planning: which nodes may move to their new configuration now.
//!
//! Pure. Changes a node picks up live are never held back. Changes that restart the runtime
//! are limited to `maxUnavailable` nodes at once (counting nodes that are not Ready), and to
//! one control-plane node at a time — none while another control-plane node is not Ready —
//! because restarting two k3s servers with embedded etcd at once can lose quorum. A config
//! that failed on a node is not spread further.

use std::collections::BTreeSet;

use thiserror::Error;

use crate::activation::Activation;
use crate::contract::NodeState;

/// One node, as the planner sees it (borrowed from the decision's view: a pass over thousands
/// of nodes copies none of their names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeRollout<'a> {
    pub name: &'a str,
    pub control_plane: bool,
    pub ready: bool,
    /// The config the operator last told the node to apply (`desired-config`).
    pub desired: Option<&'a str>,
    /// The config the node reports running (`current-config`).
    pub current: Option<&'a str>,
    pub state: Option<NodeState>,
    /// The config the node should end up with.
    pub target: &'a str,
    /// What moving from `current` to `target` takes.
    pub activation: Activation,
    /// The step the node was told for the move it is making now (`desired-activation`), if
    /// it was told one: what an in-flight node costs is what it was told, not what its next
    /// move would take.
    pub told: Option<Activation>,
    /// A mirror this node's target includes is paused.
    pub paused: bool,
}

impl NodeRollout<'_> {
    /// Told to move and not done yet.
    fn in_flight(&self) -> bool {
        self.desired.is_some()
            && self.desired != self.current
            && self.state != Some(NodeState::Failed)
    }
}

/// `maxUnavailable`: a count, or a percentage of the targeted nodes (rounded down, at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxUnavailable {
    Count(usize),
    Percent(u8),
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("maxUnavailable {0:?} is neither a whole number nor a percentage from 1% to 100%")]
pub struct BadMaxUnavailable(pub String);

impl std::str::FromStr for MaxUnavailable {
    type Err = BadMaxUnavailable;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadMaxUnavailable(s.to_owned());
        match s.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => Ok(MaxUnavailable::Percent(p)),
                _ => Err(bad()),
            },
            None => s
                .parse::<usize>()
                .map(MaxUnavailable::Count)
                .map_err(|_| bad()),
        }
    }
}

impl MaxUnavailable {
    /// The number of nodes it allows out of `total`.
    pub fn of(self, total: usize) -> usize {
        match self {
            MaxUnavailable::Count(n) => n.max(1),
            MaxUnavailable::Percent(p) => (total * p as usize / 100).max(1),
        }
    }
}

/// What to do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan<'a> {
    /// Nodes whose `desired-config` is to be set to their target, in name order.
    pub advance: Vec<&'a str>,
    /// Target configs held back because a node failed on them.
    pub halted: BTreeSet<&'a str>,
    /// Nodes waiting for restart budget.
    pub waiting: Vec<&'a str>,
}

/// Decides which nodes advance now.
pub fn plan<'a>(nodes: &[NodeRollout<'a>], max_unavailable: MaxUnavailable) -> Plan<'a> {
    // Callers with many nodes pass them in name order already; sorting is then one pass.
    let mut sorted: Vec<&NodeRollout> = nodes.iter().collect();
    if !sorted.is_sorted_by(|a, b| a.name <= b.name) {
        sorted.sort_by(|a, b| a.name.cmp(b.name));
    }

    let halted: BTreeSet<&'a str> = sorted
        .iter()
        .filter(|n| n.state == Some(NodeState::Failed))
        .filter_map(|n| n.desired)
        .collect();
    let restarting =
        |n: &&NodeRollout| n.in_flight() && n.told.unwrap_or(n.activation) == Activation::Restart;
    let mut unavailable = sorted.iter().filter(|n| !n.ready || restarting(n)).count();
    let budget = max_unavailable.of(sorted.len());
    let busy_control_plane: Vec<&str> = sorted
        .iter()
        .filter(|n| n.control_plane && (!n.ready || restarting(n)))
        .map(|n| n.name)
        .collect();
    let mut control_plane_advanced = false;

    let mut plan = Plan {
        halted: halted.clone(),
        ..Plan::default()
    };
    for node in sorted {
        let settled = node.desired == Some(node.target);
        if settled
            || node.paused
            || halted.contains(&node.target)
            || node.state == Some(NodeState::Unsupported)
        {
            continue;
        }
        // A node mid-way through a restart or reload it was told waits until it reports: told
        // anything else now, it would drop out of the count while its runtime restarts.
        if node.in_flight() && node.told.unwrap_or(node.activation) != Activation::Hot {
            plan.waiting.push(node.name);
            continue;
        }
        if node.activation != Activation::Restart {
            plan.advance.push(node.name);
            continue;
        }
        // A node that is already down costs no extra budget to restart.
        let cost = usize::from(node.ready);
        let other_control_plane_busy =
            control_plane_advanced || busy_control_plane.iter().any(|n| *n != node.name);
        if unavailable + cost > budget || (node.control_plane && other_control_plane_busy) {
            plan.waiting.push(node.name);
            continue;
        }
        unavailable += cost;
        control_plane_advanced |= node.control_plane;
        plan.advance.push(node.name);
    }
    plan
}
