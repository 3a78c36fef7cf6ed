//! The simulated side of the cluster, in this one process: a kubelet per Node, posting its
//! status now and then, and an agent per Node, answering every config the operator names as
//! the real agent does (`node-agent/src/watch.rs`), through the API server.
//!
//! What a real agent sends for one config is what each simulated agent sends: a merge patch of
//! its Node's annotations to `Applying`, one GET of the config Secret (opened with the key the
//! operator sealed to the node's public key, so a config that would not open on a real node
//! fails here too), for a restart the kubelet's status coming back, a merge patch to `Applied`
//! with the new `current-config`, and an Event. Only the host is missing: no files are written
//! and no runtime restarts. Two differences from 5,000 real agents: one watch of every Node
//! instead of one watch per Node (the API server sends the same events, to one connection), and
//! one ServiceAccount token not bound to a Pod (so the chart's admission policy, which needs
//! the node name a Pod-bound token carries, is not installed).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Secret};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use regmirror_core::activation::{agent_step, Activation};
use regmirror_core::contract::{
    sealed_config, NodeState, CONFIG_KEY, CURRENT_CONFIG, DESIRED_ACTIVATION, DESIRED_CONFIG,
    FLAVOR, MESSAGE, PUBLIC_KEY, STATE,
};
use regmirror_process::events::{EventPublisher, Occurrence};
use regmirror_testbed::cluster::node_key;
use serde_json::json;

/// How long a real agent waits before reading a config Secret again after a failure.
const FETCH_RETRY: Duration = Duration::from_secs(10);
/// Agents working at once (real ones are independent; this bounds the process's requests in
/// flight as the client's connection pool would anyway).
const CONCURRENT_AGENTS: usize = 64;

// ------------------------------------------------------------------------------ kubelets

/// The kubelets' side: Node status with fresh heartbeats.
#[derive(Clone)]
pub struct Kubelets {
    nodes: Api<Node>,
    /// Status posts that failed (the API server refused or timed out).
    pub failures: Arc<std::sync::atomic::AtomicU64>,
}

impl Kubelets {
    pub fn new(client: kube::Client) -> Self {
        Kubelets {
            nodes: Api::all(client),
            failures: Arc::default(),
        }
    }

    /// What a kubelet posts when it reports its status: every condition with a fresh
    /// heartbeat (a strategic merge patch, conditions merged by type; transitions unchanged).
    pub async fn post_status(&self, node: &str) {
        let now = k8s_openapi::jiff::Timestamp::now()
            .round(k8s_openapi::jiff::Unit::Second)
            .unwrap()
            .to_string();
        let conditions: Vec<serde_json::Value> =
            ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"]
                .iter()
                .map(|t| {
                    json!({"type": t, "status": if *t == "Ready" { "True" } else { "False" },
                           "lastHeartbeatTime": now,
                           "reason": format!("Kubelet{t}"), "message": format!("kubelet reports {t}")})
                })
                .collect();
        let patch = json!({"status": {"conditions": conditions}});
        if let Err(e) = self
            .nodes
            .patch_status(node, &PatchParams::default(), &Patch::Strategic(patch))
            .await
        {
            self.failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            eprintln!("kubelet {node}: posting status failed: {e}");
        }
    }

    /// Keeps `names` Ready as kubelets do: each posts its status once per `period` (a
    /// kubelet's `nodeStatusReportFrequency`, 5 minutes, when nothing changes), spread evenly,
    /// so 5,000 Nodes make ≈17 status patches a second. Lease heartbeats are not simulated:
    /// the operator does not read Leases, and the node-lifecycle controller that would is off.
    pub fn spawn(&self, names: Vec<String>, period: Duration) -> tokio::task::JoinHandle<()> {
        let kubelets = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period / names.len().max(1) as u32);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for name in names.iter().cycle() {
                tick.tick().await;
                // Kubelets are independent: a slow answer to one does not delay the next.
                let (kubelets, name) = (kubelets.clone(), name.clone());
                tokio::spawn(async move { kubelets.post_status(&name).await });
            }
        })
    }
}

// ------------------------------------------------------------------------------ agents

