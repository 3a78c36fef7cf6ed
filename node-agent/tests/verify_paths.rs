//! The endpoint check on endpoints with a path of their own (`https://mirror/v2/quay`, as in
//! `examples/quay.yaml`): containerd sends such an endpoint `<path>/<name>/manifests/…`
//! (`override_path`), so `<path>/` is a place in the registry's namespace, where a real
//! docker-registry answers 404 — with its API version header. That is a registry answering;
//! a web server's 404 is not.

use std::time::Duration;

use regmirror_core::api::Endpoint;
use regmirror_core::node::Flavor;
use regmirror_core::render::render;
use regmirror_node_agent::hostfs::HostFs;
use regmirror_node_agent::verify::{verify, VerifyError};
use regmirror_testbed::world::{secure, World};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(5);

fn containerd() -> Flavor {
    Flavor::Containerd {
        hosts_dir: "/etc/containerd/certs.d".into(),
    }
}

#[tokio::test]
async fn a_registry_answering_under_an_endpoint_path_passes() {
    let world = World::new(secure());
    let mut endpoint = world.endpoint(true, Some("mirror-pull"));
    endpoint.url = format!("{}/v2/quay", world.registry.url());
    let config = render(&[&world.resolved(vec![endpoint])], &containerd()).unwrap();
    assert!(
        config
            .files
            .values()
            .any(|f| f.content.contains("override_path = true")),
        "the endpoint's path is used as it is"
    );
    let root = tempfile::tempdir().unwrap();
    HostFs::new(root.path()).apply(&config).unwrap();
    let warnings = verify(&config, root.path(), TIMEOUT)
        .await
        .expect("docker-registry answers under /v2/quay/ (404 with its API version header)");
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[tokio::test]
async fn a_web_server_answering_404_under_an_endpoint_path_is_not_a_registry() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            let _ = socket
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nnot found",
                )
                .await;
        }
    });
    let world = World::new(secure());
    let endpoint = Endpoint {
        url: format!("http://127.0.0.1:{port}/v2/quay"),
        auth: None,
        tls: None,
    };
    let config = render(&[&world.resolved(vec![endpoint])], &containerd()).unwrap();
    let root = tempfile::tempdir().unwrap();
    HostFs::new(root.path()).apply(&config).unwrap();
    match verify(&config, root.path(), TIMEOUT).await {
        Err(VerifyError::NoEndpointAnswers { reasons, .. }) => assert!(
            reasons.iter().any(|r| r.contains("answered 404")),
            "{reasons:?}"
        ),
        other => panic!("a plain 404 is not a registry: {other:?}"),
    }
}
