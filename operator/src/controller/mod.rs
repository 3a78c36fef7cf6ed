//! The controller: keep caches of everything that decides a node's configuration, and on every
//! change run one whole-cluster pass — decide (pure, in `regmirror_core::decide`), then write.
//!
//! All replicas keep warm caches; only the one holding the Lease writes. A pass that fails is
//! retried; since a decision is made from scratch each time, retrying is always safe.

mod metrics;
pub mod snapshot;
mod writer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{stream, Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference, Secret, Service};
use k8s_openapi::api::rbac::v1::Role;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Resource;
use prometheus_client::registry::Registry;
use regmirror_core::api::RegistryMirror;
use regmirror_core::contract;
use regmirror_core::decide::{conclude, place_reusing, ClusterView, Decision, NodeView, Placement};
use regmirror_core::plan::MaxUnavailable;
use regmirror_core::render::RenderedConfig;
use regmirror_core::seal::SealingKey;
use regmirror_core::sources::{RefPolicy, SourceKind, Sources};
use regmirror_process::endpoints::{self, BindError, Health};
use regmirror_process::events::EventPublisher;
use regmirror_process::lease::LeaseLock;
use regmirror_process::shutdown;
use thiserror::Error;
use tokio::time::Instant;

use crate::cache;

pub use metrics::Metrics;
pub use writer::{WriteError, WriteErrors, WriteFailure, WriteKind, Writer, FIELD_MANAGER};

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The operator's namespace: configs live here, references default here.
    pub namespace: String,
    /// Further namespaces whose Secrets and ConfigMaps may be referenced.
    pub allowed_namespaces: Vec<String>,
    pub max_unavailable: MaxUnavailable,
    /// The Role through which agents read configs.
    pub agent_role: String,
    pub lease_name: String,
    /// This replica's name in the Lease (its pod name).
    pub identity: String,
    pub listen: SocketAddr,
    /// The distribution registry image that mirrors' caches run.
    pub cache_image: String,
    /// Where the caches run (Pod Security `restricted`, apart from the operator's namespace).
    pub cache_namespace: String,
}

impl Settings {
    fn policy(&self) -> RefPolicy {
        RefPolicy {
            operator_namespace: self.namespace.clone(),
            allowed_namespaces: self.allowed_namespaces.clone(),
        }
    }

    /// Every namespace whose Secrets and ConfigMaps the operator reads.
    fn watched_namespaces(&self) -> Vec<String> {
        let mut all = vec![self.namespace.clone()];
        all.extend(self.allowed_namespaces.iter().cloned());
        all.sort();
        all.dedup();
        all
    }
}

#[derive(Debug, Error)]
pub enum ControllerError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("lost Lease {0} to another replica; exiting so that only one replica writes")]
    LostLease(String),
    #[error("a watch stopped before its cache was filled")]
    CacheNeverReady,
}

const LEASE_DURATION: Duration = Duration::from_secs(15);
/// Nodes per page of a (re)list.
const NODE_PAGE: u32 = 100;
/// Node states arriving together (a node pool joining, agents reporting) make one pass.
const DEBOUNCE: Duration = Duration::from_millis(250);
/// A change of what places nodes (mirrors, Secrets, labels) waits until such changes have been
/// quiet this long: `kubectl apply -f dir/` sends its objects one by one over seconds, and a
/// pass in between would restart nodes for part of the change and again for the rest.
const PLACEMENT_QUIET: Duration = Duration::from_secs(2);
/// ... but no longer than this after the first of them: a stream of changes must not starve
/// the rollout.
const PLACEMENT_WAIT_MAX: Duration = Duration::from_secs(10);
/// A pass now and then even without changes: picks up anything a watch missed.
const RESYNC: Duration = Duration::from_secs(300);
/// After a pass with failed writes, the next comes after a backoff that doubles per failed
/// pass from `RETRY_MIN` up to `RETRY_MAX`, with jitter, so that a struggling API server is not
/// hammered by every operator in step.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(120);

