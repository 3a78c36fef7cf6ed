//! `regmirror controller`: the operator itself, as the Deployment runs it.

use std::net::SocketAddr;

use regmirror_core::plan::MaxUnavailable;

use crate::controller::{self, ControllerError, Settings};

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot build a Kubernetes client (in-cluster config or KUBECONFIG): {0}")]
    Client(kube::Error),
    #[error(transparent)]
    Controller(#[from] ControllerError),
}

#[derive(Debug, clap::Args)]
pub struct ControllerArgs {
    /// The operator's namespace (configs live here; references default here).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// Further namespaces whose Secrets and ConfigMaps RegistryMirrors may reference.
    #[arg(
        long,
        env = "REGMIRROR_ALLOWED_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    pub allowed_namespaces: Vec<String>,
    /// How many nodes may restart their runtime at once: a number or a percentage.
    #[arg(long, env = "REGMIRROR_MAX_UNAVAILABLE", default_value = "1")]
    pub max_unavailable: MaxUnavailable,
    /// The Role the operator keeps granting the agents `get` on live configs.
    #[arg(
        long,
        env = "REGMIRROR_AGENT_ROLE",
        default_value = "regmirror-agent-configs"
    )]
    pub agent_role: String,
    /// The Lease replicas elect their leader on.
    #[arg(long, default_value = "regmirror-controller")]
    pub lease_name: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    pub identity: String,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// The image RegistryMirrors' pull-through caches run: the distribution registry, version
    /// 3 (2.8 cannot log in to a basic-auth upstream).
    #[arg(long, env = "REGMIRROR_CACHE_IMAGE", default_value = DEFAULT_CACHE_IMAGE)]
    pub cache_image: String,
    /// The namespace the caches run in: one of their own, which the chart labels for Pod
    /// Security `restricted`.
    #[arg(long, env = "REGMIRROR_CACHE_NAMESPACE", default_value = regmirror_core::cache::DEFAULT_NAMESPACE)]
    pub cache_namespace: String,
}

/// The distribution registry's official image.
pub const DEFAULT_CACHE_IMAGE: &str = "docker.io/library/registry:3";

/// Runs the operator until SIGTERM.
pub fn run(args: ControllerArgs) -> Result<(), RunError> {
    regmirror_process::logging::init();
    let settings = Settings {
        namespace: args.namespace,
        allowed_namespaces: args
            .allowed_namespaces
            .into_iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect(),
        max_unavailable: args.max_unavailable,
        agent_role: args.agent_role,
        lease_name: args.lease_name,
        identity: args.identity,
        listen: args.listen,
        cache_image: args.cache_image,
        cache_namespace: args.cache_namespace,
    };
    tracing::info!(
        namespace = %settings.namespace,
        allowed_namespaces = ?settings.allowed_namespaces,
        max_unavailable = ?settings.max_unavailable,
        "starting regmirror controller"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .map_err(RunError::Client)?;
        Ok(controller::run(client, settings).await?)
    })
}
