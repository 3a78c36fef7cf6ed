//! The workspace's `rust-version` is what its dependencies need: the highest `rust-version`
//! of any package in the dependency graph, as `cargo metadata` reports it, and every member
//! inherits it. A dependency that raises it fails here until Cargo.toml says so.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// `1.89` or `1.89.0` as (1, 89, 0).
fn version(text: &str) -> (u64, u64, u64) {
    let mut parts = text.split('.').map(|p| {
        p.parse::<u64>()
            .unwrap_or_else(|_| panic!("not a Rust version: {text}"))
    });
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(workspace_root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON")
}

/// `rust-version` in the root Cargo.toml's `[workspace.package]`.
fn declared() -> String {
    let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
    let mut section = "";
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[workspace.package]" {
            if let Some((key, value)) = line.split_once('=') {
                if key.trim() == "rust-version" {
                    return value.trim().trim_matches('"').to_owned();
                }
            }
        }
    }
    panic!("no rust-version in [workspace.package] of Cargo.toml");
}

#[test]
fn the_workspace_rust_version_is_the_highest_any_dependency_needs() {
    let metadata = metadata();
    let members: Vec<&str> = metadata["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap())
        .collect();
    let packages = metadata["packages"].as_array().unwrap();
    let (member_packages, dependencies): (Vec<&Value>, Vec<&Value>) = packages
        .iter()
        .partition(|p| members.contains(&p["id"].as_str().unwrap()));

    let (needed, by) = dependencies
        .iter()
        .filter_map(|p| {
            let needs = p["rust_version"].as_str()?;
            Some((version(needs), format!("{} {}", p["name"], p["version"])))
        })
        .max()
        .expect("some dependency declares a rust-version");
    let declared = declared();
    assert_eq!(
        version(&declared),
        needed,
        "Cargo.toml says rust-version = {declared:?}, but {by} needs {needed:?}: the \
         workspace's rust-version must be the highest of its dependencies'"
    );

    for member in member_packages {
        assert_eq!(
            member["rust_version"].as_str().map(version),
            Some(needed),
            "{} must inherit the workspace's rust-version (rust-version.workspace = true)",
            member["name"]
        );
    }
}
