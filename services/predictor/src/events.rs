//! Latency events, off the reply path.
//!
//! The request loop pushes each event onto a buffer behind an uncontended
//! lock, which never waits on the monitor: when the buffer holds
//! `EVENT_BUFFER` events (the monitor path is slow or NATS is down) the event
//! is dropped and counted, and the count travels in the next batch. A
//! background task wakes every `EVENT_FLUSH`, swaps the buffer for an empty
//! one, and publishes what it took in batches of up to `EVENT_BATCH` events,
//! serialised straight from the buffer. The request loop never wakes it (a
//! task waiting on a channel would be woken by every request's event, a cost
//! per request). Each batch carries the number of its first event among all
//! this predictor has sent, so the monitor can count the events lost between
//! the two.
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

use std::sync::Mutex;

use async_nats::Client;
use ml_shared::messages::LatencyEvent;
use serde::Serialize;
use tokio::task::JoinHandle;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

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

/// What the request loop and the publishing task share.
#[derive(Debug)]
struct Shared {
    queue: Mutex<Vec<LatencyEvent>>,
    capacity: usize,
    dropped: AtomicU64,
    shadow_dropped: AtomicU64,
    sampler: Sampler,
}

/// The request loop's handle on the event path.
#[derive(Debug, Clone)]
pub struct EventSink {
    shared: Option<Arc<Shared>>,
}

impl EventSink {
    /// A sink that records nothing (`EVENTS=off`).
    pub fn disabled() -> Self {
        Self { shared: None }
    }