/// What one simulated host remembers (a real agent keeps it in its state directory).
#[derive(Debug, Default)]
struct Host {
    /// The config the host runs (verified).
    verified: Option<String>,
    /// The message of the last apply.
    message: String,
    /// The latest version of the Node, as the watch delivered it.
    node: Option<Arc<Node>>,
    /// The config the agent last reported Applied, and when the API server took the report.
    applied: Option<(String, Instant)>,
    /// The resourceVersion of the Node this agent's last write made: an older view is one the
    /// watch delivers late, and acting on it would write again what was written.
    written: u64,
}

/// Which nodes are being worked on, so that one node's agent does one step at a time.
#[derive(Debug, Default)]
struct Queue {
    queued: HashSet<String>,
    busy: HashSet<String>,
    /// Busy nodes that changed again meanwhile.
    again: HashSet<String>,
}

/// Counters of what the agents met.
#[derive(Debug, Default, Clone, Copy)]
pub struct Trouble {
    pub patch_failures: u64,
    pub fetch_failures: u64,
    pub unopenable: u64,
}

struct Shared {
    hosts: Mutex<HashMap<String, Host>>,
    queue: Mutex<Queue>,
    trouble: Mutex<Trouble>,
    wake: tokio::sync::mpsc::UnboundedSender<String>,
}

/// The simulated agents of every Node.
#[derive(Clone)]
pub struct Agents {
    shared: Arc<Shared>,
    nodes: Api<Node>,
    secrets: Api<Secret>,
    client: kube::Client,
    kubelets: Kubelets,
    restart: Duration,
}

/// One node as the agents' side sees it now.
#[derive(Debug, Clone)]
pub struct Seen {
    pub desired: Option<String>,
    pub current: Option<String>,
    pub state: Option<String>,
    pub has_key: bool,
    /// The config last reported Applied, and when.
    pub applied: Option<(String, Instant)>,
}

impl Agents {
    /// Starts the agents: one watch of every Node (with the agents' `client`), and a step of
    /// the node's agent for every change. A restart (k3s, credentials changed) takes `restart`
    /// and ends with the node's kubelet posting its status, as after a real k3s restart.
    pub fn start(
        client: kube::Client,
        namespace: &str,
        kubelets: Kubelets,
        restart: Duration,
    ) -> Agents {
        let (wake, woken) = tokio::sync::mpsc::unbounded_channel();
        let agents = Agents {
            shared: Arc::new(Shared {
                hosts: Mutex::default(),
                queue: Mutex::default(),
                trouble: Mutex::default(),
                wake,
            }),
            nodes: Api::all(client.clone()),
            secrets: Api::namespaced(client.clone(), namespace),
            client,
            kubelets,
            restart,
        };
        tokio::spawn(agents.clone().watch());
        tokio::spawn(agents.clone().work(woken));
        agents
    }

