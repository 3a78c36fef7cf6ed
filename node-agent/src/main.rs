//! `regmirror-agent`: `run` is the DaemonSet's agent. The other commands are for a person on
//! the node: `apply` reads a configuration (the `config.json` of a config Secret) and puts it
//! onto the host through the journal; `rollback` returns to the last verified configuration;
//! `recover` finishes or discards an apply a crash interrupted; `cleanup` takes regmirror off
//! the node before an uninstall (`cleanup --hold`: the DaemonSet's command while the chart's
//! uninstall hook runs); `resolve` shows where an image's pull goes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use regmirror_core::contract::config_secret_name;
use regmirror_core::node::{Flavor, UnknownFlavor};
use regmirror_core::render::RenderedConfig;
use regmirror_node_agent::agent::Timeouts;
use regmirror_node_agent::hostfs::{HostError, HostFs};
use regmirror_node_agent::watch::{self, Settings};
use thiserror::Error;

#[derive(Parser)]
#[command(name = "regmirror-agent", version, about)]
struct Cli {
    /// The host's root filesystem, as mounted into the agent.
    #[arg(long, default_value = "/host")]
    root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch this node and apply what the operator names for it (the DaemonSet's command).
    Run(RunArgs),
    /// Put a rendered configuration (JSON) onto the host.
    Apply {
        /// The configuration: a file holding a config Secret's `config.json`.
        config: PathBuf,
        /// Record it as verified right away (the one a rollback returns to).
        #[arg(long)]
        mark_good: bool,
    },
    /// Put the last verified configuration back.
    Rollback,
    /// Finish or discard an interrupted apply.
    Recover,
    /// Take regmirror off this node before it is uninstalled: its files removed, hand-written
    /// files it replaced put back, its state (and the node's key) deleted.
    Cleanup(CleanupArgs),
    /// Show where this node's runtime pulls an image from, by the configuration applied here:
    /// endpoints in order, the repository asked of each, credentials (Secret names) and TLS
    /// files, the registry itself last (`kubectl exec` into the node's agent pod).
    Resolve {
        /// The image, as a Pod names it.
        image: String,
        /// `text` for a person, `json` for a program.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// This node's name (from the downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The operator's namespace, where the rendered configs are.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// `auto` detects it; or k3s, rke2 (either with +embedded-registry), containerd,
    /// containerd:<hosts dir>, cri-o.
    #[arg(long, env = "REGMIRROR_FLAVOR", default_value = "auto")]
    flavor: String,
    /// Run this (with `sh -c`) instead of restarting or reloading through systemd.
    #[arg(long, env = "REGMIRROR_RESTART_COMMAND")]
    restart_command: Option<String>,
    /// Seconds the runtime and the node get to be back after a restart.
    #[arg(long, env = "REGMIRROR_READY_TIMEOUT", default_value_t = 300)]
    ready_timeout: u64,
    /// Check that mirror endpoints answer before keeping a configuration.
    #[arg(long, env = "REGMIRROR_VERIFY_ENDPOINTS", default_value_t = true, action = clap::ArgAction::Set)]
    verify_endpoints: bool,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, default_value = "0.0.0.0:8081")]
    listen: SocketAddr,
}

#[derive(clap::Args)]
struct CleanupArgs {
    /// Then stay up until SIGTERM, serving /healthz, and /readyz answering 200 only once the
    /// cleanup succeeded (what the chart's uninstall hook has the DaemonSet run).
    #[arg(long)]
    hold: bool,
    /// Where /metrics, /healthz and /readyz are served with --hold.
    #[arg(long, default_value = "0.0.0.0:8081", requires = "hold")]
    listen: SocketAddr,
}

