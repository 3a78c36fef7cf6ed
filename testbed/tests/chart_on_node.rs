//! The chart on a real node (issue 11 item 3): `helm install charts/regmirror` on the testbed
//! control plane with a kubelet (testbed::node), the test-built images in the node's containerd.
//! The operator Deployment becomes Available with a leader, the agent DaemonSet's pod Running
//! and Ready on the node, and `/readyz` and `/metrics` answer on the pods' addresses.
//! `helm uninstall` (its pre-delete hook) leaves the node as it was before regmirror: its files
//! gone, a hand-written file it replaced back with its content and mode, /var/lib/regmirror gone.

mod on_node;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use on_node::{output, wait_for, OnNode, NAMESPACE};
use regmirror_testbed::{push, Pki, Registry, RegistryOptions};

/// An HTTP GET from this network namespace (the node's), e.g. to a pod's address.
fn get(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "5", "-w", "\n%{http_code}", url])
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Every regular file below `dir`: path from `dir` -> (content, mode).
fn files_below(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u32)> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (Vec<u8>, u32)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                walk(base, &path, out);
            } else if meta.is_file() {
                out.insert(
                    path.strip_prefix(base).unwrap().into(),
                    (
                        std::fs::read(&path).unwrap(),
                        meta.permissions().mode() & 0o7777,
                    ),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn the_chart_runs_on_a_real_node() {
    let on_node = OnNode::start();
    let (node, images) = (&on_node.node, &on_node.images);
    let kubectl = |args: &[&str]| on_node.kubectl(args);
    let host_root = node.host_root();
    // A hand-written hosts.toml where regmirror will write one (RegistryMirror "kept" below):
    // the agent backs it up, and helm uninstall must put it back.
    let kept_toml = host_root.join("etc/containerd/certs.d/kept.example/hosts.toml");
    let hand_written = "# written by hand\nserver = \"https://kept.example\"\n";
    std::fs::create_dir_all(kept_toml.parent().unwrap()).unwrap();
    std::fs::write(&kept_toml, hand_written).unwrap();
    std::fs::set_permissions(&kept_toml, std::fs::Permissions::from_mode(0o640)).unwrap();
    let before = files_below(&host_root.join("etc/containerd"));
    // The testbed makes an empty /var/lib/regmirror; a node before regmirror has none.
    let state_dir = host_root.join("var/lib/regmirror");
    let _ = std::fs::remove_dir(&state_dir);
    assert!(!state_dir.exists(), "no regmirror state before the install");
    on_node.helm_install(&[]);

    // The operator Deployment Available, a leader elected.
    let available = kubectl(&[
        "get",
        "deployment",
        "regmirror-operator",
        "-n",
        NAMESPACE,
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Available\")].status} {.status.readyReplicas}",
    ]);
    assert!(available.starts_with("True "), "operator: {available}");
    let leases = wait_for("a leader Lease", Duration::from_secs(60), || {
        let leases = kubectl(&[
            "get",
            "lease",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.spec.holderIdentity}{\"\\n\"}{end}",
        ]);
        leases
            .lines()
            .any(|l| l.contains("regmirror-operator-"))
            .then_some(leases)
    });
    let operator_pods = kubectl(&[
        "get",
        "pods",
        "-n",
        NAMESPACE,
        "-l",
        "app.kubernetes.io/component=operator",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.podIP} {.status.phase}{\"\\n\"}{end}",
    ]);
    assert!(
        operator_pods
            .lines()
            .any(|l| leases.contains(l.split_whitespace().next().unwrap())),
        "the leader is one of the operator pods: {leases} / {operator_pods}"
    );

    // The agent pod Running and Ready on the node.
    let agent = on_node.agent_ready();
    let fields: Vec<&str> = agent.split_whitespace().collect();
    assert_eq!(fields[0], "node-1", "{agent}");
    let agent_ip = fields[1].to_owned();

    // /readyz and /metrics through the pods.
    let (code, body) = get(&format!("http://{agent_ip}:8081/readyz"));
    assert_eq!(code, 200, "agent /readyz: {body}");
    let (code, body) = get(&format!("http://{agent_ip}:8081/metrics"));
    assert_eq!(code, 200, "agent /metrics: {body}");
    assert!(body.contains("regmirror"), "agent metrics: {body}");
    for line in operator_pods.lines() {
        let ip = line.split_whitespace().nth(1).unwrap();
        let (code, body) = get(&format!("http://{ip}:8080/readyz"));
        assert_eq!(code, 200, "operator {line} /readyz: {body}");
        let (code, body) = get(&format!("http://{ip}:8080/metrics"));
        assert_eq!(code, 200, "operator {line} /metrics: {body}");
        assert!(body.contains("regmirror"), "operator metrics: {body}");
    }
    // The agent found the node's containerd (its /etc/containerd/config.toml).
    let state = wait_for(
        "the node's regmirror state",
        Duration::from_secs(60),
        || {
            let annotations = kubectl(&[
                "get",
                "node",
                "node-1",
                "-o",
                "jsonpath={.metadata.annotations}",
            ]);
            annotations
                .contains("regmirror.io/flavor")
                .then_some(annotations)
        },
    );
    assert!(state.contains("containerd"), "node annotations: {state}");

    // The whole loop (item 4): an image only behind a TLS + basic-auth registry on loopback.
    let work = node.dir().join("loop");
    let pki = Pki::create(&work.join("pki"));
    let options = |password: &str| RegistryOptions {
        tls: true,
        basic_auth: Some(("puller".into(), password.into())),
        client_certs: false,
    };
    let registry = Registry::start(&work.join("registry"), &pki, options("first"));
    let port = registry.port;
    push(
        &images.dir.join("oci"),
        "pause",
        &registry,
        "mirrored/pause",
        &pki.dir,
        &work,
    );
    let host = registry.host();
    let image = format!("{host}/mirrored/pause:pause");
    let hosts_toml = host_root.join(format!("etc/containerd/certs.d/{host}/hosts.toml"));
    let apply = |yaml: String| {
        let file = work.join("apply.yaml");
        std::fs::write(&file, yaml).unwrap();
        kubectl(&["apply", "-f", file.to_str().unwrap()]);
    };
    let secret = |password: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: mirror-pull\n  namespace: {NAMESPACE}\n  annotations: {{regmirror.io/allowed-hosts: \"{host}\"}}\ntype: kubernetes.io/basic-auth\nstringData: {{username: puller, password: {password}}}\n"
        )
    };
    apply(secret("first"));
    let ca: String = pki
        .pem("ca.crt")
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    apply(format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: registry-ca\n  namespace: {NAMESPACE}\ndata:\n  ca.crt: |\n{ca}"
    ));
    apply(format!(
        "apiVersion: regmirror.io/v1alpha1\nkind: RegistryMirror\nmetadata:\n  name: loopback\nspec:\n  registry: \"{host}\"\n  endpoints:\n    - url: https://{host}\n      auth:\n        secretRef: {{name: mirror-pull}}\n      tls:\n        caRef:\n          configMapRef: {{name: registry-ca}}\n"
    ));
    let written = wait_for(
        "the agent pod writing hosts.toml",
        Duration::from_secs(120),
        || std::fs::read_to_string(&hosts_toml).ok(),
    );
    assert!(written.contains(&format!("https://{host}")), "{written}");
    let pod = |name: &str| {
        apply(format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n    - name: c\n      image: {image}\n      imagePullPolicy: Always\n"
        ));
    };
    let phase = |name: &str| {
        kubectl(&[
            "get",
            "pod",
            name,
            "-o",
            "jsonpath={.status.phase} {.status.containerStatuses[0].state.waiting.reason}",
        ])
    };
    pod("pulled");
    wait_for(
        "the Pod pulled through regmirror's hosts.toml Running",
        Duration::from_secs(90),
        || {
            let phase = phase("pulled");
            phase.starts_with("Running").then_some(phase)
        },
    );

    // Rotate the password: in the Secret and in the registry (restarted on its port).
    drop(registry);
    let registry = Registry::start_on(&work.join("registry"), &pki, options("second"), port);
    apply(secret("second"));
    wait_for(
        "hosts.toml with the new credentials",
        Duration::from_secs(120),
        || {
            let now = std::fs::read_to_string(&hosts_toml).ok()?;
            (now != written).then_some(now)
        },
    );
    pod("rotated");
    wait_for(
        "a Pod pulled with the rotated password Running",
        Duration::from_secs(90),
        || {
            let phase = phase("rotated");
            phase.starts_with("Running").then_some(phase)
        },
    );

    // Delete the mirror: the files leave the node, and a new pull fails.
    kubectl(&["delete", "registrymirror", "loopback"]);
    wait_for("hosts.toml removed", Duration::from_secs(120), || {
        (!hosts_toml.exists()).then_some(String::new())
    });
    pod("unmirrored");
    let failed = wait_for(
        "the pull without regmirror failing",
        Duration::from_secs(90),
        || {
            let phase = phase("unmirrored");
            (phase.contains("ErrImagePull") || phase.contains("ImagePullBackOff")).then_some(phase)
        },
    );
    assert!(failed.starts_with("Pending"), "{failed}");

    // A mirror for kept.example replaces the hand-written hosts.toml (backed up first).
    apply(
        "apiVersion: regmirror.io/v1alpha1\nkind: RegistryMirror\nmetadata:\n  name: kept\nspec:\n  registry: kept.example\n  endpoints:\n    - url: https://mirror.kept.example\n".into(),
    );
    wait_for(
        "regmirror's hosts.toml for kept.example",
        Duration::from_secs(120),
        || {
            let now = std::fs::read_to_string(&kept_toml).ok()?;
            now.contains("https://mirror.kept.example").then_some(now)
        },
    );
    assert_eq!(
        std::fs::read_to_string(
            state_dir.join("backup/etc/containerd/certs.d/kept.example/hosts.toml")
        )
        .unwrap(),
        hand_written,
        "the hand-written hosts.toml is backed up"
    );

    // A pull-through cache (issue 12 item 1): the operator, in its pod with the chart's RBAC,
    // runs the cache's Deployment; its pod runs the test-built distribution v3 as the operator
    // configures it (non-root, read-only root filesystem, the Secret's files) and serves TLS
    // for the Service's cluster IP from the operator's CA to the nodes' password only; the node
    // gets the cache first. (The node has no kube-proxy: the cache is reached at its pod's
    // address, under the cluster IP's name.) distribution v3 will not start while its upstream
    // does not answer, and the registries here are on the node's loopback, out of a pod's
    // reach: the cache's upstream is the API server at its ClusterIP, with the cluster's CA,
    // which answers /v2/ (with a refusal) and so lets it start.
    let plane_ca: String = on_node
        .plane
        .ca_pem()
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    apply(format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cluster-ca\n  namespace: {NAMESPACE}\ndata:\n  ca.crt: |\n{plane_ca}"
    ));
    let api_port = on_node
        .plane
        .server()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let upstream = format!(
        "{}:{api_port}",
        regmirror_testbed::node::KUBERNETES_SERVICE_IP
    );
    apply(format!(
        "apiVersion: regmirror.io/v1alpha1\nkind: RegistryMirror\nmetadata:\n  name: cached\nspec:\n  registry: cached.example\n  endpoints:\n    - url: https://{upstream}\n      tls:\n        caRef:\n          configMapRef: {{name: cluster-ca}}\n  cache: {{}}\n"
    ));
    // In the caches' namespace, which the chart makes Pod Security restricted.
    let caches = "regmirror-cache";
    let cache_label = ["-n", caches, "-l", "regmirror.io/cache"];
    let cache_field = |kind: &str, path: &str| {
        let mut args = vec!["get", kind];
        args.extend(cache_label);
        let path = format!("jsonpath={{.items[*]{path}}}");
        args.extend(["-o", &path]);
        kubectl(&args)
    };
    wait_for("the cache's pod Ready", Duration::from_secs(120), || {
        let ready = cache_field("pods", ".status.conditions[?(@.type==\"Ready\")].status");
        (ready == "True").then_some(ready)
    });
    let pod_ip = cache_field("pods", ".status.podIP");
    let cluster_ip = cache_field("services", ".spec.clusterIP");
    let decode = |b64: &str| {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .unwrap_or_else(|e| panic!("base64 {b64:?}: {e}"));
        String::from_utf8(bytes).unwrap()
    };
    let password = decode(&cache_field("secrets", ".data.password"));
    let cache_ca = work.join("cache-ca.crt");
    std::fs::write(
        &cache_ca,
        decode(&kubectl(&[
            "get",
            "secret",
            "-n",
            caches,
            "regmirror-cache-ca",
            "-o",
            "jsonpath={.data.tls\\.crt}",
        ])),
    )
    .unwrap();
    let cache_get = |credentials: Option<&str>| {
        let mut curl = Command::new("curl");
        curl.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "5",
            "--cacert",
        ])
        .arg(&cache_ca)
        .arg("--connect-to")
        .arg(format!("{cluster_ip}:5000:{pod_ip}:5000"));
        if let Some(credentials) = credentials {
            curl.args(["-u", credentials]);
        }
        output(curl.arg(format!("https://{cluster_ip}:5000/v2/")))
    };
    assert_eq!(cache_get(None), "401", "anonymous: refused");
    assert_eq!(
        cache_get(Some("regmirror-node:wrong")),
        "401",
        "a wrong password: refused"
    );
    assert_eq!(
        cache_get(Some(&format!("regmirror-node:{password}"))),
        "200",
        "the nodes' password, over TLS verified for the cluster IP"
    );
    let cached_toml = host_root.join("etc/containerd/certs.d/cached.example/hosts.toml");
    let cached = wait_for(
        "the node's hosts.toml with the cache",
        Duration::from_secs(120),
        || {
            let now = std::fs::read_to_string(&cached_toml).ok()?;
            now.contains(&cluster_ip).then_some(now)
        },
    );
    let cache_at = cached
        .find(&format!("https://{cluster_ip}:5000"))
        .expect(&cached);
    let upstream_at = cached
        .find(&format!("https://{upstream}/v2\"]"))
        .expect(&cached);
    assert!(
        cache_at < upstream_at,
        "the cache before its upstream:\n{cached}"
    );
    kubectl(&["delete", "registrymirror", "cached"]);
    wait_for(
        "the cache's objects gone with the mirror",
        Duration::from_secs(120),
        || {
            let left = kubectl(&[
                "get",
                "deployments,services,secrets,pods",
                "-n",
                caches,
                "-l",
                "regmirror.io/cache",
                "-o",
                "name",
            ]);
            left.trim().is_empty().then_some(left)
        },
    );
    wait_for(
        "the node without the cache's files",
        Duration::from_secs(120),
        || (!cached_toml.exists()).then_some(String::new()),
    );

    // helm uninstall: the pre-delete hook cleans the node up, then the chart's pods go.
    let started = Instant::now();
    let uninstall = output(on_node.helm().args([
        "uninstall",
        "regmirror",
        "-n",
        NAMESPACE,
        "--wait",
        "--timeout",
        "300s",
    ]));
    println!(
        "helm uninstall (with the cleanup hook) took {:?}:\n{uninstall}",
        started.elapsed()
    );
    wait_for("the chart's pods gone", Duration::from_secs(90), || {
        let pods = kubectl(&["get", "pods", "-n", NAMESPACE, "-o", "name"]);
        pods.trim().is_empty().then_some(pods)
    });
    // The node as before regmirror: the same files under /etc/containerd, each with its content
    // and mode (the hand-written hosts.toml back, regmirror's gone), and no /var/lib/regmirror.
    let after = files_below(&host_root.join("etc/containerd"));
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "the files under <hostRoot>/etc/containerd after helm uninstall"
    );
    for (path, was) in &before {
        assert_eq!(&after[path], was, "{} as before regmirror", path.display());
    }
    assert_eq!(std::fs::read_to_string(&kept_toml).unwrap(), hand_written);
    assert_eq!(
        std::fs::metadata(&kept_toml).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    assert!(!hosts_toml.exists(), "regmirror's hosts.toml gone");
    assert!(!state_dir.exists(), "{} gone", state_dir.display());
    // The hook's Job and RBAC are deleted once it succeeded.
    let left = kubectl(&[
        "get",
        "jobs,serviceaccounts,roles,rolebindings",
        "-n",
        NAMESPACE,
        "-o",
        "name",
    ]);
    assert!(
        !left.contains("regmirror-uninstall-cleanup"),
        "hook objects left: {left}"
    );
    drop(registry);

    let problems = on_node.node.stop();
    assert!(problems.is_empty(), "left behind: {problems:#?}");
}
