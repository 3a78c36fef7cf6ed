//! The commands. `controller` runs the operator in a cluster; `render`, `validate` and
//! `crdgen` need no cluster: they read the same YAML a user would `kubectl apply`.

mod check;
pub mod controller;
pub mod crdgen;
pub mod plan;
pub mod render;
pub mod resolve;
pub mod sync_images;
pub mod uninstall_cleanup;
pub mod validate;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use check::{check, Checked, Problem};

/// The operator's namespace when none is given: references without a namespace point here.
pub const DEFAULT_NAMESPACE: &str = "regmirror-system";

/// regmirror: registry mirrors, credentials and CAs for every node of a cluster.
#[derive(Debug, Parser)]
#[command(name = "regmirror", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator (in the cluster, as the Helm chart's Deployment does).
    Controller(controller::ControllerArgs),
    /// Print (or write) the exact files one node gets, from RegistryMirror + Secret YAML.
    Render(render::RenderArgs),
    /// Preview what manifests would do to the nodes: live, reload or restart, how many, in
    /// how many waves.
    Plan(plan::PlanArgs),
    /// Show where a node would pull an image from: endpoints in order, credentials, TLS files.
    Resolve(resolve::ResolveArgs),
    /// Check RegistryMirror YAML as the operator would; exit 1 naming each problem.
    Validate(validate::ValidateArgs),
    /// Print the CustomResourceDefinition (or write it into a directory).
    Crdgen(crdgen::CrdgenArgs),
    /// Copy images from their registries into a RegistryMirror's endpoint (air gap).
    SyncImages(sync_images::SyncImagesArgs),
    /// Before an uninstall (the chart's pre-delete hook): stop the operator, have every agent
    /// take regmirror off its node, wait until all did.
    UninstallCleanup(uninstall_cleanup::UninstallCleanupArgs),
}

/// Where the manifests are, and the namespace rules for their references.
#[derive(Debug, clap::Args)]
pub struct InputArgs {
    /// YAML files or directories (their *.yaml / *.yml files, not recursively).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// The operator's namespace: the default for references and for objects without one.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Further namespaces references may point into.
    #[arg(long = "allow-namespace", value_name = "NAMESPACE")]
    pub allowed_namespaces: Vec<String>,
    /// Where mirrors' pull-through caches are: their Service's cluster IP, for every cached
    /// mirror or (`MIRROR=ADDRESS`, repeated) per mirror. Offline, a cache is otherwise shown
    /// at its Service's name.
    #[arg(long = "cache-address", value_name = "[MIRROR=]ADDRESS")]
    pub cache_addresses: Vec<String>,
    /// The caches' CA (PEM), as `kubectl get secret -n <namespace> regmirror-cache-ca -o
    /// jsonpath='{.data.tls\.crt}' | base64 -d` prints it; also read from that Secret when it is
    /// among the manifests.
    #[arg(long = "cache-ca", value_name = "FILE")]
    pub cache_ca: Option<PathBuf>,
    /// The caches' namespace (the chart's `cache.namespace`).
    #[arg(long = "cache-namespace", default_value = regmirror_core::cache::DEFAULT_NAMESPACE)]
    pub cache_namespace: String,
}

/// Runs one command; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    let command = match cli.command {
        // The operator logs from every thread of its runtime: stdout and stderr must not stay
        // locked on this one while it runs, or the first line from any other thread waits
        // forever.
        Command::Controller(args) => {
            return match controller::run(args) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!(error = %e, "regmirror controller stopped");
                    1
                }
            }
        }
        // Progress lines and the bar are written from the runtime's threads too.
        Command::SyncImages(args) => return sync_images::main(args),
        Command::UninstallCleanup(args) => return uninstall_cleanup::main(args),
        command => command,
    };
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    let result = match command {
        Command::Controller(_) | Command::SyncImages(_) | Command::UninstallCleanup(_) => {
            unreachable!("handled above")
        }
        Command::Render(args) => render::run(&args, &mut stdout, &mut stderr),
        Command::Plan(args) => plan::run(&args, &mut stdout, &mut stderr).or_else(|e| {
            use std::io::Write;
            writeln!(stderr, "error: {e}")?;
            Ok(match e {
                plan::PlanError::Invalid(_) | plan::PlanError::NoNodes => 1,
                _ => 2,
            })
        }),
        Command::Resolve(args) => resolve::run(&args, &mut stdout, &mut stderr),
        Command::Validate(args) => validate::run(&args, &mut stdout, &mut stderr),
        Command::Crdgen(args) => crdgen::run(&args, &mut stdout),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(stderr, "error: {e}");
            2
        }
    }
}
