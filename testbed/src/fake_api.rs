//! A strict fake Kubernetes API server, in the way of kube-rs controller-rs's
//! `ApiServerVerifier`: a [`Scenario`] is the ordered list of the requests a test expects —
//! method, path with query, a body check — each with its answer. A request the scenario does
//! not expect fails the test, with a message naming the request and what was expected next;
//! so does an expected request never made, checked by [`FakeApi::finish`] (and on drop: a
//! scenario dropped unfinished panics, unless the test is already panicking).
//!
//! Besides the ordered list a scenario may hold:
//! - background rules ([`Scenario::background`]): answered any number of times, at any point,
//!   recorded but not required — e.g. Events, or watches that end and are resumed;
//! - unordered expectations ([`Scenario::any_order`]): each must be made at least once, in any
//!   order, and is answered again when repeated — e.g. the lists a process makes to fill its
//!   caches.
//!
//! A request is matched against the next ordered expectation first, then the unordered ones,
//! then the background rules. It runs on kube's mocked service (`tower-test`), as
//! [`crate::api::mock_client`] does.

use std::fmt;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::api::{mock_client, status_error, Recorded, RequestLog};

type Answer = Box<dyn FnMut(&Recorded) -> (u16, Value) + Send>;
type Check = Box<dyn Fn(&Value) -> Result<(), String> + Send>;

/// Where an expected request goes: its path with query exactly, or a prefix of it.
enum PathRule {
    Exact(String),
    Prefix(String),
    /// What the paths have in common, and the test for them.
    Where(String, Box<dyn Fn(&str) -> bool + Send>),
}

/// One expected request and its answer.
pub struct Expect {
    method: String,
    path: PathRule,
    content_type: Option<String>,
    body: Option<(String, Check)>,
    answer: Answer,
}

impl fmt::Debug for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Expect {
    /// `method` on exactly `path` (path and query as sent, e.g. `/api/v1/nodes/a?`), answered
    /// `200 {}` until [`Expect::answer`] says otherwise; any body.
    pub fn new(method: &str, path: impl Into<String>) -> Self {
        Expect {
            method: method.to_owned(),
            path: PathRule::Exact(path.into()),
            content_type: None,
            body: None,
            answer: Box::new(|_| (200, serde_json::json!({}))),
        }
    }

    pub fn get(path: impl Into<String>) -> Self {
        Expect::new("GET", path)
    }

    pub fn post(path: impl Into<String>) -> Self {
        Expect::new("POST", path)
    }

    pub fn patch(path: impl Into<String>) -> Self {
        Expect::new("PATCH", path)
    }

    pub fn delete(path: impl Into<String>) -> Self {
        Expect::new("DELETE", path)
    }

    /// `method` on any path (with query) starting with `prefix`: for names the test cannot
    /// know beforehand, or any query.
    pub fn prefix(method: &str, prefix: impl Into<String>) -> Self {
        Expect {
            path: PathRule::Prefix(prefix.into()),
            ..Expect::new(method, "")
        }
    }

    /// `method` on any path (with query) for which `holds` (`what` says which, for messages):
    /// e.g. a list but not a watch of the same resource.
    pub fn path_where(
        method: &str,
        what: &str,
        holds: impl Fn(&str) -> bool + Send + 'static,
    ) -> Self {
        Expect {
            path: PathRule::Where(what.to_owned(), Box::new(holds)),
            ..Expect::new(method, "")
        }
    }

    /// The body must be exactly `body` (`Value::Null`: no body).
    pub fn body(mut self, body: Value) -> Self {
        let shown = body.to_string();
        self.body = Some((
            shown,
            Box::new(move |got| match *got == body {
                true => Ok(()),
                false => Err(format!("body {got}")),
            }),
        ));
        self
    }

    /// The body must pass `check` (for bodies with sealed or random parts); `what` says what
    /// it checks, for messages. `check` returns why a body does not pass.
    pub fn body_check(
        mut self,
        what: &str,
        check: impl Fn(&Value) -> Result<(), String> + Send + 'static,
    ) -> Self {
        self.body = Some((what.to_owned(), Box::new(check)));
        self
    }

    /// The body must satisfy `holds`; `what` says what it checks.
    pub fn body_where(self, what: &str, holds: impl Fn(&Value) -> bool + Send + 'static) -> Self {
        let shown = what.to_owned();
        self.body_check(what, move |got| match holds(got) {
            true => Ok(()),
            false => Err(format!("{shown} does not hold of body {got}")),
        })
    }

    /// The `Content-Type` header must be `content_type`.
    pub fn content_type(mut self, content_type: &str) -> Self {
        self.content_type = Some(content_type.to_owned());
        self
    }

