//! The testbed's control plane is a real Kubernetes control plane: a version-stamped API server
//! that stores in etcd, authenticates certificates and ServiceAccount tokens, authorizes with
//! RBAC, admits with ValidatingAdmissionPolicy, serves CRDs; and a controller manager whose
//! controllers finish namespaces, collect garbage and run workloads. Its processes die with the
//! harness, also when the process holding it is killed.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::Client;
use regmirror_testbed::{ControlPlane, TokenOptions};
use serde_json::json;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The Kubernetes version pinned in testbed/kube/go.mod.
fn pinned_version() -> String {
    let go_mod = std::fs::read_to_string(repo().join("testbed/kube/go.mod")).unwrap();
    go_mod
        .lines()
        .find_map(|line| line.trim().strip_prefix("k8s.io/kubernetes "))
        .expect("go.mod requires k8s.io/kubernetes")
        .trim()
        .to_owned()
}

/// Polls `check` every 200 ms until it returns `Some`, for at most `timeout`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    check: impl Fn() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn object<K: k8s_openapi::serde::de::DeserializeOwned>(value: serde_json::Value) -> K {
    serde_json::from_value(value).unwrap()
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        ..ObjectMeta::default()
    }
}

fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

#[test]
fn the_control_plane_is_a_real_kubernetes() {
    let plane = ControlPlane::start();
    let pids = plane.pids();
    assert_eq!(
        pids.len(),
        3,
        "etcd, kube-apiserver, kube-controller-manager"
    );
    runtime().block_on(async {
        let client = plane.client().await;
        api_server_answers(&client).await;
        namespaces_are_finished_by_the_namespace_controller(&client).await;
        garbage_is_collected(&client).await;
        deployments_make_replica_sets_and_pods(&client).await;
        validating_admission_policies_are_enforced(&client).await;
        crds_apply_with_kubectl_and_become_established(&plane, &client).await;
        service_account_tokens_authenticate_and_rbac_authorizes(&plane, &client).await;
    });
    let server = plane.server().trim_start_matches("https://").to_owned();
    drop(plane);
    assert!(
        std::net::TcpStream::connect(&server).is_err(),
        "the API server still listens after drop"
    );
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived the control plane");
    }
}

/// Whether process `pid` runs (exists and is not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

async fn api_server_answers(client: &Client) {
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.git_version, pinned_version(), "{version:?}");
    let request = http::Request::get("/readyz").body(Vec::new()).unwrap();
    assert_eq!(client.request_text(request).await.unwrap(), "ok");
    // The controllers' ServiceAccounts (--use-service-account-credentials).
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "kube-system");
    eventually(
        "the namespace controller's ServiceAccount",
        Duration::from_secs(60),
        || async { accounts.get_opt("namespace-controller").await.unwrap() },
    )
    .await;
}

async fn namespaces_are_finished_by_the_namespace_controller(client: &Client) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: meta("doomed"),
                ..Namespace::default()
            },
        )
        .await
        .unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "doomed");
    config_maps
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: meta("content"),
                ..ConfigMap::default()
            },
        )
        .await
        .unwrap();
    namespaces
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    // The namespace waits in Terminating (finalizer `kubernetes`) until the controller has
    // deleted its content.
    eventually(
        "namespace doomed is gone",
        Duration::from_secs(90),
        || async {
            namespaces
                .get_opt("doomed")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
}

async fn garbage_is_collected(client: &Client) {
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let owner = config_maps
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: meta("owner"),
                ..ConfigMap::default()
            },
        )
        .await
        .unwrap();
    let dependent = ConfigMap {
        metadata: ObjectMeta {
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: "owner".into(),
                uid: owner.metadata.uid.unwrap(),
                ..OwnerReference::default()
            }]),
            ..meta("dependent")
        },
        ..ConfigMap::default()
    };
    config_maps
        .create(&PostParams::default(), &dependent)
        .await
        .unwrap();
    config_maps
        .delete("owner", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the garbage collector deletes the dependent",
        Duration::from_secs(90),
        || async {
            config_maps
                .get_opt("dependent")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
}

async fn deployments_make_replica_sets_and_pods(client: &Client) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deployments
        .create(
            &PostParams::default(),
            &object(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web"},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {
                        "metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "web", "image": "registry.example/web:1"}]}
                    }
                }
            })),
        )
        .await
        .unwrap();
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let web = ListParams::default().labels("app=web");
    eventually(
        "a ReplicaSet and two Pods (unscheduled: no scheduler)",
        Duration::from_secs(90),
        || async {
            let sets = replica_sets.list(&web).await.unwrap().items.len();
            let pods = pods.list(&web).await.unwrap().items.len();
            (sets == 1 && pods == 2).then_some(())
        },
    )
    .await;
}

