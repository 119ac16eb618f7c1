//! [`OnnxModel`]: load (bounded, checked, optimised once) and batch predict.

use crate::error::{chain, OnnxError};
use crate::inspect::{inspect, InputSignature};
use crate::ops;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{ensure, DimLike};

/// What a load accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The largest model file accepted, in bytes.
    pub max_bytes: usize,
    /// The declared number of features: the model's input must be this wide.
    pub feature_count: usize,
}

impl Limits {
    /// The default size limit: 64 MiB.
    pub const DEFAULT_MAX_BYTES: usize = 64 << 20;

    /// The default size limit, for models of `feature_count` features.
    pub fn new(feature_count: usize) -> Limits {
        Limits {
            max_bytes: Self::DEFAULT_MAX_BYTES,
            feature_count,
        }
    }
}

/// What the model computes, as read from its outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One value per row (`[N]` or `[N, 1]`).
    Regressor,
    /// A binary classifier: a label (`[N]`, integer) and probabilities (`[N, 2]`).
    Classifier,
}

/// One row's prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Output {
    /// A regressor's value.
    Value(f64),
    /// A binary classifier's probability of its second class (class 1 for
    /// 0/1 labels) and the label the model chose.
    Class {
        /// Probability of the second class.
        probability: f64,
        /// The model's label output.
        label: i64,
    },
}

/// Where the outputs are in the plan's results.
#[derive(Debug, Clone, Copy)]
enum Layout {
    Regressor { value: usize },
    Classifier { label: usize, probabilities: usize },
}

/// A loaded, optimised ONNX model. Cheap to share: predictions take `&self`.
#[derive(Debug, Clone)]
pub struct OnnxModel {
    plan: Arc<TypedRunnableModel>,
    input: InputSignature,
    layout: Layout,
}

impl OnnxModel {
    /// Parses, checks and optimises a model, then runs it once on zeros.
    ///
    /// tract is not written for hostile input and may panic on a malformed
    /// graph the checks here did not anticipate; a panic while preparing the
    /// model is caught and reported as [`OnnxError::Panicked`] so that a bad
    /// upload cannot take a service down. This is a last guard: every refusal
    /// the tests know of is a typed error before tract sees the graph.
    pub fn load(bytes: &[u8], limits: &Limits) -> Result<OnnxModel, OnnxError> {
        if bytes.is_empty() {
            return Err(OnnxError::Empty);
        }
        if bytes.len() > limits.max_bytes {
            return Err(OnnxError::TooLarge {
                size: bytes.len(),
                max: limits.max_bytes,
            });
        }
        let model = catch_unwind(AssertUnwindSafe(|| Self::prepare(bytes, limits)))
            .unwrap_or_else(|panic| Err(OnnxError::Panicked(panic_message(panic.as_ref()))))?;
        tracing::info!(
            bytes = bytes.len(),
            kind = ?model.kind(),
            features = model.feature_count(),
            input = ?model.input.datum_type,
            "onnx model loaded"
        );
        Ok(model)
    }

    fn prepare(bytes: &[u8], limits: &Limits) -> Result<OnnxModel, OnnxError> {
        let onnx = ops::onnx();
        let mut proto = onnx
            .proto_model_for_read(&mut &bytes[..])
            .map_err(|e| OnnxError::Malformed(chain(&e)))?;
        let input = inspect(&mut proto, limits)?;
        let prepare = |e: TractError| OnnxError::Prepare(chain(&e));
        let mut model = onnx.model_for_proto_model(&proto).map_err(prepare)?;
        let batch = model.symbols.sym("N");
        let shape = tvec![batch.to_dim(), input.features.to_dim()];
        model
            .set_input_fact(0, InferenceFact::dt_shape(input.datum_type, shape))
            .map_err(prepare)?;
        let typed = model.into_typed().map_err(prepare)?;
        check_einsums(&typed)?;
        let typed = typed.into_optimized().map_err(prepare)?;
        let layout = layout(&typed)?;
        let plan = typed.into_runnable().map_err(prepare)?;
        let model = OnnxModel {
            plan,
            input,
            layout,
        };
        model.smoke_test()?;
        Ok(model)
    }

