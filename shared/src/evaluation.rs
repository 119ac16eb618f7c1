//! Validation metrics of a model on labelled rows: the figures the trainer
//! reports and the registry recomputes on its own holdout before it believes
//! them.
//!
//! Pure functions: no I/O. A regression model gets RMSE, MAE and R²; a
//! classifier accuracy (threshold [`crate::model::DECISION_THRESHOLD`]),
//! log-loss and ROC AUC.

use crate::features::{FeatureError, FeatureRegistry};
use crate::messages::Metrics;
use crate::model::ModelArtifact;
use crate::profile::ReferenceProfile;

/// Why a model could not be evaluated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvaluationError {
    /// The model names a feature the feature registry does not know.
    #[error(transparent)]
    Feature(#[from] FeatureError),
    /// No labelled row to evaluate on.
    #[error("no labelled rows to evaluate on")]
    NoRows,
    /// The model could not be run on the rows.
    #[error("the model cannot be run: {0}")]
    Model(String),
    /// The model's output is not a finite number on some row.
    #[error(
        "the model predicts {value} on holdout row {row} (entity {entity:?}): not a finite number"
    )]
    NonFinite {
        /// 0-based index among the evaluated rows.
        row: usize,
        /// The row's entity id.
        entity: String,
        /// What the model predicted.
        value: f64,
    },
}

/// RMSE, MAE and R² of predictions against the truth. R² is NaN when the
/// truth is constant.
pub fn regression_metrics(truth: &[f64], predicted: &[f64]) -> Metrics {
    let n = truth.len() as f64;
    let mean = truth.iter().sum::<f64>() / n;
    let (mut sse, mut sae, mut sst) = (0.0, 0.0, 0.0);
    for (t, p) in truth.iter().zip(predicted) {
        sse += (t - p) * (t - p);
        sae += (t - p).abs();
        sst += (t - mean) * (t - mean);
    }
    Metrics::regression(
        (sse / n).sqrt(),
        sae / n,
        if sst > 0.0 { 1.0 - sse / sst } else { f64::NAN },
    )
}

/// Accuracy (threshold 0.5), log-loss and ROC AUC of probabilities of class
/// 1 against 0/1 labels. AUC is NaN when one class is absent.
pub fn classification_metrics(truth: &[f64], probability: &[f64]) -> Metrics {
    let n = truth.len() as f64;
    let mut correct = 0usize;
    let mut loss = 0.0;
    for (&t, &p) in truth.iter().zip(probability) {
        if (p >= crate::model::DECISION_THRESHOLD) == (t == 1.0) {
            correct += 1;
        }
        let p = p.clamp(1e-15, 1.0 - 1e-15);
        loss -= if t == 1.0 { p.ln() } else { (1.0 - p).ln() };
    }
    Metrics::classification(correct as f64 / n, loss / n, roc_auc(truth, probability))
}

/// Area under the ROC curve, by the rank-sum (Mann–Whitney) formula with
/// tied scores given their mean rank.
pub fn roc_auc(truth: &[f64], score: &[f64]) -> f64 {
    let mut order: Vec<usize> = (0..score.len()).collect();
    order.sort_by(|&a, &b| score[a].total_cmp(&score[b]));
    let mut positive_rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && score[order[j + 1]] == score[order[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            if truth[k] == 1.0 {
                positive_rank_sum += mean_rank;
            }
        }
        i = j + 1;
    }
    let positives = truth.iter().filter(|&&t| t == 1.0).count() as f64;
    let negatives = truth.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return f64::NAN;
    }
    (positive_rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives)
}

/// One labelled row: its entity id, raw features and target.
pub type LabelledRow<'a> = (&'a str, &'a [f64], f64);

/// The metrics of `artifact` on `rows`, its features computed by `registry`
/// (the code the predictors run). Every prediction must be finite. Native
/// models only (an ONNX artifact predicts NaN here): an engine scores any
/// artifact through [`evaluate_batch`].
pub fn evaluate<'a>(
    artifact: &ModelArtifact,
    registry: &FeatureRegistry,
    rows: impl IntoIterator<Item = LabelledRow<'a>>,
) -> Result<Metrics, EvaluationError> {
    let width = artifact.feature_names.len();
    evaluate_batch(
        &artifact.feature_names,
        artifact.kind.is_classifier(),
        registry,
        rows,
        |features, _| {
            Ok(features
                .chunks_exact(width)
                .map(|x| artifact.predict(x))
                .collect())
        },
    )
}

/// The metrics of a model taking `feature_names` on `rows`: every row's
/// features are computed by `registry`'s plan into one row-major matrix,
/// scored by one call of `predict(matrix, rows)`, which returns one
/// prediction per row (a classifier's: the probability of class 1). Every
/// prediction must be finite.
pub fn evaluate_batch<'a>(
    feature_names: &[String],
    classifier: bool,
    registry: &FeatureRegistry,
    rows: impl IntoIterator<Item = LabelledRow<'a>>,
    predict: impl FnOnce(&[f64], usize) -> Result<Vec<f64>, String>,
) -> Result<Metrics, EvaluationError> {
    Ok(score_batch(feature_names, classifier, registry, rows, predict)?.metrics())
}

/// A model's finite predictions on labelled rows, with the model features
/// it was given: what its metrics and a reference profile are computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The model's features, in its order.
    pub feature_names: Vec<String>,
    /// The model features of every row, row-major.
    pub matrix: Vec<f64>,
    /// One prediction per row (a classifier's: the probability of class 1).
    pub predictions: Vec<f64>,
    /// One target per row.
    pub truth: Vec<f64>,
    /// Whether the predictions are a classifier's.
    pub classifier: bool,
}

