//! Data drift: the reference profile a model carries of its training data,
//! the feature samples predictors send, and the population stability index
//! (PSI) that compares the two.
//!
//! A profile holds, for each model feature and for the model's predictions on
//! its training split, a binned histogram: interior cut points at the
//! training quantiles (10 bins by default) and the share of training rows in
//! each bin. Production values are counted in the same bins, and
//! `PSI = Σ (actual − expected) · ln(actual / expected)` over the bins. By the
//! usual reading, below 0.1 is no shift, 0.1–0.2 a moderate one, and above
//! 0.2 a significant one.

use serde::{Deserialize, Serialize};

/// Bins of a profile computed by the trainer.
pub const DEFAULT_BINS: usize = 10;

/// Most raw feature values a [`FeatureSample`] carries.
pub const SAMPLE_WIDTH: usize = 8;

/// Smallest share used in the PSI: an empty bin would make it infinite.
pub const PSI_FLOOR: f64 = 1e-4;

/// Why a profile is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// The profile's features are not the model's, in the model's order.
    #[error("the profile describes features {profile:?}, the model takes {model:?}")]
    Features {
        /// Feature names in the profile.
        profile: Vec<String>,
        /// Feature names of the model.
        model: Vec<String>,
    },
    /// Edges and proportions do not fit together, or are not finite, or the
    /// edges do not increase, or the proportions do not sum to 1.
    #[error("histogram of {0:?} is malformed: {1}")]
    Malformed(String, String),
}

/// A histogram over the real line: bin `i` holds the values in
/// `(edges[i-1], edges[i]]`, the first bin everything up to `edges[0]` and
/// the last everything above the last edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bins {
    /// Interior cut points, strictly increasing.
    pub edges: Vec<f64>,
    /// Share of the reference values in each bin: `edges.len() + 1` entries
    /// summing to 1.
    pub proportions: Vec<f64>,
}

impl Bins {
    /// Quantile bins of `values` (at most `bins` of them; fewer when values
    /// repeat), with the share of `values` in each. `None` when there is no
    /// value or one is not finite.
    pub fn from_values(values: &[f64], bins: usize) -> Option<Self> {
        if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let bins = bins.max(1);
        let mut edges: Vec<f64> = Vec::with_capacity(bins);
        for j in 1..bins {
            // The last value of the j-th n/bins slice: with right-closed bins
            // it leaves that slice in the lower bin.
            let k = (j * n).div_ceil(bins).max(1);
            let edge = sorted[k - 1];
            if edges.last().is_none_or(|last| edge > *last) {
                edges.push(edge);
            }
        }
        if edges.is_empty() {
            // One bin only, or every value equal: a single cut keeps the
            // shape "everything at or below the reference value".
            edges.push(sorted[n - 1]);
        }
        let mut counts = vec![0u64; edges.len() + 1];
        let mut bins = Bins {
            edges,
            proportions: Vec::new(),
        };
        for v in &sorted {
            counts[bins.bin(*v)] += 1;
        }
        bins.proportions = counts.iter().map(|c| *c as f64 / n as f64).collect();
        Some(bins)
    }

    /// Number of bins.
    pub fn len(&self) -> usize {
        self.proportions.len()
    }

    /// Whether there is no bin (only for a malformed histogram).
    pub fn is_empty(&self) -> bool {
        self.proportions.is_empty()
    }

    /// The bin of `x` (a binary search; NaN goes to the first bin).
    #[inline]
    pub fn bin(&self, x: f64) -> usize {
        self.edges.partition_point(|e| *e < x)
    }

    /// The PSI of `counts` (one per bin) against this reference. `None` when
    /// `counts` is empty of values or of the wrong length.
    pub fn psi(&self, counts: &[u64]) -> Option<f64> {
        psi(&self.proportions, counts)
    }

    /// Checks the histogram's shape; `name` goes into the error.
    pub fn validate(&self, name: &str) -> Result<(), ProfileError> {
        let bad = |why: &str| Err(ProfileError::Malformed(name.to_owned(), why.to_owned()));
        if self.proportions.len() != self.edges.len() + 1 {
            return bad("there must be one more proportion than edges");
        }
        if self.edges.iter().any(|e| !e.is_finite()) {
            return bad("an edge is not finite");
        }
        if self.edges.windows(2).any(|w| w[0] >= w[1]) {
            return bad("edges do not increase");
        }
        if self.proportions.iter().any(|p| !(0.0..=1.0).contains(p)) {
            return bad("a proportion is outside [0, 1]");
        }
        let sum: f64 = self.proportions.iter().sum();
        if (sum - 1.0).abs() > 1e-6 {
            return bad("proportions do not sum to 1");
        }
        Ok(())
    }
}

