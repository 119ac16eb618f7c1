//! The model artifact: everything a predictor needs to serve a model.
//!
//! A model is `score = intercept + Σ coefficient·z`, where `z` is each input
//! feature standardised by the artifact's [`Scaler`] (or the raw feature when
//! it has none). A linear model predicts the score; a logistic model predicts
//! `σ(score)`, the probability of class 1, and the label `1` when that
//! probability is at least [`DECISION_THRESHOLD`]. Both are computed without
//! allocating.

use serde::{Deserialize, Serialize};

use crate::profile::ReferenceProfile;

/// The family of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Ordinary least squares: `intercept + Σ coefficient·feature`.
    Linear,
    /// Binary logistic regression: `σ(intercept + Σ coefficient·feature)`,
    /// the probability of class 1. New variants go last: the codec encodes
    /// the variant's position.
    Logistic,
    /// An imported ONNX regressor ([`ModelArtifact::onnx`]): one value per row.
    OnnxRegressor,
    /// An imported ONNX binary classifier ([`ModelArtifact::onnx`]): the
    /// probability of class 1.
    OnnxClassifier,
}

impl ModelKind {
    /// The name used in logs, the experiments log and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Linear => "linear",
            ModelKind::Logistic => "logistic",
            ModelKind::OnnxRegressor => "onnx_regressor",
            ModelKind::OnnxClassifier => "onnx_classifier",
        }
    }

    /// Whether the model is an imported ONNX graph (scored by an engine,
    /// not by [`ModelArtifact::predict`]).
    pub fn is_onnx(self) -> bool {
        matches!(self, ModelKind::OnnxRegressor | ModelKind::OnnxClassifier)
    }

    /// Whether the model is a classifier (its prediction is a probability).
    pub fn is_classifier(self) -> bool {
        matches!(self, ModelKind::Logistic | ModelKind::OnnxClassifier)
    }
}

/// Probability from which a classifier predicts the label `1`.
pub const DECISION_THRESHOLD: f64 = 0.5;

/// Standardisation fitted on the training split: `z = (x − mean) / scale`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scaler {
    /// Mean of each feature, in model order.
    pub mean: Vec<f64>,
    /// Standard deviation of each feature (population, as scikit-learn's
    /// `StandardScaler`); `1` for a constant feature.
    pub scale: Vec<f64>,
}

impl Scaler {
    /// Fits the scaler on `rows` (each of `width` values).
    pub fn fit<'a>(width: usize, rows: impl IntoIterator<Item = &'a [f64]>) -> Self {
        let mut n = 0usize;
        let mut mean = vec![0.0; width];
        let mut m2 = vec![0.0; width];
        // Welford's update: one pass, numerically stable.
        for row in rows {
            n += 1;
            for ((x, m), s) in row.iter().zip(&mut mean).zip(&mut m2) {
                let delta = x - *m;
                *m += delta / n as f64;
                *s += delta * (x - *m);
            }
        }
        let scale = m2
            .into_iter()
            .map(|s| {
                let sd = if n > 0 { (s / n as f64).sqrt() } else { 0.0 };
                if sd > f64::EPSILON {
                    sd
                } else {
                    1.0
                }
            })
            .collect();
        Self { mean, scale }
    }

    /// Standardises `x` in place.
    pub fn transform(&self, x: &mut [f64]) {
        for ((v, m), s) in x.iter_mut().zip(&self.mean).zip(&self.scale) {
            *v = (*v - m) / s;
        }
    }
}

/// Why an artifact is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// The artifact names no feature.
    #[error("the model has no features")]
    NoFeatures,
    /// Coefficient and feature counts differ.
    #[error("{coefficients} coefficients for {features} features")]
    ShapeMismatch {
        /// Number of coefficients.
        coefficients: usize,
        /// Number of feature names.
        features: usize,
    },
    /// A parameter is NaN or infinite.
    #[error("parameter {0} is not finite")]
    NotFinite(String),
    /// The same feature is named twice.
    #[error("feature {0:?} appears twice")]
    DuplicateFeature(String),
    /// The scaler does not match the features, or a scale is not positive.
    #[error("invalid scaler: {0}")]
    BadScaler(String),
    /// The ONNX graph is missing, misplaced, too large or not what its digest says.
    #[error("invalid ONNX model: {0}")]
    BadOnnx(String),
}

