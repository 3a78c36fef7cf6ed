//! The operator's whole-cluster decision: grouping, config lifecycle, holds, status — and that
//! a cluster where every agent succeeds converges without breaking the rollout's limits. On
//! testbed's one simulation of the API server and the agents.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use proptest::prelude::*;
use regmirror_core::activation::{activation, Activation};
use regmirror_core::api::{Endpoint, EndpointAuth, ObjectRef, RegistryMirror, RegistryMirrorSpec};
use regmirror_core::contract::{NodeState, PAUSED};
use regmirror_core::decide::{conclude, NodeView, NO_CONFIG_PLACEHOLDER};
use regmirror_core::node::Flavor;
use regmirror_core::plan::MaxUnavailable;
use regmirror_core::sources::{RefPolicy, SourceKind, SourceObject, Sources};

use regmirror_testbed::simulator::{Simulation, NS};

/// The one simulation (testbed's), with the tests' pull Secret.
type Cluster = Simulation;

fn cluster(nodes: Vec<NodeView>) -> Cluster {
    let mut sources = Sources::new();
    sources.insert(SourceKind::Secret, NS, "pull", basic_auth("alice", "one"));
    Simulation::new(nodes, sources)
}

/// Credentials for the mirrors of these tests, which live under `example:5000`.
fn basic_auth(user: &str, password: &str) -> SourceObject {
    SourceObject {
        type_: Some("kubernetes.io/basic-auth".into()),
        data: [("username", user), ("password", password)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.as_bytes().to_vec()))
            .collect(),
        ..SourceObject::default()
    }
    .allowing_hosts("*.example:5000, mirror.example:5000, hub.example:5000")
}

/// `n` k3s nodes, `n0`, `n1`, …
fn k3s_nodes(n: usize) -> Vec<NodeView> {
    (0..n)
        .map(|i| node(&format!("n{i}"), Flavor::K3S, &[]))
        .collect()
}

fn containerd() -> Flavor {
    Flavor::Containerd {
        hosts_dir: "/etc/containerd/certs.d".into(),
    }
}

fn node(name: &str, flavor: Flavor, labels: &[(&str, &str)]) -> NodeView {
    NodeView {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        control_plane: false,
        ready: true,
        flavor: Some(flavor),
        public_key: Some(format!("key-of-{name}")),
        ..NodeView::default()
    }
}

fn mirror(name: &str, registry: &str, url: &str, auth: Option<ObjectRef>) -> RegistryMirror {
    let mut m = RegistryMirror::new(
        name,
        RegistryMirrorSpec {
            cache: None,
            embedded_registry: false,
            registry: registry.into(),
            endpoints: vec![Endpoint {
                url: url.into(),
                auth: auth.map(|secret_ref| EndpointAuth { secret_ref }),
                tls: None,
            }],
            rewrites: vec![],
            node_selector: None,
        },
    );
    m.metadata.generation = Some(1);
    m
}

fn region(value: &str) -> Option<LabelSelector> {
    Some(LabelSelector {
        match_labels: Some([("region".to_owned(), value.to_owned())].into()),
        match_expressions: None,
    })
}

/// Decides and applies until nothing is left to do, with every agent succeeding.
fn converge(cluster: &mut Cluster) -> usize {
    cluster.converge()
}

#[test]
fn nodes_with_equal_needs_share_one_stored_config() {
    let mut c = cluster(vec![
        node("a1", Flavor::K3S, &[("region", "eu")]),
        node("a2", Flavor::K3S, &[("region", "eu")]),
        node("b1", Flavor::K3S, &[("region", "us")]),
        node("c1", Flavor::Crio, &[("region", "eu")]),
    ]);
    let mut eu = mirror("eu", "docker.io", "https://eu.mirror.example:5000", None);
    eu.spec.node_selector = region("eu");
    c.mirrors = vec![eu];
    let d = c.decide();
    // b1 gets nothing and never had anything: left alone.
    assert_eq!(
        d.advance
            .iter()
            .map(|a| a.node.as_str())
            .collect::<Vec<_>>(),
        ["a1", "a2", "c1"]
    );
    assert_eq!(
        d.create.len(),
        2,
        "one config for the k3s group, one for the CRI-O node"
    );
    assert_eq!(d.advance[0].config, d.advance[1].config);
    assert_ne!(d.advance[0].config, d.advance[2].config);
    let role = d.agent_role.clone().unwrap();
    assert_eq!(
        role,
        d.create.keys().cloned().collect::<Vec<_>>(),
        "agents may read exactly the live configs"
    );
    assert_eq!(d.statuses["eu"].nodes.targeted, 3);
    assert_eq!(d.statuses["eu"].nodes.pending, 3);
    let rollout: Vec<(&str, &str)> = d
        .notices
        .iter()
        .filter(|n| n.reason == "RolloutStep")
        .map(|n| (n.mirror.as_str(), n.note.as_str()))
        .collect();
    assert_eq!(
        rollout.len(),
        1,
        "one Event for the mirror, not one per node: {rollout:?}"
    );
    assert_eq!(rollout[0].0, "eu");
    assert!(
        rollout[0]
            .1
            .starts_with("told 3 nodes to apply a new configuration ("),
        "{}",
        rollout[0].1
    );
}

