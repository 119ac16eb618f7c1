//! Prometheus metrics on `MONITOR_METRICS_ADDR`, path `/metrics`, in the
//! OpenMetrics text format (what Prometheus scrapes by default):
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `ml_predict_latency_seconds` | histogram, 1 µs to 10 s | `model_version` |
//! | `ml_predict_requests_total` | counter | `model_version` |
//! | `ml_predict_errors_total` | counter | `code`, `model_version` |
//! | `ml_monitor_events_dropped_total` | counter | |
//! | `ml_monitor_events_lost_total` | counter | |
//! | `ml_monitor_predictors` | gauge: predictors heard from in the last window | |
//! | `ml_monitor_batches_rejected_total` | counter: event batches refused | `reason` |
//! | `ml_monitor_evictions_total` | counter: state forgotten at a cap | `kind` (`predictor`, `version`, `awaiting`) |
//! | `ml_monitor_quarantined_events` | gauge: events from unknown ids awaiting discovery | |
//! | `ml_monitor_known_predictors` | gauge: predictors found running by discovery | |
//! | `ml_drift_psi` | gauge: PSI of the last window with enough samples | `feature` (`prediction` for predictions) |
//! | `ml_drift_samples` | gauge: samples behind `ml_drift_psi` | |
//! | `ml_drift_model_version` | gauge: the model `ml_drift_psi` compares with | |
//! | `ml_alert_firing` | gauge: 1 while the rule fires | `alertname`, `severity` |
//! | `ml_predict_variant_requests_total` | counter: successful predictions under a routing table | `variant` |
//! | `ml_shadow_latency_seconds` | histogram: the shadow's time per request | `model_version` |
//! | `ml_shadow_dropped_total` | counter: shadow runs skipped (predictor's `SHADOW_QUEUE` full) | |
//! | `ml_shadow_agreement` | gauge: last window's label agreement with what was served | `model_version` |
//! | `ml_shadow_mean_abs_diff` | gauge: last window's mean absolute difference | `model_version` |
//! | `ml_shadow_correlation` | gauge: last window's correlation | `model_version` |
//! | `ml_feedback_labels_total` | counter: labels received on `ml.feedback` | `result` (`matched`, `unknown`, `expired`, `invalid`) |
//! | `ml_feedback_rejected_total` | counter: `ml.feedback` messages refused | |
//! | `ml_live_labelled` | gauge: predictions labelled since start | `model_version` |
//! | `ml_live_accuracy`, `ml_live_log_loss` | gauge: since start (classifiers) | `model_version` |
//! | `ml_live_rmse`, `ml_live_mae` | gauge: since start (regressors) | `model_version` |
//! | `ml_monitor_awaiting_predictions` | gauge: predictions awaiting their outcome | |
//! | `ml_monitor_awaiting_expired_total` | counter: predictions forgotten unlabelled past the horizon | |
//!
//! Predictions forgotten unlabelled at `MONITOR_FEEDBACK_MAX` count in
//! `ml_monitor_evictions_total{kind="awaiting"}`.
//!
//! `model_version` is `none` for requests answered before any model, and
//! `other` for versions past `MONITOR_MAX_VERSIONS` (an evicted version's
//! series are removed), so the exposition stays bounded whatever the traffic.
//! The counters and histograms count since the monitor started, as
//! Prometheus expects; `rate()` and `histogram_quantile()` do the rest.

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::Router;
use ml_shared::messages::{ErrorCode, EventBatch, Outcome};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

use crate::alerts::Rule;
use crate::drift::DriftReport;
use crate::validate::RejectReason;

/// Every error code, to remove an evicted version's error series.
const ERROR_CODES: [ErrorCode; 8] = [
    ErrorCode::BadRequest,
    ErrorCode::UnknownUser,
    ErrorCode::NoModel,
    ErrorCode::Unavailable,
    ErrorCode::Internal,
    ErrorCode::Busy,
    ErrorCode::Conflict,
    ErrorCode::NoQuorum,
];

