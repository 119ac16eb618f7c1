//! The engine against onnxruntime, on models scikit-learn trains and skl2onnx
//! exports at test time (`scripts/onnx-fixtures.py`, run once into a temporary
//! directory): each good model loads, and its predictions, row by row and as
//! one batch, match onnxruntime's; each broken file is refused with a message
//! naming the problem; truncated and corrupted files never panic.
//!
//! Needs python3 with scikit-learn, skl2onnx, onnxruntime and onnx
//! (`scripts/ci-python-deps.sh`); `OIP_PYTHON` picks the interpreter, as in
//! that script. `ONNX_TESTS=0` skips these tests (and says so); otherwise a
//! missing package fails them.
//!
//! How predictions are compared: the error of a value is
//! `|tract - onnxruntime| / max(|onnxruntime|, 1)`, so values of magnitude
//! below 1 (probabilities among them) are compared absolutely and larger ones
//! relatively. f32 models run in f32 in both engines, which may sum in a
//! different order: 1e-5 for them, 1e-6 for the linear ones; labels must be
//! equal except where the probability is within the tolerance of 0.5 (a tie).

use ml_onnx::{Kind, Limits, OnnxError, OnnxModel, Output};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const FEATURES: usize = 3;

#[derive(Deserialize)]
struct Fixture {
    name: String,
    kind: String,
    input_dtype: String,
    inputs: Vec<Vec<f64>>,
    expected: Vec<Expected>,
}

#[derive(Deserialize)]
struct Expected {
    value: Option<f64>,
    probability: Option<f64>,
    label: Option<i64>,
}

/// The fixtures directory, made once for all tests of this file.
fn fixtures() -> Option<&'static Path> {
    static DIR: OnceLock<Option<tempfile::TempDir>> = OnceLock::new();
    DIR.get_or_init(|| {
        if std::env::var("ONNX_TESTS").as_deref() == Ok("0") {
            // Written to the process's stderr, past the test harness's capture.
            let skip =
                "ONNX_TESTS=0: skipping the ONNX fixture tests (shared/onnx/tests/fixtures.rs)\n";
            let _ = std::io::Write::write_all(&mut std::io::stderr(), skip.as_bytes());
            return None;
        }
        let dir = tempfile::tempdir().expect("a temporary directory");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/onnx-fixtures.py");
        let python = std::env::var("OIP_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = Command::new(&python)
            .arg(&script)
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run {python}: {e}; install it with scripts/ci-python-deps.sh")
            });
        assert!(
            out.status.success(),
            "{} failed ({}): {}\ninstall the Python packages with scripts/ci-python-deps.sh \
             (or set ONNX_TESTS=0 to skip these tests)",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Some(dir)
    })
    .as_ref()
    .map(|d| d.path())
}

fn path(dir: &Path, file: &str) -> PathBuf {
    dir.join(file)
}

fn load(dir: &Path, name: &str) -> Result<OnnxModel, OnnxError> {
    let bytes = std::fs::read(path(dir, &format!("{name}.onnx"))).expect("fixture file");
    OnnxModel::load(&bytes, &Limits::new(FEATURES))
}

fn fixture(dir: &Path, name: &str) -> Fixture {
    let text = std::fs::read_to_string(path(dir, &format!("{name}.json"))).expect("fixture json");
    serde_json::from_str(&text).expect("fixture json parses")
}

fn error(got: f64, expected: f64) -> f64 {
    (got - expected).abs() / expected.abs().max(1.0)
}

/// The largest error over `outputs` against the fixture's expectations, after
/// checking kinds and labels.
fn max_error(fx: &Fixture, rows: std::ops::Range<usize>, outputs: &[Output], tol: f64) -> f64 {
    assert_eq!(outputs.len(), rows.len(), "{}: one output per row", fx.name);
    let mut worst = 0.0f64;
    for (i, out) in rows.zip(outputs) {
        let want = &fx.expected[i];
        match *out {
            Output::Value(v) => {
                worst = worst.max(error(v, want.value.expect("a regressor fixture")))
            }
            Output::Class { probability, label } => {
                let p = want.probability.expect("a classifier fixture");
                worst = worst.max(error(probability, p));
                let tie = (p - 0.5).abs() <= tol;
                assert!(
                    label == want.label.expect("a label") || tie,
                    "{} row {i}: label {label}, onnxruntime {:?} (p = {p})",
                    fx.name,
                    want.label
                );
            }
        }
    }
    worst
}

/// Loads a good model and compares it with onnxruntime: one batch of every
/// row, then each of the first 50 rows alone. Returns the largest error.
fn compare(name: &str, kind: Kind, tol: f64) {
    let Some(dir) = fixtures() else { return };
    let fx = fixture(dir, name);
    let model = load(dir, name).unwrap_or_else(|e| panic!("{name} loads: {e}"));
    assert_eq!(model.kind(), kind, "{name}");
    assert_eq!(
        fx.kind,
        if kind == Kind::Regressor {
            "regressor"
        } else {
            "classifier"
        }
    );
    assert_eq!(model.feature_count(), FEATURES);
    let n = fx.inputs.len();
    assert!(n >= 200, "{name}: {n} rows");
    let flat: Vec<f64> = fx.inputs.iter().flatten().copied().collect();
    let batch = model.predict(&flat, n).expect("batch predicts");
    let batch_error = max_error(&fx, 0..n, &batch, tol);
    let mut single_error = 0.0f64;
    for (i, row) in fx.inputs.iter().enumerate().take(50) {
        let one = model.predict(row, 1).expect("row predicts");
        single_error = single_error.max(max_error(&fx, i..i + 1, &one, tol));
    }
    println!(
        "{name} ({} input, {n} rows): max error {batch_error:.3e} batched, {single_error:.3e} row by row \
         (tolerance {tol:e})",
        fx.input_dtype
    );
    assert!(
        batch_error <= tol,
        "{name}: batch error {batch_error:e} > {tol:e}"
    );
    assert!(
        single_error <= tol,
        "{name}: row error {single_error:e} > {tol:e}"
    );
}

