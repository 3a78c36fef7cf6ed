//! Holds a testbed control plane for a person (see `scripts/dev-cluster`).
//!
//! `dev-cluster run <dir>` starts etcd, kube-apiserver and kube-controller-manager with their
//! files in `<dir>`, writes `<dir>/pids` once the cluster is ready, prints
//! `export KUBECONFIG=<dir>/admin.kubeconfig`, and runs until SIGTERM, SIGINT or SIGHUP, when it
//! stops the cluster. If this process is killed outright, the cluster's watchdog stops it.
//!
//! `dev-cluster run <dir> --node` adds a real node (testbed::node: kube-scheduler, a kubelet
//! with its own containerd, pods on a CNI bridge) and a docker-registry on the node's
//! 127.0.0.1 holding the test-built images (`testbed/images/build`, or
//! `$REGMIRROR_IMAGES_DIR`), which the node's containerd pulls. All of it lives in a private
//! network namespace, as in the tests; the API server is reached from this machine through a
//! forwarder on 127.0.0.1 (`<dir>/kubeconfig`). `<dir>/e2e.env` holds the environment for
//! `e2e/run` against it; `<dir>/node` the node's directory and cgroup root.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use regmirror_testbed::{
    enter_private_network, require_tool, BuiltImages, ControlPlane, ControlPlaneOptions, Node,
    NodeOptions, Pki, Registry, RegistryOptions,
};
use tokio::signal::unix::{signal, Signal, SignalKind};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let with_node = match args.as_slice() {
        [command, _] if command == "run" => false,
        [command, _, flag] if command == "run" && flag == "--node" => true,
        _ => usage(),
    };
    let dir = PathBuf::from(&args[1]);
    // Taken from the start: a signal while the cluster starts is acted on once it has started,
    // so that it is stopped (and a node cleaned up) rather than this process killed.
    let signals = Signals::new();
    if with_node {
        run_with_node(&dir, signals);
    } else {
        let plane = ControlPlane::start_in(&dir);
        write_pids(&dir, plane.pids());
        println!("export KUBECONFIG={}", plane.kubeconfig_path().display());
        signals.wait();
        drop(plane);
    }
    let _ = std::fs::remove_file(dir.join("pids"));
    eprintln!("dev-cluster: stopped");
}

fn run_with_node(dir: &Path, signals: Signals) {
    require_tool("skopeo");
    // Bound in this machine's network namespace, before this thread leaves it: the person's
    // way to the API server.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the API server's forwarder");
    let port = listener.local_addr().unwrap().port();
    enter_private_network();
    let images = BuiltImages::build();
    let plane = ControlPlane::start_in_with_options(
        dir,
        &ControlPlaneOptions {
            apiserver_args: vec!["--bind-address=0.0.0.0".into()],
            ..ControlPlaneOptions::default()
        },
    );
    let dir = plane.dir().to_owned();
    let api_port = plane.server().rsplit(':').next().unwrap().to_owned();
    // Threads started from here on are in the private namespace: the forwarder accepts on the
    // machine's 127.0.0.1 and connects to the API server on the private one.
    let target = format!("127.0.0.1:{api_port}");
    std::thread::spawn(move || forward(listener, target));
    let kubeconfig = dir.join("kubeconfig");
    let admin = std::fs::read_to_string(plane.kubeconfig_path()).unwrap();
    std::fs::write(
        &kubeconfig,
        admin.replace(plane.server(), &format!("https://127.0.0.1:{port}")),
    )
    .unwrap();

    let node = Node::start(&plane, &images, &NodeOptions::default());
    std::fs::write(
        dir.join("node"),
        format!(
            "dir={}\ncgroup_root={}\n",
            node.dir().display(),
            node.cgroup_root()
        ),
    )
    .unwrap();

    // The loopback registry with the images (plain http: containerd takes a loopback registry
    // for http).
    let pki = Pki::create(&dir.join("registry-pki"));
    let registry = Registry::start(&dir.join("registry"), &pki, RegistryOptions::default());
    let mut references = Vec::new();
    for tag in ["regmirror", "regmirror-agent"] {
        let image = images.get(tag);
        let version = image.reference.rsplit_once(':').unwrap().1;
        let reference = format!("{}/regmirror/{tag}:{version}", registry.host());
        let out = Command::new("skopeo")
            .env("HOME", &dir)
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("docker-archive:{}", image.archive.display()))
            .arg(format!("docker://{reference}"))
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy {} to {reference}: {}",
            image.archive.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        references.push(reference);
    }

    // Pods reach the API server at the kubernetes ClusterIP (on the node's loopback) but on the
    // API server's own port: there is no kube-proxy to map 443 to it.
    let port_env = format!("[{{\"name\":\"KUBERNETES_SERVICE_PORT\",\"value\":\"{api_port}\"}}]");
    let helm_args = format!(
        "--set agent.hostRoot={} --set-json operator.extraEnv={port_env} --set-json agent.extraEnv={port_env}",
        node.host_root().display()
    );
    let env = format!(
        "export KUBECONFIG={}\nexport REGMIRROR_OPERATOR_IMAGE={}\nexport REGMIRROR_AGENT_IMAGE={}\nexport REGMIRROR_E2E_HELM_ARGS='{helm_args}'\n",
        kubeconfig.display(),
        references[0],
        references[1],
    );
    std::fs::write(dir.join("e2e.env"), &env).unwrap();
    let mut pids = plane.pids();
    pids.extend(node.pids());
    write_pids(&dir, pids);
    print!("{env}");

    signals.wait();
    drop(registry);
    let problems = node.stop();
    if !problems.is_empty() {
        eprintln!(
            "dev-cluster: the node left behind:\n{}",
            problems.join("\n")
        );
    }
    drop(plane);
}

/// Copies every connection accepted on `listener` to and from a new one to `target`.
fn forward(listener: TcpListener, target: String) {
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let target = target.clone();
        std::thread::spawn(move || {
            let Ok(server) = TcpStream::connect(&target) else {
                return;
            };
            let (client2, server2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || pipe(client2, server2));
            pipe(server, client);
        });
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

fn write_pids(dir: &Path, pids: Vec<u32>) {
    let pids: String = pids.iter().map(|pid| format!("{pid}\n")).collect();
    std::fs::write(dir.join("pids.new"), pids).unwrap();
    std::fs::rename(dir.join("pids.new"), dir.join("pids")).unwrap();
}

/// SIGTERM, SIGINT and SIGHUP, registered (their default action, exiting, replaced) when made.
struct Signals {
    runtime: tokio::runtime::Runtime,
    streams: [Signal; 3],
}

impl Signals {
    fn new() -> Signals {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let streams = runtime.block_on(async {
            [
                SignalKind::terminate(),
                SignalKind::interrupt(),
                SignalKind::hangup(),
            ]
            .map(|kind| signal(kind).unwrap())
        });
        Signals { runtime, streams }
    }

    /// Returns on the first of them (also one that came before).
    fn wait(self) {
        let Signals {
            runtime,
            streams: [mut term, mut int, mut hup],
        } = self;
        runtime.block_on(async {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
        });
    }
}

fn usage() -> ! {
    eprintln!("usage: dev-cluster run <dir> [--node]");
    std::process::exit(2);
}