/// The wait before the next pass after `failures` failed passes in a row: exponential, and
/// jittered to between half and all of it.
pub fn retry_after(failures: u32, jitter: f64) -> Duration {
    let full = RETRY_MIN
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(RETRY_MAX);
    full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

fn jitter() -> f64 {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// Runs the controller until SIGTERM.
pub async fn run(client: kube::Client, settings: Settings) -> Result<(), ControllerError> {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let health = Health::new(registry);
    tokio::spawn(endpoints::serve(settings.listen, health.clone()).await?);

    // The watches fill the caches only while polled: a task drives them from the start, on
    // followers too, so that a new leader decides on current caches.
    let (caches, changes) = Caches::watch(&client, &settings);
    let pending = Arc::new(Mutex::new(Pending::default()));
    let (changed_tx, mut changed) = tokio::sync::watch::channel(());
    let collected = pending.clone();
    tokio::spawn(async move {
        let mut changes = Box::pin(changes);
        while let Some(change) = changes.next().await {
            collected
                .lock()
                .expect("not poisoned")
                .add(change, Instant::now());
            let _ = changed_tx.send(());
        }
    });
    caches.wait_until_ready().await?;
    health.set_ready(true);
    tracing::info!("caches filled; waiting for leadership");

    let writer = Writer {
        client: client.clone(),
        namespace: settings.namespace.clone(),
        agent_role: settings.agent_role.clone(),
        events: EventPublisher::new(client.clone(), "regmirror", &settings.identity),
    };
    let lease = LeaseLock::new(
        client.clone(),
        &settings.namespace,
        &settings.lease_name,
        &settings.identity,
        LEASE_DURATION,
    );
    let stop = shutdown::requested();
    tokio::pin!(stop);
    let mut held = tokio::select! {
        _ = &mut stop => return Ok(()),
        held = lease.acquire() => held,
    };
    tracing::info!(identity = %settings.identity, "leading; reconciling");
    metrics.leader.set(1);

    // A resync or a retry after failures, whichever is planned; changes may bring it forward.
    let mut planned = Instant::now();
    let mut next_pass = planned;
    let mut failures = 0;
    // The last pass's snapshot and placement, for passes woken only by node states.
    let mut last: Option<(Snapshot, Placement)> = None;
    // Why the last pass could not set mirrors' caches up: said in their status.
    let mut cache_failures = BTreeMap::new();
    let result = loop {
        tokio::select! {
            _ = &mut stop => break Ok(()),
            _ = held.lost() => break Err(ControllerError::LostLease(settings.lease_name.clone())),
            Ok(()) = changed.changed() => {
                next_pass = pending.lock().expect("not poisoned").next_pass(planned);
                continue;
            }
            _ = tokio::time::sleep_until(next_pass) => {}
        }
        let changes = {
            let mut pending = pending.lock().expect("not poisoned");
            let now = Instant::now();
            // A pass that would place every node again (a resync, a retry, the first pass)
            // while a placement change is still settling waits for it: it would otherwise act
            // on half of a `kubectl apply`.
            let whole_pass = pending.nodes.is_empty() || failures > 0 || last.is_none();
            if pending.settling(now) && whole_pass {
                next_pass = pending.placement_due().unwrap_or(planned);
                continue;
            }
            pending.take_due(now)
        };
        // Only node states changed (agents' reports, readiness, our own annotations): the
        // placement stands, and only those nodes are read again. Anything else, a resync or
        // a retry after failures places every node again.
        // A resync (nothing pending) or a retry places everything again — reusing what the
        // last pass made of objects that did not change.
        let only_states = !changes.everything && !changes.nodes.is_empty() && failures == 0;
        let mut last_parts = last.take();
        let kept = match last_parts.take() {
            Some((mut snapshot, placement)) if only_states => {
                if caches.refresh(&mut snapshot, &changes.nodes) {
                    Some((snapshot, placement))
                } else {
                    last_parts = Some((snapshot, placement));
                    None
                }
            }
            other => {
                last_parts = other;
                None
            }
        };
        let (snapshot, placement) = match kept {
            Some(kept) => {
                metrics.passes("nodes_only");
                kept
            }
            None => {
                metrics.passes("full");
                let (previous, placed) = last_parts.take().unzip();
                let mut snapshot = caches.snapshot(previous.unwrap_or_default());
                snapshot.note_cache_failures(&cache_failures);
                let placement = snapshot.place_reusing(&settings.policy(), placed.as_ref());
                (snapshot, placement)
            }
        };
        // Losing the lease cancels the pass between two writes.
        let passed = tokio::select! {
            passed = reconcile_placed(&snapshot, &placement, &settings, &writer, &metrics, &mut cache_failures) => passed,
            _ = held.lost() => break Err(ControllerError::LostLease(settings.lease_name.clone())),
        };
        let mut snapshot = snapshot;
        if let Ok(decision) = &passed {
            snapshot.written(decision);
        }
        last = Some((snapshot, placement));
        // A pass decodes a burst of responses and watch events; give what it freed back.
        regmirror_process::memory::release_free_memory();
        failures = if passed.is_ok() { 0 } else { failures + 1 };
        planned = Instant::now()
            + if failures == 0 {
                RESYNC
            } else {
                retry_after(failures, jitter())
            };
        // Changes that came during the pass are for the next one.
        next_pass = pending.lock().expect("not poisoned").next_pass(planned);
    };
    metrics.leader.set(0);
    held.release().await;
    result
}

/// Why a pass did not get everything written.
#[derive(Debug, Error)]
pub enum PassError {
    #[error(transparent)]
    Writes(#[from] WriteErrors),
    #[error("cannot create the sealing key: {0}")]
    SealingKey(#[from] WriteError),
}

/// What changed since the last pass.
#[derive(Debug, Default)]
pub struct Pending {
    /// Something that decides where nodes go: a mirror, a Secret or ConfigMap, a Node's
    /// labels, flavor or key, a Node added or removed, the Role, a watch relisted.
    pub everything: bool,
    /// Nodes whose state alone changed.
    pub nodes: HashSet<String>,
    /// When the first and the latest change of `everything` came.
    placement_changes: Option<(Instant, Instant)>,
    /// When the first change of `nodes` came.
    first_state_change: Option<Instant>,
}

impl Pending {
    pub fn add(&mut self, change: Change, now: Instant) {
        match change {
            Change::Placement => {
                self.everything = true;
                let first = self.placement_changes.map_or(now, |(first, _)| first);
                self.placement_changes = Some((first, now));
            }
            Change::NodeState(name) => {
                self.nodes.insert(name);
                self.first_state_change.get_or_insert(now);
            }
        }
    }

    /// When the next pass for these changes should start, if any is pending: node states
    /// [`DEBOUNCE`] after the first; placement changes once they have been quiet for
    /// [`PLACEMENT_QUIET`] (at most [`PLACEMENT_WAIT_MAX`] after the first). Node states do
    /// not wait for a placement change: a busy Secret must not slow every rollout step.
    pub fn due(&self) -> Option<Instant> {
        let states = self.first_state_change.map(|first| first + DEBOUNCE);
        match (self.placement_due(), states) {
            (Some(p), Some(s)) => Some(p.min(s)),
            (p, s) => p.or(s),
        }
    }

    /// The next pass: `planned` (a resync or a retry), or sooner if these changes are due.
    pub fn next_pass(&self, planned: Instant) -> Instant {
        self.due().map_or(planned, |due| due.min(planned))
    }

    fn placement_due(&self) -> Option<Instant> {
        self.placement_changes
            .map(|(first, latest)| (latest + PLACEMENT_QUIET).min(first + PLACEMENT_WAIT_MAX))
    }

    /// Whether a placement change is pending and not yet due at `now`.
    pub fn settling(&self, now: Instant) -> bool {
        self.placement_due().is_some_and(|due| due > now)
    }

    /// Takes what is due at `now`: every change, or only the node states while a placement
    /// change is still settling (it stays pending for a later pass).
    pub fn take_due(&mut self, now: Instant) -> Pending {
        if !self.settling(now) {
            return std::mem::take(self);
        }
        Pending {
            nodes: std::mem::take(&mut self.nodes),
            first_state_change: self.first_state_change.take(),
            ..Pending::default()
        }
    }
}

/// One change a watch saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Placement,
    NodeState(String),
}

/// One pass: decide on `snapshot`, then write the decision.
pub async fn reconcile(
    snapshot: &Snapshot,
    settings: &Settings,
    writer: &Writer,
    metrics: &Metrics,
) -> Result<Decision, PassError> {
    let placement = snapshot.place(&settings.policy());
    let mut cache_failures = BTreeMap::new();
    reconcile_placed(
        snapshot,
        &placement,
        settings,
        writer,
        metrics,
        &mut cache_failures,
    )
    .await
}

/// One pass on a placement made earlier for this snapshot's nodes: conclude, then write, then
/// bring the mirrors' caches to what they ask (`cache_failures` gets what failed there, for the
/// next pass's statuses). Before anything can be sealed, the operator's sealing key must
/// exist: a pass without one creates it and decides nothing.
#[tracing::instrument(name = "reconcile", skip_all, fields(mirrors = snapshot.mirrors.len(), nodes = snapshot.nodes.len()))]
pub async fn reconcile_placed(
    snapshot: &Snapshot,
    placement: &Placement,
    settings: &Settings,
    writer: &Writer,
    metrics: &Metrics,
    cache_failures: &mut BTreeMap<String, String>,
) -> Result<Decision, PassError> {
    let Some(key) = &snapshot.sealing_key else {
        writer.create_sealing_key(metrics).await?;
        return Ok(Decision::default());
    };
    let started = Instant::now();
    let now = k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now())
        .to_string();
    let decision = snapshot.conclude(
        placement,
        &settings.policy(),
        settings.max_unavailable,
        &now,
    );
    metrics.reconciles.inc();
    metrics.observe(&decision);
    let written = writer
        .write(&decision, key, metrics, |subject| {
            snapshot.reference(subject)
        })
        .await;
    // The caches the mirrors ask for: after the nodes' writes, which they do not hold back. A
    // cache is deleted only once no node runs or is told a config that lists it.
    let in_use = cache::in_use(&snapshot.caches, &snapshot.nodes, |name| {
        decision
            .create
            .get(name)
            .or_else(|| snapshot.stored.get(name))
    });
    let cached = cache::ensure(
        &cache::Context {
            client: &writer.client,
            namespace: &settings.cache_namespace,
            image: &settings.cache_image,
            sources: &snapshot.sources,
            policy: &settings.policy(),
            field_manager: FIELD_MANAGER,
            timeout: writer::WRITE_TIMEOUT,
        },
        &snapshot.mirrors,
        &snapshot.caches,
        &in_use,
    )
    .await;
    *cache_failures = cached
        .iter()
        .flat_map(|f| {
            let mirrors: Vec<String> = match &f.concerns {
                cache::Concerns::Mirror(mirror) => vec![mirror.clone()],
                cache::Concerns::EveryCache => snapshot
                    .mirrors
                    .iter()
                    .filter(|m| m.spec.cache.is_some())
                    .filter_map(|m| m.metadata.name.clone())
                    .collect(),
                cache::Concerns::Leftover(_) => vec![],
            };
            mirrors.into_iter().map(|m| (m, f.error.to_string()))
        })
        .collect();
    let written = merge_cache_errors(written, cached, metrics);
    metrics.duration.observe(started.elapsed().as_secs_f64());
    match written {
        Ok(()) => {
            if decision.writes() > 0 {
                tracing::info!(
                    configs_created = decision.create.len(),
                    nodes_advanced = decision.advance.len(),
                    nodes_rekeyed = decision.rekey.len(),
                    statuses = decision.statuses.len(),
                    configs_deleted = decision.delete.len(),
                    "reconciled"
                );
            }
            Ok(decision)
        }
        Err(e) => {
            metrics.errors.inc();
            tracing::error!(error = %e, "some writes failed; the next pass decides again");
            Err(e.into())
        }
    }
}

/// The pass's write errors, with those of the caches (counted in the metrics as they join).
fn merge_cache_errors(
    written: Result<(), WriteErrors>,
    cached: Vec<cache::Failure>,
    metrics: &Metrics,
) -> Result<(), WriteErrors> {
    if cached.is_empty() {
        return written;
    }
    let mut errors = written.err().unwrap_or_default();
    for cache::Failure { concerns, error } in cached {
        let failure = WriteFailure::Cache(error);
        metrics.written(WriteKind::Cache, Some(&failure));
        if let cache::Concerns::Leftover(name) = concerns {
            // No mirror waits for it: not a failed pass (whose backoff would hold every node's
            // step); a later pass tries again.
            tracing::warn!(cache = %name, error = %failure, "could not delete a cache no RegistryMirror asks for any more");
            continue;
        }
        errors.0.push(WriteError {
            action: "bring a cache to what its RegistryMirror asks".to_owned(),
            kind: WriteKind::Cache,
            failure,
        });
    }
    if errors.0.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Everything a pass reads, copied out of the caches.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub mirrors: Vec<RegistryMirror>,
    pub sources: Sources,
    pub nodes: Vec<NodeView>,
    pub stored: BTreeMap<String, RenderedConfig>,
    pub agent_role: Option<Vec<String>>,
    /// The operator's sealing key, once it exists.
    pub sealing_key: Option<SealingKey>,
    /// UIDs of RegistryMirrors by name, for Events.
    pub uids: HashMap<String, String>,
    /// Where each node is in `nodes`.
    pub node_index: HashMap<String, usize>,
    /// Per node (as `nodes`): the resourceVersion its view was made from, so that the next
    /// snapshot reuses the view of a Node that did not change.
    pub node_meta: Vec<NodeMeta>,
    /// The resourceVersion of each stored config's Secret, so that the next snapshot reuses
    /// configs it opened already.
    pub stored_versions: HashMap<String, String>,
    /// The mirrors' caches as they run (their sites are in `sources`).
    pub caches: cache::Live,
}

/// What a snapshot remembers of a Node besides its view.
#[derive(Debug, Clone, Default)]
pub struct NodeMeta {
    pub version: Option<String>,
    /// What of the Node decides where it goes (labels, flavor, key): a Node whose placement
    /// inputs changed is not taken into a snapshot that keeps its placement.
    pub placement: u64,
}

impl Snapshot {
    /// A snapshot of these objects. `secrets` and `config_maps` are those of the watched
    /// namespaces; the operator's own configs are found among the secrets.
    pub fn from_objects<'a>(
        mirrors: impl IntoIterator<Item = &'a RegistryMirror>,
        nodes: impl IntoIterator<Item = &'a Node>,
        secrets: impl IntoIterator<Item = &'a Secret>,
        config_maps: impl IntoIterator<Item = &'a ConfigMap>,
        agent_role: Option<&Role>,
        namespace: &str,
    ) -> Self {
        Self::reusing(
            Snapshot::default(),
            mirrors,
            nodes,
            secrets,
            config_maps,
            agent_role,
            namespace,
        )
    }

    /// A snapshot of these objects that takes from `previous` what did not change since: the
    /// views of Nodes of the same resourceVersion and the configs it opened already. In a
    /// large settled cluster that is nearly everything.
    pub fn reusing<'a>(
        mut previous: Snapshot,
        mirrors: impl IntoIterator<Item = &'a RegistryMirror>,
        nodes: impl IntoIterator<Item = &'a Node>,
        secrets: impl IntoIterator<Item = &'a Secret>,
        config_maps: impl IntoIterator<Item = &'a ConfigMap>,
        agent_role: Option<&Role>,
        namespace: &str,
    ) -> Self {
        let mut snapshot = Snapshot::default();
        for mirror in mirrors {
            snapshot.remember_uid(&mirror.meta().name, &mirror.meta().uid);
            snapshot.mirrors.push(mirror.clone());
        }
        for node in nodes {
            let name = node.metadata.name.as_deref().unwrap_or_default();
            let version = &node.metadata.resource_version;
            let unchanged = previous.node_index.remove_entry(name).and_then(|(key, i)| {
                (version.is_some() && previous.node_meta[i].version == *version).then(|| {
                    let view = std::mem::take(&mut previous.nodes[i]);
                    (key, view, std::mem::take(&mut previous.node_meta[i]))
                })
            });
            let (key, view, meta) = unchanged.unwrap_or_else(|| {
                let view = snapshot::node_view(node);
                let meta = NodeMeta {
                    version: version.clone(),
                    placement: snapshot::node_fingerprints(node).0,
                };
                (view.name.clone(), view, meta)
            });
            snapshot.node_index.insert(key, snapshot.nodes.len());
            snapshot.nodes.push(view);
            snapshot.node_meta.push(meta);
        }
        let mut configs = Vec::new();
        let mut own = Vec::new();
        for secret in secrets {
            let (Some(ns), Some(name)) = (&secret.metadata.namespace, &secret.metadata.name) else {
                continue;
            };
            if ns == namespace && name == regmirror_core::contract::SEALING_KEY_SECRET {
                // Never a source: no mirror may reference the sealing key.
                own.push(secret);
            } else if cache::is_cache_secret(secret) {
                // Nor the caches' keys and passwords (should their namespace be allowed too).
                continue;
            } else if snapshot::is_config(secret) && ns == namespace {
                configs.push(secret);
            } else {
                let source = snapshot::secret_source(secret);
                snapshot
                    .sources
                    .insert(SourceKind::Secret, ns, name, source);
            }
        }
        snapshot.sealing_key = snapshot::sealing_key(own);
        if let Some(key) = &snapshot.sealing_key {
            // A config Secret is immutable: one of the same resourceVersion holds what was
            // opened and checked before.
            let versions: HashMap<String, String> = configs
                .iter()
                .filter_map(|s| {
                    Some((
                        s.metadata.name.clone()?,
                        s.metadata.resource_version.clone()?,
                    ))
                })
                .collect();
            let (unchanged, changed): (Vec<&Secret>, Vec<&Secret>) =
                configs.into_iter().partition(|s| {
                    let (Some(name), Some(version)) =
                        (&s.metadata.name, &s.metadata.resource_version)
                    else {
                        return false;
                    };
                    previous.stored_versions.get(name) == Some(version)
                        && previous.stored.contains_key(name)
                        && previous.sealing_key.as_ref() == Some(key)
                });
            for secret in unchanged {
                let name = secret.metadata.name.clone().unwrap_or_default();
                let config = previous.stored.remove(&name).expect("checked above");
                snapshot.stored.insert(name, config);
            }
            snapshot
                .stored
                .extend(snapshot::stored_configs(changed, key));
            snapshot.stored_versions = versions
                .into_iter()
                .filter(|(name, _)| snapshot.stored.contains_key(name))
                .collect();
        }
        for cm in config_maps {
            if let (Some(ns), Some(name)) = (&cm.metadata.namespace, &cm.metadata.name) {
                let source = snapshot::config_map_source(cm);
                snapshot
                    .sources
                    .insert(SourceKind::ConfigMap, ns, name, source);
            }
        }
        snapshot.agent_role = agent_role.map(snapshot::role_resource_names);
        snapshot
            .mirrors
            .sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        snapshot
    }

    /// Takes in the caches' Services, Deployments and Secrets (of the caches' namespace), and
    /// tells `resolve` where the caches that are ready for nodes are.
    pub fn with_cache_objects<'a>(
        mut self,
        services: impl IntoIterator<Item = &'a Service>,
        deployments: impl IntoIterator<Item = &'a Deployment>,
        secrets: impl IntoIterator<Item = &'a Secret>,
        namespace: &str,
    ) -> Self {
        for service in services {
            self.caches.add_service(service);
        }
        for deployment in deployments {
            self.caches.add_deployment(deployment);
        }
        for secret in secrets.into_iter().filter(|s| cache::is_cache_secret(s)) {
            self.caches.add_secret(secret);
        }
        for (mirror, site) in self.caches.sites(&self.mirrors, namespace) {
            self.sources.insert_cache(&mirror, site);
        }
        self
    }

    /// Tells `resolve` why the caches of these mirrors could not be set up (the last pass's
    /// failures), for those that have no site.
    pub fn note_cache_failures(&mut self, failures: &BTreeMap<String, String>) {
        for (mirror, detail) in failures {
            self.sources.insert_cache_failure(mirror, detail.clone());
        }
    }

    /// The decision on this snapshot (pure); `now` stamps conditions that change.
    pub fn decide(
        &self,
        policy: &RefPolicy,
        max_unavailable: MaxUnavailable,
        now: &str,
    ) -> Decision {
        self.conclude(&self.place(policy), policy, max_unavailable, now)
    }

    /// Where this snapshot's nodes should go.
    pub fn place(&self, policy: &RefPolicy) -> Placement {
        self.place_reusing(policy, None)
    }

    /// Where this snapshot's nodes should go, taking from `previous` the configs it rendered
    /// for the same mirrors and flavor.
    pub fn place_reusing(&self, policy: &RefPolicy, previous: Option<&Placement>) -> Placement {
        place_reusing(&self.mirrors, &self.sources, policy, &self.nodes, previous)
    }

    /// The decision on this snapshot, on a placement made for its nodes.
    pub fn conclude(
        &self,
        placement: &Placement,
        policy: &RefPolicy,
        max_unavailable: MaxUnavailable,
        now: &str,
    ) -> Decision {
        conclude(
            placement,
            &ClusterView {
                mirrors: &self.mirrors,
                sources: &self.sources,
                policy,
                nodes: &self.nodes,
                stored: &self.stored,
                agent_role: self.agent_role.as_deref(),
                max_unavailable,
                now,
            },
        )
    }

    /// Takes a Node's new state. Returns false if the snapshot does not know the node (it is
    /// new) or what places it changed too (the cache may already hold a change whose event has
    /// not arrived yet): the placement must then be made again.
    pub fn update_node(&mut self, node: &Node) -> bool {
        let view = snapshot::node_view(node);
        let placement = snapshot::node_fingerprints(node).0;
        match self.node_index.get(&view.name) {
            Some(&i) if self.node_meta[i].placement == placement => {
                self.nodes[i] = view;
                self.node_meta[i] = NodeMeta {
                    version: node.metadata.resource_version.clone(),
                    placement,
                };
                true
            }
            _ => false,
        }
    }

    /// Takes the statuses a pass wrote, so that a pass on this snapshot compares with what
    /// the API server holds now.
    pub fn written(&mut self, decision: &Decision) {
        for mirror in &mut self.mirrors {
            if let Some(status) = mirror
                .metadata
                .name
                .as_ref()
                .and_then(|n| decision.statuses.get(n))
            {
                mirror.status = Some(status.clone());
            }
        }
    }

    fn remember_uid(&mut self, name: &Option<String>, uid: &Option<String>) {
        if let (Some(name), Some(uid)) = (name, uid) {
            self.uids.insert(name.clone(), uid.clone());
        }
    }

    /// The RegistryMirror an Event is about.
    pub fn reference(&self, mirror: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some(RegistryMirror::api_version(&()).into_owned()),
            kind: Some("RegistryMirror".to_owned()),
            name: Some(mirror.to_owned()),
            uid: self.uids.get(mirror).cloned(),
            ..ObjectReference::default()
        }
    }
}

