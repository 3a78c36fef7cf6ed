//! A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver and
//! kube-controller-manager (and a kubectl of the same release) built from the official Go
//! modules by `testbed/kube/build` (Kubernetes and etcd versions pinned in
//! `testbed/kube/go.mod`). There is no scheduler and no kubelet: Pods are stored, not run.
//!
//! The API server runs as a production cluster's does where it matters to regmirror: client
//! certificates from a cluster CA, `Node,RBAC` authorization, the default admission plugins plus
//! `NodeRestriction` and `ValidatingAdmissionPolicy`, service-account tokens signed by the API
//! server (TokenRequest API, tokens bound to Pods). The controller manager runs every default
//! controller (garbage collector, namespaces, workloads, service accounts and their tokens, ...)
//! with one ServiceAccount per controller.
//!
//! Every port is a random free one on 127.0.0.1; every file (PKI, etcd data, logs, kubeconfigs)
//! lives in one directory. The processes form one process group and are killed when the
//! [`ControlPlane`] is dropped, and also when the process holding it dies in any way (a watchdog
//! in the group waits on a pipe from this process and kills the group when it closes), so a
//! control plane shared by the tests of one binary (a `static`, never dropped) is fine too.
//!
//! [`ControlPlaneOptions`] adds to that: more API server flags, an audit log, a chosen set of
//! controllers (a benchmark's thousands of Nodes without kubelets stay Ready when the
//! node-lifecycle controller does not run).
//!
//! ```no_run
//! # async fn example() {
//! use regmirror_testbed::{ControlPlane, TokenOptions};
//! let plane = ControlPlane::start(); // blocking; builds the binaries the first time
//! let admin = plane.client().await;
//! let agent = plane.service_account_client("ns", "agent", &TokenOptions::default()).await;
//! plane.kubectl().args(["apply", "-f", "crds/"]).status().unwrap();
//! # }
//! ```

use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::process::{free_port, require_tool, run_build_script, run_ok};

/// The ClusterIP range the API server allocates Service addresses from (only configuration:
/// nothing routes it).
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/16";
/// The issuer of service-account tokens (and their default audience).
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// How long the API server (and the controller manager after it) may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// A running etcd + kube-apiserver + kube-controller-manager; stopped when dropped.
pub struct ControlPlane {
    // Declared first so they are killed before the directory goes.
    daemons: Vec<Daemon>,
    watchdog: Option<(Child, ChildStdin)>,
    dir: Dir,
    server: String,
    kubeconfig: PathBuf,
    ca_pem: String,
    bin: PathBuf,
    audit_log: Option<PathBuf>,
}

/// What a control plane runs besides (or instead of) its defaults.
#[derive(Debug, Clone, Default)]
pub struct ControlPlaneOptions {
    /// More kube-apiserver flags, after the defaults: a flag given again replaces the
    /// default's value (a list flag adds to it).
    pub apiserver_args: Vec<String>,
    /// An audit policy (YAML of an `audit.k8s.io/v1` `Policy`). With one, the API server
    /// writes audit events as JSON lines to [`ControlPlane::audit_log`] — who made which
    /// request, which `apiserver_request_total` cannot say.
    pub audit_policy: Option<String>,
    /// kube-controller-manager's `--controllers`; empty for every default controller (`*`).
    /// `["*", "-node-lifecycle-controller"]` keeps Nodes Ready without Lease heartbeats.
    pub controllers: Vec<String>,
}

enum Dir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl Dir {
    fn path(&self) -> &Path {
        match self {
            Dir::Temp(dir) => dir.path(),
            Dir::Kept(dir) => dir,
        }
    }
}

/// A process of the control plane, killed when dropped.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Fails with the end of the process's log if it has exited.
    fn check_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited with {status}; the end of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Options of a ServiceAccount token from the TokenRequest API.
#[derive(Debug, Clone, Default)]
pub struct TokenOptions {
    /// Bind the token to this Pod (it must exist; the token then names the Pod and, if the Pod
    /// is scheduled, its Node, and dies with the Pod).
    pub bound_pod: Option<Pod>,
    /// Audiences; empty for the API server's own.
    pub audiences: Vec<String>,
    /// Lifetime; the API server's minimum is 10 minutes. `None` for one hour.
    pub expiration_seconds: Option<i64>,
}

impl ControlPlane {
    /// Starts a control plane whose files live in a temporary directory, removed on drop.
    /// Builds the binaries first if they are not built yet (see [`ControlPlane::binaries`]).
    pub fn start() -> ControlPlane {
        Self::start_with_options(&ControlPlaneOptions::default())
    }

