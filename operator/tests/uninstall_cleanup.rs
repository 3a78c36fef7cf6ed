//! `regmirror uninstall-cleanup` (the chart's pre-delete hook) against the strict fake API
//! server: exactly the requests its hook Role allows, in order, and what it prints.

use std::time::Duration;

use regmirror::cli::uninstall_cleanup::{clean_up, Settings, UninstallCleanupError};
use regmirror_testbed::api::status_error;
use regmirror_testbed::fake_api::{Expect, Scenario};
use serde_json::{json, Value};

const NS: &str = "regmirror-system";
const SCALE: &str =
    "/apis/apps/v1/namespaces/regmirror-system/deployments/regmirror-operator/scale?";
const DS: &str = "/apis/apps/v1/namespaces/regmirror-system/daemonsets/regmirror-agent";

fn settings(timeout: Duration) -> Settings {
    Settings {
        namespace: NS.into(),
        daemonset: "regmirror-agent".into(),
        container: "agent".into(),
        deployment: "regmirror-operator".into(),
        timeout,
        poll: Duration::from_millis(10),
    }
}

/// Runs the cleanup against `scenario`, which must be played out whole: what it returned and
/// what it printed.
async fn run(scenario: Scenario, timeout: Duration) -> (Result<(), UninstallCleanupError>, String) {
    let (client, api) = scenario.serve();
    let mut out = Vec::new();
    let result = clean_up(client, &settings(timeout), &mut out).await;
    api.finish();
    (result, String::from_utf8(out).unwrap())
}

fn scale(replicas: i32) -> Value {
    json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
           "metadata": {"name": "regmirror-operator", "namespace": NS},
           "spec": {"replicas": replicas}})
}

/// The agent DaemonSet at `generation`, with this status.
fn daemonset(generation: i64, observed: i64, desired: i32, updated: i32, ready: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "regmirror-agent", "namespace": NS, "generation": generation},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/component": "agent"}},
            "template": {"spec": {
                "containers": [{"name": "agent", "image": "agent", "args": ["run"], "volumeMounts": [
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "host-var-lib-regmirror", "mountPath": "/host/var/lib/regmirror"},
                ]}],
                "volumes": [
                    {"name": "tmp", "emptyDir": {}},
                    {"name": "host-var-lib-regmirror",
                     "hostPath": {"path": "/srv/node-1/var/lib/regmirror", "type": "DirectoryOrCreate"}},
                ],
            }},
        },
        "status": {
            "observedGeneration": observed, "desiredNumberScheduled": desired,
            "updatedNumberScheduled": updated, "numberReady": ready,
            "currentNumberScheduled": desired, "numberMisscheduled": 0,
        },
    })
}

fn expected_patch() -> Value {
    json!({"spec": {
        "updateStrategy": {"type": "RollingUpdate",
                           "rollingUpdate": {"maxUnavailable": "100%", "maxSurge": 0}},
        "template": {"spec": {
            "containers": [{"name": "agent", "args": ["cleanup", "--hold"], "volumeMounts": [
                {"$patch": "delete", "mountPath": "/host/var/lib/regmirror"},
                {"name": "host-var-lib-regmirror", "mountPath": "/host/var/lib"},
            ]}],
            // The state directory's parent: a mount point cannot be removed in the container.
            "volumes": [{"name": "host-var-lib-regmirror",
                         "hostPath": {"path": "/srv/node-1/var/lib", "type": "Directory"}}],
        }},
    }})
}

fn scale_down() -> Expect {
    Expect::patch(SCALE)
        .content_type("application/merge-patch+json")
        .body(json!({"spec": {"replicas": 0}}))
        .answer(200, scale(0))
}

fn read(generation: i64) -> Expect {
    Expect::get(DS).answer(200, daemonset(generation - 1, generation - 1, 3, 3, 3))
}

fn hold(generation: i64) -> Expect {
    Expect::patch(format!("{DS}?"))
        .content_type("application/strategic-merge-patch+json")
        .body(expected_patch())
        .answer(200, daemonset(generation, generation - 1, 3, 3, 3))
}

#[tokio::test]
async fn stops_the_operator_rolls_the_agents_to_cleanup_and_waits_for_every_node() {
    let scenario = Scenario::new()
        .then(scale_down())
        .then(read(5))
        .then(hold(5))
        // The old generation's status: not done, however Ready the old pods are.
        .then(Expect::get(DS).answer(200, daemonset(5, 4, 3, 3, 3)))
        .then(Expect::get(DS).answer(200, daemonset(5, 5, 3, 0, 0)))
        .then(Expect::get(DS).answer(200, daemonset(5, 5, 3, 3, 1)))
        .then(Expect::get(DS).answer(200, daemonset(5, 5, 3, 3, 3)));
    let (result, out) = run(scenario, Duration::from_secs(30)).await;
    result.unwrap();
    assert_eq!(
        out,
        "Deployment regmirror-system/regmirror-operator scaled to 0: the operator tells no node a new configuration\n\
         DaemonSet regmirror-system/regmirror-agent runs `regmirror-agent cleanup --hold` on every node (generation 5)\n\
         the DaemonSet controller has not seen the change yet (generation 5 observed 4)\n\
         0 of 3 agents running the cleanup, 0 of 3 Ready\n\
         3 of 3 agents running the cleanup, 1 of 3 Ready\n\
         3 of 3 agents running the cleanup, 3 of 3 Ready\n\
         every node is cleaned up (3 of 3): regmirror's files removed, hand-written files put back, /var/lib/regmirror deleted\n"
    );
}

