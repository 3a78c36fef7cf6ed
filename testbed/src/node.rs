//! A real node on this machine for a [`ControlPlane`]: kube-scheduler, and a kubelet with a
//! containerd of its own (CRI on, root, state and socket under the node's directory), pods on a
//! CNI bridge (Debian's `containernetworking-plugins`), the test-built pause image as sandbox
//! image (imported, never pulled).
//!
//! The node lives in the calling thread's network namespace, which must be a private one
//! ([`enter_private_network`], called before the control plane starts, so that the API server,
//! registries and everything else the test starts are in it too): the pod bridge, the node's
//! address ([`NODE_IP`]) and the `kubernetes` Service address ([`KUBERNETES_SERVICE_IP`], on
//! the loopback device, so pods reach the API server at its ClusterIP without kube-proxy) never
//! touch the machine's own network.
//!
//! containerd and the kubelet share a mount namespace of their own, in which the node's
//! `<host root>/etc/containerd` is bind-mounted on `/etc/containerd`: the node's containerd reads
//! `/etc/containerd/config.toml` and `config_path = "/etc/containerd/certs.d"` as a real node's
//! does, while the files are `<host root>/etc/containerd/...` on this machine (the chart's
//! `agent.hostRoot`). Every mount the kubelet and containerd make (volumes, rootfs overlays,
//! pod network namespaces) is in that namespace and goes with it.
//!
//! The node's cgroups are under a cgroup root of its own (`/regmirror-<name>-<pid>` in every
//! cgroup v1 hierarchy; the machine is cgroups v1, hence `failCgroupV1: false` and the
//! `cgroupfs` driver). Dropping the [`Node`] kills the kubelet, the scheduler, every container
//! and shim, and containerd, removes the cgroups, restores the kernel settings the kubelet
//! changes and removes the directory. If the test process dies instead, a watchdog (the mount
//! namespace's holder, leader of the node's process group) kills the group, the containers and
//! the shims.
//!
//! containerd runs under a supervisor, as a real node's runtime runs under systemd: a request
//! dropped in `<host root>/`[`SUPERVISOR_DIR`]`/requests` (the chart mounts `<hostRoot>/run/dbus`
//! into the agent pod, at `/host/run/dbus`) makes it stop containerd (SIGTERM, then wait) and
//! start it again with the same configuration in the same namespaces; pods keep running, their
//! runc shims outlive containerd. The answer goes to `answers/<request>` once containerd serves
//! the API again. `<host root>/`[`SUPERVISOR_DIR`]`/restart` is a client for `sh` that asks and
//! waits for the answer, as `systemctl restart` does: the agent's `agent.restartCommand`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::control_plane::ControlPlane;
use crate::process::{free_port, require_tool, run, run_build_script, run_ok};

/// The node's InternalIP: on the loopback device of the private network namespace.
pub const NODE_IP: &str = "10.240.0.1";
/// The pods' range, on the CNI bridge.
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The `kubernetes` Service's ClusterIP (first address of the service range), put on the
/// private namespace's loopback device so that pods reach the API server there.
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";
/// The CNI bridge's name.
const BRIDGE: &str = "regmirror-cni0";
/// The containerd supervisor's directory, under the host root: in `/run/dbus`, the host
/// directory the chart mounts for restarting the runtime.
pub const SUPERVISOR_DIR: &str = "run/dbus/containerd-supervisor";

/// The client of the supervisor (`<host root>/SUPERVISOR_DIR/restart`), for busybox `sh`.
const RESTART_CLIENT: &str = r##"# Written by the testbed node (testbed/src/node.rs): asks the node's
# containerd supervisor to restart containerd and waits for the answer, as
# `systemctl restart` waits for the unit.
# Exit 0 once containerd serves again; 1 when the supervisor reports a failure; 2 without an
# answer within 120 s.
dir=$(dirname "$0")
id="$(hostname)-$$-$(date +%s)"
printf 'restart\n' >"$dir/requests/.$id" && mv "$dir/requests/.$id" "$dir/requests/$id" || exit 1
i=0
while [ ! -e "$dir/answers/$id" ]; do
  i=$((i + 1))
  if [ "$i" -gt 600 ]; then echo "containerd supervisor: no answer within 120 s" >&2; exit 2; fi
  sleep 0.2
