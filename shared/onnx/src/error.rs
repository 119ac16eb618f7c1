//! The typed errors of the engine: every refusal names what is wrong, so that a
//! registry can hand it back to the person who exported the model.

use thiserror::Error;

/// An operator the engine cannot run, and the node that uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedOperator {
    /// The ONNX operator type (`op_type`).
    pub op_type: String,
    /// The operator's domain (empty for the default ONNX domain).
    pub domain: String,
    /// The node's name (or `#index` when the node has none).
    pub node: String,
}

impl std::fmt::Display for UnsupportedOperator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.domain.is_empty() {
            write!(f, "{} (node '{}')", self.op_type, self.node)
        } else {
            write!(
                f,
                "{} (domain {}, node '{}')",
                self.op_type, self.domain, self.node
            )
        }
    }
}

/// Why a model was refused at load, or a prediction failed.
#[derive(Debug, Error)]
pub enum OnnxError {
    /// A 0-byte model file.
    #[error("the model file is empty (0 bytes)")]
    Empty,
    /// The file is larger than [`crate::Limits::max_bytes`].
    #[error("the model file is {size} bytes, more than the limit of {max} bytes")]
    TooLarge {
        /// The file's size in bytes.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// The bytes are not an ONNX protobuf (a truncated or foreign file).
    #[error("not a valid ONNX model: {0}")]
    Malformed(String),
    /// Operators the engine does not run.
    #[error("unsupported operator(s): {}", list(.0))]
    UnsupportedOperators(Vec<UnsupportedOperator>),
    /// The model's input is not a single float tensor of shape [N, features].
    #[error("unsupported model input: {0}")]
    Input(String),
    /// The model's input width is not the declared feature count.
    #[error("the model takes {model} features, but {declared} features are declared")]
    FeatureMismatch {
        /// The feature count the caller declared.
        declared: usize,
        /// The width of the model's input.
        model: usize,
    },
    /// The outputs follow neither the regressor nor the binary classifier convention.
    #[error("unsupported model outputs: {0}")]
    Output(String),
    /// The model is well-formed but the engine could not prepare it.
    #[error("the model could not be prepared: {0}")]
    Prepare(String),
    /// The engine panicked on this model (a defect of the engine, reported, not propagated).
    #[error("the model could not be loaded (engine failure: {0})")]
    Panicked(String),
    /// The rows given to `predict` do not match the model.
    #[error("bad batch: {0}")]
    Batch(String),
    /// The engine failed while running the model.
    #[error("inference failed: {0}")]
    Run(String),
}

fn list(ops: &[UnsupportedOperator]) -> String {
    ops.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Formats a tract error with its causes on one line.
pub(crate) fn chain(err: &tract_onnx::prelude::TractError) -> String {
    err.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}
