//! One training run, from the data file to the registry's answer: maybe
//! skipped (unchanged data), trained on a blocking thread, submitted, and
//! reported to the registry when it fails.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_nats::Client;
use ml_shared::data::{self, FileStamp};
use ml_shared::features::FeatureRegistry;
use ml_shared::lifecycle::FailedRun;
use ml_shared::messages::{
    ApiReply, ErrorCode, ProgressEvent, ProgressReport, RunRecord, Submission, SubmitReply,
    TrainParams, TrainReply,
};
use ml_shared::model::ModelArtifact;
use ml_shared::subjects::Subjects;
use tokio::sync::mpsc;

use crate::failures::FailureReports;
use crate::pipeline::{TrainError, TrainSpec};
use crate::recorded::{newest_recorded_run, same_params, RecordedRuns, LAST_RUN_TIMEOUT};
use crate::stream::{self, RunOptions, RunReport};
use crate::{Config, Outcome, RunError};

/// Progress reports of a run, to whoever asked for them (bounded: a report
/// that finds the channel full is dropped, never waited for).
pub type Progress = mpsc::Sender<ProgressReport>;

/// What the last completed run was trained on: a run with the same is skipped.
#[derive(Debug, Clone, PartialEq)]
struct RunKey {
    fingerprint: String,
    spec: TrainSpec,
}

/// The trainer's state between runs.
#[derive(Clone)]
pub struct Trainer {
    client: Client,
    subjects: Subjects,
    config: Arc<Config>,
    registry: Arc<FeatureRegistry>,
    last: Arc<Mutex<Option<(RunKey, String)>>>,
    /// Whether the registry has told us its newest run (once is enough:
    /// afterwards this trainer's own runs are the newest).
    asked_registry: Arc<AtomicBool>,
    /// Failed runs, reported until the registry has them.
    failures: Arc<FailureReports>,
}

/// The blocking part of a run: read, maybe skip, train.
enum Attempt {
    Skipped {
        key: RunKey,
        last_run: String,
    },
    Trained {
        key: Option<RunKey>,
        result: Box<Result<(ModelArtifact, RunRecord, RunReport), TrainError>>,
    },
}

/// A run under way.
struct Run {
    id: String,
    started_ms: u64,
    started: Instant,
    spec: TrainSpec,
    progress: Option<Progress>,
}

