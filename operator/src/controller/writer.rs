//! Carries a decision out against the API server, in the order that keeps every node safe:
//! configs exist and agents may read them before any node is pointed at them; statuses after;
//! unused configs are deleted last.

use k8s_openapi::api::core::v1::{Node, ObjectReference, Secret};
use k8s_openapi::api::rbac::v1::Role;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use regmirror_core::api::RegistryMirror;
use regmirror_core::contract::{agent_role, config_secret, DESIRED_CONFIG};
use regmirror_core::decide::{Decision, Notice, Subject};
use regmirror_core::render::RenderedConfig;
use serde_json::json;
use thiserror::Error;

/// The field manager regmirror's writes are recorded under.
pub const FIELD_MANAGER: &str = "regmirror";

/// A write the API server refused.
#[derive(Debug, Error)]
#[error("{action}: {source}")]
pub struct WriteError {
    /// What was being written, e.g. `create Secret regmirror-system/regmirror-config-…`.
    pub action: String,
    #[source]
    pub source: kube::Error,
}

/// Where the writes go.
pub struct Writer {
    pub client: kube::Client,
    pub namespace: String,
    /// The Role through which agents read configs.
    pub agent_role: String,
    pub recorder: Recorder,
}

impl Writer {
    /// Writes `decision`; stops at the first refusal (the next pass decides again).
    /// `reference` names the object an Event is about.
    pub async fn write(
        &self,
        decision: &Decision,
        reference: impl Fn(&Subject) -> ObjectReference,
    ) -> Result<(), WriteError> {
        for (name, config) in &decision.create {
            self.create_config(name, config).await?;
        }
        if let Some(names) = &decision.agent_role {
            self.grant_configs(names).await?;
        }
        for (node, config) in &decision.advance {
            tracing::info!(node = %node, config = %config, "node told to apply config");
            let patch = json!({"metadata": {"annotations": {DESIRED_CONFIG: config}}});
            let api: Api<Node> = Api::all(self.client.clone());
            api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(failed(format!("annotate Node {node}")))?;
        }
        for (mirror, status) in &decision.statuses {
            let api: Api<RegistryMirror> = Api::all(self.client.clone());
            let patch = json!({
                "apiVersion": "regmirror.io/v1alpha1",
                "kind": "RegistryMirror",
                "status": status,
            });
            api.patch_status(mirror, &apply_params(), &Patch::Apply(&patch))
                .await
                .map_err(failed(format!("update status of RegistryMirror {mirror}")))?;
        }
        for name in &decision.delete {
            tracing::info!(config = %name, "deleting unused config");
            match self.secrets().delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    return Err(failed(format!("delete Secret {}/{name}", self.namespace))(
                        e,
                    ))
                }
            }
        }
        for notice in &decision.notices {
            // An Event that cannot be recorded is no reason to stop.
            if let Err(e) = self
                .recorder
                .publish(&event(notice), &reference(&notice.subject))
                .await
            {
                tracing::warn!(error = %e, reason = notice.reason, "recording an Event failed");
            }
        }
        Ok(())
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Stores a config as an immutable Secret. One that exists already is the same config:
    /// its name is its content's digest.
    async fn create_config(&self, name: &str, config: &RenderedConfig) -> Result<(), WriteError> {
        tracing::info!(config = %name, files = config.files.len(), "storing config");
        let secret = config_secret(name, config);
        match self.secrets().create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(failed(format!("create Secret {}/{name}", self.namespace))(
                e,
            )),
        }
    }

    /// Lets the agents `get` exactly these Secrets.
    async fn grant_configs(&self, names: &[String]) -> Result<(), WriteError> {
        let role = agent_role(&self.agent_role, names);
        let mut body = serde_json::to_value(&role).expect("a Role serializes");
        body["apiVersion"] = json!("rbac.authorization.k8s.io/v1");
        body["kind"] = json!("Role");
        let api: Api<Role> = Api::namespaced(self.client.clone(), &self.namespace);
        api.patch(&self.agent_role, &apply_params(), &Patch::Apply(&body))
            .await
            .map_err(failed(format!(
                "update Role {}/{}",
                self.namespace, self.agent_role
            )))?;
        Ok(())
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

fn failed(action: String) -> impl FnOnce(kube::Error) -> WriteError {
    move |source| WriteError { action, source }
}

fn event(notice: &Notice) -> Event {
    Event {
        type_: if notice.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: notice.reason.to_owned(),
        note: Some(notice.note.clone()),
        action: match notice.subject {
            Subject::Node(_) => "Rollout".to_owned(),
            Subject::Mirror(_) => "Reconcile".to_owned(),
        },
        secondary: None,
    }
}
