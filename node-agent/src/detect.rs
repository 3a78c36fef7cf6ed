//! Which runtime flavor this host runs, read from the host's files through the root mount.
//!
//! k3s and RKE2 are recognised by their systemd units (the unit name also says server or
//! agent, which is the service to restart); CRI-O by its unit or config; plain containerd by
//! its config, whose CRI `config_path` says where hosts.toml files are read from. A k3s or
//! RKE2 node running an external runtime (`container-runtime-endpoint` in its config file or
//! unit) ignores registries.yaml: that is reported, never "applied". k3s's embedded registry
//! mirror (`--embedded-registry`) is part of the flavor (`k3s+embedded-registry`): it changes
//! which files regmirror may write and how a change is picked up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regmirror_core::node::{Flavor, DEFAULT_CONTAINERD_HOSTS_DIR};

/// containerd's configuration file, relative to the root.
const CONTAINERD_CONFIG: &str = "etc/containerd/config.toml";

/// Where unit files live on the usual distributions, relative to the root.
const UNIT_DIRS: [&str; 4] = [
    "etc/systemd/system",
    "usr/local/lib/systemd/system",
    "usr/lib/systemd/system",
    "lib/systemd/system",
];

/// What the agent found on its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    /// A runtime regmirror can configure.
    Supported(Host),
    /// A runtime regmirror cannot configure on this node, and why.
    Unsupported(String),
}

/// A configurable host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub flavor: Flavor,
    /// The systemd unit that runs the runtime (restarted or reloaded when a change needs it).
    pub unit: String,
    /// Something the operator of the node should know (shown with the node's state).
    pub warning: Option<String>,
}

/// Looks at the host under `root`.
pub fn detect(root: &Path) -> Detected {
    for (flavor, name, units) in [
        (Flavor::K3S, "k3s", ["k3s.service", "k3s-agent.service"]),
        (
            Flavor::RKE2,
            "rke2",
            ["rke2-server.service", "rke2-agent.service"],
        ),
    ] {
        let Some((unit, unit_file)) = units
            .iter()
            .find_map(|u| find_unit(root, u).map(|f| (*u, f)))
        else {
            continue;
        };
        let settings = K3sSettings::read(root, name, &unit_file);
        if let Some(place) = settings.external_runtime() {
            return Detected::Unsupported(format!(
                "{name} runs with an external container runtime (container-runtime-endpoint in {place}); it ignores registries.yaml, so configure that runtime instead (flavor containerd or cri-o)"
            ));
        }
        let flavor = if settings.embedded_registry() {
            flavor.with_embedded_registry()
        } else {
            flavor
        };
        return Detected::Supported(Host {
            flavor,
            unit: unit.to_owned(),
            warning: None,
        });
    }
    if find_unit(root, "crio.service").is_some() || root.join("etc/crio/crio.conf").is_file() {
        return Detected::Supported(Host {
            flavor: Flavor::Crio,
            unit: "crio.service".into(),
            warning: None,
        });
    }
    let containerd_config = root.join(CONTAINERD_CONFIG);
    if containerd_config.is_file() || find_unit(root, "containerd.service").is_some() {
        return match containerd_config_path(&containerd_config) {
            Some(hosts_dir) => Detected::Supported(Host {
                flavor: Flavor::Containerd { hosts_dir },
                unit: "containerd.service".into(),
                warning: None,
            }),
            None => Detected::Unsupported(config_path_missing(&containerd_config)),
        };
    }
    Detected::Unsupported(
        "no supported container runtime found (k3s, RKE2, containerd or CRI-O); set the agent's flavor explicitly if the host has one".into(),
    )
}