done
answer=$(cat "$dir/answers/$id")
rm -f "$dir/answers/$id"
echo "containerd supervisor: $answer"
[ "${answer%% *}" = restarted ]
"##;

/// Kernel settings the kubelet sets at start (`protectKernelDefaults: false`); put back when
/// the node goes.
const KUBELET_SYSCTLS: [&str; 6] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// Moves the calling thread into a new network namespace (threads and processes it starts
/// afterwards are in it too; the process's other threads are not), with the loopback device
/// up, with the node's address and the `kubernetes` ClusterIP on it.
/// Call it at the start of a test, before anything binds a port.
pub fn enter_private_network() {
    require_tool("ip");
    // SAFETY: unshare(2) with CLONE_NEWNET affects only the calling thread.
    let result = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        result,
        0,
        "unshare(CLONE_NEWNET) failed (this needs root or CAP_SYS_ADMIN): {}",
        std::io::Error::last_os_error()
    );
    for args in [
        "link set lo up".to_owned(),
        format!("addr add {KUBERNETES_SERVICE_IP}/32 dev lo"),
        // (No dummy devices in every kernel: the node's address is on loopback too; it is
        // not a loopback address, which is what the kubelet asks of a node IP.)
        format!("addr add {NODE_IP}/32 dev lo"),
    ] {
        run_ok(Command::new("ip").args(args.split_whitespace()));
    }
}

/// The images `testbed/images/build` packs (regmirror, regmirror-agent, pause): tag → image.
#[derive(Debug, Clone)]
pub struct BuiltImages {
    /// `target/images`.
    pub dir: PathBuf,
    pub images: BTreeMap<String, BuiltImage>,
}

/// One image of [`BuiltImages`].
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The name the docker-archive carries, e.g. `ghcr.io/regmirror/regmirror:0.1.0`.
    pub reference: String,
    /// A docker-archive of it.
    pub archive: PathBuf,
}

impl BuiltImages {
    /// Runs `testbed/images/build` (a no-op when nothing changed) and reads its listing;
    /// `$REGMIRROR_IMAGES_DIR`, when set, is taken as its output as it is (no build).
    pub fn build() -> BuiltImages {
        if let Some(dir) = std::env::var_os("REGMIRROR_IMAGES_DIR") {
            return Self::read(PathBuf::from(dir));
        }
        Self::read(run_build_script(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("images/build"),
        ))
    }

    fn read(dir: PathBuf) -> BuiltImages {
        let listing = std::fs::read_to_string(dir.join("images.txt"))
            .unwrap_or_else(|e| panic!("read {}/images.txt: {e}", dir.display()));
        let images = listing
            .lines()
            .map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                assert_eq!(fields.len(), 3, "images.txt line {line:?}");
                (
                    fields[0].to_owned(),
                    BuiltImage {
                        reference: fields[1].into(),
                        archive: fields[2].into(),
                    },
                )
            })
            .collect();
        BuiltImages { dir, images }
    }

    pub fn get(&self, tag: &str) -> &BuiltImage {
        self.images
            .get(tag)
            .unwrap_or_else(|| panic!("no image {tag} in {}", self.dir.display()))
    }
}

/// A node's settings.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The Node's name.
    pub name: String,
    /// Extra lines for containerd's `config.toml` (appended).
    pub containerd_config: String,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            name: "node-1".into(),
            containerd_config: String::new(),
        }
    }
}

