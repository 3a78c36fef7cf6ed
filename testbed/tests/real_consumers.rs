//! Rendered configuration consumed by the real programs that read it on nodes: containerd
//! (`ctr images pull --hosts-dir`, the same resolver the CRI plugin uses with `config_path`)
//! and skopeo (containers/image, what CRI-O pulls with), against a real `docker-registry` with
//! TLS from a test CA and htpasswd basic auth. Everything listens on 127.0.0.1; the upstream
//! registry name is a dead loopback port, so a pull can only succeed through a mirror.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use regmirror_core::api::{Endpoint, ObjectRef, RegistryMirror, RegistryMirrorSpec};
use regmirror_core::node::Flavor;
use regmirror_core::render::{render, RenderedConfig};
use regmirror_core::resolve::resolve;
use regmirror_core::sources::RefPolicy;
use regmirror_testbed::world::{
    assert_failed_with, assert_pulled, containerd, dead_endpoint, secure, World, NS,
};
use regmirror_testbed::{dead_port, RegistryOptions, Skopeo};

/// What only these tests do with the world: render and install for one consumer.
trait Install {
    fn containerd_hosts_dir(&self, endpoints: Vec<Endpoint>) -> PathBuf;
    fn crio(&self, endpoints: Vec<Endpoint>) -> (Skopeo, Option<PathBuf>);
}

impl Install for World {
    /// Renders for plain containerd with its hosts dir inside the test directory.
    fn containerd_hosts_dir(&self, endpoints: Vec<Endpoint>) -> PathBuf {
        let hosts_dir = self.dir.path().join(format!("certs.d-{}", dead_port()));
        let flavor = Flavor::Containerd {
            hosts_dir: hosts_dir.display().to_string(),
        };
        let config = render(&[&self.resolved(endpoints)], &flavor).unwrap();
        write(&config, |path| PathBuf::from(path));
        hosts_dir
    }

    /// Renders for CRI-O and installs it into a fresh skopeo home; returns skopeo and the
    /// auth file, if the configuration has one.
    fn crio(&self, endpoints: Vec<Endpoint>) -> (Skopeo, Option<PathBuf>) {
        let skopeo = Skopeo::new(&self.dir.path().join(format!("skopeo-{}", dead_port())));
        let config = render(&[&self.resolved(endpoints)], &Flavor::Crio).unwrap();
        let auth = skopeo.home.join("auth.json");
        write(&config, |path| match path {
            "/etc/containers/registries.conf.d/50-regmirror.conf" => skopeo.registries_conf(),
            "/etc/crio/regmirror/auth.json" => auth.clone(),
            "/etc/crio/crio.conf.d/50-regmirror-auth.conf" => skopeo.home.join("crio.conf"),
            other => skopeo.certs_dir().join(
                other
                    .strip_prefix("/etc/containers/certs.d/")
                    .expect("a certs.d file"),
            ),
        });
        let has_auth = config.files.contains_key("/etc/crio/regmirror/auth.json");
        (skopeo, has_auth.then_some(auth))
    }
}

fn write(config: &RenderedConfig, place: impl Fn(&str) -> PathBuf) {
    for (path, file) in &config.files {
        let target = place(path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(&target, &file.content).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(file.mode)).unwrap();
    }
}

#[test]
fn containerd_pulls_through_the_mirror_with_its_ca_and_credentials() {
    let world = World::new(secure());
    let hosts = world.containerd_hosts_dir(vec![world.endpoint(true, Some("mirror-pull"))]);
    let containerd = containerd(&world);
    assert_pulled(containerd.pull(&hosts, &world.image));
    // The credentials are in the file, so it must not be world-readable.
    let hosts_toml = hosts.join(world.upstream()).join("hosts.toml");
    assert_eq!(
        std::fs::metadata(&hosts_toml)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap(),
        0o600
    );
}

#[test]
fn containerd_falls_back_to_the_next_endpoint_when_the_first_is_down() {
    let world = World::new(secure());
    let down = dead_endpoint("https");
    let hosts = world.containerd_hosts_dir(vec![down, world.endpoint(true, Some("mirror-pull"))]);
    assert_pulled(containerd(&world).pull(&hosts, &world.image));
}

#[test]
fn containerd_refuses_the_mirror_without_the_ca() {
    let world = World::new(secure());
    let hosts = world.containerd_hosts_dir(vec![world.endpoint(false, Some("mirror-pull"))]);
    assert_failed_with(
        containerd(&world).pull(&hosts, &world.image),
        "x509: certificate signed by unknown authority",
    );
}

#[test]
fn containerd_is_refused_without_or_with_wrong_credentials() {
    let world = World::new(secure());
    let containerd = containerd(&world);
    let without = world.containerd_hosts_dir(vec![world.endpoint(true, None)]);
    assert_failed_with(containerd.pull(&without, &world.image), "401 Unauthorized");
    let wrong = world.containerd_hosts_dir(vec![world.endpoint(true, Some("wrong-pull"))]);
    assert_failed_with(containerd.pull(&wrong, &world.image), "401 Unauthorized");
}

