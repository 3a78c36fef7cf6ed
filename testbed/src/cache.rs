//! The pull-through cache as the operator runs it (the distribution registry v3 in proxy mode,
//! configured by `regmirror_core::cache`), on a loopback port in front of a test [`World`]'s
//! TLS + basic-auth registry.

use std::path::{Path, PathBuf};

use regmirror_core::api::{CaRef, Endpoint, EndpointTls};
use regmirror_core::cache::{registry_config, Serving, Upstream};
use regmirror_core::model::Credentials;
use regmirror_core::render::RenderedConfig;

use crate::process::{free_port, go_tool, Process};
use crate::registry::serve_registry;
use crate::world::{World, PASSWORD, USER};

/// A cache of a world's registry; stopped and started again at will, its storage kept.
pub struct Cache {
    pub port: u16,
    pub dir: PathBuf,
    program: PathBuf,
    config: String,
    ca: PathBuf,
    process: Option<Process>,
}

impl Cache {
    /// Starts a cache of `world`'s registry, with the world's credentials, trusting its CA and
    /// serving with its server certificate (127.0.0.1).
    pub fn start(world: &World) -> Cache {
        let pki = world.dir.path().join("pki");
        let dir = world.dir.path().join("cache");
        let port = free_port();
        let config = registry_config(
            &Upstream {
                url: world.registry.url(),
                credentials: Some(Credentials::Basic {
                    username: USER.into(),
                    password: PASSWORD.into(),
                }),
            },
            &Serving {
                addr: format!("127.0.0.1:{port}"),
                certificate: pki.join("server.crt").display().to_string(),
                key: pki.join("server.key").display().to_string(),
            },
            &dir.join("storage").display().to_string(),
        )
        .expect("a basic-auth upstream at its root");
        let mut cache = Cache {
            port,
            dir,
            // Debian's docker-registry 2.8 never logs in to a basic-auth upstream
            // (distribution#3153); v3 does.
            program: go_tool("registry"),
            config,
            ca: pki.join("ca.crt"),
            process: None,
        };
        cache.resume();
        cache
    }

    pub fn stop(&mut self) {
        self.process = None;
    }

    /// Starts it again on its port, with what it stored before (stopping it first if it runs:
    /// a second process could not bind the port, and the wait would see the first).
    pub fn resume(&mut self) {
        self.stop();
        self.process = Some(serve_registry(
            &self.program,
            &self.dir,
            &self.config,
            self.port,
            &[("SSL_CERT_FILE", &self.ca)],
        ));
    }

    /// The cache as a mirror endpoint, with the world's CA (ConfigMap `registry-ca`).
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            url: format!("https://127.0.0.1:{}", self.port),
            auth: None,
            tls: Some(EndpointTls::with_ca(CaRef::from_config_map("registry-ca"))),
        }
    }

    /// The directory of a repository the cache holds.
    pub fn repository(&self, name: &str) -> PathBuf {
        self.dir
            .join("storage/docker/registry/v2/repositories")
            .join(name)
    }
}

/// Writes a rendered configuration's files under `root`, as the agent would on a host.
pub fn write_under(root: &Path, config: &RenderedConfig) {
    for (path, file) in &config.files {
        let target = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, &file.content).unwrap();
    }
}
