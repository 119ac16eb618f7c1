//! One training run, without any I/O but reading the data file: load through
//! the feature store's registry, split, standardise, fit, score.
//!
//! [`train`] is the run the service makes: it streams the file in passes
//! ([`crate::stream`]), in memory independent of the row count.
//! [`train_in_memory`] loads the whole file and fits with `linfa-linear` and
//! `linfa-logistic` on `ndarray` matrices: the reference the streaming fit
//! is tested against, and the faster path for a file that fits in memory
//! many times over. Both split by [`ml_shared::holdout::is_holdout`] on the
//! entity id, so they hold out the same rows.
//!
//! The family is chosen by [`ModelChoice`]: `linear` (ordinary least
//! squares), `logistic` (L2-regularised logistic regression with `C = 1`, as
//! scikit-learn's default, through `linfa-logistic`), or `auto`, which picks
//! logistic when the target column holds only 0 and 1. Both fit on features
//! standardised with a [`Scaler`] fitted on the training split, which the
//! artifact carries so that serving applies the same transformation.

use std::path::Path;
use std::time::Instant;

use linfa::traits::Fit;
use linfa::Dataset as LinfaDataset;
use linfa_linear::LinearRegression;
use linfa_logistic::LogisticRegression;
use ml_shared::data::{self, DataError, Dataset};
use ml_shared::features::{FeatureError, FeatureRegistry};
use ml_shared::messages::{Metrics, RunRecord, TrainParams};
use ml_shared::model::{sigmoid, ModelArtifact, ModelError, ModelKind, Scaler};
use ml_shared::profile::{ReferenceProfile, DEFAULT_BINS};
use ndarray::{Array1, Array2};

use crate::solve::DesignError;

/// Fewest rows in each side of the split.
pub const MIN_ROWS: usize = 2;

/// Inverse regularisation strength of the logistic model (scikit-learn's
/// `C`); `linfa-logistic`'s `alpha` is `1 / C`.
pub const LOGISTIC_C: f64 = 1.0;

/// Largest norm of the gradient of the mean training loss at the fitted
/// parameters for a logistic fit to count as converged.
pub const CONVERGENCE_TOLERANCE: f64 = 1e-4;

/// Which model family to fit (`MODEL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModelChoice {
    /// Logistic when the target holds only 0 and 1, linear otherwise.
    #[default]
    Auto,
    /// Ordinary least squares.
    Linear,
    /// Binary logistic regression.
    Logistic,
}

impl std::str::FromStr for ModelChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => Ok(ModelChoice::Auto),
            "linear" => Ok(ModelChoice::Linear),
            "logistic" => Ok(ModelChoice::Logistic),
            other => Err(format!(
                "unknown model {other:?}; expected auto, linear or logistic"
            )),
        }
    }
}

impl std::fmt::Display for ModelChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelChoice::Auto => "auto",
            ModelChoice::Linear => "linear",
            ModelChoice::Logistic => "logistic",
        })
    }
}

/// The family `choice` gives for a target whose first value other than 0
/// and 1 is `non_binary` (`None`: every value is 0 or 1).
pub fn resolve_kind(choice: ModelChoice, non_binary: Option<f64>) -> Result<ModelKind, TrainError> {
    match (choice, non_binary) {
        (ModelChoice::Linear, _) => Ok(ModelKind::Linear),
        (ModelChoice::Logistic, None) | (ModelChoice::Auto, None) => Ok(ModelKind::Logistic),
        (ModelChoice::Logistic, Some(bad)) => Err(TrainError::Params(format!(
            "a logistic model needs a target of 0 and 1, and the data holds {bad}"
        ))),
        (ModelChoice::Auto, Some(_)) => Ok(ModelKind::Linear),
    }
}

