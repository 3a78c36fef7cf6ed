//! A cache's Kubernetes objects, as plain functions of what they serve: the Service the nodes
//! reach it by, the Deployment that runs it, and the Secret it reads, in the caches' namespace,
//! annotated with their RegistryMirror's name.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, KeyToPath,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Service,
    ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use regmirror_core::api::{CacheSpec, RegistryMirror};
use regmirror_core::cache::{
    hex_digest, registry_config, CacheError, Serving, Upstream, MIRROR_LABEL, PORT,
};
use regmirror_core::contract::{MANAGED_BY, MANAGER};

/// Where the cache's Secret is mounted in its container.
pub const CONFIG_DIR: &str = "/etc/regmirror-cache";
/// Where it stores what it pulled.
pub const STORAGE_DIR: &str = "/var/lib/registry";
/// The Secret's keys.
pub const CONFIG_KEY: &str = "config.yml";
pub const HTPASSWD_KEY: &str = "htpasswd";
pub const PASSWORD_KEY: &str = "password";
pub const CERT_KEY: &str = "tls.crt";
pub const KEY_KEY: &str = "tls.key";
pub const UPSTREAM_CA_KEY: &str = "upstream-ca.crt";
/// Annotations: the digest of what was applied last (Service, Deployment); on the Secret, the
/// cluster IP its certificate is for, the CA that signed it, and when it ends.
pub const APPLIED_DIGEST: &str = "regmirror.io/applied-digest";
pub const CERT_ADDRESS: &str = "regmirror.io/certificate-address";
pub const CERT_CA: &str = "regmirror.io/certificate-ca";
pub const CERT_NOT_AFTER: &str = "regmirror.io/certificate-not-after";
/// On the pod template: the digest of the Secret's data, so that a new config restarts it.
pub const CONFIG_DIGEST: &str = "regmirror.io/config-digest";
/// The user the cache runs as (distroless's nonroot).
const RUN_AS: i64 = 65532;

/// The annotation on a cache's objects naming its RegistryMirror.
pub const MIRROR_ANNOTATION: &str = "regmirror.io/mirror";

/// Who a cache belongs to, and where its objects live.
pub struct Owner<'a> {
    pub mirror: &'a RegistryMirror,
    /// The objects' name ([`regmirror_core::cache::object_name`]).
    pub name: &'a str,
    pub namespace: &'a str,
}

impl Owner<'_> {
    /// No owner reference: the garbage collector would delete a cache the moment its mirror
    /// goes, while nodes still list it first; the operator deletes it once no node does.
    fn metadata(&self) -> ObjectMeta {
        let mirror = self.mirror.metadata.name.clone().unwrap_or_default();
        ObjectMeta {
            name: Some(self.name.to_owned()),
            namespace: Some(self.namespace.to_owned()),
            labels: Some(self.labels()),
            annotations: Some([(MIRROR_ANNOTATION.to_owned(), mirror)].into()),
            ..ObjectMeta::default()
        }
    }

    fn labels(&self) -> BTreeMap<String, String> {
        [
            (MIRROR_LABEL.to_owned(), self.name.to_owned()),
            (
                "app.kubernetes.io/name".to_owned(),
                "regmirror-cache".to_owned(),
            ),
            (MANAGED_BY.to_owned(), MANAGER.to_owned()),
        ]
        .into()
    }

    fn selector(&self) -> BTreeMap<String, String> {
        [(MIRROR_LABEL.to_owned(), self.name.to_owned())].into()
    }
}

/// The hex SHA-256 of an object's JSON.
pub fn digest_of(value: &impl serde::Serialize) -> String {
    hex_digest(&serde_json::to_vec(value).expect("objects serialize"))
}

/// Stamps an object's digest (of everything else) on it.
fn stamped(mut meta: ObjectMeta, digest: String) -> ObjectMeta {
    meta.annotations
        .get_or_insert_with(Default::default)
        .insert(APPLIED_DIGEST.to_owned(), digest);
    meta
}

