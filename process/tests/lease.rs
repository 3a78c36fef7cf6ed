//! Leader election against kube's mocked service: who writes what, and when a replica may
//! take over.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use regmirror_process::lease::LeaseLock;
use regmirror_testbed::api::{mock_client, status_error, RequestLog};
use serde_json::{json, Value};

const PATH: &str =
    "/apis/coordination.k8s.io/v1/namespaces/regmirror-system/leases/regmirror-controller";
const DURATION: Duration = Duration::from_secs(15);

/// A mocked API server holding at most one Lease, with optimistic concurrency.
fn server(initial: Option<Value>) -> (Api<Lease>, RequestLog, Arc<Mutex<Option<Value>>>) {
    let stored = Arc::new(Mutex::new(initial));
    let state = stored.clone();
    let (client, log) = mock_client(move |r| {
        let mut lease = state.lock().unwrap();
        match r.method.as_str() {
            "GET" => match lease.as_ref() {
                Some(l) => (200, l.clone()),
                None => (404, status_error(404, "NotFound", "leases not found")),
            },
            "POST" if lease.is_some() => (409, status_error(409, "AlreadyExists", "exists")),
            "PUT"
                if lease.as_ref().map(|l| &l["metadata"]["resourceVersion"])
                    != Some(&r.body["metadata"]["resourceVersion"]) =>
            {
                (
                    409,
                    status_error(409, "Conflict", "the object has been modified"),
                )
            }
            _ => {
                let mut next = r.body.clone();
                next["apiVersion"] = json!("coordination.k8s.io/v1");
                next["kind"] = json!("Lease");
                let version = lease.as_ref().map_or(0, |l| {
                    l["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap()
                        .parse::<u32>()
                        .unwrap()
                });
                next["metadata"]["resourceVersion"] = json!((version + 1).to_string());
                *lease = Some(next.clone());
                (if r.method == "POST" { 201 } else { 200 }, next)
            }
        }
    });
    (Api::namespaced(client, "regmirror-system"), log, stored)
}

fn held_by(holder: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "regmirror-controller", "namespace": "regmirror-system", "resourceVersion": "7"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": "2026-11-23T00:00:00.000000Z", "leaseTransitions": 2}
    })
}

fn lines(log: &RequestLog) -> Vec<String> {
    log.take().iter().map(|r| r.line()).collect()
}

#[tokio::test]
async fn the_first_replica_creates_the_lease_and_then_renews_it() {
    let (api, log, stored) = server(None);
    let mut lock = LeaseLock::new(api, "regmirror-controller", "pod-a", DURATION);
    assert!(lock.try_acquire_or_renew().await.unwrap());
    assert_eq!(
        lines(&log),
        [
            format!("GET {PATH}"),
            "POST /apis/coordination.k8s.io/v1/namespaces/regmirror-system/leases?".to_owned()
        ]
    );
    let spec = stored.lock().unwrap().as_ref().unwrap()["spec"].clone();
    assert_eq!(spec["holderIdentity"], json!("pod-a"));
    assert_eq!(spec["leaseDurationSeconds"], json!(15));
    assert_eq!(spec["leaseTransitions"], json!(0));

    assert!(
        lock.try_acquire_or_renew().await.unwrap(),
        "renews its own lease"
    );
    assert_eq!(lines(&log), [format!("GET {PATH}"), format!("PUT {PATH}?")]);
    let renewed = stored.lock().unwrap().as_ref().unwrap()["spec"].clone();
    assert_eq!(
        renewed["acquireTime"], spec["acquireTime"],
        "still the same tenure"
    );
}

#[tokio::test(start_paused = true)]
async fn a_live_holder_is_left_alone_and_a_silent_one_is_replaced() {
    let (api, log, stored) = server(Some(held_by("pod-a")));
    let mut lock = LeaseLock::new(api, "regmirror-controller", "pod-b", DURATION);
    assert!(!lock.try_acquire_or_renew().await.unwrap());
    tokio::time::advance(DURATION - Duration::from_secs(1)).await;
    assert!(
        !lock.try_acquire_or_renew().await.unwrap(),
        "not yet a whole duration without renewal"
    );
    assert_eq!(
        lines(&log),
        [format!("GET {PATH}"), format!("GET {PATH}")],
        "no writes while pod-a holds it"
    );

    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(lock.try_acquire_or_renew().await.unwrap());
    assert_eq!(lines(&log), [format!("GET {PATH}"), format!("PUT {PATH}?")]);
    let spec = stored.lock().unwrap().as_ref().unwrap()["spec"].clone();
    assert_eq!(spec["holderIdentity"], json!("pod-b"));
    assert_eq!(spec["leaseTransitions"], json!(3));
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_keeps_renewing_is_never_replaced() {
    let (api, _log, stored) = server(Some(held_by("pod-a")));
    let mut lock = LeaseLock::new(api, "regmirror-controller", "pod-b", DURATION);
    for second in 0..60 {
        assert!(!lock.try_acquire_or_renew().await.unwrap());
        tokio::time::advance(Duration::from_secs(5)).await;
        // pod-a renews.
        stored.lock().unwrap().as_mut().unwrap()["spec"]["renewTime"] = json!(format!(
            "2026-11-23T00:{:02}:{:02}.000000Z",
            second / 12,
            (second % 12) * 5
        ));
    }
}

#[tokio::test(start_paused = true)]
async fn of_two_replicas_racing_for_an_expired_lease_one_wins() {
    let (api, _log, stored) = server(Some(held_by("pod-a")));
    let mut b = LeaseLock::new(api.clone(), "regmirror-controller", "pod-b", DURATION);
    let mut c = LeaseLock::new(api, "regmirror-controller", "pod-c", DURATION);
    assert!(!b.try_acquire_or_renew().await.unwrap());
    assert!(!c.try_acquire_or_renew().await.unwrap());
    tokio::time::advance(DURATION).await;
    let (wb, wc) = tokio::join!(b.try_acquire_or_renew(), c.try_acquire_or_renew());
    assert_ne!(wb.unwrap(), wc.unwrap(), "exactly one takes it");
    let holder = stored.lock().unwrap().as_ref().unwrap()["spec"]["holderIdentity"].clone();
    assert!(holder == json!("pod-b") || holder == json!("pod-c"));
}

#[tokio::test]
async fn release_hands_the_lease_back() {
    let (api, log, stored) = server(None);
    let mut lock = LeaseLock::new(api, "regmirror-controller", "pod-a", DURATION);
    assert!(lock.try_acquire_or_renew().await.unwrap());
    log.take();
    lock.release().await.unwrap();
    assert_eq!(lines(&log), [format!("GET {PATH}"), format!("PUT {PATH}?")]);
    let spec = stored.lock().unwrap().as_ref().unwrap()["spec"].clone();
    assert_eq!(spec.get("holderIdentity"), None);
}
