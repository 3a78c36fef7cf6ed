//! How far the rollout may take each node now: which nodes advance to their target (within
//! the restart budget), which need their key sealed again, which configs live on.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::placement::Group;
use super::{
    Advance, ClusterView, Decision, NodeView, Notice, Placement, Steps, NO_CONFIG_PLACEHOLDER,
};
use crate::activation::{activation, Activation};
use crate::contract::is_config_name;
use crate::plan::{plan, NodeRollout};

/// Points the nodes the planner lets go at their targets, creating the configs they need.
pub(super) fn advance_nodes(placement: &Placement, view: &ClusterView, decision: &mut Decision) {
    // What a move takes is the same for every node going from one config to the same group.
    let mut steps = Steps::default();
    // Every node is planned: one with nowhere to go now (no agent report yet, a config that
    // cannot be rendered or stored) still takes its share of the budget while it is down or
    // mid-restart; it is only never advanced.
    let rollouts: Vec<(NodeRollout, Option<(usize, usize)>)> = placement
        .order()
        .iter()
        .map(|&index| {
            let node = &view.nodes[index];
            let target = placement.target(index).filter(|&g| {
                // A node that never had anything of ours and gets nothing is left alone.
                !(placement.group(g).mirrors.is_empty() && node.desired.is_none())
                    && node.public_key.is_some()
            });
            let Some(g) = target else {
                let stays = NodeRollout {
                    name: &node.name,
                    control_plane: node.control_plane,
                    ready: node.ready,
                    desired: node.desired.as_deref(),
                    current: node.current.as_deref(),
                    state: node.state,
                    target: node.desired.as_deref().unwrap_or_default(),
                    activation: Activation::Hot,
                    told: node.desired_activation,
                    paused: true,
                };
                return (stays, None);
            };
            let group = placement.group(g);
            let step = steps.of(view, node, g, group);
            let rollout = NodeRollout {
                name: &node.name,
                control_plane: node.control_plane,
                ready: node.ready,
                desired: node.desired.as_deref(),
                current: node.current.as_deref(),
                state: node.state,
                target: &group.config_name,
                activation: step,
                told: node.desired_activation,
                paused: placement.held(index),
            };
            (rollout, Some((g, index)))
        })
        .collect();
    let (nodes, targets): (Vec<NodeRollout>, Vec<Option<(usize, usize)>>) =
        rollouts.into_iter().unzip();
    let plan = plan(&nodes, view.max_unavailable);

    let mut advancing = plan.advance.iter().peekable();
    let mut told = Vec::new();
    for (rollout, target) in nodes.iter().zip(&targets) {
        let Some((g, index)) = *target else {
            continue;
        };
        let group = placement.group(g);
        if advancing.peek() == Some(&&rollout.name) {
            advancing.next();
            if !view.stored.contains_key(&group.config_name) {
                decision
                    .create
                    .entry(group.config_name.clone())
                    .or_insert_with(|| group.config.clone());
            }
            decision.advance.push(Advance {
                node: rollout.name.to_owned(),
                config: group.config_name.clone(),
                activation: rollout.activation,
                public_key: view.nodes[index].public_key.clone().unwrap_or_default(),
            });
            told.push((g, index, rollout.activation));
        } else if rollout.desired == Some(group.config_name.as_str())
            && !view.stored.contains_key(&group.config_name)
        {
            // A config a node is already told to have must exist: recreate it if it went
            // missing (deleted by hand, or by a pass that saw the node's annotation late).
            decision
                .create
                .entry(group.config_name.clone())
                .or_insert_with(|| group.config.clone());
        }
    }
    decision
        .notices
        .extend(rollout_notices(&told, placement, view));
}

/// The most node names a rollout Event lists.
const NAMED_NODES: usize = 5;

/// One Event per mirror for the nodes this pass tells to apply a config that changes that
/// mirror — not one per node (a change to every node of a large cluster would double the API
/// requests of the rollout; `kubectl describe node` has the agent's own Event of the apply),
/// and not on the mirrors that only share the config (a restart rollout one node a pass would
/// record an Event on every mirror of the group each pass).
fn rollout_notices(
    told: &[(usize, usize, Activation)],
    placement: &Placement,
    view: &ClusterView,
) -> Vec<Notice> {
    let mut by_mirror: BTreeMap<usize, Vec<(&str, Activation)>> = BTreeMap::new();
    for &(g, index, step) in told {
        let node = &view.nodes[index];
        for m in changed_mirrors(view, node, placement.group(g)) {
            by_mirror.entry(m).or_default().push((&node.name, step));
        }
    }
    by_mirror
        .into_iter()
        .filter_map(|(m, nodes)| {
            let name = view.mirrors.get(m)?.metadata.name.clone()?;
            Some(Notice {
                mirror: name,
                warning: false,
                reason: "RolloutStep",
                action: "Rollout",
                note: rollout_note(&nodes),
            })
        })
        .collect()
}

