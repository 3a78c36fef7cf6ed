//! What a change will do to the nodes before it reaches them: how many nodes take it live,
//! with a reload, or with a restart of their runtime, and in how many `maxUnavailable` waves
//! the restarts go.
//!
//! One summary for two readers: `regmirror plan` (a preview, offline or against the cluster)
//! and each RegistryMirror's status while it rolls out. The waves follow the planner's rules
//! ([`crate::plan`]): hot changes and reloads are never held back (one wave), restarts go at
//! most `budget` nodes at a time and at most one control-plane node per wave.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use crate::activation::Activation;

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
