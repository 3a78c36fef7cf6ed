//! The controller's Kubernetes shell against kube's mocked service: the exact requests one
//! reconcile pass sends for a first rollout, a rotated password, nothing changed, a refused
//! cross-namespace reference and an agent-reported failure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::runtime::events::{Recorder, Reporter};
use prometheus_client::registry::Registry;
use regmirror::controller::{reconcile as reconcile_pass, Metrics, Settings, Writer};
use regmirror_core::api::{Endpoint, EndpointAuth, ObjectRef, RegistryMirror, RegistryMirrorSpec};
use regmirror_core::contract::{
    CONFIG_KEY, CONFIG_LABEL, CURRENT_CONFIG, DESIRED_CONFIG, MESSAGE, STATE,
};
use regmirror_core::decide::Decision;
use regmirror_core::plan::MaxUnavailable;
use regmirror_testbed::api::{mock_client, Recorded};
use regmirror_testbed::cluster::{ready_node, Cluster};

#[path = "../benches/support/mod.rs"]
mod support;
use serde_json::{json, Value};

const NS: &str = "regmirror-system";
const ROLE: &str = "regmirror-agent-configs";

fn settings() -> Settings {
    Settings {
        namespace: NS.into(),
        allowed_namespaces: vec![],
        max_unavailable: MaxUnavailable::Count(1),
        agent_role: ROLE.into(),
        lease_name: "regmirror-controller".into(),
        identity: "regmirror-0".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
    }
}

/// Two k3s agent nodes with regmirror's agent running, a pull Secret, one mirror using it.
fn cluster() -> Cluster {
    let mut mirror = RegistryMirror::new(
        "docker-hub",
        RegistryMirrorSpec {
            registry: "docker.io".into(),
            endpoints: vec![Endpoint {
                url: "https://mirror.internal.example:5000".into(),
                auth: Some(EndpointAuth::from_secret("mirror-pull")),
                tls: None,
            }],
            rewrites: vec![],
            node_selector: None,
        },
    );
    mirror.metadata.generation = Some(1);
    mirror.metadata.uid = Some("uid-docker-hub".into());
    Cluster {
        mirrors: vec![mirror],
        nodes: vec![ready_node("edge-1", "k3s"), ready_node("edge-2", "k3s")],
        secrets: vec![pull_secret("one")],
        namespace: NS.into(),
        ..Cluster::default()
    }
}

/// Runs one pass against a mocked API server; returns the decision and every request.
async fn reconcile(cluster: &Cluster) -> (Decision, Vec<Recorded>) {
    let (client, log) = mock_client(answer);
    let writer = Writer {
        client: client.clone(),
        namespace: NS.into(),
        agent_role: ROLE.into(),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "regmirror".into(),
                instance: None,
            },
        ),
    };
    let metrics = Metrics::register(&mut Registry::default());
    let snapshot = support::snapshot(cluster);
    let decision = reconcile_pass(&snapshot, &settings(), &writer, &metrics)
        .await
        .unwrap();
    (decision, log.take())
}

/// The cluster after the API server took `decision` and every agent applied its config.
fn settled(cluster: &Cluster, decision: &Decision) -> Cluster {
    let mut next = cluster.clone();
    next.settle(decision, ROLE);
    next
}

/// Runs passes until nothing is written, agents always succeeding.
async fn converged(mut cluster: Cluster) -> Cluster {
    for _ in 0..10 {
        let (decision, _) = reconcile(&cluster).await;
        if decision.writes() == 0 {
            return cluster;
        }
        cluster.settle(&decision, ROLE);
    }
    panic!("no convergence");
}

fn node_annotation(cluster: &Cluster, node: &str, key: &str) -> String {
    let n = cluster
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node))
        .unwrap();
    n.metadata.annotations.as_ref().unwrap()[key].clone()
}

fn pull_secret(password: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("mirror-pull".into()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/basic-auth".into()),
        data: Some(BTreeMap::from([
            ("username".into(), ByteString(b"puller".to_vec())),
            ("password".into(), ByteString(password.as_bytes().to_vec())),
        ])),
        ..Default::default()
    }
}

/// The API server's answer: the object written, as it would come back.
fn answer(request: &Recorded) -> (u16, Value) {
    let mut body = if request.body.is_object() {
        request.body.clone()
    } else {
        json!({})
    };
    let path = request.path.split('?').next().unwrap();
    let segments: Vec<&str> = path.split('/').collect();
    let (api_version, kind) = if path.contains("/events") {
        ("events.k8s.io/v1", "Event")
    } else if path.contains("/secrets") {
        ("v1", "Secret")
    } else if path.contains("/nodes/") {
        ("v1", "Node")
    } else if path.contains("/roles/") {
        ("rbac.authorization.k8s.io/v1", "Role")
    } else {
        body["spec"] = json!({"registry": "docker.io", "endpoints": [{"url": "https://x"}]});
        ("regmirror.io/v1alpha1", "RegistryMirror")
    };
    body["apiVersion"] = json!(api_version);
    body["kind"] = json!(kind);
    if request.method != "POST" {
        let name = segments.iter().rev().find(|s| **s != "status").unwrap();
        body["metadata"]["name"] = json!(name);
    }
    (if request.method == "POST" { 201 } else { 200 }, body)
}

