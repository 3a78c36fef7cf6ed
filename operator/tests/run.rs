//! The whole controller process against kube's mocked service: it fills its caches, says it
//! is ready, takes the Lease, and its first pass on a cluster without mirrors grants the
//! agents nothing (the Role names a placeholder, never an empty list).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use regmirror::controller::{run, Settings};
use regmirror_core::plan::MaxUnavailable;
use regmirror_testbed::api::{status_error, Recorded};
use regmirror_testbed::cluster::{ready_node, sealing_key_secret};
use regmirror_testbed::fake_api::{Expect, Scenario};
use serde_json::{json, Value};

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/regmirror-system/leases";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/regmirror-system/leases/regmirror-controller";
const CLAIM: &str = "?&fieldManager=kube-lease-manager-regmirror-operator-0";
const ROLE: &str = "/apis/rbac.authorization.k8s.io/v1/namespaces/regmirror-system/roles/regmirror-agent-configs?&force=true&fieldManager=regmirror";

/// The caches' objects, in their namespace: the operator's own, by their labels.
const CACHES: &str = "app.kubernetes.io%2Fmanaged-by%3Dregmirror%2Cregmirror.io%2Fcache";

/// The Lease as stored, which kube-lease-manager creates, then claims and renews with patches.
type Stored = Arc<Mutex<Option<Value>>>;

fn lease(stored: &Stored, r: &Recorded) -> (u16, Value) {
    let mut lease = stored.lock().unwrap();
    let not_found = || (404, status_error(404, "NotFound", "leases not found"));
    match r.method.as_str() {
        "GET" => lease.clone().map_or_else(not_found, |l| (200, l)),
        "POST" => {
            let mut created = r.body.clone();
            created["metadata"]["resourceVersion"] = json!("1");
            *lease = Some(created.clone());
            (201, created)
        }
        _ => {
            let Some(stored) = lease.as_mut() else {
                return not_found();
            };
            for (field, value) in r.body["spec"].as_object().into_iter().flatten() {
                match stored["spec"].as_object_mut() {
                    Some(spec) if value.is_null() => {
                        spec.remove(field);
                    }
                    _ => stored["spec"][field] = value.clone(),
                }
            }
            (200, stored.clone())
        }
    }
}

/// A list of `items`, made at least once (again after a watch ends), whatever its query
/// but never a watch.
fn list(path: &str, api_version: &str, kind: &str, items: Vec<Value>) -> Expect {
    let prefix = path.to_owned();
    Expect::path_where("GET", &format!("a list {path}"), move |p| {
        p.starts_with(prefix.as_str()) && !p.contains("watch=true")
    })
    .answer(
        200,
        json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items}),
    )
}

/// The controller's lists (in any order), quiet watches (they end without events and are
/// resumed), reads of the Lease; in order, its writes: the Lease created, claimed
/// (server-side apply) and its transition counted, then the first pass's Role.
fn scenario(stored: &Stored) -> Scenario {
    let on_lease = |expect: Expect| {
        let stored = stored.clone();
        expect.answer_with(move |r| lease(&stored, r))
    };
    let helm = "&fieldSelector=type%21%3Dhelm.sh%2Frelease.v1";
    Scenario::new()
        .any_order(list("/apis/regmirror.io/v1alpha1/registrymirrors?", "regmirror.io/v1alpha1", "RegistryMirrorList", vec![]))
        .any_order(list("/api/v1/nodes?", "v1", "NodeList", vec![serde_json::to_value(ready_node("edge-1", "k3s")).unwrap()]))
        .any_order(list(
            &format!("/api/v1/namespaces/regmirror-system/secrets?{helm}"),
            "v1",
            "SecretList",
            vec![serde_json::to_value(sealing_key_secret("regmirror-system")).unwrap()],
        ))
        .any_order(list(&format!("/api/v1/namespaces/team-a/secrets?{helm}"), "v1", "SecretList", vec![]))
        .any_order(list("/api/v1/namespaces/regmirror-system/configmaps?", "v1", "ConfigMapList", vec![]))
        .any_order(list("/api/v1/namespaces/team-a/configmaps?", "v1", "ConfigMapList", vec![]))
        .any_order(list(
            "/apis/rbac.authorization.k8s.io/v1/namespaces/regmirror-system/roles?&fieldSelector=metadata.name%3Dregmirror-agent-configs",
            "rbac.authorization.k8s.io/v1",
            "RoleList",
            vec![],
        ))
        // The caches' objects, by their label.
        .any_order(list(&format!("/api/v1/namespaces/regmirror-cache/services?&labelSelector={CACHES}"), "v1", "ServiceList", vec![]))
        .any_order(list(&format!("/apis/apps/v1/namespaces/regmirror-cache/deployments?&labelSelector={CACHES}"), "apps/v1", "DeploymentList", vec![]))
        // Every Secret there: the CA may be one a person put in place, unlabelled.
        .any_order(list("/api/v1/namespaces/regmirror-cache/secrets?&limit=500", "v1", "SecretList", vec![]))
        .background(Expect::path_where("GET", "a watch", |p| p.contains("watch=true")).answer(200, Value::Null))
        .background(on_lease(Expect::get(LEASE)))
        .then(on_lease(Expect::post(format!("{LEASES}?"))))
        .then(on_lease(
            Expect::patch(format!("{LEASE}{CLAIM}"))
                .content_type("application/apply-patch+yaml")
                .body_where("a claim by regmirror-operator-0", |b| {
                    b["spec"]["holderIdentity"] == "regmirror-operator-0"
                }),
        ))
        .then(on_lease(Expect::patch(format!("{LEASE}{CLAIM}"))))
        .then(
            Expect::patch(ROLE)
                .body_where("the placeholder granted, never an empty list", |b| {
                    b["rules"][0]["resourceNames"] == json!(["regmirror-config-none"])
                })
                .answer_with(|r| {
                    let mut body = r.body.clone();
                    body["metadata"]["name"] = json!("regmirror-agent-configs");
                    (200, body)
                }),
        )
}

