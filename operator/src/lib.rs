//! The regmirror operator and its offline CLI.
//!
//! `controller` is the operator proper (`regmirror controller`); `cli` holds the commands,
//! including those people run without a cluster (`render`, `validate`, `crdgen`);
//! `manifests` reads the YAML those take; `sync` copies images into a mirror
//! (`regmirror sync-images`).

pub mod cache;
pub mod cli;
pub mod controller;
pub mod manifests;
pub mod sync;
