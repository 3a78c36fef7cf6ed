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
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use prometheus_client::registry::Registry;
use regmirror_core::activation::{agent_step, Activation};
use regmirror_core::contract::{
    node_ready, ready_condition, sealed_config, ConfigSecretError, NodeState, CONFIG_KEY,
    CURRENT_CONFIG, DESIRED_ACTIVATION, DESIRED_CONFIG,
};
use regmirror_core::node::Flavor;
use regmirror_core::render::RenderedConfig;
use regmirror_core::seal::{ConfigKey, SealError};
use regmirror_process::endpoints::{self, BindError, Health};
use regmirror_process::shutdown;
use thiserror::Error;
use tokio::sync::watch;
use tracing::Instrument;

use crate::agent::{Agent, NotReady, Report, Timeouts};
use crate::detect::{self, Detected, Host};
use crate::metrics::Metrics;
use crate::node_key;
use crate::report::{annotations, HostIdentity, NodeReporter};
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

/// How long to wait before reading a config Secret again.
const FETCH_RETRY: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("the watch of Node {0} ended")]
    WatchEnded(String),
}

/// Why a config Secret could not be had.
#[derive(Debug, Error)]
pub enum FetchError {
    #[error("{name}: cannot read the config Secret: {source}")]
    Read {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("{name}: {source}")]
    NotAConfig {
        name: String,
        #[source]
        source: ConfigSecretError,
    },
    #[error(transparent)]
    Open(#[from] SealError),
}

/// What the agent knows about its host, decided at start (and again while unsupported: the
/// host may be fixed).
pub enum Setup {
    Ready(Agent),
    /// Nothing regmirror can configure here; the reason is reported.
    Unsupported(String),
}

/// Detects (or takes) the flavor, finishes an interrupted apply, and builds the agent.
pub fn set_up(settings: &Settings) -> Setup {
    let runtime = match &settings.flavor {
        Some(flavor) => {
            if let Some(why) = detect::ignored_by_containerd(flavor, &settings.root) {
                return Setup::Unsupported(why);
            }
            Host {
                flavor: flavor.clone(),
                unit: detect::default_unit(flavor, &settings.root),
                warning: None,
            }
        }
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

/// How often an unsupported host is looked at again.
const RECHECK_UNSUPPORTED: Duration = Duration::from_secs(60);

/// Runs the agent until SIGTERM.
pub async fn run(client: kube::Client, settings: Settings) -> Result<(), AgentError> {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let health = Health::new(registry);
    tokio::spawn(endpoints::serve(settings.listen, health.clone()).await?);

    let mut worker = Worker {
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
    let mut retry: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            changed = changes.changed() => {
                if changed.is_err() {
                    return Err(AgentError::WatchEnded(settings.node_name.clone()));
                }
            }
            _ = tokio::time::sleep_until(retry.unwrap_or_else(tokio::time::Instant::now)), if retry.is_some() => {}
        }
        let Some(node) = changes.borrow_and_update().clone() else {
            continue;
        };
        health.set_ready(true);
        if let Setup::Unsupported(_) = worker.setup {
            // A person may have fixed the host since (containerd's config_path, say).
            worker.setup = set_up(&settings);
        }
        if let Setup::Ready(agent) = &mut worker.setup {
            if agent
                .runtime
                .note_node_labels(node.metadata.labels.as_ref())
            {
                tracing::info!(flavor = %agent.runtime.flavor, "k3s runs its embedded registry mirror on this node (its Node label says so)");
            }
        }
        retry = worker
            .step(&node, &changes)
            .await
            .map(|after| tokio::time::Instant::now() + after);
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
    /// it yet. `latest` follows the Node, for readiness checks after a restart. Returns when
    /// to try again if the configuration could not be read yet.
    pub async fn step(
        &self,
        node: &Node,
        latest: &watch::Receiver<Option<Arc<Node>>>,
    ) -> Option<Duration> {
        let agent = match &self.setup {
            Setup::Unsupported(why) => {
                let wanted = annotations(None, None, NodeState::Unsupported, why);
                if self.annotate(node, &wanted).await {
                    self.reporter.event(node, true, "Unsupported", why).await;
                }
                return Some(RECHECK_UNSUPPORTED);
            }
            Setup::Ready(agent) => agent,
        };
        let key = match node_key::load_or_create(&agent.host) {
            Ok(key) => key,
            Err(e) => {
                // Without a key nothing can be opened; say so, and try again later. It is the
                // host's problem, not the config's: Failed would halt the config everywhere.
                let message = format!("cannot read or make this node's key: {e}");
                tracing::error!(%message);
                let wanted = annotations(None, None, NodeState::Applying, &message);
                self.annotate(node, &wanted).await;
                return Some(FETCH_RETRY);
            }
        };
        let flavor = agent.runtime.flavor.to_string();
        let public_key = key.public().to_text();
        let identity = HostIdentity {
            flavor: &flavor,
            public_key: &public_key,
        };
        let verified = agent.verified();
        let report = agent.last_report();
        let Some(desired) = work(node, verified.as_deref(), report.as_ref()) else {
            // Nothing to do: the annotations say what the host says (after an agent restart,
            // or a report that did not get through).
            // The report speaks for the desired config only: a node told to go back to what it
            // runs is Applied, whatever failed here before.
            let desired = annotation(node, DESIRED_CONFIG);
            let wanted = match report
                .filter(|r| r.current == verified && Some(&r.config) == desired.as_ref())
            {
                Some(r) => annotations(Some(&identity), r.current.as_deref(), r.state, &r.message),
                None => annotations(
                    Some(&identity),
                    verified.as_deref(),
                    NodeState::Applied,
                    agent.runtime.warning.as_deref().unwrap_or_default(),
                ),
            };
            self.annotate(node, &wanted).await;
            return None;
        };

        let applying = |message: &str| {
            annotations(
                Some(&identity),
                verified.as_deref(),
                NodeState::Applying,
                message,
            )
        };
        let config_key = annotation(node, CONFIG_KEY)
            .ok_or(SealError::BadFormat)
            .and_then(|sealed| key.open_key(&desired, &sealed));
        let config_key = match config_key {
            Ok(k) => k,
            Err(e) => {
                // The operator seals the key to the public key this report publishes; its
                // next write wakes this loop.
                let message =
                    format!("waiting for the operator to seal {desired} to this node's key ({e})");
                tracing::info!(config = %desired, %message);
                self.annotate(node, &applying(&message)).await;
                return None;
            }
        };
        let (step, note) = step_for(node, &desired, verified.as_deref());
        tracing::info!(config = %desired, activation = %step, "applying");
        self.annotate(node, &applying(&format!("applying {desired}")))
            .await;
        let config = match self.fetch(&desired, &config_key).await {
            Ok(config) => config,
            Err(error) => {
                let message = error.to_string();
                // Not the config's fault (RBAC not yet propagated, the API server busy, a
                // Secret the operator is about to replace): wait and read it again, without
                // failing it.
                tracing::warn!(config = %desired, %message, "retrying");
                self.annotate(node, &applying(&message)).await;
                return Some(FETCH_RETRY);
            }
        };
        let started = tokio::time::Instant::now();
        let node_name = node.metadata.name.as_deref().unwrap_or_default();
        let mut outcome = agent
            .apply(&desired, &config, step, |step, since, timeout| {
                wait_ready(latest.clone(), self.settle, step, since, timeout)
            })
            .instrument(tracing::info_span!("apply", node = %node_name, config = %desired, activation = %step))
            .await;
        if let Some(note) = note {
            outcome.message.push_str(&format!("; note: {note}"));
        }
        self.metrics.observe(&outcome, started.elapsed());
        let fresh = latest.borrow().clone();
        let node = fresh.as_deref().unwrap_or(node);
        let wanted = annotations(
            Some(&identity),
            outcome.current.as_deref(),
            outcome.state,
            &outcome.message,
        );
        self.annotate(node, &wanted).await;
        let event = match (outcome.state, outcome.rolled_back) {
            (NodeState::Applied, _) => Some((false, "Applied")),
            // Nothing happened on the host (a config for another flavor): the annotation says
            // what the node waits for.
            (NodeState::Applying, _) => None,
            (_, true) => Some((true, "RolledBack")),
            _ => Some((true, "ApplyFailed")),
        };
        if let Some((warning, reason)) = event {
            self.reporter
                .event(node, warning, reason, &outcome.message)
                .await;
        }
        tracing::info!(config = %desired, state = outcome.state.as_str(), message = %outcome.message, "done");
        None
    }

    /// Returns whether the annotations had to change (written, or tried: a failed write is
    /// logged, and the next Node event tries again).
    async fn annotate(
        &self,
        node: &Node,
        wanted: &std::collections::BTreeMap<&'static str, String>,
    ) -> bool {
        self.reporter
            .annotate(node, wanted)
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot annotate the Node");
                true
            })
    }

    /// Reads a config Secret and opens it: the content must open with the key the operator
    /// sealed for this node, and hash to the Secret's name.
    async fn fetch(&self, name: &str, key: &ConfigKey) -> Result<RenderedConfig, FetchError> {
        let read = |source| FetchError::Read {
            name: name.to_owned(),
            source,
        };
        let secret = self.secrets.get(name).await.map_err(read)?;
        let sealed = sealed_config(&secret).map_err(|source| FetchError::NotAConfig {
            name: name.to_owned(),
            source,
        })?;
        Ok(key.open_config(name, sealed)?)
    }
}

/// The step to take for moving to `desired` ([`agent_step`]: the operator's, never one of
/// the agent's own), and a note for the report where the host's record disagrees with the
/// Node or the operator named no usable step.
pub fn step_for(
    node: &Node,
    desired: &str,
    verified: Option<&str>,
) -> (Activation, Option<String>) {
    let reported = annotation(node, CURRENT_CONFIG);
    let told = annotation(node, DESIRED_ACTIVATION).map(|a| a.parse::<Activation>());
    let step = agent_step(
        reported.as_deref(),
        desired,
        told.clone().and_then(Result::ok),
    );
    let note = if reported.as_deref() == Some(desired) {
        Some(format!(
            "this host's record of {desired} was missing; its files were written again without a restart, as the runtime already runs it"
        ))
    } else {
        match told {
            Some(Err(e)) => Some(format!("{e}; applied without a restart")),
            None => Some("the operator named no step (regmirror.io/desired-activation); applied without a restart".to_owned()),
            Some(Ok(_)) => (verified.is_none() && reported.is_some()).then(|| {
                format!(
                    "this host had no record of {}; carried out the operator's step as decided",
                    reported.as_deref().unwrap_or_default()
                )
            }),
        }
    };
    (step, note)
}

/// The configuration to apply now, if any: the desired one, unless the host runs it already
/// or it already failed here (the operator stops a failed config; retrying it in a loop would
/// restart the runtime again and again). The host's own record says what failed, so this
/// holds across agent restarts and reports that did not get through.
pub fn work(node: &Node, verified: Option<&str>, last: Option<&Report>) -> Option<String> {
    let desired = annotation(node, DESIRED_CONFIG)?;
    if Some(desired.as_str()) == verified {
        return None;
    }
    let failed_here = last.is_some_and(|r| r.config == desired && r.state == NodeState::Failed);
    (!failed_here).then_some(desired)
}

fn annotation(node: &Node, key: &str) -> Option<String> {
    node.metadata.annotations.as_ref()?.get(key).cloned()
}

fn heartbeat(node: &Node) -> Option<Timestamp> {
    ready_condition(node)?
        .last_heartbeat_time
        .as_ref()
        .map(|t| t.0)
}

/// Waits `settle`, then up to `timeout` for the Node to be Ready. After a restart the Ready
/// condition must also have been posted since the restart began: k3s and RKE2 restart their
/// kubelet with the runtime, and a Node still showing the Ready of before proves nothing.
async fn wait_ready(
    mut latest: watch::Receiver<Option<Arc<Node>>>,
    settle: Duration,
    step: Activation,
    since: Timestamp,
    timeout: Duration,
) -> Result<(), NotReady> {
    tokio::time::sleep(settle).await;
    let is_ready = |n: &Option<Arc<Node>>| {
        n.as_deref().is_some_and(|n| {
            node_ready(n)
                && (step != Activation::Restart || heartbeat(n).is_some_and(|t| t >= since))
        })
    };
    tokio::time::timeout(timeout, latest.wait_for(is_ready))
        .await
        .map_err(|_| NotReady::Timeout(timeout))?
        .map(|_| ())
        .map_err(|_| NotReady::WatchEnded)
}
