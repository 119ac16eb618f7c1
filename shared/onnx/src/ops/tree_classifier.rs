//! `TreeEnsembleClassifier` (ONNX-ML): tract-onnx's, with three fixes.
//!
//! - Its tables are checked first ([`RawEnsemble::validate`]): tract evaluates
//!   them with unchecked indexing.
//! - The scores are computed by [`TreeScores`] instead of tract's evaluator,
//!   which is slow (see [`super::tree_eval`]) and takes `BRANCH_GTE` nodes for
//!   leaves.
//! - The label is taken from the final probabilities (the class of the
//!   highest, the first on a tie). tract takes it from the scores before its
//!   binary layout, so for the binary classifiers skl2onnx exports (weights on
//!   class 0 only, probabilities `[1 - s, s]`) it always answered the first
//!   class. onnxruntime answers class 1 when `s > 0.5`, which is the argmax of
//!   `[1 - s, s]` with ties to the first class.
//!
//! Everything else (parsing, base values, post transform, probabilities) is
//! tract's expansion, wrapped.

use super::tree::{LeafAttrs, RawEnsemble};
use super::tree_eval::TreeScores;
use std::sync::LazyLock;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};
use tract_onnx::tract_hir::internal::*;

type Builder = fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract-onnx's own builder.
static TRACT_BUILDER: LazyLock<Option<Builder>> = LazyLock::new(|| {
    tract_onnx::onnx()
        .op_register
        .0
        .get("TreeEnsembleClassifier")
        .copied()
});

/// The registry entry: checks the tables, builds tract's op and wraps it.
pub fn build(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let labels = node
        .get_attr_opt_slice::<i64>("classlabels_int64s")?
        .map(<[i64]>::to_vec);
    let n_classes = labels.as_ref().map_or_else(
        || {
            node.get_attr_opt_tvec::<&str>("classlabels_strings")
                .map(|s| s.map_or(0, |s| s.len()))
        },
        |l| Ok(l.len()),
    )?;
    let raw = RawEnsemble::from_node(node, LeafAttrs::Class)?;
    raw.validate(n_classes).map_err(|e| format_err!("{e}"))?;
    let builder =
        TRACT_BUILDER.ok_or_else(|| format_err!("tract-onnx has no TreeEnsembleClassifier"))?;
    let (op, closures) = builder(ctx, node)?;
    let Some(labels) = labels else {
        return Ok((op, closures)); // string labels: left as tract makes them
    };
    let inner = (op.as_ref() as &dyn Op)
        .downcast_ref::<Box<dyn Expansion>>()
        .ok_or_else(|| format_err!("tract's TreeEnsembleClassifier is not an expansion"))?
        .clone();
    Ok((
        expand(LabelFromProbabilities {
            inner,
            labels: rctensor1(&labels),
        }),
        closures,
    ))
}

/// tract's classifier, with the label recomputed from its probabilities.
#[derive(Debug, Clone)]
pub struct LabelFromProbabilities {
    inner: Box<dyn Expansion>,
    labels: Arc<Tensor>,
}

impl Expansion for LabelFromProbabilities {
    fn name(&self) -> StaticName {
        self.inner.name()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(2)
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        self.inner.rules(s, inputs, outputs)
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        use tract_onnx::tract_core::ops::{cast::cast, change_axes::AxisOp};
        let first = model.nodes().len();
        let wires = self.inner.wire(prefix, model, inputs)?;
        swap_evaluator(model, first)?;
        let probabilities = wires[1];
        let argmax = Reduce::new(tvec!(1), Reducer::ArgMax(false));
        let winner = model.wire_node(format!("{prefix}.label_argmax"), argmax, &[probabilities])?;
        let winner = model.wire_node(format!("{prefix}.label_rm_axis"), AxisOp::Rm(1), &winner)?;
        let winner = model.wire_node(
            format!("{prefix}.label_i32"),
            cast(i32::datum_type()),
            &winner,
        )?;
        let lookup = tract_onnx_opl::ml::DirectLookup::new(self.labels.clone(), rctensor0(0i64))?;
        let label = model.wire_node(format!("{prefix}.label_lookup"), lookup, &winner)?;
        Ok(tvec!(label[0], probabilities))
    }
}

