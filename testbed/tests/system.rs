//! The whole system as processes against a real control plane (issue 10, items 5 and 6).
//!
//! Two real operator replicas (`regmirror controller`, with the chart's operator ServiceAccount
//! and RBAC) and one real `regmirror-agent run` per simulated node (its own host root, a token
//! of the chart's agent ServiceAccount bound to a Pod on its Node, so the chart's admission
//! policy sees the node), against etcd + kube-apiserver + kube-controller-manager from
//! `testbed/kube`. The Nodes are made by the test and kept Ready as a kubelet would (a fresh
//! heartbeat every two seconds, none while a k3s node's "k3s" is down). Nodes:
//!
//! | node   | flavor     | role          | runtime                                                 |
//! |--------|------------|---------------|---------------------------------------------------------|
//! | cp-1   | k3s        | control plane | a process restarted by `--restart-command`              |
//! | cp-2   | k3s        | control plane | same                                                    |
//! | k3s-1  | k3s        | worker        | same                                                    |
//! | k3s-2  | k3s        | worker        | same                                                    |
//! | ctrd-1 | containerd | worker        | a real containerd pulling through the mirror            |
//! | ctrd-2 | containerd | worker        | none (hosts.toml are read at every pull)                |
//!
//! The mirror is a real docker-registry with TLS (a test CA) and htpasswd basic auth on
//! 127.0.0.1:443 (k3s refuses credentials for a loopback host with a port: it would speak
//! plain http there). The mirrors applied are `examples/*.yaml`, with the example hosts replaced
//! by loopback ones, the example CA by the test CA and the password by the registry's.
//!
//! What is asserted is what the API server holds (Node annotations, RegistryMirror status, the
//! Lease) and what is on the host roots (the files, equal to `regmirror render` for that node;
//! the restart command's own log with timestamps; a real pull), never what the processes
//! print. At every stage the live RegistryMirror JSON is judged by Flux's kstatus library and
//! by the Argo CD health check from `examples/gitops/argocd/argocd-cm-patch.yaml` run by
//! gopher-lua (`testbed/health`).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use regmirror_testbed::install::{self, repo, run_ok, with_stdin};
use regmirror_testbed::{
    dead_port, free_port, oci_layout, push, Containerd, ControlPlane, Pki, Registry,
    RegistryOptions, TokenOptions,
};
use serde_json::{json, Value};

const NS: &str = "regmirror-system";
const USER: &str = "puller";
const PASSWORD: &str = "s3cret-pa55";
/// The operators' `maxUnavailable`.
const MAX_UNAVAILABLE: usize = 2;
const LEASE: &str = "regmirror-controller";
/// The operator's Lease duration, and how often a follower looks at the Lease.
const LEASE_DURATION: Duration = Duration::from_secs(15);
const LEASE_RETRY: Duration = Duration::from_secs(5);
/// How long the fake k3s is down during a restart.
const K3S_DOWN: &str = "1";
const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";
/// Longest wait for one convergence.
const CONVERGE: Duration = Duration::from_secs(150);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    K3s,
    Containerd,
}

impl Flavor {
    fn as_str(self) -> &'static str {
        match self {
            Flavor::K3s => "k3s",
            Flavor::Containerd => "containerd",
        }
    }
}

#[derive(Debug, Clone)]
struct NodeSpec {
    name: &'static str,
    flavor: Flavor,
    labels: BTreeMap<String, String>,
}

impl NodeSpec {
    fn control_plane(&self) -> bool {
        self.labels.contains_key(CONTROL_PLANE_LABEL)
    }

    fn labels_arg(&self) -> String {
        self.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn node_specs() -> Vec<NodeSpec> {
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>()
    };
    let server = labels(&[(CONTROL_PLANE_LABEL, "true"), ("pool", "servers")]);
    let worker = labels(&[("pool", "workers")]);
    let edge = labels(&[("pool", "edge-a")]);
    vec![
        NodeSpec {
            name: "cp-1",
            flavor: Flavor::K3s,
            labels: server.clone(),
        },
        NodeSpec {
            name: "cp-2",
            flavor: Flavor::K3s,
            labels: server,
        },
        NodeSpec {
            name: "ctrd-1",
            flavor: Flavor::Containerd,
            labels: edge.clone(),
        },
        NodeSpec {
            name: "ctrd-2",
            flavor: Flavor::Containerd,
            labels: edge,
        },
        NodeSpec {
            name: "k3s-1",
            flavor: Flavor::K3s,
            labels: worker.clone(),
        },
        NodeSpec {
            name: "k3s-2",
            flavor: Flavor::K3s,
            labels: worker,
        },
    ]
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Whether process `pid` runs (exists and is not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

fn pid_in(file: &Path) -> Option<u32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

// ------------------------------------------------------------------------------ binaries

/// `regmirror`, `regmirror-agent` and `regmirror-health`, built now (cargo is a no-op when
/// they are fresh). The first two live in other packages of this workspace, whose binaries
/// Cargo does not hand to this package's tests, so they are built with cargo into the target
/// directory this test runs from.
struct Binaries {
    regmirror: PathBuf,
    agent: PathBuf,
    health: PathBuf,
    helm: PathBuf,
}

fn binaries() -> Binaries {
    // target/<profile>/deps/system-<hash>
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_owned();
    let target_dir = profile_dir.parent().unwrap().to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(repo())
        .args(["build", "--quiet", "-p", "regmirror", "--bin", "regmirror"])
        .args(["-p", "regmirror-node-agent", "--bin", "regmirror-agent"])
        .env("CARGO_TARGET_DIR", &target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    run_ok(&mut build);
    let health = run_ok(Command::new("bash").arg(repo().join("testbed/health/build")));
    let helm = install::helm();
    Binaries {
        regmirror: profile_dir.join("regmirror"),
        agent: profile_dir.join("regmirror-agent"),
        health: PathBuf::from(health.trim()),
        helm,
    }
}

// ------------------------------------------------------------------------------ processes

/// A child process with its log, killed when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, command: &mut Command, log: &Path) -> Proc {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        }
    }

    fn signal(&self, signal: &str) {
        run_ok(Command::new("kill").args([signal, &self.child.id().to_string()]));
    }

    /// Waits for the process to exit; fails after `timeout`.
    fn wait_exit(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ------------------------------------------------------------------------------ manifests

/// What the test has applied: file name → YAML. `regmirror render` reads the same files.
#[derive(Debug, Clone, Default)]
struct Manifests {
    files: BTreeMap<String, String>,
}

impl Manifests {
    fn write_to(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, text) in &self.files {
            std::fs::write(dir.join(name), text).unwrap();
        }
    }

    /// The RegistryMirror names in these files.
    fn mirrors(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for text in self.files.values() {
            for doc in text.split("\n---") {
                if doc.contains("kind: RegistryMirror") {
                    let name = doc
                        .lines()
                        .find_map(|l| l.trim().strip_prefix("name: "))
                        .expect("a mirror with a name");
                    names.insert(name.trim().to_owned());
                }
            }
        }
        names
    }
}

/// Addresses of the test world.
#[derive(Debug, Clone)]
struct Hosts {
    /// The mirror: `127.0.0.1` (port 443).
    mirror: String,
    /// Upstream registries that do not answer: the examples' docker.io and quay.io.
    docker_hub: String,
    quay: String,
    ca_pem: String,
}

/// `examples/*.yaml` on loopback: docker.io and quay.io become upstreams that do not answer,
/// the example mirror host the test registry, the example CA the test CA and the password the
/// registry's.
fn loopback_examples(hosts: &Hosts) -> Manifests {
    let examples = repo().join("examples");
    let replace = |text: String| -> String {
        text.replace("\"docker.io\"", &format!("\"{}\"", hosts.docker_hub))
            .replace("\"quay.io\"", &format!("\"{}\"", hosts.quay))
            .replace(
                "https://registry-1.docker.io",
                &format!("https://{}", hosts.docker_hub),
            )
            .replace("mirror.internal.example.com:5000", &hosts.mirror)
            .replace("password: change-me", &format!("password: {PASSWORD}"))
    };
    let mut files = BTreeMap::new();
    for name in ["docker-hub.yaml", "quay.yaml", "registry-credentials.yaml"] {
        let text = std::fs::read_to_string(examples.join(name)).unwrap();
        let mut text = replace(text);
        if name == "registry-credentials.yaml" {
            text = replace_ca(&text, &hosts.ca_pem);
        }
        for left in ["\"docker.io\"", "\"quay.io\"", "example.com", "change-me"] {
            assert!(
                !text.contains(left),
                "examples/{name}: {left} left after making it loopback:\n{text}"
            );
        }
        files.insert(name.to_owned(), text);
    }
    Manifests { files }
}

/// Replaces the PEM block of the `ca.crt: |` literal with `pem`, same indentation.
fn replace_ca(text: &str, pem: &str) -> String {
    let begin = text
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a CA in the example");
    let end_marker = "-----END CERTIFICATE-----";
    let end = text[begin..].find(end_marker).unwrap() + begin + end_marker.len();
    let indent = text[..begin].rsplit('\n').next().unwrap().to_owned();
    let body: Vec<String> = pem
        .trim()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                l.to_owned()
            } else {
                format!("{indent}{l}")
            }
        })
        .collect();
    format!("{}{}{}", &text[..begin], body.join("\n"), &text[end..])
}

