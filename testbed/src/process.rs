//! Child processes that die with the test, and loopback ports.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// Panics with an install hint when `tool` is not on PATH.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "{tool} is not installed: run `bash scripts/test` (it installs containerd, docker-registry, skopeo, apache2-utils)");
}

/// Runs one of testbed's build scripts (`kube/build`, `images/build`, `tools/build`: each a
/// no-op when nothing changed), its log on stderr, and returns the directory it prints last.
pub fn run_build_script(script: &Path) -> std::path::PathBuf {
    let output = Command::new("bash")
        .arg(script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{} failed ({}); its log is above",
        script.display(),
        output.status
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    std::path::PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("the build prints its output directory")
            .trim(),
    )
}

/// A Go tool the tests run (actionlint, distribution's `registry`), built from the module proxy
/// at the version testbed/tools/go.mod pins by testbed/tools/build (a no-op once built).
pub fn go_tool(name: &str) -> std::path::PathBuf {
    run_build_script(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/build")).join(name)
}

/// A port on 127.0.0.1 that was free a moment ago, and never handed out before by this
/// process (in a fresh network namespace the kernel readily gives the same port twice in a
/// row, while the first taker has not bound it yet).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind 127.0.0.1:0")
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A loopback port nothing listens on: connections are refused at once. Stands for an
/// unreachable upstream or mirror without any traffic leaving the machine.
pub fn dead_port() -> u16 {
    free_port()
}

/// A background process, killed when dropped.
pub struct Process {
    pub name: String,
    child: Child,
}

impl Process {
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> Process {
        let log = std::fs::File::create(log).expect("create log file");
        let child = command
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Process {
            name: name.to_owned(),
            child,
        }
    }

    /// Waits until `port` on 127.0.0.1 accepts TCP connections.
    pub fn wait_for_port(&mut self, port: u16, log: &Path) {
        self.wait_until(&format!("listen on {port}"), log, || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Waits until `path` exists (a socket).
    pub fn wait_for_path(&mut self, path: &Path, log: &Path) {
        self.wait_until(&format!("create {}", path.display()), log, || path.exists());
    }

    /// Polls `ready` for up to 20 s; fails with the process's log if it exits or times out.
    fn wait_until(&mut self, what: &str, log: &Path, ready: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let log_text = || std::fs::read_to_string(log).unwrap_or_default();
        while !ready() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited with {status}:\n{}", self.name, log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not {what}:\n{}",
                self.name,
                log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to completion, returning its output; panics only if it cannot start.
pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"))
}

/// Runs a command that must succeed.
pub fn run_ok(command: &mut Command) -> Output {
    let output = run(command);
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
