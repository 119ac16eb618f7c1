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
//! [`crate::service`] before the submission goes through the store's gate).

use ml_onnx::{onnx_kind, Limits, OnnxModel};
use ml_shared::features::FeatureRegistry;
use ml_shared::messages::{ImportRequest, Metrics, RunRecord, Submission, TrainParams};
use ml_shared::model::{sha256_hex, ModelArtifact};

use crate::store::StoreError;

/// The model family recorded for imported models.
pub const FAMILY: &str = "onnx";

/// The submission an import stands for, its metrics not yet computed, or
/// why the import is refused (every refusal a `bad_request`).
pub fn submission(
    request: ImportRequest,
    max_bytes: usize,
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
    let limits = Limits {
        max_bytes,
        feature_count: feature_names.len(),
    };
    let started = std::time::Instant::now();
    let model = OnnxModel::load(&graph.bytes, &limits)
        .map_err(|e| invalid(format!("the ONNX model is refused: {e}")))?;
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
