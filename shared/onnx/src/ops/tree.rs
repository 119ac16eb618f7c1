//! Tree ensembles of the ONNX-ML domain (`TreeEnsembleRegressor`,
//! `TreeEnsembleClassifier`): reading their `nodes_*` and `target_*`/`class_*`
//! attributes, checking their structure, and laying them out in the table
//! format of tract's own tree-ensemble evaluator (`tract_onnx_opl::ml::tree`).
//!
//! tract's own evaluator walks the tables with unchecked indexing, and the
//! crate's ([`super::tree_eval`]) would fail on them at run time, so a file
//! with a child id out of range, a leaf pointing at a missing output or a
//! cycle between nodes is refused at load by [`RawEnsemble::validate`], which
//! the builders of both operators run ([`super::tree_regressor`],
//! [`super::tree_classifier`]).

use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;
use tract_onnx_opl::ml::tree::{Aggregate, Cmp, TreeEnsemble, TreeEnsembleData};

/// A node's comparison, or a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `x <= value`
    Leq,
    /// `x < value`
    Lt,
    /// `x >= value`
    Gte,
    /// `x > value`
    Gt,
    /// `x == value`
    Eq,
    /// `x != value`
    Neq,
    /// A leaf: its contributions are in the `*_weights` attribute.
    Leaf,
}

impl Mode {
    fn parse(s: &str) -> Result<Mode, String> {
        Ok(match s {
            "BRANCH_LEQ" => Mode::Leq,
            "BRANCH_LT" => Mode::Lt,
            "BRANCH_GTE" => Mode::Gte,
            "BRANCH_GT" => Mode::Gt,
            "BRANCH_EQ" => Mode::Eq,
            "BRANCH_NEQ" => Mode::Neq,
            "LEAF" => Mode::Leaf,
            other => return Err(format!("unknown node mode '{other}'")),
        })
    }
}

/// Which attributes hold the leaves' contributions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafAttrs {
    /// `class_*` (TreeEnsembleClassifier).
    Class,
    /// `target_*` (TreeEnsembleRegressor).
    Target,
}

impl LeafAttrs {
    fn name(self, suffix: &str) -> String {
        match self {
            LeafAttrs::Class => format!("class_{suffix}"),
            LeafAttrs::Target => format!("target_{suffix}"),
        }
    }
}

/// One branch node's column values, or a leaf.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeNode {
    /// The tree the node belongs to.
    pub tree: usize,
    /// The node's id within its tree.
    pub id: usize,
    /// The comparison, or [`Mode::Leaf`].
    pub mode: Mode,
    /// The compared feature.
    pub feature: usize,
    /// The threshold.
    pub value: f32,
    /// The child when the comparison holds.
    pub true_id: usize,
    /// The child when it does not.
    pub false_id: usize,
    /// Where a missing (NaN) feature goes: the true child when set.
    pub nan_is_true: bool,
}

/// One contribution of a leaf to an output (a class or a target).
#[derive(Debug, Clone, PartialEq)]
pub struct LeafWeight {
    /// The leaf's tree.
    pub tree: usize,
    /// The leaf's node id.
    pub node: usize,
    /// The output (class or target) it adds to.
    pub output: usize,
    /// What it adds.
    pub weight: f32,
}

/// A tree ensemble as the ONNX attributes describe it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RawEnsemble {
    /// Every node, branches and leaves.
    pub nodes: Vec<TreeNode>,
    /// Every leaf contribution.
    pub leaves: Vec<LeafWeight>,
}

/// Whether the node sets the attribute.
pub fn has_attr(node: &NodeProto, name: &str) -> bool {
    node.attribute.iter().any(|a| a.name == name)
}

