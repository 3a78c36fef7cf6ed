//! What the agent does with one configuration, on the host: write it, make the runtime pick it
//! up, check that it works — and if it does not, put the last good configuration back.
//!
//! No Kubernetes here: the caller fetched the configuration and will report the outcome.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use regmirror_core::activation::Activation;
use regmirror_core::contract::NodeState;
use regmirror_core::render::RenderedConfig;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::detect::Host;
use crate::hostfs::{HostError, HostFs};
use crate::restart::{Activator, RestartError};
use crate::verify::{self, VerifyError};

/// How long each check may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For one endpoint to answer; `None`: endpoints are not probed.
    pub probe: Option<Duration>,
    /// For the runtime (and the node) to be back after a restart or reload.
    pub ready: Duration,
}

/// The result of applying a configuration, for the node's annotations and Events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub state: NodeState,
    /// The configuration on the host afterwards (by its Secret name).
    pub current: Option<String>,
    /// What happened, for people.
    pub message: String,
    /// The runtime was restarted or reloaded.
    pub activated: Option<Activation>,
    pub rolled_back: bool,
}

/// The node did not come back Ready after a restart or reload.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum NotReady {
    #[error("node not Ready within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("the Node watch ended")]
    WatchEnded,
}

/// Why a configuration did not take.
#[derive(Debug, Error)]
pub enum ApplyError {
    #[error(transparent)]
    Activate(#[from] RestartError),
    #[error(transparent)]
    NotReady(#[from] NotReady),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Host(#[from] HostError),
}

/// The state-directory record of the last apply.
const REPORT: &str = "report.json";

/// What the last apply came to, as the host remembers it: the node's annotations can always be
/// brought back in line with it, and a config that failed here is not tried again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The config that was applied.
    pub config: String,
    /// `Applied` or `Failed`.
    pub state: NodeState,
    /// The config the host runs afterwards.
    pub current: Option<String>,
    pub message: String,
}

/// The agent on one host.
pub struct Agent {
    pub host: HostFs,
    pub root: PathBuf,
    pub runtime: Host,
    pub activator: Activator,
    pub timeouts: Timeouts,
}

impl Agent {
    pub fn new(root: &Path, runtime: Host, activator: Activator, timeouts: Timeouts) -> Self {
        Agent {
            host: HostFs::new(root),
            root: root.to_owned(),
            runtime,
            activator,
            timeouts,
        }
    }

    /// The last configuration verified on this host, by the name it was applied under: what
    /// the node runs. A config written but not verified (the agent stopped half-way) does not
    /// count, so it is applied — and activated — again.
    pub fn verified(&self) -> Option<String> {
        match self.host.last_good_name() {
            Ok(name) => name,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the last good configuration's record");
                None
            }
        }
    }

    /// What the last apply on this host came to (kept across agent restarts).
    pub fn last_report(&self) -> Option<Report> {
        self.host.read_state(REPORT).ok().flatten()
    }

    /// Applies `config` (the Secret `name`) with the step the operator decided, and records
    /// the outcome on the host. The step is carried out as given, never computed here: the
    /// operator holds the restart budget. A rollback takes the same step back.
    /// `node_ready` waits for the node to be Ready again after a restart or reload.
    pub async fn apply<R, F>(
        &self,
        name: &str,
        config: &RenderedConfig,
        step: Activation,
        node_ready: R,
    ) -> Outcome
    where
        R: Fn(Activation, Timestamp, Duration) -> F,
        F: Future<Output = Result<(), NotReady>>,
    {
        let outcome = self.apply_and_check(name, config, step, node_ready).await;
        let report = Report {
            config: name.to_owned(),
            state: outcome.state,
            current: outcome.current.clone(),
            message: outcome.message.clone(),
        };
        if let Err(e) = self.host.write_state(REPORT, &report) {
            tracing::warn!(error = %e, "cannot record the outcome on the host");
        }
        outcome
    }

