//! The health and metrics endpoint, over a real socket on 127.0.0.1.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use regmirror_process::endpoints::{serve, Health};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let code = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (code, body)
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let mut registry = Registry::default();
    let passes = Counter::<u64>::default();
    registry.register("regmirror_passes", "Passes", passes.clone());
    passes.inc();
    let health = Health::new(registry);
    let addr = {
        let port = regmirror_testbed::free_port();
        format!("127.0.0.1:{port}").parse().unwrap()
    };
    tokio::spawn(serve(addr, health.clone()).await.unwrap());

    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(
        get(addr, "/readyz").await.0,
        503,
        "not ready before the caches are filled"
    );
    health.set_ready(true);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    let (code, metrics) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(metrics.contains("regmirror_passes_total 1"), "{metrics}");
    assert_eq!(get(addr, "/nope").await.0, 404);
}

#[tokio::test]
async fn a_taken_port_is_a_clear_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let err = serve(addr, Health::new(Registry::default()))
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot listen on {addr}")),
        "{err}"
    );
}
