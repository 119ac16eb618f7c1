//! Aggregation of latency events: HDR histograms overall and per model
//! version, error counts by code, predictions by model version, events
//! dropped at the predictors and lost in transit. Which versions are kept
//! apart is decided by [`crate::tracked::Versions`] (capped); the others
//! count in the totals only. Counters saturate, never wrap.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use ml_shared::messages::{EventBatch, Outcome};
use serde::{Deserialize, Serialize};

use crate::drift::DriftReport;
use crate::feedback::{self, Agreement, Guess, Joined, Live, LiveReport, ShadowReport};
use ml_shared::feedback::FeedbackReply;
use ml_shared::routing::Variant;

/// Highest latency the histograms resolve (longer ones are clamped): 60 s.
pub(crate) const MAX_NS: u64 = 60_000_000_000;

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds")
}

/// Statistics over one span of time.
#[derive(Debug, Clone)]
pub struct Aggregate {
    latency: Histogram<u64>,
    by_version: BTreeMap<u64, Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    versions: BTreeMap<u64, u64>,
    dropped: u64,
    lost: u64,
    variants: BTreeMap<Variant, u64>,
    shadow: BTreeMap<u64, Agreement>,
    shadow_dropped: u64,
    live: BTreeMap<u64, Live>,
    feedback: FeedbackReply,
}

impl Default for Aggregate {
    fn default() -> Self {
        Self {
            latency: histogram(),
            by_version: BTreeMap::new(),
            errors: BTreeMap::new(),
            versions: BTreeMap::new(),
            dropped: 0,
            lost: 0,
            variants: BTreeMap::new(),
            shadow: BTreeMap::new(),
            shadow_dropped: 0,
            live: BTreeMap::new(),
            feedback: FeedbackReply::default(),
        }
    }
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencyMs {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl LatencyMs {
    pub(crate) fn of(h: &Histogram<u64>) -> Option<Self> {
        let ms = |ns: u64| ns as f64 / 1e6;
        (!h.is_empty()).then(|| LatencyMs {
            mean: h.mean() / 1e6,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        })
    }
}

/// A summary of an [`Aggregate`], printed and served as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// End of the span, RFC 3339.
    pub ts: String,
    /// Length of the span, seconds.
    pub window_s: f64,
    /// Predictions answered (successes and errors).
    pub count: u64,
    /// `count / window_s`.
    pub rps: f64,
    /// Latency summary; absent when `count` is 0.
    pub latency_ms: Option<LatencyMs>,
    /// Latency summary of the requests each model version answered
    /// (successes and errors).
    pub latency_ms_by_version: BTreeMap<u64, LatencyMs>,
    /// Error replies by code.
    pub errors: BTreeMap<String, u64>,
    /// Errors over `count`; absent when `count` is 0.
    pub error_rate: Option<f64>,
    /// Successful predictions by model version.
    pub versions: BTreeMap<u64, u64>,
    /// Distinct predictors heard from: in a window, those whose batches
    /// were counted in it; since start, those whose state the monitor keeps
    /// (at most `MONITOR_MAX_PREDICTORS`).
    pub predictors: usize,
    /// Events the predictors dropped before sending (monitor path full).
    pub dropped: u64,
    /// Events sent but never received (gaps in the predictors' numbering).
    pub lost: u64,
    /// Drift of the sampled traffic against the production model's
    /// reference profile; absent when not computed (no profile, or too few
    /// samples).
    pub drift: Option<DriftReport>,
    /// Names of the alerts firing at the end of the span.
    #[serde(default)]
    pub alerts: Vec<String>,
    /// Successful predictions by routing variant (only under a table).
    #[serde(default)]
    pub variants: BTreeMap<Variant, u64>,
    /// By shadow version: its latency and agreement with what was served.
    #[serde(default)]
    pub shadow: BTreeMap<u64, ShadowReport>,
    /// Shadow runs the predictors skipped (their `SHADOW_QUEUE` full).
    #[serde(default)]
    pub shadow_dropped: u64,
    /// By version (served or shadow): live metrics from `ml.feedback`.
    #[serde(default)]
    pub live: BTreeMap<u64, LiveReport>,
    /// What became of the labels received on `ml.feedback`.
    #[serde(default)]
    pub feedback: FeedbackReply,
}

impl Aggregate {
    /// Adds a batch of events, of which `lost` were found missing before
    /// it; the versions for which `kept` is true get their own histogram and
    /// count.
    pub fn add(&mut self, batch: &EventBatch, lost: u64, kept: impl Fn(u64) -> bool) {
        self.dropped = self.dropped.saturating_add(batch.dropped);
        self.shadow_dropped = self.shadow_dropped.saturating_add(batch.shadow_dropped);
        self.lost = self.lost.saturating_add(lost);
        for event in &batch.events {
            self.add_routed(event, &kept);
            let ns = event.duration_ns.clamp(1, MAX_NS);
            self.latency.saturating_record(ns);
            if let Some(v) = event.model_version.filter(|v| kept(*v)) {
                self.by_version
                    .entry(v)
                    .or_insert_with(histogram)
                    .saturating_record(ns);
                if event.outcome == Outcome::Ok {
                    let n = self.versions.entry(v).or_default();
                    *n = n.saturating_add(1);
                }
            }
            if let Outcome::Error(code) = event.outcome {
                let n = self.errors.entry(code.as_str().to_owned()).or_default();
                *n = n.saturating_add(1);
            }
        }
    }

