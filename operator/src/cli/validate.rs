//! `regmirror validate`: for CI on a GitOps repository. Exit 0 when every RegistryMirror would
//! be accepted and rendered; exit 1 naming file, object and field of each problem.

use std::io::Write;

use regmirror_core::assemble::possible_conflicts;
use regmirror_core::node::Flavor;
use regmirror_core::render::problems;

use super::{check, InputArgs};

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Check that every mirror can be rendered for these node flavors only (repeatable):
    /// k3s, rke2, containerd, cri-o. Without it, for every flavor, since a mirror may reach
    /// nodes of each.
    #[arg(long = "flavor")]
    pub flavors: Vec<Flavor>,
}

/// Every flavor a node can have: what `validate` checks without `--flavor`.
pub fn all_flavors() -> Vec<Flavor> {
    ["k3s", "rke2", "containerd", "cri-o"]
        .iter()
        .map(|f| f.parse().expect("a known flavor"))
        .collect()
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
    let flavors = if args.flavors.is_empty() {
        all_flavors()
    } else {
        args.flavors.clone()
    };
    // Mirrors with other problems too: what resolved of them is checked as well, so that one
    // problem does not hide what a flavor cannot express.
    let mut flavor_problems = Vec::new();
    for mirror in checked.resolved.iter().chain(&checked.partial) {
        for flavor in &flavors {
            for e in problems(&[mirror], flavor) {
                let origin = checked.origins.get(&mirror.name).cloned();
                let message = format!("{}: {} cannot express {}", e.field, e.flavor, e.what);
                flavor_problems.push(super::Problem {
                    origin,
                    object: Some(format!("RegistryMirror/{}", mirror.name)),
                    message,
                });
            }
        }
    }
    for problem in flavor_problems {
        // Two flavors may refuse the same thing in the same words.
        if !checked.problems.contains(&problem) {
            checked.problems.push(problem);
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