/// The Service the nodes reach the cache by (its cluster IP: nodes do not resolve cluster
/// DNS names).
pub fn service(owner: &Owner) -> Service {
    let mut service = Service {
        metadata: owner.metadata(),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(owner.selector()),
            ports: Some(vec![ServicePort {
                name: Some("registry".to_owned()),
                port: PORT.into(),
                target_port: Some(IntOrString::Int(PORT.into())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let digest = digest_of(&service);
    service.metadata = stamped(service.metadata, digest);
    service
}

/// The Secret the cache reads: `data` as the writer made it (config, htpasswd, certificate,
/// upstream CA) and the nodes' password, with the annotations saying what its certificate is
/// for.
pub fn secret(
    owner: &Owner,
    data: BTreeMap<String, Vec<u8>>,
    annotations: BTreeMap<String, String>,
) -> Secret {
    let mut metadata = owner.metadata();
    metadata
        .annotations
        .get_or_insert_with(Default::default)
        .extend(annotations);
    Secret {
        metadata,
        type_: Some("Opaque".to_owned()),
        data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        ..Secret::default()
    }
}

/// What a cache's Secret holds besides what its upstream gives: the nodes' password (and its
/// htpasswd line) and the serving certificate and key (PEM).
pub struct Material {
    pub password: String,
    pub htpasswd: String,
    pub cert: String,
    pub key: String,
}

/// Where a cache reads its files from, stores, and serves.
pub struct Layout {
    pub config_dir: String,
    pub storage_dir: String,
    /// `host:port` to listen on.
    pub addr: String,
}

impl Layout {
    /// In the cache's pod, as [`deployment`] mounts it.
    pub fn in_pod() -> Layout {
        Layout {
            config_dir: CONFIG_DIR.to_owned(),
            storage_dir: STORAGE_DIR.to_owned(),
            addr: format!(":{PORT}"),
        }
    }
}

/// A cache's Secret data: its `config.yml` (proxying `upstream`, with its credentials), the
/// htpasswd file of the nodes' credentials, the nodes' password, the serving key pair, and
/// the upstream's CA when it has its own.
pub fn secret_data(
    upstream: &Upstream,
    material: &Material,
    layout: &Layout,
) -> Result<BTreeMap<String, Vec<u8>>, CacheError> {
    let dir = &layout.config_dir;
    let config = registry_config(
        upstream,
        &Serving {
            addr: layout.addr.clone(),
            certificate: format!("{dir}/{CERT_KEY}"),
            key: format!("{dir}/{KEY_KEY}"),
            htpasswd: Some(format!("{dir}/{HTPASSWD_KEY}")),
        },
        &layout.storage_dir,
    )?;
    let mut data: BTreeMap<String, Vec<u8>> = [
        (CONFIG_KEY, config),
        (HTPASSWD_KEY, material.htpasswd.clone()),
        (PASSWORD_KEY, material.password.clone()),
        (CERT_KEY, material.cert.clone()),
        (KEY_KEY, material.key.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_bytes()))
    .collect();
    if let Some(ca) = &upstream.ca {
        data.insert(UPSTREAM_CA_KEY.to_owned(), ca.clone().into_bytes());
    }
    Ok(data)
}

/// The Deployment running the cache: one replica of `image` reading the Secret (all of it but
/// the nodes' password), storing as the mirror's `spec.cache.storage` says. `config_digest`
/// changes with the Secret's data, so that a new configuration replaces the pod.
pub fn deployment(
    owner: &Owner,
    spec: &CacheSpec,
    image: &str,
    config_digest: &str,
    upstream_ca: bool,
) -> Deployment {
    let mut keys = vec![CONFIG_KEY, HTPASSWD_KEY, CERT_KEY, KEY_KEY];
    let mut env = Vec::new();
    if upstream_ca {
        keys.push(UPSTREAM_CA_KEY);
        // Go reads it instead of the system's roots: the upstream's CA alone is trusted.
        env.push(EnvVar {
            name: "SSL_CERT_FILE".to_owned(),
            value: Some(format!("{CONFIG_DIR}/{UPSTREAM_CA_KEY}")),
            ..EnvVar::default()
        });
    }
    let storage = spec.storage.clone().unwrap_or_default();
    let storage_volume = match (&storage.persistent_volume_claim, &storage.empty_dir) {
        (Some(claim), _) => Volume {
            name: "storage".to_owned(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.claim_name.clone(),
                read_only: None,
            }),
            ..Volume::default()
        },
        (None, empty_dir) => Volume {
            name: "storage".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: empty_dir
                    .as_ref()
                    .and_then(|e| e.size_limit.clone())
                    .map(Quantity),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
    };
    let mut template_meta = ObjectMeta {
        labels: Some(owner.labels()),
        annotations: Some([(CONFIG_DIGEST.to_owned(), config_digest.to_owned())].into()),
        ..ObjectMeta::default()
    };
    template_meta.name = None;
    let container = Container {
        name: "registry".to_owned(),
        image: Some(image.to_owned()),
        args: Some(vec![
            "serve".to_owned(),
            format!("{CONFIG_DIR}/{CONFIG_KEY}"),
        ]),
        env: (!env.is_empty()).then_some(env),
        ports: Some(vec![ContainerPort {
            name: Some("registry".to_owned()),
            container_port: PORT.into(),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(PORT.into()),
                host: None,
            }),
            period_seconds: Some(10),
            ..Probe::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(
                [
                    ("cpu".to_owned(), Quantity("50m".to_owned())),
                    ("memory".to_owned(), Quantity("64Mi".to_owned())),
                ]
                .into(),
            ),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config".to_owned(),
                mount_path: CONFIG_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "storage".to_owned(),
                mount_path: STORAGE_DIR.to_owned(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let mut deployment = Deployment {
        metadata: owner.metadata(),
        spec: DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(owner.selector()),
                match_expressions: None,
            },
            // A ReadWriteOnce claim cannot be mounted by two pods at once.
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".to_owned()),
                rolling_update: None,
            }),
            template: PodTemplateSpec {
                metadata: Some(template_meta),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        fs_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            localhost_profile: None,
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(vec![
                        Volume {
                            name: "config".to_owned(),
                            secret: Some(SecretVolumeSource {
                                secret_name: Some(owner.name.to_owned()),
                                // Readable by the cache's group only (fsGroup).
                                default_mode: Some(0o440),
                                items: Some(
                                    keys.into_iter()
                                        .map(|k| KeyToPath {
                                            key: k.to_owned(),
                                            path: k.to_owned(),
                                            ..KeyToPath::default()
                                        })
                                        .collect(),
                                ),
                                ..SecretVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                        storage_volume,
                    ]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    };
    let digest = digest_of(&deployment);
    deployment.metadata = stamped(deployment.metadata, digest);
    deployment
}