/// The operator's caches, filled and kept current by watches.
pub struct Caches {
    mirrors: Store<RegistryMirror>,
    nodes: Store<Node>,
    secrets: Vec<Store<Secret>>,
    config_maps: Vec<Store<ConfigMap>>,
    roles: Store<Role>,
    services: Store<Service>,
    deployments: Store<Deployment>,
    cache_secrets: Store<Secret>,
    namespace: String,
    cache_namespace: String,
    agent_role: String,
}

impl Caches {
    /// Starts the watches. The stream yields once per change; it must be polled for the
    /// caches to fill.
    pub fn watch(
        client: &kube::Client,
        settings: &Settings,
    ) -> (Caches, impl Stream<Item = Change> + Send + 'static) {
        let mut changes: Vec<stream::BoxStream<'static, Change>> = Vec::new();
        let (mirrors, w) = reflector::store();
        changes.push(reflect(
            Api::all(client.clone()),
            watcher::Config::default(),
            w,
            |_| {},
            |m| (snapshot::mirror_fingerprint(m), 0),
        ));
        let (nodes, w) = reflector::store();
        changes.push(reflect(
            Api::all(client.clone()),
            // A kubelet's Node is ~10 KiB of JSON before `slim_node` keeps the little the
            // operator reads: small pages keep the (re)list's peak memory small.
            watcher::Config::default().page_size(NODE_PAGE),
            w,
            snapshot::slim_node,
            snapshot::node_fingerprints,
        ));

        let mut secrets = Vec::new();
        let mut config_maps = Vec::new();
        for ns in settings.watched_namespaces() {
            // Helm keeps release history in Secrets of this type: big, and none of ours.
            let not_helm = watcher::Config::default().fields("type!=helm.sh/release.v1");
            let (store, w) = reflector::store();
            changes.push(reflect(
                Api::namespaced(client.clone(), &ns),
                not_helm,
                w,
                |s: &mut Secret| {
                    s.metadata.managed_fields = None;
                },
                everything_on_change,
            ));
            secrets.push(store);
            let (store, w) = reflector::store();
            changes.push(reflect(
                Api::namespaced(client.clone(), &ns),
                watcher::Config::default(),
                w,
                |c: &mut ConfigMap| {
                    c.metadata.managed_fields = None;
                },
                everything_on_change,
            ));
            config_maps.push(store);
        }
        let only_agent_role =
            watcher::Config::default().fields(&format!("metadata.name={}", settings.agent_role));
        let (roles, w) = reflector::store();
        changes.push(reflect(
            Api::namespaced(client.clone(), &settings.namespace),
            only_agent_role,
            w,
            |_| {},
            everything_on_change,
        ));

        // The mirrors' caches, in their namespace: only the objects the operator made.
        let ours = contract::managed_selector();
        let caches_only = || {
            watcher::Config::default()
                .labels(&format!("{ours},{}", regmirror_core::cache::MIRROR_LABEL))
        };
        let (services, w) = reflector::store();
        changes.push(reflect(
            Api::namespaced(client.clone(), &settings.cache_namespace),
            caches_only(),
            w,
            |s: &mut Service| s.metadata.managed_fields = None,
            cache_fingerprints,
        ));
        let (deployments, w) = reflector::store();
        changes.push(reflect(
            Api::namespaced(client.clone(), &settings.cache_namespace),
            caches_only(),
            w,
            |d: &mut Deployment| {
                d.metadata.managed_fields = None;
                d.status = None;
            },
            cache_fingerprints,
        ));
        // Every Secret of the caches' (own) namespace: the CA may be one a person put there,
        // without regmirror's label; `is_cache_secret` picks the CA and the caches' own.
        let (cache_secrets, w) = reflector::store();
        changes.push(reflect(
            Api::namespaced(client.clone(), &settings.cache_namespace),
            watcher::Config::default(),
            w,
            |s: &mut Secret| s.metadata.managed_fields = None,
            everything_on_change,
        ));

        let caches = Caches {
            mirrors,
            nodes,
            secrets,
            config_maps,
            roles,
            services,
            deployments,
            cache_secrets,
            namespace: settings.namespace.clone(),
            cache_namespace: settings.cache_namespace.clone(),
            agent_role: settings.agent_role.clone(),
        };
        (caches, stream::select_all(changes))
    }