    /// Counts an event's variant and its shadow's agreement.
    fn add_routed(
        &mut self,
        event: &ml_shared::messages::LatencyEvent,
        kept: impl Fn(u64) -> bool,
    ) {
        if let (Some(variant), Outcome::Ok) = (event.variant, event.outcome) {
            let n = self.variants.entry(variant).or_default();
            *n = n.saturating_add(1);
        }
        let (Some(answer), Some(version)) = (&event.answer, event.model_version) else {
            return;
        };
        let Some(shadow) = answer.shadow.filter(|s| kept(s.version)) else {
            return;
        };
        let served = Guess {
            version,
            prediction: answer.prediction,
            label: answer.label,
        };
        let guess = Guess {
            version: shadow.version,
            prediction: shadow.prediction,
            label: shadow.label,
        };
        self.shadow
            .entry(shadow.version)
            .or_default()
            .add(&served, &guess, shadow.duration_ns);
    }

    /// Counts one label's fate and, for a match, adds the outcome to the
    /// live metrics of the served version and the shadow's (when kept).
    pub fn join(&mut self, joined: &Joined, outcome: f64, kept: impl Fn(u64) -> bool) {
        feedback::count(&mut self.feedback, joined);
        if let Joined::Matched(served, shadow) = joined {
            for guess in std::iter::once(served).chain(shadow.as_ref()) {
                if kept(guess.version) {
                    self.live
                        .entry(guess.version)
                        .or_default()
                        .add(guess, outcome);
                }
            }
        }
    }

    /// Forgets what was kept apart for `version`.
    pub fn forget_version(&mut self, version: u64) {
        self.by_version.remove(&version);
        self.versions.remove(&version);
        self.shadow.remove(&version);
        self.live.remove(&version);
    }