async fn validating_admission_policies_are_enforced(client: &Client) {
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    policies
        .create(
            &PostParams::default(),
            &object(json!({
                "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
                "metadata": {"name": "no-forbidden-configmaps"},
                "spec": {
                    "failurePolicy": "Fail",
                    "matchConstraints": {"resourceRules": [{
                        "apiGroups": [""], "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE"], "resources": ["configmaps"]
                    }]},
                    "validations": [{
                        "expression": "!has(object.metadata.labels) || !('forbidden' in object.metadata.labels)",
                        "message": "forbidden ConfigMaps are refused"
                    }]
                }
            })),
        )
        .await
        .unwrap();
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
    bindings
        .create(
            &PostParams::default(),
            &object(json!({
                "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": {"name": "no-forbidden-configmaps"},
                "spec": {"policyName": "no-forbidden-configmaps", "validationActions": ["Deny"]}
            })),
        )
        .await
        .unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let forbidden = ConfigMap {
        metadata: ObjectMeta {
            labels: Some(BTreeMap::from([("forbidden".to_owned(), "yes".to_owned())])),
            ..meta("forbidden")
        },
        ..ConfigMap::default()
    };
    // A new policy takes effect once the API server's informer has it (about a second).
    let message = eventually(
        "the policy refuses a forbidden ConfigMap",
        Duration::from_secs(30),
        || async {
            match config_maps.create(&PostParams::default(), &forbidden).await {
                Ok(_) => {
                    config_maps
                        .delete("forbidden", &DeleteParams::default())
                        .await
                        .unwrap();
                    None
                }
                Err(kube::Error::Api(status)) => Some(status.message),
                Err(other) => panic!("{other}"),
            }
        },
    )
    .await;
    assert!(
        message.contains("forbidden ConfigMaps are refused"),
        "{message}"
    );
    config_maps
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: meta("allowed"),
                ..ConfigMap::default()
            },
        )
        .await
        .unwrap();
    bindings
        .delete("no-forbidden-configmaps", &DeleteParams::default())
        .await
        .unwrap();
    policies
        .delete("no-forbidden-configmaps", &DeleteParams::default())
        .await
        .unwrap();
}

async fn crds_apply_with_kubectl_and_become_established(plane: &ControlPlane, client: &Client) {
    let output = plane
        .kubectl()
        .args(["apply", "-f"])
        .arg(repo().join("crds"))
        .output()
        .expect("run kubectl");
    assert!(
        output.status.success(),
        "kubectl apply -f crds/ failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    eventually(
        "the RegistryMirror CRD is Established",
        Duration::from_secs(60),
        || async {
            let crd = crds.get("registrymirrors.regmirror.io").await.unwrap();
            let conditions = crd.status?.conditions?;
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        },
    )
    .await;
    // And the API serves the new resource.
    let listed = eventually(
        "kubectl get registrymirrors",
        Duration::from_secs(30),
        || async {
            let output = plane
                .kubectl()
                .args(["get", "registrymirrors", "-A"])
                .output()
                .unwrap();
            output
                .status
                .success()
                .then(|| String::from_utf8_lossy(&output.stderr).into_owned())
        },
    )
    .await;
    assert!(listed.contains("No resources found"), "{listed}");
}

