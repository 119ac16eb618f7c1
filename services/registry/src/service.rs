//! The registry as a NATS micro service: one endpoint per request subject,
//! a typed [`Endpoint`] per request, one handler each, and every error reply
//! through [`ml_shared::nats::error_parts`] (JSON body and the
//! `Nats-Service-Error` headers).
//!
//! Every request is checked before it is acted on: its reply subject must be
//! an inbox ([`ml_shared::nats::accept_reply`]), so a request crafted to make
//! the registry publish on an internal subject does nothing.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use async_nats::service::{Request, ServiceExt};
use async_nats::Client;
use bytes::Bytes;
use futures::stream::{select_all, StreamExt};
use ml_shared::codec;
use ml_shared::evaluation::Scored;
use ml_shared::features::FeatureRegistry;
use ml_shared::lifecycle::{
    FailedRun, HistoryReply, HistoryRequest, MoveReply, PromoteRequest, RecordedReply,
    RollbackRequest, RouteRequest,
};
use ml_shared::messages::{
    ErrorCode, ErrorReply, ImportRequest, Metrics, Page, ProductionQuery, ProductionReply,
    RunsReply, Submission, SubmitReply,
};
use ml_shared::model::ModelArtifact;
use ml_shared::routing::{RouteError, RouteProblem};
use ml_shared::subjects::Subjects;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::holdout::Holdout;
use crate::jetstream::JsError;
use crate::store::{Store, StoreError};

/// Micro-service name (`nats micro ls`).
pub const SERVICE_NAME: &str = "registry";

/// The largest JSON reply the registry sends: listings are cut to fit (their
/// `total` tells a client there is more), well under the server's 1 MB
/// default payload limit.
pub const REPLY_LIMIT: usize = 512 * 1024;

/// The requests the registry answers, one per endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `ml.registry.submit`.
    Submit,
    /// `ml.registry.production`.
    Production,
    /// `ml.registry.models`.
    Models,
    /// `ml.registry.runs`.
    Runs,
    /// `ml.registry.run_failed`.
    RunFailed,
    /// `ml.registry.promote`.
    Promote,
    /// `ml.registry.rollback`.
    Rollback,
    /// `ml.registry.history`.
    History,
    /// `ml.registry.import`.
    Import,
    /// `ml.registry.route`.
    Route,
}

impl Endpoint {
    /// Every endpoint.
    pub const ALL: [Endpoint; 10] = [
        Endpoint::Submit,
        Endpoint::Production,
        Endpoint::Models,
        Endpoint::Runs,
        Endpoint::RunFailed,
        Endpoint::Promote,
        Endpoint::Rollback,
        Endpoint::History,
        Endpoint::Import,
        Endpoint::Route,
    ];

    /// The endpoint's name and subject.
    pub fn name_and_subject(self, s: &Subjects) -> (&'static str, &str) {
        match self {
            Endpoint::Submit => ("submit", &s.registry_submit),
            Endpoint::Production => ("production", &s.registry_production),
            Endpoint::Models => ("models", &s.registry_models),
            Endpoint::Runs => ("runs", &s.registry_runs),
            Endpoint::RunFailed => ("run_failed", &s.registry_run_failed),
            Endpoint::Promote => ("promote", &s.registry_promote),
            Endpoint::Rollback => ("rollback", &s.registry_rollback),
            Endpoint::History => ("history", &s.registry_history),
            Endpoint::Import => ("import", &s.registry_import),
            Endpoint::Route => ("route", &s.registry_route),
        }
    }
}

/// The registry's state and connection, shared by the handlers.
pub struct Registry {
    client: Client,
    subjects: Subjects,
    store: Arc<Mutex<Store>>,
    holdout: Arc<Mutex<Holdout>>,
    features: Arc<FeatureRegistry>,
    /// What an ONNX model may cost.
    onnx: crate::import::OnnxLimits,
    /// Foreign registry ids already reported, so each is logged once.
    foreign: Mutex<HashSet<String>>,
}

impl Registry {
    /// A registry over `store`, evaluating submissions on `holdout`.
    pub fn new(client: Client, subjects: Subjects, store: Store, holdout: Holdout) -> Self {
        Self {
            client,
            subjects,
            store: Arc::new(Mutex::new(store)),
            holdout: Arc::new(Mutex::new(holdout)),
            features: Arc::new(FeatureRegistry::default()),
            onnx: crate::import::OnnxLimits::default(),
            foreign: Mutex::default(),
        }
    }