    /// Summarises the aggregate over `span`, heard from `predictors`
    /// predictors (without drift or alerts, which the caller adds).
    pub fn snapshot(&self, span: Duration, predictors: usize) -> Snapshot {
        let count = self.latency.len();
        let errors: u64 = self.errors.values().sum();
        let secs = span.as_secs_f64().max(1e-9);
        Snapshot {
            ts: ml_shared::time::rfc3339_ms(ml_shared::time::now_ms()),
            window_s: secs,
            count,
            rps: count as f64 / secs,
            latency_ms: LatencyMs::of(&self.latency),
            latency_ms_by_version: self
                .by_version
                .iter()
                .filter_map(|(v, h)| Some((*v, LatencyMs::of(h)?)))
                .collect(),
            errors: self.errors.clone(),
            error_rate: (count > 0).then(|| errors as f64 / count as f64),
            versions: self.versions.clone(),
            predictors,
            dropped: self.dropped,
            lost: self.lost,
            drift: None,
            alerts: Vec::new(),
            variants: self.variants.clone(),
            shadow: self.shadow.iter().map(|(v, a)| (*v, a.report())).collect(),
            shadow_dropped: self.shadow_dropped,
            live: self.live.iter().map(|(v, l)| (*v, l.report())).collect(),
            feedback: self.feedback,
        }
    }
}

impl Snapshot {
    /// One line for people:
    /// `... count=1200 rps=120.0 mean=… p50=0.210ms … p99.9=… max=… errors=unknown_user:3
    /// versions=v2:1197 predictors=1 dropped=0 lost=0 drift=0.013(feature_1) alerts=none`
    pub fn to_text(&self) -> String {
        let latency = match self.latency_ms {
            Some(l) => format!(
                "mean={:.3}ms p50={:.3}ms p90={:.3}ms p95={:.3}ms p99={:.3}ms p99.9={:.3}ms max={:.3}ms",
                l.mean, l.p50, l.p90, l.p95, l.p99, l.p999, l.max
            ),
            None => "mean=- p50=- p90=- p95=- p99=- p99.9=- max=-".into(),
        };
        let join = |items: Vec<String>| {
            if items.is_empty() {
                "none".to_owned()
            } else {
                items.join(",")
            }
        };
        let errors = join(
            self.errors
                .iter()
                .map(|(c, n)| format!("{c}:{n}"))
                .collect(),
        );
        let versions = join(
            self.versions
                .iter()
                .map(|(v, n)| format!("v{v}:{n}"))
                .collect(),
        );
        let drift = match &self.drift {
            Some(d) => format!("{:.3}({})", d.max, d.max_of),
            None => "-".into(),
        };
        let alerts = join(self.alerts.clone());
        let routed = self.routed_text(join);
        format!(
            "{} window={:.1}s count={} rps={:.1} {latency} errors={errors} versions={versions} predictors={} dropped={} lost={} drift={drift}{routed} alerts={alerts}",
            self.ts, self.window_s, self.count, self.rps, self.predictors, self.dropped, self.lost
        )
    }

