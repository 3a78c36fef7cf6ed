//! regmirror's core: API types, the node contract, and the pure functions that turn
//! RegistryMirrors plus the data they reference into the exact files a node needs.
//!
//! The pipeline: [`resolve`] each RegistryMirror against a [`sources::Sources`] snapshot,
//! [`assemble`] the valid ones for a node (selection, conflicts), [`render`] them for the
//! node's [`node::Flavor`]. Nothing in this crate talks to a cluster or touches a disk.

pub mod activation;
pub mod api;
pub mod assemble;
pub mod cache;
pub mod contract;
pub mod decide;
pub mod docker_config;
pub mod impact;
pub mod model;
pub mod node;
pub mod plan;
pub mod problem;
pub mod render;
pub mod resolve;
pub mod route;
pub mod seal;
pub mod select;
pub mod sources;
