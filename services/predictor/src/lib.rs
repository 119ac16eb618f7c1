//! The predictor service: answers `ml.predict` as a NATS micro-service
//! endpoint in the `predictor` queue group, so replicas share the load.
//!
//! It holds the production model in memory ([`serving`]), swaps it when the
//! registry publishes a new one ([`updates`]), and reports every request's
//! latency to the monitor without making the reply wait ([`events`]), with a
//! sample of the features it saw and the predictions it made, for drift. Until a
//! model arrives it answers `no_model`. Every error reply carries the JSON
//! body `{"error": {"code", "message"}}` and the micro-service headers
//! `Nats-Service-Error` and `Nats-Service-Error-Code`.
//!
//! On SIGTERM it unsubscribes, answers every request already delivered to it
//! (the other replicas take new ones), flushes its events and leaves.

pub mod events;
pub mod serving;
pub mod updates;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::service::{Request, ServiceExt};
use async_nats::HeaderMap;
use clap::Parser;
use futures::StreamExt;
use ml_shared::features::{FeatureRegistry, FeatureStore};
use ml_shared::messages::{LatencyEvent, Outcome, SERVICE_ERROR_CODE_HEADER, SERVICE_ERROR_HEADER};
use ml_shared::profile::{FeatureSample, SAMPLE_WIDTH};
use ml_shared::settings::{parse_duration, NatsSettings};

use crate::events::{EventSettings, EventSink};
use crate::serving::ServingState;

/// Queue group of the predict endpoint.
pub const QUEUE_GROUP: &str = "predictor";
/// Micro-service name (`nats micro ls`).
pub const SERVICE_NAME: &str = "predictor";

/// Predictor configuration (flags, or the environment variables named).
#[derive(Debug, Clone, Parser)]
#[command(name = "predictor", version, about = "Serves predictions on NATS")]
pub struct Config {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsSettings,

    /// The feature store's data (CSV with user_id, feature_1, feature_2).
    #[arg(long, env = "DATA_PATH", default_value = "data/user_data.csv")]
    pub data_path: PathBuf,

    /// How often to check the data file for changes.
    #[arg(long, env = "FEATURES_REFRESH", default_value = "5s", value_parser = parse_duration)]
    pub features_refresh: Duration,

    /// How often to ask the registry for a model while none is served.
    #[arg(long, env = "MODEL_POLL", default_value = "1s", value_parser = parse_duration)]
    pub model_poll: Duration,

    /// How often to check with the registry that the served model is current.
    #[arg(long, env = "MODEL_RECONCILE", default_value = "30s", value_parser = parse_duration)]
    pub model_reconcile: Duration,

    /// Runtime worker threads: 1 runs everything on one thread (fastest for
    /// this workload on small machines; scale out with replicas instead).
    #[arg(long, env = "PREDICTOR_THREADS", default_value_t = 1)]
    pub threads: usize,

    /// Largest batch (`{"user_ids": [...]}`) a request may hold.
    #[arg(long, env = "MAX_BATCH", default_value_t = serving::DEFAULT_MAX_BATCH)]
    pub max_batch: usize,

    /// This instance's id in latency events (default: host name and pid).
    #[arg(long, env = "PREDICTOR_ID")]
    pub predictor_id: Option<String>,

    /// Latency events held for the monitor before new ones are dropped.
    #[arg(long, env = "EVENT_BUFFER", default_value_t = 65_536)]
    pub event_buffer: usize,

    /// Most latency events in one message to the monitor.
    #[arg(long, env = "EVENT_BATCH", default_value_t = 512)]
    pub event_batch: usize,

    /// Longest a latency event waits before it is sent.
    #[arg(long, env = "EVENT_FLUSH", default_value = "200ms", value_parser = parse_duration)]
    pub event_flush: Duration,

    /// Whether to send latency events to the monitor at all.
    #[arg(
        long,
        env = "EVENTS",
        value_enum,
        default_value = "on",
        ignore_case = true
    )]
    pub events: Switch,

    /// Share of requests whose raw features and prediction go with their
    /// event, for the monitor's drift check (0 to 1).
    #[arg(long, env = "EVENT_SAMPLE", default_value = "1", value_parser = parse_share)]
    pub event_sample: f64,

    /// Most feature samples sent per second (0: no limit).
    #[arg(long, env = "EVENT_SAMPLE_MAX", default_value_t = 1000)]
    pub event_sample_max: u64,
}

/// On or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

fn parse_share(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{text:?} is not a number between 0 and 1")),
    }
}

