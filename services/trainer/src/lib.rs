//! The trainer service: retrains on a schedule (`TRAIN_INTERVAL`) and on
//! demand (a request on `ml.train`), and submits each model to the registry.
//!
//! A run loads the data through the shared feature registry, so the model's
//! features are computed by the code the predictors use. A failed run (bad
//! data, a fit that fails, non-finite metrics, the registry unreachable) is
//! logged with its reason and submits nothing; a scheduled run that could
//! not reach the registry is retried after `TRAIN_RETRY`.

pub mod pipeline;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::Client;
use clap::Parser;
use futures::StreamExt;
use ml_shared::features::FeatureRegistry;
use ml_shared::messages::{
    ApiReply, ErrorCode, ErrorReply, Submission, SubmitReply, TrainParams, TrainReply,
};
use ml_shared::settings::{parse_duration, NatsSettings};
use ml_shared::subjects::Subjects;

use crate::pipeline::TrainError;

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
}

impl RunError {
    fn to_reply(&self) -> ErrorReply {
        let code = match self {
            RunError::Train(_) => ErrorCode::BadRequest,
            RunError::RegistryUnavailable(_) => ErrorCode::Unavailable,
            RunError::Refused(e) => e.error.code,
        };
        ErrorReply::new(code, self.to_string())
    }
}

/// Runs the trainer until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let client = ml_shared::nats::connect(&config.nats, "trainer").await?;
    let subjects = config.nats.subjects();
    let mut triggers = client
        .queue_subscribe(subjects.train.clone(), QUEUE_GROUP.into())
        .await
        .context("subscribing to the train subject")?;
    let trainer = Trainer {
        client: client.clone(),
        subjects,
        config: Arc::new(config),
        registry: Arc::new(FeatureRegistry::default()),
    };
    tracing::info!(
        data = %trainer.config.data_path.display(),
        interval = ?trainer.config.train_interval,
        "trainer started"
    );

    let scheduled = !trainer.config.train_interval.is_zero();
    let period = if scheduled {
        trainer.config.train_interval
    } else {
        Duration::from_secs(3600)
    };
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticker.tick(), if scheduled => {
                if trainer.run_once("schedule").await.is_err() {
                    ticker.reset_after(trainer.config.train_retry);
                }
            }
            message = triggers.next() => {
                let Some(message) = message else { break };
                let outcome = trainer.run_once("request").await;
                let body = match &outcome {
                    Ok(reply) => serde_json::to_vec(reply),
                    Err(e) => serde_json::to_vec(&e.to_reply()),
                }
                .expect("replies serialise");
                if let Some(reply) = message.reply {
                    if let Err(error) = client.publish(reply, body.into()).await {
                        tracing::warn!(%error, "cannot answer the train request");
                    }
                }
            }
        }
    }
    tracing::info!("trainer stopping");
    client.drain().await.context("draining the NATS client")?;
    Ok(())
}

struct Trainer {
    client: Client,
    subjects: Subjects,
    config: Arc<Config>,
    registry: Arc<FeatureRegistry>,
}

impl Trainer {
    /// Trains once and submits; logs the outcome either way.
    async fn run_once(&self, trigger: &'static str) -> Result<TrainReply, RunError> {
        let outcome = self.train_and_submit().await;
        match &outcome {
            Ok(reply) => tracing::info!(
                trigger,
                version = reply.version,
                production = reply.production,
                rmse = reply.run.metrics.rmse,
                mae = reply.run.metrics.mae,
                r2 = reply.run.metrics.r2,
                rows = reply.run.rows_train + reply.run.rows_validation,
                duration_ms = reply.run.duration_ms,
                fingerprint = %reply.run.data_fingerprint,
                "model registered"
            ),
            Err(error) => tracing::error!(trigger, %error, "training run failed"),
        }
        outcome
    }

    async fn train_and_submit(&self) -> Result<TrainReply, RunError> {
        // A request sent while disconnected would only time out, holding up
        // the loop (and `ml.train`) for SUBMIT_TIMEOUT: fail now and retry.
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(RunError::RegistryUnavailable(
                "not connected to NATS".into(),
            ));
        }
        let params = TrainParams {
            model: "linear".into(),
            seed: self.config.seed,
            validation_fraction: self.config.validation_fraction,
        };
        let run_id = format!("run-{:016x}", rand::random::<u64>());
        let (config, registry) = (self.config.clone(), self.registry.clone());
        let (artifact, run) = tokio::task::spawn_blocking(move || {
            pipeline::train(&config.data_path, &registry, &params, run_id)
        })
        .await
        .map_err(|e| RunError::Train(TrainError::Fit(format!("training task failed: {e}"))))??;

        let payload = ml_shared::codec::encode(&Submission {
            run: run.clone(),
            artifact,
        });
        let request = self
            .client
            .request(self.subjects.registry_submit.clone(), payload.into());
        let message = tokio::time::timeout(self.config.submit_timeout, request)
            .await
            .map_err(|_| RunError::RegistryUnavailable("no reply in time".into()))?
            .map_err(|e| RunError::RegistryUnavailable(e.to_string()))?;
        let reply: ApiReply<SubmitReply> = serde_json::from_slice(&message.payload)
            .map_err(|e| RunError::RegistryUnavailable(format!("unreadable reply: {e}")))?;
        let ack = reply.into_result().map_err(RunError::Refused)?;
        Ok(TrainReply {
            version: ack.version,
            production: ack.production,
            run,
        })
    }
}
