//! `regmirror uninstall-cleanup`: what the chart's pre-delete hook Job runs, so that `helm
//! uninstall` leaves every node as it was before regmirror.
//!
//! 1. The operator Deployment is scaled to 0: no new configuration is told to any node.
//! 2. The agent DaemonSet is patched to run `regmirror-agent cleanup --hold` (its pods take
//!    regmirror's files off their node, put the hand-written files back, delete the agent's
//!    state, then report Ready and hold until Helm deletes the DaemonSet), with the update
//!    strategy's `maxUnavailable` at 100% (and `maxSurge` 0) so every node goes at once and no
//!    node ever runs two agents; its state volume is mounted one level up, so that the state
//!    directory can be deleted ([`hold_patch`]).
//! 3. It waits until the DaemonSet's rollout is complete and every pod Ready: the new
//!    generation observed, every scheduled pod updated and Ready. Progress is printed; on
//!    timeout the error says how far it got.
//!
//! Requests that fail for a reason that may pass (the hook's RoleBinding not yet seen by the
//! authorizer, a conflict, the API server busy or unreachable) are tried again until the
//! timeout; a missing Deployment or DaemonSet is reported and skipped.

use std::fmt;
use std::io::Write;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;
use thiserror::Error;
use tokio::time::Instant;

use super::DEFAULT_NAMESPACE;

/// The arguments of `regmirror uninstall-cleanup`.
#[derive(Debug, clap::Args)]
pub struct UninstallCleanupArgs {
    /// The namespace of the operator Deployment and the agent DaemonSet.
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// The agent DaemonSet.
    #[arg(long, default_value = "regmirror-agent")]
    pub daemonset: String,
    /// The agent's container in it.
    #[arg(long, default_value = "agent")]
    pub container: String,
    /// The operator Deployment.
    #[arg(long, default_value = "regmirror-operator")]
    pub deployment: String,
    /// Seconds to wait for every node to be cleaned up.
    #[arg(long, default_value_t = 180)]
    pub timeout: u64,
}

/// What to clean up, and how long to wait.
#[derive(Clone, Debug)]
pub struct Settings {
    pub namespace: String,
    pub daemonset: String,
    pub container: String,
    pub deployment: String,
    pub timeout: Duration,
    /// How often the DaemonSet is read (and a failed request tried again).
    pub poll: Duration,
}

impl From<&UninstallCleanupArgs> for Settings {
    fn from(args: &UninstallCleanupArgs) -> Self {
        Settings {
            namespace: args.namespace.clone(),
            daemonset: args.daemonset.clone(),
            container: args.container.clone(),
            deployment: args.deployment.clone(),
            timeout: Duration::from_secs(args.timeout),
            poll: Duration::from_secs(2),
        }
    }
}

/// Why the nodes were not (all) cleaned up.
#[derive(Debug, Error)]
pub enum UninstallCleanupError {
    #[error("cannot start the async runtime: {0}")]
    AsyncRuntime(#[source] std::io::Error),
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot scale Deployment {namespace}/{name} to 0 replicas: {source}")]
    ScaleDown {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot read DaemonSet {namespace}/{name}: {source}")]
    Read {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("DaemonSet {namespace}/{name} is not the chart's agent DaemonSet: {why}")]
    Unusable {
        namespace: String,
        name: String,
        why: String,
    },
    #[error(
        "cannot patch DaemonSet {namespace}/{name} to run `regmirror-agent cleanup --hold`: {source}"
    )]
    Patch {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the nodes were not all cleaned up within {timeout:?}: DaemonSet {namespace}/{name}: {progress}{}; \
         a node whose agent is not Ready keeps regmirror's files, and its agent's log says why \
         (kubectl -n {namespace} logs -l app.kubernetes.io/component=agent)",
        last_error.as_ref().map(|e| format!(" (last read failed: {e})")).unwrap_or_default()
    )]
    Timeout {
        namespace: String,
        name: String,
        timeout: Duration,
        progress: Progress,
        last_error: Option<kube::Error>,
    },
    #[error("cannot write the progress: {0}")]
    Output(#[source] std::io::Error),
}

/// How far the DaemonSet's rollout to `cleanup --hold` is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The generation the patch made, and the one the DaemonSet controller has seen.
    pub generation: i64,
    pub observed: i64,
    pub desired: i32,
    pub updated: i32,
    pub ready: i32,
}

impl Progress {
    fn of(ds: &DaemonSet, generation: i64) -> Self {
        let status = ds.status.clone().unwrap_or_default();
        Progress {
            generation,
            observed: status.observed_generation.unwrap_or(0),
            desired: status.desired_number_scheduled,
            updated: status.updated_number_scheduled.unwrap_or(0),
            ready: status.number_ready,
        }
    }

