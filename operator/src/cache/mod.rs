//! The pull-through caches RegistryMirrors ask for (`spec.cache`): what the operator knows of
//! the ones running (from its watches), where the nodes find them (a [`CacheSite`] per mirror,
//! which `resolve` puts before the mirror's endpoints), and bringing their objects to what the
//! mirrors ask ([`ensure`]).
//!
//! A cache is a Deployment of the distribution registry in proxy mode, a ClusterIP Service and
//! a Secret, in the caches' namespace (its own, which the chart labels for Pod Security
//! `restricted`: the operator's right to make Deployments reaches no further). Its TLS
//! certificate is issued for the Service's cluster IP by a CA the operator creates once, or
//! finds there (Secret [`CA_SECRET`]); the nodes get that CA and a password of their own for
//! the cache with their config, like any endpoint's.
//!
//! The order of a first start: the Service (which gives the cluster IP), then the Secret (the
//! certificate for that IP), then the Deployment. Until the Secret holds a certificate for the
//! Service's address, the mirror's nodes keep the configuration they have (`CacheStarting`).
//! A cache no mirror asks for any more is deleted only once no node's configuration lists it,
//! so that no node is left trying an address nothing answers.

pub mod keys;
pub mod objects;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use regmirror_core::api::RegistryMirror;
use regmirror_core::cache::{
    hex_digest, htpasswd_entry, object_name, site_url, CacheSite, CA_SECRET, MIRROR_LABEL, USERNAME,
};
use regmirror_core::contract::{is_config_name, MANAGED_BY, MANAGER};
use regmirror_core::decide::is_paused;
use regmirror_core::decide::NodeView;
use regmirror_core::model::Credentials;
use regmirror_core::render::RenderedConfig;
use regmirror_core::resolve::cache_upstream;
use regmirror_core::sources::{RefPolicy, Sources};
use serde_json::json;

use self::keys::CaKeys;
use self::objects::{
    Owner, APPLIED_DIGEST, CERT_ADDRESS, CERT_CA, CERT_KEY, CERT_NOT_AFTER, HTPASSWD_KEY, KEY_KEY,
    PASSWORD_KEY,
};

/// A cache Secret's data and annotations, as read back. Debug shows keys only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct LiveSecret {
    pub data: BTreeMap<String, Vec<u8>>,
    pub annotations: BTreeMap<String, String>,
}

impl std::fmt::Debug for LiveSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSecret")
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .field("annotations", &self.annotations)
            .finish()
    }
}

impl LiveSecret {
    fn text(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }
}

/// One cache's objects as the watches see them (by the objects' name).
#[derive(Debug, Clone, Default)]
pub struct LiveCache {
    /// The Service's cluster IP (once it has one) and applied digest.
    pub service: Option<(Option<String>, Option<String>)>,
    pub secret: Option<LiveSecret>,
    /// The Deployment's applied digest.
    pub deployment: Option<Option<String>>,
}

/// Every cache's objects, and the CA.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub ca: Option<CaKeys>,
    pub caches: BTreeMap<String, LiveCache>,
}

fn applied_digest(meta: &kube::api::ObjectMeta) -> Option<String> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(APPLIED_DIGEST))
        .cloned()
}

fn cache_label(meta: &kube::api::ObjectMeta) -> Option<&str> {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(MIRROR_LABEL))
        .map(String::as_str)
}

/// Whether a Secret of the operator's namespace is the caches' (the CA, or a cache's own):
/// never a source a mirror may reference.
pub fn is_cache_secret(secret: &Secret) -> bool {
    secret.metadata.name.as_deref() == Some(CA_SECRET) || cache_label(&secret.metadata).is_some()
}

/// The name of a cache object the operator made: labelled managed by regmirror, and with its
/// own name in [`MIRROR_LABEL`]. Nothing else is taken for a cache, nor ever deleted as one.
fn own(meta: &kube::api::ObjectMeta) -> Option<String> {
    let name = meta.name.as_deref()?;
    (managed(meta) && cache_label(meta) == Some(name)).then(|| name.to_owned())
}

/// Whether an object carries the label the operator's watches of the caches' namespace select.
fn managed(meta: &kube::api::ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY))
        .is_some_and(|v| v == MANAGER)
}