/// An attribute of non-negative integers.
fn ids(node: &NodeProto, name: &str, n: usize) -> TractResult<Vec<usize>> {
    let v = node.get_attr_slice::<i64>(name)?;
    node.expect_attr(name, v.len() == n, || {
        format!("{n} values, got {}", v.len())
    })?;
    v.iter()
        .map(|&x| usize::try_from(x).map_err(|_| format_err!("attribute {name}: negative id {x}")))
        .collect()
}

fn floats(node: &NodeProto, name: &str, n: usize) -> TractResult<Vec<f32>> {
    let v: Vec<f32> = node.get_attr_vec(name)?;
    node.expect_attr(name, v.len() == n, || {
        format!("{n} values, got {}", v.len())
    })?;
    Ok(v)
}

impl RawEnsemble {
    /// Reads the `nodes_*` attributes and the leaves' (`class_*` or `target_*`).
    pub fn from_node(node: &NodeProto, leaf_attrs: LeafAttrs) -> TractResult<RawEnsemble> {
        for name in ["nodes_values_as_tensor", "nodes_hitrates_as_tensor"] {
            if has_attr(node, name) {
                bail!("attribute {name} (double thresholds) is not supported");
            }
        }
        let n = node.get_attr_slice::<i64>("nodes_nodeids")?.len();
        let trees = ids(node, "nodes_treeids", n)?;
        let node_ids = ids(node, "nodes_nodeids", n)?;
        let features = ids(node, "nodes_featureids", n)?;
        let true_ids = ids(node, "nodes_truenodeids", n)?;
        let false_ids = ids(node, "nodes_falsenodeids", n)?;
        let values = floats(node, "nodes_values", n)?;
        let modes: Vec<&str> = node.get_attr_vec("nodes_modes")?;
        node.expect_attr("nodes_modes", modes.len() == n, || format!("{n} values"))?;
        let nan: Vec<i64> =
            match node.get_attr_opt_slice::<i64>("nodes_missing_value_tracks_true")? {
                Some(v) => v.to_vec(),
                None => vec![0; n],
            };
        node.expect_attr(
            "nodes_missing_value_tracks_true",
            nan.len() == n,
            "one per node",
        )?;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            nodes.push(TreeNode {
                tree: trees[i],
                id: node_ids[i],
                mode: Mode::parse(modes[i]).map_err(|e| format_err!("{e}"))?,
                feature: features[i],
                value: values[i],
                true_id: true_ids[i],
                false_id: false_ids[i],
                nan_is_true: nan[i] != 0,
            });
        }
        let leaves = Self::leaves_from_node(node, leaf_attrs)?;
        Ok(RawEnsemble { nodes, leaves })
    }

    fn leaves_from_node(node: &NodeProto, leaf_attrs: LeafAttrs) -> TractResult<Vec<LeafWeight>> {
        let weights_tensor = leaf_attrs.name("weights_as_tensor");
        if has_attr(node, &weights_tensor) {
            bail!("attribute {weights_tensor} (double weights) is not supported");
        }
        let m = node.get_attr_slice::<i64>(&leaf_attrs.name("ids"))?.len();
        let trees = ids(node, &leaf_attrs.name("treeids"), m)?;
        let nodes = ids(node, &leaf_attrs.name("nodeids"), m)?;
        let outputs = ids(node, &leaf_attrs.name("ids"), m)?;
        let weights = floats(node, &leaf_attrs.name("weights"), m)?;
        Ok((0..m)
            .map(|i| LeafWeight {
                tree: trees[i],
                node: nodes[i],
                output: outputs[i],
                weight: weights[i],
            })
            .collect())
    }

    /// The number of trees (ids run from 0), once validated.
    fn tree_count(&self) -> usize {
        self.nodes.iter().map(|n| n.tree + 1).max().unwrap_or(0)
    }

    /// Checks that the tables describe well-formed trees that evaluate to
    /// `n_outputs` values: trees numbered 0.. in order, node ids 0..k of each
    /// tree, children inside their tree and with one parent each (so no cycle
    /// is reachable from a root), leaves' contributions on leaves only, to an
    /// output below `n_outputs`, thresholds that are numbers, finite weights.
    pub fn validate(&self, n_outputs: usize) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err("no tree nodes".into());
        }
        if n_outputs == 0 {
            return Err("no outputs (classes or targets)".into());
        }
        let sizes = self.tree_sizes()?;
        let mut has_parent: Vec<Vec<bool>> = sizes.iter().map(|&k| vec![false; k]).collect();
        for node in &self.nodes {
            if node.mode == Mode::Leaf {
                continue;
            }
            if node.value.is_nan() {
                return Err(format!(
                    "tree {} node {}: threshold is NaN",
                    node.tree, node.id
                ));
            }
            let both = [node.true_id, node.false_id];
            let children = if node.true_id == node.false_id {
                &both[..1]
            } else {
                &both[..]
            };
            for &child in children {
                if child == 0 || child >= sizes[node.tree] {
                    return Err(format!(
                        "tree {} node {}: child {child} is not a node of the tree",
                        node.tree, node.id
                    ));
                }
                if std::mem::replace(&mut has_parent[node.tree][child], true) {
                    return Err(format!("tree {} node {child} has two parents", node.tree));
                }
            }
        }
        self.validate_leaves(&sizes, n_outputs)
    }

    /// Node count of each tree, checking the numbering.
    fn tree_sizes(&self) -> Result<Vec<usize>, String> {
        let mut sizes: Vec<usize> = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.tree == sizes.len() {
                sizes.push(0);
            } else if node.tree + 1 != sizes.len() {
                return Err(format!(
                    "node #{i}: tree ids must start at 0 and increase by 1"
                ));
            }
            if node.id != sizes[node.tree] {
                return Err(format!(
                    "tree {}: node ids must run 0, 1, 2… in order (found {} at position {})",
                    node.tree, node.id, sizes[node.tree]
                ));
            }
            sizes[node.tree] += 1;
        }
        Ok(sizes)
    }

    fn validate_leaves(&self, sizes: &[usize], n_outputs: usize) -> Result<(), String> {
        // Where each tree starts in `nodes` (ids run 0..size within a tree).
        let starts: Vec<usize> = sizes
            .iter()
            .scan(0, |next, &size| {
                let start = *next;
                *next += size;
                Some(start)
            })
            .collect();
        for (i, leaf) in self.leaves.iter().enumerate() {
            let node = sizes
                .get(leaf.tree)
                .filter(|&&size| leaf.node < size)
                .map(|_| &self.nodes[starts[leaf.tree] + leaf.node]);
            if node.map(|n| n.mode) != Some(Mode::Leaf) {
                return Err(format!(
                    "weight #{i}: tree {} node {} is not a leaf",
                    leaf.tree, leaf.node
                ));
            }
            if leaf.output >= n_outputs {
                return Err(format!(
                    "weight #{i}: output {} of {n_outputs}",
                    leaf.output
                ));
            }
            if !leaf.weight.is_finite() {
                return Err(format!("weight #{i}: {} is not finite", leaf.weight));
            }
        }
        Ok(())
    }

    /// The validated ensemble in tract's tables, evaluating to `n_outputs`
    /// values aggregated with `aggregate`.
    pub fn into_tract(self, n_outputs: usize, aggregate: Aggregate) -> TractResult<TreeEnsemble> {
        self.validate(n_outputs).map_err(|e| format_err!("{e}"))?;
        let mut trees: Vec<u32> = Vec::with_capacity(self.tree_count());
        let mut rows: Vec<u32> = Vec::with_capacity(self.nodes.len() * 5);
        let mut leaf_rows: Vec<u32> = Vec::with_capacity(self.leaves.len() * 2);
        // Stable: the weights of one leaf keep their order.
        let mut sorted: Vec<&LeafWeight> = self.leaves.iter().collect();
        sorted.sort_by_key(|l| (l.tree, l.node));
        let mut leaves = sorted.into_iter().peekable();
        for node in &self.nodes {
            if node.id == 0 {
                trees.push(to_u32(rows.len() / 5)?);
            }
            let start = *trees.last().unwrap_or(&0);
            if node.mode == Mode::Leaf {
                let first = to_u32(leaf_rows.len() / 2)?;
                while let Some(leaf) = leaves.next_if(|l| (l.tree, l.node) == (node.tree, node.id))
                {
                    leaf_rows.extend([to_u32(leaf.output)?, leaf.weight.to_bits()]);
                }
                rows.extend([first, to_u32(leaf_rows.len() / 2)?, 0, 0, 0]);
            } else {
                rows.extend(branch_row(node, start)?);
            }
        }
        let max_feature = self.nodes.iter().map(|n| n.feature).max().unwrap_or(0);
        let data = TreeEnsembleData {
            trees: rctensor1(&trees),
            nodes: tensor1(&rows)
                .into_shape(&[rows.len() / 5, 5])?
                .into_arc_tensor(),
            leaves: tensor1(&leaf_rows)
                .into_shape(&[leaf_rows.len() / 2, 2])?
                .into_arc_tensor(),
        };
        TreeEnsemble::build(data, max_feature, n_outputs, aggregate)
    }
}

