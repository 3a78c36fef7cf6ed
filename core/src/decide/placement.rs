//! Where each node should end up: the first half of a decision, from what changes rarely —
//! the RegistryMirrors, the Secrets and ConfigMaps they reference, and the nodes' labels,
//! flavors and keys.
//!
//! Nodes are grouped by what they get (their flavor and the mirrors that select them), so a
//! config is rendered once per group, not once per node. Selection is worked out once per
//! distinct combination of the labels selectors read, not once per node: in a cluster of
//! node pools that is a handful of combinations for thousands of nodes.

use std::collections::{BTreeMap, HashMap};

use super::{mirror_name, NodeView, Problem, MAX_CONFIG_BYTES};
use crate::api::RegistryMirror;
use crate::assemble::{assemble, Conflict};
use crate::contract::{config_secret_name, PAUSED};
use crate::model::ResolvedMirror;
use crate::node::{Flavor, NodeInfo};
use crate::problem::Reason;
use crate::render::{render, RenderedConfig};
use crate::resolve::resolve;
use crate::sources::{RefPolicy, Sources};

/// Where every node should end up, and what keeps mirrors from getting there.
#[derive(Debug, Clone)]
pub struct Placement {
    problems: BTreeMap<String, Problem>,
    /// Per mirror (in the view's order): paused.
    paused: Vec<bool>,
    /// The distinct sets of mirrors (indices) that select a node.
    selections: Vec<Vec<usize>>,
    /// Per node: its selection.
    selection_of: Vec<usize>,
    groups: Vec<Group>,
    /// Per node: the group whose config it should have; `None` when it has nowhere to go
    /// (no agent report yet, or its config cannot be rendered or stored).
    target_of: Vec<Option<usize>>,
    /// Per node: a mirror selecting it is invalid or paused, so it stays where it is.
    held: Vec<bool>,
    /// Node indices in name order.
    order: Vec<usize>,
}

/// Nodes that get the same config.
#[derive(Debug, Clone)]
pub(crate) struct Group {
    /// What it was rendered from: the flavor and the mirrors assembled for it.
    flavor: Flavor,
    assembled: Vec<ResolvedMirror>,
    pub config_name: String,
    pub config: RenderedConfig,
    /// The mirrors in it (indices into the view's mirrors), ascending.
    pub mirrors: Vec<usize>,
}

impl Placement {
    /// How many nodes it places.
    pub fn nodes(&self) -> usize {
        self.selection_of.len()
    }

    pub(crate) fn order(&self) -> &[usize] {
        &self.order
    }

    pub(crate) fn target(&self, node: usize) -> Option<usize> {
        self.target_of[node]
    }

    pub(crate) fn group(&self, group: usize) -> &Group {
        &self.groups[group]
    }

    pub(crate) fn held(&self, node: usize) -> bool {
        self.held[node]
    }

    /// The mirrors that select `node`.
    pub(crate) fn selecting(&self, node: usize) -> &[usize] {
        &self.selections[self.selection_of[node]]
    }

    pub(crate) fn problem(&self, mirror: &str) -> Option<&Problem> {
        self.problems.get(mirror)
    }

    pub(crate) fn paused(&self, mirror: usize) -> bool {
        self.paused[mirror]
    }

    /// Every config some node is headed for.
    pub(crate) fn configs(&self) -> impl Iterator<Item = &Group> {
        self.target_of.iter().flatten().map(|g| &self.groups[*g])
    }
}

/// Places every node: resolve the mirrors, select them per node, render once per group.
pub fn place(
    mirrors: &[RegistryMirror],
    sources: &Sources,
    policy: &RefPolicy,
    nodes: &[NodeView],
) -> Placement {
    place_reusing(mirrors, sources, policy, nodes, None)
}

