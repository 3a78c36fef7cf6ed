//! Which images to copy, and where each goes in the mirror: the repository a node's runtime
//! asks the mirror endpoint for.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use oci_client::Reference;
use regex::Regex;
use regmirror_core::model::{EndpointUrl, ResolvedMirror};
use thiserror::Error;

/// An entry of an image list that is not an image reference.
#[derive(Debug, Error)]
#[error("{origin}: {entry:?} is not an image reference: {reason}")]
pub struct ListError {
    /// `--images` or `file:line`.
    pub origin: String,
    pub entry: String,
    pub reason: String,
}

/// Reads one `--images` value: a file (one reference a line, `#` starts a comment) when a
/// file of that name exists, otherwise references separated by commas. References are
/// normalised as docker does: `nginx` is `docker.io/library/nginx:latest`.
pub fn parse_list(value: &str) -> Result<Vec<Reference>, ListError> {
    let path = Path::new(value);
    if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(|e| ListError {
            origin: path.display().to_string(),
            entry: String::new(),
            reason: format!("cannot read the file: {e}"),
        })?;
        let mut images = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let entry = line.split('#').next().unwrap_or_default().trim();
            if !entry.is_empty() {
                images.push(parse_one(entry, || {
                    format!("{}:{}", path.display(), i + 1)
                })?);
            }
        }
        return Ok(images);
    }
    value
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| parse_one(entry, || "--images".to_owned()))
        .collect()
}

fn parse_one(entry: &str, origin: impl Fn() -> String) -> Result<Reference, ListError> {
    Reference::from_str(entry).map_err(|e| ListError {
        origin: origin(),
        entry: entry.to_owned(),
        reason: e.to_string(),
    })
}

/// Where images go: one endpoint of a RegistryMirror, with the repository prefix its path
/// stands for and the mirror's rewrites.
#[derive(Debug, Clone)]
pub struct Destination {
    /// The RegistryMirror's name.
    pub mirror: String,
    /// Its `spec.registry` (or `*`).
    pub registry: String,
    /// `host[:port]` of the endpoint.
    pub host: String,
    /// The repository prefix the endpoint's path stands for, without slashes around it.
    pub prefix: String,
    /// `(pattern, replacement)`, in the order the runtime tries them (k3s and RKE2 keep
    /// rewrites in a map: by pattern).
    rewrites: Vec<(Regex, String)>,
}

/// Why an image cannot go to a mirror.
#[derive(Debug, Error)]
pub enum DestinationError {
    #[error("{image}: RegistryMirror {mirror:?} mirrors {registry}, not {image_registry}: nodes never ask its endpoints for this image")]
    OtherRegistry {
        image: String,
        mirror: String,
        registry: String,
        image_registry: String,
    },
}

impl Destination {
    pub fn new(mirror: &ResolvedMirror, url: &EndpointUrl) -> Destination {
        // A path `/v2/<p>` is the API root containerd is told to use as is: `<p>/<repository>`
        // in the registry; any other path is the prefix CRI-O puts before the repository.
        let path = url.path.trim_matches('/');
        let prefix = path.strip_prefix("v2/").unwrap_or(path);
        let prefix = if prefix == "v2" { "" } else { prefix };
        let mut rewrites: Vec<(String, String)> = mirror.rewrites.clone();
        rewrites.sort();
        Destination {
            mirror: mirror.name.clone(),
            registry: mirror.registry.clone(),
            host: url.host.clone(),
            prefix: prefix.to_owned(),
            rewrites: rewrites
                .into_iter()
                // Resolution compiled them already: one that does not compile is not applied
                // by the runtime either.
                .filter_map(|(pattern, replacement)| {
                    Some((Regex::new(&pattern).ok()?, replacement))
                })
                .collect(),
        }
    }

    /// The image in the mirror, as a node pulling `source` through this endpoint asks for it:
    /// the mirror's first rewrite that changes the repository (every match replaced), then the
    /// endpoint's prefix; the same tag and digest.
    pub fn reference_for(&self, source: &Reference) -> Result<Reference, DestinationError> {
        if self.registry != "*" && self.registry != source.registry() {
            return Err(DestinationError::OtherRegistry {
                image: source.whole(),
                mirror: self.mirror.clone(),
                registry: self.registry.clone(),
                image_registry: source.registry().to_owned(),
            });
        }
        let original = source.repository();
        let mut repository = original.to_owned();
        for (pattern, replacement) in &self.rewrites {
            let rewritten = pattern.replace_all(original, replacement.as_str());
            if rewritten != original {
                repository = rewritten.into_owned();
                break;
            }
        }
        if !self.prefix.is_empty() {
            repository = format!("{}/{repository}", self.prefix);
        }
        let host = self.host.clone();
        Ok(match (source.tag(), source.digest()) {
            (Some(tag), Some(digest)) => {
                Reference::with_tag_and_digest(host, repository, tag.into(), digest.into())
            }
            (None, Some(digest)) => Reference::with_digest(host, repository, digest.into()),
            (tag, None) => Reference::with_tag(host, repository, tag.unwrap_or("latest").into()),
        })
    }
}

