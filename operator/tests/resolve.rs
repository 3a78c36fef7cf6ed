//! `regmirror resolve`: where a node would pull an image from, against the repository's
//! examples (the k3s documentation's seeds: rewrites, the wildcard, fallback order).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `regmirror resolve IMAGE PATH ARGS… --output json`, parsed; fails naming stderr otherwise.
fn resolve(image: &str, path: &str, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .args(["resolve", image, path, "--output", "json"])
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "resolve {image} {path} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The manifest requests in the order the runtime makes them.
fn requests(route: &Value) -> Vec<&str> {
    route["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["request"].as_str().unwrap())
        .collect()
}

#[test]
fn a_rewrite_changes_the_repository_at_the_mirror_and_never_at_the_registry() {
    let route = resolve(
        "docker.io/rancher/mirrored-pause:3.6",
        "examples/k3s-docs/03-rewrites",
        &[],
    );
    assert_eq!(route["entry"], "docker.io");
    assert_eq!(
        requests(&route),
        [
            "https://registry.example.com:5000/v2/mirrorproject/rancher-images/mirrored-pause/manifests/3.6?ns=docker.io",
            "https://registry-1.docker.io/v2/rancher/mirrored-pause/manifests/3.6",
        ]
    );
    let attempts = route["attempts"].as_array().unwrap();
    assert_eq!(
        attempts[0]["rewrittenBy"],
        serde_json::json!(["^rancher/(.*)", "mirrorproject/rancher-images/$1"])
    );
    assert_eq!(attempts[1]["upstream"], true);
    assert!(attempts[1].get("rewrittenBy").is_none());

    // An image the pattern does not match keeps its name at the mirror.
    let route = resolve("busybox", "examples/k3s-docs/03-rewrites", &[]);
    assert_eq!(
        requests(&route)[0],
        "https://registry.example.com:5000/v2/library/busybox/manifests/latest?ns=docker.io"
    );
}

#[test]
fn the_wildcard_serves_every_registry_without_a_mirror_of_its_own() {
    for (image, registry_api, repository) in [
        ("nginx", "https://registry-1.docker.io", "library/nginx"),
        ("quay.io/org/app:1", "https://quay.io", "org/app"),
    ] {
        let route = resolve(image, "examples/k3s-docs/04-wildcard", &[]);
        assert_eq!(route["entry"], "*", "{image}");
        let registry = route["image"].as_str().unwrap().split('/').next().unwrap();
        let object = if image.contains(':') { "1" } else { "latest" };
        assert_eq!(
            requests(&route),
            [
                format!("https://registry.example.com:5000/v2/{repository}/manifests/{object}?ns={registry}"),
                format!("{registry_api}/v2/{repository}/manifests/{object}"),
            ],
            "{image}"
        );
    }
}

#[test]
fn endpoints_are_tried_in_the_order_written_and_the_registry_itself_last() {
    // The mirror lists registry-1.docker.io itself as its last endpoint: it is the default
    // endpoint, tried once, last.
    let route = resolve(
        "docker.io/library/busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "examples/k3s-docs/10-fallback-endpoints",
        &[],
    );
    let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    assert_eq!(
        requests(&route),
        [
            format!("https://mirror1.example.com:5000/v2/library/busybox/manifests/{digest}?ns=docker.io"),
            format!("http://mirror2.example.com:5000/v2/library/busybox/manifests/{digest}?ns=docker.io"),
            format!("https://registry-1.docker.io/v2/library/busybox/manifests/{digest}"),
        ]
    );
}

#[test]
fn credentials_are_named_by_their_secret_and_tls_files_by_their_host_paths() {
    let route = resolve("quay.io/org/app:1", "examples", &["--flavor", "containerd"]);
    let mirror = &route["attempts"][0];
    // The endpoint's own path is its API root (containerd's override_path).
    assert_eq!(
        mirror["request"],
        "https://mirror.internal.example.com:5000/v2/quay/org/app/manifests/1?ns=quay.io"
    );
    assert_eq!(mirror["credentials"], "regmirror-system/mirror-pull");
    assert_eq!(
        mirror["caFile"],
        "/etc/containerd/certs.d/quay.io/mirror.internal.example.com:5000/ca.crt"
    );
    // Nothing of regmirror's goes to the registry itself.
    let upstream = &route["attempts"][1];
    assert_eq!(upstream["upstream"], true);
    assert!(upstream.get("credentials").is_none());
    assert!(upstream.get("caFile").is_none());

    // The text form says the same for a person, and never a credential's value.
    let out = Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .args([
            "resolve",
            "quay.io/org/app:1",
            "examples",
            "--flavor",
            "k3s",
        ])
        .current_dir(repo())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("credentials: Secret regmirror-system/mirror-pull"),
        "{text}"
    );
    assert!(
        text.contains("(the registry itself: last resort)"),
        "{text}"
    );
    let secrets =
        std::fs::read_to_string(repo().join("examples/registry-credentials.yaml")).unwrap();
    for line in secrets.lines() {
        if let Some(password) = line.trim().strip_prefix("password:") {
            let password = password.trim().trim_matches('"');
            assert!(!text.contains(password), "the password shows:\n{text}");
        }
    }
}

#[test]
fn a_registry_without_a_mirror_goes_to_the_registry_itself() {
    let route = resolve(
        "ghcr.io/org/tool:2",
        "examples/k3s-docs/10-fallback-endpoints",
        &["--flavor", "cri-o"],
    );
    assert_eq!(route["entry"], Value::Null);
    assert_eq!(
        requests(&route),
        ["https://ghcr.io/v2/org/tool/manifests/2"]
    );
}

#[test]
fn nodes_a_selector_leaves_out_get_no_mirror() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("mirror.yaml"),
        "apiVersion: regmirror.io/v1alpha1\nkind: RegistryMirror\nmetadata: {name: edge}\n\
         spec:\n  registry: docker.io\n  endpoints: [{url: 'https://edge-mirror.example.com'}]\n  \
         nodeSelector: {matchLabels: {site: edge}}\n",
    )
    .unwrap();
    let path = dir.path().to_str().unwrap();
    let at_edge = resolve("nginx", path, &["--node-labels", "site=edge"]);
    assert_eq!(at_edge["entry"], "docker.io");
    let elsewhere = resolve("nginx", path, &["--node-labels", "site=core"]);
    assert_eq!(elsewhere["entry"], Value::Null);
    assert_eq!(elsewhere["attempts"].as_array().unwrap().len(), 1);
}

