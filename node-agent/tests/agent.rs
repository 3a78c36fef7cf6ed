//! The agent applying configurations to a host root, against a real containerd pulling through
//! a real docker-registry (TLS from a test CA, basic auth), all on 127.0.0.1: hot applies,
//! a rotated password, broken configurations rolled back with the previous pull path intact,
//! and a restart through a configured command, observed on a real process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use regmirror_core::activation::{activation, Activation};
use regmirror_core::api::Endpoint;
use regmirror_core::contract::{config_secret_name, NodeState};
use regmirror_core::node::Flavor;
use regmirror_core::render::{render, RenderedConfig};
use regmirror_node_agent::agent::{Agent, NotReady, Outcome, Timeouts};
use regmirror_node_agent::detect::Host;
use regmirror_node_agent::restart::Activator;
use regmirror_testbed::world::{
    assert_failed_with, assert_pulled, containerd, dead_endpoint, plain_with_auth, secure, World,
};
use regmirror_testbed::Containerd;

const HOSTS_DIR: &str = "/etc/containerd/certs.d";

const TIMEOUTS: Timeouts = Timeouts {
    probe: Some(Duration::from_secs(5)),
    ready: Duration::from_secs(20),
};

async fn node_is_ready(_: Activation, _: Timestamp, _: Duration) -> Result<(), NotReady> {
    Ok(())
}

/// A containerd host under a root directory, with an activator that must never be used:
/// containerd reads hosts.toml at every pull.
struct ContainerdNode {
    world: World,
    root: tempfile::TempDir,
    containerd: Containerd,
    agent: Agent,
    restart_marker: PathBuf,
}

impl ContainerdNode {
    fn new() -> Self {
        let world = World::new(secure());
        let root = tempfile::tempdir().unwrap();
        let restart_marker = root.path().join("restarted");
        let runtime = Host {
            flavor: Flavor::Containerd {
                hosts_dir: HOSTS_DIR.into(),
            },
            unit: "containerd.service".into(),
            warning: None,
        };
        let activator = Activator::Command {
            command: format!("touch {}", restart_marker.display()),
        };
        let agent = Agent::new(root.path(), runtime, activator, TIMEOUTS);
        let containerd = containerd(&world);
        ContainerdNode {
            world,
            root,
            containerd,
            agent,
            restart_marker,
        }
    }

    fn config(&self, endpoints: Vec<Endpoint>) -> RenderedConfig {
        render(
            &[&self.world.resolved(endpoints)],
            &self.agent.runtime.flavor,
        )
        .unwrap()
    }

    /// Applies `config` with the step the operator decides for it (always hot here).
    async fn apply(&self, config: &RenderedConfig) -> Outcome {
        let step = activation(self.agent.host.last_good().unwrap().as_ref(), config);
        assert_eq!(step, Activation::Hot);
        self.agent
            .apply(&config_secret_name(config), config, step, node_is_ready)
            .await
    }

    fn pull(&self) -> regmirror_testbed::Pull {
        let hosts_dir = self.root.path().join(HOSTS_DIR.trim_start_matches('/'));
        self.containerd.pull(&hosts_dir, &self.world.image)
    }

    fn assert_not_restarted(&self) {
        assert!(
            !self.restart_marker.exists(),
            "containerd must not be restarted for hosts.toml changes"
        );
    }
}

fn applied(outcome: &Outcome, config: &RenderedConfig) {
    assert_eq!(outcome.state, NodeState::Applied, "{}", outcome.message);
    assert_eq!(outcome.current, Some(config_secret_name(config)));
    assert_eq!(outcome.activated, None);
}

#[tokio::test]
async fn a_pull_goes_through_the_mirror_with_ca_auth_and_fallback_without_a_restart() {
    let node = ContainerdNode::new();
    assert_failed_with(node.pull(), "connection refused");

    let down = dead_endpoint("https");
    let config = node.config(vec![down, node.world.endpoint(true, Some("mirror-pull"))]);
    let outcome = node.apply(&config).await;
    applied(&outcome, &config);
    assert!(
        outcome.message.contains("warning") && outcome.message.contains("cannot connect"),
        "the dead first endpoint is worth a warning, not a failure: {}",
        outcome.message
    );
    assert_pulled(node.pull());
    node.assert_not_restarted();
}

#[tokio::test]
async fn a_rotated_password_takes_effect_without_a_restart() {
    let node = ContainerdNode::new();
    // The registry's password was changed before the Secret caught up.
    let stale = node.config(vec![node.world.endpoint(true, Some("wrong-pull"))]);
    applied(&node.apply(&stale).await, &stale);
    assert_failed_with(node.pull(), "401 Unauthorized");

    let rotated = node.config(vec![node.world.endpoint(true, Some("mirror-pull"))]);
    applied(&node.apply(&rotated).await, &rotated);
    assert_pulled(node.pull());
    node.assert_not_restarted();
}

