//! Drift of the served traffic against the production model's reference
//! profile.
//!
//! The predictors sample requests: their raw features and the prediction.
//! The monitor computes the model's features from the raw ones with the
//! feature store's plan (the code training and serving use), counts them
//! and the predictions in the profile's bins over the reporting window, and
//! reports the population stability index of each against the training
//! split. Only samples answered by the production model count, and only
//! when the window holds at least `DRIFT_MIN_SAMPLES` of them: fewer give a
//! noisy index.

use std::collections::BTreeMap;
use std::sync::Arc;

use ml_shared::features::{FeaturePlan, FeatureRegistry};
use ml_shared::messages::{EventBatch, ModelRelease};
use ml_shared::profile::ReferenceProfile;
use serde::{Deserialize, Serialize};

/// Most model features the monitor computes per sample (as the predictor).
const MAX_FEATURES: usize = 64;

/// The production model's profile, ready to count samples against.
#[derive(Debug)]
pub struct DriftReference {
    version: u64,
    profile: ReferenceProfile,
    plan: FeaturePlan,
    raw_names: Vec<String>,
}

impl DriftReference {
    /// The reference of a released model; an error says why drift cannot
    /// be checked for it (no profile, a malformed one, unknown features).
    pub fn new(release: &ModelRelease, registry: &FeatureRegistry) -> Result<Self, String> {
        let artifact = &release.artifact;
        let profile = artifact
            .profile
            .as_deref()
            .cloned()
            .ok_or("the model carries no reference profile")?;
        profile
            .validate(&artifact.feature_names)
            .map_err(|e| e.to_string())?;
        if artifact.feature_names.len() > MAX_FEATURES {
            return Err(format!("more than {MAX_FEATURES} features"));
        }
        let plan = registry
            .plan(&artifact.feature_names)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            version: release.version,
            profile,
            plan,
            raw_names: registry.raw_names().to_vec(),
        })
    }

    /// The model version the profile belongs to.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether `release` is this reference's model (a routing-table change
    /// republishes production under a new epoch: the reference and its
    /// window stand).
    pub fn is_for(&self, release: &ModelRelease) -> bool {
        self.version == release.version
            && release.artifact.profile.as_deref() == Some(&self.profile)
    }
}

/// Drift of one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftReport {
    /// The production model whose reference was used.
    pub model_version: u64,
    /// Samples counted.
    pub samples: u64,
    /// PSI of each model feature.
    pub features: BTreeMap<String, f64>,
    /// PSI of the predictions.
    pub prediction: f64,
    /// The largest of them.
    pub max: f64,
    /// Which one it is (a feature name, or `prediction`).
    pub max_of: String,
}

/// Samples counted in the reference's bins over one window.
#[derive(Debug)]
pub struct DriftWindow {
    reference: Arc<DriftReference>,
    features: Vec<Vec<u64>>,
    prediction: Vec<u64>,
    samples: u64,
    /// Samples of batches whose raw features are not the monitor's.
    pub unmatched: u64,
}

impl DriftWindow {
    /// An empty window against `reference`.
    pub fn new(reference: Arc<DriftReference>) -> Self {
        Self {
            features: reference
                .profile
                .features
                .iter()
                .map(|f| vec![0; f.bins.len()])
                .collect(),
            prediction: vec![0; reference.profile.prediction.len()],
            samples: 0,
            unmatched: 0,
            reference,
        }
    }

    /// The same reference, with no samples.
    pub fn fresh(&self) -> Self {
        Self::new(self.reference.clone())
    }

    /// The reference this window counts against.
    pub fn reference(&self) -> &Arc<DriftReference> {
        &self.reference
    }

    /// Counts the samples of `batch` answered by the reference's model.
    pub fn add(&mut self, batch: &EventBatch) {
        let reference = &*self.reference;
        let mut x = [0.0; MAX_FEATURES];
        let x = &mut x[..reference.plan.len()];
        let mut names_checked = false;
        for event in &batch.events {
            let Some(sample) = &event.sample else {
                continue;
            };
            if event.model_version != Some(reference.version) {
                continue;
            }
            if !names_checked {
                if batch.raw_features != reference.raw_names {
                    self.unmatched +=
                        batch.events.iter().filter(|e| e.sample.is_some()).count() as u64;
                    return;
                }
                names_checked = true;
            }
            if sample.values().len() != reference.raw_names.len() {
                self.unmatched += 1;
                continue;
            }
            reference.plan.compute_into(sample.values(), x);
            for ((counts, profile), value) in self
                .features
                .iter_mut()
                .zip(&reference.profile.features)
                .zip(x.iter())
            {
                counts[profile.bins.bin(*value)] += 1;
            }
            self.prediction[reference.profile.prediction.bin(sample.prediction)] += 1;
            self.samples += 1;
        }
    }