    /// Starts a control plane (as [`ControlPlane::start`]) with `options`.
    pub fn start_with_options(options: &ControlPlaneOptions) -> ControlPlane {
        let dir = tempfile::Builder::new()
            .prefix("regmirror-control-plane-")
            .tempdir()
            .expect("create a temporary directory");
        Self::start_with(Dir::Temp(dir), options)
    }

    /// Starts a control plane whose files live in `dir` (created; kept after drop): the PKI,
    /// etcd's data, `admin.kubeconfig` and a log per process.
    pub fn start_in(dir: &Path) -> ControlPlane {
        Self::start_in_with_options(dir, &ControlPlaneOptions::default())
    }

    /// Starts a control plane (as [`ControlPlane::start_in`]) with `options`.
    pub fn start_in_with_options(dir: &Path, options: &ControlPlaneOptions) -> ControlPlane {
        std::fs::create_dir_all(dir).expect("create the control plane directory");
        Self::start_with(Dir::Kept(dir.canonicalize().unwrap()), options)
    }

    /// The directory of etcd, kube-apiserver and kube-controller-manager for this checkout:
    /// `$REGMIRROR_KUBE_BIN` if set, else what `testbed/kube/build` prints (it builds them once
    /// per pinned version, into `target/kube/<version>/bin`, and reuses them after).
    pub fn binaries() -> PathBuf {
        if let Some(dir) = std::env::var_os("REGMIRROR_KUBE_BIN") {
            return PathBuf::from(dir);
        }
        run_build_script(&Path::new(env!("CARGO_MANIFEST_DIR")).join("kube/build"))
    }

