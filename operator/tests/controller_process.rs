//! `regmirror controller` as a process: its tasks log from every runtime thread, and it stays
//! responsive while they do. (The command once held the stdout and stderr locks on its main
//! thread for its whole life: the first log line from any other thread waited forever — the
//! lease's renewals and release, the watches, the metrics endpoint.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use regmirror_testbed::{dead_port, free_port};

fn healthz(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer)
}

#[test]
fn the_controller_answers_while_its_watches_log_failures() {
    let dir = tempfile::tempdir().unwrap();
    // An API server that refuses every connection: every watch fails, is logged and retried,
    // from the runtime's worker threads.
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"http://127.0.0.1:{}\"}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
            dead_port()
        ),
    )
    .unwrap();
    let log = dir.path().join("controller.log");
    let port = free_port();
    let mut controller = Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .args([
            "controller",
            "--namespace",
            "regmirror-system",
            "--identity",
            "test",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let failures = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("watch failed")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    // Enough failed watches logged to have occupied both worker threads, and then some.
    while failures() < 12 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let logged = failures();
    let answer = healthz(port);
    let _ = controller.kill();
    let _ = controller.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged >= 12,
        "the watches' failures stopped being logged after {logged}: a thread logging waits:\n{text}"
    );
    assert!(
        answer
            .as_deref()
            .is_some_and(|a| a.starts_with("HTTP/1.1 200")),
        "/healthz does not answer while the watches fail: {answer:?}\n{text}"
    );
}
