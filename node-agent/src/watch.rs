//! The agent's loop: watch its own Node; when the operator names a configuration this node
//! does not have, fetch it, apply it, and report how it went.
//!
//! Only this Node is watched (a field selector on its name) and only the named config Secret
//! is read (one GET: configs are immutable); nothing is polled.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use prometheus_client::registry::Registry;
use regmirror_core::contract::{NodeState, CONFIG_KEY, DESIRED_CONFIG, FLAVOR, MESSAGE, STATE};
use regmirror_core::node::Flavor;
use regmirror_core::render::RenderedConfig;
use regmirror_runtime::endpoints::{self, BindError, Health};
use regmirror_runtime::shutdown;
use thiserror::Error;
use tokio::sync::watch;

use crate::agent::{Agent, Outcome, Timeouts};
use crate::detect::{self, Detected, Host};
use crate::metrics::Metrics;
use crate::report::{annotations, NodeReporter};
use crate::restart::Activator;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_name: String,
    /// The operator's namespace, where configs are.
    pub namespace: String,
    /// The host's root filesystem, as mounted.
    pub root: PathBuf,
    /// Overrides detection.
    pub flavor: Option<Flavor>,
    /// Used instead of systemd for restarts and reloads.
    pub restart_command: Option<String>,
    pub timeouts: Timeouts,
    /// How long after a restart before the node's readiness means anything.
    pub settle: Duration,
    pub listen: SocketAddr,
}

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("the watch of Node {0} ended")]
    WatchEnded(String),
}

/// What the agent knows about its host, decided once at start.
pub enum Setup {
    Ready(Agent),
    /// Nothing regmirror can configure here; the reason is reported.
    Unsupported(String),
}

/// Detects (or takes) the flavor, finishes an interrupted apply, and builds the agent.
pub fn set_up(settings: &Settings) -> Setup {
    let runtime = match &settings.flavor {
        Some(flavor) => Host {
            flavor: flavor.clone(),
            unit: detect::default_unit(flavor, &settings.root),
            warning: None,
        },
        None => match detect::detect(&settings.root) {
            Detected::Supported(host) => host,
            Detected::Unsupported(why) => return Setup::Unsupported(why),
        },
    };
    let activator = match &settings.restart_command {
        Some(command) => Activator::Command {
            command: command.clone(),
        },
        None => Activator::Systemd {
            bus: settings.root.join("run/dbus/system_bus_socket"),
            unit: runtime.unit.clone(),
        },
    };
    tracing::info!(flavor = %runtime.flavor, unit = %runtime.unit, activator = ?activator, "host detected");
    let agent = Agent::new(&settings.root, runtime, activator, settings.timeouts);
    match agent.host.recover() {
        Ok(true) => tracing::warn!("finished an apply a crash had interrupted"),
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, "cannot recover an interrupted apply"),
    }
    Setup::Ready(agent)
}

/// Runs the agent until SIGTERM.
pub async fn run(client: kube::Client, settings: Settings) -> Result<(), AgentError> {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let health = Health::new(registry);
    tokio::spawn(endpoints::serve(settings.listen, health.clone()).await?);

    let worker = Worker {
        reporter: NodeReporter::new(client.clone(), &settings.node_name),
        secrets: Api::namespaced(client.clone(), &settings.namespace),
        setup: set_up(&settings),
        metrics,
        settle: settings.settle,
    };

    // The latest version of our Node, for the loop and for readiness checks during a restart.
    let (latest, mut changes) = watch::channel(None::<Arc<Node>>);
    let only_us =
        watcher::Config::default().fields(&format!("metadata.name={}", settings.node_name));
    let mut nodes = watcher(Api::<Node>::all(client), only_us)
        .default_backoff()
        .applied_objects()
        .boxed();
    let node_name = settings.node_name.clone();
    let feed = tokio::spawn(async move {
        while let Some(event) = nodes.next().await {
            match event {
                Ok(node) => {
                    let _ = latest.send(Some(Arc::new(node)));
                }
                Err(e) => tracing::warn!(error = %e, "watching the Node failed; retrying"),
            }
        }
        tracing::error!(node = %node_name, "the Node watch ended");
    });

    let stop = shutdown::requested();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            changed = changes.changed() => {
                if changed.is_err() {
                    return Err(AgentError::WatchEnded(settings.node_name.clone()));
                }
            }
        }
        let Some(node) = changes.borrow_and_update().clone() else {
            continue;
        };
        health.set_ready(true);
        worker.step(&node, &changes).await;
    }
    feed.abort();
    Ok(())
}

/// Does what one view of the Node asks for.
pub struct Worker {
    pub reporter: NodeReporter,
    /// Config Secrets, in the operator's namespace.
    pub secrets: Api<Secret>,
    pub setup: Setup,
    pub metrics: Metrics,
    pub settle: Duration,
}

