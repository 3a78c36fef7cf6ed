//! Making the runtime pick a configuration up when it does not read it live: a restart (k3s
//! and RKE2 read credentials only at start) or a reload (CRI-O), through systemd over D-Bus on
//! the host's system bus, or through a command the cluster operator configured.
//!
//! Either way the runtime must be back — the unit `active` again, or the command successful —
//! within the timeout, or the activation failed.

use std::path::PathBuf;
use std::time::Duration;

use regmirror_core::activation::Activation;
use thiserror::Error;
use tokio::time::{sleep, Instant};

#[derive(Debug, Error)]
pub enum RestartError {
    #[error("cannot reach systemd on the host bus {bus}: {source}")]
    Bus { bus: String, source: zbus::Error },
    #[error("systemd refused to {verb} {unit}: {source}")]
    Refused {
        verb: &'static str,
        unit: String,
        source: zbus::Error,
    },
    #[error("{unit} is {state} after the {verb}, not active")]
    NotActive {
        unit: String,
        verb: &'static str,
        state: String,
    },
    #[error("{unit} not active within {}s of the {verb} (last state: {state})", timeout.as_secs())]
    Timeout {
        unit: String,
        verb: &'static str,
        state: String,
        timeout: Duration,
    },
    #[error("systemd finished the {verb} of {unit}, but the unit never became active again")]
    NotRestarted { unit: String, verb: &'static str },
    #[error("restart command `{command}` {outcome}")]
    Command { command: String, outcome: String },
}

/// How the runtime is made to pick a configuration up.
#[derive(Debug, Clone)]
pub enum Activator {
    /// systemd's `RestartUnit` / `ReloadUnit` over D-Bus.
    Systemd {
        /// The system bus socket, as mounted from the host.
        bus: PathBuf,
        unit: String,
    },
    /// `sh -c <command>`, for both restarts and reloads; success is exit status 0.
    Command { command: String },
}

impl Activator {
    /// Does what `activation` takes; `Hot` takes nothing.
    pub async fn activate(
        &self,
        activation: Activation,
        timeout: Duration,
    ) -> Result<(), RestartError> {
        let verb = match activation {
            Activation::Hot => return Ok(()),
            Activation::Reload => "reload",
            Activation::Restart => "restart",
        };
        tracing::info!(activator = ?self, verb, "activating the new configuration");
        match self {
            Activator::Systemd { bus, unit } => systemd(bus, unit, verb, timeout).await,
            Activator::Command { command } => run_command(command, timeout).await,
        }
    }
}

async fn run_command(command: &str, timeout: Duration) -> Result<(), RestartError> {
    let failed = |outcome: String| RestartError::Command {
        command: command.to_owned(),
        outcome,
    };
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", command])
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(format!("did not start: {e}")))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Err(_) => Err(failed(format!(
            "did not finish within {}s",
            timeout.as_secs()
        ))),
        Ok(Err(e)) => Err(failed(format!("could not be waited for: {e}"))),
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(failed(format!("failed ({status})"))),
    }
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn restart_unit(&self, name: &str, mode: &str)
        -> zbus::Result<zbus::zvariant::OwnedObjectPath>;
    fn reload_unit(&self, name: &str, mode: &str) -> zbus::Result<zbus::zvariant::OwnedObjectPath>;
    fn load_unit(&self, name: &str) -> zbus::Result<zbus::zvariant::OwnedObjectPath>;
    #[allow(clippy::type_complexity)]
    fn list_jobs(
        &self,
    ) -> zbus::Result<
        Vec<(
            u32,
            String,
            String,
            String,
            zbus::zvariant::OwnedObjectPath,
            zbus::zvariant::OwnedObjectPath,
        )>,
    >;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn active_enter_timestamp(&self) -> zbus::Result<u64>;
}

/// Restarts or reloads `unit`, then waits for it to be `active` again.
async fn systemd(
    bus: &std::path::Path,
    unit: &str,
    verb: &'static str,
    timeout: Duration,
) -> Result<(), RestartError> {
    let address = format!("unix:path={}", bus.display());
    let bus_error = |source| RestartError::Bus {
        bus: bus.display().to_string(),
        source,
    };
    let connection = zbus::connection::Builder::address(address.as_str())
        .map_err(bus_error)?
        .build()
        .await
        .map_err(bus_error)?;
    let manager = ManagerProxy::new(&connection).await.map_err(bus_error)?;
    let refused = |source| RestartError::Refused {
        verb,
        unit: unit.to_owned(),
        source,
    };
    let path = manager.load_unit(unit).await.map_err(refused)?;
    let unit_proxy = UnitProxy::builder(&connection)
        .path(path)
        .map_err(bus_error)?
        // Properties change under us: always ask.
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(bus_error)?;
    let entered_before = unit_proxy
        .active_enter_timestamp()
        .await
        .map_err(bus_error)?;
    let job = match verb {
        "reload" => manager.reload_unit(unit, "replace").await,
        _ => manager.restart_unit(unit, "replace").await,
    }
    .map_err(refused)?;

    // Done when systemd has finished the job and the unit is active — after a restart,
    // active *again*: `RestartUnit` returns when the job is queued, while the unit may still
    // show the `active` of before.
    let deadline = Instant::now() + timeout;
    loop {
        let jobs = manager.list_jobs().await.map_err(bus_error)?;
        let running = jobs.iter().any(|j| j.4 == job);
        let state = unit_proxy.active_state().await.map_err(bus_error)?;
        let entered = unit_proxy
            .active_enter_timestamp()
            .await
            .map_err(bus_error)?;
        let restarted = verb == "reload" || entered > entered_before;
        match state.as_str() {
            "active" if !running && restarted => return Ok(()),
            "active" if !running => {
                return Err(RestartError::NotRestarted {
                    unit: unit.to_owned(),
                    verb,
                })
            }
            "failed" => {
                return Err(RestartError::NotActive {
                    unit: unit.to_owned(),
                    verb,
                    state,
                })
            }
            "inactive" if !running => {
                return Err(RestartError::NotActive {
                    unit: unit.to_owned(),
                    verb,
                    state,
                })
            }
            _ if Instant::now() >= deadline => {
                return Err(RestartError::Timeout {
                    unit: unit.to_owned(),
                    verb,
                    state,
                    timeout,
                })
            }
            _ => sleep(Duration::from_millis(500)).await,
        }
    }
}
