//! `regmirror resolve`: where a node's runtime would pull an image from, offline — the
//! endpoints in order, the repository asked of each, which credentials (Secret names) and TLS
//! files apply, and the registry itself last.

use std::io::Write;

use regmirror_core::route::route;

use super::render::{node_config, NodeArgs};
use super::InputArgs;

#[derive(Debug, clap::Args)]
pub struct ResolveArgs {
    /// The image, as a Pod names it (`nginx`, `quay.io/org/app:1.2`, `…@sha256:…`).
    pub image: String,
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub node: NodeArgs,
    /// `text` for a person, `json` for a program.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

pub fn run(
    args: &ResolveArgs,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> std::io::Result<i32> {
    let Some(config) = node_config(&args.input, &args.node.info(), stderr)? else {
        return Ok(1);
    };
    match route(&config, &args.image) {
        Ok(route) if args.output == "json" => {
            serde_json::to_writer_pretty(&mut *stdout, &route)?;
            writeln!(stdout)?;
            Ok(0)
        }
        Ok(route) => {
            write!(stdout, "{route}")?;
            Ok(0)
        }
        Err(e) => {
            writeln!(stderr, "{e}")?;
            Ok(1)
        }
    }
}