#[tokio::test]
async fn a_config_whose_ca_file_is_missing_is_rolled_back() {
    let node = ContainerdNode::new();
    let good = node.config(vec![node.world.endpoint(true, Some("mirror-pull"))]);
    applied(&node.apply(&good).await, &good);

    // The same mirror, but the CA file it names is not there.
    let mut broken = node.config(vec![node.world.endpoint(true, Some("mirror-pull"))]);
    broken.files.retain(|path, _| !path.ends_with("/ca.crt"));
    broken.restart_key = "broken".into();
    let outcome = node.apply(&broken).await;
    assert_eq!(outcome.state, NodeState::Failed);
    assert!(outcome.rolled_back);
    assert_eq!(outcome.current, Some(config_secret_name(&good)));
    assert!(
        outcome.message.contains("CA file") && outcome.message.contains("ca.crt"),
        "{}",
        outcome.message
    );
    assert!(
        outcome
            .message
            .ends_with(&format!("restored {}", config_secret_name(&good))),
        "{}",
        outcome.message
    );
    assert_pulled(node.pull());
}

#[tokio::test]
async fn a_config_with_a_dead_endpoint_is_rolled_back() {
    let node = ContainerdNode::new();
    let good = node.config(vec![node.world.endpoint(true, Some("mirror-pull"))]);
    applied(&node.apply(&good).await, &good);

    let dead = dead_endpoint("https");
    let broken = node.config(vec![dead]);
    let outcome = node.apply(&broken).await;
    assert_eq!(outcome.state, NodeState::Failed, "{}", outcome.message);
    assert!(
        outcome.message.contains("no endpoint in") && outcome.message.contains("answers"),
        "{}",
        outcome.message
    );
    assert_eq!(outcome.current, Some(config_secret_name(&good)));
    assert_pulled(node.pull());
    node.assert_not_restarted();
}

#[tokio::test]
async fn a_first_config_that_fails_leaves_nothing_behind() {
    let node = ContainerdNode::new();
    let dead = dead_endpoint("https");
    let outcome = node.apply(&node.config(vec![dead])).await;
    assert_eq!(outcome.state, NodeState::Failed);
    assert_eq!(outcome.current, None, "no configuration of ours runs here");
    let hosts_dir = node.root.path().join(HOSTS_DIR.trim_start_matches('/'));
    let left: Vec<_> = walk(&hosts_dir);
    assert!(left.is_empty(), "files left behind: {left:?}");
}

#[tokio::test]
async fn a_config_for_another_flavor_is_refused_untouched() {
    // Rendered before the operator read this node's flavor: the node waits for one rendered
    // for it, and the config is not failed (that would stop it on every other node).
    let node = ContainerdNode::new();
    let k3s = render(
        &[&node.world.resolved(vec![node.world.endpoint(true, None)])],
        &Flavor::K3S,
    )
    .unwrap();
    let outcome = node.apply(&k3s).await;
    assert_eq!(outcome.state, NodeState::Applying);
    assert_eq!(outcome.activated, None);
    assert!(
        outcome
            .message
            .starts_with("waiting for a configuration rendered for containerd: regmirror-config-")
            && outcome
                .message
                .contains("was rendered for k3s; nothing was written"),
        "{}",
        outcome.message
    );
    assert!(walk(node.root.path()).is_empty());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if !path.ends_with("var/lib/regmirror") {
                    found.extend(walk(&path));
                }
            } else {
                found.push(path);
            }
        }
    }
    found
}

/// A stand-in runtime service: a real process whose pid the restart command replaces.
struct Service {
    pid_file: PathBuf,
}

impl Service {
    fn start(dir: &Path) -> Service {
        let pid_file = dir.join("runtime.pid");
        let service = Service { pid_file };
        std::process::Command::new("sh")
            .args(["-c", &service.start_command()])
            .status()
            .unwrap();
        service
    }

    fn start_command(&self) -> String {
        format!(
            "sleep 300 >/dev/null 2>&1 & echo $! > {}",
            self.pid_file.display()
        )
    }

    /// What the agent is configured to run: stop the process, start a new one.
    fn restart_command(&self) -> String {
        format!(
            "kill $(cat {pid}) && {{ {start}; }}",
            pid = self.pid_file.display(),
            start = self.start_command()
        )
    }

