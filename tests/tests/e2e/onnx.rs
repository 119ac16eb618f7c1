//! Imported ONNX models end to end: a real `nats-server`, registry, predictor
//! (and trainer) processes, and `mlctl import`. Models are scikit-learn's,
//! trained on the test's own data file by `scripts/onnx-import-fixtures.py`
//! on the raw features `feature_1,feature_2` and exported with skl2onnx,
//! with onnxruntime's outputs for every user of the file.
//!
//! Checked: each of the five families (a linear regression, a scaler and
//! logistic regression pipeline, a gradient-boosted regressor, a random
//! forest classifier, a small MLP) and a linear regression on a derived
//! feature is registered with the registry's own holdout metrics
//! (recomputed here from onnxruntime's outputs), promoted, and served:
//! single and batch predictions equal onnxruntime's (1e-6 for the linear
//! ones, 1e-5 for the others); bad files are
//! refused (by `mlctl` and by the registry itself) naming the problem, with
//! production untouched; promotions native → ONNX → native under load fail
//! no request.
//!
//! Needs python3 with scikit-learn, skl2onnx, onnxruntime and onnx
//! (`scripts/ci-python-deps.sh`; `OIP_PYTHON` picks the interpreter);
//! `ONNX_TESTS=0` skips these tests (and says so).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use ml_shared::gen::Target;
use ml_shared::messages::ImportRequest;
use ml_shared::model::{ModelKind, OnnxGraph};
use ml_tests::services::{binary, Process};
use ml_tests::wait_for;
use serde::Deserialize;
use serde_json::Value;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(20);
const FEATURES: &str = "feature_1,feature_2";

#[derive(Deserialize)]
struct Manifest {
    user_ids: Vec<String>,
}

/// onnxruntime's output for one user.
#[derive(Deserialize)]
pub(crate) struct Expected {
    pub(crate) value: Option<f64>,
    pub(crate) probability: Option<f64>,
    pub(crate) label: Option<u8>,
}

impl Expected {
    /// A regressor's value or a classifier's probability of class 1.
    pub(crate) fn output(&self) -> f64 {
        self.value.or(self.probability).expect("an output")
    }
}

/// The data file, the fixtures made from it, the services and a client.
pub(crate) struct Stack {
    pub(crate) bed: Bed,
    pub(crate) fixtures: PathBuf,
    pub(crate) user_ids: Vec<String>,
    pub(crate) client: Client,
    _processes: Vec<Process>,
}

