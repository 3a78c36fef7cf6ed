//! The chart for real: `helm install` of charts/regmirror with the default values and with every
//! values file scripts/chart-checks renders (charts/regmirror/ci/*.yaml, the list of
//! tests/chart/chart_inputs.py), `helm upgrade`, `helm uninstall` leaving exactly what
//! docs/operating.md says it leaves, and `helm template | kubectl apply --dry-run=server` (the
//! GitOps path). There is no kubelet: the Pods are never run, so nothing waits for them
//! (Helm 4 waits for hooks only unless told `--wait`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use regmirror::controller::FIELD_MANAGER;
use regmirror_core::contract;
use regmirror_testbed::TokenOptions;
use serde_json::{json, Value};

use crate::support::{
    self, chart_lock, eventually, get_json, helm, identity, kubectl_ok, kubectl_stdin, plane, repo,
    run, run_ok, yaml_documents,
};

/// The release's namespace and name, as the README installs it.
pub const NAMESPACE: &str = "regmirror-system";
pub const RELEASE: &str = "regmirror";
/// Label on every object a test here makes itself, so a reset finds them.
pub const TEST_LABEL: &str = "regmirror-test";

/// A config Secret's name as the operator makes them (`regmirror-config-` + 20 hex digits).
pub const CONFIG_A: &str = "regmirror-config-0123456789abcdef0123";
pub const CONFIG_B: &str = "regmirror-config-fedcba9876543210fedc";

/// A stand-in for the Prometheus Operator's ServiceMonitor CRD, which no package this project
/// installs from ships: the fields the chart's ServiceMonitors set, typed, with the Prometheus
/// Operator's duration pattern; anything else is refused (strict field validation). The shape
/// of the chart's ServiceMonitors is also checked against the Prometheus Operator's own schema
/// by scripts/chart-checks (tests/chart/crd-models.test.mjs).
const SERVICE_MONITOR_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
  labels: {regmirror-test: stand-in}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          required: [spec]
          properties:
            spec:
              type: object
              required: [selector]
              properties:
                namespaceSelector:
                  type: object
                  properties:
                    any: {type: boolean}
                    matchNames: {type: array, items: {type: string}}
                selector:
                  type: object
                  properties:
                    matchLabels: {type: object, additionalProperties: {type: string}}
                endpoints:
                  type: array
                  items:
                    type: object
                    properties:
                      port: {type: string}
                      path: {type: string}
                      interval: {type: string, pattern: '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'}
                      scrapeTimeout: {type: string, pattern: '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'}
                      relabelings:
                        type: array
                        items:
                          type: object
                          properties:
                            sourceLabels: {type: array, items: {type: string, pattern: '^[a-zA-Z_][a-zA-Z0-9_]*$'}}
                            targetLabel: {type: string}
"#;

/// One value set of scripts/chart-checks: the defaults, or a file of charts/regmirror/ci/.
pub struct ValueSet {
    pub name: String,
    pub file: Option<PathBuf>,
    values: Value,
}

impl ValueSet {
    pub fn defaults() -> ValueSet {
        ValueSet {
            name: "default".into(),
            file: None,
            values: json!({}),
        }
    }

    /// `-f FILE`, or nothing for the defaults.
    pub fn args(&self) -> Vec<String> {
        match &self.file {
            Some(file) => vec!["-f".into(), file.display().to_string()],
            None => Vec::new(),
        }
    }

    /// A value of this set (by JSON pointer), or of the chart's values.yaml.
    fn value(&self, pointer: &str) -> Value {
        self.values
            .pointer(pointer)
            .or_else(|| chart_defaults().pointer(pointer))
            .cloned()
            .unwrap_or(Value::Null)
    }

    fn enabled(&self, pointer: &str) -> bool {
        self.value(pointer).as_bool().expect(pointer)
    }

    /// The caches' namespace (`cache.namespace`).
    pub fn cache_namespace(&self) -> String {
        self.value("/cache/namespace").as_str().unwrap().to_owned()
    }

