//! The `monitor` binary: parse the configuration, log, run until a signal.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ml_shared::telemetry::init();
    let config = monitor::Config::parse();
    monitor::run(config, ml_shared::shutdown::shutdown_signal()).await
}
