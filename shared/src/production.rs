//! Following the production model, for every service that needs it (the
//! predictors serve it, the monitor compares traffic with its reference
//! profile).
//!
//! The registry publishes each new production model on
//! `ml.model.production`; a follower also asks `ml.registry.production`
//! every `poll` while it holds no model, and every `reconcile` once it holds
//! one, to catch a publication missed while disconnected. What to do with a
//! release (and whether it is newer) is the caller's business.

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

/// Follows the production model until aborted (or the subscription ends).
///
/// `held` returns the epoch of the model the caller holds (`None` when it
/// holds none); `offer` receives every release heard of, which may be one the
/// caller already has.
pub async fn follow<H, O>(
    client: Client,
    subjects: Subjects,
    settings: FollowSettings,
    held: H,
    mut offer: O,
) where
    H: Fn() -> Option<u64>,
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
                    let after_epoch = held().unwrap_or(0);
                    if let Some(release) = ask(&client, &subjects, after_epoch, settings.timeout).await {
                        offer(release, Source::Registry);
                    }
                }
            }
        }
    }
}

/// Asks the registry for the production model if newer than `after_epoch`.
/// `None` when there is none, it is not newer, or the registry cannot be
/// reached (logged at debug level: the caller asks again later).
pub async fn ask(
    client: &Client,
    subjects: &Subjects,
    after_epoch: u64,
    timeout: Duration,
) -> Option<ModelRelease> {
    let query = serde_json::to_vec(&ProductionQuery { after_epoch }).expect("serialisable");
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
