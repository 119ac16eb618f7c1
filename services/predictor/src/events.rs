//! Latency events, off the reply path.
//!
//! The request loop hands each event to a bounded channel with `try_send`,
//! which never waits: when the channel is full (the monitor path is slow or
//! NATS is down) the event is dropped and counted, and the count travels in
//! the next batch. A background task wakes every `EVENT_FLUSH`, takes what
//! has queued and publishes it in batches of up to `EVENT_BATCH` events; the
//! request loop never wakes it (a receiver waiting on the channel would be
//! woken by every request's event, a cost per request). Each batch carries the
//! number of its first event among all this predictor has sent, so the
//! monitor can count the events lost between the two.
//!
//! A share `EVENT_SAMPLE` of the requests also carries its raw features and
//! prediction (a fixed-size copy, no allocation), for the monitor's drift
//! check. The choice is a Weyl sequence over a request counter: spread evenly,
//! with no random-number generator on the hot path. At most
//! `EVENT_SAMPLE_MAX` samples a second are sent: the background task strips
//! the surplus, so the monitor's drift work stays bounded under heavy
//! traffic. With `EVENTS=off` nothing is recorded or sent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use ml_shared::messages::{EventBatch, LatencyEvent};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::task::JoinHandle;

/// 2⁶⁴/φ: multiplying a counter by it spreads consecutive values evenly
/// over the `u64` range.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Which requests carry a feature sample.
#[derive(Debug)]
struct Sampler {
    counter: AtomicU64,
    /// Sample when `counter · GOLDEN < threshold` (wrapping).
    threshold: u64,
    always: bool,
}

impl Sampler {
    fn new(rate: f64) -> Self {
        let rate = if rate.is_finite() {
            rate.clamp(0.0, 1.0)
        } else {
            0.0
        };
        Self {
            counter: AtomicU64::new(0),
            // `as` saturates: rate 1 gives u64::MAX, and `always` covers the rest.
            threshold: (rate * 2f64.powi(64)) as u64,
            always: rate >= 1.0,
        }
    }

    #[inline]
    fn next(&self) -> bool {
        if self.always {
            return true;
        }
        if self.threshold == 0 {
            return false;
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        n.wrapping_mul(GOLDEN) < self.threshold
    }
}

/// The request loop's handle on the event path.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: Option<mpsc::Sender<LatencyEvent>>,
    dropped: Arc<AtomicU64>,
    sampler: Arc<Sampler>,
}

impl EventSink {
    /// A sink that records nothing (`EVENTS=off`).
    pub fn disabled() -> Self {
        Self {
            tx: None,
            dropped: Arc::new(AtomicU64::new(0)),
            sampler: Arc::new(Sampler::new(0.0)),
        }
    }

    /// Whether events are recorded at all.
    #[inline]
    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Whether the next request should carry a feature sample.
    #[inline]
    pub fn sample_next(&self) -> bool {
        self.tx.is_some() && self.sampler.next()
    }

