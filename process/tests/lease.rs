//! Leader election against kube's mocked service: who writes what, and when a replica may
//! take over.
//!
//! kube-lease-manager judges expiry by the wall clock (`renewTime` + `leaseDurationSeconds`
//! against now), so these tests run in real time with a 3 s lease, and stored leases carry
//! `renewTime`s relative to now.
//!
//! The API server is the strict fake of regmirror-testbed, answering from one stored Lease:
//! where a test knows the requests in order it expects them in order; where the candidates'
//! polling or a race makes their number unknowable, it allows requests on the Lease only.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use regmirror_process::lease::{Held, LeaseLock};
use regmirror_testbed::api::{status_error, Recorded, RequestLog};
use regmirror_testbed::fake_api::{Expect, FakeApi, Scenario};
use serde_json::{json, Value};
use tokio::time::{timeout, Instant};

const NAMESPACE: &str = "regmirror-system";
const NAME: &str = "regmirror-controller";
const PATH: &str =
    "/apis/coordination.k8s.io/v1/namespaces/regmirror-system/leases/regmirror-controller";
const DURATION: Duration = Duration::from_secs(3);
const APPLY: &str = "application/apply-patch+yaml";
const MERGE: &str = "application/strategic-merge-patch+json";

/// The API server's side: at most one Lease, and which field manager owns its
/// `spec.holderIdentity` (server-side apply refuses a claim on a field another manager owns
/// with another value).
#[derive(Default)]
struct Stored {
    lease: Option<Value>,
    holder_owner: Option<String>,
    /// Another replica whose claim lands just before the next apply: the race it wins.
    claims_first: Option<String>,
    /// Refuse writes with 500 from now on: an API server the holder cannot reach.
    failing_writes: bool,
}

type Shared = Arc<Mutex<Stored>>;

/// The stored Lease `initial`, served as `scenario` says: its requests answered from
/// `stored` by [`on_lease`] and the like.
fn server(initial: Option<Value>) -> Shared {
    Shared::new(Mutex::new(Stored {
        lease: initial,
        ..Stored::default()
    }))
}

/// A request on the Lease, answered from `stored`.
fn on_lease(stored: &Shared, expect: Expect) -> Expect {
    let state = stored.clone();
    expect.answer_with(move |r| answer(&mut state.lock().unwrap(), r))
}

/// A read of the Lease.
fn read(stored: &Shared) -> Expect {
    on_lease(stored, Expect::get(PATH))
}

/// The Lease created.
fn create(stored: &Shared) -> Expect {
    on_lease(
        stored,
        Expect::post(format!(
            "/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases?"
        ))
        .content_type("application/json"),
    )
}

/// `identity` claims the Lease (server-side apply of itself as holder).
fn claim(stored: &Shared, identity: &str) -> Expect {
    let who = json!(identity);
    on_lease(
        stored,
        Expect::patch(format!(
            "{PATH}?&fieldManager=kube-lease-manager-{identity}"
        ))
        .content_type(APPLY)
        .body_where(&format!("holderIdentity {identity}"), move |b| {
            b["spec"]["holderIdentity"] == who
        }),
    )
}

/// `identity` renews, counts a transition, clears an expired holder or releases (a merge
/// patch).
fn update(stored: &Shared, identity: &str) -> Expect {
    on_lease(
        stored,
        Expect::patch(format!(
            "{PATH}?&fieldManager=kube-lease-manager-{identity}"
        ))
        .content_type(MERGE),
    )
}

/// The first candidate's way to a lease nobody made yet: read, create, read twice, claim,
/// count the transition, read.
fn first_acquire(stored: &Shared, identity: &str, scenario: Scenario) -> Scenario {
    scenario
        .then(read(stored))
        .then(create(stored))
        .then(read(stored))
        .then(read(stored))
        .then(claim(stored, identity))
        .then(update(stored, identity))
        .then(read(stored))
}