    /// The variants, shadow and live metrics, when there are any:
    /// ` variants=production:90,candidate:10 shadow=v8:n=20,p50=0.004ms,agree=0.950,mad=0.031,corr=0.990
    /// live=v6:n=80,acc=0.912,logloss=0.231 feedback=matched:80,unknown:2,expired:1,invalid:0`
    fn routed_text(&self, join: impl Fn(Vec<String>) -> String) -> String {
        let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.3}"));
        let mut out = String::new();
        if !self.variants.is_empty() {
            let items = self.variants.iter().map(|(v, n)| {
                let name = serde_json::to_value(v)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned));
                format!("{}:{n}", name.unwrap_or_default())
            });
            out.push_str(&format!(" variants={}", join(items.collect())));
        }
        if !self.shadow.is_empty() || self.shadow_dropped > 0 {
            let items = self.shadow.iter().map(|(v, r)| {
                format!(
                    "v{v}:n={},p50={},agree={},mad={:.3},corr={}",
                    r.count,
                    r.latency_ms
                        .map_or("-".into(), |l| format!("{:.3}ms", l.p50)),
                    f(r.label_agreement),
                    r.mean_abs_diff,
                    f(r.correlation)
                )
            });
            out.push_str(&format!(
                " shadow={} shadow_dropped={}",
                join(items.collect()),
                self.shadow_dropped
            ));
        }
        let fb = &self.feedback;
        if !self.live.is_empty() || fb.matched + fb.unknown + fb.expired + fb.invalid > 0 {
            let items = self.live.iter().map(|(v, r)| match r.accuracy {
                Some(_) => format!(
                    "v{v}:n={},acc={},logloss={}",
                    r.labelled,
                    f(r.accuracy),
                    f(r.log_loss)
                ),
                None => format!("v{v}:n={},rmse={},mae={}", r.labelled, f(r.rmse), f(r.mae)),
            });
            out.push_str(&format!(
                " live={} feedback=matched:{},unknown:{},expired:{},invalid:{}",
                join(items.collect()),
                fb.matched,
                fb.unknown,
                fb.expired,
                fb.invalid
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ml_shared::messages::{ErrorCode, LatencyEvent};

    fn event(ns: u64, outcome: Outcome, version: Option<u64>) -> LatencyEvent {
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

    fn batch(predictor: &str, seq: u64, events: Vec<LatencyEvent>) -> EventBatch {
        EventBatch {
            predictor: predictor.into(),
            seq,
            dropped: 0,
            shadow_dropped: 0,
            raw_features: Vec::new(),
            events,
        }
    }

    #[test]
    fn percentiles_errors_and_versions() {
        let mut agg = Aggregate::default();
        let mut events: Vec<_> = (1..=1000)
            .map(|i| event(i * 100_000, Outcome::Ok, Some(1 + i % 2)))
            .collect();
        events.push(event(
            500_000,
            Outcome::Error(ErrorCode::UnknownUser),
            Some(1),
        ));
        let mut b = batch("p1", 0, events);
        b.dropped = 3;
        agg.add(&b, 2, |_| true);
        let s = agg.snapshot(Duration::from_secs(10), 1);
        assert_eq!(s.count, 1001);
        assert!((s.rps - 100.1).abs() < 1e-9);
        let l = s.latency_ms.unwrap();
        assert!((l.p50 - 50.0).abs() < 0.1, "{l:?}");
        assert!((l.p90 - 90.0).abs() < 0.1, "{l:?}");
        assert!((l.p99 - 99.0).abs() < 0.1, "{l:?}");
        assert!((l.p999 - 99.9).abs() < 0.1, "{l:?}");
        assert!((l.max - 100.0).abs() < 0.1, "{l:?}");
        // Version 1 answered the even-numbered events (0.2 ms … 100 ms) and
        // the error, version 2 the odd-numbered ones (0.1 ms … 99.9 ms).
        let v1 = s.latency_ms_by_version[&1];
        assert!((v1.max - 100.0).abs() < 0.1, "{v1:?}");
        assert!((s.latency_ms_by_version[&2].max - 99.9).abs() < 0.1);
        assert_eq!(s.errors["unknown_user"], 1);
        assert!((s.error_rate.unwrap() - 1.0 / 1001.0).abs() < 1e-12);
        assert_eq!((s.versions[&1], s.versions[&2]), (500, 500));
        assert_eq!((s.predictors, s.dropped, s.lost), (1, 3, 2));
        let text = s.to_text();
        for part in [
            "count=1001",
            "p99.9=99.",
            "errors=unknown_user:1",
            "versions=v1:500,v2:500",
            "dropped=3 lost=2",
            "drift=- alerts=none",
        ] {
            assert!(text.contains(part), "{part} in {text}");
        }
    }

    #[test]
    fn versions_not_kept_count_in_the_totals_only_and_counters_saturate() {
        let mut agg = Aggregate::default();
        let mut b = batch(
            "p1",
            0,
            vec![
                event(1_000, Outcome::Ok, Some(1)),
                event(1_000, Outcome::Ok, Some(2)),
            ],
        );
        b.dropped = u64::MAX - 1;
        agg.add(&b, 0, |v| v == 1);
        agg.add(&b, 5, |v| v == 1);
        let s = agg.snapshot(Duration::from_secs(1), 1);
        assert_eq!((s.count, s.dropped, s.lost), (4, u64::MAX, 5));
        assert_eq!(s.versions, BTreeMap::from([(1, 2)]));
        assert_eq!(s.latency_ms_by_version.len(), 1);
        agg.forget_version(1);
        let s = agg.snapshot(Duration::from_secs(1), 1);
        assert!(s.versions.is_empty() && s.latency_ms_by_version.is_empty());
        assert_eq!(s.count, 4);
    }

    #[test]
    fn an_empty_window_prints_dashes() {
        let s = Aggregate::default().snapshot(Duration::from_secs(10), 0);
        assert_eq!(s.count, 0);
        assert_eq!(s.error_rate, None);
        assert!(s.to_text().contains("p99=-"), "{}", s.to_text());
    }
}