impl Worker {
    /// Reports the host, and applies the desired configuration if this node does not have
    /// it yet. `latest` follows the Node, for readiness checks after a restart.
    pub async fn step(&self, node: &Node, latest: &watch::Receiver<Option<Arc<Node>>>) {
        let agent = match &self.setup {
            Setup::Unsupported(why) => {
                let wanted = annotations(None, None, NodeState::Unsupported.as_str(), why);
                if self.annotate(node, &wanted).await {
                    self.reporter.event(node, true, "Unsupported", why).await;
                }
                return;
            }
            Setup::Ready(agent) => agent,
        };
        let flavor = agent.runtime.flavor.to_string();
        let current = agent.current();
        let Some(desired) = work(node, current.as_deref()) else {
            // Nothing to do: make sure the flavor and what is on the host are known.
            if annotation(node, STATE).is_none()
                || annotation(node, FLAVOR).as_deref() != Some(&flavor)
            {
                let message = agent.runtime.warning.clone().unwrap_or_default();
                let wanted = annotations(
                    Some(&flavor),
                    current.as_deref(),
                    NodeState::Applied.as_str(),
                    &message,
                );
                self.annotate(node, &wanted).await;
            }
            return;
        };

        tracing::info!(config = %desired, "applying");
        let applying = annotations(
            Some(&flavor),
            current.as_deref(),
            NodeState::Applying.as_str(),
            &format!("applying {desired}"),
        );
        self.annotate(node, &applying).await;
        let started = tokio::time::Instant::now();
        let outcome = match self.fetch(&desired).await {
            Ok(config) => {
                agent
                    .apply(&desired, &config, |timeout| {
                        wait_ready(latest.clone(), self.settle, timeout)
                    })
                    .await
            }
            Err(message) => Outcome {
                state: NodeState::Failed,
                current: current.clone(),
                message,
                activated: None,
                rolled_back: false,
            },
        };
        self.metrics.observe(&outcome, started.elapsed());
        let fresh = latest.borrow().clone();
        let node = fresh.as_deref().unwrap_or(node);
        let wanted = annotations(
            Some(&flavor),
            outcome.current.as_deref(),
            outcome.state.as_str(),
            &outcome.message,
        );
        self.annotate(node, &wanted).await;
        let (warning, reason) = match (outcome.state, outcome.rolled_back) {
            (NodeState::Applied, _) => (false, "Applied"),
            (_, true) => (true, "RolledBack"),
            _ => (true, "ApplyFailed"),
        };
        self.reporter
            .event(node, warning, reason, &outcome.message)
            .await;
        tracing::info!(config = %desired, state = outcome.state.as_str(), message = %outcome.message, "done");
    }

    /// Returns whether anything was written.
    async fn annotate(
        &self,
        node: &Node,
        wanted: &std::collections::BTreeMap<&'static str, String>,
    ) -> bool {
        let before = node.metadata.annotations.clone().unwrap_or_default();
        let changes = wanted.iter().any(|(k, v)| before.get(*k) != Some(v));
        if let Err(e) = self.reporter.annotate(node, wanted).await {
            tracing::error!(error = %e, "cannot annotate the Node");
        }
        changes
    }

    /// Reads a config Secret.
    async fn fetch(&self, name: &str) -> Result<RenderedConfig, String> {
        let secret = self
            .secrets
            .get(name)
            .await
            .map_err(|e| format!("{name}: cannot read the config Secret: {e}"))?;
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(CONFIG_KEY))
            .ok_or_else(|| format!("{name}: the config Secret has no {CONFIG_KEY}"))?;
        serde_json::from_slice(&bytes.0)
            .map_err(|e| format!("{name}: the config Secret does not decode: {e}"))
    }
}

/// The configuration to apply now, if any: the desired one, unless the host has it already
/// or it already failed here (the operator stops a failed config; retrying it in a loop would
/// restart the runtime again and again). Which config failed is told by the message, which
/// always starts with its name — so it survives an agent restart.
pub fn work(node: &Node, current: Option<&str>) -> Option<String> {
    let desired = annotation(node, DESIRED_CONFIG)?;
    if Some(desired.as_str()) == current {
        return None;
    }
    let failed_here = annotation(node, STATE).as_deref() == Some(NodeState::Failed.as_str())
        && annotation(node, MESSAGE).is_some_and(|m| {
            m.strip_prefix(desired.as_str())
                .is_some_and(|rest| rest.starts_with([' ', ':']))
        });
    (!failed_here).then_some(desired)
}

fn annotation(node: &Node, key: &str) -> Option<String> {
    node.metadata.annotations.as_ref()?.get(key).cloned()
}

fn ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// Waits `settle`, then up to `timeout` for the Node to be Ready.
async fn wait_ready(
    mut latest: watch::Receiver<Option<Arc<Node>>>,
    settle: Duration,
    timeout: Duration,
) -> Result<(), String> {
    tokio::time::sleep(settle).await;
    let is_ready = |n: &Option<Arc<Node>>| n.as_deref().is_some_and(ready);
    tokio::time::timeout(timeout, latest.wait_for(is_ready))
        .await
        .map_err(|_| format!("node not Ready within {}s", timeout.as_secs()))?
        .map(|_| ())
        .map_err(|_| "the Node watch ended".to_owned())
}