/// The mirrors of `group` whose part of the config differs from the config `node` was told
/// (or runs) now: all of them when that config is not known.
fn changed_mirrors<'a>(
    view: &'a ClusterView,
    node: &NodeView,
    group: &'a Group,
) -> impl Iterator<Item = usize> + 'a {
    let before = node
        .desired
        .as_ref()
        .or(node.current.as_ref())
        .and_then(|c| view.stored.get(c));
    group.mirrors.iter().copied().filter(move |&m| {
        let name = view.mirrors[m].metadata.name.as_ref();
        match (before, name) {
            (Some(before), Some(name)) => before.parts.get(name) != group.config.parts.get(name),
            _ => true,
        }
    })
}

/// "told 3 nodes to apply a new configuration (2 with a runtime restart, 1 live): a, b, c".
fn rollout_note(nodes: &[(&str, Activation)]) -> String {
    let count = |step| nodes.iter().filter(|(_, s)| *s == step).count();
    let steps: Vec<String> = [
        (Activation::Restart, "with a runtime restart"),
        (Activation::Reload, "with a runtime reload"),
        (Activation::Hot, "live"),
    ]
    .into_iter()
    .filter_map(|(step, how)| {
        Some(count(step))
            .filter(|&n| n > 0)
            .map(|n| format!("{n} {how}"))
    })
    .collect();
    let mut named: Vec<&str> = nodes.iter().take(NAMED_NODES).map(|(n, _)| *n).collect();
    if nodes.len() > NAMED_NODES {
        named.push("…");
    }
    format!(
        "told {} node{} to apply a new configuration ({}): {}",
        nodes.len(),
        if nodes.len() == 1 { "" } else { "s" },
        steps.join(", "),
        named.join(", ")
    )
}

/// Nodes whose config key was sealed to a key they no longer hold get it sealed again, for
/// the config they are told to have. The step goes with it again: none, if the node already
/// runs that config (its agent only lost its local state); else the one it was told.
pub(super) fn reseal_for_new_keys(view: &ClusterView, decision: &mut Decision) {
    let advanced: HashSet<&str> = decision.advance.iter().map(|a| a.node.as_str()).collect();
    for node in view.nodes {
        let (Some(desired), Some(public_key)) = (&node.desired, &node.public_key) else {
            continue;
        };
        if node.key_recipient.as_ref() == Some(public_key)
            || advanced.contains(node.name.as_str())
            || !is_config_name(desired)
        {
            continue;
        }
        let step = if node.current.as_ref() == Some(desired) {
            Activation::Hot
        } else {
            node.desired_activation.unwrap_or_else(|| {
                view.stored.get(desired).map_or(Activation::Hot, |to| {
                    activation(node.current.as_ref().and_then(|c| view.stored.get(c)), to)
                })
            })
        };
        decision.rekey.push(Advance {
            node: node.name.clone(),
            config: desired.clone(),
            activation: step,
            public_key: public_key.clone(),
        });
    }
}

/// Configs some node has, is told to have, or is headed for stay; the rest go. The agents may
/// read exactly the ones nodes have or are told to have — named whether or not the cache has
/// caught up with the Secret yet, so an agent is never pointed at a config it cannot read.
///
/// Only configs the operator made are ever granted: a name an agent reports as its current
/// config counts only if it is a config this decision knows (stored and verified, created
/// now, or some node's target). An agent that reports another Secret's name gains nothing.
pub(super) fn keep_only_live_configs(
    placement: &Placement,
    view: &ClusterView,
    decision: &mut Decision,
) {
    let advanced: HashMap<&str, &str> = decision
        .advance
        .iter()
        .map(|a| (a.node.as_str(), a.config.as_str()))
        .collect();
    let headed_for: BTreeSet<&str> = placement
        .configs()
        .map(|g| g.config_name.as_str())
        .collect();
    let ours = |c: &&str| {
        is_config_name(c)
            && (view.stored.contains_key(*c)
                || decision.create.contains_key(*c)
                || headed_for.contains(c))
    };
    // A node's desired config stays live even when it is told another now: if that write
    // does not go through, the node still reads the one it has. Desired configs are the
    // operator's own writes (the admission policy keeps agents off them), so their form is
    // enough; what an agent reports as current must be a config this decision knows.
    let mut live: BTreeSet<&str> = BTreeSet::new();
    for node in view.nodes {
        let told = advanced.get(node.name.as_str()).copied();
        live.extend(told.into_iter().chain(node.current.as_deref()).filter(ours));
        live.extend(node.desired.as_deref().filter(|c| is_config_name(c)));
    }
    let delete: Vec<String> = view
        .stored
        .keys()
        .filter(|c| !live.contains(c.as_str()) && !headed_for.contains(c.as_str()))
        .cloned()
        .collect();
    let mut names: Vec<String> = live.into_iter().map(str::to_owned).collect();
    if names.is_empty() {
        names.push(NO_CONFIG_PLACEHOLDER.to_owned());
    }
    if view.agent_role != Some(names.as_slice()) {
        decision.agent_role = Some(names);
    }
    decision.delete = delete;
}
