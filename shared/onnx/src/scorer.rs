//! [`Scorer`]: one way to score any model artifact, native or imported ONNX.
//!
//! The registry (evaluating a version on its holdout) and the predictors
//! (serving it) both build a `Scorer` from a
//! [`ModelArtifact`]: a native model (linear, logistic) is scored by the
//! artifact's own arithmetic, an ONNX one by the engine ([`OnnxModel`]),
//! loaded and checked here with the same limits in both places. Callers
//! compute the model's input rows with the feature plan of
//! `ml_shared::features` first, whatever the engine.

use ml_shared::evaluation::{self, EvaluationError, LabelledRow, Scored};
use ml_shared::features::FeatureRegistry;
use ml_shared::messages::Metrics;
use ml_shared::model::{ModelArtifact, ModelError, ModelKind, DECISION_THRESHOLD};

use crate::{Kind, Limits, OnnxError, OnnxModel, Output};

/// Why an artifact cannot be scored.
#[derive(Debug, thiserror::Error)]
pub enum ScorerError {
    /// The artifact is inconsistent.
    #[error(transparent)]
    Invalid(#[from] ModelError),
    /// The engine refused the ONNX graph.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// The graph's outputs are not those of the declared kind.
    #[error("the model is declared a {declared} but its outputs are a {model}'s")]
    KindMismatch {
        /// The artifact's kind.
        declared: &'static str,
        /// What the graph's outputs say.
        model: &'static str,
    },
}

/// How the predictions are computed.
#[derive(Debug, Clone)]
enum Engine {
    Native(ModelArtifact),
    Onnx(OnnxModel),
}

/// A model ready to score rows of its features (in `feature_names` order).
#[derive(Debug, Clone)]
pub struct Scorer {
    kind: ModelKind,
    feature_names: Vec<String>,
    engine: Engine,
}

/// The name of an engine kind, as the artifact's ONNX kind says it.
pub fn onnx_kind(kind: Kind) -> ModelKind {
    match kind {
        Kind::Regressor => ModelKind::OnnxRegressor,
        Kind::Classifier => ModelKind::OnnxClassifier,
    }
}

impl Scorer {
    /// Validates `artifact` and, for an ONNX one, loads its graph with the
    /// engine: at most `max_onnx_bytes`, its input as wide as the declared
    /// features, its outputs those of the declared kind.
    pub fn load(artifact: &ModelArtifact, max_onnx_bytes: usize) -> Result<Scorer, ScorerError> {
        artifact.validate()?;
        let engine = match &artifact.onnx {
            None => Engine::Native(artifact.clone()),
            Some(graph) => {
                let limits = Limits {
                    max_bytes: max_onnx_bytes,
                    feature_count: artifact.feature_names.len(),
                };
                let model = OnnxModel::load(&graph.bytes, &limits)?;
                let found = onnx_kind(model.kind());
                if found != artifact.kind {
                    return Err(ScorerError::KindMismatch {
                        declared: artifact.kind.as_str(),
                        model: found.as_str(),
                    });
                }
                Engine::Onnx(model)
            }
        };
        Ok(Scorer {
            kind: artifact.kind,
            feature_names: artifact.feature_names.clone(),
            engine,
        })
    }

    /// The model's kind.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// The model's features, in input order.
    pub fn feature_names(&self) -> &[String] {
        &self.feature_names
    }

    /// The prediction for one row, `None` when it is not a finite number
    /// (or the engine fails on it).
    #[inline]
    pub fn predict_one(&self, features: &[f64]) -> Option<f64> {
        let p = match &self.engine {
            Engine::Native(artifact) => artifact.predict(features),
            Engine::Onnx(model) => match model.predict(features, 1) {
                Ok(out) => value(out[0]),
                Err(error) => {
                    tracing::warn!(%error, "onnx prediction failed");
                    return None;
                }
            },
        };
        p.is_finite().then_some(p)
    }

