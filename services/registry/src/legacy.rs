//! The shapes of artifact files written by codec formats 1 to 3, so that a
//! registry directory written before the logistic family and the scaler
//! (format 1), the reference profile (format 2) or imported ONNX models
//! (format 3) existed still opens: every
//! old version stays listed, servable and promotable (without a drift check,
//! for want of a profile).

use ml_shared::messages::{Metrics, RunRecord, TrainParams};
use ml_shared::model::{ModelArtifact, ModelKind, Scaler};
use ml_shared::profile::ReferenceProfile;
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
                onnx: None,
            },
            // Format 1 recorded no lineage.
            parent: None,
        }
    }
}

/// A stored model as formats 2 and 3 wrote it, with its format's artifact.
#[derive(Debug, Deserialize)]
pub struct StoredModelOf<A> {
    version: u64,
    created_ms: u64,
    run: RunRecord,
    artifact: A,
    parent: Option<u64>,
}

/// Format 2: the artifact had no profile.
pub type StoredModelV2 = StoredModelOf<ArtifactV2>;

/// Format 3: the artifact had no ONNX graph.
pub type StoredModelV3 = StoredModelOf<ArtifactV3>;

/// Format 2's artifact.
#[derive(Debug, Deserialize)]
pub struct ArtifactV2 {
    kind: ModelKind,
    feature_names: Vec<String>,
    coefficients: Vec<f64>,
    intercept: f64,
    scaler: Option<Scaler>,
}

/// Format 3's artifact: format 2's fields, then the profile (bincode
/// writes a nested struct's fields in line, so this reads the flat record).
#[derive(Debug, Deserialize)]
pub struct ArtifactV3 {
    base: ArtifactV2,
    profile: Option<Box<ReferenceProfile>>,
}

impl ArtifactV2 {
    fn with_profile(self, profile: Option<Box<ReferenceProfile>>) -> ModelArtifact {
        ModelArtifact {
            kind: self.kind,
            feature_names: self.feature_names,
            coefficients: self.coefficients,
            intercept: self.intercept,
            scaler: self.scaler,
            profile,
            onnx: None,
        }
    }
}

impl From<ArtifactV2> for ModelArtifact {
    fn from(old: ArtifactV2) -> Self {
        old.with_profile(None)
    }
}

impl From<ArtifactV3> for ModelArtifact {
    fn from(old: ArtifactV3) -> Self {
        old.base.with_profile(old.profile)
    }
}

impl<A: Into<ModelArtifact>> From<StoredModelOf<A>> for StoredModel {
    fn from(old: StoredModelOf<A>) -> Self {
        StoredModel {
            version: old.version,
            created_ms: old.created_ms,
            run: old.run,
            artifact: old.artifact.into(),
            parent: old.parent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::read_model;
    use serde::Serialize;

    #[derive(Serialize)]
    struct WrittenV3<A> {
        version: u64,
        created_ms: u64,
        run: RunRecord,
        artifact: A,
        parent: Option<u64>,
    }

    #[derive(Serialize)]
    struct WrittenArtifactV3 {
        kind: ModelKind,
        feature_names: Vec<String>,
        coefficients: Vec<f64>,
        intercept: f64,
        scaler: Option<Scaler>,
        profile: Option<Box<ReferenceProfile>>,
    }

    #[derive(Serialize)]
    struct WrittenArtifactV2 {
        kind: ModelKind,
        feature_names: Vec<String>,
        coefficients: Vec<f64>,
        intercept: f64,
        scaler: Option<Scaler>,
    }

    #[test]
    fn a_format_2_artifact_file_reads_as_a_native_model_without_a_profile() {
        let WrittenV3 {
            version,
            created_ms,
            run,
            artifact,
            parent,
        } = written_v3();
        let written = WrittenV3 {
            version,
            created_ms,
            run,
            artifact: WrittenArtifactV2 {
                kind: artifact.kind,
                feature_names: artifact.feature_names,
                coefficients: artifact.coefficients,
                intercept: artifact.intercept,
                scaler: Some(Scaler {
                    mean: vec![1.0],
                    scale: vec![2.0],
                }),
            },
            parent,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model-00000007.bin");
        std::fs::write(&path, ml_shared::codec::encode_as_version(&written, 2)).unwrap();
        let model = read_model(&path).unwrap();
        assert_eq!((model.version, model.parent), (7, Some(6)));
        assert!(model.artifact.profile.is_none() && model.artifact.onnx.is_none());
        // z = (3 − 1)/2 = 1; 2·1 + 1.
        assert_eq!(model.artifact.predict(&[3.0]), 3.0);
    }

    #[test]
    fn a_format_3_artifact_file_reads_as_a_native_model() {
        let written = written_v3();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model-00000007.bin");
        std::fs::write(&path, ml_shared::codec::encode_as_version(&written, 3)).unwrap();
        let model = read_model(&path).unwrap();
        assert_eq!((model.version, model.parent), (7, Some(6)));
        assert_eq!(model.artifact.onnx, None);
        assert_eq!(model.artifact.predict(&[3.0]), 7.0);
    }

    fn written_v3() -> WrittenV3<WrittenArtifactV3> {
        let names = vec!["feature_1".to_owned()];
        WrittenV3 {
            version: 7,
            created_ms: 1,
            run: RunRecord {
                run_id: "r".into(),
                started_ms: 1,
                duration_ms: 2,
                params: TrainParams {
                    model: "linear".into(),
                    seed: 1,
                    validation_fraction: 0.2,
                },
                metrics: Metrics::regression(1.0, 1.0, 0.5),
                rows_train: 10,
                rows_validation: 2,
                data_path: "d.csv".into(),
                data_fingerprint: "f".into(),
                feature_names: names.clone(),
            },
            artifact: WrittenArtifactV3 {
                kind: ModelKind::Linear,
                feature_names: names,
                coefficients: vec![2.0],
                intercept: 1.0,
                scaler: None,
                profile: None,
            },
            parent: Some(6),
        }
    }
}
