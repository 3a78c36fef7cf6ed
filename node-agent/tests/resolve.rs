//! `regmirror-agent resolve`: the route of an image through the configuration applied on this
//! node, the same as `regmirror resolve` computes offline for the same configuration.

use std::path::Path;
use std::process::Command;

use regmirror_core::api::{Endpoint, RegistryMirror, RegistryMirrorSpec, Rewrite};
use regmirror_core::node::Flavor;
use regmirror_core::render::render;
use regmirror_core::resolve::resolve;
use regmirror_core::route::route;
use regmirror_core::sources::{RefPolicy, Sources};
use regmirror_node_agent::hostfs::HostFs;

fn agent_resolve(root: &Path, image: &str, output: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_regmirror-agent"))
        .arg("--root")
        .arg(root)
        .args(["resolve", image, "--output", output])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn endpoint(url: &str) -> Endpoint {
    Endpoint {
        url: url.into(),
        auth: None,
        tls: None,
    }
}

#[test]
fn the_agent_shows_the_route_of_the_configuration_it_applied() {
    let root = tempfile::tempdir().unwrap();
    assert!(
        agent_resolve(root.path(), "nginx", "text")
            .contains("no configuration from regmirror is applied on this node"),
        "before any apply, the agent says so rather than guessing"
    );

    let spec = RegistryMirrorSpec {
        cache: None,
        embedded_registry: false,
        registry: "docker.io".into(),
        endpoints: vec![
            endpoint("https://mirror-a.example.com:5000"),
            endpoint("http://mirror-b.example.com:5000"),
        ],
        rewrites: vec![Rewrite {
            pattern: "^library/(.*)".into(),
            replacement: "hub/$1".into(),
        }],
        node_selector: None,
    };
    let mirror = resolve(
        &RegistryMirror::new("hub", spec),
        &Sources::new(),
        &RefPolicy::new("regmirror-system"),
    )
    .unwrap();
    let config = render(&[&mirror], &Flavor::K3S).unwrap();
    HostFs::new(root.path()).apply(&config).unwrap();

    let on_node: serde_json::Value =
        serde_json::from_str(&agent_resolve(root.path(), "nginx:1.25", "json")).unwrap();
    let offline = serde_json::to_value(route(&config, "nginx:1.25").unwrap()).unwrap();
    assert_eq!(on_node, offline);
    let requests: Vec<&str> = on_node["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["request"].as_str().unwrap())
        .collect();
    assert_eq!(
        requests,
        [
            "https://mirror-a.example.com:5000/v2/hub/nginx/manifests/1.25?ns=docker.io",
            "http://mirror-b.example.com:5000/v2/hub/nginx/manifests/1.25?ns=docker.io",
            "https://registry-1.docker.io/v2/library/nginx/manifests/1.25",
        ]
    );
    let text = agent_resolve(root.path(), "nginx:1.25", "text");
    assert_eq!(text, route(&config, "nginx:1.25").unwrap().to_string());
}
