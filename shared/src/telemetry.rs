//! Logging setup: `tracing` with an `EnvFilter` read from `RUST_LOG`.

use tracing_subscriber::EnvFilter;

/// The filter used when `RUST_LOG` is not set: our own `info` events, and only
/// warnings from the NATS client library (its connection chatter is ours too).
pub const DEFAULT_FILTER: &str = "info,async_nats=warn";

/// Installs the global subscriber: human-readable lines on stderr, filtered by
/// `RUST_LOG` (default [`DEFAULT_FILTER`]). Safe to call more than once (later
/// calls are no-ops), which lets tests start several services in one process.
pub fn init() {
    init_with_default(DEFAULT_FILTER);
}

/// As [`init`], with another default filter (`mlctl` prints warnings only).
pub fn init_with_default(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // A log line that cannot be written (stderr on a full disk or past a
    // file-size limit) is lost; reporting it with `eprintln!` would panic
    // and take the service down with its logs.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .try_init();
}
