//! The hot path: decode a request, look up or accept raw features, compute
//! the model's features with the shared plan, predict, encode the reply.
//!
//! The model and the feature store are each behind an `ArcSwap`: a request
//! takes a snapshot (an atomic load, no lock, no copy), so a new model or a
//! reloaded store replaces the old one between two requests, never during one.

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use ml_shared::features::{FeaturePlan, FeatureRegistry, FeatureStore};
use ml_shared::messages::{ErrorCode, ErrorReply, ModelRelease, PredictReply, PredictRequest};
use ml_shared::model::ModelArtifact;

/// Most features a model may take (the per-request buffer lives on the stack).
pub const MAX_FEATURES: usize = 64;

/// A model ready to serve.
#[derive(Debug)]
pub struct LoadedModel {
    /// Registry version.
    pub version: u64,
    /// Production epoch it was published under.
    pub epoch: u64,
    /// The model.
    pub artifact: ModelArtifact,
    /// How to compute its inputs from raw features.
    pub plan: FeaturePlan,
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
}

/// Everything a request needs, shared by the request loop and the updaters.
#[derive(Debug)]
pub struct ServingState {
    registry: FeatureRegistry,
    model: ArcSwapOption<LoadedModel>,
    store: ArcSwap<FeatureStore>,
}

impl ServingState {
    /// A state with no model and the given store.
    pub fn new(registry: FeatureRegistry, store: FeatureStore) -> Self {
        Self {
            registry,
            model: ArcSwapOption::empty(),
            store: ArcSwap::from_pointee(store),
        }
    }

    /// The feature registry.
    pub fn registry(&self) -> &FeatureRegistry {
        &self.registry
    }

    /// The model being served, if any.
    pub fn model(&self) -> Option<Arc<LoadedModel>> {
        self.model.load_full()
    }

    /// Epoch of the model being served (0 when none).
    pub fn epoch(&self) -> u64 {
        self.model.load().as_ref().map_or(0, |m| m.epoch)
    }

    /// Checks a release and prepares it for serving.
    pub fn prepare(&self, release: ModelRelease) -> Result<LoadedModel, LoadError> {
        release.artifact.validate()?;
        if release.artifact.feature_names.len() > MAX_FEATURES {
            return Err(LoadError::TooWide(release.artifact.feature_names.len()));
        }
        let plan = self.registry.plan(&release.artifact.feature_names)?;
        Ok(LoadedModel {
            version: release.version,
            epoch: release.epoch,
            artifact: release.artifact,
            plan,
        })
    }

    /// Serves `model` from the next request on. The caller serialises calls
    /// and checks epochs.
    pub fn install(&self, model: LoadedModel) {
        self.model.store(Some(Arc::new(model)));
    }

    /// Serves `store` from the next request on.
    pub fn replace_store(&self, store: FeatureStore) {
        self.store.store(Arc::new(store));
    }

    /// Number of entities in the store.
    pub fn store_len(&self) -> usize {
        self.store.load().len()
    }

    /// Answers one request payload. The error carries the version of the
    /// model that was in place, for the monitor.
    pub fn predict(&self, payload: &[u8]) -> Result<PredictReply, (ErrorReply, Option<u64>)> {
        let model = self.model.load();
        let version = model.as_ref().map(|m| m.version);
        let fail = |code, message: String| Err((ErrorReply::new(code, message), version));

        if payload.iter().all(u8::is_ascii_whitespace) {
            return fail(
                ErrorCode::BadRequest,
                r#"empty request: send {"user_id": "..."} or {"features": {...}}"#.into(),
            );
        }
        let request: PredictRequest = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => return fail(ErrorCode::BadRequest, format!("invalid request: {e}")),
        };
        let Some(model) = model.as_ref() else {
            return fail(
                ErrorCode::NoModel,
                "no model has been published yet; retry shortly".into(),
            );
        };
        let mut raw = [0.0; MAX_FEATURES];
        let raw_len = self.registry.raw_names().len();
        let store;
        let raw: &[f64] = match (&request.user_id, &request.features) {
            (Some(user_id), None) => {
                store = self.store.load();
                match store.raw(user_id) {
                    Some(row) => row,
                    None => {
                        return fail(
                            ErrorCode::UnknownUser,
                            format!("user_id {user_id:?} is not in the feature store"),
                        )
                    }
                }
            }
            (None, Some(features)) => {
                if let Err(message) = self.raw_from_map(features, &mut raw[..raw_len]) {
                    return fail(ErrorCode::BadRequest, message);
                }
                &raw[..raw_len]
            }
            _ => {
                return fail(
                    ErrorCode::BadRequest,
                    "give exactly one of \"user_id\" and \"features\"".into(),
                )
            }
        };
        let mut x = [0.0; MAX_FEATURES];
        let x = &mut x[..model.plan.len()];
        model.plan.compute_into(raw, x);
        let prediction = model.artifact.predict(x);
        if !prediction.is_finite() {
            return fail(
                ErrorCode::BadRequest,
                "the features give a non-finite prediction".into(),
            );
        }
        Ok(PredictReply {
            user_id: request.user_id,
            prediction,
            model_version: model.version,
        })
    }

    fn raw_from_map(
        &self,
        features: &std::collections::BTreeMap<String, f64>,
        out: &mut [f64],
    ) -> Result<(), String> {
        for name in features.keys() {
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
            match features.get(name) {
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
            artifact: ModelArtifact {
                kind: ModelKind::Linear,
                feature_names: vec!["feature_1".into(), "feature_2".into(), "feature_3".into()],
                coefficients: vec![1.0, 10.0, 100.0],
                intercept: 0.5,
            },
        }
    }

    fn code(r: Result<PredictReply, (ErrorReply, Option<u64>)>) -> ErrorCode {
        r.unwrap_err().0.error.code
    }

    #[test]
    fn predicts_for_known_users_and_raw_features() {
        let s = state();
        assert_eq!(code(s.predict(br#"{"user_id":"u1"}"#)), ErrorCode::NoModel);
        s.install(s.prepare(release(7)).unwrap());
        let r = s.predict(br#"{"user_id":"u1"}"#).unwrap();
        assert_eq!(r.prediction, 0.5 + 2.0 + 30.0 + 400.0);
        assert_eq!((r.model_version, r.user_id.as_deref()), (7, Some("u1")));
        let r = s
            .predict(br#"{"features":{"feature_1":2,"feature_2":3}}"#)
            .unwrap();
        assert_eq!(r.prediction, 432.5);
        assert_eq!(r.user_id, None);
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
            artifact: ModelArtifact {
                kind: ModelKind::Linear,
                feature_names: vec!["feature_1".into(), "feature_2".into(), "feature_3".into()],
                coefficients: vec![1.0, 10.0, 100.0],
                intercept: 0.5,
            },
        };
        s.install(s.prepare(release).unwrap());
        s
    }

    fn check(s: &ServingState, payload: &[u8]) -> Result<(), TestCaseError> {
        match s.predict(payload) {
            Ok(reply) => prop_assert!(reply.prediction.is_finite()),
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
                prop_assert!(reply.prediction.is_finite());
            }
        }
    }
}
