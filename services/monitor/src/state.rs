//! What the monitor keeps between windows: the counts of the window in
//! progress and since start, the predictors and versions it tracks, who may
//! send, what it rejected, and the drift of the production model's inputs.
//! Everything here is bounded by the caps of [`crate::Config`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use ml_shared::features::FeatureRegistry;
use ml_shared::messages::{EventBatch, ModelRelease};

use crate::drift::{DriftReference, DriftWindow};
use crate::feedback::Awaiting;
use crate::identity::Identities;
use crate::metrics::Metrics;
use crate::stats::{Aggregate, Snapshot};
use crate::tracked::{Predictors, Versions};
use crate::validate::{self, RejectReason};
use crate::{Config, Health};
use ml_shared::feedback::FeedbackReply;

/// What the monitor keeps between windows.
pub struct State {
    started: Instant,
    window_start: Instant,
    /// Number of the window in progress.
    generation: u64,
    window: Aggregate,
    total: Aggregate,
    predictors: Predictors,
    versions: Versions,
    identities: Identities,
    rejected: BTreeMap<RejectReason, u64>,
    /// Rejections in the window in progress, logged at its end.
    window_rejected: BTreeMap<RejectReason, u64>,
    drift: Option<DriftWindow>,
    drift_min_samples: u64,
    registry: FeatureRegistry,
    awaiting: Awaiting,
    feedback_rejected: u64,
}

/// What became of a message on `ml.monitor.events`.
#[derive(Debug, PartialEq, Eq)]
pub enum Intake {
    /// Counted, or rejected.
    Done,
    /// From an id not known as a running predictor: a discovery is due.
    Unknown,
}

impl State {
    /// Nothing counted yet; caps and windows from `config`.
    pub fn new(config: &Config) -> Self {
        let now = Instant::now();
        Self {
            started: now,
            window_start: now,
            generation: 0,
            window: Aggregate::default(),
            total: Aggregate::default(),
            predictors: Predictors::new(config.max_predictors as usize, now),
            versions: Versions::new(config.max_versions as usize),
            identities: Identities::new(
                2 * config.discovery_interval + config.discovery_wait,
                config.quarantine,
            ),
            rejected: BTreeMap::new(),
            window_rejected: BTreeMap::new(),
            drift: None,
            drift_min_samples: config.drift_min_samples,
            registry: FeatureRegistry::default(),
            awaiting: Awaiting::new(config.feedback_max as usize, config.feedback_horizon),
            feedback_rejected: 0,
        }
    }

    /// Sets the identity gauges (quarantined events, known predictors).
    pub fn report_identity(&self, metrics: &Metrics) {
        metrics.set_identity(self.identities.quarantined().1, self.identities.known());
    }

    /// Reads, checks and counts (or quarantines, or rejects) one message.
    pub fn receive(&mut self, payload: &[u8], metrics: &Metrics) -> Intake {
        let batch = match serde_json::from_slice::<EventBatch>(payload) {
            Ok(batch) => batch,
            Err(error) => {
                tracing::debug!(%error, bytes = payload.len(), "unreadable event batch rejected");
                self.reject(RejectReason::Unreadable, metrics);
                return Intake::Done;
            }
        };
        if let Err(reason) = validate::check(&batch, ml_shared::time::now_ms()) {
            tracing::debug!(predictor = %batch.predictor.escape_debug(), %reason, "event batch rejected");
            self.reject(reason, metrics);
            return Intake::Done;
        }
        if self.identities.is_known(&batch.predictor, Instant::now()) {
            self.add(batch, metrics);
            return Intake::Done;
        }
        if self.identities.hold(batch, Instant::now()).is_err() {
            self.reject(RejectReason::QuarantineFull, metrics);
        }
        metrics.set_identity(self.identities.quarantined().1, self.identities.known());
        Intake::Unknown
    }

