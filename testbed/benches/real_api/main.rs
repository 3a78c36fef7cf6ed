//! The operator against a real API server (issue 10, "Performance"): the release
//! `regmirror controller` process, with the operator ServiceAccount's credentials and the
//! chart's RBAC, against etcd + kube-apiserver + kube-controller-manager from `testbed/kube`,
//! on the synthetic cluster of the in-memory benchmark (`Cluster::synthetic`: kubelet-sized
//! k3s Nodes in 20 pools, 50 RegistryMirrors with their own basic-auth Secrets, 10 of them for
//! every node, 40 for one pool each).
//!
//! ```sh
//! cargo bench -p regmirror-testbed --bench real_api                               # 5,000 nodes
//! REGMIRROR_BENCH_NODES=500 REGMIRROR_BENCH_SETTLE=30 cargo bench -p regmirror-testbed --bench real_api
//! ```
//!
//! Knobs (environment): `REGMIRROR_BENCH_NODES` (5000), `REGMIRROR_BENCH_SETTLE` seconds idle
//! for the settled phase (320: the operator's 5-minute resync falls into it),
//! `REGMIRROR_BENCH_MAX_UNAVAILABLE` (the operator's restart budget for the first rollout,
//! which restarts k3s on every node: "10%"), `REGMIRROR_BENCH_RESTART` seconds a simulated k3s
//! restart takes (1), `REGMIRROR_BENCH_TIMEOUT` seconds any one phase may take (3600),
//! `REGMIRROR_BENCH_KEEP=1` keeps the control plane's directory (logs, audit log, operator
//! log) instead of removing it.
//!
//! Phases: the full rollout (the 50 mirrors applied to a cluster without any), settled (idle),
//! a hot change of a mirror every node has (its endpoint's path), a hot change of a mirror of
//! one pool. For each: the operator's CPU and passes, its memory, the API requests the API
//! server counted (`apiserver_request_total`, all users) and logged (audit log: by user), and
//! how long until the last node reported the change applied.
//!
//! The Nodes' kubelets and agents are simulated in this process (see `fleet.rs`).

mod fleet;
mod measure;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::api::{Api, PostParams};
use regmirror_core::api::RegistryMirror;
use regmirror_core::contract::{FLAVOR, PUBLIC_KEY};
use regmirror_core::sources::ALLOWED_HOSTS;
use regmirror_testbed::cluster::Cluster;
use regmirror_testbed::install::{self, repo, run_ok};
use regmirror_testbed::{free_port, ControlPlane, ControlPlaneOptions, TokenOptions};

use fleet::{Agents, Kubelets};
use measure::{Audit, Mark};

const NS: &str = "regmirror-system";
const MIRRORS: usize = 50;
const POOLS: usize = 20;
/// The ServiceAccount the simulated kubelets post Node status as (so the audit log tells
/// their requests from the benchmark's own).
const KUBELETS: &str = "regmirror-bench-kubelets";
/// How often a kubelet posts its Node's status when nothing changes
/// (`nodeStatusReportFrequency`).
const STATUS_PERIOD: Duration = Duration::from_secs(300);
/// Objects created at once while setting up.
const CREATE_CONCURRENCY: usize = 32;
/// Token lifetime: longer than any run.
const TOKEN_SECONDS: i64 = 24 * 3600;

/// Every request at Metadata level (who, verb, object; no bodies), each logged once, when its
/// response is complete; nothing for non-resource URLs (health checks, discovery, metrics).
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived, ResponseStarted]
rules:
  - level: None
    nonResourceURLs: ['/*']
  - level: Metadata
";

const KUBELET_RBAC: &str = "apiVersion: v1
kind: ServiceAccount
metadata: {name: regmirror-bench-kubelets, namespace: regmirror-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: regmirror-bench-kubelets}
rules:
  - apiGroups: ['']
    resources: [nodes/status]
    verbs: [get, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: regmirror-bench-kubelets}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: regmirror-bench-kubelets}
