//! The pull-through cache of a RegistryMirror (`spec.cache`), run by the operator against the
//! real API server: the objects it applies (Service, Secret, Deployment, owned by the mirror,
//! the Secret holding a certificate from the operator's CA for the Service's cluster IP and the
//! cache's config), the node pointed at a config that lists the cache first with that CA and
//! the nodes' password, nothing written again while nothing changes, the objects deleted when
//! the mirror stops asking for a cache, and collected with the mirror.
//!
//! The operator runs in this process with the admin's credentials; what the chart grants it is
//! `privilege`'s matrix. There is no kubelet here: the Deployment's pod is not run (the cache
//! serving for real is `cache_on_loopback` and `testbed/tests/pull_through_cache.rs`).

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use regmirror::cache::keys;
use regmirror::controller::{snapshot, Settings};
use regmirror_core::plan::MaxUnavailable;
use serde_json::{json, Value};

use crate::support::{
    chart_lock, crd_applied, eventually, get_json, kubectl, kubectl_ok, kubectl_stdin, plane,
    runtime,
};

/// The operator's namespace in this test (not the chart's: nothing else is there).
const NS: &str = "cache-test";
const MIRROR: &str = "cached-upstream";
const NODE: &str = "cache-node-1";
const UPSTREAM: &str = "https://upstream.example.com:5000";
const IMAGE: &str = "registry.example.com/mirror/registry:3";

fn apply(yaml: &str) {
    let out = kubectl_stdin(&["apply", "-f", "-"], yaml);
    assert!(out.ok, "{}", out.text());
}