#[test]
fn a_settled_cluster_decides_nothing() {
    let mut c = cluster(vec![
        node("a", Flavor::K3S, &[]),
        node(
            "b",
            Flavor::Containerd {
                hosts_dir: "/etc/containerd/certs.d".into(),
            },
            &[],
        ),
    ]);
    c.mirrors = vec![mirror(
        "hub",
        "docker.io",
        "https://mirror.example:5000",
        Some(ObjectRef::named("pull")),
    )];
    converge(&mut c);
    let d = c.decide();
    assert_eq!(d.writes(), 0, "{d:#?}");
    assert!(d.notices.is_empty());
    assert_eq!(c.condition("hub", "Ready").0, "True");
    assert_eq!(c.status("hub").nodes.updated, 2);
    assert_eq!(c.status("hub").observed_generation, Some(1));
}

#[test]
fn a_rotated_password_moves_every_node_and_retires_the_old_config() {
    let mut c = cluster(k3s_nodes(4));
    c.mirrors = vec![mirror(
        "hub",
        "docker.io",
        "https://mirror.example:5000",
        Some(ObjectRef::named("pull")),
    )];
    converge(&mut c);
    let old = c.nodes[0].current.clone().unwrap();

    c.sources
        .insert(SourceKind::Secret, NS, "pull", basic_auth("alice", "two"));
    let d = c.decide();
    // Credentials on k3s need a restart: one node at a time.
    assert_eq!(d.advance.len(), 1);
    assert_eq!(d.create.len(), 1);
    let new = d.advance[0].config.clone();
    assert_eq!(
        activation(c.stored.get(&old), &d.create[&new]),
        Activation::Restart
    );
    assert!(d.delete.is_empty(), "the old config is still in use");
    assert_eq!(
        d.statuses["hub"].conditions[1].status, "True",
        "Progressing"
    );

    let rounds = converge(&mut c);
    assert!(rounds >= 4, "restarts went one by one ({rounds} rounds)");
    assert!(c.nodes.iter().all(|n| n.current.as_ref() == Some(&new)));
    assert_eq!(
        c.stored.keys().collect::<Vec<_>>(),
        [&new],
        "the old config is gone"
    );
    assert_eq!(c.agent_role, Some(vec![new]));
}

#[test]
fn an_invalid_mirror_changes_no_node_and_says_which_field() {
    let mut c = cluster(vec![node("a", Flavor::K3S, &[])]);
    c.mirrors = vec![mirror(
        "hub",
        "docker.io",
        "https://mirror.example:5000",
        Some(ObjectRef::named("pull")),
    )];
    converge(&mut c);
    let before = c.nodes[0].desired.clone();

    // A reference into a namespace the operator may not read, and a missing Secret.
    c.mirrors[0].spec.endpoints[0].auth = Some(EndpointAuth {
        secret_ref: ObjectRef {
            name: "pull".into(),
            namespace: Some("kube-system".into()),
        },
    });
    c.mirrors.push(mirror(
        "quay",
        "quay.io",
        "https://quay-mirror.example",
        Some(ObjectRef::named("missing")),
    ));
    let d = c.decide();
    assert!(
        d.advance.is_empty() && d.create.is_empty() && d.delete.is_empty(),
        "{d:#?}"
    );
    c.apply(&d);
    let (status, reason, message) = c.condition("hub", "Degraded");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "InvalidSpec"));
    assert!(message.starts_with("spec.endpoints[0].auth.secretRef: Secret kube-system/pull is in a namespace regmirror may not read"), "{message}");
    let (_, _, message) = c.condition("quay", "Degraded");
    assert!(
        message.contains("Secret regmirror-system/missing not found"),
        "{message}"
    );
    assert_eq!(c.condition("hub", "Ready").0, "False");
    assert_eq!(
        c.condition("hub", "Stalled"),
        c.condition("hub", "Degraded"),
        "kstatus reads Stalled=True as Failed"
    );
    assert!(d.notices.iter().any(|n| n.warning && n.mirror == "hub"));
    assert_eq!(c.nodes[0].desired, before);
}

#[test]
fn a_failing_node_halts_its_config_and_is_reported() {
    let mut c = cluster(k3s_nodes(3));
    c.max_unavailable = MaxUnavailable::Count(3);
    c.mirrors = vec![mirror(
        "hub",
        "docker.io",
        "https://mirror.example:5000",
        None,
    )];
    converge(&mut c);
    c.mirrors[0].spec.endpoints[0].url = "https://other.example:5000".into();
    let d = c.decide();
    assert_eq!(d.advance.len(), 3, "a hot change is not held back");
    c.apply(&d);
    // n0 fails (its agent rolled back); the others have not reported yet.
    let n0 = c.node_mut("n0");
    n0.state = Some(NodeState::Failed);
    n0.message = Some("runtime not active after restart".into());
    let d = c.decide();
    assert!(d.advance.is_empty());
    c.apply(&d);
    let (status, reason, message) = c.condition("hub", "Degraded");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "NodesFailed"));
    assert!(
        message.contains("n0: runtime not active after restart"),
        "{message}"
    );
    assert_eq!(c.status("hub").failures[0].node, "n0");
    assert_eq!(c.status("hub").nodes.failed, 1);
    assert_eq!(
        c.condition("hub", "Stalled"),
        c.condition("hub", "Degraded"),
        "kstatus reads Stalled=True as Failed"
    );
}

