//! The hot path: decode a request, look up or accept raw features, compute
//! the model's features with the shared plan, predict, encode the reply.
//!
//! The [`Deployment`] (the production model, and the routing table with
//! every model it names) and the feature store are each behind an
//! `ArcSwap`: a request takes a snapshot (an atomic load, no lock, no copy),
//! so a new deployment or a reloaded store replaces the old one between two
//! requests, never during one, and a request is answered by a version of the
//! deployment in force when it arrived.
//!
//! With a routing table, each request goes to a version by weight: at
//! random (a thread-local generator, no lock), or with a sticky table by the
//! stable hash of its `routing_key`, else its `user_id` (a batch: its first
//! id); see [`ml_shared::routing`]. Every reply carries a `request_id`.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use ml_shared::features::{FeaturePlan, FeatureRegistry, FeatureStore};
use ml_shared::messages::{AnswerRecord, ErrorCode, ErrorReply, ModelRelease, RoutingRelease};
use ml_shared::model::ModelArtifact;
use ml_shared::profile::FeatureSample;
use ml_shared::routing::{bucket_of, sticky_bucket, RouteTable, Variant, Weighted};
use serde::{Deserialize, Serialize, Serializer};

/// Most features a model may take (the per-request buffer lives on the stack).
pub const MAX_FEATURES: usize = 64;

/// Default largest batch (`{"user_ids": [...]}`) a request may hold.
pub const DEFAULT_MAX_BATCH: usize = 1000;

/// A request as decoded on the hot path: strings borrow from the payload
/// where JSON allows (no escapes), so decoding allocates little.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestRef<'a> {
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user_ids: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    features: Option<BTreeMap<Cow<'a, str>, f64>>,
    #[serde(borrow, default)]
    routing_key: Option<Cow<'a, str>>,
}

impl RequestRef<'_> {
    /// What a sticky table hashes: the `routing_key`, else the user id, else
    /// a batch's first id.
    fn key(&self) -> Option<&[u8]> {
        let first = || self.user_ids.as_ref().and_then(|ids| ids.first());
        self.routing_key
            .as_ref()
            .or(self.user_id.as_ref())
            .or_else(first)
            .map(|k| k.as_bytes())
    }
}

/// A reply's unique id: this predictor instance's prefix and a counter,
/// written straight into the reply (no string is built).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId {
    prefix: Arc<str>,
    n: u64,
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.prefix, self.n)
    }
}

impl Serialize for RequestId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Hands out [`RequestId`]s: an atomic counter, no lock.
#[derive(Debug)]
struct RequestIds {
    prefix: Arc<str>,
    next: AtomicU64,
}

impl RequestIds {
    fn new(instance: &str) -> Self {
        Self {
            prefix: instance.into(),
            next: AtomicU64::new(1),
        }
    }

    #[inline]
    fn next(&self) -> RequestId {
        RequestId {
            prefix: self.prefix.clone(),
            n: self.next.fetch_add(1, Ordering::Relaxed),
        }
    }
}

thread_local! {
    static RANDOM: Cell<u64> = Cell::new(seed());
}

/// A per-thread seed from the standard library's randomly keyed hasher.
fn seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64)
}

/// A fast per-thread pseudo-random number (wyrand): no lock, no syscall.
#[inline]
fn fast_random() -> u64 {
    RANDOM.with(|state| {
        let s = state.get().wrapping_add(0xa076_1d64_78bd_642f);
        state.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    })
}

/// A successful answer, serialised as the reply. Its JSON is that of
/// [`ml_shared::messages::PredictReply`] or [`ml_shared::messages::BatchPredictReply`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Answer<'a> {
    /// One prediction.
    One {
        /// The user, when the request named one.
        #[serde(skip_serializing_if = "Option::is_none")]
        user_id: Option<Cow<'a, str>>,
        /// The model's output (a classifier's: the probability of class 1).
        prediction: f64,
        /// A classifier's label; absent for a regression model.
        #[serde(skip_serializing_if = "Option::is_none")]
        label: Option<u8>,
        /// The model that answered.
        model_version: u64,
        /// Which side of the routing table answered (only with a table).
        #[serde(skip_serializing_if = "Option::is_none")]
        variant: Option<Variant>,
        /// This reply's unique id.
        request_id: RequestId,
        /// The shadow of the table that answered (never serialised).
        #[serde(skip)]
        shadow: Option<Weighted>,
    },
    /// A batch: one prediction per requested user, `null` for unknown ones.
    Many {
        /// In request order.
        predictions: Vec<Option<f64>>,
        /// A classifier's labels, one per prediction; absent for a regression model.
        #[serde(skip_serializing_if = "Option::is_none")]
        labels: Option<Vec<Option<u8>>>,
        /// The model that answered.
        model_version: u64,
        /// The requested ids that are not in the store.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        unknown_user_ids: Vec<Cow<'a, str>>,
        /// Which side of the routing table answered (only with a table).
        #[serde(skip_serializing_if = "Option::is_none")]
        variant: Option<Variant>,
        /// This reply's unique id.
        request_id: RequestId,
    },
}