/// Why containerd, configured as `flavor` says, would not read the hosts.toml files regmirror
/// writes, with the fix; `None` when it reads them, or when its configuration file is not on
/// the host (a flavor given explicitly is then taken at its word).
pub fn ignored_by_containerd(flavor: &Flavor, root: &Path) -> Option<String> {
    let Flavor::Containerd { hosts_dir } = flavor else {
        return None;
    };
    let config = root.join(CONTAINERD_CONFIG);
    if !config.is_file() {
        return None;
    }
    match containerd_config_path(&config) {
        None => Some(config_path_missing(&config)),
        Some(dir) if dir != hosts_dir.trim_end_matches('/') => Some(format!(
            "containerd reads hosts.toml files from {dir} (config_path in /{CONTAINERD_CONFIG}), but this agent is set to write them to {hosts_dir}: set the agent's flavor to containerd:{dir}, or to auto"
        )),
        Some(_) => None,
    }
}

/// The report of a containerd that reads no hosts.toml, with the fix.
fn config_path_missing(config: &Path) -> String {
    let state = if config.is_file() {
        "does not set the CRI registry config_path"
    } else {
        "is missing, so the CRI registry config_path is not set"
    };
    format!(
        "containerd reads no hosts.toml, so regmirror's mirrors would be ignored: /{CONTAINERD_CONFIG} {state}. Fix: set config_path = \"{DEFAULT_CONTAINERD_HOSTS_DIR}\" under [plugins.\"io.containerd.grpc.v1.cri\".registry] (config version 2) or [plugins.\"io.containerd.cri.v1.images\".registry] (version 3), move any registry.mirrors/configs entries there into hosts.toml files, and restart containerd once; the agent checks again every minute"
    )
}

/// The unit a flavor given explicitly runs as, when the host does not say.
pub fn default_unit(flavor: &Flavor, root: &Path) -> String {
    let candidates: &[&str] = match flavor {
        Flavor::K3s { .. } => &["k3s.service", "k3s-agent.service"],
        Flavor::Rke2 { .. } => &["rke2-server.service", "rke2-agent.service"],
        Flavor::Containerd { .. } => &["containerd.service"],
        Flavor::Crio => &["crio.service"],
    };
    candidates
        .iter()
        .find(|u| find_unit(root, u).is_some())
        .unwrap_or(&candidates[0])
        .to_string()
}

fn find_unit(root: &Path, unit: &str) -> Option<PathBuf> {
    UNIT_DIRS
        .iter()
        .map(|d| root.join(d).join(unit))
        .find(|p| p.is_file())
}

/// What a k3s or RKE2 node was started with: its config file and drop-ins (in the order k3s
/// reads them, a later one overriding an earlier one) and its unit's command line, whose flags
/// override them all.
struct K3sSettings {
    /// Host path as shown in messages, and the parsed YAML, per config file that exists.
    configs: Vec<(String, serde_yaml::Value)>,
    /// The unit file as shown in messages, and its text.
    unit: (String, String),
}

impl K3sSettings {
    fn read(root: &Path, name: &str, unit_file: &Path) -> K3sSettings {
        let shown = |p: &Path| format!("/{}", p.strip_prefix(root).unwrap_or(p).display());
        let config_dir = root.join("etc/rancher").join(name);
        let mut files = vec![config_dir.join("config.yaml")];
        if let Ok(entries) = std::fs::read_dir(config_dir.join("config.yaml.d")) {
            let mut dropins: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            dropins.sort();
            files.extend(dropins);
        }
        let configs = files
            .iter()
            .filter_map(|f| {
                let text = std::fs::read_to_string(f).ok()?;
                Some((shown(f), serde_yaml::from_str(&text).unwrap_or_default()))
            })
            .collect();
        let unit = (
            shown(unit_file),
            std::fs::read_to_string(unit_file).unwrap_or_default(),
        );
        K3sSettings { configs, unit }
    }

    /// The unit's command-line arguments, unquoted (the k3s installer quotes each one).
    fn arguments(&self) -> impl Iterator<Item = &str> {
        self.unit
            .1
            .split_whitespace()
            .map(|a| a.trim_matches(|c| c == '\'' || c == '"'))
    }

