//! The registry service: the system of record for models and runs.
//!
//! It answers four subjects and publishes one:
//! - `ml.registry.submit` (binary): store the model durably ([`store`]),
//!   reply `{"version": N, "production": true}` only after the fsync, then
//!   publish the new production model on `ml.model.production` to every
//!   predictor;
//! - `ml.registry.production` (binary): the production model, for a predictor
//!   that starts later or wants to check it is current;
//! - `ml.registry.models`, `ml.registry.runs` (JSON): the listings.
//!
//! Requests are handled one at a time, so two trainers submitting at once get
//! distinct versions. A malformed request gets a `bad_request` error reply; a
//! failed write gets `unavailable` and no acknowledgement; either way the
//! registry keeps serving. Run one registry per `REGISTRY_DIR`.

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
use ml_shared::messages::{
    ErrorCode, ErrorReply, ProductionQuery, ProductionReply, RunsReply, Submission, SubmitReply,
};
use ml_shared::settings::NatsSettings;
use ml_shared::subjects::Subjects;

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
}

/// Runs the registry until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let store = Store::open(&config.registry_dir)
        .with_context(|| format!("opening the registry in {}", config.registry_dir.display()))?;
    tracing::info!(
        dir = %config.registry_dir.display(),
        versions = store.models().models.len(),
        corrupt = store.corrupt().len(),
        production = ?store.production_release().map(|r| r.version),
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
            Ok(version) => {
                tracing::info!(version, %run_id, "model registered and promoted to production");
                self.reply_json(
                    &message,
                    &SubmitReply {
                        version,
                        production: true,
                    },
                )
                .await;
                self.publish_production().await;
            }
            Err(e) => {
                let code = match e {
                    StoreError::InvalidModel(_) | StoreError::InvalidSubmission(_) => {
                        ErrorCode::BadRequest
                    }
                    StoreError::Io { .. } | StoreError::Log { .. } => ErrorCode::Unavailable,
                };
                tracing::error!(%run_id, error = %e, "submission not registered");
                self.reply_json(&message, &ErrorReply::new(code, e.to_string()))
                    .await;
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
