//! The release as users install it: the chart packaged with `helm package`, pushed as an OCI
//! artifact with `helm push` to a docker-registry on loopback (TLS from a test CA, basic auth),
//! and installed with the very `helm install … oci://…` line of README.md, its registry
//! ghcr.io/regmirror swapped for the loopback one.

use regmirror_testbed::{Pki, Registry, RegistryOptions};
use serde_json::Value;

use crate::chart::{self, ValueSet, NAMESPACE, RELEASE};
use crate::support::{chart_lock, get_json, helm, repo, run, run_ok};

/// README's line that installs the released chart.
fn readme_install_line() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let lines: Vec<&str> = readme
        .lines()
        .filter(|line| line.starts_with("helm install regmirror oci://"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "README.md should show one `helm install regmirror oci://…` line: {lines:?}"
    );
    lines[0].to_owned()
}

/// A top-level `key: value` of charts/regmirror/Chart.yaml, unquoted.
fn chart_field(key: &str) -> String {
    let chart = std::fs::read_to_string(repo().join("charts/regmirror/Chart.yaml")).unwrap();
    chart
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in Chart.yaml"))
        .trim()
        .trim_matches('"')
        .to_owned()
}

/// `Digest: sha256:…` of helm's push or pull output.
fn digest(output: &str) -> String {
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix("Digest: "))
        .unwrap_or_else(|| panic!("no digest in:\n{output}"))
        .trim()
        .to_owned()
}

fn container_image(kind: &str, name: &str) -> String {
    let object = get_json(&[kind, name, "-n", NAMESPACE])
        .unwrap_or_else(|| panic!("{kind}/{name} was not installed"));
    object["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn helm_installs_the_chart_pushed_to_an_oci_registry_as_the_readme_says() {
    let _lock = chart_lock();
    chart::reset();
    let version = chart_field("version");
    let app_version = chart_field("appVersion");

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki"));
    let (user, password) = ("release", "release-password");
    let registry = Registry::start(
        &dir.path().join("registry"),
        &pki,
        RegistryOptions {
            tls: true,
            basic_auth: Some((user.into(), password.into())),
            client_certs: false,
        },
    );
    let ca = pki.path("ca.crt").display().to_string();

    let packaged = run_ok(
        helm()
            .args(["package", "charts/regmirror", "-d"])
            .arg(dir.path()),
        None,
    );
    let archive = dir.path().join(format!("regmirror-{version}.tgz"));
    assert!(
        archive.is_file(),
        "helm package made no {}:\n{packaged}",
        archive.display()
    );

    // Without credentials the registry refuses the push.
    let refused = run(
        helm()
            .arg("push")
            .arg(&archive)
            .arg(format!("oci://{}/regmirror/charts", registry.host()))
            .args(["--ca-file", &ca]),
        None,
    );
    assert!(
        !refused.ok,
        "an anonymous push was accepted:\n{}",
        refused.text()
    );

    run_ok(
        helm()
            .args(["registry", "login", &registry.host(), "--username", user])
            .args(["--password-stdin", "--ca-file", &ca]),
        Some(password),
    );
    let pushed = run(
        helm()
            .arg("push")
            .arg(&archive)
            .arg(format!("oci://{}/regmirror/charts", registry.host()))
            .args(["--ca-file", &ca]),
        None,
    );
    assert!(pushed.ok, "helm push failed:\n{}", pushed.text());
    let pushed = pushed.text();
    assert!(
        pushed.contains(&format!(
            "Pushed: {}/regmirror/charts/regmirror:{version}",
            registry.host()
        )),
        "helm push said:\n{pushed}"
    );

    // README's command, with the loopback registry for ghcr.io (and its CA).
    let line = readme_install_line();
    assert!(
        line.contains(&format!("--version {version} "))
            || line.ends_with(&format!("--version {version}")),
        "README installs another version than Chart.yaml's {version}: {line}"
    );
    let ours = line.replace(
        "oci://ghcr.io/regmirror/",
        &format!("oci://{}/regmirror/", registry.host()),
    );
    assert_ne!(
        ours, line,
        "README's install line does not use oci://ghcr.io/regmirror/: {line}"
    );
    let words: Vec<&str> = ours.split_whitespace().collect();
    assert_eq!(words[0], "helm");
    chart::prepare(&ValueSet::defaults()); // README: the labelled release namespace first
    let installed = run(helm().args(&words[1..]).args(["--ca-file", &ca]), None);
    assert!(
        installed.ok,
        "`{ours} --ca-file …` failed:\n{}",
        installed.text()
    );
    let installed = installed.text();
    assert!(
        installed.contains(&format!(
            "Pulled: {}/regmirror/charts/regmirror:{version}",
            registry.host()
        )),
        "helm install said:\n{installed}"
    );
    assert_eq!(
        digest(&installed),
        digest(&pushed),
        "helm install pulled another chart than the one pushed"
    );

    let metadata: Value = serde_json::from_str(&run_ok(
        helm().args(["get", "metadata", RELEASE, "-n", NAMESPACE, "-o", "json"]),
        None,
    ))
    .unwrap();
    assert_eq!(metadata["status"], "deployed", "{metadata:#}");
    assert_eq!(metadata["chart"], "regmirror", "{metadata:#}");
    assert_eq!(metadata["version"], version.as_str(), "{metadata:#}");
    assert_eq!(metadata["appVersion"], app_version.as_str(), "{metadata:#}");
    // The release's images are the ones the release workflow pushes.
    assert_eq!(
        container_image("deployment", "regmirror-operator"),
        format!("ghcr.io/regmirror/regmirror:{app_version}")
    );
    assert_eq!(
        container_image("daemonset", "regmirror-agent"),
        format!("ghcr.io/regmirror/regmirror-agent:{app_version}")
    );

    run_ok(helm().args(["registry", "logout", &registry.host()]), None);
    chart::reset();
}
