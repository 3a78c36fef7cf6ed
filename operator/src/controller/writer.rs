//! Carries a decision out against the API server, in the order that keeps every node safe:
//! configs exist and agents may read them before any node is pointed at them; statuses after;
//! unused configs are deleted last.
//!
//! Each write stands alone, with its own timeout: one Node deleted between read and write, or
//! one conflict, does not hold back the other nodes and mirrors. A write that others depend on
//! holds back only its dependants — a node is not pointed at a config that could not be
//! stored, nor at any new config while the agents' Role could not be updated. Whatever failed
//! is decided again by the next pass.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use k8s_openapi::api::core::v1::{Node, ObjectReference, Secret};
use k8s_openapi::api::rbac::v1::Role;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use regmirror_core::api::RegistryMirror;
use regmirror_core::contract::{
    agent_role, config_secret, sealed_config, CONFIG_KEY, DESIRED_ACTIVATION, DESIRED_CONFIG,
    MANAGED_BY, MANAGER, SEALING_KEY_DATA, SEALING_KEY_SECRET,
};
use regmirror_core::decide::{Advance, Decision, Notice};
use regmirror_core::render::RenderedConfig;
use regmirror_core::seal::{NodePublicKey, SealingKey};
use regmirror_process::events::{EventPublisher, Occurrence};
use serde_json::json;
use thiserror::Error;
use tracing::Instrument;

use super::metrics::Metrics;

/// The field manager regmirror's writes are recorded under.
pub const FIELD_MANAGER: &str = "regmirror";

/// How many Node writes of a pass are in flight at once.
pub const NODE_WRITES_IN_FLIGHT: usize = 8;

/// How long one write may take.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What kind of object a write was for, as metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    ConfigCreate,
    ConfigDelete,
    AgentRole,
    NodeAnnotate,
    Status,
    SealingKey,
    Cache,
}

impl WriteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WriteKind::ConfigCreate => "config_create",
            WriteKind::ConfigDelete => "config_delete",
            WriteKind::AgentRole => "agent_role",
            WriteKind::NodeAnnotate => "node_annotate",
            WriteKind::Status => "status",
            WriteKind::SealingKey => "sealing_key",
            WriteKind::Cache => "cache",
        }
    }
}

/// Why one write did not happen.
#[derive(Debug, Error)]
pub enum WriteFailure {
    #[error("the API server refused: {0}")]
    Api(#[source] kube::Error),
    #[error("no answer within {}s", WRITE_TIMEOUT.as_secs())]
    Timeout,
    #[error("Node {node} publishes an unusable public key: {detail}")]
    BadPublicKey { node: String, detail: String },
    #[error("Secret {0} has a config's name but not the content its name says; it was replaced")]
    Forged(String),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheWriteError),
}

impl WriteFailure {
    /// A label for metrics: what went wrong, in a word.
    pub fn reason(&self) -> &'static str {
        match self {
            WriteFailure::Api(kube::Error::Api(e)) => match e.code {
                404 => "not_found",
                409 => "conflict",
                403 => "forbidden",
                422 => "invalid",
                429 => "throttled",
                c if c >= 500 => "server_error",
                _ => "refused",
            },
            WriteFailure::Api(_) => "transport",
            WriteFailure::Timeout => "timeout",
            WriteFailure::BadPublicKey { .. } => "bad_public_key",
            WriteFailure::Forged(_) => "forged",
            WriteFailure::Cache(crate::cache::CacheWriteError::Api {
                source: kube::Error::Api(e),
                ..
            }) if e.code == 403 => "forbidden",
            WriteFailure::Cache(_) => "cache",
        }
    }

    /// Whether the object is gone, so that writing it again is pointless.
    pub fn is_gone(&self) -> bool {
        matches!(self, WriteFailure::Api(kube::Error::Api(e)) if e.code == 404)
    }
}

/// A write that failed, and what it was.
#[derive(Debug, Error)]
#[error("{action}: {failure}")]
pub struct WriteError {
    /// What was being written, e.g. `create Secret regmirror-system/regmirror-config-…`.
    pub action: String,
    pub kind: WriteKind,
    #[source]
    pub failure: WriteFailure,
}

/// The writes of one pass that failed; empty when all went through.
#[derive(Debug, Default, Error)]
#[error("{} write(s) failed, first: {}", .0.len(), .0.first().map(ToString::to_string).unwrap_or_default())]
pub struct WriteErrors(pub Vec<WriteError>);

/// Where the writes go.
pub struct Writer {
    pub client: kube::Client,
    pub namespace: String,
    /// The Role through which agents read configs.
    pub agent_role: String,
    pub events: EventPublisher,
}