    /// Whether events are recorded at all.
    #[inline]
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Whether the next request should carry a feature sample.
    #[inline]
    pub fn sample_next(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.sampler.next())
    }

    /// Counts a shadow run skipped (the shadow queue full); the count goes
    /// with the next batch.
    pub fn shadow_dropped(&self) {
        if let Some(shared) = &self.shared {
            shared.shadow_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues an event, or counts it as dropped. Never waits for the monitor.
    pub fn record(&self, event: LatencyEvent) {
        if let Some(shared) = &self.shared {
            // A poisoned lock only means a panic elsewhere mid-push; the
            // buffer is still a valid Vec.
            let mut queue = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            if queue.len() < shared.capacity {
                queue.push(event);
            } else {
                drop(queue);
                shared.dropped.fetch_add(1, Ordering::Relaxed);
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
    /// Events the buffer holds before dropping.
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

/// An [`ml_shared::messages::EventBatch`] serialised from borrowed parts
/// (the same JSON), so events go out without being moved or copied.
#[derive(Serialize)]
struct BatchRef<'a> {
    predictor: &'a str,
    seq: u64,
    dropped: u64,
    #[serde(skip_serializing_if = "is_zero")]
    shadow_dropped: u64,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    raw_features: &'a [String],
    events: &'a [LatencyEvent],
}

/// Sends batches for the publishing task, numbering their events.
struct Publisher {
    client: Client,
    subject: String,
    predictor: String,
    raw_features: Vec<String>,
    shared: Arc<Shared>,
    /// Number of the next event to send.
    seq: u64,
}

impl Publisher {
    async fn send(&mut self, events: &[LatencyEvent]) {
        let batch = BatchRef {
            predictor: &self.predictor,
            seq: self.seq,
            dropped: self.shared.dropped.swap(0, Ordering::Relaxed),
            shadow_dropped: self.shared.shadow_dropped.swap(0, Ordering::Relaxed),
            raw_features: &self.raw_features,
            events,
        };
        let n = events.len() as u64;
        let mut body = Vec::with_capacity(128 + events.len() * 96);
        serde_json::to_writer(&mut body, &batch).expect("events serialise");
        match self.client.publish(self.subject.clone(), body.into()).await {
            // Numbered only once handed to the client: what is lost after
            // that shows as a gap at the monitor.
            Ok(()) => self.seq += n,
            Err(error) => {
                self.shared.dropped.fetch_add(n, Ordering::Relaxed);
                tracing::debug!(%error, events = n, "latency events not sent");
            }
        }
    }
}

/// Starts the publishing task. It ends, after sending what it holds, when
/// every [`EventSink`] clone has been dropped.
pub fn spawn(client: Client, settings: EventSettings) -> (EventSink, JoinHandle<()>) {
    let capacity = settings.capacity.max(1);
    let shared = Arc::new(Shared {
        queue: Mutex::new(Vec::new()),
        capacity,
        dropped: AtomicU64::new(0),
        shadow_dropped: AtomicU64::new(0),
        sampler: Sampler::new(settings.sample_rate),
    });
    let sink = EventSink {
        shared: Some(shared.clone()),
    };
    let raw_features = if settings.sample_rate > 0.0 {
        settings.raw_features.clone()
    } else {
        Vec::new()
    };
    let batch_max = settings.batch.max(1);
    let flush = settings.flush.max(Duration::from_millis(1));
    // Every tick gets the same share of the per-second sample budget.
    let per_tick = match settings.sample_max_per_s {
        0 => u64::MAX,
        n => ((n as f64) * flush.as_secs_f64()).ceil().max(1.0) as u64,
    };
    let mut publisher = Publisher {
        client,
        subject: settings.subject.clone(),
        predictor: settings.predictor.clone(),
        raw_features,
        shared,
        seq: 0,
    };
    let task = tokio::spawn(async move {
        // Two buffers, swapped: the request loop fills one while this task
        // sends the other; neither grows beyond `capacity`, and neither is
        // reallocated once grown.
        let mut taken: Vec<LatencyEvent> = Vec::new();
        let mut ticker = tokio::time::interval(flush);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            // Only this task's handle left: every sink is gone.
            let closed = Arc::strong_count(&publisher.shared) == 1;
            {
                let mut queue = publisher
                    .shared
                    .queue
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                std::mem::swap(&mut *queue, &mut taken);
            }
            let mut budget = per_tick;
            for event in &mut taken {
                if event.sample.is_some() {
                    if budget == 0 {
                        event.sample = None;
                    } else {
                        budget -= 1;
                    }
                }
            }
            for batch in taken.chunks(batch_max) {
                publisher.send(batch).await;
                // On the single-threaded runtime this task shares the
                // thread with the request loop: let requests in between
                // batches rather than after the whole tick's worth.
                tokio::task::yield_now().await;
            }
            taken.clear();
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
    use ml_shared::profile::FeatureSample;

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
        sink.record(event(None));
    }

    fn event(sample: Option<FeatureSample>) -> LatencyEvent {
        LatencyEvent {
            ts_ms: 1_795_799_152_733,
            duration_ns: 6783,
            model_version: Some(2),
            outcome: ml_shared::messages::Outcome::Ok,
            sample,
            variant: None,
            answer: None,
        }
    }

    #[test]
    fn a_full_buffer_drops_and_counts() {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::new()),
            capacity: 3,
            dropped: AtomicU64::new(0),
            shadow_dropped: AtomicU64::new(0),
            sampler: Sampler::new(1.0),
        });
        let sink = EventSink {
            shared: Some(shared.clone()),
        };
        for _ in 0..5 {
            sink.record(event(None));
        }
        assert_eq!(shared.queue.lock().unwrap().len(), 3);
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 2);
        assert!(sink.sample_next());
    }

    #[test]
    fn borrowed_batches_serialise_as_event_batches() {
        let events = vec![event(FeatureSample::new(&[0.3, 1.5], 1.94)), event(None)];
        let names = ["feature_1".to_owned(), "feature_2".to_owned()];
        for raw_features in [&names[..], &[]] {
            let by_ref = serde_json::to_string(&BatchRef {
                predictor: "host-42",
                seq: 1024,
                dropped: 3,
                shadow_dropped: 2,
                raw_features,
                events: &events,
            })
            .unwrap();
            let owned = serde_json::to_string(&ml_shared::messages::EventBatch {
                predictor: "host-42".into(),
                seq: 1024,
                dropped: 3,
                shadow_dropped: 2,
                raw_features: raw_features.to_vec(),
                events: events.clone(),
            })
            .unwrap();
            assert_eq!(by_ref, owned);
            let back: ml_shared::messages::EventBatch = serde_json::from_str(&by_ref).unwrap();
            assert_eq!(back.events, events);
        }
    }
}