    async fn wait_until_ready(&self) -> Result<(), ControllerError> {
        let never = |_| ControllerError::CacheNeverReady;
        self.mirrors.wait_until_ready().await.map_err(never)?;
        self.nodes.wait_until_ready().await.map_err(never)?;
        self.roles.wait_until_ready().await.map_err(never)?;
        self.services.wait_until_ready().await.map_err(never)?;
        self.deployments.wait_until_ready().await.map_err(never)?;
        self.cache_secrets.wait_until_ready().await.map_err(never)?;
        for s in &self.secrets {
            s.wait_until_ready().await.map_err(never)?;
        }
        for c in &self.config_maps {
            c.wait_until_ready().await.map_err(never)?;
        }
        Ok(())
    }

    /// Brings `snapshot` up to date with the caches for `nodes` (whose state alone changed).
    /// Returns false when one of them is unknown to the snapshot or gone from the cache.
    pub fn refresh(&self, snapshot: &mut Snapshot, nodes: &HashSet<String>) -> bool {
        nodes.iter().all(|name| {
            self.nodes
                .get(&reflector::ObjectRef::new(name))
                .is_some_and(|node| snapshot.update_node(&node))
        })
    }

    /// What the caches hold now, reusing from `previous` what did not change.
    pub fn snapshot(&self, previous: Snapshot) -> Snapshot {
        let mirrors = self.mirrors.state();
        let nodes = self.nodes.state();
        let secrets: Vec<_> = self.secrets.iter().flat_map(Store::state).collect();
        let config_maps: Vec<_> = self.config_maps.iter().flat_map(Store::state).collect();
        let role = self
            .roles
            .state()
            .into_iter()
            .find(|r| r.metadata.name.as_deref() == Some(self.agent_role.as_str()));
        Snapshot::reusing(
            previous,
            mirrors.iter().map(|m| &**m),
            nodes.iter().map(|n| &**n),
            secrets.iter().map(|s| &**s),
            config_maps.iter().map(|c| &**c),
            role.as_deref(),
            &self.namespace,
        )
        .with_cache_objects(
            self.services.state().iter().map(|s| &**s),
            self.deployments.state().iter().map(|d| &**d),
            self.cache_secrets.state().iter().map(|s| &**s),
            &self.cache_namespace,
        )
    }
}

