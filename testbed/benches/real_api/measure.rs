//! What the benchmark reads to measure: the operator's process (`/proc`), its own metrics,
//! the API server's `apiserver_request_total`, and the API server's audit log (which, unlike
//! the metrics, says who made each request).

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Seek, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

/// A process's resident memory, from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// VmHWM: the peak resident set so far.
    pub peak_kib: u64,
    /// VmRSS: the resident set now.
    pub now_kib: u64,
}

pub fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        peak_kib: field("VmHWM:"),
        now_kib: field("VmRSS:"),
    }
}

/// CPU seconds a process has used, user and system (utime + stime of `/proc/<pid>/stat`).
pub fn cpu_seconds(pid: u32, ticks_per_second: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After "pid (comm) ": state is field 3, utime 14 and stime 15.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    (ticks(14).unwrap_or(0.0) + ticks(15).unwrap_or(0.0)) / ticks_per_second
}

/// The kernel's clock ticks per second, in which `/proc/<pid>/stat` counts CPU time.
pub fn ticks_per_second() -> f64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("run getconf CLK_TCK");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("getconf CLK_TCK prints a number")
}

/// Samples of a Prometheus text exposition: `name{labels}` → value.
pub type Samples = BTreeMap<String, f64>;

fn parse_samples(text: &str) -> Samples {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The operator's own metrics (plain HTTP on its metrics port).
pub fn operator_metrics(address: SocketAddr) -> Samples {
    let Ok(mut stream) = std::net::TcpStream::connect(address) else {
        return Samples::new();
    };
    let _ = write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    );
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    parse_samples(body)
}

/// A sample's value, 0 if absent.
pub fn sample(samples: &Samples, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

/// Requests of one kind: verb and resource (`group/resource[/subresource]`).
pub type RequestKind = (String, String);

/// `apiserver_request_total` summed over codes and scopes, by verb and resource.
pub async fn apiserver_requests(admin: &kube::Client) -> BTreeMap<RequestKind, f64> {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = admin
        .request_text(request)
        .await
        .expect("GET /metrics of the API server");
    let mut requests = BTreeMap::new();
    for (series, value) in parse_samples(&text) {
        let Some(labels) = series
            .strip_prefix("apiserver_request_total{")
            .and_then(|l| l.strip_suffix('}'))
        else {
            continue;
        };
        let labels: BTreeMap<&str, &str> = labels
            .split("\",")
            .filter_map(|kv| {
                let (k, v) = kv.split_once("=\"")?;
                Some((k, v.trim_end_matches('"')))
            })
            .collect();
        let label = |k: &str| labels.get(k).copied().unwrap_or_default();
        if label("resource").is_empty() {
            continue; // non-resource URLs: /healthz, /metrics, discovery
        }
        let kind = (
            label("verb").to_owned(),
            resource(label("group"), label("resource"), label("subresource")),
        );
        *requests.entry(kind).or_insert(0.0) += value;
    }
    requests
}

fn resource(group: &str, resource: &str, subresource: &str) -> String {
    let mut name = if group.is_empty() {
        resource.to_owned()
    } else {
        format!("{group}/{resource}")
    };
    if !subresource.is_empty() {
        name.push('/');
        name.push_str(subresource);
    }
    name
}

/// The API server's audit log: requests by who made them.
pub struct Audit {
    path: PathBuf,
}

/// Requests counted in the audit log: (who, verb, resource) → (requests, of which failed).
pub type AuditCounts = BTreeMap<(String, String, String), (u64, u64)>;

impl Audit {
    pub fn new(path: &Path) -> Audit {
        Audit {
            path: path.to_owned(),
        }
    }

    /// Where the log ends now.
    pub fn offset(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// The requests logged between two offsets, by who made them (see [`who`]), verb and
    /// resource. Each request is counted once, when its response completed (a watch when it
    /// ends).
    pub fn between(&self, from: u64, to: u64) -> AuditCounts {
        assert!(
            from <= to,
            "the audit log {} shrank: rotated?",
            self.path.display()
        );
        let mut file = std::fs::File::open(&self.path).expect("open the audit log");
        file.seek(std::io::SeekFrom::Start(from)).unwrap();
        let mut counts = AuditCounts::new();
        for line in std::io::BufReader::new(file.take(to - from)).lines() {
            let Ok(event) = serde_json::from_str::<Value>(&line.unwrap_or_default()) else {
                continue;
            };
            if event["stage"] != "ResponseComplete" {
                continue;
            }
            let object = &event["objectRef"];
            let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            let kind = (
                who(event["user"]["username"].as_str().unwrap_or_default()).to_owned(),
                text(&event["verb"]),
                resource(
                    &text(&object["apiGroup"]),
                    &text(&object["resource"]),
                    &text(&object["subresource"]),
                ),
            );
            let failed = event["responseStatus"]["code"]
                .as_u64()
                .is_some_and(|code| code >= 400);
            let entry = counts.entry(kind).or_insert((0, 0));
            entry.0 += 1;
            entry.1 += u64::from(failed);
        }
        counts
    }
}

/// Who made a request, by the user the API server authenticated.
pub fn who(username: &str) -> &'static str {
    match username {
        "system:serviceaccount:regmirror-system:regmirror-operator" => "operator",
        "system:serviceaccount:regmirror-system:regmirror-agent" => "agents",
        "system:serviceaccount:regmirror-system:regmirror-bench-kubelets" => "kubelets",
        "kubernetes-admin" => "benchmark",
        "system:apiserver" => "apiserver",
        u if u == "system:kube-controller-manager"
            || u.starts_with("system:serviceaccount:kube-system:") =>
        {
            "controller-manager"
        }
        _ => "other",
    }
}

/// The counts of `who`, summed over the kinds `keep` selects.
pub fn total(counts: &AuditCounts, who: &str, keep: impl Fn(&str, &str) -> bool) -> u64 {
    counts
        .iter()
        .filter(|((w, verb, resource), _)| w == who && keep(verb, resource))
        .map(|(_, (n, _))| n)
        .sum()
}

/// Writes to Nodes themselves (annotations; not their status).
pub fn node_write(verb: &str, resource: &str) -> bool {
    resource == "nodes" && matches!(verb, "patch" | "update")
}

/// Changes to Nodes by anyone (created, written, status posted): each is a watch event the
/// operator receives and decodes, whether or not it matters to it.
pub fn node_changes(counts: &AuditCounts) -> u64 {
    counts
        .iter()
        .filter(|((_, verb, resource), _)| {
            matches!(resource.as_str(), "nodes" | "nodes/status")
                && matches!(verb.as_str(), "create" | "patch" | "update" | "delete")
        })
        .map(|(_, (n, failed))| n - failed)
        .sum()
}

/// A moment of the benchmark, to measure the phase between two of them.
#[derive(Debug, Clone)]
pub struct Mark {
    pub at: Instant,
    pub cpu_seconds: f64,
    pub memory: Memory,
    pub operator: Samples,
    pub requests: BTreeMap<RequestKind, f64>,
    pub audit_offset: u64,
}
