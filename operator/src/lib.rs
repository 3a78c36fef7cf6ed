//! The regmirror operator and its offline CLI.
//!
//! `controller` is the operator proper (`regmirror controller`); `cli` holds the commands,
//! including those people run without a cluster (`render`, `validate`, `crdgen`);
//! `manifests` reads the YAML those take.

pub mod cli;
pub mod controller;
pub mod manifests;