/// Runs the predictor until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let registry = FeatureRegistry::default();
    let store = match updates::load_store(&registry, config.data_path.clone()).await {
        Ok(store) => store,
        Err(error) => {
            tracing::error!(%error, "feature store empty until the data file loads");
            FeatureStore::default()
        }
    };
    tracing::info!(users = store.len(), data = %config.data_path.display(), "feature store loaded");
    let state = Arc::new(ServingState::with_max_batch(
        registry,
        store,
        config.max_batch,
    ));

    let client = ml_shared::nats::connect(&config.nats, SERVICE_NAME).await?;
    let subjects = config.nats.subjects();
    let predictor_id = config.predictor_id.clone().unwrap_or_else(default_id);
    let service = client
        .service_builder()
        .description("Predictions from the production model")
        .queue_group(QUEUE_GROUP)
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("starting the micro-service: {e}"))?;
    let mut endpoint = service
        .endpoint_builder()
        .name("predict")
        .add(subjects.predict.clone())
        .await
        .map_err(|e| anyhow::anyhow!("adding the predict endpoint: {e}"))?;

    let raw_features = state.registry().raw_names().to_vec();
    let event_sample = if raw_features.len() > SAMPLE_WIDTH {
        tracing::warn!(
            raw = raw_features.len(),
            "more raw features than a sample holds: no samples for drift"
        );
        0.0
    } else {
        config.event_sample
    };
    let (events, events_task) = match config.events {
        Switch::On => {
            let (sink, task) = events::spawn(
                client.clone(),
                EventSettings {
                    subject: subjects.monitor_events.clone(),
                    predictor: predictor_id.clone(),
                    capacity: config.event_buffer,
                    batch: config.event_batch,
                    flush: config.event_flush,
                    sample_rate: event_sample,
                    raw_features,
                    sample_max_per_s: config.event_sample_max,
                },
            );
            (sink, Some(task))
        }
        Switch::Off => {
            tracing::info!("latency events off");
            (EventSink::disabled(), None)
        }
    };
    let follower = tokio::spawn(updates::follow_models(
        client.clone(),
        subjects.clone(),
        state.clone(),
        config.model_poll,
        config.model_reconcile,
        config.nats.request_timeout,
    ));
    let refresher = tokio::spawn(updates::refresh_store(
        state.clone(),
        config.data_path.clone(),
        config.features_refresh,
    ));
    tracing::info!(id = %predictor_id, subject = %subjects.predict, queue = QUEUE_GROUP, "predictor serving");

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            request = endpoint.next() => match request {
                Some(request) => handle(&state, &events, request).await,
                None => break,
            },
        }
    }

    tracing::info!("predictor stopping: answering requests already received");
    if let Err(error) = endpoint.stop().await {
        tracing::warn!(%error, "cannot unsubscribe the predict endpoint");
    }
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        let mut answered = 0u64;
        while let Some(request) = endpoint.next().await {
            handle(&state, &events, request).await;
            answered += 1;
        }
        answered
    })
    .await;
    tracing::info!(answered = ?drained.ok(), "in-flight requests answered");
    follower.abort();
    refresher.abort();
    drop(events);
    if let Some(task) = events_task {
        let _ = task.await;
    }
    if let Err(error) = service.stop().await {
        tracing::warn!(%error, "cannot stop the micro-service cleanly");
    }
    client.drain().await.context("draining the NATS client")?;
    Ok(())
}

/// Answers one request and records its latency.
async fn handle(state: &ServingState, events: &EventSink, request: Request) {
    let started = Instant::now();
    let mut sample = events.sample_next().then(FeatureSample::default);
    let (body, version, outcome) =
        match state.predict_sampled(&request.message.payload, sample.as_mut()) {
            Ok(answer) => (
                serde_json::to_vec(&answer),
                Some(answer.model_version()),
                Outcome::Ok,
            ),
            Err((error, version)) => (
                serde_json::to_vec(&error),
                version,
                Outcome::Error(error.error.code),
            ),
        };
    let body = body.expect("replies serialise");
    let sent = match outcome {
        Outcome::Ok => request.respond(Ok(body.into())).await,
        Outcome::Error(code) => {
            let mut headers = HeaderMap::new();
            headers.insert(SERVICE_ERROR_HEADER, code.as_str());
            headers.insert(
                SERVICE_ERROR_CODE_HEADER,
                code.status().to_string().as_str(),
            );
            request.respond_with_headers(Ok(body.into()), headers).await
        }
    };
    if let Err(error) = sent {
        tracing::debug!(%error, "reply not sent");
    }
    if events.is_enabled() {
        events.record(LatencyEvent {
            ts_ms: ml_shared::time::now_ms(),
            duration_ns: started.elapsed().as_nanos() as u64,
            model_version: version,
            outcome,
            sample: sample.filter(|s| outcome == Outcome::Ok && !s.is_empty()),
        });
    }
}

fn default_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "predictor".into());
    format!("{host}-{}", std::process::id())
}
