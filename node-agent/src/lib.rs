//! regmirror's node agent.
//!
//! `hostfs` puts a rendered configuration onto the host through a journal, so that a crash at
//! any point leaves the old files or the new ones, never a mix; it owns only the files it wrote,
//! backs up a hand-written file once before replacing it, and keeps the last good configuration
//! for rollback, with the name it was applied under (what the node reports it runs).
//!
//! `verify` probes the endpoints a rendered configuration lists for itself once it is written.

pub mod agent;
pub mod detect;
pub mod hostfs;
pub mod metrics;
pub mod node_key;
pub mod report;
pub mod restart;
pub mod verify;
pub mod watch;
