//! Checks on the decoded ONNX protobuf, before tract builds a graph from it:
//! every operator is one the engine runs, no tensor points at external files,
//! the names the nodes read are produced, the single input is `[N, features]` of
//! f32 or f64, and a trailing `ZipMap` (skl2onnx's default for classifiers) is
//! taken off so that the probabilities come out as the tensor it consumes.

use crate::error::{OnnxError, UnsupportedOperator};
use crate::ops;
use crate::Limits;
use std::collections::HashSet;
use tract_onnx::pb::tensor_proto::{DataLocation, DataType};
use tract_onnx::pb::tensor_shape_proto::dimension::Value as Dim;
use tract_onnx::pb::type_proto::Value as Type;
use tract_onnx::pb::{GraphProto, ModelProto, NodeProto, TensorProto};
use tract_onnx::prelude::DatumType;

/// The model's input, as its graph declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InputSignature {
    /// f32 or f64.
    pub datum_type: DatumType,
    /// The width of `[N, features]`.
    pub features: usize,
}

/// The domains whose operators the registry implements.
const DOMAINS: &[&str] = &["", "ai.onnx", "ai.onnx.ml"];

/// Runs every check, removes a trailing ZipMap, and returns the input signature.
pub(crate) fn inspect(
    proto: &mut ModelProto,
    limits: &Limits,
) -> Result<InputSignature, OnnxError> {
    let graph = proto
        .graph
        .as_mut()
        .ok_or_else(|| OnnxError::Malformed("the file holds no graph".into()))?;
    if graph.node.is_empty() {
        return Err(OnnxError::Malformed("the graph has no nodes".into()));
    }
    bypass_zipmap(graph)?;
    check_names(graph)?;
    let mut unsupported = Vec::new();
    check_operators(graph, &mut unsupported);
    if !unsupported.is_empty() {
        return Err(OnnxError::UnsupportedOperators(unsupported));
    }
    check_tensors(graph, limits)?;
    input_signature(graph, limits)
}

fn node_name(node: &NodeProto, index: usize) -> String {
    if node.name.is_empty() {
        format!("#{index}")
    } else {
        node.name.clone()
    }
}

/// Checks that every value the graph reads or outputs is produced: by an
/// input, an initializer or a node (tract indexes its names unchecked).
fn check_names(graph: &GraphProto) -> Result<(), OnnxError> {
    let produced: HashSet<&str> = graph
        .input
        .iter()
        .map(|i| i.name.as_str())
        .chain(graph.initializer.iter().map(|t| t.name.as_str()))
        .chain(
            graph
                .node
                .iter()
                .flat_map(|n| n.output.iter().map(String::as_str)),
        )
        .collect();
    for (index, node) in graph.node.iter().enumerate() {
        if let Some(missing) = node
            .input
            .iter()
            .find(|i| !i.is_empty() && !produced.contains(i.as_str()))
        {
            return Err(OnnxError::Malformed(format!(
                "node '{}' reads '{missing}', which nothing produces",
                node_name(node, index)
            )));
        }
    }
    match graph
        .output
        .iter()
        .find(|o| !produced.contains(o.name.as_str()))
    {
        Some(output) => Err(OnnxError::Malformed(format!(
            "graph output '{}' is produced by no node",
            output.name
        ))),
        None => Ok(()),
    }
}

/// Collects the nodes (subgraphs included) whose operator the engine lacks.
fn check_operators(graph: &GraphProto, out: &mut Vec<UnsupportedOperator>) {
    for (index, node) in graph.node.iter().enumerate() {
        if !DOMAINS.contains(&node.domain.as_str()) || !ops::is_supported(&node.op_type) {
            out.push(UnsupportedOperator {
                op_type: node.op_type.clone(),
                domain: node.domain.clone(),
                node: node_name(node, index),
            });
        }
        for attr in &node.attribute {
            for sub in attr.g.iter().chain(&attr.graphs) {
                check_operators(sub, out);
            }
        }
    }
}

/// Refuses tensors stored outside the file (tract would read them from disk)
/// and tensors declaring more elements than a file within the limit can hold.
fn check_tensors(graph: &GraphProto, limits: &Limits) -> Result<(), OnnxError> {
    let constants = graph
        .node
        .iter()
        .flat_map(|n| n.attribute.iter().filter_map(|a| a.t.as_ref()));
    for tensor in graph.initializer.iter().chain(constants) {
        check_tensor(tensor, limits)?;
    }
    for node in &graph.node {
        for sub in node
            .attribute
            .iter()
            .flat_map(|a| a.g.iter().chain(&a.graphs))
        {
            check_tensors(sub, limits)?;
        }
    }
    Ok(())
}