/// Any request on the Lease, at any time, any number: for candidates polling in real time
/// or racing, whose requests cannot be told beforehand. Nothing else is allowed.
fn anything_on_the_lease(stored: &Shared, scenario: Scenario) -> Scenario {
    let prefix = format!("{PATH}?&fieldManager=kube-lease-manager-");
    scenario
        .background(read(stored))
        .background(create(stored))
        .background(on_lease(stored, Expect::prefix("PATCH", prefix)))
}

fn answer(stored: &mut Stored, r: &Recorded) -> (u16, Value) {
    let not_found = || (404, status_error(404, "NotFound", "leases not found"));
    if stored.failing_writes && r.method != "GET" {
        return (500, status_error(500, "InternalError", "etcd is away"));
    }
    match r.method.as_str() {
        "GET" => stored.lease.clone().map_or_else(not_found, |l| (200, l)),
        "POST" if stored.lease.is_some() => (
            409,
            status_error(409, "AlreadyExists", "leases already exists"),
        ),
        "POST" => {
            let mut lease = r.body.clone();
            lease["apiVersion"] = json!("coordination.k8s.io/v1");
            lease["kind"] = json!("Lease");
            lease["metadata"]["namespace"] = json!(NAMESPACE);
            lease["metadata"]["resourceVersion"] = json!("1");
            stored.lease = Some(lease.clone());
            (201, lease)
        }
        "PATCH" if stored.lease.is_none() => not_found(),
        "PATCH" => {
            let manager = field_manager(r);
            let claim = &r.body["spec"]["holderIdentity"];
            if r.content_type == APPLY {
                if let Some(other) = stored.claims_first.take() {
                    let at = renewed(Duration::ZERO);
                    merge(
                        stored.lease.as_mut().unwrap(),
                        &json!({"spec": {"holderIdentity": other, "acquireTime": at, "renewTime": at, "leaseDurationSeconds": 3}}),
                    );
                    stored.holder_owner = Some(format!("kube-lease-manager-{other}"));
                }
                let held = &stored.lease.as_ref().unwrap()["spec"]["holderIdentity"];
                if stored.holder_owner.as_ref().is_some_and(|o| *o != manager)
                    && !claim.is_null()
                    && held != claim
                {
                    return (
                        409,
                        status_error(409, "Conflict", "Apply failed with 1 conflict: conflict with \"kube-lease-manager-...\": .spec.holderIdentity"),
                    );
                }
            } else {
                assert_eq!(r.content_type, MERGE, "{}", r.line());
            }
            let lease = stored.lease.as_mut().unwrap();
            merge(lease, &r.body);
            if let Some(spec) = r.body["spec"].as_object() {
                if spec.contains_key("holderIdentity") {
                    stored.holder_owner = (!claim.is_null()).then_some(manager);
                }
            }
            let version: u32 = lease["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            lease["metadata"]["resourceVersion"] = json!((version + 1).to_string());
            (200, lease.clone())
        }
        _ => (
            405,
            status_error(405, "MethodNotAllowed", "not in this test"),
        ),
    }
}

fn field_manager(r: &Recorded) -> String {
    r.path
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("fieldManager="))
        .unwrap_or_default()
        .to_owned()
}

/// A JSON merge: objects merge, `null` deletes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    match patch.as_object() {
        Some(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let target = target.as_object_mut().unwrap();
            for (key, value) in fields {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        None => *target = patch.clone(),
    }
}

/// A `renewTime` of `ago` before now.
fn renewed(ago: Duration) -> Value {
    let at = Timestamp::try_from(SystemTime::now() - ago).unwrap();
    serde_json::to_value(MicroTime(at)).unwrap()
}

fn held_by(holder: &str, ago: Duration) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": NAME, "namespace": NAMESPACE, "resourceVersion": "7"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 3, "acquireTime": renewed(ago), "renewTime": renewed(ago), "leaseTransitions": 2}
    })
}

