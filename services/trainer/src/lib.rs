//! The trainer service: retrains on a schedule (`TRAIN_INTERVAL`) and on
//! demand (a request on `ml.train`), and submits each model to the registry.
//!
//! A run loads the data through the shared feature registry, so the model's
//! features are computed by the code the predictors use. A failed run (bad
//! data, a fit that fails or does not converge, non-finite metrics) submits
//! no model: it is logged with its reason and reported to the registry
//! (`ml.registry.run_failed`), which records it in the experiments log as
//! `failed`. A scheduled run that could not reach the registry is retried
//! after `TRAIN_RETRY`.
//!
//! A run streams the data file in passes ([`stream`]): memory does not grow
//! with the file, and long runs log their progress (rows, MB/s, ETA); a
//! request with `{"progress":true}` gets the same reports as messages
//! before its reply ([`service`]).
//!
//! Modules: [`service`] (the micro service and the schedule), `runs` (one
//! run: skip, train, submit, report a failure), [`recorded`] (the
//! registry's newest run), [`stream`] and [`solve`] (the fit),
//! [`pipeline`] (the in-memory fit and what both share).
//!
//! With `TRAIN_SKIP_UNCHANGED` (the default), a scheduled run is skipped,
//! and says so in the log, when the data file's fingerprint and the training
//! parameters are those of the last completed run (registered or failed):
//! it would give the same result. The last run is this trainer's own, or,
//! before it has made one, the newest run the registry recorded
//! (`ml.registry.runs`), so a restarted trainer on unchanged data registers
//! nothing new. When the registry cannot say, the trainer trains. A request
//! on `ml.train` always trains.

pub mod failures;
pub mod pipeline;
pub mod recorded;
mod runs;
mod service;
pub mod solve;
pub mod stream;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ml_shared::messages::{ErrorCode, ErrorReply, TrainReply};
use ml_shared::settings::{parse_duration, NatsSettings};

use crate::pipeline::{ModelChoice, TrainError, TrainSpec};
pub use crate::recorded::{newest_recorded_run, same_params, RecordedRuns, LAST_RUN_TIMEOUT};

/// Queue group of the `ml.train` subscription: one trainer answers a request.
pub const QUEUE_GROUP: &str = "trainer";

/// Trainer configuration (flags, or the environment variables named).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "trainer",
    version,
    about = "Trains models and submits them to the registry"
)]
pub struct Config {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsSettings,

    /// The training data (CSV with user_id, feature_1, feature_2, target).
    #[arg(long, env = "DATA_PATH", default_value = "data/user_data.csv")]
    pub data_path: PathBuf,

    /// Time between scheduled runs; 0 runs only on demand.
    #[arg(long, env = "TRAIN_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub train_interval: Duration,

    /// Delay before retrying a scheduled run that failed.
    #[arg(long, env = "TRAIN_RETRY", default_value = "5s", value_parser = parse_duration)]
    pub train_retry: Duration,

    /// Seed of the train/validation split.
    #[arg(long, env = "TRAIN_SEED", default_value_t = 42)]
    pub seed: u64,

    /// Share of rows held out for validation, in (0, 1).
    #[arg(long, env = "VALIDATION_FRACTION", default_value_t = 0.2)]
    pub validation_fraction: f64,

    /// How long to wait for the registry to acknowledge a model.
    #[arg(long, env = "SUBMIT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub submit_timeout: Duration,

    /// Model family: linear, logistic, or auto (logistic when the target
    /// holds only 0 and 1).
    #[arg(long, env = "MODEL", default_value = "auto")]
    pub model: ModelChoice,

    /// Most solver iterations of a logistic fit; a fit that has not converged
    /// by then fails the run.
    #[arg(long, env = "LOGISTIC_MAX_ITER", default_value_t = 100)]
    pub logistic_max_iter: u64,

    /// Skip a scheduled run when the data and the parameters are unchanged
    /// since the last run.
    #[arg(long, env = "TRAIN_SKIP_UNCHANGED", default_value_t = true, action = clap::ArgAction::Set)]
    pub skip_unchanged: bool,

    /// Time between two progress reports of a pass over the data (log
    /// lines, and messages to a request that asked for progress).
    #[arg(long, env = "TRAIN_PROGRESS_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub progress_interval: Duration,
}

impl Config {
    /// The parameters of a run.
    pub fn spec(&self) -> TrainSpec {
        TrainSpec {
            model: self.model,
            seed: self.seed,
            validation_fraction: self.validation_fraction,
            max_iterations: self.logistic_max_iter,
        }
    }
}

/// Why a run produced no registered model.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Training itself failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The registry could not be reached or did not answer in time.
    #[error("registry unavailable: {0}")]
    RegistryUnavailable(String),
    /// The registry refused the model.
    #[error("registry refused the model: {0}")]
    Refused(ErrorReply),
    /// The request itself was malformed: nothing was trained.
    #[error("{0}")]
    BadRequest(ErrorReply),
}

/// A run's outcome, when it did not fail.
#[derive(Debug)]
pub enum Outcome {
    /// The model was registered.
    Registered(Box<TrainReply>),
    /// Data and parameters were unchanged: nothing was trained.
    Skipped,
}

impl RunError {
    fn to_reply(&self) -> ErrorReply {
        let code = match self {
            RunError::Train(_) => ErrorCode::BadRequest,
            RunError::RegistryUnavailable(_) => ErrorCode::Unavailable,
            RunError::Refused(e) => e.error.code,
            RunError::BadRequest(e) => return e.clone(),
        };
        ErrorReply::new(code, self.to_string())
    }
}

/// Runs the trainer until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let client = ml_shared::nats::connect(&config.nats, "trainer").await?;
    let subjects = config.nats.subjects();
    let requests = service::start(&client, &subjects).await?;
    tracing::info!(
        data = %config.data_path.display(),
        interval = ?config.train_interval,
        model = %config.model,
        skip_unchanged = config.skip_unchanged,
        "trainer started"
    );
    let trainer = runs::Trainer::new(client.clone(), subjects, config);
    tokio::pin!(shutdown);
    // The first scheduled run is due at once; started before NATS, it would
    // only fail: wait for the connection first.
    if service::connected(&client, &mut shutdown).await {
        service::serve(&trainer, requests, shutdown).await;
    }
    tracing::info!("trainer stopping");
    client.drain().await.context("draining the NATS client")?;
    Ok(())
}