fn check_tensor(tensor: &TensorProto, limits: &Limits) -> Result<(), OnnxError> {
    if tensor.data_location == Some(DataLocation::External as i32)
        || !tensor.external_data.is_empty()
    {
        return Err(OnnxError::Malformed(format!(
            "tensor '{}' refers to external data; embed all tensors in the model file",
            tensor.name
        )));
    }
    let elements = tensor.dims.iter().try_fold(1u64, |acc, &d| {
        u64::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    });
    match elements {
        Some(n) if n <= limits.max_bytes as u64 => Ok(()),
        _ => Err(OnnxError::Malformed(format!(
            "tensor '{}' declares dimensions {:?}, beyond the size limit",
            tensor.name, tensor.dims
        ))),
    }
}

/// Takes off a ZipMap whose output is a graph output: the graph then outputs
/// the probabilities tensor it consumed (same values, one column per class).
fn bypass_zipmap(graph: &mut GraphProto) -> Result<(), OnnxError> {
    while let Some(index) = graph.node.iter().position(|n| n.op_type == "ZipMap") {
        let node = &graph.node[index];
        let (Some(input), Some(output)) = (node.input.first(), node.output.first()) else {
            return Err(OnnxError::Malformed(
                "a ZipMap node without input or output".into(),
            ));
        };
        let consumed = graph.node.iter().any(|n| n.input.contains(output));
        let slot = graph.output.iter().position(|o| &o.name == output);
        let Some(slot) = slot.filter(|_| !consumed) else {
            return Err(OnnxError::Output(format!(
                "ZipMap node '{}' does not produce a graph output; export the classifier \
                 with options={{'zipmap': False}}",
                node_name(node, index)
            )));
        };
        graph.output[slot].name = input.clone();
        graph.output[slot].r#type = None;
        graph.node.remove(index);
    }
    Ok(())
}

