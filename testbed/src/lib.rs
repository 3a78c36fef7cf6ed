//! Real parts for tests, all on 127.0.0.1: a test PKI made with `openssl`, `docker-registry`
//! processes (TLS, htpasswd basic auth, client-certificate checks), a private `containerd`, an
//! OCI image built here and pushed with `skopeo`, and pulls with `ctr` and `skopeo`.
//!
//! Missing tools are a test failure, not a skip: `scripts/test` installs them.
//!
//! [`control_plane`]: a real Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager built from the official Go modules by `testbed/kube/build`).
//!
//! And [`api`]: kube's mocked service with a request log, so unit tests assert the exact
//! requests a component sends; [`fake_api`]: a strict fake API server over it, that fails the
//! test on a request not in its scenario or an expected one never made.

pub mod api;
pub mod cache;
pub mod cluster;
pub mod control_plane;
pub mod fake_api;
mod image;
pub mod install;
pub mod node;
mod pki;
mod process;
mod registry;
mod runtime;
pub mod simulator;
pub mod world;

pub use control_plane::{ControlPlane, ControlPlaneOptions, TokenOptions};
pub use image::{oci_layout, push};
pub use node::{enter_private_network, BuiltImages, Node, NodeOptions};
pub use pki::Pki;
pub use process::{dead_port, free_port, go_tool, require_tool, run_build_script, Process};
pub use registry::{serve_registry, Registry, RegistryOptions};
pub use runtime::{Containerd, Pull, Skopeo};