subjects:
  - {kind: ServiceAccount, name: regmirror-bench-kubelets, namespace: regmirror-system}
";

struct Settings {
    nodes: usize,
    settle: Duration,
    max_unavailable: String,
    restart: Duration,
    timeout: Duration,
    keep: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |name: &str, default: &str| std::env::var(name).unwrap_or(default.into());
        let number = |name: &str, default: &str| -> u64 {
            var(name, default)
                .parse()
                .unwrap_or_else(|_| panic!("{name} must be a whole number"))
        };
        Settings {
            nodes: number("REGMIRROR_BENCH_NODES", "5000") as usize,
            settle: Duration::from_secs(number("REGMIRROR_BENCH_SETTLE", "320")),
            max_unavailable: var("REGMIRROR_BENCH_MAX_UNAVAILABLE", "10%"),
            restart: Duration::from_secs(number("REGMIRROR_BENCH_RESTART", "1")),
            timeout: Duration::from_secs(number("REGMIRROR_BENCH_TIMEOUT", "3600")),
            keep: var("REGMIRROR_BENCH_KEEP", "") == "1",
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; this target takes no arguments of its own.
    let settings = Settings::from_env();
    let started = Instant::now();
    let regmirror = build_operator();
    let plane = ControlPlane::start_with_options(&ControlPlaneOptions {
        audit_policy: Some(AUDIT_POLICY.into()),
        // Nodes have no Lease heartbeats here: without the node-lifecycle controller nobody
        // marks them NotReady (or taints them) for it.
        controllers: vec!["*".into(), "-node-lifecycle-controller".into()],
        ..ControlPlaneOptions::default()
    });
    eprintln!(
        "bench: control plane up after {:.0?} in {}",
        started.elapsed(),
        plane.dir().display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let reports = runtime.block_on(bench(&plane, &settings, &regmirror));
    // The simulated kubelets and agents stop before the API server does.
    runtime.shutdown_timeout(Duration::from_secs(5));
    print_summary(&settings, &reports);
    // The operator stopped with `bench`; dropping the plane stops it and removes its files.
    if settings.keep {
        eprintln!("bench: files kept in {}", plane.stop().display());
    }
}

/// The release build of the operator (and agent), as
/// `cargo build --release -p regmirror -p regmirror-node-agent` makes it, into this bench's
/// target directory; a no-op when they are fresh.
fn build_operator() -> PathBuf {
    // target/release/deps/real_api-<hash>
    let exe = std::env::current_exe().unwrap();
    let release = exe.parent().unwrap().parent().unwrap().to_owned();
    let target = release.parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_ok(
        Command::new(cargo)
            .current_dir(repo())
            .args([
                "build",
                "--release",
                "-p",
                "regmirror",
                "-p",
                "regmirror-node-agent",
            ])
            .env("CARGO_TARGET_DIR", target),
    );
    release.join("regmirror")
}

// ------------------------------------------------------------------------------ the run

/// What was measured over one phase.
struct Report {
    name: String,
    /// Nodes the phase's change reached.
    reached: usize,
    wall: Duration,
    /// From the apply to the last node reporting the change applied.
    last_applied: Option<Duration>,
    /// From the apply to the mirror(s) Ready for the new generation.
    mirrors_ready: Option<Duration>,
    start: Mark,
    end: Mark,
    audit: measure::AuditCounts,
}

async fn bench(plane: &ControlPlane, settings: &Settings, regmirror: &Path) -> Vec<Report> {
    let admin = plane.client().await;
    let cluster = Cluster::synthetic(settings.nodes, MIRRORS, POOLS, NS);
    install_regmirror(plane);
    let token = TokenOptions {
        expiration_seconds: Some(TOKEN_SECONDS),
        ..TokenOptions::default()
    };
    let kubelets = Kubelets::new(plane.service_account_client(NS, KUBELETS, &token).await);
    create_secrets(&admin, &cluster).await;
    create_nodes(&admin, &cluster, &kubelets).await;
    let names: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.metadata.name.clone().unwrap())
        .collect();
    let _kubelets = kubelets.spawn(names, STATUS_PERIOD);
    let agent_client = plane
        .service_account_client(NS, "regmirror-agent", &token)
        .await;
    let agents = Agents::start(agent_client, NS, kubelets.clone(), settings.restart);
    wait_until("every agent published its key", settings.timeout, || {
        let seen = agents.seen();
        (seen.len() == settings.nodes && seen.values().all(|s| s.has_key)).then_some(())
    })
    .await;

    quiet_controller_manager(&Audit::new(plane.audit_log().unwrap())).await;
    let operator_kubeconfig = plane
        .service_account_kubeconfig(NS, "regmirror-operator", &token)
        .await;
    let operator = Operator::start(
        regmirror,
        &operator_kubeconfig,
        &settings.max_unavailable,
        &plane.dir().join("operator.log"),
    );
    wait_until("the operator leads", settings.timeout, || {
        let metrics = measure::operator_metrics(operator.metrics);
        (measure::sample(&metrics, "regmirror_leader") == 1.0
            && measure::sample(&metrics, "regmirror_passes_total{kind=\"full\"}") >= 1.0)
            .then_some(())
    })
    .await;
    // Its first passes (the sealing key, the empty agent Role) are not part of any phase.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let run = Run {
        plane,
        admin,
        agents,
        operator,
        audit: Audit::new(plane.audit_log().expect("the audit log is on")),
        ticks: measure::ticks_per_second(),
        settings,
        cluster,
    };
    let mut reports = vec![run.full_rollout().await];
    reports.push(run.settled().await);
    reports.push(run.hot_change(0, "all nodes").await);
    reports.push(run.hot_change(POOLS / 2, "one pool").await);
    let trouble = run.agents.trouble();
    eprintln!(
        "bench: agents: {} failed Node patches, {} failed config reads, {} configs that did not open; kubelets: {} failed status posts",
        trouble.patch_failures,
        trouble.fetch_failures,
        trouble.unopenable,
        kubelets.failures.load(std::sync::atomic::Ordering::Relaxed)
    );
    reports
}