fn released() -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": NAME, "namespace": NAMESPACE, "resourceVersion": "7"},
        "spec": {"leaseTransitions": 2}
    })
}

fn lock(client: &kube::Client, identity: &str) -> LeaseLock {
    LeaseLock::new(client.clone(), NAMESPACE, NAME, identity, DURATION)
}

/// Method, path and content type of each request.
fn lines(api: &FakeApi) -> Vec<String> {
    lines_of(api.log())
}

fn lines_of(log: &RequestLog) -> Vec<String> {
    log.take()
        .iter()
        .map(|r| {
            format!("{} {}", r.line(), r.content_type)
                .trim_end()
                .to_owned()
        })
        .collect()
}

fn spec(stored: &Shared) -> Value {
    stored.lock().unwrap().lease.as_ref().unwrap()["spec"].clone()
}

fn claims(identity: &str) -> [String; 3] {
    [
        format!("PATCH {PATH}?&fieldManager=kube-lease-manager-{identity} {APPLY}"),
        format!("PATCH {PATH}?&fieldManager=kube-lease-manager-{identity} {MERGE}"),
        format!("GET {PATH}"),
    ]
}

async fn acquired(lock: LeaseLock, within: Duration) -> Held {
    timeout(within, lock.acquire())
        .await
        .expect("the lease is taken in time")
}

#[tokio::test]
async fn the_first_replica_creates_the_lease_and_then_renews_it() {
    let stored = server(None);
    let scenario = first_acquire(&stored, "pod-a", Scenario::new())
        // A renewal, then the release.
        .then(update(&stored, "pod-a"))
        .then(read(&stored))
        .then(update(&stored, "pod-a"))
        .then(read(&stored));
    let (client, api) = scenario.serve();
    let mut held = acquired(lock(&client, "pod-a"), Duration::from_secs(2)).await;
    let mut expected = vec![
        format!("GET {PATH}"),
        format!(
            "POST /apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases? application/json"
        ),
        format!("GET {PATH}"),
        format!("GET {PATH}"),
    ];
    expected.extend(claims("pod-a"));
    assert_eq!(lines(&api), expected);
    let first = spec(&stored);
    assert_eq!(first["holderIdentity"], json!("pod-a"));
    assert_eq!(first["leaseDurationSeconds"], json!(3));
    assert_eq!(first["leaseTransitions"], json!(1));

    // A third of the duration later, the holder renews: its own tenure, a new renewTime.
    tokio::select! {
        _ = held.lost() => panic!("lost a lease nobody else wants"),
        _ = tokio::time::sleep(Duration::from_millis(1500)) => {}
    }
    assert_eq!(
        lines(&api),
        [
            format!("PATCH {PATH}?&fieldManager=kube-lease-manager-pod-a {MERGE}"),
            format!("GET {PATH}")
        ]
    );
    let renewed = spec(&stored);
    assert_eq!(renewed["holderIdentity"], json!("pod-a"));
    assert_eq!(
        renewed["acquireTime"], first["acquireTime"],
        "still the same tenure"
    );
    assert_ne!(renewed["renewTime"], first["renewTime"]);
    assert_eq!(renewed["leaseTransitions"], json!(1));
    held.release().await;
    api.finish();
}

