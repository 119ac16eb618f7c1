//! Following the production model, for every service that needs it (the
//! predictors serve it, the monitor compares traffic with its reference
//! profile).
//!
//! The registry publishes each new production model on
//! `ml.model.production`; a follower also asks `ml.registry.production`
//! every `poll` while it holds no model, and every `reconcile` once it holds
//! one, to catch a publication missed while disconnected. Whether a release
//! is newer is decided by one rule, [`compare`]; what to do with it is the
//! caller's business.

use std::time::Duration;

use async_nats::Client;
use futures::StreamExt;
use tokio::time::Instant;

use crate::codec;
use crate::messages::{ModelRelease, ProductionQuery, ProductionReply};
use crate::subjects::Subjects;

/// How often to ask the registry, and how long to wait for it.
#[derive(Debug, Clone, Copy)]
pub struct FollowSettings {
    /// Between two questions while no model is held.
    pub poll: Duration,
    /// Between two questions once a model is held.
    pub reconcile: Duration,
    /// Longest wait for the registry's reply.
    pub timeout: Duration,
}

/// Where a release came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A publication on `ml.model.production`.
    Publication,
    /// A reply of `ml.registry.production`.
    Registry,
}

impl Source {
    /// `publication` or `registry`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Publication => "publication",
            Source::Registry => "registry",
        }
    }
}

/// What a follower holds: which registry's model, at which epoch, which
/// version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The identity of the registry that published it.
    pub registry_id: String,
    /// Its epoch.
    pub epoch: u64,
    /// Its version.
    pub version: u64,
}

/// How a release compares with what a follower holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// Newer: take it.
    Newer,
    /// Already held, or older (messages may arrive out of order): ignore it.
    NotNewer,
    /// Published by another registry than the held model's: the registry's
    /// state was reset or replaced. Epochs of two registries do not compare;
    /// the registry is the system of record, so the follower takes it, and
    /// says so loudly.
    OtherRegistry,
}

/// The one rule every follower applies to a release (predictors and the
/// monitor alike).
pub fn compare(held: Option<&Held>, release: &ModelRelease) -> Comparison {
    match held {
        None => Comparison::Newer,
        Some(h) if h.registry_id != release.registry_id => Comparison::OtherRegistry,
        Some(h) if release.epoch > h.epoch => Comparison::Newer,
        Some(_) => Comparison::NotNewer,
    }
}

/// Follows the production model until aborted (or the subscription ends).
///
/// `held` returns what the caller holds (`None` when it holds none);
/// `offer` receives every release heard of, which may be one the caller
/// already has.
pub async fn follow<H, O>(
    client: Client,
    subjects: Subjects,
    settings: FollowSettings,
    held: H,
    mut offer: O,
) where
    H: Fn() -> Option<Held>,
    O: FnMut(ModelRelease, Source),
{
    let mut published = match client.subscribe(subjects.model_production.clone()).await {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot subscribe to model publications");
            return;
        }
    };
    let mut ticker = tokio::time::interval(settings.poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_asked: Option<Instant> = None;
    loop {
        tokio::select! {
            message = published.next() => {
                let Some(message) = message else { return };
                match codec::decode::<ModelRelease>(&message.payload) {
                    Ok(release) => offer(release, Source::Publication),
                    Err(error) => tracing::error!(%error, "unreadable model publication ignored"),
                }
            }
            _ = ticker.tick() => {
                let due = held().is_none()
                    || last_asked.is_none_or(|t| t.elapsed() >= settings.reconcile);
                if due {
                    last_asked = Some(Instant::now());
                    let query = ProductionQuery::from_held(held().as_ref());
                    if let Some(release) = ask(&client, &subjects, &query, settings.timeout).await {
                        offer(release, Source::Registry);
                    }
                }
            }
        }
    }
}

impl ProductionQuery {
    /// The question of a follower holding `held`.
    pub fn from_held(held: Option<&Held>) -> Self {
        ProductionQuery {
            after_epoch: held.map_or(0, |h| h.epoch),
            registry_id: held.map(|h| h.registry_id.clone()),
            version: held.map(|h| h.version),
        }
    }
}

/// Asks the registry for the production model if newer than what `query`
/// says is held. `None` when there is none, it is not newer, or the registry
/// cannot be reached (logged at debug level: the caller asks again later).
pub async fn ask(
    client: &Client,
    subjects: &Subjects,
    query: &ProductionQuery,
    timeout: Duration,
) -> Option<ModelRelease> {
    let query = serde_json::to_vec(query).expect("serialisable");
    let request = client.request(subjects.registry_production.clone(), query.into());
    let message = match tokio::time::timeout(timeout, request).await {
        Ok(Ok(m)) => m,
        Ok(Err(error)) => {
            tracing::debug!(%error, "registry not reachable; will ask again");
            return None;
        }
        Err(_) => {
            tracing::debug!("registry did not answer in time; will ask again");
            return None;
        }
    };
    match codec::decode::<ProductionReply>(&message.payload) {
        Ok(ProductionReply::Release(release)) => Some(release),
        Ok(ProductionReply::Current) => None,
        Ok(ProductionReply::NoModel) => {
            tracing::debug!("registry has no production model yet");
            None
        }
        Err(error) => {
            tracing::error!(%error, "unreadable reply from the registry");
            None
        }
    }
}
