//! What a change will do to the nodes before it reaches them: how many nodes take it live,
//! with a reload, or with a restart of their runtime, and in how many `maxUnavailable` waves
//! the restarts go.
//!
//! One summary for two readers: `regmirror plan` (a preview, offline or against the cluster)
//! and each RegistryMirror's status while it rolls out. The waves follow the planner's rules
//! ([`crate::plan`]): hot changes and reloads are never held back (one wave), restarts go at
//! most `budget` nodes at a time and at most one control-plane node per wave.

use std::collections::BTreeMap;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use crate::activation::{activation, Activation};
use crate::assemble::assemble;
use crate::model::ResolvedMirror;
use crate::node::NodeInfo;
use crate::plan::MaxUnavailable;
use crate::render::render;

/// Nodes still to move, by what the move takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Impact {
    /// Nodes that take the change live (no restart, no reload).
    pub hot: u32,
    /// Nodes whose runtime reloads its configuration (CRI-O); pods keep running.
    pub reload: u32,
    /// Nodes whose container runtime restarts.
    pub restart: u32,
    /// Of the restarts, control-plane nodes (restarted one at a time).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restart_control_plane: u32,
    /// How many `maxUnavailable` waves the restarts take at least (0: none to restart).
    pub restart_waves: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Impact {
    /// Counts one node's move.
    pub fn add(&mut self, activation: Activation, control_plane: bool) {
        match activation {
            Activation::Hot => self.hot += 1,
            Activation::Reload => self.reload += 1,
            Activation::Restart => {
                self.restart += 1;
                self.restart_control_plane += u32::from(control_plane);
            }
        }
    }

    /// Sets the waves the restarts take with `budget` nodes restarting at a time.
    pub fn with_budget(mut self, budget: usize) -> Self {
        self.restart_waves = restart_waves(self.restart, self.restart_control_plane, budget);
        self
    }

    /// Nodes to move, in all.
    pub fn nodes(&self) -> u32 {
        self.hot + self.reload + self.restart
    }
}

/// The fewest waves in which `restarting` nodes, `control_plane` of them control-plane nodes,
/// can restart when at most `budget` restart at once and at most one control-plane node per
/// wave. (Nodes already down or a budget shared with other changes can only make it more.)
pub fn restart_waves(restarting: u32, control_plane: u32, budget: usize) -> u32 {
    if restarting == 0 {
        return 0;
    }
    let budget = u32::try_from(budget.max(1)).unwrap_or(u32::MAX);
    control_plane.max(restarting.div_ceil(budget))
}

/// One line for a person: `3 nodes: 1 live, 2 restart in 2 waves (maxUnavailable 1)`.
impl std::fmt::Display for Impact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.hot > 0 {
            parts.push(format!("{} live", self.hot));
        }
        if self.reload > 0 {
            parts.push(format!("{} runtime reload", self.reload));
        }
        if self.restart > 0 {
            let control_plane = if self.restart_control_plane > 0 {
                format!(
                    ", {} control-plane one at a time",
                    self.restart_control_plane
                )
            } else {
                String::new()
            };
            parts.push(format!(
                "{} runtime restart in {} wave(s){control_plane}",
                self.restart, self.restart_waves
            ));
        }
        if parts.is_empty() {
            return f.write_str("no node changes");
        }
        write!(f, "{} node(s): {}", self.nodes(), parts.join(", "))
    }
}

/// A node as a preview sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewNode {
    pub info: NodeInfo,
    pub control_plane: bool,
}

/// Nodes that make the same move: same flavor, same configuration before and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupPreview {
    pub flavor: String,
    /// The RegistryMirrors the nodes get after the change.
    pub mirrors: Vec<String>,
    pub nodes: Vec<String>,
    /// What the move takes; none when their configuration does not change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activation: Option<Activation>,
    /// The group's moves, with the waves its restarts would take alone.
    pub impact: Impact,
    /// Why the nodes cannot get the new configuration (a field their flavor cannot express):
    /// they keep what they run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// What a change of RegistryMirrors does to a set of nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Preview {
    pub groups: Vec<GroupPreview>,
    /// The nodes that move, in all, with the restart waves of the whole cluster's budget.
    pub total: Impact,
    /// Nodes allowed to restart at once.
    pub budget: usize,
}

