//! `regmirror plan` offline: what manifests would do to described nodes, before anything
//! reaches them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .arg("plan")
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap()
}

fn plan_json(args: &[&str]) -> Value {
    let out = plan(&[args, &["--output", "json"]].concat());
    assert!(
        out.status.success(),
        "plan {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// (flavor, activation, nodes) of each group.
fn moves(preview: &Value) -> Vec<(String, Option<String>, usize)> {
    preview["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["flavor"].as_str().unwrap().to_owned(),
                g["activation"].as_str().map(str::to_owned),
                g["nodes"].as_array().unwrap().len(),
            )
        })
        .collect()
}

/// examples/ with the pull password rotated, in a directory of its own.
fn rotated_examples() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(
                dir.path().join(path.file_name().unwrap()),
                text.replace("password: change-me", "password: rotated"),
            )
            .unwrap();
        }
    }
    dir
}

const NODES: [&str; 8] = [
    "--node",
    "server-1:k3s:node-role.kubernetes.io/control-plane=true",
    "--node",
    "server-2:k3s:node-role.kubernetes.io/control-plane=true",
    "--node",
    "agent-1:k3s",
    "--node",
    "worker-1:containerd",
];

#[test]
fn a_first_install_restarts_k3s_nodes_with_credentials_and_is_live_elsewhere() {
    let preview = plan_json(&[&["examples", "--node", "crio-1:cri-o"][..], &NODES].concat());
    assert_eq!(
        moves(&preview),
        [
            ("k3s".to_owned(), Some("restart".to_owned()), 3),
            ("cri-o".to_owned(), Some("reload".to_owned()), 1),
            ("containerd".to_owned(), Some("hot".to_owned()), 1),
        ]
    );
    // maxUnavailable 1, two servers one at a time: three waves.
    assert_eq!(preview["total"]["restart"], 3);
    assert_eq!(preview["total"]["restartControlPlane"], 2);
    assert_eq!(preview["total"]["restartWaves"], 3);
}

#[test]
fn a_password_rotation_restarts_k3s_in_max_unavailable_waves() {
    let rotated = rotated_examples();
    let after = rotated.path().to_str().unwrap();
    let preview = plan_json(
        &[
            &[after, "--before", "examples", "--max-unavailable", "2"][..],
            &NODES,
        ]
        .concat(),
    );
    assert_eq!(
        moves(&preview),
        [
            ("k3s".to_owned(), Some("restart".to_owned()), 3),
            ("containerd".to_owned(), Some("hot".to_owned()), 1),
        ]
    );
    // Two at a time, but the two servers never together: two waves.
    assert_eq!(preview["total"]["restartWaves"], 2);

    // The same manifests before and after: nothing moves.
    let same = plan_json(&[&[after, "--before", after][..], &NODES].concat());
    assert!(moves(&same).iter().all(|(_, step, _)| step.is_none()));
    assert_eq!(same["total"]["restartWaves"], 0);

    let text = plan(&[&[after, "--before", "examples"][..], &NODES].concat());
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("3 node(s), k3s [docker-hub, quay]: runtime restart, 3 wave(s)"),
        "{text}"
    );
    assert!(
        text.contains("1 node(s), containerd [docker-hub, quay]: live, no restart"),
        "{text}"
    );
}

#[test]
fn nodes_come_from_node_yaml_with_the_flavor_their_agent_reported() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = dir.path().join("nodes.yaml");
    std::fs::write(
        &nodes,
        r#"apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Node
    metadata:
      name: edge-1
      labels: {region: edge}
      annotations: {regmirror.io/flavor: containerd}
  - apiVersion: v1
    kind: Node
    metadata:
      name: core-1
      labels: {node-role.kubernetes.io/control-plane: "true"}
"#,
    )
    .unwrap();
    let preview = plan_json(&["examples", "--nodes", nodes.to_str().unwrap()]);
    // core-1 has no flavor reported: the default, k3s.
    assert_eq!(
        moves(&preview),
        [
            ("k3s".to_owned(), Some("restart".to_owned()), 1),
            ("containerd".to_owned(), Some("hot".to_owned()), 1),
        ]
    );
    assert_eq!(preview["total"]["restartControlPlane"], 1);
}

