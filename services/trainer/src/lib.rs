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
//! with the file, and long runs log their progress (rows, MB/s, ETA).
//!
//! With `TRAIN_SKIP_UNCHANGED` (the default), a scheduled run is skipped,
//! and says so in the log, when the data file's fingerprint and the training
//! parameters are those of the last completed run (registered or failed):
//! it would give the same result. The last run is this trainer's own, or,
//! before it has made one, the newest run the registry recorded
//! (`ml.registry.runs`), so a restarted trainer on unchanged data registers
//! nothing new. When the registry cannot say, the trainer trains. A request
//! on `ml.train` always trains.

pub mod pipeline;
pub mod solve;
pub mod stream;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_nats::service::ServiceExt;
use async_nats::Client;
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use ml_shared::data;
use ml_shared::features::FeatureRegistry;
use ml_shared::lifecycle::{FailedRun, RecordedReply};
use ml_shared::messages::{
    ApiReply, ErrorCode, ErrorReply, ExperimentRow, RunsReply, Submission, SubmitReply,
    TrainParams, TrainReply,
};
use ml_shared::settings::{parse_duration, NatsSettings};
use ml_shared::subjects::Subjects;

use crate::pipeline::{ModelChoice, TrainError, TrainSpec};

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
        };
        ErrorReply::new(code, self.to_string())
    }
}

/// Runs the trainer until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let client = ml_shared::nats::connect(&config.nats, "trainer").await?;
    let subjects = config.nats.subjects();
    // `ml.train` as the endpoint of the `trainer` micro service (one
    // trainer of the queue group answers a request).
    let service = client
        .service_builder()
        .description("Trains models and submits them to the registry")
        .queue_group(QUEUE_GROUP)
        .start("trainer", env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("starting the micro-service: {e}"))?;
    let mut triggers = service
        .endpoint_builder()
        .name("train")
        .add(subjects.train.clone())
        .await
        .map_err(|e| anyhow::anyhow!("adding the train endpoint: {e}"))?;
    let trainer = Trainer {
        client: client.clone(),
        subjects,
        config: Arc::new(config),
        registry: Arc::new(FeatureRegistry::default()),
        last: Arc::new(Mutex::new(None)),
        asked_registry: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    tracing::info!(
        data = %trainer.config.data_path.display(),
        interval = ?trainer.config.train_interval,
        model = %trainer.config.model,
        skip_unchanged = trainer.config.skip_unchanged,
        "trainer started"
    );

    let scheduled = !trainer.config.train_interval.is_zero();
    let period = if scheduled {
        trainer.config.train_interval
    } else {
        Duration::from_secs(3600)
    };
    tokio::pin!(shutdown);
    // The first scheduled run is due at once; started before NATS, it would
    // only fail (a run needs the registry). A flush completes once the
    // connection is up, so wait for that first.
    tokio::select! {
        () = &mut shutdown => {
            client.drain().await.ok();
            return Ok(());
        }
        flushed = client.flush() => {
            if let Err(error) = flushed {
                tracing::warn!(%error, "cannot reach NATS yet; runs are retried");
            }
        }
    }
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticker.tick(), if scheduled => {
                // A run that failed for its data is retried soon only when
                // an unchanged file would be skipped, not retrained (and
                // logged as failed) every TRAIN_RETRY.
                let retry = match trainer.run_once("schedule").await {
                    Err(RunError::RegistryUnavailable(_)) => true,
                    Err(_) => trainer.config.skip_unchanged,
                    Ok(_) => false,
                };
                if retry {
                    ticker.reset_after(trainer.config.train_retry);
                }
            }
            request = triggers.next() => {
                let Some(request) = request else { break };
                // A request must name an inbox to answer (a reflected reply
                // has none): otherwise it trains nothing.
                let message = &request.message;
                if ml_shared::nats::accept_reply("trainer", &message.subject, message.reply.as_ref()).is_none() {
                    continue;
                }
                let sent = match trainer.run_once("request").await {
                    Ok(Outcome::Registered(reply)) => {
                        let body = serde_json::to_vec(&reply).expect("replies serialise");
                        request.respond(Ok(body.into())).await
                    }
                    Ok(Outcome::Skipped) => unreachable!("requests always train"),
                    Err(e) => {
                        let (body, headers) = ml_shared::nats::error_parts(&e.to_reply());
                        request.respond_with_headers(Ok(body), headers).await
                    }
                };
                if let Err(error) = sent {
                    tracing::warn!(%error, "cannot answer the train request");
                }
            }
        }
    }
    tracing::info!("trainer stopping");
    client.drain().await.context("draining the NATS client")?;
    Ok(())
}