/// The largest ONNX graph an artifact may carry by default: artifacts travel
/// in one NATS message (the server's `max_payload`, 1 MB), with room for the
/// rest of the release.
pub const DEFAULT_MAX_ONNX_BYTES: usize = 768 * 1024;

/// An imported ONNX graph, as carried by an artifact: the file's bytes and
/// their SHA-256 (lowercase hex), checked by [`ModelArtifact::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnnxGraph {
    /// The ONNX file, byte for byte.
    #[serde(with = "bytes")]
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes`, lowercase hex.
    pub sha256: String,
}

impl OnnxGraph {
    /// The graph of `bytes`, with their digest.
    pub fn new(bytes: Vec<u8>) -> Self {
        let sha256 = sha256_hex(&bytes);
        Self { bytes, sha256 }
    }
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Bytes as one length-prefixed block (serde's default for `Vec<u8>` is a
/// sequence of numbers: up to 3 bytes each in bincode's varint encoding).
mod bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        deserializer.deserialize_byte_buf(Visitor)
    }
}

/// A trained model with the ordered names of the features it expects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelArtifact {
    /// Model family.
    pub kind: ModelKind,
    /// Input features, in the order of `coefficients`.
    pub feature_names: Vec<String>,
    /// One weight per feature.
    pub coefficients: Vec<f64>,
    /// The constant term.
    pub intercept: f64,
    /// Standardisation applied to the features before the coefficients, if
    /// any (the coefficients are then in standardised units).
    pub scaler: Option<Scaler>,
    /// The training data's reference profile, for drift monitoring (absent
    /// from models trained without one). Boxed: it is large, and the
    /// artifact travels inside enums.
    #[serde(default)]
    pub profile: Option<Box<ReferenceProfile>>,
    /// The graph of an imported ONNX model ([`ModelKind::OnnxRegressor`],
    /// [`ModelKind::OnnxClassifier`]), whose `coefficients` are empty and
    /// `intercept` 0; `None` for a native model. Boxed, like the profile.
    #[serde(default)]
    pub onnx: Option<Box<OnnxGraph>>,
}

impl ModelArtifact {
    /// Checks the artifact's internal consistency.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.feature_names.is_empty() {
            return Err(ModelError::NoFeatures);
        }
        for (i, name) in self.feature_names.iter().enumerate() {
            if self.feature_names[..i].contains(name) {
                return Err(ModelError::DuplicateFeature(name.clone()));
            }
        }
        if self.kind.is_onnx() || self.onnx.is_some() {
            return self.validate_onnx();
        }
        if self.coefficients.len() != self.feature_names.len() {
            return Err(ModelError::ShapeMismatch {
                coefficients: self.coefficients.len(),
                features: self.feature_names.len(),
            });
        }
        if !self.intercept.is_finite() {
            return Err(ModelError::NotFinite("intercept".into()));
        }
        if let Some(i) = self.coefficients.iter().position(|c| !c.is_finite()) {
            return Err(ModelError::NotFinite(format!(
                "coefficient of {}",
                self.feature_names[i]
            )));
        }
        if let Some(scaler) = &self.scaler {
            let n = self.feature_names.len();
            if scaler.mean.len() != n || scaler.scale.len() != n {
                return Err(ModelError::BadScaler(format!(
                    "{} means and {} scales for {n} features",
                    scaler.mean.len(),
                    scaler.scale.len()
                )));
            }
            if let Some(i) = scaler.mean.iter().position(|m| !m.is_finite()) {
                return Err(ModelError::NotFinite(format!(
                    "mean of {}",
                    self.feature_names[i]
                )));
            }
            if let Some(i) = scaler
                .scale
                .iter()
                .position(|s| !(s.is_finite() && *s > 0.0))
            {
                return Err(ModelError::BadScaler(format!(
                    "scale of {} is not a positive number",
                    self.feature_names[i]
                )));
            }
        }
        Ok(())
    }

    /// The checks of an ONNX artifact: an ONNX kind with a graph, no linear
    /// parameters, a graph within the codec's limit
    /// ([`crate::codec::MAX_PAYLOAD`]; services apply their own, smaller one) and bytes matching their digest.
    /// Whether the engine can run the graph is the engine's check.
    fn validate_onnx(&self) -> Result<(), ModelError> {
        let Some(graph) = &self.onnx else {
            return Err(ModelError::BadOnnx(format!(
                "a {} model carries no graph",
                self.kind.as_str()
            )));
        };
        if !self.kind.is_onnx() {
            return Err(ModelError::BadOnnx(format!(
                "a {} model carries a graph",
                self.kind.as_str()
            )));
        }
        if !self.coefficients.is_empty() || self.scaler.is_some() || self.intercept != 0.0 {
            return Err(ModelError::BadOnnx(
                "an ONNX model has no coefficients, intercept or scaler".into(),
            ));
        }
        if graph.bytes.is_empty() {
            return Err(ModelError::BadOnnx("the graph is empty (0 bytes)".into()));
        }
        if graph.bytes.len() > crate::codec::MAX_PAYLOAD {
            return Err(ModelError::BadOnnx(format!(
                "the graph is {} bytes",
                graph.bytes.len()
            )));
        }
        if sha256_hex(&graph.bytes) != graph.sha256 {
            return Err(ModelError::BadOnnx(
                "the graph does not match its sha256".into(),
            ));
        }
        Ok(())
    }

    /// The score `intercept + Σ coefficient·z` for one feature vector, in
    /// `feature_names` order (standardised here when the model has a scaler).
    #[inline]
    pub fn score(&self, features: &[f64]) -> f64 {
        debug_assert_eq!(features.len(), self.coefficients.len());
        match &self.scaler {
            None => {
                self.intercept
                    + self
                        .coefficients
                        .iter()
                        .zip(features)
                        .map(|(c, x)| c * x)
                        .sum::<f64>()
            }
            Some(s) => {
                self.intercept
                    + self
                        .coefficients
                        .iter()
                        .zip(features)
                        .zip(s.mean.iter().zip(&s.scale))
                        .map(|((c, x), (m, sd))| c * (x - m) / sd)
                        .sum::<f64>()
            }
        }
    }

    /// The prediction for one feature vector, in `feature_names` order: the
    /// score for a linear model, the probability of class 1 for a logistic one.
    /// An ONNX model is scored by an engine (`ml_onnx::Scorer`): here it
    /// predicts NaN, which every caller refuses as not finite.
    #[inline]
    pub fn predict(&self, features: &[f64]) -> f64 {
        match self.kind {
            ModelKind::Linear => self.score(features),
            ModelKind::Logistic => sigmoid(self.score(features)),
            ModelKind::OnnxRegressor | ModelKind::OnnxClassifier => f64::NAN,
        }
    }

    /// The label a classifier gives a prediction of [`predict`](Self::predict)
    /// (`None` for a regression model).
    #[inline]
    pub fn label(&self, prediction: f64) -> Option<u8> {
        self.kind
            .is_classifier()
            .then_some(u8::from(prediction >= DECISION_THRESHOLD))
    }

    /// The coefficients and intercept on the raw (unstandardised) features:
    /// the same function, in the units people read.
    pub fn unscaled(&self) -> (Vec<f64>, f64) {
        match &self.scaler {
            None => (self.coefficients.clone(), self.intercept),
            Some(s) => {
                let coefficients: Vec<f64> = self
                    .coefficients
                    .iter()
                    .zip(&s.scale)
                    .map(|(c, sd)| c / sd)
                    .collect();
                let shift: f64 = coefficients.iter().zip(&s.mean).map(|(c, m)| c * m).sum();
                (coefficients, self.intercept - shift)
            }
        }
    }
}

/// The logistic function, computed without overflow for any finite input.
#[inline]
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelArtifact {
        ModelArtifact {
            kind: ModelKind::Linear,
            feature_names: vec!["a".into(), "b".into()],
            coefficients: vec![2.0, -1.0],
            intercept: 0.5,
            scaler: None,
            profile: None,
            onnx: None,
        }
    }

    #[test]
    fn onnx_artifacts_carry_a_graph_matching_its_digest() {
        let mut m = model();
        m.kind = ModelKind::OnnxRegressor;
        assert!(matches!(m.validate(), Err(ModelError::BadOnnx(_))));
        m.coefficients.clear();
        m.intercept = 0.0;
        m.onnx = Some(Box::new(OnnxGraph::new(b"graph".to_vec())));
        assert_eq!(m.validate(), Ok(()));
        assert!(m.predict(&[1.0, 2.0]).is_nan());
        m.onnx.as_mut().unwrap().bytes[0] ^= 1;
        assert!(matches!(m.validate(), Err(ModelError::BadOnnx(_))));
        m.onnx = Some(Box::new(OnnxGraph::new(Vec::new())));
        assert!(matches!(m.validate(), Err(ModelError::BadOnnx(_))));
        let mut native = model();
        native.onnx = Some(Box::new(OnnxGraph::new(b"graph".to_vec())));
        assert!(matches!(native.validate(), Err(ModelError::BadOnnx(_))));
        assert!(ModelKind::OnnxClassifier.is_classifier());
        assert_eq!(ModelKind::OnnxClassifier.as_str(), "onnx_classifier");
    }

    #[test]
    fn predicts_the_affine_function() {
        assert_eq!(model().predict(&[3.0, 4.0]), 0.5 + 6.0 - 4.0);
        assert_eq!(model().label(1.0), None);
    }

    #[test]
    fn scaling_and_the_logistic_link() {
        let rows: Vec<Vec<f64>> = vec![vec![1.0, 5.0], vec![3.0, 5.0]];
        let scaler = Scaler::fit(2, rows.iter().map(Vec::as_slice));
        assert_eq!(scaler.mean, vec![2.0, 5.0]);
        assert_eq!(scaler.scale, vec![1.0, 1.0], "population sd; constant -> 1");
        let mut m = model();
        m.scaler = Some(Scaler {
            mean: vec![1.0, 2.0],
            scale: vec![2.0, 4.0],
        });
        assert_eq!(m.validate(), Ok(()));
        // 0.5 + 2·(3−1)/2 − 1·(4−2)/4
        assert_eq!(m.predict(&[3.0, 4.0]), 0.5 + 2.0 - 0.5);
        let (coefficients, intercept) = m.unscaled();
        let raw = intercept + coefficients[0] * 3.0 + coefficients[1] * 4.0;
        assert!((raw - m.predict(&[3.0, 4.0])).abs() < 1e-12);

        m.kind = ModelKind::Logistic;
        let p = m.predict(&[3.0, 4.0]);
        assert!((p - 1.0 / (1.0 + (-2.0f64).exp())).abs() < 1e-15);
        assert_eq!(m.label(p), Some(1));
        assert_eq!(m.label(0.49), Some(0));
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(1000.0), 1.0);
        assert_eq!(sigmoid(0.0), 0.5);

        m.scaler.as_mut().unwrap().scale[1] = 0.0;
        assert!(matches!(m.validate(), Err(ModelError::BadScaler(_))));
        m.scaler.as_mut().unwrap().scale.pop();
        assert!(matches!(m.validate(), Err(ModelError::BadScaler(_))));
    }

    #[test]
    fn validation_rejects_inconsistent_models() {
        assert_eq!(model().validate(), Ok(()));
        let mut m = model();
        m.coefficients.pop();
        assert!(matches!(
            m.validate(),
            Err(ModelError::ShapeMismatch { .. })
        ));
        let mut m = model();
        m.coefficients[1] = f64::NAN;
        assert!(matches!(m.validate(), Err(ModelError::NotFinite(_))));
        let mut m = model();
        m.intercept = f64::INFINITY;
        assert!(matches!(m.validate(), Err(ModelError::NotFinite(_))));
        let mut m = model();
        m.feature_names[1] = "a".into();
        assert!(matches!(m.validate(), Err(ModelError::DuplicateFeature(_))));
    }
}
