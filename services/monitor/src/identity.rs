//! Who may send latency events: the running predictors.
//!
//! Predictors are a NATS micro-service named `predictor`, and each puts the
//! id its event batches carry (`PREDICTOR_ID`) in its service metadata under
//! [`EVENTS_ID_METADATA`]. The monitor asks `$SRV.INFO.predictor` and
//! collects every reply for `MONITOR_DISCOVERY_WAIT` ([`discover`]): at
//! start, every `MONITOR_DISCOVERY`, and when a batch comes from an id it
//! does not know (at most once a second). A batch from an unknown id waits
//! in a bounded quarantine (`MONITOR_QUARANTINE` events) until the next
//! discovery ends: then it is counted if its id has been found, and
//! otherwise rejected (`unknown_predictor`); when the quarantine is full it
//! is rejected at once (`quarantine_full`). A predictor stays known for two
//! discovery intervals after it last answered, so the events it flushes as
//! it stops still count.
//!
//! The monitor needs to publish `$SRV.INFO.predictor` and to read its own
//! inbox (`NATS_INBOX_PREFIX`).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use async_nats::Client;
use futures::StreamExt;
use ml_shared::messages::EventBatch;
use serde::Deserialize;

use crate::validate::valid_id;

/// The micro-service name of the predictors.
pub const PREDICTOR_SERVICE: &str = "predictor";
/// The key of the predictors' service metadata that holds their event id.
pub const EVENTS_ID_METADATA: &str = "predictor_id";
/// Most predictors one discovery learns (replies past it are ignored).
pub const MAX_KNOWN: usize = 4096;
/// Largest discovery reply read, in bytes.
const MAX_INFO_BYTES: usize = 64 * 1024;

/// The part of a `$SRV.INFO` reply the monitor reads.
#[derive(Debug, Deserialize)]
struct InfoReply {
    name: String,
    #[serde(default)]
    metadata: Option<HashMap<String, String>>,
}

/// Asks every running predictor for its service info and returns the event
/// ids found, gathering replies for `wait` (at most [`MAX_KNOWN`]).
pub async fn discover(client: Client, wait: Duration) -> Result<Vec<String>, async_nats::Error> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(format!("$SRV.INFO.{PREDICTOR_SERVICE}"), inbox, "".into())
        .await?;
    client.flush().await?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut ids = Vec::new();
    let mut ignored = 0u64;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, replies.next()).await {
        if message.payload.len() > MAX_INFO_BYTES {
            ignored += 1;
            continue;
        }
        let Ok(info) = serde_json::from_slice::<InfoReply>(&message.payload) else {
            // No responders (an empty 503 status), or not a service's info.
            continue;
        };
        let id = info
            .metadata
            .as_ref()
            .and_then(|m| m.get(EVENTS_ID_METADATA))
            .filter(|id| info.name == PREDICTOR_SERVICE && valid_id(id));
        match id {
            Some(id) if ids.len() < MAX_KNOWN => ids.push(id.clone()),
            _ => ignored += 1,
        }
    }
    let _ = replies.unsubscribe().await;
    if ignored > 0 {
        tracing::debug!(ignored, "discovery replies without a usable predictor id");
    }
    Ok(ids)
}

/// The predictors found running, and the batches waiting to be judged.
#[derive(Debug)]
pub struct Identities {
    known: HashMap<String, Instant>,
    /// How long an id stays known after it last answered a discovery.
    keep: Duration,
    /// Batches from unknown ids, with the time each arrived.
    quarantine: VecDeque<(Instant, EventBatch)>,
    /// Events and batches held: a batch costs its events plus one.
    held: usize,
    capacity: usize,
    /// Discoveries completed.
    pub discoveries: u64,
}

impl Identities {
    /// Nothing known; ids stay known for `keep` after they last answered,
    /// and the quarantine holds at most `capacity` events.
    pub fn new(keep: Duration, capacity: usize) -> Self {
        Self {
            known: HashMap::new(),
            keep,
            quarantine: VecDeque::new(),
            held: 0,
            capacity,
            discoveries: 0,
        }
    }

    /// Whether `id` is a running predictor's, as far as the last discoveries
    /// tell.
    pub fn is_known(&self, id: &str, now: Instant) -> bool {
        self.known
            .get(id)
            .is_some_and(|seen| now.saturating_duration_since(*seen) <= self.keep)
    }

