//! The feature store: raw features per `user_id`, and derived features
//! registered by name as functions of raw ones.
//!
//! Training and serving both turn a row of raw values into a model's input
//! through a [`FeaturePlan`] compiled from the model's ordered feature names,
//! so the two can never disagree on what `feature_3` means.

use std::collections::HashMap;

use crate::data::Dataset;

/// Raw feature columns read from the data, in this order.
pub const RAW_FEATURES: [&str; 2] = ["feature_1", "feature_2"];

/// Most raw inputs a derived feature may take.
pub const MAX_DERIVED_INPUTS: usize = 8;

/// A derived feature: a pure function of some raw features, given in the
/// order they were named at registration.
pub type DeriveFn = fn(&[f64]) -> f64;

/// Why a feature cannot be registered or produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeatureError {
    /// The name is neither a raw feature nor a registered derived one.
    #[error("unknown feature {0:?}")]
    Unknown(String),
    /// The name is already taken.
    #[error("feature {0:?} is already defined")]
    Duplicate(String),
    /// A derived feature names too many inputs.
    #[error("derived feature {0:?} takes more than {MAX_DERIVED_INPUTS} inputs")]
    TooManyInputs(String),
}

#[derive(Debug, Clone)]
struct Derived {
    name: String,
    inputs: Vec<usize>,
    f: DeriveFn,
}

/// The catalogue of features: raw columns plus derived features by name.
#[derive(Debug, Clone)]
pub struct FeatureRegistry {
    raw: Vec<String>,
    derived: Vec<Derived>,
}

impl Default for FeatureRegistry {
    /// The platform's features: `feature_1`, `feature_2`, and
    /// `feature_3 = feature_1²`.
    fn default() -> Self {
        let mut registry = Self::with_raw(RAW_FEATURES.iter().map(|s| s.to_string()).collect());
        registry
            .register("feature_3", &["feature_1"], |x| x[0] * x[0])
            .expect("default features are consistent");
        registry
    }
}

impl FeatureRegistry {
    /// A registry with the given raw columns and no derived features.
    pub fn with_raw(raw: Vec<String>) -> Self {
        Self {
            raw,
            derived: Vec::new(),
        }
    }

    /// Registers `name` as `f(inputs…)`, where every input is a raw feature.
    pub fn register(
        &mut self,
        name: &str,
        inputs: &[&str],
        f: DeriveFn,
    ) -> Result<(), FeatureError> {
        if self.names().any(|n| n == name) {
            return Err(FeatureError::Duplicate(name.to_owned()));
        }
        if inputs.len() > MAX_DERIVED_INPUTS {
            return Err(FeatureError::TooManyInputs(name.to_owned()));
        }
        let inputs = inputs
            .iter()
            .map(|input| {
                self.raw_index(input)
                    .ok_or_else(|| FeatureError::Unknown((*input).to_owned()))
            })
            .collect::<Result<_, _>>()?;
        self.derived.push(Derived {
            name: name.to_owned(),
            inputs,
            f,
        });
        Ok(())
    }

    /// The raw columns, in storage order.
    pub fn raw_names(&self) -> &[String] {
        &self.raw
    }

    /// Position of a raw column.
    pub fn raw_index(&self, name: &str) -> Option<usize> {
        self.raw.iter().position(|r| r == name)
    }