    /// Predicts batches of zeros (1 and 3 rows) so that a model the engine
    /// loads but cannot run is refused at load rather than at its first request.
    fn smoke_test(&self) -> Result<(), OnnxError> {
        for n in [1, 3] {
            let zeros = vec![0.0; n * self.input.features];
            self.predict(&zeros, n)
                .map_err(|e| OnnxError::Prepare(format!("a test batch of {n} rows fails: {e}")))?;
        }
        Ok(())
    }

    /// Regressor or classifier.
    pub fn kind(&self) -> Kind {
        match self.layout {
            Layout::Regressor { .. } => Kind::Regressor,
            Layout::Classifier { .. } => Kind::Classifier,
        }
    }

    /// The width of the model's input.
    pub fn feature_count(&self) -> usize {
        self.input.features
    }

    /// Predicts `n` rows given row-major (`n × feature_count` values), in one
    /// call of the engine. f32 models get the values rounded to f32.
    pub fn predict(&self, rows: &[f64], n: usize) -> Result<Vec<Output>, OnnxError> {
        let width = self.input.features;
        if n.checked_mul(width) != Some(rows.len()) {
            return Err(OnnxError::Batch(format!(
                "{} values for {n} rows of {width} features",
                rows.len()
            )));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let input = if self.input.datum_type == DatumType::F32 {
            let rows: Vec<f32> = rows.iter().map(|&x| x as f32).collect();
            Tensor::from_shape(&[n, width], &rows)
        } else {
            Tensor::from_shape(&[n, width], rows)
        }
        .map_err(|e| OnnxError::Batch(chain(&e)))?;
        // A panic of the engine fails this prediction, not the caller.
        let outputs = catch_unwind(AssertUnwindSafe(|| {
            self.plan.run(tvec!(input.into_tvalue()))
        }))
        .map_err(|panic| {
            OnnxError::Run(format!("engine failure: {}", panic_message(panic.as_ref())))
        })?
        .map_err(|e| OnnxError::Run(chain(&e)))?;
        decode(self.layout, &outputs, n).map_err(|e| OnnxError::Run(chain(&e)))
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Checks that the inputs of every EinSum (matrix products) agree on the
/// length of each axis they share. tract does not check this for the products
/// its ONNX-ML expansions build from attributes: a `LinearClassifier` whose
/// coefficients do not match its input width ran, reading past its input in
/// release builds (onnxruntime refuses such a model).
fn check_einsums(model: &TypedModel) -> Result<(), OnnxError> {
    use tract_onnx::tract_core::ops::einsum::EinSum;
    for node in model.nodes() {
        let Some(op) = node.op_as::<EinSum>() else {
            continue;
        };
        let facts = model
            .node_input_facts(node.id)
            .map_err(|e| OnnxError::Prepare(chain(&e)))?;
        for axis in op.axes.iter_all_axes() {
            let mut dims = axis
                .inputs
                .iter()
                .zip(&facts)
                .flat_map(|(positions, fact)| {
                    positions
                        .iter()
                        .filter_map(|&p| fact.shape.get(p))
                        .filter(|d| !d.is_one())
                });
            if let Some(first) = dims.next() {
                if let Some(other) = dims.find(|d| *d != first) {
                    return Err(OnnxError::Prepare(format!(
                        "node '{}' multiplies along an axis of {first} and {other} values",
                        node.name
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Reads the output convention from the optimised model's output facts.
fn layout(model: &TypedModel) -> Result<Layout, OnnxError> {
    let facts = (0..model.outputs.len())
        .map(|i| model.output_fact(i).cloned())
        .collect::<TractResult<Vec<TypedFact>>>()
        .map_err(|e| OnnxError::Prepare(chain(&e)))?;
    let is_float = |f: &TypedFact| f.datum_type.is_float();
    let width = |f: &TypedFact| f.shape.get(1).and_then(|d| d.to_usize().ok());
    match &facts[..] {
        [value]
            if is_float(value)
                && (value.rank() == 1 || (value.rank() == 2 && width(value) == Some(1))) =>
        {
            Ok(Layout::Regressor { value: 0 })
        }
        [value] => Err(OnnxError::Output(format!(
            "one output of {:?} {:?}; a regressor outputs floats of shape [N] or [N, 1]",
            value.datum_type, value.shape
        ))),
        [a, b] => classifier_layout(a, b, width),
        _ => Err(OnnxError::Output(format!(
            "{} outputs; a regressor has one, a classifier two (label, probabilities)",
            facts.len()
        ))),
    }
}

fn classifier_layout(
    a: &TypedFact,
    b: &TypedFact,
    width: impl Fn(&TypedFact) -> Option<usize>,
) -> Result<Layout, OnnxError> {
    let (label, probabilities) = if a.rank() == 1 { (0, 1) } else { (1, 0) };
    let (label_fact, prob_fact) = if label == 0 { (a, b) } else { (b, a) };
    // tract types ONNX's int64 after a Cast as TDim (its integer of shapes).
    let integer = label_fact.datum_type.is_integer() || label_fact.datum_type == DatumType::TDim;
    if !integer {
        return Err(OnnxError::Output(format!(
            "the label output is {:?}; integer class labels (0/1) are supported",
            label_fact.datum_type
        )));
    }
    if !prob_fact.datum_type.is_float() || prob_fact.rank() != 2 {
        return Err(OnnxError::Output(format!(
            "the probabilities output is {:?} {:?}; [N, 2] floats are supported",
            prob_fact.datum_type, prob_fact.shape
        )));
    }
    match width(prob_fact) {
        Some(2) => Ok(Layout::Classifier {
            label,
            probabilities,
        }),
        other => Err(OnnxError::Output(format!(
            "{} classes; binary classifiers are supported",
            other.map_or_else(|| "an unknown number of".to_string(), |n| n.to_string())
        ))),
    }
}

/// Turns the plan's outputs into one [`Output`] per row.
fn decode(layout: Layout, outputs: &[TValue], n: usize) -> TractResult<Vec<Output>> {
    let column = |ix: usize| -> TractResult<Vec<f64>> {
        let t = outputs[ix].cast_to::<f64>()?;
        let view = t.to_plain_array_view::<f64>()?;
        ensure!(
            view.shape()[0] == n,
            "{} rows out for {n} in",
            view.shape()[0]
        );
        // Regressors: the only value of a row; classifiers: the second column.
        let stride = view.len() / n;
        Ok(view
            .iter()
            .skip(stride - 1)
            .step_by(stride)
            .copied()
            .collect())
    };
    match layout {
        Layout::Regressor { value } => Ok(column(value)?.into_iter().map(Output::Value).collect()),
        Layout::Classifier {
            label,
            probabilities,
        } => {
            let p = column(probabilities)?;
            let labels = outputs[label].cast_to::<i64>()?;
            let labels = labels.to_plain_array_view::<i64>()?;
            ensure!(labels.len() == n, "{} labels for {n} rows", labels.len());
            Ok(p.into_iter()
                .zip(labels.iter())
                .map(|(probability, &label)| Output::Class { probability, label })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<OnnxModel>();
    }

    #[test]
    fn empty_and_oversized_files_are_refused_before_parsing() {
        assert!(matches!(
            OnnxModel::load(&[], &Limits::new(3)),
            Err(OnnxError::Empty)
        ));
        let limits = Limits {
            max_bytes: 4,
            feature_count: 3,
        };
        let err = OnnxModel::load(&[0; 5], &limits).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the model file is 5 bytes, more than the limit of 4 bytes"
        );
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for bytes in [
            &b"not onnx at all"[..],
            &[0xff; 64],
            &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        ] {
            let err = OnnxModel::load(bytes, &Limits::new(3)).unwrap_err();
            assert!(matches!(err, OnnxError::Malformed(_)), "{err}");
        }
    }
}