/// Waits until the controller manager is done with the new Nodes: its TTL controller
/// annotates every Node with the cache TTL for the cluster's size (and again whenever the size
/// crosses a boundary while the Nodes are created). In a running cluster that happened long
/// ago; left running into the measured phases it would add thousands of Node writes.
async fn quiet_controller_manager(audit: &Audit) {
    let started = Instant::now();
    let mut writes = 0;
    loop {
        let from = audit.offset();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = audit.between(from, audit.offset());
        let recent = measure::total(&now, "controller-manager", measure::node_write);
        if recent == 0 {
            break;
        }
        writes += recent;
    }
    eprintln!(
        "bench: the controller manager wrote {writes}+ Nodes after they were created; quiet after {:.0?}",
        started.elapsed()
    );
}

/// The CRD, the namespace, and the chart's ServiceAccounts and RBAC (not its admission
/// policy: it admits agent writes only with a Pod-bound token naming the node, and the
/// simulated agents share one token). And the simulated kubelets' ServiceAccount.
fn install_regmirror(plane: &ControlPlane) {
    install::install_crds(plane);
    install::create_namespace(plane, NS);
    install::apply_chart_templates(
        plane,
        &install::helm(),
        NS,
        &[
            "serviceaccounts.yaml",
            "rbac-operator.yaml",
            "cache-namespace.yaml",
            "rbac-agent.yaml",
            "rbac-events.yaml",
        ],
    );
    install::with_stdin(plane.kubectl().args(["apply", "-f", "-"]), KUBELET_RBAC);
}

