//! The pull-through cache of a RegistryMirror (`spec.cache`), run by the operator against the
//! real API server: the objects it applies in the caches' namespace (Service, Secret,
//! Deployment, named after the mirror; the Secret holding a certificate for the Service's
//! cluster IP from the caches' CA — here one of the site's own, put in place by hand — and the
//! cache's config), the node pointed at a config that lists the cache first with that CA and
//! the nodes' password, nothing written again on a pass with nothing new, the storage asked
//! for, and the objects deleted once the node no longer lists the cache (kept while the node
//! still reports running a config that lists it), when the mirror stops asking for one and
//! when it is deleted.
//!
//! The operator runs in this process with the admin's credentials; what the chart grants it is
//! `privilege`'s matrix. There is no kubelet here: the Deployment's pod is not run (the cache
//! serving for real: `cache_on_loopback`, `testbed/tests/pull_through_cache.rs`, and
//! `testbed/tests/chart_on_node.rs`).

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use regmirror::cache::keys;
use regmirror::controller::{snapshot, Settings};
use regmirror_core::cache::object_name;
use regmirror_core::contract::CURRENT_CONFIG;
use regmirror_core::plan::MaxUnavailable;
use serde_json::{json, Value};

use crate::support::{
    chart_lock, crd_applied, eventually, get_json, kubectl, kubectl_ok, kubectl_stdin, plane,
    runtime,
};

/// The operator's namespace in this test (not the chart's), and the caches'.
const NS: &str = "cache-test";
const CACHES: &str = "cache-test-caches";
const MIRROR: &str = "cached-upstream";
const NODE: &str = "cache-node-1";
const UPSTREAM: &str = "https://upstream.example:5000";
const IMAGE: &str = "registry.example/mirror/registry:3";

fn apply(yaml: &str) {
    let out = kubectl_stdin(&["apply", "-f", "-"], yaml);
    assert!(out.ok, "{}", out.text());
}