impl ModelChoice {
    /// The family for these targets.
    pub fn resolve(self, targets: &[f64]) -> Result<ModelKind, TrainError> {
        let binary = targets.iter().all(|&t| t == 0.0 || t == 1.0);
        match self {
            ModelChoice::Linear => Ok(ModelKind::Linear),
            ModelChoice::Logistic if binary => Ok(ModelKind::Logistic),
            ModelChoice::Logistic => {
                let bad = targets
                    .iter()
                    .find(|&&t| t != 0.0 && t != 1.0)
                    .copied()
                    .unwrap_or_default();
                Err(TrainError::Params(format!(
                    "a logistic model needs a target of 0 and 1, and the data holds {bad}"
                )))
            }
            ModelChoice::Auto if binary => Ok(ModelKind::Logistic),
            ModelChoice::Auto => Ok(ModelKind::Linear),
        }
    }
}

/// Everything that determines a run's result besides the data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainSpec {
    /// The family.
    pub model: ModelChoice,
    /// Seed of the train/validation split.
    pub seed: u64,
    /// Share of rows held out.
    pub validation_fraction: f64,
    /// Most solver iterations of a logistic fit.
    pub max_iterations: u64,
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            model: ModelChoice::Auto,
            seed: 42,
            validation_fraction: 0.2,
            max_iterations: 100,
        }
    }
}

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
    #[error("{rows} rows ({train} for training, {validation} held out): need at least {MIN_ROWS} on each side")]
    TooFewRows {
        /// Rows in the file.
        rows: usize,
        /// Rows outside the holdout.
        train: usize,
        /// Rows in the holdout.
        validation: usize,
    },
    /// The design matrix cannot be fitted (a constant or collinear feature).
    #[error("cannot fit: {0}")]
    Design(#[from] DesignError),
    /// A model feature cannot be produced.
    #[error(transparent)]
    Feature(#[from] FeatureError),
    /// The solver failed.
    #[error("fit failed: {0}")]
    Fit(String),
    /// The solver stopped before reaching the optimum.
    #[error("the fit did not converge in {iterations} iterations (gradient norm {gradient:.3e}, tolerance {CONVERGENCE_TOLERANCE:e})")]
    NotConverged {
        /// The iteration limit.
        iterations: u64,
        /// Norm of the mean loss's gradient where it stopped.
        gradient: f64,
    },
    /// The fitted model or its metrics are unusable (NaN, infinite).
    #[error("fitted model is unusable: {0}")]
    Model(#[from] ModelError),
    /// The validation metrics are not finite.
    #[error("validation metrics are not finite: {0}")]
    Metrics(String),
    /// A parameter is out of range.
    #[error("invalid parameter: {0}")]
    Params(String),
}

/// Splits rows into (train, validation) indices by the holdout rule on
/// their entity ids, in file order: the same rows whatever reads them.
pub fn split<'a>(
    ids: impl IntoIterator<Item = &'a str>,
    validation_fraction: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let (mut train, mut validation) = (Vec::new(), Vec::new());
    for (i, id) in ids.into_iter().enumerate() {
        if ml_shared::holdout::is_holdout(id, validation_fraction, seed) {
            validation.push(i);
        } else {
            train.push(i);
        }
    }
    (train, validation)
}

/// Checks the parameters that do not depend on the data.
pub fn check_spec(spec: &TrainSpec) -> Result<(), TrainError> {
    if !(spec.validation_fraction > 0.0 && spec.validation_fraction < 1.0) {
        return Err(TrainError::Params(format!(
            "validation fraction {} is not in (0, 1)",
            spec.validation_fraction
        )));
    }
    Ok(())
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

// The metrics are the registry's too: one definition, in the shared crate.
pub use ml_shared::evaluation::{classification_metrics, regression_metrics, roc_auc};

/// The reference profile of a model's training split: quantile bins of each
/// column of `x` (the training rows' model features, unscaled) and of the
/// model's predictions on them. The validated model and finite data make
/// every histogram defined.
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

/// Streams `data_path` ([`crate::stream::train_file`]): fits the chosen
/// family on the training split, scores it on the holdout.
pub fn train(
    data_path: &Path,
    registry: &FeatureRegistry,
    spec: &TrainSpec,
    run_id: String,
) -> Result<(ModelArtifact, RunRecord), TrainError> {
    crate::stream::train_file(data_path, registry, spec, run_id, Default::default())
        .map(|t| (t.artifact, t.run))
}

/// Loads `data_path` into memory and fits with `linfa` ([`train_dataset`]).
pub fn train_in_memory(
    data_path: &Path,
    registry: &FeatureRegistry,
    spec: &TrainSpec,
    run_id: String,
) -> Result<(ModelArtifact, RunRecord), TrainError> {
    let started = Instant::now();
    let data = data::load_csv(data_path, registry.raw_names())?;
    train_dataset(data_path, &data, registry, spec, run_id, started)
}

/// Fits and scores on an already loaded dataset; `started` is when the run
/// began (loading included).
pub fn train_dataset(
    data_path: &Path,
    data: &Dataset,
    registry: &FeatureRegistry,
    spec: &TrainSpec,
    run_id: String,
    started: Instant,
) -> Result<(ModelArtifact, RunRecord), TrainError> {
    let started_ms = ml_shared::time::now_ms().saturating_sub(started.elapsed().as_millis() as u64);
    check_spec(spec)?;
    let targets = data
        .targets
        .as_ref()
        .ok_or_else(|| TrainError::NoTarget(data_path.display().to_string()))?;
    let kind = spec.model.resolve(targets)?;
    let names: Vec<String> = registry.names().map(str::to_owned).collect();
    let (train_rows, val_rows) = split(
        data.user_ids.iter().map(String::as_str),
        spec.validation_fraction,
        spec.seed,
    );
    if train_rows.len() < MIN_ROWS || val_rows.len() < MIN_ROWS {
        return Err(TrainError::TooFewRows {
            rows: data.len(),
            train: train_rows.len(),
            validation: val_rows.len(),
        });
    }

    let mut x = design_matrix(data, registry, &names, &train_rows)?;
    let scaler = standardise(&mut x);
    let y: Array1<f64> = train_rows.iter().map(|&r| targets[r]).collect();
    let (coefficients, intercept) = fit_standardised(kind, x, y, spec)?;
    let mut artifact = ModelArtifact {
        kind,
        feature_names: names.clone(),
        coefficients,
        intercept,
        scaler: Some(scaler),
        profile: None,
        onnx: None,
    };
    artifact.validate()?;
    // The profile describes the features as the monitor sees them: raw,
    // before the artifact's scaler.
    let x_train = design_matrix(data, registry, &names, &train_rows)?;
    artifact.profile = Some(Box::new(reference_profile(&artifact, &x_train)));
    // Scored through the artifact on raw features, as the predictors do.
    let x_val = design_matrix(data, registry, &names, &val_rows)?;
    let truth: Vec<f64> = val_rows.iter().map(|&r| targets[r]).collect();
    let metrics = score(&artifact, &x_val, &truth);
    let run = run_record(RunParts {
        run_id,
        started_ms,
        started,
        kind,
        spec,
        metrics,
        rows_train: train_rows.len(),
        rows_validation: val_rows.len(),
        data_path,
        data_fingerprint: data.fingerprint.clone(),
        feature_names: names,
    })?;
    Ok((artifact, run))
}

/// Fits a scaler on the rows of `x` and standardises them with it.
fn standardise(x: &mut Array2<f64>) -> Scaler {
    let scaler = Scaler::fit(
        x.ncols(),
        x.rows().into_iter().map(|r| {
            r.to_slice()
                .expect("rows of a standard array are contiguous")
        }),
    );
    for mut row in x.rows_mut() {
        scaler.transform(row.as_slice_mut().expect("contiguous"));
    }
    scaler
}

/// Coefficients and intercept of a `kind` model fitted on standardised
/// features `x` and targets `y`.
fn fit_standardised(
    kind: ModelKind,
    x: Array2<f64>,
    y: Array1<f64>,
    spec: &TrainSpec,
) -> Result<(Vec<f64>, f64), TrainError> {
    match kind {
        ModelKind::Linear => {
            let fitted = LinearRegression::new()
                .fit(&LinfaDataset::new(x, y))
                .map_err(|e| TrainError::Fit(e.to_string()))?;
            Ok((fitted.params().to_vec(), fitted.intercept()))
        }
        ModelKind::Logistic => fit_logistic(x, &y, spec.max_iterations),
        ModelKind::OnnxRegressor | ModelKind::OnnxClassifier => Err(TrainError::Fit(format!(
            "{} models are imported, not trained",
            kind.as_str()
        ))),
    }
}

/// The artifact's validation metrics on raw rows `x` with targets `truth`.
fn score(artifact: &ModelArtifact, x: &Array2<f64>, truth: &[f64]) -> Metrics {
    let predicted: Vec<f64> = x
        .rows()
        .into_iter()
        .map(|row| artifact.predict(row.as_slice().expect("contiguous")))
        .collect();
    if artifact.kind.is_classifier() {
        classification_metrics(truth, &predicted)
    } else {
        regression_metrics(truth, &predicted)
    }
}

/// What a run's record is made of, once its model is scored.
pub struct RunParts<'a> {
    /// The run's id.
    pub run_id: String,
    /// When it started (ms since the epoch).
    pub started_ms: u64,
    /// When it started, for its duration.
    pub started: Instant,
    /// The family fitted.
    pub kind: ModelKind,
    /// The parameters.
    pub spec: &'a TrainSpec,
    /// The holdout's metrics.
    pub metrics: Metrics,
    /// Training rows.
    pub rows_train: usize,
    /// Holdout rows.
    pub rows_validation: usize,
    /// The data file.
    pub data_path: &'a Path,
    /// Its fingerprint.
    pub data_fingerprint: String,
    /// The model's features.
    pub feature_names: Vec<String>,
}

/// The run's record; a run whose metrics are not all finite (a constant
/// target, a degenerate holdout) fails instead.
pub fn run_record(parts: RunParts<'_>) -> Result<RunRecord, TrainError> {
    let metrics = parts.metrics;
    if !metrics.all_finite() {
        return Err(TrainError::Metrics(
            serde_json::to_string(&metrics.fields().map(|(n, v)| (n, v.map(|v| v.to_string()))))
                .expect("serialisable"),
        ));
    }
    Ok(RunRecord {
        run_id: parts.run_id,
        started_ms: parts.started_ms,
        duration_ms: parts.started.elapsed().as_millis() as u64,
        params: TrainParams {
            model: parts.kind.as_str().into(),
            seed: parts.spec.seed,
            validation_fraction: parts.spec.validation_fraction,
        },
        metrics,
        rows_train: parts.rows_train,
        rows_validation: parts.rows_validation,
        data_path: parts.data_path.display().to_string(),
        data_fingerprint: parts.data_fingerprint,
        feature_names: parts.feature_names,
    })
}

/// Fits an L2-regularised logistic regression on standardised `x` and 0/1
/// `y` with `linfa-logistic`; returns (coefficients, intercept), after
/// checking that the solver reached the optimum.
pub fn fit_logistic(
    x: Array2<f64>,
    y: &Array1<f64>,
    max_iterations: u64,
) -> Result<(Vec<f64>, f64), TrainError> {
    let labels: Array1<usize> = y.iter().map(|&t| usize::from(t == 1.0)).collect();
    let alpha = 1.0 / LOGISTIC_C;
    let dataset = LinfaDataset::new(x, labels);
    let fitted = LogisticRegression::default()
        .alpha(alpha)
        .max_iterations(max_iterations)
        .fit(&dataset)
        .map_err(|e| TrainError::Fit(e.to_string()))?;
    // linfa-logistic models the probability of the more frequent class;
    // the artifact gives that of class 1.
    let sign = if fitted.labels().pos.class == 1 {
        1.0
    } else {
        -1.0
    };
    let w: Vec<f64> = fitted.params().iter().map(|c| sign * c).collect();
    let b = sign * fitted.intercept();
    // linfa-logistic does not say whether the solver converged: check the
    // gradient of the objective where it stopped.
    let x = dataset.records();
    let n = x.nrows() as f64;
    let mut grad_w = vec![0.0; w.len()];
    let mut grad_b = 0.0;
    for (row, &t) in x.rows().into_iter().zip(y) {
        let z = b + row.iter().zip(&w).map(|(a, c)| a * c).sum::<f64>();
        let residual = sigmoid(z) - t;
        grad_b += residual;
        for (g, a) in grad_w.iter_mut().zip(row) {
            *g += residual * a;
        }
    }
    let norm = (grad_b * grad_b
        + grad_w
            .iter()
            .zip(&w)
            .map(|(g, c)| (g + alpha * c).powi(2))
            .sum::<f64>())
    .sqrt()
        / n;
    if !norm.is_finite() || norm > CONVERGENCE_TOLERANCE {
        return Err(TrainError::NotConverged {
            iterations: max_iterations,
            gradient: norm,
        });
    }
    Ok((w, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ml_shared::gen;

    fn spec(model: ModelChoice) -> TrainSpec {
        TrainSpec {
            model,
            ..TrainSpec::default()
        }
    }

    fn data(
        rows: usize,
        seed: u64,
        target: gen::Target,
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.csv");
        gen::write_csv_with(std::fs::File::create(&path).unwrap(), rows, seed, target).unwrap();
        (dir, path)
    }

    #[test]
    fn split_is_deterministic_disjoint_and_complete() {
        let ids: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
        let ids = || ids.iter().map(String::as_str);
        let (t1, v1) = split(ids(), 0.2, 7);
        let (t2, v2) = split(ids(), 0.2, 7);
        assert_eq!((&t1, &v1), (&t2, &v2));
        assert!((150..250).contains(&v1.len()), "{}", v1.len());
        let mut all: Vec<usize> = t1.iter().chain(&v1).copied().collect();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert_ne!(split(ids(), 0.2, 8).1, v1);
        // The rule is the shared one: a row's side depends on its id alone.
        for &i in &v1 {
            assert!(ml_shared::holdout::is_holdout(&format!("user-{i}"), 0.2, 7));
        }
    }

    #[test]
    fn recovers_the_generating_relation() {
        let (_dir, path) = data(2000, 1, gen::Target::Regression);
        let (model, run) = train(
            &path,
            &FeatureRegistry::default(),
            &spec(ModelChoice::Auto),
            "r1".into(),
        )
        .unwrap();
        assert_eq!(model.kind, ModelKind::Linear);
        assert_eq!(model.feature_names, ["feature_1", "feature_2", "feature_3"]);
        assert!(model.scaler.is_some(), "features are standardised");
        let (coefficients, intercept) = model.unscaled();
        for (got, want) in coefficients.iter().zip(gen::TRUE_COEFFICIENTS) {
            assert!((got - want).abs() < 0.02, "{got} vs {want}");
        }
        assert!((intercept - gen::TRUE_INTERCEPT).abs() < 0.05);
        let r2 = run.metrics.r2.unwrap();
        let rmse = run.metrics.rmse.unwrap();
        assert!(r2 > 0.99, "{:?}", run.metrics);
        assert!((rmse - gen::NOISE_SD).abs() < 0.02, "{:?}", run.metrics);
        assert_eq!(run.metrics.accuracy, None);
        assert_eq!(run.params.model, "linear");
        assert_eq!(run.rows_train + run.rows_validation, 2000);

        // The profile describes the training split, unscaled: feature_1 ~
        // U[-2, 2) cut at its deciles, feature_3 = feature_1² in [0, 4].
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
    fn a_binary_target_gets_a_logistic_model_near_the_truth() {
        let (_dir, path) = data(4000, 2, gen::Target::Binary);
        let (model, run) = train(
            &path,
            &FeatureRegistry::default(),
            &spec(ModelChoice::Auto),
            "r".into(),
        )
        .unwrap();
        assert_eq!(model.kind, ModelKind::Logistic);
        assert_eq!(run.params.model, "logistic");
        let (coefficients, intercept) = model.unscaled();
        for (got, want) in coefficients.iter().zip(gen::LOGIT_COEFFICIENTS) {
            assert!(
                (got - want).abs() < 0.3,
                "{coefficients:?} vs {:?}",
                gen::LOGIT_COEFFICIENTS
            );
        }
        assert!(
            (intercept - gen::LOGIT_INTERCEPT).abs() < 0.5,
            "{intercept}"
        );
        let m = run.metrics;
        let accuracy = m.accuracy.unwrap();
        assert!((0.7..0.95).contains(&accuracy), "{m:?}");
        assert!(m.roc_auc.unwrap() > 0.8, "{m:?}");
        assert!(m.log_loss.unwrap() < 0.6, "{m:?}");
        assert_eq!(m.rmse, None);
        let p = model.predict(&[1.0, 5.0, 1.0]);
        assert!((0.0..=1.0).contains(&p));

        // Whichever class is the more frequent, the model gives P(class 1):
        // flipping the labels flips the function.
        let text = std::fs::read_to_string(&path).unwrap();
        let flipped: String = text
            .lines()
            .enumerate()
            .map(|(i, line)| {
                if i == 0 {
                    return format!("{line}\n");
                }
                let (head, t) = line.rsplit_once(',').unwrap();
                format!("{head},{}\n", if t == "1" { 0 } else { 1 })
            })
            .collect();
        let flipped_path = path.with_file_name("flipped.csv");
        std::fs::write(&flipped_path, flipped).unwrap();
        let (other, _) = train(
            &flipped_path,
            &FeatureRegistry::default(),
            &spec(ModelChoice::Auto),
            "r".into(),
        )
        .unwrap();
        let (c2, b2) = other.unscaled();
        for (a, b) in coefficients.iter().zip(&c2) {
            assert!((a + b).abs() < 1e-3, "{coefficients:?} vs {c2:?}");
        }
        assert!((intercept + b2).abs() < 1e-3);

        // The same data can be fitted as a regression when asked.
        let (linear, _) = train(
            &path,
            &FeatureRegistry::default(),
            &spec(ModelChoice::Linear),
            "r".into(),
        )
        .unwrap();
        assert_eq!(linear.kind, ModelKind::Linear);
    }

    #[test]
    fn a_logistic_fit_that_does_not_converge_fails_the_run() {
        let (_dir, path) = data(2000, 3, gen::Target::Binary);
        let spec = TrainSpec {
            max_iterations: 1,
            ..spec(ModelChoice::Logistic)
        };
        let err = train(&path, &FeatureRegistry::default(), &spec, "r".into()).unwrap_err();
        assert!(matches!(err, TrainError::NotConverged { .. }), "{err}");
        assert!(err.to_string().contains("did not converge"), "{err}");
    }

    #[test]
    fn logistic_needs_a_binary_target() {
        let (_dir, path) = data(100, 3, gen::Target::Regression);
        let err = train(
            &path,
            &FeatureRegistry::default(),
            &spec(ModelChoice::Logistic),
            "r".into(),
        )
        .unwrap_err();
        assert!(matches!(err, TrainError::Params(_)), "{err}");
    }

    #[test]
    fn classification_metrics_match_hand_computed_values() {
        let truth = [0.0, 0.0, 1.0, 1.0];
        let p = [0.1, 0.6, 0.4, 0.9];
        let m = classification_metrics(&truth, &p);
        assert_eq!(m.accuracy, Some(0.5));
        let ll = -(0.9f64.ln() + 0.4f64.ln() + 0.4f64.ln() + 0.9f64.ln()) / 4.0;
        assert!((m.log_loss.unwrap() - ll).abs() < 1e-12);
        // Pairs (pos, neg) ranked right: (0.4 > 0.1), (0.9 > 0.1), (0.9 > 0.6); wrong: (0.4 < 0.6).
        assert_eq!(m.roc_auc, Some(0.75));
        assert_eq!(roc_auc(&[0.0, 1.0], &[0.5, 0.5]), 0.5, "ties count half");
        assert!(roc_auc(&[1.0, 1.0], &[0.2, 0.3]).is_nan());
    }

    #[test]
    fn a_constant_target_gives_nan_metrics_and_fails_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.csv");
        let mut text = String::from("user_id,feature_1,feature_2,target\n");
        for i in 0..20 {
            text.push_str(&format!("u{i},{},{},7\n", i % 5, i % 3));
        }
        std::fs::write(&path, text).unwrap();
        let err = train(
            &path,
            &FeatureRegistry::default(),
            &spec(ModelChoice::Auto),
            "r".into(),
        )
        .unwrap_err();
        assert!(matches!(err, TrainError::Metrics(_)), "{err}");
        assert!(err.to_string().contains("r2"), "{err}");
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
        let s = spec(ModelChoice::Auto);
        let err = train(&path, &FeatureRegistry::default(), &s, "r".into()).unwrap_err();
        assert!(err.to_string().contains(":3:"), "{err}");
        std::fs::write(&path, "user_id,feature_1,feature_2\na,1,2\n").unwrap();
        let err = train(&path, &FeatureRegistry::default(), &s, "r".into()).unwrap_err();
        assert!(matches!(err, TrainError::NoTarget(_)), "{err}");
    }

    /// The streaming fit and `linfa-linear` on the same rows: the same
    /// least-squares solution, to 1e-9 relative.
    #[test]
    fn the_streaming_linear_fit_equals_linfa_in_memory() {
        let (_dir, path) = data(20_000, 5, gen::Target::Regression);
        let registry = FeatureRegistry::default();
        let s = spec(ModelChoice::Linear);
        let (streamed, run) = train(&path, &registry, &s, "s".into()).unwrap();
        let (in_memory, run_mem) = train_in_memory(&path, &registry, &s, "m".into()).unwrap();
        assert_eq!(
            (run.rows_train, run.rows_validation),
            (run_mem.rows_train, run_mem.rows_validation)
        );
        assert_eq!(run.data_fingerprint, run_mem.data_fingerprint);
        let (c1, b1) = streamed.unscaled();
        let (c2, b2) = in_memory.unscaled();
        for (a, b) in c1.iter().chain([&b1]).zip(c2.iter().chain([&b2])) {
            let rel = (a - b).abs() / b.abs();
            assert!(rel < 1e-9, "{c1:?} {b1} vs {c2:?} {b2}: {rel:e}");
        }
        let s1 = streamed.scaler.as_ref().unwrap();
        let s2 = in_memory.scaler.as_ref().unwrap();
        for (a, b) in s1
            .mean
            .iter()
            .chain(&s1.scale)
            .zip(s2.mean.iter().chain(&s2.scale))
        {
            assert!(
                (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                "{s1:?} vs {s2:?}"
            );
        }
        for (name, value) in run.metrics.fields() {
            let other = run_mem
                .metrics
                .fields()
                .into_iter()
                .find(|(n, _)| *n == name)
                .unwrap()
                .1;
            match (value, other) {
                (Some(a), Some(b)) => {
                    assert!((a - b).abs() <= 1e-9 * b.abs(), "{name}: {a} vs {b}")
                }
                (a, b) => assert_eq!(a, b, "{name}"),
            }
        }
        // Fewer training rows than the sample: the same reference profile.
        assert_eq!(
            streamed.profile.as_ref().unwrap().features,
            in_memory.profile.as_ref().unwrap().features
        );
    }

    /// The streaming Newton fit and `linfa-logistic` on the reference
    /// classification data: the same optimum, the same accuracy.
    #[test]
    fn the_streaming_logistic_fit_matches_linfa_in_memory() {
        let (_dir, path) = data(4000, 2, gen::Target::Binary);
        let registry = FeatureRegistry::default();
        let s = spec(ModelChoice::Auto);
        let trained =
            crate::stream::train_file(&path, &registry, &s, "s".into(), Default::default())
                .unwrap();
        let (in_memory, run_mem) = train_in_memory(&path, &registry, &s, "m".into()).unwrap();
        assert_eq!(trained.artifact.kind, ModelKind::Logistic);
        let convergence = trained.report.convergence.clone().expect("reported");
        assert!(
            convergence.gradient <= CONVERGENCE_TOLERANCE,
            "{convergence:?}"
        );
        assert!(convergence.iterations < 15, "{convergence:?}");
        let (c1, b1) = trained.artifact.unscaled();
        let (c2, b2) = in_memory.unscaled();
        for (a, b) in c1.iter().chain([&b1]).zip(c2.iter().chain([&b2])) {
            assert!((a - b).abs() < 1e-3, "{c1:?} {b1} vs {c2:?} {b2}");
        }
        let (a1, a2) = (
            trained.run.metrics.accuracy.unwrap(),
            run_mem.metrics.accuracy.unwrap(),
        );
        assert!(
            (a1 - a2).abs() <= 0.005,
            "accuracy {a1} streamed vs {a2} in memory"
        );
        let (l1, l2) = (
            trained.run.metrics.log_loss.unwrap(),
            run_mem.metrics.log_loss.unwrap(),
        );
        assert!((l1 - l2).abs() < 1e-3, "log-loss {l1} vs {l2}");
        let (u1, u2) = (
            trained.run.metrics.roc_auc.unwrap(),
            run_mem.metrics.roc_auc.unwrap(),
        );
        assert!((u1 - u2).abs() < 1e-3, "AUC {u1} vs {u2}");
        // Passes: statistics and one per Newton iteration; the holdout is
        // small enough to be scored from memory.
        assert_eq!(
            trained.report.passes.len() as u64,
            convergence.iterations + 1,
            "{:?}",
            trained.report
        );
    }

    #[test]
    fn a_constant_or_collinear_feature_fails_the_run_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.csv");
        let mut text = String::from("user_id,feature_1,feature_2,target\n");
        for i in 0..200 {
            text.push_str(&format!("u{i},{},4.5,{}\n", i % 7, i % 5));
        }
        std::fs::write(&path, text).unwrap();
        let err = train(
            &path,
            &FeatureRegistry::default(),
            &spec(ModelChoice::Linear),
            "r".into(),
        )
        .unwrap_err();
        assert!(matches!(err, TrainError::Design(_)), "{err}");
        assert!(err.to_string().contains("feature_2 is constant"), "{err}");

        // feature_2 = 2·feature_1 − 1 exactly.
        let mut text = String::from("user_id,feature_1,feature_2,target\n");
        for i in 0..200 {
            let f1 = (i % 11) as f64 / 4.0;
            text.push_str(&format!("u{i},{f1},{},{}\n", 2.0 * f1 - 1.0, i % 3));
        }
        std::fs::write(&path, text).unwrap();
        let err = train(
            &path,
            &FeatureRegistry::default(),
            &spec(ModelChoice::Linear),
            "r".into(),
        )
        .unwrap_err();
        assert!(matches!(err, TrainError::Design(_)), "{err}");
        assert!(
            err.to_string()
                .contains("feature_2 is a linear combination"),
            "{err}"
        );
    }

    #[test]
    fn a_duplicate_id_fails_the_run_with_both_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.csv");
        gen::write_csv(std::fs::File::create(&path).unwrap(), 500, 9).unwrap();
        let mut lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        // Line 301 repeats the id of line 11.
        let id = lines[10].split(',').nth(1).unwrap().to_owned();
        let mut fields: Vec<String> = lines[300].split(',').map(str::to_owned).collect();
        fields[1] = id.clone();
        lines[300] = fields.join(",");
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let err = train(
            &path,
            &FeatureRegistry::default(),
            &spec(ModelChoice::Auto),
            "r".into(),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("d.csv:301"), "{text}");
        assert!(
            text.contains(&format!("duplicate user_id {id:?} (first on line 11)")),
            "{text}"
        );
    }

    #[test]
    fn model_choices_parse_and_resolve() {
        assert_eq!("auto".parse::<ModelChoice>(), Ok(ModelChoice::Auto));
        assert_eq!("logistic".parse::<ModelChoice>(), Ok(ModelChoice::Logistic));
        assert!("forest".parse::<ModelChoice>().is_err());
        assert_eq!(
            ModelChoice::Auto.resolve(&[0.0, 1.0, 1.0]).unwrap(),
            ModelKind::Logistic
        );
        assert_eq!(
            ModelChoice::Auto.resolve(&[0.0, 2.0]).unwrap(),
            ModelKind::Linear
        );
    }
}
