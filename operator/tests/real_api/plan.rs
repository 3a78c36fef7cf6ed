//! `regmirror plan --cluster`: the nodes, RegistryMirrors and Secrets read from a real API
//! server, the manifests applied over them.

use std::process::Command;

use serde_json::Value;

use crate::support::{chart_lock, crd_applied, kubectl, kubectl_ok, kubectl_stdin, plane, repo};

/// The examples' Secrets and ConfigMap live here, the operator's default namespace.
const NS: &str = "regmirror-system";

fn node(name: &str, flavor: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  annotations: {{regmirror.io/flavor: {flavor}}}\n"
    )
}

#[test]
fn plan_against_the_cluster_shows_what_a_rotation_would_restart() {
    let _lock = chart_lock();
    crd_applied();
    let _ = kubectl(&["create", "namespace", NS]);
    for (name, flavor) in [
        ("plan-k3s-1", "k3s"),
        ("plan-k3s-2", "k3s"),
        ("plan-ctrd-1", "containerd"),
    ] {
        let out = kubectl_stdin(&["apply", "-f", "-"], &node(name, flavor));
        assert!(out.ok, "{}", out.text());
    }
    let examples = repo().join("examples");
    kubectl_ok(&["apply", "-f", examples.to_str().unwrap()]);

    // The password rotated in the manifests only: the cluster still has the old one.
    let rotated = tempfile::tempdir().unwrap();
    let secret = std::fs::read_to_string(examples.join("registry-credentials.yaml")).unwrap();
    std::fs::write(
        rotated.path().join("registry-credentials.yaml"),
        secret.replace("password: change-me", "password: rotated"),
    )
    .unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .args([
            "plan",
            rotated.path().to_str().unwrap(),
            "--cluster",
            "--namespace",
            NS,
        ])
        .args(["--max-unavailable", "1", "--output", "json"])
        .env("KUBECONFIG", plane().kubeconfig_path())
        .output()
        .unwrap();
    let cleanup = || {
        let _ = kubectl(&[
            "delete",
            "-f",
            examples.to_str().unwrap(),
            "--ignore-not-found",
        ]);
        let _ = kubectl(&[
            "delete",
            "nodes",
            "plan-k3s-1",
            "plan-k3s-2",
            "plan-ctrd-1",
            "--ignore-not-found",
        ]);
    };
    if !out.status.success() {
        cleanup();
        panic!("plan --cluster: {}", String::from_utf8_lossy(&out.stderr));
    }
    let preview: Value = serde_json::from_slice(&out.stdout).unwrap();
    cleanup();

    let group_of = |node: &str| {
        preview["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["nodes"].as_array().unwrap().iter().any(|n| n == node))
            .unwrap_or_else(|| panic!("{node} in no group: {preview}"))
            .clone()
    };
    let k3s = group_of("plan-k3s-1");
    assert_eq!(k3s["activation"], "restart", "{k3s}");
    assert!(k3s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n == "plan-k3s-2"));
    assert_eq!(k3s["mirrors"], serde_json::json!(["docker-hub", "quay"]));
    assert_eq!(k3s["impact"]["restartWaves"], 2, "one node at a time");
    assert_eq!(group_of("plan-ctrd-1")["activation"], "hot");
}