#[test]
fn a_node_whose_runtime_ignores_the_config_degrades_its_mirrors_with_the_fix() {
    // The agent reports Unsupported when containerd reads no hosts.toml (config_path unset):
    // every mirror selecting the node says so, with the agent's message (the fix), and the
    // other nodes go on.
    let mut c = cluster(vec![
        node("a", containerd(), &[]),
        node("b", containerd(), &[]),
    ]);
    c.mirrors = vec![mirror(
        "hub",
        "docker.io",
        "https://mirror.example:5000",
        None,
    )];
    let fix = "containerd reads no hosts.toml, so regmirror's mirrors would be ignored: /etc/containerd/config.toml does not set the CRI registry config_path. Fix: set config_path";
    let b = c.node_mut("b");
    b.state = Some(NodeState::Unsupported);
    b.message = Some(fix.into());
    converge(&mut c);
    assert_eq!(c.status("hub").nodes.failed, 1);
    assert_eq!(c.status("hub").nodes.updated, 1);
    assert_eq!(c.status("hub").failures[0].node, "b");
    assert_eq!(c.status("hub").failures[0].reason, fix);
    let (status, _, message) = c.condition("hub", "Degraded");
    assert_eq!(status, "True");
    assert!(message.contains("config_path"), "{message}");
}

#[test]
fn the_status_says_what_the_remaining_moves_take_while_a_mirror_rolls_out() {
    // Five k3s nodes, one of them a server, and a mix: a password rotation restarts every
    // runtime (k3s reads credentials at start), two at a time, one server per wave.
    let mut nodes = k3s_nodes(4);
    nodes.push(NodeView {
        control_plane: true,
        ..node("server", Flavor::K3S, &[])
    });
    let mut c = cluster(nodes);
    c.max_unavailable = MaxUnavailable::Count(2);
    c.mirrors = vec![mirror(
        "hub",
        "docker.io",
        "https://mirror.example:5000",
        Some(ObjectRef::named("pull")),
    )];
    converge(&mut c);
    assert_eq!(
        c.status("hub").rollout,
        None,
        "nothing to move once settled"
    );

    c.sources
        .insert(SourceKind::Secret, NS, "pull", basic_auth("alice", "two"));
    let d = c.decide();
    let rollout = d.statuses["hub"].rollout.expect("a rollout summary");
    assert_eq!(
        (
            rollout.hot,
            rollout.restart,
            rollout.restart_control_plane,
            rollout.restart_waves
        ),
        (0, 5, 1, 3)
    );
    c.apply(&d);
    c.agents_succeed();
    // Two fewer to go: the summary follows.
    let d = c.decide();
    let rollout = d.statuses["hub"].rollout.expect("a rollout summary");
    assert_eq!((rollout.restart, rollout.restart_waves), (3, 2));

    converge(&mut c);
    assert_eq!(c.status("hub").rollout, None);

    // A new endpoint path on the same host is live on k3s: every node at once, no waves.
    c.mirrors[0].spec.endpoints[0].url = "https://mirror.example:5000/v2/hub".into();
    let d = c.decide();
    let rollout = d.statuses["hub"].rollout.expect("a rollout summary");
    assert_eq!(
        (rollout.hot, rollout.restart, rollout.restart_waves),
        (5, 0, 0)
    );
}

#[test]
fn a_paused_mirror_freezes_its_nodes() {
    let mut c = cluster(vec![node("a", Flavor::K3S, &[])]);
    c.mirrors = vec![mirror(
        "hub",
        "docker.io",
        "https://mirror.example:5000",
        None,
    )];
    converge(&mut c);
    c.mirrors[0].metadata.annotations = Some([(PAUSED.to_owned(), "true".to_owned())].into());
    c.mirrors[0].spec.endpoints[0].url = "https://other.example:5000".into();
    let d = c.decide();
    assert!(d.advance.is_empty());
    c.apply(&d);
    assert_eq!(c.condition("hub", "Progressing").1, "Paused");
    assert_eq!(
        c.condition("hub", "Stalled").0,
        "False",
        "paused is not stuck"
    );
}

#[test]
fn the_losing_mirror_of_a_conflict_is_degraded_and_left_off() {
    let mut c = cluster(vec![node("a", Flavor::K3S, &[])]);
    c.mirrors = vec![
        mirror("a-hub", "docker.io", "https://one.example:5000", None),
        mirror("b-hub", "docker.io", "https://two.example:5000", None),
    ];
    converge(&mut c);
    let (status, reason, message) = c.condition("b-hub", "Degraded");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Conflict"));
    assert!(message.contains("a-hub"), "{message}");
    let (ready, _, message) = c.condition("a-hub", "Ready");
    assert_eq!(ready, "True");
    assert!(message.contains("conflict: RegistryMirror a-hub also configures registry \"docker.io\"; a-hub is used, b-hub is ignored"), "the winner says so too: {message}");
    let config = &c.stored[c.nodes[0].current.as_ref().unwrap()];
    let all: String = config.files.values().map(|f| f.content.clone()).collect();
    assert!(all.contains("one.example") && !all.contains("two.example"));
}

#[test]
fn deleting_the_last_mirror_empties_the_nodes_and_never_grants_every_secret() {
    let mut c = cluster(vec![node("a", containerd(), &[])]);
    c.mirrors = vec![mirror(
        "hub",
        "docker.io",
        "https://mirror.example:5000",
        None,
    )];
    converge(&mut c);
    c.mirrors.clear();
    converge(&mut c);
    let empty = &c.stored[c.nodes[0].current.as_ref().unwrap()];
    assert!(
        empty.files.is_empty(),
        "the node is told to hold none of our files"
    );

    let mut bare = cluster(vec![node("a", Flavor::K3S, &[])]);
    let d = bare.decide();
    assert_eq!(d.agent_role, Some(vec![NO_CONFIG_PLACEHOLDER.to_owned()]));
    bare.apply(&d);
    assert_eq!(bare.decide().writes(), 0);
}