fn mirror_yaml(cache: bool) -> String {
    let cache = if cache {
        "  cache:\n    storage:\n      emptyDir: {sizeLimit: 1Gi}\n"
    } else {
        ""
    };
    format!(
        "apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata: {{name: {MIRROR}}}
spec:
  registry: cache.example.com
  nodeSelector: {{matchLabels: {{cache-test: \"yes\"}}}}
  endpoints:
    - url: {UPSTREAM}
      auth: {{secretRef: {{name: upstream-pull, namespace: {NS}}}}}
      tls: {{caRef: {{configMapRef: {{name: upstream-ca, namespace: {NS}}}}}}}
{cache}"
    )
}

/// The cache's objects of `kind`, by the label every one of them carries.
fn cache_objects(kind: &str) -> Vec<Value> {
    // kubectl prints nothing for an empty list with --ignore-not-found.
    get_json(&[kind, "-n", NS, "-l", "regmirror.io/cache"])
        .and_then(|list| list["items"].as_array().cloned())
        .unwrap_or_default()
}

fn one(kind: &str) -> Result<Value, String> {
    match cache_objects(kind).as_slice() {
        [one] => Ok(one.clone()),
        other => Err(format!("{} {kind}: {other:#?}", other.len())),
    }
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

fn resource_versions() -> Vec<String> {
    ["service", "secret", "deployment"]
        .iter()
        .map(|kind| {
            one(kind).unwrap()["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[test]
fn the_operator_runs_a_mirrors_cache_and_puts_it_first_on_its_nodes() {
    let _lock = chart_lock();
    crd_applied();
    let _ = kubectl(&[
        "delete",
        "registrymirror",
        MIRROR,
        "--ignore-not-found",
        "--wait",
    ]);
    let _ = kubectl(&["create", "namespace", NS]);
    let upstream_ca = keys::new_ca().unwrap().cert;
    let indented = upstream_ca.replace('\n', "\n    ");
    apply(&format!(
        "apiVersion: v1
kind: Secret
metadata:
  name: upstream-pull
  namespace: {NS}
  annotations: {{regmirror.io/allowed-hosts: \"upstream.example.com:5000\"}}
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
    apply(&mirror_yaml(true));
    let mirror = get_json(&["registrymirror", MIRROR]).unwrap();
    let uid = mirror["metadata"]["uid"].as_str().unwrap().to_owned();

    let rt = runtime();
    let client = rt.block_on(plane().client());
    let operator = rt.spawn(regmirror::controller::run(
        client,
        Settings {
            namespace: NS.into(),
            allowed_namespaces: vec![],
            max_unavailable: MaxUnavailable::Count(1),
            agent_role: "cache-test-agent-configs".into(),
            lease_name: "cache-test-controller".into(),
            identity: "cache-test-0".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            cache_image: IMAGE.into(),
        },
    ));

    // The Service first (its cluster IP), then the Secret with a certificate for it.
    let (service, secret) = eventually(
        "the cache's Service and Secret",
        Duration::from_secs(60),
        || {
            let service = one("service")?;
            let secret = one("secret")?;
            let ip = service["spec"]["clusterIP"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if secret["metadata"]["annotations"]["regmirror.io/certificate-address"] != json!(ip) {
                return Err(format!("certificate not for {ip}: {}", secret["metadata"]));
            }
            Ok((service, secret))
        },
    );
    let deployment = eventually("the cache's Deployment", Duration::from_secs(30), || {
        one("deployment")
    });
    let name = service["metadata"]["name"].as_str().unwrap().to_owned();
    assert!(
        name.starts_with("regmirror-cache-cached-upstream-"),
        "{name}"
    );
    let ip = service["spec"]["clusterIP"].as_str().unwrap().to_owned();
    for object in [&service, &secret, &deployment] {
        assert_eq!(object["metadata"]["name"], json!(name));
        assert_eq!(
            object["metadata"]["ownerReferences"],
            json!([{"apiVersion": "regmirror.io/v1alpha1", "kind": "RegistryMirror",
                    "name": MIRROR, "uid": uid, "controller": true}]),
            "{}",
            object["metadata"]
        );
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
    let ca_secret = get_json(&["secret", "-n", NS, "regmirror-cache-ca"]).expect("the CA");
    let ca = data(&ca_secret, "ca.crt");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), &ca).unwrap();
    std::fs::write(dir.path().join("tls.crt"), data(&secret, "tls.crt")).unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "openssl {args:?}: {text}");
        text
    };
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
    assert!(sans.contains(&format!("DNS:{name}.{NS}.svc")), "{sans}");

    // The Deployment runs the image given, reads the Secret but the nodes' password, trusts
    // the upstream's CA alone, and stores in the emptyDir asked for.
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
                .get("/etc/containerd/certs.d/cache.example.com/hosts.toml")
                .ok_or_else(|| format!("{:?}", config.files.keys()))?;
            if !hosts.content.contains(&ip) {
                return Err(hosts.content.clone());
            }
            Ok((name, config))
        },
    );
    let hosts = &config.files["/etc/containerd/certs.d/cache.example.com/hosts.toml"].content;
    let cache_at = hosts
        .find(&format!("[host.\"https://{ip}:5000/v2\"]"))
        .expect(hosts);
    let upstream_at = hosts
        .find("[host.\"https://upstream.example.com:5000/v2\"]")
        .expect(hosts);
    assert!(cache_at < upstream_at, "the cache first:\n{hosts}");
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("regmirror-node:{password}"));
    assert!(
        hosts.contains(&basic),
        "the nodes' password for the cache:\n{hosts}"
    );
    let ca_file = format!("/etc/containerd/certs.d/cache.example.com/{ip}:5000/ca.crt");
    assert_eq!(
        config.files[&ca_file].content, ca,
        "the operator's CA, for the cache"
    );
    let status = get_json(&["registrymirror", MIRROR]).unwrap()["status"].clone();
    let degraded = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap()
        .clone();
    assert_eq!(degraded["status"], json!("False"), "{status}");

    // A pass with nothing new for the cache writes none of its objects again.
    let before = resource_versions();
    kubectl_ok(&[
        "annotate",
        "registrymirror",
        MIRROR,
        "cache-test/poke=1",
        "--overwrite",
    ]);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(resource_versions(), before, "nothing rewritten");

    // The cache no longer asked for: its objects go, and the node moves to a config without it.
    apply(&mirror_yaml(false));
    eventually(
        "the cache's objects deleted",
        Duration::from_secs(60),
        || {
            let left: Vec<Value> = ["service", "secret", "deployment"]
                .iter()
                .flat_map(|k| cache_objects(k))
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:#?}"))
            }
        },
    );
    eventually(
        "the node told to go without the cache",
        Duration::from_secs(60),
        || {
            let (name, config) = node_config()?;
            let hosts =
                &config.files["/etc/containerd/certs.d/cache.example.com/hosts.toml"].content;
            if name == config_name || hosts.contains(&ip) {
                return Err(hosts.clone());
            }
            Ok(())
        },
    );

    // Asked for again, then the mirror deleted: the garbage collector takes the objects.
    apply(&mirror_yaml(true));
    eventually("the cache back", Duration::from_secs(60), || {
        one("deployment")
    });
    operator.abort();
    kubectl_ok(&["delete", "registrymirror", MIRROR, "--wait"]);
    eventually(
        "the cache's objects collected with the mirror",
        Duration::from_secs(60),
        || {
            let left: Vec<Value> = ["service", "secret", "deployment"]
                .iter()
                .flat_map(|k| cache_objects(k))
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:#?}"))
            }
        },
    );
    drop(rt);
    let _ = kubectl(&["delete", "node", NODE, "--ignore-not-found"]);
    let _ = kubectl(&[
        "delete",
        "namespace",
        NS,
        "--ignore-not-found",
        "--wait=false",
    ]);
}