impl Live {
    /// Takes in a Service of a cache.
    pub fn add_service(&mut self, service: &Service) {
        if let Some(name) = own(&service.metadata) {
            let ip = service
                .spec
                .as_ref()
                .and_then(|s| s.cluster_ip.clone())
                .filter(|ip| ip.parse::<IpAddr>().is_ok());
            self.caches.entry(name).or_default().service =
                Some((ip, applied_digest(&service.metadata)));
        }
    }

    /// Takes in a Deployment of a cache.
    pub fn add_deployment(&mut self, deployment: &Deployment) {
        if let Some(name) = own(&deployment.metadata) {
            self.caches.entry(name).or_default().deployment =
                Some(applied_digest(&deployment.metadata));
        }
    }

    /// Takes in a Secret that [`is_cache_secret`]: the CA, or a cache's.
    pub fn add_secret(&mut self, secret: &Secret) {
        let data: BTreeMap<String, Vec<u8>> = secret
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect();
        if secret.metadata.name.as_deref() == Some(CA_SECRET) {
            let text = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.clone()).ok());
            if let (Some(cert), Some(key)) = (text("tls.crt"), text("tls.key")) {
                self.ca = Some(CaKeys { cert, key });
            }
        } else if let Some(name) = own(&secret.metadata) {
            self.caches.entry(name).or_default().secret = Some(LiveSecret {
                data,
                annotations: secret.metadata.annotations.clone().unwrap_or_default(),
            });
        }
    }

    /// Where the nodes find each mirror's cache that is ready for them: a Service with a
    /// cluster IP, and a Secret with a certificate for that IP from the current CA and the
    /// nodes' password.
    pub fn sites(&self, mirrors: &[RegistryMirror], namespace: &str) -> Vec<(String, CacheSite)> {
        let Some(ca) = &self.ca else {
            return Vec::new();
        };
        let ca_digest = hex_digest(ca.cert.as_bytes());
        mirrors
            .iter()
            .filter(|m| m.spec.cache.is_some())
            .filter_map(|mirror| {
                let mirror = mirror.metadata.name.clone()?;
                let name = object_name(&mirror);
                let cache = self.caches.get(&name)?;
                let ip = cache.service.as_ref()?.0.as_deref()?;
                let secret = cache.secret.as_ref()?;
                if !certificate_fits(secret, ip, &ca_digest, 0) {
                    return None;
                }
                let password = secret.text(PASSWORD_KEY)?;
                Some((
                    mirror,
                    CacheSite {
                        url: site_url(ip),
                        ca: ca.cert.clone(),
                        credentials: Credentials::Basic {
                            username: USERNAME.to_owned(),
                            password: password.to_owned(),
                        },
                        secret: format!("{namespace}/{name}"),
                    },
                ))
            })
            .collect()
    }
}

/// Whether a cache Secret's certificate is for `ip`, from the CA of digest `ca_digest`, and
/// valid beyond `renew_after` (seconds since the epoch; 0 to skip the check).
fn certificate_fits(secret: &LiveSecret, ip: &str, ca_digest: &str, renew_after: u64) -> bool {
    let annotation = |key| secret.annotations.get(key).map(String::as_str);
    let valid = annotation(CERT_NOT_AFTER)
        .and_then(|t| t.parse::<u64>().ok())
        .is_some_and(|end| end > renew_after);
    annotation(CERT_ADDRESS) == Some(ip)
        && annotation(CERT_CA) == Some(ca_digest)
        && valid
        && secret.text(CERT_KEY).is_some()
        && secret.text(KEY_KEY).is_some()
}

/// The caches some node still lists, so not to be deleted: those a config that a node is told
/// (`desired`) or reports running (`current`) names, read through `config`. A config a node is
/// told that cannot be read (written in the last pass, not yet brought by the watch) may list
/// any cache: then every cache counts as listed. What an agent reports it runs counts when it
/// is a config the operator knows (as for the configs it keeps).
pub fn in_use<'c>(
    live: &Live,
    nodes: &[NodeView],
    config: impl Fn(&str) -> Option<&'c RenderedConfig>,
) -> BTreeSet<String> {
    let mut configs = Vec::new();
    for node in nodes {
        if let Some(told) = node.desired.as_deref().filter(|c| is_config_name(c)) {
            match config(told) {
                Some(c) => configs.push(c),
                None => {
                    if !live.caches.is_empty() {
                        tracing::info!(node = %node.name, config = told, "a config this node is told is not read yet: no cache is deleted in this pass");
                    }
                    return live.caches.keys().cloned().collect();
                }
            }
        }
        configs.extend(node.current.as_deref().and_then(&config));
    }
    listed_by(live, configs)
}

