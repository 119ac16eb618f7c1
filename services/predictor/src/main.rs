//! The `predictor` binary: parse the configuration, log, run until a signal.
//!
//! The runtime is single-threaded by default: a request's path is short, and
//! keeping the NATS connection task and the request loop on one thread avoids
//! a cross-thread wake-up per message (measured: the largest single cost on
//! the multi-threaded runtime). `PREDICTOR_THREADS=N` (N > 1) selects the
//! multi-threaded runtime with N workers. Blocking work (loading the feature
//! store) runs on tokio's blocking pool either way.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    ml_shared::telemetry::init();
    let config = predictor::Config::parse();
    let runtime = match config.threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    runtime.block_on(predictor::run(
        config,
        ml_shared::shutdown::shutdown_signal(),
    ))
}