#[test]
fn a_flavor_that_cannot_take_a_mirror_is_shown_keeping_its_configuration() {
    // k3s-docs 03 has rewrites, which only k3s and RKE2 can express.
    let preview = plan_json(&[
        "examples/k3s-docs/03-rewrites",
        "--node",
        "k:k3s",
        "--node",
        "o:cri-o",
    ]);
    let groups = preview["groups"].as_array().unwrap();
    let crio = groups.iter().find(|g| g["flavor"] == "cri-o").unwrap();
    assert!(crio["activation"].is_null());
    assert!(
        crio["problem"].as_str().unwrap().contains("rewrites"),
        "{crio}"
    );
}

#[test]
fn bad_input_is_refused_naming_it() {
    let out = plan(&["examples"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no nodes to plan for"));

    let out = plan(&["examples", "--node", "x:windows"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses the flavor");
    assert!(String::from_utf8_lossy(&out.stderr).contains("windows"));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: regmirror.io/v1alpha1\nkind: RegistryMirror\nmetadata: {name: bad}\n\
         spec: {registry: docker.io, endpoints: [{url: 'ftp://x'}]}\n",
    )
    .unwrap();
    let out = plan(&[dir.path().to_str().unwrap(), "--node", "a:k3s"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("RegistryMirror/bad"), "{stderr}");
}

#[test]
fn the_readme_plan_example_prints_what_the_readme_shows() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let command = "$ regmirror plan examples/plan/rotated --before examples --nodes examples/plan/nodes.yaml --max-unavailable 2\n";
    let start = readme.find(command).expect("README shows the plan example") + command.len();
    let shown = &readme[start..start + readme[start..].find("```").unwrap()];
    let out = plan(&[
        "examples/plan/rotated",
        "--before",
        "examples",
        "--nodes",
        "examples/plan/nodes.yaml",
        "--max-unavailable",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), shown);
}

#[test]
fn a_mirror_asking_for_a_cache_is_planned_with_the_cache_where_render_shows_it() {
    // The cache's credentials are the nodes' own: a k3s node restarts for them, a containerd
    // node takes them live.
    let preview = plan_json(&[
        "examples/pull-through-cache",
        "--node",
        "k3s-1:k3s",
        "--node",
        "ctrd-1:containerd",
        "--cache-address",
        "10.43.0.50",
    ]);
    assert_eq!(
        moves(&preview),
        [
            ("k3s".to_owned(), Some("restart".to_owned()), 1),
            ("containerd".to_owned(), Some("hot".to_owned()), 1),
        ]
    );
}

#[test]
fn a_cache_address_may_name_a_mirror_that_has_no_cache_yet_but_not_one_nowhere() {
    // Adding a cache: the mirror is not among `--before` (nor has a cache there); the address
    // is for the state to apply.
    let preview = plan_json(&[
        "examples/pull-through-cache",
        "--node",
        "ctrd-1:containerd",
        "--cache-address",
        "docker-hub-cache=10.43.0.50",
    ]);
    assert_eq!(
        moves(&preview),
        [("containerd".to_owned(), Some("hot".to_owned()), 1)]
    );
    let out = plan(&[
        "examples/pull-through-cache",
        "--node",
        "ctrd-1:containerd",
        "--cache-address",
        "docker-hub-cahce=10.43.0.50",
    ]);
    assert!(!out.status.success(), "a typo is refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "--cache-address docker-hub-cahce=…: no RegistryMirror \"docker-hub-cahce\" with spec.cache"
        ),
        "{stderr}"
    );
}
