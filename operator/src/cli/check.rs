//! What `render` and `validate` share: read the manifests, check every RegistryMirror against
//! the CRD's CEL rules and resolve its references, and say what is wrong where.

use std::collections::BTreeMap;
use std::fmt;

use regmirror_core::api::RegistryMirror;
use regmirror_core::cache::{object_name, site_url, CacheSite, CA_SECRET, USERNAME};
use regmirror_core::model::Credentials;
use regmirror_core::model::ResolvedMirror;
use regmirror_core::resolve::resolve_partially;
use regmirror_core::sources::{RefPolicy, SourceKind, Sources};

use super::InputArgs;
use crate::manifests::{self, Origin};

/// One problem, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file (and document) it is in, when it comes from one.
    pub origin: Option<Origin>,
    /// `RegistryMirror/<name>`, when it concerns one.
    pub object: Option<String>,
    /// The field and the reason.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(origin) = &self.origin {
            write!(f, "{origin}: ")?;
        }
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// The outcome of checking a set of manifests.
#[derive(Debug, Default)]
pub struct Checked {
    /// The RegistryMirrors that are valid, resolved.
    pub resolved: Vec<ResolvedMirror>,
    /// Where each mirror came from, by name (valid or not).
    pub origins: BTreeMap<String, Origin>,
    /// What resolved of the mirrors with problems: enough to check what each flavor can
    /// express of them too, so that one problem does not hide another. Never rendered.
    pub partial: Vec<ResolvedMirror>,
    pub problems: Vec<Problem>,
    /// What a person should know of what was rendered (caches shown with placeholders).
    pub notes: Vec<String>,
}

/// Reads and checks the manifests named by `args`.
pub fn check(args: &InputArgs) -> Checked {
    let loaded = manifests::load(&args.paths, &args.namespace);
    let policy = RefPolicy {
        operator_namespace: args.namespace.clone(),
        allowed_namespaces: args.allowed_namespaces.clone(),
    };
    let mut checked = Checked {
        problems: loaded
            .errors
            .iter()
            .map(|e| Problem {
                origin: None,
                object: None,
                message: e.to_string(),
            })
            .collect(),
        ..Checked::default()
    };

    let mut sources = loaded.sources.clone();
    let mirrors: Vec<&RegistryMirror> = loaded.mirrors.iter().map(|l| &l.mirror).collect();
    match check_cache_addresses(args, &mirrors)
        .and_then(|()| offline_caches(args, &mirrors, &mut sources))
    {
        Ok(notes) => checked.notes = notes,
        Err(message) => checked.problems.push(Problem {
            origin: None,
            object: None,
            message,
        }),
    }

    for manifests::LoadedMirror { origin, mirror } in &loaded.mirrors {
        let name = mirror.metadata.name.clone().unwrap_or_default();
        let mut problem = |message: String| {
            checked.problems.push(Problem {
                origin: Some(origin.clone()),
                object: Some(format!("RegistryMirror/{name}")),
                message,
            })
        };
        if name.is_empty() {
            problem("metadata.name: required".into());
            continue;
        }
        if let Some(first) = checked.origins.get(&name) {
            problem(format!(
                "metadata.name: RegistryMirror {name:?} is also defined in {first}"
            ));
            continue;
        }

        // The CRD's CEL rules, as the API server would apply them at `kubectl apply`.
        let mut schema_fields = Vec::new();
        let mut schema_messages = Vec::new();
        if let Err(errors) = mirror.validate_cel() {
            for e in errors.iter() {
                schema_fields.push(e.field_path.clone());
                schema_messages.push(e.message.clone());
                problem(format!("{}: {}", e.field_path, e.message));
            }
        }
        let (resolved, errors) = resolve_partially(mirror, &sources, &policy);
        // The same field may fail both the CEL rule and resolution, and a spec-level rule may
        // say what resolution says of one field: say it once.
        let said = |e: &regmirror_core::problem::FieldError| {
            schema_fields.contains(&e.field) || schema_messages.contains(&e.reason.to_string())
        };
        for e in errors.iter().filter(|e| !said(e)) {
            problem(e.to_string());
        }
        checked.origins.insert(name, origin.clone());
        if schema_fields.is_empty() && errors.is_empty() {
            checked.resolved.push(resolved);
        } else {
            checked.partial.push(resolved);
        }
    }
    checked
}

