//! The monitor's per-predictor and per-model-version state, each capped.
//!
//! * [`Predictors`]: where each predictor's numbering of its events is
//!   expected to resume (the gaps are lost events), when it was last heard
//!   from, and the plausibility of what it reports against the time
//!   elapsed. At most `MONITOR_MAX_PREDICTORS`; past it the least recently
//!   heard is forgotten (and counted).
//! * [`Versions`]: the model versions whose latency and counts are kept
//!   apart (histograms, Prometheus series). At most `MONITOR_MAX_VERSIONS`;
//!   past it the least recently seen version is forgotten (and counted), and
//!   the events of versions not kept count in the totals only (`other` in
//!   Prometheus).

use std::collections::HashMap;
use std::time::Instant;

use ml_shared::messages::EventBatch;

use crate::validate::{RejectReason, MAX_EVENT_RATE};

#[derive(Debug, Clone, Copy)]
struct PredictorState {
    /// Number of the next event expected.
    next: u64,
    /// When its last batch was accepted.
    last: Instant,
    /// The reporting window its last batch was counted in.
    window: u64,
}

/// Per-predictor state, capped.
#[derive(Debug)]
pub struct Predictors {
    max: usize,
    states: HashMap<String, PredictorState>,
    started: Instant,
    /// Predictors forgotten to make room.
    pub evicted: u64,
    /// Batches whose numbering went backwards: the predictor restarted under
    /// the same id (or someone with its credentials sent them).
    pub restarts: u64,
}

/// Events one predictor can have produced in `secs` seconds (at least one
/// second's worth).
fn allowance(secs: f64) -> u64 {
    (MAX_EVENT_RATE as f64 * secs.max(1.0)).min(u64::MAX as f64) as u64
}

impl Predictors {
    /// No predictor yet; at most `max` (at least 1) kept.
    pub fn new(max: usize, now: Instant) -> Self {
        Self {
            max: max.max(1),
            states: HashMap::new(),
            started: now,
            evicted: 0,
            restarts: 0,
        }
    }

    /// Checks `batch` against its predictor's history and records it;
    /// returns how many events are missing before it.
    ///
    /// The first batch heard from a predictor counts nothing as lost (the
    /// monitor may have started after it). A batch numbered below the
    /// expected one means the predictor restarted under the same id: the
    /// numbering starts over, and the restart is counted. A gap, or a
    /// `dropped` count, larger than [`MAX_EVENT_RATE`] events a second since
    /// the predictor's previous batch (or, for its first, since the monitor
    /// started) is rejected, and the state is left as it was.
    pub fn observe(
        &mut self,
        batch: &EventBatch,
        now: Instant,
        window: u64,
    ) -> Result<u64, RejectReason> {
        let end = batch
            .seq
            .checked_add(batch.events.len() as u64)
            .ok_or(RejectReason::BadSeq)?;
        let previous = self.states.get(&batch.predictor).copied();
        let since = previous.map_or(self.started, |p| p.last);
        let allowed = allowance(now.saturating_duration_since(since).as_secs_f64());
        if batch.dropped > allowed || batch.shadow_dropped > allowed {
            return Err(RejectReason::BadDropped);
        }
        let lost = match previous {
            None => 0,
            Some(p) if batch.seq >= p.next => {
                let gap = batch.seq - p.next;
                if gap > allowed {
                    return Err(RejectReason::BadSeq);
                }
                gap
            }
            Some(p) => {
                tracing::info!(predictor = %batch.predictor, seq = batch.seq, expected = p.next, "event numbering restarted");
                self.restarts = self.restarts.saturating_add(1);
                0
            }
        };
        if previous.is_none() && self.states.len() >= self.max {
            self.evict_least_recent();
        }
        let state = PredictorState {
            next: end,
            last: now,
            window,
        };
        match self.states.get_mut(&batch.predictor) {
            Some(s) => *s = state,
            None => {
                self.states.insert(batch.predictor.clone(), state);
            }
        }
        Ok(lost)
    }

