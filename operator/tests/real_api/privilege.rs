//! Least privilege for real, with the chart's ServiceAccounts and tokens from the TokenRequest
//! API — the agent's bound to a Pod on a Node, so the token carries the node's name as a real
//! agent's does: a `kubectl auth can-i` matrix and real reads (the operator reads Secrets only
//! in its namespace and the allowed ones; the agent only the config Secrets the operator's Role
//! `regmirror-agent-configs` names), and the chart's ValidatingAdmissionPolicy on the node
//! updates an agent may and may not make, sent as the agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams, PostParams};
use regmirror_core::contract;
use regmirror_testbed::TokenOptions;
use serde_json::{json, Value};

use crate::chart::{
    self, apply_agent_role, create_namespace, CONFIG_A, CONFIG_B, NAMESPACE, TEST_LABEL,
};
use crate::support::{self, chart_lock, eventually, get_json, plane, run};

const AGENT: &str = "system:serviceaccount:regmirror-system:regmirror-agent";
const ALLOWED: &str = "team-a";
const OTHER: &str = "team-c";
/// The pull-through caches' namespace, as the chart makes it by default.
const CACHES: &str = "regmirror-cache";

/// The chart installed (allowedNamespaces: [team-a]), two Nodes with an agent Pod each, the
/// Secrets of a running installation, and kubeconfigs of the operator and the agents.
struct Installation {
    operator: PathBuf,
    /// Bound to Pod agent-1 on node-1.
    agent: PathBuf,
    /// Bound to Pod agent-2 on node-2.
    agent_of_node_2: PathBuf,
    /// A TokenRequest token bound to nothing.
    agent_unbound: PathBuf,
    /// Bound to a Pod that is on no Node.
    agent_unscheduled: PathBuf,
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {TEST_LABEL: "privilege"}}})
}

fn agent_pod(name: &str, node: Option<&str>) -> Value {
    let mut spec = json!({
        "serviceAccountName": "regmirror-agent",
        // As the chart's DaemonSet: every taint tolerated (no eviction from a Node whose
        // kubelet never reports).
        "tolerations": [{"operator": "Exists"}],
        "containers": [{"name": "agent", "image": "registry.example/regmirror-agent:1"}],
    });
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})
}

fn install() -> Installation {
    chart::reset();
    support::crd_applied();
    create_namespace(NAMESPACE, true);
    create_namespace(ALLOWED, false);
    create_namespace(OTHER, false);
    chart::install(&["--set".into(), format!("allowedNamespaces={{{ALLOWED}}}")]);
    for name in ["node-1", "node-2"] {
        let out = support::kubectl_stdin(&["create", "-f", "-"], &node(name).to_string());
        assert!(out.ok, "{}", out.text());
    }
    // Secrets: the operator's, a user's credentials, and some elsewhere.
    let secret = |namespace: &str, name: &str| {
        json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace, "labels": {TEST_LABEL: "privilege"}},
            "stringData": {"token": format!("{namespace}/{name}")}})
    };
    for (namespace, name) in [
        (NAMESPACE, "mirror-pull"),
        (ALLOWED, "team-pull"),
        (OTHER, "other-pull"),
        ("default", "unrelated"),
    ] {
        let out =
            support::kubectl_stdin(&["create", "-f", "-"], &secret(namespace, name).to_string());
        assert!(out.ok, "{}", out.text());
    }
    let plane = plane();
    support::runtime().block_on(async {
        let admin = plane.client().await;
        let pods: Api<Pod> = Api::namespaced(admin.clone(), NAMESPACE);
        let mut bound = Vec::new();
        for (name, node) in [
            ("agent-1", Some("node-1")),
            ("agent-2", Some("node-2")),
            ("agent-unscheduled", None),
        ] {
            let pod: Pod = serde_json::from_value(agent_pod(name, node)).unwrap();
            bound.push(pods.create(&PostParams::default(), &pod).await.unwrap());
        }
        // What the operator makes, made as the operator (its own token): the sealing key, two
        // config Secrets, and the Role granting the agents the live one.
        let operator_token = plane
            .token(NAMESPACE, "regmirror-operator", &TokenOptions::default())
            .await;
        let operator = plane.token_kubeconfig("operator", &operator_token);
        let client = regmirror_testbed::control_plane::client_from(&operator).await;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
        let mut key = regmirror_testbed::cluster::sealing_key_secret(NAMESPACE);
        key.metadata.namespace = None;
        secrets.create(&PostParams::default(), &key).await.unwrap();
        for config in [CONFIG_A, CONFIG_B] {
            let sealed = format!("sealed {config}").into_bytes();
            secrets
                .create(
                    &PostParams::default(),
                    &contract::config_secret(config, sealed),
                )
                .await
                .unwrap();
        }
        apply_agent_role(&client, &[CONFIG_A]).await;

        let token_of = |pod: Option<Pod>| {
            let options = TokenOptions {
                bound_pod: pod,
                ..TokenOptions::default()
            };
            async move { plane.token(NAMESPACE, "regmirror-agent", &options).await }
        };
        let agent = token_of(Some(bound[0].clone())).await;
        let agent_2 = token_of(Some(bound[1].clone())).await;
        let unbound = token_of(None).await;
        let unscheduled = token_of(Some(bound[2].clone())).await;
        Installation {
            operator,
            agent: plane.token_kubeconfig("agent-node-1", &agent),
            agent_of_node_2: plane.token_kubeconfig("agent-node-2", &agent_2),
            agent_unbound: plane.token_kubeconfig("agent-unbound", &unbound),
            agent_unscheduled: plane.token_kubeconfig("agent-unscheduled", &unscheduled),
        }
    })
}

