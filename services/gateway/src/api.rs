//! Plain JSON endpoints for curl users and the console: `POST /v1/predict`
//! takes exactly what `ml.predict` takes and answers exactly what it
//! answers, with the error code's HTTP status (`bad_request` 400,
//! `unknown_user` 404, `no_model`/`busy`/`unavailable` 503, `internal` 500;
//! no predictor 503; no reply in time 504); the registry and monitor
//! listings are passed through as JSON, and the monitor's statistics also
//! as a stream of server-sent events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use ml_shared::messages::ErrorCode;
use serde_json::{json, Value};

use crate::platform::PlatformError;
use crate::AppState;

/// An error in the platform's own shape: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The platform's error code.
    pub code: String,
    /// A sentence for a person.
    pub message: String,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// A `bad_request` (400).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest.as_str(),
            message,
        )
    }
}

impl From<PlatformError> for ApiError {
    fn from(e: PlatformError) -> Self {
        ApiError::new(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY),
            e.code(),
            e.message(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": { "code": self.code, "message": self.message } })),
        )
            .into_response()
    }
}

async fn body_bytes(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, state.config.max_body)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::BadRequest.as_str(),
                format!(
                    "the request body is larger than {} bytes (GATEWAY_MAX_BODY)",
                    state.config.max_body
                ),
            )
        })
}

/// `POST /v1/predict`: the body goes to `ml.predict` as it is; the reply
/// comes back as it is, with the status of its error code.
pub async fn predict(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let body = body_bytes(&state, body).await?;
    let reply = state.platform.predict(body).await?;
    let status = reply
        .error_status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    Ok((status, [(CONTENT_TYPE, "application/json")], reply.payload).into_response())
}

async fn pass(
    state: &AppState,
    service: &'static str,
    subject: &str,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        state.platform.value(service, subject, Bytes::new()).await?,
    ))
}

/// The registry's largest page of a listing (its newest 500 entries).
const LARGEST_PAGE: &[u8] = br#"{"limit":500}"#;

async fn pass_listing(state: &AppState, subject: &str) -> Result<Json<Value>, ApiError> {
    let body = Bytes::from_static(LARGEST_PAGE);
    Ok(Json(state.platform.value("registry", subject, body).await?))
}

/// `GET /v1/models`: `ml.registry.models`.
pub async fn models(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let subject = state.platform.subjects().registry_models.clone();
    pass_listing(&state, &subject).await
}

/// `GET /v1/runs`: `ml.registry.runs`.
pub async fn runs(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let subject = state.platform.subjects().registry_runs.clone();
    pass_listing(&state, &subject).await
}

/// `GET /v1/history`: `ml.registry.history`.
pub async fn history(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let subject = state.platform.subjects().registry_history.clone();
    pass_listing(&state, &subject).await
}

/// `GET /v1/stats`: `ml.monitor.stats`.
pub async fn stats(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let subject = state.platform.subjects().monitor_stats.clone();
    pass(&state, "monitor", &subject).await
}

/// `GET /v1/stats/stream`: `ml.monitor.stats` every `GATEWAY_LIVE_INTERVAL`
/// as server-sent events (`event: stats`, or `event: error` with the
/// platform's error while the monitor does not answer). At most
/// `GATEWAY_MAX_STREAMS` at once (503 beyond); every stream ends when the
/// gateway shuts down.
pub async fn stats_stream(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let permit = state.streams.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Busy.as_str(),
            "too many live streams open (GATEWAY_MAX_STREAMS)",
        )
    })?;
    let interval = state.config.live_interval;
    let mut shutdown = state.shutdown.clone();
    let stream = stats_events(state.clone(), interval)
        .take_until(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .map(move |event| {
            let _held = &permit;
            event
        });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn stats_events(
    state: Arc<AppState>,
    interval: Duration,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold((state, true), move |(state, first)| async move {
        if !first {
            tokio::time::sleep(interval).await;
        }
        let subject = state.platform.subjects().monitor_stats.clone();
        let event = match state
            .platform
            .value("monitor", &subject, Bytes::new())
            .await
        {
            Ok(stats) => Event::default().event("stats").data(stats.to_string()),
            Err(e) => Event::default()
                .event("error")
                .data(json!({ "error": { "code": e.code(), "message": e.message() } }).to_string()),
        };
        Some((Ok(event), (state, false)))
    })
}