    /// Every node's agent runs the cleanup and has reported it done.
    pub fn complete(&self) -> bool {
        self.observed >= self.generation
            && self.updated == self.desired
            && self.ready == self.desired
    }
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.observed < self.generation {
            return write!(
                f,
                "the DaemonSet controller has not seen the change yet (generation {} observed {})",
                self.generation, self.observed
            );
        }
        write!(
            f,
            "{} of {} agents running the cleanup, {} of {} Ready",
            self.updated, self.desired, self.ready, self.desired
        )
    }
}

/// Whether a failed request may succeed if tried again.
fn transient(e: &kube::Error) -> bool {
    match e {
        // 403: the hook's RoleBinding may not have reached the authorizer yet.
        kube::Error::Api(status) => matches!(status.code, 403 | 409 | 429 | 500..=599),
        _ => true,
    }
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 404)
}

/// Tries `op` again while it fails for a transient reason and the deadline allows.
async fn retrying<T, F, Fut>(
    what: &str,
    deadline: Instant,
    poll: Duration,
    out: &mut impl Write,
    mut op: F,
) -> Result<Result<T, kube::Error>, UninstallCleanupError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    loop {
        match op().await {
            Err(e) if transient(&e) && Instant::now() + poll < deadline => {
                writeln!(out, "{what} failed, trying again: {e}")
                    .map_err(UninstallCleanupError::Output)?;
                tokio::time::sleep(poll).await;
            }
            result => return Ok(result),
        }
    }
}

fn no_daemonset(settings: &Settings) -> String {
    format!(
        "DaemonSet {}/{} not found: no agent to clean the nodes up with; \
         the nodes keep whatever regmirror last wrote",
        settings.namespace, settings.daemonset
    )
}

/// Where the agent sees its state directory (`/var/lib/regmirror` of the node).
pub const STATE_MOUNT: &str = "/host/var/lib/regmirror";
/// Where the cleanup pods see the state directory's parent instead.
pub const STATE_PARENT_MOUNT: &str = "/host/var/lib";

/// What the cleanup pods run.
const HOLD_ARGS: [&str; 2] = ["cleanup", "--hold"];

/// Every node at once, never two agents on a node.
fn hold_strategy() -> serde_json::Value {
    json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "100%", "maxSurge": 0}})
}

/// The strategic merge patch that has the DaemonSet's pods run `cleanup --hold`.
///
/// Besides the command and the update strategy it moves the state volume one level up: the
/// agent's state directory is the volume mounted at [`STATE_MOUNT`], and a mount point cannot
/// be removed from inside the container (EBUSY). The cleanup pods mount the hostPath's parent
/// at [`STATE_PARENT_MOUNT`] instead, so the state directory is a plain directory there and
/// `cleanup` deletes it from the node. Only these pods, which hold until Helm deletes the
/// DaemonSet, see more of the node's `/var/lib`.
pub fn hold_patch(
    ds: &DaemonSet,
    settings: &Settings,
) -> Result<serde_json::Value, UninstallCleanupError> {
    let unusable = |why: String| UninstallCleanupError::Unusable {
        namespace: settings.namespace.clone(),
        name: settings.daemonset.clone(),
        why,
    };
    let pod = ds
        .spec
        .template
        .spec
        .as_ref()
        .ok_or_else(|| unusable("it has no pod template".into()))?;
    let container = pod
        .containers
        .iter()
        .find(|c| c.name == settings.container)
        .ok_or_else(|| unusable(format!("it has no container {}", settings.container)))?;
    let holding = container
        .args
        .as_ref()
        .is_some_and(|args| args.iter().eq(HOLD_ARGS))
        && container
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == STATE_PARENT_MOUNT);
    if holding {
        // A hook that ran before (an uninstall tried again after a timeout) patched it
        // already: its pods keep cleaning up; the patch only says so again.
        return Ok(json!({
            "spec": {
                "updateStrategy": hold_strategy(),
                "template": {"spec": {"containers": [{
                    "name": settings.container,
                    "args": HOLD_ARGS,
                }]}},
            }
        }));
    }
    let volume = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == STATE_MOUNT)
        .map(|m| m.name.clone())
        .ok_or_else(|| {
            unusable(format!(
                "container {} mounts nothing at {STATE_MOUNT}",
                settings.container
            ))
        })?;
    let host_path = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == volume)
        .and_then(|v| v.host_path.as_ref())
        .map(|h| h.path.trim_end_matches('/').to_owned())
        .ok_or_else(|| unusable(format!("volume {volume} is not a hostPath")))?;
    let parent = match host_path.rsplit_once('/') {
        Some((parent, "regmirror")) if !parent.is_empty() => parent.to_owned(),
        _ => {
            return Err(unusable(format!(
                "volume {volume} is host path {host_path}, not a directory named regmirror"
            )))
        }
    };
    Ok(json!({
        "spec": {
            "updateStrategy": hold_strategy(),
            "template": {"spec": {
                "containers": [{
                    "name": settings.container,
                    "args": HOLD_ARGS,
                    "volumeMounts": [
                        {"$patch": "delete", "mountPath": STATE_MOUNT},
                        {"name": volume, "mountPath": STATE_PARENT_MOUNT},
                    ],
                }],
                "volumes": [
                    {"name": volume, "hostPath": {"path": parent, "type": "Directory"}},
                ],
            }},
        }
    }))
}