    /// Every feature this registry can produce: raw first, then derived.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.raw
            .iter()
            .map(String::as_str)
            .chain(self.derived.iter().map(|d| d.name.as_str()))
    }

    /// Compiles the computation of `names`, in that order, from a raw row.
    pub fn plan(&self, names: &[String]) -> Result<FeaturePlan, FeatureError> {
        let steps = names
            .iter()
            .map(|name| {
                if let Some(i) = self.raw_index(name) {
                    Ok(Step::Raw(i))
                } else if let Some(d) = self.derived.iter().find(|d| &d.name == name) {
                    Ok(Step::Derived {
                        inputs: d.inputs.clone(),
                        f: d.f,
                    })
                } else {
                    Err(FeatureError::Unknown(name.clone()))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(FeaturePlan {
            names: names.to_vec(),
            steps,
        })
    }
}

#[derive(Debug, Clone)]
enum Step {
    Raw(usize),
    Derived { inputs: Vec<usize>, f: DeriveFn },
}

/// How to compute one model's ordered inputs from a raw row.
#[derive(Debug, Clone)]
pub struct FeaturePlan {
    names: Vec<String>,
    steps: Vec<Step>,
}

impl FeaturePlan {
    /// The features produced, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// How many features the plan produces.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether the plan produces no feature at all.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Writes the features for `raw` into `out` (`out.len() == self.len()`).
    /// Allocates nothing.
    pub fn compute_into(&self, raw: &[f64], out: &mut [f64]) {
        debug_assert_eq!(out.len(), self.steps.len());
        for (slot, step) in out.iter_mut().zip(&self.steps) {
            *slot = match step {
                Step::Raw(i) => raw[*i],
                Step::Derived { inputs, f } => {
                    let mut args = [0.0; MAX_DERIVED_INPUTS];
                    for (a, i) in args.iter_mut().zip(inputs) {
                        *a = raw[*i];
                    }
                    f(&args[..inputs.len()])
                }
            };
        }
    }

    /// Computes the features for `raw` into a new vector.
    pub fn compute(&self, raw: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.len()];
        self.compute_into(raw, &mut out);
        out
    }
}

/// Raw features of every known entity, keyed by `user_id`.
///
/// The index hashes with `foldhash` (randomly seeded per store, so keys cannot
/// be chosen to collide, and several times faster than SipHash on UUIDs).
#[derive(Debug, Clone, Default)]
pub struct FeatureStore {
    width: usize,
    index: HashMap<String, usize, foldhash::fast::RandomState>,
    values: Vec<f64>,
}

impl FeatureStore {
    /// Builds the store from a loaded dataset (its raw feature columns).
    pub fn from_dataset(data: &Dataset) -> Self {
        let index = data
            .user_ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        Self {
            width: data.raw_names.len(),
            index,
            values: data.features.clone(),
        }
    }

    /// The raw features of `user_id`, in the registry's raw order.
    pub fn raw(&self, user_id: &str) -> Option<&[f64]> {
        let row = *self.index.get(user_id)?;
        Some(&self.values[row * self.width..(row + 1) * self.width])
    }

    /// Number of entities.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the store holds no entity.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(ns: &[&str]) -> Vec<String> {
        ns.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn feature_3_is_feature_1_squared() {
        let registry = FeatureRegistry::default();
        let plan = registry
            .plan(&names(&["feature_3", "feature_1", "feature_2"]))
            .unwrap();
        assert_eq!(plan.compute(&[3.0, -2.0]), vec![9.0, 3.0, -2.0]);
    }

    #[test]
    fn unknown_features_cannot_be_planned() {
        let registry = FeatureRegistry::default();
        let err = registry
            .plan(&names(&["feature_1", "feature_9"]))
            .unwrap_err();
        assert_eq!(err, FeatureError::Unknown("feature_9".into()));
    }

    #[test]
    fn registration_checks_names_and_inputs() {
        let mut registry = FeatureRegistry::default();
        assert_eq!(
            registry.register("feature_3", &["feature_1"], |x| x[0]),
            Err(FeatureError::Duplicate("feature_3".into()))
        );
        assert_eq!(
            registry.register("f4", &["nope"], |x| x[0]),
            Err(FeatureError::Unknown("nope".into()))
        );
        registry
            .register("product", &["feature_1", "feature_2"], |x| x[0] * x[1])
            .unwrap();
        let plan = registry.plan(&names(&["product"])).unwrap();
        assert_eq!(plan.compute(&[2.0, 5.0]), vec![10.0]);
    }
}