/// kubectl with a ServiceAccount's kubeconfig.
fn kubectl_as(kubeconfig: &Path, args: &[&str]) -> support::Run {
    run(plane().kubectl_with(kubeconfig).args(args), None)
}

/// `kubectl auth whoami` as JSON.
fn whoami(kubeconfig: &Path) -> Value {
    let out = kubectl_as(kubeconfig, &["auth", "whoami", "-o", "json"]);
    assert!(out.ok, "{}", out.text());
    serde_json::from_str::<Value>(&out.stdout).unwrap()["status"]["userInfo"].clone()
}

#[test]
fn service_accounts_of_the_chart_hold_least_privilege() {
    let _chart = chart_lock();
    let installed = install();

    // The tokens are the chart's ServiceAccounts, the agent's naming its Pod and Node.
    let agent = whoami(&installed.agent);
    assert_eq!(agent["username"], AGENT);
    assert_eq!(
        agent["extra"]["authentication.kubernetes.io/node-name"],
        json!(["node-1"])
    );
    assert_eq!(
        agent["extra"]["authentication.kubernetes.io/pod-name"],
        json!(["agent-1"])
    );
    let operator = whoami(&installed.operator);
    assert_eq!(
        operator["username"],
        "system:serviceaccount:regmirror-system:regmirror-operator"
    );
    // The Role the operator wrote is on the API server as core::contract makes it.
    let role = get_json(&["role", "regmirror-agent-configs", "-n", NAMESPACE]).unwrap();
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
            "resourceNames": [CONFIG_A]}])
    );

    let ns = NAMESPACE;
    let config_a = format!("secrets/{CONFIG_A}");
    let config_b = format!("secrets/{CONFIG_B}");
    // (verb, resource, namespace or "" for cluster scope, "-A" for every namespace, answer)
    let operator_matrix: Vec<(&str, &str, &str, bool)> = vec![
        ("get", "secrets", ns, true),
        ("list", "secrets", ns, true),
        ("watch", "secrets", ns, true),
        ("create", "secrets", ns, true),
        ("delete", "secrets", ns, true),
        ("update", "secrets", ns, false),
        ("patch", "secrets", ns, false),
        ("patch", "secrets", ALLOWED, false),
        ("get", "secrets", ALLOWED, true),
        ("list", "secrets", ALLOWED, true),
        ("watch", "secrets", ALLOWED, true),
        ("create", "secrets", ALLOWED, false),
        ("delete", "secrets", ALLOWED, false),
        ("get", "secrets", OTHER, false),
        ("list", "secrets", OTHER, false),
        ("get", "secrets", "default", false),
        ("get", "secrets", "kube-system", false),
        ("list", "secrets", "-A", false),
        ("get", "configmaps", ns, true),
        ("list", "configmaps", ALLOWED, true),
        ("get", "configmaps", OTHER, false),
        ("create", "configmaps", ns, false),
        ("create", "leases.coordination.k8s.io", ns, true),
        (
            "get",
            "leases.coordination.k8s.io/regmirror-controller",
            ns,
            true,
        ),
        // kube-lease-manager renews and releases with patches.
        (
            "patch",
            "leases.coordination.k8s.io/regmirror-controller",
            ns,
            true,
        ),
        (
            "update",
            "leases.coordination.k8s.io/regmirror-controller",
            ns,
            false,
        ),
        (
            "patch",
            "leases.coordination.k8s.io/another-lease",
            ns,
            false,
        ),
        (
            "delete",
            "leases.coordination.k8s.io/regmirror-controller",
            ns,
            false,
        ),
        ("create", "roles", ns, true),
        ("patch", "roles/regmirror-agent-configs", ns, true),
        ("watch", "roles/regmirror-agent-configs", ns, true),
        ("patch", "roles/regmirror-operator", ns, false),
        ("delete", "roles/regmirror-agent-configs", ns, false),
        ("escalate", "roles", ns, false),
        ("bind", "roles", ns, false),
        ("create", "rolebindings", ns, false),
        ("get", "nodes", "", true),
        ("list", "nodes", "", true),
        ("watch", "nodes", "", true),
        ("patch", "nodes", "", true),
        ("update", "nodes", "", false),
        ("delete", "nodes", "", false),
        ("list", "registrymirrors", "", true),
        ("watch", "registrymirrors", "", true),
        ("create", "registrymirrors", "", false),
        ("update", "registrymirrors", "", false),
        ("patch", "registrymirrors", "", false),
        ("delete", "registrymirrors", "", false),
        ("create", "events.events.k8s.io", "default", true),
        ("patch", "events.events.k8s.io", "default", false),
        ("create", "events", "default", false),
        ("create", "events.events.k8s.io", ns, false),
        ("list", "pods", ns, false),
        ("patch", "daemonsets.apps", ns, false),
        // The pull-through caches: in their own (Pod Security restricted) namespace only —
        // never in the operator's, whose Pod Security level is the agent's (privileged).
        ("create", "deployments.apps", ns, false),
        ("patch", "deployments.apps", ns, false),
        ("create", "services", ns, false),
        ("create", "pods", ns, false),
        ("get", "secrets", CACHES, true),
        ("list", "secrets", CACHES, true),
        ("watch", "secrets", CACHES, true),
        ("create", "secrets", CACHES, true),
        ("patch", "secrets", CACHES, true),
        ("delete", "secrets", CACHES, true),
        ("update", "secrets", CACHES, false),
        ("get", "services", CACHES, false),
        ("list", "services", CACHES, true),
        ("watch", "services", CACHES, true),
        ("create", "services", CACHES, true),
        ("patch", "services", CACHES, true),
        ("delete", "services", CACHES, true),
        ("update", "services", CACHES, false),
        ("list", "deployments.apps", CACHES, true),
        ("watch", "deployments.apps", CACHES, true),
        ("create", "deployments.apps", CACHES, true),
        ("patch", "deployments.apps", CACHES, true),
        ("delete", "deployments.apps", CACHES, true),
        ("update", "deployments.apps", CACHES, false),
        ("create", "pods", CACHES, false),
        ("create", "daemonsets.apps", CACHES, false),
        ("create", "roles", CACHES, false),
        ("create", "deployments.apps", "default", false),
        ("patch", "deployments.apps", "kube-system", false),
        ("list", "deployments.apps", "-A", false),
        ("list", "services", "-A", false),
        ("create", "validatingadmissionpolicybindings", "", false),
    ];
    let agent_matrix: Vec<(&str, &str, &str, bool)> = vec![
        ("get", &config_a, ns, true),
        ("get", &config_b, ns, false),
        ("get", "secrets/regmirror-sealing-key", ns, false),
        ("get", "secrets/mirror-pull", ns, false),
        ("get", "secrets", ns, false),
        ("list", "secrets", ns, false),
        ("watch", "secrets", ns, false),
        ("create", "secrets", ns, false),
        ("list", "secrets", "-A", false),
        ("get", &config_a, "default", false),
        ("get", "secrets/team-pull", ALLOWED, false),
        ("get", "configmaps", ns, false),
        ("get", "roles/regmirror-agent-configs", ns, false),
        ("patch", "roles/regmirror-agent-configs", ns, false),
        ("get", "nodes", "", true),
        ("list", "nodes", "", true),
        ("watch", "nodes", "", true),
        ("patch", "nodes", "", true),
        ("update", "nodes", "", false),
        ("create", "nodes", "", false),
        ("delete", "nodes", "", false),
        ("list", "registrymirrors", "", false),
        ("create", "events.events.k8s.io", "default", true),
        ("patch", "events.events.k8s.io", "default", false),
        ("list", "pods", ns, false),
        (
            "get",
            "leases.coordination.k8s.io/regmirror-controller",
            ns,
            false,
        ),
    ];
    let mut wrong = Vec::new();
    let mut asked = 0;
    for (who, kubeconfig, matrix) in [
        ("operator", &installed.operator, &operator_matrix),
        ("agent", &installed.agent, &agent_matrix),
    ] {
        for (verb, resource, namespace, expected) in matrix {
            let mut args = vec!["auth", "can-i", *verb, *resource];
            match *namespace {
                "" => {}
                "-A" => args.push("-A"),
                namespace => args.extend_from_slice(&["-n", namespace]),
            }
            let out = kubectl_as(kubeconfig, &args);
            asked += 1;
            let answer = out.stdout.trim();
            if answer != if *expected { "yes" } else { "no" } {
                wrong.push(format!(
                    "{who}: {}: {answer} {}",
                    args.join(" "),
                    out.stderr.trim()
                ));
            }
        }
    }
    // The status subresource: the operator writes it, nothing else of a mirror.
    for (kubeconfig, expected) in [(&installed.operator, "yes"), (&installed.agent, "no")] {
        let out = kubectl_as(
            kubeconfig,
            &[
                "auth",
                "can-i",
                "patch",
                "registrymirrors",
                "--subresource=status",
            ],
        );
        asked += 1;
        if out.stdout.trim() != expected {
            wrong.push(format!("status patch: {}", out.text()));
        }
    }
    assert!(
        wrong.is_empty(),
        "kubectl auth can-i answered otherwise:\n{}",
        wrong.join("\n")
    );
    eprintln!("{asked} kubectl auth can-i questions answered as expected");

    // Real reads: what the API server returns, not only what it would allow.
    let read = |kubeconfig: &Path, args: &[&str]| {
        let out = kubectl_as(kubeconfig, args);
        (out.ok, out.text())
    };
    let (ok, text) = read(
        &installed.agent,
        &["get", "secret", CONFIG_A, "-n", ns, "-o", "json"],
    );
    assert!(ok, "{text}");
    let secret: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(secret["type"], contract::CONFIG_SECRET_TYPE);
    for args in [
        vec!["get", "secret", CONFIG_B, "-n", ns],
        vec!["get", "secret", contract::SEALING_KEY_SECRET, "-n", ns],
        vec!["get", "secret", "mirror-pull", "-n", ns],
        vec!["get", "secrets", "-n", ns],
        vec!["get", "secret", "team-pull", "-n", ALLOWED],
    ] {
        let (ok, text) = read(&installed.agent, &args);
        assert!(!ok && text.contains("Forbidden"), "agent: {args:?}: {text}");
    }
    let names = |text: &str| -> Vec<String> {
        let list: Value = serde_json::from_str(text).unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let (ok, text) = read(
        &installed.operator,
        &["get", "secrets", "-n", ns, "-o", "json"],
    );
    assert!(ok, "{text}");
    let in_namespace = names(&text);
    for name in [
        CONFIG_A,
        CONFIG_B,
        contract::SEALING_KEY_SECRET,
        "mirror-pull",
    ] {
        assert!(in_namespace.contains(&name.to_owned()), "{in_namespace:?}");
    }
    let (ok, text) = read(
        &installed.operator,
        &["get", "secrets", "-n", ALLOWED, "-o", "json"],
    );
    assert!(ok, "{text}");
    assert_eq!(names(&text), ["team-pull"]);
    for args in [
        vec!["get", "secret", "other-pull", "-n", OTHER],
        vec!["get", "secrets", "-A"],
        vec!["get", "secret", "unrelated", "-n", "default"],
    ] {
        let (ok, text) = read(&installed.operator, &args);
        assert!(
            !ok && text.contains("Forbidden"),
            "operator: {args:?}: {text}"
        );
    }
    // The operator may grant only what it holds: a Role over other Secrets' names is fine
    // (get in its namespace), the operator's own Role is not its to rewrite.
    let (ok, text) = read(
        &installed.operator,
        &["label", "role", "regmirror-operator", "-n", ns, "x=y"],
    );
    assert!(!ok && text.contains("Forbidden"), "{text}");

    // A new config: the operator moves the Role, and the agent's access follows.
    support::runtime().block_on(async {
        let client = regmirror_testbed::control_plane::client_from(&installed.operator).await;
        apply_agent_role(&client, &[CONFIG_B]).await;
        let agent = regmirror_testbed::control_plane::client_from(&installed.agent).await;
        let secrets: Api<Secret> = Api::namespaced(agent, NAMESPACE);
        // RBAC's cache of Roles follows within moments.
        let mut last = String::new();
        for _ in 0..100 {
            let b = secrets.get(CONFIG_B).await;
            let a = secrets.get(CONFIG_A).await;
            match (&b, &a) {
                (Ok(_), Err(kube::Error::Api(status))) if status.code == 403 => {
                    last.clear();
                    break;
                }
                _ => last = format!("{CONFIG_B}: {:?}; {CONFIG_A}: {:?}", b.is_ok(), a.is_ok()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            last.is_empty(),
            "the agent's access did not follow the Role: {last}"
        );
        let error = secrets.list(&ListParams::default()).await.unwrap_err();
        assert!(
            matches!(error, kube::Error::Api(ref s) if s.code == 403),
            "{error}"
        );
    });
    chart::reset();
}

// ------------------------------------------------------------------ the admission policy

const CONFIG_A_UPPER_CASE: &str = "REGMIRROR-CONFIG-0123456789ABCDEF0123";
const PUBLIC_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAE=";

/// Who sends a node update.
#[derive(Clone, Copy, Debug)]
enum Who {
    /// The agent with a token bound to its Pod on node-1.
    Agent,
    /// The agent with a token bound to its Pod on node-2.
    AgentOfNode2,
    /// The agent with a TokenRequest token bound to nothing (no node name in it).
    AgentUnbound,
    /// The agent with a token bound to a Pod on no Node (a pod name, no node name).
    AgentUnscheduled,
    /// The agent's user with an empty node name (impersonated: no real token carries one).
    AgentEmptyNodeName,
    /// The operator's token.
    Operator,
    /// node-1's kubelet (impersonated: user system:node:node-1 in group system:nodes).
    Kubelet,
}

/// The Node the policy cases update (without podCIDR, which the API
/// server lets no one change once set, and without status, which the agent does not write).
fn base_node() -> Value {
    json!({"metadata": {
        "name": "node-1",
        "labels": {"kubernetes.io/hostname": "node-1", "node-role.kubernetes.io/control-plane": "true"},
        "annotations": {"regmirror.io/desired-config": CONFIG_A, "k3s.io/node-args": "[\"server\"]"},
    }, "spec": {"taints": [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]}})
}

fn bare() -> Value {
    json!({"metadata": {"name": "node-1"}, "spec": {}})
}

/// `node` with these annotations set (None: removed).
fn annotate(node: &Value, changes: &[(&str, Option<&str>)]) -> Value {
    let mut node = node.clone();
    let annotations = node["metadata"]
        .as_object_mut()
        .unwrap()
        .entry("annotations")
        .or_insert(json!({}));
    for (key, value) in changes {
        match value {
            Some(v) => annotations[*key] = json!(v),
            None => {
                annotations.as_object_mut().unwrap().remove(*key);
            }
        }
    }
    node
}

/// `node` with `path` (`metadata.labels`, `spec.taints`, ...) set (None: removed).
fn changed(node: &Value, path: &str, value: Option<Value>) -> Value {
    let mut node = node.clone();
    let (parent, leaf) = path.split_once('.').unwrap();
    let object = node[parent].as_object_mut().unwrap();
    match value {
        Some(v) => {
            object.insert(leaf.to_owned(), v);
        }
        None => {
            object.remove(leaf);
        }
    }
    node
}

fn applied() -> Value {
    annotate(
        &base_node(),
        &[
            ("regmirror.io/current-config", Some(CONFIG_A)),
            ("regmirror.io/state", Some("Applied")),
            ("regmirror.io/flavor", Some("k3s")),
            ("regmirror.io/message", Some("")),
        ],
    )
}

/// (name, old, new, who, None = admitted, else a text of the denial).
fn cases() -> Vec<(&'static str, Value, Value, Who, Option<&'static str>)> {
    use Who::*;
    let node = base_node();
    let applied = applied();
    let bare = bare();
    let mut taints = node["spec"]["taints"].as_array().unwrap().clone();
    taints.push(json!({"key": "x", "effect": "NoExecute"}));
    let mut kubelet_labels = node["metadata"]["labels"].clone();
    kubelet_labels["a"] = json!("b");
    vec![
        (
            "agent reports state on its own node",
            node.clone(),
            applied.clone(),
            Agent,
            None,
        ),
        (
            "agent reports on a node without annotations or labels",
            bare.clone(),
            annotate(
                &bare,
                &[
                    ("regmirror.io/state", Some("Unsupported")),
                    ("regmirror.io/message", Some("external runtime")),
                ],
            ),
            Agent,
            None,
        ),
        (
            "agent clears its message",
            applied.clone(),
            annotate(&applied, &[("regmirror.io/message", None)]),
            Agent,
            None,
        ),
        (
            "agent's no-op update",
            applied.clone(),
            applied.clone(),
            Agent,
            None,
        ),
        (
            "agent removes all its annotations (old had only those)",
            annotate(&bare, &[("regmirror.io/state", Some("Applied"))]),
            bare.clone(),
            Agent,
            None,
        ),
        (
            "operator (another user) changes desired-config",
            node.clone(),
            annotate(&node, &[("regmirror.io/desired-config", Some(CONFIG_B))]),
            Operator,
            None,
        ),
        // The Python case replaces the labels; NodeRestriction refuses a kubelet that removes
        // node-role labels, so the real kubelet adds one.
        (
            "kubelet updates labels",
            node.clone(),
            changed(&node, "metadata.labels", Some(kubelet_labels)),
            Kubelet,
            None,
        ),
        (
            "agent of another node",
            node.clone(),
            applied.clone(),
            AgentOfNode2,
            Some("on node node-2 may not update Node node-1"),
        ),
        (
            "agent token without node binding (no extra)",
            node.clone(),
            applied.clone(),
            AgentUnbound,
            Some("token names no node"),
        ),
        (
            "agent token with extra but no node-name",
            node.clone(),
            applied.clone(),
            AgentUnscheduled,
            Some("token names no node"),
        ),
        // The Python case's empty list cannot be sent; an empty name takes the same branch.
        (
            "agent token with an empty node name",
            node.clone(),
            applied.clone(),
            AgentEmptyNodeName,
            Some("token names no node"),
        ),
        (
            "agent changes a label",
            node.clone(),
            changed(
                &node,
                "metadata.labels",
                Some(json!({"kubernetes.io/hostname": "node-1"})),
            ),
            Agent,
            Some("labels"),
        ),
        (
            "agent adds a label to a node without labels",
            bare.clone(),
            changed(&bare, "metadata.labels", Some(json!({"x": "y"}))),
            Agent,
            Some("labels"),
        ),
        (
            "agent removes all labels",
            node.clone(),
            changed(&node, "metadata.labels", None),
            Agent,
            Some("labels"),
        ),
        (
            "agent adds a taint",
            node.clone(),
            changed(&node, "spec.taints", Some(Value::Array(taints))),
            Agent,
            Some("spec"),
        ),
        (
            "agent removes the taints",
            node.clone(),
            changed(&node, "spec.taints", None),
            Agent,
            Some("spec"),
        ),
        (
            "agent cordons the node",
            node.clone(),
            changed(&node, "spec.unschedulable", Some(json!(true))),
            Agent,
            Some("spec"),
        ),
        (
            "agent adds a finalizer",
            node.clone(),
            changed(&node, "metadata.finalizers", Some(json!(["example.com/x"]))),
            Agent,
            Some("finalizers"),
        ),
        (
            "agent forges desired-config",
            applied.clone(),
            annotate(
                &applied,
                &[("regmirror.io/desired-config", Some("regmirror-config-evil"))],
            ),
            Agent,
            Some("regmirror.io/desired-config"),
        ),
        (
            "agent removes desired-config",
            applied.clone(),
            annotate(&applied, &[("regmirror.io/desired-config", None)]),
            Agent,
            Some("only the operator writes regmirror.io/desired-config"),
        ),
        (
            "agent changes a foreign annotation",
            applied.clone(),
            annotate(&applied, &[("k3s.io/node-args", Some("[]"))]),
            Agent,
            Some("not: k3s.io/node-args"),
        ),
        (
            "agent adds a foreign annotation",
            node.clone(),
            annotate(
                &node,
                &[
                    ("example.com/x", Some("1")),
                    ("regmirror.io/state", Some("Applied")),
                ],
            ),
            Agent,
            Some("not: example.com/x"),
        ),
        (
            "agent removes all annotations",
            node.clone(),
            changed(&node, "metadata.annotations", None),
            Agent,
            Some("regmirror.io/desired-config"),
        ),
        (
            "agent publishes its public key",
            applied.clone(),
            annotate(&applied, &[("regmirror.io/public-key", Some(PUBLIC_KEY))]),
            Agent,
            None,
        ),
        (
            "agent names a Helm release Secret as its current config",
            applied.clone(),
            annotate(
                &applied,
                &[(
                    "regmirror.io/current-config",
                    Some("sh.helm.release.v1.regmirror.v1"),
                )],
            ),
            Agent,
            Some("must name a config Secret"),
        ),
        (
            "agent names a credential Secret as its current config",
            applied.clone(),
            annotate(
                &applied,
                &[("regmirror.io/current-config", Some("mirror-pull"))],
            ),
            Agent,
            Some("must name a config Secret"),
        ),
        (
            "agent names a config with upper-case digits",
            applied.clone(),
            annotate(
                &applied,
                &[("regmirror.io/current-config", Some(CONFIG_A_UPPER_CASE))],
            ),
            Agent,
            Some("must name a config Secret"),
        ),
        (
            "agent reports a state of its own invention",
            applied.clone(),
            annotate(&applied, &[("regmirror.io/state", Some("Pwned"))]),
            Agent,
            Some("regmirror.io/state must be"),
        ),
        (
            "agent publishes a public key that is not one",
            applied.clone(),
            annotate(&applied, &[("regmirror.io/public-key", Some("not-a-key"))]),
            Agent,
            Some("regmirror.io/public-key must be"),
        ),
        (
            "agent forges desired-activation",
            applied.clone(),
            annotate(
                &applied,
                &[("regmirror.io/desired-activation", Some("Restart"))],
            ),
            Agent,
            Some("may not change regmirror.io/desired-activation"),
        ),
        (
            "agent forges its config key",
            applied.clone(),
            annotate(&applied, &[("regmirror.io/config-key", Some("v1.x.y.z"))]),
            Agent,
            Some("may not change regmirror.io/config-key"),
        ),
    ]
}

/// The JSON merge patch (RFC 7386) that turns `old` into `new` (maps that go away are emptied
/// of their keys).
fn merge_patch(old: &Value, new: &Value) -> Value {
    match (old, new) {
        (Value::Object(old), Value::Object(new)) => {
            let mut patch = serde_json::Map::new();
            for (key, value) in new {
                match old.get(key) {
                    Some(before) if before == value => {}
                    Some(before @ Value::Object(_)) if value.is_object() => {
                        patch.insert(key.clone(), merge_patch(before, value));
                    }
                    _ => {
                        patch.insert(key.clone(), value.clone());
                    }
                }
            }
            for (key, before) in old {
                if !new.contains_key(key) {
                    // A map that goes away loses the keys the sender knows, one by one: a real
                    // Node has annotations of others (kube-controller-manager's TTL annotation
                    // at least), which `"annotations": null` would remove as well.
                    let removed = match before {
                        Value::Object(map) => {
                            Value::Object(map.keys().map(|k| (k.clone(), Value::Null)).collect())
                        }
                        _ => Value::Null,
                    };
                    patch.insert(key.clone(), removed);
                }
            }
            Value::Object(patch)
        }
        (_, new) => new.clone(),
    }
}

/// Whether a Node annotation or taint is kube-controller-manager's: the TTL controller's
/// `node.alpha.kubernetes.io/ttl`, the node lifecycle controller's `node.kubernetes.io/...`
/// taints (no kubelet ever reports).
fn controllers(key: &str) -> bool {
    key.starts_with("node.alpha.kubernetes.io/") || key.starts_with("node.kubernetes.io/")
}

/// The parts of node-1 the cases set, as the API server holds them (the controllers' own left
/// out).
fn node_parts(node: &Value) -> Value {
    let or = |v: &Value, empty: Value| if v.is_null() { empty } else { v.clone() };
    let taints: Vec<Value> = node["spec"]["taints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| !controllers(t["key"].as_str().unwrap_or("")))
        .map(|t| json!({"key": t["key"], "effect": t["effect"]}))
        .collect();
    let mut annotations = or(&node["metadata"]["annotations"], json!({}));
    annotations
        .as_object_mut()
        .unwrap()
        .retain(|k, _| !controllers(k));
    json!({
        "labels": or(&node["metadata"]["labels"], json!({})),
        "annotations": annotations,
        "finalizers": or(&node["metadata"]["finalizers"], json!([])),
        "taints": taints,
        "unschedulable": node["spec"]["unschedulable"].as_bool().unwrap_or(false),
    })
}

/// Puts node-1 into `state` as the admin (retrying on conflicts: the node lifecycle
/// controller writes the Node too).
fn set_node(state: &Value) {
    eventually("node-1 set", Duration::from_secs(30), || {
        let mut node = get_json(&["node", "node-1"]).unwrap();
        let kept: serde_json::Map<String, Value> = node["metadata"]["annotations"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| controllers(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for key in ["labels", "annotations", "finalizers"] {
            match state["metadata"].get(key) {
                Some(value) => node["metadata"][key] = value.clone(),
                None => {
                    node["metadata"].as_object_mut().unwrap().remove(key);
                }
            }
        }
        if !kept.is_empty() {
            let annotations = node["metadata"]
                .as_object_mut()
                .unwrap()
                .entry("annotations")
                .or_insert(json!({}));
            annotations.as_object_mut().unwrap().extend(kept.clone());
        }
        // The test's own label stays, so that a reset finds the Node.
        node["metadata"]["labels"]
            .as_object_mut()
            .map(|l| l.insert(TEST_LABEL.into(), json!("privilege")));
        if node["metadata"]["labels"].is_null() {
            node["metadata"]["labels"] = json!({TEST_LABEL: "privilege"});
        }
        for key in ["taints", "unschedulable"] {
            match state["spec"].get(key) {
                Some(value) => node["spec"][key] = value.clone(),
                None => {
                    node["spec"].as_object_mut().unwrap().remove(key);
                }
            }
        }
        let out = support::kubectl_stdin(&["replace", "-f", "-"], &node.to_string());
        if out.ok {
            Ok(())
        } else {
            Err(out.text())
        }
    });
}

/// node-1's parts with the test's own label taken out.
fn held() -> Value {
    let mut parts = node_parts(&get_json(&["node", "node-1"]).unwrap());
    parts["labels"].as_object_mut().unwrap().remove(TEST_LABEL);
    parts
}

/// `kubectl patch node node-1` (merge) as `who`.
fn patch_as(installed: &Installation, who: Who, patch: &Value) -> support::Run {
    let patch = patch.to_string();
    let args = ["patch", "node", "node-1", "--type=merge", "-p", &patch];
    let kubeconfig = match who {
        Who::Agent => &installed.agent,
        Who::AgentOfNode2 => &installed.agent_of_node_2,
        Who::AgentUnbound => &installed.agent_unbound,
        Who::AgentUnscheduled => &installed.agent_unscheduled,
        Who::Operator => &installed.operator,
        Who::AgentEmptyNodeName => {
            return support::kubectl(
                &[
                    &args[..],
                    &[
                        "--as",
                        AGENT,
                        "--as-group",
                        "system:serviceaccounts",
                        "--as-group",
                        "system:serviceaccounts:regmirror-system",
                        "--as-group",
                        "system:authenticated",
                        "--as-user-extra",
                        "authentication.kubernetes.io/node-name=",
                    ],
                ]
                .concat(),
            );
        }
        Who::Kubelet => {
            return support::kubectl(
                &[
                    &args[..],
                    &[
                        "--as",
                        "system:node:node-1",
                        "--as-group",
                        "system:nodes",
                        "--as-group",
                        "system:authenticated",
                    ],
                ]
                .concat(),
            );
        }
    };
    kubectl_as(kubeconfig, &args)
}

const POLICY: &str = "ValidatingAdmissionPolicy 'regmirror-agent-node-updates'";

#[test]
fn the_admission_policy_confines_the_agent_to_its_own_node_annotations() {
    let _chart = chart_lock();
    let installed = install();
    let started = std::time::Instant::now();
    // A new policy is enforced once the API server's informer has it: wait for its first
    // denial (an agent relabelling its node).
    let node = base_node();
    let relabel = merge_patch(&node, &changed(&node, "metadata.labels", None));
    eventually(
        "the policy denies its first request",
        Duration::from_secs(60),
        || {
            set_node(&node);
            let out = patch_as(&installed, Who::Agent, &relabel);
            if !out.ok && out.stderr.contains(POLICY) {
                Ok(())
            } else {
                Err(out.text())
            }
        },
    );
    eprintln!(
        "policy enforced after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let cases = cases();
    let mut failures = Vec::new();
    for (name, old, new, who, expected) in &cases {
        set_node(old);
        let before = held();
        assert_eq!(before, node_parts(old), "{name}: node-1 was not set");
        let out = patch_as(&installed, *who, &merge_patch(old, new));
        let after = held();
        match expected {
            None => {
                if !out.ok {
                    failures.push(format!(
                        "{name} ({who:?}): must be admitted:\n{}",
                        out.text()
                    ));
                } else if after != node_parts(new) {
                    failures.push(format!(
                        "{name} ({who:?}): admitted, but the API server holds {after}, not {}",
                        node_parts(new)
                    ));
                }
            }
            Some(denial) => {
                let text = out.text();
                if out.ok || !text.contains(POLICY) || !text.contains(denial) {
                    failures.push(format!(
                        "{name} ({who:?}): must be denied by the policy with {denial:?}:\n{text}"
                    ));
                }
                if after != before {
                    failures.push(format!(
                        "{name} ({who:?}): denied, yet node-1 changed to {after}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    eprintln!(
        "{} node updates through the real admission policy in {:.1} s",
        cases.len(),
        started.elapsed().as_secs_f64()
    );
    chart::reset();
}
