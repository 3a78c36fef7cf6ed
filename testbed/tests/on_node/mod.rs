//! What the tests of the chart on a real node share (chart_on_node, restart_on_node): the
//! testbed control plane with a node (testbed::node) in the test's private network namespace,
//! the test-built images in the node's containerd, and `helm install charts/regmirror` on it.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use regmirror_testbed::{
    enter_private_network, BuiltImages, ControlPlane, ControlPlaneOptions, Node, NodeOptions,
};

pub const NAMESPACE: &str = "regmirror-system";

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

pub fn output(command: &mut Command) -> String {
    let out = command.output().expect("run a command");
    assert!(
        out.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<String>,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A control plane with one node (`node-1`), the release images imported into the node's
/// containerd (as a node that pulled them has them: imagePullPolicy IfNotPresent), and the
/// chart's namespace. Dropping it stops the node, then the control plane.
pub struct OnNode {
    pub node: Node,
    pub plane: ControlPlane,
    pub images: BuiltImages,
}

impl OnNode {
    /// Enters a private network namespace (call it first thing in the test), builds the
    /// images, starts the control plane and the node.
    pub fn start() -> OnNode {
        enter_private_network();
        let images = BuiltImages::build();
        let plane = ControlPlane::start_with_options(&ControlPlaneOptions {
            apiserver_args: vec!["--bind-address=0.0.0.0".into()],
            ..ControlPlaneOptions::default()
        });
        let node = Node::start(&plane, &images, &NodeOptions::default());
        for tag in ["regmirror", "regmirror-agent", "registry"] {
            node.import(&images.get(tag).archive);
        }
        let on_node = OnNode {
            node,
            plane,
            images,
        };
        on_node.kubectl(&["create", "namespace", NAMESPACE]);
        on_node.kubectl(&[
            "label",
            "namespace",
            NAMESPACE,
            "pod-security.kubernetes.io/enforce=privileged",
        ]);
        on_node
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        output(self.plane.kubectl().args(args))
    }

    /// Helm from target/tools/bin (installed by `scripts/chart-checks --tools-only` if
    /// missing).
    pub fn helm(&self) -> Command {
        let helm = repo().join("target/tools/bin/helm");
        if !helm.is_file() {
            output(
                Command::new("bash")
                    .arg(repo().join("scripts/chart-checks"))
                    .arg("--tools-only"),
            );
        }
        let mut command = Command::new(helm);
        command
            .env("KUBECONFIG", self.plane.kubeconfig_path())
            .env("HELM_CACHE_HOME", self.plane.dir().join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.plane.dir().join("helm/config"))
            .env("HELM_DATA_HOME", self.plane.dir().join("helm/data"))
            .current_dir(repo());
        command
    }

    /// `helm install regmirror charts/regmirror --wait` with the test-built images, the node's
    /// host root, and `extra` arguments (e.g. `--set agent.flavor=k3s`).
    pub fn helm_install(&self, extra: &[&str]) {
        let (repository, tag) = self
            .images
            .get("regmirror")
            .reference
            .rsplit_once(':')
            .unwrap();
        let (agent_repository, agent_tag) = self
            .images
            .get("regmirror-agent")
            .reference
            .rsplit_once(':')
            .unwrap();
        // Pods reach the API server at the kubernetes ClusterIP (on the node's loopback) but on
        // the API server's own port, as there is no kube-proxy to map 443 to it.
        let api_port = self.plane.server().rsplit(':').next().unwrap().to_owned();
        let port_env =
            format!("[{{\"name\":\"KUBERNETES_SERVICE_PORT\",\"value\":\"{api_port}\"}}]");
        let install = output(
            self.helm()
                .args([
                    "install",
                    "regmirror",
                    "charts/regmirror",
                    "-n",
                    NAMESPACE,
                    "--set",
                    &format!("operator.image.repository={repository}"),
                    "--set",
                    &format!("operator.image.tag={tag}"),
                    "--set",
                    &format!("agent.image.repository={agent_repository}"),
                    "--set",
                    &format!("agent.image.tag={agent_tag}"),
                    "--set",
                    &format!("agent.hostRoot={}", self.node.host_root().display()),
                    // The mirrors are on the node's loopback, which the agent's pod network
                    // does not reach.
                    "--set",
                    "agent.verifyEndpoints=false",
                    "--set",
                    &format!("cache.image={}", self.images.get("registry").reference),
                    "--set-json",
                    &format!("operator.extraEnv={port_env}"),
                    "--set-json",
                    &format!("agent.extraEnv={port_env}"),
                    "--wait",
                    "--timeout",
                    "180s",
                ])
                .args(extra),
        );
        assert!(install.contains("STATUS: deployed"), "{install}");
    }

    /// Waits for the agent pod Running and Ready; returns `<node> <pod IP> Running True`.
    pub fn agent_ready(&self) -> String {
        wait_for("the agent pod Ready", Duration::from_secs(120), || {
            let agent = self.kubectl(&[
                "get",
                "pods",
                "-n",
                NAMESPACE,
                "-l",
                "app.kubernetes.io/component=agent",
                "-o",
                "jsonpath={range .items[*]}{.spec.nodeName} {.status.podIP} {.status.phase} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
            ]);
            agent.contains(" Running True").then_some(agent)
        })
    }

    /// `kubectl apply -f` of `yaml` (written to a file in the node's directory).
    pub fn apply(&self, yaml: &str) {
        let file = self.node.dir().join("apply.yaml");
        std::fs::write(&file, yaml).unwrap();
        self.kubectl(&["apply", "-f", file.to_str().unwrap()]);
    }
}
