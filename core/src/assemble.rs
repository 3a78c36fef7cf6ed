//! Which RegistryMirrors a node gets: those whose selector selects it, minus conflicts.
//!
//! Two mirrors conflict on a node when they configure the same registry, or when they send
//! one endpoint host different credentials or TLS settings (runtimes hold one set per host).
//! The conflict is settled deterministically — the mirror whose name sorts first wins — and
//! the loser is left out of that node entirely, so a node never gets half of a mirror.

use std::collections::BTreeMap;

use crate::model::{HostSettings, ResolvedMirror};
use crate::node::NodeInfo;
use crate::select;

/// The mirrors a node gets, and the conflicts that kept others out.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Assembly<'m> {
    /// Mirrors for the node, ordered by name.
    pub mirrors: Vec<&'m ResolvedMirror>,
    pub conflicts: Vec<Conflict>,
}

/// One mirror left out of one node because of another.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conflict {
    /// The mirror left out.
    pub mirror: String,
    /// The mirror that won.
    pub winner: String,
    pub what: ConflictKind,
}

/// What two mirrors disagree on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConflictKind {
    /// Both configure this registry.
    Registry(String),
    /// Both use this endpoint host, with different credentials or TLS settings.
    HostSettings(String),
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.what {
            ConflictKind::Registry(r) => {
                write!(f, "RegistryMirror {} also configures registry {r:?}; {} is used, {} is ignored", self.winner, self.winner, self.mirror)
            }
            ConflictKind::HostSettings(h) => write!(
                f,
                "RegistryMirror {} uses endpoint host {h:?} with different credentials or TLS; {} is used, {} is ignored",
                self.winner, self.winner, self.mirror
            ),
        }
    }
}

/// Assembles the mirrors for `node` out of all valid mirrors.
pub fn assemble<'m>(mirrors: &'m [ResolvedMirror], node: &NodeInfo) -> Assembly<'m> {
    let mut selected: Vec<&ResolvedMirror> = mirrors
        .iter()
        .filter(|m| select::matches(m.node_selector.as_ref(), &node.labels))
        .collect();
    selected.sort_by(|a, b| a.name.cmp(&b.name));

    let mut assembly = Assembly::default();
    let mut registries: BTreeMap<&str, &str> = BTreeMap::new();
    let mut hosts: BTreeMap<&str, (&HostSettings, &str)> = BTreeMap::new();
    for mirror in selected {
        let conflict = |winner: &str, what| Conflict {
            mirror: mirror.name.clone(),
            winner: winner.to_owned(),
            what,
        };
        if let Some(winner) = registries.get(mirror.registry.as_str()) {
            assembly.conflicts.push(conflict(
                winner,
                ConflictKind::Registry(mirror.registry.clone()),
            ));
            continue;
        }
        let clash = mirror
            .endpoints
            .iter()
            .find_map(|e| match hosts.get(e.url.host.as_str()) {
                Some((settings, winner)) if **settings != e.settings => Some(conflict(
                    winner,
                    ConflictKind::HostSettings(e.url.host.clone()),
                )),
                _ => None,
            });
        if let Some(clash) = clash {
            assembly.conflicts.push(clash);
            continue;
        }
        registries.insert(&mirror.registry, &mirror.name);
        for e in &mirror.endpoints {
            hosts.insert(&e.url.host, (&e.settings, &mirror.name));
        }
        assembly.mirrors.push(mirror);
    }
    assembly
}

/// Conflicts that may happen on some node, judged without nodes (for `regmirror validate`):
/// two mirrors may meet on a node unless their `matchLabels` demand different values for one
/// key. Expressions are not considered, so this errs on the side of reporting.
pub fn possible_conflicts(mirrors: &[ResolvedMirror]) -> Vec<Conflict> {
    let mut sorted: Vec<&ResolvedMirror> = mirrors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut conflicts = Vec::new();
    for (i, loser) in sorted.iter().enumerate() {
        for winner in &sorted[..i] {
            if !selectors_may_overlap(winner, loser) {
                continue;
            }
            let conflict = |what| Conflict {
                mirror: loser.name.clone(),
                winner: winner.name.clone(),
                what,
            };
            if winner.registry == loser.registry {
                conflicts.push(conflict(ConflictKind::Registry(loser.registry.clone())));
                break;
            }
            let clash = loser.endpoints.iter().find(|l| {
                winner
                    .endpoints
                    .iter()
                    .any(|w| w.url.host == l.url.host && w.settings != l.settings)
            });
            if let Some(clash) = clash {
                conflicts.push(conflict(ConflictKind::HostSettings(clash.url.host.clone())));
                break;
            }
        }
    }
    conflicts
}

fn selectors_may_overlap(a: &ResolvedMirror, b: &ResolvedMirror) -> bool {
    let labels = |m: &ResolvedMirror| {
        m.node_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone())
            .unwrap_or_default()
    };
    let (a, b) = (labels(a), labels(b));
    a.iter().all(|(k, v)| b.get(k).is_none_or(|w| w == v))
}