/// The mirrors' basic-auth Secrets, each allowed to go to its mirror's host.
async fn create_secrets(admin: &kube::Client, cluster: &Cluster) {
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NS);
    for (m, mirror) in cluster.mirrors.iter().enumerate() {
        let mut secret = cluster
            .secrets
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(&format!("pull-{m:03}")))
            .cloned()
            .expect("a Secret per mirror");
        let host = mirror.spec.endpoints[0]
            .url
            .trim_start_matches("https://")
            .to_owned();
        secret
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(ALLOWED_HOSTS.into(), host);
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
}

/// The Nodes, as their kubelets register them (with status), without the agent's annotations
/// (the simulated agents publish those). 32 creates in flight.
async fn create_nodes(admin: &kube::Client, cluster: &Cluster, kubelets: &Kubelets) {
    let started = Instant::now();
    let nodes: Api<Node> = Api::all(admin.clone());
    let created = futures::stream::iter(cluster.nodes.iter().cloned())
        .map(|mut node| {
            let nodes = nodes.clone();
            async move {
                node.metadata.uid = None;
                node.metadata.resource_version = None;
                node.metadata.managed_fields = None;
                if let Some(a) = &mut node.metadata.annotations {
                    a.remove(FLAVOR);
                    a.remove(PUBLIC_KEY);
                }
                let name = node.metadata.name.clone().unwrap();
                nodes
                    .create(&PostParams::default(), &node)
                    .await
                    .unwrap_or_else(|e| panic!("create Node {name}: {e}"));
                name
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect::<Vec<String>>()
        .await;
    eprintln!(
        "bench: {} Nodes created in {:.1?}",
        created.len(),
        started.elapsed()
    );
    // Registration stores the status the kubelet sent; a first status post makes sure the
    // Ready heartbeat is fresh.
    futures::stream::iter(created)
        .for_each_concurrent(CREATE_CONCURRENCY, |name| async move {
            kubelets.post_status(&name).await
        })
        .await;
}

/// The operator, `regmirror controller`, on a leash: a shell that kills it when this
/// process's end closes the shell's stdin, however this process ends.
struct Operator {
    leash: Child,
    stdin: Option<ChildStdin>,
    pid: u32,
    metrics: SocketAddr,
}

impl Operator {
    fn start(regmirror: &Path, kubeconfig: &Path, max_unavailable: &str, log: &Path) -> Operator {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let command = install::operator_command(
            regmirror,
            kubeconfig,
            NS,
            "regmirror-operator-bench",
            max_unavailable,
            metrics,
        );
        let mut leash = Command::new("sh");
        leash
            .args([
                "-c",
                "\"$@\" </dev/null >>\"$OPERATOR_LOG\" 2>&1 & echo $!; read -r _; kill -KILL $!",
                "sh",
            ])
            .arg(command.get_program())
            .args(command.get_args())
            .env("OPERATOR_LOG", log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        for (key, value) in command.get_envs() {
            if let Some(value) = value {
                leash.env(key, value);
            }
        }
        let mut leash = leash.spawn().expect("start the operator");
        let mut line = String::new();
        BufReader::new(leash.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid = line
            .trim()
            .parse()
            .expect("the leash prints the operator's pid");
        let stdin = leash.stdin.take();
        eprintln!(
            "bench: operator running as pid {pid}, log {}",
            log.display()
        );
        Operator {
            leash,
            stdin,
            pid,
            metrics,
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"stop\n");
        }
        let _ = self.leash.wait();
    }
}

struct Run<'a> {
    plane: &'a ControlPlane,
    admin: kube::Client,
    agents: Agents,
    operator: Operator,
    audit: Audit,
    ticks: f64,
    settings: &'a Settings,
    cluster: Cluster,
}

impl Run<'_> {
    async fn mark(&self) -> Mark {
        // Requests finish being logged when their responses complete: give the last ones a
        // moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Mark {
            at: Instant::now(),
            cpu_seconds: measure::cpu_seconds(self.operator.pid, self.ticks),
            memory: measure::memory(self.operator.pid),
            operator: measure::operator_metrics(self.operator.metrics),
            requests: measure::apiserver_requests(&self.admin).await,
            audit_offset: self.audit.offset(),
        }
    }

    fn report(&self, name: &str, reached: usize, start: Mark, end: Mark) -> Report {
        Report {
            name: name.into(),
            reached,
            wall: end.at - start.at,
            last_applied: None,
            mirrors_ready: None,
            audit: self.audit.between(start.audit_offset, end.audit_offset),
            start,
            end,
        }
    }

    /// The 50 mirrors applied at once to a cluster without any, until every node runs its
    /// config and every mirror is Ready: for k3s nodes a restart each (the configs carry
    /// credentials), `maxUnavailable` at a time.
    async fn full_rollout(&self) -> Report {
        let dir = self.plane.dir().join("mirrors");
        std::fs::create_dir_all(&dir).unwrap();
        for mirror in &self.cluster.mirrors {
            write_mirror(&dir, mirror);
        }
        let start = self.mark().await;
        run_ok(self.plane.kubectl().args(["apply", "-f"]).arg(&dir));
        let names: Vec<String> = self
            .cluster
            .mirrors
            .iter()
            .map(|m| m.metadata.name.clone().unwrap())
            .collect();
        let targets: Vec<String> = self.agents.seen().into_keys().collect();
        let (last_applied, ready) = self
            .converge("full rollout", &targets, &BTreeMap::new(), &names, start.at)
            .await;
        let end = self.mark().await;
        let mut report = self.report(
            "full rollout (50 mirrors applied)",
            targets.len(),
            start,
            end,
        );
        report.last_applied = Some(last_applied);
        report.mirrors_ready = Some(ready);
        report
    }

    /// Nothing changes for a while: what the operator costs when the cluster is settled
    /// (kubelets still post status).
    async fn settled(&self) -> Report {
        let start = self.mark().await;
        tokio::time::sleep(self.settings.settle).await;
        let end = self.mark().await;
        self.report("settled (idle)", 0, start, end)
    }

    /// A hot change: the endpoint path of mirror `m` (global for m < 10, else the pool
    /// m % 20's), which changes the hosts.toml of every node it reaches but not the
    /// credentials: k3s takes it without a restart, all nodes at once.
    async fn hot_change(&self, m: usize, reach: &str) -> Report {
        let mut mirror = self.cluster.mirrors[m].clone();
        let name = mirror.metadata.name.clone().unwrap();
        let url = &mut mirror.spec.endpoints[0].url;
        *url = format!("{url}/v2/bench-{m}");
        let targets: Vec<String> = match &mirror.spec.node_selector {
            None => self.agents.seen().into_keys().collect(),
            Some(_) => self
                .cluster
                .nodes
                .iter()
                .filter(|n| {
                    let labels = n.metadata.labels.as_ref().unwrap();
                    Some(&labels["pool"])
                        == mirror
                            .spec
                            .node_selector
                            .as_ref()
                            .and_then(|s| s.match_labels.as_ref()?.get("pool"))
                })
                .map(|n| n.metadata.name.clone().unwrap())
                .collect(),
        };
        let seen = self.agents.seen();
        let before: BTreeMap<String, Option<String>> = targets
            .iter()
            .map(|t| (t.clone(), seen.get(t).and_then(|s| s.desired.clone())))
            .collect();
        let dir = self.plane.dir().join(format!("change-{m}"));
        std::fs::create_dir_all(&dir).unwrap();
        write_mirror(&dir, &mirror);
        let start = self.mark().await;
        run_ok(self.plane.kubectl().args(["apply", "-f"]).arg(&dir));
        let what = format!("hot change of {name} ({reach})");
        let (last_applied, ready) = self
            .converge(
                &what,
                &targets,
                &before,
                std::slice::from_ref(&name),
                start.at,
            )
            .await;
        let end = self.mark().await;
        let mut report = self.report(&what, targets.len(), start, end);
        report.last_applied = Some(last_applied);
        report.mirrors_ready = Some(ready);
        report
    }

    /// Waits until every node of `targets` runs a config other than the one it had
    /// (`before`; none: any config) and reports it Applied, and every mirror of `mirrors`
    /// is Ready for its current generation. Returns the time from `since` to the last
    /// node's report, and to the mirrors' Ready.
    async fn converge(
        &self,
        what: &str,
        targets: &[String],
        before: &BTreeMap<String, Option<String>>,
        mirrors: &[String],
        since: Instant,
    ) -> (Duration, Duration) {
        let api: Api<RegistryMirror> = Api::all(self.admin.clone());
        let deadline = since + self.settings.timeout;
        let mut last_progress = Instant::now();
        let mut nodes_done: Option<Duration> = None;
        loop {
            let seen = self.agents.seen();
            let done: Vec<Instant> = targets
                .iter()
                .filter_map(|t| {
                    let s = seen.get(t)?;
                    let desired = s.desired.as_ref()?;
                    let moved = before.get(t).is_none_or(|b| b.as_ref() != Some(desired));
                    let applied = s.current.as_ref() == Some(desired)
                        && s.state.as_deref() == Some("Applied");
                    let (config, at) = s.applied.as_ref()?;
                    (moved && applied && config == desired).then_some(*at)
                })
                .collect();
            if done.len() == targets.len() && nodes_done.is_none() {
                let last = done.into_iter().max().unwrap_or(since);
                nodes_done = Some(last.saturating_duration_since(since));
            }
            let ready = if nodes_done.is_some() {
                count_ready(&api, mirrors).await
            } else {
                0
            };
            if let Some(nodes) = nodes_done.filter(|_| ready == mirrors.len()) {
                return (nodes, since.elapsed());
            }
            if last_progress.elapsed() > Duration::from_secs(10) {
                last_progress = Instant::now();
                eprintln!(
                    "bench: {what}: {:.0?}: {} of {} nodes applied, {ready} of {} mirrors Ready",
                    since.elapsed(),
                    if nodes_done.is_some() {
                        targets.len()
                    } else {
                        self.agents_done(targets, before)
                    },
                    targets.len(),
                    mirrors.len()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not done within {:?}",
                self.settings.timeout
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn agents_done(&self, targets: &[String], before: &BTreeMap<String, Option<String>>) -> usize {
        let seen = self.agents.seen();
        targets
            .iter()
            .filter(|t| {
                seen.get(*t).is_some_and(|s| {
                    s.desired.is_some()
                        && s.current == s.desired
                        && before.get(*t).is_none_or(|b| *b != s.desired)
                })
            })
            .count()
    }
}

/// How many of `names` are Ready for their current generation.
async fn count_ready(api: &Api<RegistryMirror>, names: &[String]) -> usize {
    let Ok(list) = api.list(&Default::default()).await else {
        return 0;
    };
    list.items
        .iter()
        .filter(|m| names.contains(m.metadata.name.as_ref().unwrap()))
        .filter(|m| {
            let status = m.status.as_ref();
            status.and_then(|s| s.observed_generation) == m.metadata.generation
                && status.is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
        })
        .count()
}

/// `mirror` as a manifest `kubectl apply` takes, into `dir`.
fn write_mirror(dir: &Path, mirror: &RegistryMirror) {
    let mut mirror = mirror.clone();
    mirror.metadata.uid = None;
    mirror.metadata.generation = None;
    mirror.status = None;
    let name = mirror.metadata.name.clone().unwrap();
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_vec_pretty(&mirror).unwrap(),
    )
    .unwrap();
}

/// Polls `check` every 500 ms until it returns `Some`, for at most `timeout`.
async fn wait_until<T>(what: &str, timeout: Duration, check: impl Fn() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ------------------------------------------------------------------------------ the report

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn print_summary(settings: &Settings, reports: &[Report]) {
    println!();
    println!(
        "## {} nodes, {MIRRORS} mirrors, {POOLS} pools; maxUnavailable {}; simulated k3s restart {:?}",
        settings.nodes, settings.max_unavailable, settings.restart
    );
    if let Some(first) = reports.first() {
        println!();
        println!(
            "Operator before the first phase (caches filled, no mirrors): VmHWM {:.1} MiB, VmRSS {:.1} MiB",
            mib(first.start.memory.peak_kib),
            mib(first.start.memory.now_kib)
        );
    }
    println!();
    println!("| phase | wall | apply → last node Applied | apply → mirrors Ready | operator CPU | passes (full + nodes only) | operator CPU / pass | conclude + writes per pass (mean, operator's histogram) | passes per minute | Node changes watched | VmHWM | VmRSS at end |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in reports {
        let delta = |series: &str| {
            measure::sample(&r.end.operator, series) - measure::sample(&r.start.operator, series)
        };
        let full = delta("regmirror_passes_total{kind=\"full\"}");
        let nodes_only = delta("regmirror_passes_total{kind=\"nodes_only\"}");
        let passes = full + nodes_only;
        let timed = delta("regmirror_reconcile_duration_seconds_count");
        let pass_duration = if timed > 0.0 {
            format!(
                "{:.2} s",
                delta("regmirror_reconcile_duration_seconds_sum") / timed
            )
        } else {
            "–".into()
        };
        let cpu = r.end.cpu_seconds - r.start.cpu_seconds;
        let minutes = r.wall.as_secs_f64() / 60.0;
        let optional =
            |d: Option<Duration>| d.map_or("–".into(), |d| format!("{:.1} s", d.as_secs_f64()));
        let per_pass = if passes > 0.0 {
            format!("{:.0} ms", 1000.0 * cpu / passes)
        } else {
            "–".into()
        };
        println!(
            "| {} | {:.1} s | {} | {} | {:.2} s | {passes} ({full} + {nodes_only}) | {per_pass} | {pass_duration} | {:.1} | {} | {:.1} MiB | {:.1} MiB |",
            r.name,
            r.wall.as_secs_f64(),
            optional(r.last_applied),
            optional(r.mirrors_ready),
            cpu,
            passes / minutes,
            measure::node_changes(&r.audit),
            mib(r.end.memory.peak_kib),
            mib(r.end.memory.now_kib),
        );
    }
    for r in reports {
        print_requests(r);
    }
}

/// The requests of a phase: by who (audit log) and in all (`apiserver_request_total`).
fn print_requests(r: &Report) {
    println!();
    println!("### {}: API requests", r.name);
    println!();
    if r.reached > 0 {
        let per_node = |who: &str| {
            measure::total(&r.audit, who, measure::node_write) as f64 / r.reached as f64
        };
        println!(
            "Node writes per node reached ({}): operator {:.2}, agents {:.2}",
            r.reached,
            per_node("operator"),
            per_node("agents")
        );
        println!();
    }
    println!("| who (audit log) | verb | resource | requests | failed |");
    println!("|---|---|---|---|---|");
    for ((who, verb, resource), (n, failed)) in &r.audit {
        if who == "benchmark" {
            continue; // the benchmark's own setup and polling
        }
        println!("| {who} | {verb} | {resource} | {n} | {failed} |");
    }
    let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
    for ((who, _, _), (n, _)) in &r.audit {
        *totals.entry(who).or_default() += n;
    }
    println!();
    println!("Totals by who: {totals:?}");
    let deltas: Vec<String> = r
        .end
        .requests
        .iter()
        .filter_map(|(kind, after)| {
            let delta = after - r.start.requests.get(kind).copied().unwrap_or(0.0);
            (delta > 0.0).then(|| format!("{} {}: {delta}", kind.0, kind.1))
        })
        .collect();
    println!();
    println!("apiserver_request_total, all users: {}", deltas.join(", "));
}
