//! How a node picks up a change of configuration: live, with a reload, or with a restart of
//! its container runtime.
//!
//! The one decider of this question is the operator, in [`crate::decide`]: it alone holds the
//! restart budget (`maxUnavailable`, one control-plane node at a time), so the step it decided
//! travels to the node with the desired config (the `regmirror.io/desired-activation`
//! annotation) and the agent carries out exactly that step — never computing its own, which
//! could turn a budgeted hot apply into an unbudgeted restart when its local state is lost.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::node::Flavor;
use crate::render::{k3s, RenderedConfig};

/// How a node picks up a change from one configuration to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Activation {
    /// Nothing to do: the runtime reads the files live.
    Hot,
    /// The runtime re-reads its configuration on a reload (CRI-O's SIGHUP); pods keep running.
    Reload,
    /// The runtime service must restart: counts against the rollout's restart budget.
    Restart,
}

impl Activation {
    pub fn as_str(self) -> &'static str {
        match self {
            Activation::Hot => "Hot",
            Activation::Reload => "Reload",
            Activation::Restart => "Restart",
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `desired-activation` annotation that is none of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an activation (Hot, Reload or Restart)")]
pub struct BadActivation(pub String);

impl FromStr for Activation {
    type Err = BadActivation;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Activation::Hot, Activation::Reload, Activation::Restart]
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| BadActivation(s.to_owned()))
    }
}

/// What moving a node from `from` (none: nothing of ours yet) to `to` takes. Called by the
/// operator's decision only; agents read the result from their Node.
pub fn activation(from: Option<&RenderedConfig>, to: &RenderedConfig) -> Activation {
    if from == Some(to) {
        return Activation::Hot;
    }
    match to.flavor.parse::<Flavor>() {
        Ok(Flavor::Crio) => Activation::Reload,
        Ok(Flavor::Containerd { .. }) => Activation::Hot,
        // k3s / RKE2 read credentials only at start: a change there needs a restart. A first
        // config needs one only if it carries credentials (the empty key is "none").
        Ok(Flavor::K3s { .. } | Flavor::Rke2 { .. }) | Err(_) => {
            let from_key = from.map_or(k3s::NO_CREDENTIALS_KEY, |c| c.restart_key.as_str());
            if from_key == to.restart_key {
                Activation::Hot
            } else {
                Activation::Restart
            }
        }
    }
}

/// The step an agent takes to move its node to `desired`, given the config its Node reports
/// running (`reported`) and the step the operator told it (`told`): exactly the told step,
/// for the move the operator decided (from `reported` to `desired`). Once the Node reports
/// `desired`, that move is done and the runtime runs it; writing its files again (a host
/// that lost its local record) takes no restart. No step told means none is taken.
pub fn agent_step(reported: Option<&str>, desired: &str, told: Option<Activation>) -> Activation {
    if reported == Some(desired) {
        return Activation::Hot;
    }
    told.unwrap_or(Activation::Hot)
}