    fn start_with(dir: Dir, options: &ControlPlaneOptions) -> ControlPlane {
        require_tool("openssl");
        let bin = Self::binaries();
        let root = dir.path().to_owned();
        let pki = root.join("pki");
        make_pki(&pki);
        let apiserver_port = free_port();
        let server = format!("https://127.0.0.1:{apiserver_port}");
        let ca_pem = std::fs::read_to_string(pki.join("ca.crt")).unwrap();
        let kubeconfig = root.join("admin.kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_yaml(&server, &ca_pem, "admin", &cert_user(&pki, "admin")),
        )
        .unwrap();
        std::fs::write(
            root.join("controller-manager.kubeconfig"),
            kubeconfig_yaml(
                &server,
                &ca_pem,
                "system:kube-controller-manager",
                &cert_user(&pki, "controller-manager"),
            ),
        )
        .unwrap();

        // The group's leader: waits for this process to close the pipe (on drop, or by dying)
        // and then kills the whole group, itself included.
        let mut watchdog = Command::new("sh")
            .args(["-c", "read -r _; kill -KILL 0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the watchdog (sh)");
        let stdin = watchdog.stdin.take().unwrap();
        let group = watchdog.id() as i32;
        let mut plane = ControlPlane {
            daemons: Vec::new(),
            watchdog: Some((watchdog, stdin)),
            dir,
            server,
            kubeconfig,
            ca_pem,
            bin: bin.clone(),
            audit_log: None,
        };

        let etcd_port = free_port();
        let etcd_peer_port = free_port();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let root_arg = |file: &str| root.join(file).display().to_string();
        let pki_arg = |file: &str| pki.join(file).display().to_string();
        plane.spawn(
            "etcd",
            &bin,
            group,
            &[
                "--name=regmirror".into(),
                format!("--data-dir={}", root_arg("etcd")),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=regmirror={peer_url}"),
                // Throwaway data: no fsync, which makes a test cluster several times faster on
                // slow disks.
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
        );
        plane.wait("etcd", "listen on its client port", START_TIMEOUT, || {
            std::net::TcpStream::connect(("127.0.0.1", etcd_port)).is_ok()
        });

        let mut apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={apiserver_port}"),
            format!("--tls-cert-file={}", pki_arg("apiserver.crt")),
            format!("--tls-private-key-file={}", pki_arg("apiserver.key")),
            format!("--client-ca-file={}", pki_arg("ca.crt")),
            "--authorization-mode=Node,RBAC".into(),
            // On top of the default plugins (which include ValidatingAdmissionPolicy since
            // 1.30; named here so it is on whatever the defaults become).
            "--enable-admission-plugins=NodeRestriction,ValidatingAdmissionPolicy".into(),
            "--allow-privileged=true".into(),
            format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            format!("--service-account-key-file={}", pki_arg("sa.pub")),
            format!("--service-account-signing-key-file={}", pki_arg("sa.key")),
            format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
            format!("--cert-dir={}", root_arg("apiserver")),
            // Nothing can reach 127.0.0.1 from a Pod, and the API server refuses a loopback
            // address in the `kubernetes` Service's Endpoints: keep them empty.
            "--endpoint-reconciler-type=none".into(),
            format!(
                "--kubelet-client-certificate={}",
                pki_arg("apiserver-kubelet-client.crt")
            ),
            format!(
                "--kubelet-client-key={}",
                pki_arg("apiserver-kubelet-client.key")
            ),
            format!(
                "--requestheader-client-ca-file={}",
                pki_arg("front-proxy-ca.crt")
            ),
            "--requestheader-allowed-names=front-proxy-client".into(),
            "--requestheader-username-headers=X-Remote-User".into(),
            "--requestheader-group-headers=X-Remote-Group".into(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            format!(
                "--proxy-client-cert-file={}",
                pki_arg("front-proxy-client.crt")
            ),
            format!(
                "--proxy-client-key-file={}",
                pki_arg("front-proxy-client.key")
            ),
            "--profiling=false".into(),
        ];
        if let Some(policy) = &options.audit_policy {
            let policy_file = root.join("audit-policy.yaml");
            std::fs::write(&policy_file, policy).expect("write the audit policy");
            let log = root.join("audit.log");
            apiserver_args.extend([
                format!("--audit-policy-file={}", policy_file.display()),
                format!("--audit-log-path={}", log.display()),
                "--audit-log-format=json".into(),
                // One file, never rotated, so that readers can count from an offset (0 is
                // not "never": the log rotates at lumberjack's default of 100 MB then).
                "--audit-log-maxsize=1000000".into(),
            ]);
            plane.audit_log = Some(log);
        }
        apiserver_args.extend(options.apiserver_args.iter().cloned());
        plane.spawn("kube-apiserver", &bin, group, &apiserver_args);
        let admin = plane.kubeconfig.clone();
        plane.wait(
            "kube-apiserver",
            "become ready (/readyz)",
            START_TIMEOUT,
            move || {
                block_on(async {
                    let client = client_from(&admin).await;
                    let request = http::Request::get("/readyz").body(Vec::new()).unwrap();
                    client
                        .request_text(request)
                        .await
                        .is_ok_and(|body| body == "ok")
                })
            },
        );

        let controllers = if options.controllers.is_empty() {
            "*".to_owned()
        } else {
            options.controllers.join(",")
        };
        plane.spawn(
            "kube-controller-manager",
            &bin,
            group,
            &[
                format!("--kubeconfig={}", root_arg("controller-manager.kubeconfig")),
                format!(
                    "--authentication-kubeconfig={}",
                    root_arg("controller-manager.kubeconfig")
                ),
                format!(
                    "--authorization-kubeconfig={}",
                    root_arg("controller-manager.kubeconfig")
                ),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", free_port()),
                format!("--cert-dir={}", root_arg("controller-manager")),
                format!("--controllers={controllers}"),
                "--use-service-account-credentials=true".into(),
                format!("--service-account-private-key-file={}", pki_arg("sa.key")),
                format!("--root-ca-file={}", pki_arg("ca.crt")),
                format!("--cluster-signing-cert-file={}", pki_arg("ca.crt")),
                format!("--cluster-signing-key-file={}", pki_arg("ca.key")),
                format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
                "--leader-elect=false".into(),
                "--profiling=false".into(),
            ],
        );
        // The service-account controller's first act: every namespace gets a `default`
        // ServiceAccount. Once `default/default` exists the controllers run.
        let admin = plane.kubeconfig.clone();
        plane.wait(
            "kube-controller-manager",
            "create the default ServiceAccount",
            START_TIMEOUT,
            move || {
                block_on(async {
                    let accounts: Api<ServiceAccount> =
                        Api::namespaced(client_from(&admin).await, "default");
                    matches!(accounts.get_opt("default").await, Ok(Some(_)))
                })
            },
        );
        plane
    }

    fn spawn(&mut self, name: &'static str, bin: &Path, group: i32, args: &[String]) {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create a log file");
        let child = Command::new(bin.join(name))
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .process_group(group)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.join(name).display()));
        self.daemons.push(Daemon { name, child, log });
    }