/// A watch that keeps `writer`'s store current, trimming each object with `trim` first, and
/// yields a [`Change`] per change that matters: an object whose `fingerprints` moved, a
/// deletion, or a (re)list completed. The first fingerprint covers what decides where nodes
/// go; the second what only their state is (for Nodes; always 0 for other kinds). A kubelet
/// rewrites its Node's status every few minutes; with thousands of nodes that must not mean
/// a pass every few milliseconds. Watch errors are logged and retried with backoff.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    trim: impl FnMut(&mut K) + Send + 'static,
    fingerprints: fn(&K) -> (u64, u64),
) -> stream::BoxStream<'static, Change>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let mut seen: HashMap<String, (u64, u64)> = HashMap::new();
    let span = tracing::info_span!("watch", kind = %K::kind(&()), namespace = api_namespace(&api));
    watcher(api, config)
        .default_backoff()
        .modify(trim)
        .reflect(writer)
        .filter_map(move |event| {
            let _in_watch = span.enter();
            let key = |o: &K| {
                format!(
                    "{}/{}",
                    o.meta().namespace.as_deref().unwrap_or(""),
                    o.meta().name.as_deref().unwrap_or("")
                )
            };
            let change = match &event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    let now = fingerprints(o);
                    match seen.insert(key(o), now) {
                        Some(before) if before == now => None,
                        Some(before) if before.0 == now.0 => {
                            Some(Change::NodeState(o.meta().name.clone().unwrap_or_default()))
                        }
                        _ => Some(Change::Placement),
                    }
                }
                Ok(watcher::Event::Delete(o)) => {
                    seen.remove(&key(o));
                    Some(Change::Placement)
                }
                Ok(watcher::Event::Init) => None,
                Ok(watcher::Event::InitDone) => Some(Change::Placement),
                Err(e) => {
                    tracing::warn!(kind = %K::kind(&()), error = %e, "watch failed; retrying");
                    None
                }
            };
            futures::future::ready(change)
        })
        .boxed()
}

