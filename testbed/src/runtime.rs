//! The consumers of rendered configuration: a private containerd pulling with `ctr --hosts-dir`,
//! and skopeo reading a CRI-O style registries.conf, certs.d and auth file.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{require_tool, run, run_ok, Process};

/// What a pull did.
#[derive(Debug)]
pub struct Pull {
    pub ok: bool,
    /// stdout and stderr, for assertions on the failure reason.
    pub output: String,
}

impl Pull {
    fn from(output: std::process::Output) -> Pull {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Pull {
            ok: output.status.success(),
            output: text,
        }
    }
}

/// A containerd of its own (root, state and socket under a temp dir; CRI disabled).
pub struct Containerd {
    pub socket: PathBuf,
    _process: Process,
}

impl Containerd {
    pub fn start(dir: &Path) -> Containerd {
        require_tool("containerd");
        require_tool("ctr");
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{1}\"\n[ttrpc]\n  address = \"{1}.ttrpc\"\n[debug]\n  address = \"{0}/debug.sock\"\n[metrics]\n  address = \"\"\n",
            dir.display(),
            socket.display()
        );
        let config_file = dir.join("containerd.toml");
        std::fs::write(&config_file, config).unwrap();
        let log = dir.join("containerd.log");
        let mut process = Process::spawn(
            "containerd",
            Command::new("containerd").arg("--config").arg(&config_file),
            &log,
        );
        process.wait_for_path(&socket, &log);
        Containerd {
            socket,
            _process: process,
        }
    }

    /// `ctr` talking to this containerd (its own namespace, `default`).
    pub fn ctr(&self) -> Command {
        let mut ctr = Command::new("ctr");
        ctr.arg("--address").arg(&self.socket);
        ctr
    }

    /// Imports an image archive (docker-archive or OCI) under the names it carries.
    pub fn import(&self, archive: &Path) {
        run_ok(self.ctr().args(["images", "import"]).arg(archive));
    }

    /// Pulls `reference` resolving registries through `hosts_dir`, as the CRI plugin does with
    /// `config_path`. Content from earlier pulls is removed first, so every pull fetches.
    pub fn pull(&self, hosts_dir: &Path, reference: &str) -> Pull {
        let images = run(self.ctr().args(["images", "ls", "-q"]));
        for image in String::from_utf8_lossy(&images.stdout).lines() {
            run(self.ctr().args(["images", "rm", "--sync", image]));
        }
        let content = run(self.ctr().args(["content", "ls", "-q"]));
        for blob in String::from_utf8_lossy(&content.stdout).lines() {
            run(self.ctr().args(["content", "rm", blob]));
        }
        Pull::from(run(self
            .ctr()
            .args(["images", "pull", "--hosts-dir"])
            .arg(hosts_dir)
            .arg(reference)))
    }
}

/// skopeo with a home directory of its own: it reads `~/.config/containers/registries.conf`
/// and `~/.config/containers/certs.d/<host>/`, never the machine's /etc/containers.
pub struct Skopeo {
    pub home: PathBuf,
}

impl Skopeo {
    pub fn new(home: &Path) -> Skopeo {
        require_tool("skopeo");
        std::fs::create_dir_all(home.join(".config/containers/certs.d")).unwrap();
        Skopeo {
            home: home.to_owned(),
        }
    }

    /// Where registries.conf goes.
    pub fn registries_conf(&self) -> PathBuf {
        self.home.join(".config/containers/registries.conf")
    }

    /// The certs.d root.
    pub fn certs_dir(&self) -> PathBuf {
        self.home.join(".config/containers/certs.d")
    }

    /// Reads the manifest of `reference` (mirrors apply; tags are not listed from the
    /// upstream), with `authfile` when given.
    pub fn inspect(&self, reference: &str, authfile: Option<&Path>) -> Pull {
        let mut skopeo = Command::new("skopeo");
        skopeo.env("HOME", &self.home).args(["inspect", "--raw"]);
        // An empty auth file keeps skopeo from reading the user's own credentials.
        let empty = self.home.join("empty-auth.json");
        std::fs::write(&empty, "{}").unwrap();
        skopeo.arg("--authfile").arg(authfile.unwrap_or(&empty));
        Pull::from(run(skopeo.arg(format!("docker://{reference}"))))
    }
}