/// Stops the operator, has every agent clean its node up, and waits until all did.
pub async fn clean_up(
    client: kube::Client,
    settings: &Settings,
    out: &mut impl Write,
) -> Result<(), UninstallCleanupError> {
    let ns = &settings.namespace;
    let deadline = Instant::now() + settings.timeout;
    let params = PatchParams::default();
    let say = |out: &mut dyn Write, line: String| {
        writeln!(out, "{line}").map_err(UninstallCleanupError::Output)
    };

    // 1. No operator, so no node is told a new configuration.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let scale = Patch::Merge(json!({"spec": {"replicas": 0}}));
    let what = format!("scaling Deployment {ns}/{} to 0", settings.deployment);
    match retrying(&what, deadline, settings.poll, out, || {
        deployments.patch_scale(&settings.deployment, &params, &scale)
    })
    .await?
    {
        Ok(_) => say(
            out,
            format!(
                "Deployment {ns}/{} scaled to 0: the operator tells no node a new configuration",
                settings.deployment
            ),
        )?,
        Err(e) if not_found(&e) => say(
            out,
            format!(
                "Deployment {ns}/{} not found: no operator to stop",
                settings.deployment
            ),
        )?,
        Err(source) => {
            return Err(UninstallCleanupError::ScaleDown {
                namespace: ns.clone(),
                name: settings.deployment.clone(),
                source,
            })
        }
    }

    // 2. Every agent cleans its node up, all at once.
    let daemonsets: Api<DaemonSet> = Api::namespaced(client, ns);
    let what = format!("reading DaemonSet {ns}/{}", settings.daemonset);
    let current = match retrying(&what, deadline, settings.poll, out, || {
        daemonsets.get(&settings.daemonset)
    })
    .await?
    {
        Ok(ds) => ds,
        Err(e) if not_found(&e) => return say(out, no_daemonset(settings)),
        Err(source) => {
            return Err(UninstallCleanupError::Read {
                namespace: ns.clone(),
                name: settings.daemonset.clone(),
                source,
            })
        }
    };
    let hold = Patch::Strategic(hold_patch(&current, settings)?);
    let what = format!("patching DaemonSet {ns}/{}", settings.daemonset);
    let patched = match retrying(&what, deadline, settings.poll, out, || {
        daemonsets.patch(&settings.daemonset, &params, &hold)
    })
    .await?
    {
        Ok(ds) => ds,
        Err(e) if not_found(&e) => return say(out, no_daemonset(settings)),
        Err(source) => {
            return Err(UninstallCleanupError::Patch {
                namespace: ns.clone(),
                name: settings.daemonset.clone(),
                source,
            })
        }
    };
    let generation = patched.metadata.generation.unwrap_or(0);
    say(
        out,
        format!(
            "DaemonSet {ns}/{} runs `regmirror-agent cleanup --hold` on every node (generation {generation})",
            settings.daemonset
        ),
    )?;

    // 3. Until every node is done.
    let mut shown: Option<Progress> = None;
    let mut last_error;
    loop {
        match daemonsets.get(&settings.daemonset).await {
            Ok(ds) => {
                last_error = None;
                let progress = Progress::of(&ds, generation);
                if shown.as_ref() != Some(&progress) {
                    say(out, format!("{progress}"))?;
                }
                if progress.complete() {
                    return say(
                        out,
                        format!(
                            "every node is cleaned up ({} of {}): regmirror's files removed, \
                             hand-written files put back, /var/lib/regmirror deleted",
                            progress.ready, progress.desired
                        ),
                    );
                }
                shown = Some(progress);
            }
            Err(e) => {
                say(
                    out,
                    format!(
                        "reading DaemonSet {ns}/{} failed, trying again: {e}",
                        settings.daemonset
                    ),
                )?;
                last_error = Some(e);
            }
        }
        if Instant::now() + settings.poll >= deadline {
            return Err(UninstallCleanupError::Timeout {
                namespace: ns.clone(),
                name: settings.daemonset.clone(),
                timeout: settings.timeout,
                progress: shown.unwrap_or(Progress {
                    generation,
                    ..Progress::default()
                }),
                last_error,
            });
        }
        tokio::time::sleep(settings.poll).await;
    }
}

/// Runs the command; returns the process exit code.
pub fn main(args: UninstallCleanupArgs) -> i32 {
    let settings = Settings::from(&args);
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(UninstallCleanupError::AsyncRuntime)
        .and_then(|runtime| {
            runtime.block_on(async {
                let client = kube::Client::try_default()
                    .await
                    .map_err(UninstallCleanupError::Client)?;
                clean_up(client, &settings, &mut std::io::stdout()).await
            })
        });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
