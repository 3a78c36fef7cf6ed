//! A stand-in Kubernetes API server for tests: kube's mocked service (`tower-test`), answering
//! each request with what the test's responder says and logging every request, so a test can
//! assert the exact requests — method, path with query, and body — a component sent.

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::Value;

/// One request as the API server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub method: String,
    /// Path and query, e.g. `/api/v1/nodes/a?fieldManager=regmirror`.
    pub path: String,
    /// The JSON body; `Value::Null` when there was none.
    pub body: Value,
    /// The `Content-Type` header, e.g. `application/apply-patch+yaml` for server-side apply;
    /// empty when there was none.
    pub content_type: String,
}

impl Recorded {
    /// `"PATCH /api/v1/nodes/a"`: the request line, for compact assertions.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    /// Whether this request changes something (anything but GET).
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }
}

/// The requests sent so far.
#[derive(Debug, Clone, Default)]
pub struct RequestLog(Arc<Mutex<Vec<Recorded>>>);

impl RequestLog {
    pub fn take(&self) -> Vec<Recorded> {
        std::mem::take(&mut self.0.lock().expect("request log lock"))
    }

    pub fn snapshot(&self) -> Vec<Recorded> {
        self.0.lock().expect("request log lock").clone()
    }
}

/// A client whose every request goes to `respond`, which returns the status code and JSON
/// body to answer with. Must be called inside a Tokio runtime.
pub fn mock_client(
    mut respond: impl FnMut(&Recorded) -> (u16, Value) + Send + 'static,
) -> (kube::Client, RequestLog) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let log = RequestLog::default();
    let sink = log.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let recorded = Recorded {
                method: parts.method.to_string(),
                path: parts
                    .uri
                    .path_and_query()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                content_type: parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned(),
                body: if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(&bytes).into_owned())
                    })
                },
            };
            let (code, answer) = respond(&recorded);
            sink.0.lock().expect("request log lock").push(recorded);
            let response = Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(
                    serde_json::to_vec(&answer).expect("JSON answer"),
                ))
                .expect("a valid response");
            send.send_response(response);
        }
    });
    (kube::Client::new(service, "default"), log)
}

/// The body of a Kubernetes `Status` error, as the API server sends with 4xx answers.
pub fn status_error(code: u16, reason: &str, message: &str) -> Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    })
}