/// The request lines, Events shown by reason and subject.
fn lines(requests: &[Recorded]) -> Vec<String> {
    requests
        .iter()
        .map(|r| {
            if r.path.contains("/events") {
                format!(
                    "{} {} {} {}",
                    r.line(),
                    r.body["type"].as_str().unwrap(),
                    r.body["reason"].as_str().unwrap(),
                    r.body["regarding"]["name"].as_str().unwrap()
                )
            } else {
                r.line()
            }
        })
        .collect()
}

/// A new config stored, granted to the agents, given to edge-1 (one restart at a time).
fn new_config_for_edge_1() -> [String; 5] {
    [
        format!("POST /api/v1/namespaces/{NS}/secrets?"),
        format!("PATCH /apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles/{ROLE}{APPLY}"),
        "PATCH /api/v1/nodes/edge-1?".to_owned(),
        format!("PATCH /apis/regmirror.io/v1alpha1/registrymirrors/docker-hub/status{APPLY}"),
        format!("POST {EVENTS}? Normal ConfigScheduled edge-1"),
    ]
}

const APPLY: &str = "?&force=true&fieldManager=regmirror";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

#[tokio::test]
async fn first_rollout_stores_the_config_grants_it_and_points_a_node_at_it() {
    let cluster = cluster();
    let (decision, requests) = reconcile(&cluster).await;
    let config = decision.create.keys().next().unwrap().clone();
    assert!(config.starts_with("regmirror-config-"));
    assert_eq!(
        lines(&requests),
        new_config_for_edge_1(),
        "credentials in registries.yaml take a k3s restart: edge-2 waits for edge-1 (maxUnavailable 1)"
    );

    let secret = &requests[0].body;
    assert_eq!(secret["metadata"]["name"], json!(config));
    assert_eq!(secret["metadata"]["labels"][CONFIG_LABEL], json!("true"));
    assert_eq!(secret["immutable"], json!(true));
    assert_eq!(secret["type"], json!("regmirror.io/config"));
    let stored: Value =
        serde_json::from_slice(&base64_decode(secret["data"][CONFIG_KEY].as_str().unwrap()))
            .unwrap();
    let registries = stored["files"]["/etc/rancher/k3s/registries.yaml"]["content"]
        .as_str()
        .unwrap();
    assert!(
        registries.contains("mirror.internal.example:5000"),
        "{registries}"
    );
    assert_eq!(
        stored["files"]["/etc/rancher/k3s/registries.yaml"]["mode"],
        json!(0o600),
        "it holds a password"
    );

    assert_eq!(
        requests[1].body["rules"],
        json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": [config]}])
    );
    assert_eq!(
        requests[2].body,
        json!({"metadata": {"annotations": {DESIRED_CONFIG: config}}})
    );

    let status = &requests[3].body["status"];
    assert_eq!(status["observedGeneration"], json!(1));
    assert_eq!(
        status["nodes"],
        json!({"targeted": 2, "updated": 0, "pending": 2, "failed": 0})
    );
    let conditions: Vec<(&str, &str, &str)> = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap(),
                c["status"].as_str().unwrap(),
                c["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        conditions,
        [
            ("Ready", "False", "RollingOut"),
            ("Progressing", "True", "RollingOut"),
            ("Degraded", "False", "RollingOut")
        ]
    );
    assert_eq!(requests[4].body["regarding"]["uid"], json!("uid-edge-1"));
}

#[tokio::test]
async fn nothing_changed_means_no_request_at_all() {
    let cluster = converged(cluster()).await;
    let (decision, requests) = reconcile(&cluster).await;
    assert_eq!(decision.writes(), 0);
    assert_eq!(lines(&requests), Vec::<String>::new());
    let status = cluster.mirrors[0].status.as_ref().unwrap();
    assert_eq!(
        status.conditions[0].status, "True",
        "Ready once every node applied"
    );
}

