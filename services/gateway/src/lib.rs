//! The gateway service: the platform's HTTP front door. Stateless (any
//! number of replicas behind a load balancer), it talks to the platform over
//! NATS only and serves:
//!
//! * [`oip`]: the Open Inference Protocol (KServe V2) REST API under `/v2`,
//!   with [`tensor`] decoding JSON and binary tensors;
//! * [`api`]: `POST /v1/predict`, the same JSON as `ml.predict`, and the
//!   registry and monitor listings as JSON and server-sent events;
//! * [`console`]: the web console at `/` (server-rendered pages, promote and
//!   rollback for a signed-in operator);
//! * [`metrics`]: its own Prometheus metrics on `/metrics`;
//! * `GET /openapi.json`: an OpenAPI 3.1 document of every endpoint.
//!
//! Every request body is bounded (`GATEWAY_MAX_BODY`), every request has a
//! deadline (`GATEWAY_REQUEST_TIMEOUT`), requests in progress
//! (`GATEWAY_MAX_REQUESTS`), NATS requests in flight
//! (`GATEWAY_MAX_IN_FLIGHT`) and live streams (`GATEWAY_MAX_STREAMS`) are
//! bounded, and errors are structured JSON.

pub mod api;
pub mod console;
pub mod metrics;
pub mod oip;
pub mod platform;
pub mod tensor;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use clap::Parser;
use ml_shared::features::FeatureRegistry;
use ml_shared::settings::{parse_duration, NatsSettings, Secret};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::console::Operators;
use crate::platform::Platform;

/// The OpenAPI document, served on `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Gateway configuration (flags, or the environment variables named).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "gateway",
    version,
    about = "HTTP gateway: Open Inference Protocol, JSON predict, web console"
)]
pub struct Config {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsSettings,

    /// Address to listen on.
    #[arg(long, env = "GATEWAY_ADDR", default_value = "0.0.0.0:8080")]
    pub addr: SocketAddr,

    /// The model's name in the Open Inference Protocol (`/v2/models/{name}`).
    #[arg(long, env = "GATEWAY_MODEL_NAME", default_value = "mlplatform")]
    pub model_name: String,

    /// Largest request body, bytes.
    #[arg(long, env = "GATEWAY_MAX_BODY", default_value_t = 1 << 20)]
    pub max_body: usize,

    /// Longest a request may take before it is answered 504.
    #[arg(long, env = "GATEWAY_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_timeout: Duration,

    /// Most rows in one inference request.
    #[arg(long, env = "GATEWAY_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,

    /// Most `ml.predict` requests one feature batch has in flight.
    #[arg(long, env = "GATEWAY_ROW_CONCURRENCY", default_value_t = 64)]
    pub row_concurrency: usize,

    /// Most HTTP requests being answered at once (more: 503 busy at once).
    #[arg(long, env = "GATEWAY_MAX_REQUESTS", default_value_t = 8192)]
    pub max_requests: usize,

    /// Most NATS requests in flight for the whole gateway (more: 503 busy).
    #[arg(long, env = "GATEWAY_MAX_IN_FLIGHT", default_value_t = 4096)]
    pub max_in_flight: usize,

    /// How long the registry's model list is reused for metadata and checks.
    #[arg(long, env = "GATEWAY_METADATA_TTL", default_value = "1s", value_parser = parse_duration)]
    pub metadata_ttl: Duration,

    /// How often the live panel's stream sends the monitor's figures.
    #[arg(long, env = "GATEWAY_LIVE_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub live_interval: Duration,

    /// Most live streams open at once.
    #[arg(long, env = "GATEWAY_MAX_STREAMS", default_value_t = 64)]
    pub max_streams: usize,

    /// Console operators, `name:password` pairs separated by commas (prefer
    /// GATEWAY_OPERATORS_FILE). Without any, the console is read-only.
    #[arg(long, env = "GATEWAY_OPERATORS", hide_env_values = true)]
    pub operators: Option<Secret>,

    /// A file of operators, one `name:password` a line.
    #[arg(long, env = "GATEWAY_OPERATORS_FILE", conflicts_with = "operators")]
    pub operators_file: Option<PathBuf>,

    /// Whether the console's read-only pages need a signed-in operator too.
    #[arg(long, env = "GATEWAY_CONSOLE_PRIVATE", default_value_t = false, action = clap::ArgAction::Set)]
    pub console_private: bool,

    /// How long an operator stays signed in.
    #[arg(long, env = "GATEWAY_SESSION_TTL", default_value = "8h", value_parser = parse_duration)]
    pub session_ttl: Duration,
}

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// The configuration.
    pub config: Config,
    /// The platform over NATS.
    pub platform: Platform,
    /// The gateway's metrics.
    pub metrics: metrics::Metrics,
    /// The raw features `ml.predict` takes, in metadata order.
    pub raw_features: Vec<String>,
    /// Permits for live streams.
    pub streams: Arc<Semaphore>,
    /// Permits for HTTP requests being answered.
    pub requests: Arc<Semaphore>,
    /// Becomes true when the gateway shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// The console's operators and session keys.
    pub operators: Operators,
}