#[tokio::test]
async fn a_live_holder_is_left_alone_and_a_silent_one_is_replaced() {
    let stored = server(Some(held_by("pod-a", Duration::ZERO)));
    // pod-b polls (reads) until the holder expired; then its writes come in order: it clears
    // the expired holder, claims, counts the transition; and at the end releases.
    let scenario = Scenario::new()
        .background(read(&stored))
        .then(update(&stored, "pod-b"))
        .then(claim(&stored, "pod-b"))
        .then(update(&stored, "pod-b"))
        .then(update(&stored, "pod-b"));
    let (client, api) = scenario.serve();
    let start = Instant::now();
    let mut b = tokio::spawn(lock(&client, "pod-b").acquire());
    tokio::time::sleep(DURATION - Duration::from_millis(500)).await;
    assert!(!b.is_finished(), "not yet a whole duration without renewal");
    assert!(
        api.requests().iter().all(|r| r.method == "GET"),
        "no writes while pod-a holds it: {:#?}",
        api.requests()
    );

    let held = timeout(Duration::from_secs(3), &mut b)
        .await
        .expect("pod-b takes over a silent holder's lease")
        .unwrap();
    assert!(start.elapsed() >= DURATION, "not before it expired");
    let requests = lines(&api);
    let writes: Vec<&String> = requests.iter().filter(|l| !l.starts_with("GET")).collect();
    assert_eq!(
        writes,
        [
            // Clears the expired holder, then claims it.
            &format!("PATCH {PATH}?&fieldManager=kube-lease-manager-pod-b {MERGE}"),
            &claims("pod-b")[0],
            &claims("pod-b")[1],
        ]
    );
    let spec = spec(&stored);
    assert_eq!(spec["holderIdentity"], json!("pod-b"));
    assert_eq!(spec["leaseTransitions"], json!(3));
    held.release().await;
    api.finish();
}

#[tokio::test]
async fn a_holder_that_keeps_renewing_is_never_replaced() {
    let stored = server(Some(held_by("pod-a", Duration::ZERO)));
    // Reads only: any write fails the test.
    let (client, api) = Scenario::new().background(read(&stored)).serve();
    let b = tokio::spawn(lock(&client, "pod-b").acquire());
    for _ in 0..7 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // pod-a renews.
        stored.lock().unwrap().lease.as_mut().unwrap()["spec"]["renewTime"] =
            renewed(Duration::ZERO);
        assert!(!b.is_finished());
    }
    b.abort();
    assert!(api.take().iter().all(|r| r.method == "GET"));
    assert_eq!(spec(&stored)["holderIdentity"], json!("pod-a"));
    api.finish();
}

#[tokio::test]
async fn of_two_replicas_racing_for_an_expired_lease_one_wins() {
    let stored = server(Some(held_by("pod-a", Duration::from_secs(10))));
    let (client, api) = anything_on_the_lease(&stored, Scenario::new()).serve();
    let mut b = tokio::spawn(lock(&client, "pod-b").acquire());
    let mut c = tokio::spawn(lock(&client, "pod-c").acquire());
    let (winner, mut loser, held) = tokio::select! {
        held = &mut b => ("pod-b", c, held.unwrap()),
        held = &mut c => ("pod-c", b, held.unwrap()),
        _ = tokio::time::sleep(Duration::from_secs(3)) => panic!("nobody took the expired lease"),
    };
    assert_eq!(spec(&stored)["holderIdentity"], json!(winner));
    // The winner keeps renewing; the other keeps waiting.
    assert!(timeout(Duration::from_secs(4), &mut loser).await.is_err());
    assert_eq!(spec(&stored)["holderIdentity"], json!(winner));
    loser.abort();
    held.release().await;
    api.finish();
}

