//! Ground truth: the predictions awaiting their outcome, and the live
//! metrics computed when it arrives on `ml.feedback`.
//!
//! [`Awaiting`] holds what each version predicted (served and shadow) for
//! every single prediction the predictors reported, by `request_id`, in
//! bounded memory: at most `MONITOR_FEEDBACK_MAX` predictions, each for at
//! most `MONITOR_FEEDBACK_HORIZON`. Past the cap the oldest is evicted; past
//! the horizon it expires; both are counted. The ids of forgotten
//! predictions are remembered (as keyed 64-bit hashes, up to the same cap)
//! so that a late label is answered `expired`, not `unknown`. Keys are
//! hashed with a per-process random key (SipHash), so nobody can craft ids
//! that collide.
//!
//! [`Live`] accumulates, per version, the live accuracy and log-loss of a
//! classifier (its served label and probability against the outcome, zero
//! or one) or the RMSE and MAE of a regressor; [`Agreement`] the shadow's
//! latency and its agreement with what was served.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use ml_shared::feedback::FeedbackReply;
use ml_shared::messages::AnswerRecord;
use serde::{Deserialize, Serialize};

use crate::stats::LatencyMs;

/// Probabilities are clamped to `[EPS, 1 − EPS]` for the log-loss.
pub const LOG_LOSS_EPS: f64 = 1e-15;

/// What one version predicted for a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guess {
    /// The version.
    pub version: u64,
    /// Its prediction (a classifier's: the probability of class 1).
    pub prediction: f64,
    /// A classifier's label.
    pub label: Option<u8>,
}

/// A prediction awaiting its outcome.
#[derive(Debug, Clone, Copy)]
struct Slot {
    key: u64,
    /// Its number among all inserted (the map's value while it waits).
    seq: u64,
    at: Instant,
    served: Guess,
    shadow: Option<Guess>,
}

/// What became of one label.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Joined {
    /// The served prediction and the shadow's, if any.
    Matched(Guess, Option<Guess>),
    /// No such prediction held, ever or any more (already labelled).
    Unknown,
    /// The prediction was forgotten: past the horizon or the cap.
    Expired,
    /// A classifier's prediction and an outcome other than 0 or 1.
    Invalid,
}

/// The predictions awaiting their outcome, bounded by a cap and a horizon.
pub struct Awaiting {
    slots: VecDeque<Slot>,
    index: HashMap<u64, u64>,
    forgotten: HashSet<u64>,
    forgotten_order: VecDeque<u64>,
    hasher: std::collections::hash_map::RandomState,
    max: usize,
    horizon: Duration,
    next_seq: u64,
    /// Predictions forgotten unlabelled at the cap.
    pub evicted: u64,
    /// Predictions forgotten unlabelled past the horizon.
    pub expired: u64,
}

impl Awaiting {
    /// Holds at most `max` predictions, each for at most `horizon`.
    pub fn new(max: usize, horizon: Duration) -> Self {
        Self {
            slots: VecDeque::new(),
            index: HashMap::new(),
            forgotten: HashSet::new(),
            forgotten_order: VecDeque::new(),
            hasher: std::collections::hash_map::RandomState::new(),
            max: max.max(1),
            horizon,
            next_seq: 0,
            evicted: 0,
            expired: 0,
        }
    }

    /// Predictions held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The horizon.
    pub fn horizon(&self) -> Duration {
        self.horizon
    }

    fn key(&self, request_id: &str) -> u64 {
        self.hasher.hash_one(request_id)
    }

    /// Holds `answer`, served by `version`, from `now`; the oldest is
    /// evicted at the cap.
    pub fn insert(&mut self, version: u64, answer: &AnswerRecord, now: Instant) {
        self.expire(now);
        if self.slots.len() >= self.max {
            self.pop(false);
        }
        let key = self.key(&answer.request_id);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.index.insert(key, seq);
        self.slots.push_back(Slot {
            key,
            seq,
            at: now,
            served: Guess {
                version,
                prediction: answer.prediction,
                label: answer.label,
            },
            shadow: answer.shadow.map(|s| Guess {
                version: s.version,
                prediction: s.prediction,
                label: s.label,
            }),
        });
    }

    /// Forgets the predictions older than the horizon at `now`.
    pub fn expire(&mut self, now: Instant) {
        while let Some(front) = self.slots.front() {
            if now.saturating_duration_since(front.at) <= self.horizon {
                break;
            }
            self.pop(true);
        }
    }

    /// Forgets the oldest slot, counting it when it still waited.
    fn pop(&mut self, expired: bool) {
        let Some(slot) = self.slots.pop_front() else {
            return;
        };
        if self.index.get(&slot.key) != Some(&slot.seq) {
            return; // labelled already, or its id reused by a newer one
        }
        self.index.remove(&slot.key);
        if expired {
            self.expired += 1;
        } else {
            self.evicted += 1;
        }
        if self.forgotten_order.len() >= self.max {
            if let Some(old) = self.forgotten_order.pop_front() {
                self.forgotten.remove(&old);
            }
        }
        if self.forgotten.insert(slot.key) {
            self.forgotten_order.push_back(slot.key);
        }
    }

