//! The predictor service: answers `ml.predict` as a NATS micro-service
//! endpoint in the `predictor` queue group, so replicas share the load.
//!
//! It holds the production model in memory, with the routing table in force
//! and every model it names ([`serving`]: the split between production and
//! candidates, `variant` and `request_id` in replies), swaps them as one
//! when the registry publishes ([`updates`]), and reports every request's
//! latency to the monitor without making the reply wait ([`events`]), with a
//! sample of the features it saw and the predictions it made, for drift.
//! Until a model arrives it answers `no_model`. Every error reply carries the JSON
//! body `{"error": {"code", "message"}}` and the micro-service headers
//! `Nats-Service-Error` and `Nats-Service-Error-Code`.
//!
//! At most `MAX_IN_FLIGHT` requests are being answered at once; a request
//! that arrives past that limit is answered `busy` at once, unread, so
//! memory stays bounded whatever the load (see [`admit`]). NATS itself holds
//! at most `PREDICT_BUFFER` requests for this predictor before dropping them
//! as a slow consumer.
//!
//! On SIGTERM it unsubscribes, answers every request already delivered to it
//! (the other replicas take new ones), flushes its events and leaves.

pub mod events;
pub mod scoring;
pub mod serving;
pub mod shadow;
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
use ml_shared::messages::{ErrorCode, ErrorReply, LatencyEvent, Outcome};
use ml_shared::profile::{FeatureSample, SAMPLE_WIDTH};
use ml_shared::routing::{shadowed, Variant, Weighted};
use ml_shared::settings::{parse_duration, NatsSettings};
use tokio::sync::Semaphore;

use crate::events::{EventSettings, EventSink};
use crate::serving::{PendingRecord, ServingState};
use crate::shadow::{ShadowJob, ShadowSink};

/// Queue group of the predict endpoint.
pub const QUEUE_GROUP: &str = "predictor";
/// Micro-service name (`nats micro ls`).
pub const SERVICE_NAME: &str = "predictor";
/// Key of the service metadata holding the id this predictor's latency
/// events carry (`PREDICTOR_ID`).
pub const EVENTS_ID_METADATA: &str = "predictor_id";

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

    /// The largest ONNX model loaded, in bytes (a larger published version
    /// is refused; the current one keeps serving).
    #[arg(long, env = "ONNX_MAX_BYTES", default_value_t = ml_shared::model::DEFAULT_MAX_ONNX_BYTES)]
    pub onnx_max_bytes: usize,

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

    /// Most requests being answered at once; past it, requests get `busy`.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// Requests the NATS client buffers for this predictor; beyond it NATS
    /// drops them (slow consumer) and their senders time out.
    #[arg(long, env = "PREDICT_BUFFER", default_value_t = 16_384)]
    pub predict_buffer: usize,

    /// Shadowed requests waiting for the shadow model; past it a request's
    /// shadow run is skipped and counted (`shadow_dropped`).
    #[arg(long, env = "SHADOW_QUEUE", default_value_t = 1024)]
    pub shadow_queue: usize,

    /// Largest request payload answered, in bytes; larger ones get `bad_request`.
    #[arg(long, env = "PREDICT_MAX_BYTES", default_value_t = 64 * 1024)]
    pub predict_max_bytes: usize,
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
    let predictor_id = config.predictor_id.clone().unwrap_or_else(default_id);
    let state = Arc::new(
        ServingState::with_max_batch(registry, store, config.max_batch)
            .with_instance(&predictor_id)
            .with_onnx_max_bytes(config.onnx_max_bytes),
    );

    let buffer = config.predict_buffer.max(1);
    let client = ml_shared::nats::connect_with(&config.nats, SERVICE_NAME, |o| {
        o.subscription_capacity(buffer)
    })
    .await?;
    // A second connection carries everything but the endpoint: latency
    // events, model updates, and the replies sent while the service's own
    // connection drains at shutdown (see the end of this function).
    let aux = ml_shared::nats::connect(&config.nats, &format!("{SERVICE_NAME}-aux")).await?;
    let subjects = config.nats.subjects();
    let service = client
        .service_builder()
        .description("Predictions from the production model")
        // The monitor accepts latency events only from the ids of running
        // predictors, which it learns from `$SRV.INFO.predictor`.
        .metadata([(EVENTS_ID_METADATA.to_owned(), predictor_id.clone())].into())
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
                aux.clone(),
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
    // The shadow's results go to the monitor only: without events, no shadow.
    let (shadow, shadow_task) = match events.is_enabled() {
        true => {
            let (sink, task) = shadow::spawn(state.clone(), events.clone(), config.shadow_queue);
            (Some(sink), Some(task))
        }
        false => (None, None),
    };
    let follower = tokio::spawn(updates::follow_models(
        aux.clone(),
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

    let admission = Admission {
        state: state.clone(),
        events: events.clone(),
        shadow,
        permits: Arc::new(Semaphore::new(config.max_in_flight as usize)),
        max_bytes: config.predict_max_bytes,
        busy: Arc::new(error_reply(&ErrorReply::new(
            ErrorCode::Busy,
            "too many requests in flight; retry shortly",
        ))),
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            request = endpoint.next() => match request {
                Some(request) => admit(&admission, request).await,
                None => break,
            },
        }
    }

    // Graceful stop without losing a request that NATS already routed here.
    // Unsubscribing the endpoint would make the client library drop the
    // messages still in flight to it; draining the connection instead sends
    // the unsubscribe and a ping, and delivers everything that arrives before
    // the pong. So: let the admitted requests finish (they reply through the
    // service's connection), drain that connection, and answer what is still
    // delivered through the second connection. The other replicas take every
    // request routed after the unsubscribe.
    tracing::info!("predictor stopping: answering requests already received");
    let permits = admission.permits.clone();
    let admitted = tokio::time::timeout(
        Duration::from_secs(5),
        permits.acquire_many(config.max_in_flight),
    )
    .await;
    drop(admitted);
    if let Err(error) = client.drain().await {
        tracing::warn!(%error, "cannot drain the service connection");
    }
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        let mut received = 0u64;
        while let Some(request) = endpoint.next().await {
            handle(&admission, request, Some(&aux)).await;
            received += 1;
        }
        received
    })
    .await;
    tracing::info!(received_after_stop = ?drained.ok(), "in-flight requests answered");
    follower.abort();
    refresher.abort();
    drop(admission);
    if let Some(task) = shadow_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    drop(events);
    drop(service);
    if let Some(task) = events_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    aux.drain().await.context("draining the NATS client")?;
    Ok(())
}