#[tokio::test]
async fn a_node_not_cleaned_up_in_time_is_a_clear_error() {
    let scenario = Scenario::new()
        .then(scale_down())
        .then(read(2))
        .then(hold(2))
        .background(Expect::get(DS).answer(200, daemonset(2, 2, 3, 3, 2)));
    let (result, out) = run(scenario, Duration::from_millis(300)).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, UninstallCleanupError::Timeout { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "the nodes were not all cleaned up within 300ms: DaemonSet regmirror-system/regmirror-agent: \
         3 of 3 agents running the cleanup, 2 of 3 Ready; a node whose agent \
         is not Ready keeps regmirror's files, and its agent's log says why \
         (kubectl -n regmirror-system logs -l app.kubernetes.io/component=agent)"
    );
    // Progress is printed once per change, not once per read.
    assert_eq!(out.matches("2 of 3 Ready").count(), 1, "{out}");
}

#[tokio::test]
async fn a_forbidden_request_is_tried_again_while_the_hook_rbac_settles() {
    let scenario = Scenario::new()
        .then(Expect::patch(SCALE).answer(403, status_error(403, "Forbidden", "not yet")))
        .then(scale_down())
        .then(read(3))
        .then(hold(3))
        .then(Expect::get(DS).answer(200, daemonset(3, 3, 1, 1, 1)));
    let (result, out) = run(scenario, Duration::from_secs(30)).await;
    result.unwrap();
    assert!(
        out.starts_with(
            "scaling Deployment regmirror-system/regmirror-operator to 0 failed, trying again: "
        ),
        "{out}"
    );
    assert!(out.ends_with("every node is cleaned up (1 of 1): regmirror's files removed, hand-written files put back, /var/lib/regmirror deleted\n"), "{out}");
}

#[tokio::test]
async fn a_missing_operator_is_skipped_and_a_refused_patch_fails_naming_the_daemonset() {
    let scenario = Scenario::new()
        .then(Expect::patch(SCALE).answer(404, status_error(404, "NotFound", "gone")))
        .then(read(2))
        .then(Expect::patch(format!("{DS}?")).answer(
            422,
            status_error(
                422,
                "Invalid",
                "spec.template.spec.containers[1].image: Required value",
            ),
        ));
    let (result, out) = run(scenario, Duration::from_secs(30)).await;
    let err = result.unwrap_err();
    assert_eq!(
        out,
        "Deployment regmirror-system/regmirror-operator not found: no operator to stop\n"
    );
    let message = err.to_string();
    assert!(
        message.starts_with("cannot patch DaemonSet regmirror-system/regmirror-agent to run `regmirror-agent cleanup --hold`: ")
            && message.contains("Required value"),
        "{message}"
    );
}

#[tokio::test]
async fn without_a_daemonset_there_is_nothing_to_wait_for() {
    let scenario = Scenario::new()
        .then(scale_down())
        .then(Expect::get(DS).answer(404, status_error(404, "NotFound", "gone")));
    let (result, out) = run(scenario, Duration::from_secs(30)).await;
    result.unwrap();
    assert!(
        out
            .ends_with("DaemonSet regmirror-system/regmirror-agent not found: no agent to clean the nodes up with; the nodes keep whatever regmirror last wrote\n")
    );
}

#[tokio::test]
async fn a_daemonset_without_the_state_volume_is_not_patched() {
    let mut foreign = daemonset(1, 1, 1, 1, 1);
    foreign["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = json!([]);
    let scenario = Scenario::new()
        .then(scale_down())
        .then(Expect::get(DS).answer(200, foreign));
    let err = run(scenario, Duration::from_secs(30)).await.0.unwrap_err();
    assert_eq!(
        err.to_string(),
        "DaemonSet regmirror-system/regmirror-agent is not the chart's agent DaemonSet: \
         container agent mounts nothing at /host/var/lib/regmirror"
    );
}

#[tokio::test]
async fn an_uninstall_tried_again_finds_the_agents_cleaning_up_already() {
    // What the first hook run left: the agents hold after their cleanup, the state volume
    // one level up.
    let mut patched = daemonset(6, 6, 3, 3, 2);
    let pod = &mut patched["spec"]["template"]["spec"];
    pod["containers"][0]["args"] = json!(["cleanup", "--hold"]);
    pod["containers"][0]["volumeMounts"] = json!([
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "host-var-lib-regmirror", "mountPath": "/host/var/lib"},
    ]);
    pod["volumes"][1]["hostPath"] = json!({"path": "/srv/node-1/var/lib", "type": "Directory"});
    let again = json!({"spec": {
        "updateStrategy": {"type": "RollingUpdate",
                           "rollingUpdate": {"maxUnavailable": "100%", "maxSurge": 0}},
        "template": {"spec": {"containers": [{"name": "agent", "args": ["cleanup", "--hold"]}]}},
    }});
    let scenario = Scenario::new()
        .then(scale_down())
        .then(Expect::get(DS).answer(200, patched.clone()))
        .then(
            Expect::patch(format!("{DS}?"))
                .content_type("application/strategic-merge-patch+json")
                .body(again)
                .answer(200, patched),
        )
        .then(Expect::get(DS).answer(200, daemonset(6, 6, 3, 3, 3)));
    let (result, out) = run(scenario, Duration::from_secs(30)).await;
    result.unwrap();
    assert!(
        out
            .ends_with("every node is cleaned up (3 of 3): regmirror's files removed, hand-written files put back, /var/lib/regmirror deleted\n"),
    );
}
