//! The registry service: the system of record for models and runs.
//!
//! It is a NATS micro service (`registry`, see [`service`]) with these
//! endpoints, and publishes one subject:
//! - `ml.registry.submit` (binary): check the model, evaluate it on the
//!   registry's own holdout ([`holdout`]), store it durably ([`store`]),
//!   make it the `candidate`, run the promotion gate ([`gate`]) on the
//!   registry's figures, reply `{"version":N,"production":bool,"gate":{…}}`
//!   only after the fsyncs, then publish the production model on
//!   `ml.model.production` if it changed;
//! - `ml.registry.import` (binary, operators): load an ONNX model with
//!   `ml-onnx` (refused with the engine's reason otherwise), then as a
//!   submission: holdout metrics, store, gate, publish ([`import`]);
//! - `ml.registry.promote`, `ml.registry.rollback` (JSON): move `production`
//!   by hand, recorded in the history with who and why, then publish;
//! - `ml.registry.route` (JSON): read, set or clear the routing table
//!   (weighted candidates beside production, a shadow, a sticky switch);
//!   a change moves the production epoch, is recorded in the history with
//!   who and why, and is published with the production model;
//! - `ml.registry.history` (JSON): the alias moves, a page at a time;
//! - `ml.registry.run_failed` (JSON): log a run that produced no model;
//! - `ml.registry.production` (binary): the production model, for a predictor
//!   that starts later or wants to check it is current;
//! - `ml.registry.models`, `ml.registry.runs` (JSON): the listings, a page
//!   at a time.
//!
//! Requests are handled one at a time, so two trainers submitting at once get
//! distinct versions. A request whose reply subject is not an inbox is
//! refused unanswered. A malformed request gets a `bad_request` error reply;
//! a failed write gets `unavailable` and no acknowledgement; either way the
//! registry keeps serving. Run one registry per `REGISTRY_DIR`.
//!
//! With `REGISTRY_STATE=jetstream` the state lives on NATS JetStream instead
//! ([`jetstream`]): any number of registries serve it, each write a
//! compare-and-set (a lost race is a `conflict` error reply, retryable), and
//! a write without a JetStream quorum fails with `no_quorum`.

pub mod gate;
pub mod holdout;
pub mod import;
pub mod jetstream;
pub mod journal;
pub mod legacy;
pub mod recent;
pub mod service;
pub mod store;

use std::future::Future;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ml_shared::settings::NatsSettings;

use crate::holdout::Holdout;
use crate::store::Store;

/// Registry configuration (flags, or the environment variables named).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "registry",
    version,
    about = "Stores, versions and publishes models"
)]
pub struct Config {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsSettings,

    /// Where models, the experiments log and the production pointer live
    /// (`REGISTRY_STATE=dir`).
    #[arg(long, env = "REGISTRY_DIR", default_value = "registry-data")]
    pub registry_dir: PathBuf,

    /// Where the state lives: `dir` (`REGISTRY_DIR`, one registry) or
    /// `jetstream` (buckets and streams of the NATS server, shared by any
    /// number of registries).
    #[arg(long, env = "REGISTRY_STATE", value_enum, default_value_t = StateBackend::Dir)]
    pub state: StateBackend,

    /// Replicas of the JetStream buckets and streams: 1 on one server, 3 on
    /// a 3-node cluster (applies when they are created).
    #[arg(long, env = "REGISTRY_REPLICAS", default_value_t = 1)]
    pub replicas: usize,

    /// How long a JetStream request may wait for its answer: a write
    /// without a quorum fails after this long.
    #[arg(long, env = "REGISTRY_JS_TIMEOUT", default_value = "2s", value_parser = ml_shared::settings::parse_duration)]
    pub js_timeout: std::time::Duration,

    /// How much worse than production, relative to production's value, a new
    /// version's gate metric (RMSE, or accuracy for a classifier) may be and
    /// still be promoted: 0.05 = 5%.
    #[arg(long, env = "PROMOTE_TOLERANCE", default_value_t = gate::DEFAULT_TOLERANCE)]
    pub promote_tolerance: f64,

    /// The labelled data the registry evaluates submitted models on (its
    /// holdout rows); by default the trainer's `DATA_PATH`.
    #[arg(long, env = "REGISTRY_HOLDOUT_PATH")]
    pub holdout_path: Option<PathBuf>,

    /// Seed of the holdout rule; keep it equal to the trainer's `TRAIN_SEED`
    /// so that the trainer never fits on the registry's holdout.
    #[arg(long, env = "REGISTRY_HOLDOUT_SEED", default_value_t = 42)]
    pub holdout_seed: u64,