    /// Accepts ONNX models within `limits`.
    pub fn with_onnx_limits(mut self, limits: crate::import::OnnxLimits) -> Self {
        self.onnx = limits;
        self
    }

    /// A model's metrics on the holdout: native or ONNX, loaded by the
    /// engine with the registry's limit (a model the engine refuses is
    /// invalid, the holdout unreadable makes it unverifiable).
    fn evaluator(&self) -> impl FnMut(&ModelArtifact) -> Result<Metrics, StoreError> + Send {
        let mut score = self.holdout_scorer();
        move |artifact: &ModelArtifact| Ok(score(artifact)?.metrics())
    }

    /// A model's features and predictions on the holdout, as
    /// [`Registry::evaluator`] loads and scores it.
    fn holdout_scorer(&self) -> impl FnMut(&ModelArtifact) -> Result<Scored, StoreError> + Send {
        let (holdout, features) = (self.holdout.clone(), self.features.clone());
        let max = self.onnx.max_bytes;
        move |artifact: &ModelArtifact| {
            let scorer = ml_onnx::Scorer::load(artifact, max)
                .map_err(|e| StoreError::Invalid(format!("the model cannot be scored: {e}")))?;
            let rows = holdout
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .rows(&features)
                .map_err(|e| StoreError::Unverifiable(e.to_string()))?;
            rows.score(&scorer, &features)
                .map_err(|e| StoreError::Invalid(format!("on the registry's holdout: {e}")))
        }
    }
}

/// Starts the micro service and answers requests, one at a time, until
/// `shutdown` completes.
pub async fn serve(registry: Registry, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let service = registry
        .client
        .service_builder()
        .description("Stores, versions and publishes models")
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("starting the micro-service: {e}"))?;
    let mut streams = Vec::new();
    for endpoint in Endpoint::ALL {
        let (name, subject) = endpoint.name_and_subject(&registry.subjects);
        let stream = service
            .endpoint_builder()
            .name(name)
            .add(subject.to_owned())
            .await
            .map_err(|e| anyhow::anyhow!("adding the {name} endpoint: {e}"))?;
        streams.push(stream.map(move |request| (endpoint, request)).boxed());
    }
    let mut requests = select_all(streams);
    registry.warm_holdout();
    // Predictors that started before us are waiting for a model.
    registry.publish_production().await;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            next = requests.next() => match next {
                Some((endpoint, request)) => registry.handle(endpoint, request).await,
                None => break,
            },
        }
    }
    drop(requests);
    service
        .stop()
        .await
        .map_err(|e| anyhow::anyhow!("stopping the micro-service: {e}"))
}

impl Registry {
    /// Reads the holdout in the background, so that the first submission
    /// does not wait for it (a submission meanwhile waits for the read).
    fn warm_holdout(&self) {
        let (holdout, features) = (self.holdout.clone(), self.features.clone());
        tokio::task::spawn_blocking(move || {
            let mut holdout = holdout.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(error) = holdout.rows(&features) {
                tracing::warn!(%error, "holdout not readable yet; submissions are refused until it is");
            }
        });
    }

    /// Checks the reply subject, then dispatches to the endpoint's handler.
    async fn handle(&self, endpoint: Endpoint, request: Request) {
        let m = &request.message;
        if ml_shared::nats::accept_reply(SERVICE_NAME, &m.subject, m.reply.as_ref()).is_none() {
            return;
        }
        match endpoint {
            Endpoint::Submit => self.on_submit(&request).await,
            Endpoint::Production => self.on_production(&request).await,
            Endpoint::Models => self.on_models(&request).await,
            Endpoint::Runs => self.on_runs(&request).await,
            Endpoint::RunFailed => self.on_run_failed(&request).await,
            Endpoint::Promote => self.on_promote(&request).await,
            Endpoint::Rollback => self.on_rollback(&request).await,
            Endpoint::History => self.on_history(&request).await,
            Endpoint::Import => self.on_import(&request).await,
            Endpoint::Route => self.on_route(&request).await,
        }
    }

