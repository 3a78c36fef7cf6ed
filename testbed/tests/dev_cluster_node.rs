//! What a person does with `scripts/dev-cluster up --node` (issue 11 item 2): start the control
//! plane with a real node and the test-built images in its loopback registry, run `e2e/run` with
//! the environment it prints — pods included, every step run, none skipped — and
//! `scripts/dev-cluster down`, which leaves nothing behind: no process, no node directory, no
//! cgroup, no mount.
//!
//! The test runs in this machine's network namespace, as a person's shell does: it reaches the
//! cluster only through what `up` prints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

fn dev_cluster(dir: &Path, args: &[&str]) -> Output {
    Command::new("bash")
        .arg(repo().join("scripts/dev-cluster"))
        .args(args)
        .env("REGMIRROR_DEV_CLUSTER_DIR", dir)
        // The program cargo built for this test: no cargo build while tests run.
        .env(
            "REGMIRROR_DEV_CLUSTER_BIN",
            env!("CARGO_BIN_EXE_dev-cluster"),
        )
        .current_dir(repo())
        .output()
        .expect("run scripts/dev-cluster")
}

/// `export NAME=value` lines (value possibly in single quotes) → name → value.
fn exports(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("export "))
        .map(|line| {
            let (name, value) = line.split_once('=').unwrap();
            let value = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or(value);
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
        !status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains("Z"))
    })
}

/// Processes whose command line names `path`.
fn processes_naming(path: &Path) -> Vec<String> {
    let needle = path.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains(&needle) && alive(&pid.to_string()))
                .then(|| format!("{pid}: {cmdline}"))
        })
        .collect()
}

/// Stops the cluster if the test fails half-way.
struct Down(PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let out = dev_cluster(&self.0, &["down"]);
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

#[test]
fn e2e_run_passes_against_dev_cluster_up_node() {
    let work = tempfile::Builder::new()
        .prefix("regmirror-dev-cluster-")
        .tempdir()
        .unwrap();
    let dir = work.path().join("cluster");
    let started = Instant::now();
    let _down = Down(dir.clone());
    let up = dev_cluster(&dir, &["up", "--node"]);
    let stdout = String::from_utf8_lossy(&up.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&up.stderr).into_owned();
    assert!(
        up.status.success(),
        "dev-cluster up --node failed:\n{stdout}{stderr}"
    );
    let env = exports(&stdout);
    for name in [
        "KUBECONFIG",
        "REGMIRROR_OPERATOR_IMAGE",
        "REGMIRROR_AGENT_IMAGE",
        "REGMIRROR_E2E_HELM_ARGS",
    ] {
        assert!(env.contains_key(name), "up printed no {name}:\n{stdout}");
    }
    assert!(
        env["REGMIRROR_AGENT_IMAGE"].starts_with("127.0.0.1:"),
        "the images are in the loopback registry: {env:?}"
    );
    let up_time = started.elapsed();

    // e2e/run as a person runs it: that environment and nothing else of regmirror's.
    let e2e_started = Instant::now();
    let mut e2e = Command::new("bash");
    e2e.arg(repo().join("e2e/run")).current_dir(repo());
    for (name, _) in std::env::vars() {
        if name.starts_with("REGMIRROR_E2E_") {
            e2e.env_remove(name);
        }
    }
    e2e.envs(&env).env("REGMIRROR_E2E_TIMEOUT", "180");
    let out = e2e.output().expect("run e2e/run");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "e2e/run failed:\n{output}");
    let summary = output
        .lines()
        .find(|l| l.starts_with("e2e: "))
        .unwrap_or_else(|| panic!("no summary line:\n{output}"));
    let passed: u32 = summary
        .strip_prefix("e2e: ")
        .and_then(|s| s.strip_suffix(" passed, 0 failed"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not `e2e: N passed, 0 failed`: {summary}\n{output}"));
    assert!(passed >= 14, "{summary}\n{output}");
    assert!(!output.contains("skipped"), "a step was skipped:\n{output}");
    let e2e_time = e2e_started.elapsed();
    // The node pulled the images from the loopback registry (nothing imported them).
    let registry_log = std::fs::read_to_string(dir.join("registry/registry.log")).unwrap();
    for repository in ["regmirror/regmirror", "regmirror/regmirror-agent"] {
        assert!(
            registry_log.contains(&format!("GET /v2/{repository}/manifests/")),
            "the node did not pull {repository} from the registry"
        );
    }

    // What down must take away.
    let node = std::fs::read_to_string(dir.join("node")).unwrap();
    let field = |name: &str| {
        node.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap()
            .to_owned()
    };
    let (node_dir, cgroup_root) = (PathBuf::from(field("dir")), field("cgroup_root"));
    let mut pids: Vec<String> = std::fs::read_to_string(dir.join("pids"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    pids.push(
        std::fs::read_to_string(dir.join("dev-cluster.pid"))
            .unwrap()
            .trim()
            .to_owned(),
    );
    assert!(node_dir.is_dir(), "{}", node_dir.display());
    assert!(pids.iter().all(|pid| alive(pid)), "{pids:?}");

    let down = dev_cluster(&dir, &["down"]);
    assert!(
        down.status.success(),
        "dev-cluster down failed:\n{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let left: Vec<&String> = pids.iter().filter(|pid| alive(pid)).collect();
    assert!(left.is_empty(), "processes left running: {left:?}");
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(!node_dir.exists(), "{} is left", node_dir.display());
    let named: Vec<String> = [&node_dir, &dir]
        .iter()
        .flat_map(|p| processes_naming(p))
        .collect();
    assert!(named.is_empty(), "processes left: {named:?}");
    let cgroups: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|e| e.path().join(cgroup_root.trim_start_matches('/')))
        .filter(|p| p.exists())
        .collect();
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let node_dir_text = node_dir.display().to_string();
    assert!(
        !mounts.lines().any(|l| l.contains(&node_dir_text)),
        "mounts of the node left"
    );
    eprintln!(
        "dev-cluster up --node: {up_time:?}; e2e/run: {e2e_time:?} ({summary}); down: {:?}",
        started.elapsed() - up_time - e2e_time
    );
}
