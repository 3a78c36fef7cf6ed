//! What the core knows of a node: its name, labels, role, and which runtime flavor it runs.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// containerd's conventional `config_path` for hosts.toml directories.
pub const DEFAULT_CONTAINERD_HOSTS_DIR: &str = "/etc/containerd/certs.d";

/// The container runtime setup of a node, which decides the files written and how they are
/// picked up. Detected by the node agent, or fixed by configuration.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Flavor {
    /// k3s (server or agent): registries.yaml plus the hosts.toml files k3s generates from it.
    K3s {
        /// k3s runs its embedded registry mirror (Spegel, `--embedded-registry`) on this node:
        /// it then shares the images of every registry registries.yaml lists with the other
        /// nodes, and puts its own node-local endpoint first in the hosts.toml files it
        /// generates, which only it can write (see `render::k3s`).
        embedded_registry: bool,
    },
    /// RKE2 (server or agent): like k3s under `/etc/rancher/rke2` and `/var/lib/rancher/rke2`.
    Rke2 { embedded_registry: bool },
    /// containerd reading hosts.toml from `hosts_dir` (its CRI `config_path`).
    Containerd { hosts_dir: String },
    /// CRI-O with containers-registries.conf(5).
    Crio,
}

/// What follows a k3s or RKE2 flavor's name when it runs the embedded registry mirror.
const EMBEDDED_REGISTRY_SUFFIX: &str = "+embedded-registry";

impl Flavor {
    /// k3s without its embedded registry mirror: as installed.
    pub const K3S: Flavor = Flavor::K3s {
        embedded_registry: false,
    };
    /// RKE2 without its embedded registry mirror: as installed.
    pub const RKE2: Flavor = Flavor::Rke2 {
        embedded_registry: false,
    };

    /// The short name used in messages and annotations.
    pub fn name(&self) -> &'static str {
        match self {
            Flavor::K3s { .. } => "k3s",
            Flavor::Rke2 { .. } => "rke2",
            Flavor::Containerd { .. } => "containerd",
            Flavor::Crio => "cri-o",
        }
    }

    /// The host paths a configuration of this flavor may write: a path is the flavor's when it
    /// equals an entry, or when an entry ends in `/` and the path lies under it. Exactly what
    /// the flavor's renderer produces and no more, so that a configuration can never reach
    /// another file of the runtime (k3s's `config.yaml`, its auto-deployed
    /// `/var/lib/rancher/k3s/server/manifests/`, CRI-O's other drop-ins, ...).
    ///
    /// A containerd `hosts_dir` of `/` owns nothing: that would be the whole host.
    pub fn owned_prefixes(&self) -> Vec<String> {
        let k3s_like = |dist: &str| {
            vec![
                format!("/etc/rancher/{dist}/registries.yaml"),
                format!("/etc/rancher/{dist}/regmirror-certs/"),
                format!("/var/lib/rancher/{dist}/agent/etc/containerd/certs.d/"),
            ]
        };
        match self {
            Flavor::K3s { .. } => k3s_like("k3s"),
            Flavor::Rke2 { .. } => k3s_like("rke2"),
            Flavor::Containerd { hosts_dir } => match hosts_dir.trim_end_matches('/') {
                "" => Vec::new(),
                dir => vec![format!("{dir}/")],
            },
            Flavor::Crio => [
                "/etc/containers/registries.conf.d/",
                "/etc/containers/certs.d/",
                "/etc/crio/regmirror/auth.json",
                "/etc/crio/crio.conf.d/50-regmirror-auth.conf",
            ]
            .map(String::from)
            .to_vec(),
        }
    }

    /// Whether the node runs k3s's (or RKE2's) embedded registry mirror.
    pub fn embedded_registry(&self) -> bool {
        matches!(
            self,
            Flavor::K3s {
                embedded_registry: true
            } | Flavor::Rke2 {
                embedded_registry: true
            }
        )
    }

    /// This flavor, running the embedded registry mirror where the flavor has one (k3s and
    /// RKE2); other flavors are returned as they are.
    pub fn with_embedded_registry(self) -> Flavor {
        match self {
            Flavor::K3s { .. } => Flavor::K3s {
                embedded_registry: true,
            },
            Flavor::Rke2 { .. } => Flavor::Rke2 {
                embedded_registry: true,
            },
            other => other,
        }
    }
}

