//! The agent's resident memory while it idles, watching its Node: the release binary runs
//! `regmirror-agent run` against a stand-in API server on 127.0.0.1 that lists one Node and
//! then holds the watch open, as a quiet cluster does. Also prints the binary's size.
//!
//! `cargo bench -p regmirror-node-agent --bench idle` (build the release binary first:
//! `cargo build --release -p regmirror-node-agent`; stripped by the release profile)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const NODE: &str = r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"edge-1","uid":"u1","resourceVersion":"10","annotations":{"regmirror.io/flavor":"containerd","regmirror.io/state":"Applied","regmirror.io/message":""}},"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#;

/// Answers list, watch (held open) and patch requests for one Node.
fn serve(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || handle(stream));
    }
}

fn handle(mut stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            if header == "\r\n" {
                break;
            }
            if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        if request_line.contains("watch=true") {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
            std::thread::sleep(Duration::from_secs(3600));
            return;
        }
        let answer = if request_line.starts_with("GET /api/v1/nodes") {
            format!(
                r#"{{"apiVersion":"v1","kind":"NodeList","metadata":{{"resourceVersion":"10"}},"items":[{NODE}]}}"#
            )
        } else {
            NODE.to_owned()
        };
        let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}", answer.len());
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn main() {
    let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/regmirror-agent");
    if !binary.exists() {
        eprintln!("build it first: cargo build --release -p regmirror-node-agent");
        std::process::exit(1);
    }
    let size = std::fs::metadata(&binary).unwrap().len();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || serve(listener));

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, format!("apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"http://127.0.0.1:{port}\"}}}}]\nusers: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: c, context: {{cluster: c, user: u}}}}]\ncurrent-context: c\n")).unwrap();
    let root = dir.path().join("host");
    std::fs::create_dir_all(root.join("etc/containerd")).unwrap();
    std::fs::write(root.join("etc/containerd/config.toml"), "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n").unwrap();
    let metrics_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut agent = Command::new(&binary)
        .args([
            "--root",
            root.to_str().unwrap(),
            "run",
            "--listen",
            &format!("127.0.0.1:{metrics_port}"),
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("NODE_NAME", "edge-1")
        .env("POD_NAMESPACE", "regmirror-system")
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let ready = TcpStream::connect(("127.0.0.1", metrics_port)).is_ok_and(|mut s| {
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.1 200")
    });
    let rss = rss_kib(agent.id());
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(ready, "the agent never became ready (saw its Node)");
    println!(
        "regmirror-agent (release, stripped): {:.1} MiB on disk",
        size as f64 / 1048576.0
    );
    println!(
        "idle, watching its Node: {rss} KiB resident ({:.1} MiB)",
        rss as f64 / 1024.0
    );
}