    fn pid(&self) -> u32 {
        std::fs::read_to_string(&self.pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn alive(pid: u32) -> bool {
        // A killed child of ours may linger as a zombie; only a running process counts.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.pid().to_string())
            .status();
    }
}

#[tokio::test]
async fn k3s_credentials_restart_the_runtime_through_the_configured_command() {
    let world = World::new(plain_with_auth());
    let root = tempfile::tempdir().unwrap();
    let service = Service::start(root.path());
    let before = service.pid();
    assert!(Service::alive(before));

    let runtime = Host {
        flavor: Flavor::K3S,
        unit: "k3s-agent.service".into(),
        warning: None,
    };
    let activator = Activator::Command {
        command: service.restart_command(),
    };
    let agent = Agent::new(root.path(), runtime, activator, TIMEOUTS);
    let config = render(
        &[&world.resolved(vec![world.endpoint(false, Some("mirror-pull"))])],
        &Flavor::K3S,
    )
    .unwrap();
    let ready_checks = std::sync::atomic::AtomicUsize::new(0);
    let outcome = agent
        .apply(
            &config_secret_name(&config),
            &config,
            activation(None, &config),
            |step, since, timeout| {
                ready_checks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                node_is_ready(step, since, timeout)
            },
        )
        .await;
    assert_eq!(outcome.state, NodeState::Applied, "{}", outcome.message);
    assert_eq!(outcome.activated, Some(Activation::Restart));
    assert!(
        outcome.message.contains("k3s-agent.service restarted"),
        "{}",
        outcome.message
    );
    let after = service.pid();
    assert_ne!(before, after, "a new runtime process runs");
    let stopped = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        !Service::alive(before)
    });
    assert!(stopped, "the old one was stopped");
    assert!(Service::alive(after));
    assert_eq!(
        ready_checks.into_inner(),
        1,
        "the node was checked for readiness after the restart"
    );

    // Nothing about credentials changed: the same config again takes no restart.
    let again = agent
        .apply(
            &config_secret_name(&config),
            &config,
            activation(Some(&config), &config),
            node_is_ready,
        )
        .await;
    assert_eq!(again.activated, None);
    assert_eq!(service.pid(), after);
}

#[tokio::test]
async fn a_runtime_that_does_not_come_back_is_rolled_back_and_restarted_again() {
    let world = World::new(plain_with_auth());
    let root = tempfile::tempdir().unwrap();
    let runtime = Host {
        flavor: Flavor::K3S,
        unit: "k3s.service".into(),
        warning: None,
    };
    let attempts = root.path().join("attempts");
    let activator = Activator::Command {
        command: format!("echo x >> {}; exit 3", attempts.display()),
    };
    let agent = Agent::new(root.path(), runtime, activator, TIMEOUTS);
    let config = render(
        &[&world.resolved(vec![world.endpoint(false, Some("mirror-pull"))])],
        &Flavor::K3S,
    )
    .unwrap();
    let outcome = agent
        .apply(
            &config_secret_name(&config),
            &config,
            Activation::Restart,
            node_is_ready,
        )
        .await;
    assert_eq!(outcome.state, NodeState::Failed);
    assert!(
        outcome.message.contains("failed (exit status: 3)"),
        "{}",
        outcome.message
    );
    let runs = std::fs::read_to_string(&attempts).unwrap().lines().count();
    assert_eq!(
        runs, 2,
        "once for the new config, once for the restored one"
    );
    assert!(!root.path().join("etc/rancher/k3s/registries.yaml").exists());
}

#[tokio::test]
async fn a_failed_first_config_gives_the_node_its_hand_written_file_back() {
    let world = World::new(plain_with_auth());
    let root = tempfile::tempdir().unwrap();
    let registries = root.path().join("etc/rancher/k3s/registries.yaml");
    std::fs::create_dir_all(registries.parent().unwrap()).unwrap();
    std::fs::write(&registries, "mirrors: {hand-written: {}}\n").unwrap();
    let runtime = Host {
        flavor: Flavor::K3S,
        unit: "k3s.service".into(),
        warning: None,
    };
    let agent = Agent::new(
        root.path(),
        runtime,
        Activator::Command {
            command: "true".into(),
        },
        TIMEOUTS,
    );
    let dead = dead_endpoint("https");
    let config = render(&[&world.resolved(vec![dead])], &Flavor::K3S).unwrap();
    let name = config_secret_name(&config);
    let outcome = agent
        .apply(&name, &config, Activation::Restart, node_is_ready)
        .await;
    assert_eq!(outcome.state, NodeState::Failed);
    assert_eq!(
        std::fs::read_to_string(&registries).unwrap(),
        "mirrors: {hand-written: {}}\n"
    );

    // The host remembers that this config failed here, and what it runs instead.
    let report = agent.last_report().unwrap();
    assert_eq!(
        (report.config.as_str(), report.state),
        (name.as_str(), NodeState::Failed)
    );
    assert_eq!(report.message, outcome.message);
    assert_eq!(agent.verified(), None);
}

