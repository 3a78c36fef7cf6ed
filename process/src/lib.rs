//! What regmirror's two processes — the operator and the node agent — share as running
//! programs: logging, the health and metrics endpoint, Events, shutdown on signals, and leader
//! election. Nothing here knows about registries.

pub mod endpoints;
pub mod events;
pub mod lease;
pub mod logging;
pub mod memory;
pub mod shutdown;