#[test]
fn nodes_without_an_agent_report_are_pending_not_touched() {
    let mut c = cluster(vec![NodeView {
        name: "new".into(),
        ready: true,
        ..NodeView::default()
    }]);
    c.mirrors = vec![mirror(
        "hub",
        "docker.io",
        "https://mirror.example:5000",
        None,
    )];
    let d = c.decide();
    assert!(d.advance.is_empty());
    assert_eq!(d.statuses["hub"].nodes.pending, 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the cluster, when every agent succeeds every node converges to its target,
    /// restarts never exceed the budget, and control-plane nodes never restart together.
    #[test]
    fn every_node_converges_within_the_limits(
        shape in proptest::collection::vec((any::<bool>(), any::<bool>(), 0u8..3), 1..12),
        budget in 1usize..4,
    ) {
        let flavors = [Flavor::K3S, Flavor::RKE2, Flavor::Crio];
        let nodes = shape.iter().enumerate().map(|(i, (cp, eu, f))| {
            let mut n = node(&format!("n{i:02}"), flavors[*f as usize].clone(), &[("region", if *eu { "eu" } else { "us" })]);
            n.control_plane = *cp;
            n
        }).collect();
        let mut c = cluster(nodes);
        c.max_unavailable = MaxUnavailable::Count(budget);
        let mut eu = mirror("eu", "docker.io", "https://eu.example:5000", Some(ObjectRef::named("pull")));
        eu.spec.node_selector = region("eu");
        c.mirrors = vec![eu, mirror("quay", "quay.io", "https://quay.example", None)];
        converge(&mut c);
        c.sources.insert(SourceKind::Secret, NS, "pull", basic_auth("alice", "rotated"));

        for _ in 0..100 {
            let d = c.decide();
            if d.writes() == 0 { break; }
            let restarting: Vec<&NodeView> = d.advance.iter()
                .filter(|a| a.activation == Activation::Restart)
                .map(|a| c.nodes.iter().find(|x| x.name == a.node).unwrap())
                .collect();
            prop_assert!(restarting.len() <= budget);
            prop_assert!(restarting.iter().filter(|n| n.control_plane).count() <= 1);
            c.apply(&d);
            c.agents_succeed();
        }
        prop_assert_eq!(c.decide().writes(), 0);
        for mirror in ["eu", "quay"] {
            let s = c.status(mirror);
            prop_assert_eq!(s.nodes.updated, s.nodes.targeted);
            prop_assert_eq!(&c.condition(mirror, "Ready").0, "True");
        }
    }
}

#[test]
fn a_change_to_one_mirror_leaves_the_status_of_the_others_alone() {
    let mut c = cluster(k3s_nodes(3));
    c.max_unavailable = MaxUnavailable::Count(3);
    c.mirrors = vec![
        mirror("hub", "docker.io", "https://hub.example:5000", None),
        mirror("quay", "quay.io", "https://quay.example:5000", None),
    ];
    converge(&mut c);
    c.mirrors[0].spec.endpoints[0].url = "https://hub.example:5000/v2/elsewhere".into();
    let d = c.decide();
    assert_eq!(d.advance.len(), 3, "all nodes get the new config");
    assert_eq!(
        d.statuses.keys().collect::<Vec<_>>(),
        ["hub"],
        "quay runs its latest everywhere still"
    );
    let events: Vec<(&str, &str)> = d
        .notices
        .iter()
        .map(|n| (n.reason, n.mirror.as_str()))
        .collect();
    assert_eq!(
        events,
        [("RolloutStep", "hub")],
        "no Event on the mirror that only shares the config"
    );
}

#[test]
fn a_config_a_node_is_told_to_have_is_neither_deleted_nor_left_missing() {
    let mut c = cluster(vec![
        node("a", Flavor::K3S, &[]),
        node("b", Flavor::K3S, &[]),
    ]);
    c.mirrors = vec![mirror(
        "hub",
        "docker.io",
        "https://hub.example:5000",
        Some(ObjectRef::named("pull")),
    )];
    let d = c.decide();
    assert_eq!(d.advance.len(), 1, "credentials on k3s: one node at a time");
    let (first, config) = (d.advance[0].node.clone(), d.advance[0].config.clone());
    // The API server took the writes, but the Node cache has not seen the annotation yet,
    // and meanwhile the mirror was paused.
    c.stored.extend(d.create.clone());
    c.agent_role = d.agent_role.clone();
    c.mirrors[0].metadata.annotations = Some([(PAUSED.to_owned(), "true".to_owned())].into());
    let d = c.decide();
    assert!(
        d.delete.is_empty(),
        "{first} is headed for {config}: it stays"
    );

    // The config went missing while a node is told to have it: it is recreated.
    c.node_mut(&first).desired = Some(config.clone());
    c.stored.clear();
    let d = c.decide();
    assert_eq!(d.create.keys().collect::<Vec<_>>(), [&config]);
    let granted = d.agent_role.or(c.agent_role.clone()).unwrap();
    assert!(granted.contains(&config), "the agent may read it");
}

/// One event of a cluster's life, for the history property test.
#[derive(Debug, Clone)]
enum Event {
    /// The credentials change (a restart on k3s) — to one of a few passwords, so changes are
    /// also reverted mid-rollout — or an endpoint moves (hot).
    RotatePassword(u8),
    MoveEndpoint,
    /// The operator decides; a leader killed mid-pass gets only the first `n` node writes
    /// through.
    Pass {
        node_writes: Option<usize>,
    },
    /// One agent acts: starts what it was told, or finishes a restart (failing, if `fail`).
    Agent {
        node: usize,
        fail: bool,
    },
    /// A node's agent state directory is wiped (reinstalled agent): no local record, a new key.
    WipeState {
        node: usize,
    },
    /// A node goes NotReady or comes back.
    ToggleReady {
        node: usize,
    },
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        1 => (0u8..3).prop_map(Event::RotatePassword),
        1 => Just(Event::MoveEndpoint),
        4 => proptest::option::weighted(0.7, 0usize..4).prop_map(|node_writes| Event::Pass { node_writes }),
        6 => (0usize..8, proptest::bool::weighted(0.15)).prop_map(|(node, fail)| Event::Agent { node, fail }),
        1 => (0usize..8).prop_map(|node| Event::WipeState { node }),
        1 => (0usize..8).prop_map(|node| Event::ToggleReady { node }),
    ]
}