/// The namespace an Api is confined to, for the watch's span ("" for cluster-wide).
fn api_namespace<K: Resource>(api: &Api<K>) -> String {
    // Api has no accessor for its namespace; its URL path names it.
    let path = api.resource_url();
    path.split("/namespaces/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_owned()
}

/// Any change of the object (its resourceVersion) may move nodes.
/// A cache's Service or Deployment changes what the operator decides only by what it applied
/// (its annotations), its spec's generation, or the address a Service got: not by the status
/// a Deployment's pod readiness rewrites.
fn cache_fingerprints<K: Resource + serde::Serialize>(object: &K) -> (u64, u64) {
    let meta = object.meta();
    let address = serde_json::to_value(object)
        .ok()
        .and_then(|v| v["spec"]["clusterIP"].as_str().map(str::to_owned));
    (hash(&(meta.generation, &meta.annotations, address)), 0)
}

fn everything_on_change<K: Resource>(object: &K) -> (u64, u64) {
    (hash(&object.meta().resource_version), 0)
}

pub(crate) fn hash(value: &impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_delete_of_a_leftover_cache_is_counted_but_fails_no_pass() {
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let failure = |concerns| cache::Failure {
            concerns,
            error: cache::CacheWriteError::Timeout {
                action: "delete Service regmirror-cache/regmirror-cache-old-0".into(),
            },
        };
        let leftover = || failure(cache::Concerns::Leftover("regmirror-cache-old-0".into()));
        assert!(merge_cache_errors(Ok(()), vec![leftover()], &metrics).is_ok());
        let failed = merge_cache_errors(
            Ok(()),
            vec![leftover(), failure(cache::Concerns::Mirror("hub".into()))],
            &metrics,
        );
        assert_eq!(failed.map_err(|e| e.0.len()), Err(1));
        let counted: u64 = metrics
            .write_failures
            .get_or_create(&metrics::FailureLabel {
                kind: WriteKind::Cache.as_str().into(),
                reason: "cache".into(),
            })
            .get();
        assert_eq!(counted, 3, "every failure is counted");
    }

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn nothing_pending_is_never_due() {
        assert_eq!(Pending::default().due(), None);
    }

    #[test]
    fn node_states_alone_are_due_a_debounce_after_the_first() {
        let t = Instant::now();
        let mut p = Pending::default();
        p.add(Change::NodeState("a".into()), t);
        p.add(Change::NodeState("b".into()), at(t, 200));
        assert_eq!(p.due(), Some(t + DEBOUNCE));
    }

    #[test]
    fn a_placement_change_waits_until_changes_are_quiet() {
        // `kubectl apply -f` of many mirrors: one every 100 ms for 3 s.
        let t = Instant::now();
        let mut p = Pending::default();
        for i in 0..30 {
            p.add(Change::Placement, at(t, i * 100));
        }
        assert_eq!(p.due(), Some(at(t, 2_900) + PLACEMENT_QUIET));
        assert!(p.settling(at(t, 3_000)));
        assert!(!p.settling(at(t, 2_900) + PLACEMENT_QUIET));
    }

    #[test]
    fn node_states_do_not_wait_for_a_settling_placement_change() {
        let t = Instant::now();
        let mut p = Pending::default();
        p.add(Change::Placement, t);
        p.add(Change::NodeState("a".into()), at(t, 100));
        assert_eq!(p.due(), Some(at(t, 100) + DEBOUNCE));

        let states = p.take_due(at(t, 400));
        assert!(!states.everything, "the placement change is still settling");
        assert_eq!(states.nodes, HashSet::from(["a".to_owned()]));
        assert!(p.nodes.is_empty());
        assert_eq!(p.due(), Some(t + PLACEMENT_QUIET), "and stays pending");

        let all = p.take_due(t + PLACEMENT_QUIET);
        assert!(all.everything);
        assert_eq!(p.due(), None, "nothing left");
    }

    #[test]
    fn changes_that_never_stop_do_not_hold_the_pass_forever() {
        let t = Instant::now();
        let mut p = Pending::default();
        for i in 0..200 {
            p.add(Change::Placement, at(t, i * 1_000));
        }
        assert_eq!(p.due(), Some(t + PLACEMENT_WAIT_MAX));
    }
}
