//! The operator's whole decision, pure: from every RegistryMirror, the Secrets and ConfigMaps
//! they reference, every Node as the operator sees it and the configs already stored, what to
//! write now.
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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::api::{Condition, NodeCounts, NodeFailure, RegistryMirror, RegistryMirrorStatus};
use crate::assemble::{assemble, Conflict};
use crate::contract::{config_secret_name, is_config_name, NodeState, PAUSED};
use crate::model::ResolvedMirror;
use crate::node::{Flavor, NodeInfo};
use crate::plan::{plan, MaxUnavailable, NodeRollout};
use crate::activation::{activation, Activation};
use crate::render::{render, RenderedConfig};
use crate::resolve::resolve;
use crate::select;
use crate::sources::{RefPolicy, Sources};

/// The agents' Role must never have an empty `resourceNames`: RBAC reads that as "every
/// Secret". This name is never a config's, so it grants nothing.
pub const NO_CONFIG_PLACEHOLDER: &str = "regmirror-config-none";

/// The most a config Secret may hold, sealed: a Secret's data is limited to 1 MiB.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024 - 1024;

/// How many failures a status lists; the count says how many there are.
pub const MAX_LISTED_FAILURES: usize = 10;

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

/// Something worth a Kubernetes Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub subject: Subject,
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// What an Event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Mirror(String),
    Node(String),
}

/// Why a mirror reaches no node now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Problem {
    /// Its spec or what it references is wrong (resolve errors, or the flavor cannot express it).
    Invalid(String),
    /// Another mirror won on some node.
    Conflict(String),
    /// A configuration holding it is too large to store.
    TooLarge(String),
    /// Not a problem: it won a conflict, which its status mentions (the loser is Degraded).
    Won(String),
}

/// Decides what to write.
pub fn decide(view: &ClusterView) -> Decision {
    let mut problems: BTreeMap<String, Problem> = BTreeMap::new();
    let mut resolved: Vec<ResolvedMirror> = Vec::new();
    for mirror in view.mirrors {
        match resolve(mirror, view.sources, view.policy) {
            Ok(r) => resolved.push(r),
            Err(errors) => {
                let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
                problems.insert(mirror_name(mirror), Problem::Invalid(text.join("; ")));
            }
        }
    }
    let paused: BTreeSet<String> = view
        .mirrors
        .iter()
        .filter(|m| {
            m.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(PAUSED))
                .map(String::as_str)
                == Some("true")
        })
        .map(mirror_name)
        .collect();

    // Which nodes each mirror selects, matched once for the holds and the statuses.
    let selected: Vec<Vec<usize>> = view
        .mirrors
        .iter()
        .map(|m| {
            let selector = m.spec.node_selector.as_ref();
            (0..view.nodes.len())
                .filter(|i| select::matches(selector, &view.nodes[*i].labels))
                .collect()
        })
        .collect();
    // Nodes that a paused or invalid mirror selects keep what they have.
    let held: HashSet<usize> = view
        .mirrors
        .iter()
        .zip(&selected)
        .filter(|(m, _)| {
            let name = mirror_name(m);
            paused.contains(&name) || problems.contains_key(&name)
        })
        .flat_map(|(_, nodes)| nodes.iter().copied())
        .collect();
    let targets = target_nodes(view, &resolved, &held, &mut problems);
    let rollouts: Vec<NodeRollout> = targets
        .iter()
        .map(|t| {
            let node = &view.nodes[t.node];
            NodeRollout {
                name: node.name.clone(),
                control_plane: node.control_plane,
                ready: node.ready,
                desired: node.desired.clone(),
                current: node.current.clone(),
                state: node.state,
                target: t.config_name.clone(),
                activation: activation(
                    node.current.as_ref().and_then(|c| view.stored.get(c)),
                    &t.config,
                ),
                told: node.desired_activation,
                paused: t.held,
            }
        })
        .collect();
    let plan = plan(&rollouts, view.max_unavailable);

    let mut decision = Decision::default();
    let by_name: HashMap<&str, &NodeTarget> = targets
        .iter()
        .map(|t| (view.nodes[t.node].name.as_str(), t))
        .collect();
    let step_of: HashMap<&str, Activation> = rollouts
        .iter()
        .map(|r| (r.name.as_str(), r.activation))
        .collect();
    for name in &plan.advance {
        let target = by_name[name.as_str()];
        if !view.stored.contains_key(&target.config_name) {
            decision
                .create
                .entry(target.config_name.clone())
                .or_insert_with(|| target.config.clone());
        }
        decision.advance.push(Advance {
            node: name.clone(),
            config: target.config_name.clone(),
            activation: step_of[name.as_str()],
            public_key: view.nodes[target.node]
                .public_key
                .clone()
                .expect("only nodes with a public key have targets"),
        });
        decision.notices.push(Notice {
            subject: Subject::Node(name.clone()),
            warning: false,
            reason: "ConfigScheduled",
            note: format!("told to apply {}", target.config_name),
        });
    }

    // A config a node is already told to have must exist: recreate it if it went missing
    // (deleted by hand, or by a pass that saw the node's annotation late).
    for target in &targets {
        let node = &view.nodes[target.node];
        if node.desired.as_ref() == Some(&target.config_name)
            && !view.stored.contains_key(&target.config_name)
        {
            decision
                .create
                .entry(target.config_name.clone())
                .or_insert_with(|| target.config.clone());
        }
    }

    rekey_nodes(view, &mut decision);
    keep_only_live_configs(view, &targets, &mut decision);
    write_statuses(view, &selected, &targets, &problems, &paused, &mut decision);
    for node in view.nodes {
        let state = node.state.map_or("Unknown", NodeState::as_str);
        *decision.nodes_by_state.entry(state).or_default() += 1;
    }
    decision
}