    /// The namespaces of `allowedNamespaces` besides the release's.
    fn allowed_namespaces(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for namespace in self.value("/allowedNamespaces").as_array().unwrap() {
            let namespace = namespace.as_str().unwrap().to_owned();
            if namespace != NAMESPACE && !out.contains(&namespace) {
                out.push(namespace);
            }
        }
        out
    }
}

fn chart_defaults() -> &'static Value {
    static DEFAULTS: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    DEFAULTS.get_or_init(|| {
        let text = std::fs::read_to_string(repo().join("charts/regmirror/values.yaml")).unwrap();
        serde_yaml::from_str(&text).unwrap()
    })
}

/// The defaults and every charts/regmirror/ci/*.yaml, sorted: what scripts/chart-checks renders.
pub fn value_sets() -> Vec<ValueSet> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("charts/regmirror/ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "charts/regmirror/ci/ holds no values file"
    );
    let mut sets = vec![ValueSet::defaults()];
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        sets.push(ValueSet {
            name: file.file_stem().unwrap().to_string_lossy().into_owned(),
            values: serde_yaml::from_str(&text).unwrap(),
            file: Some(file),
        });
    }
    sets
}

/// `helm uninstall` here, where no kubelet runs Pods: without `--no-hooks` the chart's
/// pre-delete hook Job (the agents' cleanup on every node) would wait for a Pod that never
/// starts, until its deadline. The hook runs on a real node in testbed/tests/chart_on_node.rs.
const UNINSTALL_WITHOUT_KUBELET: [&str; 5] = ["uninstall", RELEASE, "-n", NAMESPACE, "--no-hooks"];