    /// Polls `ready` every 100 ms until it holds; fails with the log of the first control
    /// plane process that exits, or of `name` at the timeout.
    fn wait(&mut self, name: &str, what: &str, timeout: Duration, ready: impl Fn() -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            for daemon in &mut self.daemons {
                daemon.check_running();
            }
            if ready() {
                return;
            }
            if Instant::now() > deadline {
                let log = self.dir.path().join(format!("{name}.log"));
                panic!(
                    "{name} did not {what} within {timeout:?}; the end of {}:\n{}",
                    log.display(),
                    log_tail(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The admin kubeconfig (user `kubernetes-admin` in group `system:masters`, certificate
    /// and CA embedded).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL, `https://127.0.0.1:<port>`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The cluster CA's certificate (PEM): it signed the API server's serving certificate and
    /// every client certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The directory of the PKI, etcd's data, the kubeconfigs and the logs
    /// (`etcd.log`, `kube-apiserver.log`, `kube-controller-manager.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The API server's audit log (JSON lines), if [`ControlPlaneOptions::audit_policy`] was
    /// given.
    pub fn audit_log(&self) -> Option<&Path> {
        self.audit_log.as_deref()
    }

    /// The process ids of etcd, kube-apiserver and kube-controller-manager.
    pub fn pids(&self) -> Vec<u32> {
        self.daemons
            .iter()
            .map(|daemon| daemon.child.id())
            .collect()
    }

    /// A client acting as the cluster admin. Call it inside a tokio runtime.
    pub async fn client(&self) -> kube::Client {
        client_from(&self.kubeconfig).await
    }

    /// `kubectl` of the same release as the API server (built with it; from PATH if
    /// `$REGMIRROR_KUBE_BIN` has none) with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        self.kubectl_with(&self.kubeconfig)
    }

    /// `kubectl` (as [`ControlPlane::kubectl`]) with `kubeconfig`, e.g. a ServiceAccount's.
    pub fn kubectl_with(&self, kubeconfig: &Path) -> Command {
        let built = self.bin.join("kubectl");
        let mut command = if built.is_file() {
            Command::new(built)
        } else {
            require_tool("kubectl");
            Command::new("kubectl")
        };
        command.env("KUBECONFIG", kubeconfig);
        command
    }

    /// A token of ServiceAccount `namespace/name` from the TokenRequest API.
    pub async fn token(&self, namespace: &str, name: &str, options: &TokenOptions) -> String {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client().await, namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(options.audiences.clone()),
                expiration_seconds: Some(options.expiration_seconds.unwrap_or(3600)),
                bound_object_ref: options.bound_pod.as_ref().map(|pod| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        let response = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/{name}: {e}"));
        response
            .status
            .and_then(|status| status.token)
            .expect("a TokenRequest answer has a token")
    }

    /// A kubeconfig (written into [`ControlPlane::dir`] as `<file_name>.kubeconfig`) that
    /// authenticates with `token`.
    pub fn token_kubeconfig(&self, file_name: &str, token: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{file_name}.kubeconfig"));
        let user = format!("token: {token}\n");
        std::fs::write(
            &path,
            kubeconfig_yaml(&self.server, &self.ca_pem, file_name, &user),
        )
        .unwrap();
        path
    }

    /// A kubeconfig of ServiceAccount `namespace/name` (a fresh TokenRequest token; see
    /// [`ControlPlane::token`]), written as `<namespace>.<name>.kubeconfig`.
    pub async fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
        options: &TokenOptions,
    ) -> PathBuf {
        let token = self.token(namespace, name, options).await;
        self.token_kubeconfig(&format!("{namespace}.{name}"), &token)
    }

    /// A client acting as ServiceAccount `namespace/name` with a TokenRequest token.
    pub async fn service_account_client(
        &self,
        namespace: &str,
        name: &str,
        options: &TokenOptions,
    ) -> kube::Client {
        let kubeconfig = self
            .service_account_kubeconfig(namespace, name, options)
            .await;
        client_from(&kubeconfig).await
    }

    /// Stops every process now (as dropping does) and keeps the directory.
    pub fn stop(mut self) -> PathBuf {
        self.kill_all();
        match std::mem::replace(&mut self.dir, Dir::Kept(PathBuf::new())) {
            Dir::Temp(dir) => dir.keep(),
            Dir::Kept(dir) => dir,
        }
    }

    fn kill_all(&mut self) {
        while let Some(daemon) = self.daemons.pop() {
            drop(daemon);
        }
        if let Some((mut watchdog, stdin)) = self.watchdog.take() {
            drop(stdin);
            let _ = watchdog.wait();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill_all();
        // A failing test keeps the logs, PKI and etcd data to look at.
        if std::thread::panicking() {
            if let Dir::Temp(dir) = std::mem::replace(&mut self.dir, Dir::Kept(PathBuf::new())) {
                eprintln!("control plane files kept in {}", dir.keep().display());
            }
        }
    }
}

/// A client from a kubeconfig file (its current context).
pub async fn client_from(kubeconfig: &Path) -> kube::Client {
    let file = Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("read {}: {e}", kubeconfig.display()));
    let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("load {}: {e}", kubeconfig.display()));
    kube::Client::try_from(config).expect("a client from the kubeconfig")
}

/// Runs a future to completion on a runtime of its own (in a thread of its own, so this works
/// inside another runtime too).
fn block_on<T: Send>(future: impl Future<Output = T> + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(future)
            })
            .join()
            .unwrap()
    })
}