impl Answer<'_> {
    /// The model version that answered.
    pub fn model_version(&self) -> u64 {
        match self {
            Answer::One { model_version, .. } | Answer::Many { model_version, .. } => {
                *model_version
            }
        }
    }

    /// Which side of the routing table answered, if a table was in force.
    pub fn variant(&self) -> Option<Variant> {
        match self {
            Answer::One { variant, .. } | Answer::Many { variant, .. } => *variant,
        }
    }

    /// The reply's id.
    pub fn request_id(&self) -> &RequestId {
        match self {
            Answer::One { request_id, .. } | Answer::Many { request_id, .. } => request_id,
        }
    }

    /// For a single prediction under a table with a shadow: that shadow
    /// (its version and percent).
    pub fn shadow(&self) -> Option<Weighted> {
        match self {
            Answer::One { shadow, .. } => *shadow,
            Answer::Many { .. } => None,
        }
    }

    /// For a single prediction, what the monitor joins with feedback
    /// (cheap to take: the id's string is built later, off the reply
    /// path); `None` for a batch.
    pub fn record(&self) -> Option<PendingRecord> {
        match self {
            Answer::One {
                prediction,
                label,
                request_id,
                ..
            } => Some(PendingRecord {
                request_id: request_id.clone(),
                prediction: *prediction,
                label: *label,
            }),
            Answer::Many { .. } => None,
        }
    }
}

/// A single prediction's answer, kept for its event until the reply is sent.
#[derive(Debug, Clone)]
pub struct PendingRecord {
    request_id: RequestId,
    prediction: f64,
    label: Option<u8>,
}

impl PendingRecord {
    /// The answer record of the event (the shadow's answer not yet known).
    pub fn into_record(self) -> AnswerRecord {
        AnswerRecord {
            request_id: self.request_id.to_string(),
            prediction: self.prediction,
            label: self.label,
            shadow: None,
        }
    }
}

/// A model ready to serve.
#[derive(Debug)]
pub struct LoadedModel {
    /// Registry version.
    pub version: u64,
    /// Production epoch it was published under.
    pub epoch: u64,
    /// The registry that published it.
    pub registry_id: String,
    /// The model.
    pub artifact: ModelArtifact,
    /// How to compute its inputs from raw features.
    pub plan: FeaturePlan,
    /// How to score them (native or ONNX).
    pub scorer: ml_onnx::Scorer,
}

/// What serves, swapped as one: the production model and, while a routing
/// table is in force, the table and every model it names.
#[derive(Debug)]
pub struct Deployment {
    /// The production model (its epoch and registry are the deployment's).
    pub production: LoadedModel,
    /// The routing table and its models.
    pub routing: Option<Routing>,
}

/// A routing table with its models loaded.
#[derive(Debug)]
pub struct Routing {
    /// The table.
    pub table: RouteTable,
    /// One model per candidate, in the table's order.
    pub candidates: Vec<LoadedModel>,
    /// The shadow's model, run after the reply on the table's share of
    /// requests (see [`crate::shadow`]).
    pub shadow: Option<LoadedModel>,
}

impl Deployment {
    /// The production version.
    pub fn version(&self) -> u64 {
        self.production.version
    }

    /// What the production follower needs to know of it.
    pub fn held(&self) -> ml_shared::production::Held {
        ml_shared::production::Held {
            registry_id: self.production.registry_id.clone(),
            epoch: self.production.epoch,
            version: self.production.version,
        }
    }

    /// Every version loaded (production first).
    pub fn versions(&self) -> Vec<u64> {
        let mut v = vec![self.production.version];
        if let Some(r) = &self.routing {
            v.extend(r.table.versions());
        }
        v
    }

