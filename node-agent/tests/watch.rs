//! The agent's Kubernetes side against kube's mocked service: the exact requests for applying
//! a named configuration, for a configuration that already failed here, and for a host
//! regmirror cannot configure.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use prometheus_client::registry::Registry;
use regmirror_core::activation::Activation;
use regmirror_core::contract::{
    config_secret_name, CONFIG_KEY, CURRENT_CONFIG, DESIRED_ACTIVATION, DESIRED_CONFIG, FLAVOR,
    MESSAGE, PUBLIC_KEY, SEALED_CONFIG_KEY, STATE,
};
use regmirror_core::node::Flavor;
use regmirror_core::render::{render, RenderedConfig};
use regmirror_core::seal::NodePublicKey;
use regmirror_node_agent::agent::{Agent, Outcome, Timeouts};
use regmirror_node_agent::detect::Host;
use regmirror_node_agent::metrics::Metrics;
use regmirror_node_agent::node_key;
use regmirror_node_agent::report::NodeReporter;
use regmirror_node_agent::restart::Activator;
use regmirror_node_agent::watch::{Setup, Worker};
use regmirror_testbed::api::{status_error, Recorded};
use regmirror_testbed::cluster::sealing_key;
use regmirror_testbed::fake_api::{event, Expect, FakeApi, Scenario};
use regmirror_testbed::world::{dead_endpoint, World};
use regmirror_testbed::RegistryOptions;
use serde_json::{json, Value};
use tokio::sync::watch;

const NS: &str = "regmirror-system";
const NODE: &str = "/api/v1/nodes/edge-1?";
const EVENTS: &str = regmirror_testbed::fake_api::EVENTS;

fn node(annotations: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some("edge-1".into()),
            uid: Some("uid-edge-1".into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A worker whose API server expects `scenario`.
fn worker(setup: Setup, scenario: Scenario) -> (Worker, FakeApi) {
    let (client, api) = scenario.serve();
    let worker = Worker {
        reporter: NodeReporter::new(client.clone(), "edge-1"),
        secrets: Api::namespaced(client, NS),
        setup,
        metrics: Metrics::register(&mut Registry::default()),
        settle: Duration::ZERO,
    };
    (worker, api)
}

/// The agent's report on edge-1, exactly `annotations`; answered with the Node patched.
fn report(annotations: Value) -> Expect {
    Expect::patch(NODE)
        .body(json!({"metadata": {"annotations": annotations}}))
        .answer_with(patched_node)
}

/// The agent's report on edge-1, whatever it says (checked by the test afterwards).
fn any_report() -> Expect {
    Expect::patch(NODE).answer_with(patched_node)
}

fn patched_node(r: &Recorded) -> (u16, Value) {
    let mut body = r.body.clone();
    body["apiVersion"] = json!("v1");
    body["kind"] = json!("Node");
    body["metadata"]["name"] = json!("edge-1");
    (200, body)
}

/// The agent reads config Secret `name`; answered with `secret`, or 404 without one.
fn read_secret(name: &str, secret: Option<Value>) -> Expect {
    let read = Expect::get(format!("/api/v1/namespaces/{NS}/secrets/{name}"));
    match secret {
        Some(secret) => read.answer(200, secret),
        None => read.answer(404, status_error(404, "NotFound", "not found")),
    }
}

/// A containerd host under a temporary root, and a plain-http registry to mirror to.
struct TestHost {
    world: World,
    root: tempfile::TempDir,
}

impl TestHost {
    fn new() -> Self {
        TestHost {
            world: World::new(RegistryOptions::default()),
            root: tempfile::tempdir().unwrap(),
        }
    }

    fn agent(&self) -> Agent {
        containerd_agent(self.root.path())
    }

    /// A config mirroring through the registry, or (`live: false`) through a dead port.
    fn config(&self, live: bool) -> RenderedConfig {
        let endpoint = match live {
            true => self.world.endpoint(false, None),
            false => dead_endpoint("http"),
        };
        let flavor = Flavor::Containerd {
            hosts_dir: "/etc/containerd/certs.d".into(),
        };
        render(&[&self.world.resolved(vec![endpoint])], &flavor).unwrap()
    }
}

/// Applies on the host, the node always Ready.
async fn apply(agent: &Agent, config: &RenderedConfig) -> Outcome {
    agent
        .apply(
            &config_secret_name(config),
            config,
            Activation::Hot,
            |_, _, _| async { Ok(()) },
        )
        .await
}

/// The config Secret the operator stores for `config`, as the API server returns it.
fn config_secret(config: &RenderedConfig) -> Value {
    let name = config_secret_name(config);
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "data": {SEALED_CONFIG_KEY: base64(&sealing_key().seal_config(&name, config))},
    })
}