/// What the last completed run was trained on: a run with the same is skipped.
#[derive(Debug, Clone, PartialEq)]
struct RunKey {
    fingerprint: String,
    spec: TrainSpec,
}

struct Trainer {
    client: Client,
    subjects: Subjects,
    config: Arc<Config>,
    registry: Arc<FeatureRegistry>,
    last: Arc<Mutex<Option<(RunKey, String)>>>,
    /// Whether the registry has told us its newest run (once is enough:
    /// afterwards this trainer's own runs are the newest).
    asked_registry: Arc<std::sync::atomic::AtomicBool>,
}

/// How long a scheduled run waits for the registry's newest run before
/// training without knowing it.
pub const LAST_RUN_TIMEOUT: Duration = Duration::from_secs(2);

/// What the registry said about its runs.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordedRuns {
    /// It answered: its newest run, if it has any (boxed: a row is large).
    Newest(Option<Box<ExperimentRow>>),
    /// Nobody answers yet (the registry is not up): ask again next time.
    NotYet,
    /// The request timed out (for instance, not permitted) or the answer
    /// was an error or unreadable: do without.
    Unavailable,
}

/// Asks the registry for its newest recorded runs on `ml.registry.runs`.
///
/// The request asks for one run (`{"limit":1}`); a registry that answers
/// every run, oldest first, is read the same way: the newest is the one
/// with the latest timestamp, the last of equals.
pub async fn newest_recorded_run(
    client: &Client,
    subjects: &Subjects,
    timeout: Duration,
) -> RecordedRuns {
    let request = client.request(
        subjects.registry_runs.clone(),
        Bytes::from_static(br#"{"limit":1}"#),
    );
    let message = match tokio::time::timeout(timeout, request).await {
        Ok(Ok(m)) => m,
        Ok(Err(error)) if error.kind() == async_nats::client::RequestErrorKind::NoResponders => {
            tracing::info!("no registry answers for its runs yet");
            return RecordedRuns::NotYet;
        }
        Ok(Err(error)) => {
            tracing::info!(%error, "the registry's runs are unavailable");
            return RecordedRuns::Unavailable;
        }
        Err(_) => {
            tracing::info!("the registry's runs did not come in time");
            return RecordedRuns::Unavailable;
        }
    };
    match serde_json::from_slice::<ApiReply<RunsReply>>(&message.payload) {
        Ok(ApiReply::Ok(reply)) => RecordedRuns::Newest(
            reply
                .runs
                .into_iter()
                .max_by(|a, b| a.timestamp.cmp(&b.timestamp))
                .map(Box::new),
        ),
        Ok(ApiReply::Err(error)) => {
            tracing::info!(%error, "the registry refused to list its runs");
            RecordedRuns::Unavailable
        }
        Err(error) => {
            tracing::info!(%error, "unreadable list of runs from the registry");
            RecordedRuns::Unavailable
        }
    }
}

/// Whether a recorded run was trained with `spec`'s parameters. A
/// registered run records the family it resolved to, so `auto` matches a
/// `linear` or `logistic` run (on the same data, `auto` resolves the same
/// way).
pub fn same_params(row: &ExperimentRow, spec: &TrainSpec) -> bool {
    let model = match spec.model {
        ModelChoice::Auto => matches!(row.model.as_str(), "auto" | "linear" | "logistic"),
        choice => row.model == choice.to_string(),
    };
    model && row.seed == spec.seed && row.validation_fraction == spec.validation_fraction
}

/// The blocking part of a run: read, maybe skip, train.
enum Attempt {
    Skipped {
        key: RunKey,
        last_run: String,
    },
    Trained {
        key: Option<RunKey>,
        result: Box<
            Result<
                (
                    ml_shared::model::ModelArtifact,
                    ml_shared::messages::RunRecord,
                ),
                TrainError,
            >,
        >,
    },
}

impl Trainer {
    /// Trains once and submits; logs the outcome either way.
    async fn run_once(&self, trigger: &'static str) -> Result<Outcome, RunError> {
        let outcome = self.train_and_submit(trigger == "schedule").await;
        match &outcome {
            Ok(Outcome::Registered(reply)) => tracing::info!(
                trigger,
                version = reply.version,
                production = reply.production,
                model = %reply.run.params.model,
                metrics = %serde_json::to_string(&reply.run.metrics).unwrap_or_default(),
                gate = %reply.gate.as_ref().map_or("", |g| g.reason.as_str()),
                rows = reply.run.rows_train + reply.run.rows_validation,
                duration_ms = reply.run.duration_ms,
                fingerprint = %reply.run.data_fingerprint,
                "model registered"
            ),
            Ok(Outcome::Skipped) => {}
            Err(error) => tracing::error!(trigger, %error, "training run failed"),
        }
        outcome
    }

    async fn train_and_submit(&self, may_skip: bool) -> Result<Outcome, RunError> {
        // A request sent while disconnected would only time out, holding up
        // the loop (and `ml.train`) for SUBMIT_TIMEOUT: fail now and retry.
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(RunError::RegistryUnavailable(
                "not connected to NATS".into(),
            ));
        }
        let spec = self.config.spec();
        let run_id = format!("run-{:016x}", rand::random::<u64>());
        let started_ms = ml_shared::time::now_ms();
        let may_skip = may_skip && self.config.skip_unchanged;
        if may_skip
            && !self
                .asked_registry
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.learn_last_run(&spec).await;
        }
        let last = may_skip
            .then(|| self.last.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .flatten();
        let (config, registry, id) = (self.config.clone(), self.registry.clone(), run_id.clone());
        let attempt = tokio::task::spawn_blocking(move || {
            let path = &config.data_path;
            // The stamp taken before the fingerprint: the file the run
            // reads must be the one fingerprinted.
            let fingerprint = data::FileStamp::of(path).and_then(|stamp| {
                let fingerprint = data::fingerprint_file(path)?;
                if data::FileStamp::of(path)? != stamp {
                    return Err(data::DataError::Changed { path: path.clone() });
                }
                Ok((fingerprint, stamp))
            });
            let fingerprint = match fingerprint {
                Ok(f) => f,
                Err(error) => {
                    return Attempt::Trained {
                        key: None,
                        result: Box::new(Err(error.into())),
                    };
                }
            };
            let (fingerprint, stamp) = fingerprint;
            let key = RunKey { fingerprint, spec };
            if let Some((last_key, last_run)) = last {
                if last_key == key {
                    return Attempt::Skipped { key, last_run };
                }
            }
            let result = stream::train_file(
                path,
                &registry,
                &spec,
                id,
                Some((key.fingerprint.clone(), stamp)),
            )
            .map(|trained| {
                let passes = &trained.report.passes;
                tracing::info!(
                    rows = passes.first().map_or(0, |p| p.rows),
                    passes = passes.len(),
                    parse_mb_per_s = format_args!("{:.1}", trained.report.parse_mb_per_s()),
                    rows_per_s =
                        format_args!("{:.0}", passes.first().map_or(0.0, |p| p.rows_per_s())),
                    newton_iterations = trained.report.convergence.as_ref().map(|c| c.iterations),
                    gradient = trained.report.convergence.as_ref().map(|c| c.gradient),
                    "model fitted"
                );
                (trained.artifact, trained.run)
            });
            Attempt::Trained {
                key: Some(key),
                result: Box::new(result),
            }
        })
        .await
        .map_err(|e| RunError::Train(TrainError::Fit(format!("training task failed: {e}"))))?;

        let (key, result) = match attempt {
            Attempt::Skipped { key, last_run } => {
                tracing::info!(
                    fingerprint = %key.fingerprint,
                    last_run = %last_run,
                    "data and parameters unchanged since the last run; skipping the scheduled run"
                );
                return Ok(Outcome::Skipped);
            }
            Attempt::Trained { key, result } => (key, *result),
        };
        let remember = |key: Option<RunKey>| {
            if let Some(key) = key {
                *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((key, run_id.clone()));
            }
        };
        let (artifact, run) = match result {
            Ok(v) => v,
            Err(error) => {
                let failed = FailedRun {
                    run_id: run_id.clone(),
                    started_ms,
                    duration_ms: ml_shared::time::now_ms().saturating_sub(started_ms),
                    params: TrainParams {
                        model: spec.model.to_string(),
                        seed: spec.seed,
                        validation_fraction: spec.validation_fraction,
                    },
                    data_path: self.config.data_path.display().to_string(),
                    data_fingerprint: key.as_ref().map(|k| k.fingerprint.clone()),
                    reason: error.to_string(),
                };
                self.report_failure(&failed).await;
                remember(key);
                return Err(RunError::Train(error));
            }
        };

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
        let ack = match reply.into_result() {
            Ok(ack) => ack,
            Err(refusal) if refusal.error.code == ErrorCode::Unavailable => {
                return Err(RunError::RegistryUnavailable(refusal.to_string()));
            }
            Err(refusal) => {
                let failed = FailedRun {
                    run_id: run.run_id.clone(),
                    started_ms,
                    duration_ms: run.duration_ms,
                    params: run.params.clone(),
                    data_path: run.data_path.clone(),
                    data_fingerprint: Some(run.data_fingerprint.clone()),
                    reason: format!("registry refused the model: {refusal}"),
                };
                self.report_failure(&failed).await;
                remember(key);
                return Err(RunError::Refused(refusal));
            }
        };
        remember(key);
        Ok(Outcome::Registered(Box::new(TrainReply {
            version: ack.version,
            production: ack.production,
            gate: ack.gate,
            run,
        })))
    }

    /// Before this trainer's first run: takes the registry's newest recorded
    /// run as the last run, when it was trained with these parameters.
    async fn learn_last_run(&self, spec: &TrainSpec) {
        if self
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            self.asked_registry
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let answer = newest_recorded_run(&self.client, &self.subjects, LAST_RUN_TIMEOUT).await;
        if answer == RecordedRuns::NotYet {
            return;
        }
        self.asked_registry
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let RecordedRuns::Newest(Some(row)) = answer else {
            return;
        };
        let row = *row;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none() && same_params(&row, spec) && !row.data_fingerprint.is_empty() {
            tracing::info!(
                run_id = %row.run_id,
                version = ?row.version,
                fingerprint = %row.data_fingerprint,
                "the registry's newest run has these parameters: unchanged data will not be retrained"
            );
            *last = Some((
                RunKey {
                    fingerprint: row.data_fingerprint,
                    spec: *spec,
                },
                row.run_id,
            ));
        }
    }

    /// Reports a failed run to the registry, so that the experiments log has
    /// it; a registry that cannot be reached only costs a log line.
    async fn report_failure(&self, failed: &FailedRun) {
        let body = serde_json::to_vec(failed).expect("serialisable");
        let request = self
            .client
            .request(self.subjects.registry_run_failed.clone(), body.into());
        let outcome = match tokio::time::timeout(self.config.submit_timeout, request).await {
            Err(_) => Err("no reply in time".to_owned()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(m)) => match serde_json::from_slice::<ApiReply<RecordedReply>>(&m.payload) {
                Ok(ApiReply::Ok(_)) => Ok(()),
                Ok(ApiReply::Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("unreadable reply: {e}")),
            },
        };
        match outcome {
            Ok(()) => {
                tracing::info!(run_id = %failed.run_id, "failed run recorded by the registry")
            }
            Err(error) => tracing::warn!(
                run_id = %failed.run_id, %error,
                "the registry did not record the failed run"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_run_matches_the_parameters_it_was_trained_with() {
        let spec = TrainSpec::default();
        let row = ExperimentRow {
            model: "linear".into(),
            seed: spec.seed,
            validation_fraction: spec.validation_fraction,
            data_fingerprint: "sha256:ab".into(),
            ..ExperimentRow::default()
        };
        assert!(
            same_params(&row, &spec),
            "auto resolves to what it resolved to"
        );
        let linear = TrainSpec {
            model: ModelChoice::Linear,
            ..spec
        };
        assert!(same_params(&row, &linear));
        let logistic = TrainSpec {
            model: ModelChoice::Logistic,
            ..spec
        };
        assert!(!same_params(&row, &logistic));
        assert!(!same_params(&row, &TrainSpec { seed: 7, ..spec }));
        assert!(!same_params(
            &row,
            &TrainSpec {
                validation_fraction: 0.3,
                ..spec
            }
        ));
        let failed = ExperimentRow {
            model: "auto".into(),
            ..row
        };
        assert!(same_params(&failed, &spec));
        assert!(!same_params(&failed, &linear));
    }
}