/// A process of the node.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// The supervisor's thread and what it shares with the [`Node`].
struct Supervisor {
    stop: Arc<AtomicBool>,
    restarts: Arc<AtomicUsize>,
    fail_next: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// kube-scheduler and a kubelet with its containerd; stopped and cleaned up when dropped.
pub struct Node {
    name: String,
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    /// Shared with the supervisor, which replaces containerd's on a restart.
    daemons: Vec<Arc<Mutex<Daemon>>>,
    supervisor: Option<Supervisor>,
    holder: Option<(Child, ChildStdin)>,
    cgroup_root: String,
    sysctls: Vec<(String, String)>,
    socket: PathBuf,
    kubectl: Command,
    kubelet_port: u16,
}

impl Node {
    /// Starts kube-scheduler, containerd and a kubelet for `plane`, with the test-built pause
    /// image, and waits until the Node is Ready. The calling thread must be in the private
    /// network namespace the control plane started in ([`enter_private_network`]).
    pub fn start(plane: &ControlPlane, images: &BuiltImages, options: &NodeOptions) -> Node {
        for tool in ["containerd", "ctr", "runc", "nsenter", "unshare", "openssl"] {
            require_tool(tool);
        }
        assert!(
            Path::new("/usr/lib/cni/bridge").is_file(),
            "the CNI plugins are not installed in /usr/lib/cni: run `bash scripts/test` (it installs containernetworking-plugins)"
        );
        assert!(
            Path::new("/etc/containerd").is_dir(),
            "/etc/containerd is missing (the node's own is bind-mounted on it): install containerd (`bash scripts/test`)"
        );
        let dir = tempfile::Builder::new()
            .prefix("regmirror-node-")
            .tempdir()
            .expect("create the node directory");
        let dir_path = dir.path().to_owned();
        let bin = ControlPlane::binaries();
        for name in ["kubelet", "kube-scheduler"] {
            assert!(
                bin.join(name).is_file(),
                "{} is not built: testbed/kube/build builds it",
                bin.join(name).display()
            );
        }
        let cgroup_root = format!("/regmirror-{}-{}", options.name, std::process::id());
        let sysctls = KUBELET_SYSCTLS
            .iter()
            .map(|key| {
                let value = std::fs::read_to_string(Path::new("/proc/sys").join(key))
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                (key.to_string(), value)
            })
            .collect();
        let mut node = Node {
            name: options.name.clone(),
            dir: Some(dir),
            dir_path: dir_path.clone(),
            daemons: Vec::new(),
            supervisor: None,
            holder: None,
            cgroup_root: cgroup_root.clone(),
            sysctls,
            socket: dir_path.join("containerd/containerd.sock"),
            kubectl: plane.kubectl(),
            kubelet_port: free_port(),
        };
        node.start_in(plane, &bin, images, options);
        node
    }

    fn start_in(
        &mut self,
        plane: &ControlPlane,
        bin: &Path,
        images: &BuiltImages,
        options: &NodeOptions,
    ) {
        let dir = self.dir_path.clone();
        let root = self.host_root();
        for sub in [
            "etc/containerd/certs.d",
            "var/lib/regmirror",
            "etc/rancher",
            "cni/net.d",
            "cni/ipam",
            "containerd",
            "kubelet",
            "pod-logs",
            "pki",
        ] {
            let path = if sub.starts_with("etc") || sub.starts_with("var") {
                root.join(sub)
            } else {
                dir.join(sub)
            };
            std::fs::create_dir_all(path).unwrap();
        }
        self.make_cgroups();

        // PKI: the kubelet's and the scheduler's client certificates from the cluster CA.
        let pki = dir.join("pki");
        let ca = plane.dir().join("pki");
        client_certificate(
            &ca,
            &pki,
            "kubelet",
            &format!("/O=system:nodes/CN=system:node:{}", self.name),
        );
        client_certificate(&ca, &pki, "scheduler", "/CN=system:kube-scheduler");
        std::fs::write(
            dir.join("kubelet.kubeconfig"),
            kubeconfig(plane, &pki, "kubelet"),
        )
        .unwrap();
        std::fs::write(
            dir.join("scheduler.kubeconfig"),
            kubeconfig(plane, &pki, "scheduler"),
        )
        .unwrap();

        // The watchdog and mount namespace holder: leader of the node's process group. It
        // bind-mounts the node's /etc/containerd, says "ready", waits for its stdin to close
        // (this process dropping the node, or dying) and then kills the containers (by the
        // node's cgroups), the shims (their command lines name the node's directory), and the
        // group.
        let script = r#"
set -e
mount --bind "$NODE_ROOT/etc/containerd" /etc/containerd
echo ready
set +e
read -r _
for procs in $(find "/sys/fs/cgroup/pids$CGROUP_ROOT" -name cgroup.procs 2>/dev/null); do
  for pid in $(cat "$procs"); do kill -KILL "$pid" 2>/dev/null; done
done
for p in /proc/[0-9]*; do
  if grep -qsF -- "$NODE_DIR/containerd/" "$p/cmdline"; then kill -KILL "${p#/proc/}" 2>/dev/null; fi
done
kill -KILL 0
"#;
        let mut holder = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
            ])
            .env("NODE_ROOT", &root)
            .env("NODE_DIR", &dir)
            .env("CGROUP_ROOT", &self.cgroup_root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .expect("start the node's mount namespace (unshare)");
        let stdin = holder.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "the node's mount namespace did not start"
        );
        let holder_pid = holder.id();
        self.holder = Some((holder, stdin));