#[test]
fn a_bad_image_reference_is_refused_naming_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .args(["resolve", "Not An Image", "examples"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"Not An Image\" is not an image reference"),
        "{stderr}"
    );
}

/// A directory holding `yaml` as its one manifest file.
fn manifests(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("manifests.yaml"), yaml).unwrap();
    dir
}

const HUB_THROUGH_AN_AUTHENTICATED_MIRROR: &str = r#"
apiVersion: v1
kind: Secret
metadata:
  name: hub-pull
  namespace: regmirror-system
  annotations: {regmirror.io/allowed-hosts: "mirror.example.com"}
type: kubernetes.io/basic-auth
stringData: {username: puller, password: not-shown}
---
apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata: {name: hub}
spec:
  registry: docker.io
  endpoints:
    - url: https://mirror.example.com/v2/hub
      auth: {secretRef: {name: hub-pull}}
---
apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata: {name: everything-else}
spec:
  registry: "*"
  endpoints: [{url: "https://cache.example.com"}]
"#;

#[test]
fn a_registry_with_a_hosts_file_of_its_own_does_not_use_the_wildcard() {
    // The mirror's host gets a hosts.toml of its own for its credentials; containerd then reads
    // that file for images of that registry, never `_default`'s.
    let dir = manifests(HUB_THROUGH_AN_AUTHENTICATED_MIRROR);
    let path = dir.path().to_str().unwrap();
    let route = resolve(
        "mirror.example.com/team/app:1",
        path,
        &["--flavor", "containerd"],
    );
    assert_eq!(route["entry"], Value::Null);
    let attempts = route["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        attempts[0]["request"],
        "https://mirror.example.com/v2/team/app/manifests/1"
    );
    assert_eq!(attempts[0]["credentials"], "regmirror-system/hub-pull");

    // Any other registry goes through the wildcard's endpoint.
    let route = resolve("ghcr.io/org/tool:2", path, &["--flavor", "containerd"]);
    assert_eq!(route["entry"], "*");
    assert_eq!(
        requests(&route),
        [
            "https://cache.example.com/v2/org/tool/manifests/2?ns=ghcr.io",
            "https://ghcr.io/v2/org/tool/manifests/2",
        ]
    );
}

#[test]
fn a_cri_o_mirror_location_path_prefixes_the_repository() {
    let yaml = HUB_THROUGH_AN_AUTHENTICATED_MIRROR
        .split("---")
        .take(2)
        .collect::<Vec<_>>()
        .join("---");
    let dir = manifests(&yaml);
    let route = resolve(
        "nginx:1.25",
        dir.path().to_str().unwrap(),
        &["--flavor", "cri-o"],
    );
    let mirror = &route["attempts"][0];
    // containers/image asks for `<location path>/<repository>` at the host's /v2, and sends
    // no `ns` parameter.
    assert_eq!(mirror["repository"], "hub/library/nginx");
    assert_eq!(
        mirror["request"],
        "https://mirror.example.com/v2/hub/library/nginx/manifests/1.25"
    );
    assert_eq!(mirror["credentials"], "regmirror-system/hub-pull");
}