impl Stack {
    /// `rows` users of a `target` data file, fixtures trained on it, a
    /// registry and a predictor (with `predictor_env` too), and a trainer
    /// when `trainer`; `None` when `ONNX_TESTS=0`.
    pub(crate) async fn start(
        rows: usize,
        target: Target,
        trainer: bool,
        predictor_env: &[(&str, &str)],
    ) -> Option<Stack> {
        if std::env::var("ONNX_TESTS").as_deref() == Ok("0") {
            let skip = "ONNX_TESTS=0: skipping the ONNX import tests (tests/tests/e2e/onnx.rs)\n";
            let _ = std::io::Write::write_all(&mut std::io::stderr(), skip.as_bytes());
            return None;
        }
        ml_tests::init_logging();
        let bed = Bed::new(rows, 11);
        let file = std::fs::File::create(&bed.data).expect("data file");
        ml_shared::gen::write_csv_with(std::io::BufWriter::new(file), rows, 11, target)
            .expect("write the data");
        let fixtures = bed.dir.path().join("onnx");
        make_fixtures(&bed.data, &fixtures);
        let manifest: Manifest = read_json(&fixtures.join("manifest.json"));
        let registry_dir = bed.dir.path().join("registry");
        let env = [
            ("NATS_URL", bed.url.as_str()),
            ("DATA_PATH", bed.data.to_str().unwrap()),
            ("REGISTRY_DIR", registry_dir.to_str().unwrap()),
            ("MODEL_POLL", "200ms"),
            ("EVENTS", "off"),
            ("TRAIN_INTERVAL", "1h"),
        ];
        let log = |name: &str| bed.dir.path().join(format!("{name}.log"));
        let mut names = vec!["registry", "predictor"];
        if trainer {
            names.push("trainer");
        }
        let processes = names
            .into_iter()
            .map(|name| {
                let mut env = env.to_vec();
                if name == "predictor" {
                    env.extend_from_slice(predictor_env);
                }
                Process::start(name, &[], &env, &log(name))
            })
            .collect();
        let client = client(&bed.url).await;
        ml_tests::registry_answers(&client, WAIT).await;
        Some(Stack {
            bed,
            fixtures,
            user_ids: manifest.user_ids,
            client,
            _processes: processes,
        })
    }

    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.fixtures.join(format!("{name}.onnx"))
    }

    pub(crate) fn expected(&self, name: &str) -> Vec<Expected> {
        let v: Value = read_json(&self.fixtures.join(format!("{name}.json")));
        serde_json::from_value(v["expected"].clone()).expect("expected outputs")
    }

    /// `mlctl import` of fixture `name` with `extra` flags, declaring the
    /// features it was trained on (`feature_1,feature_2` for the bad files).
    pub(crate) fn import(&self, name: &str, extra: &[&str]) -> Output {
        let file = self.file(name);
        let features = std::fs::read_to_string(self.fixtures.join(format!("{name}.json")))
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|v| v["features"].as_array().cloned())
            .map(|f| {
                f.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_else(|| FEATURES.to_owned());
        Command::new(binary("mlctl"))
            .args(["import", file.to_str().unwrap(), "--features", &features])
            .args(extra)
            .env("NATS_URL", &self.bed.url)
            .env("USER", "ops")
            .output()
            .expect("run mlctl")
    }

    /// Imports fixture `name` and returns the registry's reply.
    pub(crate) fn import_ok(&self, name: &str, extra: &[&str]) -> Value {
        let out = self.import(name, extra);
        assert!(
            out.status.success(),
            "mlctl import {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("the registry's JSON reply")
    }

    pub(crate) async fn models(&self) -> Value {
        request_json(&self.client, "ml.registry.models", "").await
    }

    pub(crate) async fn promote(&self, version: u64) {
        let body = format!(r#"{{"version":{version},"reason":"test","actor":"ops"}}"#);
        let reply = request_json(&self.client, "ml.registry.promote", &body).await;
        assert_eq!(reply["to"].as_u64(), Some(version), "{reply}");
    }

    /// The trainer's first version (native), once it is production and
    /// served (a stack started with a trainer).
    pub(crate) async fn native_production(&self) -> u64 {
        let native = wait_for("a native version in production", WAIT, || async {
            self.models().await["production"].as_u64()
        })
        .await;
        self.served(native).await;
        native
    }

    /// Waits until the predictor answers with `version`.
    pub(crate) async fn served(&self, version: u64) {
        let body = format!(r#"{{"user_id":"{}"}}"#, self.user_ids[0]);
        wait_for(&format!("version {version} served"), WAIT, || async {
            let m = self
                .client
                .request("ml.predict", body.clone().into())
                .await
                .ok()?;
            let v: Value = serde_json::from_slice(&m.payload).ok()?;
            (v["model_version"].as_u64() == Some(version)).then_some(())
        })
        .await;
    }

    /// Single predictions (every 7th user) and one batch of every user
    /// equal onnxruntime's outputs for fixture `name`.
    pub(crate) async fn assert_serves(&self, name: &str, version: u64) {
        let (expected, tol) = (self.expected(name), tolerance(name));
        for (i, id) in self.user_ids.iter().enumerate().step_by(7) {
            let body = format!(r#"{{"user_id":"{id}"}}"#);
            let reply = request_json(&self.client, "ml.predict", &body).await;
            assert_eq!(reply["model_version"].as_u64(), Some(version), "{reply}");
            let label = reply["label"].as_u64().map(|l| l as u8);
            assert_output(&expected[i], (reply["prediction"].as_f64(), label), tol);
        }
        // Every user, with an unknown id in the middle: one tensor call for
        // the known ones, `null` for the unknown one, in request order.
        let half = self.user_ids.len() / 2;
        let mut ids: Vec<&str> = self.user_ids.iter().map(String::as_str).collect();
        ids.insert(half, "nobody");
        let body = serde_json::json!({ "user_ids": ids }).to_string();
        let reply = request_json(&self.client, "ml.predict", &body).await;
        assert_eq!(reply["model_version"].as_u64(), Some(version), "{reply}");
        assert_eq!(reply["unknown_user_ids"], serde_json::json!(["nobody"]));
        let predictions = reply["predictions"].as_array().expect("predictions");
        assert_eq!(predictions.len(), ids.len());
        assert!(predictions[half].is_null() && reply["labels"][half].is_null());
        for (i, p) in predictions.iter().enumerate().filter(|(i, _)| *i != half) {
            let label = reply["labels"][i].as_u64().map(|l| l as u8);
            let row = if i < half { i } else { i - 1 };
            assert_output(&expected[row], (p.as_f64(), label), tol);
        }
    }
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture JSON")
}

fn make_fixtures(data: &Path, out: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/onnx-import-fixtures.py");
    let python = std::env::var("OIP_PYTHON").unwrap_or_else(|_| "python3".into());
    let run = Command::new(&python)
        .arg(&script)
        .arg(data)
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        run.status.success(),
        "{} failed ({}): {}\ninstall the Python packages with scripts/ci-python-deps.sh \
         (or set ONNX_TESTS=0 to skip these tests)",
        script.display(),
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
}

/// `|got - want| <= 1e-5 · max(|want|, 1)`: relative for values above 1,
/// absolute for probabilities.
fn close(got: f64, want: f64) -> bool {
    close_within(got, want, 1e-5)
}

/// `|got - want| <= tolerance · max(|want|, 1)`.
pub(crate) fn close_within(got: f64, want: f64, tolerance: f64) -> bool {
    (got - want).abs() <= tolerance * want.abs().max(1.0)
}

/// How close fixture `name`'s served predictions must be to onnxruntime's:
/// 1e-6 for a linear model (the same arithmetic in f64), 1e-5 for the
/// others (f32 inputs, trees, activations).
pub(crate) fn tolerance(name: &str) -> f64 {
    if name.starts_with("linear") {
        1e-6
    } else {
        1e-5
    }
}

fn assert_output(expected: &Expected, served: (Option<f64>, Option<u8>), tolerance: f64) {
    let (prediction, label) = served;
    let got = prediction.expect("a prediction");
    let want = expected.output();
    assert!(
        close_within(got, want, tolerance),
        "served {got}, onnxruntime {want} (tolerance {tolerance:e})"
    );
    if expected.probability.is_some() && (want - 0.5).abs() > tolerance {
        assert_eq!(label, expected.label, "label of probability {want}");
    }
    if expected.value.is_some() {
        assert_eq!(label, None, "a regressor has no label");
    }
}

/// The holdout rows' targets and onnxruntime's predictions on them (the
/// registry's default rule: seed 42, a fifth of the users).
pub(crate) fn holdout(
    data: &Path,
    user_ids: &[String],
    expected: &[Expected],
) -> (Vec<f64>, Vec<f64>) {
    let targets: std::collections::HashMap<String, f64> = read_rows(data)
        .into_iter()
        .map(|(id, _, _, t)| (id, t))
        .collect();
    user_ids
        .iter()
        .zip(expected)
        .filter(|(id, _)| ml_shared::holdout::is_holdout(id, 0.2, 42))
        .map(|(id, e)| (targets[id], e.output()))
        .unzip()
}

pub(crate) fn version_of(reply: &Value) -> u64 {
    reply["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("{reply}"))
}

/// The listing's entry of `version`.
pub(crate) fn summary(models: &Value, version: u64) -> Value {
    models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["version"].as_u64() == Some(version))
        .unwrap_or_else(|| panic!("version {version} in {models}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_regressors_are_evaluated_promoted_and_served_as_onnxruntime_predicts() {
    let Some(stack) = Stack::start(400, Target::Regression, false, &[]).await else {
        return;
    };
    // linear_derived takes feature_3 = feature_1², computed by the feature
    // store in the registry and the predictor as for a native model.
    for (name, extra) in [
        ("linear", &["--kind", "regressor"][..]),
        ("gbr", &[][..]),
        ("mlp", &[][..]),
        ("linear_derived", &[][..]),
    ] {
        let reply = stack.import_ok(name, extra);
        let version = version_of(&reply);
        let models = stack.models().await;
        let model = summary(&models, version);
        assert_eq!(model["kind"], "onnx_regressor", "{model}");
        let declared: Value = read_json(&stack.fixtures.join(format!("{name}.json")));
        assert_eq!(model["feature_names"], declared["features"]);
        // The registry's RMSE is its own, on its holdout.
        let (truth, predicted) = holdout(&stack.bed.data, &stack.user_ids, &stack.expected(name));
        let want = ml_shared::evaluation::regression_metrics(&truth, &predicted);
        let rmse = model["metrics"]["rmse"].as_f64().expect("rmse");
        assert!(
            close(rmse, want.rmse.unwrap()),
            "rmse {rmse} vs {:?}",
            want.rmse
        );
        if models["production"].as_u64() != Some(version) {
            stack.promote(version).await;
        }
        stack.served(version).await;
        stack.assert_serves(name, version).await;
    }
    // The lineage: who imported which file (its digest), in the listing
    // and in the experiments log.
    let models = stack.models().await;
    let first = summary(&models, version_of(&serde_json::json!({"version": 1})));
    assert!(
        first["run_id"].as_str().unwrap().starts_with("import-ops-"),
        "{first}"
    );
    let digest = ml_shared::model::sha256_hex(&std::fs::read(stack.file("linear")).unwrap());
    assert_eq!(first["data_fingerprint"], format!("sha256:{digest}"));
    let runs = request_json(&stack.client, "ml.registry.runs", "").await;
    let rows = runs["runs"].as_array().expect("runs");
    assert_eq!(rows.len(), 4, "{runs}");
    assert!(rows.iter().all(|r| r["model"] == "onnx"), "{runs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_classifiers_serve_onnxruntimes_probability_and_label() {
    let Some(stack) = Stack::start(400, Target::Binary, false, &[]).await else {
        return;
    };
    let reply = stack.import_ok(
        "classifier",
        &["--kind", "classifier", "--reason", "pipeline"],
    );
    let version = version_of(&reply);
    assert_eq!(reply["production"], true, "the first model: {reply}");
    let model = summary(&stack.models().await, version);
    assert_eq!(model["kind"], "onnx_classifier");
    let (truth, predicted) = holdout(
        &stack.bed.data,
        &stack.user_ids,
        &stack.expected("classifier"),
    );
    let want = ml_shared::evaluation::classification_metrics(&truth, &predicted);
    let accuracy = model["metrics"]["accuracy"].as_f64().expect("accuracy");
    assert!(close(accuracy, want.accuracy.unwrap()), "{model}");
    stack.served(version).await;
    stack.assert_serves("classifier", version).await;
    // A random forest, its probabilities behind skl2onnx's default ZipMap.
    let forest = version_of(&stack.import_ok("random_forest", &[]));
    let model = summary(&stack.models().await, forest);
    assert_eq!(model["kind"], "onnx_classifier", "{model}");
    let (truth, predicted) = holdout(
        &stack.bed.data,
        &stack.user_ids,
        &stack.expected("random_forest"),
    );
    let want = ml_shared::evaluation::classification_metrics(&truth, &predicted);
    // Log-loss: continuous in the probabilities (the forest's many ties
    // could order differently in the last bit, moving the AUC).
    let log_loss = model["metrics"]["log_loss"].as_f64().expect("log_loss");
    assert!(close(log_loss, want.log_loss.unwrap()), "{model}");
    if stack.models().await["production"].as_u64() != Some(forest) {
        stack.promote(forest).await;
    }
    stack.served(forest).await;
    stack.assert_serves("random_forest", forest).await;
    // A regressor declared a classifier is refused, locally and by the registry.
    let out = stack.import("classifier", &["--kind", "regressor"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("declared onnx_regressor"), "{stderr}");
    let bytes = std::fs::read(stack.file("classifier")).unwrap();
    let reply = raw_import(&stack.client, bytes, Some(ModelKind::OnnxRegressor)).await;
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("declared onnx_regressor"), "{message}");
}

/// Sends an import to the registry directly (no local check), as `kind`.
async fn raw_import(client: &Client, bytes: Vec<u8>, kind: Option<ModelKind>) -> Value {
    let import = ImportRequest {
        graph: OnnxGraph::new(bytes),
        kind,
        feature_names: vec!["feature_1".into(), "feature_2".into()],
        file_name: "raw.onnx".into(),
        actor: "ops".into(),
        reason: "direct".into(),
        read_ms: 1,
    };
    request_json_bytes(client, ml_shared::codec::encode(&import)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_imports_are_refused_naming_the_problem_and_production_is_untouched() {
    // The predictor loads models of at most 2,000 bytes: the linear model
    // (355 bytes) but not the gradient-boosted one.
    let small = [("ONNX_MAX_BYTES", "2000")];
    let Some(stack) = Stack::start(300, Target::Regression, false, &small).await else {
        return;
    };
    let version = version_of(&stack.import_ok("linear", &[]));
    stack.served(version).await;
    let before = stack.models().await;
    for (name, problem) in [
        ("unsupported_operator", "unsupported operator(s): Binarizer"),
        (
            "wrong_width",
            "the model takes 3 features, but 2 features are declared",
        ),
        ("truncated", "not a valid ONNX model"),
        ("empty", "the model file is empty (0 bytes)"),
    ] {
        let out = stack.import(name, &[]);
        assert!(!out.status.success(), "{name} imported");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("bad_request") && stderr.contains(problem),
            "{name}: {stderr}"
        );
        // The registry does not trust the client: the same bytes, sent
        // without mlctl's check, are refused by the registry itself.
        let bytes = std::fs::read(stack.file(name)).unwrap();
        let reply = raw_import(&stack.client, bytes, None).await;
        assert_eq!(reply["error"]["code"], "bad_request", "{name}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(problem), "{name}: {message}");
    }
    // A file whose bytes do not match the digest sent with them.
    let mut request = ImportRequest {
        graph: OnnxGraph::new(std::fs::read(stack.file("linear")).unwrap()),
        kind: None,
        feature_names: vec!["feature_1".into(), "feature_2".into()],
        file_name: "linear.onnx".into(),
        actor: "ops".into(),
        reason: "tampered".into(),
        read_ms: 1,
    };
    request.graph.bytes.push(0);
    let reply = request_json_bytes(&stack.client, ml_shared::codec::encode(&request)).await;
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sha256"),
        "{reply}"
    );
    assert_eq!(
        stack.models().await,
        before,
        "nothing registered, production untouched"
    );
    stack.assert_serves("linear", version).await;

    // A version the registry accepts but a predictor cannot load is never
    // installed there: the current one keeps serving.
    let gbr = version_of(&stack.import_ok("gbr", &[]));
    if stack.models().await["production"].as_u64() != Some(gbr) {
        stack.promote(gbr).await;
    }
    let log = stack.bed.dir.path().join("predictor.log");
    wait_for("the predictor refuses the version", WAIT, || async {
        let text = std::fs::read_to_string(&log).ok()?;
        (text.contains("refused; keeping the current")
            && text.contains("more than the limit of 2000"))
        .then_some(())
    })
    .await;
    stack.assert_serves("linear", version).await;
}

async fn request_json_bytes(client: &Client, body: Vec<u8>) -> Value {
    let reply = request(client, "ml.registry.import", body).await;
    serde_json::from_slice(&reply.payload).expect("JSON reply")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_native_onnx_native_under_load_fail_no_request() {
    let Some(stack) = Stack::start(400, Target::Regression, true, &[]).await else {
        return;
    };
    // The trainer's first run: a native version in production.
    let native = stack.native_production().await;
    let reply = stack.import_ok("gbr", &[]);
    let onnx = version_of(&reply);
    // The gate compares an ONNX regressor with a native one on the same rows.
    let reason = reply["gate"]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("vs production v{native}'s")),
        "{reply}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let lanes: Vec<_> = (0..4)
        .map(|lane| {
            let (client, stop) = (stack.client.clone(), stop.clone());
            let ids = stack.user_ids.clone();
            tokio::spawn(async move {
                let mut outcomes: Vec<Result<u64, String>> = Vec::new();
                let mut i = lane * 31;
                while !stop.load(Ordering::Relaxed) {
                    let body = if i % 5 == 0 {
                        serde_json::json!({ "user_ids": &ids[i % 300..i % 300 + 50] }).to_string()
                    } else {
                        format!(r#"{{"user_id":"{}"}}"#, ids[i % ids.len()])
                    };
                    i += 1;
                    outcomes.push(match client.request("ml.predict", body.into()).await {
                        Ok(m) => {
                            let v: Value =
                                serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                            v["model_version"].as_u64().ok_or_else(|| v.to_string())
                        }
                        Err(e) => Err(e.to_string()),
                    });
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                outcomes
            })
        })
        .collect();
    for version in [onnx, native, onnx, native] {
        stack.promote(version).await;
        stack.served(version).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0;
    for lane in lanes {
        let outcomes = tokio::time::timeout(WAIT, lane)
            .await
            .expect("lane stops")
            .unwrap();
        let failures: Vec<&String> = outcomes.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failures.is_empty(),
            "{} failed, e.g. {:?}",
            failures.len(),
            failures.first()
        );
        total += outcomes.len();
        seen.extend(outcomes.into_iter().map(Result::unwrap));
    }
    assert!(total > 100, "only {total} requests");
    assert_eq!(
        seen,
        [native, onnx].into_iter().collect(),
        "both engines answered"
    );
}