/// What one simulated agent knows locally, beside what its Node says.
#[derive(Debug, Clone, Default)]
struct Host {
    /// The config its local record says it runs.
    verified: Option<String>,
    /// A restart under way, for this config (or a rollback).
    restarting: Option<String>,
    key_generation: u32,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Over random histories — credential and endpoint changes, wiped agent state, agents
    /// acting in any order, failures, readiness flapping and leaders killed mid-pass — the
    /// agents, each carrying out exactly the step the operator told it
    /// ([`agent_step`]), never restart more than `maxUnavailable` runtimes at once, nor two
    /// control-plane (or etcd) nodes at once.
    #[test]
    fn restarts_stay_within_the_budget_over_any_history(
        roles in proptest::collection::vec(any::<bool>(), 2..8),
        budget in 1usize..3,
        history in proptest::collection::vec(event(), 1..120),
    ) {
        use regmirror_core::activation::agent_step;
        let nodes = roles.iter().enumerate().map(|(i, cp)| {
            let mut n = node(&format!("n{i}"), Flavor::K3S, &[]);
            n.control_plane = *cp;
            n
        }).collect();
        let mut c = cluster(nodes);
        c.max_unavailable = MaxUnavailable::Count(budget);
        c.mirrors = vec![mirror("hub", "docker.io", "https://mirror.example:5000", Some(ObjectRef::named("pull")))];
        let mut hosts = vec![Host::default(); c.nodes.len()];
        let mut endpoint = 0;
        // The placement a controller keeps while only node states change.
        let mut placement = c.place();
        for event in history {
            match event {
                Event::RotatePassword(to) => {
                    c.sources.insert(SourceKind::Secret, NS, "pull", basic_auth("alice", &format!("p{to}")));
                    placement = c.place();
                }
                Event::MoveEndpoint => {
                    endpoint += 1;
                    c.mirrors[0].spec.endpoints[0].url = format!("https://mirror-{endpoint}.example:5000");
                    c.mirrors[0].metadata.generation = Some(endpoint + 1);
                    placement = c.place();
                }
                Event::Pass { node_writes } => {
                    let mut d = c.decide();
                    let policy = RefPolicy::new(NS);
                    prop_assert_eq!(
                        &conclude(&placement, &c.view(&policy)),
                        &d,
                        "concluding on the kept placement decides what a whole decision does"
                    );
                    let again = regmirror_core::decide::place_reusing(
                        &c.mirrors, &c.sources, &policy, &c.nodes, Some(&placement),
                    );
                    prop_assert_eq!(
                        &conclude(&again, &c.view(&policy)),
                        &d,
                        "placing again with the last placement's renderings decides the same"
                    );
                    if let Some(n) = node_writes {
                        d.advance.truncate(n);
                        d.rekey.truncate(n);
                    }
                    c.apply(&d);
                }
                Event::Agent { node, fail } => {
                    let i = node % c.nodes.len();
                    let host = &mut hosts[i];
                    let n = &mut c.nodes[i];
                    if let Some(config) = host.restarting.take() {
                        // The restart ends: applied, or failed and rolled back.
                        if fail {
                            n.state = Some(NodeState::Failed);
                        } else {
                            n.current = Some(config.clone());
                            host.verified = Some(config);
                            n.state = Some(NodeState::Applied);
                        }
                        continue;
                    }
                    let Some(desired) = n.desired.clone() else { continue };
                    let sealed_for_me = n.key_recipient == n.public_key;
                    let failed_here = n.state == Some(NodeState::Failed) && n.current != n.desired;
                    if host.verified.as_ref() == Some(&desired) || !sealed_for_me || failed_here {
                        continue;
                    }
                    match agent_step(n.current.as_deref(), &desired, n.desired_activation) {
                        Activation::Restart => {
                            host.restarting = Some(desired);
                            n.state = Some(NodeState::Applying);
                        }
                        _ => {
                            n.current = Some(desired.clone());
                            host.verified = Some(desired);
                            n.state = Some(NodeState::Applied);
                        }
                    }
                }
                Event::WipeState { node } => {
                    let i = node % c.nodes.len();
                    if hosts[i].restarting.is_some() {
                        continue; // the agent is mid-restart; a wipe then is a crash, below
                    }
                    hosts[i].verified = None;
                    hosts[i].key_generation += 1;
                    let n = &mut c.nodes[i];
                    n.public_key = Some(format!("key-of-{}-{}", n.name, hosts[i].key_generation));
                }
                Event::ToggleReady { node } => {
                    let i = node % c.nodes.len();
                    c.nodes[i].ready = !c.nodes[i].ready;
                }
            }
            let restarting: Vec<usize> = (0..hosts.len()).filter(|i| hosts[*i].restarting.is_some()).collect();
            prop_assert!(restarting.len() <= budget, "{} restarting, budget {budget}: {:?}", restarting.len(), c.nodes);
            prop_assert!(
                restarting.iter().filter(|i| c.nodes[**i].control_plane).count() <= 1,
                "two control-plane nodes restarting: {:?}", c.nodes
            );
        }
    }
}

