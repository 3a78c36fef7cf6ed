//! Restarts for real (issue 11 item 5): the chart on a real node (testbed::node) with the k3s
//! flavor and `agent.restartCommand` set to the client of the node's containerd supervisor (the
//! testbed's stand-in for systemd; there is no systemd here). A RegistryMirror with basic-auth
//! credentials, which k3s reads only at start, makes the agent pod restart the node's
//! containerd through that command: exactly one restart, a new containerd, the Node Ready
//! again, the agent pod not restarted, and a Pod started afterwards running. A restart that
//! fails makes the agent roll back (registries.yaml restored, restarted again) and report
//! Failed. Restarts through systemd over D-Bus keep their own test
//! (node-agent/tests/systemd_bus.rs).

mod on_node;

use std::collections::BTreeMap;
use std::time::Duration;

use on_node::{wait_for, OnNode, NAMESPACE};
use regmirror_testbed::Node;

const MIRROR_HOST: &str = "mirror.example:5000";

/// One node at a time in this test binary: a node's kubelet manages the cgroups under a root
/// named after the process, so two nodes of one process would fight over each other's pods.
static ONE_NODE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_node() -> std::sync::MutexGuard<'static, ()> {
    ONE_NODE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A node with the chart installed as on k3s: `agent.flavor=k3s`, restarts through the node's
/// containerd supervisor; returns once the agent is ready and reports the flavor k3s.
fn start_as_k3s() -> OnNode {
    let on_node = OnNode::start();
    on_node.helm_install(&[
        "--set",
        "agent.flavor=k3s",
        "--set",
        &format!(
            "agent.restartCommand={}",
            Node::restart_command_in_agent_pod()
        ),
        "--set",
        "agent.readyTimeoutSeconds=90",
    ]);
    on_node.agent_ready();
    wait_for("the agent reporting k3s", Duration::from_secs(60), || {
        let a = annotations(&on_node);
        (a.get("regmirror.io/flavor").map(String::as_str) == Some("k3s")).then(String::new)
    });
    on_node
}

/// The annotations of Node `node-1`.
fn annotations(on_node: &OnNode) -> BTreeMap<String, String> {
    let json = on_node.kubectl(&[
        "get",
        "node",
        "node-1",
        "-o",
        "jsonpath={.metadata.annotations}",
    ]);
    serde_json::from_str(&json).unwrap_or_default()
}