/// A Node as the agent sees it: what the operator told it, and what it reported running.
fn told(
    desired: &str,
    step: Activation,
    reported: Option<&str>,
) -> k8s_openapi::api::core::v1::Node {
    use regmirror_core::contract::{CURRENT_CONFIG, DESIRED_ACTIVATION, DESIRED_CONFIG};
    let mut annotations = std::collections::BTreeMap::from([
        (DESIRED_CONFIG.to_owned(), desired.to_owned()),
        (DESIRED_ACTIVATION.to_owned(), step.as_str().to_owned()),
    ]);
    if let Some(reported) = reported {
        annotations.insert(CURRENT_CONFIG.to_owned(), reported.to_owned());
    }
    let mut node = k8s_openapi::api::core::v1::Node::default();
    node.metadata.annotations = Some(annotations);
    node
}

#[tokio::test]
async fn k3s_nodes_whose_state_was_wiped_restart_nothing_on_a_hot_change() {
    use regmirror_node_agent::watch::step_for;
    let world = World::new(plain_with_auth());
    let root = tempfile::tempdir().unwrap();
    let service = Service::start(root.path());
    let runtime = Host {
        flavor: Flavor::K3S,
        unit: "k3s-agent.service".into(),
        warning: None,
    };
    let agent = Agent::new(
        root.path(),
        runtime,
        Activator::Command {
            command: service.restart_command(),
        },
        TIMEOUTS,
    );
    let first = render(
        &[&world.resolved(vec![world.endpoint(false, Some("mirror-pull"))])],
        &Flavor::K3S,
    )
    .unwrap();
    let first_name = config_secret_name(&first);
    let (step, _) = step_for(
        &told(&first_name, activation(None, &first), None),
        &first_name,
        agent.verified().as_deref(),
    );
    assert_eq!(
        step,
        Activation::Restart,
        "credentials on k3s: a budgeted restart"
    );
    let outcome = agent.apply(&first_name, &first, step, node_is_ready).await;
    assert_eq!(outcome.state, NodeState::Applied, "{}", outcome.message);
    let running = service.pid();

    // The agent is reinstalled: its state directory is gone.
    std::fs::remove_dir_all(root.path().join(regmirror_node_agent::hostfs::STATE_DIR)).unwrap();
    assert_eq!(agent.verified(), None);

    // The operator, which knows the node runs `first`, tells it the same config again (a
    // resealed key) with no step: the agent writes the files and restarts nothing.
    let (step, note) = step_for(
        &told(&first_name, Activation::Hot, Some(&first_name)),
        &first_name,
        None,
    );
    assert_eq!(step, Activation::Hot);
    assert!(note.unwrap().contains("was missing"));
    let outcome = agent.apply(&first_name, &first, step, node_is_ready).await;
    assert_eq!(outcome.state, NodeState::Applied, "{}", outcome.message);
    assert_eq!(outcome.activated, None);
    assert_eq!(service.pid(), running, "no restart");

    // Wiped again, mid-way through a hot change (a second endpoint; the same credentials):
    // the agent has no record, yet carries out the operator's hot step.
    std::fs::remove_dir_all(root.path().join(regmirror_node_agent::hostfs::STATE_DIR)).unwrap();
    let second = render(
        &[&world.resolved(vec![
            world.endpoint(false, Some("mirror-pull")),
            dead_endpoint("https"),
        ])],
        &Flavor::K3S,
    )
    .unwrap();
    let decided = activation(Some(&first), &second);
    assert_eq!(
        decided,
        Activation::Hot,
        "the operator's view: no credential change"
    );
    let second_name = config_secret_name(&second);
    let (step, note) = step_for(
        &told(&second_name, decided, Some(&first_name)),
        &second_name,
        agent.verified().as_deref(),
    );
    assert_eq!(
        step,
        Activation::Hot,
        "without its record the agent alone would have restarted k3s"
    );
    assert!(note.unwrap().contains("no record"));
    let outcome = agent
        .apply(&second_name, &second, step, node_is_ready)
        .await;
    assert_eq!(outcome.state, NodeState::Applied, "{}", outcome.message);
    assert_eq!(outcome.activated, None);
    assert_eq!(service.pid(), running, "zero restarts");
}