    async fn watch(self) {
        let mut nodes = watcher(self.nodes.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(event) = nodes.next().await {
            match event {
                Ok(node) => {
                    let name = node.metadata.name.clone().unwrap_or_default();
                    self.shared
                        .hosts
                        .lock()
                        .unwrap()
                        .entry(name.clone())
                        .or_default()
                        .node = Some(Arc::new(node));
                    self.wake(name);
                }
                Err(e) => eprintln!("agents: watching Nodes failed, retrying: {e}"),
            }
        }
    }

    /// Queues a step of `name`'s agent (or, if it is busy, another step after this one).
    fn wake(&self, name: String) {
        let mut queue = self.shared.queue.lock().unwrap();
        if queue.busy.contains(&name) {
            queue.again.insert(name);
        } else if queue.queued.insert(name.clone()) {
            let _ = self.shared.wake.send(name);
        }
    }

    async fn work(self, woken: tokio::sync::mpsc::UnboundedReceiver<String>) {
        let names = futures::stream::unfold(woken, |mut rx| async move {
            rx.recv().await.map(|name| (name, rx))
        });
        names
            .for_each_concurrent(CONCURRENT_AGENTS, |name| {
                let agents = self.clone();
                async move {
                    {
                        let mut queue = agents.shared.queue.lock().unwrap();
                        queue.queued.remove(&name);
                        queue.busy.insert(name.clone());
                    }
                    if let Some(node) = agents.latest(&name).filter(|n| !agents.stale(n)) {
                        agents.step(&node).await;
                    }
                    let again = {
                        let mut queue = agents.shared.queue.lock().unwrap();
                        queue.busy.remove(&name);
                        queue.again.remove(&name)
                    };
                    if again {
                        agents.wake(name);
                    }
                }
            })
            .await;
    }

    fn latest(&self, name: &str) -> Option<Arc<Node>> {
        self.shared.hosts.lock().unwrap().get(name)?.node.clone()
    }

    /// Whether `node` is older than what this node's agent last wrote (the watch will deliver
    /// that write, and wake the agent again).
    fn stale(&self, node: &Node) -> bool {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        let hosts = self.shared.hosts.lock().unwrap();
        hosts
            .get(name)
            .is_some_and(|host| version(node) < host.written)
    }

    fn trouble_mut(&self, count: impl FnOnce(&mut Trouble)) {
        count(&mut self.shared.trouble.lock().unwrap());
    }

    pub fn trouble(&self) -> Trouble {
        *self.shared.trouble.lock().unwrap()
    }

    /// Every node the watch has delivered, as the agents see it now.
    pub fn seen(&self) -> BTreeMap<String, Seen> {
        let hosts = self.shared.hosts.lock().unwrap();
        hosts
            .iter()
            .filter_map(|(name, host)| {
                let node = host.node.as_ref()?;
                let a = node.metadata.annotations.clone().unwrap_or_default();
                Some((
                    name.clone(),
                    Seen {
                        desired: a.get(DESIRED_CONFIG).cloned(),
                        current: a.get(CURRENT_CONFIG).cloned(),
                        state: a.get(STATE).cloned(),
                        has_key: a.contains_key(PUBLIC_KEY),
                        applied: host.applied.clone(),
                    },
                ))
            })
            .collect()
    }

    /// What the real agent's `Worker::step` does with one view of its Node, on a host where
    /// every apply succeeds.
    async fn step(&self, node: &Node) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let key = node_key(&name);
        let public_key = key.public().to_text();
        let (verified, message) = {
            let hosts = self.shared.hosts.lock().unwrap();
            let host = hosts.get(&name);
            (
                host.and_then(|h| h.verified.clone()),
                host.map(|h| h.message.clone()).unwrap_or_default(),
            )
        };
        let report = |current: Option<&str>, state: NodeState, message: &str| {
            annotations(&public_key, current, state, message)
        };
        let desired = annotation(node, DESIRED_CONFIG);
        let Some(desired) = desired.filter(|d| Some(d) != verified.as_ref()) else {
            // Nothing to do: the annotations say what the host runs (the first report
            // publishes the flavor and public key).
            self.annotate(
                node,
                &report(verified.as_deref(), NodeState::Applied, &message),
            )
            .await;
            return;
        };
        let config_key = annotation(node, CONFIG_KEY)
            .ok_or(regmirror_core::seal::SealError::BadFormat)
            .and_then(|sealed| key.open_key(&desired, &sealed));
        let Ok(config_key) = config_key else {
            // The operator seals the key to the published public key; its write wakes us.
            let waiting = format!("waiting for the operator to seal {desired} to this node's key");
            self.annotate(
                node,
                &report(verified.as_deref(), NodeState::Applying, &waiting),
            )
            .await;
            return;
        };
        let told = annotation(node, DESIRED_ACTIVATION).and_then(|a| a.parse::<Activation>().ok());
        let step = agent_step(annotation(node, CURRENT_CONFIG).as_deref(), &desired, told);
        let applying = report(
            verified.as_deref(),
            NodeState::Applying,
            &format!("applying {desired}"),
        );
        let Some(node) = self.annotate(node, &applying).await else {
            return;
        };
        let secret = match self.secrets.get(&desired).await {
            Ok(secret) => secret,
            Err(e) => {
                // As the real agent: not the config's fault; read it again later.
                self.trouble_mut(|t| t.fetch_failures += 1);
                eprintln!("agent {name}: reading {desired} failed, retrying: {e}");
                let agents = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(FETCH_RETRY).await;
                    agents.wake(name);
                });
                return;
            }
        };
        let opened = sealed_config(&secret)
            .ok()
            .and_then(|sealed| config_key.open_config(&desired, sealed).ok());
        if opened.is_none() {
            self.trouble_mut(|t| t.unopenable += 1);
            eprintln!("agent {name}: {desired} does not open with the key sealed to this node");
            return;
        }
        let message = match step {
            Activation::Hot => format!("{desired} applied without a restart"),
            Activation::Reload => format!("{desired} applied; k3s reloaded"),
            Activation::Restart => {
                // k3s restarts; its kubelet comes back and posts the node's status, which
                // the real agent waits for (a heartbeat newer than the restart).
                tokio::time::sleep(self.restart).await;
                self.kubelets.post_status(&name).await;
                format!("{desired} applied; k3s restarted")
            }
        };
        {
            let mut hosts = self.shared.hosts.lock().unwrap();
            let host = hosts.entry(name.clone()).or_default();
            host.verified = Some(desired.clone());
            host.message = message.clone();
        }
        // The Node as the API server has it after our Applying report (or newer).
        let fresh = self
            .latest(&name)
            .filter(|n| newer(n, &node))
            .unwrap_or(Arc::new(node));
        let applied = report(Some(&desired), NodeState::Applied, &message);
        if self.annotate(&fresh, &applied).await.is_some() {
            let mut hosts = self.shared.hosts.lock().unwrap();
            hosts.entry(name.clone()).or_default().applied = Some((desired, Instant::now()));
        }
        self.event(&fresh, &message).await;
    }

    /// Sets the agent's annotations on its Node to `wanted`, writing only those that differ
    /// (one merge patch, as `NodeReporter::annotate`). Returns the Node as written (or as
    /// given, if nothing had to be), or `None` if the write failed; a failed write is tried
    /// again a second later (a real agent tries again at its Node's next change).
    async fn annotate(&self, node: &Node, wanted: &BTreeMap<&'static str, String>) -> Option<Node> {
        let have = node.metadata.annotations.clone().unwrap_or_default();
        let changed: BTreeMap<&str, &String> = wanted
            .iter()
            .filter(|(k, v)| have.get(**k) != Some(*v))
            .map(|(k, v)| (*k, v))
            .collect();
        if changed.is_empty() {
            return Some(node.clone());
        }
        let name = node.metadata.name.clone().unwrap_or_default();
        let patch = json!({"metadata": {"annotations": changed}});
        match self
            .nodes
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(node) => {
                let mut hosts = self.shared.hosts.lock().unwrap();
                hosts.entry(name).or_default().written = version(&node);
                Some(node)
            }
            Err(e) => {
                self.trouble_mut(|t| t.patch_failures += 1);
                eprintln!("agent {name}: annotating the Node failed, retrying: {e}");
                let agents = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    agents.wake(name);
                });
                None
            }
        }
    }

    /// The Event a real agent records on its Node after an apply.
    async fn event(&self, node: &Node, message: &str) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let events = EventPublisher::new(self.client.clone(), "regmirror-agent", &name);
        let what = Occurrence {
            warning: false,
            reason: "Applied",
            action: "Apply",
            note: message,
        };
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(name),
            uid: node.metadata.uid.clone(),
            ..ObjectReference::default()
        };
        if let Err(e) = events.publish(&what, &reference).await {
            eprintln!("agent: recording an Event failed: {e}");
        }
    }
}

/// The agent's annotations for a state (as `node-agent/src/report.rs`), for a k3s host.
fn annotations(
    public_key: &str,
    current: Option<&str>,
    state: NodeState,
    message: &str,
) -> BTreeMap<&'static str, String> {
    let mut wanted = BTreeMap::from([
        (STATE, state.as_str().to_owned()),
        (MESSAGE, message.to_owned()),
        (FLAVOR, "k3s".to_owned()),
        (PUBLIC_KEY, public_key.to_owned()),
    ]);
    if let Some(current) = current {
        wanted.insert(CURRENT_CONFIG, current.to_owned());
    }
    wanted
}

fn annotation(node: &Node, key: &str) -> Option<String> {
    node.metadata.annotations.as_ref()?.get(key).cloned()
}

/// A Node's resourceVersion as a number: the versions of one object grow (they are etcd
/// revisions; opaque to clients in general, good enough for a benchmark).
fn version(node: &Node) -> u64 {
    node.metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Whether `a` is a later version of the Node than `b`.
fn newer(a: &Node, b: &Node) -> bool {
    version(a) > version(b)
}
