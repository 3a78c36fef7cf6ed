//! The regmirror operator and its offline CLI.
//!
//! `cli` holds the commands people run without a cluster (`render`, `validate`, `crdgen`);
//! `manifests` reads the YAML they take.

pub mod cli;
pub mod manifests;
