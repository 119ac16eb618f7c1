//! The registry service: the system of record for models and runs.
//!
//! It answers these subjects and publishes one:
//! - `ml.registry.submit` (binary): store the model durably ([`store`]), make
//!   it the `candidate`, run the promotion gate ([`gate`]), reply
//!   `{"version":N,"production":bool,"gate":{…}}` only after the fsyncs, then
//!   publish the production model on `ml.model.production` if it changed;
//! - `ml.registry.promote`, `ml.registry.rollback` (JSON): move `production`
//!   by hand, recorded in the history with who and why, then publish;
//! - `ml.registry.history` (JSON): every alias move;
//! - `ml.registry.run_failed` (JSON): log a run that produced no model;
//! - `ml.registry.production` (binary): the production model, for a predictor
//!   that starts later or wants to check it is current;
//! - `ml.registry.models`, `ml.registry.runs` (JSON): the listings.
//!
//! Requests are handled one at a time, so two trainers submitting at once get
//! distinct versions. A malformed request gets a `bad_request` error reply; a
//! failed write gets `unavailable` and no acknowledgement; either way the
//! registry keeps serving. Run one registry per `REGISTRY_DIR`.

pub mod gate;
pub mod journal;
pub mod legacy;
pub mod store;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use async_nats::{Client, Message};
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use ml_shared::codec;
use ml_shared::lifecycle::{
    FailedRun, HistoryReply, HistoryRequest, PromoteRequest, RecordedReply, RollbackRequest,
};
use ml_shared::messages::{
    ErrorCode, ErrorReply, ProductionQuery, ProductionReply, RunsReply, Submission, SubmitReply,
};
use ml_shared::settings::NatsSettings;
use ml_shared::subjects::Subjects;
use serde::de::DeserializeOwned;

use crate::store::{Store, StoreError};

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

    /// Where models, the experiments log and the production pointer live.
    #[arg(long, env = "REGISTRY_DIR", default_value = "registry-data")]
    pub registry_dir: PathBuf,

    /// How much worse than production, relative to production's value, a new
    /// version's gate metric (RMSE, or accuracy for a classifier) may be and
    /// still be promoted: 0.05 = 5%.
    #[arg(long, env = "PROMOTE_TOLERANCE", default_value_t = gate::DEFAULT_TOLERANCE)]
    pub promote_tolerance: f64,
}

/// Runs the registry until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let store = Store::open(&config.registry_dir, config.promote_tolerance)
        .with_context(|| format!("opening the registry in {}", config.registry_dir.display()))?;
    tracing::info!(
        dir = %config.registry_dir.display(),
        versions = store.models().models.len(),
        corrupt = ?store.corrupt().keys().collect::<Vec<_>>(),
        production = ?store.production_release().map(|r| r.version),
        epoch = store.production_epoch(),
        tolerance = config.promote_tolerance,
        "registry opened"
    );
    // Under a file-size limit (RLIMIT_FSIZE) the kernel sends SIGXFSZ, whose
    // default action kills the process; handled, the write fails with EFBIG
    // instead and the submission gets `unavailable`, like on a full disk.
    let file_size_signal = watch_file_size_signal();
    let client = ml_shared::nats::connect(&config.nats, "registry").await?;
    let subjects = config.nats.subjects();
    let registry = Registry {
        client: client.clone(),
        subjects: subjects.clone(),
        store: Arc::new(Mutex::new(store)),
    };

    let mut submit = client.subscribe(subjects.registry_submit.clone()).await?;
    let mut production = client
        .subscribe(subjects.registry_production.clone())
        .await?;
    let mut models = client.subscribe(subjects.registry_models.clone()).await?;
    let mut runs = client.subscribe(subjects.registry_runs.clone()).await?;
    let mut run_failed = client
        .subscribe(subjects.registry_run_failed.clone())
        .await?;
    let mut promote = client.subscribe(subjects.registry_promote.clone()).await?;
    let mut rollback = client.subscribe(subjects.registry_rollback.clone()).await?;
    let mut history = client.subscribe(subjects.registry_history.clone()).await?;
    // Predictors that started before us are waiting for a model.
    registry.publish_production().await;

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(m) = submit.next() => registry.on_submit(m).await,
            Some(m) = production.next() => registry.on_production(m).await,
            Some(m) = models.next() => registry.on_models(m).await,
            Some(m) = runs.next() => registry.on_runs(m).await,
            Some(m) = run_failed.next() => registry.on_run_failed(m).await,
            Some(m) = promote.next() => registry.on_promote(m).await,
            Some(m) = rollback.next() => registry.on_rollback(m).await,
            Some(m) = history.next() => registry.on_history(m).await,
            else => break,
        }
    }
    tracing::info!("registry stopping");
    if let Some(task) = file_size_signal {
        task.abort();
    }
    client.drain().await.context("draining the NATS client")?;
    Ok(())
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

