//! `regmirror-agent`: host-side operations on a rendered configuration. `apply` reads a
//! configuration (the `config.json` of a config Secret) and puts it onto the host through
//! the journal; `rollback` returns to the last verified configuration; `recover` finishes or
//! discards an apply a crash interrupted.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use regmirror_core::render::RenderedConfig;
use regmirror_node_agent::hostfs::HostFs;

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
}

fn main() {
    let cli = Cli::parse();
    let host = HostFs::new(&cli.root);
    let result = match cli.command {
        Command::Apply { config, mark_good } => std::fs::read(&config)
            .map_err(|e| format!("{}: {e}", config.display()))
            .and_then(|bytes| {
                serde_json::from_slice::<RenderedConfig>(&bytes)
                    .map_err(|e| format!("{}: not a rendered config: {e}", config.display()))
            })
            .and_then(|config| host.apply(&config).map_err(|e| e.to_string()))
            .and_then(|report| {
                if mark_good {
                    host.mark_good().map_err(|e| e.to_string())?;
                }
                println!(
                    "written: {}, removed: {}, backed up: {:?}",
                    report.written.len(),
                    report.removed.len(),
                    report.backed_up
                );
                Ok(())
            }),
        Command::Rollback => {
            host.rollback()
                .map_err(|e| e.to_string())
                .map(|report| match report {
                    Some(report) => println!(
                        "rolled back: written {}, removed {}",
                        report.written.len(),
                        report.removed.len()
                    ),
                    None => println!("no verified configuration to roll back to"),
                })
        }
        Command::Recover => host.recover().map_err(|e| e.to_string()).map(|did| {
            println!(
                "{}",
                if did {
                    "recovered"
                } else {
                    "nothing to recover"
                }
            )
        }),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