    /// Where an external runtime endpoint is configured, if anywhere: such a node ignores
    /// registries.yaml.
    fn external_runtime(&self) -> Option<&str> {
        let in_config = self.configs.iter().find(|(_, yaml)| {
            yaml.get("container-runtime-endpoint")
                .and_then(|v| v.as_str())
                .is_some_and(|v| !v.trim().is_empty())
        });
        if let Some((place, _)) = in_config {
            return Some(place);
        }
        self.arguments()
            .any(|a| a.starts_with("--container-runtime-endpoint"))
            .then_some(self.unit.0.as_str())
    }

    /// Whether `--embedded-registry` is on: the last word of the config files, or the command
    /// line's. Only servers carry it; k3s agents learn it from their server (see
    /// [`Host::note_node_labels`]).
    fn embedded_registry(&self) -> bool {
        let flag = self.arguments().fold(None, |on, a| match a {
            "--embedded-registry" | "--embedded-registry=true" => Some(true),
            "--embedded-registry=false" => Some(false),
            _ => on,
        });
        flag.unwrap_or_else(|| {
            self.configs
                .iter()
                .filter_map(|(_, yaml)| match yaml.get("embedded-registry")? {
                    serde_yaml::Value::Bool(on) => Some(*on),
                    serde_yaml::Value::String(on) => Some(on == "true"),
                    _ => None,
                })
                .next_back()
                .unwrap_or(false)
        })
    }
}

/// The label k3s (and RKE2) put on every Node that runs the embedded registry mirror. The only
/// sign of it on an agent node, whose config files do not carry the server's setting.
pub const EMBEDDED_REGISTRY_LABEL: &str = "p2p.k3s.cattle.io/enabled";

impl Host {
    /// Takes in what the Node's labels say: k3s marks the Nodes that run its embedded
    /// registry mirror ([`EMBEDDED_REGISTRY_LABEL`]), the only sign of it on an agent node.
    /// The mark only ever turns the embedded registry on for a k3s or RKE2 flavor, detected
    /// or given: writing as if it ran costs restarts, writing as if it did not would drop its
    /// endpoint. Returns whether the flavor changed.
    pub fn note_node_labels(&mut self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let marked = labels
            .and_then(|l| l.get(EMBEDDED_REGISTRY_LABEL))
            .is_some_and(|v| v == "true");
        let flavor = if marked {
            self.flavor.clone().with_embedded_registry()
        } else {
            return false;
        };
        let changed = flavor != self.flavor;
        self.flavor = flavor;
        changed
    }
}