    /// Takes the ids a discovery started at `started` found and judges the
    /// quarantined batches that arrived before it started; returns whether
    /// batches still wait (for another discovery).
    pub fn discovered(&mut self, ids: Vec<String>, started: Instant, metrics: &Metrics) -> bool {
        let now = Instant::now();
        let found = ids.len();
        let released = self.identities.learn(ids, started, now);
        let (mut accepted, mut refused) = (0u64, 0u64);
        for batch in released {
            if self.identities.is_known(&batch.predictor, now) {
                accepted += 1;
                self.add(batch, metrics);
            } else {
                refused += 1;
                self.reject(RejectReason::UnknownPredictor, metrics);
            }
        }
        let (waiting, events) = self.identities.quarantined();
        metrics.set_identity(events, self.identities.known());
        tracing::debug!(
            found,
            known = self.identities.known(),
            accepted,
            refused,
            waiting,
            "predictors discovered"
        );
        waiting > 0
    }

    fn reject(&mut self, reason: RejectReason, metrics: &Metrics) {
        for counts in [&mut self.rejected, &mut self.window_rejected] {
            let n = counts.entry(reason).or_default();
            *n = n.saturating_add(1);
        }
        metrics.rejected(reason);
    }

    /// Counts a batch from a known predictor, after the checks against its
    /// history.
    fn add(&mut self, batch: EventBatch, metrics: &Metrics) {
        let evicted_before = self.predictors.evicted;
        let lost = match self
            .predictors
            .observe(&batch, Instant::now(), self.generation)
        {
            Ok(lost) => lost,
            Err(reason) => {
                tracing::debug!(predictor = %batch.predictor, %reason, "event batch rejected");
                self.reject(reason, metrics);
                return;
            }
        };
        metrics.evicted("predictor", self.predictors.evicted - evicted_before);
        if lost > 0 {
            tracing::warn!(predictor = %batch.predictor, lost, "latency events lost in transit");
        }
        let mut last = None;
        let shadows = batch
            .events
            .iter()
            .filter_map(|e| Some(e.answer.as_ref()?.shadow?.version));
        for version in batch
            .events
            .iter()
            .filter_map(|e| e.model_version)
            .chain(shadows)
        {
            if last == Some(version) {
                continue;
            }
            last = Some(version);
            if let Some(old) = self.versions.touch(version) {
                tracing::debug!(
                    version = old,
                    "model version evicted (MONITOR_MAX_VERSIONS)"
                );
                self.window.forget_version(old);
                self.total.forget_version(old);
                metrics.forget_version(old);
            }
        }
        let versions = &self.versions;
        self.window.add(&batch, lost, |v| versions.contains(v));
        self.total.add(&batch, lost, |v| versions.contains(v));
        metrics.record(&batch, lost, |v| versions.contains(v));
        if let Some(drift) = &mut self.drift {
            drift.add(&batch);
        }
        let now = Instant::now();
        let (evicted, expired) = (self.awaiting.evicted, self.awaiting.expired);
        for event in &batch.events {
            if let (Some(answer), Some(version)) = (&event.answer, event.model_version) {
                self.awaiting.insert(version, answer, now);
            }
        }
        self.report_awaiting(metrics, evicted, expired);
    }

    /// Sets the awaiting gauge and counts what was forgotten since the
    /// counts were `evicted` and `expired`.
    fn report_awaiting(&self, metrics: &Metrics, evicted: u64, expired: u64) {
        metrics.awaiting(
            self.awaiting.len(),
            self.awaiting.evicted - evicted,
            self.awaiting.expired - expired,
        );
    }

