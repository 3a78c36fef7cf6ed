//! The rollout planner's guarantees, on hand-made clusters and on generated ones.

use proptest::prelude::*;
use regmirror_core::activation::Activation;
use regmirror_core::contract::NodeState;
use regmirror_core::plan::{plan, MaxUnavailable, NodeRollout};

/// A name that lives as long as the test binary: rollouts borrow their names.
fn name(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

fn node(name: &'static str, control_plane: bool, activation: Activation) -> NodeRollout<'static> {
    NodeRollout {
        name,
        control_plane,
        ready: true,
        desired: Some("old"),
        current: Some("old"),
        state: Some(NodeState::Applied),
        target: "new",
        activation,
        told: None,
        paused: false,
    }
}

#[test]
fn an_in_flight_node_costs_the_step_it_was_told_not_its_next_one() {
    // n0 was told to restart for the move it is making; its target moved on since, and the
    // move to the newest target would be hot. It still holds the only restart slot.
    let mut n0 = node("n0", false, Activation::Hot);
    n0.desired = Some("middle");
    n0.told = Some(Activation::Restart);
    let n1 = node("n1", false, Activation::Restart);
    let p = plan(&[n0, n1], MaxUnavailable::Count(1));
    assert_eq!(
        p.waiting,
        ["n0", "n1"],
        "n0 finishes the restart it was told before it is told anything else: {p:?}"
    );
    assert!(p.advance.is_empty());
}

#[test]
fn max_unavailable_parses_counts_and_percentages() {
    assert_eq!("2".parse(), Ok(MaxUnavailable::Count(2)));
    assert_eq!("25%".parse(), Ok(MaxUnavailable::Percent(25)));
    assert!("0%".parse::<MaxUnavailable>().is_err());
    assert!("150%".parse::<MaxUnavailable>().is_err());
    assert!("two".parse::<MaxUnavailable>().is_err());
    assert_eq!(MaxUnavailable::Percent(25).of(10), 2);
    assert_eq!(
        MaxUnavailable::Percent(10).of(3),
        1,
        "at least one node may move"
    );
}

#[test]
fn hot_changes_are_not_held_back_by_the_restart_budget() {
    let nodes: Vec<_> = (0..10)
        .map(|i| node(name(format!("n{i}")), false, Activation::Hot))
        .collect();
    assert_eq!(plan(&nodes, MaxUnavailable::Count(1)).advance.len(), 10);
}

#[test]
fn restarts_respect_the_budget_and_one_control_plane_node_at_a_time() {
    let mut nodes: Vec<_> = (0..3)
        .map(|i| node(name(format!("cp{i}")), true, Activation::Restart))
        .collect();
    nodes.extend((0..6).map(|i| node(name(format!("w{i}")), false, Activation::Restart)));
    let p = plan(&nodes, MaxUnavailable::Count(3));
    assert_eq!(p.advance, ["cp0", "w0", "w1"]);
    assert_eq!(p.waiting.len(), 6);
}

#[test]
fn no_control_plane_restart_while_another_control_plane_node_is_not_ready() {
    let mut nodes = vec![
        node("cp0", true, Activation::Restart),
        node("cp1", true, Activation::Restart),
    ];
    nodes[1].ready = false;
    let p = plan(&nodes, MaxUnavailable::Count(5));
    assert!(!p.advance.contains(&"cp0"), "{p:?}");
    // The node that is down may itself take its new config: it costs nothing more.
    assert!(p.advance.contains(&"cp1"), "{p:?}");
}

#[test]
fn a_failed_config_is_not_spread_and_a_paused_mirror_freezes() {
    let mut nodes: Vec<_> = (0..4)
        .map(|i| node(name(format!("n{i}")), false, Activation::Hot))
        .collect();
    nodes[0].desired = Some("new");
    nodes[0].state = Some(NodeState::Failed);
    let p = plan(&nodes, MaxUnavailable::Count(1));
    assert!(p.advance.is_empty(), "{p:?}");
    assert!(p.halted.contains("new"));

    let mut nodes: Vec<_> = (0..2)
        .map(|i| node(name(format!("n{i}")), false, Activation::Hot))
        .collect();
    nodes[1].paused = true;
    assert_eq!(plan(&nodes, MaxUnavailable::Count(1)).advance, ["n0"]);
}

fn cluster() -> impl Strategy<Value = Vec<NodeRollout<'static>>> {
    prop::collection::vec(
        (
            any::<bool>(),
            prop::bool::weighted(0.85),
            prop::sample::select(vec![
                Activation::Hot,
                Activation::Reload,
                Activation::Restart,
            ]),
            0u8..3,
        ),
        1..30,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (cp, ready, activation, phase))| {
                let mut n = node(name(format!("n{i:02}")), cp && i < 5, activation);
                n.ready = ready;
                match phase {
                    0 => {}                                                   // not started
                    1 => n.desired = Some("new"),                             // in flight
                    _ => (n.desired, n.current) = (Some("new"), Some("new")), // done
                }
                n
            })
            .collect()
    })
}

