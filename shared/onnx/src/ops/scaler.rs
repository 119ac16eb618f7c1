//! `Scaler` (ONNX-ML), which tract-onnx does not register: skl2onnx emits it
//! for StandardScaler. `Y = (X - offset) * scale`, in f32 whatever the input
//! type (the ONNX definition's output type), with `offset` and `scale` of one
//! value (all columns) or one per column.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

/// The registry entry: builds the op from the ONNX node.
pub fn build(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(from_node(node)?), vec![]))
}

/// Reads and checks the node's attributes.
pub fn from_node(node: &NodeProto) -> TractResult<Scaler> {
    let offset: Vec<f32> = node
        .get_attr_opt_vec("offset")?
        .unwrap_or_else(|| vec![0.0]);
    let scale: Vec<f32> = node.get_attr_opt_vec("scale")?.unwrap_or_else(|| vec![1.0]);
    node.expect_attr("offset", !offset.is_empty(), "at least one value")?;
    node.expect_attr("scale", !scale.is_empty(), "at least one value")?;
    let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
    node.expect_attr("offset", finite(&offset), "finite values")?;
    node.expect_attr("scale", finite(&scale), "finite values")?;
    Ok(Scaler {
        offset: tensor1(&offset),
        scale: tensor1(&scale),
    })
}

/// The op: `[N, C]` in, `[N, C]` f32 out.
#[derive(Debug, Clone, Hash)]
pub struct Scaler {
    /// Subtracted first: one value, or one per column.
    pub offset: Tensor,
    /// Then multiplied by: one value, or one per column.
    pub scale: Tensor,
}

impl Scaler {
    /// Checks that each parameter has one value or one per column.
    fn check_width(&self, columns: &TDim) -> TractResult<()> {
        for (name, t) in [("offset", &self.offset), ("scale", &self.scale)] {
            if t.len() != 1 && columns.to_usize().ok() != Some(t.len()) {
                bail!("Scaler {name} has {} values for {columns} columns", t.len());
            }
        }
        Ok(())
    }
}

impl Expansion for Scaler {
    fn name(&self) -> StaticName {
        "Scaler".into()
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
        s.equals(&outputs[0].shape, &inputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        use tract_onnx::tract_core::ops::{cast::cast, math};
        self.check_width(&model.outlet_fact(inputs[0])?.shape[1])?;
        let mut x = inputs[0];
        if model.outlet_fact(x)?.datum_type != f32::datum_type() {
            x = model.wire_node(format!("{prefix}.to_f32"), cast(f32::datum_type()), &[x])?[0];
        }
        let offset = self
            .offset
            .clone()
            .broadcast_into_rank(2)?
            .into_arc_tensor();
        let offset = model.add_const(format!("{prefix}.offset"), offset)?;
        let scale = self.scale.clone().broadcast_into_rank(2)?.into_arc_tensor();
        let scale = model.add_const(format!("{prefix}.scale"), scale)?;
        let centred = model.wire_node(format!("{prefix}.sub"), math::sub(), &[x, offset])?;
        model.wire_node(format!("{prefix}.mul"), math::mul(), &[centred[0], scale])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::{attribute_proto::AttributeType, AttributeProto};

    fn floats(name: &str, v: &[f32]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Floats as i32,
            floats: v.to_vec(),
            ..Default::default()
        }
    }

    fn node(attribute: Vec<AttributeProto>) -> NodeProto {
        NodeProto {
            op_type: "Scaler".into(),
            attribute,
            ..Default::default()
        }
    }

    fn run<T: Datum + Copy>(op: &Scaler, rows: usize, x: &[T]) -> TractResult<Vec<f32>> {
        let cols = x.len() / rows;
        let mut model = TypedModel::default();
        let input = model.add_source("x", T::fact([rows, cols]))?;
        let y = op.wire("scaler", &mut model, &[input])?;
        model.select_output_outlets(&y)?;
        let x = Tensor::from_shape(&[rows, cols], x)?;
        let out = model.into_runnable()?.run(tvec!(x.into_tvalue()))?;
        Ok(out[0]
            .to_plain_array_view::<f32>()?
            .iter()
            .copied()
            .collect())
    }

    #[test]
    fn subtracts_then_multiplies_per_column() {
        let op = from_node(&node(vec![
            floats("offset", &[1.0, -2.0]),
            floats("scale", &[0.5, 3.0]),
        ]))
        .unwrap();
        let y = run(&op, 2, &[3.0f32, 0.0, 1.0, -2.0]).unwrap();
        assert_eq!(y, [1.0, 6.0, 0.0, 0.0]);
    }

    #[test]
    fn broadcasts_single_values_and_takes_doubles() {
        let op = from_node(&node(vec![
            floats("offset", &[1.0]),
            floats("scale", &[2.0]),
        ]))
        .unwrap();
        assert_eq!(run(&op, 1, &[1.0f64, 2.0, 4.5]).unwrap(), [0.0, 2.0, 7.0]);
        let identity = from_node(&node(vec![])).unwrap();
        assert_eq!(run(&identity, 1, &[1.5f32, -2.0]).unwrap(), [1.5, -2.0]);
    }

    #[test]
    fn refuses_a_parameter_of_the_wrong_width() {
        let op = from_node(&node(vec![floats("offset", &[1.0, 2.0, 3.0])])).unwrap();
        let err = run(&op, 1, &[1.0f32, 2.0]).unwrap_err();
        assert!(
            err.to_string()
                .contains("offset has 3 values for 2 columns"),
            "{err}"
        );
    }

    #[test]
    fn refuses_non_finite_parameters() {
        let err = from_node(&node(vec![floats("scale", &[f32::NAN])])).unwrap_err();
        assert!(format!("{err:?}").contains("finite"), "{err:?}");
    }
}
