//! `TreeEnsembleRegressor` (ONNX-ML), which tract-onnx does not register:
//! skl2onnx emits it for GradientBoostingRegressor, RandomForestRegressor and
//! the like.
//!
//! The trees are read by [`super::tree`] into the tables of tract's
//! tree-ensemble types (`tract_onnx_opl::ml::tree`, reused) and scored by
//! [`super::tree_eval::TreeScores`] (one aggregated score per output, for a
//! regressor one value per target), the evaluator the wrapped
//! `TreeEnsembleClassifier` also uses. `base_values` are added after the
//! aggregation, as the ONNX definition says. Supported: `aggregate_function`
//! SUM and AVERAGE, `post_transform` NONE, all six `BRANCH_*` modes and
//! `nodes_missing_value_tracks_true`. Thresholds are compared in f32 (the
//! attribute's type), like onnxruntime does for float inputs.

use super::tree::{has_attr, LeafAttrs, RawEnsemble};
use super::tree_eval::TreeScores;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;
use tract_onnx_opl::ml::tree::{Aggregate, TreeEnsemble};

/// The registry entry: builds the op from the ONNX node.
pub fn build(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(from_node(node)?), vec![]))
}

/// Reads and checks the node's attributes.
pub fn from_node(node: &NodeProto) -> TractResult<TreeEnsembleRegressor> {
    let n_targets = node.get_attr_opt::<i64>("n_targets")?.unwrap_or(1);
    let n_targets = usize::try_from(n_targets)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format_err!("n_targets must be positive, got {n_targets}"))?;
    let aggregate = match node
        .get_attr_opt::<&str>("aggregate_function")?
        .unwrap_or("SUM")
    {
        "SUM" => Aggregate::Sum,
        "AVERAGE" => Aggregate::Avg,
        other => bail!("aggregate_function {other} is not supported (SUM, AVERAGE)"),
    };
    match node
        .get_attr_opt::<&str>("post_transform")?
        .unwrap_or("NONE")
    {
        "NONE" => {}
        other => bail!("post_transform {other} is not supported (NONE)"),
    }
    if has_attr(node, "base_values_as_tensor") {
        bail!("attribute base_values_as_tensor (double base values) is not supported");
    }
    let base_values: Option<Vec<f32>> = node.get_attr_opt_vec("base_values")?;
    if let Some(base) = &base_values {
        node.expect_attr(
            "base_values",
            base.len() == n_targets,
            "one value per target",
        )?;
    }
    let ensemble =
        RawEnsemble::from_node(node, LeafAttrs::Target)?.into_tract(n_targets, aggregate)?;
    Ok(TreeEnsembleRegressor {
        ensemble,
        base_values: base_values.map(|b| tensor1(&b)),
    })
}

/// The op: `[N, F]` features in, `[N, n_targets]` f32 values out.
#[derive(Debug, Clone, Hash)]
pub struct TreeEnsembleRegressor {
    /// The trees, in tract's tables.
    pub ensemble: TreeEnsemble,
    /// Added to each target after the aggregation.
    pub base_values: Option<Tensor>,
}

