//! The controller's Kubernetes shell against kube's mocked service: the exact requests one
//! reconcile pass sends for a first rollout, a rotated password, nothing changed, a refused
//! cross-namespace reference and an agent-reported failure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use prometheus_client::registry::Registry;
use regmirror::controller::{reconcile as reconcile_pass, Metrics, Settings, Snapshot, Writer};
use regmirror_core::api::{Endpoint, EndpointAuth, ObjectRef, RegistryMirror, RegistryMirrorSpec};
use regmirror_core::contract::{
    CONFIG_KEY, CONFIG_LABEL, CURRENT_CONFIG, DESIRED_ACTIVATION, DESIRED_CONFIG, MESSAGE,
    SEALED_CONFIG_KEY, STATE,
};
use regmirror_core::decide::Decision;
use regmirror_core::plan::MaxUnavailable;
use regmirror_core::sources::ALLOWED_HOSTS;
use regmirror_process::events::EventPublisher;
use regmirror_testbed::api::{status_error, Recorded};
use regmirror_testbed::cluster::{node_key, ready_node, sealing_key, sealing_key_secret, Cluster};
use regmirror_testbed::fake_api::{event, events, Expect, Scenario};

use serde_json::{json, Value};

const NS: &str = "regmirror-system";

/// The snapshot a pass takes of `cluster`, as the controller's caches would hold it.
fn snapshot(c: &Cluster) -> Snapshot {
    Snapshot::from_objects(
        &c.mirrors,
        &c.nodes,
        &c.secrets,
        &c.config_maps,
        c.role.as_ref(),
        &c.namespace,
    )
}

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
        cache_image: "registry:3".into(),
        cache_namespace: "regmirror-cache".into(),
    }
}

