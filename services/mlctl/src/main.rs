//! The `mlctl` binary: parse the command line and run the command.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ml_shared::telemetry::init_with_default("warn");
    let cli = mlctl::Cli::parse();
    match mlctl::run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("mlctl: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