/// What admitting and answering a request needs.
#[derive(Clone)]
struct Admission {
    state: Arc<ServingState>,
    events: EventSink,
    /// The shadow queue (with events on).
    shadow: Option<ShadowSink>,
    permits: Arc<Semaphore>,
    max_bytes: usize,
    /// The `busy` reply, encoded once: refusing must cost less than answering.
    busy: Arc<(bytes::Bytes, HeaderMap)>,
}

/// Admits a request when fewer than `MAX_IN_FLIGHT` are being answered
/// (it is then answered on its own task), and otherwise answers `busy` at
/// once without reading it. The request loop never waits for a prediction,
/// so it keeps taking requests off the NATS buffer as fast as they come,
/// and what it holds is bounded by the permits.
async fn admit(admission: &Admission, request: Request) {
    let message = &request.message;
    if ml_shared::nats::accept_reply("predictor", &message.subject, message.reply.as_ref())
        .is_none()
    {
        return;
    }
    match admission.permits.clone().try_acquire_owned() {
        Ok(permit) => {
            let admission = admission.clone();
            tokio::spawn(async move {
                handle(&admission, request, None).await;
                drop(permit);
            });
        }
        Err(_) => {
            let started = Instant::now();
            let (body, headers) = &*admission.busy;
            if let Err(error) = request
                .respond_with_headers(Ok(body.clone()), headers.clone())
                .await
            {
                tracing::debug!(%error, "busy reply not sent");
            }
            if admission.events.is_enabled() {
                admission.events.record(LatencyEvent {
                    ts_ms: ml_shared::time::now_ms(),
                    duration_ns: started.elapsed().as_nanos() as u64,
                    model_version: admission.state.model().map(|m| m.version()),
                    outcome: Outcome::Error(ErrorCode::Busy),
                    sample: None,
                    variant: None,
                    answer: None,
                });
            }
        }
    }
}

/// What answering a request produced: the reply, and what its event needs.
struct Replied {
    body: bytes::Bytes,
    headers: Option<HeaderMap>,
    version: Option<u64>,
    outcome: Outcome,
    variant: Option<Variant>,
    answer: Option<PendingRecord>,
    shadow: Option<Weighted>,
}