    /// Share of entities in the holdout; keep it equal to the trainer's
    /// `VALIDATION_FRACTION`.
    #[arg(long, env = "REGISTRY_HOLDOUT_FRACTION", default_value_t = 0.2)]
    pub holdout_fraction: f64,

    /// The largest ONNX model accepted (imports and submissions), in bytes.
    /// A version travels in one NATS message: keep it under the server's
    /// `max_payload` (1 MB) with room for the rest of the release.
    #[arg(long, env = "ONNX_MAX_BYTES", default_value_t = ml_shared::model::DEFAULT_MAX_ONNX_BYTES)]
    pub onnx_max_bytes: usize,

    /// The longest the engine may take to load an imported ONNX model; a
    /// slower one is refused (every predictor loads it on promotion).
    #[arg(long, env = "ONNX_MAX_LOAD", default_value = "5s", value_parser = ml_shared::settings::parse_duration)]
    pub onnx_max_load: std::time::Duration,
}

/// Where the registry keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateBackend {
    /// A directory (`REGISTRY_DIR`).
    Dir,
    /// NATS JetStream (see [`jetstream`]).
    Jetstream,
}

impl Config {
    /// The holdout data file: `REGISTRY_HOLDOUT_PATH`, else `DATA_PATH`,
    /// else the trainer's default.
    pub fn holdout_path(&self) -> PathBuf {
        self.holdout_path
            .clone()
            .or_else(|| std::env::var_os("DATA_PATH").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("data/user_data.csv"))
    }
}

/// Runs the registry until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.holdout_fraction > 0.0 && config.holdout_fraction < 1.0,
        "REGISTRY_HOLDOUT_FRACTION must be in (0, 1), not {}",
        config.holdout_fraction
    );
    let client = ml_shared::nats::connect(&config.nats, "registry").await?;
    let store = open_store(&config, &client).await?;
    let holdout = Holdout::new(
        config.holdout_path(),
        config.holdout_seed,
        config.holdout_fraction,
    );
    tracing::info!(
        state = ?config.state,
        dir = %config.registry_dir.display(),
        registry_id = %store.id(),
        versions = store.models().models.len(),
        corrupt = ?store.corrupt().keys().collect::<Vec<_>>(),
        production = ?store.production_release().map(|r| r.version),
        epoch = store.production_epoch(),
        tolerance = config.promote_tolerance,
        holdout = %holdout.path().display(),
        "registry opened"
    );
    // Under a file-size limit (RLIMIT_FSIZE) the kernel sends SIGXFSZ, whose
    // default action kills the process; handled, the write fails with EFBIG
    // instead and the submission gets `unavailable`, like on a full disk.
    let file_size_signal = watch_file_size_signal();
    let registry = service::Registry::new(client.clone(), config.nats.subjects(), store, holdout)
        .with_onnx_limits(import::OnnxLimits {
            max_bytes: config.onnx_max_bytes,
            max_load: config.onnx_max_load,
        });
    let served = service::serve(registry, shutdown).await;
    tracing::info!("registry stopping");
    if let Some(task) = file_size_signal {
        task.abort();
    }
    client.drain().await.context("draining the NATS client")?;
    served
}

/// Opens the state `config` names: the directory, or the JetStream buckets
/// and streams (created with `REGISTRY_REPLICAS` replicas when missing).
async fn open_store(config: &Config, client: &async_nats::Client) -> anyhow::Result<Store> {
    let tolerance = config.promote_tolerance;
    match config.state {
        StateBackend::Dir => Store::open(&config.registry_dir, tolerance)
            .with_context(|| format!("opening the registry in {}", config.registry_dir.display())),
        StateBackend::Jetstream => {
            let settings = jetstream::JsSettings {
                replicas: config.replicas,
                timeout: config.js_timeout,
            };
            let js = jetstream::JsState::open(client.clone(), settings)
                .await
                .context("opening the registry's JetStream state")?;
            tokio::task::spawn_blocking(move || Store::open_jetstream(js, tolerance))
                .await
                .context("the store task panicked")?
                .context("reading the registry's JetStream state")
        }
    }
}

fn watch_file_size_signal() -> Option<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let kind = SignalKind::from_raw(nix::sys::signal::Signal::SIGXFSZ as i32);
    match signal(kind) {
        Ok(mut signals) => Some(tokio::spawn(async move {
            while signals.recv().await.is_some() {
                tracing::error!("a write went past the file-size limit (RLIMIT_FSIZE); it failed");
            }
        })),
        Err(error) => {
            tracing::warn!(%error, "cannot handle SIGXFSZ; a file-size limit would stop the registry");
            None
        }
    }
}