    /// Joins the outcome of `request_id`: a match is no longer held.
    pub fn join(&mut self, request_id: &str, outcome: f64, now: Instant) -> Joined {
        self.expire(now);
        let key = self.key(request_id);
        let Some(&seq) = self.index.get(&key) else {
            return if self.forgotten.contains(&key) {
                Joined::Expired
            } else {
                Joined::Unknown
            };
        };
        let first = self.slots.front().map_or(seq, |s| s.seq);
        let Some(slot) = self.slots.get((seq - first) as usize).copied() else {
            return Joined::Unknown;
        };
        if slot.served.label.is_some() && outcome != 0.0 && outcome != 1.0 {
            return Joined::Invalid;
        }
        self.index.remove(&key);
        Joined::Matched(slot.served, slot.shadow)
    }
}

/// The live metrics of one version, from its predictions' outcomes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    n: u64,
    classifier: bool,
    correct: u64,
    log_loss: f64,
    squared: f64,
    absolute: f64,
}

/// [`Live`] as reported: a classifier's accuracy and log-loss, or a
/// regressor's RMSE and MAE.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LiveReport {
    /// Predictions labelled.
    pub labelled: u64,
    /// Share of served labels equal to the outcome (classifier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Mean log-loss of the probabilities (classifier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_loss: Option<f64>,
    /// Root mean squared error (regressor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rmse: Option<f64>,
    /// Mean absolute error (regressor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mae: Option<f64>,
}

impl Live {
    /// Adds one prediction and its outcome.
    pub fn add(&mut self, guess: &Guess, outcome: f64) {
        self.n += 1;
        match guess.label {
            Some(label) => {
                self.classifier = true;
                self.correct += u64::from(f64::from(label) == outcome);
                let p = guess.prediction.clamp(LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS);
                self.log_loss -= if outcome == 1.0 {
                    p.ln()
                } else {
                    (1.0 - p).ln()
                };
            }
            None => {
                let e = guess.prediction - outcome;
                self.squared += e * e;
                self.absolute += e.abs();
            }
        }
    }

    /// The report.
    pub fn report(&self) -> LiveReport {
        let n = self.n.max(1) as f64;
        let c = self.classifier;
        LiveReport {
            labelled: self.n,
            accuracy: c.then(|| self.correct as f64 / n),
            log_loss: c.then(|| self.log_loss / n),
            rmse: (!c).then(|| (self.squared / n).sqrt()),
            mae: (!c).then(|| self.absolute / n),
        }
    }
}

/// The shadow's latency and agreement with what was served.
#[derive(Debug, Clone)]
pub struct Agreement {
    latency: Histogram<u64>,
    n: u64,
    labelled: u64,
    agreed: u64,
    absolute: f64,
    mean_x: f64,
    mean_y: f64,
    m2_x: f64,
    m2_y: f64,
    co: f64,
}

/// [`Agreement`] as reported.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ShadowReport {
    /// Requests the shadow computed.
    pub count: u64,
    /// Time the shadow took per request.
    pub latency_ms: Option<LatencyMs>,
    /// Share of requests where the shadow's label equals the served one
    /// (classifiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_agreement: Option<f64>,
    /// Mean |shadow − served| of the predictions.
    pub mean_abs_diff: f64,
    /// Pearson correlation of the shadow's and the served predictions;
    /// absent with fewer than two requests or a constant side.
    pub correlation: Option<f64>,
}

impl Default for Agreement {
    fn default() -> Self {
        Self {
            latency: crate::stats::histogram(),
            n: 0,
            labelled: 0,
            agreed: 0,
            absolute: 0.0,
            mean_x: 0.0,
            mean_y: 0.0,
            m2_x: 0.0,
            m2_y: 0.0,
            co: 0.0,
        }
    }
}

impl Agreement {
    /// Adds one shadowed request: served `x` and shadow `y` predictions,
    /// their labels, and the shadow's time.
    pub fn add(&mut self, served: &Guess, shadow: &Guess, duration_ns: u64) {
        self.latency
            .saturating_record(duration_ns.clamp(1, crate::stats::MAX_NS));
        let (x, y) = (served.prediction, shadow.prediction);
        self.n += 1;
        if let (Some(a), Some(b)) = (served.label, shadow.label) {
            self.labelled += 1;
            self.agreed += u64::from(a == b);
        }
        self.absolute += (x - y).abs();
        // Welford's co-moment update: stable for any scale of values.
        let n = self.n as f64;
        let dx = x - self.mean_x;
        self.mean_x += dx / n;
        let dy = y - self.mean_y;
        self.mean_y += dy / n;
        self.m2_x += dx * (x - self.mean_x);
        self.m2_y += dy * (y - self.mean_y);
        self.co += dx * (y - self.mean_y);
    }