#[tokio::test]
async fn a_rotated_password_restarts_one_node_at_a_time() {
    let mut cluster = converged(cluster()).await;
    let old = node_annotation(&cluster, "edge-1", CURRENT_CONFIG);
    cluster.secrets[0] = pull_secret("two");
    let (decision, requests) = reconcile(&cluster).await;
    let new = decision.create.keys().next().unwrap().clone();
    assert_ne!(new, old);
    assert_eq!(
        lines(&requests),
        new_config_for_edge_1(),
        "k3s reads credentials only at start: edge-2 waits for edge-1"
    );
    let mut granted = vec![new.clone(), old.clone()];
    granted.sort();
    assert_eq!(
        requests[1].body["rules"][0]["resourceNames"],
        json!(granted),
        "both live configs"
    );

    // edge-1 done: edge-2 moves; then the old config goes.
    let cluster = settled(&cluster, &decision);
    let (decision, requests) = reconcile(&cluster).await;
    assert_eq!(decision.advance, [("edge-2".to_owned(), new.clone())]);
    assert!(lines(&requests).contains(&"PATCH /api/v1/nodes/edge-2?".to_owned()));
    let cluster = settled(&cluster, &decision);
    let (_, requests) = reconcile(&cluster).await;
    assert_eq!(
        lines(&requests),
        [
            format!("PATCH /apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles/{ROLE}{APPLY}"),
            format!("PATCH /apis/regmirror.io/v1alpha1/registrymirrors/docker-hub/status{APPLY}"),
            format!("DELETE /api/v1/namespaces/{NS}/secrets/{old}?"),
            format!("POST {EVENTS}? Normal Applied docker-hub"),
        ]
    );
    assert_eq!(requests[0].body["rules"][0]["resourceNames"], json!([new]));
}

#[tokio::test]
async fn a_reference_into_another_namespace_is_refused_and_no_node_changes() {
    let mut cluster = converged(cluster()).await;
    cluster.mirrors[0].spec.endpoints[0].auth = Some(EndpointAuth {
        secret_ref: ObjectRef {
            name: "mirror-pull".into(),
            namespace: Some("kube-system".into()),
        },
    });
    cluster.mirrors[0].metadata.generation = Some(2);
    let (_, requests) = reconcile(&cluster).await;
    assert_eq!(
        lines(&requests),
        [
            format!("PATCH /apis/regmirror.io/v1alpha1/registrymirrors/docker-hub/status{APPLY}"),
            format!("POST {EVENTS}? Warning InvalidSpec docker-hub"),
        ]
    );
    let status = &requests[0].body["status"];
    let degraded = &status["conditions"][2];
    assert_eq!(
        (degraded["type"].as_str(), degraded["status"].as_str()),
        (Some("Degraded"), Some("True"))
    );
    assert_eq!(
        degraded["message"],
        json!("spec.endpoints[0].auth.secretRef: Secret kube-system/mirror-pull is in a namespace regmirror may not read (allowed: regmirror-system); nodes keep their current configuration")
    );
    assert_eq!(status["observedGeneration"], json!(2));
    let event = &requests[1].body;
    assert_eq!(event["note"], degraded["message"]);
    assert_eq!(event["regarding"]["kind"], json!("RegistryMirror"));
}

#[tokio::test]
async fn a_node_reporting_failure_halts_the_rollout_and_is_reported() {
    let mut cluster = converged(cluster()).await;
    cluster.secrets[0] = pull_secret("two");
    let (decision, _) = reconcile(&cluster).await;
    let mut cluster = settled(&cluster, &decision);
    // edge-1's agent could not bring k3s back with the new config and rolled back.
    let old = node_annotation(&cluster, "edge-2", CURRENT_CONFIG);
    let edge1 = cluster
        .nodes
        .iter_mut()
        .find(|n| n.metadata.name.as_deref() == Some("edge-1"))
        .unwrap();
    let a = edge1.metadata.annotations.as_mut().unwrap();
    a.insert(CURRENT_CONFIG.into(), old);
    a.insert(STATE.into(), "Failed".into());
    a.insert(
        MESSAGE.into(),
        "k3s-agent not active 300s after restart; restored the previous configuration".into(),
    );

    let (decision, requests) = reconcile(&cluster).await;
    assert!(
        decision.advance.is_empty(),
        "edge-2 does not get the config that failed"
    );
    assert_eq!(
        lines(&requests),
        [
            format!("PATCH /apis/regmirror.io/v1alpha1/registrymirrors/docker-hub/status{APPLY}"),
            format!("POST {EVENTS}? Warning NodesFailed docker-hub"),
        ]
    );
    let status = &requests[0].body["status"];
    assert_eq!(
        status["nodes"],
        json!({"targeted": 2, "updated": 0, "pending": 1, "failed": 1})
    );
    assert_eq!(
        status["failures"],
        json!([{"node": "edge-1", "reason": "k3s-agent not active 300s after restart; restored the previous configuration"}])
    );
    assert_eq!(status["conditions"][0]["reason"], json!("NodesFailed"));
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}