    /// Samples counted so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The window's PSI per feature and for predictions, when it holds at
    /// least `min_samples` samples.
    pub fn report(&self, min_samples: u64) -> Option<DriftReport> {
        if self.samples == 0 || self.samples < min_samples {
            return None;
        }
        let profile = &self.reference.profile;
        let features: BTreeMap<String, f64> = profile
            .features
            .iter()
            .zip(&self.features)
            .filter_map(|(f, counts)| Some((f.name.clone(), f.bins.psi(counts)?)))
            .collect();
        let prediction = profile.prediction.psi(&self.prediction)?;
        let (max_of, max) = features
            .iter()
            .map(|(n, v)| (n.as_str(), *v))
            .chain(std::iter::once(("prediction", prediction)))
            .fold(("prediction", f64::NEG_INFINITY), |best, item| {
                if item.1 > best.1 {
                    item
                } else {
                    best
                }
            });
        Some(DriftReport {
            model_version: self.reference.version,
            samples: self.samples,
            max_of: max_of.to_owned(),
            max,
            features,
            prediction,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ml_shared::messages::{LatencyEvent, Outcome};
    use ml_shared::model::{ModelArtifact, ModelKind};
    use ml_shared::profile::FeatureSample;

    /// feature_1 uniform in [-2, 2), feature_2 in [0, 10), on a grid.
    fn grid(n: usize, shift: f64) -> Vec<[f64; 2]> {
        (0..n)
            .map(|i| {
                let u = (i as f64 + 0.5) / n as f64;
                let v = ((i * 7919) % n) as f64 / n as f64;
                [-2.0 + 4.0 * u + shift, 10.0 * v + shift]
            })
            .collect()
    }

    fn release() -> (ModelRelease, FeatureRegistry) {
        let registry = FeatureRegistry::default();
        let names: Vec<String> = registry.names().map(str::to_owned).collect();
        let mut artifact = ModelArtifact {
            kind: ModelKind::Linear,
            feature_names: names.clone(),
            coefficients: vec![2.5, -1.25, 0.8],
            intercept: 3.0,
            scaler: None,
            profile: None,
            onnx: None,
        };
        let plan = registry.plan(&names).unwrap();
        let rows: Vec<Vec<f64>> = grid(2000, 0.0).iter().map(|r| plan.compute(r)).collect();
        let columns: Vec<Vec<f64>> = (0..3)
            .map(|j| rows.iter().map(|r| r[j]).collect())
            .collect();
        let predictions: Vec<f64> = rows.iter().map(|r| artifact.predict(r)).collect();
        artifact.profile =
            ReferenceProfile::from_columns(&names, &columns, &predictions, 10).map(Box::new);
        (
            ModelRelease {
                version: 4,
                epoch: 4,
                registry_id: "test".into(),
                artifact,
                routing: None,
            },
            registry,
        )
    }

    fn batch(release: &ModelRelease, rows: &[[f64; 2]], version: u64) -> EventBatch {
        let plan = FeatureRegistry::default()
            .plan(&release.artifact.feature_names)
            .unwrap();
        EventBatch {
            predictor: "p".into(),
            seq: 0,
            dropped: 0,
            raw_features: vec!["feature_1".into(), "feature_2".into()],
            events: rows
                .iter()
                .map(|r| LatencyEvent {
                    ts_ms: 0,
                    duration_ns: 1000,
                    model_version: Some(version),
                    outcome: Outcome::Ok,
                    sample: FeatureSample::new(r, release.artifact.predict(&plan.compute(r))),
                    variant: None,
                    answer: None,
                })
                .collect(),
            shadow_dropped: 0,
        }
    }

    #[test]
    fn same_distribution_is_no_drift_and_a_shift_is() {
        let (release, registry) = release();
        let reference = Arc::new(DriftReference::new(&release, &registry).unwrap());
        let mut window = DriftWindow::new(reference.clone());
        window.add(&batch(&release, &grid(500, 0.0), 4));
        let report = window.report(100).unwrap();
        assert_eq!(report.samples, 500);
        assert!(report.max < 0.05, "{report:?}");
        assert_eq!(report.features.len(), 3);

        let mut window = window.fresh();
        window.add(&batch(&release, &grid(500, 1.5), 4));
        let report = window.report(100).unwrap();
        assert!(report.max > 0.2, "{report:?}");
        assert!(report.features["feature_2"] > 0.05, "{report:?}");
        assert!(report.prediction > 0.2, "{report:?}");
    }

    #[test]
    fn other_versions_few_samples_and_foreign_features_do_not_count() {
        let (release, registry) = release();
        let reference = Arc::new(DriftReference::new(&release, &registry).unwrap());
        let mut window = DriftWindow::new(reference);
        window.add(&batch(&release, &grid(500, 0.0), 3));
        assert_eq!(window.samples(), 0);
        window.add(&batch(&release, &grid(50, 0.0), 4));
        assert_eq!(window.report(100), None);
        let mut foreign = batch(&release, &grid(10, 0.0), 4);
        foreign.raw_features.reverse();
        window.add(&foreign);
        assert_eq!((window.samples(), window.unmatched), (50, 10));
    }

    #[test]
    fn a_republished_production_keeps_its_reference() {
        let (release, registry) = release();
        let reference = DriftReference::new(&release, &registry).unwrap();
        let mut republished = release.clone();
        republished.epoch += 1;
        assert!(reference.is_for(&republished));
        let mut other = release.clone();
        other.version += 1;
        assert!(!reference.is_for(&other));
        let mut retrained = release;
        retrained.artifact.profile = None;
        assert!(!reference.is_for(&retrained));
    }

    #[test]
    fn models_without_a_usable_profile_are_explained() {
        let (mut release, registry) = release();
        release.artifact.profile = None;
        let err = DriftReference::new(&release, &registry).unwrap_err();
        assert!(err.contains("no reference profile"), "{err}");
    }
}
