//! A real node (issue 11 items 2 and 7): the testbed control plane with kube-scheduler and a
//! kubelet on this machine, its own containerd (CRI) and a CNI bridge in the test's private
//! network namespace. The Node registers and becomes Ready, a Pod of the test-built pause image
//! is scheduled, gets an address of the pod range and runs in a container of the node's
//! containerd; after the node is stopped no process, cgroup or mount of it is left.

use std::process::Command;
use std::time::{Duration, Instant};

use regmirror_testbed::node::{KUBERNETES_SERVICE_IP, NODE_IP};
use regmirror_testbed::{
    enter_private_network, BuiltImages, ControlPlane, ControlPlaneOptions, Node, NodeOptions,
};

fn output(command: &mut Command) -> String {
    let out = command.output().expect("run a command");
    assert!(
        out.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<String>) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_kubelet_registers_a_ready_node_and_runs_a_pod() {
    enter_private_network();
    let images = BuiltImages::build();
    let plane = ControlPlane::start_with_options(&ControlPlaneOptions {
        // In the test's own network namespace: pods reach it at the kubernetes ClusterIP.
        apiserver_args: vec!["--bind-address=0.0.0.0".into()],
        ..ControlPlaneOptions::default()
    });
    let node = Node::start(&plane, &images, &NodeOptions::default());
    let kubectl = |args: &[&str]| output(plane.kubectl().args(args));

    // The Node as the kubelet registered it.
    let addresses = kubectl(&[
        "get",
        "node",
        "node-1",
        "-o",
        "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address} {.status.nodeInfo.containerRuntimeVersion} {.status.nodeInfo.kubeletVersion}",
    ]);
    let fields: Vec<&str> = addresses.split_whitespace().collect();
    assert_eq!(fields[0], NODE_IP, "the node's InternalIP: {addresses}");
    assert!(
        fields[1].starts_with("containerd://1."),
        "runtime: {addresses}"
    );
    assert_eq!(fields[2], "v1.35.8", "kubelet version: {addresses}");

    // A Pod of the pause image, scheduled by kube-scheduler, run by the kubelet.
    let pause = &images.get("pause").reference;
    let pod = format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"pause","namespace":"default"}},
"spec":{{"containers":[{{"name":"pause","image":"{pause}","imagePullPolicy":"Never"}}],
"terminationGracePeriodSeconds":1}}}}"#
    );
    let file = node.dir().join("pause-pod.json");
    std::fs::write(&file, pod).unwrap();
    kubectl(&["apply", "-f", file.to_str().unwrap()]);
    let status = wait_for("the pause Pod Running", Duration::from_secs(90), || {
        let status = kubectl(&[
            "get",
            "pod",
            "pause",
            "-o",
            "jsonpath={.status.phase} {.spec.nodeName} {.status.podIP}",
        ]);
        status.starts_with("Running ").then_some(status)
    });
    let fields: Vec<&str> = status.split_whitespace().collect();
    assert_eq!(fields[1], "node-1", "{status}");
    assert!(
        fields[2].starts_with("10.244.0."),
        "a pod address from the CNI bridge: {status}"
    );
    // The pod answers on its address from the node's network namespace (the test's).
    let ping = Command::new("ping")
        .args(["-c", "1", "-W", "2", fields[2]])
        .output();
    if let Ok(ping) = ping {
        assert!(ping.status.success(), "ping {}: {ping:?}", fields[2]);
    }
    // The container runs in the node's containerd, under the node's cgroup root.
    let containers = output(node.ctr().args(["containers", "ls", "-q"]));
    assert!(
        containers.lines().count() >= 2,
        "a sandbox and a container in the node's containerd: {containers}"
    );
    let cgroup_root = node.cgroup_root().to_owned();
    let pods = std::path::Path::new("/sys/fs/cgroup/pids")
        .join(cgroup_root.trim_start_matches('/'))
        .join("kubepods");
    assert!(pods.is_dir(), "{} is the pods' cgroup", pods.display());
    // The kubernetes Service's address answers from inside: what a pod connects to.
    assert!(
        std::net::TcpStream::connect((
            KUBERNETES_SERVICE_IP,
            plane.server().rsplit(':').next().unwrap().parse().unwrap()
        ))
        .is_ok(),
        "the API server on {KUBERNETES_SERVICE_IP}"
    );

    // Stopping the node leaves nothing behind.
    let pids = node.pids();
    let node_dir = node.dir().to_owned();
    let problems = node.stop();
    assert!(problems.is_empty(), "left behind: {problems:#?}");
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "process {pid} of the node still runs"
        );
    }
    for hierarchy in ["pids", "memory", "cpu", "freezer"] {
        let dir = std::path::Path::new("/sys/fs/cgroup")
            .join(hierarchy)
            .join(cgroup_root.trim_start_matches('/'));
        assert!(!dir.exists(), "{} is left", dir.display());
    }
    assert!(!node_dir.exists(), "{} is left", node_dir.display());
}