/// What going from the `before` mirrors to the `after` ones does to `nodes`, assuming each
/// node runs what `before` renders for it (a rollout still under way is not seen).
pub fn preview(
    before: &[ResolvedMirror],
    after: &[ResolvedMirror],
    nodes: &[PreviewNode],
    max_unavailable: MaxUnavailable,
) -> Preview {
    // Keyed by flavor and the two configurations' digests (or the render error).
    let mut groups: BTreeMap<(String, String, String), GroupPreview> = BTreeMap::new();
    let mut total = Impact::default();
    for node in nodes {
        let flavor = &node.info.flavor;
        let old = render(&assemble(before, &node.info).mirrors, flavor).ok();
        let assembly = assemble(after, &node.info);
        let mirrors: Vec<String> = assembly.mirrors.iter().map(|m| m.name.clone()).collect();
        let (key, activation, problem) = match render(&assembly.mirrors, flavor) {
            Ok(new) => {
                let step = (old.as_ref() != Some(&new)).then(|| activation(old.as_ref(), &new));
                (new.digest(), step, None)
            }
            Err(e) => (String::new(), None, Some(e.to_string())),
        };
        let old_key = old.map(|c| c.digest()).unwrap_or_default();
        let group = groups
            .entry((flavor.to_string(), old_key, key))
            .or_insert_with(|| GroupPreview {
                flavor: flavor.to_string(),
                mirrors,
                nodes: Vec::new(),
                activation,
                impact: Impact::default(),
                problem,
            });
        group.nodes.push(node.info.name.clone());
        if let Some(step) = activation {
            total.add(step, node.control_plane);
            group.impact.add(step, node.control_plane);
        }
    }
    let budget = max_unavailable.of(nodes.len());
    let mut groups: Vec<GroupPreview> = groups
        .into_values()
        .map(|g| GroupPreview {
            impact: g.impact.with_budget(budget),
            ..g
        })
        .collect();
    // The moves that cost most first; unchanged groups last.
    groups.sort_by(|a, b| {
        b.activation
            .cmp(&a.activation)
            .then_with(|| a.flavor.cmp(&b.flavor))
            .then_with(|| a.nodes.cmp(&b.nodes))
    });
    Preview {
        groups,
        total: total.with_budget(budget),
        budget,
    }
}

/// A table for a person: one line per group of nodes, then the whole.
impl std::fmt::Display for Preview {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for group in &self.groups {
            let what = match (&group.problem, group.activation) {
                (Some(problem), _) => {
                    format!("cannot be rendered, keeps its configuration: {problem}")
                }
                (None, None) => "unchanged".to_owned(),
                (None, Some(Activation::Hot)) => "live, no restart".to_owned(),
                (None, Some(Activation::Reload)) => "runtime reload".to_owned(),
                (None, Some(Activation::Restart)) => format!(
                    "runtime restart, {} wave(s) on its own at maxUnavailable {}",
                    group.impact.restart_waves, self.budget
                ),
            };
            let mirrors = if group.mirrors.is_empty() {
                "no mirror".to_owned()
            } else {
                group.mirrors.join(", ")
            };
            writeln!(
                f,
                "{} node(s), {} [{mirrors}]: {what}",
                group.nodes.len(),
                group.flavor
            )?;
            writeln!(f, "    {}", shortened(&group.nodes))?;
        }
        writeln!(f, "in all: {} (maxUnavailable {})", self.total, self.budget)
    }
}

