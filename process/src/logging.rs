//! Structured logs: JSON lines on stderr, filtered by `RUST_LOG` (default `info`).
//!
//! Nothing regmirror logs carries secret material: credentials live in types whose `Debug`
//! is redacted, and config contents are never logged, only their names.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
