//! The pull-through cache as the operator runs it (the distribution registry v3 in proxy mode,
//! configured by `regmirror_core::cache`), on a loopback port in front of a test [`World`]'s
//! TLS + basic-auth registry, taking credentials of its own (htpasswd) as the operator's do.

use std::path::{Path, PathBuf};

use regmirror_core::cache::{
    htpasswd_entry, registry_config, CacheSite, Serving, Upstream, USERNAME,
};
use regmirror_core::model::Credentials;
use regmirror_core::render::RenderedConfig;

use crate::process::{free_port, go_tool, Process};
use crate::registry::serve_registry;
use crate::world::{World, PASSWORD, USER};

/// The nodes' password for the test cache.
pub const CACHE_PASSWORD: &str = "cache-pass: for nodes only";

/// A cache of a world's registry; stopped and started again at will, its storage kept.
pub struct Cache {
    pub port: u16,
    pub dir: PathBuf,
    program: PathBuf,
    config: String,
    ca: PathBuf,
    process: Option<Process>,
}

/// Files the cache reads, beside its storage.
const HTPASSWD: &str = "htpasswd";

impl Cache {
    /// Starts a cache of `world`'s registry, with the world's credentials, trusting its CA and
    /// serving with its server certificate (127.0.0.1).
    pub fn start(world: &World) -> Cache {
        let pki = world.dir.path().join("pki");
        let dir = world.dir.path().join("cache");
        let port = free_port();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(HTPASSWD),
            htpasswd_entry(USERNAME, CACHE_PASSWORD, [7; 16]),
        )
        .unwrap();
        let config = registry_config(
            &Upstream {
                url: world.registry.url(),
                credentials: Some(Credentials::Basic {
                    username: USER.into(),
                    password: PASSWORD.into(),
                }),
                ca: None,
            },
            &Serving {
                addr: format!("127.0.0.1:{port}"),
                certificate: pki.join("server.crt").display().to_string(),
                key: pki.join("server.key").display().to_string(),
                htpasswd: Some(dir.join(HTPASSWD).display().to_string()),
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

    /// Where nodes find the cache, as the operator would tell `resolve`: its address, the
    /// world's CA (which signed its certificate) and the nodes' credentials.
    pub fn site(&self) -> CacheSite {
        CacheSite {
            url: format!("https://127.0.0.1:{}", self.port),
            ca: std::fs::read_to_string(&self.ca).unwrap(),
            credentials: Credentials::Basic {
                username: USERNAME.into(),
                password: CACHE_PASSWORD.into(),
            },
            secret: "regmirror-system/test-cache".into(),
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
