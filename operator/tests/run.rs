//! The whole controller process against kube's mocked service: it fills its caches, says it
//! is ready, takes the Lease, and its first pass on a cluster without mirrors grants the
//! agents nothing (the Role names a placeholder, never an empty list).

use std::time::Duration;

use regmirror::controller::{run, Settings};
use regmirror_core::plan::MaxUnavailable;
use regmirror_testbed::api::{mock_client, status_error, Recorded};
use regmirror_testbed::cluster::{ready_node, sealing_key_secret};
use serde_json::{json, Value};

/// `lease`: the Lease as stored, which kube-lease-manager creates, then claims and renews with
/// patches.
fn answer(lease: &mut Option<Value>, r: &Recorded) -> (u16, Value) {
    let path = r.path.split('?').next().unwrap();
    let query = r.path.split_once('?').map_or("", |(_, q)| q);
    if query.contains("watch=true") {
        // A quiet cluster: the watch ends without events and is resumed.
        return (200, Value::Null);
    }
    let plural = path.rsplit('/').next().unwrap();
    let list = |api_version: &str, kind: &str, items: Vec<Value>| {
        (
            200,
            json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items}),
        )
    };
    match (r.method.as_str(), plural) {
        ("GET", "registrymirrors") => list("regmirror.io/v1alpha1", "RegistryMirrorList", vec![]),
        ("GET", "nodes") => list(
            "v1",
            "NodeList",
            vec![serde_json::to_value(ready_node("edge-1", "k3s")).unwrap()],
        ),
        ("GET", "secrets") if path.contains("/regmirror-system/") => list(
            "v1",
            "SecretList",
            vec![serde_json::to_value(sealing_key_secret("regmirror-system")).unwrap()],
        ),
        ("GET", "secrets") => list("v1", "SecretList", vec![]),
        ("GET", "configmaps") => list("v1", "ConfigMapList", vec![]),
        ("GET", "roles") => list("rbac.authorization.k8s.io/v1", "RoleList", vec![]),
        ("GET", "regmirror-controller") => lease.clone().map_or_else(
            || (404, status_error(404, "NotFound", "leases not found")),
            |lease| (200, lease),
        ),
        ("POST", "leases") => {
            let mut created = r.body.clone();
            created["metadata"]["resourceVersion"] = json!("1");
            *lease = Some(created.clone());
            (201, created)
        }
        ("PATCH", "regmirror-controller") => {
            let Some(stored) = lease.as_mut() else {
                return (404, status_error(404, "NotFound", "leases not found"));
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
        ("PATCH", _) => {
            let mut body = r.body.clone();
            body["metadata"]["name"] = json!(plural);
            (200, body)
        }
        _ => (404, status_error(404, "NotFound", "not in this test")),
    }
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
    let mut lease = None;
    let (client, log) = mock_client(move |r| answer(&mut lease, r));
    let port = regmirror_testbed::free_port();
    let settings = Settings {
        namespace: "regmirror-system".into(),
        allowed_namespaces: vec!["team-a".into()],
        max_unavailable: MaxUnavailable::Count(1),
        agent_role: "regmirror-agent-configs".into(),
        lease_name: "regmirror-controller".into(),
        identity: "regmirror-operator-0".into(),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
    };
    let controller = tokio::spawn(run(client, settings));

    let mut requests = Vec::new();
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        requests = log.snapshot();
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
}