/// Why the agent command stopped.
#[derive(Debug, Error)]
enum CliError {
    #[error("--flavor: {0}")]
    Flavor(#[from] UnknownFlavor),
    #[error("cannot start the async runtime: {0}")]
    AsyncRuntime(#[source] std::io::Error),
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error(transparent)]
    Agent(#[from] watch::AgentError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] regmirror_core::route::BadImage),
    #[error(transparent)]
    Bind(#[from] regmirror_process::endpoints::BindError),
    #[error("cleanup failed (held until SIGTERM, not Ready): {0}")]
    Held(#[source] HostError),
    #[error("cannot write JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("{}: not a rendered config: {source}", path.display())]
    NotAConfig {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn run(root: PathBuf, args: RunArgs) -> Result<(), CliError> {
    regmirror_process::logging::init();
    let flavor = match args.flavor.as_str() {
        "auto" | "" => None,
        other => Some(other.parse::<Flavor>()?),
    };
    let settings = Settings {
        node_name: args.node_name,
        namespace: args.namespace,
        root,
        flavor,
        restart_command: args.restart_command.filter(|c| !c.trim().is_empty()),
        timeouts: Timeouts {
            ready: Duration::from_secs(args.ready_timeout),
            probe: args.verify_endpoints.then_some(Duration::from_secs(10)),
        },
        settle: Duration::from_secs(10),
        listen: args.listen,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::AsyncRuntime)?;
    runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .map_err(CliError::Client)?;
        Ok(watch::run(client, settings).await?)
    })
}

fn print_cleanup(done: &regmirror_node_agent::hostfs::Uninstalled) {
    println!(
        "removed: {}, restored: {}{}",
        done.removed.len(),
        done.restored.len(),
        if done.state_removed {
            ", state deleted"
        } else {
            ""
        }
    )
}

/// `cleanup --hold`: cleans the host up, then serves the endpoints until SIGTERM, Ready only if
/// the cleanup succeeded. A failed cleanup is logged and keeps the pod not Ready, so the
/// uninstall hook waiting for every pod Ready names the DaemonSet as unfinished.
fn cleanup_and_hold(host: &HostFs, listen: SocketAddr) -> Result<(), CliError> {
    regmirror_process::logging::init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::AsyncRuntime)?;
    runtime.block_on(async {
        let health =
            regmirror_process::endpoints::Health::new(prometheus_client::registry::Registry::default());
        tokio::spawn(regmirror_process::endpoints::serve(listen, health.clone()).await?);
        let failed = match host.uninstall() {
            Ok(done) => {
                tracing::info!(
                    removed = ?done.removed,
                    restored = ?done.restored,
                    state_deleted = done.state_removed,
                    "regmirror is off this node; holding until SIGTERM"
                );
                print_cleanup(&done);
                health.set_ready(true);
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "cleanup failed; this node keeps regmirror's files, holding not Ready until SIGTERM");
                Some(e)
            }
        };
        regmirror_process::shutdown::requested().await;
        match failed {
            Some(e) => Err(CliError::Held(e)),
            None => Ok(()),
        }
    })
}

/// Prints the route of `image` through the configuration applied on this host.
fn resolve(host: &HostFs, image: &str, output: &str) -> Result<(), CliError> {
    let Some(config) = host.current()? else {
        println!(
            "no configuration from regmirror is applied on this node: the runtime pulls {image} as configured without it"
        );
        return Ok(());
    };
    let route = regmirror_core::route::route(&config, image)?;
    if output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&route).map_err(CliError::Json)?
        );
    } else {
        print!("{route}");
    }
    Ok(())
}

fn main() {
    regmirror_process::memory::bound_allocator();
    let cli = Cli::parse();
    let host = HostFs::new(&cli.root);
    let result = match cli.command {
        Command::Run(args) => run(cli.root.clone(), args),
        Command::Apply { config, mark_good } => std::fs::read(&config)
            .map_err(|source| CliError::Read {
                path: config.clone(),
                source,
            })
            .and_then(|bytes| {
                serde_json::from_slice::<RenderedConfig>(&bytes).map_err(|source| {
                    CliError::NotAConfig {
                        path: config.clone(),
                        source,
                    }
                })
            })
            .and_then(|config| Ok((host.apply(&config)?, config)))
            .and_then(|(report, config)| {
                if mark_good {
                    // Named as the operator names it: by its content.
                    host.mark_good(&config_secret_name(&config))?;
                }
                println!(
                    "written: {}, removed: {}, backed up: {:?}",
                    report.written.len(),
                    report.removed.len(),
                    report.backed_up
                );
                Ok(())
            }),
        Command::Rollback => host
            .rollback()
            .map_err(CliError::from)
            .map(|report| match report {
                Some(report) => println!(
                    "rolled back: written {}, removed {}",
                    report.written.len(),
                    report.removed.len()
                ),
                None => println!("no verified configuration to roll back to"),
            }),
        Command::Recover => host.recover().map_err(CliError::from).map(|did| {
            println!(
                "{}",
                if did {
                    "recovered"
                } else {
                    "nothing to recover"
                }
            )
        }),
        Command::Cleanup(args) if args.hold => cleanup_and_hold(&host, args.listen),
        Command::Cleanup(_) => host
            .uninstall()
            .map_err(CliError::from)
            .map(|done| print_cleanup(&done)),
        Command::Resolve { image, output } => resolve(&host, &image, &output),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
