//! [`TreeScores`]: evaluates a tree ensemble laid out in tract's tables
//! (`tract_onnx_opl::ml::tree::TreeEnsembleData`), one aggregated score per
//! output (class or target) and row.
//!
//! tract has an evaluator for these tables, but it finds a leaf's weights by
//! stepping an ndarray iterator through the whole leaf table up to the leaf,
//! for every tree of every row: on a 40-tree gradient boosting model it took
//! about 400 µs a row (onnxruntime: 7 µs). This one indexes plain slices
//! (bounds-checked: a table that escaped validation is an error or a caught
//! panic, never an out-of-bounds read) and bounds every walk by the number of
//! nodes, so even a cyclic table ends.

use tract_onnx::tract_core::internal::*;
use tract_onnx_opl::ml::tree::{Aggregate, TreeEnsemble};

/// The op: `[N, F]` in (cast to f32), `[N, outputs]` f32 scores out.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct TreeScores {
    /// The tables, the number of outputs and the aggregate (SUM or AVERAGE).
    pub ensemble: TreeEnsemble,
}

impl TreeScores {
    /// The op for `ensemble`, whose aggregate must be SUM or AVERAGE.
    pub fn new(ensemble: TreeEnsemble) -> TractResult<TreeScores> {
        ensure!(
            matches!(ensemble.aggregate_fn, Aggregate::Sum | Aggregate::Avg),
            "aggregate {:?} is not supported",
            ensemble.aggregate_fn
        );
        Ok(TreeScores { ensemble })
    }

    /// Scores of `n` rows of `width` features.
    fn scores(&self, x: &[f32], n: usize, width: usize) -> TractResult<Vec<f32>> {
        let data = &self.ensemble.data;
        let trees = data.trees.try_as_plain_ram()?.as_slice::<u32>()?;
        let nodes = data.nodes.try_as_plain_ram()?.as_slice::<u32>()?;
        let leaves = data.leaves.try_as_plain_ram()?.as_slice::<u32>()?;
        let outputs = self.ensemble.n_classes();
        ensure!(
            width > self.ensemble.max_used_feature,
            "{width} features for feature #{}",
            self.ensemble.max_used_feature
        );
        let mut scores = vec![0f32; n * outputs];
        let mut counts = vec![0u32; outputs];
        for (row, out) in x.chunks_exact(width).zip(scores.chunks_exact_mut(outputs)) {
            counts.fill(0);
            for &root in trees {
                let (first, last) = find_leaf(nodes, root as usize, row)?;
                for leaf in leaves
                    .get(2 * first..2 * last)
                    .context("leaf range")?
                    .chunks_exact(2)
                {
                    let slot = leaf[0] as usize;
                    *out.get_mut(slot).context("leaf output")? += f32::from_bits(leaf[1]);
                    counts[slot] += 1;
                }
            }
            if self.ensemble.aggregate_fn == Aggregate::Avg {
                for (score, &count) in out.iter_mut().zip(&counts) {
                    if count > 1 {
                        *score /= count as f32;
                    }
                }
            }
        }
        Ok(scores)
    }
}

/// Walks one tree from `root` to a leaf; returns its range in the leaf table.
fn find_leaf(nodes: &[u32], root: usize, x: &[f32]) -> TractResult<(usize, usize)> {
    let mut id = root;
    for _ in 0..nodes.len() / 5 {
        let node = nodes.get(5 * id..5 * id + 5).context("node id")?;
        let cmp = node[4] & 0xff;
        if cmp == 0 {
            return Ok((node[0] as usize, node[1] as usize));
        }
        let value = *x.get(node[0] as usize).context("feature id")?;
        let threshold = f32::from_bits(node[3]);
        let holds = if value.is_nan() {
            node[4] & 0x100 != 0
        } else {
            match cmp {
                1 => value == threshold,
                2 => value != threshold,
                3 => value < threshold,
                4 => value > threshold,
                5 => value <= threshold,
                6 => value >= threshold,
                other => bail!("comparison code {other}"),
            }
        };
        id = if holds { node[1] } else { node[2] } as usize;
    }
    bail!("a tree walk longer than the tree (cycle)")
}

impl Op for TreeScores {
    fn name(&self) -> StaticName {
        "TreeScores".into()
    }

    op_as_typed_op!();
}

impl EvalOp for TreeScores {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let input = input.cast_to::<f32>()?;
        let view = input.to_plain_array_view::<f32>()?;
        ensure!(
            view.ndim() == 2,
            "tree ensemble input of shape {:?}",
            view.shape()
        );
        let (n, width) = (view.shape()[0], view.shape()[1]);
        let x = view.as_standard_layout();
        let x = x.as_slice().context("contiguous input")?;
        let scores = self.scores(x, n, width)?;
        Ok(tvec!(Tensor::from_shape(
            &[n, self.ensemble.n_classes()],
            &scores
        )?
        .into_tvalue()))
    }
}

impl TypedOp for TreeScores {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = &inputs[0].shape[0];
        Ok(tvec!(f32::fact(&[
            n.clone(),
            self.ensemble.n_classes().into()
        ])))
    }

    as_op!();
}