/// The caches whose address one of `configs` names.
fn listed_by<'c>(
    live: &Live,
    configs: impl IntoIterator<Item = &'c RenderedConfig>,
) -> BTreeSet<String> {
    let configs: Vec<&RenderedConfig> = configs.into_iter().collect();
    live.caches
        .iter()
        .filter_map(|(name, cache)| {
            let ip = cache.service.as_ref()?.0.as_deref()?;
            let address = site_url(ip);
            let address = address.trim_start_matches("https://");
            configs
                .iter()
                .any(|c| c.files.values().any(|f| f.content.contains(address)))
                .then(|| name.clone())
        })
        .collect()
}

/// Why a cache's objects could not be brought to what its mirror asks.
#[derive(Debug, thiserror::Error)]
pub enum CacheWriteError {
    #[error("Secret {secret} holds no CA the operator can issue with: {why}; put a CA certificate and its own key there (tls.crt, tls.key), or delete it and the operator makes one")]
    UnusableCa { secret: String, why: &'static str },
    #[error("{action}: {source}")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("{action}: no answer in time")]
    Timeout { action: String },
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
}

/// What [`ensure`] needs besides the caches' state.
pub struct Context<'a> {
    pub client: &'a kube::Client,
    /// The caches' namespace.
    pub namespace: &'a str,
    /// The distribution registry image the caches run.
    pub image: &'a str,
    pub sources: &'a Sources,
    pub policy: &'a RefPolicy,
    pub field_manager: &'a str,
    pub timeout: std::time::Duration,
}

impl Context<'_> {
    async fn call<T>(
        &self,
        action: impl FnOnce() -> String,
        call: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, CacheWriteError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(CacheWriteError::Api {
                action: action(),
                source,
            }),
            Err(_) => Err(CacheWriteError::Timeout { action: action() }),
        }
    }

    async fn apply<K>(&self, object: &K) -> Result<K, CacheWriteError>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + serde::Serialize
            + serde::de::DeserializeOwned
            + Clone
            + std::fmt::Debug,
    {
        let name = object.meta().name.clone().unwrap_or_default();
        let mut body = serde_json::to_value(object).expect("objects serialize");
        body["apiVersion"] = json!(K::api_version(&()));
        body["kind"] = json!(K::kind(&()));
        let api: Api<K> = Api::namespaced(self.client.clone(), self.namespace);
        tracing::info!(kind = %K::kind(&()), name = %name, "applying cache object");
        let params = PatchParams::apply(self.field_manager).force();
        self.call(
            || format!("apply {} {}/{name}", K::kind(&()), self.namespace),
            api.patch(&name, &params, &Patch::Apply(&body)),
        )
        .await
    }

    async fn delete<K>(&self, name: &str) -> Result<(), CacheWriteError>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + serde::de::DeserializeOwned
            + Clone
            + std::fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), self.namespace);
        tracing::info!(kind = %K::kind(&()), name = %name, "deleting cache object");
        match self
            .call(
                || format!("delete {} {}/{name}", K::kind(&()), self.namespace),
                api.delete(name, &DeleteParams::background()),
            )
            .await
        {
            Err(CacheWriteError::Api {
                source: kube::Error::Api(e),
                ..
            }) if e.code == 404 => Ok(()),
            other => other.map(drop),
        }
    }
}

/// A failure of [`ensure`], and what it concerns.
pub struct Failure {
    pub concerns: Concerns,
    pub error: CacheWriteError,
}

/// What a failure of [`ensure`] stands in the way of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Concerns {
    /// The cache of this RegistryMirror.
    Mirror(String),
    /// Every cache (the CA).
    EveryCache,
    /// Deleting the objects of this cache, which no mirror asks for any more: nobody's status.
    Leftover(String),
}