impl Expansion for TreeEnsembleRegressor {
    fn name(&self) -> StaticName {
        "TreeEnsembleRegressor".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].rank, 2)?;
        s.equals(&outputs[0].datum_type, DatumType::F32)?;
        s.equals(&outputs[0].rank, 2)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[0].shape[1], self.ensemble.n_classes().to_dim())?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let op = TreeScores::new(self.ensemble.clone())?;
        let mut values = model.wire_node(format!("{prefix}.trees"), op, inputs)?;
        if let Some(base) = &self.base_values {
            let base = base.clone().broadcast_into_rank(2)?.into_arc_tensor();
            let base = model.add_const(format!("{prefix}.base_values"), base)?;
            values = model.wire_node(
                format!("{prefix}.add_base_values"),
                tract_onnx::tract_core::ops::math::add(),
                &[values[0], base],
            )?;
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::{attribute_proto::AttributeType, AttributeProto};

    fn ints(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Ints as i32,
            ints: v.to_vec(),
            ..Default::default()
        }
    }

    fn floats(name: &str, v: &[f32]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Floats as i32,
            floats: v.to_vec(),
            ..Default::default()
        }
    }

    fn strings(name: &str, v: &[&str]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Strings as i32,
            strings: v.iter().map(|s| s.as_bytes().to_vec()).collect(),
            ..Default::default()
        }
    }

    fn string(name: &str, v: &str) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::String as i32,
            s: v.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    /// Two stumps on features 0 and 1: `x0 <= 0 ? 1 : 2` and `x1 > 5 ? 10 : 20`.
    fn node(extra: Vec<AttributeProto>) -> NodeProto {
        let mut attribute = vec![
            ints("nodes_treeids", &[0, 0, 0, 1, 1, 1]),
            ints("nodes_nodeids", &[0, 1, 2, 0, 1, 2]),
            ints("nodes_featureids", &[0, 0, 0, 1, 0, 0]),
            ints("nodes_truenodeids", &[1, 0, 0, 1, 0, 0]),
            ints("nodes_falsenodeids", &[2, 0, 0, 2, 0, 0]),
            floats("nodes_values", &[0.0, 0.0, 0.0, 5.0, 0.0, 0.0]),
            strings(
                "nodes_modes",
                &["BRANCH_LEQ", "LEAF", "LEAF", "BRANCH_GT", "LEAF", "LEAF"],
            ),
            ints("target_treeids", &[0, 0, 1, 1]),
            ints("target_nodeids", &[1, 2, 1, 2]),
            ints("target_ids", &[0, 0, 0, 0]),
            floats("target_weights", &[1.0, 2.0, 10.0, 20.0]),
        ];
        attribute.extend(extra);
        NodeProto {
            op_type: "TreeEnsembleRegressor".into(),
            attribute,
            ..Default::default()
        }
    }

    fn run(op: TreeEnsembleRegressor, rows: &[[f32; 2]]) -> Vec<f32> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([rows.len(), 2])).unwrap();
        let y = op.wire("reg", &mut model, &[x]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let input = Tensor::from_shape(&[rows.len(), 2], &flat).unwrap();
        let out = model
            .into_runnable()
            .unwrap()
            .run(tvec!(input.into_tvalue()))
            .unwrap();
        out[0]
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    #[test]
    fn sums_the_trees_and_adds_the_base_value() {
        let op = from_node(&node(vec![floats("base_values", &[100.0])])).unwrap();
        let y = run(op, &[[-1.0, 6.0], [1.0, 6.0], [-1.0, 5.0], [1.0, 4.0]]);
        assert_eq!(y, [111.0, 112.0, 121.0, 122.0]);
    }

    #[test]
    fn averages_when_asked() {
        let op = from_node(&node(vec![string("aggregate_function", "AVERAGE")])).unwrap();
        assert_eq!(run(op, &[[-1.0, 6.0], [1.0, 4.0]]), [5.5, 11.0]);
    }

    #[test]
    fn refuses_what_it_does_not_implement() {
        let err = from_node(&node(vec![string("post_transform", "PROBIT")])).unwrap_err();
        assert!(err.to_string().contains("post_transform PROBIT"), "{err}");
        let err = from_node(&node(vec![string("aggregate_function", "MAX")])).unwrap_err();
        assert!(err.to_string().contains("aggregate_function MAX"), "{err}");
        let err = from_node(&node(vec![floats("base_values", &[1.0, 2.0])])).unwrap_err();
        assert!(format!("{err:?}").contains("base_values"), "{err:?}");
    }

    #[test]
    fn refuses_a_child_outside_its_tree() {
        let mut bad = node(vec![]);
        bad.attribute[3] = ints("nodes_truenodeids", &[1, 0, 0, 3, 0, 0]);
        let err = from_node(&bad).unwrap_err();
        assert!(err.to_string().contains("child 3"), "{err}");
    }
}