/// Replaces tract's tree evaluator among the nodes from `first` on by [`TreeScores`].
fn swap_evaluator(model: &mut TypedModel, first: usize) -> TractResult<()> {
    use tract_onnx_opl::ml::tree_ensemble_classifier::TreeEnsembleClassifier as TractScores;
    let mut swapped = 0;
    for id in first..model.nodes().len() {
        if let Some(op) = model.node(id).op_as::<TractScores>() {
            let op = TreeScores::new(op.ensemble.clone())?;
            model.node_mut(id).op = Box::new(op);
            swapped += 1;
        }
    }
    ensure!(
        swapped == 1,
        "expected one tree evaluator in tract's classifier, found {swapped}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::{attribute_proto::AttributeType, AttributeProto};

    fn ints(name: &str, v: &[i64]) -> AttributeProto {
        let r#type = AttributeType::Ints as i32;
        AttributeProto {
            name: name.into(),
            r#type,
            ints: v.to_vec(),
            ..Default::default()
        }
    }

    fn floats(name: &str, v: &[f32]) -> AttributeProto {
        let r#type = AttributeType::Floats as i32;
        AttributeProto {
            name: name.into(),
            r#type,
            floats: v.to_vec(),
            ..Default::default()
        }
    }

    fn strings(name: &str, v: &[&str]) -> AttributeProto {
        let strings = v.iter().map(|s| s.as_bytes().to_vec()).collect();
        let r#type = AttributeType::Strings as i32;
        AttributeProto {
            name: name.into(),
            r#type,
            strings,
            ..Default::default()
        }
    }

    /// A binary stump as skl2onnx writes it: weights on class 0 only, the
    /// probability of class 1: `x0 <= 0 ? 0.2 : 0.9`.
    fn node(mode: &str) -> NodeProto {
        let attribute = vec![
            ints("nodes_treeids", &[0, 0, 0]),
            ints("nodes_nodeids", &[0, 1, 2]),
            ints("nodes_featureids", &[0, 0, 0]),
            ints("nodes_truenodeids", &[1, 0, 0]),
            ints("nodes_falsenodeids", &[2, 0, 0]),
            floats("nodes_values", &[0.0, 0.0, 0.0]),
            strings("nodes_modes", &[mode, "LEAF", "LEAF"]),
            ints("class_treeids", &[0, 0]),
            ints("class_nodeids", &[1, 2]),
            ints("class_ids", &[0, 0]),
            floats("class_weights", &[0.2, 0.9]),
            ints("classlabels_int64s", &[0, 1]),
        ];
        NodeProto {
            op_type: "TreeEnsembleClassifier".into(),
            attribute,
            ..Default::default()
        }
    }

    /// Builds a one-node model of `node` with tract and the registry.
    fn model(node: NodeProto) -> TractResult<InferenceModel> {
        use tract_onnx::pb::{
            type_proto, GraphProto, ModelProto, OperatorSetIdProto, TypeProto, ValueInfoProto,
        };
        let tensor = type_proto::Tensor {
            elem_type: 1,
            shape: None,
        };
        let r#type = Some(TypeProto {
            value: Some(type_proto::Value::TensorType(tensor)),
            ..Default::default()
        });
        let input = ValueInfoProto {
            name: "x".into(),
            r#type,
            ..Default::default()
        };
        let output = |name: &str| ValueInfoProto {
            name: name.into(),
            ..Default::default()
        };
        let node = NodeProto {
            input: vec!["x".into()],
            output: vec!["label".into(), "probabilities".into()],
            ..node
        };
        let graph = GraphProto {
            node: vec![node],
            input: vec![input],
            output: vec![output("label"), output("probabilities")],
            ..Default::default()
        };
        let opset = |domain: &str, version| OperatorSetIdProto {
            domain: domain.into(),
            version,
        };
        let proto = ModelProto {
            ir_version: 8,
            opset_import: vec![opset("", 17), opset("ai.onnx.ml", 3)],
            graph: Some(graph),
            ..Default::default()
        };
        super::super::onnx().model_for_proto_model(&proto)
    }

    fn run(node: NodeProto, x: &[f32]) -> (Vec<i64>, Vec<f32>) {
        let mut model = model(node).unwrap();
        model
            .set_input_fact(0, f32::fact([x.len(), 1]).into())
            .unwrap();
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        let x = Tensor::from_shape(&[x.len(), 1], x).unwrap();
        let out = plan.run(tvec!(x.into_tvalue())).unwrap();
        let labels = out[0].cast_to::<i64>().unwrap();
        let labels = labels
            .to_plain_array_view::<i64>()
            .unwrap()
            .iter()
            .copied()
            .collect();
        let probs = out[1]
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect();
        (labels, probs)
    }

    #[test]
    fn binary_labels_follow_the_probability_of_class_one() {
        let (labels, probs) = run(node("BRANCH_LEQ"), &[-1.0, 1.0]);
        assert_eq!(labels, [0, 1]);
        let expected = [0.8, 0.2, 0.1, 0.9];
        assert!(
            probs
                .iter()
                .zip(expected)
                .all(|(p, e)| (p - e).abs() < 1e-6),
            "{probs:?}"
        );
    }

    #[test]
    fn greater_or_equal_branches_are_evaluated() {
        // x0 >= 0 ? 0.2 : 0.9
        let (labels, _) = run(node("BRANCH_GTE"), &[-1.0, 0.0, 1.0]);
        assert_eq!(labels, [1, 0, 0]);
    }

    #[test]
    fn refuses_broken_tables() {
        let mut bad = node("BRANCH_LEQ");
        bad.attribute[9] = ints("class_ids", &[0, 2]);
        let err = model(bad).err().unwrap();
        assert!(format!("{err:?}").contains("output 2 of 2"), "{err:?}");
    }
}
