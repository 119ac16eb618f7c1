//! Ground truth: `ml.feedback` takes the true outcome of earlier
//! predictions, by the `request_id` of their replies, one or many per
//! message, and answers how many were matched, unknown, expired or invalid.
//!
//! ```json
//! {"feedback":[{"request_id":"p1-3f2a9c01-17","outcome":1}]}
//! ```
//!
//! A message holds 1 to [`MAX_LABELS`] labels, each a `request_id` of at
//! most [`crate::messages::MAX_REQUEST_ID_BYTES`] bytes and a finite
//! `outcome` (a classifier's: 0 or 1); a message that breaks a rule is
//! refused whole with `bad_request` and nothing in it is counted.

use serde::{Deserialize, Serialize};

use crate::messages::MAX_REQUEST_ID_BYTES;

/// Most labels in one `ml.feedback` message.
pub const MAX_LABELS: usize = 1000;

/// A request on `ml.feedback`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    /// The labels.
    pub feedback: Vec<Label>,
}

/// The true outcome of one prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Label {
    /// The `request_id` of the prediction's reply.
    pub request_id: String,
    /// What really happened: a classifier's class (0 or 1), a regressor's value.
    pub outcome: f64,
}

/// The reply of `ml.feedback`: what became of each label.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedbackReply {
    /// Joined to a prediction the monitor held (counted in the live metrics).
    pub matched: u64,
    /// For an id the monitor never held, or already labelled.
    pub unknown: u64,
    /// For a prediction forgotten: older than the horizon, or evicted at the cap.
    pub expired: u64,
    /// A classifier's prediction with an outcome other than 0 or 1 (the
    /// prediction still waits for a valid label).
    pub invalid: u64,
}

impl FeedbackReply {
    /// Adds `other`'s counts to these (saturating).
    pub fn add(&mut self, other: &FeedbackReply) {
        self.matched = self.matched.saturating_add(other.matched);
        self.unknown = self.unknown.saturating_add(other.unknown);
        self.expired = self.expired.saturating_add(other.expired);
        self.invalid = self.invalid.saturating_add(other.invalid);
    }
}

/// Reads and checks an `ml.feedback` payload; the error says what is wrong.
pub fn parse(payload: &[u8]) -> Result<FeedbackRequest, String> {
    let request: FeedbackRequest = serde_json::from_slice(payload).map_err(|e| {
        format!(
            r#"invalid feedback: {e}; send {{"feedback":[{{"request_id":"…","outcome":1.0}}]}}"#
        )
    })?;
    let n = request.feedback.len();
    if n == 0 || n > MAX_LABELS {
        return Err(format!("a message holds 1 to {MAX_LABELS} labels, not {n}"));
    }
    for (i, label) in request.feedback.iter().enumerate() {
        if label.request_id.is_empty() || label.request_id.len() > MAX_REQUEST_ID_BYTES {
            return Err(format!(
                "label {i}: a request_id holds 1 to {MAX_REQUEST_ID_BYTES} bytes"
            ));
        }
        if !label.outcome.is_finite() {
            return Err(format!("label {i}: the outcome is not a finite number"));
        }
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_feedback_is_read_and_bad_feedback_is_refused_with_a_reason() {
        let ok = parse(br#"{"feedback":[{"request_id":"a-1","outcome":1},{"request_id":"a-2","outcome":0.5}]}"#)
            .unwrap();
        assert_eq!(ok.feedback.len(), 2);
        assert_eq!(ok.feedback[1].outcome, 0.5);
        let long = format!(
            r#"{{"feedback":[{{"request_id":"{}","outcome":1}}]}}"#,
            "x".repeat(MAX_REQUEST_ID_BYTES + 1)
        );
        let many = format!(
            r#"{{"feedback":[{}]}}"#,
            vec![r#"{"request_id":"a","outcome":1}"#; MAX_LABELS + 1].join(",")
        );
        for bad in [
            "",
            "{}",
            r#"{"feedback":[]}"#,
            r#"{"feedback":[{"request_id":"a"}]}"#,
            r#"{"feedback":[{"request_id":"","outcome":1}]}"#,
            r#"{"feedback":[{"request_id":"a","outcome":"NaN"}]}"#,
            r#"{"feedback":[{"request_id":"a","outcome":1e999}]}"#,
            r#"{"feedback":[{"request_id":"a","outcome":1,"x":2}]}"#,
            &long,
            &many,
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad:.80}");
        }
    }
}