/// Nodes whose config key was sealed to a key they no longer hold get it sealed again, for
/// the config they are told to have. The step goes with it again: none, if the node already
/// runs that config (its agent only lost its local state); else the one it was told.
fn rekey_nodes(view: &ClusterView, decision: &mut Decision) {
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

/// A node that has somewhere to go.
struct NodeTarget {
    /// Index into `view.nodes`.
    node: usize,
    /// The mirrors it gets, by name.
    mirrors: BTreeSet<String>,
    config_name: String,
    config: RenderedConfig,
    /// It must stay where it is (a mirror of its is invalid or paused).
    held: bool,
}

/// Works out every node's target config, rendering once per group of equal nodes. Records
/// conflicts and render failures in `problems`; a node of a flavor a mirror cannot be
/// rendered for gets no target, so it keeps what it has.
fn target_nodes(
    view: &ClusterView,
    resolved: &[ResolvedMirror],
    held: &HashSet<usize>,
    problems: &mut BTreeMap<String, Problem>,
) -> Vec<NodeTarget> {
    type Group = (String, Vec<String>);
    let mut rendered: HashMap<Group, Option<(String, RenderedConfig)>> = HashMap::new();
    let mut parts: HashMap<(String, String), String> = HashMap::new();
    let mut conflicts: BTreeMap<String, Conflict> = BTreeMap::new();
    let mut targets = Vec::new();
    for (index, node) in view.nodes.iter().enumerate() {
        // An agent reports its flavor and public key together; without both there is
        // nothing to render for, nor anyone to seal to.
        let (Some(flavor), Some(_)) = (&node.flavor, &node.public_key) else {
            continue;
        };
        let info = NodeInfo {
            name: node.name.clone(),
            labels: node.labels.clone(),
            flavor: flavor.clone(),
        };
        let assembly = assemble(resolved, &info);
        for conflict in assembly.conflicts {
            conflicts.entry(conflict.mirror.clone()).or_insert(conflict);
        }
        let names: Vec<String> = assembly.mirrors.iter().map(|m| m.name.clone()).collect();
        // A node that never had anything of ours and gets nothing is left alone.
        if names.is_empty() && node.desired.is_none() {
            continue;
        }
        let group = rendered
            .entry((flavor.to_string(), names.clone()))
            .or_insert_with(|| match render(&assembly.mirrors, flavor) {
                Ok(mut config) => {
                    for mirror in &assembly.mirrors {
                        let part = parts
                            .entry((flavor.to_string(), mirror.name.clone()))
                            .or_insert_with(|| {
                                render(&[*mirror], flavor)
                                    .map_or_else(|_| String::new(), |c| c.digest())
                            });
                        config.parts.insert(mirror.name.clone(), part.clone());
                    }
                    let size = config.sealed_size();
                    if size > MAX_CONFIG_BYTES {
                        // The mirror that weighs most is the one to fix; the others are fine
                        // where they go alone.
                        let heaviest = assembly
                            .mirrors
                            .iter()
                            .max_by_key(|m| render(&[**m], flavor).map_or(0, |c| c.sealed_size()))
                            .map(|m| m.name.clone())
                            .unwrap_or_default();
                        problems.entry(heaviest).or_insert_with(|| {
                            Problem::TooLarge(format!(
                                "the configuration of the {flavor} nodes that get it is {size} bytes, more than the {MAX_CONFIG_BYTES} a Secret holds (a large CA bundle?); those nodes keep their current configuration"
                            ))
                        });
                        return None;
                    }
                    Some((config_secret_name(&config), config))
                }
                Err(e) => {
                    problems
                        .entry(e.mirror.clone())
                        .or_insert(Problem::Invalid(e.to_string()));
                    None
                }
            });
        let Some((config_name, config)) = group.clone() else {
            continue;
        };
        targets.push(NodeTarget {
            node: index,
            mirrors: names.into_iter().collect(),
            config_name,
            config,
            held: held.contains(&index),
        });
    }
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
    targets
}

/// Configs some node has, is told to have, or is headed for stay; the rest go. The agents may
/// read exactly the ones nodes have or are told to have — named whether or not the cache has
/// caught up with the Secret yet, so an agent is never pointed at a config it cannot read.
///
/// Only configs the operator made are ever granted: a name an agent reports as its current
/// config counts only if it is a config this decision knows (stored and verified, created
/// now, or some node's target). An agent that reports another Secret's name gains nothing.
fn keep_only_live_configs(view: &ClusterView, targets: &[NodeTarget], decision: &mut Decision) {
    let advanced: HashMap<&str, &str> = decision
        .advance
        .iter()
        .map(|a| (a.node.as_str(), a.config.as_str()))
        .collect();
    let headed_for: BTreeSet<&String> = targets.iter().map(|t| &t.config_name).collect();
    let ours = |c: &String| {
        is_config_name(c)
            && (view.stored.contains_key(c)
                || decision.create.contains_key(c)
                || headed_for.contains(c))
    };
    let mut live: BTreeSet<String> = BTreeSet::new();
    for node in view.nodes {
        let desired = advanced
            .get(node.name.as_str())
            .map(|c| c.to_string())
            .or_else(|| node.desired.clone());
        live.extend(desired.into_iter().chain(node.current.clone()).filter(ours));
    }
    decision.delete = view
        .stored
        .keys()
        .filter(|c| !live.contains(*c) && !headed_for.contains(c))
        .cloned()
        .collect();
    let mut names: Vec<String> = live.into_iter().collect();
    if names.is_empty() {
        names.push(NO_CONFIG_PLACEHOLDER.to_owned());
    }
    if view.agent_role != Some(names.as_slice()) {
        decision.agent_role = Some(names);
    }
}

fn write_statuses(
    view: &ClusterView,
    selected: &[Vec<usize>],
    targets: &[NodeTarget],
    problems: &BTreeMap<String, Problem>,
    paused: &BTreeSet<String>,
    decision: &mut Decision,
) {
    let target_of: HashMap<usize, &NodeTarget> = targets.iter().map(|t| (t.node, t)).collect();
    for (mirror, selected) in view.mirrors.iter().zip(selected) {
        let name = mirror_name(mirror);
        let mut counts = NodeCounts::default();
        let mut failures = Vec::new();
        for &index in selected {
            let node = &view.nodes[index];
            counts.targeted += 1;
            let target = target_of.get(&index).filter(|t| t.mirrors.contains(&name));
            let failed = match node.state {
                Some(NodeState::Unsupported) => true,
                Some(NodeState::Failed) => {
                    target.is_some_and(|t| node.desired.as_ref() == Some(&t.config_name))
                }
                _ => false,
            };
            if failed {
                counts.failed += 1;
                failures.push(NodeFailure {
                    node: node.name.clone(),
                    reason: node
                        .message
                        .clone()
                        .unwrap_or_else(|| "the node agent reported no reason".into()),
                });
            } else if target.is_some_and(|t| {
                // Updated for this mirror: the node runs a config holding this mirror's
                // latest rendering, whatever else changed in the target since.
                let running = node.current.as_ref().and_then(|c| {
                    if *c == t.config_name {
                        Some(&t.config)
                    } else {
                        view.stored.get(c)
                    }
                });
                node.state == Some(NodeState::Applied)
                    && running.and_then(|c| c.parts.get(&name)) == t.config.parts.get(&name)
            }) {
                counts.updated += 1;
            } else {
                counts.pending += 1;
            }
        }
        failures.truncate(MAX_LISTED_FAILURES);
        let conditions = conditions(
            &counts,
            problems.get(&name),
            paused.contains(&name),
            failures.first(),
        );
        let previous = mirror.status.clone().unwrap_or_default();
        let generation = mirror.metadata.generation;
        let status = RegistryMirrorStatus {
            observed_generation: generation,
            conditions: conditions
                .into_iter()
                .map(|(type_, status, reason, message)| {
                    let before = previous.conditions.iter().find(|c| c.type_ == type_);
                    let time = match before {
                        Some(b) if b.status == status => b.last_transition_time.clone(),
                        _ => Some(view.now.to_owned()),
                    };
                    if type_ != "Progressing"
                        && before.is_none_or(|b| b.status != status || b.reason != reason)
                    {
                        if let Some(notice) =
                            condition_notice(&name, type_, status, reason, &message)
                        {
                            decision.notices.push(notice);
                        }
                    }
                    Condition {
                        type_: type_.to_owned(),
                        status: status.to_owned(),
                        reason: reason.to_owned(),
                        message,
                        last_transition_time: time,
                        observed_generation: generation,
                    }
                })
                .collect(),
            nodes: counts,
            failures,
        };
        if status != previous {
            decision.statuses.insert(name, status);
        }
    }
}

type ConditionRow = (&'static str, &'static str, &'static str, String);

/// Ready / Progressing / Degraded, in the shape kstatus expects: Ready=True only when done,
/// Progressing=True while nodes are still moving, Degraded=True when it cannot get there.
fn conditions(
    counts: &NodeCounts,
    problem: Option<&Problem>,
    paused: bool,
    first_failure: Option<&NodeFailure>,
) -> Vec<ConditionRow> {
    let mut progress = format!("{} of {} nodes updated", counts.updated, counts.targeted);
    if let Some(Problem::Won(note)) = problem {
        progress.push_str(&format!("; {note}"));
    }
    type Row = (&'static str, &'static str, String);
    let problem = problem.and_then(|p| match p {
        Problem::Invalid(m) => Some((
            "InvalidSpec",
            format!("{m}; nodes keep their current configuration"),
        )),
        Problem::Conflict(m) => Some(("Conflict", m.clone())),
        Problem::TooLarge(m) => Some(("ConfigTooLarge", m.clone())),
        Problem::Won(_) => None,
    });
    let (ready, progressing, degraded): (Row, Row, Row) = if let Some((reason, message)) = problem {
        (
            ("False", reason, message.clone()),
            ("False", reason, progress),
            ("True", reason, message),
        )
    } else if let Some(failure) = first_failure {
        let message = format!(
            "{} node(s) failed to apply; rollout halted. {}: {}",
            counts.failed, failure.node, failure.reason
        );
        (
            ("False", "NodesFailed", message.clone()),
            ("False", "NodesFailed", progress),
            ("True", "NodesFailed", message),
        )
    } else if counts.pending > 0 && paused {
        let message = format!("rollout paused ({PAUSED}); {progress}");
        (
            ("False", "Paused", message.clone()),
            ("False", "Paused", message),
            ("False", "Paused", String::new()),
        )
    } else if counts.pending > 0 {
        (
            ("False", "RollingOut", progress.clone()),
            ("True", "RollingOut", progress),
            ("False", "RollingOut", String::new()),
        )
    } else {
        (
            ("True", "Applied", progress.clone()),
            ("False", "Applied", progress),
            ("False", "Applied", String::new()),
        )
    };
    vec![
        ("Ready", ready.0, ready.1, ready.2),
        ("Progressing", progressing.0, progressing.1, progressing.2),
        ("Degraded", degraded.0, degraded.1, degraded.2),
    ]
}

/// An Event for a mirror's condition that changed: becoming Degraded, or becoming Ready.
fn condition_notice(
    mirror: &str,
    type_: &str,
    status: &str,
    reason: &'static str,
    message: &str,
) -> Option<Notice> {
    let notice = |warning| Notice {
        subject: Subject::Mirror(mirror.to_owned()),
        warning,
        reason,
        note: message.to_owned(),
    };
    match (type_, status) {
        ("Degraded", "True") => Some(notice(true)),
        ("Ready", "True") => Some(notice(false)),
        _ => None,
    }
}

fn mirror_name(mirror: &RegistryMirror) -> String {
    mirror.metadata.name.clone().unwrap_or_default()
}