    /// The model that answers a request with routing key `key`, and its
    /// variant (`None` without a table).
    #[inline]
    pub fn choose(&self, key: Option<&[u8]>) -> (&LoadedModel, Option<Variant>) {
        let Some(routing) = &self.routing else {
            return (&self.production, None);
        };
        let bucket = match key {
            Some(key) if routing.table.sticky => sticky_bucket(key),
            _ => bucket_of(fast_random()),
        };
        match routing.table.pick(bucket) {
            Some(i) => (&routing.candidates[i], Some(Variant::Candidate)),
            None => (&self.production, Some(Variant::Production)),
        }
    }
}

/// Why a published model is refused (the previous one keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The artifact is inconsistent.
    #[error(transparent)]
    Invalid(#[from] ml_shared::model::ModelError),
    /// It needs a feature the store cannot produce.
    #[error(transparent)]
    Feature(#[from] ml_shared::features::FeatureError),
    /// More features than [`MAX_FEATURES`].
    #[error("{0} features; at most {MAX_FEATURES} are supported")]
    TooWide(usize),
    /// The model cannot be scored (an ONNX graph the engine refuses).
    #[error(transparent)]
    Scorer(#[from] ml_onnx::ScorerError),
    /// The routing table names a version whose model was not sent.
    #[error("the routing table names v{0}, but its model is not in the release")]
    MissingModel(u64),
    /// A model of the routing table is refused.
    #[error("v{version} of the routing table: {source}")]
    InTable {
        /// The version.
        version: u64,
        /// Why.
        source: Box<LoadError>,
    },
}

/// Everything a request needs, shared by the request loop and the updaters.
#[derive(Debug)]
pub struct ServingState {
    registry: FeatureRegistry,
    max_batch: usize,
    onnx_max_bytes: usize,
    model: ArcSwapOption<Deployment>,
    store: ArcSwap<FeatureStore>,
    ids: RequestIds,
}

impl ServingState {
    /// A state with no model and the given store, accepting batches of up
    /// to [`DEFAULT_MAX_BATCH`] user ids.
    pub fn new(registry: FeatureRegistry, store: FeatureStore) -> Self {
        Self::with_max_batch(registry, store, DEFAULT_MAX_BATCH)
    }

    /// A state with no model, the given store and batch limit.
    pub fn with_max_batch(
        registry: FeatureRegistry,
        store: FeatureStore,
        max_batch: usize,
    ) -> Self {
        Self {
            registry,
            max_batch,
            onnx_max_bytes: ml_shared::model::DEFAULT_MAX_ONNX_BYTES,
            model: ArcSwapOption::empty(),
            store: ArcSwap::from_pointee(store),
            ids: RequestIds::new(&format!("{:08x}", fast_random() as u32)),
        }
    }

    /// Loads ONNX models of up to `max` bytes.
    pub fn with_onnx_max_bytes(mut self, max: usize) -> Self {
        self.onnx_max_bytes = max;
        self
    }

    /// Request ids are `<id>-<nonce>-<n>`: this predictor's id, a random
    /// nonce drawn at start (two instances with one id, or a restart, never
    /// share ids) and a counter.
    pub fn with_instance(mut self, id: &str) -> Self {
        self.ids = RequestIds::new(&format!("{id}-{:08x}", fast_random() as u32));
        self
    }

    /// The feature registry.
    pub fn registry(&self) -> &FeatureRegistry {
        &self.registry
    }

    /// The deployment being served, if any.
    pub fn model(&self) -> Option<Arc<Deployment>> {
        self.model.load_full()
    }

    /// Epoch of the deployment being served (0 when none).
    pub fn epoch(&self) -> u64 {
        self.model.load().as_ref().map_or(0, |m| m.production.epoch)
    }

    /// Checks a release and prepares it, with every model of its routing
    /// table, for serving: one model refused refuses the whole release.
    pub fn prepare(&self, release: ModelRelease) -> Result<Deployment, LoadError> {
        let ModelRelease {
            version,
            epoch,
            registry_id,
            artifact,
            routing,
        } = release;
        let load = |version: u64, artifact: ModelArtifact| {
            self.load_model(version, epoch, registry_id.clone(), artifact)
        };
        let routing = routing
            .map(|r| self.prepare_routing(*r, &load))
            .transpose()?;
        Ok(Deployment {
            production: load(version, artifact)?,
            routing,
        })
    }

    fn prepare_routing(
        &self,
        release: RoutingRelease,
        load: &dyn Fn(u64, ModelArtifact) -> Result<LoadedModel, LoadError>,
    ) -> Result<Routing, LoadError> {
        let RoutingRelease { table, mut models } = release;
        let mut take = |version: u64| {
            let i = models
                .iter()
                .position(|m| m.version == version)
                .ok_or(LoadError::MissingModel(version))?;
            load(version, models.swap_remove(i).artifact).map_err(|e| LoadError::InTable {
                version,
                source: Box::new(e),
            })
        };
        let candidates = table
            .candidates
            .iter()
            .map(|c| take(c.version))
            .collect::<Result<Vec<_>, _>>()?;
        let shadow = table.shadow.map(|s| take(s.version)).transpose()?;
        Ok(Routing {
            table,
            candidates,
            shadow,
        })
    }

    fn load_model(
        &self,
        version: u64,
        epoch: u64,
        registry_id: String,
        artifact: ModelArtifact,
    ) -> Result<LoadedModel, LoadError> {
        artifact.validate()?;
        if artifact.feature_names.len() > MAX_FEATURES {
            return Err(LoadError::TooWide(artifact.feature_names.len()));
        }
        let plan = self.registry.plan(&artifact.feature_names)?;
        let scorer = ml_onnx::Scorer::load(&artifact, self.onnx_max_bytes)?;
        Ok(LoadedModel {
            version,
            epoch,
            registry_id,
            artifact,
            plan,
            scorer,
        })
    }

    /// The prediction and label of shadow `version` for the raw features
    /// `raw`; `None` when that version is no longer the shadow, or its
    /// prediction is not finite.
    pub fn shadow_predict(&self, version: u64, raw: &[f64]) -> Option<(f64, Option<u8>)> {
        let deployment = self.model.load();
        let model = deployment.as_ref()?.routing.as_ref()?.shadow.as_ref()?;
        if model.version != version || raw.len() != self.registry.raw_names().len() {
            return None;
        }
        let mut x = [0.0; MAX_FEATURES];
        let x = &mut x[..model.plan.len()];
        model.plan.compute_into(raw, x);
        let p = model.scorer.predict_one(x).filter(|p| p.is_finite())?;
        Some((p, model.scorer.label(p)))
    }

    /// Serves `deployment` from the next request on. The caller serialises
    /// calls and checks epochs.
    pub fn install(&self, deployment: Deployment) {
        self.model.store(Some(Arc::new(deployment)));
    }

    /// Serves `store` from the next request on.
    pub fn replace_store(&self, store: FeatureStore) {
        self.store.store(Arc::new(store));
    }

    /// Number of entities in the store.
    pub fn store_len(&self) -> usize {
        self.store.load().len()
    }

    /// Answers one request payload. The reply borrows the payload (no copy
    /// of the user id); an error carries the version of the model that was
    /// in place, for the monitor.
    pub fn predict<'p>(&self, payload: &'p [u8]) -> Result<Answer<'p>, (ErrorReply, Option<u64>)> {
        self.predict_sampled(payload, None)
    }

    /// [`predict`](Self::predict), also writing the raw features used and
    /// the prediction into `sample` when one is given (for drift monitoring;
    /// nothing is allocated). For a batch, the sample is its last row scored.
    pub fn predict_sampled<'p>(
        &self,
        payload: &'p [u8],
        mut sample: Option<&mut FeatureSample>,
    ) -> Result<Answer<'p>, (ErrorReply, Option<u64>)> {
        let deployment = self.model.load();
        let version = deployment.as_ref().map(|m| m.version());
        let fail = |code, message: String| Err((ErrorReply::new(code, message), version));

        if payload.iter().all(u8::is_ascii_whitespace) {
            return fail(
                ErrorCode::BadRequest,
                r#"empty request: send {"user_id": "..."}, {"user_ids": [...]} or {"features": {...}}"#.into(),
            );
        }
        let request: RequestRef<'p> = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => return fail(ErrorCode::BadRequest, format!("invalid request: {e}")),
        };
        let Some(deployment) = deployment.as_ref() else {
            return fail(
                ErrorCode::NoModel,
                "no model has been published yet; retry shortly".into(),
            );
        };
        let (model, variant) = deployment.choose(request.key());
        let shadow = deployment.routing.as_ref().and_then(|r| r.table.shadow);
        let version = Some(model.version);
        let fail = |code, message: String| Err((ErrorReply::new(code, message), version));
        let mut x = [0.0; MAX_FEATURES];
        let x = &mut x[..model.plan.len()];
        let mut score = |raw: &[f64]| {
            model.plan.compute_into(raw, x);
            let p = model.scorer.predict_one(x)?;
            if let Some(sample) = sample.as_deref_mut() {
                sample.set(raw, p);
            }
            Some(p)
        };
        let non_finite = "the features give a non-finite prediction";
        match request {
            RequestRef {
                user_id: Some(user_id),
                user_ids: None,
                features: None,
                ..
            } => {
                let store = self.store.load();
                let Some(raw) = store.raw(&user_id) else {
                    return fail(
                        ErrorCode::UnknownUser,
                        format!("user_id {user_id:?} is not in the feature store"),
                    );
                };
                let Some(prediction) = score(raw) else {
                    return fail(ErrorCode::Internal, non_finite.into());
                };
                Ok(Answer::One {
                    user_id: Some(user_id),
                    prediction,
                    label: model.scorer.label(prediction),
                    model_version: model.version,
                    variant,
                    request_id: self.ids.next(),
                    shadow,
                })
            }
            RequestRef {
                user_id: None,
                user_ids: Some(user_ids),
                features: None,
                ..
            } => {
                if user_ids.is_empty() || user_ids.len() > self.max_batch {
                    return fail(
                        ErrorCode::BadRequest,
                        format!(
                            "a batch holds 1 to {} user_ids, not {}",
                            self.max_batch,
                            user_ids.len()
                        ),
                    );
                }
                let store = self.store.load();
                let (predictions, unknown_user_ids) =
                    match crate::scoring::score_batch(model, &store, user_ids, sample) {
                        Ok(scored) => scored,
                        Err(message) => return fail(ErrorCode::Internal, message),
                    };
                let labels = model.artifact.kind.is_classifier().then(|| {
                    predictions
                        .iter()
                        .map(|p| p.and_then(|p| model.scorer.label(p)))
                        .collect()
                });
                Ok(Answer::Many {
                    predictions,
                    labels,
                    model_version: model.version,
                    unknown_user_ids,
                    variant,
                    request_id: self.ids.next(),
                })
            }
            RequestRef {
                user_id: None,
                user_ids: None,
                features: Some(features),
                ..
            } => {
                let mut raw = [0.0; MAX_FEATURES];
                let raw = &mut raw[..self.registry.raw_names().len()];
                if let Err(message) = self.raw_from_map(&features, raw) {
                    return fail(ErrorCode::BadRequest, message);
                }
                let Some(prediction) = score(raw) else {
                    return fail(ErrorCode::BadRequest, non_finite.into());
                };
                Ok(Answer::One {
                    user_id: None,
                    prediction,
                    label: model.scorer.label(prediction),
                    model_version: model.version,
                    variant,
                    request_id: self.ids.next(),
                    shadow,
                })
            }
            _ => fail(
                ErrorCode::BadRequest,
                "give exactly one of \"user_id\", \"user_ids\" and \"features\"".into(),
            ),
        }
    }

    fn raw_from_map(
        &self,
        features: &BTreeMap<Cow<'_, str>, f64>,
        out: &mut [f64],
    ) -> Result<(), String> {
        for name in features.keys() {
            let name: &str = name;
            if self.registry.raw_index(name).is_none() {
                return Err(if self.registry.names().any(|n| n == name) {
                    format!("{name:?} is derived by the feature store; send raw features only")
                } else {
                    format!(
                        "unknown feature {name:?}; expected {}",
                        self.registry.raw_names().join(", ")
                    )
                });
            }
        }
        for (slot, name) in out.iter_mut().zip(self.registry.raw_names()) {
            match features.get(name.as_str()) {
                Some(v) if v.is_finite() => *slot = *v,
                Some(_) => return Err(format!("{name:?} is not a finite number")),
                None => return Err(format!("missing feature {name:?}")),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ml_shared::data::parse_csv;
    use ml_shared::model::ModelKind;

    fn state() -> ServingState {
        let registry = FeatureRegistry::default();
        let data = parse_csv(
            std::path::Path::new("t.csv"),
            b"user_id,feature_1,feature_2\nu1,2,3\n",
            registry.raw_names(),
        )
        .unwrap();
        ServingState::new(registry, FeatureStore::from_dataset(&data))
    }

    fn release(version: u64) -> ModelRelease {
        ModelRelease {
            version,
            epoch: version,
            registry_id: "test".into(),
            artifact: ModelArtifact {
                kind: ModelKind::Linear,
                feature_names: vec!["feature_1".into(), "feature_2".into(), "feature_3".into()],
                coefficients: vec![1.0, 10.0, 100.0],
                intercept: 0.5,
                scaler: None,
                profile: None,
                onnx: None,
            },
            routing: None,
        }
    }

    fn code(r: Result<Answer<'_>, (ErrorReply, Option<u64>)>) -> ErrorCode {
        r.unwrap_err().0.error.code
    }

    #[test]
    fn predicts_for_known_users_and_raw_features() {
        let s = state().with_instance("p1");
        assert_eq!(code(s.predict(br#"{"user_id":"u1"}"#)), ErrorCode::NoModel);
        s.install(s.prepare(release(7)).unwrap());
        let r = s.predict(br#"{"user_id":"u1"}"#).unwrap();
        let Answer::One {
            user_id,
            prediction,
            label,
            model_version,
            variant,
            request_id,
            ..
        } = &r
        else {
            panic!("one answer")
        };
        assert_eq!(
            (
                user_id.as_deref(),
                *prediction,
                *label,
                *model_version,
                *variant
            ),
            (Some("u1"), 0.5 + 2.0 + 30.0 + 400.0, None, 7, None)
        );
        let prefix = request_id.to_string();
        let prefix = prefix.strip_suffix("-1").expect("the first id ends in -1");
        assert!(prefix.starts_with("p1-") && prefix.len() == 11, "{prefix}");
        let r = s
            .predict(br#"{"features":{"feature_1":2,"feature_2":3}}"#)
            .unwrap();
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            format!(r#"{{"prediction":432.5,"model_version":7,"request_id":"{prefix}-2"}}"#)
        );
        let r = s.predict(br#"{"user_ids":["u1","nobody","u1"]}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            format!(
                r#"{{"predictions":[432.5,null,432.5],"model_version":7,"unknown_user_ids":["nobody"],"request_id":"{prefix}-3"}}"#
            )
        );
    }

    /// Production v1 with candidate v2 at `percent`.
    fn routed(percent: u32, sticky: bool) -> ModelRelease {
        let mut r = release(1);
        let mut candidate = release(2).artifact;
        candidate.intercept = 1000.0;
        r.routing = Some(Box::new(RoutingRelease {
            table: RouteTable {
                candidates: vec![ml_shared::routing::Weighted {
                    version: 2,
                    percent,
                }],
                shadow: None,
                sticky,
            },
            models: vec![ml_shared::messages::VersionedArtifact {
                version: 2,
                artifact: candidate,
            }],
        }));
        r
    }

    fn answered(s: &ServingState, body: &str) -> (u64, Option<Variant>, f64) {
        match s.predict(body.as_bytes()).unwrap() {
            Answer::One {
                model_version,
                variant,
                prediction,
                ..
            } => (model_version, variant, prediction),
            Answer::Many {
                model_version,
                variant,
                predictions,
                ..
            } => (model_version, variant, predictions[0].unwrap_or_default()),
        }
    }

    #[test]
    fn a_table_splits_requests_by_weight_and_says_which_side_answered() {
        let s = state();
        s.install(s.prepare(routed(10, false)).unwrap());
        let n = 20_000;
        let mut canary = 0;
        for _ in 0..n {
            let (version, variant, prediction) = answered(&s, r#"{"user_id":"u1"}"#);
            match version {
                2 => {
                    canary += 1;
                    assert_eq!((variant, prediction), (Some(Variant::Candidate), 1432.0));
                }
                _ => assert_eq!(
                    (version, variant, prediction),
                    (1, Some(Variant::Production), 432.5)
                ),
            }
        }
        // 2,000 expected; the binomial's sd is 42.
        assert!(
            (1_800..2_200).contains(&canary),
            "{canary} of {n} to the canary"
        );
        let json = serde_json::to_string(&s.predict(br#"{"user_id":"u1"}"#).unwrap()).unwrap();
        assert!(json.contains(r#""variant":"#), "{json}");
    }

    #[test]
    fn a_sticky_table_sends_one_key_to_one_version() {
        let s = state();
        s.install(s.prepare(routed(50, true)).unwrap());
        let mut seen = std::collections::BTreeMap::new();
        for i in 0..200 {
            let body =
                format!(r#"{{"features":{{"feature_1":2,"feature_2":3}},"routing_key":"k{i}"}}"#);
            let first = answered(&s, &body).0;
            for _ in 0..20 {
                assert_eq!(answered(&s, &body).0, first, "key k{i} moved");
            }
            *seen.entry(first).or_insert(0) += 1;
            let want = if s
                .model()
                .unwrap()
                .routing
                .as_ref()
                .unwrap()
                .table
                .pick(sticky_bucket(format!("k{i}").as_bytes()))
                == Some(0)
            {
                2
            } else {
                1
            };
            assert_eq!(first, want);
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        // The user id is the key when there is no routing_key; a batch's is its first id.
        let single = answered(&s, r#"{"user_id":"u1"}"#).0;
        let batch = answered(&s, r#"{"user_ids":["u1","nobody"]}"#).0;
        let keyed = answered(&s, r#"{"user_ids":["nobody"],"routing_key":"u1"}"#).0;
        assert_eq!((single, batch), (keyed, keyed));
    }

    #[test]
    fn a_release_whose_table_cannot_load_is_refused_whole() {
        let s = state();
        s.install(s.prepare(release(1)).unwrap());
        let mut missing = routed(10, false);
        missing.routing.as_mut().unwrap().models.clear();
        assert!(matches!(
            s.prepare(missing),
            Err(LoadError::MissingModel(2))
        ));
        let mut bad = routed(10, false);
        bad.routing.as_mut().unwrap().models[0]
            .artifact
            .feature_names[2] = "feature_9".into();
        assert!(matches!(
            s.prepare(bad),
            Err(LoadError::InTable { version: 2, .. })
        ));
        assert_eq!(s.model().unwrap().versions(), [1]);
    }

    #[test]
    fn a_sample_holds_the_raw_features_and_the_prediction() {
        let s = state();
        s.install(s.prepare(release(7)).unwrap());
        let mut sample = FeatureSample::default();
        let Answer::One { prediction, .. } = s
            .predict_sampled(br#"{"user_id":"u1"}"#, Some(&mut sample))
            .unwrap()
        else {
            panic!("one answer")
        };
        assert_eq!(sample.values(), [2.0, 3.0]);
        assert_eq!(sample.prediction, prediction);
        let mut sample = FeatureSample::default();
        assert!(s
            .predict_sampled(br#"{"user_id":"nobody"}"#, Some(&mut sample))
            .is_err());
        assert!(sample.is_empty());
    }

    #[test]
    fn a_classifier_gives_the_probability_and_the_label() {
        let s = state();
        let mut r = release(2);
        r.artifact.kind = ModelKind::Logistic;
        r.artifact.coefficients = vec![1.0, -1.0, 0.0];
        r.artifact.intercept = 0.0;
        r.artifact.scaler = Some(ml_shared::model::Scaler {
            mean: vec![0.0, 0.0, 0.0],
            scale: vec![2.0, 1.0, 1.0],
        });
        s.install(s.prepare(r).unwrap());
        // u1: feature_1 = 2, feature_2 = 3: σ(2/2 − 3) = σ(−2).
        let Answer::One {
            prediction, label, ..
        } = s.predict(br#"{"user_id":"u1"}"#).unwrap()
        else {
            panic!("one answer")
        };
        assert!((prediction - 1.0 / (1.0 + 2f64.exp())).abs() < 1e-15);
        assert_eq!(label, Some(0));
        let r = s
            .predict(br#"{"features":{"feature_1":9,"feature_2":0}}"#)
            .unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""label":1,"model_version":2"#), "{json}");
        let r = s.predict(br#"{"user_ids":["u1","nobody"]}"#).unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""labels":[0,null]"#), "{json}");
    }

    #[test]
    fn bad_requests_get_codes() {
        let s = state();
        s.install(s.prepare(release(1)).unwrap());
        for bad in [
            &b""[..],
            b"  ",
            b"{",
            b"\xff\xfe",
            b"[]",
            br#"{"user_id":5}"#,
            br#"{"user_id":"u1","extra":1}"#,
            br#"{"user_id":"u1","features":{}}"#,
            br#"{"user_id":"u1","user_ids":["u1"]}"#,
            br#"{"user_ids":[]}"#,
            br#"{"user_ids":"u1"}"#,
            br#"{}"#,
            br#"{"features":{"feature_1":1}}"#,
            br#"{"features":{"feature_1":1,"feature_2":"NaN"}}"#,
            br#"{"features":{"feature_1":1,"feature_2":1e999}}"#,
            br#"{"features":{"feature_1":1,"feature_2":2,"feature_3":1}}"#,
            br#"{"features":{"feature_1":1,"feature_2":2,"zzz":1}}"#,
        ] {
            assert_eq!(
                code(s.predict(bad)),
                ErrorCode::BadRequest,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            code(s.predict(br#"{"user_id":"nobody"}"#)),
            ErrorCode::UnknownUser
        );
    }

    #[test]
    fn models_with_unknown_features_are_refused() {
        let s = state();
        let mut r = release(1);
        r.artifact.feature_names[2] = "feature_9".into();
        assert!(matches!(s.prepare(r), Err(LoadError::Feature(_))));
    }
}

/// Property tests of the request decoder (a bounded fuzz run in every
/// `cargo test`): whatever the payload, the answer is a prediction or a
/// structured error, never a panic.
#[cfg(test)]
mod fuzz {
    use super::*;
    use ml_shared::data::parse_csv;
    use ml_shared::model::ModelKind;
    use proptest::prelude::*;

    fn state() -> ServingState {
        let registry = FeatureRegistry::default();
        let data = parse_csv(
            std::path::Path::new("t.csv"),
            b"user_id,feature_1,feature_2\nu1,2,3\n",
            registry.raw_names(),
        )
        .unwrap();
        let s = ServingState::new(registry, FeatureStore::from_dataset(&data));
        let release = ModelRelease {
            version: 1,
            epoch: 1,
            registry_id: "test".into(),
            artifact: ModelArtifact {
                kind: ModelKind::Linear,
                feature_names: vec!["feature_1".into(), "feature_2".into(), "feature_3".into()],
                coefficients: vec![1.0, 10.0, 100.0],
                intercept: 0.5,
                scaler: None,
                profile: None,
                onnx: None,
            },
            routing: None,
        };
        s.install(s.prepare(release).unwrap());
        s
    }

    /// Whether every prediction of an answer is a finite number.
    fn finite(answer: &Answer<'_>) -> bool {
        match answer {
            Answer::One { prediction, .. } => prediction.is_finite(),
            Answer::Many { predictions, .. } => predictions.iter().flatten().all(|p| p.is_finite()),
        }
    }

    fn check(s: &ServingState, payload: &[u8]) -> Result<(), TestCaseError> {
        match s.predict(payload) {
            Ok(reply) => prop_assert!(finite(&reply)),
            Err((error, version)) => {
                prop_assert_eq!(version, Some(1));
                prop_assert!(matches!(
                    error.error.code,
                    ErrorCode::BadRequest | ErrorCode::UnknownUser
                ));
                prop_assert!(!error.error.message.is_empty());
                let json: serde_json::Value = serde_json::to_value(&error).unwrap();
                prop_assert!(json["error"]["code"].is_string());
            }
        }
        Ok(())
    }

    /// A number as a JSON client might write it, NaN and infinities included.
    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<f64>().prop_map(|v| format!("{v:?}")),
            Just("NaN".to_owned()),
            Just("\"NaN\"".to_owned()),
            Just("1e999".to_owned()),
            Just("-1e999".to_owned()),
            Just("\"inf\"".to_owned()),
            "-?[0-9]{1,30}(\\.[0-9]{0,30})?([eE][+-]?[0-9]{1,4})?",
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_get_a_reply_or_an_error(
            payload in proptest::collection::vec(any::<u8>(), 0..256)
        ) {
            check(&state(), &payload)?;
        }

        #[test]
        fn json_like_text_gets_a_reply_or_an_error(
            payload in "[{}\\[\\]\":,0-9a-z_.eE+ -]{0,96}"
        ) {
            check(&state(), payload.as_bytes())?;
        }

        #[test]
        fn feature_maps_get_a_reply_or_an_error(
            features in proptest::collection::vec(
                (prop_oneof![
                    Just("feature_1".to_owned()),
                    Just("feature_2".to_owned()),
                    Just("feature_3".to_owned()),
                    "[a-z_0-9]{0,10}",
                ], number()),
                0..5,
            ),
            user in proptest::option::of("[a-z0-9\\\\\"]{0,8}"),
        ) {
            let fields: Vec<String> = features
                .iter()
                .map(|(k, v)| format!("{k:?}:{v}"))
                .collect();
            let mut body = format!("{{\"features\":{{{}}}", fields.join(","));
            if let Some(user) = user {
                body.push_str(&format!(",\"user_id\":\"{user}\""));
            }
            body.push('}');
            let s = state();
            check(&s, body.as_bytes())?;
            // Three finite raw features: exactly then is it a prediction.
            if let Ok(reply) = s.predict(body.as_bytes()) {
                prop_assert!(finite(&reply));
            }
        }
    }
}