/// The credentials Secret with another password.
fn with_password(manifests: &Manifests, password: &str) -> Manifests {
    let mut next = manifests.clone();
    let text = next.files.get_mut("registry-credentials.yaml").unwrap();
    let line = text
        .lines()
        .find(|l| l.trim().starts_with("password: "))
        .unwrap()
        .to_owned();
    let indent = &line[..line.len() - line.trim_start().len()];
    *text = text.replace(&line, &format!("{indent}password: {password}"));
    next
}

// ------------------------------------------------------------------------------ the system

struct Agent {
    spec: NodeSpec,
    root: PathBuf,
    dir: PathBuf,
    proc: Proc,
}

impl Agent {
    /// The fake k3s's pid file (k3s nodes only).
    fn k3s_pid_file(&self) -> Option<PathBuf> {
        (self.spec.flavor == Flavor::K3s).then(|| self.dir.join("k3s.pid"))
    }
}

struct System {
    plane: ControlPlane,
    bins: Binaries,
    dir: Option<tempfile::TempDir>,
    hosts: Hosts,
    _registry: Registry,
    /// Held while the registry has 127.0.0.1:443 (released after it, fields drop in order).
    _port_lock: std::fs::File,
    containerd: Containerd,
    image: String,
    operators: Vec<(String, Proc)>,
    operator_kubeconfig: PathBuf,
    agents: Vec<Agent>,
    heartbeat_stop: Arc<AtomicBool>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
    restart_log: PathBuf,
    next_identity: usize,
}

impl System {
    fn path(&self) -> PathBuf {
        self.dir.as_ref().unwrap().path().to_owned()
    }

    fn kubectl(&self) -> Command {
        let mut kubectl = self.plane.kubectl();
        kubectl.arg("--request-timeout=30s");
        kubectl
    }

    async fn client(&self) -> kube::Client {
        client(self.plane.kubeconfig_path()).await
    }