/// Removes every trace of the chart and of these tests: the release, the namespaces, the Nodes
/// and RegistryMirrors the tests made, the stand-in ServiceMonitor CRD.
pub fn reset() {
    support::crd_applied();
    if run(helm().args(["status", RELEASE, "-n", NAMESPACE]), None).ok {
        run_ok(helm().args(UNINSTALL_WITHOUT_KUBELET), None);
    }
    let selector = format!("--selector={TEST_LABEL}");
    // Pods bound to a Node never end gracefully without a kubelet.
    for namespace in namespaces_of_tests() {
        kubectl_ok(&[
            "delete",
            "pods",
            "--all",
            "-n",
            &namespace,
            "--force",
            "--grace-period=0",
            "--ignore-not-found",
        ]);
    }
    kubectl_ok(&[
        "delete",
        "registrymirrors,nodes",
        &selector,
        "--ignore-not-found",
    ]);
    kubectl_ok(&[
        "delete",
        "secrets",
        "-n",
        "default",
        &selector,
        "--ignore-not-found",
    ]);
    kubectl_ok(&[
        "delete",
        "namespaces",
        &selector,
        "--ignore-not-found",
        "--wait=false",
    ]);
    kubectl_ok(&[
        "delete",
        "namespace",
        NAMESPACE,
        "--ignore-not-found",
        "--wait=false",
    ]);
    eventually(
        "the tests' namespaces are gone",
        Duration::from_secs(120),
        || {
            let left = namespaces_of_tests();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    );
    kubectl_ok(&[
        "delete",
        "crd",
        "--selector=regmirror-test=stand-in",
        "--ignore-not-found",
    ]);
}

fn namespaces_of_tests() -> Vec<String> {
    let labelled = kubectl_ok(&[
        "get",
        "namespaces",
        &format!("--selector={TEST_LABEL}"),
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]);
    let mut names: Vec<String> = labelled.split_whitespace().map(str::to_owned).collect();
    if get_json(&["namespace", NAMESPACE]).is_some() {
        names.push(NAMESPACE.to_owned());
    }
    names
}

/// A namespace made by a test (labelled, so a reset removes it); `privileged` as the README
/// says the release namespace must be.
pub fn create_namespace(name: &str, privileged: bool) {
    kubectl_ok(&["create", "namespace", name]);
    kubectl_ok(&["label", "namespace", name, &format!("{TEST_LABEL}=true")]);
    if privileged {
        kubectl_ok(&[
            "label",
            "namespace",
            name,
            "pod-security.kubernetes.io/enforce=privileged",
        ]);
    }
}

/// Makes ready what a value set needs before `helm install`: the release namespace (unless the
/// chart renders it), the allowed namespaces, the ServiceMonitor CRD. The extra arguments of
/// `helm install`.
pub fn prepare(set: &ValueSet) -> Vec<String> {
    support::crd_applied();
    let mut args = set.args();
    if set.enabled("/namespace/create") {
        // The chart renders the release namespace; Helm needs it before it stores the release:
        // --create-namespace makes it, and the rendered Namespace then takes it over.
        args.push("--create-namespace".into());
    } else {
        create_namespace(NAMESPACE, true);
    }
    for namespace in set.allowed_namespaces() {
        create_namespace(&namespace, false);
    }
    if set.enabled("/metrics/serviceMonitor/enabled") {
        let out = kubectl_stdin(&["apply", "--server-side", "-f", "-"], SERVICE_MONITOR_CRD);
        assert!(out.ok, "{}", out.text());
        support::wait_established("servicemonitors.monitoring.coreos.com");
    }
    args
}

/// `helm install` of the chart; must succeed. Its output.
pub fn install(extra: &[String]) -> String {
    let mut command = helm();
    command.args(["install", RELEASE, "charts/regmirror", "-n", NAMESPACE]);
    command.args(extra);
    run_ok(&mut command, None)
}

/// The release's status and revision, as Helm reads them from the cluster.
fn release() -> (String, i64) {
    let out = run_ok(
        helm().args(["status", RELEASE, "-n", NAMESPACE, "-o", "json"]),
        None,
    );
    let status: Value = serde_json::from_str(&out).unwrap();
    (
        status["info"]["status"].as_str().unwrap().to_owned(),
        status["version"].as_i64().unwrap(),
    )
}

/// Every object of the release's manifest is on the API server with every field the chart set;
/// returns them as the API server holds them, by identity.
fn assert_server_holds_the_manifest() -> Vec<Value> {
    let manifest = run_ok(
        helm().args(["get", "manifest", RELEASE, "-n", NAMESPACE]),
        None,
    );
    let documents = yaml_documents(&manifest);
    assert!(!documents.is_empty(), "empty manifest");
    let out = kubectl_stdin(&["get", "-f", "-", "-o", "json"], &manifest);
    assert!(
        out.ok,
        "objects of the manifest are missing:\n{}",
        out.text()
    );
    let listed: Value = serde_json::from_str(&out.stdout).unwrap();
    let items = listed["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), documents.len());
    for (document, item) in documents.iter().zip(&items) {
        let mut document = document.clone();
        // Namespaced objects of the chart are rendered with the release namespace.
        if document["metadata"]["namespace"].is_null() && !item["metadata"]["namespace"].is_null() {
            document["metadata"]["namespace"] = json!(NAMESPACE);
        }
        assert_eq!(identity(item), identity(&document));
        if let Err(difference) = support::contains(item, &document, "") {
            panic!(
                "{}: the API server holds other than the chart set: {difference}",
                identity(item)
            );
        }
        assert_eq!(
            item["metadata"]["annotations"]["meta.helm.sh/release-name"],
            RELEASE,
            "{}",
            identity(item)
        );
    }
    items
}

fn find<'a>(items: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    items
        .iter()
        .find(|i| i["kind"] == kind && i["metadata"]["name"] == name)
}

fn count(items: &[Value], kind: &str) -> usize {
    items.iter().filter(|i| i["kind"] == kind).count()
}

fn env_value(workload: &Value, name: &str) -> Value {
    workload["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| e.get("value").cloned().unwrap_or(json!("")))
        .unwrap_or(Value::Null)
}

/// What the values switch on or off is what the API server holds.
fn assert_values_took_effect(set: &ValueSet, items: &[Value], replicas: i64, log_level: &str) {
    let what = &set.name;
    let deployment = find(items, "Deployment", "regmirror-operator").expect("the operator");
    let daemonset = find(items, "DaemonSet", "regmirror-agent").expect("the agent");
    assert_eq!(deployment["spec"]["replicas"], replicas, "{what}");
    assert_eq!(env_value(deployment, "RUST_LOG"), log_level, "{what}");
    assert_eq!(env_value(daemonset, "RUST_LOG"), log_level, "{what}");
    let policy = set.enabled("/admissionPolicy/enabled");
    assert_eq!(
        count(items, "ValidatingAdmissionPolicy"),
        policy as usize,
        "{what}"
    );
    assert_eq!(
        count(items, "ValidatingAdmissionPolicyBinding"),
        policy as usize,
        "{what}"
    );
    let services = set.enabled("/metrics/service/enabled");
    assert_eq!(count(items, "Service"), 2 * services as usize, "{what}");
    let monitors = set.enabled("/metrics/serviceMonitor/enabled");
    assert_eq!(
        count(items, "ServiceMonitor"),
        2 * monitors as usize,
        "{what}"
    );
    let pdb = set.enabled("/operator/podDisruptionBudget/enabled") && replicas > 1;
    assert_eq!(count(items, "PodDisruptionBudget"), pdb as usize, "{what}");
    let namespace = set.enabled("/namespace/create");
    // The release's when asked for, and always the caches' (Pod Security restricted).
    assert_eq!(count(items, "Namespace"), namespace as usize + 1, "{what}");
    let caches = set.cache_namespace();
    let cache_namespace = items
        .iter()
        .find(|i| i["kind"] == "Namespace" && i["metadata"]["name"] == json!(caches))
        .unwrap_or_else(|| panic!("{what}: no Namespace {caches}"));
    assert_eq!(
        cache_namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        json!("restricted"),
        "{what}"
    );
    assert!(items.iter().any(|i| i["kind"] == "Role"
        && i["metadata"]["name"] == "regmirror-operator-caches"
        && i["metadata"]["namespace"] == json!(caches)));
    assert_eq!(
        env_value(deployment, "REGMIRROR_CACHE_NAMESPACE"),
        caches,
        "{what}"
    );
    let allowed = set.allowed_namespaces();
    let references: BTreeSet<String> = items
        .iter()
        .filter(|i| i["kind"] == "Role" && i["metadata"]["name"] == "regmirror-operator-references")
        .map(|i| i["metadata"]["namespace"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(references, allowed.iter().cloned().collect(), "{what}");
    assert_eq!(
        env_value(deployment, "REGMIRROR_ALLOWED_NAMESPACES"),
        allowed.join(","),
        "{what}"
    );
    // The chart never makes the Role of the agents' configs: the operator does.
    assert!(find(items, "Role", "regmirror-agent-configs").is_none());
}

/// The objects of regmirror on the API server: named after it, in its namespace or the allowed
/// ones, of its API group, or carrying its labels or annotations; Events left out (records, not
/// objects), and so are the objects every namespace gets (ServiceAccount `default`, ConfigMap
/// `kube-root-ca.crt`). RegistryMirrors count only if made by these tests with `owner` (the CRD
/// tests make others on the same control plane).
pub fn regmirror_objects(allowed: &[String], owner: &str) -> BTreeSet<String> {
    let kinds: Vec<String> = kubectl_ok(&["api-resources", "--verbs=list", "-o", "name"])
        .lines()
        .filter(|k| !["events", "events.events.k8s.io", "componentstatuses"].contains(k))
        .map(str::to_owned)
        .collect();
    let out = kubectl_ok(&["get", &kinds.join(","), "-A", "-o", "json"]);
    let listed: Value = serde_json::from_str(&out).unwrap();
    let mentions = |map: &Value| {
        map.as_object().is_some_and(|m| {
            m.iter().any(|(k, v)| {
                k.contains("regmirror") || v.as_str().is_some_and(|v| v.contains("regmirror"))
            })
        })
    };
    listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|item| {
            let meta = &item["metadata"];
            let name = meta["name"].as_str().unwrap_or("");
            let namespace = meta["namespace"].as_str().unwrap_or("");
            if item["kind"] == "RegistryMirror" {
                return meta["labels"][TEST_LABEL] == owner;
            }
            if (item["kind"] == "ServiceAccount" && name == "default")
                || (item["kind"] == "ConfigMap" && name == "kube-root-ca.crt")
            {
                return false;
            }
            let labels_without_test = {
                let mut labels = meta["labels"].clone();
                if let Some(m) = labels.as_object_mut() {
                    m.remove(TEST_LABEL);
                }
                labels
            };
            name.contains("regmirror")
                || namespace == NAMESPACE
                || allowed.iter().any(|a| a == namespace)
                || item["apiVersion"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("regmirror.io/")
                || mentions(&labels_without_test)
                || mentions(&meta["annotations"])
        })
        .map(identity)
        .collect()
}

/// What a running operator and users leave in a cluster, made as they make it: the mirrors of
/// examples/ and their credentials (a user), and as the operator's ServiceAccount (its
/// TokenRequest token): the sealing key, a config Secret, the agents' Role, the leader Lease,
/// and a Node pointed at the config.
fn simulate_use(node: &str) {
    let examples = repo().join("examples");
    for file in ["registry-credentials.yaml", "docker-hub.yaml", "quay.yaml"] {
        kubectl_ok(&["apply", "-f", examples.join(file).to_str().unwrap()]);
    }
    kubectl_ok(&[
        "label",
        "registrymirrors",
        "docker-hub",
        "quay",
        &format!("{TEST_LABEL}=chart"),
    ]);
    let out = kubectl_stdin(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "labels": {TEST_LABEL: "chart"}}})
        .to_string(),
    );
    assert!(out.ok, "{}", out.text());
    support::runtime().block_on(async {
        let operator = plane()
            .service_account_client(NAMESPACE, "regmirror-operator", &TokenOptions::default())
            .await;
        let secrets: Api<Secret> = Api::namespaced(operator.clone(), NAMESPACE);
        let mut key = regmirror_testbed::cluster::sealing_key_secret(NAMESPACE);
        key.metadata.namespace = None;
        secrets.create(&PostParams::default(), &key).await.unwrap();
        secrets
            .create(
                &PostParams::default(),
                &contract::config_secret(CONFIG_A, b"sealed".to_vec()),
            )
            .await
            .unwrap();
        apply_agent_role(&operator, &[CONFIG_A]).await;
        let leases: Api<Lease> = Api::namespaced(operator.clone(), NAMESPACE);
        leases
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": "regmirror-controller"},
                    "spec": {"holderIdentity": "regmirror-operator-0", "leaseDurationSeconds": 15},
                }))
                .unwrap(),
            )
            .await
            .unwrap();
        let nodes: Api<Node> = Api::all(operator);
        let patch = json!({"metadata": {"annotations": {
            contract::DESIRED_CONFIG: CONFIG_A,
            contract::DESIRED_ACTIVATION: "Hot",
        }}});
        nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    });
}