/// An `os/architecture[/variant]` platform, as `--platform` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: (*os).to_owned(),
                architecture: (*arch).to_owned(),
                variant: parts
                    .get(2)
                    .filter(|v| !v.is_empty())
                    .map(|v| (*v).to_owned()),
            }),
            _ => Err(format!(
                "{s:?} is not os/architecture[/variant], e.g. linux/arm64"
            )),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

impl Platform {
    /// Reads an index entry's `platform` object.
    pub fn of_entry(entry: &serde_json::Value) -> Option<Platform> {
        let platform = entry.get("platform")?;
        Some(Platform {
            os: platform.get("os")?.as_str()?.to_owned(),
            architecture: platform.get("architecture")?.as_str()?.to_owned(),
            variant: platform
                .get("variant")
                .and_then(|v| v.as_str())
                .map(str::to_owned),
        })
    }

    /// Whether `self` (what the user asked for) selects `other` (an index entry's platform):
    /// a variant asked for must be the same; none asked for takes any.
    pub fn selects(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && (self.variant.is_none() || self.variant == other.variant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use regmirror_core::model::Scheme;

    fn destination(registry: &str, path: &str, rewrites: &[(&str, &str)]) -> Destination {
        let url = EndpointUrl {
            scheme: Scheme::Https,
            host: "mirror.example:5000".into(),
            path: path.into(),
        };
        let mirror = ResolvedMirror {
            name: "m".into(),
            registry: registry.into(),
            endpoints: vec![],
            rewrites: rewrites
                .iter()
                .map(|(p, r)| (p.to_string(), r.to_string()))
                .collect(),
            node_selector: None,
            embedded_registry: false,
        };
        Destination::new(&mirror, &url)
    }

    fn to(d: &Destination, image: &str) -> String {
        d.reference_for(&image.parse().unwrap()).unwrap().whole()
    }

    #[test]
    fn images_are_normalised_like_docker() {
        let list = parse_list("nginx, quay.io/a/b:1 ,ghcr.io/x/y@sha256:0123456789012345678901234567890123456789012345678901234567890123").unwrap();
        let names: Vec<String> = list.iter().map(|r| r.whole()).collect();
        assert_eq!(
            names,
            [
                "docker.io/library/nginx:latest",
                "quay.io/a/b:1",
                "ghcr.io/x/y@sha256:0123456789012345678901234567890123456789012345678901234567890123"
            ]
        );
    }

    #[test]
    fn a_file_lists_one_image_a_line_with_comments() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("images.txt");
        std::fs::write(
            &file,
            "# what the cluster needs\nnginx:1.27  # web\n\nbusybox\n",
        )
        .unwrap();
        let list = parse_list(file.to_str().unwrap()).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[1].whole(), "docker.io/library/busybox:latest");
        std::fs::write(&file, "nginx\nNot An Image\n").unwrap();
        let e = parse_list(file.to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("images.txt:2"), "{e}");
    }

    #[test]
    fn the_image_goes_where_nodes_ask_for_it() {
        let plain = destination("docker.io", "", &[]);
        assert_eq!(to(&plain, "nginx:1"), "mirror.example:5000/library/nginx:1");
        let prefixed = destination("docker.io", "/v2/hub", &[]);
        assert_eq!(
            to(&prefixed, "nginx"),
            "mirror.example:5000/hub/library/nginx:latest"
        );
        let crio = destination("docker.io", "/hub", &[]);
        assert_eq!(
            to(&crio, "nginx"),
            "mirror.example:5000/hub/library/nginx:latest"
        );
        let rewritten = destination("docker.io", "", &[("^library/(.*)", "hub/$1"), ("^x", "y")]);
        assert_eq!(to(&rewritten, "nginx:2"), "mirror.example:5000/hub/nginx:2");
        let wildcard = destination("*", "", &[]);
        assert_eq!(to(&wildcard, "quay.io/a/b:1"), "mirror.example:5000/a/b:1");
        let err = plain
            .reference_for(&"quay.io/a/b".parse().unwrap())
            .unwrap_err();
        assert!(
            err.to_string().contains("mirrors docker.io, not quay.io"),
            "{err}"
        );
    }

    #[test]
    fn platforms_select_index_entries() {
        let arm: Platform = "linux/arm64".parse().unwrap();
        let v8: Platform = "linux/arm64/v8".parse().unwrap();
        assert!(arm.selects(&v8));
        assert!(!v8.selects(&arm));
        assert!("linux".parse::<Platform>().is_err());
        assert_eq!(v8.to_string(), "linux/arm64/v8");
    }
}
