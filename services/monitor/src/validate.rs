//! What the monitor accepts from `ml.monitor.events`: every field of a
//! batch is checked before anything is counted, and a batch that fails a
//! check is rejected whole and counted under its reason (`rejected` in
//! `ml.monitor.stats`, `ml_monitor_batches_rejected_total{reason}` in
//! `/metrics`). Nothing a sender writes can wrap a counter, reach an alert
//! or grow the monitor's state beyond its caps.
//!
//! The checks that need no history are here ([`check`]); the ones that
//! compare a batch with the same predictor's earlier ones (numbering, the
//! `dropped` count against the time elapsed) are in [`crate::tracked`], and
//! the sender's identity (a running predictor) in [`crate::identity`].

use ml_shared::messages::{AnswerRecord, EventBatch, LatencyEvent, Outcome, MAX_REQUEST_ID_BYTES};
use ml_shared::profile::SAMPLE_WIDTH;
use serde::Serialize;

/// Longest predictor id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Most events in one batch (a predictor sends `EVENT_BATCH`, 512 by default).
pub const MAX_BATCH_EVENTS: usize = 65_536;
/// Longest request duration accepted: one hour. Durations above the
/// histograms' 60 s are counted as 60 s; beyond an hour they are nonsense.
pub const MAX_DURATION_NS: u64 = 3_600 * 1_000_000_000;
/// Largest distance between an event's timestamp and the monitor's clock:
/// one day (clock skew, events held through an outage).
pub const MAX_CLOCK_SKEW_MS: u64 = 24 * 3_600 * 1_000;
/// Largest model version accepted: 2⁵³, the largest integer every JSON
/// reader holds exactly.
pub const MAX_VERSION: u64 = 1 << 53;
/// Most events one predictor can produce per second, for the plausibility
/// of its numbering gaps and `dropped` counts: 10 million, a hundred times
/// what one predictor serves on a fast machine.
pub const MAX_EVENT_RATE: u64 = 10_000_000;
/// Longest raw feature name accepted in `raw_features`, in bytes.
pub const MAX_FEATURE_NAME_BYTES: usize = 64;

/// Why a batch was rejected. Its label in `/metrics` and its key in
/// `ml.monitor.stats` is the snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Not JSON, or not an event batch (unknown outcome, wrong types,
    /// a sample wider than 8 values…).
    Unreadable,
    /// An empty, over-long or control-character predictor id.
    BadPredictorId,
    /// More than [`MAX_BATCH_EVENTS`] events.
    TooManyEvents,
    /// A duration above [`MAX_DURATION_NS`].
    BadDuration,
    /// A timestamp more than [`MAX_CLOCK_SKEW_MS`] from the monitor's clock.
    BadTimestamp,
    /// Model version 0 or above [`MAX_VERSION`].
    BadVersion,
    /// A sample with a non-finite value or prediction.
    BadSample,
    /// An answer record (for feedback and the shadow) out of bounds: on an
    /// error, an empty or over-long `request_id`, a non-finite prediction,
    /// a label other than 0 or 1, a bad shadow version or duration.
    BadAnswer,
    /// More raw feature names than a sample holds, or an empty or over-long one.
    BadRawFeatures,
    /// A numbering that overflows, or a gap larger than the predictor could
    /// have produced since its last batch.
    BadSeq,
    /// A `dropped` count larger than the predictor could have produced since
    /// its last batch.
    BadDropped,
    /// The id is not a running predictor's (after a discovery).
    UnknownPredictor,
    /// The id was unknown and the quarantine was full.
    QuarantineFull,
}

impl RejectReason {
    /// Every reason, in label order.
    pub const ALL: [RejectReason; 13] = [
        RejectReason::Unreadable,
        RejectReason::BadPredictorId,
        RejectReason::TooManyEvents,
        RejectReason::BadDuration,
        RejectReason::BadTimestamp,
        RejectReason::BadVersion,
        RejectReason::BadSample,
        RejectReason::BadAnswer,
        RejectReason::BadRawFeatures,
        RejectReason::BadSeq,
        RejectReason::BadDropped,
        RejectReason::UnknownPredictor,
        RejectReason::QuarantineFull,
    ];

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Unreadable => "unreadable",
            RejectReason::BadPredictorId => "bad_predictor_id",
            RejectReason::TooManyEvents => "too_many_events",
            RejectReason::BadDuration => "bad_duration",
            RejectReason::BadTimestamp => "bad_timestamp",
            RejectReason::BadVersion => "bad_version",
            RejectReason::BadSample => "bad_sample",
            RejectReason::BadAnswer => "bad_answer",
            RejectReason::BadRawFeatures => "bad_raw_features",
            RejectReason::BadSeq => "bad_seq",
            RejectReason::BadDropped => "bad_dropped",
            RejectReason::UnknownPredictor => "unknown_predictor",
            RejectReason::QuarantineFull => "quarantine_full",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `id` is an acceptable predictor id: 1 to [`MAX_ID_BYTES`]
/// bytes, no control character.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES && !id.chars().any(char::is_control)
}

