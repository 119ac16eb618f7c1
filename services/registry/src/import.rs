//! Imports of ONNX models (`ml.registry.import`): an operator's file becomes
//! a submission like a trainer's, but nothing the importer says is trusted.
//!
//! The registry checks the file's digest against the bytes it received,
//! loads the graph with `ml-onnx` (a refusal names the unsupported operator,
//! the width mismatch or what else is wrong, as `bad_request`), takes the
//! kind from the graph's outputs (a declared kind must agree), checks that
//! the feature store computes every declared feature, and writes the lineage
//! into the run record (model family `onnx`): `run_id` names the importer
//! and the time, `data_path` the file and the reason, `data_fingerprint` its
//! SHA-256. The metrics are the registry's own on its holdout (computed by
//! [`crate::service`] before the submission goes through the store's gate),
//! and so is the model's reference profile for drift ([`add_holdout_figures`]).

use std::time::Duration;

use ml_onnx::{onnx_kind, Limits, OnnxModel};
use ml_shared::evaluation::Scored;
use ml_shared::features::FeatureRegistry;
use ml_shared::messages::{ImportRequest, Metrics, RunRecord, Submission, TrainParams};
use ml_shared::model::{sha256_hex, ModelArtifact};
use ml_shared::profile::DEFAULT_BINS;

use crate::store::StoreError;

/// The model family recorded for imported models.
pub const FAMILY: &str = "onnx";

/// What an ONNX model may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnnxLimits {
    /// The largest file, in bytes (`ONNX_MAX_BYTES`).
    pub max_bytes: usize,
    /// The longest the engine may take to load it (`ONNX_MAX_LOAD`): every
    /// predictor loads it again when it is promoted.
    pub max_load: Duration,
}

impl Default for OnnxLimits {
    fn default() -> Self {
        Self {
            max_bytes: ml_shared::model::DEFAULT_MAX_ONNX_BYTES,
            max_load: DEFAULT_MAX_LOAD,
        }
    }
}

/// Default of `ONNX_MAX_LOAD`.
pub const DEFAULT_MAX_LOAD: Duration = Duration::from_secs(5);

/// Refuses a model whose load took longer than `max`.
pub fn check_load_time(took: Duration, max: Duration) -> Result<(), StoreError> {
    if took > max {
        return Err(StoreError::Invalid(format!(
            "loading the ONNX model took {took:?}, more than the limit of {max:?} (ONNX_MAX_LOAD)"
        )));
    }
    Ok(())
}

/// The submission an import stands for, its metrics not yet computed, or
/// why the import is refused (every refusal a `bad_request`).
pub fn submission(
    request: ImportRequest,
    limits: &OnnxLimits,
    features: &FeatureRegistry,
) -> Result<Submission, StoreError> {
    let invalid = |m: String| StoreError::Invalid(m);
    let ImportRequest {
        graph,
        kind,
        feature_names,
        file_name,
        actor,
        reason,
        read_ms,
    } = request;
    if sha256_hex(&graph.bytes) != graph.sha256 {
        return Err(invalid(format!(
            "the model file's sha256 is not {}: the bytes changed in transit",
            graph.sha256
        )));
    }
    if feature_names.is_empty() {
        return Err(invalid(
            "declare the model's features (at least one)".into(),
        ));
    }
    features
        .plan(&feature_names)
        .map_err(|e| invalid(format!("declared features: {e}")))?;
    let engine_limits = Limits {
        max_bytes: limits.max_bytes,
        feature_count: feature_names.len(),
    };
    let started = std::time::Instant::now();
    let model = OnnxModel::load(&graph.bytes, &engine_limits)
        .map_err(|e| invalid(format!("the ONNX model is refused: {e}")))?;
    check_load_time(started.elapsed(), limits.max_load)?;
    let found = onnx_kind(model.kind());
    match kind {
        Some(declared) if declared != found => {
            return Err(invalid(format!(
                "the model is declared {} but its outputs are a {}'s",
                declared.as_str(),
                found.as_str()
            )))
        }
        _ => {}
    }
    let run = RunRecord {
        run_id: format!("import-{actor}-{read_ms}"),
        started_ms: read_ms,
        duration_ms: started.elapsed().as_millis() as u64,
        params: TrainParams {
            model: FAMILY.into(),
            seed: 0,
            validation_fraction: 0.0,
        },
        // Replaced by the registry's own figures before the gate sees them.
        metrics: Metrics::default(),
        rows_train: 0,
        rows_validation: 0,
        data_path: format!("onnx file {file_name} imported by {actor}: {reason}"),
        data_fingerprint: format!("sha256:{}", graph.sha256),
        feature_names: feature_names.clone(),
    };
    let artifact = ModelArtifact {
        kind: found,
        feature_names,
        coefficients: Vec::new(),
        intercept: 0.0,
        scaler: None,
        profile: None,
        onnx: Some(Box::new(graph)),
    };
    Ok(Submission { run, artifact })
}

/// The registry's own figures for an imported model, from its features
/// and predictions on the holdout: the run's metrics and the artifact's
/// reference profile (quantile bins of each feature and of the predictions,
/// as a trainer computes on its training split), so that the monitor checks
/// drift for it as for a native model.
pub fn add_holdout_figures(submission: &mut Submission, scored: &Scored) -> Result<(), StoreError> {
    submission.run.metrics = scored.metrics();
    submission.run.rows_validation = scored.truth.len();
    let profile = scored.profile(DEFAULT_BINS).ok_or_else(|| {
        StoreError::Invalid("a model feature is not a finite number on the holdout".into())
    })?;
    tracing::info!(
        rows = profile.rows,
        features = profile.features.len(),
        "reference profile computed on the holdout"
    );
    submission.artifact.profile = Some(Box::new(profile));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ml_shared::model::OnnxGraph;

    fn request(bytes: &[u8]) -> ImportRequest {
        ImportRequest {
            graph: OnnxGraph::new(bytes.to_vec()),
            kind: None,
            feature_names: vec!["feature_1".into(), "feature_2".into()],
            file_name: "m.onnx".into(),
            actor: "ops".into(),
            reason: "test".into(),
            read_ms: 1,
        }
    }

    fn refusal(request: ImportRequest) -> String {
        let features = FeatureRegistry::default();
        match submission(request, &OnnxLimits::default(), &features) {
            Err(e) => {
                assert!(e.is_bad_request(), "{e}");
                e.to_string()
            }
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn what_the_importer_says_is_checked() {
        let mut tampered = request(b"graph");
        tampered.graph.bytes.push(0);
        assert!(refusal(tampered).contains("sha256"));
        let mut unknown = request(b"graph");
        unknown.feature_names.push("no_such_feature".into());
        assert!(refusal(unknown).contains("no_such_feature"));
        assert!(refusal(request(b"")).contains("empty"));
        assert!(refusal(request(b"not onnx")).contains("not a valid ONNX model"));
    }

    #[test]
    fn a_slow_load_is_refused_past_the_configured_limit() {
        let max = Duration::from_millis(100);
        assert!(check_load_time(Duration::from_millis(100), max).is_ok());
        let e = check_load_time(Duration::from_millis(101), max).unwrap_err();
        assert!(
            e.is_bad_request() && e.to_string().contains("ONNX_MAX_LOAD"),
            "{e}"
        );
    }
}