/// containerd's CRI registry `config_path`: config version 2 and 3 keep it in different tables.
fn containerd_config_path(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    let value: toml::Table = toml::from_str(&text).ok()?;
    let plugins = value.get("plugins")?;
    ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images"]
        .iter()
        .find_map(|p| {
            plugins
                .get(p)?
                .get("registry")?
                .get("config_path")?
                .as_str()
        })
        .map(|s| {
            s.split(':')
                .next()
                .unwrap_or(s)
                .trim_end_matches('/')
                .to_owned()
        })
        .filter(|s| s.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(files: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let p = root.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        root
    }

    fn supported(d: Detected) -> Host {
        match d {
            Detected::Supported(h) => h,
            Detected::Unsupported(why) => panic!("unsupported: {why}"),
        }
    }

    #[test]
    fn k3s_and_rke2_servers_and_agents() {
        let unit = "[Service]\nExecStart=/usr/local/bin/k3s server\n";
        for (path, flavor, service) in [
            ("etc/systemd/system/k3s.service", Flavor::K3S, "k3s.service"),
            (
                "etc/systemd/system/k3s-agent.service",
                Flavor::K3S,
                "k3s-agent.service",
            ),
            (
                "usr/local/lib/systemd/system/rke2-server.service",
                Flavor::RKE2,
                "rke2-server.service",
            ),
            (
                "usr/lib/systemd/system/rke2-agent.service",
                Flavor::RKE2,
                "rke2-agent.service",
            ),
        ] {
            let root = host(&[(path, unit)]);
            let h = supported(detect(root.path()));
            assert_eq!((h.flavor, h.unit.as_str()), (flavor, service), "{path}");
        }
    }

    #[test]
    fn the_embedded_registry_is_read_from_the_config_files_and_the_command_line() {
        let server = (
            "etc/systemd/system/k3s.service",
            "[Service]\nExecStart=/usr/local/bin/k3s \\\n    server \\\n",
        );
        let flavor = |files: &[(&str, &str)]| supported(detect(host(files).path())).flavor;
        let p2p = Flavor::K3S.with_embedded_registry();

        assert_eq!(flavor(&[server]), Flavor::K3S);
        assert_eq!(
            flavor(&[
                server,
                ("etc/rancher/k3s/config.yaml", "embedded-registry: true\n")
            ]),
            p2p
        );
        // A later drop-in has the last word, as in k3s.
        assert_eq!(
            flavor(&[
                server,
                ("etc/rancher/k3s/config.yaml", "embedded-registry: true\n"),
                (
                    "etc/rancher/k3s/config.yaml.d/50-off.yaml",
                    "embedded-registry: false\n"
                ),
            ]),
            Flavor::K3S
        );
        // The command line, quoted as the installer writes it, overrides the files.
        let flagged = format!("{}    '--embedded-registry' \\\n", server.1);
        assert_eq!(flavor(&[(server.0, &flagged)]), p2p);
        let off = format!("{}    '--embedded-registry=false'\n", server.1);
        assert_eq!(
            flavor(&[
                (server.0, &off),
                ("etc/rancher/k3s/config.yaml", "embedded-registry: true\n")
            ]),
            Flavor::K3S
        );
        // RKE2 alike.
        assert_eq!(
            flavor(&[
                (
                    "usr/lib/systemd/system/rke2-server.service",
                    "ExecStart=/usr/local/bin/rke2 server\n"
                ),
                ("etc/rancher/rke2/config.yaml", "embedded-registry: true\n"),
            ]),
            Flavor::RKE2.with_embedded_registry()
        );
    }

    #[test]
    fn the_node_label_k3s_sets_turns_the_embedded_registry_on_for_k3s_and_rke2_only() {
        let label = BTreeMap::from([(EMBEDDED_REGISTRY_LABEL.to_owned(), "true".to_owned())]);
        let host = |flavor: Flavor| Host {
            flavor,
            unit: "k3s-agent.service".into(),
            warning: None,
        };

        let mut agent_node = host(Flavor::K3S);
        assert!(!agent_node.note_node_labels(None));
        assert!(!agent_node.note_node_labels(Some(&BTreeMap::new())));
        assert_eq!(agent_node.flavor, Flavor::K3S);
        assert!(agent_node.note_node_labels(Some(&label)));
        assert_eq!(agent_node.flavor.to_string(), "k3s+embedded-registry");
        // Seen again: nothing changes.
        assert!(!agent_node.note_node_labels(Some(&label)));

        let mut rke2 = host(Flavor::RKE2);
        assert!(rke2.note_node_labels(Some(&label)));
        assert_eq!(rke2.flavor.to_string(), "rke2+embedded-registry");

        let mut containerd = host("containerd".parse().unwrap());
        assert!(!containerd.note_node_labels(Some(&label)));
        assert_eq!(containerd.flavor.to_string(), "containerd");
    }

    #[test]
    fn k3s_with_an_external_runtime_is_reported_not_applied() {
        let root = host(&[
            (
                "etc/systemd/system/k3s-agent.service",
                "ExecStart=/usr/local/bin/k3s agent\n",
            ),
            (
                "etc/rancher/k3s/config.yaml.d/10-runtime.yaml",
                "container-runtime-endpoint: unix:///run/containerd/containerd.sock\n",
            ),
        ]);
        let Detected::Unsupported(why) = detect(root.path()) else {
            panic!()
        };
        assert!(
            why.contains("/etc/rancher/k3s/config.yaml.d/10-runtime.yaml"),
            "{why}"
        );
        assert!(why.contains("ignores registries.yaml"), "{why}");

        let root = host(&[(
            "etc/systemd/system/k3s.service",
            "ExecStart=/usr/local/bin/k3s \\\n    server \\\n    '--container-runtime-endpoint' '/run/crio/crio.sock'\n",
        )]);
        let Detected::Unsupported(why) = detect(root.path()) else {
            panic!()
        };
        assert!(why.contains("/etc/systemd/system/k3s.service"), "{why}");
    }

    #[test]
    fn containerd_config_path_from_version_2_and_3_configs() {
        let v2 = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n";
        let h = supported(detect(host(&[("etc/containerd/config.toml", v2)]).path()));
        assert_eq!(
            h.flavor,
            Flavor::Containerd {
                hosts_dir: "/etc/containerd/certs.d".into()
            }
        );
        assert_eq!(h.warning, None);

        let v3 = "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = '/opt/registry/hosts/'\n";
        let h = supported(detect(host(&[("etc/containerd/config.toml", v3)]).path()));
        assert_eq!(
            h.flavor,
            Flavor::Containerd {
                hosts_dir: "/opt/registry/hosts".into()
            }
        );
    }

    #[test]
    fn containerd_without_config_path_is_reported_with_the_fix_not_applied() {
        let why = match detect(host(&[("etc/containerd/config.toml", "version = 2\n")]).path()) {
            Detected::Unsupported(why) => why,
            other => panic!("{other:?}"),
        };
        assert!(
            why.contains("does not set the CRI registry config_path"),
            "{why}"
        );
        assert!(
            why.contains("config_path = \"/etc/containerd/certs.d\"")
                && why.contains("restart containerd"),
            "{why}"
        );
        // Only the unit: containerd runs on its built-in defaults, which read no hosts.toml.
        let why = match detect(host(&[("lib/systemd/system/containerd.service", "")]).path()) {
            Detected::Unsupported(why) => why,
            other => panic!("{other:?}"),
        };
        assert!(why.contains("is missing"), "{why}");
    }

    #[test]
    fn an_explicit_containerd_flavor_is_checked_against_the_config_path() {
        let v2 = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n";
        let root = host(&[("etc/containerd/config.toml", v2)]);
        let flavor = |dir: &str| Flavor::Containerd {
            hosts_dir: dir.into(),
        };
        assert_eq!(
            ignored_by_containerd(&flavor("/etc/containerd/certs.d/"), root.path()),
            None
        );
        let why = ignored_by_containerd(&flavor("/opt/hosts"), root.path()).unwrap();
        assert!(
            why.contains("set the agent's flavor to containerd:/etc/containerd/certs.d"),
            "{why}"
        );
        let unset = host(&[("etc/containerd/config.toml", "version = 2\n")]);
        assert!(ignored_by_containerd(&flavor("/etc/containerd/certs.d"), unset.path()).is_some());
        // No config file on the host: the flavor given is taken at its word.
        assert_eq!(ignored_by_containerd(&flavor("/x"), host(&[]).path()), None);
        assert_eq!(ignored_by_containerd(&Flavor::K3S, unset.path()), None);
    }

    #[test]
    fn crio_and_nothing_at_all() {
        let h = supported(detect(host(&[("etc/crio/crio.conf", "[crio]\n")]).path()));
        assert_eq!((h.flavor, h.unit.as_str()), (Flavor::Crio, "crio.service"));
        // Empty directories the DaemonSet's mounts create are no evidence of anything.
        let root = host(&[]);
        for dir in ["etc/rancher/k3s", "etc/crio", "etc/containerd"] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        assert!(matches!(detect(root.path()), Detected::Unsupported(_)));
    }
}
