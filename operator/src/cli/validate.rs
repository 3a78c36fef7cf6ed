//! `regmirror validate`: for CI on a GitOps repository. Exit 0 when every RegistryMirror would
//! be accepted and rendered; exit 1 naming file, object and field of each problem.

use std::io::Write;

use regmirror_core::assemble::possible_conflicts;
use regmirror_core::node::Flavor;
use regmirror_core::render::render;

use super::{check, InputArgs};

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Also check that every mirror can be rendered for these node flavors (repeatable):
    /// k3s, rke2, containerd, cri-o.
    #[arg(long = "flavor")]
    pub flavors: Vec<Flavor>,
}

pub fn run(
    args: &ValidateArgs,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> std::io::Result<i32> {
    let mut checked = check(&args.input);
    for conflict in possible_conflicts(&checked.resolved) {
        let origin = checked.origins.get(&conflict.mirror).cloned();
        checked.problems.push(super::Problem {
            origin,
            object: Some(format!("RegistryMirror/{}", conflict.mirror)),
            message: conflict.to_string(),
        });
    }
    for flavor in &args.flavors {
        for mirror in &checked.resolved {
            if let Err(e) = render(&[mirror], flavor) {
                let origin = checked.origins.get(&mirror.name).cloned();
                let message = format!("{}: {} cannot express {}", e.field, e.flavor, e.what);
                checked.problems.push(super::Problem {
                    origin,
                    object: Some(format!("RegistryMirror/{}", mirror.name)),
                    message,
                });
            }
        }
    }

    for problem in &checked.problems {
        writeln!(stderr, "{problem}")?;
    }
    if checked.problems.is_empty() {
        writeln!(stdout, "{} RegistryMirror(s) valid", checked.resolved.len())?;
        Ok(0)
    } else {
        writeln!(stderr, "{} problem(s) found", checked.problems.len())?;
        Ok(1)
    }
}