struct Registry {
    client: Client,
    subjects: Subjects,
    store: Arc<Mutex<Store>>,
}

impl Registry {
    /// Runs `f` on the store off the async threads (it does blocking I/O).
    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> T + Send + 'static,
    ) -> T {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&mut store.lock().unwrap_or_else(|p| p.into_inner())))
            .await
            .expect("store task panicked")
    }

    async fn reply(&self, message: &Message, body: Bytes) {
        let Some(reply) = message.reply.clone() else {
            tracing::debug!(subject = %message.subject, "request without a reply subject");
            return;
        };
        if let Err(error) = self.client.publish(reply, body).await {
            tracing::warn!(%error, "cannot send a reply");
        }
    }

    async fn reply_json<T: serde::Serialize>(&self, message: &Message, value: &T) {
        let body = serde_json::to_vec(value).expect("replies serialise");
        self.reply(message, body.into()).await;
    }

    async fn on_submit(&self, message: Message) {
        let submission: Submission = match codec::decode(&message.payload) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, bytes = message.payload.len(), "unreadable submission");
                let reply =
                    ErrorReply::new(ErrorCode::BadRequest, format!("unreadable submission: {e}"));
                return self.reply_json(&message, &reply).await;
            }
        };
        let run_id = submission.run.run_id.clone();
        match self.with_store(move |s| s.register(submission)).await {
            Ok(registered) => {
                let gate = &registered.gate;
                tracing::info!(
                    version = registered.version,
                    %run_id,
                    production = registered.production,
                    metric = %gate.metric,
                    value = gate.candidate,
                    production_value = ?gate.production,
                    tolerance = gate.tolerance,
                    reason = %gate.reason,
                    "model registered"
                );
                self.reply_json(
                    &message,
                    &SubmitReply {
                        version: registered.version,
                        production: registered.production,
                        gate: Some(registered.gate.clone()),
                    },
                )
                .await;
                if registered.production {
                    self.publish_production().await;
                }
            }
            Err(e) => {
                tracing::error!(%run_id, error = %e, "submission not registered");
                self.reply_json(&message, &store_error(&e)).await;
            }
        }
    }

    /// Parses a JSON request, answering `bad_request` when it cannot.
    async fn parse<T: DeserializeOwned>(&self, message: &Message, empty_ok: bool) -> Option<T> {
        let payload: &[u8] = if empty_ok && message.payload.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &message.payload
        };
        match serde_json::from_slice(payload) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(subject = %message.subject, error = %e, "malformed request");
                let reply = ErrorReply::new(ErrorCode::BadRequest, format!("invalid request: {e}"));
                self.reply_json(message, &reply).await;
                None
            }
        }
    }

    async fn on_run_failed(&self, message: Message) {
        let Some(run) = self.parse::<FailedRun>(&message, false).await else {
            return;
        };
        let (run_id, reason) = (run.run_id.clone(), run.reason.clone());
        match self.with_store(move |s| s.record_failure(&run)).await {
            Ok(()) => {
                tracing::info!(%run_id, %reason, "failed run recorded");
                self.reply_json(&message, &RecordedReply { recorded: true })
                    .await;
            }
            Err(e) => {
                tracing::error!(%run_id, error = %e, "failed run not recorded");
                self.reply_json(&message, &store_error(&e)).await;
            }
        }
    }

    async fn on_promote(&self, message: Message) {
        let Some(req) = self.parse::<PromoteRequest>(&message, false).await else {
            return;
        };
        let outcome = self
            .with_store(move |s| s.promote(req.version, &req.reason, &req.actor))
            .await;
        self.after_move(&message, outcome).await;
    }

    async fn on_rollback(&self, message: Message) {
        let Some(req) = self.parse::<RollbackRequest>(&message, false).await else {
            return;
        };
        let outcome = self
            .with_store(move |s| {
                let reason = req.reason.as_deref().unwrap_or("rollback");
                s.rollback(reason, &req.actor)
            })
            .await;
        self.after_move(&message, outcome).await;
    }

    async fn after_move(
        &self,
        message: &Message,
        outcome: Result<ml_shared::lifecycle::MoveReply, StoreError>,
    ) {
        match outcome {
            Ok(reply) => {
                self.reply_json(message, &reply).await;
                if reply.moved {
                    self.publish_production().await;
                }
            }
            Err(e) => {
                tracing::warn!(subject = %message.subject, error = %e, "alias not moved");
                self.reply_json(message, &store_error(&e)).await;
            }
        }
    }

    async fn on_history(&self, message: Message) {
        let Some(req) = self.parse::<HistoryRequest>(&message, true).await else {
            return;
        };
        match self.with_store(move |s| s.history(req.limit)).await {
            Ok(moves) => self.reply_json(&message, &HistoryReply { moves }).await,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the history");
                self.reply_json(&message, &store_error(&e)).await;
            }
        }
    }

    async fn publish_production(&self) {
        let Some(release) = self.with_store(|s| s.production_release()).await else {
            return;
        };
        let (version, epoch) = (release.version, release.epoch);
        let payload = codec::encode(&release);
        match self
            .client
            .publish(self.subjects.model_production.clone(), payload.into())
            .await
        {
            Ok(()) => tracing::info!(version, epoch, "production model published"),
            Err(error) => tracing::warn!(%error, version, "cannot publish the production model"),
        }
    }

    async fn on_production(&self, message: Message) {
        let after_epoch = if message.payload.is_empty() {
            0
        } else {
            match serde_json::from_slice::<ProductionQuery>(&message.payload) {
                Ok(q) => q.after_epoch,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable production query");
                    0
                }
            }
        };
        let reply = self
            .with_store(move |s| match s.production_release() {
                None => ProductionReply::NoModel,
                Some(r) if r.epoch <= after_epoch => ProductionReply::Current,
                Some(r) => ProductionReply::Release(r),
            })
            .await;
        self.reply(&message, codec::encode(&reply).into()).await;
    }

    async fn on_models(&self, message: Message) {
        let models = self.with_store(|s| s.models()).await;
        self.reply_json(&message, &models).await;
    }

    async fn on_runs(&self, message: Message) {
        match self.with_store(|s| s.runs()).await {
            Ok(runs) => self.reply_json(&message, &RunsReply { runs }).await,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the experiments log");
                self.reply_json(
                    &message,
                    &ErrorReply::new(ErrorCode::Internal, e.to_string()),
                )
                .await;
            }
        }
    }
}

/// The error reply for a store error: the caller's fault, or the disk's.
fn store_error(e: &StoreError) -> ErrorReply {
    let code = if e.is_bad_request() {
        ErrorCode::BadRequest
    } else {
        ErrorCode::Unavailable
    };
    ErrorReply::new(code, e.to_string())
}
