//! `regmirror crdgen`: the CRD that `crds/` holds.

use std::io::Write;
use std::path::PathBuf;

/// File name of the CRD under `crds/`.
pub const CRD_FILE: &str = "regmirror.io_registrymirrors.yaml";

#[derive(Debug, clap::Args)]
pub struct CrdgenArgs {
    /// Write `regmirror.io_registrymirrors.yaml` into this directory instead of printing it.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: &CrdgenArgs, stdout: &mut dyn Write) -> std::io::Result<i32> {
    let yaml = regmirror_core::api::crd_yaml();
    match &args.out {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(CRD_FILE), yaml)?;
        }
        None => stdout.write_all(yaml.as_bytes())?,
    }
    Ok(0)
}