impl Writer {
    /// Writes `decision`, sealing configs and their keys with `key`. Every write is tried;
    /// the ones that failed come back (and are counted in `metrics`). `reference` names the
    /// RegistryMirror of that name, for its Events.
    pub async fn write(
        &self,
        decision: &Decision,
        key: &SealingKey,
        metrics: &Metrics,
        reference: impl Fn(&str) -> ObjectReference,
    ) -> Result<(), WriteErrors> {
        let mut errors = Vec::new();
        let mut record = |kind: WriteKind, action: String, result: Result<(), WriteFailure>| {
            metrics.written(kind, result.as_ref().err());
            match result {
                Ok(()) => true,
                Err(failure) => {
                    if failure.is_gone() {
                        tracing::info!(%action, "the object is gone; nothing to write");
                    } else {
                        tracing::warn!(%action, error = %failure, "write failed");
                    }
                    errors.push(WriteError {
                        action,
                        kind,
                        failure,
                    });
                    false
                }
            }
        };

        let mut unstored = BTreeSet::new();
        for (name, config) in &decision.create {
            let result = self
                .create_config(name, config, key)
                .instrument(tracing::info_span!("store_config", config = %name))
                .await;
            if !record(
                WriteKind::ConfigCreate,
                format!("create Secret {}/{name}", self.namespace),
                result,
            ) {
                unstored.insert(name.as_str());
            }
        }
        let role_updated = match &decision.agent_role {
            Some(names) => record(
                WriteKind::AgentRole,
                format!("update Role {}/{}", self.namespace, self.agent_role),
                self.grant_configs(names).await,
            ),
            None => true,
        };
        let mut pointable = Vec::new();
        for advance in decision.advance.iter().chain(&decision.rekey) {
            if unstored.contains(advance.config.as_str()) || !role_updated {
                tracing::info!(node = %advance.node, config = %advance.config, "not pointing the node at a config its agent cannot read yet");
            } else {
                pointable.push(advance);
            }
        }
        // Each Node write stands alone: a few in flight, so that a change reaching thousands
        // of nodes is not paced by one round trip after another.
        let mut waiting = pointable.into_iter();
        let mut in_flight = FuturesUnordered::new();
        loop {
            while in_flight.len() < NODE_WRITES_IN_FLIGHT {
                let Some(advance) = waiting.next() else { break };
                in_flight.push(self.point_node_traced(advance, key));
            }
            let Some((advance, result)) = in_flight.next().await else {
                break;
            };
            record(
                WriteKind::NodeAnnotate,
                format!("annotate Node {}", advance.node),
                result,
            );
        }
        for (mirror, status) in &decision.statuses {
            let api: Api<RegistryMirror> = Api::all(self.client.clone());
            let patch = json!({
                "apiVersion": "regmirror.io/v1alpha1",
                "kind": "RegistryMirror",
                "status": status,
            });
            let result = timed(api.patch_status(mirror, &apply_params(), &Patch::Apply(&patch)))
                .instrument(tracing::info_span!("status", mirror = %mirror))
                .await
                .map(drop);
            record(
                WriteKind::Status,
                format!("update status of RegistryMirror {mirror}"),
                result,
            );
        }
        for name in &decision.delete {
            tracing::info!(config = %name, "deleting unused config");
            let result = match timed(self.secrets().delete(name, &DeleteParams::default())).await {
                Err(f) if f.is_gone() => Ok(()),
                other => other.map(drop),
            };
            record(
                WriteKind::ConfigDelete,
                format!("delete Secret {}/{name}", self.namespace),
                result,
            );
        }
        for notice in &decision.notices {
            // An Event that cannot be recorded is no reason to stop, nor to wait: bounded like
            // every write, so a stuck Event call never holds back the next pass.
            let (what, subject) = (occurrence(notice), reference(&notice.mirror));
            if let Err(e) = timed(self.events.publish(&what, &subject)).await {
                tracing::warn!(error = %e, reason = notice.reason, "recording an Event failed");
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(WriteErrors(errors))
        }
    }

    /// Creates the operator's sealing key: 32 random bytes in a Secret only the operator
    /// reads. Another replica creating it first is fine: the next pass reads theirs.
    pub async fn create_sealing_key(&self, metrics: &Metrics) -> Result<(), WriteError> {
        let mut key = [0u8; regmirror_core::seal::KEY_LEN];
        getrandom::fill(&mut key).expect("the operating system provides randomness");
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(SEALING_KEY_SECRET.to_owned()),
                labels: Some([(MANAGED_BY.to_owned(), MANAGER.to_owned())].into()),
                ..Default::default()
            },
            type_: Some("Opaque".to_owned()),
            immutable: Some(true),
            data: Some(
                [(
                    SEALING_KEY_DATA.to_owned(),
                    k8s_openapi::ByteString(key.to_vec()),
                )]
                .into(),
            ),
            ..Default::default()
        };
        tracing::info!(secret = SEALING_KEY_SECRET, "creating the sealing key");
        let result = match timed(self.secrets().create(&PostParams::default(), &secret)).await {
            Err(WriteFailure::Api(kube::Error::Api(e))) if e.code == 409 => Ok(()),
            other => other.map(drop),
        };
        metrics.written(WriteKind::SealingKey, result.as_ref().err());
        result.map_err(|failure| WriteError {
            action: format!("create Secret {}/{SEALING_KEY_SECRET}", self.namespace),
            kind: WriteKind::SealingKey,
            failure,
        })
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Stores a config as an immutable, sealed Secret. One of that name that exists already
    /// is reused only if it opens and holds exactly this config; anything else squatting on
    /// the name is replaced.
    async fn create_config(
        &self,
        name: &str,
        config: &RenderedConfig,
        key: &SealingKey,
    ) -> Result<(), WriteFailure> {
        tracing::info!(config = %name, files = config.files.len(), "storing config");
        let secret = config_secret(name, key.seal_config(name, config));
        match timed(self.secrets().create(&PostParams::default(), &secret)).await {
            Err(WriteFailure::Api(kube::Error::Api(e))) if e.code == 409 => {}
            other => return other.map(drop),
        }
        let existing = timed(self.secrets().get(name)).await?;
        let genuine = sealed_config(&existing)
            .ok()
            .and_then(|sealed| key.open_config(name, sealed).ok())
            .is_some_and(|c| c == *config);
        if genuine {
            return Ok(());
        }
        tracing::warn!(config = %name, "a Secret squats on a config's name with other content; replacing it");
        timed(self.secrets().delete(name, &DeleteParams::default())).await?;
        timed(self.secrets().create(&PostParams::default(), &secret)).await?;
        Err(WriteFailure::Forged(name.to_owned()))
    }

