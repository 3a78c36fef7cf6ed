//! `regmirror plan`: what applying RegistryMirror manifests would do to the nodes before
//! anything reaches them — per group of nodes, whether the change is taken live, with a runtime
//! reload or a runtime restart, how many nodes, and in how many `maxUnavailable` waves.
//!
//! Offline, the nodes are described (`--nodes` Node YAML, `--node NAME:FLAVOR[:LABELS]`) and
//! the state before is other manifests (`--before`, default: none). With `--cluster`, the
//! nodes, RegistryMirrors, Secrets and ConfigMaps come from the cluster of the current
//! kubeconfig, and the manifests are applied over its objects.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, Service};
use kube::api::{Api, ListParams};
use regmirror_core::api::RegistryMirror;
use regmirror_core::cache::CacheSite;
use regmirror_core::contract;
use regmirror_core::impact::{preview, PreviewNode};
use regmirror_core::model::ResolvedMirror;
use regmirror_core::node::{Flavor, NodeInfo};
use regmirror_core::plan::MaxUnavailable;
use regmirror_core::resolve::resolve;
use regmirror_core::sources::{RefPolicy, SourceKind, Sources};
use thiserror::Error;

use super::render::parse_labels;
use super::InputArgs;
use crate::cache;
use crate::controller::snapshot::{config_map_source, node_view, secret_source};
use crate::manifests;

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// The manifests as they are to be: RegistryMirrors, with their Secrets and ConfigMaps.
    #[command(flatten)]
    pub input: InputArgs,
    /// The manifests as they are now (offline; default: none, a first install).
    #[arg(long, value_name = "PATH")]
    pub before: Vec<PathBuf>,
    /// Node YAML (`kubectl get nodes -o yaml`): labels, role and the flavor its agent reported.
    #[arg(long, value_name = "FILE")]
    pub nodes: Vec<PathBuf>,
    /// A node, `NAME:FLAVOR[:key=value,…]`; a control-plane node carries the control-plane label.
    #[arg(long = "node", value_name = "NAME:FLAVOR[:LABELS]", value_parser = parse_node)]
    pub node_list: Vec<PreviewNode>,
    /// The flavor of nodes whose agent has not reported one.
    #[arg(long, default_value = "k3s")]
    pub flavor: Flavor,
    /// Read nodes and the current RegistryMirrors, Secrets and ConfigMaps from the cluster of
    /// the current kubeconfig, and apply the manifests over them.
    #[arg(long)]
    pub cluster: bool,
    /// The operator's `maxUnavailable`: how many nodes may restart their runtime at once.
    #[arg(long, default_value = "1")]
    pub max_unavailable: MaxUnavailable,
    /// `text` for a person, `json` for a program.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

