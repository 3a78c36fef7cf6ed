//! Golden tests over `examples/`: every example renders, for every flavor, to exactly the
//! files checked in under its `expected/` directory; and where the k3s documentation has the
//! same example, the rendered registries.yaml means the same as the documentation's.
//!
//! `REGMIRROR_BLESS=1 cargo test --test golden` rewrites the expected files after a deliberate
//! change; review the diff before committing it.

use std::path::{Path, PathBuf};

use regmirror::cli::render::listing;
use regmirror::cli::{check, InputArgs, DEFAULT_NAMESPACE};
use regmirror_core::assemble::assemble;
use regmirror_core::node::{Flavor, NodeInfo};
use regmirror_core::render::render;
use serde_yaml::Value;

const FLAVORS: [&str; 5] = [
    "k3s",
    "k3s+embedded-registry",
    "rke2",
    "containerd",
    "cri-o",
];

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn example_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![examples()];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(examples().join("k3s-docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    docs.sort();
    dirs.extend(docs);
    dirs
}

/// What `regmirror render DIR --flavor F` prints for a node without labels, or the error.
fn rendered(dir: &Path, flavor: &str) -> String {
    let checked = check(&InputArgs {
        paths: vec![dir.to_owned()],
        namespace: DEFAULT_NAMESPACE.into(),
        allowed_namespaces: vec![],
        cache_addresses: vec![],
        cache_ca: None,
        cache_namespace: regmirror_core::cache::DEFAULT_NAMESPACE.into(),
    });
    assert!(
        checked.problems.is_empty(),
        "{}: {:?}",
        dir.display(),
        checked.problems
    );
    let node = NodeInfo {
        name: "node".into(),
        labels: Default::default(),
        flavor: flavor.parse::<Flavor>().unwrap(),
    };
    let assembly = assemble(&checked.resolved, &node);
    assert!(
        assembly.conflicts.is_empty(),
        "{}: {:?}",
        dir.display(),
        assembly.conflicts
    );
    match render(&assembly.mirrors, &node.flavor) {
        Ok(config) => listing(&config),
        Err(e) => format!("error: {e}\n"),
    }
}

#[test]
fn every_example_renders_to_its_expected_files() {
    let bless = std::env::var_os("REGMIRROR_BLESS").is_some();
    let mut checked = 0;
    for dir in example_dirs() {
        for flavor in FLAVORS {
            let expected_file = dir.join("expected").join(format!("{flavor}.txt"));
            let actual = rendered(&dir, flavor);
            if bless {
                std::fs::create_dir_all(expected_file.parent().unwrap()).unwrap();
                std::fs::write(&expected_file, &actual).unwrap();
            }
            let expected = std::fs::read_to_string(&expected_file).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (run with REGMIRROR_BLESS=1 to create it)",
                    expected_file.display()
                )
            });
            assert_eq!(
                actual,
                expected,
                "{} differs from the rendering",
                expected_file.display()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, example_dirs().len() * FLAVORS.len());
    assert!(
        checked >= 14 * 4,
        "examples went missing: only {checked} renderings"
    );
}

#[test]
fn rendering_is_byte_stable() {
    for dir in example_dirs() {
        for flavor in FLAVORS {
            assert_eq!(
                rendered(&dir, flavor),
                rendered(&dir, flavor),
                "{} {flavor}",
                dir.display()
            );
        }
    }
}

/// The rendered registries.yaml of an example, parsed.
fn rendered_registries_yaml(dir: &Path) -> Value {
    let text = rendered(dir, "k3s");
    let start = text
        .find("==> /etc/rancher/k3s/registries.yaml")
        .expect("k3s renders registries.yaml");
    let body: String = text[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("==> "))
        .collect::<Vec<_>>()
        .join("\n");
    serde_yaml::from_str(&body).unwrap()
}

/// Brings a registries.yaml into a comparable form: file paths are the renderer's choice (the
/// documentation leaves them empty as placeholders); null config entries mean nothing, and a
/// `*` config next to a `*` mirror is dropped by k3s itself; a mirror entry without a value
/// (`docker.io:`, as the embedded registry documentation writes it) is an entry without
/// endpoints, which k3s reads as `docker.io: {}`.
fn normalized(mut doc: Value) -> Value {
    if let Some(Value::Mapping(mirrors)) = doc.get_mut("mirrors") {
        for entry in mirrors.values_mut() {
            if entry.is_null() {
                *entry = Value::Mapping(Default::default());
            }
        }
    }
    let has_wildcard_mirror = doc.get("mirrors").and_then(|m| m.get("*")).is_some();
    if let Some(Value::Mapping(configs)) = doc.get_mut("configs") {
        configs.retain(|k, v| !(v.is_null() || has_wildcard_mirror && k.as_str() == Some("*")));
        for config in configs.values_mut() {
            if let Some(Value::Mapping(tls)) = config.get_mut("tls") {
                for key in ["ca_file", "cert_file", "key_file"] {
                    if let Some(v) = tls.get_mut(key) {
                        *v = Value::String("<file>".into());
                    }
                }
            }
        }
        if configs.is_empty() {
            doc.as_mapping_mut().unwrap().remove("configs");
        }
    }
    doc
}

#[test]
fn registries_yaml_means_what_the_k3s_documentation_writes() {
    let mut compared = 0;
    for dir in example_dirs() {
        let doc_file = dir.join("k3s-docs.yaml");
        let Ok(doc) = std::fs::read_to_string(&doc_file) else {
            continue;
        };
        let documented: Value = serde_yaml::from_str(&doc).unwrap();
        assert_eq!(
            normalized(rendered_registries_yaml(&dir)),
            normalized(documented),
            "{}",
            dir.display()
        );
        compared += 1;
    }
    assert_eq!(compared, 9, "every documentation example is compared");
}