#[test]
fn the_agent_restarts_the_nodes_runtime_through_its_restart_command() {
    let _one = one_node();
    let on_node = start_as_k3s();
    let node = &on_node.node;
    let kubectl = |args: &[&str]| on_node.kubectl(args);
    let agent_pod = || {
        kubectl(&[
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            "app.kubernetes.io/component=agent",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.phase} restarts={.status.containerStatuses[0].restartCount}{\"\\n\"}{end}",
        ])
    };
    let agent_before = agent_pod();
    assert!(
        agent_before.trim().ends_with("Running restarts=0"),
        "{agent_before}"
    );
    let annotations = || annotations(&on_node);
    let node_ready = || {
        kubectl(&[
            "get",
            "node",
            "node-1",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])
    };
    assert_eq!(node_ready(), "True");

    // Credentials for the mirror: on k3s, registries.yaml's auth is read only at start.
    let secret = |password: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: mirror-pull\n  namespace: {NAMESPACE}\n  annotations: {{regmirror.io/allowed-hosts: \"{MIRROR_HOST}\"}}\ntype: kubernetes.io/basic-auth\nstringData: {{username: puller, password: {password}}}\n"
        )
    };
    let registries_yaml = node.host_root().join("etc/rancher/k3s/registries.yaml");
    let pid_before = node.containerd_pid();
    assert_eq!(node.containerd_restarts(), 0);
    on_node.apply(&secret("first"));
    on_node.apply(&format!(
        "apiVersion: regmirror.io/v1alpha1\nkind: RegistryMirror\nmetadata:\n  name: with-auth\nspec:\n  registry: registry.example\n  endpoints:\n    - url: https://{MIRROR_HOST}\n      auth:\n        secretRef: {{name: mirror-pull}}\n"
    ));
    let started = std::time::Instant::now();
    // The agent reports the config it was told, Applied, after the restart.
    let applied = wait_for(
        "the agent reporting the config Applied",
        Duration::from_secs(180),
        || {
            let a = annotations();
            let desired = a.get("regmirror.io/desired-config")?;
            (a.get("regmirror.io/current-config") == Some(desired)
                && a.get("regmirror.io/state").map(String::as_str) == Some("Applied"))
            .then(|| format!("{a:#?}"))
        },
    );
    println!(
        "applied with a restart in {:?}:\n{applied}",
        started.elapsed()
    );
    let first = annotations();
    assert_eq!(
        first["regmirror.io/desired-activation"], "Restart",
        "{applied}"
    );
    assert!(
        first["regmirror.io/message"].contains("restarted"),
        "{applied}"
    );
    let written = std::fs::read_to_string(&registries_yaml).unwrap();
    assert!(
        written.contains("registry.example") && written.contains(MIRROR_HOST),
        "{written}"
    );
    assert!(
        written.contains("puller"),
        "credentials in registries.yaml: {written}"
    );
    // A real restart, exactly one, of the node's containerd; the Node Ready again (the agent
    // reports Applied only then), the agent pod the same and never restarted.
    assert_eq!(node.containerd_restarts(), 1, "one restart for the change");
    let pid_after = node.containerd_pid();
    assert_ne!(pid_after, pid_before, "a new containerd");
    assert_eq!(node_ready(), "True");
    assert_eq!(agent_pod(), agent_before, "the agent pod kept running");
    // containerd serves the CRI again: a Pod started after the restart runs.
    let pause = &on_node.images.get("pause").reference;
    on_node.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: after-restart\n  namespace: default\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n    - name: c\n      image: {pause}\n      imagePullPolicy: Never\n"
    ));
    wait_for(
        "a Pod started after the restart Running",
        Duration::from_secs(90),
        || {
            let phase = kubectl(&[
                "get",
                "pod",
                "after-restart",
                "-o",
                "jsonpath={.status.phase}",
            ]);
            (phase == "Running").then_some(phase)
        },
    );

    // A restart that fails: the agent rolls back to the first config (restarting for it again)
    // and reports the new one Failed.
    node.fail_next_restart();
    on_node.apply(&secret("second"));
    wait_for(
        "the agent reporting the new config Failed",
        Duration::from_secs(180),
        || {
            let a = annotations();
            (a.get("regmirror.io/desired-config") != first.get("regmirror.io/desired-config")
                && a.get("regmirror.io/state").map(String::as_str) == Some("Failed"))
            .then(String::new)
        },
    );
    let failed = annotations();
    let message = &failed["regmirror.io/message"];
    assert!(message.contains("restart command"), "{failed:#?}");
    assert!(
        message.contains(&format!(
            "restored {}",
            first["regmirror.io/current-config"]
        )),
        "{failed:#?}"
    );
    assert_eq!(
        failed.get("regmirror.io/current-config"),
        first.get("regmirror.io/current-config"),
        "the first config still current"
    );
    assert_eq!(
        std::fs::read_to_string(&registries_yaml).unwrap(),
        written,
        "registries.yaml restored"
    );
    assert_eq!(
        node.containerd_restarts(),
        2,
        "the failed restart did nothing; the rollback restarted once"
    );
    assert_ne!(node.containerd_pid(), pid_after);
    assert_eq!(node_ready(), "True");
    assert_eq!(agent_pod(), agent_before, "the agent pod kept running");
    println!(
        "failed and rolled back {:?} after the start",
        started.elapsed()
    );
    // Stopping the node leaves nothing behind: the supervisor and the restarted containerd go.
    let problems = on_node.node.stop();
    assert!(problems.is_empty(), "left behind: {problems:#?}");
}