#[tokio::test]
async fn a_claim_that_loses_the_race_is_refused() {
    let stored = server(Some(released()));
    // pod-c reads the free lease and claims it (refused, 409); nothing more for now.
    let (client, api) = Scenario::new()
        .background(read(&stored))
        .then(claim(&stored, "pod-c"))
        .serve();
    // pod-b's claim lands between pod-c reading the free lease and pod-c claiming it.
    stored.lock().unwrap().claims_first = Some("pod-b".into());
    let start = Instant::now();
    let mut c = tokio::spawn(lock(&client, "pod-c").acquire());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!c.is_finished(), "pod-c does not lead beside pod-b");
    let requests = api.take();
    let claimed = requests
        .iter()
        .find(|r| r.content_type == APPLY)
        .expect("pod-c tried to claim the free lease");
    assert_eq!(claimed.body["spec"]["holderIdentity"], json!("pod-c"));
    assert_eq!(
        requests.iter().filter(|r| r.method != "GET").count(),
        1,
        "refused (409), nothing more: {requests:#?}"
    );
    assert_eq!(spec(&stored)["holderIdentity"], json!("pod-b"));

    // pod-b never renews: once its lease expired, pod-c takes over (clears the expired
    // holder, claims, counts the transition) and at the end releases.
    api.extend(
        Scenario::new()
            .then(update(&stored, "pod-c"))
            .then(claim(&stored, "pod-c"))
            .then(update(&stored, "pod-c"))
            .then(update(&stored, "pod-c")),
    );
    let held = timeout(Duration::from_secs(4), &mut c)
        .await
        .expect("pod-c takes over after pod-b's lease expired")
        .unwrap();
    assert!(start.elapsed() >= DURATION);
    assert_eq!(spec(&stored)["holderIdentity"], json!("pod-c"));
    held.release().await;
    api.finish();
}

#[tokio::test]
async fn release_hands_the_lease_back() {
    let stored = server(None);
    let scenario = first_acquire(&stored, "pod-a", Scenario::new())
        .then(update(&stored, "pod-a"))
        .then(read(&stored));
    let (client, api) = scenario.serve();
    let held = acquired(lock(&client, "pod-a"), Duration::from_secs(2)).await;
    api.take();
    held.release().await;
    assert_eq!(
        lines(&api),
        [
            format!("PATCH {PATH}?&fieldManager=kube-lease-manager-pod-a {MERGE}"),
            format!("GET {PATH}")
        ]
    );
    let spec = spec(&stored);
    assert_eq!(spec.get("holderIdentity"), None);
    assert_eq!(spec.get("renewTime"), None);
    api.finish();
}

#[tokio::test]
async fn a_holder_that_cannot_renew_loses_the_lease_within_a_duration() {
    let stored = server(None);
    let (client, api) = first_acquire(&stored, "pod-a", Scenario::new()).serve();
    let start = Instant::now();
    let mut held = acquired(lock(&client, "pod-a"), Duration::from_secs(2)).await;
    // Renewals (as many as fit) fail from now on.
    api.extend(anything_on_the_lease(&stored, Scenario::new()));
    stored.lock().unwrap().failing_writes = true;
    timeout(DURATION, held.lost())
        .await
        .expect("lost once renewals failed for a whole duration");
    assert!(start.elapsed() < DURATION, "before the lease expired");
    assert!(
        api.take().iter().any(|r| r.method == "PATCH"),
        "it did try to renew"
    );
    held.release().await;
    let releases = api.take().into_iter().filter(|r| {
        r.method == "PATCH"
            && r.body["spec"]
                .as_object()
                .is_some_and(|spec| spec.contains_key("holderIdentity"))
    });
    assert_eq!(releases.count(), 0, "a lost lease is not released");
    api.finish();
}

#[tokio::test]
async fn a_holder_that_finds_another_holder_loses_the_lease() {
    let stored = server(None);
    let (client, api) = first_acquire(&stored, "pod-a", Scenario::new()).serve();
    let mut held = acquired(lock(&client, "pod-a"), Duration::from_secs(2)).await;
    api.extend(anything_on_the_lease(&stored, Scenario::new()));
    {
        let mut stored = stored.lock().unwrap();
        stored.lease.as_mut().unwrap()["spec"]["holderIdentity"] = json!("pod-x");
        stored.holder_owner = Some("kube-lease-manager-pod-x".into());
    }
    timeout(DURATION, held.lost())
        .await
        .expect("lost at the next renewal");
    held.release().await;
    assert_eq!(spec(&stored)["holderIdentity"], json!("pod-x"));
    api.finish();
}