impl Scored {
    /// The metrics of the predictions against the truth.
    pub fn metrics(&self) -> Metrics {
        if self.classifier {
            classification_metrics(&self.truth, &self.predictions)
        } else {
            regression_metrics(&self.truth, &self.predictions)
        }
    }

    /// The reference profile of these rows: `bins` quantile bins of each
    /// model feature and of the predictions (`None` when a feature value is
    /// not finite).
    pub fn profile(&self, bins: usize) -> Option<ReferenceProfile> {
        let width = self.feature_names.len();
        let columns: Vec<Vec<f64>> = (0..width)
            .map(|j| {
                self.matrix
                    .chunks_exact(width.max(1))
                    .map(|row| row[j])
                    .collect()
            })
            .collect();
        ReferenceProfile::from_columns(&self.feature_names, &columns, &self.predictions, bins)
    }
}

/// [`evaluate_batch`]'s predictions, before the metrics: the rows' model
/// features and the model's predictions on them, checked to be finite.
pub fn score_batch<'a>(
    feature_names: &[String],
    classifier: bool,
    registry: &FeatureRegistry,
    rows: impl IntoIterator<Item = LabelledRow<'a>>,
    predict: impl FnOnce(&[f64], usize) -> Result<Vec<f64>, String>,
) -> Result<Scored, EvaluationError> {
    let plan = registry.plan(feature_names)?;
    let mut features = vec![0.0; plan.len()];
    let (mut matrix, mut entities, mut truth) = (Vec::new(), Vec::new(), Vec::new());
    for (entity, raw, target) in rows {
        plan.compute_into(raw, &mut features);
        matrix.extend_from_slice(&features);
        entities.push(entity);
        truth.push(target);
    }
    if truth.is_empty() {
        return Err(EvaluationError::NoRows);
    }
    let predictions = predict(&matrix, truth.len()).map_err(EvaluationError::Model)?;
    if predictions.len() != truth.len() {
        return Err(EvaluationError::Model(format!(
            "{} predictions for {} rows",
            predictions.len(),
            truth.len()
        )));
    }
    if let Some(row) = predictions.iter().position(|p| !p.is_finite()) {
        return Err(EvaluationError::NonFinite {
            row,
            entity: entities[row].to_owned(),
            value: predictions[row],
        });
    }
    Ok(Scored {
        feature_names: feature_names.to_vec(),
        matrix,
        predictions,
        truth,
        classifier,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelKind;

    fn linear(coefficients: Vec<f64>) -> ModelArtifact {
        ModelArtifact {
            kind: ModelKind::Linear,
            feature_names: vec!["feature_1".into(), "feature_2".into()],
            coefficients,
            intercept: 1.0,
            scaler: None,
            profile: None,
            onnx: None,
        }
    }

    #[test]
    fn an_exact_model_has_zero_error() {
        let registry = FeatureRegistry::default();
        let rows: Vec<(String, Vec<f64>, f64)> = (0..10)
            .map(|i| {
                let (a, b) = (i as f64, (i * i) as f64);
                (format!("u{i}"), vec![a, b], 1.0 + 2.0 * a - b)
            })
            .collect();
        let m = evaluate(
            &linear(vec![2.0, -1.0]),
            &registry,
            rows.iter().map(|(u, r, t)| (u.as_str(), r.as_slice(), *t)),
        )
        .unwrap();
        assert_eq!(m.rmse, Some(0.0));
        assert_eq!(m.r2, Some(1.0));
    }

    #[test]
    fn an_overflowing_model_is_refused_with_the_row() {
        let registry = FeatureRegistry::default();
        let raw = [1e10, 1e10];
        let e = evaluate(
            &linear(vec![1e308, 1e308]),
            &registry,
            [("u-7", &raw[..], 0.0)],
        )
        .unwrap_err();
        assert!(
            matches!(e, EvaluationError::NonFinite { ref entity, .. } if entity == "u-7"),
            "{e}"
        );
        assert_eq!(
            evaluate(&linear(vec![1.0, 1.0]), &registry, []).unwrap_err(),
            EvaluationError::NoRows
        );
    }

    #[test]
    fn scored_rows_give_the_profile_of_the_model_features_and_predictions() {
        let registry = FeatureRegistry::default();
        let names: Vec<String> = ["feature_1", "feature_3"].map(String::from).to_vec();
        let rows: Vec<(String, [f64; 2])> = (0..100)
            .map(|i| (format!("u{i}"), [i as f64, 0.0]))
            .collect();
        let scored = score_batch(
            &names,
            false,
            &registry,
            rows.iter().map(|(u, r)| (u.as_str(), &r[..], 0.0)),
            |m, n| Ok(m.chunks_exact(2).take(n).map(|x| x[0] + x[1]).collect()),
        )
        .unwrap();
        let profile = scored.profile(crate::profile::DEFAULT_BINS).unwrap();
        profile.validate(&names).unwrap();
        assert_eq!(profile.rows, 100);
        // feature_3 = feature_1²: the profile bins the model's features.
        let squares: Vec<f64> = (0..100).map(|i| (i * i) as f64).collect();
        let want = crate::profile::Bins::from_values(&squares, 10).unwrap();
        assert_eq!(profile.features[1].bins, want);
        let sums: Vec<f64> = (0..100).map(|i| (i + i * i) as f64).collect();
        assert_eq!(
            profile.prediction,
            crate::profile::Bins::from_values(&sums, 10).unwrap()
        );
    }
}