    /// The report.
    pub fn report(&self) -> ShadowReport {
        let n = self.n.max(1) as f64;
        let spread = self.m2_x * self.m2_y;
        ShadowReport {
            count: self.n,
            latency_ms: LatencyMs::of(&self.latency),
            label_agreement: (self.labelled > 0).then(|| self.agreed as f64 / self.labelled as f64),
            mean_abs_diff: self.absolute / n,
            correlation: (self.n >= 2 && spread > 0.0).then(|| self.co / spread.sqrt()),
        }
    }
}

/// Adds one join's outcome to `reply`.
pub fn count(reply: &mut FeedbackReply, joined: &Joined) {
    let n = match joined {
        Joined::Matched(..) => &mut reply.matched,
        Joined::Unknown => &mut reply.unknown,
        Joined::Expired => &mut reply.expired,
        Joined::Invalid => &mut reply.invalid,
    };
    *n = n.saturating_add(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ml_shared::messages::ShadowRun;

    fn answer(id: &str, prediction: f64, label: Option<u8>) -> AnswerRecord {
        AnswerRecord {
            request_id: id.into(),
            prediction,
            label,
            shadow: None,
        }
    }

    #[test]
    fn labels_match_once_and_forgotten_ids_are_expired_not_unknown() {
        let t0 = Instant::now();
        let mut a = Awaiting::new(3, Duration::from_secs(10));
        for i in 0..5 {
            a.insert(1, &answer(&format!("r{i}"), i as f64, None), t0);
        }
        assert_eq!((a.len(), a.evicted, a.expired), (3, 2, 0));
        assert_eq!(a.join("r0", 0.0, t0), Joined::Expired);
        let served = Guess {
            version: 1,
            prediction: 4.0,
            label: None,
        };
        assert_eq!(a.join("r4", 3.5, t0), Joined::Matched(served, None));
        assert_eq!(a.join("r4", 3.5, t0), Joined::Unknown, "labelled twice");
        assert_eq!(a.join("nobody", 1.0, t0), Joined::Unknown);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(a.join("r3", 1.0, later), Joined::Expired);
        assert_eq!((a.len(), a.expired), (0, 2));
    }

    #[test]
    fn a_classifier_takes_only_zero_or_one_and_gets_accuracy_and_log_loss() {
        let t0 = Instant::now();
        let mut a = Awaiting::new(10, Duration::from_secs(10));
        let mut record = answer("c1", 0.8, Some(1));
        record.shadow = Some(ShadowRun {
            version: 2,
            duration_ns: 10,
            prediction: 0.3,
            label: Some(0),
        });
        a.insert(1, &record, t0);
        assert_eq!(a.join("c1", 0.5, t0), Joined::Invalid);
        let Joined::Matched(served, Some(shadow)) = a.join("c1", 1.0, t0) else {
            panic!("matched with the shadow")
        };
        let (mut live, mut agreement) = (Live::default(), Agreement::default());
        live.add(&served, 1.0);
        live.add(
            &Guess {
                version: 1,
                prediction: 0.6,
                label: Some(1),
            },
            0.0,
        );
        let r = live.report();
        assert_eq!((r.labelled, r.accuracy, r.rmse), (2, Some(0.5), None));
        let want = -(0.8f64.ln() + 0.4f64.ln()) / 2.0;
        assert!((r.log_loss.unwrap() - want).abs() < 1e-12);
        agreement.add(&served, &shadow, 10);
        let s = agreement.report();
        assert_eq!(
            (s.count, s.label_agreement, s.correlation),
            (1, Some(0.0), None)
        );
        assert!((s.mean_abs_diff - 0.5).abs() < 1e-12);
    }

    /// Resident memory of a million awaiting predictions (each with a
    /// shadow answer): run with
    /// `cargo test -p monitor --release -- --ignored --nocapture rss`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn rss_of_a_million_awaiting_predictions() {
        fn rss_kib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        }
        let before = rss_kib();
        let n = 1_000_000;
        let mut a = Awaiting::new(n, Duration::from_secs(3600));
        let now = Instant::now();
        let mut record = answer("", 0.5, Some(1));
        record.shadow = Some(ShadowRun {
            version: 2,
            duration_ns: 10,
            prediction: 0.4,
            label: Some(0),
        });
        for i in 0..n {
            record.request_id = format!("predictor-1-3f2a9c01-{i}");
            a.insert(1, &record, now);
        }
        let held = rss_kib();
        // As many again: the oldest are evicted, and their ids remembered.
        for i in n..2 * n {
            record.request_id = format!("predictor-1-3f2a9c01-{i}");
            a.insert(1, &record, now);
        }
        let full = rss_kib();
        println!(
            "awaiting {}: RSS +{} MiB ({} bytes each); with {} forgotten ids remembered: +{} MiB",
            a.len(),
            (held - before) / 1024,
            (held - before) * 1024 / n as u64,
            a.evicted,
            (full - before) / 1024
        );
    }
}
