//! The model artifact: everything a predictor needs to serve a model.

use serde::{Deserialize, Serialize};

use crate::profile::ReferenceProfile;

/// The family of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Ordinary least squares: `intercept + Σ coefficient·feature`.
    Linear,
}

impl ModelKind {
    /// The name used in logs, the experiments log and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Linear => "linear",
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
    /// The training data's reference profile, for drift monitoring (absent
    /// from models trained without one).
    #[serde(default)]
    pub profile: Option<ReferenceProfile>,
}

impl ModelArtifact {
    /// Checks the artifact's internal consistency.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.feature_names.is_empty() {
            return Err(ModelError::NoFeatures);
        }
        if self.coefficients.len() != self.feature_names.len() {
            return Err(ModelError::ShapeMismatch {
                coefficients: self.coefficients.len(),
                features: self.feature_names.len(),
            });
        }
        for (i, name) in self.feature_names.iter().enumerate() {
            if self.feature_names[..i].contains(name) {
                return Err(ModelError::DuplicateFeature(name.clone()));
            }
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
        Ok(())
    }

    /// The prediction for one feature vector, in `feature_names` order.
    #[inline]
    pub fn predict(&self, features: &[f64]) -> f64 {
        debug_assert_eq!(features.len(), self.coefficients.len());
        self.intercept
            + self
                .coefficients
                .iter()
                .zip(features)
                .map(|(c, x)| c * x)
                .sum::<f64>()
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
            profile: None,
        }
    }

    #[test]
    fn predicts_the_affine_function() {
        assert_eq!(model().predict(&[3.0, 4.0]), 0.5 + 6.0 - 4.0);
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
