//! `docker-registry` (the CNCF distribution registry from Debian) on a loopback port.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::pki::Pki;
use crate::process::{free_port, require_tool, run_ok, Process};

/// How a test registry is protected.
#[derive(Clone, Default)]
pub struct RegistryOptions {
    /// Serve https with the PKI's server certificate.
    pub tls: bool,
    /// Require this username and password (htpasswd basic auth).
    pub basic_auth: Option<(String, String)>,
    /// Require a client certificate signed by the PKI's CA.
    pub client_certs: bool,
}

/// A running registry.
pub struct Registry {
    pub port: u16,
    pub options: RegistryOptions,
    _process: Process,
}

impl Registry {
    /// Starts a registry whose files live under `dir`.
    pub fn start(dir: &Path, pki: &Pki, options: RegistryOptions) -> Registry {
        Self::start_on(dir, pki, options, free_port())
    }

    /// Starts a registry on `port` of 127.0.0.1, e.g. 443: a name without a port is then
    /// `https://127.0.0.1`, which k3s does not take for a plain-http loopback registry.
    pub fn start_on(dir: &Path, pki: &Pki, options: RegistryOptions, port: u16) -> Registry {
        require_tool("docker-registry");
        std::fs::create_dir_all(dir).unwrap();
        let mut config = format!(
            "version: 0.1\nlog: {{level: info}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: regmirror-test\n",
            dir.join("storage").display()
        );
        if options.tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                pki.path("server.crt").display(),
                pki.path("server.key").display()
            ));
            if options.client_certs {
                config.push_str(&format!(
                    "    clientcas: [{}]\n",
                    pki.path("ca.crt").display()
                ));
            }
        }
        if let Some((user, password)) = &options.basic_auth {
            require_tool("htpasswd");
            let htpasswd = run_ok(Command::new("htpasswd").args(["-Bbn", user, password])).stdout;
            let file: PathBuf = dir.join("htpasswd");
            std::fs::write(&file, htpasswd).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd: {{realm: regmirror-test, path: {}}}\n",
                file.display()
            ));
        }
        Registry {
            port,
            options,
            _process: serve_registry(Path::new("docker-registry"), dir, &config, port, &[]),
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `https://127.0.0.1:<port>` or `http://…`.
    pub fn url(&self) -> String {
        let scheme = if self.options.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.host())
    }
}

/// Runs the registry `program` (`docker-registry`, or distribution v3 from [`crate::go_tool`])
/// with `config` (written to `dir/config.yml`; it may hold a password: 0600) and `env`, and
/// waits until it listens on `port`.
pub fn serve_registry(
    program: &Path,
    dir: &Path,
    config: &str,
    port: u16,
    env: &[(&str, &Path)],
) -> Process {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let config_file = dir.join("config.yml");
    std::io::Write::write_all(
        &mut std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&config_file)
            .unwrap(),
        config.as_bytes(),
    )
    .unwrap();
    let log = dir.join("registry.log");
    let mut command = Command::new(program);
    command.arg("serve").arg(&config_file);
    for (key, value) in env {
        command.env(key, value);
    }
    let name = program.file_name().unwrap_or_default().to_string_lossy();
    let mut process = Process::spawn(&name, &mut command, &log);
    process.wait_for_port(port, &log);
    process
}