    async fn apply_and_check<R, F>(
        &self,
        name: &str,
        config: &RenderedConfig,
        step: Activation,
        node_ready: R,
    ) -> Outcome
    where
        R: Fn(Activation, Timestamp, Duration) -> F,
        F: Future<Output = Result<(), NotReady>>,
    {
        let previous_name = self.verified();
        let failed = |message: String, current: Option<String>, rolled_back| Outcome {
            state: NodeState::Failed,
            current,
            message,
            activated: None,
            rolled_back,
        };
        let flavor = self.runtime.flavor.to_string();
        if config.flavor != flavor {
            // The operator rendered it before it read this node's flavor (just detected, or
            // changed: k3s's embedded registry turned on); the report carries the flavor, and
            // the operator renders again. Not the config's fault: failing it would stop it on
            // every other node.
            return Outcome {
                state: NodeState::Applying,
                current: previous_name,
                message: format!(
                    "waiting for a configuration rendered for {flavor}: {name} was rendered for {}; nothing was written",
                    config.flavor
                ),
                activated: None,
                rolled_back: false,
            };
        }

        let report = match self.host.apply(config) {
            Ok(report) => report,
            Err(e) => {
                // The journal keeps the host whole; finish or undo what was started.
                let _ = self.host.recover();
                return failed(
                    format!("{name}: writing failed: {e}"),
                    self.verified(),
                    false,
                );
            }
        };
        tracing::info!(config = %name, written = report.written.len(), removed = report.removed.len(), activation = ?step, "configuration written");

        match self.activate_and_verify(config, step, &node_ready).await {
            Ok(warnings) => {
                if let Err(e) = self.host.mark_good(name) {
                    tracing::warn!(error = %e, "cannot record the configuration as good");
                }
                let mut message = match step {
                    Activation::Hot => format!("{name} applied without a restart"),
                    Activation::Reload => format!("{name} applied; {} reloaded", self.runtime.unit),
                    Activation::Restart => {
                        format!("{name} applied; {} restarted", self.runtime.unit)
                    }
                };
                if !report.backed_up.is_empty() {
                    message.push_str(&format!(
                        "; hand-written files backed up under /{}/backup: {}",
                        crate::hostfs::STATE_DIR,
                        report.backed_up.join(", ")
                    ));
                }
                for warning in self.runtime.warning.iter().chain(&warnings) {
                    message.push_str(&format!("; warning: {warning}"));
                }
                Outcome {
                    state: NodeState::Applied,
                    current: Some(name.to_owned()),
                    message,
                    activated: (step != Activation::Hot).then_some(step),
                    rolled_back: false,
                }
            }
            Err(reason) => {
                tracing::warn!(config = %name, %reason, "configuration failed; rolling back");
                let restored = self.roll_back(config, step, &node_ready).await;
                let message = match &restored {
                    Ok(Some(good)) => format!("{name} failed: {reason}; restored {good}"),
                    Ok(None) => format!("{name} failed: {reason}; removed it (no earlier good configuration)"),
                    Err(e) => format!("{name} failed: {reason}; restoring the previous configuration failed too: {e}"),
                };
                failed(message, self.verified(), true)
            }
        }
    }

    async fn activate_and_verify<R, F>(
        &self,
        config: &RenderedConfig,
        step: Activation,
        node_ready: &R,
    ) -> Result<Vec<String>, ApplyError>
    where
        R: Fn(Activation, Timestamp, Duration) -> F,
        F: Future<Output = Result<(), NotReady>>,
    {
        self.activate(step, node_ready).await?;
        match self.timeouts.probe {
            Some(timeout) => Ok(verify::verify(config, &self.root, timeout).await?),
            None => Ok(Vec::new()),
        }
    }

    /// Puts the last good configuration back (or none, if there never was one) and activates
    /// it with the step the failed one took: a runtime that was restarted for it is restarted
    /// again, one that was not is not. Returns its name.
    async fn roll_back<R, F>(
        &self,
        failed: &RenderedConfig,
        step: Activation,
        node_ready: &R,
    ) -> Result<Option<String>, ApplyError>
    where
        R: Fn(Activation, Timestamp, Duration) -> F,
        F: Future<Output = Result<(), NotReady>>,
    {
        let good = self.host.last_good()?;
        let target = good.clone().unwrap_or_else(|| RenderedConfig {
            flavor: failed.flavor.clone(),
            files: Default::default(),
            restart_key: String::new(),
            parts: Default::default(),
            probes: Default::default(),
            credential_sources: Default::default(),
            peer_registries: Vec::new(),
        });
        self.host.apply(&target)?;
        if good.is_none() {
            // Never a good config of ours: the node gets back what it had before.
            let restored = self.host.restore_backups(failed.files.keys())?;
            if !restored.is_empty() {
                tracing::warn!(files = ?restored, "restored the hand-written files regmirror had replaced");
            }
        }
        self.activate(step, node_ready).await?;
        Ok(match good {
            Some(_) => self.host.last_good_name()?,
            None => None,
        })
    }

    /// Restarts or reloads the runtime as `step` takes, then waits for the node to be Ready.
    async fn activate<R, F>(&self, step: Activation, node_ready: &R) -> Result<(), ApplyError>
    where
        R: Fn(Activation, Timestamp, Duration) -> F,
        F: Future<Output = Result<(), NotReady>>,
    {
        let started = Timestamp::now();
        self.activator.activate(step, self.timeouts.ready).await?;
        if step != Activation::Hot {
            node_ready(step, started, self.timeouts.ready).await?;
        }
        Ok(())
    }
}