/// The checks of a batch that need no history, against the monitor's
/// clock `now_ms`.
pub fn check(batch: &EventBatch, now_ms: u64) -> Result<(), RejectReason> {
    if !valid_id(&batch.predictor) {
        return Err(RejectReason::BadPredictorId);
    }
    if batch.events.len() > MAX_BATCH_EVENTS {
        return Err(RejectReason::TooManyEvents);
    }
    if batch.seq.checked_add(batch.events.len() as u64).is_none() {
        return Err(RejectReason::BadSeq);
    }
    if batch.raw_features.len() > SAMPLE_WIDTH
        || batch
            .raw_features
            .iter()
            .any(|n| n.is_empty() || n.len() > MAX_FEATURE_NAME_BYTES)
    {
        return Err(RejectReason::BadRawFeatures);
    }
    for event in &batch.events {
        if event.duration_ns > MAX_DURATION_NS {
            return Err(RejectReason::BadDuration);
        }
        if event.ts_ms.abs_diff(now_ms) > MAX_CLOCK_SKEW_MS {
            return Err(RejectReason::BadTimestamp);
        }
        if let Some(v) = event.model_version {
            if v == 0 || v > MAX_VERSION {
                return Err(RejectReason::BadVersion);
            }
        }
        if let Some(sample) = &event.sample {
            if !sample.prediction.is_finite() || !sample.values().iter().all(|v| v.is_finite()) {
                return Err(RejectReason::BadSample);
            }
        }
        if let Some(answer) = &event.answer {
            if !valid_answer(answer, event) {
                return Err(RejectReason::BadAnswer);
            }
        }
    }
    Ok(())
}

/// An answer record: on a success with a version, an id of 1 to
/// [`MAX_REQUEST_ID_BYTES`] bytes, finite predictions, labels 0 or 1, a
/// valid shadow version and duration.
fn valid_answer(answer: &AnswerRecord, event: &LatencyEvent) -> bool {
    let label_ok = |l: Option<u8>| l.is_none_or(|l| l <= 1);
    let shadow_ok = answer.shadow.is_none_or(|s| {
        (1..=MAX_VERSION).contains(&s.version)
            && s.prediction.is_finite()
            && label_ok(s.label)
            && s.duration_ns <= MAX_DURATION_NS
    });
    event.outcome == Outcome::Ok
        && event.model_version.is_some()
        && !answer.request_id.is_empty()
        && answer.request_id.len() <= MAX_REQUEST_ID_BYTES
        && answer.prediction.is_finite()
        && label_ok(answer.label)
        && shadow_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use ml_shared::messages::{LatencyEvent, Outcome};
    use ml_shared::profile::FeatureSample;

    const NOW: u64 = 1_795_799_152_733;

    fn event() -> LatencyEvent {
        LatencyEvent {
            ts_ms: NOW,
            duration_ns: 6_783,
            model_version: Some(2),
            outcome: Outcome::Ok,
            sample: FeatureSample::new(&[0.3, 1.5], 1.94),
            variant: None,
            answer: None,
        }
    }

    fn batch() -> EventBatch {
        EventBatch {
            predictor: "host-42".into(),
            seq: 1024,
            dropped: 0,
            raw_features: vec!["feature_1".into(), "feature_2".into()],
            events: vec![event(); 3],
            shadow_dropped: 0,
        }
    }

    #[test]
    fn an_honest_batch_passes() {
        assert_eq!(check(&batch(), NOW), Ok(()));
        assert_eq!(check(&batch(), NOW + MAX_CLOCK_SKEW_MS), Ok(()));
    }

    #[test]
    fn every_field_is_checked() {
        type Change = Box<dyn Fn(&mut EventBatch)>;
        let cases: Vec<(RejectReason, Change)> = vec![
            (
                RejectReason::BadPredictorId,
                Box::new(|b| b.predictor.clear()),
            ),
            (
                RejectReason::BadPredictorId,
                Box::new(|b| b.predictor = "x".repeat(129)),
            ),
            (
                RejectReason::BadPredictorId,
                Box::new(|b| b.predictor = "a\nb".into()),
            ),
            (
                RejectReason::TooManyEvents,
                Box::new(|b| b.events = vec![event(); MAX_BATCH_EVENTS + 1]),
            ),
            (RejectReason::BadSeq, Box::new(|b| b.seq = u64::MAX - 1)),
            (
                RejectReason::BadRawFeatures,
                Box::new(|b| b.raw_features = vec!["f".into(); SAMPLE_WIDTH + 1]),
            ),
            (
                RejectReason::BadRawFeatures,
                Box::new(|b| b.raw_features[0].clear()),
            ),
            (
                RejectReason::BadDuration,
                Box::new(|b| b.events[1].duration_ns = u64::MAX),
            ),
            (
                RejectReason::BadTimestamp,
                Box::new(|b| b.events[2].ts_ms = 0),
            ),
            (
                RejectReason::BadTimestamp,
                Box::new(|b| b.events[2].ts_ms = u64::MAX),
            ),
            (
                RejectReason::BadVersion,
                Box::new(|b| b.events[0].model_version = Some(0)),
            ),
            (
                RejectReason::BadVersion,
                Box::new(|b| b.events[0].model_version = Some(u64::MAX)),
            ),
            (
                RejectReason::BadSample,
                Box::new(|b| b.events[0].sample = FeatureSample::new(&[f64::NAN], 1.0)),
            ),
            (
                RejectReason::BadSample,
                Box::new(|b| b.events[0].sample = FeatureSample::new(&[1.0], f64::INFINITY)),
            ),
        ];
        for (reason, change) in cases {
            let mut b = batch();
            change(&mut b);
            assert_eq!(check(&b, NOW), Err(reason));
        }
    }

    #[test]
    fn reasons_have_distinct_labels() {
        let labels: std::collections::BTreeSet<_> =
            RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), RejectReason::ALL.len());
        for r in RejectReason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
    }
}
