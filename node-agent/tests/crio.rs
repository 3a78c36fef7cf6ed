//! CRI-O nodes are verified too: the agent probes the mirrors the rendered config lists for
//! them, against a real docker-registry (TLS from a test CA, basic auth) on 127.0.0.1, and a
//! config whose mirror is down is rolled back, reloading CRI-O again. What the host holds after
//! each apply is read by skopeo (containers/image, what CRI-O pulls with).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
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
use regmirror_testbed::world::{assert_pulled, dead_endpoint, secure, World};
use regmirror_testbed::{Pull, Skopeo};

const TIMEOUTS: Timeouts = Timeouts {
    probe: Some(Duration::from_secs(5)),
    ready: Duration::from_secs(20),
};

const REGISTRIES_CONF: &str = "/etc/containers/registries.conf.d/50-regmirror.conf";
const AUTH_FILE: &str = "/etc/crio/regmirror/auth.json";

/// A CRI-O host under a root directory, whose reload command counts its runs.
struct CrioNode {
    world: World,
    root: tempfile::TempDir,
    agent: Agent,
    reloads: PathBuf,
    ready_checks: AtomicUsize,
}

impl CrioNode {
    fn new() -> Self {
        let world = World::new(secure());
        let root = tempfile::tempdir().unwrap();
        let reloads = world.dir.path().join("reloads");
        let runtime = Host {
            flavor: Flavor::Crio,
            unit: "crio.service".into(),
            warning: None,
        };
        let activator = Activator::Command {
            command: format!("echo reload >> {}", reloads.display()),
        };
        let agent = Agent::new(root.path(), runtime, activator, TIMEOUTS);
        CrioNode {
            world,
            root,
            agent,
            reloads,
            ready_checks: AtomicUsize::new(0),
        }
    }

    fn config(&self, endpoints: Vec<Endpoint>) -> RenderedConfig {
        render(&[&self.world.resolved(endpoints)], &Flavor::Crio).unwrap()
    }

    /// Applies `config` with the step the operator decides for it: a reload, for CRI-O.
    async fn apply(&self, config: &RenderedConfig) -> Outcome {
        let step = activation(self.agent.host.last_good().unwrap().as_ref(), config);
        assert_eq!(step, Activation::Reload);
        self.agent
            .apply(
                &config_secret_name(config),
                config,
                step,
                |step, since, timeout| {
                    self.ready_checks.fetch_add(1, Ordering::SeqCst);
                    node_is_ready(step, since, timeout)
                },
            )
            .await
    }

    fn reloads(&self) -> usize {
        std::fs::read_to_string(&self.reloads)
            .map(|text| text.lines().count())
            .unwrap_or(0)
    }

    fn on_host(&self, path: &str) -> PathBuf {
        self.root.path().join(path.trim_start_matches('/'))
    }

    /// The files of `config` are on the host, byte for byte and with their modes.
    fn assert_holds(&self, config: &RenderedConfig) {
        use std::os::unix::fs::PermissionsExt;
        for (path, file) in &config.files {
            let on_host = self.on_host(path);
            assert_eq!(
                std::fs::read_to_string(&on_host).ok().as_deref(),
                Some(file.content.as_str()),
                "{path}"
            );
            let mode = std::fs::metadata(&on_host).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, file.mode, "{path}");
        }
    }

    /// skopeo reading what the host holds: its registries.conf drop-in, certs.d and auth file.
    fn pull(&self) -> Pull {
        let skopeo = Skopeo::new(
            &self
                .world
                .dir
                .path()
                .join(format!("skopeo-{}", regmirror_testbed::dead_port())),
        );
        std::fs::copy(self.on_host(REGISTRIES_CONF), skopeo.registries_conf()).unwrap();
        copy_tree(
            &self.on_host("/etc/containers/certs.d"),
            &skopeo.certs_dir(),
        );
        let auth = self.on_host(AUTH_FILE);
        skopeo.inspect(&self.world.image, auth.exists().then_some(auth.as_path()))
    }
}

async fn node_is_ready(_: Activation, _: Timestamp, _: Duration) -> Result<(), NotReady> {
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) {
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    std::fs::create_dir_all(to).unwrap();
    for entry in entries.flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test]
