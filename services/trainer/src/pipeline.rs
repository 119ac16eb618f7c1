//! One training run, without any I/O but reading the data file: load through
//! the feature store's registry, split, fit, score.

use std::path::Path;
use std::time::Instant;

use linfa::traits::Fit;
use linfa::Dataset as LinfaDataset;
use linfa_linear::LinearRegression;
use ml_shared::data::{self, DataError, Dataset};
use ml_shared::features::{FeatureError, FeatureRegistry};
use ml_shared::messages::{Metrics, RunRecord, TrainParams};
use ml_shared::model::{ModelArtifact, ModelError, ModelKind};
use ml_shared::profile::{ReferenceProfile, DEFAULT_BINS};
use ndarray::{Array1, Array2};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Fewest rows in each side of the split.
pub const MIN_ROWS: usize = 2;

/// Why a run failed. Nothing is submitted for a failed run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The data could not be loaded.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The data has no `target` column.
    #[error("{0}: no `target` column to learn from")]
    NoTarget(String),
    /// Too few rows to fit and validate.
    #[error("{rows} rows: need at least {MIN_ROWS} for training and {MIN_ROWS} for validation")]
    TooFewRows {
        /// Rows in the file.
        rows: usize,
    },
    /// A model feature cannot be produced.
    #[error(transparent)]
    Feature(#[from] FeatureError),
    /// The solver failed.
    #[error("fit failed: {0}")]
    Fit(String),
    /// The fitted model or its metrics are unusable (NaN, infinite).
    #[error("fitted model is unusable: {0}")]
    Model(#[from] ModelError),
    /// The validation metrics are not finite.
    #[error("validation metrics are not finite: {0:?}")]
    Metrics(Metrics),
    /// A parameter is out of range.
    #[error("invalid parameter: {0}")]
    Params(String),
}

/// Splits `0..n` into (train, validation) indices, deterministically for a seed.
pub fn split(n: usize, validation_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n_val = ((n as f64) * validation_fraction).round() as usize;
    let n_val = n_val.clamp(MIN_ROWS.min(n), n.saturating_sub(MIN_ROWS));
    let train = idx.split_off(n_val);
    (train, idx)
}

/// The design matrix of `rows`: one line per row, features in model order.
pub fn design_matrix(
    data: &Dataset,
    registry: &FeatureRegistry,
    names: &[String],
    rows: &[usize],
) -> Result<Array2<f64>, FeatureError> {
    let plan = registry.plan(names)?;
    let mut x = Array2::zeros((rows.len(), plan.len()));
    for (mut line, &r) in x.rows_mut().into_iter().zip(rows) {
        plan.compute_into(
            data.raw_row(r),
            line.as_slice_mut()
                .expect("rows of a standard array are contiguous"),
        );
    }
    Ok(x)
}

/// RMSE, MAE and R² of predictions against the truth.
pub fn regression_metrics(truth: &[f64], predicted: &[f64]) -> Metrics {
    let n = truth.len() as f64;
    let mean = truth.iter().sum::<f64>() / n;
    let (mut sse, mut sae, mut sst) = (0.0, 0.0, 0.0);
    for (t, p) in truth.iter().zip(predicted) {
        sse += (t - p) * (t - p);
        sae += (t - p).abs();
        sst += (t - mean) * (t - mean);
    }
    Metrics {
        rmse: (sse / n).sqrt(),
        mae: sae / n,
        r2: if sst > 0.0 { 1.0 - sse / sst } else { f64::NAN },
    }
}

/// The reference profile of a model's training split: quantile bins of each
/// column of `x` (the training design matrix) and of the model's predictions
/// on it. The validated model and finite data make every histogram defined.
pub fn reference_profile(artifact: &ModelArtifact, x: &Array2<f64>) -> ReferenceProfile {
    let columns: Vec<Vec<f64>> = x.columns().into_iter().map(|c| c.to_vec()).collect();
    let predictions: Vec<f64> = x
        .rows()
        .into_iter()
        .map(|row| artifact.predict(row.as_slice().expect("contiguous")))
        .collect();
    ReferenceProfile::from_columns(
        &artifact.feature_names,
        &columns,
        &predictions,
        DEFAULT_BINS,
    )
    .expect("finite training data and a validated model give finite histograms")
}

/// Loads `data_path`, fits a linear model on the training split, scores it on
/// the validation split.
pub fn train(
    data_path: &Path,
    registry: &FeatureRegistry,
    params: &TrainParams,
    run_id: String,
) -> Result<(ModelArtifact, RunRecord), TrainError> {
    let started = Instant::now();
    let started_ms = ml_shared::time::now_ms();
    if !(0.0..1.0).contains(&params.validation_fraction) || params.validation_fraction <= 0.0 {
        return Err(TrainError::Params(format!(
            "validation fraction {} is not in (0, 1)",
            params.validation_fraction
        )));
    }
    let data = data::load_csv(data_path, registry.raw_names())?;
    let targets = data
        .targets
        .as_ref()
        .ok_or_else(|| TrainError::NoTarget(data_path.display().to_string()))?;
    if data.len() < 2 * MIN_ROWS {
        return Err(TrainError::TooFewRows { rows: data.len() });
    }
    let names: Vec<String> = registry.names().map(str::to_owned).collect();
    let (train_rows, val_rows) = split(data.len(), params.validation_fraction, params.seed);

    let x = design_matrix(&data, registry, &names, &train_rows)?;
    let y: Array1<f64> = train_rows.iter().map(|&r| targets[r]).collect();
    let dataset = LinfaDataset::new(x, y);
    let fitted = LinearRegression::new()
        .fit(&dataset)
        .map_err(|e| TrainError::Fit(e.to_string()))?;
    let mut artifact = ModelArtifact {
        kind: ModelKind::Linear,
        feature_names: names.clone(),
        coefficients: fitted.params().to_vec(),
        intercept: fitted.intercept(),
        profile: None,
    };
    artifact.validate()?;
    artifact.profile = Some(reference_profile(&artifact, dataset.records()));

    let x_val = design_matrix(&data, registry, &names, &val_rows)?;
    let predicted: Vec<f64> = x_val
        .rows()
        .into_iter()
        .map(|row| artifact.predict(row.as_slice().expect("contiguous")))
        .collect();
    let truth: Vec<f64> = val_rows.iter().map(|&r| targets[r]).collect();
    let metrics = regression_metrics(&truth, &predicted);
    if !(metrics.rmse.is_finite() && metrics.mae.is_finite() && metrics.r2.is_finite()) {
        return Err(TrainError::Metrics(metrics));
    }
    let run = RunRecord {
        run_id,
        started_ms,
        duration_ms: started.elapsed().as_millis() as u64,
        params: params.clone(),
        metrics,
        rows_train: train_rows.len(),
        rows_validation: val_rows.len(),
        data_path: data_path.display().to_string(),
        data_fingerprint: data.fingerprint.clone(),
        feature_names: names,
    };
    Ok((artifact, run))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ml_shared::gen;

    fn params() -> TrainParams {
        TrainParams {
            model: "linear".into(),
            seed: 42,
            validation_fraction: 0.2,
        }
    }

    #[test]
    fn split_is_deterministic_disjoint_and_complete() {
        let (t1, v1) = split(100, 0.2, 7);
        let (t2, v2) = split(100, 0.2, 7);
        assert_eq!((&t1, &v1), (&t2, &v2));
        assert_eq!(v1.len(), 20);
        let mut all: Vec<usize> = t1.iter().chain(&v1).copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_ne!(split(100, 0.2, 8).1, v1);
    }

    #[test]
    fn recovers_the_generating_relation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.csv");
        gen::write_csv(std::fs::File::create(&path).unwrap(), 2000, 1).unwrap();
        let (model, run) =
            train(&path, &FeatureRegistry::default(), &params(), "r1".into()).unwrap();
        assert_eq!(model.feature_names, ["feature_1", "feature_2", "feature_3"]);
        for (got, want) in model.coefficients.iter().zip(gen::TRUE_COEFFICIENTS) {
            assert!((got - want).abs() < 0.02, "{got} vs {want}");
        }
        assert!((model.intercept - gen::TRUE_INTERCEPT).abs() < 0.05);
        assert!(run.metrics.r2 > 0.99, "{:?}", run.metrics);
        assert!(
            (run.metrics.rmse - gen::NOISE_SD).abs() < 0.02,
            "{:?}",
            run.metrics
        );
        assert_eq!(run.rows_train + run.rows_validation, 2000);

        // The profile describes the training split: feature_1 ~ U[-2, 2)
        // cut at its deciles, feature_3 = feature_1² in [0, 4].
        let profile = model.profile.as_ref().expect("a reference profile");
        profile.validate(&model.feature_names).unwrap();
        assert_eq!(profile.rows, run.rows_train as u64);
        let f1 = &profile.features[0].bins;
        assert_eq!(f1.len(), DEFAULT_BINS);
        assert!((f1.edges[4] - 0.0).abs() < 0.15, "{f1:?}");
        for p in &f1.proportions {
            assert!((p - 0.1).abs() < 0.01, "{f1:?}");
        }
        let f3 = &profile.features[2].bins;
        assert!(f3.edges.iter().all(|e| (0.0..=4.0).contains(e)), "{f3:?}");
        assert_eq!(profile.prediction.len(), DEFAULT_BINS);
    }

    #[test]
    fn bad_data_fails_the_run_with_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.csv");
        std::fs::write(
            &path,
            "user_id,feature_1,feature_2,target\na,1,2,3\nb,1,oops,3\n",
        )
        .unwrap();
        let err = train(&path, &FeatureRegistry::default(), &params(), "r".into()).unwrap_err();
        assert!(err.to_string().contains(":3:"), "{err}");
        std::fs::write(&path, "user_id,feature_1,feature_2\na,1,2\n").unwrap();
        let err = train(&path, &FeatureRegistry::default(), &params(), "r".into()).unwrap_err();
        assert!(matches!(err, TrainError::NoTarget(_)), "{err}");
    }
}