/// [`place`], taking from a `previous` placement the configs it rendered from the same
/// flavor and mirrors (rendering is pure, so they are what rendering again would give).
pub fn place_reusing(
    mirrors: &[RegistryMirror],
    sources: &Sources,
    policy: &RefPolicy,
    nodes: &[NodeView],
    previous: Option<&Placement>,
) -> Placement {
    let mut problems = BTreeMap::new();
    let resolved = resolve_all(mirrors, sources, policy, &mut problems);
    let paused: Vec<bool> = mirrors.iter().map(is_paused).collect();
    let (selections, selection_of) = select_all(mirrors, nodes);

    // A node that a paused or invalid mirror selects keeps what it has.
    let stuck: Vec<bool> = mirrors
        .iter()
        .enumerate()
        .map(|(m, mirror)| paused[m] || problems.contains_key(&mirror_name(mirror)))
        .collect();
    let held = selection_of
        .iter()
        .map(|s| selections[*s].iter().any(|m| stuck[*m]))
        .collect();

    let mut grouping = Grouping {
        previous: previous.map_or(&[], |p| &p.groups),
        mirrors,
        resolved: &resolved,
        problems: &mut problems,
        groups: Vec::new(),
        by_key: HashMap::new(),
        parts: HashMap::new(),
        conflicts: BTreeMap::new(),
    };
    let target_of = nodes
        .iter()
        .zip(&selection_of)
        .map(|(node, selection)| grouping.group_of(node, *selection))
        .collect();
    let Grouping {
        groups, conflicts, ..
    } = grouping;
    record_conflicts(conflicts, &mut problems);

    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by(|a, b| nodes[*a].name.cmp(&nodes[*b].name));
    Placement {
        problems,
        paused,
        selections,
        selection_of,
        groups,
        target_of,
        held,
        order,
    }
}

/// Resolves every mirror; the ones that do not resolve are problems, by name.
fn resolve_all(
    mirrors: &[RegistryMirror],
    sources: &Sources,
    policy: &RefPolicy,
    problems: &mut BTreeMap<String, Problem>,
) -> Vec<ResolvedMirror> {
    let mut resolved = Vec::new();
    for mirror in mirrors {
        match resolve(mirror, sources, policy) {
            Ok(r) => resolved.push(r),
            Err(errors) => {
                let text = errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                let starting = errors
                    .iter()
                    .all(|e| matches!(e.reason, Reason::CacheNotReady { .. }));
                let problem = if starting {
                    Problem::CacheStarting(text)
                } else {
                    Problem::Invalid(text)
                };
                problems.insert(mirror_name(mirror), problem);
            }
        }
    }
    resolved
}

/// Whether a mirror's rollout is paused (its `regmirror.io/paused` annotation).
pub fn is_paused(mirror: &RegistryMirror) -> bool {
    mirror
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PAUSED))
        .map(String::as_str)
        == Some("true")
}