/// Answers a payload; `capture`, when given, gets the raw features used.
fn answer(admission: &Admission, payload: &[u8], capture: Option<&mut FeatureSample>) -> Replied {
    let result = if payload.len() > admission.max_bytes {
        let error = ErrorReply::new(
            ErrorCode::BadRequest,
            format!(
                "request of {} bytes exceeds the limit of {} bytes",
                payload.len(),
                admission.max_bytes
            ),
        );
        Err((error, admission.state.model().map(|m| m.version())))
    } else {
        admission.state.predict_sampled(payload, capture)
    };
    match result {
        Ok(answer) => Replied {
            body: serde_json::to_vec(&answer)
                .expect("replies serialise")
                .into(),
            headers: None,
            version: Some(answer.model_version()),
            outcome: Outcome::Ok,
            variant: answer.variant(),
            answer: admission
                .events
                .is_enabled()
                .then(|| answer.record())
                .flatten(),
            shadow: answer.shadow(),
        },
        Err((error, version)) => {
            let (body, headers) = error_reply(&error);
            Replied {
                body,
                headers: Some(headers),
                version,
                outcome: Outcome::Error(error.error.code),
                variant: None,
                answer: None,
                shadow: None,
            }
        }
    }
}

/// Answers one request and records its latency; a shadowed request goes
/// to the shadow queue after its reply is sent.
/// With `via`, the reply goes through that connection instead of the
/// service's own (which is closing during shutdown).
async fn handle(admission: &Admission, request: Request, via: Option<&async_nats::Client>) {
    let started = Instant::now();
    let sampled = admission.events.sample_next();
    // The raw features go to the event's sample, or to the shadow.
    let mut capture = admission.events.is_enabled().then(FeatureSample::default);
    let mut replied = answer(admission, &request.message.payload, capture.as_mut());
    let (body, headers) = (std::mem::take(&mut replied.body), replied.headers.take());
    let sent = match (via, request.message.reply.clone(), headers) {
        (Some(client), Some(to), Some(headers)) => client
            .publish_with_headers(to, headers, body)
            .await
            .map_err(|e| e.to_string()),
        (Some(client), Some(to), None) => client.publish(to, body).await.map_err(|e| e.to_string()),
        (Some(_), None, _) => Err("request without a reply subject".into()),
        (None, _, None) => request.respond(Ok(body)).await.map_err(|e| e.to_string()),
        (None, _, Some(headers)) => request
            .respond_with_headers(Ok(body), headers)
            .await
            .map_err(|e| e.to_string()),
    };
    if let Err(error) = sent {
        tracing::debug!(%error, "reply not sent");
    }
    if admission.events.is_enabled() {
        let duration_ns = started.elapsed().as_nanos() as u64;
        let sample = capture.filter(|_| sampled);
        record(admission, replied, duration_ns, sample, capture);
    }
}

/// Records a request's event, or hands it to the shadow queue when its
/// table has a shadow and its `request_id` falls in the shadow's percent;
/// `raw`: the request's raw features.
fn record(
    admission: &Admission,
    replied: Replied,
    duration_ns: u64,
    sample: Option<FeatureSample>,
    raw: Option<FeatureSample>,
) {
    let ok = replied.outcome == Outcome::Ok;
    let event = LatencyEvent {
        ts_ms: ml_shared::time::now_ms(),
        duration_ns,
        model_version: replied.version,
        outcome: replied.outcome,
        sample: sample.filter(|s| ok && !s.is_empty()),
        variant: replied.variant,
        answer: replied.answer.map(PendingRecord::into_record),
    };
    let job = match (replied.shadow, raw, &event.answer, &admission.shadow) {
        (Some(shadow), Some(raw), Some(answer), Some(sink))
            if !raw.is_empty() && shadowed(&answer.request_id, shadow.percent) =>
        {
            Some((shadow.version, raw, sink))
        }
        _ => None,
    };
    match job {
        Some((version, raw, sink)) => sink.offer(ShadowJob {
            event,
            version,
            raw,
        }),
        None => admission.events.record(event),
    }
}

/// The body and micro-service error headers of an error reply.
fn error_reply(error: &ErrorReply) -> (bytes::Bytes, HeaderMap) {
    ml_shared::nats::error_parts(error)
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
