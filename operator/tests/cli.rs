//! The `regmirror` binary as users and CI run it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn regmirror(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn checked_in_crd_is_what_the_code_generates() {
    let out = regmirror(&["crdgen"]);
    assert!(out.status.success());
    let checked_in =
        std::fs::read_to_string(repo().join("crds/regmirror.io_registrymirrors.yaml")).unwrap();
    assert_eq!(
        text(&out.stdout),
        checked_in,
        "crds/ is stale: run `cargo run -p regmirror -- crdgen --out crds`"
    );
}

#[test]
fn crd_carries_the_cel_rules_the_api_server_enforces() {
    let crd: serde_yaml::Value =
        serde_yaml::from_str(&text(&regmirror(&["crdgen"]).stdout)).unwrap();
    fn rules(v: &serde_yaml::Value, out: &mut Vec<String>) {
        match v {
            serde_yaml::Value::Mapping(m) => {
                for (k, v) in m {
                    if k.as_str() == Some("rule") {
                        out.push(v.as_str().unwrap().to_owned());
                    }
                    rules(v, out);
                }
            }
            serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| rules(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    rules(&crd, &mut found);
    for rule in [
        regmirror_core::api::grammar::ENDPOINTS_RULE,
        "!self.contains('://') || self.startsWith('https://') || self.startsWith('http://')",
        "has(self.secretRef) != has(self.configMapRef)",
    ] {
        assert!(
            found.iter().any(|r| r == rule),
            "CRD lacks rule {rule}: {found:?}"
        );
    }
    assert_eq!(crd["spec"]["scope"].as_str(), Some("Cluster"));
    assert_eq!(crd["spec"]["group"].as_str(), Some("regmirror.io"));
}

#[test]
fn every_example_validates() {
    let mut dirs = vec![
        "examples".to_owned(),
        "examples/pull-through-cache".to_owned(),
    ];
    for entry in std::fs::read_dir(repo().join("examples/k3s-docs")).unwrap() {
        dirs.push(entry.unwrap().path().display().to_string());
    }
    for dir in dirs {
        let out = regmirror(&["validate", &dir, "--flavor", "k3s"]);
        assert!(out.status.success(), "{dir}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("valid"));
    }
}

const BROKEN: &str = r#"
apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata: {name: bad-url}
spec:
  registry: docker.io
  endpoints: [{url: "https://exa mple.com"}]
---
apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata: {name: bad-regex}
spec:
  registry: quay.io
  endpoints: [{url: "https://mirror.example.com"}]
  rewrites: [{pattern: "^(unclosed", replacement: "x"}]
---
apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata: {name: missing-secret}
spec:
  registry: gcr.io
  endpoints: [{url: "https://m1.example.com", auth: {secretRef: {name: nowhere}}}]
---
apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata: {name: missing-key}
spec:
  registry: ghcr.io
  endpoints: [{url: "https://m2.example.com", tls: {caRef: {configMapRef: {name: ca, key: nope.crt}}}}]
---
apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata: {name: bad-pem}
spec:
  registry: registry.k8s.io
  endpoints: [{url: "https://m3.example.com", tls: {caRef: {configMapRef: {name: ca}}}}]
---
apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata: {name: other-namespace}
spec:
  registry: registry.gitlab.com
  endpoints: [{url: "https://m4.example.com", auth: {secretRef: {name: pull, namespace: kube-system}}}]
---
apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata: {name: typo}
spec:
  registry: public.ecr.aws
  endpoints: [{url: "https://m5.example.com", tls: {insecureSkipVerfy: true}}]
---
apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata: {name: bad-name}
spec:
  registry: "../../etc"
  endpoints: [{url: "ftp://m6.example.com"}]
---
apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata: {name: zz-duplicate}
spec:
  registry: docker.io
  endpoints: [{url: "https://other.example.com"}]
---
apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata: {name: docker-a}
spec:
  registry: docker.io
  endpoints: [{url: "https://fine.example.com"}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ca, namespace: regmirror-system}
data:
  ca.crt: "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
"#;

#[test]
fn validate_names_file_object_and_field_of_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mirrors.yaml");
    std::fs::write(&file, BROKEN).unwrap();
    let out = regmirror(&["validate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let expect = [
        ("RegistryMirror/bad-url", "spec.endpoints[0].url: url must not contain spaces"),
        ("RegistryMirror/bad-regex", "spec.rewrites[0].pattern: pattern \"^(unclosed\" does not compile"),
        ("RegistryMirror/missing-secret", "spec.endpoints[0].auth.secretRef: Secret regmirror-system/nowhere not found"),
        ("RegistryMirror/missing-key", "spec.endpoints[0].tls.caRef.configMapRef: ConfigMap regmirror-system/ca has no key \"nope.crt\""),
        ("RegistryMirror/bad-pem", "spec.endpoints[0].tls.caRef.configMapRef: ConfigMap regmirror-system/ca key \"ca.crt\" is not a valid PEM certificate bundle"),
        ("RegistryMirror/other-namespace", "spec.endpoints[0].auth.secretRef: Secret kube-system/pull is in a namespace regmirror may not read"),
        ("RegistryMirror/typo", "spec.endpoints[0].tls.insecureSkipVerfy: unknown field `insecureSkipVerfy`"),
        ("RegistryMirror/bad-name", "spec.registry: registry must be a host name"),
        ("RegistryMirror/bad-name", "url scheme must be https:// or http://"),
        ("RegistryMirror/zz-duplicate", "RegistryMirror docker-a also configures registry \"docker.io\""),
    ];
    for (object, message) in expect {
        let line = stderr
            .lines()
            .find(|l| l.contains(object) && l.contains(message));
        let line = line.unwrap_or_else(|| panic!("no line for {object}: {message} in:\n{stderr}"));
        assert!(
            line.starts_with(&file.display().to_string()),
            "{line} does not name the file"
        );
    }
    // Objects without a problem are not reported.
    assert!(!stderr.contains("RegistryMirror/docker-a:"), "{stderr}");
}

#[test]
fn validate_reports_what_a_flavor_cannot_express() {
    let out = regmirror(&[
        "validate",
        "examples/k3s-docs/03-rewrites",
        "--flavor",
        "k3s",
        "--flavor",
        "containerd",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(
            "RegistryMirror/docker-hub: spec.rewrites: containerd cannot express image rewrites"
        ),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn render_writes_a_node_tree_with_secret_files_private() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = regmirror(&[
        "render",
        "examples",
        "--out",
        out_dir.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mode = |p: &str| {
        std::fs::metadata(out_dir.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(
        mode("etc/rancher/k3s/registries.yaml"),
        0o600,
        "registries.yaml holds credentials"
    );
    assert_eq!(
        mode("etc/rancher/k3s/regmirror-certs/mirror.internal.example.com:5000/ca.crt"),
        0o644
    );
    assert_eq!(
        mode("var/lib/rancher/k3s/agent/etc/containerd/certs.d/docker.io/hosts.toml"),
        0o644
    );
}

#[test]
fn render_selects_mirrors_by_node_labels() {
    let in_eu = text(
        &regmirror(&[
            "render",
            "examples/k3s-docs/13-production-layout",
            "--labels",
            "topology.kubernetes.io/region=eu-west",
        ])
        .stdout,
    );
    let elsewhere = text(
        &regmirror(&[
            "render",
            "examples/k3s-docs/13-production-layout",
            "--labels",
            "topology.kubernetes.io/region=us-east",
        ])
        .stdout,
    );
    assert!(in_eu.contains("cache.eu.example.com:5000"));
    assert!(!elsewhere.contains("cache.eu.example.com"));
}

#[test]
fn render_refuses_broken_input_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mirrors.yaml"), BROKEN).unwrap();
    let out_dir = dir.path().join("out");
    let out = regmirror(&[
        "render",
        dir.path().to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("nothing rendered"));
    assert!(!out_dir.exists());
}

#[test]
fn render_never_prints_secret_files_to_logs_but_does_print_them_on_request() {
    // `render` is the user's own request to see the files, so credentials are shown; the
    // Debug form used in logs is redacted (see core's unit tests).
    let out = regmirror(&["render", "examples"]);
    assert!(text(&out.stdout).contains("password: change-me"));
}

/// Writes `yaml` into a temporary directory and validates it with `args`.
fn validate_yaml(yaml: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mirrors.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut all = vec!["validate", file.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = regmirror(&all);
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

fn assert_line(stderr: &str, parts: &[&str]) {
    assert!(
        stderr.lines().any(|l| parts.iter().all(|p| l.contains(p))),
        "no line with {parts:?} in:\n{stderr}"
    );
}

#[test]
fn validate_without_flavor_checks_every_flavor_a_mirror_could_reach() {
    let out = regmirror(&["validate", "examples/k3s-docs/03-rewrites"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    for flavor in ["containerd", "cri-o"] {
        assert_line(
            &stderr,
            &[
                "RegistryMirror/docker-hub",
                &format!("spec.rewrites: {flavor} cannot express image rewrites"),
            ],
        );
    }
    assert!(!stderr.contains("k3s cannot"), "{stderr}");
    // With --flavor, only those.
    let out = regmirror(&[
        "validate",
        "examples/k3s-docs/03-rewrites",
        "--flavor",
        "rke2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The top-level examples reach every flavor.
    let out = regmirror(&["validate", "examples"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

const TWO_PROBLEMS: &str = r#"
apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata: {name: two-problems}
spec:
  registry: "*"
  endpoints: [{url: "https://m.example.com", auth: {secretRef: {name: nowhere}}}]
  rewrites: [{pattern: "^a\\.b/(.*)", replacement: "x/$1"}]
"#;

#[test]
fn validate_reports_flavor_problems_alongside_other_errors() {
    let (code, _, stderr) = validate_yaml(TWO_PROBLEMS, &[]);
    assert_eq!(code, Some(1));
    for parts in [
        &["spec.endpoints[0].auth.secretRef: Secret regmirror-system/nowhere not found"][..],
        &["spec.rewrites[0].pattern: pattern must not contain a backslash"],
        &["spec.rewrites: containerd cannot express image rewrites"],
        &["spec.registry: cri-o cannot express a mirror for every registry"],
        &["spec.rewrites: cri-o cannot express image rewrites"],
        &["spec.rewrites[0]: k3s cannot express a backslash"],
    ] {
        let mut parts = parts.to_vec();
        parts.push("RegistryMirror/two-problems");
        assert_line(&stderr, &parts);
    }
}

#[test]
fn validate_refuses_selector_typos_naming_the_field() {
    for (selector, field) in [
        ("{matchLabel: {region: eu}}", "spec.nodeSelector.matchLabel"),
        ("{region: eu}", "spec.nodeSelector.region"),
        (
            "{matchExpressions: [{key: region, operator: In, value: [eu]}]}",
            "spec.nodeSelector.matchExpressions[0].value",
        ),
    ] {
        let yaml = format!(
            "apiVersion: regmirror.io/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: typo}}\nspec:\n  registry: docker.io\n  endpoints: [{{url: \"https://m.example.com\"}}]\n  nodeSelector: {selector}\n"
        );
        let (code, _, stderr) = validate_yaml(&yaml, &[]);
        assert_eq!(code, Some(1), "{selector}");
        assert_line(&stderr, &["RegistryMirror/typo", field, "unknown field"]);
    }
}

const UNCONSENTED: &str = r#"
apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata: {name: exfiltrate}
spec:
  registry: docker.io
  endpoints: [{url: "https://collector.attacker.example", auth: {secretRef: {name: mirror-pull}}}]
---
apiVersion: v1
kind: Secret
metadata:
  name: mirror-pull
  namespace: regmirror-system
  annotations: {regmirror.io/allowed-hosts: "mirror.internal.example.com:5000"}
type: kubernetes.io/basic-auth
stringData: {username: puller, password: change-me}
"#;

#[test]
fn validate_refuses_credentials_for_a_host_their_secret_does_not_allow() {
    let (code, _, stderr) = validate_yaml(UNCONSENTED, &[]);
    assert_eq!(code, Some(1));
    assert_line(
        &stderr,
        &[
            "RegistryMirror/exfiltrate",
            "spec.endpoints[0].auth.secretRef",
            "Secret regmirror-system/mirror-pull does not allow its credentials to be sent to https://collector.attacker.example",
            "add \"collector.attacker.example\" to its annotation regmirror.io/allowed-hosts",
        ],
    );
    assert!(!stderr.contains("change-me"));
    let allowed = UNCONSENTED.replace(
        "mirror.internal.example.com:5000",
        "mirror.internal.example.com:5000, collector.attacker.example",
    );
    let (code, stdout, stderr) = validate_yaml(&allowed, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("1 RegistryMirror(s) valid"));
}

#[test]
fn render_shows_a_mirrors_cache_first_offline_with_what_it_cannot_know_said() {
    // Without the cluster's answers: the Service's name, placeholders, and notes saying so.
    let out = regmirror(&[
        "render",
        "examples/pull-through-cache",
        "--flavor",
        "containerd",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let hosts = stdout
        .split("==> ")
        .find(|f| f.starts_with("/etc/containerd/certs.d/docker.io/hosts.toml"))
        .expect(&stdout);
    let cache = hosts
        .find("[host.\"https://regmirror-cache-docker-hub-cache-")
        .expect(hosts);
    assert!(
        hosts[cache..].contains(".regmirror-cache.svc:5000/v2"),
        "{hosts}"
    );
    assert!(
        hosts.contains("server = \"https://registry-1.docker.io/v2\""),
        "Docker Hub stays the last resort: {hosts}"
    );
    let stderr = text(&out.stderr);
    for note in [
        "its cache is shown at its Service's name",
        "the cache's CA file holds a placeholder (pass --cache-ca)",
        "the nodes' password for the cache is the operator's",
    ] {
        assert!(stderr.contains(note), "{note:?} in {stderr}");
    }

    // With the address and the CA: exactly what a node at that cluster IP gets.
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    let pem = "-----BEGIN CERTIFICATE-----\nY2FjaGUgQ0E=\n-----END CERTIFICATE-----\n";
    std::fs::write(&ca, pem).unwrap();
    let out = regmirror(&[
        "render",
        "examples/pull-through-cache",
        "--flavor",
        "k3s",
        "--cache-address",
        "docker-hub-cache=10.43.0.50",
        "--cache-ca",
        ca.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(
            "    endpoint:\n    - https://10.43.0.50:5000\n    - https://registry-1.docker.io\n"
        ),
        "{stdout}"
    );
    assert!(stdout.contains(pem), "{stdout}");
    let stderr = text(&out.stderr);
    assert!(
        !stderr.contains("Service's name") && !stderr.contains("--cache-ca"),
        "{stderr}"
    );

    // An address for a mirror without a cache is a mistake, said as one.
    let out = regmirror(&[
        "render",
        "examples/pull-through-cache",
        "--cache-address",
        "docker-hub=10.43.0.50",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(
            "--cache-address docker-hub=…: no RegistryMirror \"docker-hub\" with spec.cache"
        ),
        "{}",
        text(&out.stderr)
    );
}