    /// Answer with `status` and `body`.
    pub fn answer(mut self, status: u16, body: Value) -> Self {
        self.answer = Box::new(move |_| (status, body.clone()));
        self
    }

    /// Answer with what `respond` makes of the request (a stateful server, an echo).
    pub fn answer_with(
        mut self,
        respond: impl FnMut(&Recorded) -> (u16, Value) + Send + 'static,
    ) -> Self {
        self.answer = Box::new(respond);
        self
    }

    /// `"PATCH /api/v1/nodes/a?"`, with the body check and content type if any.
    pub fn describe(&self) -> String {
        let path = match &self.path {
            PathRule::Exact(p) => p.clone(),
            PathRule::Prefix(p) => format!("{p}…"),
            PathRule::Where(what, _) => format!("<{what}>"),
        };
        let mut text = format!("{} {path}", self.method);
        if let Some(ct) = &self.content_type {
            text.push_str(&format!(" ({ct})"));
        }
        if let Some((what, _)) = &self.body {
            text.push_str(&format!(" with body {what}"));
        }
        text
    }

    /// Whether `r` is this request (method and path; body and content type are checked once
    /// it is taken).
    fn is(&self, r: &Recorded) -> bool {
        r.method == self.method
            && match &self.path {
                PathRule::Exact(p) => r.path == *p,
                PathRule::Prefix(p) => r.path.starts_with(p.as_str()),
                PathRule::Where(_, holds) => holds(&r.path),
            }
    }

    /// Why `r` is not what was expected of it, if it is not.
    fn mismatch(&self, r: &Recorded) -> Option<String> {
        let mut wrong = Vec::new();
        if let Some(ct) = &self.content_type {
            if r.content_type != *ct {
                wrong.push(format!("content type {:?}", r.content_type));
            }
        }
        if let Some((_, check)) = &self.body {
            if let Err(why) = check(&r.body) {
                wrong.push(why);
            }
        }
        (!wrong.is_empty()).then(|| {
            format!(
                "{} was expected as {}, but has {}",
                r.line(),
                self.describe(),
                wrong.join("; ")
            )
        })
    }
}

/// What a test expects its component to ask of the API server.
#[derive(Default)]
pub struct Scenario {
    ordered: Vec<Expect>,
    any_order: Vec<(Expect, usize)>,
    background: Vec<Expect>,
}

impl Scenario {
    pub fn new() -> Self {
        Scenario::default()
    }

    /// The next request, in order.
    pub fn then(mut self, expect: Expect) -> Self {
        self.ordered.push(expect);
        self
    }

    /// Made at least once, at any point; answered each time.
    pub fn any_order(mut self, expect: Expect) -> Self {
        self.any_order.push((expect, 0));
        self
    }

    /// Allowed any number of times, at any point; answered and recorded, never required.
    pub fn background(mut self, rule: Expect) -> Self {
        self.background.push(rule);
        self
    }

    /// Serves the scenario: the client to hand the component, and the server to finish.
    /// Must be called inside a Tokio runtime.
    pub fn serve(self) -> (kube::Client, FakeApi) {
        let state = Arc::new(Mutex::new(State {
            scenario: self,
            next: 0,
            failures: Vec::new(),
            finished: false,
        }));
        let shared = state.clone();
        let (client, log) = mock_client(move |r| shared.lock().expect("fake API lock").answer(r));
        (
            client,
            FakeApi {
                state,
                log,
                finished: false,
            },
        )
    }
}

struct State {
    scenario: Scenario,
    /// The index of the next ordered expectation.
    next: usize,
    failures: Vec<String>,
    /// The test is over: requests still coming (from tasks not yet stopped) are refused
    /// without failing it.
    finished: bool,
}

impl State {
    fn answer(&mut self, r: &Recorded) -> (u16, Value) {
        if self.finished {
            return (
                503,
                status_error(503, "ServiceUnavailable", "the test is over"),
            );
        }
        if let Some(expect) = self.scenario.ordered.get_mut(self.next) {
            if expect.is(r) {
                self.next += 1;
                let mismatch = expect.mismatch(r);
                let answer = (expect.answer)(r);
                if let Some(why) = mismatch {
                    self.fail(why);
                }
                return answer;
            }
        }
        let any = self.scenario.any_order.iter_mut().find(|(e, _)| e.is(r));
        if let Some((expect, seen)) = any {
            *seen += 1;
            let mismatch = expect.mismatch(r);
            let answer = (expect.answer)(r);
            if let Some(why) = mismatch {
                self.fail(why);
            }
            return answer;
        }
        if let Some(rule) = self.scenario.background.iter_mut().find(|e| e.is(r)) {
            let mismatch = rule.mismatch(r);
            let answer = (rule.answer)(r);
            if let Some(why) = mismatch {
                self.fail(why);
            }
            return answer;
        }
        let expected = match self.scenario.ordered.get(self.next) {
            Some(e) => format!("expected next: {}", e.describe()),
            None => "every ordered request was already made".to_owned(),
        };
        let why = format!(
            "unexpected request {} with body {}; {expected}",
            r.line(),
            r.body
        );
        self.fail(why.clone());
        (
            500,
            status_error(500, "InternalError", &format!("fake API: {why}")),
        )
    }

