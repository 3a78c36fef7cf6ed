//! What `render` and `validate` share: read the manifests, check every RegistryMirror against
//! the CRD's CEL rules and resolve its references, and say what is wrong where.

use std::collections::BTreeMap;
use std::fmt;

use regmirror_core::model::ResolvedMirror;
use regmirror_core::resolve::resolve_partially;
use regmirror_core::sources::RefPolicy;

use super::InputArgs;
use crate::manifests::{self, Origin};

/// One problem, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file (and document) it is in, when it comes from one.
    pub origin: Option<Origin>,
    /// `RegistryMirror/<name>`, when it concerns one.
    pub object: Option<String>,
    /// The field and the reason.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(origin) = &self.origin {
            write!(f, "{origin}: ")?;
        }
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// The outcome of checking a set of manifests.
#[derive(Debug, Default)]
pub struct Checked {
    /// The RegistryMirrors that are valid, resolved.
    pub resolved: Vec<ResolvedMirror>,
    /// Where each mirror came from, by name (valid or not).
    pub origins: BTreeMap<String, Origin>,
    /// What resolved of the mirrors with problems: enough to check what each flavor can
    /// express of them too, so that one problem does not hide another. Never rendered.
    pub partial: Vec<ResolvedMirror>,
    pub problems: Vec<Problem>,
}

/// Reads and checks the manifests named by `args`.
pub fn check(args: &InputArgs) -> Checked {
    let loaded = manifests::load(&args.paths, &args.namespace);
    let policy = RefPolicy {
        operator_namespace: args.namespace.clone(),
        allowed_namespaces: args.allowed_namespaces.clone(),
    };
    let mut checked = Checked {
        problems: loaded
            .errors
            .iter()
            .map(|e| Problem {
                origin: None,
                object: None,
                message: e.to_string(),
            })
            .collect(),
        ..Checked::default()
    };

    for manifests::LoadedMirror { origin, mirror } in &loaded.mirrors {
        let name = mirror.metadata.name.clone().unwrap_or_default();
        let mut problem = |message: String| {
            checked.problems.push(Problem {
                origin: Some(origin.clone()),
                object: Some(format!("RegistryMirror/{name}")),
                message,
            })
        };
        if name.is_empty() {
            problem("metadata.name: required".into());
            continue;
        }
        if let Some(first) = checked.origins.get(&name) {
            problem(format!(
                "metadata.name: RegistryMirror {name:?} is also defined in {first}"
            ));
            continue;
        }

        // The CRD's CEL rules, as the API server would apply them at `kubectl apply`.
        let mut schema_fields = Vec::new();
        if let Err(errors) = mirror.validate_cel() {
            for e in errors.iter() {
                schema_fields.push(e.field_path.clone());
                problem(format!("{}: {}", e.field_path, e.message));
            }
        }
        let (resolved, errors) = resolve_partially(mirror, &loaded.sources, &policy);
        // The same field may fail both the CEL rule and resolution: say it once.
        for e in errors.iter().filter(|e| !schema_fields.contains(&e.field)) {
            problem(e.to_string());
        }
        checked.origins.insert(name, origin.clone());
        if schema_fields.is_empty() && errors.is_empty() {
            checked.resolved.push(resolved);
        } else {
            checked.partial.push(resolved);
        }
    }
    checked
}