#[test]
fn linear_regression_matches_onnxruntime() {
    compare("linear_regression", Kind::Regressor, 1e-6);
}

#[test]
fn scaled_logistic_regression_matches_onnxruntime() {
    compare("scaled_logistic", Kind::Classifier, 1e-6);
}

#[test]
fn gradient_boosting_regressor_matches_onnxruntime() {
    compare("gradient_boosting", Kind::Regressor, 1e-5);
}

#[test]
fn random_forest_classifier_with_zipmap_matches_onnxruntime() {
    compare("random_forest", Kind::Classifier, 1e-5);
}

#[test]
fn mlp_regressor_matches_onnxruntime() {
    compare("mlp", Kind::Regressor, 1e-5);
}

#[test]
fn unsupported_operator_is_refused_naming_operator_and_node() {
    let Some(dir) = fixtures() else { return };
    let err = load(dir, "unsupported_operator").unwrap_err();
    assert!(matches!(err, OnnxError::UnsupportedOperators(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "unsupported operator(s): Binarizer (domain ai.onnx.ml, node 'binarize')"
    );
}

#[test]
fn wrong_input_width_is_refused_naming_both_widths() {
    let Some(dir) = fixtures() else { return };
    let err = load(dir, "wrong_width").unwrap_err();
    assert_eq!(
        err.to_string(),
        "the model takes 4 features, but 3 features are declared"
    );
}

#[test]
fn a_classifier_of_more_than_two_classes_is_refused() {
    let Some(dir) = fixtures() else { return };
    let err = load(dir, "multiclass").unwrap_err();
    assert_eq!(
        err.to_string(),
        "unsupported model outputs: 3 classes; binary classifiers are supported"
    );
}

/// tract runs this model (reading past its input in release builds);
/// onnxruntime refuses it.
#[test]
fn a_linear_classifier_inconsistent_with_its_input_is_refused() {
    let Some(dir) = fixtures() else { return };
    let err = load(dir, "inconsistent_linear").unwrap_err();
    assert_eq!(
        err.to_string(),
        "the model could not be prepared: node 'LinearClassifier.matmul' multiplies along an axis of 3 and 6 values"
    );
}

#[test]
fn truncated_and_empty_files_are_refused() {
    let Some(dir) = fixtures() else { return };
    let err = load(dir, "truncated").unwrap_err();
    assert!(matches!(err, OnnxError::Malformed(_)), "{err:?}");
    assert!(
        err.to_string().starts_with("not a valid ONNX model"),
        "{err}"
    );
    let err = load(dir, "empty").unwrap_err();
    assert_eq!(err.to_string(), "the model file is empty (0 bytes)");
}

#[test]
fn a_model_over_the_size_limit_is_refused() {
    let Some(dir) = fixtures() else { return };
    let bytes = std::fs::read(path(dir, "gradient_boosting.onnx")).unwrap();
    let limits = Limits {
        max_bytes: bytes.len() - 1,
        feature_count: FEATURES,
    };
    let err = OnnxModel::load(&bytes, &limits).unwrap_err();
    assert!(matches!(err, OnnxError::TooLarge { .. }), "{err:?}");
}

#[test]
fn a_batch_of_the_wrong_size_is_refused() {
    let Some(dir) = fixtures() else { return };
    let model = load(dir, "mlp").unwrap();
    let err = model.predict(&[1.0; 7], 2).unwrap_err();
    assert_eq!(
        err.to_string(),
        "bad batch: 7 values for 2 rows of 3 features"
    );
    assert_eq!(model.predict(&[], 0).unwrap(), []);
}

/// Every good model cut at many lengths, and with bytes overwritten at many
/// places: each load is a value or a typed error, never a panic of the engine.
#[test]
fn truncated_and_corrupted_models_never_panic() {
    let Some(dir) = fixtures() else { return };
    let mut tried = 0;
    for name in [
        "linear_regression",
        "scaled_logistic",
        "gradient_boosting",
        "random_forest",
        "mlp",
    ] {
        let bytes = std::fs::read(path(dir, &format!("{name}.onnx"))).unwrap();
        let step = (bytes.len() / 200).max(1);
        for cut in (0..bytes.len()).step_by(step) {
            let result = OnnxModel::load(&bytes[..cut], &Limits::new(FEATURES));
            assert!(
                !matches!(result, Err(OnnxError::Panicked(_))),
                "{name} cut at {cut}: {result:?}"
            );
            assert!(
                result.is_err() || cut > bytes.len() / 2,
                "{name} cut at {cut} loads"
            );
            tried += 1;
        }
        for (i, at) in (0..bytes.len()).step_by(step).enumerate() {
            let mut corrupt = bytes.clone();
            corrupt[at] = [0xff, 0x00, 0x80, 0x7f][i % 4];
            let result = OnnxModel::load(&corrupt, &Limits::new(FEATURES));
            assert!(
                !matches!(result, Err(OnnxError::Panicked(_))),
                "{name} byte {at}: {result:?}"
            );
            if let Ok(model) = result {
                // A corrupted threshold or weight still gives a model; it must run.
                let _ = model.predict(&[0.5, -1.0, 2.0], 1);
            }
            tried += 1;
        }
    }
    println!("{tried} truncated or corrupted files, no panic");
}