/// The `user:` body of a kubeconfig user authenticating with `<name>.crt`/`<name>.key`.
fn cert_user(pki: &Path, name: &str) -> String {
    let b64 = |file: String| {
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(pki.join(file)).unwrap())
    };
    format!(
        "client-certificate-data: {}\n      client-key-data: {}\n",
        b64(format!("{name}.crt")),
        b64(format!("{name}.key"))
    )
}

fn kubeconfig_yaml(server: &str, ca_pem: &str, user: &str, credentials: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
  - name: regmirror-test
    cluster:
      server: {server}
      certificate-authority-data: {ca}
users:
  - name: {user:?}
    user:
      {credentials}contexts:
  - name: regmirror-test
    context:
      cluster: regmirror-test
      user: {user:?}
current-context: regmirror-test
"
    )
}

/// The cluster's PKI under `dir`, laid out as kubeadm's where it matters here: the cluster CA
/// (which also signs CSRs) and the front-proxy CA (request-header authentication, for
/// aggregated APIs and the controller manager's delegated authentication); the API server's
/// serving certificate for its loopback and in-cluster names, its client certificates towards
/// kubelets and as the front proxy; the service-account signing key pair; client certificates
/// of the admin (`system:masters`) and the controller manager.
fn make_pki(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let openssl = |args: &[&str]| {
        run_ok(Command::new("openssl").args(args).current_dir(dir));
    };
    let ec_key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    for (ca, subject) in [
        ("ca", "/CN=kubernetes"),
        ("front-proxy-ca", "/CN=front-proxy-ca"),
    ] {
        let args = format!(
            "req -x509 {ec_key} -days 365 -subj {subject} -keyout {ca}.key -out {ca}.crt \
             -addext basicConstraints=critical,CA:TRUE \
             -addext keyUsage=critical,keyCertSign,cRLSign,digitalSignature"
        );
        openssl(&args.split_whitespace().collect::<Vec<_>>());
    }
    let client = "extendedKeyUsage=clientAuth";
    let service_ip = "10.96.0.1"; // the first address of SERVICE_CLUSTER_IP_RANGE
    let server = format!(
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:{service_ip},\
         DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,\
         DNS:kubernetes.default.svc.cluster.local"
    );
    let certificates = [
        ("apiserver", "ca", "/CN=kube-apiserver", server.as_str()),
        (
            "apiserver-kubelet-client",
            "ca",
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            client,
        ),
        (
            "front-proxy-client",
            "front-proxy-ca",
            "/CN=front-proxy-client",
            client,
        ),
        (
            "admin",
            "ca",
            "/O=system:masters/CN=kubernetes-admin",
            client,
        ),
        (
            "controller-manager",
            "ca",
            "/CN=system:kube-controller-manager",
            client,
        ),
    ];
    for (name, ca, subject, extensions) in certificates {
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{extensions}\n"
            ),
        )
        .unwrap();
        let request = format!("req {ec_key} -subj {subject} -keyout {name}.key -out {name}.csr");
        openssl(&request.split_whitespace().collect::<Vec<_>>());
        let sign = format!(
            "x509 -req -in {name}.csr -CA {ca}.crt -CAkey {ca}.key -CAcreateserial -days 365 \
             -out {name}.crt -extfile {name}.ext"
        );
        openssl(&sign.split_whitespace().collect::<Vec<_>>());
    }
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        "sa.key",
    ]);
    openssl(&["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
    // Private keys readable by this user only (a person's dev cluster keeps them).
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "key") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
}