async fn service_account_tokens_authenticate_and_rbac_authorizes(
    plane: &ControlPlane,
    client: &Client,
) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: meta("apps"),
                ..Namespace::default()
            },
        )
        .await
        .unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "apps");
    accounts
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: meta("reader"),
                ..ServiceAccount::default()
            },
        )
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "apps");
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: meta("hidden"),
                ..Secret::default()
            },
        )
        .await
        .unwrap();

    let reader = plane
        .service_account_client("apps", "reader", &TokenOptions::default())
        .await;
    let review: SelfSubjectReview = Api::all(reader.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .unwrap();
    let user = review.status.unwrap().user_info.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:apps:reader")
    );
    assert!(user
        .groups
        .unwrap()
        .contains(&"system:serviceaccounts:apps".to_owned()));

    let error = Api::<Secret>::namespaced(reader.clone(), "apps")
        .list(&ListParams::default())
        .await
        .expect_err("a ServiceAccount without a Role reads no Secrets");
    assert_eq!(status_code(&error), Some(403), "{error}");
    assert!(
        error
            .to_string()
            .contains("system:serviceaccount:apps:reader"),
        "the refusal names the authenticated user: {error}"
    );

    // A token bound to a Pod on a Node carries both, as a kubelet-issued token does.
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &Node {
                metadata: meta("node-a"),
                ..Node::default()
            },
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "apps");
    let pod = pods
        .create(
            &PostParams::default(),
            &object(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "agent"},
                "spec": {
                    "nodeName": "node-a", "serviceAccountName": "reader",
                    "containers": [{"name": "agent", "image": "registry.example/agent:1"}]
                }
            })),
        )
        .await
        .unwrap();
    let options = TokenOptions {
        bound_pod: Some(pod),
        ..TokenOptions::default()
    };
    let bound = plane
        .service_account_client("apps", "reader", &options)
        .await;
    let review: SelfSubjectReview = Api::all(bound)
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .unwrap();
    let extra = review
        .status
        .unwrap()
        .user_info
        .unwrap()
        .extra
        .unwrap_or_default();
    assert_eq!(
        extra.get("authentication.kubernetes.io/pod-name"),
        Some(&vec!["agent".to_owned()]),
        "{extra:?}"
    );
    assert_eq!(
        extra.get("authentication.kubernetes.io/node-name"),
        Some(&vec!["node-a".to_owned()]),
        "{extra:?}"
    );

    // kubectl with the ServiceAccount's kubeconfig: authenticated, and refused by RBAC.
    let kubeconfig = plane
        .service_account_kubeconfig("apps", "reader", &TokenOptions::default())
        .await;
    let output = plane
        .kubectl_with(&kubeconfig)
        .args(["auth", "can-i", "list", "secrets", "-n", "apps"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "no");
    let output = plane
        .kubectl_with(&kubeconfig)
        .args([
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "system:serviceaccount:apps:reader"
    );
}

/// The processes die with the process that started them, however it dies: here the
/// `dev-cluster` program holding a control plane is SIGKILLed.
#[test]
fn the_control_plane_dies_with_its_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = Command::new(env!("CARGO_BIN_EXE_dev-cluster"))
        .arg("run")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pids_file = dir.path().join("pids");
    let deadline = Instant::now() + Duration::from_secs(600);
    while !pids_file.exists() {
        assert!(
            holder.try_wait().unwrap().is_none(),
            "dev-cluster exited early"
        );
        assert!(
            Instant::now() < deadline,
            "dev-cluster did not start the control plane"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let pids: Vec<u32> = std::fs::read_to_string(&pids_file)
        .unwrap()
        .lines()
        .map(|line| line.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 3);
    holder.kill().unwrap(); // SIGKILL: no destructor runs
    holder.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let running = || pids.iter().filter(|pid| alive(**pid)).count();
    while running() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} of {pids:?} outlived their holder",
            running()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