    /// Runs `f` on the store off the async threads (it does blocking I/O),
    /// after catching up with what other registries committed (JetStream
    /// state; when that fails, `f` sees what this registry holds, and a
    /// write then fails on its compare-and-set or for want of a quorum).
    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> T + Send + 'static,
    ) -> T {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(error) = store.refresh() {
                tracing::warn!(%error, "cannot catch up with the JetStream state; answering from what this registry holds");
            }
            f(&mut store)
        })
        .await
        .expect("store task panicked")
    }

    async fn send(&self, request: &Request, body: Bytes) {
        if let Err(error) = request.respond(Ok(body)).await {
            tracing::warn!(%error, "cannot send a reply");
        }
    }

    async fn reply_json<T: Serialize>(&self, request: &Request, value: &T) {
        let body = serde_json::to_vec(value).expect("replies serialise");
        self.send(request, body.into()).await;
    }

    async fn reply_error(&self, request: &Request, error: &ErrorReply) {
        let (body, headers) = ml_shared::nats::error_parts(error);
        if let Err(e) = request.respond_with_headers(Ok(body), headers).await {
            tracing::warn!(error = %e, "cannot send an error reply");
        }
    }

    /// Parses a JSON request, answering `bad_request` when it cannot.
    async fn parse<T: DeserializeOwned>(&self, request: &Request, empty_ok: bool) -> Option<T> {
        let payload = &request.message.payload;
        let payload: &[u8] = if empty_ok && payload.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            payload
        };
        match serde_json::from_slice(payload) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(subject = %request.message.subject, error = %e, "malformed request");
                let reply = ErrorReply::new(ErrorCode::BadRequest, format!("invalid request: {e}"));
                self.reply_error(request, &reply).await;
                None
            }
        }
    }

    async fn on_submit(&self, request: &Request) {
        let submission: Submission = match codec::decode(&request.message.payload) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, bytes = request.message.payload.len(), "unreadable submission");
                let reply =
                    ErrorReply::new(ErrorCode::BadRequest, format!("unreadable submission: {e}"));
                return self.reply_error(request, &reply).await;
            }
        };
        let run_id = submission.run.run_id.chars().take(100).collect::<String>();
        let mut evaluate = self.evaluator();
        let outcome = self
            .with_store(move |s| s.register(submission, &mut evaluate))
            .await;
        self.after_register(request, &run_id, outcome).await;
    }

    /// An operator's ONNX model: checked and loaded here ([`crate::import`]),
    /// its claimed metrics the registry's own, then registered like a
    /// submission.
    async fn on_import(&self, request: &Request) {
        let import: ImportRequest = match codec::decode(&request.message.payload) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, bytes = request.message.payload.len(), "unreadable import");
                let reply =
                    ErrorReply::new(ErrorCode::BadRequest, format!("unreadable import: {e}"));
                return self.reply_error(request, &reply).await;
            }
        };
        let (actor, file) = (import.actor.clone(), import.file_name.clone());
        let run_id = format!("import-{actor}-{}", import.read_ms);
        let (limits, features) = (self.onnx, self.features.clone());
        let (mut score, mut evaluate) = (self.holdout_scorer(), self.evaluator());
        let outcome = self
            .with_store(move |s| {
                let mut submission = crate::import::submission(import, &limits, &features)?;
                let scored = score(&submission.artifact)?;
                crate::import::add_holdout_figures(&mut submission, &scored)?;
                s.register(submission, &mut evaluate)
            })
            .await;
        if let Err(error) = &outcome {
            tracing::warn!(%actor, %file, %error, "onnx import refused");
        }
        self.after_register(request, &run_id, outcome).await;
    }

    async fn after_register(
        &self,
        request: &Request,
        run_id: &str,
        outcome: Result<crate::store::Registered, StoreError>,
    ) {
        match outcome {
            Ok(registered) => {
                let gate = &registered.gate;
                tracing::info!(
                    version = registered.version,
                    %run_id,
                    production = registered.production,
                    metric = %gate.metric,
                    value = gate.candidate,
                    production_value = ?gate.production,
                    tolerance = gate.tolerance,
                    reason = %gate.reason,
                    "model registered"
                );
                let reply = SubmitReply {
                    version: registered.version,
                    production: registered.production,
                    gate: Some(registered.gate.clone()),
                };
                self.reply_json(request, &reply).await;
                if registered.production {
                    self.publish_production().await;
                }
            }
            Err(e) => {
                tracing::error!(%run_id, error = %e, "submission not registered");
                self.reply_error(request, &store_error(&e)).await;
            }
        }
    }

    async fn on_run_failed(&self, request: &Request) {
        let Some(run) = self.parse::<FailedRun>(request, false).await else {
            return;
        };
        let (run_id, reason) = (run.run_id.clone(), run.reason.clone());
        match self.with_store(move |s| s.record_failure(&run)).await {
            Ok(()) => {
                tracing::info!(%run_id, %reason, "failed run recorded");
                self.reply_json(request, &RecordedReply { recorded: true })
                    .await;
            }
            Err(e) => {
                tracing::error!(error = %e, "failed run not recorded");
                self.reply_error(request, &store_error(&e)).await;
            }
        }
    }

    async fn on_promote(&self, request: &Request) {
        let Some(req) = self.parse::<PromoteRequest>(request, false).await else {
            return;
        };
        let outcome = self
            .with_store(move |s| s.promote(req.version, &req.reason, &req.actor))
            .await;
        self.after_move(request, outcome).await;
    }

    async fn on_rollback(&self, request: &Request) {
        let Some(req) = self.parse::<RollbackRequest>(request, false).await else {
            return;
        };
        let outcome = self
            .with_store(move |s| {
                let reason = req.reason.as_deref().unwrap_or("rollback");
                s.rollback(reason, &req.actor)
            })
            .await;
        self.after_move(request, outcome).await;
    }

    async fn after_move(&self, request: &Request, outcome: Result<MoveReply, StoreError>) {
        match outcome {
            Ok(reply) => {
                self.reply_json(request, &reply).await;
                if reply.moved {
                    self.publish_production().await;
                }
            }
            Err(e) => {
                tracing::warn!(subject = %request.message.subject, error = %e, "alias not moved");
                self.reply_error(request, &store_error(&e)).await;
            }
        }
    }

    /// Reads, sets or clears the routing table; a change is published to
    /// the predictors with the production model, like a promotion.
    async fn on_route(&self, request: &Request) {
        let payload = &request.message.payload;
        let payload: &[u8] = if payload.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            payload
        };
        let parsed = serde_json::from_slice::<RouteRequest>(payload)
            .map_err(|e| RouteError::new(RouteProblem::Malformed, format!("invalid request: {e}")))
            .and_then(|req| Ok((req.action()?, req)));
        let (action, req) = match parsed {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(problem = e.problem.as_str(), error = %e, "routing table refused");
                return self.reply_error(request, &ErrorReply::route(&e)).await;
            }
        };
        let outcome = self
            .with_store(move |s| {
                let actor = req.actor.as_deref().unwrap_or_default();
                s.route(action, req.reason.as_deref(), actor)
            })
            .await;
        match outcome {
            Ok(reply) => {
                self.reply_json(request, &reply).await;
                if reply.changed {
                    tracing::info!(table = ?reply.table, epoch = reply.epoch, "routing table changed");
                    self.publish_production().await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "routing table refused");
                self.reply_error(request, &store_error(&e)).await;
            }
        }
    }

    async fn on_history(&self, request: &Request) {
        let Some(req) = self.parse::<HistoryRequest>(request, true).await else {
            return;
        };
        match self.with_store(move |s| s.history_page(req.page())).await {
            Ok((mut moves, total)) => {
                fit(&mut moves, |moves| HistoryReply { moves, total });
                self.reply_json(request, &HistoryReply { moves, total })
                    .await
            }
            Err(e) => self.reply_error(request, &store_error(&e)).await,
        }
    }

    async fn on_models(&self, request: &Request) {
        let Some(page) = self.parse::<Page>(request, true).await else {
            return;
        };
        match self.with_store(move |s| s.models_page(page)).await {
            Ok(mut reply) => {
                let mut models = std::mem::take(&mut reply.models);
                fit(&mut models, |models| ml_shared::messages::ModelsReply {
                    models,
                    ..reply.clone()
                });
                reply.models = models;
                self.reply_json(request, &reply).await
            }
            Err(e) => self.reply_error(request, &store_error(&e)).await,
        }
    }

    async fn on_runs(&self, request: &Request) {
        let Some(page) = self.parse::<Page>(request, true).await else {
            return;
        };
        match self.with_store(move |s| s.runs_page(page)).await {
            Ok((mut runs, total)) => {
                fit(&mut runs, |runs| RunsReply { runs, total });
                self.reply_json(request, &RunsReply { runs, total }).await
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the experiments log");
                self.reply_error(request, &store_error(&e)).await;
            }
        }
    }

    /// Publishes the production model on `ml.model.production`.
    pub async fn publish_production(&self) {
        let Some(release) = self.with_store(|s| s.production_release()).await else {
            return;
        };
        let (version, epoch) = (release.version, release.epoch);
        let routed = release.routing.as_ref().map(|r| {
            let versions: Vec<String> = r.table.versions().map(|v| format!("v{v}")).collect();
            versions.join(",")
        });
        let payload = codec::encode(&release);
        match self
            .client
            .publish(self.subjects.model_production.clone(), payload.into())
            .await
        {
            Ok(()) => tracing::info!(
                version,
                epoch,
                routed = routed.as_deref().unwrap_or("-"),
                "production model published"
            ),
            Err(error) => tracing::warn!(%error, version, "cannot publish the production model"),
        }
    }

    async fn on_production(&self, request: &Request) {
        let payload = &request.message.payload;
        let query = if payload.is_empty() {
            ProductionQuery::default()
        } else {
            match serde_json::from_slice::<ProductionQuery>(payload) {
                Ok(q) => q,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable production query");
                    ProductionQuery::default()
                }
            }
        };
        self.check_follower(&query).await;
        let after_epoch = query.after_epoch;
        let own = query.registry_id.clone();
        let reply = self
            .with_store(move |s| match s.production_release() {
                None => ProductionReply::NoModel,
                Some(r)
                    if own.as_deref() == Some(r.registry_id.as_str()) && r.epoch <= after_epoch =>
                {
                    ProductionReply::Current
                }
                Some(r) if own.is_none() && r.epoch <= after_epoch => ProductionReply::Current,
                Some(r) => ProductionReply::Release(r),
            })
            .await;
        self.send(request, codec::encode(&reply).into()).await;
    }

    /// What a follower's question says of this registry's state: a model of
    /// another registry (this directory was reset or replaced) is logged
    /// once per foreign id; a later epoch of this registry (this directory
    /// is older than what was served) moves the epoch past it, recorded in
    /// the history, and publishes production again.
    async fn check_follower(&self, query: &ProductionQuery) {
        let Some(theirs) = query.registry_id.clone() else {
            return;
        };
        let (own, epoch) = self
            .with_store(|s| (s.id().to_owned(), s.production_epoch()))
            .await;
        if theirs != own {
            let first = self
                .foreign
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(theirs.clone());
            if first {
                tracing::error!(
                    registry_id = %own,
                    served_registry_id = %theirs,
                    served_version = ?query.version,
                    served_epoch = query.after_epoch,
                    "registry reset: a predictor serves a model of another registry identity; this registry's directory was reset or replaced, and its production model replaces the one served"
                );
            }
            return;
        }
        if query.after_epoch <= epoch {
            return;
        }
        let (seen, version) = (query.after_epoch, query.version);
        match self
            .with_store(move |s| s.fast_forward(seen, version))
            .await
        {
            Ok(true) => {
                tracing::error!(
                    served_epoch = seen,
                    registry_epoch = epoch,
                    "a predictor serves a later epoch of this registry than its directory holds (restored from an older copy?): production published again past it"
                );
                self.publish_production().await;
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "cannot move the epoch past what is served"),
        }
    }
}

