//! A steady, bounded load on `ml.predict` that records every request's
//! outcome and duration, for the fault tests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use serde_json::Value;
use tokio::task::JoinHandle;

/// The load stops by itself after this long, whatever the test does.
const HARD_STOP: Duration = Duration::from_secs(120);

/// One request's fate.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was sent, from the start of the load.
    pub sent: Duration,
    /// How long until its reply or error.
    pub took: Duration,
    /// The model version of a successful reply; `None` for an error.
    pub version: Option<u64>,
    /// The error (reply code or client error), if any.
    pub error: Option<String>,
}

/// A running load.
pub struct Load {
    started: Instant,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<Vec<Sample>>>,
}

/// Starts `workers` loops, each sending `body` and pausing `pause` after
/// each reply, until [`Load::finish`] (or two minutes).
pub fn start(client: &Client, body: &str, workers: usize, pause: Duration) -> Load {
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = (0..workers)
        .map(|_| {
            let (client, body, stop) = (client.clone(), body.to_owned(), stop.clone());
            tokio::spawn(async move {
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < HARD_STOP {
                    let sent = Instant::now();
                    let outcome = client.request("ml.predict", body.clone().into()).await;
                    let took = sent.elapsed();
                    let (version, error) = match outcome {
                        Ok(m) => match serde_json::from_slice::<Value>(&m.payload) {
                            Ok(v) => match v["model_version"].as_u64() {
                                Some(version) => (Some(version), None),
                                None => (None, Some(v["error"]["code"].to_string())),
                            },
                            Err(e) => (None, Some(format!("unreadable reply: {e}"))),
                        },
                        Err(e) => (None, Some(format!("{:?}", e.kind()))),
                    };
                    samples.push(Sample {
                        sent: sent - started,
                        took,
                        version,
                        error,
                    });
                    tokio::time::sleep(pause).await;
                }
                samples
            })
        })
        .collect();
    Load {
        started,
        stop,
        workers,
    }
}

impl Load {
    /// Time since the load started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops the load and returns every sample, in order of sending.
    pub async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for worker in self.workers {
            let samples = tokio::time::timeout(Duration::from_secs(60), worker)
                .await
                .expect("load workers stop")
                .expect("load worker panicked");
            all.extend(samples);
        }
        all.sort_by_key(|s| s.sent);
        all
    }
}

/// Share of successes among `samples` sent in `[from, to)`, and their count.
pub fn success_rate(samples: &[Sample], from: Duration, to: Duration) -> (f64, usize) {
    let window: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.sent >= from && s.sent < to)
        .collect();
    let ok = window.iter().filter(|s| s.error.is_none()).count();
    (ok as f64 / window.len().max(1) as f64, window.len())
}

/// The errors among `samples`, counted by kind.
pub fn error_counts(samples: &[Sample]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for e in samples.iter().filter_map(|s| s.error.clone()) {
        *counts.entry(e).or_insert(0) += 1;
    }
    counts
}