/// Brings every cache to what the mirrors ask: finds or creates the CA first, applies
/// what differs of each cache's objects (a paused mirror's cache is left as it is), and deletes
/// the objects of caches no mirror asks for any more once none of `in_use` (see [`in_use`]).
/// Every cache is tried; the failures come back.
pub async fn ensure(
    cx: &Context<'_>,
    mirrors: &[RegistryMirror],
    live: &Live,
    in_use: &BTreeSet<String>,
) -> Vec<Failure> {
    let wanted: Vec<(&RegistryMirror, String, String)> = mirrors
        .iter()
        .filter(|m| m.spec.cache.is_some())
        .filter_map(|m| {
            let mirror = m.metadata.name.clone()?;
            let name = object_name(&mirror);
            Some((m, mirror, name))
        })
        .collect();
    let mut failures = Vec::new();
    let ca = match &live.ca {
        _ if wanted.is_empty() => None,
        Some(ca) => match keys::check_ca(ca) {
            Ok(()) => Some(ca.clone()),
            Err(why) => {
                failures.push(Failure {
                    concerns: Concerns::EveryCache,
                    error: CacheWriteError::UnusableCa {
                        secret: format!("{}/{CA_SECRET}", cx.namespace),
                        why,
                    },
                });
                None
            }
        },
        None => match find_or_create_ca(cx).await {
            Ok(ca) => Some(ca),
            Err(error) => {
                failures.push(Failure {
                    concerns: Concerns::EveryCache,
                    error,
                });
                None
            }
        },
    };
    if let Some(ca) = &ca {
        for (mirror, mirror_name, name) in &wanted {
            if is_paused(mirror) {
                continue;
            }
            let cache = live.caches.get(name).cloned().unwrap_or_default();
            if let Err(error) = ensure_one(cx, mirror, name, &cache, ca).await {
                failures.push(Failure {
                    concerns: Concerns::Mirror(mirror_name.clone()),
                    error,
                });
            }
        }
    }
    let wanted: BTreeSet<&String> = wanted.iter().map(|(_, _, name)| name).collect();
    for (name, cache) in &live.caches {
        if wanted.contains(name) || in_use.contains(name) {
            continue;
        }
        let result = async {
            if cache.deployment.is_some() {
                cx.delete::<Deployment>(name).await?;
            }
            if cache.service.is_some() {
                cx.delete::<Service>(name).await?;
            }
            if cache.secret.is_some() {
                cx.delete::<Secret>(name).await?;
            }
            Ok::<(), CacheWriteError>(())
        };
        if let Err(error) = result.await {
            failures.push(Failure {
                concerns: Concerns::Leftover(name.clone()),
                error,
            });
        }
    }
    failures
}

/// The caches' CA when the watch has not brought one: a new one, or the one already in
/// [`CA_SECRET`] (the watch's yet to come, or one a person put there) if it can issue.
async fn find_or_create_ca(cx: &Context<'_>) -> Result<CaKeys, CacheWriteError> {
    let ca = keys::new_ca()?;
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(CA_SECRET.to_owned()),
            namespace: Some(cx.namespace.to_owned()),
            labels: Some([(MANAGED_BY.to_owned(), MANAGER.to_owned())].into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        string_data: Some(
            [
                ("tls.crt".to_owned(), ca.cert.clone()),
                ("tls.key".to_owned(), ca.key.clone()),
            ]
            .into(),
        ),
        ..Default::default()
    };
    let api: Api<Secret> = Api::namespaced(cx.client.clone(), cx.namespace);
    let action = || format!("create Secret {}/{CA_SECRET}", cx.namespace);
    match cx
        .call(action, api.create(&PostParams::default(), &secret))
        .await
    {
        Ok(_) => {
            tracing::info!(
                secret = CA_SECRET,
                namespace = cx.namespace,
                "created the caches' CA"
            );
            Ok(ca)
        }
        Err(CacheWriteError::Api {
            source: kube::Error::Api(e),
            ..
        }) if e.code == 409 => {
            let existing = cx
                .call(
                    || format!("get Secret {}/{CA_SECRET}", cx.namespace),
                    api.get(CA_SECRET),
                )
                .await?;
            let mut read = Live::default();
            read.add_secret(&existing);
            let unusable = |why| CacheWriteError::UnusableCa {
                secret: format!("{}/{CA_SECRET}", cx.namespace),
                why,
            };
            let ca = read
                .ca
                .ok_or_else(|| unusable("it has no tls.crt and tls.key"))?;
            keys::check_ca(&ca).map_err(unusable)?;
            Ok(ca)
        }
        Err(error) => Err(error),
    }
}