/// k3s's embedded registry mirror, for real through the operator, the agent and the API
/// server (issue 12 item 2): the Node label k3s puts on a node that runs it turns the agent's
/// flavor to `k3s+embedded-registry`; the node then moves, by one budgeted restart, to a
/// configuration without regmirror's hosts.toml files (k3s writes those, with its P2P endpoint
/// first); a mirror listing docker.io for the peers alone restarts it once more, and its
/// `EmbeddedRegistry` condition says the node runs it.
#[test]
fn a_node_that_runs_k3s_embedded_registry_leaves_hosts_toml_to_k3s() {
    let _one = one_node();
    let on_node = start_as_k3s();
    let node = &on_node.node;
    let kubectl = |args: &[&str]| on_node.kubectl(args);
    let annotations = || annotations(&on_node);
    // Applied, running what it was told (a config other than `left`), reporting `flavor`.
    let settled = |what: &str, flavor: &str, left: Option<&str>| {
        wait_for(what, Duration::from_secs(180), || {
            let a = annotations();
            let desired = a.get("regmirror.io/desired-config")?;
            (a.get("regmirror.io/current-config") == Some(desired)
                && Some(desired.as_str()) != left
                && a.get("regmirror.io/state").map(String::as_str) == Some("Applied")
                && a.get("regmirror.io/flavor").map(String::as_str) == Some(flavor))
            .then(|| format!("{a:#?}"))
        });
        annotations()
    };
    let hosts_toml = node
        .host_root()
        .join("var/lib/rancher/k3s/agent/etc/containerd/certs.d/registry.example/hosts.toml");
    let registries_yaml = node.host_root().join("etc/rancher/k3s/registries.yaml");

    // Plain k3s: a mirror without credentials is live, its hosts.toml written by regmirror.
    let before = annotations().get("regmirror.io/current-config").cloned();
    on_node.apply(&format!(
        "apiVersion: regmirror.io/v1alpha1\nkind: RegistryMirror\nmetadata:\n  name: example\nspec:\n  registry: registry.example\n  endpoints:\n    - url: https://{MIRROR_HOST}\n"
    ));
    let plain = settled("the plain k3s config Applied", "k3s", before.as_deref());
    assert_eq!(plain["regmirror.io/desired-activation"], "Hot");
    assert!(hosts_toml.is_file(), "regmirror writes k3s's hosts.toml");
    assert_eq!(node.containerd_restarts(), 0);

    // k3s starts its embedded registry and labels the Node: the agent reports the flavor, and
    // the node moves once, with a restart, to a config without regmirror's hosts.toml.
    kubectl(&["label", "node", "node-1", "p2p.k3s.cattle.io/enabled=true"]);
    let moved = settled(
        "the node on a config for k3s+embedded-registry",
        "k3s+embedded-registry",
        Some(&plain["regmirror.io/current-config"]),
    );
    assert_ne!(
        moved["regmirror.io/current-config"],
        plain["regmirror.io/current-config"]
    );
    assert_eq!(moved["regmirror.io/desired-activation"], "Restart");
    assert_eq!(node.containerd_restarts(), 1, "one restart for the move");
    assert!(
        !hosts_toml.exists(),
        "regmirror's hosts.toml removed: k3s writes its own there"
    );
    let written = std::fs::read_to_string(&registries_yaml).unwrap();
    assert!(written.contains(MIRROR_HOST), "{written}");

    // docker.io for the peers alone: registries.yaml changes, so k3s restarts once more.
    on_node.apply(
        "apiVersion: regmirror.io/v1alpha1\nkind: RegistryMirror\nmetadata:\n  name: docker-hub-p2p\nspec:\n  registry: docker.io\n  embeddedRegistry: true\n",
    );
    let condition = || {
        kubectl(&[
            "get",
            "registrymirror",
            "docker-hub-p2p",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"EmbeddedRegistry\")].status} {.status.conditions[?(@.type==\"EmbeddedRegistry\")].reason} {.status.conditions[?(@.type==\"Ready\")].status}",
        ])
    };
    let shown = wait_for(
        "docker-hub-p2p Ready, the embedded registry Running",
        Duration::from_secs(180),
        || {
            let c = condition();
            (c == "True Running True").then_some(c)
        },
    );
    println!("docker-hub-p2p: {shown}");
    let last = settled(
        "the node on the config with docker.io",
        "k3s+embedded-registry",
        Some(&moved["regmirror.io/current-config"]),
    );
    assert_eq!(last["regmirror.io/desired-activation"], "Restart");
    assert_eq!(node.containerd_restarts(), 2, "one restart for the change");
    let written = std::fs::read_to_string(&registries_yaml).unwrap();
    assert!(written.contains("docker.io: {}"), "{written}");
    let generated: Vec<_> = walkdir(
        &node
            .host_root()
            .join("var/lib/rancher/k3s/agent/etc/containerd/certs.d"),
    );
    assert!(
        generated.is_empty(),
        "regmirror wrote no hosts.toml: {generated:?}"
    );

    let problems = on_node.node.stop();
    assert!(problems.is_empty(), "left behind: {problems:#?}");
}

/// Every file under `dir` (none if it does not exist).
fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}
