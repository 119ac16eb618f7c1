//! Aggregation of latency events: an HDR histogram per reporting window and
//! one since start, error counts by code, predictions by model version.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hdrhistogram::Histogram;
use ml_shared::messages::{EventBatch, Outcome};
use serde::{Deserialize, Serialize};

/// Highest latency the histograms resolve (longer ones are clamped): 60 s.
const MAX_NS: u64 = 60_000_000_000;

/// Statistics over one span of time.
#[derive(Debug, Clone)]
pub struct Aggregate {
    latency: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    versions: BTreeMap<u64, u64>,
    predictors: BTreeSet<String>,
    dropped: u64,
}

impl Default for Aggregate {
    fn default() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds"),
            errors: BTreeMap::new(),
            versions: BTreeMap::new(),
            predictors: BTreeSet::new(),
            dropped: 0,
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
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
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
    /// Error replies by code.
    pub errors: BTreeMap<String, u64>,
    /// Predictions by model version.
    pub versions: BTreeMap<u64, u64>,
    /// Distinct predictors heard from.
    pub predictors: usize,
    /// Events the predictors dropped before sending (monitor path full).
    pub dropped: u64,
}

impl Aggregate {
    /// Adds a batch of events.
    pub fn add(&mut self, batch: &EventBatch) {
        self.dropped += batch.dropped;
        if !self.predictors.contains(&batch.predictor) {
            self.predictors.insert(batch.predictor.clone());
        }
        for event in &batch.events {
            self.latency
                .saturating_record(event.duration_ns.clamp(1, MAX_NS));
            if let Some(v) = event.model_version {
                if event.outcome == Outcome::Ok {
                    *self.versions.entry(v).or_default() += 1;
                }
            }
            if let Outcome::Error(code) = event.outcome {
                *self.errors.entry(code.as_str().to_owned()).or_default() += 1;
            }
        }
    }

    /// Summarises the aggregate over `span`.
    pub fn snapshot(&self, span: Duration) -> Snapshot {
        let count = self.latency.len();
        let ms = |ns: u64| ns as f64 / 1e6;
        let latency_ms = (count > 0).then(|| LatencyMs {
            mean: self.latency.mean() / 1e6,
            p50: ms(self.latency.value_at_quantile(0.50)),
            p95: ms(self.latency.value_at_quantile(0.95)),
            p99: ms(self.latency.value_at_quantile(0.99)),
            max: ms(self.latency.max()),
        });
        let secs = span.as_secs_f64().max(1e-9);
        Snapshot {
            ts: ml_shared::time::rfc3339_ms(ml_shared::time::now_ms()),
            window_s: secs,
            count,
            rps: count as f64 / secs,
            latency_ms,
            errors: self.errors.clone(),
            versions: self.versions.clone(),
            predictors: self.predictors.len(),
            dropped: self.dropped,
        }
    }
}

impl Snapshot {
    /// One line for people:
    /// `... count=1200 rps=120.0 p50=0.210ms p95=... errors=unknown_user:3 versions=v2:1197 ...`
    pub fn to_text(&self) -> String {
        let latency = match self.latency_ms {
            Some(l) => format!(
                "mean={:.3}ms p50={:.3}ms p95={:.3}ms p99={:.3}ms max={:.3}ms",
                l.mean, l.p50, l.p95, l.p99, l.max
            ),
            None => "mean=- p50=- p95=- p99=- max=-".into(),
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
        format!(
            "{} window={:.1}s count={} rps={:.1} {latency} errors={errors} versions={versions} predictors={} dropped={}",
            self.ts, self.window_s, self.count, self.rps, self.predictors, self.dropped
        )
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
        }
    }

    #[test]
    fn percentiles_errors_and_versions() {
        let mut agg = Aggregate::default();
        let mut events: Vec<_> = (1..=100)
            .map(|i| event(i * 1_000_000, Outcome::Ok, Some(1 + i % 2)))
            .collect();
        events.push(event(
            500_000,
            Outcome::Error(ErrorCode::UnknownUser),
            Some(1),
        ));
        agg.add(&EventBatch {
            predictor: "p1".into(),
            dropped: 3,
            events,
        });
        let s = agg.snapshot(Duration::from_secs(10));
        assert_eq!(s.count, 101);
        assert!((s.rps - 10.1).abs() < 1e-9);
        let l = s.latency_ms.unwrap();
        assert!((l.p50 - 50.0).abs() < 0.1, "{l:?}");
        assert!((l.p99 - 99.0).abs() < 0.1, "{l:?}");
        assert!((l.max - 100.0).abs() < 0.1, "{l:?}");
        assert_eq!(s.errors["unknown_user"], 1);
        assert_eq!((s.versions[&1], s.versions[&2]), (50, 50));
        assert_eq!((s.predictors, s.dropped), (1, 3));
        let text = s.to_text();
        assert!(text.contains("count=101"), "{text}");
        assert!(text.contains("errors=unknown_user:1"), "{text}");
        assert!(text.contains("versions=v1:50,v2:50"), "{text}");
    }

    #[test]
    fn an_empty_window_prints_dashes() {
        let s = Aggregate::default().snapshot(Duration::from_secs(10));
        assert_eq!(s.count, 0);
        assert!(s.to_text().contains("p99=-"), "{}", s.to_text());
    }
}
