//! The operator registry: tract-onnx's operators plus the ONNX-ML operators
//! skl2onnx emits that tract-onnx does not register (`Scaler`,
//! `TreeEnsembleRegressor`), and tract-onnx's `TreeEnsembleClassifier`
//! wrapped (checked tables, labels from the probabilities).

pub mod scaler;
pub mod tree;
pub mod tree_classifier;
pub mod tree_eval;
pub mod tree_regressor;

use std::sync::LazyLock;
use tract_onnx::Onnx;

/// The operators this crate adds to tract-onnx's.
pub const ADDED_OPERATORS: &[&str] = &["Scaler", "TreeEnsembleRegressor"];

static ONNX: LazyLock<Onnx> = LazyLock::new(|| {
    let mut onnx = tract_onnx::onnx();
    onnx.op_register.insert("Scaler", scaler::build);
    onnx.op_register
        .insert("TreeEnsembleRegressor", tree_regressor::build);
    onnx.op_register
        .insert("TreeEnsembleClassifier", tree_classifier::build);
    onnx
});

/// The ONNX framework with the added operators (built once).
pub fn onnx() -> &'static Onnx {
    &ONNX
}

/// Whether the engine runs `op_type` of the default or the ONNX-ML domain.
pub fn is_supported(op_type: &str) -> bool {
    onnx().op_register.0.contains_key(op_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_added_operators_are_registered_and_others_are_not() {
        for op in ADDED_OPERATORS
            .iter()
            .chain(&["TreeEnsembleClassifier", "LinearClassifier"])
        {
            assert!(is_supported(op), "{op}");
        }
        for op in ["Binarizer", "ZipMap", "SVMRegressor", "Imputer"] {
            assert!(!is_supported(op), "{op}");
        }
    }
}