/// Why there is no plan.
#[derive(Debug, Error)]
pub enum PlanError {
    #[error("cannot start the async runtime: {0}")]
    AsyncRuntime(#[source] std::io::Error),
    #[error("cannot reach the cluster: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot list {what}: {source}")]
    List {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{}: {detail}", path.display())]
    Nodes { path: PathBuf, detail: String },
    #[error("no nodes to plan for: give --nodes, --node or --cluster")]
    NoNodes,
    #[error("{0}")]
    Cache(String),
    #[error("{0} problem(s) in the manifests (listed above); no plan")]
    Invalid(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn parse_node(s: &str) -> Result<PreviewNode, String> {
    let mut parts = s.splitn(3, ':');
    let name = parts
        .next()
        .filter(|n| !n.is_empty())
        .ok_or("a node needs a name")?;
    let flavor: Flavor = parts
        .next()
        .ok_or(format!("{s:?}: NAME:FLAVOR[:LABELS]"))?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let labels = parse_labels(parts.next().unwrap_or_default())?;
    Ok(PreviewNode {
        control_plane: contract::is_control_plane(&labels),
        info: NodeInfo {
            name: name.to_owned(),
            labels,
            flavor,
        },
    })
}

/// The objects a plan reads: mirrors and what they reference.
#[derive(Default)]
struct State {
    mirrors: BTreeMap<String, RegistryMirror>,
    sources: Sources,
}

impl State {
    /// This state with `other`'s objects applied over it, as `kubectl apply` would.
    fn applied(mut self, other: State) -> State {
        self.mirrors.extend(other.mirrors);
        for (key, object) in other.sources.iter() {
            self.sources
                .insert(key.kind, &key.namespace, &key.name, object.clone());
        }
        self
    }
}

pub fn run(
    args: &PlanArgs,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<i32, PlanError> {
    let policy = RefPolicy {
        operator_namespace: args.input.namespace.clone(),
        allowed_namespaces: args.input.allowed_namespaces.clone(),
    };
    let (to_apply, problems) = load(&args.input.paths, &args.input.namespace);
    for problem in &problems {
        writeln!(stderr, "{problem}")?;
    }
    if !problems.is_empty() {
        return Err(PlanError::Invalid(problems.len()));
    }
    let mut nodes = args.node_list.clone();
    for path in &args.nodes {
        nodes.extend(nodes_from_file(path, &args.flavor)?);
    }
    // Only the manifests given must be valid: invalid objects already in the cluster are the
    // operator's to report, and are left out as it leaves them out.
    let given: Vec<String> = to_apply.mirrors.keys().cloned().collect();
    let mut cache_sites = Vec::new();
    let (before, after) = if args.cluster {
        let (live, live_nodes, sites) =
            read_cluster(&policy, &args.input.cache_namespace, &args.flavor)?;
        nodes.extend(live_nodes);
        cache_sites = sites;
        let after = live_copy(&live).applied(to_apply);
        (live, after)
    } else {
        let (before, problems) = load(&args.before, &args.input.namespace);
        for problem in &problems {
            writeln!(stderr, "--before: {problem}")?;
        }
        (before, to_apply)
    };
    if nodes.is_empty() {
        return Err(PlanError::NoNodes);
    }
    // Caches: where the cluster runs them (read above), else as `render` shows them offline.
    // `--cache-address MIRROR=…` names a mirror with a cache now or after, not always both.
    let (mut before, mut after) = (before, after);
    let either: Vec<&RegistryMirror> = before
        .mirrors
        .values()
        .chain(after.mirrors.values())
        .collect();
    super::check::check_cache_addresses(&args.input, &either).map_err(PlanError::Cache)?;
    for state in [&mut before, &mut after] {
        for (mirror, site) in &cache_sites {
            state.sources.insert_cache(mirror, site.clone());
        }
        let mirrors: Vec<&RegistryMirror> = state.mirrors.values().collect();
        super::check::offline_caches(&args.input, &mirrors, &mut state.sources)
            .map_err(PlanError::Cache)?;
    }
    let before = resolved(&before, &policy, "now", stderr)?;
    let (after_mirrors, invalid) = resolved_counting(&after, &policy, "after", stderr)?;
    let invalid_given = invalid.iter().filter(|name| given.contains(name)).count();
    if invalid_given > 0 {
        return Err(PlanError::Invalid(invalid_given));
    }
    let preview = preview(&before, &after_mirrors, &nodes, args.max_unavailable);
    if args.output == "json" {
        serde_json::to_writer_pretty(&mut *stdout, &preview).map_err(std::io::Error::from)?;
        writeln!(stdout)?;
    } else {
        write!(stdout, "{preview}")?;
    }
    Ok(0)
}

/// Reads manifests into a state; the problems that keep objects out, located.
fn load(paths: &[PathBuf], namespace: &str) -> (State, Vec<String>) {
    let loaded = manifests::load(paths, namespace);
    let mut state = State {
        sources: loaded.sources,
        ..State::default()
    };
    let mut problems: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
    for manifests::LoadedMirror { origin, mirror } in loaded.mirrors {
        match &mirror.metadata.name {
            Some(name) if !name.is_empty() => {
                state.mirrors.insert(name.clone(), mirror);
            }
            _ => problems.push(format!("{origin}: RegistryMirror: metadata.name: required")),
        }
    }
    (state, problems)
}

/// The valid mirrors of a state, resolved; the others are said on `stderr` and left out, as
/// the operator leaves them out.
fn resolved(
    state: &State,
    policy: &RefPolicy,
    when: &str,
    stderr: &mut dyn Write,
) -> std::io::Result<Vec<ResolvedMirror>> {
    resolved_counting(state, policy, when, stderr).map(|(mirrors, _)| mirrors)
}

/// Like [`resolved`], with the names of the mirrors left out.
fn resolved_counting(
    state: &State,
    policy: &RefPolicy,
    when: &str,
    stderr: &mut dyn Write,
) -> std::io::Result<(Vec<ResolvedMirror>, Vec<String>)> {
    let mut mirrors = Vec::new();
    let mut invalid = Vec::new();
    for (name, mirror) in &state.mirrors {
        match resolve(mirror, &state.sources, policy) {
            Ok(resolved) => mirrors.push(resolved),
            Err(errors) => {
                invalid.push(name.clone());
                for e in errors {
                    writeln!(stderr, "{when}: RegistryMirror/{name}: {e}")?;
                }
            }
        }
    }
    Ok((mirrors, invalid))
}

/// Nodes from YAML: Node objects, or a `v1` List of them.
fn nodes_from_file(path: &PathBuf, default_flavor: &Flavor) -> Result<Vec<PreviewNode>, PlanError> {
    use serde::Deserialize;
    let bad = |detail: String| PlanError::Nodes {
        path: path.clone(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut nodes = Vec::new();
    for de in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(de).map_err(|e| bad(e.to_string()))?;
        let items = match value.get("kind").and_then(|k| k.as_str()) {
            Some("List" | "NodeList") => value
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default(),
            Some("Node") => vec![value],
            None if value.is_null() => continue,
            other => return Err(bad(format!("a {other:?} is not a Node or a List of Nodes"))),
        };
        for item in items {
            let node: Node = serde_yaml::from_value(item).map_err(|e| bad(e.to_string()))?;
            nodes.push(preview_node(&node, default_flavor));
        }
    }
    Ok(nodes)
}

/// A Node as the plan sees it: the flavor its agent reported, else the default.
fn preview_node(node: &Node, default_flavor: &Flavor) -> PreviewNode {
    let view = node_view(node);
    PreviewNode {
        control_plane: view.control_plane,
        info: NodeInfo {
            name: view.name,
            labels: view.labels,
            flavor: view.flavor.unwrap_or_else(|| default_flavor.clone()),
        },
    }
}

fn live_copy(state: &State) -> State {
    let mut copy = State {
        mirrors: state.mirrors.clone(),
        sources: Sources::new(),
    };
    for (key, object) in state.sources.iter() {
        copy.sources
            .insert(key.kind, &key.namespace, &key.name, object.clone());
    }
    copy
}

/// The cluster's RegistryMirrors, the Secrets and ConfigMaps of the namespaces references may
/// point into, and its Nodes.
#[allow(clippy::type_complexity)]
fn read_cluster(
    policy: &RefPolicy,
    cache_namespace: &str,
    default_flavor: &Flavor,
) -> Result<(State, Vec<PreviewNode>, Vec<(String, CacheSite)>), PlanError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(PlanError::AsyncRuntime)?;
    runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .map_err(PlanError::Client)?;
        let list = |what: &str| {
            let what = what.to_owned();
            move |source| PlanError::List { what, source }
        };
        let all = ListParams::default();
        let mut state = State::default();
        for mirror in Api::<RegistryMirror>::all(client.clone())
            .list(&all)
            .await
            .map_err(list("RegistryMirrors"))?
        {
            if let Some(name) = mirror.metadata.name.clone() {
                state.mirrors.insert(name, mirror);
            }
        }
        let mut caches = cache::Live::default();
        let ours = ListParams::default().labels(&contract::managed_selector());
        for service in Api::<Service>::namespaced(client.clone(), cache_namespace)
            .list(&ours)
            .await
            .map_err(list("the caches' Services"))?
        {
            caches.add_service(&service);
        }
        // Every Secret there, as the operator watches them: the CA may be unlabelled.
        for secret in Api::<Secret>::namespaced(client.clone(), cache_namespace)
            .list(&all)
            .await
            .map_err(list("the caches' Secrets"))?
            .iter()
            .filter(|s| cache::is_cache_secret(s))
        {
            caches.add_secret(secret);
        }
        let mut namespaces = vec![policy.operator_namespace.clone()];
        namespaces.extend(policy.allowed_namespaces.iter().cloned());
        for namespace in &namespaces {
            let secrets = Api::<Secret>::namespaced(client.clone(), namespace)
                .list(&all)
                .await
                .map_err(list(&format!("Secrets in {namespace}")))?;
            for secret in secrets {
                let name = secret.metadata.name.clone().unwrap_or_default();
                if cache::is_cache_secret(&secret) {
                    // The caches' keys: never a source (as for the operator).
                    continue;
                }
                state
                    .sources
                    .insert(SourceKind::Secret, namespace, &name, secret_source(&secret));
            }
            let config_maps = Api::<ConfigMap>::namespaced(client.clone(), namespace)
                .list(&all)
                .await
                .map_err(list(&format!("ConfigMaps in {namespace}")))?;
            for config_map in config_maps {
                let name = config_map.metadata.name.clone().unwrap_or_default();
                state.sources.insert(
                    SourceKind::ConfigMap,
                    namespace,
                    &name,
                    config_map_source(&config_map),
                );
            }
        }
        let nodes = Api::<Node>::all(client)
            .list(&all)
            .await
            .map_err(list("Nodes"))?
            .iter()
            .map(|n| preview_node(n, default_flavor))
            .collect();
        let mirrors: Vec<RegistryMirror> = state.mirrors.values().cloned().collect();
        let sites = caches.sites(&mirrors, cache_namespace);
        Ok((state, nodes, sites))
    })
}