/// `k3s`, `rke2`, `cri-o`, `containerd` or `containerd:<hosts dir>`; k3s and RKE2 with
/// `+embedded-registry` when they run it.
impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Flavor::K3s {
                embedded_registry: true,
            }
            | Flavor::Rke2 {
                embedded_registry: true,
            } => write!(f, "{}{EMBEDDED_REGISTRY_SUFFIX}", self.name()),
            Flavor::Containerd { hosts_dir } if hosts_dir != DEFAULT_CONTAINERD_HOSTS_DIR => {
                write!(f, "containerd:{hosts_dir}")
            }
            other => f.write_str(other.name()),
        }
    }
}

/// A flavor name that is none of the known ones.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("unknown flavor {0:?}: expected k3s, rke2 (either with +embedded-registry), containerd, containerd:<absolute hosts dir> or cri-o")]
pub struct UnknownFlavor(pub String);

impl FromStr for Flavor {
    type Err = UnknownFlavor;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "k3s" => Ok(Flavor::K3S),
            "rke2" => Ok(Flavor::RKE2),
            "k3s+embedded-registry" => Ok(Flavor::K3S.with_embedded_registry()),
            "rke2+embedded-registry" => Ok(Flavor::RKE2.with_embedded_registry()),
            "cri-o" | "crio" => Ok(Flavor::Crio),
            "containerd" => Ok(Flavor::Containerd {
                hosts_dir: DEFAULT_CONTAINERD_HOSTS_DIR.into(),
            }),
            _ => match s.strip_prefix("containerd:") {
                Some(dir) if dir.starts_with('/') && !dir.split('/').any(|c| c == "..") => {
                    Ok(Flavor::Containerd {
                        hosts_dir: dir.trim_end_matches('/').to_owned(),
                    })
                }
                _ => Err(UnknownFlavor(s.to_owned())),
            },
        }
    }
}

/// A node as the renderer and the rollout planner see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub flavor: Flavor,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavors_round_trip_through_their_names() {
        for name in [
            "k3s",
            "rke2",
            "k3s+embedded-registry",
            "rke2+embedded-registry",
            "cri-o",
            "containerd",
            "containerd:/var/lib/containerd/certs.d",
        ] {
            assert_eq!(name.parse::<Flavor>().unwrap().to_string(), name);
        }
        assert_eq!("crio".parse::<Flavor>().unwrap(), Flavor::Crio);
        assert_eq!(
            "containerd:/etc/containerd/certs.d/"
                .parse::<Flavor>()
                .unwrap(),
            Flavor::Containerd {
                hosts_dir: DEFAULT_CONTAINERD_HOSTS_DIR.into()
            }
        );
    }

    #[test]
    fn no_flavor_owns_k3s_manifests_and_a_root_hosts_dir_owns_nothing() {
        for flavor in [
            "k3s",
            "rke2",
            "cri-o",
            "containerd",
            "containerd:/opt/certs.d",
        ] {
            let owned = flavor.parse::<Flavor>().unwrap().owned_prefixes();
            assert!(!owned.is_empty(), "{flavor}");
            assert!(
                owned
                    .iter()
                    .all(|p| !p.starts_with("/var/lib/rancher/k3s/server")
                        && !"/var/lib/rancher/k3s/server/manifests/x.yaml".starts_with(p.as_str())),
                "{flavor}: {owned:?}"
            );
        }
        assert!("containerd:/"
            .parse::<Flavor>()
            .unwrap()
            .owned_prefixes()
            .is_empty());
    }

    #[test]
    fn relative_or_escaping_hosts_dirs_are_refused() {
        for bad in [
            "docker",
            "containerd+embedded-registry",
            "k3s+spegel",
            "containerd:relative/dir",
            "containerd:/etc/../tmp",
            "containerd:",
        ] {
            assert_eq!(
                bad.parse::<Flavor>(),
                Err(UnknownFlavor(bad.into())),
                "{bad}"
            );
        }
    }
}
