//! The shadow: the routing table's shadow version computes a share of the
//! requests after their reply has been sent, and only the monitor hears of
//! it.
//!
//! Which requests: those whose `request_id` falls in the shadow's percent
//! ([`ml_shared::routing::shadowed`]: deterministic, so anyone holding the
//! replies can tell). Only single predictions (`user_id` or `features`)
//! are shadowed. The request's task hands its raw features and its latency
//! event to a bounded queue (`SHADOW_QUEUE`) and is done; a background task
//! scores them with the shadow model, times that, and sends the event with
//! the shadow's answer to the monitor. When the queue is full, the event
//! goes without it and the skipped run is counted (`shadow_dropped` in the
//! next event batch). So the shadow never delays a reply, never answers one,
//! and holds at most `SHADOW_QUEUE` requests.

use std::sync::Arc;
use std::time::Instant;

use ml_shared::messages::{LatencyEvent, ShadowRun};
use ml_shared::profile::FeatureSample;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::events::EventSink;
use crate::serving::ServingState;

/// A request to shadow: its event (with its answer) and raw features.
#[derive(Debug)]
pub struct ShadowJob {
    /// The served request's event; `answer` is set.
    pub event: LatencyEvent,
    /// The shadow version chosen when the reply was sent.
    pub version: u64,
    /// The request's raw features.
    pub raw: FeatureSample,
}

/// The request tasks' handle on the shadow queue.
#[derive(Debug, Clone)]
pub struct ShadowSink {
    queue: mpsc::Sender<ShadowJob>,
    events: EventSink,
}

impl ShadowSink {
    /// Queues a job, or (queue full) sends its event without the shadow
    /// and counts the skipped run. Never waits.
    pub fn offer(&self, job: ShadowJob) {
        if let Err(error) = self.queue.try_send(job) {
            let job = match error {
                mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job) => {
                    job
                }
            };
            self.events.shadow_dropped();
            self.events.record(job.event);
        }
    }
}

/// Starts the shadow task with a queue of `capacity` jobs; it ends when
/// every [`ShadowSink`] is dropped, after the jobs it holds.
pub fn spawn(
    state: Arc<ServingState>,
    events: EventSink,
    capacity: usize,
) -> (ShadowSink, JoinHandle<()>) {
    let (queue, mut jobs) = mpsc::channel::<ShadowJob>(capacity.max(1));
    let sink = ShadowSink {
        queue,
        events: events.clone(),
    };
    let task = tokio::spawn(async move {
        while let Some(job) = jobs.recv().await {
            events.record(run(&state, job));
            // On the single-threaded runtime: requests go first.
            tokio::task::yield_now().await;
        }
    });
    (sink, task)
}

/// Scores one job with the shadow model; the event carries the result
/// (or, when the shadow changed or failed, goes without one).
pub fn run(state: &ServingState, mut job: ShadowJob) -> LatencyEvent {
    let started = Instant::now();
    let scored = state.shadow_predict(job.version, job.raw.values());
    let duration_ns = started.elapsed().as_nanos() as u64;
    if let (Some((prediction, label)), Some(answer)) = (scored, job.event.answer.as_mut()) {
        answer.shadow = Some(ShadowRun {
            version: job.version,
            duration_ns: duration_ns.max(1),
            prediction,
            label,
        });
    }
    job.event
}