/// Two k3s agent nodes with regmirror's agent running, a pull Secret, one mirror using it.
fn cluster() -> Cluster {
    let mut mirror = RegistryMirror::new(
        "docker-hub",
        RegistryMirrorSpec {
            cache: None,
            embedded_registry: false,
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
        secrets: vec![pull_secret("one"), sealing_key_secret(NS)],
        namespace: NS.into(),
        ..Cluster::default()
    }
}

/// Runs one pass against the fake API server expecting `scenario`; returns the decision and
/// every request.
async fn reconcile(cluster: &Cluster, scenario: Scenario) -> (Decision, Vec<Recorded>) {
    let (client, api) = scenario.serve();
    let metrics = Metrics::register(&mut Registry::default());
    let snapshot = snapshot(cluster);
    let decision = reconcile_pass(&snapshot, &settings(), &writer(client), &metrics)
        .await
        .unwrap();
    let requests = api.take();
    api.finish();
    (decision, requests)
}

/// A pass that only sets the scene (its requests are not what the test is about): any write
/// is answered as the API server would.
fn setting_the_scene() -> Scenario {
    ["POST", "PATCH", "PUT", "DELETE"]
        .into_iter()
        .fold(Scenario::new(), |s, method| {
            s.background(Expect::prefix(method, "/").answer_with(answer))
        })
}

/// `method` on `path`, answered as the API server would.
fn expect(method: &str, path: impl Into<String>) -> Expect {
    Expect::new(method, path).answer_with(answer)
}

fn writer(client: kube::Client) -> Writer {
    Writer {
        client: client.clone(),
        namespace: NS.into(),
        agent_role: ROLE.into(),
        events: EventPublisher::new(client, "regmirror", "regmirror-0"),
    }
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
        let (decision, _) = reconcile(&cluster, setting_the_scene()).await;
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
            annotations: Some(BTreeMap::from([(
                ALLOWED_HOSTS.to_owned(),
                "mirror.internal.example:5000".to_owned(),
            )])),
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
fn new_config_for_edge_1() -> Scenario {
    Scenario::new()
        .then(expect("POST", format!("/api/v1/namespaces/{NS}/secrets?")))
        .then(expect(
            "PATCH",
            format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles/{ROLE}{APPLY}"),
        ))
        .then(expect("PATCH", "/api/v1/nodes/edge-1?"))
        .then(expect(
            "PATCH",
            format!("/apis/regmirror.io/v1alpha1/registrymirrors/docker-hub/status{APPLY}"),
        ))
        .then(event("Normal", "RolloutStep", Some("docker-hub")))
}

/// The lines of [`new_config_for_edge_1`].
fn new_config_for_edge_1_lines() -> [String; 5] {
    [
        format!("POST /api/v1/namespaces/{NS}/secrets?"),
        format!("PATCH /apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles/{ROLE}{APPLY}"),
        "PATCH /api/v1/nodes/edge-1?".to_owned(),
        format!("PATCH /apis/regmirror.io/v1alpha1/registrymirrors/docker-hub/status{APPLY}"),
        format!("POST {EVENTS}? Normal RolloutStep docker-hub"),
    ]
}

const APPLY: &str = "?&force=true&fieldManager=regmirror";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

#[tokio::test]
async fn first_rollout_stores_the_config_grants_it_and_points_a_node_at_it() {
    let cluster = cluster();
    let (decision, requests) = reconcile(&cluster, new_config_for_edge_1()).await;
    let config = decision.create.keys().next().unwrap().clone();
    assert!(config.starts_with("regmirror-config-"));
    assert_eq!(
        lines(&requests),
        new_config_for_edge_1_lines(),
        "credentials in registries.yaml take a k3s restart: edge-2 waits for edge-1 (maxUnavailable 1)"
    );

    let event = &requests[4].body;
    assert_eq!(event["action"], json!("Rollout"));
    assert_eq!(
        event["note"],
        json!("told 1 node to apply a new configuration (1 with a runtime restart): edge-1"),
        "one Event per mirror and pass, not per node"
    );
    assert_eq!(event["regarding"]["kind"], json!("RegistryMirror"));
    assert_eq!(
        event["series"],
        json!(null),
        "never folded into an earlier Event"
    );

    let secret = &requests[0].body;
    assert_eq!(secret["metadata"]["name"], json!(config));
    assert_eq!(secret["metadata"]["labels"][CONFIG_LABEL], json!("true"));
    assert_eq!(secret["immutable"], json!(true));
    assert_eq!(secret["type"], json!("regmirror.io/config"));
    let sealed = base64_decode(secret["data"][SEALED_CONFIG_KEY].as_str().unwrap());
    assert!(
        !String::from_utf8_lossy(&sealed).contains("puller"),
        "the stored config is sealed"
    );
    let opened = sealing_key().open_config(&config, &sealed).unwrap();
    let stored = serde_json::to_value(&opened).unwrap();
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
    let annotations = &requests[2].body["metadata"]["annotations"];
    assert_eq!(annotations[DESIRED_CONFIG], json!(config));
    assert_eq!(
        annotations[DESIRED_ACTIVATION],
        json!("Restart"),
        "the step the operator budgeted travels with the config"
    );
    let sealed_key = annotations[CONFIG_KEY].as_str().unwrap();
    let key = node_key("edge-1").open_key(&config, sealed_key).unwrap();
    assert_eq!(
        key.open_config(&config, &sealed).unwrap(),
        opened,
        "edge-1 opens it"
    );
    assert!(
        node_key("edge-2").open_key(&config, sealed_key).is_err(),
        "edge-2 cannot open edge-1's key"
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
            ("Degraded", "False", "RollingOut"),
            ("Stalled", "False", "RollingOut")
        ]
    );
    assert_eq!(
        requests[4].body["regarding"]["uid"],
        json!("uid-docker-hub")
    );
}

#[tokio::test]
async fn nothing_changed_means_no_request_at_all() {
    let cluster = converged(cluster()).await;
    let (decision, requests) = reconcile(&cluster, Scenario::new()).await;
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
    let (decision, requests) = reconcile(&cluster, new_config_for_edge_1()).await;
    let new = decision.create.keys().next().unwrap().clone();
    assert_ne!(new, old);
    assert_eq!(
        lines(&requests),
        new_config_for_edge_1_lines(),
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
    let (decision, requests) = reconcile(
        &cluster,
        Scenario::new()
            .then(expect("PATCH", "/api/v1/nodes/edge-2?"))
            .then(expect(
                "PATCH",
                format!("/apis/regmirror.io/v1alpha1/registrymirrors/docker-hub/status{APPLY}"),
            ))
            .then(event("Normal", "RolloutStep", Some("docker-hub"))),
    )
    .await;
    assert_eq!(
        decision
            .advance
            .iter()
            .map(|a| (a.node.as_str(), a.config.as_str()))
            .collect::<Vec<_>>(),
        [("edge-2", new.as_str())]
    );
    assert!(lines(&requests).contains(&"PATCH /api/v1/nodes/edge-2?".to_owned()));
    let cluster = settled(&cluster, &decision);
    let (_, requests) = reconcile(
        &cluster,
        Scenario::new()
            .then(
                expect(
                    "PATCH",
                    format!(
                        "/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles/{ROLE}{APPLY}"
                    ),
                )
                .body_where("the new config alone granted", {
                    let new = new.clone();
                    move |b| b["rules"][0]["resourceNames"] == json!([new])
                }),
            )
            .then(expect(
                "PATCH",
                format!("/apis/regmirror.io/v1alpha1/registrymirrors/docker-hub/status{APPLY}"),
            ))
            .then(expect(
                "DELETE",
                format!("/api/v1/namespaces/{NS}/secrets/{old}?"),
            ))
            .then(event("Normal", "Applied", Some("docker-hub"))),
    )
    .await;
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
    let (_, requests) = reconcile(
        &cluster,
        Scenario::new()
            .then(expect(
                "PATCH",
                format!("/apis/regmirror.io/v1alpha1/registrymirrors/docker-hub/status{APPLY}"),
            ))
            .then(event("Warning", "InvalidSpec", Some("docker-hub"))),
    )
    .await;
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
    let (decision, _) = reconcile(&cluster, new_config_for_edge_1()).await;
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

    let (decision, requests) = reconcile(
        &cluster,
        Scenario::new()
            .then(expect(
                "PATCH",
                format!("/apis/regmirror.io/v1alpha1/registrymirrors/docker-hub/status{APPLY}"),
            ))
            .then(event("Warning", "NodesFailed", Some("docker-hub"))),
    )
    .await;
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

#[tokio::test]
async fn without_a_sealing_key_the_first_pass_makes_one_and_decides_nothing() {
    let mut cluster = cluster();
    cluster.secrets.retain(|s| {
        s.metadata.name.as_deref() != Some(regmirror_core::contract::SEALING_KEY_SECRET)
    });
    let (decision, requests) = reconcile(
        &cluster,
        Scenario::new().then(
            expect("POST", format!("/api/v1/namespaces/{NS}/secrets?"))
                .body_where("an immutable regmirror-sealing-key", |b| {
                    b["metadata"]["name"] == "regmirror-sealing-key" && b["immutable"] == true
                }),
        ),
    )
    .await;
    assert_eq!(decision.writes(), 0);
    assert_eq!(
        lines(&requests),
        [format!("POST /api/v1/namespaces/{NS}/secrets?")]
    );
    let secret = &requests[0].body;
    assert_eq!(secret["metadata"]["name"], json!("regmirror-sealing-key"));
    assert_eq!(secret["immutable"], json!(true));
    let key = base64_decode(secret["data"]["key"].as_str().unwrap());
    assert_eq!(key.len(), 32);
    assert_ne!(key, vec![0u8; 32]);
}

#[tokio::test]
async fn a_node_deleted_between_read_and_write_holds_back_no_other_write() {
    // Three containerd nodes take a hot change together; edge-2 is deleted before its write.
    let mut cluster = cluster();
    cluster.nodes = vec![
        ready_node("edge-1", "containerd"),
        ready_node("edge-2", "containerd"),
        ready_node("edge-3", "containerd"),
    ];
    // Every other write goes through, in order.
    let (client, api) = Scenario::new()
        .then(expect("POST", format!("/api/v1/namespaces/{NS}/secrets?")))
        .then(expect(
            "PATCH",
            format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles/{ROLE}{APPLY}"),
        ))
        .then(expect("PATCH", "/api/v1/nodes/edge-1?"))
        .then(Expect::patch("/api/v1/nodes/edge-2?").answer(
            404,
            status_error(404, "NotFound", "nodes \"edge-2\" not found"),
        ))
        .then(expect("PATCH", "/api/v1/nodes/edge-3?"))
        .then(expect(
            "PATCH",
            format!("/apis/regmirror.io/v1alpha1/registrymirrors/docker-hub/status{APPLY}"),
        ))
        .background(events())
        .serve();
    let writer = writer(client);
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let snapshot = snapshot(&cluster);
    let failed = reconcile_pass(&snapshot, &settings(), &writer, &metrics)
        .await
        .unwrap_err();
    assert!(
        failed.to_string().contains("annotate Node edge-2"),
        "{failed}"
    );
    let writes: Vec<String> = api
        .take()
        .iter()
        .filter(|r| r.is_write() && !r.path.contains("/events"))
        .map(Recorded::line)
        .collect();
    assert_eq!(
        writes,
        [
            format!("POST /api/v1/namespaces/{NS}/secrets?"),
            format!("PATCH /apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles/{ROLE}{APPLY}"),
            "PATCH /api/v1/nodes/edge-1?".to_owned(),
            "PATCH /api/v1/nodes/edge-2?".to_owned(),
            "PATCH /api/v1/nodes/edge-3?".to_owned(),
            format!("PATCH /apis/regmirror.io/v1alpha1/registrymirrors/docker-hub/status{APPLY}"),
        ],
        "every other write went through"
    );
    api.finish();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(
            r#"regmirror_write_failures_total{kind="node_annotate",reason="not_found"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"regmirror_writes_total{kind="node_annotate"} 2"#),
        "{text}"
    );

    // The next pass, with edge-2 gone from the cache, has nothing left to do for it.
    let mut next = cluster.clone();
    next.nodes
        .retain(|n| n.metadata.name.as_deref() != Some("edge-2"));
    let (decision, _) = reconcile(&next, setting_the_scene()).await;
    assert!(decision.advance.iter().all(|a| a.node != "edge-2"));
}

#[tokio::test]
async fn a_secret_squatting_on_a_config_name_is_replaced_not_trusted() {
    let cluster = cluster();
    let secrets = format!("/api/v1/namespaces/{NS}/secrets");
    let (client, api) = Scenario::new()
        .then(
            Expect::post(format!("{secrets}?"))
                .answer(409, status_error(409, "AlreadyExists", "exists")),
        )
        .then(
            // Someone with create rights in the namespace got there first, with other content.
            Expect::prefix("GET", format!("{secrets}/regmirror-config-")).answer_with(|r| {
                let name = r.path.rsplit('/').next().unwrap();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "Secret",
                           "metadata": {"name": name, "namespace": NS, "labels": {CONFIG_LABEL: "true"}},
                           "data": {SEALED_CONFIG_KEY: "Zm9yZ2Vk"}}),
                )
            }),
        )
        .then(Expect::prefix("DELETE", format!("{secrets}/regmirror-config-")).answer_with(answer))
        .then(expect("POST", format!("{secrets}?")))
        // The rest of the pass goes on; no node is pointed at the config.
        .then(expect(
            "PATCH",
            format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles/{ROLE}{APPLY}"),
        ))
        .then(expect(
            "PATCH",
            format!("/apis/regmirror.io/v1alpha1/registrymirrors/docker-hub/status{APPLY}"),
        ))
        .background(events())
        .serve();
    let writer = writer(client);
    let metrics = Metrics::register(&mut Registry::default());
    let snapshot = snapshot(&cluster);
    let failed = reconcile_pass(&snapshot, &settings(), &writer, &metrics)
        .await
        .unwrap_err();
    assert!(failed.to_string().contains("it was replaced"), "{failed}");
    let lines: Vec<String> = api
        .take()
        .iter()
        .filter(|r| !r.path.contains("/events"))
        .map(Recorded::line)
        .collect();
    let config = &lines[1];
    assert!(config.starts_with(&format!(
        "GET /api/v1/namespaces/{NS}/secrets/regmirror-config-"
    )));
    let name = config.rsplit('/').next().unwrap().to_owned();
    assert_eq!(
        lines[..4],
        [
            format!("POST /api/v1/namespaces/{NS}/secrets?"),
            format!("GET /api/v1/namespaces/{NS}/secrets/{name}"),
            format!("DELETE /api/v1/namespaces/{NS}/secrets/{name}?"),
            format!("POST /api/v1/namespaces/{NS}/secrets?"),
        ]
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("PATCH /api/v1/nodes/")),
        "no node is pointed at it in this pass: {lines:#?}"
    );
    api.finish();
}

