//! The shared control plane and the tools the tests drive it with.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use regmirror_testbed::ControlPlane;
use serde_json::Value;

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// The control plane of this test binary, started by the first test that asks. Its files live
/// under the cargo target directory (`real-api-<pid>`; older ones of exited runs are removed), and
/// its processes die with this process (the testbed's watchdog).
pub fn plane() -> &'static ControlPlane {
    static PLANE: OnceLock<ControlPlane> = OnceLock::new();
    PLANE.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        for entry in std::fs::read_dir(base).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("real-api-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let started = Instant::now();
        let plane = ControlPlane::start_in(&base.join(format!("real-api-{}", std::process::id())));
        eprintln!(
            "control plane up in {:.1} s: {} (files in {})",
            started.elapsed().as_secs_f64(),
            plane.server(),
            plane.dir().display()
        );
        plane
    })
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Held by every test that installs the chart (its object names are fixed).
pub fn chart_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a command printed and how it ended.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(output: Output) -> Run {
        Run {
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Both streams, for failure messages.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `command` (with `stdin` as its input), never failing.
pub fn run(command: &mut Command, stdin: Option<&str>) -> Run {
    use std::io::Write;
    let mut child = command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let input = input.to_owned();
        // A writer thread: the child may fill its output pipes before reading all its input.
        std::thread::spawn(move || {
            let _ = pipe.write_all(input.as_bytes());
        });
    }
    Run::from(child.wait_with_output().unwrap())
}

/// Runs `command`, which must succeed; its stdout.
pub fn run_ok(command: &mut Command, stdin: Option<&str>) -> String {
    let description = format!("{command:?}");
    let run = run(command, stdin);
    assert!(run.ok, "{description} failed:\n{}", run.text());
    run.stdout
}

/// The control plane's kubectl (same release as the API server) as the cluster admin.
pub fn kubectl(args: &[&str]) -> Run {
    run(plane().kubectl().args(args), None)
}

/// kubectl as the admin; must succeed.
pub fn kubectl_ok(args: &[&str]) -> String {
    run_ok(plane().kubectl().args(args), None)
}

/// kubectl as the admin with `input` on stdin; must succeed.
pub fn kubectl_stdin(args: &[&str], input: &str) -> Run {
    run(plane().kubectl().args(args), Some(input))
}

/// `kubectl get ... -o json` of one object, or None if the API server has none.
pub fn get_json(args: &[&str]) -> Option<Value> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json", "--ignore-not-found"]);
    let out = kubectl_ok(&all);
    if out.trim().is_empty() {
        None
    } else {
        Some(serde_json::from_str(&out).unwrap())
    }
}

/// Helm (installed by `scripts/chart-checks --tools-only` into target/tools/bin, as e2e/run
/// does) with the admin kubeconfig.
pub fn helm() -> Command {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    let path = HELM.get_or_init(|| {
        let repo = repo();
        let helm = repo.join("target/tools/bin/helm");
        if !helm.is_file() {
            let out = run(
                Command::new("bash")
                    .arg(repo.join("scripts/chart-checks"))
                    .arg("--tools-only"),
                None,
            );
            assert!(
                out.ok && helm.is_file(),
                "helm is not installed and `scripts/chart-checks --tools-only` could not install it:\n{}",
                out.text()
            );
        }
        helm
    });
    let mut command = Command::new(path);
    command
        .env("KUBECONFIG", plane().kubeconfig_path())
        .env("HELM_CACHE_HOME", plane().dir().join("helm/cache"))
        .env("HELM_CONFIG_HOME", plane().dir().join("helm/config"))
        .env("HELM_DATA_HOME", plane().dir().join("helm/data"))
        .current_dir(repo());
    command
}

/// Polls `check` every 250 ms until it returns `Some`, for at most `timeout`; then fails with
/// what `last` says.
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) => {
                assert!(
                    Instant::now() < deadline,
                    "not within {timeout:?}: {what}; last:\n{last}"
                );
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The CRD of crds/ applied server-side and Established (once per binary); the output of that
/// `kubectl apply`.
pub fn crd_applied() -> &'static str {
    static APPLIED: OnceLock<String> = OnceLock::new();
    APPLIED.get_or_init(|| {
        let crds = repo().join("crds");
        let out = kubectl(&["apply", "--server-side", "-f", crds.to_str().unwrap()]);
        assert!(
            out.ok,
            "kubectl apply --server-side -f crds/ refused:\n{}",
            out.text()
        );
        wait_established("registrymirrors.regmirror.io");
        out.stdout
    })
}

/// Waits until the CRD `name` is Established and its resource is served.
pub fn wait_established(name: &str) {
    eventually(
        &format!("CRD {name} Established"),
        Duration::from_secs(60),
        || {
            let out = kubectl(&[
                "wait",
                "--for=condition=Established",
                "--timeout=10s",
                &format!("crd/{name}"),
            ]);
            if out.ok {
                Ok(())
            } else {
                Err(out.text())
            }
        },
    );
    let plural = name.split('.').next().unwrap().to_owned();
    let group = name.split_once('.').unwrap().1.to_owned();
    eventually(&format!("{name} served"), Duration::from_secs(30), || {
        let out = kubectl(&["get", &format!("{plural}.{group}"), "-A"]);
        if out.ok {
            Ok(())
        } else {
            Err(out.text())
        }
    });
}

/// Every YAML document of `text` as JSON (empty documents left out).
pub fn yaml_documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("YAML"))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// `kind namespace/name` (or `kind name`) of an object.
pub fn identity(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or("?");
    let name = object["metadata"]["name"].as_str().unwrap_or("?");
    match object["metadata"]["namespace"].as_str() {
        Some(namespace) => format!("{kind} {namespace}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Whether every field `expected` sets is in `actual` with the same value (the API server adds
/// defaults; it must not drop or change what was sent). Returns the first difference.
pub fn contains(actual: &Value, expected: &Value, path: &str) -> Result<(), String> {
    match (expected, actual) {
        (Value::Object(want), Value::Object(have)) => {
            for (key, value) in want {
                let here = format!("{path}.{key}");
                match have.get(key) {
                    Some(found) => contains(found, value, &here)?,
                    // Empty values are omitted when stored.
                    None if is_empty(value) => {}
                    None => return Err(format!("{here}: missing (expected {value})")),
                }
            }
            Ok(())
        }
        (Value::Array(want), Value::Array(have)) => {
            if want.len() != have.len() {
                return Err(format!(
                    "{path}: {} items, expected {}",
                    have.len(),
                    want.len()
                ));
            }
            for (i, (w, h)) in want.iter().zip(have).enumerate() {
                contains(h, w, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (want, have) if want == have => Ok(()),
        // A number written as a string in YAML stays a string; an integer may come back as a
        // float-free integer of another representation.
        (Value::Number(w), Value::Number(h)) if w.as_f64() == h.as_f64() => Ok(()),
        (want, Value::Null) if is_empty(want) => Ok(()),
        (want, have) => Err(format!("{path}: {have}, expected {want}")),
    }
}

/// Whether the API server may leave `value` out when it stores it (Go's `omitempty`: null,
/// empty maps, lists and strings, false, zero).
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Object(map) => map.is_empty(),
        Value::Array(items) => items.is_empty(),
    }
}