#[test]
fn a_node_whose_agent_lost_its_state_is_resealed_without_a_restart() {
    let mut c = cluster(k3s_nodes(2));
    c.mirrors = vec![mirror(
        "hub",
        "docker.io",
        "https://mirror.example:5000",
        Some(ObjectRef::named("pull")),
    )];
    converge(&mut c);
    let running = c.nodes[0].current.clone().unwrap();
    // n0's agent was reinstalled: a new key pair, published.
    c.node_mut("n0").public_key = Some("key-of-n0-new".into());
    let d = c.decide();
    assert!(d.advance.is_empty() && d.create.is_empty(), "{d:#?}");
    assert_eq!(d.rekey.len(), 1);
    let rekey = &d.rekey[0];
    assert_eq!(
        (
            rekey.node.as_str(),
            rekey.config.as_str(),
            rekey.activation,
            rekey.public_key.as_str()
        ),
        ("n0", running.as_str(), Activation::Hot, "key-of-n0-new"),
        "the same config, sealed to the new key; the runtime already runs it"
    );
    c.apply(&d);
    assert_eq!(c.decide().writes(), 0);
}

#[test]
fn only_configs_the_operator_made_are_granted_whatever_an_agent_reports() {
    let mut c = cluster(k3s_nodes(2));
    c.mirrors = vec![mirror(
        "hub",
        "docker.io",
        "https://mirror.example:5000",
        None,
    )];
    converge(&mut c);
    let granted = c.agent_role.clone().unwrap();
    // A compromised agent reports a Helm release Secret, a credential Secret, and a name of
    // a config's form that the operator never made.
    for reported in [
        "sh.helm.release.v1.regmirror.v1",
        "mirror-pull",
        "regmirror-config-0123456789abcdef0123",
    ] {
        c.node_mut("n1").current = Some(reported.into());
        let d = c.decide();
        let role = d
            .agent_role
            .clone()
            .unwrap_or(c.agent_role.clone().unwrap());
        assert_eq!(role, granted, "reporting {reported} grants nothing");
        assert!(!d.delete.contains(&reported.to_owned()));
    }
}

#[test]
fn a_config_too_large_for_a_secret_holds_its_nodes_and_says_why() {
    use base64::Engine;
    let mut c = cluster(vec![
        node("a", Flavor::K3S, &[("region", "eu")]),
        node("b", Flavor::K3S, &[("region", "us")]),
    ]);
    c.max_unavailable = MaxUnavailable::Count(2);
    // A ~220 KB CA bundle (PEM blocks holding DER-shaped bytes), on six endpoints.
    let block = base64::engine::general_purpose::STANDARD.encode([0x30u8; 600]);
    let bundle =
        format!("-----BEGIN CERTIFICATE-----\n{block}\n-----END CERTIFICATE-----\n").repeat(270);
    assert!(bundle.len() > 220_000);
    c.sources.insert(
        SourceKind::ConfigMap,
        NS,
        "big-ca",
        SourceObject {
            data: [("ca.crt".to_owned(), bundle.into_bytes())].into(),
            ..SourceObject::default()
        },
    );
    let mut big = mirror("big", "quay.io", "https://q0.example:5000", None);
    big.spec.endpoints = (0..6)
        .map(|i| Endpoint {
            url: format!("https://q{i}.example:5000"),
            auth: None,
            tls: Some(regmirror_core::api::EndpointTls::with_ca(
                regmirror_core::api::CaRef::from_config_map("big-ca"),
            )),
        })
        .collect();
    big.spec.node_selector = region("eu");
    c.mirrors = vec![
        big,
        mirror("hub", "docker.io", "https://mirror.example:5000", None),
    ];

    let d = c.decide();
    assert_eq!(
        d.advance
            .iter()
            .map(|a| a.node.as_str())
            .collect::<Vec<_>>(),
        ["b"],
        "the node that needs the oversized config is held; the other proceeds"
    );
    c.apply(&d);
    let (status, reason, message) = c.condition("big", "Degraded");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "ConfigTooLarge")
    );
    assert!(message.contains("bytes, more than the"), "{message}");
    assert!(d
        .create
        .values()
        .all(|config| config.sealed_size() <= regmirror_core::decide::MAX_CONFIG_BYTES));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever mix of roles the nodes carry — control-plane, legacy master, etcd-only
    /// servers, workers — no two nodes that hold etcd's quorum are told to restart at once,
    /// nor one while another such node is restarting.
    #[test]
    fn nodes_holding_quorum_restart_one_at_a_time_whatever_their_role_labels(
        roles in proptest::collection::vec(0u8..16, 2..10),
        budget in 1usize..5,
    ) {
        use regmirror_core::contract::{is_control_plane, CONTROL_PLANE_LABELS};
        let nodes: Vec<NodeView> = roles.iter().enumerate().map(|(i, bits)| {
            let mut labels: Vec<(&str, &str)> = CONTROL_PLANE_LABELS.iter().enumerate()
                .filter(|(b, _)| bits & (1 << b) != 0)
                .map(|(_, l)| (*l, "true"))
                .collect();
            if bits & 8 != 0 { labels.push(("node-role.kubernetes.io/worker", "true")); }
            let mut n = node(&format!("n{i}"), Flavor::K3S, &labels);
            n.control_plane = is_control_plane(&n.labels);
            n
        }).collect();
        let mut c = cluster(nodes);
        c.max_unavailable = MaxUnavailable::Count(budget);
        c.mirrors = vec![mirror("hub", "docker.io", "https://mirror.example:5000", Some(ObjectRef::named("pull")))];
        converge(&mut c);
        c.sources.insert(SourceKind::Secret, NS, "pull", basic_auth("alice", "rotated"));
        for _ in 0..100 {
            let d = c.decide();
            if d.writes() == 0 { break; }
            let quorum_restarts = d.advance.iter()
                .filter(|a| a.activation == Activation::Restart)
                .filter(|a| c.nodes.iter().any(|n| n.name == a.node && n.control_plane))
                .count();
            prop_assert!(quorum_restarts <= 1, "{quorum_restarts} quorum members told to restart together");
            c.apply(&d);
            c.agents_succeed();
        }
        prop_assert!(c.nodes.iter().all(|n| n.current == n.desired));
        for (n, bits) in c.nodes.iter().zip(&roles) {
            prop_assert_eq!(n.control_plane, bits & 7 != 0, "etcd-only counts too: {:?}", n.labels);
        }
    }
}