/// Where the caches the mirrors ask for are, for those `sources` does not know yet, as far as
/// is known offline: the addresses and CA given, or else the Service's name and placeholders
/// (said in the notes). The nodes' password is the operator's own, never known offline.
pub fn offline_caches(
    args: &InputArgs,
    mirrors: &[&RegistryMirror],
    sources: &mut Sources,
) -> Result<Vec<String>, String> {
    let CacheAddresses { everyone, each } = CacheAddresses::of(args);
    let ca_secret = || {
        sources
            .get(SourceKind::Secret, &args.cache_namespace, CA_SECRET)
            .and_then(|s| s.data.get("tls.crt"))
            .and_then(|pem| String::from_utf8(pem.clone()).ok())
    };
    let (ca, ca_known) = match &args.cache_ca {
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| format!("--cache-ca {}: {e}", path.display()))?,
            true,
        ),
        None => match ca_secret() {
            Some(pem) => (pem, true),
            None => (
                format!("# The caches' CA: key tls.crt of Secret {}/{CA_SECRET} (pass --cache-ca to show it).\n", args.cache_namespace),
                false,
            ),
        },
    };
    let mut notes = Vec::new();
    for mirror in mirrors {
        let Some(name) = mirror.metadata.name.as_deref() else {
            continue;
        };
        if mirror.spec.cache.is_none() || sources.cache(name).is_some() {
            continue;
        }
        let service = object_name(name);
        let address = each.get(name).or(everyone.as_ref()).cloned();
        if address.is_none() {
            notes.push(format!("RegistryMirror/{name}: its cache is shown at its Service's name; nodes reach it at the Service's cluster IP (pass --cache-address {name}=<kubectl get service -n {} {service} -o jsonpath='{{.spec.clusterIP}}'>)", args.cache_namespace));
        }
        if !ca_known {
            notes.push(format!(
                "RegistryMirror/{name}: the cache's CA file holds a placeholder (pass --cache-ca)"
            ));
        }
        notes.push(format!("RegistryMirror/{name}: the nodes' password for the cache is the operator's (key password of Secret {}/{service}), shown as a placeholder", args.cache_namespace));
        let address = address.unwrap_or_else(|| format!("{service}.{}.svc", args.cache_namespace));
        sources.insert_cache(
            name,
            CacheSite {
                url: site_url(&address),
                ca: ca.clone(),
                credentials: Credentials::Basic {
                    username: USERNAME.to_owned(),
                    password: format!(
                        "<the operator's: key password of Secret {}/{service}>",
                        args.cache_namespace
                    ),
                },
                secret: format!("{}/{service}", args.cache_namespace),
            },
        );
    }
    Ok(notes)
}

/// The `--cache-address` flags: an address for every cache, and addresses per mirror.
struct CacheAddresses {
    everyone: Option<String>,
    each: BTreeMap<String, String>,
}

impl CacheAddresses {
    fn of(args: &InputArgs) -> Self {
        let mut addresses = CacheAddresses {
            everyone: None,
            each: BTreeMap::new(),
        };
        for entry in &args.cache_addresses {
            match entry.split_once('=') {
                Some((mirror, address)) => {
                    let (mirror, address) = (mirror.trim(), address.trim());
                    addresses.each.insert(mirror.to_owned(), address.to_owned());
                }
                None => addresses.everyone = Some(entry.trim().to_owned()),
            }
        }
        addresses
    }
}

/// Refuses a `--cache-address MIRROR=…` naming no mirror with a cache among `mirrors`: a typo
/// would otherwise show the cache at its Service's name, unnoticed.
pub fn check_cache_addresses(args: &InputArgs, mirrors: &[&RegistryMirror]) -> Result<(), String> {
    for mirror in CacheAddresses::of(args).each.keys() {
        let cached = mirrors
            .iter()
            .any(|m| m.metadata.name.as_deref() == Some(mirror.as_str()) && m.spec.cache.is_some());
        if !cached {
            return Err(format!(
                "--cache-address {mirror}=…: no RegistryMirror {mirror:?} with spec.cache"
            ));
        }
    }
    Ok(())
}