fn restarting_or_down(nodes: &[NodeRollout]) -> usize {
    nodes
        .iter()
        .filter(|n| !n.ready || (n.desired != n.current && n.activation == Activation::Restart))
        .count()
}

proptest! {
    #[test]
    fn the_restart_budget_is_never_exceeded(nodes in cluster(), budget in 1usize..6) {
        let before = restarting_or_down(&nodes);
        let p = plan(&nodes, MaxUnavailable::Count(budget));
        let mut after = nodes.clone();
        for n in after.iter_mut().filter(|n| p.advance.contains(&n.name)) {
            n.desired = Some(n.target);
        }
        prop_assert!(restarting_or_down(&after) <= budget.max(before), "{} > {budget} (was {before})", restarting_or_down(&after));
    }

    #[test]
    fn control_plane_nodes_never_restart_together(nodes in cluster()) {
        let p = plan(&nodes, MaxUnavailable::Count(100));
        let busy = |n: &NodeRollout| n.control_plane && (!n.ready || (n.desired != n.current && n.activation == Activation::Restart));
        let newly: Vec<&NodeRollout> = nodes.iter().filter(|n| p.advance.contains(&n.name) && n.control_plane && n.activation == Activation::Restart).collect();
        prop_assert!(newly.len() <= 1);
        if let Some(new) = newly.first() {
            prop_assert!(!nodes.iter().any(|n| n.name != new.name && busy(n)));
        }
    }

    #[test]
    fn every_node_converges_when_every_apply_succeeds(mut nodes in cluster(), budget in 1usize..4) {
        for n in nodes.iter_mut() { n.ready = true; }
        for _round in 0..=nodes.len() {
            let p = plan(&nodes, MaxUnavailable::Count(budget));
            for n in nodes.iter_mut() {
                if p.advance.contains(&n.name) { n.desired = Some(n.target); }
                // The agent applies whatever it was told, successfully.
                n.current = n.desired;
                n.state = Some(NodeState::Applied);
            }
        }
        prop_assert!(nodes.iter().all(|n| n.current == Some("new")), "{nodes:?}");
    }
}

#[test]
fn a_node_with_nowhere_to_go_still_counts_while_it_is_down() {
    // cp0 has no target now (say its agent has not reported yet) and is NotReady: it is
    // planned as staying where it is, and cp1 may not restart meanwhile.
    let mut cp0 = node("cp0", true, Activation::Hot);
    cp0.ready = false;
    cp0.paused = true;
    let cp1 = node("cp1", true, Activation::Restart);
    let p = plan(&[cp0, cp1], MaxUnavailable::Count(5));
    assert!(p.advance.is_empty(), "{p:?}");
    assert_eq!(p.waiting, ["cp1"]);
}