/// Fails to compile when a code is added without adding it to [`ERROR_CODES`].
const _: fn(ErrorCode) = |code| match code {
    ErrorCode::BadRequest
    | ErrorCode::UnknownUser
    | ErrorCode::NoModel
    | ErrorCode::Unavailable
    | ErrorCode::Internal
    | ErrorCode::Busy
    | ErrorCode::Conflict
    | ErrorCode::NoQuorum => {}
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// Upper bounds of the latency buckets, seconds: 1, 1.5, 2, 3, 4, 5 and 7
/// per decade from 1 µs to 10 s, so that a quantile is known within a
/// factor of 1.5.
pub fn latency_buckets() -> Vec<f64> {
    let mut bounds = Vec::new();
    for exp in -6..=0 {
        for m in ["1", "1.5", "2", "3", "4", "5", "7"] {
            // Parsed from text, so that 5e-6 is the double nearest 5e-6.
            bounds.push(format!("{m}e{exp}").parse().expect("a number"));
        }
    }
    bounds.push(10.0);
    bounds
}

/// Content type of the OpenMetrics text format.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    model_version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    code: String,
    model_version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FeatureLabels {
    feature: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    alertname: String,
    severity: String,
}

type HistogramMaker = fn() -> Histogram;

/// The monitor's Prometheus metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    latency: Family<VersionLabels, Histogram, HistogramMaker>,
    requests: Family<VersionLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    dropped: Counter,
    lost: Counter,
    predictors: Gauge,
    rejected: Family<ReasonLabels, Counter>,
    evictions: Family<KindLabels, Counter>,
    quarantined: Gauge,
    known: Gauge,
    drift: Family<FeatureLabels, Gauge<f64, AtomicU64>>,
    drift_samples: Gauge,
    drift_version: Gauge,
    alerts: Family<AlertLabels, Gauge>,
    routed: Routed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VariantLabels {
    variant: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

type VersionGauge = Family<VersionLabels, Gauge<f64, AtomicU64>>;

/// The metrics of rollouts: variants, the shadow, feedback, live metrics.
#[derive(Debug, Default)]
struct Routed {
    variants: Family<VariantLabels, Counter>,
    shadow_latency: Option<Family<VersionLabels, Histogram, HistogramMaker>>,
    shadow_dropped: Counter,
    agreement: VersionGauge,
    mean_abs_diff: VersionGauge,
    correlation: VersionGauge,
    labels: Family<ResultLabels, Counter>,
    rejected: Counter,
    labelled: VersionGauge,
    accuracy: VersionGauge,
    log_loss: VersionGauge,
    rmse: VersionGauge,
    mae: VersionGauge,
    awaiting: Gauge,
    expired: Counter,
}

impl Routed {
    fn register(registry: &mut Registry) -> Self {
        let r = Self {
            shadow_latency: Some(Family::new_with_constructor(|| {
                Histogram::new(latency_buckets())
            })),
            ..Self::default()
        };
        r.register_plain(registry);
        registry.register(
            "ml_predict_variant_requests",
            "Successful predictions under a routing table, by variant",
            r.variants.clone(),
        );
        if let Some(h) = &r.shadow_latency {
            registry.register_with_unit(
                "ml_shadow_latency",
                "Time the shadow version took per shadowed request",
                Unit::Seconds,
                h.clone(),
            );
        }
        registry.register(
            "ml_feedback_labels",
            "Labels received on ml.feedback, by result",
            r.labels.clone(),
        );
        for result in ["matched", "unknown", "expired", "invalid"] {
            let _ = r.labels.get_or_create(&ResultLabels {
                result: result.into(),
            });
        }
        registry.register(
            "ml_monitor_awaiting_predictions",
            "Predictions awaiting their outcome",
            r.awaiting.clone(),
        );
        r
    }

    /// Registers the plain counters and the per-version gauges.
    fn register_plain(&self, registry: &mut Registry) {
        let counters = [
            (
                "ml_shadow_dropped",
                "Shadow runs skipped because a predictor's shadow queue was full",
                &self.shadow_dropped,
            ),
            (
                "ml_feedback_rejected",
                "ml.feedback messages refused whole",
                &self.rejected,
            ),
            (
                "ml_monitor_awaiting_expired",
                "Predictions forgotten unlabelled past MONITOR_FEEDBACK_HORIZON",
                &self.expired,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        let gauges = [
            ("ml_shadow_agreement", "Share of the last window's shadowed requests where the shadow's label equals the served one", &self.agreement),
            ("ml_shadow_mean_abs_diff", "Mean absolute difference of the shadow's and the served predictions, last window", &self.mean_abs_diff),
            ("ml_shadow_correlation", "Correlation of the shadow's and the served predictions, last window", &self.correlation),
            ("ml_live_labelled", "Predictions of the version labelled since the monitor started", &self.labelled),
            ("ml_live_accuracy", "Live accuracy since start (classifiers)", &self.accuracy),
            ("ml_live_log_loss", "Live log-loss since start (classifiers)", &self.log_loss),
            ("ml_live_rmse", "Live RMSE since start (regressors)", &self.rmse),
            ("ml_live_mae", "Live mean absolute error since start (regressors)", &self.mae),
        ];
        for (name, help, gauge) in gauges {
            registry.register(name, help, gauge.clone());
        }
    }

    fn version_gauges(&self) -> [&VersionGauge; 8] {
        [
            &self.agreement,
            &self.mean_abs_diff,
            &self.correlation,
            &self.labelled,
            &self.accuracy,
            &self.log_loss,
            &self.rmse,
            &self.mae,
        ]
    }
}

/// Sets `family{model_version=v}` to each present value, and removes the
/// series of the versions without one.
fn set_by_version<'a>(family: &VersionGauge, values: impl Iterator<Item = (&'a u64, Option<f64>)>) {
    family.clear();
    for (v, value) in values {
        if let Some(value) = value {
            family
                .get_or_create(&VersionLabels {
                    model_version: v.to_string(),
                })
                .set(value);
        }
    }
}

impl Metrics {
    /// Registers every metric; each rule's `ml_alert_firing` starts at 0.
    pub fn new<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Self {
        let mut registry = Registry::default();
        let latency: Family<VersionLabels, Histogram, HistogramMaker> =
            Family::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register_with_unit(
            "ml_predict_latency",
            "Time a predictor spent on a request, from received to replied",
            Unit::Seconds,
            latency.clone(),
        );
        let requests = Family::<VersionLabels, Counter>::default();
        registry.register(
            "ml_predict_requests",
            "Requests the predictors answered (successes and errors)",
            requests.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "ml_predict_errors",
            "Requests answered with an error, by code",
            errors.clone(),
        );
        let dropped = Counter::default();
        registry.register(
            "ml_monitor_events_dropped",
            "Latency events the predictors dropped before sending (their buffer was full)",
            dropped.clone(),
        );
        let lost = Counter::default();
        registry.register(
            "ml_monitor_events_lost",
            "Latency events sent by the predictors that never reached the monitor",
            lost.clone(),
        );
        let predictors = Gauge::default();
        registry.register(
            "ml_monitor_predictors",
            "Predictors heard from in the last reporting window",
            predictors.clone(),
        );
        let rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "ml_monitor_batches_rejected",
            "Latency event batches refused, by reason (unreadable, a field out of bounds, an id that is not a running predictor's)",
            rejected.clone(),
        );
        for reason in RejectReason::ALL {
            let _ = rejected.get_or_create(&ReasonLabels {
                reason: reason.as_str().to_owned(),
            });
        }
        let evictions = Family::<KindLabels, Counter>::default();
        registry.register(
            "ml_monitor_evictions",
            "Predictors or model versions whose state was forgotten at the monitor's caps",
            evictions.clone(),
        );
        for kind in ["predictor", "version", "awaiting"] {
            let _ = evictions.get_or_create(&KindLabels {
                kind: kind.to_owned(),
            });
        }
        let quarantined = Gauge::default();
        registry.register(
            "ml_monitor_quarantined_events",
            "Events from ids not yet known as running predictors, waiting for a discovery",
            quarantined.clone(),
        );
        let known = Gauge::default();
        registry.register(
            "ml_monitor_known_predictors",
            "Predictors found running by the last discoveries",
            known.clone(),
        );
        let drift = Family::<FeatureLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "ml_drift_psi",
            "Population stability index of the last window against the production model's training data",
            drift.clone(),
        );
        let drift_samples = Gauge::default();
        registry.register(
            "ml_drift_samples",
            "Samples behind ml_drift_psi",
            drift_samples.clone(),
        );
        let drift_version = Gauge::default();
        registry.register(
            "ml_drift_model_version",
            "Model version whose reference profile ml_drift_psi uses",
            drift_version.clone(),
        );
        let alerts = Family::<AlertLabels, Gauge>::default();
        registry.register(
            "ml_alert_firing",
            "1 while the monitor's alert rule fires, else 0",
            alerts.clone(),
        );
        for rule in rules {
            alerts
                .get_or_create(&AlertLabels {
                    alertname: rule.name.clone(),
                    severity: rule.severity.clone(),
                })
                .set(0);
        }
        let routed = Routed::register(&mut registry);
        Self {
            registry,
            latency,
            requests,
            errors,
            dropped,
            lost,
            predictors,
            rejected,
            evictions,
            quarantined,
            known,
            drift,
            drift_samples,
            drift_version,
            alerts,
            routed,
        }
    }

    /// Counts a batch of events, of which `lost` were found missing before
    /// it; versions for which `kept` is false count under `other`.
    pub fn record(&self, batch: &EventBatch, lost: u64, kept: impl Fn(u64) -> bool) {
        inc_saturating(&self.dropped, batch.dropped);
        inc_saturating(&self.lost, lost);
        inc_saturating(&self.routed.shadow_dropped, batch.shadow_dropped);
        self.record_routed(batch, &kept);
        let label = |version: Option<u64>| match version {
            Some(v) if !kept(v) => "other".to_owned(),
            v => version_label(v),
        };
        // Consecutive events mostly share a version: fetch its series once.
        let mut current: Option<(Option<u64>, Histogram, Counter)> = None;
        for event in &batch.events {
            let (histogram, counter) = match &current {
                Some((v, h, c)) if *v == event.model_version => (h, c),
                _ => {
                    let labels = VersionLabels {
                        model_version: label(event.model_version),
                    };
                    let h = self.latency.get_or_create_owned(&labels);
                    let c = self.requests.get_or_create_owned(&labels);
                    current = Some((event.model_version, h, c));
                    let (_, h, c) = current.as_ref().expect("just set");
                    (h, c)
                }
            };
            histogram.observe(event.duration_ns as f64 / 1e9);
            counter.inc();
            if let Outcome::Error(code) = event.outcome {
                self.errors
                    .get_or_create(&ErrorLabels {
                        code: code.as_str().to_owned(),
                        model_version: label(event.model_version),
                    })
                    .inc();
            }
        }
    }

    /// Counts the variants and the shadow's latency of a batch.
    fn record_routed(&self, batch: &EventBatch, kept: impl Fn(u64) -> bool) {
        for event in batch.events.iter().filter(|e| e.outcome == Outcome::Ok) {
            if let Some(variant) = event.variant {
                let name = match variant {
                    ml_shared::routing::Variant::Production => "production",
                    ml_shared::routing::Variant::Candidate => "candidate",
                };
                self.routed
                    .variants
                    .get_or_create(&VariantLabels {
                        variant: name.into(),
                    })
                    .inc();
            }
            let shadow = event.answer.as_ref().and_then(|a| a.shadow);
            if let (Some(s), Some(h)) = (
                shadow.filter(|s| kept(s.version)),
                &self.routed.shadow_latency,
            ) {
                h.get_or_create(&VersionLabels {
                    model_version: s.version.to_string(),
                })
                .observe(s.duration_ns as f64 / 1e9);
            }
        }
    }

    /// Counts the labels of an `ml.feedback` message by result.
    pub fn feedback(&self, reply: &ml_shared::feedback::FeedbackReply) {
        for (result, n) in [
            ("matched", reply.matched),
            ("unknown", reply.unknown),
            ("expired", reply.expired),
            ("invalid", reply.invalid),
        ] {
            inc_saturating(
                &self.routed.labels.get_or_create_owned(&ResultLabels {
                    result: result.into(),
                }),
                n,
            );
        }
    }

    /// Counts an `ml.feedback` message refused.
    pub fn feedback_rejected(&self) {
        self.routed.rejected.inc();
    }

    /// Sets the awaiting gauge; counts `evicted` and `expired` predictions.
    pub fn awaiting(&self, held: usize, evicted: u64, expired: u64) {
        self.routed.awaiting.set(held as i64);
        self.evicted("awaiting", evicted);
        inc_saturating(&self.routed.expired, expired);
    }

    /// Sets the shadow gauges from the window that just ended and the live
    /// gauges from the totals since start.
    pub fn set_routed(&self, window: &crate::stats::Snapshot, total: &crate::stats::Snapshot) {
        let r = &self.routed;
        set_by_version(
            &r.agreement,
            window.shadow.iter().map(|(v, s)| (v, s.label_agreement)),
        );
        set_by_version(
            &r.mean_abs_diff,
            window
                .shadow
                .iter()
                .map(|(v, s)| (v, Some(s.mean_abs_diff))),
        );
        set_by_version(
            &r.correlation,
            window.shadow.iter().map(|(v, s)| (v, s.correlation)),
        );
        set_by_version(
            &r.labelled,
            total.live.iter().map(|(v, l)| (v, Some(l.labelled as f64))),
        );
        set_by_version(&r.accuracy, total.live.iter().map(|(v, l)| (v, l.accuracy)));
        set_by_version(&r.log_loss, total.live.iter().map(|(v, l)| (v, l.log_loss)));
        set_by_version(&r.rmse, total.live.iter().map(|(v, l)| (v, l.rmse)));
        set_by_version(&r.mae, total.live.iter().map(|(v, l)| (v, l.mae)));
    }

    /// Removes the series of an evicted model version.
    pub fn forget_version(&self, version: u64) {
        let model_version = version.to_string();
        let labels = VersionLabels {
            model_version: model_version.clone(),
        };
        self.latency.remove(&labels);
        self.requests.remove(&labels);
        if let Some(h) = &self.routed.shadow_latency {
            h.remove(&labels);
        }
        for gauge in self.routed.version_gauges() {
            gauge.remove(&labels);
        }
        for code in ERROR_CODES {
            self.errors.remove(&ErrorLabels {
                code: code.as_str().to_owned(),
                model_version: model_version.clone(),
            });
        }
        self.evicted("version", 1);
    }

    /// Counts a rejected batch.
    pub fn rejected(&self, reason: RejectReason) {
        self.rejected
            .get_or_create(&ReasonLabels {
                reason: reason.as_str().to_owned(),
            })
            .inc();
    }

    /// Counts `n` evictions of `kind` (`predictor` or `version`).
    pub fn evicted(&self, kind: &str, n: u64) {
        if n > 0 {
            inc_saturating(
                &self.evictions.get_or_create_owned(&KindLabels {
                    kind: kind.to_owned(),
                }),
                n,
            );
        }
    }

    /// Sets the identity gauges: events in quarantine, predictors known.
    pub fn set_identity(&self, quarantined: usize, known: usize) {
        self.quarantined.set(quarantined as i64);
        self.known.set(known as i64);
    }

    /// Sets the gauges of the window that just ended.
    pub fn end_window(&self, predictors: usize, drift: Option<&DriftReport>) {
        self.predictors.set(predictors as i64);
        if let Some(d) = drift {
            self.drift.clear();
            for (feature, psi) in &d.features {
                self.drift
                    .get_or_create(&FeatureLabels {
                        feature: feature.clone(),
                    })
                    .set(*psi);
            }
            self.drift
                .get_or_create(&FeatureLabels {
                    feature: "prediction".into(),
                })
                .set(d.prediction);
            self.drift_samples.set(d.samples as i64);
            self.drift_version.set(d.model_version as i64);
        }
    }

    /// Sets a rule's `ml_alert_firing`.
    pub fn set_alert(&self, rule: &Rule, firing: bool) {
        self.alerts
            .get_or_create(&AlertLabels {
                alertname: rule.name.clone(),
                severity: rule.severity.clone(),
            })
            .set(i64::from(firing));
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Adds `n` to a counter, stopping at `u64::MAX` instead of wrapping.
fn inc_saturating(counter: &Counter, n: u64) {
    let room = u64::MAX - counter.get();
    counter.inc_by(n.min(room));
}

fn version_label(version: Option<u64>) -> String {
    version.map_or_else(|| "none".to_owned(), |v| v.to_string())
}

/// The `/metrics` server, running in a task of its own.
pub struct Server {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Binds `addr` and serves `metrics` on it.
    pub async fn start(addr: std::net::SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        use anyhow::Context;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics address {addr}"))?;
        tracing::info!(addr = %listener.local_addr()?, "serving Prometheus metrics on /metrics");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, metrics, async move {
            let _ = stopped.await;
        }));
        Ok(Self { stop, task })
    }

    /// Stops it, waiting at most five seconds.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        match tokio::time::timeout(std::time::Duration::from_secs(5), self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "metrics server failed"),
            Ok(Err(error)) => tracing::warn!(%error, "metrics server panicked"),
            Err(_) => tracing::warn!("metrics server did not stop in time"),
        }
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move { ([(CONTENT_TYPE, CONTENT_TYPE_OPENMETRICS)], metrics.encode()) }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use ml_shared::messages::{ErrorCode, LatencyEvent};

    fn event(ns: u64, version: Option<u64>, outcome: Outcome) -> LatencyEvent {
        LatencyEvent {
            ts_ms: 0,
            duration_ns: ns,
            model_version: version,
            outcome,
            sample: None,
            variant: None,
            answer: None,
        }
    }

    #[test]
    fn buckets_increase_by_at_most_half() {
        let b = latency_buckets();
        assert_eq!((b[0], *b.last().unwrap()), (1e-6, 10.0));
        for w in b.windows(2) {
            assert!(w[1] > w[0] && w[1] / w[0] <= 1.5 + 1e-9, "{w:?}");
        }
    }

    #[test]
    fn the_exposition_has_buckets_counters_and_gauges() {
        let rules = crate::alerts::load_rules(None).unwrap();
        let metrics = Metrics::new(&rules);
        metrics.record(
            &EventBatch {
                predictor: "p".into(),
                seq: 0,
                dropped: 2,
                raw_features: Vec::new(),
                events: vec![
                    event(4_000, Some(3), Outcome::Ok),
                    event(6_000, Some(3), Outcome::Ok),
                    event(9_000, None, Outcome::Error(ErrorCode::NoModel)),
                    event(2_000, Some(3), Outcome::Error(ErrorCode::UnknownUser)),
                    event(2_000, Some(4), Outcome::Error(ErrorCode::UnknownUser)),
                ],
                shadow_dropped: 0,
            },
            5,
            |v| v == 3,
        );
        metrics.rejected(RejectReason::BadDuration);
        metrics.set_alert(&rules[3], true);
        let text = metrics.encode();
        let expected = [
            "# TYPE ml_predict_latency_seconds histogram",
            r#"ml_predict_latency_seconds_bucket{le="0.000005",model_version="3"} 2"#,
            r#"ml_predict_latency_seconds_bucket{le="0.000007",model_version="3"} 3"#,
            r#"ml_predict_latency_seconds_count{model_version="3"} 3"#,
            r#"ml_predict_latency_seconds_count{model_version="none"} 1"#,
            r#"ml_predict_requests_total{model_version="3"} 3"#,
            r#"ml_predict_requests_total{model_version="other"} 1"#,
            r#"ml_monitor_batches_rejected_total{reason="bad_duration"} 1"#,
            r#"ml_monitor_batches_rejected_total{reason="unknown_predictor"} 0"#,
            r#"ml_monitor_evictions_total{kind="version"} 0"#,
            r#"ml_predict_errors_total{code="unknown_user",model_version="3"} 1"#,
            r#"ml_predict_errors_total{code="no_model",model_version="none"} 1"#,
            "ml_monitor_events_dropped_total 2",
            "ml_monitor_events_lost_total 5",
            r#"ml_alert_firing{alertname="DataDrift",severity="warning"} 1"#,
            r#"ml_alert_firing{alertname="LatencyP99High",severity="page"} 0"#,
        ];
        for line in expected {
            assert!(text.contains(line), "{line}\nnot in\n{text}");
        }
        metrics.forget_version(3);
        let text = metrics.encode();
        assert!(!text.contains(r#"model_version="3""#), "{text}");
        assert!(
            text.contains(r#"ml_monitor_evictions_total{kind="version"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn counters_saturate() {
        let metrics = Metrics::new(&[]);
        let batch = |dropped| EventBatch {
            predictor: "p".into(),
            seq: 0,
            dropped,
            raw_features: Vec::new(),
            events: Vec::new(),
            shadow_dropped: 0,
        };
        metrics.record(&batch(u64::MAX - 1), 0, |_| true);
        metrics.record(&batch(5), 0, |_| true);
        assert!(metrics
            .encode()
            .contains(&format!("ml_monitor_events_dropped_total {}", u64::MAX)));
    }
}