/// The test's mirror: with a cache on `storage` (`""`: the default), or none.
fn mirror_yaml(storage: Option<&str>) -> String {
    let cache = match storage {
        Some("") => "  cache: {}\n".to_owned(),
        Some(storage) => format!("  cache:\n    storage: {storage}\n"),
        None => String::new(),
    };
    format!(
        "apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata: {{name: {MIRROR}}}
spec:
  registry: cache.example
  nodeSelector: {{matchLabels: {{cache-test: \"yes\"}}}}
  endpoints:
    - url: {UPSTREAM}
      auth: {{secretRef: {{name: upstream-pull, namespace: {NS}}}}}
      tls: {{caRef: {{configMapRef: {{name: upstream-ca, namespace: {NS}}}}}}}
{cache}"
    )
}

/// This test's cache object of `kind`, by the name the operator gives it.
fn object(kind: &str) -> Option<Value> {
    get_json(&[kind, "-n", CACHES, &object_name(MIRROR)])
}

fn present(kind: &str) -> Result<Value, String> {
    object(kind).ok_or_else(|| format!("no {kind} yet"))
}

fn data(secret: &Value, key: &str) -> String {
    let b64 = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key}"));
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

/// The config the node is told to apply, opened with the operator's sealing key.
fn node_config() -> Result<(String, regmirror_core::render::RenderedConfig), String> {
    let node = get_json(&["node", NODE]).ok_or("no node")?;
    let name = node["metadata"]["annotations"]["regmirror.io/desired-config"]
        .as_str()
        .ok_or_else(|| format!("not told yet: {}", node["metadata"]["annotations"]))?
        .to_owned();
    let secrets: Vec<k8s_openapi::api::core::v1::Secret> = ["regmirror-sealing-key", &name]
        .iter()
        .map(|n| serde_json::from_value(get_json(&["secret", "-n", NS, n]).unwrap()).unwrap())
        .collect();
    let key = snapshot::sealing_key(&secrets).ok_or("no sealing key")?;
    let mut configs = snapshot::stored_configs(&secrets, &key);
    let config = configs.remove(&name).ok_or("the config does not open")?;
    Ok((name, config))
}

const HOSTS: &str = "/etc/containerd/certs.d/cache.example/hosts.toml";

/// What each cache object is as written: the Service's and Secret's resourceVersion, the
/// Deployment's generation and applied digest (its status is the controller manager's).
fn as_written() -> Vec<String> {
    let field = |v: &Value, path: &[&str]| path.iter().fold(v, |v, k| &v[*k]).to_string();
    let deployment = object("deployment").unwrap();
    vec![
        field(
            &object("service").unwrap(),
            &["metadata", "resourceVersion"],
        ),
        field(&object("secret").unwrap(), &["metadata", "resourceVersion"]),
        field(&deployment, &["metadata", "generation"]),
        field(
            &deployment,
            &["metadata", "annotations", "regmirror.io/applied-digest"],
        ),
    ]
}

/// `openssl ARGS` in `dir`, which must succeed; what it printed.
fn openssl(dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openssl {args:?}: {text}");
    text
}

/// The operator's count of passes, from its /metrics.
fn passes(port: u16) -> u64 {
    let out = Command::new("curl")
        .args(["-s", "-m", "5", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("regmirror_reconciles_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Leaves the shared control plane as it was, also when the test fails.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "registrymirror", MIRROR, "--ignore-not-found"]);
        let _ = kubectl(&["delete", "node", NODE, "--ignore-not-found"]);
        for ns in [NS, CACHES] {
            let _ = kubectl(&[
                "delete",
                "namespace",
                ns,
                "--ignore-not-found",
                "--wait=false",
            ]);
        }
    }
}

#[test]
fn the_operator_runs_a_mirrors_cache_and_puts_it_first_on_its_nodes() {
    let _lock = chart_lock();
    crd_applied();
    let _cleanup = Cleanup;
    let _ = kubectl(&[
        "delete",
        "registrymirror",
        MIRROR,
        "--ignore-not-found",
        "--wait",
    ]);
    let _ = kubectl(&["create", "namespace", NS]);
    // The caches' namespace as the chart makes it: Pod Security restricted.
    apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {CACHES}\n  labels: {{pod-security.kubernetes.io/enforce: restricted}}\n"
    ));
    let upstream_ca = keys::new_ca().unwrap().cert;
    let indented = upstream_ca.replace('\n', "\n    ");
    apply(&format!(
        "apiVersion: v1
kind: Secret
metadata:
  name: upstream-pull
  namespace: {NS}
  annotations: {{regmirror.io/allowed-hosts: \"upstream.example:5000\"}}
type: kubernetes.io/basic-auth
stringData: {{username: puller, password: upstream-secret}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: upstream-ca, namespace: {NS}}}
data:
  ca.crt: |
    {indented}"
    ));
    // A node whose agent reported in (flavor and public key), ready.
    let mut node =
        serde_json::to_value(regmirror_testbed::cluster::ready_node(NODE, "containerd")).unwrap();
    node["metadata"]["uid"] = Value::Null;
    node["metadata"]["labels"] = json!({"cache-test": "yes"});
    node["apiVersion"] = json!("v1");
    node["kind"] = json!("Node");
    apply(&node.to_string());
    let status = json!({"status": node["status"]});
    kubectl_ok(&[
        "patch",
        "node",
        NODE,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
    // A CA of the site's own PKI (OpenSSL's, not the operator's rcgen), put in place by hand
    // before the first cache, without regmirror's label: the operator issues with it.
    let pki = tempfile::tempdir().unwrap();
    openssl(
        pki.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "30",
            "-subj",
            "/CN=site cache CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    let site_ca = std::fs::read_to_string(pki.path().join("ca.crt")).unwrap();
    kubectl_ok(&[
        "create",
        "secret",
        "tls",
        "regmirror-cache-ca",
        "-n",
        CACHES,
        "--cert",
        pki.path().join("ca.crt").to_str().unwrap(),
        "--key",
        pki.path().join("ca.key").to_str().unwrap(),
    ]);
    apply(&mirror_yaml(Some("{emptyDir: {sizeLimit: 1Gi}}")));

    let rt = runtime();
    let client = rt.block_on(plane().client());
    let metrics_port = regmirror_testbed::free_port();
    let _operator = rt.spawn(regmirror::controller::run(
        client,
        Settings {
            namespace: NS.into(),
            allowed_namespaces: vec![],
            max_unavailable: MaxUnavailable::Count(1),
            agent_role: "cache-test-agent-configs".into(),
            lease_name: "cache-test-controller".into(),
            identity: "cache-test-0".into(),
            listen: format!("127.0.0.1:{metrics_port}").parse().unwrap(),
            cache_image: IMAGE.into(),
            cache_namespace: CACHES.into(),
        },
    ));

    // The Service first (its cluster IP), then the Secret with a certificate for it.
    let (service, secret) = eventually(
        "the cache's Service and Secret",
        Duration::from_secs(60),
        || {
            let service = present("service")?;
            let secret = present("secret")?;
            let ip = service["spec"]["clusterIP"].as_str().unwrap_or_default();
            if secret["metadata"]["annotations"]["regmirror.io/certificate-address"] != json!(ip) {
                return Err(format!("certificate not for {ip}: {}", secret["metadata"]));
            }
            Ok((service, secret))
        },
    );
    let deployment = eventually("the cache's Deployment", Duration::from_secs(30), || {
        present("deployment")
    });
    let name = object_name(MIRROR);
    assert!(
        name.starts_with("regmirror-cache-cached-upstream-"),
        "{name}"
    );
    let ip = service["spec"]["clusterIP"].as_str().unwrap().to_owned();
    for object in [&service, &secret, &deployment] {
        let meta = &object["metadata"];
        assert_eq!(
            meta["annotations"]["regmirror.io/mirror"],
            json!(MIRROR),
            "{meta}"
        );
        assert_eq!(meta["labels"]["regmirror.io/cache"], json!(name), "{meta}");
        assert_eq!(
            meta["labels"]["app.kubernetes.io/managed-by"],
            json!("regmirror")
        );
        // The operator deletes its caches once no node lists them; the garbage collector
        // would not wait.
        assert!(meta["ownerReferences"].is_null(), "{meta}");
    }
    assert_eq!(service["spec"]["ports"][0]["port"], json!(5000));
    assert_eq!(service["spec"]["type"], json!("ClusterIP"));

    // The Secret: the cache's config (the upstream's credentials), its own credentials for the
    // nodes, the upstream's CA, and a certificate from the operator's CA for the cluster IP.
    let config: Value = serde_yaml::from_str(&data(&secret, "config.yml")).unwrap();
    assert_eq!(config["proxy"]["remoteurl"], json!(UPSTREAM));
    assert_eq!(config["proxy"]["username"], json!("puller"));
    assert_eq!(config["proxy"]["password"], json!("upstream-secret"));
    assert_eq!(
        config["auth"]["htpasswd"]["path"],
        json!("/etc/regmirror-cache/htpasswd")
    );
    assert_eq!(config["http"]["addr"], json!(":5000"));
    assert_eq!(data(&secret, "upstream-ca.crt"), upstream_ca);
    assert!(data(&secret, "htpasswd").starts_with("regmirror-node:$2y$04$"));
    let password = data(&secret, "password");
    let ca_secret = get_json(&["secret", "-n", CACHES, "regmirror-cache-ca"]).expect("the CA");
    let ca = data(&ca_secret, "tls.crt");
    assert_eq!(ca, site_ca, "the CA put in place is kept");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), &ca).unwrap();
    std::fs::write(dir.path().join("tls.crt"), data(&secret, "tls.crt")).unwrap();
    let openssl = |args: &[&str]| openssl(dir.path(), args);
    openssl(&[
        "verify",
        "-CAfile",
        "ca.crt",
        "-purpose",
        "sslserver",
        "tls.crt",
    ]);
    let sans = openssl(&["x509", "-in", "tls.crt", "-noout", "-ext", "subjectAltName"]);
    assert!(sans.contains(&format!("IP Address:{ip}")), "{sans}");
    assert!(sans.contains(&format!("DNS:{name}.{CACHES}.svc")), "{sans}");

    // The Deployment runs the image given, reads the Secret but the nodes' password, trusts
    // the upstream's CA alone, and stores in the emptyDir asked for; the restricted namespace
    // took it.
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["image"], json!(IMAGE));
    assert_eq!(
        container["args"],
        json!(["serve", "/etc/regmirror-cache/config.yml"])
    );
    assert_eq!(
        container["env"],
        json!([{"name": "SSL_CERT_FILE", "value": "/etc/regmirror-cache/upstream-ca.crt"}])
    );
    let volumes = pod["volumes"].as_array().unwrap();
    let secret_volume = volumes.iter().find(|v| v["name"] == "config").unwrap();
    let keys: Vec<&str> = secret_volume["secret"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "config.yml",
            "htpasswd",
            "tls.crt",
            "tls.key",
            "upstream-ca.crt"
        ]
    );
    let storage = volumes.iter().find(|v| v["name"] == "storage").unwrap();
    assert_eq!(storage["emptyDir"]["sizeLimit"], json!("1Gi"));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], json!(true));
    assert_eq!(deployment["spec"]["strategy"]["type"], json!("Recreate"));

    // The node: told to apply a config with the cache first (the operator's CA, the nodes'
    // password), the upstream after it.
    let (config_name, config) = eventually(
        "the node told to use the cache",
        Duration::from_secs(60),
        || {
            let (name, config) = node_config()?;
            let hosts = config
                .files
                .get(HOSTS)
                .ok_or_else(|| format!("{:?}", config.files.keys()))?;
            if !hosts.content.contains(&ip) {
                return Err(hosts.content.clone());
            }
            Ok((name, config))
        },
    );
    let hosts = &config.files[HOSTS].content;
    let cache_at = hosts
        .find(&format!("[host.\"https://{ip}:5000/v2\"]"))
        .expect(hosts);
    let upstream_at = hosts
        .find("[host.\"https://upstream.example:5000/v2\"]")
        .expect(hosts);
    assert!(cache_at < upstream_at, "the cache first:\n{hosts}");
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("regmirror-node:{password}"));
    assert!(
        hosts.contains(&basic),
        "the nodes' password for the cache:\n{hosts}"
    );
    let ca_file = format!("/etc/containerd/certs.d/cache.example/{ip}:5000/ca.crt");
    assert_eq!(
        config.files[&ca_file].content, ca,
        "the operator's CA, for the cache"
    );
    let conditions = get_json(&["registrymirror", MIRROR]).unwrap()["status"]["conditions"].clone();
    let degraded = conditions
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap()
        .clone();
    assert_eq!(degraded["status"], json!("False"), "{conditions}");

    // A pass with nothing new for the cache writes none of its objects again.
    let before = as_written();
    let passes_before = passes(metrics_port);
    kubectl_ok(&[
        "annotate",
        "registrymirror",
        MIRROR,
        "cache-test/poke=1",
        "--overwrite",
    ]);
    eventually("a pass after the poke", Duration::from_secs(30), || {
        let now = passes(metrics_port);
        (now > passes_before)
            .then_some(())
            .ok_or(format!("{now} passes"))
    });
    assert_eq!(as_written(), before, "nothing rewritten");

    // Storage on a claim instead: the Deployment mounts it.
    apply(&mirror_yaml(Some(
        "{persistentVolumeClaim: {claimName: cache-claim}}",
    )));
    eventually(
        "the Deployment on the claim",
        Duration::from_secs(60),
        || {
            let deployment = present("deployment")?;
            let volumes = deployment["spec"]["template"]["spec"]["volumes"].clone();
            volumes
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| v["persistentVolumeClaim"]["claimName"] == "cache-claim")
                .then_some(())
                .ok_or(volumes.to_string())
        },
    );

    // The cache no longer asked for while the node runs the config that lists it (its agent
    // reported it): the node is told to go without the cache, and the cache stays as long as
    // the node still runs that config — a node never loses an endpoint it is using.
    let report_running = |config: &str| {
        kubectl_ok(&[
            "annotate",
            "node",
            NODE,
            &format!("{CURRENT_CONFIG}={config}"),
            "--overwrite",
        ])
    };
    let (running, _) = node_config().unwrap();
    assert_eq!(
        running, config_name,
        "the storage change kept the node's config"
    );
    report_running(&running);
    apply(&mirror_yaml(None));
    let without = eventually(
        "the node told to go without the cache",
        Duration::from_secs(60),
        || {
            let (name, config) = node_config()?;
            let hosts = &config.files[HOSTS].content;
            if name == config_name || hosts.contains(&ip) {
                return Err(hosts.clone());
            }
            Ok(name)
        },
    );
    // Two passes (each after a poke) that see the node told the config without the cache
    // while it runs the one with it.
    for poke in ["2", "3"] {
        let passes_then = passes(metrics_port);
        kubectl_ok(&[
            "annotate",
            "registrymirror",
            MIRROR,
            &format!("cache-test/poke={poke}"),
            "--overwrite",
        ]);
        eventually(
            "a pass while the node runs the cache's config",
            Duration::from_secs(30),
            || {
                let now = passes(metrics_port);
                (now > passes_then)
                    .then_some(())
                    .ok_or(format!("{now} passes"))
            },
        );
    }
    for kind in ["service", "secret", "deployment"] {
        assert!(
            object(kind).is_some(),
            "the cache's {kind} deleted while the node still runs {running}, which lists it"
        );
    }
    // The node reports the new config: nothing lists the cache any more, and its objects go.
    report_running(&without);
    let gone = || {
        let left: Vec<&str> = ["service", "secret", "deployment"]
            .into_iter()
            .filter(|k| object(k).is_some())
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("left: {left:?}"))
        }
    };
    eventually("the cache's objects deleted", Duration::from_secs(60), gone);

    // Asked for again, then the mirror deleted: the node moves away, the objects go.
    apply(&mirror_yaml(Some("")));
    eventually("the cache back", Duration::from_secs(60), || {
        present("deployment")
    });
    let ip = present("service").unwrap()["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually(
        "the node on the cache again",
        Duration::from_secs(60),
        || {
            let (_, config) = node_config()?;
            let hosts = config.files.get(HOSTS).ok_or("no hosts.toml")?;
            hosts
                .content
                .contains(&format!("https://{ip}:5000/v2"))
                .then_some(())
                .ok_or(hosts.content.clone())
        },
    );
    kubectl_ok(&["delete", "registrymirror", MIRROR, "--wait"]);
    eventually(
        "the cache's objects deleted with the mirror",
        Duration::from_secs(60),
        gone,
    );
    let (_, config) = node_config().unwrap();
    assert!(
        !config.files.contains_key(HOSTS),
        "{:?}",
        config.files.keys()
    );
    drop(rt);
}