    /// The predictions for `n` rows, row-major, in one call of the engine
    /// (a regressor's value, a classifier's probability of class 1; not
    /// checked for finiteness).
    pub fn predict_batch(&self, rows: &[f64], n: usize) -> Result<Vec<f64>, OnnxError> {
        match &self.engine {
            Engine::Native(artifact) => {
                let width = self.feature_names.len();
                if n.checked_mul(width) != Some(rows.len()) {
                    return Err(OnnxError::Batch(format!(
                        "{} values for {n} rows of {width} features",
                        rows.len()
                    )));
                }
                Ok(rows
                    .chunks_exact(width.max(1))
                    .map(|x| artifact.predict(x))
                    .collect())
            }
            Engine::Onnx(model) => Ok(model.predict(rows, n)?.into_iter().map(value).collect()),
        }
    }

    /// A classifier's label for a prediction (`1` from
    /// [`DECISION_THRESHOLD`]; for a binary scikit-learn classifier, the
    /// class its own label output names except at an exact tie); `None`
    /// for a regressor.
    #[inline]
    pub fn label(&self, prediction: f64) -> Option<u8> {
        self.kind
            .is_classifier()
            .then_some(u8::from(prediction >= DECISION_THRESHOLD))
    }

    /// The metrics of the model on labelled `rows`, whose features
    /// `registry` computes: one batch call of the engine for all rows.
    pub fn evaluate<'a>(
        &self,
        registry: &FeatureRegistry,
        rows: impl IntoIterator<Item = LabelledRow<'a>>,
    ) -> Result<Metrics, EvaluationError> {
        Ok(self.score(registry, rows)?.metrics())
    }

    /// The model's features and predictions on labelled `rows` (one batch
    /// call of the engine), from which its metrics and a reference profile
    /// follow.
    pub fn score<'a>(
        &self,
        registry: &FeatureRegistry,
        rows: impl IntoIterator<Item = LabelledRow<'a>>,
    ) -> Result<Scored, EvaluationError> {
        evaluation::score_batch(
            &self.feature_names,
            self.kind.is_classifier(),
            registry,
            rows,
            |matrix, n| self.predict_batch(matrix, n).map_err(|e| e.to_string()),
        )
    }
}

/// A regressor's value or a classifier's probability of class 1.
fn value(out: Output) -> f64 {
    match out {
        Output::Value(v) => v,
        Output::Class { probability, .. } => probability,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ml_shared::model::OnnxGraph;

    fn native() -> ModelArtifact {
        ModelArtifact {
            kind: ModelKind::Linear,
            feature_names: vec!["feature_1".into(), "feature_2".into()],
            coefficients: vec![2.0, -1.0],
            intercept: 0.5,
            scaler: None,
            profile: None,
            onnx: None,
        }
    }

    #[test]
    fn a_native_artifact_scores_as_itself_one_row_or_a_batch() {
        let a = native();
        let s = Scorer::load(&a, 1024).unwrap();
        assert_eq!(s.predict_one(&[3.0, 4.0]), Some(a.predict(&[3.0, 4.0])));
        let batch = s.predict_batch(&[3.0, 4.0, 1.0, 1.0], 2).unwrap();
        assert_eq!(batch, vec![a.predict(&[3.0, 4.0]), a.predict(&[1.0, 1.0])]);
        assert!(s.predict_batch(&[3.0], 1).is_err());
        assert_eq!(s.label(1.0), None);
    }

    #[test]
    fn an_onnx_artifact_that_is_not_onnx_is_refused() {
        let mut a = native();
        a.kind = ModelKind::OnnxRegressor;
        a.coefficients.clear();
        a.intercept = 0.0;
        a.onnx = Some(Box::new(OnnxGraph::new(b"not onnx".to_vec())));
        let err = Scorer::load(&a, 1024).unwrap_err();
        assert!(
            matches!(err, ScorerError::Onnx(OnnxError::Malformed(_))),
            "{err}"
        );
        let err = Scorer::load(&a, 4).unwrap_err();
        assert!(
            matches!(err, ScorerError::Onnx(OnnxError::TooLarge { .. })),
            "{err}"
        );
    }
}