    fn fail(&mut self, why: String) {
        eprintln!("fake API: {why}");
        self.failures.push(why);
    }

    /// What went wrong: requests not expected, requests not as expected, requests expected
    /// but never made.
    fn verdict(&self) -> Vec<String> {
        let mut wrong = self.failures.clone();
        for e in &self.scenario.ordered[self.next..] {
            wrong.push(format!("expected but never made: {}", e.describe()));
        }
        for (e, seen) in &self.scenario.any_order {
            if *seen == 0 {
                wrong.push(format!(
                    "expected (in any order) but never made: {}",
                    e.describe()
                ));
            }
        }
        wrong
    }
}

/// A served [`Scenario`]: call [`FakeApi::finish`] once the component is done.
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    log: RequestLog,
    finished: bool,
}

impl FakeApi {
    /// Every request made so far (background ones included), and forgets them.
    pub fn take(&self) -> Vec<Recorded> {
        self.log.take()
    }

    /// Every request made so far (background ones included).
    pub fn requests(&self) -> Vec<Recorded> {
        self.log.snapshot()
    }

    /// The log of requests, for helpers written against [`RequestLog`].
    pub fn log(&self) -> &RequestLog {
        &self.log
    }

    /// Appends `more` to the scenario: its ordered requests after those already expected,
    /// its other rules beside the present ones. For tests that learn what comes next from
    /// what came before.
    pub fn extend(&self, more: Scenario) {
        let mut state = self.state.lock().expect("fake API lock");
        state.scenario.ordered.extend(more.ordered);
        state.scenario.any_order.extend(more.any_order);
        state.scenario.background.extend(more.background);
    }

    /// How many ordered requests are still to come.
    pub fn pending(&self) -> usize {
        let state = self.state.lock().expect("fake API lock");
        state.scenario.ordered.len() - state.next
    }

    /// Panics unless every request was expected and as expected, and every expected request
    /// was made.
    pub fn finish(mut self) {
        self.finished = true;
        let wrong = {
            let mut state = self.state.lock().expect("fake API lock");
            state.finished = true;
            state.verdict()
        };
        assert!(
            wrong.is_empty(),
            "the fake API server's scenario did not hold:\n  {}",
            wrong.join("\n  ")
        );
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if self.finished || std::thread::panicking() {
            return;
        }
        let wrong = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.finished = true;
            state.verdict()
        };
        panic!(
            "a fake API scenario was dropped without finish(){}",
            match wrong.is_empty() {
                true => String::new(),
                false => format!("; it did not hold:\n  {}", wrong.join("\n  ")),
            }
        );
    }
}

/// Where Events about cluster-scoped objects are posted (`regmirror_process::events`).
pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events?";

/// The Events a component publishes: `POST /apis/events.k8s.io/…`, answered with the Event
/// as written, recorded, never required.
pub fn events() -> Expect {
    Expect::prefix("POST", "/apis/events.k8s.io/").answer_with(|r| {
        let mut body = r.body.clone();
        body["apiVersion"] = serde_json::json!("events.k8s.io/v1");
        body["kind"] = serde_json::json!("Event");
        (201, body)
    })
}

/// One Event, expected in order: `type_` (Normal, Warning), `reason`, and, if given, the name
/// of the object it is about.
pub fn event(type_: &str, reason: &str, regarding: Option<&str>) -> Expect {
    let (type_, reason, regarding) = (
        type_.to_owned(),
        reason.to_owned(),
        regarding.map(str::to_owned),
    );
    let what = format!(
        "an Event {type_} {reason}{}",
        regarding
            .as_deref()
            .map(|r| format!(" about {r}"))
            .unwrap_or_default()
    );
    let Expect { answer, .. } = events();
    Expect {
        answer,
        ..Expect::post(EVENTS).body_where(&what, move |b| {
            b["type"] == type_.as_str()
                && b["reason"] == reason.as_str()
                && regarding
                    .as_deref()
                    .is_none_or(|r| b["regarding"]["name"] == r)
        })
    }
}
