//! The gateway's Prometheus metrics, served on its own `/metrics` in the
//! OpenMetrics text format:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `gateway_http_requests_total` | counter | `route` (the matched path pattern), `method`, `status` |
//! | `gateway_http_request_duration_seconds` | histogram, 100 µs to 10 s | `route` |
//! | `gateway_infer_rows_total` | counter: rows predicted through `/v2/.../infer` | |
//!
//! `route` is the pattern (`/v2/models/{name}/infer`), never the raw path,
//! so that the label set stays bounded whatever clients send.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::AppState;

/// Content type of the OpenMetrics text format.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

type HistogramMaker = fn() -> Histogram;

fn buckets() -> Histogram {
    Histogram::new([
        1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
    ])
}

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabels, Histogram, HistogramMaker>,
    rows: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "gateway_http_requests",
            "HTTP requests answered, by route pattern, method and status",
            requests.clone(),
        );
        let duration: Family<RouteLabels, Histogram, HistogramMaker> =
            Family::new_with_constructor(buckets);
        registry.register_with_unit(
            "gateway_http_request_duration",
            "Time from request to response head, by route pattern",
            Unit::Seconds,
            duration.clone(),
        );
        let rows = Counter::default();
        registry.register(
            "gateway_infer_rows",
            "Rows predicted through the Open Inference Protocol",
            rows.clone(),
        );
        Self {
            registry,
            requests,
            duration,
            rows,
        }
    }

    /// Counts predicted rows.
    pub fn rows(&self, n: u64) {
        self.rows.inc_by(n);
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Middleware: counts and times every request by its route pattern.
pub async fn track(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    // Extension methods would make the label set unbounded.
    let method = match request.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "HEAD" | "OPTIONS" | "PATCH") => m.to_owned(),
        _ => "other".to_owned(),
    };
    let started = Instant::now();
    let response = next.run(request).await;
    let metrics = &state.metrics;
    metrics
        .duration
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status: response.status().as_u16().to_string(),
        })
        .inc();
    response
}

/// `GET /metrics`.
pub async fn serve(State(state): State<Arc<AppState>>) -> Response {
    (
        [(CONTENT_TYPE, CONTENT_TYPE_OPENMETRICS)],
        state.metrics.encode(),
    )
        .into_response()
}
