//! The `gateway` binary: parse the configuration, log, serve until a signal.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ml_shared::telemetry::init();
    let config = gateway::Config::parse();
    gateway::run(config, ml_shared::shutdown::shutdown_signal()).await
}
