//! Reading Kubernetes YAML from files: RegistryMirrors, and the Secrets and ConfigMaps they
//! reference. Other kinds are skipped, so a whole GitOps directory can be pointed at.
//!
//! Every object remembers where it came from, and every problem names the file, the object
//! and the field.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use regmirror_core::api::RegistryMirror;
use regmirror_core::sources::{SourceKind, SourceObject, Sources};
use serde::de::DeserializeOwned;
use thiserror::Error;

/// Where an object was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// Index of the YAML document in the file, from 0.
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.document == 0 {
            write!(f, "{}", self.file.display())
        } else {
            write!(
                f,
                "{} (document {})",
                self.file.display(),
                self.document + 1
            )
        }
    }
}

/// A RegistryMirror and where it came from.
#[derive(Debug, Clone)]
pub struct LoadedMirror {
    pub origin: Origin,
    pub mirror: RegistryMirror,
}

/// Why a file or document could not be read.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: not valid YAML: {detail}")]
    Yaml { origin: Origin, detail: String },
    #[error("{origin}: {kind}/{name}: {detail}")]
    Invalid {
        origin: Origin,
        kind: String,
        name: String,
        detail: String,
    },
}

/// Everything read from a set of paths.
#[derive(Debug, Default)]
pub struct Manifests {
    pub mirrors: Vec<LoadedMirror>,
    pub sources: Sources,
    pub errors: Vec<LoadError>,
}

/// Reads `paths`: files, or directories whose `*.yaml` / `*.yml` files are read in name order
/// (not recursively, so examples can keep variants in subdirectories). Secrets and ConfigMaps
/// without a namespace land in `default_namespace`, as `kubectl apply -n` would put them.
pub fn load(paths: &[PathBuf], default_namespace: &str) -> Manifests {
    let mut manifests = Manifests::default();
    for file in expand(paths, &mut manifests.errors) {
        match std::fs::read_to_string(&file) {
            Ok(text) => read_documents(&file, &text, default_namespace, &mut manifests),
            Err(source) => manifests.errors.push(LoadError::Io { path: file, source }),
        }
    }
    manifests
}

fn expand(paths: &[PathBuf], errors: &mut Vec<LoadError>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for path in paths {
        if !path.is_dir() {
            files.push(path.clone());
            continue;
        }
        match std::fs::read_dir(path) {
            Ok(entries) => {
                let mut found: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml")
                    })
                    .collect();
                found.sort();
                files.extend(found);
            }
            Err(source) => errors.push(LoadError::Io {
                path: path.clone(),
                source,
            }),
        }
    }
    files
}

fn read_documents(file: &Path, text: &str, default_namespace: &str, manifests: &mut Manifests) {
    use serde::Deserialize;
    for (document, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = Origin {
            file: file.to_owned(),
            document,
        };
        let value = match serde_yaml::Value::deserialize(de) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(value) => value,
            Err(e) => {
                manifests.errors.push(LoadError::Yaml {
                    origin,
                    detail: e.to_string(),
                });
                // The rest of the stream cannot be trusted after a syntax error.
                return;
            }
        };
        let field = |name: &str| {
            value
                .get(name)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("<unnamed>")
            .to_owned();
        let invalid = |detail: String| LoadError::Invalid {
            origin: origin.clone(),
            kind: kind.clone(),
            name: name.clone(),
            detail,
        };

        match (api_version.as_str(), kind.as_str()) {
            ("regmirror.io/v1alpha1", "RegistryMirror") => {
                match typed::<RegistryMirror>(value.clone()) {
                    Ok(mirror) => manifests.mirrors.push(LoadedMirror { origin, mirror }),
                    Err(detail) => manifests.errors.push(invalid(detail)),
                }
            }
            ("v1", "Secret") => match typed::<Secret>(value.clone()) {
                Ok(secret) => {
                    // stringData wins over data, as on the API server.
                    let data = decoded(secret.data, secret.string_data);
                    let type_ = Some(secret.type_.unwrap_or_else(|| "Opaque".into()));
                    let namespace = secret
                        .metadata
                        .namespace
                        .as_deref()
                        .unwrap_or(default_namespace);
                    let allowed_hosts =
                        SourceObject::allowed_hosts_of(secret.metadata.annotations.as_ref());
                    manifests.sources.insert(
                        SourceKind::Secret,
                        namespace,
                        &name,
                        SourceObject {
                            type_,
                            data,
                            allowed_hosts,
                        },
                    );
                }
                Err(detail) => manifests.errors.push(invalid(detail)),
            },
            ("v1", "ConfigMap") => match typed::<ConfigMap>(value.clone()) {
                Ok(config_map) => {
                    let data = decoded(config_map.binary_data, config_map.data);
                    let namespace = config_map
                        .metadata
                        .namespace
                        .as_deref()
                        .unwrap_or(default_namespace);
                    manifests.sources.insert(
                        SourceKind::ConfigMap,
                        namespace,
                        &name,
                        SourceObject {
                            type_: None,
                            data,
                            allowed_hosts: None,
                        },
                    );
                }
                Err(detail) => manifests.errors.push(invalid(detail)),
            },
            (api, "RegistryMirror") if api.starts_with("regmirror.io/") => {
                manifests.errors.push(invalid(format!(
                    "apiVersion {api:?} is not served; use regmirror.io/v1alpha1"
                )));
            }
            _ => {} // Any other kind: not ours to read.
        }
    }
}

/// One key → bytes map from an object's binary and text maps (Secret `data` + `stringData`,
/// ConfigMap `binaryData` + `data`); a text entry wins over a binary one of the same key.
fn decoded(
    binary: Option<BTreeMap<String, ByteString>>,
    text: Option<BTreeMap<String, String>>,
) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = binary
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    data.extend(
        text.unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes())),
    );
    data
}

/// Deserializes with the path of the offending field in the message.
fn typed<T: DeserializeOwned>(value: serde_yaml::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}