    /// [`Self::point_node`] in a span naming the node, answering which node it was for.
    async fn point_node_traced<'a>(
        &self,
        advance: &'a Advance,
        key: &SealingKey,
    ) -> (&'a Advance, Result<(), WriteFailure>) {
        let span =
            tracing::info_span!("point_node", node = %advance.node, config = %advance.config);
        (
            advance,
            self.point_node(advance, key).instrument(span).await,
        )
    }

    /// Points a node at its config: which one, the step it takes, and the key to open it,
    /// sealed to the node's own public key — in one write.
    async fn point_node(&self, advance: &Advance, key: &SealingKey) -> Result<(), WriteFailure> {
        tracing::info!(activation = %advance.activation, "node told to apply config");
        let public = NodePublicKey::from_text(&advance.public_key).map_err(|e| {
            WriteFailure::BadPublicKey {
                node: advance.node.clone(),
                detail: e.to_string(),
            }
        })?;
        let patch = json!({"metadata": {"annotations": {
            DESIRED_CONFIG: advance.config,
            DESIRED_ACTIVATION: advance.activation.as_str(),
            CONFIG_KEY: key.seal_key_for(&advance.config, &public),
        }}});
        let api: Api<Node> = Api::all(self.client.clone());
        timed(api.patch(
            &advance.node,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ))
        .await
        .map(drop)
    }

    /// Lets the agents `get` exactly these Secrets.
    async fn grant_configs(&self, names: &[String]) -> Result<(), WriteFailure> {
        let role = agent_role(&self.agent_role, names);
        let mut body = serde_json::to_value(&role).expect("a Role serializes");
        body["apiVersion"] = json!("rbac.authorization.k8s.io/v1");
        body["kind"] = json!("Role");
        let api: Api<Role> = Api::namespaced(self.client.clone(), &self.namespace);
        timed(api.patch(&self.agent_role, &apply_params(), &Patch::Apply(&body)))
            .await
            .map(drop)
    }
}

/// One API call, bounded by [`WRITE_TIMEOUT`].
async fn timed<T>(call: impl Future<Output = Result<T, kube::Error>>) -> Result<T, WriteFailure> {
    match tokio::time::timeout(WRITE_TIMEOUT, call).await {
        Ok(result) => result.map_err(WriteFailure::Api),
        Err(_) => Err(WriteFailure::Timeout),
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

fn occurrence(notice: &Notice) -> Occurrence<'_> {
    Occurrence {
        warning: notice.warning,
        reason: notice.reason,
        action: notice.action,
        note: &notice.note,
    }
}
