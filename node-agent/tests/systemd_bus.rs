//! Restarts through systemd's D-Bus API, over a real `dbus-daemon` bus: the agent's calls are
//! answered by a stand-in for systemd's Manager and Unit objects served on that bus, which
//! records what it was asked and walks the unit through its states.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use regmirror_core::activation::Activation;
use regmirror_node_agent::restart::{Activator, RestartError};
use zbus::zvariant::OwnedObjectPath;

/// A private bus: `dbus-daemon` listening on a socket in `dir`.
struct Bus {
    daemon: Child,
    socket: PathBuf,
}

impl Bus {
    fn start(dir: &Path) -> Bus {
        regmirror_testbed::require_tool("dbus-daemon");
        let socket = dir.join("system_bus_socket");
        let config = dir.join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/><allow send_type="method_call"/><allow send_destination="*"/><allow receive_type="*"/>
  </policy>
</busconfig>"#,
                socket.display()
            ),
        )
        .unwrap();
        let daemon = Command::new("dbus-daemon")
            .args([
                "--nofork",
                "--nopidfile",
                &format!("--config-file={}", config.display()),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Bus { daemon, socket }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// What the stand-in systemd was asked, and the states its unit goes through.
#[derive(Default)]
struct Systemd {
    calls: Vec<String>,
    /// ActiveState answers, in order; the last one repeats.
    states: Vec<&'static str>,
    /// How many more times ListJobs shows the queued job.
    job_polls: u32,
    /// The unit's ActiveEnterTimestamp; a restart moves it on unless `restart_is_noop`.
    entered: u64,
    restart_is_noop: bool,
}

const JOB: &str = "/org/freedesktop/systemd1/job/1";
const UNIT: &str = "/org/freedesktop/systemd1/unit/the_2eservice";

struct Manager(Arc<Mutex<Systemd>>);

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl Manager {
    fn restart_unit(&self, name: &str, mode: &str) -> OwnedObjectPath {
        let mut systemd = self.0.lock().unwrap();
        systemd.calls.push(format!("RestartUnit {name} {mode}"));
        if !systemd.restart_is_noop {
            systemd.entered += 1;
        }
        OwnedObjectPath::try_from(JOB).unwrap()
    }

    fn reload_unit(&self, name: &str, mode: &str) -> OwnedObjectPath {
        let mut systemd = self.0.lock().unwrap();
        systemd.calls.push(format!("ReloadUnit {name} {mode}"));
        OwnedObjectPath::try_from(JOB).unwrap()
    }

    fn load_unit(&self, name: &str) -> zbus::fdo::Result<OwnedObjectPath> {
        self.0
            .lock()
            .unwrap()
            .calls
            .push(format!("LoadUnit {name}"));
        match name {
            "k3s-agent.service" | "crio.service" => Ok(OwnedObjectPath::try_from(UNIT).unwrap()),
            _ => Err(zbus::fdo::Error::FileNotFound(format!(
                "Unit {name} not found."
            ))),
        }
    }

    #[allow(clippy::type_complexity)]
    fn list_jobs(
        &self,
    ) -> Vec<(
        u32,
        String,
        String,
        String,
        OwnedObjectPath,
        OwnedObjectPath,
    )> {
        let mut systemd = self.0.lock().unwrap();
        if systemd.job_polls == 0 {
            return vec![];
        }
        systemd.job_polls -= 1;
        let path = |p: &str| OwnedObjectPath::try_from(p).unwrap();
        vec![(
            1,
            "the.service".into(),
            "restart".into(),
            "running".into(),
            path(JOB),
            path(UNIT),
        )]
    }
}

struct Unit(Arc<Mutex<Systemd>>);

#[zbus::interface(name = "org.freedesktop.systemd1.Unit")]
impl Unit {
    #[zbus(property)]
    fn active_state(&self) -> String {
        let mut systemd = self.0.lock().unwrap();
        let state = if systemd.states.len() > 1 {
            systemd.states.remove(0)
        } else {
            systemd.states[0]
        };
        state.to_owned()
    }

    #[zbus(property)]
    fn active_enter_timestamp(&self) -> u64 {
        self.0.lock().unwrap().entered
    }
}

async fn systemd_on(
    bus: &Bus,
    states: Vec<&'static str>,
) -> (zbus::Connection, Arc<Mutex<Systemd>>) {
    systemd_with(
        bus,
        Systemd {
            states,
            job_polls: 2,
            entered: 1_700_000_000,
            ..Systemd::default()
        },
    )
    .await
}

async fn systemd_with(bus: &Bus, systemd: Systemd) -> (zbus::Connection, Arc<Mutex<Systemd>>) {
    let systemd = Arc::new(Mutex::new(systemd));
    let connection =
        zbus::connection::Builder::address(format!("unix:path={}", bus.socket.display()).as_str())
            .unwrap()
            .name("org.freedesktop.systemd1")
            .unwrap()
            .serve_at("/org/freedesktop/systemd1", Manager(systemd.clone()))
            .unwrap()
            .serve_at(UNIT, Unit(systemd.clone()))
            .unwrap()
            .build()
            .await
            .unwrap();
    (connection, systemd)
}

fn activator(bus: &Bus, unit: &str) -> Activator {
    Activator::Systemd {
        bus: bus.socket.clone(),
        unit: unit.into(),
    }
}

#[tokio::test]
async fn a_restart_waits_for_the_job_and_for_the_unit_to_be_active_again() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start(dir.path());
    let (_systemd_connection, systemd) =
        systemd_on(&bus, vec!["active", "deactivating", "activating", "active"]).await;
    activator(&bus, "k3s-agent.service")
        .activate(Activation::Restart, Duration::from_secs(10))
        .await
        .unwrap();
    let systemd = systemd.lock().unwrap();
    assert_eq!(
        systemd.calls,
        [
            "LoadUnit k3s-agent.service",
            "RestartUnit k3s-agent.service replace"
        ]
    );
    assert_eq!(systemd.job_polls, 0, "waited for the job to finish");
}

#[tokio::test]
async fn a_reload_is_a_reload_and_a_hot_change_asks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start(dir.path());
    let (_c, systemd) = systemd_on(&bus, vec!["active"]).await;
    let crio = activator(&bus, "crio.service");
    crio.activate(Activation::Hot, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(systemd.lock().unwrap().calls.is_empty());
    crio.activate(Activation::Reload, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        systemd.lock().unwrap().calls,
        ["LoadUnit crio.service", "ReloadUnit crio.service replace"]
    );
}

#[tokio::test]
async fn a_unit_that_fails_never_comes_back_or_never_restarts_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start(dir.path());
    let (c, _) = systemd_on(&bus, vec!["activating", "failed"]).await;
    let err = activator(&bus, "k3s-agent.service")
        .activate(Activation::Restart, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(err, RestartError::NotActive { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "k3s-agent.service is failed after the restart, not active"
    );
    drop(c);

    let (c, _) = systemd_on(&bus, vec!["activating"]).await;
    let err = activator(&bus, "k3s-agent.service")
        .activate(Activation::Restart, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("k3s-agent.service not active within 1s of the restart"),
        "{err}"
    );
    drop(c);

    // Still `active` when the job is done, but it never re-entered: no restart happened.
    let quiet = Systemd {
        states: vec!["active"],
        job_polls: 1,
        restart_is_noop: true,
        ..Systemd::default()
    };
    let (_c, _) = systemd_with(&bus, quiet).await;
    let err = activator(&bus, "k3s-agent.service")
        .activate(Activation::Restart, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "systemd finished the restart of k3s-agent.service, but the unit never became active again"
    );
}

#[tokio::test]
async fn no_bus_or_an_unknown_unit_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = Activator::Systemd {
        bus: dir.path().join("nope"),
        unit: "k3s.service".into(),
    };
    let err = missing
        .activate(Activation::Restart, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "cannot reach systemd on the host bus {}",
            dir.path().join("nope").display()
        )),
        "{err}"
    );

    let bus = Bus::start(dir.path());
    let (_c, _) = systemd_on(&bus, vec!["active"]).await;
    let err = activator(&bus, "k3s.service")
        .activate(Activation::Restart, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("systemd refused to restart k3s.service"),
        "{err}"
    );
}