/// The single `[N, features]` float input.
fn input_signature(graph: &GraphProto, limits: &Limits) -> Result<InputSignature, OnnxError> {
    let initialised: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !initialised.contains(i.name.as_str()))
        .collect();
    let [input] = inputs[..] else {
        return Err(OnnxError::Input(format!(
            "{} inputs; one [N, features] tensor is supported",
            inputs.len()
        )));
    };
    let name = &input.name;
    let Some(Type::TensorType(tensor)) = input.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(OnnxError::Input(format!("input '{name}' is not a tensor")));
    };
    let datum_type = match DataType::try_from(tensor.elem_type) {
        Ok(DataType::Float) => DatumType::F32,
        Ok(DataType::Double) => DatumType::F64,
        other => {
            let other = other.map_or_else(|_| tensor.elem_type.to_string(), |t| format!("{t:?}"));
            return Err(OnnxError::Input(format!(
                "input '{name}' is of type {other}; f32 or f64 is supported"
            )));
        }
    };
    let dims: Vec<Option<&Dim>> = tensor
        .shape
        .iter()
        .flat_map(|s| &s.dim)
        .map(|d| d.value.as_ref())
        .collect();
    let [batch, width] = dims[..] else {
        return Err(OnnxError::Input(format!(
            "input '{name}' has {} dimensions; [N, features] is supported",
            dims.len()
        )));
    };
    if let Some(Dim::DimValue(n)) = batch {
        return Err(OnnxError::Input(format!(
            "input '{name}' has a fixed batch size of {n}; export it with a dynamic first dimension (None)"
        )));
    }
    let features = match width {
        Some(Dim::DimValue(f)) if *f > 0 => usize::try_from(*f).unwrap_or(usize::MAX),
        _ => {
            return Err(OnnxError::Input(format!(
                "input '{name}' has no fixed number of features"
            )))
        }
    };
    if features != limits.feature_count {
        return Err(OnnxError::FeatureMismatch {
            declared: limits.feature_count,
            model: features,
        });
    }
    Ok(InputSignature {
        datum_type,
        features,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::tensor_shape_proto::Dimension;
    use tract_onnx::pb::{type_proto, TensorShapeProto, TypeProto, ValueInfoProto};

    fn value(name: &str, elem_type: DataType, dims: &[Option<i64>]) -> ValueInfoProto {
        let dim = dims.iter().map(|d| Dimension {
            value: d.map(Dim::DimValue),
            ..Default::default()
        });
        let shape = Some(TensorShapeProto { dim: dim.collect() });
        let tensor = type_proto::Tensor {
            elem_type: elem_type as i32,
            shape,
        };
        let r#type = Some(TypeProto {
            value: Some(Type::TensorType(tensor)),
            ..Default::default()
        });
        ValueInfoProto {
            name: name.into(),
            r#type,
            ..Default::default()
        }
    }

    fn node(op_type: &str, input: &str, output: &[&str]) -> NodeProto {
        NodeProto {
            op_type: op_type.into(),
            name: format!("{op_type}_node"),
            input: vec![input.into()],
            output: output.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// `X [N, 3] f32 -> Relu -> Y`.
    fn model() -> ModelProto {
        let graph = GraphProto {
            node: vec![node("Relu", "X", &["Y"])],
            input: vec![value("X", DataType::Float, &[None, Some(3)])],
            output: vec![value("Y", DataType::Float, &[None, Some(3)])],
            ..Default::default()
        };
        ModelProto {
            graph: Some(graph),
            ..Default::default()
        }
    }

    fn check(mut proto: ModelProto) -> Result<InputSignature, OnnxError> {
        inspect(&mut proto, &Limits::new(3))
    }

    #[test]
    fn accepts_f32_and_f64_inputs_of_a_dynamic_batch() {
        assert_eq!(
            check(model()).unwrap(),
            InputSignature {
                datum_type: DatumType::F32,
                features: 3
            }
        );
        let mut f64_model = model();
        f64_model.graph.as_mut().unwrap().input[0] = value("X", DataType::Double, &[None, Some(3)]);
        assert_eq!(check(f64_model).unwrap().datum_type, DatumType::F64);
    }

    #[test]
    fn refuses_other_inputs_naming_the_problem() {
        let cases = [
            (
                value("X", DataType::Int64, &[None, Some(3)]),
                "of type Int64; f32 or f64",
            ),
            (
                value("X", DataType::Float, &[Some(1), Some(3)]),
                "fixed batch size of 1",
            ),
            (
                value("X", DataType::Float, &[None, None]),
                "no fixed number of features",
            ),
            (
                value("X", DataType::Float, &[None, Some(3), Some(1)]),
                "3 dimensions",
            ),
        ];
        for (input, message) in cases {
            let mut proto = model();
            proto.graph.as_mut().unwrap().input[0] = input;
            let err = check(proto).unwrap_err().to_string();
            assert!(err.contains(message), "{err}");
        }
        let mut two = model();
        two.graph
            .as_mut()
            .unwrap()
            .input
            .push(value("Z", DataType::Float, &[None, Some(3)]));
        assert!(check(two).unwrap_err().to_string().contains("2 inputs"));
    }

    #[test]
    fn refuses_external_data_and_huge_tensors() {
        let mut external = model();
        let tensor = TensorProto {
            name: "w".into(),
            data_location: Some(DataLocation::External as i32),
            ..Default::default()
        };
        external.graph.as_mut().unwrap().initializer.push(tensor);
        assert!(check(external)
            .unwrap_err()
            .to_string()
            .contains("external data"));
        let mut huge = model();
        let tensor = TensorProto {
            name: "w".into(),
            dims: vec![1 << 20, 1 << 20],
            ..Default::default()
        };
        huge.graph.as_mut().unwrap().initializer.push(tensor);
        assert!(check(huge)
            .unwrap_err()
            .to_string()
            .contains("beyond the size limit"));
    }

    #[test]
    fn refuses_names_nothing_produces() {
        let mut dangling = model();
        dangling.graph.as_mut().unwrap().output[0].name = "Q".into();
        let err = check(dangling).unwrap_err().to_string();
        assert!(
            err.contains("graph output 'Q' is produced by no node"),
            "{err}"
        );
    }

    #[test]
    fn refuses_custom_domains_and_unknown_operators() {
        let mut proto = model();
        let graph = proto.graph.as_mut().unwrap();
        graph.node[0].domain = "com.example".into();
        graph.node.push(node("Frobnicate", "Y", &["Z"]));
        let err = check(proto).unwrap_err().to_string();
        assert_eq!(
            err,
            "unsupported operator(s): Relu (domain com.example, node 'Relu_node'), \
             Frobnicate (node 'Frobnicate_node')"
        );
    }

    #[test]
    fn a_final_zipmap_is_taken_off_and_any_other_refused() {
        let mut proto = model();
        let graph = proto.graph.as_mut().unwrap();
        graph.node.push(node("ZipMap", "Y", &["M"]));
        graph.output[0].name = "M".into();
        check(proto.clone()).unwrap();
        let graph = proto.graph.as_ref().unwrap();
        let mut taken_off = proto.clone();
        inspect(&mut taken_off, &Limits::new(3)).unwrap();
        let outputs = &taken_off.graph.as_ref().unwrap().output;
        assert_eq!((outputs[0].name.as_str(), graph.node.len()), ("Y", 2));
        assert_eq!(taken_off.graph.as_ref().unwrap().node.len(), 1);

        let mut consumed = proto;
        let graph = consumed.graph.as_mut().unwrap();
        graph.node.push(node("Relu", "M", &["R"]));
        graph.output[0].name = "R".into();
        let err = check(consumed).unwrap_err().to_string();
        assert!(err.contains("options={'zipmap': False}"), "{err}");
    }
}
