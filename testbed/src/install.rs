//! regmirror installed into a [`ControlPlane`] as `helm install` would install it, and the
//! operator started as its Deployment would start it: shared by the system test and the
//! benchmark against the real API server.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::ControlPlane;

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// Runs `command`, which must succeed; returns its stdout.
pub fn run_ok(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Runs `command` with `input` on its stdin; it must succeed. Returns its stdout.
pub fn with_stdin(command: &mut Command, input: &str) -> String {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The `helm` that `scripts/chart-checks --tools-only` installs into `target/tools`
/// (installed now if it is not there yet).
pub fn helm() -> PathBuf {
    let helm = repo().join("target/tools/bin/helm");
    if !helm.is_file() {
        run_ok(
            Command::new("bash")
                .arg(repo().join("scripts/chart-checks"))
                .arg("--tools-only"),
        );
    }
    assert!(
        helm.is_file(),
        "helm not installed at {} by scripts/chart-checks --tools-only",
        helm.display()
    );
    helm
}

/// The RegistryMirror CRD from `crds/`, applied and Established.
pub fn install_crds(plane: &ControlPlane) {
    run_ok(
        plane
            .kubectl()
            .args(["apply", "--server-side", "-f"])
            .arg(repo().join("crds")),
    );
    run_ok(plane.kubectl().args([
        "wait",
        "--for=condition=Established",
        "crd/registrymirrors.regmirror.io",
        "--timeout=60s",
    ]));
}

/// The operator's namespace, allowed privileged Pods (the agent's DaemonSet is privileged).
pub fn create_namespace(plane: &ControlPlane, namespace: &str) {
    with_stdin(
        plane.kubectl().args(["apply", "-f", "-"]),
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n  labels:\n    pod-security.kubernetes.io/enforce: privileged\n"
        ),
    );
}

/// The chart's templates `templates` (file names under `charts/regmirror/templates/`, e.g.
/// `rbac-operator.yaml`) rendered with the default values by `helm template` into
/// `namespace` and applied, as `helm install` would create them. Returns what was applied.
pub fn apply_chart_templates(
    plane: &ControlPlane,
    helm: &Path,
    namespace: &str,
    templates: &[&str],
) -> String {
    let mut template = Command::new(helm);
    template
        .args(["template", "regmirror"])
        .arg(repo().join("charts/regmirror"))
        .args(["--namespace", namespace]);
    for file in templates {
        template.args(["--show-only", &format!("templates/{file}")]);
    }
    let rendered = run_ok(&mut template);
    with_stdin(plane.kubectl().args(["apply", "-f", "-"]), &rendered);
    rendered
}

/// `regmirror controller` as the chart's Deployment runs it: in `namespace`, as replica
/// `identity`, with `kubeconfig` (the operator ServiceAccount's), metrics and probes on
/// `listen`. The caller adds a log and spawns it.
pub fn operator_command(
    regmirror: &Path,
    kubeconfig: &Path,
    namespace: &str,
    identity: &str,
    max_unavailable: &str,
    listen: SocketAddr,
) -> Command {
    let mut command = Command::new(regmirror);
    command
        .arg("controller")
        .args(["--listen", &listen.to_string()])
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAMESPACE", namespace)
        .env("POD_NAME", identity)
        .env("REGMIRROR_MAX_UNAVAILABLE", max_unavailable)
        .env("RUST_LOG", "info");
    command
}