#[test]
fn a_mirror_asking_for_k3s_embedded_registry_names_the_nodes_that_do_not_run_it() {
    let p2p = Flavor::K3S.with_embedded_registry();
    let mut c = cluster(vec![
        node("a", p2p.clone(), &[]),
        node("b", Flavor::K3S, &[]),
    ]);
    let mut hub = mirror("hub", "docker.io", "https://mirror.example:5000", None);
    hub.spec.endpoints.clear();
    hub.spec.embedded_registry = true;
    c.mirrors = vec![hub];

    // b's k3s runs without it: said once, as a Warning, and in the condition with the fix.
    let first = c.decide();
    let warnings: Vec<_> = first
        .notices
        .iter()
        .filter(|n| n.mirror == "hub" && n.reason == "NotRunning")
        .collect();
    assert_eq!(warnings.len(), 1, "{:?}", first.notices);
    assert!(warnings[0].warning);
    converge(&mut c);
    let (status, reason, message) = c.condition("hub", "EmbeddedRegistry");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "NotRunning"));
    assert!(
        message.starts_with("1 of 2 k3s/RKE2 node(s) run without the embedded registry mirror (b)"),
        "{message}"
    );
    assert!(message.contains("--embedded-registry"), "{message}");
    // The configuration itself is on both nodes: Ready, not Degraded.
    assert_eq!(c.condition("hub", "Ready").0, "True");
    assert_eq!(c.condition("hub", "Degraded").0, "False");
    assert_eq!(c.status("hub").nodes.updated, 2);
    let (a, b) = (
        c.nodes[0].current.clone().unwrap(),
        c.nodes[1].current.clone().unwrap(),
    );
    assert_ne!(
        a, b,
        "a node running the embedded registry gets a config of its own"
    );
    assert!(
        c.stored[&a]
            .files
            .keys()
            .all(|p| !p.ends_with("hosts.toml")),
        "k3s writes the hosts.toml files where it runs the embedded registry"
    );

    // b's k3s is restarted with it (its agent reports the new flavor): b moves, with a restart,
    // and the condition turns.
    c.node_mut("b").flavor = Some(p2p);
    let moved = c.decide();
    assert_eq!(moved.advance.len(), 1);
    assert_eq!(moved.advance[0].activation, Activation::Restart);
    converge(&mut c);
    let (status, reason, message) = c.condition("hub", "EmbeddedRegistry");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "Running"),
        "{message}"
    );
    assert_eq!(c.nodes[0].current, c.nodes[1].current);

    // A containerd node has no embedded registry: the mirror cannot reach it, and says why;
    // the k3s nodes keep what they have.
    let before = c.nodes[0].current.clone();
    c.nodes.push(node("c", containerd(), &[]));
    converge(&mut c);
    let (status, _, message) = c.condition("hub", "Degraded");
    assert_eq!(status, "True");
    assert!(message.contains("spec.embeddedRegistry"), "{message}");
    assert_eq!(c.nodes[0].current, before);
    assert_eq!(c.nodes[2].current, None);
}

#[test]
fn the_embedded_registry_condition_is_unknown_until_a_k3s_node_reports() {
    let mut waiting = node("a", Flavor::K3S, &[]);
    waiting.flavor = None;
    let mut c = cluster(vec![waiting]);
    let mut hub = mirror("hub", "docker.io", "https://mirror.example:5000", None);
    hub.spec.embedded_registry = true;
    c.mirrors = vec![hub];
    converge(&mut c);
    let (status, reason, message) = c.condition("hub", "EmbeddedRegistry");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("Unknown", "NoK3sNodes"),
        "{message}"
    );
}