#[test]
fn containerd_presents_the_client_certificate_for_mutual_tls() {
    let world = World::new(RegistryOptions {
        tls: true,
        basic_auth: None,
        client_certs: true,
    });
    let containerd = containerd(&world);
    let without_cert = world.containerd_hosts_dir(vec![world.endpoint(true, None)]);
    assert_failed_with(
        containerd.pull(&without_cert, &world.image),
        "bad certificate",
    );

    let mut endpoint = world.endpoint(true, None);
    endpoint.tls.as_mut().unwrap().client_cert_secret_ref =
        Some(ObjectRef::named("node-client-tls"));
    let with_cert = world.containerd_hosts_dir(vec![endpoint]);
    assert_pulled(containerd.pull(&with_cert, &world.image));
}

#[test]
fn containerd_pulls_from_a_plain_http_mirror() {
    let world = World::new(RegistryOptions::default());
    let hosts = world.containerd_hosts_dir(vec![world.endpoint(false, None)]);
    assert_pulled(containerd(&world).pull(&hosts, &world.image));
}

#[test]
fn skopeo_pulls_through_the_crio_mirror_with_ca_and_auth_file() {
    let world = World::new(secure());
    let (skopeo, auth) = world.crio(vec![world.endpoint(true, Some("mirror-pull"))]);
    let auth = auth.expect("credentials render an auth file");
    assert_eq!(
        std::fs::metadata(&auth).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_pulled(skopeo.inspect(&world.image, Some(&auth)));
}

#[test]
fn skopeo_falls_back_to_the_next_crio_mirror() {
    let world = World::new(secure());
    let down = dead_endpoint("https");
    let (skopeo, auth) = world.crio(vec![down, world.endpoint(true, Some("mirror-pull"))]);
    assert_pulled(skopeo.inspect(&world.image, auth.as_deref()));
}

#[test]
fn skopeo_refuses_the_crio_mirror_without_ca_or_credentials() {
    let world = World::new(secure());
    let (skopeo, auth) = world.crio(vec![world.endpoint(false, Some("mirror-pull"))]);
    assert_failed_with(
        skopeo.inspect(&world.image, auth.as_deref()),
        "x509: certificate signed by unknown authority",
    );
    let (skopeo, auth) = world.crio(vec![world.endpoint(true, None)]);
    assert!(auth.is_none());
    assert_failed_with(
        skopeo.inspect(&world.image, None),
        "authentication required",
    );
}

#[test]
fn skopeo_presents_the_client_certificate_from_certs_d() {
    let world = World::new(RegistryOptions {
        tls: true,
        basic_auth: None,
        client_certs: true,
    });
    let mut endpoint = world.endpoint(true, None);
    endpoint.tls.as_mut().unwrap().client_cert_secret_ref =
        Some(ObjectRef::named("node-client-tls"));
    let (skopeo, _) = world.crio(vec![endpoint]);
    assert_pulled(skopeo.inspect(&world.image, None));
}

#[test]
fn containerd_uses_a_wildcard_mirror_for_every_registry() {
    let world = World::new(secure());
    let spec = RegistryMirrorSpec {
        cache: None,
        embedded_registry: false,
        registry: "*".into(),
        endpoints: vec![world.endpoint(true, Some("mirror-pull"))],
        rewrites: vec![],
        node_selector: None,
    };
    let resolved = resolve(
        &RegistryMirror::new("every-registry", spec),
        &world.sources,
        &RefPolicy::new(NS),
    )
    .unwrap();
    let hosts_dir = world.dir.path().join("certs.d-wildcard");
    let config = render(
        &[&resolved],
        &Flavor::Containerd {
            hosts_dir: hosts_dir.display().to_string(),
        },
    )
    .unwrap();
    assert!(config
        .files
        .keys()
        .any(|p| p.ends_with("/_default/hosts.toml")));
    write(&config, |path| PathBuf::from(path));
    assert_pulled(containerd(&world).pull(&hosts_dir, &world.image));
}

#[test]
fn an_endpoint_path_reaches_the_same_repository_on_containerd_and_cri_o() {
    // A Harbor-style project: the registry serves the image under `proj/`, and the endpoint
    // names `/v2/proj` as its API root. containerd asks `/v2/proj/library/hello/…`
    // (override_path); CRI-O's location `<host>/proj` makes containers/image ask the same.
    let world = World::new(secure());
    regmirror_testbed::push(
        &world.dir.path().join("image"),
        "v1",
        &world.registry,
        "proj/library/hello",
        &world.dir.path().join("pki"),
        &world.dir.path().join("push-proj"),
    );
    let endpoint = || Endpoint {
        url: format!("{}/v2/proj", world.registry.url()),
        ..world.endpoint(true, Some("mirror-pull"))
    };
    let hosts = world.containerd_hosts_dir(vec![endpoint()]);
    assert_pulled(containerd(&world).pull(&hosts, &world.image));
    let (skopeo, auth) = world.crio(vec![endpoint()]);
    assert_pulled(skopeo.inspect(&world.image, auth.as_deref()));
}