/// One cache: Service, then (once it has an address) Secret, then Deployment — each applied
/// only when it differs from what was applied before.
async fn ensure_one(
    cx: &Context<'_>,
    mirror: &RegistryMirror,
    name: &str,
    live: &LiveCache,
    ca: &CaKeys,
) -> Result<(), CacheWriteError> {
    let Ok(upstream) = cache_upstream(mirror, cx.sources, cx.policy) else {
        // The mirror's status says why; nothing to run until it is fixed.
        return Ok(());
    };
    let owner = Owner {
        mirror,
        name,
        namespace: cx.namespace,
    };
    let service = objects::service(&owner);
    let mut ip = live.service.as_ref().and_then(|(ip, _)| ip.clone());
    if live.service.as_ref().map(|(_, d)| d) != Some(&applied_digest(&service.metadata)) {
        let applied = cx.apply(&service).await?;
        ip = applied
            .spec
            .and_then(|s| s.cluster_ip)
            .filter(|ip| ip.parse::<IpAddr>().is_ok());
    }
    let Some(ip) = ip else {
        return Ok(());
    };

    // A Secret the watch has not brought yet is read, not made again: new keys would restart
    // the cache and move every node.
    let before = match &live.secret {
        Some(secret) => secret.clone(),
        None => {
            let api: Api<Secret> = Api::namespaced(cx.client.clone(), cx.namespace);
            let found = cx
                .call(
                    || format!("get Secret {}/{name}", cx.namespace),
                    api.get_opt(name),
                )
                .await?;
            let mut read = Live::default();
            if let Some(secret) = &found {
                read.add_secret(secret);
            }
            read.caches
                .remove(name)
                .and_then(|c| c.secret)
                .unwrap_or_default()
        }
    };
    let (password, htpasswd) = match (before.text(PASSWORD_KEY), before.text(HTPASSWD_KEY)) {
        (Some(p), Some(h)) => (p.to_owned(), h.to_owned()),
        _ => {
            let password = keys::new_password();
            let htpasswd = htpasswd_entry(USERNAME, &password, keys::new_salt());
            (password, htpasswd)
        }
    };
    let ca_digest = hex_digest(ca.cert.as_bytes());
    let renew_after = keys::now_secs() + keys::RENEW_BEFORE.as_secs();
    let (cert, key, not_after) = match (
        certificate_fits(&before, &ip, &ca_digest, renew_after),
        before.text(CERT_KEY),
        before.text(KEY_KEY),
    ) {
        (true, Some(cert), Some(key)) => (
            cert.to_owned(),
            key.to_owned(),
            before.annotations[CERT_NOT_AFTER].clone(),
        ),
        _ => {
            let dns = vec![
                name.to_owned(),
                format!("{name}.{}.svc", cx.namespace),
                format!("{name}.{}.svc.cluster.local", cx.namespace),
            ];
            let serving = keys::issue_serving(
                ca,
                &format!("{}/{CA_SECRET}", cx.namespace),
                ip.parse().expect("checked to be an IP address"),
                &dns,
            )?;
            (serving.cert, serving.key, serving.not_after.to_string())
        }
    };
    let material = objects::Material {
        password,
        htpasswd,
        cert,
        key,
    };
    let data = objects::secret_data(&upstream, &material, &objects::Layout::in_pod())
        .expect("cache_upstream checked the upstream");
    let annotations: BTreeMap<String, String> = [
        (CERT_ADDRESS, ip.clone()),
        (CERT_CA, ca_digest),
        (CERT_NOT_AFTER, not_after),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let config_digest = objects::digest_of(&data);
    let unchanged = before.data == data
        && annotations
            .iter()
            .all(|(k, v)| before.annotations.get(k) == Some(v));
    if !unchanged {
        cx.apply(&objects::secret(&owner, data, annotations))
            .await?;
    }

    let spec = mirror.spec.cache.clone().unwrap_or_default();
    let deployment = objects::deployment(
        &owner,
        &spec,
        cx.image,
        &config_digest,
        upstream.ca.is_some(),
    );
    if live.deployment.as_ref() != Some(&applied_digest(&deployment.metadata)) {
        cx.apply(&deployment).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use regmirror_core::api::{CacheSpec, Endpoint, RegistryMirrorSpec};

    fn mirror(name: &str, cache: bool) -> RegistryMirror {
        RegistryMirror::new(
            name,
            RegistryMirrorSpec {
                registry: "docker.io".into(),
                endpoints: vec![Endpoint {
                    url: "https://registry-1.docker.io".into(),
                    auth: None,
                    tls: None,
                }],
                cache: cache.then(CacheSpec::default),
                embedded_registry: false,
                rewrites: vec![],
                node_selector: None,
            },
        )
    }

    fn ca() -> CaKeys {
        CaKeys {
            cert: "CA CERT".into(),
            key: "CA KEY".into(),
        }
    }

    /// The live objects of `mirror`'s cache: a Service at `ip`, a Secret whose certificate is
    /// for `issued_for` from `issuer`.
    fn live(mirror: &str, ip: &str, issued_for: &str, issuer: &CaKeys) -> Live {
        let name = object_name(mirror);
        let owner = Owner {
            mirror: &self::tests::mirror(mirror, true),
            name: &name,
            namespace: "ns",
        };
        let mut service = objects::service(&owner);
        service.spec.as_mut().unwrap().cluster_ip = Some(ip.into());
        let secret = objects::secret(
            &owner,
            [
                (PASSWORD_KEY.to_owned(), b"node-pass".to_vec()),
                (CERT_KEY.to_owned(), b"CERT".to_vec()),
                (KEY_KEY.to_owned(), b"KEY".to_vec()),
            ]
            .into(),
            [
                (CERT_ADDRESS.to_owned(), issued_for.to_owned()),
                (CERT_CA.to_owned(), hex_digest(issuer.cert.as_bytes())),
                (CERT_NOT_AFTER.to_owned(), u64::MAX.to_string()),
            ]
            .into(),
        );
        let mut live = Live {
            ca: Some(ca()),
            ..Live::default()
        };
        live.add_service(&service);
        live.add_secret(&secret);
        live
    }

    #[test]
    fn a_cache_is_a_site_once_its_certificate_is_for_its_address_from_the_current_ca() {
        let mirrors = [mirror("hub", true), mirror("plain", false)];
        let sites = live("hub", "10.43.0.9", "10.43.0.9", &ca()).sites(&mirrors, "ns");
        assert_eq!(sites.len(), 1, "{sites:?}");
        let (name, site) = &sites[0];
        assert_eq!(name, "hub");
        assert_eq!(site.url, "https://10.43.0.9:5000");
        assert_eq!(site.ca, "CA CERT");
        assert_eq!(site.secret, format!("ns/{}", object_name("hub")));
        assert_eq!(
            site.credentials,
            Credentials::Basic {
                username: USERNAME.into(),
                password: "node-pass".into()
            }
        );

        // A certificate for the Service's previous address, or from another CA: not yet.
        let moved = live("hub", "10.43.0.10", "10.43.0.9", &ca());
        assert!(moved.sites(&mirrors, "ns").is_empty());
        let other_ca = CaKeys {
            cert: "OLD CA".into(),
            key: "k".into(),
        };
        assert!(live("hub", "10.43.0.9", "10.43.0.9", &other_ca)
            .sites(&mirrors, "ns")
            .is_empty());
        // No CA at all, or the mirror no longer asking: none.
        let mut no_ca = live("hub", "10.43.0.9", "10.43.0.9", &ca());
        no_ca.ca = None;
        assert!(no_ca.sites(&mirrors, "ns").is_empty());
        assert!(live("hub", "10.43.0.9", "10.43.0.9", &ca())
            .sites(&[mirror("hub", false)], "ns")
            .is_empty());
        // IPv6 cluster IPs in brackets.
        let v6 = live("hub", "fd00::9", "fd00::9", &ca()).sites(&mirrors, "ns");
        assert_eq!(v6[0].1.url, "https://[fd00::9]:5000");
    }

    #[test]
    fn objects_not_labelled_with_their_own_name_are_not_a_cache() {
        let name = object_name("hub");
        let owner = Owner {
            mirror: &mirror("hub", true),
            name: &name,
            namespace: "ns",
        };
        let mut service = objects::service(&owner);
        service
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(MIRROR_LABEL.into(), "someone-else".into());
        let mut live = Live::default();
        live.add_service(&service);
        assert!(live.caches.is_empty());
        // Nor one without the label saying regmirror made it: never deleted as a cache.
        let mut service = objects::service(&owner);
        service.metadata.labels.as_mut().unwrap().remove(MANAGED_BY);
        live.add_service(&service);
        assert!(live.caches.is_empty());
        live.add_service(&objects::service(&owner));
        assert_eq!(live.caches.keys().collect::<Vec<_>>(), [&name]);
        assert!(is_cache_secret(&objects::secret(
            &owner,
            BTreeMap::new(),
            BTreeMap::new()
        )));
    }

    #[test]
    fn a_cache_secret_never_shows_its_values_in_debug() {
        let secret = LiveSecret {
            data: [(PASSWORD_KEY.to_owned(), b"node-pass".to_vec())].into(),
            annotations: BTreeMap::new(),
        };
        let keys = CaKeys {
            cert: "CERT".into(),
            key: "PRIVATE".into(),
        };
        let shown = format!("{secret:?} {keys:?}");
        assert!(
            !shown.contains("node-pass") && !shown.contains("PRIVATE"),
            "{shown}"
        );
    }

    /// A node config with one hosts.toml listing `hosts`.
    fn config_listing(hosts: &[&str]) -> RenderedConfig {
        let content: String = hosts
            .iter()
            .map(|h| format!("[host.\"https://{h}/v2\"]\n"))
            .collect();
        serde_json::from_value(json!({
            "flavor": "containerd",
            "files": {"/etc/containerd/certs.d/docker.io/hosts.toml": {"mode": 0o644, "content": content}},
            "restartKey": "k",
        }))
        .unwrap()
    }

    #[test]
    fn a_cache_is_in_use_while_a_config_lists_its_address() {
        let mut live = live("hub", "10.43.0.9", "10.43.0.9", &ca());
        live.caches
            .extend(self::tests::live("v6", "fd00::12", "fd00::12", &ca()).caches);
        let hub = object_name("hub");
        let v6 = object_name("v6");
        let used = |live: &Live, configs: &[RenderedConfig]| listed_by(live, configs.iter());
        assert!(used(&live, &[]).is_empty());
        assert_eq!(
            used(
                &live,
                &[config_listing(&["10.43.0.9:5000", "upstream.example"])]
            ),
            [hub.clone()].into()
        );
        assert_eq!(
            used(
                &live,
                &[
                    config_listing(&["upstream.example"]),
                    config_listing(&["[fd00::12]:5000"]),
                ]
            ),
            [v6.clone()].into()
        );
        // Another port, or an address that merely starts the same, is another endpoint.
        let others = config_listing(&["10.43.0.9:5001", "10.43.0.91:5000"]);
        assert!(used(&live, &[others]).is_empty());
        // A cache whose Service has no address yet is listed by no config.
        live.caches.get_mut(&hub).unwrap().service = Some((None, None));
        let both = config_listing(&["10.43.0.9:5000", "[fd00::12]:5000"]);
        assert_eq!(used(&live, &[both]), [v6].into());
    }

    #[test]
    fn a_cache_stays_while_a_node_runs_or_is_told_a_config_listing_it_or_one_not_read_yet() {
        let live = live("hub", "10.43.0.9", "10.43.0.9", &ca());
        let hub = object_name("hub");
        let with = config_listing(&["10.43.0.9:5000", "upstream.example"]);
        let without = config_listing(&["upstream.example"]);
        let name = |n: u8| format!("regmirror-config-{}", format!("{n:x}").repeat(20));
        let stored: BTreeMap<String, &RenderedConfig> =
            [(name(1), &with), (name(2), &without)].into();
        let config = |c: &str| stored.get(c).copied();
        let node = |desired: Option<String>, current: Option<String>| NodeView {
            name: "n1".into(),
            desired,
            current,
            ..NodeView::default()
        };
        let used = |nodes: &[NodeView]| in_use(&live, nodes, config);
        assert_eq!(
            used(&[node(Some(name(2)), Some(name(1)))]),
            [hub.clone()].into()
        );
        assert_eq!(used(&[node(Some(name(1)), None)]), [hub.clone()].into());
        assert!(used(&[node(Some(name(2)), Some(name(2)))]).is_empty());
        // An agent's report of a config the operator does not know is no config.
        assert!(used(&[node(Some(name(2)), Some("whatever".into()))]).is_empty());
        // A config a node is told that is not read yet may list any cache.
        assert_eq!(
            used(&[node(Some(name(2)), None), node(Some(name(3)), None)]),
            [hub].into()
        );
    }
}
