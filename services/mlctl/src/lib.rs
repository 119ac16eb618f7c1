//! `mlctl`: the platform's command-line client.
//!
//! Every command is a thin layer over the documented NATS subjects, so what
//! `mlctl` does, any NATS client can do. Errors from a service are printed as
//! the service's JSON error and give exit status 1; "nobody is listening" is
//! reported as the service being unavailable, at once rather than after a
//! timeout.

pub mod bench;
pub mod import;
pub mod registry_view;
mod requests;
pub mod secrets;
pub mod top;
pub mod train;
pub mod up;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use async_nats::client::RequestErrorKind;
use async_nats::Client;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use ml_shared::gen::Target;
use ml_shared::messages::{ApiReply, ErrorReply, Page, RunsReply};
use ml_shared::routing::Weighted;
use ml_shared::settings::{parse_duration, NatsSettings};
use serde::de::DeserializeOwned;

use crate::registry_view::Filter;

/// The command line.
#[derive(Debug, Parser)]
#[command(name = "mlctl", version, about = "Client of the ML platform")]
pub struct Cli {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsSettings,

    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// `mlctl` commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask for a prediction, for a known user or for raw features.
    Predict {
        /// User ids from the feature store (more than one: a batch request).
        #[arg(required_unless_present = "features", conflicts_with = "features")]
        user_ids: Vec<String>,
        /// Raw features instead: `feature_1=0.3,feature_2=1.5`.
        #[arg(long, value_parser = parse_features)]
        features: Option<BTreeMap<String, f64>>,
        /// What a sticky routing table hashes instead of the user id.
        #[arg(long)]
        routing_key: Option<String>,
    },
    /// List the registry's model versions: aliases, metrics, age.
    Models {
        /// Print the registry's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the experiments log, filtered and sorted.
    Runs {
        /// Print the (filtered, sorted) runs as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Keep runs that satisfy a condition such as "r2 > 0.9" or
        /// "status == failed" (repeatable; all must hold).
        #[arg(long = "where", value_name = "CONDITION")]
        filters: Vec<Filter>,
        /// Sort by a column (ascending; empty cells last).
        #[arg(long, value_name = "COLUMN")]
        sort: Option<String>,
        /// Sort largest first.
        #[arg(long, requires = "sort")]
        desc: bool,
    },
    /// Make a version the production model (the predictors switch to it).
    Promote {
        /// The version.
        version: u64,
        /// Why, recorded in the history.
        #[arg(long)]
        reason: String,
        /// Who, recorded in the history.
        #[arg(long, env = "USER", default_value = "unknown")]
        actor: String,
    },
    /// Move production back to the version it replaced.
    Rollback {
        /// Why, recorded in the history.
        #[arg(long)]
        reason: Option<String>,
        /// Who, recorded in the history.
        #[arg(long, env = "USER", default_value = "unknown")]
        actor: String,
    },
    /// Show or change the routing table: candidates beside production, a
    /// shadow, a sticky split (no option: show it).
    Route {
        /// A candidate and its share: `7:10` sends 10% to v7 (repeatable).
        #[arg(long = "canary", value_name = "VERSION:PERCENT", value_parser = parse_weighted)]
        canary: Vec<Weighted>,
        /// The shadow version and its share: `8:20`.
        #[arg(long, value_name = "VERSION:PERCENT", value_parser = parse_weighted)]
        shadow: Option<Weighted>,
        /// Route by a stable hash of the user (or routing_key) instead of at random.
        #[arg(long)]
        sticky: bool,
        /// Remove the table: production takes all traffic.
        #[arg(long, conflicts_with_all = ["canary", "shadow", "sticky"])]
        clear: bool,
        /// Why, recorded in the history.
        #[arg(long)]
        reason: Option<String>,
        /// Who, recorded in the history.
        #[arg(long, env = "USER", default_value = "unknown")]
        actor: String,
        /// Print the registry's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Every alias move: when, from, to, why, by whom.
    History {
        /// Print the registry's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only the most recent moves.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Train now and wait for the registered version, with the run's
    /// progress on stderr.
    Train {
        /// The longest silence from the trainer: each progress report
        /// restarts it.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        timeout: Duration,
        /// No progress reports: only the final reply.
        #[arg(long)]
        quiet: bool,
    },
    /// Import an ONNX model (scikit-learn via skl2onnx) as a new version:
    /// checked here, then checked, evaluated and registered by the registry.
    Import(import::ImportArgs),
    /// Print the monitor's current statistics (JSON).
    Stats,
    /// Write deterministic sample data as CSV.
    GenData {
        /// Number of users.
        #[arg(long, default_value_t = 5000)]
        rows: usize,
        /// Random seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Output file (standard output when absent).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The target column: `regression` (a number) or `binary` (0 or 1).
        #[arg(long, default_value = "regression")]
        target: Target,
    },
    /// Start NATS (if none answers at NATS_URL) and the four services; Ctrl-C stops them.
    Up(up::UpArgs),
    /// Load-test `ml.predict` and report throughput and latency percentiles.
    Bench(bench::BenchArgs),
    /// Answer `<prefix>.bench.echo` with a constant (the floor `bench --echo` measures).
    Echo,
    /// Print a `.env` for docker compose: a random password per NATS user and its bcrypt hash.
    Secrets,
    /// A live terminal view of the monitor's figures (`q` quits, `w` switches window/total).
    Top(top::TopArgs),
}

fn parse_weighted(text: &str) -> Result<Weighted, String> {
    let (version, percent) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not VERSION:PERCENT (e.g. 7:10)"))?;
    let number = |s: &str| {
        s.trim()
            .parse::<u32>()
            .map_err(|_| format!("{s:?} is not a whole number"))
    };
    Ok(Weighted {
        version: u64::from(number(version)?),
        percent: number(percent)?,
    })
}

fn parse_features(text: &str) -> Result<BTreeMap<String, f64>, String> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not name=value"))?;
            let v: f64 = v
                .trim()
                .parse()
                .map_err(|_| format!("{v:?} is not a number"))?;
            Ok((k.trim().to_owned(), v))
        })
        .collect()
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let nats = cli.nats;
    match cli.command {
        Command::GenData {
            rows,
            seed,
            out,
            target,
        } => {
            gen_data(rows, seed, out, target)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Up(args) => up::run(&nats, args).await,
        Command::Bench(args) => bench::run(&nats, args).await,
        Command::Echo => bench::echo(&nats).await,
        Command::Secrets => {
            print!("{}", secrets::env_file()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Top(args) => top::run(&nats, args).await,
        Command::Import(args) => import::run(&nats, args).await,
        command => {
            let client = connect(&nats).await?;
            let code = requests::run(&client, &nats.subjects(), command).await;
            client.drain().await.ok();
            code
        }
    }
}

fn gen_data(rows: usize, seed: u64, out: Option<PathBuf>, target: Target) -> anyhow::Result<()> {
    match out {
        Some(path) => {
            let tmp = tempfile::NamedTempFile::new_in(
                path.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(".".as_ref()),
            )?;
            ml_shared::gen::write_csv_with(
                std::io::BufWriter::new(tmp.as_file()),
                rows,
                seed,
                target,
            )?;
            // A temporary file is private (0600); data files are for everyone to read.
            #[cfg(unix)]
            std::fs::set_permissions(
                tmp.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o644),
            )?;
            tmp.persist(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {rows} rows to {}", path.display());
        }
        None => ml_shared::gen::write_csv_with(std::io::stdout().lock(), rows, seed, target)?,
    }
    Ok(())
}

/// Connects to NATS, failing fast when no server answers.
pub async fn connect(nats: &NatsSettings) -> anyhow::Result<Client> {
    ml_shared::nats::options(nats, "mlctl")
        .await?
        .connection_timeout(Duration::from_secs(3))
        .connect(nats.nats_url.as_str())
        .await
        .with_context(|| {
            let tls = if nats.nats_tls_required || nats.nats_tls_ca.is_some() {
                " with TLS"
            } else {
                ""
            };
            format!("cannot connect to NATS at {}{tls}", nats.nats_url)
        })
}

fn unavailable(error: async_nats::RequestError, service: &str, subject: &str) -> anyhow::Error {
    match error.kind() {
        RequestErrorKind::NoResponders => {
            anyhow::anyhow!("the {service} is unavailable: no responders on {subject}")
        }
        RequestErrorKind::TimedOut => {
            anyhow::anyhow!("the {service} did not answer on {subject} in time")
        }
        _ => anyhow::anyhow!("request to the {service} on {subject} failed: {error}"),
    }
}

pub(crate) async fn request_json(
    client: &Client,
    subject: &str,
    body: Vec<u8>,
    service: &str,
) -> anyhow::Result<Bytes> {
    let reply = client
        .request(subject.to_owned(), body.into())
        .await
        .map_err(|e| unavailable(e, service, subject))?;
    Ok(reply.payload)
}

/// Every run of the experiments log, fetched a page at a time (the
/// registry sends at most a page per reply); an error reply as received.
async fn all_runs(client: &Client, subject: &str) -> anyhow::Result<Bytes> {
    let mut runs = Vec::new();
    loop {
        let page = Page {
            limit: Some(Page::MAX_LIMIT),
            offset: Some(runs.len()),
        };
        let payload = request_json(client, subject, serde_json::to_vec(&page)?, "registry").await?;
        let Ok(ApiReply::Ok(mut reply)) = serde_json::from_slice::<ApiReply<RunsReply>>(&payload)
        else {
            return Ok(payload);
        };
        let got = reply.runs.len();
        reply.runs.append(&mut runs);
        runs = reply.runs;
        if got == 0 || runs.len() >= reply.total {
            let total = reply.total;
            return Ok(serde_json::to_vec(&RunsReply { runs, total })?.into());
        }
    }
}

fn with_reply<T: DeserializeOwned>(payload: Bytes, show: impl FnOnce(T)) -> ExitCode {
    match serde_json::from_slice::<ApiReply<T>>(&payload) {
        Ok(ApiReply::Ok(value)) => {
            show(value);
            ExitCode::SUCCESS
        }
        Ok(ApiReply::Err(error)) => print_error(&error),
        Err(e) => {
            eprintln!(
                "mlctl: unreadable reply ({e}): {}",
                String::from_utf8_lossy(&payload)
            );
            ExitCode::FAILURE
        }
    }
}

/// Prints a successful JSON reply as received, or the error to stderr.
pub(crate) fn print_reply<T: DeserializeOwned>(payload: Bytes) -> ExitCode {
    let text = String::from_utf8_lossy(&payload).into_owned();
    with_reply(payload, |_: T| println!("{text}"))
}

pub(crate) fn print_error(error: &ErrorReply) -> ExitCode {
    eprintln!(
        "{}",
        serde_json::to_string(error).unwrap_or_else(|_| error.to_string())
    );
    ExitCode::FAILURE
}

/// Fails when the reply is an error; used by commands that need the value.
pub fn parse_reply<T: DeserializeOwned>(payload: &[u8]) -> anyhow::Result<T> {
    match serde_json::from_slice::<ApiReply<T>>(payload) {
        Ok(ApiReply::Ok(v)) => Ok(v),
        Ok(ApiReply::Err(e)) => bail!("{e}"),
        Err(e) => bail!("unreadable reply: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_parse_from_the_command_line() {
        let f = parse_features("feature_1=0.3, feature_2=1.5").unwrap();
        assert_eq!(f["feature_1"], 0.3);
        assert_eq!(f["feature_2"], 1.5);
        assert!(parse_features("feature_1").is_err());
        assert!(parse_features("feature_1=x").is_err());
    }
}