#[tokio::test]
async fn a_snapshot_reusing_the_last_one_decides_as_a_fresh_one() {
    let settled = converged(cluster()).await;
    let policy = regmirror_core::sources::RefPolicy::new(NS);
    let first = snapshot(&settled);
    let placement = first.place(&policy);

    // A node changed (a new resourceVersion), another did not.
    let mut changed = settled.clone();
    for (i, node) in changed.nodes.iter_mut().enumerate() {
        node.metadata.resource_version = Some("1".into());
        if i == 0 {
            node.metadata.resource_version = Some("2".into());
            node.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(STATE.into(), "Failed".into());
        }
    }
    let mut before = settled.clone();
    for node in before.nodes.iter_mut() {
        node.metadata.resource_version = Some("1".into());
    }
    let previous = snapshot(&before);
    let reused = Snapshot::reusing(
        previous,
        &changed.mirrors,
        &changed.nodes,
        &changed.secrets,
        &changed.config_maps,
        changed.role.as_ref(),
        NS,
    );
    let fresh = snapshot(&changed);
    assert_eq!(reused.nodes, fresh.nodes, "the changed node is read again");
    assert_eq!(reused.stored, fresh.stored);
    let now = "2026-11-23T00:00:00Z";
    let max = MaxUnavailable::Count(1);
    assert_eq!(
        reused.conclude(
            &reused.place_reusing(&policy, Some(&placement)),
            &policy,
            max,
            now
        ),
        fresh.decide(&policy, max, now)
    );
}

#[test]
fn a_node_whose_labels_changed_is_not_taken_into_a_kept_placement() {
    let c = cluster();
    let mut kept = snapshot(&c);
    let mut state_only = c.nodes[0].clone();
    state_only
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(STATE.into(), "Applied".into());
    assert!(kept.update_node(&state_only), "a report is taken in");
    let mut relabelled = c.nodes[0].clone();
    relabelled.metadata.labels = Some([("pool".to_owned(), "b".to_owned())].into());
    assert!(
        !kept.update_node(&relabelled),
        "new labels need a new placement"
    );
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}
