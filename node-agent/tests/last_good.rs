//! The agent records the name of the config it applied with the last-good state, instead of
//! hashing the files to learn it; a record written by an older agent (no name) is named once
//! by hashing, as that agent named it, and a new record still reads as a plain configuration
//! (what an older agent expects after a downgrade).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use regmirror_core::activation::Activation;
use regmirror_core::contract::{config_secret_name, NodeState};
use regmirror_core::node::Flavor;
use regmirror_core::render::{ProbeTarget, RenderedConfig, RenderedFile};
use regmirror_node_agent::agent::{Agent, NotReady, Timeouts};
use regmirror_node_agent::detect::Host;
use regmirror_node_agent::hostfs::{HostFs, STATE_DIR};
use regmirror_node_agent::restart::Activator;
use regmirror_testbed::dead_port;

const HOSTS_TOML: &str = "/etc/containerd/certs.d/docker.io/hosts.toml";

fn config(content: &str) -> RenderedConfig {
    RenderedConfig {
        peer_registries: Vec::new(),
        flavor: "containerd".into(),
        files: BTreeMap::from([(
            HOSTS_TOML.to_owned(),
            RenderedFile {
                mode: 0o644,
                content: content.to_owned(),
            },
        )]),
        restart_key: String::new(),
        parts: BTreeMap::new(),
        probes: BTreeMap::new(),
        credential_sources: BTreeMap::new(),
    }
}

fn record(root: &Path) -> serde_json::Value {
    let bytes = std::fs::read(root.join(STATE_DIR).join("last-good.json")).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn the_name_is_recorded_not_recomputed() {
    let root = tempfile::tempdir().unwrap();
    let host = HostFs::new(root.path());
    assert_eq!(host.last_good_name().unwrap(), None);
    let good = config("server = \"https://registry-1.docker.io\"\n");
    host.apply(&good).unwrap();
    // Not the config's digest: whatever name it was applied under is what is reported.
    host.mark_good("regmirror-config-as-the-operator-named-it")
        .unwrap();
    assert_eq!(
        host.last_good_name().unwrap().as_deref(),
        Some("regmirror-config-as-the-operator-named-it")
    );
    assert_eq!(host.last_good().unwrap(), Some(good.clone()));

    // An older agent reads the record as the configuration it is (extra keys ignored).
    let plain: RenderedConfig = serde_json::from_value(record(root.path())).unwrap();
    assert_eq!(plain, good);
}

#[test]
fn a_record_of_an_older_agent_is_named_once_as_that_agent_named_it() {
    let root = tempfile::tempdir().unwrap();
    let host = HostFs::new(root.path());
    let good = config("server = \"https://registry-1.docker.io\"\n");
    host.apply(&good).unwrap();
    // What an agent before names wrote: the configuration alone.
    host.write_state("last-good.json", &good).unwrap();
    assert!(record(root.path()).get("configName").is_none());

    let expected = config_secret_name(&good);
    assert_eq!(host.last_good_name().unwrap(), Some(expected.clone()));
    // Rewritten with its name: it is not hashed again.
    assert_eq!(record(root.path())["configName"], expected.as_str());
    assert_eq!(host.last_good().unwrap(), Some(good));
    assert_eq!(host.last_good_name().unwrap(), Some(expected));
}

async fn node_is_ready(_: Activation, _: Timestamp, _: Duration) -> Result<(), NotReady> {
    Ok(())
}

fn agent(root: &Path) -> Agent {
    let runtime = Host {
        flavor: Flavor::Containerd {
            hosts_dir: "/etc/containerd/certs.d".into(),
        },
        unit: "containerd.service".into(),
        warning: None,
    };
    let timeouts = Timeouts {
        probe: Some(Duration::from_secs(5)),
        ready: Duration::from_secs(5),
    };
    let activator = Activator::Command {
        command: "true".into(),
    };
    Agent::new(root, runtime, activator, timeouts)
}

#[tokio::test]
async fn the_agent_reports_the_name_it_applied_and_restores_by_name() {
    let root = tempfile::tempdir().unwrap();
    let agent = agent(root.path());
    let first = config("first\n");
    let outcome = agent
        .apply("first-config", &first, Activation::Hot, node_is_ready)
        .await;
    assert_eq!(outcome.state, NodeState::Applied, "{}", outcome.message);
    assert_eq!(agent.verified().as_deref(), Some("first-config"));

    // A config whose one mirror is down fails and is rolled back: the node runs, and
    // reports, the first one by its name.
    let mut broken = config("second\n");
    broken.probes.insert(
        "docker.io".into(),
        vec![ProbeTarget {
            url: format!("https://127.0.0.1:{}/v2", dead_port()),
            ca_file: None,
            client: None,
            insecure_skip_verify: false,
            rewrites: Default::default(),
            repository_prefix: None,
        }],
    );
    let outcome = agent
        .apply("second-config", &broken, Activation::Hot, node_is_ready)
        .await;
    assert_eq!(outcome.state, NodeState::Failed, "{}", outcome.message);
    assert!(outcome.rolled_back);
    assert!(
        outcome.message.ends_with("restored first-config"),
        "{}",
        outcome.message
    );
    assert_eq!(outcome.current.as_deref(), Some("first-config"));
    assert_eq!(agent.verified().as_deref(), Some("first-config"));
}

#[tokio::test]
async fn an_upgraded_agent_reports_what_the_older_one_did() {
    let root = tempfile::tempdir().unwrap();
    let good = config("first\n");
    let host = HostFs::new(root.path());
    host.apply(&good).unwrap();
    host.write_state("last-good.json", &good).unwrap();

    let agent = agent(root.path());
    assert_eq!(agent.verified(), Some(config_secret_name(&good)));
}