/// The gateway's routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v2/health/live", get(oip::live))
        .route("/v2/health/ready", get(oip::ready))
        .route("/v2", get(oip::server_metadata))
        .route("/v2/models/{name}", get(oip::model_metadata))
        .route("/v2/models/{name}/ready", get(oip::model_ready))
        .route("/v2/models/{name}/infer", post(oip::infer))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(oip::version_metadata),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(oip::version_ready),
        )
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(oip::infer_versioned),
        )
        .route("/v1/predict", post(api::predict))
        .route("/v1/models", get(api::models))
        .route("/v1/runs", get(api::runs))
        .route("/v1/history", get(api::history))
        .route("/v1/stats", get(api::stats))
        .route("/v1/stats/stream", get(api::stats_stream))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics::serve))
        .merge(console::routes())
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            deadline,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state)
}

async fn openapi() -> Response {
    ([(CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found(request: Request) -> Response {
    let message = format!(
        "no such endpoint: {} {}",
        request.method(),
        request.uri().path()
    );
    (StatusCode::NOT_FOUND, Json(json!({ "error": message }))).into_response()
}

/// Middleware: answers 503 at once beyond `GATEWAY_MAX_REQUESTS` requests
/// in progress, and 504 when the handler takes longer than
/// `GATEWAY_REQUEST_TIMEOUT` (a stream's response head counts, not the
/// stream).
async fn deadline(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let v1 = request.uri().path().starts_with("/v1/");
    let Ok(_permit) = state.requests.clone().try_acquire_owned() else {
        let message =
            "the gateway is busy: too many requests at once (GATEWAY_MAX_REQUESTS); retry";
        return if v1 {
            api::ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message).into_response()
        } else {
            oip::OipError::new(StatusCode::SERVICE_UNAVAILABLE, message).into_response()
        };
    };
    let limit = state.config.http_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let message = format!("no answer within {limit:?} (GATEWAY_REQUEST_TIMEOUT)");
            tracing::warn!(?limit, "request timed out");
            if v1 {
                api::ApiError::new(StatusCode::GATEWAY_TIMEOUT, "unavailable", message)
                    .into_response()
            } else {
                oip::OipError::new(StatusCode::GATEWAY_TIMEOUT, message).into_response()
            }
        }
    }
}

/// Runs the gateway on `GATEWAY_ADDR` until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("binding {}", config.addr))?;
    serve(config, listener, shutdown).await
}

/// Runs the gateway on `listener` until `shutdown` completes: stops
/// accepting, ends the live streams, finishes the requests in flight and
/// drains the NATS connection.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let operators = Operators::from_config(&config)?;
    let client = ml_shared::nats::connect(&config.nats, "gateway").await?;
    let platform = Platform::new(
        client.clone(),
        config.nats.subjects(),
        config.max_in_flight,
        config.metadata_ttl,
    );
    let (stop, stopped) = watch::channel(false);
    let state = Arc::new(AppState {
        raw_features: FeatureRegistry::default().raw_names().to_vec(),
        streams: Arc::new(Semaphore::new(config.max_streams.max(1))),
        requests: Arc::new(Semaphore::new(config.max_requests.max(1))),
        metrics: metrics::Metrics::new(),
        platform,
        shutdown: stopped,
        operators,
        config,
    });
    tracing::info!(
        addr = %listener.local_addr()?,
        model = %state.config.model_name,
        operators = state.operators.count(),
        "gateway serving"
    );
    let app = router(state.clone());
    let mut until_stopped = state.shutdown.clone();
    // Responses go out at once: without TCP_NODELAY a reply written in two
    // segments can wait for the client's delayed ACK (tens of ms).
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::warn!(%error, "could not set TCP_NODELAY");
        }
    });
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = until_stopped.wait_for(|stop| *stop).await;
        })
        .into_future();
    tokio::pin!(server);
    tokio::pin!(shutdown);
    let served = tokio::select! {
        served = &mut server => served,
        () = &mut shutdown => {
            tracing::info!("gateway stopping");
            let _ = stop.send(true);
            server.await
        }
    };
    served.context("serving HTTP")?;
    client.drain().await.context("draining the NATS client")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_are_consistent_and_default_sensibly() {
        use clap::CommandFactory;
        Config::command().debug_assert();
        let c = Config::try_parse_from(["gateway"]).unwrap();
        assert_eq!(c.model_name, "mlplatform");
        assert_eq!(c.addr.port(), 8080);
        assert_eq!(c.http_timeout, Duration::from_secs(10));
    }

    #[test]
    fn the_openapi_document_is_json() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
    }
}