/// Node names, the first few only.
fn shortened(names: &[String]) -> String {
    const SHOWN: usize = 5;
    if names.len() <= SHOWN {
        names.join(", ")
    } else {
        format!(
            "{}, … and {} more",
            names[..SHOWN].join(", "),
            names.len() - SHOWN
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_go_budget_nodes_a_wave_and_one_control_plane_node_per_wave() {
        assert_eq!(restart_waves(0, 0, 1), 0);
        assert_eq!(restart_waves(5, 0, 1), 5);
        assert_eq!(restart_waves(5, 0, 2), 3);
        assert_eq!(restart_waves(250, 0, 25), 10);
        // Three servers and two agents with a budget of 5: still three waves.
        assert_eq!(restart_waves(5, 3, 5), 3);
        assert_eq!(restart_waves(4, 1, 0), 4, "a budget is at least one");
    }

    fn node(name: &str, flavor: crate::node::Flavor, labels: &[(&str, &str)]) -> PreviewNode {
        PreviewNode {
            info: NodeInfo {
                name: name.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                flavor,
            },
            control_plane: false,
        }
    }

    fn mirror(name: &str, url: &str, with_credentials: bool) -> ResolvedMirror {
        use crate::model::{Credentials, EndpointUrl, HostSettings, ResolvedEndpoint, Scheme};
        ResolvedMirror {
            name: name.into(),
            registry: "docker.io".into(),
            endpoints: vec![ResolvedEndpoint {
                url: EndpointUrl {
                    scheme: Scheme::Https,
                    host: url.into(),
                    path: String::new(),
                },
                settings: HostSettings {
                    auth: with_credentials.then(|| Credentials::Basic {
                        username: "u".into(),
                        password: "p".into(),
                    }),
                    ..HostSettings::default()
                },
                credentials_from: None,
            }],
            rewrites: vec![],
            node_selector: None,
            embedded_registry: false,
        }
    }

    #[test]
    fn a_preview_groups_nodes_by_the_move_they_make() {
        use crate::node::Flavor;
        let containerd = Flavor::Containerd {
            hosts_dir: "/etc/containerd/certs.d".into(),
        };
        let mut nodes = vec![
            node("k1", Flavor::K3S, &[]),
            node("k2", Flavor::K3S, &[]),
            node("c1", containerd.clone(), &[]),
            node("o1", Flavor::Crio, &[]),
        ];
        nodes[0].control_plane = true;
        let before = [mirror("hub", "a.example", true)];

        // New credentials' host: k3s restarts, containerd takes it live, CRI-O reloads.
        let after = [mirror("hub", "b.example", true)];
        let p = preview(&before, &after, &nodes, MaxUnavailable::Count(1));
        let moves: Vec<(&str, Option<Activation>, usize)> = p
            .groups
            .iter()
            .map(|g| (g.flavor.as_str(), g.activation, g.nodes.len()))
            .collect();
        assert_eq!(
            moves,
            [
                ("k3s", Some(Activation::Restart), 2),
                ("cri-o", Some(Activation::Reload), 1),
                ("containerd", Some(Activation::Hot), 1),
            ]
        );
        assert_eq!(
            (
                p.total.hot,
                p.total.reload,
                p.total.restart,
                p.total.restart_waves
            ),
            (1, 1, 2, 2)
        );

        // Nothing changes: every group unchanged, nothing to move.
        let p = preview(&before, &before, &nodes, MaxUnavailable::Count(1));
        assert!(p.groups.iter().all(|g| g.activation.is_none()));
        assert_eq!(p.total.nodes(), 0);
        assert!(p
            .to_string()
            .ends_with("in all: no node changes (maxUnavailable 1)\n"));
    }

    #[test]
    fn a_summary_counts_each_kind_of_move() {
        let mut impact = Impact::default();
        impact.add(Activation::Hot, false);
        impact.add(Activation::Restart, true);
        impact.add(Activation::Restart, false);
        let impact = impact.with_budget(2);
        assert_eq!(
            (impact.hot, impact.restart, impact.restart_waves),
            (1, 2, 1)
        );
        assert_eq!(
            impact.to_string(),
            "3 node(s): 1 live, 2 runtime restart in 1 wave(s), 1 control-plane one at a time"
        );
    }
}
