//! A test world: a real registry with TLS (test CA) and basic auth holding an image, the
//! Secrets and ConfigMaps that describe how to reach it, and RegistryMirrors for it. The image
//! is named on an upstream that does not answer, so a pull can only succeed through a mirror.

use regmirror_core::api::{
    CaRef, CacheSpec, Endpoint, EndpointAuth, EndpointTls, RegistryMirror, RegistryMirrorSpec,
};
use regmirror_core::cache::CacheSite;
use regmirror_core::model::ResolvedMirror;
use regmirror_core::resolve::resolve;
use regmirror_core::sources::{RefPolicy, SourceKind, SourceObject, Sources};

use crate::{dead_port, oci_layout, push, Containerd, Pki, Pull, Registry, RegistryOptions};

pub const NS: &str = "regmirror-system";
pub const USER: &str = "puller";
pub const PASSWORD: &str = "s3cret-pa55";

/// A registry with TLS and basic auth holding `library/hello:v1`, and the Secrets that
/// describe how to reach it.
pub struct World {
    pub dir: tempfile::TempDir,
    pub registry: Registry,
    pub sources: Sources,
    /// The image as nodes name it: on an upstream that does not answer.
    pub image: String,
}

impl World {
    pub fn new(options: RegistryOptions) -> World {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(&dir.path().join("pki"));
        let registry = Registry::start(&dir.path().join("registry"), &pki, options);
        let layout = dir.path().join("image");
        oci_layout(&layout, "v1", "hello from regmirror");
        push(
            &layout,
            "v1",
            &registry,
            "library/hello",
            &pki.dir,
            &dir.path().join("push"),
        );

        let mut sources = Sources::new();
        let text = |pairs: &[(&str, String)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone().into_bytes()))
                .collect()
        };
        // Credentials opt in to the one host they are for.
        let registry_host = format!("{0}, http://{0}", registry.host());
        let basic = SourceObject {
            type_: Some("kubernetes.io/basic-auth".into()),
            data: text(&[("username", USER.into()), ("password", PASSWORD.into())]),
            ..SourceObject::default()
        }
        .allowing_hosts(registry_host.clone());
        let wrong = SourceObject {
            type_: Some("kubernetes.io/basic-auth".into()),
            data: text(&[("username", USER.into()), ("password", "wrong".into())]),
            ..SourceObject::default()
        }
        .allowing_hosts(registry_host.clone());
        sources.insert(SourceKind::Secret, NS, "mirror-pull", basic);
        sources.insert(SourceKind::Secret, NS, "wrong-pull", wrong);
        sources.insert(
            SourceKind::ConfigMap,
            NS,
            "registry-ca",
            SourceObject {
                type_: None,
                data: text(&[("ca.crt", pki.pem("ca.crt"))]),
                ..SourceObject::default()
            },
        );
        let tls = SourceObject {
            type_: Some("kubernetes.io/tls".into()),
            data: text(&[
                ("tls.crt", pki.pem("client.crt")),
                ("tls.key", pki.pem("client.key")),
            ]),
            ..SourceObject::default()
        }
        .allowing_hosts(registry_host);
        sources.insert(SourceKind::Secret, NS, "node-client-tls", tls);
        let image = format!("127.0.0.1:{}/library/hello:v1", dead_port());
        World {
            dir,
            registry,
            sources,
            image,
        }
    }

    pub fn upstream(&self) -> &str {
        self.image.split('/').next().unwrap()
    }

    /// An endpoint at the test registry, with the CA and credentials as asked.
    pub fn endpoint(&self, ca: bool, credentials: Option<&str>) -> Endpoint {
        Endpoint {
            url: self.registry.url(),
            auth: credentials.map(EndpointAuth::from_secret),
            tls: ca.then(|| EndpointTls::with_ca(CaRef::from_config_map("registry-ca"))),
        }
    }

    pub fn resolved(&self, endpoints: Vec<Endpoint>) -> ResolvedMirror {
        self.resolve(endpoints, None)
    }

    /// A mirror of these endpoints asking for a cache, which runs at `site`: resolved as the
    /// operator resolves it once the cache has its address.
    pub fn resolved_with_cache(&self, endpoints: Vec<Endpoint>, site: CacheSite) -> ResolvedMirror {
        self.resolve(endpoints, Some(site))
    }

    fn resolve(&self, endpoints: Vec<Endpoint>, cache: Option<CacheSite>) -> ResolvedMirror {
        let mut sources = self.sources.clone();
        if let Some(site) = &cache {
            sources.insert_cache("test-mirror", site.clone());
        }
        let spec = RegistryMirrorSpec {
            cache: cache.map(|_| CacheSpec::default()),
            embedded_registry: false,
            registry: self.upstream().into(),
            endpoints,
            rewrites: vec![],
            node_selector: None,
        };
        resolve(
            &RegistryMirror::new("test-mirror", spec),
            &sources,
            &RefPolicy::new(NS),
        )
        .expect("valid mirror")
    }
}

/// An endpoint on a loopback port nothing listens on: a mirror that is down.
pub fn dead_endpoint(scheme: &str) -> Endpoint {
    Endpoint {
        url: format!("{scheme}://127.0.0.1:{}", dead_port()),
        auth: None,
        tls: None,
    }
}

/// TLS from the test CA and basic auth.
pub fn secure() -> RegistryOptions {
    RegistryOptions {
        tls: true,
        basic_auth: Some((USER.into(), PASSWORD.into())),
        client_certs: false,
    }
}

/// Plain http with basic auth: credentials that go over http because the mirror says
/// `http://` (what k3s tests use: k3s speaks http to a loopback registry on a port anyway).
pub fn plain_with_auth() -> RegistryOptions {
    RegistryOptions {
        tls: false,
        basic_auth: Some((USER.into(), PASSWORD.into())),
        client_certs: false,
    }
}

/// A private containerd in the world's directory.
pub fn containerd(world: &World) -> Containerd {
    Containerd::start(&world.dir.path().join("containerd"))
}

/// The pull succeeded.
pub fn assert_pulled(pull: Pull) {
    assert!(pull.ok, "pull failed:\n{}", pull.output);
}

/// The pull failed, saying `reason`.
pub fn assert_failed_with(pull: Pull, reason: &str) {
    assert!(
        !pull.ok,
        "pull succeeded but should have failed with {reason:?}:\n{}",
        pull.output
    );
    assert!(
        pull.output.contains(reason),
        "pull failed, but not with {reason:?}:\n{}",
        pull.output
    );
}