    /// Holds a batch from an unknown id, arrived at `now`, until a
    /// discovery started after it ends; gives it back when the quarantine is
    /// full.
    pub fn hold(&mut self, batch: EventBatch, now: Instant) -> Result<(), EventBatch> {
        let cost = batch.events.len() + 1;
        if self.held + cost > self.capacity {
            return Err(batch);
        }
        self.held += cost;
        self.quarantine.push_back((now, batch));
        Ok(())
    }

    /// Learns the ids a discovery started at `started` found (at `now`),
    /// forgets the ones not seen for longer than `keep`, and releases, in
    /// arrival order, the quarantined batches that arrived before the
    /// discovery started (the others wait for the next one: their sender
    /// may have started after this one asked).
    pub fn learn(&mut self, ids: Vec<String>, started: Instant, now: Instant) -> Vec<EventBatch> {
        self.discoveries += 1;
        for id in ids {
            self.known.insert(id, now);
        }
        let keep = self.keep;
        self.known
            .retain(|_, seen| now.saturating_duration_since(*seen) <= keep);
        if self.known.len() > MAX_KNOWN {
            let mut by_age: Vec<(Instant, String)> =
                self.known.drain().map(|(id, seen)| (seen, id)).collect();
            by_age.sort_unstable_by_key(|b| std::cmp::Reverse(b.0));
            by_age.truncate(MAX_KNOWN);
            self.known = by_age.into_iter().map(|(seen, id)| (id, seen)).collect();
        }
        let mut released = Vec::new();
        while let Some((arrived, _)) = self.quarantine.front() {
            if *arrived > started {
                break;
            }
            let (_, batch) = self.quarantine.pop_front().expect("a front");
            self.held -= batch.events.len() + 1;
            released.push(batch);
        }
        released
    }

    /// Ids known.
    pub fn known(&self) -> usize {
        self.known.len()
    }

    /// Batches and events waiting in quarantine.
    pub fn quarantined(&self) -> (usize, usize) {
        (self.quarantine.len(), self.held - self.quarantine.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(id: &str, events: usize) -> EventBatch {
        EventBatch {
            predictor: id.into(),
            seq: 0,
            dropped: 0,
            raw_features: Vec::new(),
            events: vec![
                ml_shared::messages::LatencyEvent {
                    ts_ms: 0,
                    duration_ns: 1,
                    model_version: None,
                    outcome: ml_shared::messages::Outcome::Ok,
                    sample: None,
                    variant: None,
                    answer: None,
                };
                events
            ],
            shadow_dropped: 0,
        }
    }

    #[test]
    fn the_quarantine_is_bounded_and_released_in_order() {
        let t = Instant::now();
        let mut ids = Identities::new(Duration::from_secs(60), 26);
        assert!(!ids.is_known("a", t));
        ids.hold(batch("a", 9), t).unwrap();
        ids.hold(batch("b", 9), t).unwrap();
        assert_eq!(ids.quarantined(), (2, 18));
        assert!(ids.hold(batch("c", 6), t).is_err(), "20 + 7 > 26");
        ids.hold(batch("c", 4), t).unwrap();
        let late = t + Duration::from_millis(1);
        ids.hold(batch("d", 0), late).unwrap();
        let released = ids.learn(vec!["a".into()], t, t);
        let order: Vec<_> = released.iter().map(|b| b.predictor.as_str()).collect();
        assert_eq!(order, ["a", "b", "c"]);
        assert_eq!(
            ids.quarantined(),
            (1, 0),
            "d arrived after the discovery started"
        );
        assert_eq!(ids.learn(Vec::new(), late, late).len(), 1);
        assert_eq!(ids.quarantined(), (0, 0));
        assert!(ids.is_known("a", t) && !ids.is_known("b", t));
        // Known until `keep` after it last answered.
        assert!(ids.is_known("a", t + Duration::from_secs(60)));
        assert!(!ids.is_known("a", t + Duration::from_secs(61)));
        let later = t + Duration::from_secs(61);
        ids.learn(vec!["b".into()], later, later);
        assert_eq!(ids.known(), 1);
    }
}