/// The population stability index of observed `counts` against `expected`
/// shares, with both shares floored at [`PSI_FLOOR`]. `None` when the lengths
/// differ or nothing was observed.
pub fn psi(expected: &[f64], counts: &[u64]) -> Option<f64> {
    if expected.len() != counts.len() {
        return None;
    }
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let index = expected
        .iter()
        .zip(counts)
        .map(|(e, c)| {
            let e = e.max(PSI_FLOOR);
            let a = (*c as f64 / total as f64).max(PSI_FLOOR);
            (a - e) * (a / e).ln()
        })
        .sum();
    Some(index)
}

/// The histogram of one model feature on the training split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureProfile {
    /// The feature's name.
    pub name: String,
    /// Its training distribution.
    pub bins: Bins,
}

/// What a model saw in training: one histogram per model feature, in the
/// model's order, and one of its own predictions on the training split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceProfile {
    /// Training rows the histograms count.
    pub rows: u64,
    /// One per model feature, in model order.
    pub features: Vec<FeatureProfile>,
    /// The model's predictions on its training split.
    pub prediction: Bins,
}

impl ReferenceProfile {
    /// Builds a profile from the model's inputs (`columns[i]` holds feature
    /// `names[i]` for every training row) and its predictions on them.
    /// `None` when a column or the predictions are empty or not finite.
    pub fn from_columns(
        names: &[String],
        columns: &[Vec<f64>],
        predictions: &[f64],
        bins: usize,
    ) -> Option<Self> {
        let features = names
            .iter()
            .zip(columns)
            .map(|(name, column)| {
                Some(FeatureProfile {
                    name: name.clone(),
                    bins: Bins::from_values(column, bins)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            rows: predictions.len() as u64,
            features,
            prediction: Bins::from_values(predictions, bins)?,
        })
    }

    /// The feature names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.features.iter().map(|f| f.name.as_str())
    }

    /// Checks that the profile describes `model_features`, in order, with
    /// well-formed histograms.
    pub fn validate(&self, model_features: &[String]) -> Result<(), ProfileError> {
        if !self.names().eq(model_features.iter().map(String::as_str)) {
            return Err(ProfileError::Features {
                profile: self.names().map(str::to_owned).collect(),
                model: model_features.to_vec(),
            });
        }
        for f in &self.features {
            f.bins.validate(&f.name)?;
        }
        self.prediction.validate("prediction")
    }
}

/// The raw feature values of one served request and its prediction, as a
/// predictor samples them for drift. Fixed size, so recording one allocates
/// nothing; in JSON, `{"features": [0.3, 1.5], "prediction": 1.94}` with the
/// raw features in the order the batch names them.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "SampleWire")]
pub struct FeatureSample {
    len: u8,
    values: [f64; SAMPLE_WIDTH],
    /// The prediction.
    pub prediction: f64,
}

impl Default for FeatureSample {
    fn default() -> Self {
        Self {
            len: 0,
            values: [0.0; SAMPLE_WIDTH],
            prediction: 0.0,
        }
    }
}

impl FeatureSample {
    /// A sample of `values` (at most [`SAMPLE_WIDTH`]) and `prediction`.
    pub fn new(values: &[f64], prediction: f64) -> Option<Self> {
        let mut sample = Self::default();
        sample.set(values, prediction).then_some(sample)
    }

    /// Overwrites the sample; `false` (and an empty sample) when `values` is
    /// wider than [`SAMPLE_WIDTH`].
    #[inline]
    pub fn set(&mut self, values: &[f64], prediction: f64) -> bool {
        if values.len() > SAMPLE_WIDTH {
            self.len = 0;
            return false;
        }
        self.values[..values.len()].copy_from_slice(values);
        self.len = values.len() as u8;
        self.prediction = prediction;
        true
    }

    /// The raw feature values.
    pub fn values(&self) -> &[f64] {
        &self.values[..self.len as usize]
    }

    /// Whether no value was recorded.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Serialize for FeatureSample {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("FeatureSample", 2)?;
        s.serialize_field("features", self.values())?;
        s.serialize_field("prediction", &self.prediction)?;
        s.end()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SampleWire {
    features: Vec<f64>,
    prediction: f64,
}

impl TryFrom<SampleWire> for FeatureSample {
    type Error = String;

