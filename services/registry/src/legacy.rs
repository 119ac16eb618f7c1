//! The shapes of artifact files written by codec formats 1 and 2, so that a
//! registry directory written before the logistic family and the scaler
//! (format 1) or the reference profile (format 2) existed still opens: every
//! old version stays listed, servable and promotable (without a drift check,
//! for want of a profile).

use ml_shared::messages::{Metrics, RunRecord, TrainParams};
use ml_shared::model::{ModelArtifact, ModelKind, Scaler};
use serde::Deserialize;

use crate::store::StoredModel;

/// A stored model as format 1 wrote it.
#[derive(Debug, Deserialize)]
pub struct StoredModelV1 {
    version: u64,
    created_ms: u64,
    run: RunRecordV1,
    artifact: ArtifactV1,
}

#[derive(Debug, Deserialize)]
struct RunRecordV1 {
    run_id: String,
    started_ms: u64,
    duration_ms: u64,
    params: TrainParams,
    metrics: MetricsV1,
    rows_train: usize,
    rows_validation: usize,
    data_path: String,
    data_fingerprint: String,
    feature_names: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct MetricsV1 {
    rmse: f64,
    mae: f64,
    r2: f64,
}

#[derive(Debug, Deserialize)]
struct ArtifactV1 {
    kind: ModelKind,
    feature_names: Vec<String>,
    coefficients: Vec<f64>,
    intercept: f64,
}

impl From<StoredModelV1> for StoredModel {
    fn from(old: StoredModelV1) -> Self {
        let run = old.run;
        StoredModel {
            version: old.version,
            created_ms: old.created_ms,
            run: RunRecord {
                run_id: run.run_id,
                started_ms: run.started_ms,
                duration_ms: run.duration_ms,
                params: run.params,
                metrics: Metrics::regression(run.metrics.rmse, run.metrics.mae, run.metrics.r2),
                rows_train: run.rows_train,
                rows_validation: run.rows_validation,
                data_path: run.data_path,
                data_fingerprint: run.data_fingerprint,
                feature_names: run.feature_names,
            },
            artifact: ModelArtifact {
                kind: old.artifact.kind,
                feature_names: old.artifact.feature_names,
                coefficients: old.artifact.coefficients,
                intercept: old.artifact.intercept,
                scaler: None,
                profile: None,
            },
            // Format 1 recorded no lineage.
            parent: None,
        }
    }
}

/// A stored model as format 2 wrote it: the artifact had no profile.
#[derive(Debug, Deserialize)]
pub struct StoredModelV2 {
    version: u64,
    created_ms: u64,
    run: RunRecord,
    artifact: ArtifactV2,
    parent: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct ArtifactV2 {
    kind: ModelKind,
    feature_names: Vec<String>,
    coefficients: Vec<f64>,
    intercept: f64,
    scaler: Option<Scaler>,
}

impl From<StoredModelV2> for StoredModel {
    fn from(old: StoredModelV2) -> Self {
        StoredModel {
            version: old.version,
            created_ms: old.created_ms,
            run: old.run,
            artifact: ModelArtifact {
                kind: old.artifact.kind,
                feature_names: old.artifact.feature_names,
                coefficients: old.artifact.coefficients,
                intercept: old.artifact.intercept,
                scaler: old.artifact.scaler,
                profile: None,
            },
            parent: old.parent,
        }
    }
}