fn to_u32(x: usize) -> TractResult<u32> {
    u32::try_from(x).map_err(|_| format_err!("tree ensemble too large ({x})"))
}

/// A branch in tract's row layout: feature, true row, false row, threshold
/// bits, comparison code | 0x100 when NaN goes to the true child.
fn branch_row(node: &TreeNode, start: u32) -> TractResult<[u32; 5]> {
    let cmp = match node.mode {
        Mode::Leq => Cmp::LessEqual,
        Mode::Lt => Cmp::Less,
        Mode::Gte => Cmp::GreaterEqual,
        Mode::Gt => Cmp::Greater,
        Mode::Eq => Cmp::Equal,
        Mode::Neq => Cmp::NotEqual,
        Mode::Leaf => bail!("a leaf is not a branch"),
    };
    Ok([
        to_u32(node.feature)?,
        to_u32(node.true_id)? + start,
        to_u32(node.false_id)? + start,
        node.value.to_bits(),
        (0x0100 * u32::from(node.nan_is_true)) | cmp as u32,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn branch(tree: usize, id: usize, mode: Mode, value: f32, t: usize, f: usize) -> TreeNode {
        TreeNode {
            tree,
            id,
            mode,
            feature: 0,
            value,
            true_id: t,
            false_id: f,
            nan_is_true: false,
        }
    }

    fn leaf(tree: usize, id: usize) -> TreeNode {
        branch(tree, id, Mode::Leaf, 0.0, 0, 0)
    }

    fn weight(tree: usize, node: usize, weight: f32) -> LeafWeight {
        LeafWeight {
            tree,
            node,
            output: 0,
            weight,
        }
    }

    /// One stump per mode: `x MODE 1.0` gives 10, otherwise 20.
    fn stump(mode: Mode) -> RawEnsemble {
        RawEnsemble {
            nodes: vec![branch(0, 0, mode, 1.0, 1, 2), leaf(0, 1), leaf(0, 2)],
            leaves: vec![weight(0, 1, 10.0), weight(0, 2, 20.0)],
        }
    }

    fn eval(ensemble: TreeEnsemble, x: &[f32]) -> Vec<f32> {
        let op = super::super::tree_eval::TreeScores::new(ensemble).unwrap();
        let input = Tensor::from_shape(&[x.len(), 1], x).unwrap();
        let out = op
            .eval(&EvalContext::out_of_plan(), tvec!(input.into_tvalue()))
            .unwrap();
        out[0]
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    #[test]
    fn every_comparison_mode_follows_the_onnx_definition() {
        let cases = [
            (Mode::Leq, [10.0, 10.0, 20.0]),
            (Mode::Lt, [10.0, 20.0, 20.0]),
            (Mode::Gte, [20.0, 10.0, 10.0]),
            (Mode::Gt, [20.0, 20.0, 10.0]),
            (Mode::Eq, [20.0, 10.0, 20.0]),
            (Mode::Neq, [10.0, 20.0, 10.0]),
        ];
        for (mode, expected) in cases {
            let ensemble = stump(mode).into_tract(1, Aggregate::Sum).unwrap();
            assert_eq!(eval(ensemble, &[0.5, 1.0, 1.5]), expected, "{mode:?}");
        }
    }

    #[test]
    fn missing_values_follow_the_tracks_attribute_also_for_gte() {
        for mode in [Mode::Leq, Mode::Gte] {
            for nan_is_true in [false, true] {
                let mut raw = stump(mode);
                raw.nodes[0].nan_is_true = nan_is_true;
                let ensemble = raw.into_tract(1, Aggregate::Sum).unwrap();
                let expected = if nan_is_true { 10.0 } else { 20.0 };
                assert_eq!(
                    eval(ensemble, &[f32::NAN]),
                    [expected],
                    "{mode:?} {nan_is_true}"
                );
            }
        }
    }

    #[test]
    fn sum_and_average_aggregate_over_trees() {
        let mut raw = stump(Mode::Leq);
        raw.nodes
            .extend([branch(1, 0, Mode::Gt, 0.0, 1, 2), leaf(1, 1), leaf(1, 2)]);
        raw.leaves.extend([weight(1, 1, 1.0), weight(1, 2, 2.0)]);
        let sum = raw.clone().into_tract(1, Aggregate::Sum).unwrap();
        assert_eq!(eval(sum, &[0.5, -1.0, 2.0]), [11.0, 12.0, 21.0]);
        let avg = raw.into_tract(1, Aggregate::Avg).unwrap();
        assert_eq!(eval(avg, &[0.5, -1.0, 2.0]), [5.5, 6.0, 10.5]);
    }

    #[test]
    fn weights_may_come_in_any_order() {
        let mut raw = stump(Mode::Leq);
        raw.leaves.reverse();
        let ensemble = raw.into_tract(1, Aggregate::Sum).unwrap();
        assert_eq!(eval(ensemble, &[0.5, 1.5]), [10.0, 20.0]);
    }

    #[test]
    fn hostile_tables_are_refused() {
        let mut out_of_range = stump(Mode::Leq);
        out_of_range.nodes[0].true_id = 7;
        assert!(out_of_range.validate(1).unwrap_err().contains("child 7"));

        let mut back_to_root = stump(Mode::Leq);
        back_to_root.nodes[0].false_id = 0;
        assert!(back_to_root.validate(1).unwrap_err().contains("child 0"));

        let mut cycle = stump(Mode::Leq);
        cycle.nodes[2] = branch(0, 2, Mode::Leq, 0.0, 1, 1);
        assert!(cycle.validate(1).unwrap_err().contains("two parents"));

        let mut weight_on_branch = stump(Mode::Leq);
        weight_on_branch.leaves[0].node = 0;
        assert!(weight_on_branch
            .validate(1)
            .unwrap_err()
            .contains("not a leaf"));

        let mut bad_output = stump(Mode::Leq);
        bad_output.leaves[0].output = 1;
        assert!(bad_output
            .validate(1)
            .unwrap_err()
            .contains("output 1 of 1"));

        let mut sparse_ids = stump(Mode::Leq);
        sparse_ids.nodes[2].id = 5;
        assert!(sparse_ids.validate(1).unwrap_err().contains("node ids"));

        let mut nan_weight = stump(Mode::Leq);
        nan_weight.leaves[1].weight = f32::NAN;
        assert!(nan_weight.validate(1).unwrap_err().contains("not finite"));

        assert!(RawEnsemble::default().validate(1).is_err());
    }
}
