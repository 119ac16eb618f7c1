//! The ONNX engine layer: "bring your own model".
//!
//! [`OnnxModel::load`] takes the bytes of an ONNX file (scikit-learn models
//! exported with skl2onnx), bounded in size, and refuses with a typed
//! [`OnnxError`] anything it cannot serve: a file that is not ONNX, an
//! operator the engine lacks (named with its node), an input that is not one
//! `[N, features]` f32/f64 tensor of the declared width, outputs that are
//! neither a regressor's nor a binary classifier's. The model is optimised
//! once with a symbolic batch dimension, so [`OnnxModel::predict`] runs any
//! number of rows in one call.
//!
//! Inference is tract (pure Rust), with two ONNX-ML operators added that
//! tract-onnx does not register: `Scaler` and `TreeEnsembleRegressor`
//! ([`ops`]).
//!
//! [`Scorer`] puts native artifacts and ONNX ones behind one interface, for
//! the registry (holdout metrics) and the predictors (serving).

mod error;
mod inspect;
mod model;
pub mod ops;
mod scorer;

pub use error::{OnnxError, UnsupportedOperator};
pub use model::{Kind, Limits, OnnxModel, Output};
pub use scorer::{onnx_kind, Scorer, ScorerError};