/// Which mirrors select each node. Nodes that agree on every label some selector reads are
/// selected alike, so the selectors run once per such combination.
fn select_all(mirrors: &[RegistryMirror], nodes: &[NodeView]) -> (Vec<Vec<usize>>, Vec<usize>) {
    let mut keys: Vec<&str> = mirrors
        .iter()
        .filter_map(|m| m.spec.node_selector.as_ref())
        .flat_map(|s| {
            let labels = s.match_labels.iter().flatten().map(|(k, _)| k.as_str());
            let expressions = s.match_expressions.iter().flatten().map(|e| e.key.as_str());
            labels.chain(expressions)
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut selections: Vec<Vec<usize>> = Vec::new();
    let mut known: HashMap<Vec<Option<&str>>, usize> = HashMap::new();
    let selection_of = nodes
        .iter()
        .map(|node| {
            let seen: Vec<Option<&str>> = keys
                .iter()
                .map(|k| node.labels.get(*k).map(String::as_str))
                .collect();
            *known.entry(seen).or_insert_with(|| {
                selections.push(
                    mirrors
                        .iter()
                        .enumerate()
                        .filter(|(_, m)| {
                            crate::select::matches(m.spec.node_selector.as_ref(), &node.labels)
                        })
                        .map(|(i, _)| i)
                        .collect(),
                );
                selections.len() - 1
            })
        })
        .collect();
    (selections, selection_of)
}

/// Groups nodes by (flavor, selection) and renders each group's config once.
struct Grouping<'a> {
    /// Groups rendered by an earlier placement.
    previous: &'a [Group],
    mirrors: &'a [RegistryMirror],
    resolved: &'a [ResolvedMirror],
    problems: &'a mut BTreeMap<String, Problem>,
    groups: Vec<Group>,
    /// `None`: the group's config cannot be rendered or stored.
    by_key: HashMap<(&'a Flavor, usize), Option<usize>>,
    /// Each mirror rendered alone, per flavor: its part's digest.
    parts: HashMap<(&'a Flavor, String), String>,
    conflicts: BTreeMap<String, Conflict>,
}

impl<'a> Grouping<'a> {
    /// The group of `node`, if it has somewhere to go. An agent reports its flavor and public
    /// key together; without both there is nothing to render for, nor anyone to seal to.
    fn group_of(&mut self, node: &'a NodeView, selection: usize) -> Option<usize> {
        let (Some(flavor), Some(_)) = (&node.flavor, &node.public_key) else {
            return None;
        };
        if let Some(group) = self.by_key.get(&(flavor, selection)) {
            return *group;
        }
        let group = self.render_group(node, flavor);
        self.by_key.insert((flavor, selection), group);
        group
    }

    fn render_group(&mut self, node: &NodeView, flavor: &'a Flavor) -> Option<usize> {
        let info = NodeInfo {
            name: node.name.clone(),
            labels: node.labels.clone(),
            flavor: flavor.clone(),
        };
        let assembly = assemble(self.resolved, &info);
        for conflict in assembly.conflicts {
            self.conflicts
                .entry(conflict.mirror.clone())
                .or_insert(conflict);
        }
        let mut mirrors: Vec<usize> = assembly
            .mirrors
            .iter()
            .filter_map(|r| {
                self.mirrors
                    .iter()
                    .position(|m| m.metadata.name.as_deref() == Some(r.name.as_str()))
            })
            .collect();
        mirrors.sort_unstable();
        let rendered_before = self.previous.iter().find(|g| {
            g.flavor == *flavor
                && g.assembled.len() == assembly.mirrors.len()
                && g.assembled
                    .iter()
                    .zip(&assembly.mirrors)
                    .all(|(a, b)| a == *b)
        });
        if let Some(before) = rendered_before {
            self.groups.push(Group {
                mirrors,
                ..before.clone()
            });
            return Some(self.groups.len() - 1);
        }
        let mut config = match render(&assembly.mirrors, flavor) {
            Ok(config) => config,
            Err(e) => {
                self.problems
                    .entry(e.mirror.clone())
                    .or_insert(Problem::Invalid(e.to_string()));
                return None;
            }
        };
        // Each mirror's own rendering, so that status can tell which mirrors a node runs the
        // latest of when several share a config.
        for mirror in &assembly.mirrors {
            let part = self
                .parts
                .entry((flavor, mirror.name.clone()))
                .or_insert_with(|| {
                    render(&[*mirror], flavor).map_or_else(|_| String::new(), |c| c.digest())
                });
            config.parts.insert(mirror.name.clone(), part.clone());
        }
        let size = config.sealed_size();
        if size > MAX_CONFIG_BYTES {
            // The mirror that weighs most is the one to fix; the others are fine where they
            // go alone.
            let heaviest = assembly
                .mirrors
                .iter()
                .max_by_key(|m| render(&[**m], flavor).map_or(0, |c| c.sealed_size()))
                .map(|m| m.name.clone())
                .unwrap_or_default();
            self.problems.entry(heaviest).or_insert_with(|| {
                Problem::TooLarge(format!(
                    "the configuration of the {flavor} nodes that get it is {size} bytes, more than the {MAX_CONFIG_BYTES} a Secret holds (a large CA bundle?); those nodes keep their current configuration"
                ))
            });
            return None;
        }
        self.groups.push(Group {
            flavor: flavor.clone(),
            assembled: assembly.mirrors.iter().map(|m| (*m).clone()).collect(),
            config_name: config_secret_name(&config),
            config,
            mirrors,
        });
        Some(self.groups.len() - 1)
    }
}

/// A conflict's loser is Degraded naming the winner; the winner's status mentions it.
fn record_conflicts(
    conflicts: BTreeMap<String, Conflict>,
    problems: &mut BTreeMap<String, Problem>,
) {
    for (mirror, conflict) in &conflicts {
        problems
            .entry(mirror.clone())
            .or_insert(Problem::Conflict(conflict.to_string()));
    }
    for conflict in conflicts.into_values() {
        problems
            .entry(conflict.winner.clone())
            .or_insert(Problem::Won(format!("conflict: {conflict}")));
    }
}
