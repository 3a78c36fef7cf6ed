//! What each RegistryMirror's status says: how many of its nodes run its latest rendering,
//! which failed, the kstatus conditions (with an Event when one turns), and for a mirror
//! asking for k3s's embedded registry mirror, which of its nodes run it.

use std::collections::HashMap;

use super::{mirror_name, ClusterView, Decision, NodeView, Notice, Placement, Problem, Steps};
use crate::api::{Condition, NodeCounts, NodeFailure, RegistryMirrorStatus};
use crate::contract::{NodeState, PAUSED};
use crate::impact::Impact;
use crate::node::Flavor;
use crate::render::RenderedConfig;

use super::MAX_LISTED_FAILURES;

/// Counts every mirror's nodes in one walk over the nodes, and writes the statuses that differ
/// from the stored ones.
pub(super) fn write_statuses(placement: &Placement, view: &ClusterView, decision: &mut Decision) {
    let mirrors = view.mirrors.len();
    let mut counts = vec![NodeCounts::default(); mirrors];
    let mut failures: Vec<Vec<NodeFailure>> = vec![Vec::new(); mirrors];
    // Per mirror asking for k3s's embedded registry: its k3s/RKE2 nodes, and those not running it.
    let mut embedded = vec![EmbeddedRegistryNodes::default(); mirrors];
    // What the pending nodes' moves take: the decider's own function, on the same configs,
    // once per (running config, target group).
    let mut impacts = vec![Impact::default(); mirrors];
    let mut steps = Steps::default();
    // Whether a node running `current` runs each of its group's mirrors' latest rendering:
    // the same for every node with that current config and group, so worked out once.
    let mut up_to_date: HashMap<(Option<&str>, usize), usize> = HashMap::new();
    let mut freshness: Vec<Vec<bool>> = Vec::new();
    for &index in placement.order() {
        let node = &view.nodes[index];
        let group = placement.target(index).map(|g| (g, placement.group(g)));
        let fresh = group.map(|(g, group)| {
            *up_to_date
                .entry((node.current.as_deref(), g))
                .or_insert_with(|| {
                    let running: Option<&RenderedConfig> = node.current.as_ref().and_then(|c| {
                        if *c == group.config_name {
                            Some(&group.config)
                        } else {
                            view.stored.get(c)
                        }
                    });
                    freshness.push(
                        group
                            .mirrors
                            .iter()
                            .map(|&m| {
                                let name = mirror_name(&view.mirrors[m]);
                                running.and_then(|c| c.parts.get(&name))
                                    == group.config.parts.get(&name)
                            })
                            .collect(),
                    );
                    freshness.len() - 1
                })
        });
        for &m in placement.selecting(index) {
            if view.mirrors[m].spec.embedded_registry {
                embedded[m].add(node);
            }
            let counts = &mut counts[m];
            counts.targeted += 1;
            // Where in the node's target this mirror is, if it is there.
            let in_target = group.and_then(|(_, g)| g.mirrors.binary_search(&m).ok());
            let failed = match node.state {
                Some(NodeState::Unsupported) => true,
                Some(NodeState::Failed) => {
                    in_target.is_some()
                        && node.desired.as_deref() == group.map(|(_, g)| g.config_name.as_str())
                }
                _ => false,
            };
            if failed {
                counts.failed += 1;
                failures[m].push(NodeFailure {
                    node: node.name.clone(),
                    reason: node
                        .message
                        .clone()
                        .unwrap_or_else(|| "the node agent reported no reason".into()),
                });
            } else if node.state == Some(NodeState::Applied)
                && in_target.is_some_and(|i| fresh.is_some_and(|f| freshness[f][i]))
            {
                // Updated for this mirror: the node runs a config holding this mirror's
                // latest rendering, whatever else changed in the target since.
                counts.updated += 1;
            } else {
                counts.pending += 1;
                if let Some((g, group)) = group {
                    let step = steps.of(view, node, g, group);
                    impacts[m].add(step, node.control_plane);
                }
            }
        }
    }
    let budget = view.max_unavailable.of(placement.order().len());
    for (m, mirror) in view.mirrors.iter().enumerate() {
        let name = mirror_name(mirror);
        let mut failures = std::mem::take(&mut failures[m]);
        failures.truncate(MAX_LISTED_FAILURES);
        let counts = counts[m].clone();
        let mut conditions = conditions(
            &counts,
            placement.problem(&name),
            placement.paused(m),
            failures.first(),
        );
        if mirror.spec.embedded_registry {
            conditions.push(embedded[m].condition(&mirror.spec.registry));
        }
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
            rollout: (impacts[m].nodes() > 0).then(|| impacts[m].with_budget(budget)),
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
    let starting = match problem {
        Some(Problem::CacheStarting(m)) => {
            Some(format!("{m}; nodes keep their current configuration"))
        }
        _ => None,
    };
    let problem = problem.and_then(|p| match p {
        Problem::Invalid(m) => Some((
            "InvalidSpec",
            format!("{m}; nodes keep their current configuration"),
        )),
        Problem::Conflict(m) => Some(("Conflict", m.clone())),
        Problem::TooLarge(m) => Some(("ConfigTooLarge", m.clone())),
        Problem::Won(_) | Problem::CacheStarting(_) => None,
    });
    let (ready, progressing, degraded): (Row, Row, Row) = if let Some(message) = starting {
        (
            ("False", "CacheStarting", message.clone()),
            ("True", "CacheStarting", message),
            ("False", "CacheStarting", String::new()),
        )
    } else if let Some((reason, message)) = problem {
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
        ("Degraded", degraded.0, degraded.1, degraded.2.clone()),
        // kstatus (Flux) knows no Degraded: it reads a custom resource as Failed only on
        // Stalled=True, and as InProgress on Ready=False. Stalled says what Degraded says.
        ("Stalled", degraded.0, degraded.1, degraded.2),
    ]
}

/// The k3s and RKE2 nodes of a mirror that asks for the embedded registry mirror, as their
/// agents detected them: which of them run it.
#[derive(Default, Clone)]
struct EmbeddedRegistryNodes {
    k3s_like: usize,
    without: Vec<String>,
}

impl EmbeddedRegistryNodes {
    /// How many nodes without it the condition names; the count says how many there are.
    const LISTED: usize = 5;

    fn add(&mut self, node: &NodeView) {
        // Other flavors cannot render the mirror at all (its status says so); a node whose
        // agent has not reported yet is not known either way.
        let Some(flavor @ (Flavor::K3s { .. } | Flavor::Rke2 { .. })) = &node.flavor else {
            return;
        };
        self.k3s_like += 1;
        if !flavor.embedded_registry() {
            self.without.push(node.name.clone());
        }
    }

    /// `EmbeddedRegistry`: True when every k3s/RKE2 node of the mirror runs it; False, naming
    /// the nodes that do not and the fix, otherwise; Unknown while there is none. It does not
    /// touch Ready: those nodes run the configuration, they only do not share images.
    fn condition(&self, registry: &str) -> ConditionRow {
        if self.k3s_like == 0 {
            return (
                "EmbeddedRegistry",
                "Unknown",
                "NoK3sNodes",
                "no k3s or RKE2 node this mirror selects has reported its setup yet".to_owned(),
            );
        }
        if self.without.is_empty() {
            return (
                "EmbeddedRegistry",
                "True",
                "Running",
                format!(
                    "k3s runs its embedded registry mirror on all {} k3s/RKE2 node(s): they share {registry} images",
                    self.k3s_like
                ),
            );
        }
        let mut named = self.without[..self.without.len().min(Self::LISTED)].join(", ");
        if self.without.len() > Self::LISTED {
            named.push_str(", ...");
        }
        (
            "EmbeddedRegistry",
            "False",
            "NotRunning",
            format!(
                "{} of {} k3s/RKE2 node(s) run without the embedded registry mirror ({named}): they pull {registry} images from its endpoints and the registry, not from their peers. Start the k3s or RKE2 servers with --embedded-registry (embedded-registry: true in their config.yaml) and restart them; agents follow their servers",
                self.without.len(),
                self.k3s_like
            ),
        )
    }
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
        mirror: mirror.to_owned(),
        warning,
        reason,
        action: "Reconcile",
        note: message.to_owned(),
    };
    match (type_, status) {
        ("Degraded", "True") | ("EmbeddedRegistry", "False") => Some(notice(true)),
        ("Ready", "True") => Some(notice(false)),
        _ => None,
    }
}