async fn a_crio_node_whose_mirror_answers_applies_it_with_a_reload() {
    let node = CrioNode::new();
    let config = node.config(vec![node.world.endpoint(true, Some("mirror-pull"))]);
    assert!(
        !config.probes.is_empty(),
        "the renderer lists the CRI-O mirror to probe"
    );
    let outcome = node.apply(&config).await;
    assert_eq!(outcome.state, NodeState::Applied, "{}", outcome.message);
    assert_eq!(outcome.current, Some(config_secret_name(&config)));
    assert_eq!(outcome.activated, Some(Activation::Reload));
    assert!(
        outcome.message.contains("crio.service reloaded"),
        "{}",
        outcome.message
    );
    assert!(!outcome.message.contains("warning"), "{}", outcome.message);
    assert_eq!(node.reloads(), 1);
    assert_eq!(node.ready_checks.load(Ordering::SeqCst), 1);
    assert_eq!(node.agent.verified(), Some(config_secret_name(&config)));
    node.assert_holds(&config);
    assert_pulled(node.pull());
}

#[tokio::test]
async fn a_crio_node_whose_mirror_is_down_fails_and_gets_its_previous_files_back() {
    let node = CrioNode::new();
    let good = node.config(vec![node.world.endpoint(true, Some("mirror-pull"))]);
    let outcome = node.apply(&good).await;
    assert_eq!(outcome.state, NodeState::Applied, "{}", outcome.message);
    assert_pulled(node.pull());

    // The mirror moves to a host that is down: no endpoint of the registry answers.
    let down = node.config(vec![dead_endpoint("https")]);
    let outcome = node.apply(&down).await;
    assert_eq!(outcome.state, NodeState::Failed, "{}", outcome.message);
    assert!(outcome.rolled_back);
    assert!(
        outcome.message.contains("no endpoint in") && outcome.message.contains("answers"),
        "{}",
        outcome.message
    );
    assert!(
        outcome.message.contains("cannot connect"),
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
    assert_eq!(outcome.current, Some(config_secret_name(&good)));
    assert_eq!(node.agent.verified(), Some(config_secret_name(&good)));

    // The previous files are back, and only they: the broken config left nothing.
    node.assert_holds(&good);
    for path in down.files.keys().filter(|p| !good.files.contains_key(*p)) {
        assert!(!node.on_host(path).exists(), "{path} left behind");
    }
    assert_eq!(
        node.reloads(),
        3,
        "once for the good config, once for the broken one, once for the restored one"
    );
    assert_pulled(node.pull());
}

#[tokio::test]
async fn a_first_crio_config_whose_mirror_is_down_leaves_the_node_as_it_was() {
    let node = CrioNode::new();
    let down = node.config(vec![dead_endpoint("https")]);
    let outcome = node.apply(&down).await;
    assert_eq!(outcome.state, NodeState::Failed, "{}", outcome.message);
    assert!(outcome.rolled_back);
    assert_eq!(outcome.current, None);
    assert_eq!(node.agent.verified(), None);
    for path in down.files.keys() {
        assert!(!node.on_host(path).exists(), "{path} left behind");
    }
    assert_eq!(
        node.reloads(),
        2,
        "the broken config, then the node without it"
    );
}

#[tokio::test]
async fn a_crio_mirror_whose_certificate_the_configured_ca_does_not_sign_fails() {
    let node = CrioNode::new();
    let mut config = node.config(vec![node.world.endpoint(true, Some("mirror-pull"))]);
    // Another CA than the one that signed the registry's certificate.
    let other = regmirror_testbed::Pki::create(&node.world.dir.path().join("other-pki"));
    let ca = config
        .files
        .iter_mut()
        .find(|(path, _)| path.ends_with("/ca.crt"))
        .expect("the mirror's CA is written under certs.d")
        .1;
    ca.content = other.pem("ca.crt");
    let outcome = node.apply(&config).await;
    assert_eq!(outcome.state, NodeState::Failed, "{}", outcome.message);
    assert!(
        outcome.message.contains("TLS: invalid peer certificate"),
        "{}",
        outcome.message
    );
    assert!(!node.on_host(REGISTRIES_CONF).exists());
}
