//! The strict fake API server: an expected request answered as told, an unexpected one and
//! one never made fail the test, and so does a scenario dropped unfinished.

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use regmirror_testbed::api::status_error;
use regmirror_testbed::fake_api::{event, events, Expect, Scenario};
use serde_json::json;

fn node(name: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}

#[tokio::test]
async fn expected_requests_are_answered_in_order() {
    let (client, api) = Scenario::new()
        .then(Expect::get("/api/v1/nodes/a").answer(200, node("a")))
        .then(
            Expect::patch("/api/v1/nodes/a?")
                .content_type("application/merge-patch+json")
                .body(json!({"metadata": {"labels": {"x": "y"}}}))
                .answer(200, node("a")),
        )
        .then(Expect::get("/api/v1/nodes/b").answer(404, status_error(404, "NotFound", "no b")))
        .serve();
    let nodes: Api<Node> = Api::all(client);
    assert_eq!(
        nodes.get("a").await.unwrap().metadata.name.as_deref(),
        Some("a")
    );
    let patch = Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}}));
    nodes
        .patch("a", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert!(nodes.get_opt("b").await.unwrap().is_none());
    assert_eq!(api.requests().len(), 3);
    api.finish();
}

#[tokio::test]
async fn background_and_unordered_rules_answer_any_number_of_times() {
    let (client, api) = Scenario::new()
        .any_order(Expect::get("/api/v1/nodes/a").answer(200, node("a")))
        .background(Expect::get("/api/v1/nodes/b").answer(200, node("b")))
        .background(events())
        .serve();
    let nodes: Api<Node> = Api::all(client);
    for _ in 0..3 {
        nodes.get("b").await.unwrap();
        nodes.get("a").await.unwrap();
    }
    api.finish();
}

#[tokio::test]
#[should_panic(
    expected = "unexpected request GET /api/v1/nodes/b with body null; expected next: PATCH /api/v1/nodes/a?"
)]
async fn an_unexpected_request_fails_the_test_and_says_what_was_expected() {
    let (client, api) = Scenario::new()
        .then(Expect::patch("/api/v1/nodes/a?"))
        .serve();
    let nodes: Api<Node> = Api::all(client);
    assert!(nodes.get("b").await.is_err(), "answered with an error");
    api.finish();
}

#[tokio::test]
#[should_panic(expected = "expected but never made: PATCH /api/v1/nodes/a?")]
async fn an_expected_request_never_made_fails_the_test() {
    let (_client, api) = Scenario::new()
        .then(Expect::patch("/api/v1/nodes/a?"))
        .serve();
    api.finish();
}

#[tokio::test]
#[should_panic(expected = "expected (in any order) but never made: GET /api/v1/nodes")]
async fn an_unordered_request_never_made_fails_the_test() {
    let (_client, api) = Scenario::new()
        .any_order(Expect::get("/api/v1/nodes"))
        .serve();
    api.finish();
}

#[tokio::test]
#[should_panic(expected = "but has body")]
async fn a_body_other_than_expected_fails_the_test() {
    let (client, api) = Scenario::new()
        .then(
            Expect::post("/api/v1/namespaces/ns/configmaps?")
                .body(json!({"metadata": {"name": "a"}}))
                .answer(201, json!({"metadata": {"name": "b"}})),
        )
        .serve();
    let maps: Api<ConfigMap> = Api::namespaced(client, "ns");
    let map = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("b".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let _ = maps.create(&PostParams::default(), &map).await;
    api.finish();
}

#[tokio::test]
#[should_panic(expected = "dropped without finish()")]
async fn a_scenario_dropped_unfinished_fails_the_test() {
    let (_client, _api) = Scenario::new().serve();
}

#[tokio::test]
async fn an_event_is_matched_by_type_reason_and_subject() {
    use regmirror_process::events::{EventPublisher, Occurrence};
    let (client, api) = Scenario::new()
        .then(event("Normal", "Applied", Some("a")))
        .serve();
    let events = EventPublisher::new(client, "test", "test-0");
    let node = k8s_openapi::api::core::v1::ObjectReference {
        kind: Some("Node".into()),
        name: Some("a".into()),
        ..Default::default()
    };
    let what = Occurrence {
        warning: false,
        reason: "Applied",
        action: "Apply",
        note: "applied",
    };
    events.publish(&what, &node).await.unwrap();
    api.finish();
}