    fn try_from(wire: SampleWire) -> Result<Self, Self::Error> {
        FeatureSample::new(&wire.features, wire.prediction).ok_or_else(|| {
            format!(
                "{} sampled features; at most {SAMPLE_WIDTH}",
                wire.features.len()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n)
            .map(|i| lo + (hi - lo) * (i as f64 + 0.5) / n as f64)
            .collect()
    }

    #[test]
    fn quantile_bins_split_the_data_evenly() {
        let bins = Bins::from_values(&uniform(1000, 0.0, 10.0), 10).unwrap();
        assert_eq!(bins.len(), 10);
        assert_eq!(bins.edges.len(), 9);
        for p in &bins.proportions {
            assert!((p - 0.1).abs() < 1e-12, "{bins:?}");
        }
        assert!((bins.edges[4] - 5.0).abs() < 0.01, "{bins:?}");
        bins.validate("x").unwrap();
        // Right-closed bins: an edge belongs to the bin below it.
        assert_eq!(bins.bin(bins.edges[0]), 0);
        assert_eq!(bins.bin(bins.edges[0] + 1e-9), 1);
        assert_eq!(bins.bin(-1e9), 0);
        assert_eq!(bins.bin(1e9), 9);
    }

    #[test]
    fn repeated_values_give_fewer_bins_with_true_shares() {
        let values = [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0];
        let bins = Bins::from_values(&values, 10).unwrap();
        assert_eq!(bins.edges, [1.0, 2.0, 3.0]);
        assert_eq!(bins.proportions, [0.4, 0.2, 0.4, 0.0]);
        let constant = Bins::from_values(&[5.0; 20], 10).unwrap();
        assert_eq!(constant.edges, [5.0]);
        assert_eq!(constant.proportions, [1.0, 0.0]);
        assert!(Bins::from_values(&[], 10).is_none());
        assert!(Bins::from_values(&[1.0, f64::NAN], 10).is_none());
    }

    #[test]
    fn psi_is_zero_for_the_same_distribution_and_large_for_a_shift() {
        let bins = Bins::from_values(&uniform(1000, 0.0, 10.0), 10).unwrap();
        let count = |values: &[f64]| {
            let mut c = vec![0u64; bins.len()];
            for v in values {
                c[bins.bin(*v)] += 1;
            }
            c
        };
        let same = bins.psi(&count(&uniform(500, 0.0, 10.0))).unwrap();
        assert!(same.abs() < 1e-9, "{same}");
        let shifted = bins.psi(&count(&uniform(500, 5.0, 15.0))).unwrap();
        assert!(shifted > 1.0, "{shifted}");
        // A small shift stays small.
        let small = bins.psi(&count(&uniform(500, 0.2, 10.2))).unwrap();
        assert!(small > 0.0 && small < 0.1, "{small}");
        assert_eq!(bins.psi(&[0; 10]), None);
        assert_eq!(bins.psi(&[1; 3]), None);
    }

    #[test]
    fn psi_matches_a_hand_computation() {
        // expected 50/50, observed 80/20:
        // (0.8-0.5)ln(0.8/0.5) + (0.2-0.5)ln(0.2/0.5)
        let want = 0.3 * (1.6f64).ln() + (-0.3) * (0.4f64).ln();
        let got = psi(&[0.5, 0.5], &[80, 20]).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    #[test]
    fn profiles_check_their_features() {
        let names = vec!["a".to_owned(), "b".to_owned()];
        let columns = vec![uniform(100, 0.0, 1.0), uniform(100, 5.0, 6.0)];
        let profile =
            ReferenceProfile::from_columns(&names, &columns, &uniform(100, 0.0, 2.0), 10).unwrap();
        assert_eq!(profile.rows, 100);
        profile.validate(&names).unwrap();
        assert!(matches!(
            profile.validate(&["b".into(), "a".into()]),
            Err(ProfileError::Features { .. })
        ));
        let mut bad = profile.clone();
        bad.features[1].bins.proportions[0] += 0.5;
        assert!(matches!(
            bad.validate(&names),
            Err(ProfileError::Malformed(..))
        ));
    }

    #[test]
    fn samples_serialise_as_a_short_list() {
        let s = FeatureSample::new(&[0.3, 1.5], 1.94).unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"{"features":[0.3,1.5],"prediction":1.94}"#);
        let back: FeatureSample = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.values(), [0.3, 1.5]);
        assert!(FeatureSample::new(&[0.0; SAMPLE_WIDTH + 1], 1.0).is_none());
        let wide = format!(r#"{{"features":{:?},"prediction":1}}"#, [0.0; 9]);
        assert!(serde_json::from_str::<FeatureSample>(&wide).is_err());
    }
}
