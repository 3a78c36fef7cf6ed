//! A pull-through cache made of exactly what the operator puts in a cache's Secret — the CA it
//! creates, the serving certificate it issues, the nodes' password and its htpasswd line, the
//! `config.yml` — run by the real distribution registry v3 on loopback in front of a TLS +
//! basic-auth upstream, with containerd pulling through the configuration `resolve` gives a
//! node once the cache has its address. (In a cluster the address is the Service's cluster IP;
//! here the certificate is issued for 127.0.0.1.)

use std::os::unix::fs::OpenOptionsExt;

use base64::Engine;
use regmirror::cache::keys;
use regmirror::cache::objects::{secret_data, Layout, Material, UPSTREAM_CA_KEY};
use regmirror_core::cache::{htpasswd_entry, CacheSite, Upstream, USERNAME};
use regmirror_core::model::Credentials;
use regmirror_core::node::Flavor;
use regmirror_core::render::render;
use regmirror_testbed::cache::write_under;
use regmirror_testbed::world::{secure, World};
use regmirror_testbed::{free_port, go_tool, serve_registry, Containerd, Skopeo};

#[test]
fn containerd_pulls_through_a_cache_made_of_the_operators_secret() {
    let world = World::new(secure());
    let upstream_endpoint = world.endpoint(true, Some("mirror-pull"));
    let upstream = Upstream::of(&world.resolved(vec![upstream_endpoint.clone()]).endpoints[0])
        .expect("a TLS + basic-auth upstream at its root");

    // What the operator makes: its CA, a certificate for the cache's address, the nodes'
    // password.
    let ca = keys::new_ca().unwrap();
    let serving = keys::issue_serving(
        &ca,
        "regmirror-cache/regmirror-cache-ca",
        "127.0.0.1".parse().unwrap(),
        &["regmirror-cache-hub-0a1b2c3d".to_owned()],
    )
    .unwrap();
    let password = keys::new_password();
    let material = Material {
        htpasswd: htpasswd_entry(USERNAME, &password, keys::new_salt()),
        password: password.clone(),
        cert: serving.cert,
        key: serving.key,
    };
    let dir = world.dir.path().join("cache");
    let port = free_port();
    let layout = Layout {
        config_dir: dir.join("secret").display().to_string(),
        storage_dir: dir.join("storage").display().to_string(),
        addr: format!("127.0.0.1:{port}"),
    };
    let data = secret_data(&upstream, &material, &layout).unwrap();
    // The Secret's keys as the pod's volume holds them.
    std::fs::create_dir_all(&layout.config_dir).unwrap();
    for (key, value) in &data {
        std::io::Write::write_all(
            &mut std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o400)
                .open(dir.join("secret").join(key))
                .unwrap(),
            value,
        )
        .unwrap();
    }
    let config = String::from_utf8(data["config.yml"].clone()).unwrap();
    let upstream_ca = dir.join("secret").join(UPSTREAM_CA_KEY);
    let cache = serve_registry(
        &go_tool("registry"),
        &dir.join("run"),
        &config,
        port,
        &[("SSL_CERT_FILE", &upstream_ca)],
    );
    let cache_log = || std::fs::read_to_string(dir.join("run/registry.log")).unwrap_or_default();

    // The node's configuration once the cache has its address: the cache first.
    let site = CacheSite {
        url: format!("https://127.0.0.1:{port}"),
        ca: ca.cert.clone(),
        credentials: Credentials::Basic {
            username: USERNAME.into(),
            password: password.clone(),
        },
        secret: "regmirror-system/regmirror-cache-hub-0a1b2c3d".into(),
    };
    let mirror = world.resolved_with_cache(vec![upstream_endpoint], site);
    let node_config = render(&[&mirror], &"containerd".parse::<Flavor>().unwrap()).unwrap();
    let root = tempfile::tempdir().unwrap();
    write_under(root.path(), &node_config);
    let containerd = Containerd::start(&root.path().join("containerd"));
    let pulled = containerd.pull(&root.path().join("etc/containerd/certs.d"), &world.image);
    assert!(pulled.ok, "{}\ncache log:\n{}", pulled.output, cache_log());
    assert!(
        dir.join("storage/docker/registry/v2/repositories/library/hello")
            .is_dir(),
        "the pull went through the cache, which keeps the image; cache log:\n{}",
        cache_log()
    );

    // The cache checks its certificate's chain and name as any client does, and lets in
    // only the nodes' credentials: what it fetched with the upstream's password is not for
    // anyone who reaches its Service.
    let skopeo = Skopeo::new(&dir.join("skopeo"));
    let host = format!("127.0.0.1:{port}");
    let certs = skopeo.certs_dir().join(&host);
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("ca.crt"), &ca.cert).unwrap();
    let reference = format!("{host}/library/hello:v1");
    let anonymous = skopeo.inspect(&reference, None);
    assert!(
        !anonymous.ok && anonymous.output.contains("unauthorized"),
        "{}",
        anonymous.output
    );
    let authfile = dir.join("auth.json");
    let auth = |password: &str| {
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("{USERNAME}:{password}"));
        std::fs::write(
            &authfile,
            serde_json::json!({"auths": {host.clone(): {"auth": token}}}).to_string(),
        )
        .unwrap();
        skopeo.inspect(&reference, Some(&authfile))
    };
    let wrong = auth("not-the-password");
    assert!(
        !wrong.ok && wrong.output.contains("unauthorized"),
        "{}",
        wrong.output
    );
    let right = auth(&password);
    assert!(right.ok, "{}", right.output);

    // The upstream stopped: the same image, tag and all, still comes from the cache.
    let World {
        dir: _kept,
        registry,
        image,
        ..
    } = world;
    let upstream_dir = _kept.path().join("registry");
    let upstream_port = registry.port;
    drop(registry);
    let hosts_dir = root.path().join("etc/containerd/certs.d");
    let offline = containerd.pull(&hosts_dir, &image);
    assert!(
        offline.ok,
        "{}\ncache log:\n{}",
        offline.output,
        cache_log()
    );

    // The upstream back and the cache stopped: pulls fall through to the upstream.
    let pki = regmirror_testbed::Pki {
        dir: _kept.path().join("pki"),
    };
    let _upstream =
        regmirror_testbed::Registry::start_on(&upstream_dir, &pki, secure(), upstream_port);
    drop(cache);
    let through = containerd.pull(&hosts_dir, &image);
    assert!(
        through.ok,
        "with the cache down the upstream serves: {}",
        through.output
    );
}
