//! Latency events, off the reply path.
//!
//! The request loop hands each event to a bounded channel with `try_send`,
//! which never waits: when the channel is full (the monitor path is slow or
//! NATS is down) the event is dropped and counted, and the count travels in
//! the next batch. A background task publishes batches of up to
//! `EVENT_BATCH` events, at least every `EVENT_FLUSH`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use ml_shared::messages::{EventBatch, LatencyEvent};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The request loop's handle on the event path.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: mpsc::Sender<LatencyEvent>,
    dropped: Arc<AtomicU64>,
}

impl EventSink {
    /// Queues an event, or counts it as dropped. Never waits.
    pub fn record(&self, event: LatencyEvent) {
        if self.tx.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Tuning of the event path.
#[derive(Debug, Clone)]
pub struct EventSettings {
    /// Subject to publish batches on.
    pub subject: String,
    /// This predictor's id, sent with every batch.
    pub predictor: String,
    /// Events the channel holds before dropping.
    pub capacity: usize,
    /// Most events in one batch.
    pub batch: usize,
    /// Longest an event waits before its batch is sent.
    pub flush: Duration,
}

/// Starts the publishing task. It ends, after sending what it holds, when
/// every [`EventSink`] clone has been dropped.
pub fn spawn(client: Client, settings: EventSettings) -> (EventSink, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel(settings.capacity.max(1));
    let dropped = Arc::new(AtomicU64::new(0));
    let sink = EventSink {
        tx,
        dropped: dropped.clone(),
    };
    let task = tokio::spawn(async move {
        let batch_max = settings.batch.max(1);
        let mut events = Vec::with_capacity(batch_max);
        let mut deadline: Option<Instant> = None;
        loop {
            let mut closed = false;
            let room = batch_max - events.len();
            tokio::select! {
                n = rx.recv_many(&mut events, room) => {
                    closed = n == 0;
                    deadline.get_or_insert_with(|| Instant::now() + settings.flush);
                }
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {}
            }
            let due = deadline.is_some_and(|d| Instant::now() >= d);
            if !events.is_empty() && (events.len() >= batch_max || due || closed) {
                deadline = None;
                let batch = EventBatch {
                    predictor: settings.predictor.clone(),
                    dropped: dropped.swap(0, Ordering::Relaxed),
                    events: std::mem::replace(&mut events, Vec::with_capacity(batch_max)),
                };
                let n = batch.events.len() as u64;
                let body = serde_json::to_vec(&batch).expect("events serialise");
                if let Err(error) = client.publish(settings.subject.clone(), body.into()).await {
                    dropped.fetch_add(n, Ordering::Relaxed);
                    tracing::debug!(%error, events = n, "latency events not sent");
                }
            }
            if closed {
                break;
            }
        }
    });
    (sink, task)
}