impl Trainer {
    /// A trainer with no run behind it.
    pub fn new(client: Client, subjects: Subjects, config: Config) -> Self {
        let failures = FailureReports::new(
            client.clone(),
            subjects.registry_run_failed.clone().into(),
            config.submit_timeout,
        );
        Self {
            failures: Arc::new(failures),
            client,
            subjects,
            config: Arc::new(config),
            registry: Arc::new(FeatureRegistry::default()),
            last: Arc::new(Mutex::new(None)),
            asked_registry: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The NATS connection.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Trains once and submits; logs the outcome either way. A scheduled
    /// run may be skipped; a requested one always trains.
    pub async fn run_once(
        &self,
        trigger: &'static str,
        progress: Option<Progress>,
    ) -> Result<Outcome, RunError> {
        let outcome = self.train_and_submit(trigger == "schedule", progress).await;
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

    async fn train_and_submit(
        &self,
        may_skip: bool,
        progress: Option<Progress>,
    ) -> Result<Outcome, RunError> {
        // A request sent while disconnected would only time out, holding up
        // the loop (and `ml.train`) for SUBMIT_TIMEOUT: fail now and retry.
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(RunError::RegistryUnavailable(
                "not connected to NATS".into(),
            ));
        }
        if self.failures.pending() > 0 {
            let failures = self.failures.clone();
            tokio::spawn(async move { failures.flush().await });
        }
        let run = Run {
            id: format!("run-{:016x}", rand::random::<u64>()),
            started_ms: ml_shared::time::now_ms(),
            started: Instant::now(),
            spec: self.config.spec(),
            progress,
        };
        let may_skip = may_skip && self.config.skip_unchanged;
        if may_skip && !self.asked_registry.load(Ordering::Relaxed) {
            self.learn_last_run(&run.spec).await;
        }
        let (key, result) = match self.attempt(&run, may_skip).await? {
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
        let (artifact, record, report) = match result {
            Ok(v) => v,
            Err(error) => {
                let fingerprint = key.as_ref().map(|k| k.fingerprint.clone());
                let failed = self.failed(&run, fingerprint, error.to_string());
                self.failures.report(failed).await;
                self.remember(key, &run.id);
                return Err(RunError::Train(error));
            }
        };
        if let Some(progress) = &run.progress {
            progress.try_send(submitting(&record, &report, &run)).ok();
        }
        let outcome = self.submit(&record, artifact).await;
        if let Err(RunError::Refused(refusal)) = &outcome {
            let reason = format!("registry refused the model: {refusal}");
            let mut failed = self.failed(&run, Some(record.data_fingerprint.clone()), reason);
            failed.duration_ms = record.duration_ms;
            failed.params = record.params.clone();
            self.failures.report(failed).await;
        }
        if !matches!(outcome, Err(RunError::RegistryUnavailable(_))) {
            self.remember(key, &run.id);
        }
        let ack = outcome?;
        Ok(Outcome::Registered(Box::new(TrainReply {
            version: ack.version,
            production: ack.production,
            gate: ack.gate,
            run: record,
        })))
    }

    /// Fingerprints the file, skips it when unchanged since the last run,
    /// and otherwise trains on it: on a blocking thread.
    async fn attempt(&self, run: &Run, may_skip: bool) -> Result<Attempt, RunError> {
        let last = may_skip
            .then(|| self.last.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .flatten();
        let (config, registry) = (self.config.clone(), self.registry.clone());
        let (id, spec, progress) = (run.id.clone(), run.spec, run.progress.clone());
        tokio::task::spawn_blocking(move || {
            let (fingerprint, stamp) = match fingerprint(&config.data_path) {
                Ok(f) => f,
                Err(error) => {
                    return Attempt::Trained {
                        key: None,
                        result: Box::new(Err(error.into())),
                    };
                }
            };
            let key = RunKey { fingerprint, spec };
            if let Some((last_key, last_run)) = last {
                if last_key == key {
                    return Attempt::Skipped { key, last_run };
                }
            }
            let sink = |report| {
                if let Some(p) = &progress {
                    p.try_send(report).ok();
                }
            };
            let options = RunOptions {
                fingerprinted: Some((&key.fingerprint, stamp)),
                progress: Some(&sink),
                interval: config.progress_interval,
            };
            let result = stream::train_file(&config.data_path, &registry, &spec, id, options).map(
                |trained| {
                    log_fitted(&trained.report);
                    (trained.artifact, trained.run, trained.report)
                },
            );
            Attempt::Trained {
                key: Some(key),
                result: Box::new(result),
            }
        })
        .await
        .map_err(|e| RunError::Train(TrainError::Fit(format!("training task failed: {e}"))))
    }

    /// Submits the model; the registry's refusal and its unavailability are
    /// told apart (the second is retried by the schedule).
    async fn submit(
        &self,
        record: &RunRecord,
        artifact: ModelArtifact,
    ) -> Result<SubmitReply, RunError> {
        let payload = ml_shared::codec::encode(&Submission {
            run: record.clone(),
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
        match reply.into_result() {
            Ok(ack) => Ok(ack),
            Err(refusal) if refusal.error.code == ErrorCode::Unavailable => {
                Err(RunError::RegistryUnavailable(refusal.to_string()))
            }
            Err(refusal) => Err(RunError::Refused(refusal)),
        }
    }

    fn failed(&self, run: &Run, fingerprint: Option<String>, reason: String) -> FailedRun {
        FailedRun {
            run_id: run.id.clone(),
            started_ms: run.started_ms,
            duration_ms: ml_shared::time::now_ms().saturating_sub(run.started_ms),
            params: TrainParams {
                model: run.spec.model.to_string(),
                seed: run.spec.seed,
                validation_fraction: run.spec.validation_fraction,
            },
            data_path: self.config.data_path.display().to_string(),
            data_fingerprint: fingerprint,
            reason,
        }
    }

    fn remember(&self, key: Option<RunKey>, run_id: &str) {
        if let Some(key) = key {
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((key, run_id.to_owned()));
        }
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
            self.asked_registry.store(true, Ordering::Relaxed);
            return;
        }
        let answer = newest_recorded_run(&self.client, &self.subjects, LAST_RUN_TIMEOUT).await;
        if answer == RecordedRuns::NotYet {
            return;
        }
        self.asked_registry.store(true, Ordering::Relaxed);
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
}

/// The data file's fingerprint, and its stamp before it was taken: the
/// file the run reads must be the one fingerprinted.
fn fingerprint(path: &std::path::Path) -> Result<(String, FileStamp), data::DataError> {
    let stamp = FileStamp::of(path)?;
    let fingerprint = data::fingerprint_file(path)?;
    if FileStamp::of(path)? != stamp {
        return Err(data::DataError::Changed {
            path: path.to_owned(),
        });
    }
    Ok((fingerprint, stamp))
}

fn log_fitted(report: &stream::RunReport) {
    let passes = &report.passes;
    tracing::info!(
        rows = passes.first().map_or(0, |p| p.rows),
        passes = passes.len(),
        parse_mb_per_s = format_args!("{:.1}", report.parse_mb_per_s()),
        rows_per_s = format_args!("{:.0}", passes.first().map_or(0.0, |p| p.rows_per_s())),
        newton_iterations = report.convergence.as_ref().map(|c| c.iterations),
        gradient = report.convergence.as_ref().map(|c| c.gradient),
        "model fitted"
    );
}

/// The last progress report of a run: fitted and scored, now with the
/// registry.
fn submitting(record: &RunRecord, report: &RunReport, run: &Run) -> ProgressReport {
    let rows = (record.rows_train + record.rows_validation) as u64;
    let elapsed_s = run.started.elapsed().as_secs_f64();
    // Every pass reads the whole file: the first one's bytes are its size.
    let bytes = report.passes.first().map_or(0, |pass| pass.bytes);
    let seconds: f64 = report.passes.iter().map(|pass| pass.seconds).sum();
    ProgressReport {
        event: ProgressEvent::Submitting,
        pass: None,
        pass_number: report.passes.len() as u32,
        rows,
        bytes,
        total_bytes: bytes,
        elapsed_s,
        rows_per_s: rows as f64 * report.passes.len() as f64 / seconds.max(1e-9),
        mb_per_s: report.passes.iter().map(|pass| pass.bytes).sum::<u64>() as f64
            / seconds.max(1e-9)
            / 1e6,
        eta_s: None,
    }
}