        // containerd, as a node's: /etc/containerd/config.toml (the bind mount).
        let pause = images.get("pause");
        let config = format!(
            r#"version = 2
root = "{dir}/containerd/root"
state = "{dir}/containerd/state"
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = "{dir}/containerd/debug.sock"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  # A score below containerd's own needs CAP_SYS_RESOURCE, which a machine (or a CI
  # container) may not grant: the sandboxes' -998 would fail in runc.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{dir}/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "/etc/containerd/certs.d"
{extra}"#,
            dir = dir.display(),
            socket = self.socket.display(),
            pause = pause.reference,
            extra = options.containerd_config,
        );
        std::fs::write(root.join("etc/containerd/config.toml"), config).unwrap();
        std::fs::write(
            dir.join("cni/net.d/10-regmirror.conflist"),
            serde_json::json!({
                "cniVersion": "0.4.0",
                "name": "regmirror-node",
                "plugins": [{
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": dir.join("cni/ipam"),
                    },
                }],
            })
            .to_string(),
        )
        .unwrap();
        self.spawn_in_namespace("containerd", holder_pid, Command::new("containerd"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            self.check_running();
            assert!(
                Instant::now() < deadline,
                "containerd did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        run_ok(self.ctr().args(["images", "import"]).arg(&pause.archive));
        self.start_supervisor(holder_pid);

        // kube-scheduler.
        let mut scheduler = Command::new(bin.join("kube-scheduler"));
        scheduler.args([
            format!(
                "--kubeconfig={}",
                dir.join("scheduler.kubeconfig").display()
            ),
            format!(
                "--authentication-kubeconfig={}",
                dir.join("scheduler.kubeconfig").display()
            ),
            format!(
                "--authorization-kubeconfig={}",
                dir.join("scheduler.kubeconfig").display()
            ),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", free_port()),
            "--leader-elect=false".into(),
        ]);
        self.spawn("kube-scheduler", holder_pid, scheduler);

        // The kubelet.
        std::fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        let kubelet_config = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
address: {NODE_IP}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 0
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://{socket}
imageServiceEndpoint: unix://{socket}
resolvConf: {dir}/resolv.conf
podLogsDir: {dir}/pod-logs
podCIDR: {POD_CIDR}
failSwapOn: false
protectKernelDefaults: false
serializeImagePulls: false
maxPods: 30
syncFrequency: 10s
nodeStatusUpdateFrequency: 5s
fileCheckFrequency: 20s
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
imageMinimumGCAge: 24h
localStorageCapacityIsolation: true
"#,
            cgroup_root = self.cgroup_root,
            port = self.kubelet_port,
            ca = ca.join("ca.crt").display(),
            socket = self.socket.display(),
            dir = dir.display(),
        );
        std::fs::write(dir.join("kubelet.yaml"), kubelet_config).unwrap();
        let mut kubelet = Command::new(bin.join("kubelet"));
        kubelet.args([
            format!("--config={}", dir.join("kubelet.yaml").display()),
            format!("--kubeconfig={}", dir.join("kubelet.kubeconfig").display()),
            format!("--root-dir={}", dir.join("kubelet").display()),
            format!("--hostname-override={}", self.name),
            format!("--node-ip={NODE_IP}"),
            "--v=2".into(),
        ]);
        self.spawn_in_namespace("kubelet", holder_pid, kubelet);
        self.wait_ready(Duration::from_secs(120));
    }

    /// The node's host root: the chart's `agent.hostRoot` for this node (`<root>/etc/containerd`
    /// is the node's /etc/containerd).
    pub fn host_root(&self) -> PathBuf {
        self.dir_path.join("root")
    }

    /// The node's directory (logs: `containerd.log`, `kubelet.log`, `kube-scheduler.log`).
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The Node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's containerd socket.
    pub fn containerd_socket(&self) -> &Path {
        &self.socket
    }

    /// `ctr` against the node's containerd, in the CRI's namespace `k8s.io`.
    pub fn ctr(&self) -> Command {
        let mut ctr = Command::new("ctr");
        ctr.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"]);
        ctr
    }

    /// Imports a docker-archive into the node's containerd (the CRI's namespace), as if pulled.
    pub fn import(&self, archive: &Path) {
        run_ok(self.ctr().args(["images", "import"]).arg(archive));
    }

    /// The process id of the node's containerd (a new one after each restart).
    pub fn containerd_pid(&self) -> u32 {
        self.daemons
            .iter()
            .map(|d| lock(d))
            .find(|d| d.name == "containerd")
            .map(|d| d.child.id())
            .expect("containerd runs")
    }

    /// The process ids of containerd, the kubelet and the scheduler (and the watchdog).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.daemons.iter().map(|d| lock(d).child.id()).collect();
        pids.extend(self.holder.as_ref().map(|(holder, _)| holder.id()));
        pids
    }

    /// The supervisor's client as the agent pod sees it (the chart mounts the host root's
    /// `/run/dbus` at `/host/run/dbus`): a value for `agent.restartCommand`.
    pub fn restart_command_in_agent_pod() -> String {
        format!("sh /host/{SUPERVISOR_DIR}/restart")
    }

    /// How many restarts of containerd the supervisor has done (failed requests not counted).
    pub fn containerd_restarts(&self) -> usize {
        self.supervisor
            .as_ref()
            .map_or(0, |s| s.restarts.load(Ordering::SeqCst))
    }

    /// The next restart request fails: answered as a failure (the client exits 1, as a
    /// `systemctl restart` that fails does), containerd left as it is.
    pub fn fail_next_restart(&self) {
        if let Some(supervisor) = &self.supervisor {
            supervisor.fail_next.store(true, Ordering::SeqCst);
        }
    }

    /// Starts the supervisor of containerd: a thread that takes the requests of
    /// `<host root>/SUPERVISOR_DIR/requests` one at a time.
    fn start_supervisor(&mut self, holder: u32) {
        let dir = self.host_root().join(SUPERVISOR_DIR);
        for sub in ["requests", "answers"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("restart"), RESTART_CLIENT).unwrap();
        let containerd = self
            .daemons
            .iter()
            .find(|d| lock(d).name == "containerd")
            .expect("containerd runs")
            .clone();
        let supervisor = Supervisor {
            stop: Arc::new(AtomicBool::new(false)),
            restarts: Arc::new(AtomicUsize::new(0)),
            fail_next: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        let (stop, restarts, fail_next) = (
            supervisor.stop.clone(),
            supervisor.restarts.clone(),
            supervisor.fail_next.clone(),
        );
        let socket = self.socket.clone();
        let node_dir = self.dir_path.clone();
        // The thread starts containerd again; spawned by this thread, it is in its network
        // namespace (the node's).
        let thread = std::thread::Builder::new()
            .name(format!("{}-containerd-supervisor", self.name))
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let mut requests: Vec<String> = std::fs::read_dir(dir.join("requests"))
                        .into_iter()
                        .flatten()
                        .flatten()
                        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                        .filter(|name| !name.starts_with('.'))
                        .collect();
                    requests.sort();
                    for request in requests {
                        let _ = std::fs::remove_file(dir.join("requests").join(&request));
                        let answer = if fail_next.swap(false, Ordering::SeqCst) {
                            "failed: told to fail this restart (Node::fail_next_restart)".to_owned()
                        } else {
                            match restart_containerd(&containerd, holder, &socket, &node_dir) {
                                Ok(pid) => {
                                    restarts.fetch_add(1, Ordering::SeqCst);
                                    format!("restarted containerd, now pid {pid}")
                                }
                                Err(e) => format!("failed: {e}"),
                            }
                        };
                        eprintln!("containerd supervisor: request {request}: {answer}");
                        let answers = dir.join("answers");
                        let temporary = answers.join(format!(".{request}"));
                        let _ = std::fs::write(&temporary, format!("{answer}\n"));
                        let _ = std::fs::rename(&temporary, answers.join(&request));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
            .expect("start the containerd supervisor");
        self.supervisor = Some(Supervisor {
            thread: Some(thread),
            ..supervisor
        });
    }

    /// The node's cgroup root (the kubelet's `cgroupRoot`), e.g. `/regmirror-node-1-123`.
    pub fn cgroup_root(&self) -> &str {
        &self.cgroup_root
    }

    /// Fails with the end of its log if a process of the node has exited.
    pub fn check_running(&mut self) {
        for daemon in &self.daemons {
            let mut daemon = lock(daemon);
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!(
                    "{} of node {} exited with {status}; the end of {}:\n{}",
                    daemon.name,
                    self.name,
                    daemon.log.display(),
                    log_tail(&daemon.log)
                );
            }
        }
    }

    /// Waits until the Node's Ready condition is True.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running();
            let output = run(self.kubectl_command().args([
                "get",
                "node",
                &self.name,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]));
            if String::from_utf8_lossy(&output.stdout).trim() == "True" {
                return;
            }
            if Instant::now() > deadline {
                let kubelet = self.dir_path.join("kubelet.log");
                panic!(
                    "node {} not Ready within {timeout:?} ({}); the end of {}:\n{}",
                    self.name,
                    String::from_utf8_lossy(&output.stderr),
                    kubelet.display(),
                    log_tail(&kubelet)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn kubectl_command(&self) -> Command {
        let mut command = Command::new(self.kubectl.get_program());
        for (key, value) in self.kubectl.get_envs() {
            if let Some(value) = value {
                command.env(key, value);
            }
        }
        command
    }

    fn spawn(&mut self, name: &'static str, group: u32, command: Command) {
        let daemon = spawn_daemon(&self.dir_path, name, group, command)
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        self.daemons.push(Arc::new(Mutex::new(daemon)));
    }

    /// Runs `program` in the node's mount namespace (nsenter execs it: the pid is its own).
    fn spawn_in_namespace(&mut self, name: &'static str, holder: u32, program: Command) {
        self.spawn(name, holder, in_namespace(holder, program));
    }

    /// The v1 hierarchies the kubelet uses, each with the node's cgroup root in it.
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        for entry in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten() {
            let path = entry.unwrap().path();
            if path.file_name().is_some_and(|n| n == "unified") {
                continue;
            }
            if path.join("cgroup.procs").is_file() {
                dirs.push(path.join(self.cgroup_root.trim_start_matches('/')));
            }
        }
        dirs
    }

    fn make_cgroups(&self) {
        for dir in self.cgroup_dirs() {
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("create cgroup {}: {e}", dir.display()));
            // A new cpuset has no CPUs or memory nodes until given its parent's.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let parent = dir.parent().unwrap().join(file);
                if parent.is_file() {
                    let value = std::fs::read_to_string(&parent).unwrap();
                    std::fs::write(dir.join(file), value.trim()).unwrap();
                }
            }
        }
    }

    /// Kills every process of the node: the kubelet and the scheduler, then what runs in the
    /// node's cgroups (containers), the shims, containerd, and the watchdog.
    fn kill_all(&mut self) {
        if let Some(mut supervisor) = self.supervisor.take() {
            supervisor.stop.store(true, Ordering::SeqCst);
            if let Some(thread) = supervisor.thread.take() {
                let _ = thread.join();
            }
        }
        for name in ["kubelet", "kube-scheduler"] {
            for daemon in &self.daemons {
                let mut daemon = lock(daemon);
                if daemon.name == name {
                    let _ = daemon.child.kill();
                    let _ = daemon.child.wait();
                }
            }
        }
        for _ in 0..3 {
            for dir in self.cgroup_dirs() {
                for pid in cgroup_pids(&dir) {
                    kill(pid);
                }
            }
            for pid in pids_naming(&self.dir_path.join("containerd/")) {
                kill(pid);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for daemon in &self.daemons {
            let mut daemon = lock(daemon);
            let _ = daemon.child.kill();
            let _ = daemon.child.wait();
        }
        self.daemons.clear();
        if let Some((mut holder, stdin)) = self.holder.take() {
            drop(stdin);
            let _ = holder.kill();
            let _ = holder.wait();
        }
        for pid in pids_naming(&self.dir_path.join("containerd/")) {
            kill(pid);
        }
    }

    /// Removes the node's cgroups, deepest first (retrying while killed processes go): those
    /// of the v1 hierarchies, and the one runc makes in the unified (v2) hierarchy of a hybrid
    /// machine.
    fn remove_cgroups(&self) -> Vec<String> {
        let mut left = Vec::new();
        let mut dirs = self.cgroup_dirs();
        let unified =
            Path::new("/sys/fs/cgroup/unified").join(self.cgroup_root.trim_start_matches('/'));
        if unified.is_dir() {
            dirs.push(unified);
        }
        for dir in dirs {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let mut all: Vec<PathBuf> = Vec::new();
                collect_dirs(&dir, &mut all);
                all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
                for cgroup in &all {
                    let _ = std::fs::remove_dir(cgroup);
                }
                if !dir.exists() {
                    break;
                }
                if Instant::now() > deadline {
                    left.push(dir.display().to_string());
                    break;
                }
                for pid in cgroup_pids(&dir) {
                    kill(pid);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        left
    }

    fn restore_sysctls(&self) {
        for (key, value) in &self.sysctls {
            let path = Path::new("/proc/sys").join(key);
            if !value.is_empty()
                && std::fs::read_to_string(&path)
                    .map(|v| v.trim().to_owned())
                    .ok()
                    .as_deref()
                    != Some(value.as_str())
            {
                let _ = std::fs::write(&path, value);
            }
        }
    }

    /// Stops the node now (as dropping does) and says what could not be cleaned up: cgroups
    /// left, processes left, mounts of the node's directory left in this mount namespace.
    pub fn stop(mut self) -> Vec<String> {
        self.cleanup()
    }

    fn cleanup(&mut self) -> Vec<String> {
        if self.dir.is_none()
            && self.daemons.is_empty()
            && self.holder.is_none()
            && self.supervisor.is_none()
        {
            return Vec::new();
        }
        self.kill_all();
        let mut problems: Vec<String> = self
            .remove_cgroups()
            .into_iter()
            .map(|dir| format!("cgroup {dir} is left"))
            .collect();
        self.restore_sysctls();
        let _ = run(Command::new("ip").args(["link", "del", BRIDGE]));
        for pid in pids_naming(&self.dir_path) {
            problems.push(format!("process {pid} is left"));
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = self.dir_path.display().to_string();
        for line in mounts.lines().filter(|l| l.contains(&prefix)) {
            problems.push(format!("mount left: {line}"));
        }
        if let Some(dir) = self.dir.take() {
            if std::thread::panicking() {
                eprintln!("node files kept in {}", dir.keep().display());
            } else if problems.is_empty() {
                let _ = dir.close();
            } else {
                let _ = dir.keep();
            }
        }
        problems
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let problems = self.cleanup();
        if !problems.is_empty() {
            eprintln!("node {} left behind:\n{}", self.name, problems.join("\n"));
        }
    }
}

fn lock(daemon: &Mutex<Daemon>) -> MutexGuard<'_, Daemon> {
    daemon
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts `command` in the node's process group `group`, its output appended to
/// `<node dir>/<name>.log`.
fn spawn_daemon(
    node_dir: &Path,
    name: &'static str,
    group: u32,
    mut command: Command,
) -> std::io::Result<Daemon> {
    let log = node_dir.join(format!("{name}.log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let child = command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(group as i32)
        .spawn()?;
    Ok(Daemon { name, child, log })
}

/// `program` run by nsenter in the mount and network namespaces of the node's holder.
fn in_namespace(holder: u32, program: Command) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--target={holder}"))
        .args(["--mount", "--net", "--"])
        .arg(program.get_program())
        .args(program.get_args());
    command
}

/// What the supervisor does on a request: stops containerd (SIGTERM; SIGKILL after 30 s), as
/// systemd's `KillMode=process` does (the shims, and so the pods, keep running), starts it
/// again in the node's namespaces, and waits until it serves its API. Returns its new pid.
fn restart_containerd(
    slot: &Mutex<Daemon>,
    holder: u32,
    socket: &Path,
    node_dir: &Path,
) -> Result<u32, String> {
    let mut daemon = lock(slot);
    // SAFETY: kill(2) on the node's containerd, our child.
    unsafe {
        libc::kill(daemon.child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match daemon.child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = daemon.child.kill();
                let _ = daemon.child.wait();
                break;
            }
        }
    }
    *daemon = spawn_daemon(
        node_dir,
        "containerd",
        holder,
        in_namespace(holder, Command::new("containerd")),
    )
    .map_err(|e| format!("cannot start containerd again: {e}"))?;
    let pid = daemon.child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = daemon.child.try_wait() {
            return Err(format!(
                "containerd exited with {status} after the restart; the end of {}:\n{}",
                daemon.log.display(),
                log_tail(&daemon.log)
            ));
        }
        let serves = Command::new("ctr")
            .arg("--address")
            .arg(socket)
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if serves {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            return Err("containerd does not serve its API 60 s after the restart".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    out.push(dir.to_owned());
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&entry.path(), out);
        }
    }
}

/// Every process in a cgroup or below it.
fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut all = Vec::new();
    collect_dirs(dir, &mut all);
    all.iter()
        .flat_map(|cgroup| {
            std::fs::read_to_string(cgroup.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// The processes whose command line contains `path` (the node's own directory, which nothing
/// else names).
fn pids_naming(path: &Path) -> Vec<i32> {
    let needle = path.display().to_string();
    let own = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != own)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmdline| {
                    String::from_utf8_lossy(&cmdline)
                        .replace('\0', " ")
                        .contains(&needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

fn kill(pid: i32) {
    // SAFETY: kill(2) on a process id of the node's own.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// `<name>.crt`/`<name>.key` in `out`, a client certificate for `subject` from the cluster CA
/// in `ca_dir`.
pub fn client_certificate(ca_dir: &Path, out: &Path, name: &str, subject: &str) {
    std::fs::create_dir_all(out).unwrap();
    let ext = out.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ])
            .args(["-subj", subject])
            .arg("-keyout")
            .arg(out.join(format!("{name}.key")))
            .arg("-out")
            .arg(out.join(format!("{name}.csr"))),
    );
    run_ok(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
            .arg("-in")
            .arg(out.join(format!("{name}.csr")))
            .arg("-CA")
            .arg(ca_dir.join("ca.crt"))
            .arg("-CAkey")
            .arg(ca_dir.join("ca.key"))
            .arg("-CAserial")
            .arg(out.join("ca.srl"))
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(out.join(format!("{name}.crt"))),
    );
}

fn kubeconfig(plane: &ControlPlane, pki: &Path, name: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
  - name: regmirror-test
    cluster:
      server: {server}
      certificate-authority: {ca}
users:
  - name: {name}
    user:
      client-certificate: {cert}
      client-key: {key}
contexts:
  - name: regmirror-test
    context: {{cluster: regmirror-test, user: {name}}}
current-context: regmirror-test
",
        server = plane.server(),
        ca = plane.dir().join("pki/ca.crt").display(),
        cert = pki.join(format!("{name}.crt")).display(),
        key = pki.join(format!("{name}.key")).display(),
    )
}
