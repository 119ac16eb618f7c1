//! Keeping the predictor current: the production model (pushed by the
//! registry, and asked for while there is none or to reconcile), and the
//! feature store (reloaded when the data file changes).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::Client;
use ml_shared::data;
use ml_shared::features::{FeatureRegistry, FeatureStore};
use ml_shared::messages::ModelRelease;
use ml_shared::production::{self, Comparison, FollowSettings};
use ml_shared::subjects::Subjects;

use crate::serving::ServingState;

/// Offers a release: installed when it is newer than the deployment served
/// (see [`production::compare`]) and every model of it (production and the
/// routing table's) is usable; otherwise the current deployment keeps
/// serving, whole. A release from another registry than the served model's is
/// installed too (the registry is the system of record), with an error in
/// the log: the registry's state was reset or replaced.
pub fn offer(state: &ServingState, release: ModelRelease, source: &'static str) {
    let current = state.model().map(|m| m.held());
    match production::compare(current.as_ref(), &release) {
        Comparison::NotNewer => {
            tracing::debug!(
                source,
                version = release.version,
                epoch = release.epoch,
                "model already current"
            );
            return;
        }
        Comparison::OtherRegistry => tracing::error!(
            source,
            registry_id = %release.registry_id,
            version = release.version,
            epoch = release.epoch,
            served_registry_id = ?current.as_ref().map(|h| &h.registry_id),
            served_version = ?current.as_ref().map(|h| h.version),
            served_epoch = ?current.as_ref().map(|h| h.epoch),
            "registry reset: a registry with another identity publishes production; its model replaces the one served"
        ),
        Comparison::Newer => {}
    }
    let (version, epoch) = (release.version, release.epoch);
    let previous = state.model().map(|m| m.versions());
    match state.prepare(release) {
        Ok(deployment) => {
            let table = deployment.routing.as_ref().map(|r| r.table.clone());
            state.install(deployment);
            tracing::info!(
                source,
                version,
                epoch,
                ?previous,
                ?table,
                "now serving model"
            );
        }
        Err(error) => tracing::error!(
            source, version, epoch, %error, serving = ?previous,
            "published model or routing table refused; keeping the current deployment whole"
        ),
    }
}

/// Follows `ml.model.production`, and asks `ml.registry.production` every
/// `poll` while no model is served and every `reconcile` once one is (to
/// catch a publication missed while disconnected). Runs until aborted.
pub async fn follow_models(
    client: Client,
    subjects: Subjects,
    state: Arc<ServingState>,
    poll: Duration,
    reconcile: Duration,
    timeout: Duration,
) {
    let settings = FollowSettings {
        poll,
        reconcile,
        timeout,
    };
    let held = || state.model().map(|m| m.held());
    production::follow(client, subjects, settings, held, |release, source| {
        offer(&state, release, source.as_str())
    })
    .await;
}

/// Loads the feature store from `path`, streaming the file straight into
/// the store's compact form (no intermediate dataset), off the runtime.
pub async fn load_store(
    registry: &FeatureRegistry,
    path: PathBuf,
) -> Result<FeatureStore, data::DataError> {
    let raw = registry.raw_names().to_vec();
    tokio::task::spawn_blocking(move || FeatureStore::load_csv(&path, &raw))
        .await
        .expect("loading task panicked")
}

fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reloads the feature store whenever the data file's time or size changes,
/// checking every `every`. A file that fails to load leaves the current store
/// serving. Runs until aborted.
pub async fn refresh_store(state: Arc<ServingState>, path: PathBuf, every: Duration) {
    let mut seen = stamp(&path);
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let now = stamp(&path);
        if now.is_none() || now == seen {
            continue;
        }
        seen = now;
        match load_store(state.registry(), path.clone()).await {
            Ok(store) => {
                tracing::info!(path = %path.display(), users = store.len(), "feature store reloaded");
                state.replace_store(store);
            }
            Err(error) => {
                tracing::error!(%error, "feature store not reloaded; keeping the current one")
            }
        }
    }
}