    /// Queues an event, or counts it as dropped. Never waits.
    pub fn record(&self, event: LatencyEvent) {
        if let Some(tx) = &self.tx {
            if tx.try_send(event).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
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
    /// Share of requests that carry a feature sample, in [0, 1].
    pub sample_rate: f64,
    /// Names of the raw features in samples, in order.
    pub raw_features: Vec<String>,
    /// Most samples sent per second (0: no limit); the surplus is removed
    /// in the background, so heavy traffic costs the monitor no more than
    /// this.
    pub sample_max_per_s: u64,
}

/// Sends batches for the publishing task, numbering their events.
struct Publisher {
    client: Client,
    subject: String,
    predictor: String,
    raw_features: Vec<String>,
    dropped: Arc<AtomicU64>,
    /// Number of the next event to send.
    seq: u64,
}

impl Publisher {
    async fn send(&mut self, events: Vec<LatencyEvent>) {
        let batch = EventBatch {
            predictor: self.predictor.clone(),
            seq: self.seq,
            dropped: self.dropped.swap(0, Ordering::Relaxed),
            raw_features: self.raw_features.clone(),
            events,
        };
        let n = batch.events.len() as u64;
        let body = serde_json::to_vec(&batch).expect("events serialise");
        match self.client.publish(self.subject.clone(), body.into()).await {
            // Numbered only once handed to the client: what is lost after
            // that shows as a gap at the monitor.
            Ok(()) => self.seq += n,
            Err(error) => {
                self.dropped.fetch_add(n, Ordering::Relaxed);
                tracing::debug!(%error, events = n, "latency events not sent");
            }
        }
    }
}

/// Starts the publishing task. It ends, after sending what it holds, when
/// every [`EventSink`] clone has been dropped.
pub fn spawn(client: Client, settings: EventSettings) -> (EventSink, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel(settings.capacity.max(1));
    let dropped = Arc::new(AtomicU64::new(0));
    let sink = EventSink {
        tx: Some(tx),
        dropped: dropped.clone(),
        sampler: Arc::new(Sampler::new(settings.sample_rate)),
    };
    let raw_features = if settings.sample_rate > 0.0 {
        settings.raw_features.clone()
    } else {
        Vec::new()
    };
    let mut publisher = Publisher {
        client,
        subject: settings.subject.clone(),
        predictor: settings.predictor.clone(),
        raw_features,
        dropped,
        seq: 0,
    };
    let task = tokio::spawn(async move {
        let batch_max = settings.batch.max(1);
        let mut events: Vec<LatencyEvent> = Vec::with_capacity(batch_max);
        let flush = settings.flush.max(Duration::from_millis(1));
        // Every tick gets the same share of the per-second sample budget.
        let per_tick = match settings.sample_max_per_s {
            0 => u64::MAX,
            n => ((n as f64) * flush.as_secs_f64()).ceil().max(1.0) as u64,
        };
        // The channel is drained on a timer, never awaited: a receiver
        // waiting on it would be woken by every request's event.
        let mut ticker = tokio::time::interval(flush);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let mut budget = per_tick;
            let closed = loop {
                match rx.try_recv() {
                    Ok(mut event) => {
                        if event.sample.is_some() {
                            if budget == 0 {
                                event.sample = None;
                            } else {
                                budget -= 1;
                            }
                        }
                        events.push(event);
                        if events.len() >= batch_max {
                            let full =
                                std::mem::replace(&mut events, Vec::with_capacity(batch_max));
                            publisher.send(full).await;
                        }
                    }
                    Err(TryRecvError::Empty) => break false,
                    Err(TryRecvError::Disconnected) => break true,
                }
            };
            if !events.is_empty() {
                let rest = std::mem::replace(&mut events, Vec::with_capacity(batch_max));
                publisher.send(rest).await;
            }
            if closed {
                break;
            }
        }
    });
    (sink, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sampler_takes_the_requested_share_evenly() {
        for rate in [0.01, 0.1, 0.25, 0.5] {
            let s = Sampler::new(rate);
            let taken: Vec<bool> = (0..100_000).map(|_| s.next()).collect();
            let share = taken.iter().filter(|t| **t).count() as f64 / 1e5;
            assert!((share - rate).abs() < 0.001, "rate {rate}: {share}");
            // Evenly: every block of 1,000 requests gets close to its share.
            for block in taken.chunks(1000) {
                let n = block.iter().filter(|t| **t).count() as f64;
                assert!((n - 1000.0 * rate).abs() <= 2.0, "rate {rate}: {n}");
            }
        }
        let all = Sampler::new(1.0);
        assert!((0..1000).all(|_| all.next()));
        let none = Sampler::new(0.0);
        assert!((0..1000).all(|_| !none.next()));
        assert!(!Sampler::new(f64::NAN).next());
    }

    #[test]
    fn a_disabled_sink_records_and_samples_nothing() {
        let sink = EventSink::disabled();
        assert!(!sink.is_enabled());
        assert!(!sink.sample_next());
        sink.record(LatencyEvent {
            ts_ms: 0,
            duration_ns: 1,
            model_version: None,
            outcome: ml_shared::messages::Outcome::Ok,
            sample: None,
        });
        assert_eq!(sink.dropped.load(Ordering::Relaxed), 0);
    }
}