    fn evict_least_recent(&mut self) {
        let oldest = self
            .states
            .iter()
            .min_by_key(|(_, s)| s.last)
            .map(|(id, _)| id.clone());
        if let Some(id) = oldest {
            self.states.remove(&id);
            self.evicted = self.evicted.saturating_add(1);
            tracing::debug!(predictor = %id, "predictor state evicted (MONITOR_MAX_PREDICTORS)");
        }
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Predictors whose last batch was counted in reporting window `window`.
    pub fn heard_in(&self, window: u64) -> usize {
        self.states.values().filter(|s| s.window == window).count()
    }

    /// Predictors tracked.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Whether none is tracked.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }
}

/// The model versions kept apart, capped, least recently seen evicted.
#[derive(Debug)]
pub struct Versions {
    max: usize,
    last_seen: HashMap<u64, u64>,
    tick: u64,
    /// Versions forgotten to make room.
    pub evicted: u64,
}

impl Versions {
    /// No version yet; at most `max` (at least 1) kept.
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            last_seen: HashMap::new(),
            tick: 0,
            evicted: 0,
        }
    }

    /// Marks `version` as just seen, keeping it; returns the version
    /// forgotten to make room for it, if any.
    pub fn touch(&mut self, version: u64) -> Option<u64> {
        self.tick += 1;
        if let Some(t) = self.last_seen.get_mut(&version) {
            *t = self.tick;
            return None;
        }
        let evicted = if self.last_seen.len() >= self.max {
            let oldest = self
                .last_seen
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(v, _)| *v)
                .expect("a full set is not empty");
            self.last_seen.remove(&oldest);
            self.evicted = self.evicted.saturating_add(1);
            Some(oldest)
        } else {
            None
        };
        self.last_seen.insert(version, self.tick);
        evicted
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Whether `version` is kept apart.
    pub fn contains(&self, version: u64) -> bool {
        self.last_seen.contains_key(&version)
    }

    /// Versions kept.
    pub fn len(&self) -> usize {
        self.last_seen.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.last_seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ml_shared::messages::{LatencyEvent, Outcome};
    use std::time::Duration;

    fn batch(predictor: &str, seq: u64, n: usize) -> EventBatch {
        EventBatch {
            predictor: predictor.into(),
            seq,
            dropped: 0,
            shadow_dropped: 0,
            raw_features: Vec::new(),
            events: vec![
                LatencyEvent {
                    ts_ms: 0,
                    duration_ns: 1,
                    model_version: None,
                    outcome: Outcome::Ok,
                    sample: None,
                    variant: None,
                    answer: None,
                };
                n
            ],
        }
    }

    #[test]
    fn gaps_in_a_predictors_numbering_are_lost_events() {
        let t = Instant::now();
        let mut p = Predictors::new(10, t);
        let mut obs = |b: EventBatch| p.observe(&b, t, 0).unwrap();
        assert_eq!(obs(batch("a", 10, 3)), 0, "first heard");
        assert_eq!(obs(batch("a", 13, 3)), 0);
        assert_eq!(obs(batch("b", 0, 3)), 0);
        assert_eq!(obs(batch("a", 20, 3)), 4, "16..20 lost");
        assert_eq!(obs(batch("b", 3, 3)), 0);
        assert_eq!(obs(batch("a", 0, 3)), 0, "restart");
        assert_eq!(obs(batch("a", 5, 3)), 2);
        assert_eq!(p.restarts, 1);
    }

    #[test]
    fn implausible_gaps_and_drops_are_rejected_and_change_nothing() {
        let t = Instant::now();
        let mut p = Predictors::new(10, t);
        p.observe(&batch("a", 0, 3), t, 0).unwrap();
        let later = t + Duration::from_secs(2);
        let far = batch("a", 3 + 2 * MAX_EVENT_RATE + 1, 1);
        assert_eq!(p.observe(&far, later, 0), Err(RejectReason::BadSeq));
        let mut wrapping = batch("a", 3, 1);
        wrapping.dropped = u64::MAX - 1;
        assert_eq!(
            p.observe(&wrapping, later, 0),
            Err(RejectReason::BadDropped)
        );
        let mut first = batch("new", 0, 1);
        first.dropped = 2 * MAX_EVENT_RATE;
        assert_eq!(p.observe(&first, t, 0), Err(RejectReason::BadDropped));
        assert_eq!(p.len(), 1);
        // The honest continuation still lines up.
        let mut next = batch("a", 3 + 2 * MAX_EVENT_RATE, 1);
        next.dropped = 5;
        assert_eq!(p.observe(&next, later, 0), Ok(2 * MAX_EVENT_RATE));
    }

    #[test]
    fn predictors_past_the_cap_evict_the_least_recently_heard() {
        let t = Instant::now();
        let mut p = Predictors::new(3, t);
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            p.observe(&batch(id, 0, 1), t + Duration::from_millis(i as u64), 1)
                .unwrap();
        }
        p.observe(&batch("a", 1, 1), t + Duration::from_millis(10), 2)
            .unwrap();
        p.observe(&batch("d", 0, 1), t + Duration::from_millis(11), 2)
            .unwrap();
        assert_eq!(
            (p.len(), p.evicted, p.heard_in(2), p.heard_in(1)),
            (3, 1, 2, 1)
        );
        // "b" was the least recently heard: it is new again.
        assert_eq!(
            p.observe(&batch("b", 50, 1), t + Duration::from_millis(12), 2),
            Ok(0)
        );
        assert_eq!(p.evicted, 2);
    }

    #[test]
    fn versions_past_the_cap_evict_the_least_recently_seen() {
        let mut v = Versions::new(2);
        assert_eq!(v.touch(1), None);
        assert_eq!(v.touch(2), None);
        assert_eq!(v.touch(1), None);
        assert_eq!(v.touch(3), Some(2));
        assert!(v.contains(1) && v.contains(3) && !v.contains(2));
        for n in 4..10_004 {
            v.touch(n);
        }
        assert_eq!((v.len(), v.evicted), (2, 10_001));
    }
}
