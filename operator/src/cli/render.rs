//! `regmirror render`: the exact files one node gets, printed or written under a directory.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use regmirror_core::assemble::assemble;
use regmirror_core::node::{Flavor, NodeInfo};
use regmirror_core::render::{render, RenderedConfig};

use super::{check, InputArgs};

#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub node: NodeArgs,
    /// Write the files under this directory (as if it were the node's root) instead of
    /// printing them.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The one node a command works out a configuration for.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// The node's name (for messages).
    #[arg(long, default_value = "node")]
    pub node: String,
    /// The node's labels, `key=value,key=value`, matched against nodeSelectors.
    #[arg(long = "node-labels", alias = "labels", value_parser = parse_labels, default_value = "")]
    pub labels: BTreeMap<String, String>,
    /// The node's flavor: k3s, rke2 (either with +embedded-registry), containerd,
    /// containerd:<hosts dir>, cri-o.
    #[arg(long, default_value = "k3s")]
    pub flavor: Flavor,
}

impl NodeArgs {
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            name: self.node.clone(),
            labels: self.labels.clone(),
            flavor: self.flavor.clone(),
        }
    }
}

pub(super) fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    s.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(format!("{pair:?} is not key=value")),
        })
        .collect()
}

pub fn run(
    args: &RenderArgs,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> std::io::Result<i32> {
    let Some(config) = node_config(&args.input, &args.node.info(), stderr)? else {
        return Ok(1);
    };
    match &args.out {
        Some(root) => write_tree(root, &config)?,
        None => stdout.write_all(listing(&config).as_bytes())?,
    }
    Ok(0)
}

/// The configuration `node` gets from the manifests, as the operator would render it; `None`
/// after saying on `stderr` why there is none (problems in the manifests, or a flavor that
/// cannot express them). Conflicts are warnings: the node still gets a configuration.
pub fn node_config(
    input: &InputArgs,
    node: &NodeInfo,
    stderr: &mut dyn Write,
) -> std::io::Result<Option<RenderedConfig>> {
    let checked = check(input);
    if !checked.problems.is_empty() {
        for problem in &checked.problems {
            writeln!(stderr, "{problem}")?;
        }
        writeln!(
            stderr,
            "nothing rendered: {} problem(s) found",
            checked.problems.len()
        )?;
        return Ok(None);
    }
    for note in &checked.notes {
        writeln!(stderr, "note: {note}")?;
    }
    let assembly = assemble(&checked.resolved, node);
    for conflict in &assembly.conflicts {
        writeln!(stderr, "warning: node {}: {conflict}", node.name)?;
    }
    match render(&assembly.mirrors, &node.flavor) {
        Ok(config) => Ok(Some(config)),
        Err(e) => {
            writeln!(stderr, "{e}\nnothing rendered")?;
            Ok(None)
        }
    }
}

/// Every file under a header line naming its path and mode: what `render` prints.
pub fn listing(config: &RenderedConfig) -> String {
    let mut out = String::new();
    for (i, (path, file)) in config.files.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("==> {path} (mode {:04o}) <==\n", file.mode));
        out.push_str(&file.content);
    }
    out
}

/// Writes the files under `root`, with their modes.
fn write_tree(root: &Path, config: &RenderedConfig) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    for (path, file) in &config.files {
        let target = root.join(path.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(file.mode)
            .open(&target)?;
        out.write_all(file.content.as_bytes())?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(file.mode))?;
    }
    Ok(())
}