async fn ready(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer).await;
    answer.starts_with("HTTP/1.1 200")
}

#[tokio::test]
async fn the_controller_fills_its_caches_leads_and_reconciles() {
    let stored = Stored::default();
    let (client, api) = scenario(&stored).serve();
    let port = regmirror_testbed::free_port();
    let settings = Settings {
        namespace: "regmirror-system".into(),
        allowed_namespaces: vec!["team-a".into()],
        max_unavailable: MaxUnavailable::Count(1),
        agent_role: "regmirror-agent-configs".into(),
        lease_name: "regmirror-controller".into(),
        identity: "regmirror-operator-0".into(),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        cache_image: "registry:3".into(),
        cache_namespace: "regmirror-cache".into(),
    };
    let controller = tokio::spawn(run(client, settings));

    let mut requests = Vec::new();
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        requests = api.requests();
        if requests
            .iter()
            .any(|r| r.method == "PATCH" && r.path.contains("/roles/"))
        {
            break;
        }
    }
    assert!(ready(port).await, "ready once the caches are filled");
    controller.abort();

    let lines: Vec<String> = requests
        .iter()
        .filter(|r| !r.path.contains("watch=true"))
        .map(|r| r.line())
        .collect();
    for list in [
        "GET /apis/regmirror.io/v1alpha1/registrymirrors?",
        "GET /api/v1/nodes?",
        "GET /api/v1/namespaces/regmirror-system/secrets?&fieldSelector=type%21%3Dhelm.sh%2Frelease.v1",
        "GET /api/v1/namespaces/team-a/secrets?&fieldSelector=type%21%3Dhelm.sh%2Frelease.v1",
        "GET /api/v1/namespaces/regmirror-system/configmaps?",
        "GET /api/v1/namespaces/team-a/configmaps?",
        "GET /apis/rbac.authorization.k8s.io/v1/namespaces/regmirror-system/roles?&fieldSelector=metadata.name%3Dregmirror-agent-configs",
        &format!("GET /api/v1/namespaces/regmirror-cache/services?&labelSelector={CACHES}"),
        &format!("GET /apis/apps/v1/namespaces/regmirror-cache/deployments?&labelSelector={CACHES}"),
        "GET /api/v1/namespaces/regmirror-cache/secrets?&limit=500",
    ] {
        assert!(lines.iter().any(|l| l.starts_with(list)), "no {list} in {lines:#?}");
    }
    let writes: Vec<&Recorded> = requests.iter().filter(|r| r.is_write()).collect();
    assert_eq!(
        writes.iter().map(|r| r.line()).collect::<Vec<_>>(),
        [
            "POST /apis/coordination.k8s.io/v1/namespaces/regmirror-system/leases?".to_owned(),
            // kube-lease-manager claims the lease (server-side apply), then counts the
            // transition.
            "PATCH /apis/coordination.k8s.io/v1/namespaces/regmirror-system/leases/regmirror-controller?&fieldManager=kube-lease-manager-regmirror-operator-0".to_owned(),
            "PATCH /apis/coordination.k8s.io/v1/namespaces/regmirror-system/leases/regmirror-controller?&fieldManager=kube-lease-manager-regmirror-operator-0".to_owned(),
            "PATCH /apis/rbac.authorization.k8s.io/v1/namespaces/regmirror-system/roles/regmirror-agent-configs?&force=true&fieldManager=regmirror".to_owned(),
        ],
        "a node with nothing to get is left alone"
    );
    assert_eq!(writes[1].content_type, "application/apply-patch+yaml");
    assert_eq!(
        writes[1].body["spec"]["holderIdentity"],
        json!("regmirror-operator-0")
    );
    assert_eq!(
        writes[3].body["rules"][0]["resourceNames"],
        json!(["regmirror-config-none"])
    );
    api.finish();
}
