//! Scoring a batch request: the model's input rows of every known user,
//! computed with the model's feature plan, scored in one call of the model's
//! engine ([`ml_onnx::Scorer`]: one tensor call for an ONNX model).

use std::borrow::Cow;

use ml_shared::features::FeatureStore;
use ml_shared::profile::FeatureSample;

use crate::serving::LoadedModel;

/// A scored batch: one prediction per requested id, in request order
/// (`None` for an unknown user or a non-finite prediction), and the unknown
/// ids.
pub type Scored<'p> = (Vec<Option<f64>>, Vec<Cow<'p, str>>);

/// The predictions of a batch, in request order (`None` for an unknown user
/// or a non-finite prediction), and the unknown ids. The sample, when given,
/// gets the last known user's raw features and prediction.
pub fn score_batch<'p>(
    model: &LoadedModel,
    store: &FeatureStore,
    user_ids: Vec<Cow<'p, str>>,
    sample: Option<&mut FeatureSample>,
) -> Result<Scored<'p>, String> {
    let width = model.plan.len();
    let mut x = vec![0.0; width];
    let mut rows = Vec::with_capacity(user_ids.len() * width);
    let mut known = Vec::with_capacity(user_ids.len());
    let mut unknown = Vec::new();
    for id in user_ids {
        match store.raw(&id) {
            Some(raw) => {
                model.plan.compute_into(raw, &mut x);
                rows.extend_from_slice(&x);
                known.push(Some(raw));
            }
            None => {
                known.push(None);
                unknown.push(id);
            }
        }
    }
    let n = known.iter().filter(|r| r.is_some()).count();
    let mut scores = model
        .scorer
        .predict_batch(&rows, n)
        .map_err(|e| e.to_string())?
        .into_iter();
    let mut last = None;
    let predictions = known
        .into_iter()
        .map(|raw| {
            let raw = raw?;
            let p = scores.next().filter(|p| p.is_finite())?;
            last = Some((raw, p));
            Some(p)
        })
        .collect();
    if let (Some(sample), Some((raw, p))) = (sample, last) {
        sample.set(raw, p);
    }
    Ok((predictions, unknown))
}