#[test]
fn a_mirror_with_a_cache_waits_for_it_then_puts_it_before_its_endpoints() {
    use regmirror_core::api::CacheSpec;
    use regmirror_core::cache::CacheSite;
    use regmirror_core::model::Credentials;

    let mut c = cluster(vec![node("a", containerd(), &[])]);
    c.mirrors = vec![mirror(
        "hub",
        "docker.io",
        "https://mirror.example:5000",
        Some(ObjectRef::named("pull")),
    )];
    converge(&mut c);
    let before = c.nodes[0].desired.clone();
    assert!(before.is_some(), "the node runs the mirror first");

    // The cache asked for, before it has an address: the node keeps what it has, and the
    // mirror says it is on its way, not broken.
    c.mirrors[0].spec.cache = Some(CacheSpec::default());
    c.mirrors[0].metadata.generation = Some(2);
    let d = c.decide();
    assert!(d.advance.is_empty() && d.create.is_empty(), "{d:#?}");
    c.apply(&d);
    let (status, reason, message) = c.condition("hub", "Progressing");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "CacheStarting")
    );
    assert!(
        message.contains("waiting for the cache regmirror-cache-hub-"),
        "{message}"
    );
    assert_eq!(c.condition("hub", "Degraded").0, "False");
    assert_eq!(c.condition("hub", "Ready").0, "False");
    assert!(
        !d.notices.iter().any(|n| n.warning),
        "a cache starting is no warning: {:?}",
        d.notices
    );
    assert_eq!(c.nodes[0].desired, before);

    // The operator found its address: the cache first, with the operator's CA and the nodes'
    // own credentials; the endpoint after it.
    c.sources.insert_cache(
        "hub",
        CacheSite {
            url: "https://10.43.0.17:5000".into(),
            ca: "-----BEGIN CERTIFICATE-----\ncache CA\n-----END CERTIFICATE-----\n".into(),
            credentials: Credentials::Basic {
                username: "regmirror-node".into(),
                password: "node-pass".into(),
            },
            secret: "regmirror-system/regmirror-cache-hub".into(),
        },
    );
    converge(&mut c);
    assert_eq!(c.condition("hub", "Ready").0, "True");
    let config = &c.stored[c.nodes[0].current.as_ref().unwrap()];
    let hosts = &config.files["/etc/containerd/certs.d/docker.io/hosts.toml"].content;
    let cache = hosts.find("https://10.43.0.17:5000").expect(hosts);
    let upstream = hosts.find("https://mirror.example:5000").expect(hosts);
    assert!(cache < upstream, "the cache is tried first:\n{hosts}");
    assert!(
        config
            .files
            .values()
            .any(|f| f.content.contains("cache CA")),
        "the nodes get the cache's CA"
    );
    let basic = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        "regmirror-node:node-pass",
    );
    assert!(
        hosts.contains(&basic),
        "the nodes' credentials for the cache:\n{hosts}"
    );
}

/// A cluster whose one node runs `mirror`, which then asks for a cache it may not have: the
/// node keeps its config and the mirror is Degraded (InvalidSpec); its message comes back.
fn asking_for_a_cache_refused(mirror: RegistryMirror) -> (Cluster, String) {
    use regmirror_core::api::CacheSpec;

    let mut c = cluster(vec![node("a", containerd(), &[])]);
    let name = mirror.metadata.name.clone().unwrap();
    c.mirrors = vec![mirror];
    converge(&mut c);
    let before = c.nodes[0].desired.clone();
    assert!(before.is_some(), "the node runs the mirror first");
    c.mirrors[0].spec.cache = Some(CacheSpec::default());
    c.mirrors[0].metadata.generation = Some(2);
    let d = c.decide();
    assert!(d.advance.is_empty() && d.create.is_empty(), "{d:#?}");
    c.apply(&d);
    assert_eq!(c.nodes[0].desired, before, "nodes keep their configuration");
    let (status, reason, message) = c.condition(&name, "Degraded");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "InvalidSpec"));
    (c, message)
}

#[test]
fn a_cache_that_cannot_proxy_its_upstream_is_an_invalid_spec() {
    let url = "https://mirror.example:5000/v2/hub";
    let (_, message) = asking_for_a_cache_refused(mirror("hub", "docker.io", url, None));
    assert!(
        message.starts_with(
            "spec.cache: the cache's upstream https://mirror.example:5000/v2/hub has a path"
        ),
        "{message}"
    );
}

/// containerd sends every registry's pulls to the hosts of `*`, naming the registry only in
/// `?ns=`, which distribution's proxy ignores: a cache there would serve quay.io/x/y as its
/// upstream's x/y. The mirror is refused, and no cache is asked of the operator.
#[test]
fn a_cache_for_every_registry_is_an_invalid_spec() {
    use regmirror_core::resolve::cache_upstream;

    let url = "https://mirror.example:5000";
    let (c, message) = asking_for_a_cache_refused(mirror("all", "*", url, None));
    assert!(
        message.starts_with("spec.cache: cache is not for registry '*'"),
        "{message}"
    );
    let upstream = cache_upstream(&c.mirrors[0], &c.sources, &RefPolicy::new(NS));
    assert!(upstream.is_err(), "the operator runs no cache for it");
}

#[test]
fn a_cache_the_operator_could_not_set_up_degrades_its_mirror_naming_why() {
    use regmirror_core::api::CacheSpec;

    let mut c = cluster(vec![node("a", containerd(), &[])]);
    let mut m = mirror("hub", "docker.io", "https://mirror.example:5000", None);
    m.spec.cache = Some(CacheSpec::default());
    c.mirrors = vec![m];
    c.sources
        .insert_cache_failure("hub", "apply Service regmirror-cache/x: forbidden".into());
    let d = c.decide();
    c.apply(&d);
    let (status, reason, message) = c.condition("hub", "Degraded");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "InvalidSpec"));
    assert!(
        message.contains("could not be set up: apply Service regmirror-cache/x: forbidden"),
        "{message}"
    );
    assert!(d.advance.is_empty(), "{d:#?}");
}