/// The Role `regmirror-agent-configs` as the operator writes it: core::contract's `agent_role`,
/// by server-side apply with the operator's field manager.
pub async fn apply_agent_role(operator: &kube::Client, configs: &[&str]) {
    let names: Vec<String> = configs.iter().map(|c| c.to_string()).collect();
    let role = contract::agent_role("regmirror-agent-configs", &names);
    let mut body = serde_json::to_value(&role).unwrap();
    body["apiVersion"] = json!("rbac.authorization.k8s.io/v1");
    body["kind"] = json!("Role");
    let roles: Api<k8s_openapi::api::rbac::v1::Role> = Api::namespaced(operator.clone(), NAMESPACE);
    roles
        .patch(
            "regmirror-agent-configs",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .unwrap();
}

#[test]
fn helm_install_upgrade_uninstall_with_every_value_set() {
    let _chart = chart_lock();
    for set in value_sets() {
        let started = std::time::Instant::now();
        reset();
        let args = prepare(&set);

        // install
        let installed = install(&args);
        assert!(installed.contains("STATUS: deployed"), "{installed}");
        assert_eq!(release(), ("deployed".into(), 1), "{}", set.name);
        let items = assert_server_holds_the_manifest();
        let replicas = set.value("/operator/replicas").as_i64().unwrap();
        let log_level = set.value("/logLevel").as_str().unwrap().to_owned();
        assert_values_took_effect(&set, &items, replicas, &log_level);

        // upgrade, as docs/operating.md does it (CRD first, then --reuse-values)
        kubectl_ok(&[
            "apply",
            "--server-side",
            "-f",
            repo().join("crds").to_str().unwrap(),
        ]);
        let upgraded = run_ok(
            helm().args([
                "upgrade",
                RELEASE,
                "charts/regmirror",
                "-n",
                NAMESPACE,
                "--reuse-values",
                "--set",
                "operator.replicas=4",
                "--set",
                "logLevel=regmirror=trace",
            ]),
            None,
        );
        assert!(upgraded.contains("has been upgraded"), "{upgraded}");
        assert_eq!(release(), ("deployed".into(), 2), "{}", set.name);
        let items = assert_server_holds_the_manifest();
        assert_values_took_effect(&set, &items, 4, "regmirror=trace");
        // The Deployment rolled to a new template (a second ReplicaSet).
        eventually(
            "a ReplicaSet of the new template",
            Duration::from_secs(60),
            || {
                let sets = kubectl_ok(&[
                    "get",
                    "replicasets",
                    "-n",
                    NAMESPACE,
                    "-l",
                    "app.kubernetes.io/component=operator",
                    "-o",
                    "name",
                ]);
                if sets.lines().count() == 2 {
                    Ok(())
                } else {
                    Err(sets)
                }
            },
        );

        // uninstall, after the cluster was used
        let node = "chart-node";
        simulate_use(node);
        let allowed = set.allowed_namespaces();
        let before = regmirror_objects(&allowed, "chart");
        let uninstalled = run_ok(helm().args(UNINSTALL_WITHOUT_KUBELET), None);
        assert!(
            uninstalled.contains(&format!("release \"{RELEASE}\" uninstalled")),
            "{uninstalled}"
        );
        // docs/operating.md, "Uninstall": it leaves the node annotations, the config Secrets
        // and the Role regmirror-agent-configs (until the namespace is deleted), the CRD and
        // every RegistryMirror. The user's own Secrets and ConfigMaps in the namespace stay
        // too, and so do two objects of the operator the docs do not name: the sealing key
        // Secret and the leader Lease.
        let mut expected: BTreeSet<String> = [
            "CustomResourceDefinition registrymirrors.regmirror.io",
            // The API server's own registration of the CRD's group version.
            "APIService v1alpha1.regmirror.io",
            "RegistryMirror docker-hub",
            "RegistryMirror quay",
            &format!("Node {node}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !set.enabled("/namespace/create") {
            for kept in [
                format!("Namespace {NAMESPACE}"),
                format!("Secret {NAMESPACE}/mirror-pull"),
                format!("ConfigMap {NAMESPACE}/registry-ca"),
                format!("Secret {NAMESPACE}/{CONFIG_A}"),
                format!("Role {NAMESPACE}/regmirror-agent-configs"),
                format!("Secret {NAMESPACE}/regmirror-sealing-key"),
                format!("Lease {NAMESPACE}/regmirror-controller"),
            ] {
                expected.insert(kept);
            }
        }
        // With namespace.create the release owns its namespace: uninstalling deletes it and,
        // with it, everything in it (the config Secrets, the Role, the user's credentials).
        for object in &expected {
            assert!(
                before.contains(object),
                "{object} was never there: {before:#?}"
            );
        }
        let left = eventually(
            &format!(
                "{}: helm uninstall leaves exactly the documented objects",
                set.name
            ),
            Duration::from_secs(120),
            || {
                let left = regmirror_objects(&allowed, "chart");
                if left == expected {
                    Ok(left)
                } else {
                    Err(format!(
                        "left but not expected: {:#?}\nexpected but gone: {:#?}",
                        left.difference(&expected).collect::<Vec<_>>(),
                        expected.difference(&left).collect::<Vec<_>>()
                    ))
                }
            },
        );
        assert!(run(helm().args(["status", RELEASE, "-n", NAMESPACE]), None)
            .stderr
            .contains("release: not found"));
        // The node keeps what the operator told it.
        let annotations = get_json(&["node", node]).unwrap()["metadata"]["annotations"].clone();
        assert_eq!(
            annotations[contract::DESIRED_CONFIG],
            CONFIG_A,
            "{annotations}"
        );
        eprintln!(
            "{}: install, upgrade, uninstall in {:.1} s; left: {left:?}",
            set.name,
            started.elapsed().as_secs_f64()
        );
    }
    reset();
}

#[test]
fn helm_template_is_accepted_by_a_server_side_dry_run() {
    let _chart = chart_lock();
    for set in value_sets() {
        reset();
        prepare(&set);
        // GitOps tools create the namespace before the objects in it (Argo CD's
        // CreateNamespace, Flux's namespaces first); a dry run creates nothing, so the
        // namespaced objects of one stream cannot land in a namespace the same stream makes.
        if get_json(&["namespace", NAMESPACE]).is_none() {
            create_namespace(NAMESPACE, true);
        }
        // The caches' namespace is the chart's own object: there it is made by the same apply.
        let caches = set.cache_namespace();
        if get_json(&["namespace", &caches]).is_none() {
            create_namespace(&caches, false);
        }
        let mut command = helm();
        command.args([
            "template",
            RELEASE,
            "charts/regmirror",
            "-n",
            NAMESPACE,
            "--include-crds",
        ]);
        command.args(set.args());
        let rendered = run_ok(&mut command, None);
        let documents = yaml_documents(&rendered);
        let out = kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &rendered);
        assert!(
            out.ok,
            "{}: the API server refused the rendering:\n{}",
            set.name,
            out.text()
        );
        let lines: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| l.ends_with("(server dry run)"))
            .collect();
        assert_eq!(
            lines.len(),
            documents.len(),
            "{}:\n{}",
            set.name,
            out.stdout
        );
        // Nothing was stored: every object but the CRD and namespace made beforehand is absent.
        for document in &documents {
            let kind = document["kind"].as_str().unwrap();
            if ["CustomResourceDefinition", "Namespace"].contains(&kind) {
                continue;
            }
            let namespaced = !document["metadata"]["namespace"].is_null()
                || ![
                    "ClusterRole",
                    "ClusterRoleBinding",
                    "ValidatingAdmissionPolicy",
                    "ValidatingAdmissionPolicyBinding",
                ]
                .contains(&kind);
            let namespace = document["metadata"]["namespace"]
                .as_str()
                .unwrap_or(NAMESPACE);
            let name = document["metadata"]["name"].as_str().unwrap();
            let resource = format!(
                "{}.{}",
                kind.to_lowercase(),
                document["apiVersion"]
                    .as_str()
                    .unwrap()
                    .split('/')
                    .next()
                    .unwrap()
            );
            let resource = if document["apiVersion"].as_str().unwrap().contains('/') {
                resource
            } else {
                kind.to_lowercase()
            };
            let mut args = vec![resource.as_str(), name];
            if namespaced {
                args.extend_from_slice(&["-n", namespace]);
            }
            assert!(
                get_json(&args).is_none(),
                "{}: the dry run stored {}",
                set.name,
                identity(document)
            );
        }
    }
    reset();
}