    /// Joins a message of `ml.feedback` to the predictions held; the
    /// error says why the message is refused (nothing in it is counted).
    pub fn feedback(&mut self, payload: &[u8], metrics: &Metrics) -> Result<FeedbackReply, String> {
        let request = ml_shared::feedback::parse(payload).inspect_err(|_| {
            self.feedback_rejected += 1;
            metrics.feedback_rejected();
        })?;
        let now = Instant::now();
        let (evicted, expired) = (self.awaiting.evicted, self.awaiting.expired);
        let mut reply = FeedbackReply::default();
        let versions = &self.versions;
        for label in &request.feedback {
            let joined = self.awaiting.join(&label.request_id, label.outcome, now);
            crate::feedback::count(&mut reply, &joined);
            self.window
                .join(&joined, label.outcome, |v| versions.contains(v));
            self.total
                .join(&joined, label.outcome, |v| versions.contains(v));
        }
        metrics.feedback(&reply);
        self.report_awaiting(metrics, evicted, expired);
        Ok(reply)
    }

    pub fn health(&self) -> Health {
        let (quarantined_batches, quarantined_events) = self.identities.quarantined();
        Health {
            rejected: self.rejected.clone(),
            rejected_total: self
                .rejected
                .values()
                .fold(0u64, |a, b| a.saturating_add(*b)),
            evicted_predictors: self.predictors.evicted,
            evicted_versions: self.versions.evicted,
            predictor_restarts: self.predictors.restarts,
            tracked_predictors: self.predictors.len(),
            max_predictors: self.predictors.max(),
            tracked_versions: self.versions.len(),
            max_versions: self.versions.max(),
            known_predictors: self.identities.known(),
            discoveries: self.identities.discoveries,
            quarantined_batches,
            quarantined_events,
            awaiting: self.awaiting.len(),
            feedback_max: self.awaiting.max(),
            feedback_horizon_s: self.awaiting.horizon().as_secs_f64(),
            evicted_awaiting: self.awaiting.evicted,
            expired_awaiting: self.awaiting.expired,
            feedback_rejected: self.feedback_rejected,
        }
    }

    pub fn total_snapshot(&self) -> Snapshot {
        self.total
            .snapshot(self.started.elapsed(), self.predictors.len())
    }

    pub fn window_snapshot(&self) -> Snapshot {
        let mut s = self.window.snapshot(
            self.window_start.elapsed(),
            self.predictors.heard_in(self.generation),
        );
        s.drift = self
            .drift
            .as_ref()
            .and_then(|d| d.report(self.drift_min_samples));
        s
    }

    pub fn new_release(&mut self, release: &ModelRelease) {
        if self
            .drift
            .as_ref()
            .is_some_and(|d| d.reference().is_for(release))
        {
            tracing::debug!(
                version = release.version,
                epoch = release.epoch,
                "same production model republished (routing table changed); drift window kept"
            );
            return;
        }
        match DriftReference::new(release, &self.registry) {
            Ok(reference) => {
                tracing::info!(
                    version = release.version,
                    "drift measured against this production model's training data"
                );
                self.drift = Some(DriftWindow::new(Arc::new(reference)));
            }
            Err(why) => {
                tracing::warn!(version = release.version, %why, "no drift check for this production model");
                self.drift = None;
            }
        }
    }

    /// Forgets the predictions past the horizon (at each window's end,
    /// so that they go even when nothing arrives).
    pub fn expire_awaiting(&mut self, metrics: &Metrics) {
        let (evicted, expired) = (self.awaiting.evicted, self.awaiting.expired);
        self.awaiting.expire(Instant::now());
        self.report_awaiting(metrics, evicted, expired);
    }

    pub fn next_window(&mut self) {
        if let Some(d) = &self.drift {
            if d.unmatched > 0 {
                tracing::warn!(
                    samples = d.unmatched,
                    "samples with raw features the monitor does not know were ignored"
                );
            }
        }
        if !self.window_rejected.is_empty() {
            let rejected: Vec<String> = self
                .window_rejected
                .iter()
                .map(|(reason, n)| format!("{reason}:{n}"))
                .collect();
            tracing::warn!(rejected = %rejected.join(","), "latency event batches rejected in this window");
            self.window_rejected.clear();
        }
        self.window = Aggregate::default();
        self.window_start = Instant::now();
        self.generation += 1;
        self.drift = self.drift.as_ref().map(DriftWindow::fresh);
    }
}