/// Drops the oldest entries of a listing until its reply fits in
/// [`REPLY_LIMIT`] (the reply's `total` still counts them).
fn fit<T: Clone, R: Serialize>(items: &mut Vec<T>, reply: impl Fn(Vec<T>) -> R) {
    let size = |items: &[T]| serde_json::to_vec(&reply(items.to_vec())).map_or(0, |b| b.len());
    while items.len() > 1 && size(items) > REPLY_LIMIT {
        let drop = items.len().div_ceil(4);
        items.drain(..drop);
    }
}

/// The error reply for a store error: the caller's fault, the disk's, a
/// lost compare-and-set (`conflict`) or JetStream without a quorum (`no_quorum`).
fn store_error(e: &StoreError) -> ErrorReply {
    if let StoreError::Route(route) = e {
        return ErrorReply::route(route);
    }
    let code = if let StoreError::Js(js) = e {
        match js {
            JsError::Conflict(_) => ErrorCode::Conflict,
            JsError::NoQuorum(_) => ErrorCode::NoQuorum,
            JsError::Other(_) => ErrorCode::Unavailable,
        }
    } else if e.is_bad_request() {
        ErrorCode::BadRequest
    } else {
        ErrorCode::Unavailable
    };
    ErrorReply::new(code, e.to_string())
}