    fn agent(&self, name: &str) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.spec.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Starts everything: control plane, CRD, the chart's RBAC and admission policy, the
    /// registry and containerd, the Nodes with their agents, two operator replicas.
    async fn start() -> System {
        let started = Instant::now();
        let bins = binaries();
        eprintln!("system: binaries ready after {:?}", started.elapsed());
        let dir = tempfile::Builder::new()
            .prefix("regmirror-system-")
            .tempdir()
            .unwrap();
        let path = dir.path().to_owned();

        // The mirror: TLS + basic auth on 127.0.0.1:443, holding library/hello:v1. Runs of this
        // test in other processes (another checkout's suite) take turns for the port.
        let port_lock =
            std::fs::File::create(std::env::temp_dir().join("regmirror-system-443.lock"))
                .expect("create the port lock file");
        if port_lock.try_lock().is_err() {
            eprintln!("system: waiting for another run of this test to free 127.0.0.1:443");
            port_lock.lock().expect("lock the port lock file");
        }
        assert!(
            std::net::TcpListener::bind("127.0.0.1:443").is_ok(),
            "127.0.0.1:443 is taken: the system test's registry must listen there (k3s refuses credentials for a loopback host with a port)"
        );
        let pki = Pki::create(&path.join("pki"));
        let registry = Registry::start_on(
            &path.join("registry"),
            &pki,
            RegistryOptions {
                tls: true,
                basic_auth: Some((USER.into(), PASSWORD.into())),
                client_certs: false,
            },
            443,
        );
        let layout = path.join("image");
        oci_layout(&layout, "v1", "hello from regmirror");
        push(
            &layout,
            "v1",
            &registry,
            "library/hello",
            &pki.dir,
            &path.join("push"),
        );
        // quay's examples endpoint is the mirror under /v2/quay (override_path): the image
        // is there as quay/library/hello.
        push(
            &layout,
            "v1",
            &registry,
            "quay/library/hello",
            &pki.dir,
            &path.join("push"),
        );
        let hosts = Hosts {
            mirror: "127.0.0.1".into(),
            docker_hub: format!("127.0.0.1:{}", dead_port()),
            quay: format!("127.0.0.1:{}", dead_port()),
            ca_pem: pki.pem("ca.crt"),
        };
        let image = format!("{}/library/hello:v1", hosts.docker_hub);
        let containerd = Containerd::start(&path.join("containerd"));

        let plane = ControlPlane::start();
        eprintln!("system: control plane up after {:?}", started.elapsed());
        install::install_crds(&plane);
        install::create_namespace(&plane, NS);
        // The chart's ServiceAccounts, RBAC and admission policy, as `helm install` makes them.
        let rendered = install::apply_chart_templates(
            &plane,
            &bins.helm,
            NS,
            &[
                "serviceaccounts.yaml",
                "rbac-operator.yaml",
                "cache-namespace.yaml",
                "rbac-agent.yaml",
                "rbac-events.yaml",
                "admission-policy.yaml",
            ],
        );
        for kind in [
            "kind: ServiceAccount",
            "kind: ClusterRole\n",
            "kind: ValidatingAdmissionPolicy\n",
            "kind: ValidatingAdmissionPolicyBinding",
        ] {
            assert!(rendered.contains(kind), "helm template rendered no {kind}");
        }

        let client = client(plane.kubeconfig_path()).await;
        let specs = node_specs();
        let nodes: Api<Node> = Api::all(client.clone());
        let restart_log = path.join("restarts.log");
        std::fs::write(&restart_log, "").unwrap();
        for spec in &specs {
            let node: Node = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": spec.name, "labels": node_labels(spec)},
            }))
            .unwrap();
            nodes.create(&PostParams::default(), &node).await.unwrap();
        }
        let heartbeat_stop = Arc::new(AtomicBool::new(false));

        let mut system = System {
            plane,
            bins,
            dir: Some(dir),
            hosts,
            _registry: registry,
            _port_lock: port_lock,
            containerd,
            image,
            operators: Vec::new(),
            operator_kubeconfig: PathBuf::new(),
            agents: Vec::new(),
            heartbeat_stop,
            heartbeat: None,
            restart_log,
            next_identity: 0,
        };
        // Every node's "k3s" runs before its kubelet posts Ready.
        for spec in &specs {
            let node_dir = path.join("nodes").join(spec.name);
            std::fs::create_dir_all(node_dir.join("root")).unwrap();
            if spec.flavor == Flavor::K3s {
                start_fake_k3s(&node_dir.join("k3s.pid"));
            }
        }
        let kubelets: Vec<(String, Option<PathBuf>)> = specs
            .iter()
            .map(|s| {
                let pid = (s.flavor == Flavor::K3s)
                    .then(|| path.join("nodes").join(s.name).join("k3s.pid"));
                (s.name.to_owned(), pid)
            })
            .collect();
        system.heartbeat = Some(spawn_kubelets(
            system.plane.kubeconfig_path().to_owned(),
            kubelets,
            system.heartbeat_stop.clone(),
        ));
        for spec in &specs {
            wait_for(
                &format!("Node {} Ready", spec.name),
                Duration::from_secs(30),
                || async {
                    let node = nodes.get(spec.name).await.ok()?;
                    regmirror_core::contract::node_ready(&node).then_some(())
                },
            )
            .await;
        }

        for spec in specs {
            let agent = system.start_agent(spec).await;
            system.agents.push(agent);
        }
        system.operator_kubeconfig = system
            .plane
            .service_account_kubeconfig(NS, "regmirror-operator", &TokenOptions::default())
            .await;
        for _ in 0..2 {
            system.start_operator();
        }
        // Every agent has published its flavor and key; a replica leads.
        for agent in &system.agents {
            let name = agent.spec.name;
            wait_for(
                &format!("the agent on {name} publishes its key"),
                Duration::from_secs(60),
                || async {
                    let node = nodes.get(name).await.ok()?;
                    let a = node.metadata.annotations?;
                    (a.contains_key("regmirror.io/public-key")
                        && a.get("regmirror.io/flavor").map(String::as_str)
                            == Some(agent.spec.flavor.as_str()))
                    .then_some(())
                },
            )
            .await;
        }
        system.leader().await;
        eprintln!("system: everything up after {:?}", started.elapsed());
        system
    }

    async fn start_agent(&self, spec: NodeSpec) -> Agent {
        let dir = self.path().join("nodes").join(spec.name);
        start_agent(&self.plane, &self.bins, spec, &dir, &self.restart_log, true).await
    }

    fn start_operator(&mut self) -> String {
        let identity = format!("regmirror-operator-{}", self.next_identity);
        self.next_identity += 1;
        let proc = start_operator(
            &self.bins,
            &self.operator_kubeconfig,
            &identity,
            MAX_UNAVAILABLE,
            &self.path(),
        );
        self.operators.push((identity.clone(), proc));
        identity
    }

    /// The Lease holder, once there is one; fails if it is not one of the running replicas.
    async fn leader(&mut self) -> String {
        let leases: Api<Lease> = Api::namespaced(self.client().await, NS);
        let holder = wait_for(
            "a replica holds the Lease",
            Duration::from_secs(60),
            || async {
                let lease = leases.get_opt(LEASE).await.ok()??;
                lease.spec?.holder_identity.filter(|h| !h.is_empty())
            },
        )
        .await;
        let running: Vec<String> = self
            .operators
            .iter_mut()
            .filter_map(|(id, p)| p.running().then(|| id.clone()))
            .collect();
        assert!(
            running.contains(&holder),
            "the Lease is held by {holder}, not a running replica ({running:?})"
        );
        holder
    }

    fn operator(&mut self, identity: &str) -> &mut Proc {
        &mut self
            .operators
            .iter_mut()
            .find(|(id, _)| id == identity)
            .unwrap()
            .1
    }

    fn apply(&self, manifests: &Manifests) {
        let dir = self.path().join(format!("apply-{}", now_unix()));
        manifests.write_to(&dir);
        run_ok(self.kubectl().args(["apply", "-f"]).arg(&dir));
    }

    /// The live RegistryMirrors, as `kubectl get -o json` prints them.
    fn mirrors_json(&self) -> Value {
        let text = run_ok(
            self.kubectl()
                .args(["get", "registrymirrors", "-o", "json"]),
        );
        serde_json::from_str(&text).unwrap()
    }

    /// Flux's kstatus and Argo CD's health check on these objects: name → (kstatus, argocd).
    fn judge(&self, mirrors: &Value) -> BTreeMap<String, (String, String)> {
        let out = with_stdin(
            Command::new(&self.bins.health)
                .arg("--argocd-cm")
                .arg(repo().join("examples/gitops/argocd/argocd-cm-patch.yaml")),
            &mirrors.to_string(),
        );
        let verdicts: BTreeMap<String, Value> = serde_json::from_str(&out).unwrap();
        verdicts
            .into_iter()
            .map(|(name, v)| {
                let status = |tool: &str| v[tool]["status"].as_str().unwrap().to_owned();
                (name, (status("kstatus"), status("argocd")))
            })
            .collect()
    }

    /// Asserts the verdicts on `mirror` in `mirrors`.
    fn expect_health(
        &self,
        mirrors: &Value,
        mirror: &str,
        kstatus: &str,
        argocd: &str,
        when: &str,
    ) {
        let verdicts = self.judge(mirrors);
        let got = verdicts
            .get(mirror)
            .unwrap_or_else(|| panic!("{when}: no verdict on {mirror}: {verdicts:?}"));
        assert_eq!(
            (got.0.as_str(), got.1.as_str()),
            (kstatus, argocd),
            "{when}: kstatus and Argo CD on RegistryMirror {mirror} (status {})",
            serde_json::to_string_pretty(&mirror_of(mirrors, mirror)["status"]).unwrap()
        );
        eprintln!(
            "health {when}: {mirror}: kstatus {}, Argo CD {}",
            got.0, got.1
        );
    }

    /// What `regmirror render` says a node gets from `manifests`: path → (content, mode).
    fn render(&self, manifests: &Manifests, spec: &NodeSpec) -> BTreeMap<String, (String, u32)> {
        let work = self
            .path()
            .join(format!("render-{}-{}", spec.name, now_unix()));
        let input = work.join("in");
        manifests.write_to(&input);
        let out = work.join("out");
        run_ok(
            Command::new(&self.bins.regmirror)
                .arg("render")
                .arg(&input)
                .args(["--flavor", spec.flavor.as_str(), "--node", spec.name])
                .args(["--labels", &spec.labels_arg()])
                .arg("--out")
                .arg(&out),
        );
        let files = tree(&out, &out);
        let _ = std::fs::remove_dir_all(&work);
        files
    }

    /// The files regmirror manages on a node's host root (its state directory left out).
    fn host_files(&self, name: &str) -> BTreeMap<String, (String, u32)> {
        let root = &self.agent(name).root;
        tree(root, root)
            .into_iter()
            .filter(|(p, _)| !p.starts_with("/var/lib/regmirror/"))
            .collect()
    }

    /// Why the host files of every node are not what render says, if they are not.
    fn files_differ(&self, manifests: &Manifests) -> Option<String> {
        for agent in &self.agents {
            let want = self.render(manifests, &agent.spec);
            let have = self.host_files(agent.spec.name);
            if want != have {
                let mut why = format!(
                    "{}: host files differ from regmirror render:",
                    agent.spec.name
                );
                for path in want.keys().chain(have.keys()).collect::<BTreeSet<_>>() {
                    match (want.get(path), have.get(path)) {
                        (Some(w), Some(h)) if w == h => {}
                        (Some(w), Some(h)) => why.push_str(&format!(
                            "\n  {path}: differs (mode {:o} vs {:o})\n--- render\n{}\n--- host\n{}",
                            w.1, h.1, w.0, h.0
                        )),
                        (Some(_), None) => {
                            why.push_str(&format!("\n  {path}: missing on the host"))
                        }
                        (None, Some(_)) => {
                            why.push_str(&format!("\n  {path}: on the host, not rendered"))
                        }
                        (None, None) => {}
                    }
                }
                return Some(why);
            }
        }
        None
    }

    async fn nodes(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let nodes: Api<Node> = Api::all(self.client().await);
        // A connection the API server closed under a reused request is not the test's concern.
        let mut attempts = 0;
        let list = loop {
            match nodes.list(&Default::default()).await {
                Ok(list) => break list,
                Err(e) if attempts < 5 => {
                    attempts += 1;
                    eprintln!("listing Nodes failed ({e}); again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("listing Nodes: {e}"),
            }
        };
        list.items
            .into_iter()
            .map(|n| {
                (
                    n.metadata.name.unwrap(),
                    n.metadata
                        .annotations
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|(k, _)| k.starts_with("regmirror.io/"))
                        .collect(),
                )
            })
            .collect()
    }

    /// Why the cluster has not converged on `manifests`, if it has not: every node Applied
    /// with current == desired, every mirror of `manifests` (and no other) Ready for its
    /// generation, every host root's files equal to `regmirror render` for that node.
    async fn not_converged(&self, manifests: &Manifests) -> Option<String> {
        for (name, a) in self.nodes().await {
            let get = |k: &str| {
                a.get(&format!("regmirror.io/{k}"))
                    .cloned()
                    .unwrap_or_default()
            };
            if get("state") != "Applied" || get("current-config") != get("desired-config") {
                return Some(format!(
                    "node {name}: state {:?}, desired {:?}, current {:?}, message {:?}",
                    get("state"),
                    get("desired-config"),
                    get("current-config"),
                    get("message")
                ));
            }
        }
        let mirrors = self.mirrors_json();
        let live: BTreeSet<String> = items(&mirrors)
            .iter()
            .map(|m| m["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        if live != manifests.mirrors() {
            return Some(format!("mirrors {live:?}, want {:?}", manifests.mirrors()));
        }
        for mirror in items(&mirrors) {
            let name = mirror["metadata"]["name"].as_str().unwrap();
            if mirror["status"]["observedGeneration"] != mirror["metadata"]["generation"]
                || condition(&mirror, "Ready")["status"] != "True"
            {
                return Some(format!(
                    "mirror {name}: generation {}, status {}",
                    mirror["metadata"]["generation"], mirror["status"]
                ));
            }
        }
        self.files_differ(manifests)
    }

    /// Waits until the cluster has converged on `manifests` (see [`System::not_converged`]);
    /// then every mirror is Current for kstatus and Healthy for Argo CD.
    async fn converge(&self, manifests: &Manifests, when: &str) {
        let started = Instant::now();
        let mut why = String::new();
        while started.elapsed() < CONVERGE {
            match self.not_converged(manifests).await {
                None => {
                    let mirrors = self.mirrors_json();
                    for mirror in manifests.mirrors() {
                        self.expect_health(&mirrors, &mirror, "Current", "Healthy", when);
                    }
                    eprintln!("{when}: converged in {:?}", started.elapsed());
                    return;
                }
                Some(reason) => why = reason,
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.fail(&format!("{when}: not converged within {CONVERGE:?}: {why}"))
            .await
    }

    /// Waits until `mirror`'s status is about its generation and says it is rolling out
    /// (Progressing=True); returns that JSON.
    async fn rolling_out(&self, mirror: &str, when: &str) -> Value {
        let started = Instant::now();
        loop {
            let mirrors = self.mirrors_json();
            let m = mirror_of(&mirrors, mirror);
            if m["status"]["observedGeneration"] == m["metadata"]["generation"]
                && condition(&m, "Progressing")["status"] == "True"
            {
                return mirrors;
            }
            if started.elapsed() > Duration::from_secs(60) {
                self.fail(&format!(
                    "{when}: {mirror} never reported Progressing=True: {}",
                    m["status"]
                ))
                .await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The restart log's length, to look at what comes after.
    fn restart_mark(&self) -> usize {
        std::fs::read_to_string(&self.restart_log).unwrap().len()
    }

    /// Restarts logged after `mark`: (time, node, "start" | "end").
    fn restarts_since(&self, mark: usize) -> Vec<(f64, String, String)> {
        let text = std::fs::read_to_string(&self.restart_log).unwrap();
        text[mark..]
            .lines()
            .map(|l| {
                let mut f = l.split_whitespace();
                let t: f64 = f.next().unwrap().parse().unwrap();
                (
                    t,
                    f.next().unwrap().to_owned(),
                    f.next().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// The whole restart log so far keeps the budget: never more than `maxUnavailable` nodes
    /// inside their restart at once, never two control-plane nodes. Returns restarts per
    /// node after `mark`.
    fn check_restarts(&self, mark: usize, when: &str) -> BTreeMap<String, usize> {
        self.check_restarts_at_once(mark, when).0
    }

    /// [`System::check_restarts`], and the most nodes restarting at once after `mark`.
    fn check_restarts_at_once(&self, mark: usize, when: &str) -> (BTreeMap<String, usize>, usize) {
        let all = self.restarts_since(0);
        let before_mark = all.len() - self.restarts_since(mark).len();
        let mut most = 0;
        let control_plane: BTreeSet<String> = self
            .agents
            .iter()
            .filter(|a| a.spec.control_plane())
            .map(|a| a.spec.name.to_owned())
            .collect();
        let mut inside: BTreeSet<String> = BTreeSet::new();
        for (i, (t, node, what)) in all.iter().enumerate() {
            match what.as_str() {
                "start" => {
                    assert!(
                        inside.insert(node.clone()),
                        "{when}: {node} restarted while restarting, at {t}"
                    );
                }
                "end" => {
                    inside.remove(node);
                }
                other => panic!("restart log: {other}"),
            }
            if i >= before_mark {
                most = most.max(inside.len());
            }
            let cp: Vec<&String> = inside
                .iter()
                .filter(|n| control_plane.contains(*n))
                .collect();
            assert!(
                inside.len() <= MAX_UNAVAILABLE && cp.len() <= 1,
                "{when}: at {t} restarting at once: {inside:?} (maxUnavailable {MAX_UNAVAILABLE}, control plane {cp:?}); the log:\n{}",
                std::fs::read_to_string(&self.restart_log).unwrap()
            );
        }
        let mut counts = BTreeMap::new();
        for (_, node, what) in self.restarts_since(mark) {
            if what == "start" {
                *counts.entry(node).or_insert(0) += 1;
            }
        }
        (counts, most)
    }

    /// Waits until a restart starts after `mark`.
    async fn first_restart_after(&self, mark: usize, when: &str) -> String {
        let started = Instant::now();
        loop {
            if let Some((_, node, _)) = self.restarts_since(mark).into_iter().next() {
                return node;
            }
            if started.elapsed() > Duration::from_secs(60) {
                self.fail(&format!("{when}: no k3s restart began within 60 s"))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn pull(&self) -> regmirror_testbed::Pull {
        let hosts_dir = self.agent("ctrd-1").root.join("etc/containerd/certs.d");
        self.containerd.pull(&hosts_dir, &self.image)
    }

    /// Fails after printing what the cluster and the processes say.
    async fn fail(&self, message: &str) -> ! {
        eprintln!("---- system test failed: {message}");
        for (name, a) in self.nodes().await {
            eprintln!("node {name}: {a:?}");
        }
        let mirrors = self.mirrors_json();
        for m in items(&mirrors) {
            eprintln!(
                "mirror {}: generation {} status {}",
                m["metadata"]["name"], m["metadata"]["generation"], m["status"]
            );
        }
        eprintln!(
            "restart log:\n{}",
            std::fs::read_to_string(&self.restart_log).unwrap_or_default()
        );
        for (id, p) in &self.operators {
            eprintln!("---- {id} ({}):\n{}", p.log.display(), log_tail(&p.log, 25));
        }
        for a in &self.agents {
            eprintln!(
                "---- {} ({}):\n{}",
                a.proc.name,
                a.proc.log.display(),
                log_tail(&a.proc.log, 12)
            );
        }
        panic!("{message}");
    }
}

impl Drop for System {
    fn drop(&mut self) {
        self.heartbeat_stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
        self.operators.clear();
        for agent in &self.agents {
            if let Some(pid) = agent.k3s_pid_file().and_then(|f| pid_in(&f)) {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
        self.agents.clear();
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!("system test files kept in {}", dir.keep().display());
            }
        }
    }
}

/// One node's agent: a Pod of the agent's DaemonSet on the node (no kubelet runs it), and the
/// real `regmirror-agent run` with a token bound to that Pod — so the token names the node, as
/// a real agent's does — its host root under `dir`, and for k3s a restart command.
async fn start_agent(
    plane: &ControlPlane,
    bins: &Binaries,
    spec: NodeSpec,
    dir: &Path,
    restart_log: &Path,
    verify_endpoints: bool,
) -> Agent {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let pods: Api<Pod> = Api::namespaced(client(plane.kubeconfig_path()).await, NS);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("regmirror-agent-{}", spec.name), "namespace": NS,
                     "labels": {"app.kubernetes.io/component": "agent"}},
        "spec": {"nodeName": spec.name, "serviceAccountName": "regmirror-agent",
                 "automountServiceAccountToken": false,
                 "containers": [{"name": "agent", "image": "regmirror-agent:system-test"}]},
    }))
    .unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    let token = plane
        .token(
            NS,
            "regmirror-agent",
            &TokenOptions {
                bound_pod: Some(pod),
                ..TokenOptions::default()
            },
        )
        .await;
    let kubeconfig = plane.token_kubeconfig(&format!("agent-{}", spec.name), &token);
    let mut command = Command::new(&bins.agent);
    command
        .arg("--root")
        .arg(&root)
        .arg("run")
        .args(["--flavor", spec.flavor.as_str()])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--ready-timeout", "60"])
        .env("KUBECONFIG", &kubeconfig)
        .env("NODE_NAME", spec.name)
        .env("POD_NAMESPACE", NS)
        .env("REGMIRROR_VERIFY_ENDPOINTS", verify_endpoints.to_string())
        .env("RUST_LOG", "info");
    if spec.flavor == Flavor::K3s {
        let script = dir.join("restart-k3s.sh");
        std::fs::write(&script, restart_script(spec.name, dir, restart_log)).unwrap();
        command
            .arg("--restart-command")
            .arg(format!("sh {}", script.display()));
    }
    let proc = Proc::spawn(
        &format!("agent {}", spec.name),
        &mut command,
        &dir.join("agent.log"),
    );
    Agent {
        spec,
        root,
        dir: dir.to_owned(),
        proc,
    }
}

/// An operator replica, `regmirror controller` with the operator ServiceAccount's kubeconfig;
/// its log is `<dir>/<identity>.log`.
fn start_operator(
    bins: &Binaries,
    kubeconfig: &Path,
    identity: &str,
    max_unavailable: usize,
    dir: &Path,
) -> Proc {
    let mut command = install::operator_command(
        &bins.regmirror,
        kubeconfig,
        NS,
        identity,
        &max_unavailable.to_string(),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
    );
    Proc::spawn(identity, &mut command, &dir.join(format!("{identity}.log")))
}

/// A client of `kubeconfig` whose requests give up after seconds, not minutes: a control plane
/// that stops answering fails the test instead of hanging it.
async fn client(kubeconfig: &Path) -> kube::Client {
    let file = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .unwrap();
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(Duration::from_secs(30));
    config.write_timeout = Some(Duration::from_secs(30));
    kube::Client::try_from(config).unwrap()
}

fn node_labels(spec: &NodeSpec) -> BTreeMap<String, String> {
    let mut labels = spec.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), spec.name.into());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels
}

fn items(list: &Value) -> Vec<Value> {
    list["items"].as_array().cloned().unwrap_or_default()
}

fn mirror_of(list: &Value, name: &str) -> Value {
    items(list)
        .into_iter()
        .find(|m| m["metadata"]["name"] == name)
        .unwrap_or(Value::Null)
}

fn condition(mirror: &Value, type_: &str) -> Value {
    mirror["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_).cloned())
        .unwrap_or(Value::Null)
}

/// Every file under `dir`, by path relative to `root` (with a leading `/`): content and mode.
fn tree(dir: &Path, root: &Path) -> BTreeMap<String, (String, u32)> {
    let mut files = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            files.extend(tree(&path, root));
        } else {
            let relative = format!("/{}", path.strip_prefix(root).unwrap().display());
            let content = std::fs::read_to_string(&path).unwrap_or_else(|_| "<not text>".into());
            files.insert(relative, (content, meta.permissions().mode() & 0o7777));
        }
    }
    files
}

/// Polls `check` every 200 ms until it returns `Some`, for at most `timeout`.
async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    check: impl Fn() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts a node's "k3s": a process of its own (not this test's child), its pid in `pid_file`.
fn start_fake_k3s(pid_file: &Path) {
    run_ok(Command::new("sh").arg("-c").arg(format!(
        "sleep 3600 </dev/null >/dev/null 2>&1 & echo $! > {}",
        pid_file.display()
    )));
}

/// The k3s node's restart command: logs start and end with a timestamp, stops its "k3s", keeps
/// it down a moment and starts it again.
fn restart_script(node: &str, dir: &Path, log: &Path) -> String {
    let pid = dir.join("k3s.pid");
    format!(
        "set -e\n\
         echo \"$(date +%s.%N) {node} start\" >> {log}\n\
         kill \"$(cat {pid})\" 2>/dev/null || true\n\
         sleep {K3S_DOWN}\n\
         sleep 3600 </dev/null >/dev/null 2>&1 &\n\
         echo $! > {pid}\n\
         echo \"$(date +%s.%N) {node} end\" >> {log}\n",
        log = log.display(),
        pid = pid.display(),
    )
}

/// The kubelets: every two seconds each Node gets a Ready condition with a fresh heartbeat —
/// except a k3s node whose "k3s" is down (its kubelet runs inside k3s) — and Pods on these
/// nodes that are being deleted are removed.
fn spawn_kubelets(
    kubeconfig: PathBuf,
    nodes: Vec<(String, Option<PathBuf>)>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let client = client(&kubeconfig).await;
            let api: Api<Node> = Api::all(client.clone());
            let pods: Api<Pod> = Api::all(client);
            let ours: BTreeSet<String> = nodes.iter().map(|(n, _)| n.clone()).collect();
            let since = k8s_openapi::jiff::Timestamp::now()
                .round(k8s_openapi::jiff::Unit::Second)
                .unwrap()
                .to_string();
            while !stop.load(Ordering::SeqCst) {
                for (name, k3s) in &nodes {
                    if let Some(pid_file) = k3s {
                        if !pid_in(pid_file).is_some_and(alive) {
                            continue;
                        }
                    }
                    let now = k8s_openapi::jiff::Timestamp::now()
                        .round(k8s_openapi::jiff::Unit::Second)
                        .unwrap()
                        .to_string();
                    let patch = json!({"status": {"conditions": [{
                        "type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "kubelet is posting ready status",
                        "lastHeartbeatTime": now, "lastTransitionTime": since,
                    }]}});
                    if let Err(e) = api
                        .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
                        .await
                    {
                        eprintln!("kubelet {name}: posting Ready failed: {e}");
                    }
                }
                // A Pod on one of these nodes that is being deleted: its kubelet would stop its
                // containers and remove it.
                if let Ok(list) = pods.list(&Default::default()).await {
                    for pod in list.items {
                        let on_ours = pod
                            .spec
                            .as_ref()
                            .and_then(|s| s.node_name.as_ref())
                            .is_some_and(|n| ours.contains(n));
                        if on_ours && pod.metadata.deletion_timestamp.is_some() {
                            let namespaced: Api<Pod> = Api::namespaced(
                                pods.clone().into_client(),
                                pod.metadata.namespace.as_deref().unwrap_or_default(),
                            );
                            let _ = namespaced
                                .delete(
                                    pod.metadata.name.as_deref().unwrap_or_default(),
                                    &kube::api::DeleteParams::default().grace_period(0),
                                )
                                .await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    })
}

/// `work`, or a failure after `limit` (dropping `work` first, which stops its processes).
async fn within<T>(limit: Duration, what: &str, work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

// ------------------------------------------------------------------------------ the test

#[test]
fn the_whole_system_as_processes() {
    let _serial = one_at_a_time();
    let started = Instant::now();
    runtime().block_on(within(
        Duration::from_secs(1200),
        "the system test",
        async {
            let mut system = System::start().await;
            let examples = loopback_examples(&system.hosts);
            let mut stage = Instant::now();
            let mut lap = |name: &str| {
                eprintln!("==== stage {name}: {:?}", stage.elapsed());
                stage = Instant::now();
            };

            examples_converge_and_pull_through_the_mirror(&system, &examples).await;
            lap("examples");
            let rotated = with_password(&examples, "rotated-pa55");
            leader_killed_mid_rollout(&mut system, &rotated).await;
            lap("rotation, leader SIGKILLed");
            operator_restarted_mid_rollout(&mut system, &examples).await;
            lap("rotation back, operator restarted");
            broken_endpoint_fails_rolls_back_and_halts(&system, &examples).await;
            lap("broken endpoint");
            let paused = paused_mirror_holds_its_rollout(&system, &examples).await;
            lap("pause");
            let relabelled = relabelled_nodes_move_to_their_new_config(&mut system, &paused).await;
            lap("relabel");
            deleted_mirrors_leave_the_hosts(&system, &relabelled).await;
            lap("delete");
        },
    ));
    eprintln!("system test: {:?}", started.elapsed());
}

/// `examples/` applied: every node converges, each mirror Ready for its generation (InProgress
/// and Progressing while k3s nodes restart for the credentials), the files on each host equal
/// `regmirror render`; containerd pulls through the mirror with the CA and credentials.
async fn examples_converge_and_pull_through_the_mirror(system: &System, examples: &Manifests) {
    let mark = system.restart_mark();
    let before = system.pull();
    assert!(
        !before.ok,
        "a pull before any mirror must fail (the upstream does not answer): {}",
        before.output
    );
    system.apply(examples);
    let rolling = system
        .rolling_out("docker-hub", "examples rolling out")
        .await;
    system.expect_health(
        &rolling,
        "docker-hub",
        "InProgress",
        "Progressing",
        "examples rolling out",
    );
    system.converge(examples, "examples").await;
    let (restarts, most) = system.check_restarts_at_once(mark, "examples");
    assert_eq!(
        most, MAX_UNAVAILABLE,
        "at some point the rollout used its whole restart budget (else the budget check proves little)"
    );
    for agent in &system.agents {
        let want = usize::from(agent.spec.flavor == Flavor::K3s);
        assert_eq!(
            restarts.get(agent.spec.name).copied().unwrap_or(0),
            want,
            "restarts for the first config with credentials: {restarts:?}"
        );
    }
    let pulled = system.pull();
    assert!(
        pulled.ok,
        "ctrd-1 pulls {} through the mirror: {}",
        system.image, pulled.output
    );
    // quay's endpoint is the mirror under /v2/quay (override_path).
    let quay_image = format!("{}/library/hello:v1", system.hosts.quay);
    let hosts_dir = system.agent("ctrd-1").root.join("etc/containerd/certs.d");
    let pulled = system.containerd.pull(&hosts_dir, &quay_image);
    assert!(
        pulled.ok,
        "ctrd-1 pulls {quay_image} through the mirror's /v2/quay: {}",
        pulled.output
    );
}

/// A rotated password: k3s nodes restart for it, at most maxUnavailable at once and one
/// control-plane node at a time. The leader is SIGKILLed in the middle; the other replica
/// takes the Lease once it has expired and finishes without restarting any node twice. The
/// containerd node then sends the new password (which the registry refuses).
async fn leader_killed_mid_rollout(system: &mut System, rotated: &Manifests) {
    let mark = system.restart_mark();
    let leader = system.leader().await;
    system.apply(rotated);
    system.first_restart_after(mark, "rotation").await;
    let leases: Api<Lease> = Api::namespaced(system.client().await, NS);
    let before = wait_for("the Lease", Duration::from_secs(10), || async {
        leases.get(LEASE).await.ok()?.spec
    })
    .await;
    system.operator(&leader).signal("-KILL");
    let killed = Instant::now();
    system.operator(&leader).wait_exit(Duration::from_secs(5));
    let rolling = system
        .rolling_out("docker-hub", "rotation rolling out")
        .await;
    system.expect_health(
        &rolling,
        "docker-hub",
        "InProgress",
        "Progressing",
        "rotation rolling out",
    );
    let (successor, lease) = wait_for(
        "another replica takes the Lease",
        LEASE_DURATION + LEASE_RETRY + Duration::from_secs(10),
        || async {
            let spec = leases.get(LEASE).await.ok()?.spec?;
            let holder = spec
                .holder_identity
                .clone()
                .filter(|h| *h != leader && !h.is_empty())?;
            Some((holder, spec))
        },
    )
    .await;
    let takeover = killed.elapsed();
    let renewed = before.renew_time.map(|t| t.0);
    let acquired = lease.acquire_time.map(|t| t.0);
    let gap = match (renewed, acquired) {
        (Some(r), Some(a)) => Duration::try_from(a.duration_since(r)).unwrap_or_default(),
        other => panic!("the Lease has renewTime and acquireTime: {other:?}"),
    };
    eprintln!(
        "leader {leader} SIGKILLed; {successor} took the Lease {takeover:?} later, acquiring it {gap:?} after the last renewal the test saw"
    );
    // Never before the lease expired: that would make two leaders. (A renewal after the test
    // read the Lease only makes the measured gap longer.)
    assert!(
        gap >= LEASE_DURATION && gap <= LEASE_DURATION + LEASE_RETRY,
        "{successor} acquired the Lease {gap:?} after {leader}'s last renewal: not within [{LEASE_DURATION:?}, {:?}]",
        LEASE_DURATION + LEASE_RETRY
    );
    assert!(
        takeover <= LEASE_DURATION + LEASE_RETRY,
        "takeover {takeover:?} after the kill: more than the lease duration {LEASE_DURATION:?} and one retry {LEASE_RETRY:?}"
    );
    system.start_operator();
    system
        .converge(rotated, "rotation after the leader was killed")
        .await;
    let restarts = system.check_restarts(mark, "rotation after the leader was killed");
    for agent in system
        .agents
        .iter()
        .filter(|a| a.spec.flavor == Flavor::K3s)
    {
        assert_eq!(
            restarts.get(agent.spec.name).copied(),
            Some(1),
            "every k3s node restarts exactly once for a rotation, leader killed or not: {restarts:?}"
        );
    }
    let pulled = system.pull();
    assert!(
        !pulled.ok && pulled.output.contains("401"),
        "ctrd-1 now sends the rotated password, which the registry refuses: {}",
        pulled.output
    );
}

/// The password rotated back; both replicas stopped mid-rollout (SIGTERM) and nothing moves
/// while they are away; two new replicas resume the rollout, no node restarts twice, and the
/// pull works again.
async fn operator_restarted_mid_rollout(system: &mut System, examples: &Manifests) {
    let mark = system.restart_mark();
    let told_before = system.nodes().await;
    system.apply(examples);
    system.first_restart_after(mark, "rotation back").await;
    let leader = system.leader().await;
    let ids: Vec<String> = system.operators.iter().map(|(id, _)| id.clone()).collect();
    // The follower first, so that the leader's release hands the Lease to nobody.
    for id in ids.iter().filter(|id| **id != leader).chain([&leader]) {
        let operator = system.operator(id);
        if operator.running() {
            operator.signal("-TERM");
            operator.wait_exit(Duration::from_secs(20));
        }
    }
    let stopped = Instant::now();
    // While no operator runs, the nodes told before the stop finish; nobody else is told.
    let moving: Vec<String> = system
        .nodes()
        .await
        .into_iter()
        .filter(|(name, a)| {
            a.get("regmirror.io/desired-config")
                != told_before[name].get("regmirror.io/desired-config")
        })
        .map(|(name, _)| name)
        .collect();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let after = system.nodes().await;
    for (name, a) in &after {
        if !moving.contains(name) {
            assert_eq!(
                a.get("regmirror.io/desired-config"),
                told_before[name].get("regmirror.io/desired-config"),
                "{name} was told something while no operator ran"
            );
        }
    }
    assert!(
        moving.len() < system.agents.len(),
        "the rollout was over before the operator stopped ({moving:?} moved): the test did not stop it mid-rollout"
    );
    eprintln!(
        "operator stopped {:?} with {moving:?} told; starting two replicas",
        stopped.elapsed()
    );
    system.operators.clear();
    system.start_operator();
    system.start_operator();
    system
        .converge(examples, "rotation back after the operator restarted")
        .await;
    let restarts = system.check_restarts(mark, "rotation back after the operator restarted");
    for agent in system
        .agents
        .iter()
        .filter(|a| a.spec.flavor == Flavor::K3s)
    {
        assert_eq!(
            restarts.get(agent.spec.name).copied(),
            Some(1),
            "every k3s node restarts exactly once, operator restarted or not: {restarts:?}"
        );
    }
    let pulled = system.pull();
    assert!(pulled.ok, "the original password again: {}", pulled.output);
}

/// A mirror whose only endpoint does not answer: the first nodes told fail their check and
/// roll back (the host files are the previous config again), the rollout halts (the other k3s
/// nodes are never told), the mirror is Degraded, kstatus says Failed and Argo CD Degraded.
/// Deleting it brings everything back.
async fn broken_endpoint_fails_rolls_back_and_halts(system: &System, examples: &Manifests) {
    let mark = system.restart_mark();
    let told_before = system.nodes().await;
    let mut broken = examples.clone();
    let dead = "127.0.0.2"; // port 443 there: nothing listens
    let upstream = format!("127.0.0.1:{}", dead_port());
    broken.files.insert(
        "broken.yaml".into(),
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: broken-pull\n  namespace: {NS}\n  annotations:\n    regmirror.io/allowed-hosts: \"{dead}\"\ntype: kubernetes.io/basic-auth\nstringData:\n  username: someone\n  password: whatever\n---\napiVersion: regmirror.io/v1alpha1\nkind: RegistryMirror\nmetadata:\n  name: broken\nspec:\n  registry: \"{upstream}\"\n  endpoints:\n    - url: https://{dead}\n      auth:\n        secretRef: {{name: broken-pull}}\n"
        ),
    );
    system.apply(&broken);
    let failed: BTreeSet<&str> = ["cp-1", "k3s-1", "ctrd-1", "ctrd-2"].into();
    let held: BTreeSet<&str> = ["cp-2", "k3s-2"].into();
    let started = Instant::now();
    let mut held_told: BTreeMap<&str, BTreeSet<Option<String>>> = BTreeMap::new();
    let degraded = loop {
        let nodes = system.nodes().await;
        for name in &held {
            held_told
                .entry(*name)
                .or_default()
                .insert(nodes[*name].get("regmirror.io/desired-config").cloned());
        }
        let all_failed = failed
            .iter()
            .all(|n| nodes[*n].get("regmirror.io/state").map(String::as_str) == Some("Failed"));
        let mirrors = system.mirrors_json();
        let m = mirror_of(&mirrors, "broken");
        if all_failed && condition(&m, "Degraded")["status"] == "True" {
            break mirrors;
        }
        if started.elapsed() > Duration::from_secs(120) {
            system
                .fail("the broken mirror's nodes did not fail, or it is not Degraded")
                .await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let m = mirror_of(&degraded, "broken");
    assert_eq!(
        condition(&m, "Degraded")["reason"],
        "NodesFailed",
        "{}",
        m["status"]
    );
    assert_eq!(condition(&m, "Ready")["status"], "False");
    system.expect_health(&degraded, "broken", "Failed", "Degraded", "broken endpoint");
    // The spread stays halted a while longer.
    for _ in 0..20 {
        let nodes = system.nodes().await;
        for name in &held {
            held_told
                .entry(*name)
                .or_default()
                .insert(nodes[*name].get("regmirror.io/desired-config").cloned());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for name in &held {
        assert_eq!(
            held_told[*name],
            BTreeSet::from([told_before[*name]
                .get("regmirror.io/desired-config")
                .cloned()]),
            "{name} was told the broken config after other nodes failed on it"
        );
    }
    let nodes = system.nodes().await;
    for name in &failed {
        let a = &nodes[*name];
        assert_eq!(
            a.get("regmirror.io/current-config"),
            told_before[*name].get("regmirror.io/current-config"),
            "{name} runs its previous config again: {a:?}"
        );
        assert!(
            a.get("regmirror.io/message")
                .is_some_and(|m| m.contains("failed") && m.contains("restored")),
            "{name} says it failed and restored the previous config: {a:?}"
        );
    }
    if let Some(why) = system.files_differ(examples) {
        system.fail(&format!("after the rollback: {why}")).await;
    }
    let restarts = system.check_restarts(mark, "broken endpoint");
    eprintln!("broken endpoint: restarts {restarts:?}");
    for name in ["cp-1", "k3s-1"] {
        assert_eq!(
            restarts.get(name),
            Some(&2),
            "{name}: a restart to apply, one to roll back: {restarts:?}"
        );
    }
    for name in &held {
        assert_eq!(
            restarts.get(*name),
            None,
            "{name} was never told, so never restarted: {restarts:?}"
        );
    }
    run_ok(
        system
            .kubectl()
            .args(["delete", "registrymirror", "broken"]),
    );
    run_ok(
        system
            .kubectl()
            .args(["delete", "secret", "-n", NS, "broken-pull"]),
    );
    system.converge(examples, "broken mirror deleted").await;
}

/// A paused mirror's change reaches no node (its status says Paused: InProgress for kstatus,
/// Progressing for Argo CD); resumed, it rolls out.
async fn paused_mirror_holds_its_rollout(system: &System, examples: &Manifests) -> Manifests {
    run_ok(system.kubectl().args([
        "annotate",
        "registrymirror",
        "docker-hub",
        "regmirror.io/paused=true",
    ]));
    let told_before = system.nodes().await;
    let mut changed = examples.clone();
    let text = changed.files.get_mut("docker-hub.yaml").unwrap();
    // A second mirror endpoint (down: a warning, not a failure, while the first answers).
    let last = format!("    - url: https://{}", system.hosts.docker_hub);
    assert!(text.contains(&last), "{text}");
    *text = text.replace(&last, &format!("    - url: https://127.0.0.2\n{last}"));
    system.apply(&changed);
    let started = Instant::now();
    let paused = loop {
        let mirrors = system.mirrors_json();
        let m = mirror_of(&mirrors, "docker-hub");
        if m["status"]["observedGeneration"] == m["metadata"]["generation"]
            && condition(&m, "Ready")["reason"] == "Paused"
        {
            break mirrors;
        }
        if started.elapsed() > Duration::from_secs(30) {
            system
                .fail(&format!("docker-hub never said Paused: {}", m["status"]))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    system.expect_health(&paused, "docker-hub", "InProgress", "Progressing", "paused");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let nodes = system.nodes().await;
    for (name, a) in &nodes {
        assert_eq!(
            a.get("regmirror.io/desired-config"),
            told_before[name].get("regmirror.io/desired-config"),
            "{name} was told a paused mirror's change"
        );
    }
    if let Some(why) = system.files_differ(examples) {
        system.fail(&format!("while paused: {why}")).await;
    }
    run_ok(system.kubectl().args([
        "annotate",
        "registrymirror",
        "docker-hub",
        "regmirror.io/paused-",
    ]));
    system.converge(&changed, "resumed").await;
    let pulled = system.pull();
    assert!(
        pulled.ok,
        "the first endpoint still answers: {}",
        pulled.output
    );
    changed
}

/// A mirror for `pool=edge-b` reaches no node until nodes are relabelled into that pool; then
/// exactly those nodes get it, the others keep what they have.
async fn relabelled_nodes_move_to_their_new_config(
    system: &mut System,
    manifests: &Manifests,
) -> Manifests {
    let mut with_edge = manifests.clone();
    let upstream = format!("127.0.0.1:{}", dead_port());
    with_edge.files.insert(
        "edge-b.yaml".into(),
        format!(
            "apiVersion: regmirror.io/v1alpha1\nkind: RegistryMirror\nmetadata:\n  name: edge-b\nspec:\n  registry: \"{upstream}\"\n  endpoints:\n    - url: https://{}\n      auth:\n        secretRef: {{name: mirror-pull}}\n      tls:\n        caRef:\n          configMapRef: {{name: registry-ca}}\n  nodeSelector:\n    matchLabels: {{pool: edge-b}}\n",
            system.hosts.mirror
        ),
    );
    let unchanged = system.host_files("ctrd-1");
    system.apply(&with_edge);
    system
        .converge(&with_edge, "a mirror for no node yet")
        .await;
    assert_eq!(
        system.host_files("ctrd-1"),
        unchanged,
        "a mirror for pool=edge-b reaches no node"
    );
    for name in ["ctrd-2", "k3s-2"] {
        run_ok(
            system
                .kubectl()
                .args(["label", "node", name, "pool=edge-b", "--overwrite"]),
        );
        let agent = system
            .agents
            .iter_mut()
            .find(|a| a.spec.name == name)
            .unwrap();
        agent.spec.labels.insert("pool".into(), "edge-b".into());
    }
    system.converge(&with_edge, "relabelled").await;
    for name in ["ctrd-2", "k3s-2"] {
        let files = system.host_files(name);
        assert!(
            files
                .iter()
                .any(|(p, (c, _))| p.contains(&upstream) || c.contains(&upstream)),
            "{name} got edge-b's registry {upstream}"
        );
    }
    assert_eq!(
        system.host_files("ctrd-1"),
        unchanged,
        "ctrd-1 keeps its config"
    );
    with_edge
}

/// A deleted mirror's files leave every host; with every mirror deleted, nothing of the
/// mirrors is left (k3s keeps regmirror's empty registries.yaml).
async fn deleted_mirrors_leave_the_hosts(system: &System, manifests: &Manifests) {
    let mut without_quay = manifests.clone();
    without_quay.files.remove("quay.yaml");
    run_ok(system.kubectl().args(["delete", "registrymirror", "quay"]));
    system.converge(&without_quay, "quay deleted").await;
    for agent in &system.agents {
        for (path, (content, _)) in system.host_files(agent.spec.name) {
            assert!(
                !path.contains(&system.hosts.quay) && !content.contains(&system.hosts.quay),
                "{}: {path} still names quay's registry {}",
                agent.spec.name,
                system.hosts.quay
            );
        }
    }
    let mark = system.restart_mark();
    let mut nothing = Manifests::default();
    nothing.files.insert(
        "registry-credentials.yaml".into(),
        manifests.files["registry-credentials.yaml"].clone(),
    );
    run_ok(
        system
            .kubectl()
            .args(["delete", "registrymirrors", "--all"]),
    );
    system.converge(&nothing, "every mirror deleted").await;
    for agent in &system.agents {
        let files = system.host_files(agent.spec.name);
        let left: Vec<&String> = files.keys().collect();
        match agent.spec.flavor {
            Flavor::Containerd => assert!(left.is_empty(), "{}: {left:?} left", agent.spec.name),
            Flavor::K3s => assert_eq!(
                left,
                ["/etc/rancher/k3s/registries.yaml"],
                "{}: only the empty registries.yaml is left",
                agent.spec.name
            ),
        }
    }
    let restarts = system.check_restarts(mark, "every mirror deleted");
    eprintln!("every mirror deleted: restarts {restarts:?} (credentials gone: k3s restarts)");
}

/// The tests of this file one at a time, also when a runner (nextest) starts each in a process
/// of its own: each runs a control plane and a dozen processes, and measures takeover times.
/// Held until the returned file is dropped.
fn one_at_a_time() -> std::fs::File {
    let lock = std::fs::File::create(std::env::temp_dir().join("regmirror-system-tests.lock"))
        .expect("create the lock file");
    if lock.try_lock().is_err() {
        eprintln!("waiting for another system test to finish");
        lock.lock().expect("lock the lock file");
    }
    lock
}

/// `e2e/run` against this control plane (issue 10 item 7). Nothing here runs pods, so the
/// chart's workloads never start: with `REGMIRROR_E2E_PODS=0` the script installs the chart
/// without waiting for them and says it skips their check, and this test runs what they would
/// run, as processes with the chart's ServiceAccounts — two operator replicas, and an agent per
/// Node (three k3s nodes, one of them control plane, restarted by a command), endpoint checks
/// off as the script sets them for the example hosts. Every other step of the script
/// runs unchanged: install, examples Ready, nodes Applied, the config Secret, the agent's RBAC
/// and the admission policy, an invalid mirror, rotation, deletion, uninstall (without its
/// pre-delete hook, the second step the script skips: its Job and the agents' cleanup pods need
/// a kubelet; testbed/tests/chart_on_node.rs runs it on a real node).
#[test]
fn e2e_run_against_the_control_plane() {
    let _serial = one_at_a_time();
    let started = Instant::now();
    runtime().block_on(within(Duration::from_secs(1200), "the e2e test", async {
        let bins = binaries();
        let plane = ControlPlane::start();
        let dir = tempfile::Builder::new()
            .prefix("regmirror-e2e-")
            .tempdir()
            .unwrap();
        let path = dir.path().to_owned();
        let client = client(plane.kubeconfig_path()).await;
        let specs = {
            let labels = |pairs: &[(&str, &str)]| {
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>()
            };
            // One flavor for all, as `auto` finds on a real cluster (the script expects every
            // node to get the same config): k3s, a server and two agents.
            vec![
                NodeSpec {
                    name: "e2e-server",
                    flavor: Flavor::K3s,
                    labels: labels(&[(CONTROL_PLANE_LABEL, "true")]),
                },
                NodeSpec {
                    name: "e2e-agent-1",
                    flavor: Flavor::K3s,
                    labels: labels(&[]),
                },
                NodeSpec {
                    name: "e2e-agent-2",
                    flavor: Flavor::K3s,
                    labels: labels(&[]),
                },
            ]
        };
        let nodes: Api<Node> = Api::all(client.clone());
        let mut kubelets = Vec::new();
        for spec in &specs {
            let node: Node = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": spec.name, "labels": node_labels(spec)},
            }))
            .unwrap();
            nodes.create(&PostParams::default(), &node).await.unwrap();
            let node_dir = path.join("nodes").join(spec.name);
            std::fs::create_dir_all(&node_dir).unwrap();
            let pid = (spec.flavor == Flavor::K3s).then(|| node_dir.join("k3s.pid"));
            if let Some(pid) = &pid {
                start_fake_k3s(pid);
            }
            kubelets.push((spec.name.to_owned(), pid));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let heartbeat = spawn_kubelets(
            plane.kubeconfig_path().to_owned(),
            kubelets.clone(),
            stop.clone(),
        );

        let log = path.join("e2e.log");
        let mut e2e = Proc::spawn(
            "e2e/run",
            Command::new("bash")
                .arg(repo().join("e2e/run"))
                .env("KUBECONFIG", plane.kubeconfig_path())
                .env("REGMIRROR_E2E_PODS", "0")
                .env("REGMIRROR_E2E_TIMEOUT", "180"),
            &log,
        );
        let e2e_failed = |why: &str| -> ! {
            panic!(
                "{why}; e2e/run said:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        };
        // helm install makes the ServiceAccounts; then what the pods would run starts.
        let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), NS);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let operator = accounts.get_opt("regmirror-operator").await.ok().flatten();
            let agent = accounts.get_opt("regmirror-agent").await.ok().flatten();
            if operator.is_some() && agent.is_some() {
                break;
            }
            if !e2e.running() {
                e2e_failed("e2e/run ended before helm install made the ServiceAccounts");
            }
            if Instant::now() > deadline {
                e2e_failed("no ServiceAccounts from helm install within 180 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let restart_log = path.join("restarts.log");
        std::fs::write(&restart_log, "").unwrap();
        let mut agents = Vec::new();
        for spec in specs {
            let node_dir = path.join("nodes").join(spec.name);
            agents.push(start_agent(&plane, &bins, spec, &node_dir, &restart_log, false).await);
        }
        let operator_kubeconfig = plane
            .service_account_kubeconfig(NS, "regmirror-operator", &TokenOptions::default())
            .await;
        let operators: Vec<Proc> = ["regmirror-operator-a", "regmirror-operator-b"]
            .iter()
            .map(|id| start_operator(&bins, &operator_kubeconfig, id, 1, &path))
            .collect();

        let deadline = Instant::now() + Duration::from_secs(600);
        while e2e.running() {
            if Instant::now() > deadline {
                e2e_failed("e2e/run did not finish within 600 s");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let status = e2e.child.wait().unwrap();
        let output = std::fs::read_to_string(&log).unwrap();
        eprintln!("{output}");
        if !status.success() {
            for p in &operators {
                eprintln!("---- {}:\n{}", p.name, log_tail(&p.log, 20));
            }
            for a in &agents {
                eprintln!("---- {}:\n{}", a.proc.name, log_tail(&a.proc.log, 10));
            }
            e2e_failed(&format!("e2e/run failed ({status})"));
        }
        let summary = output
            .lines()
            .find(|l| l.starts_with("e2e: "))
            .unwrap_or_else(|| e2e_failed("no summary line"));
        assert!(
            summary.contains(" passed, 0 failed, 2 skipped (need pods)"),
            "{summary}"
        );
        assert!(
            !output.contains("SKIPPED"),
            "e2e/run skipped the whole run:\n{output}"
        );
        let restarts = std::fs::read_to_string(&restart_log).unwrap();
        assert!(
            restarts.lines().any(|l| l.ends_with("e2e-server start")),
            "the k3s node restarted for the credentials: {restarts:?}"
        );
        eprintln!("e2e/run: {summary}");
        stop.store(true, Ordering::SeqCst);
        let _ = heartbeat.join();
        drop(operators);
        for agent in &agents {
            if let Some(pid) = agent.k3s_pid_file().and_then(|f| pid_in(&f)) {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }));
    eprintln!("e2e test: {:?}", started.elapsed());
}