/// This host's public key (made on first use, as the agent would).
fn public_key(agent: &Agent) -> String {
    node_key::load_or_create(&agent.host)
        .unwrap()
        .public()
        .to_text()
}

/// The annotations the operator writes to point a node at `name`, sealed to `public_key`.
fn told(name: &str, public_key: &str) -> [(&'static str, String); 3] {
    let public = NodePublicKey::from_text(public_key).unwrap();
    [
        (DESIRED_CONFIG, name.to_owned()),
        (DESIRED_ACTIVATION, "Hot".to_owned()),
        (CONFIG_KEY, sealing_key().seal_key_for(name, &public)),
    ]
}

fn node_told(name: &str, public_key: &str, more: &[(&str, &str)]) -> Node {
    let told = told(name, public_key);
    let mut pairs: Vec<(&str, &str)> = told.iter().map(|(k, v)| (*k, v.as_str())).collect();
    pairs.extend_from_slice(more);
    node(&pairs)
}

fn containerd_agent(root: &std::path::Path) -> Agent {
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
    Agent::new(
        root,
        runtime,
        Activator::Command {
            command: "exit 1".into(),
        },
        timeouts,
    )
}

fn lines(requests: &[Recorded]) -> Vec<String> {
    requests
        .iter()
        .map(|r| match r.path.contains("/events") {
            true => format!(
                "{} {} {}",
                r.line(),
                r.body["type"].as_str().unwrap(),
                r.body["reason"].as_str().unwrap()
            ),
            false => r.line(),
        })
        .collect()
}

#[tokio::test]
async fn a_named_config_is_fetched_applied_and_reported() {
    let host = TestHost::new();
    let (world, root, agent) = (&host.world, &host.root, host.agent());
    let config = host.config(true);
    let name = config_secret_name(&config);
    let key = public_key(&agent);
    let (worker, api) = worker(
        Setup::Ready(agent),
        Scenario::new()
            .then(report(json!({FLAVOR: "containerd", PUBLIC_KEY: key, MESSAGE: format!("applying {name}"), STATE: "Applying"})))
            .then(read_secret(&name, Some(config_secret(&config))))
            .then(report(json!({
                CURRENT_CONFIG: name, FLAVOR: "containerd", PUBLIC_KEY: key,
                MESSAGE: format!("{name} applied without a restart"), STATE: "Applied",
            })))
            .then(event("Normal", "Applied", Some("edge-1"))),
    );
    let node = node_told(&name, &key, &[]);
    let (_tx, latest) = watch::channel(Some(Arc::new(node.clone())));

    worker.step(&node, &latest).await;
    let requests = api.take();
    assert_eq!(
        lines(&requests),
        [
            format!("PATCH {NODE}"),
            format!("GET /api/v1/namespaces/{NS}/secrets/{name}"),
            format!("PATCH {NODE}"),
            format!("POST {EVENTS} Normal Applied"),
        ]
    );
    assert_eq!(
        requests[0].body,
        json!({"metadata": {"annotations": {FLAVOR: "containerd", PUBLIC_KEY: key, MESSAGE: format!("applying {name}"), STATE: "Applying"}}})
    );
    assert_eq!(
        requests[2].body,
        json!({"metadata": {"annotations": {
            CURRENT_CONFIG: name, FLAVOR: "containerd", PUBLIC_KEY: key,
            MESSAGE: format!("{name} applied without a restart"), STATE: "Applied",
        }}})
    );
    assert_eq!(requests[3].body["regarding"]["uid"], json!("uid-edge-1"));
    let hosts_toml = root.path().join(format!(
        "etc/containerd/certs.d/{}/hosts.toml",
        world.upstream()
    ));
    assert!(std::fs::read_to_string(hosts_toml)
        .unwrap()
        .contains(&world.registry.host()));

    // The node now says what the host has: nothing more to do.
    let settled = node_with(&told(&name, &key), &requests[2].body);
    worker.step(&settled, &latest).await;
    assert_eq!(lines(&api.take()), Vec::<String>::new());
    api.finish();
}

fn node_with(told: &[(&'static str, String)], patch: &Value) -> Node {
    let mut annotations: Vec<(String, String)> = patch["metadata"]["annotations"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    annotations.extend(told.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let pairs: Vec<(&str, &str)> = annotations
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    node(&pairs)
}

#[tokio::test]
async fn a_config_that_failed_here_is_not_tried_again_and_annotations_follow_the_host() {
    let host = TestHost::new();
    let agent = host.agent();
    // Fails on this host (its only endpoint is dead); the report did not reach the Node.
    let broken = host.config(false);
    let name = config_secret_name(&broken);
    let outcome = apply(&agent, &broken).await;
    assert_eq!(outcome.state.as_str(), "Failed");

    let key = public_key(&agent);
    let (worker, api) = worker(
        Setup::Ready(agent),
        Scenario::new()
            .then(report(json!({MESSAGE: outcome.message, STATE: "Failed"})))
            .then(any_report())
            .then(read_secret("regmirror-config-bbbb", None))
            .then(any_report()),
    );
    let stale = node_told(
        &name,
        &key,
        &[
            (FLAVOR, "containerd"),
            (PUBLIC_KEY, &key),
            (STATE, "Applying"),
        ],
    );
    let (_tx, latest) = watch::channel(Some(Arc::new(stale.clone())));
    assert_eq!(worker.step(&stale, &latest).await, None);
    let requests = api.take();
    assert_eq!(
        lines(&requests),
        [format!("PATCH {NODE}")],
        "no second try, no restart: only the report"
    );
    assert_eq!(
        requests[0].body,
        json!({"metadata": {"annotations": {MESSAGE: outcome.message, STATE: "Failed"}}})
    );

    // A config whose Secret cannot be read yet is waited for, not failed.
    let next = node_told(
        "regmirror-config-bbbb",
        &key,
        &[
            (FLAVOR, "containerd"),
            (PUBLIC_KEY, &key),
            (STATE, "Failed"),
            (MESSAGE, &outcome.message),
        ],
    );
    assert_eq!(
        worker.step(&next, &latest).await,
        Some(Duration::from_secs(10))
    );
    let requests = api.take();
    assert_eq!(
        lines(&requests),
        [
            format!("PATCH {NODE}"),
            format!("GET /api/v1/namespaces/{NS}/secrets/regmirror-config-bbbb"),
            format!("PATCH {NODE}"),
        ]
    );
    let annotations = &requests[2].body["metadata"]["annotations"];
    assert_eq!(annotations[STATE], json!("Applying"));
    assert!(
        annotations[MESSAGE]
            .as_str()
            .unwrap()
            .starts_with("regmirror-config-bbbb: cannot read the config Secret"),
        "{annotations}"
    );
    api.finish();
}

#[tokio::test]
async fn an_unsupported_host_is_reported_once() {
    let why = "k3s runs with an external container runtime (container-runtime-endpoint in /etc/rancher/k3s/config.yaml); it ignores registries.yaml";
    let (worker, api) = worker(
        Setup::Unsupported(why.into()),
        Scenario::new()
            .then(report(json!({MESSAGE: why, STATE: "Unsupported"})))
            .then(event("Warning", "Unsupported", Some("edge-1"))),
    );
    let fresh = node(&[(DESIRED_CONFIG, "regmirror-config-aaaa")]);
    let (_tx, latest) = watch::channel(Some(Arc::new(fresh.clone())));
    worker.step(&fresh, &latest).await;
    let requests = api.take();
    assert_eq!(
        lines(&requests),
        [
            format!("PATCH {NODE}"),
            format!("POST {EVENTS} Warning Unsupported")
        ]
    );
    assert_eq!(
        requests[0].body,
        json!({"metadata": {"annotations": {MESSAGE: why, STATE: "Unsupported"}}})
    );

    let reported = node(&[
        (DESIRED_CONFIG, "regmirror-config-aaaa"),
        (STATE, "Unsupported"),
        (MESSAGE, why),
    ]);
    worker.step(&reported, &latest).await;
    assert_eq!(lines(&api.take()), Vec::<String>::new());
    api.finish();
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn a_node_sent_back_to_what_it_runs_is_applied_again() {
    let host = TestHost::new();
    let agent = host.agent();
    let good = host.config(true);
    let good_name = config_secret_name(&good);
    assert_eq!(apply(&agent, &good).await.state.as_str(), "Applied");
    let failed = apply(&agent, &host.config(false)).await;
    assert_eq!(
        failed.current.as_deref(),
        Some(good_name.as_str()),
        "rolled back"
    );

    // The operator points the node back at the good config: nothing to apply, and the node
    // must not go on saying Failed (the operator would halt the good config everywhere).
    let key = public_key(&agent);
    let (worker, api) = worker(
        Setup::Ready(agent),
        Scenario::new().then(report(json!({MESSAGE: "", STATE: "Applied"}))),
    );
    let back = node_told(
        &good_name,
        &key,
        &[
            (CURRENT_CONFIG, &good_name),
            (FLAVOR, "containerd"),
            (PUBLIC_KEY, &key),
            (STATE, "Failed"),
            (MESSAGE, &failed.message),
        ],
    );
    let (_tx, latest) = watch::channel(Some(Arc::new(back.clone())));
    assert_eq!(worker.step(&back, &latest).await, None);
    let requests = api.take();
    assert_eq!(lines(&requests), [format!("PATCH {NODE}")]);
    assert_eq!(
        requests[0].body,
        json!({"metadata": {"annotations": {MESSAGE: "", STATE: "Applied"}}})
    );
    api.finish();
}

#[tokio::test]
async fn an_agent_cannot_open_another_nodes_config_and_never_fetches_it() {
    let host = TestHost::new();
    let agent = host.agent();
    let config = host.config(true);
    let name = config_secret_name(&config);
    let own = public_key(&agent);
    // The operator sealed this config's key to node B, not to this node (A).
    let other = regmirror_testbed::cluster::node_key("node-b")
        .public()
        .to_text();
    // No Secret read: only the report.
    let (worker, api) = worker(Setup::Ready(agent), Scenario::new().then(any_report()));
    let stolen = node_told(&name, &other, &[]);
    let (_tx, latest) = watch::channel(Some(Arc::new(stolen.clone())));
    assert_eq!(worker.step(&stolen, &latest).await, None);
    let requests = api.take();
    assert_eq!(
        lines(&requests),
        [format!("PATCH {NODE}")],
        "no Secret read"
    );
    let annotations = &requests[0].body["metadata"]["annotations"];
    assert_eq!(annotations[PUBLIC_KEY], json!(own));
    assert!(
        annotations[MESSAGE]
            .as_str()
            .unwrap()
            .contains("sealed for another node's key"),
        "{annotations}"
    );
    assert!(!host.root.path().join("etc/containerd").exists());
    api.finish();

    // Even with the Secret in hand, its content does not open without the sealing key.
    let secret = config_secret(&config);
    let sealed = base64_decode(secret["data"][SEALED_CONFIG_KEY].as_str().unwrap());
    let guess = regmirror_core::seal::SealingKey::from_bytes(&[8; 32]).unwrap();
    assert!(guess.open_config(&name, &sealed).is_err());
}

#[tokio::test]
async fn a_config_secret_whose_content_is_not_its_name_is_refused() {
    let host = TestHost::new();
    let agent = host.agent();
    let wanted = host.config(true);
    let name = config_secret_name(&wanted);
    let key = public_key(&agent);
    // A Secret squatting on the name, sealed with the operator's key (the worst case) but
    // holding another config — one that points the node somewhere else.
    let mut other = host.config(false);
    other.restart_key = "forged".into();
    let forged = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "data": {SEALED_CONFIG_KEY: base64(&sealing_key().seal_config(&name, &other))},
    });
    let (worker, api) = worker(
        Setup::Ready(agent),
        Scenario::new()
            .then(any_report())
            .then(read_secret(&name, Some(forged)))
            .then(any_report()),
    );
    let node = node_told(&name, &key, &[]);
    let (_tx, latest) = watch::channel(Some(Arc::new(node.clone())));
    assert_eq!(
        worker.step(&node, &latest).await,
        Some(Duration::from_secs(10)),
        "waited for, not failed: the operator replaces a squatting Secret"
    );
    let requests = api.take();
    let last = &requests.last().unwrap().body["metadata"]["annotations"];
    assert_eq!(last[STATE], json!("Applying"));
    assert!(
        last[MESSAGE]
            .as_str()
            .unwrap()
            .contains("whose digest names"),
        "{last}"
    );
    assert!(
        !host.root.path().join("etc/containerd").exists(),
        "nothing written"
    );
    api.finish();
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

#[tokio::test]
async fn a_containerd_that_reads_no_hosts_toml_is_reported_with_the_fix_until_it_is_fixed() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("etc/containerd/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, "version = 2\n").unwrap();
    let settings = regmirror_node_agent::watch::Settings {
        node_name: "edge-1".into(),
        namespace: NS.into(),
        root: root.path().to_owned(),
        flavor: None,
        restart_command: None,
        timeouts: Timeouts {
            probe: None,
            ready: Duration::from_secs(1),
        },
        settle: Duration::ZERO,
        listen: "127.0.0.1:0".parse().unwrap(),
    };
    let setup = regmirror_node_agent::watch::set_up(&settings);
    let why = match &setup {
        Setup::Unsupported(why) => why.clone(),
        Setup::Ready(_) => panic!("containerd without config_path taken as configurable"),
    };
    assert!(
        why.contains("containerd reads no hosts.toml")
            && why.contains("config_path = \"/etc/containerd/certs.d\""),
        "{why}"
    );
    // The Node says so (and so does every mirror selecting it: an Unsupported node counts as
    // failed, with this message as the reason); the agent looks again in a minute.
    let (worker, api) = worker(
        setup,
        Scenario::new()
            .then(report(json!({MESSAGE: why, STATE: "Unsupported"})))
            .then(event("Warning", "Unsupported", Some("edge-1"))),
    );
    let fresh = node(&[(DESIRED_CONFIG, "regmirror-config-aaaa")]);
    let (_tx, latest) = watch::channel(Some(Arc::new(fresh.clone())));
    assert_eq!(
        worker.step(&fresh, &latest).await,
        Some(Duration::from_secs(60))
    );
    api.take();
    api.finish();

    // Fixed on the host: the next look finds a containerd that reads the hosts.toml files.
    std::fs::write(
        &config,
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
    )
    .unwrap();
    match regmirror_node_agent::watch::set_up(&settings) {
        Setup::Ready(agent) => assert_eq!(
            agent.runtime.flavor,
            Flavor::Containerd {
                hosts_dir: "/etc/containerd/certs.d".into()
            }
        ),
        Setup::Unsupported(why) => panic!("still unsupported: {why}"),
    }
}
