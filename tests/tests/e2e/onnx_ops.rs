//! An imported ONNX version in operation, beside native ones: real
//! `nats-server`, registry, predictor and trainer processes, `mlctl import`
//! (the stack of [`crate::onnx`]), and an in-process monitor.
//!
//! Checked: the registry profiles an imported model on its holdout at
//! import (10 quantile bins of each feature, recomputed here, and of its
//! predictions, here onnxruntime's), so the monitor measures drift for an
//! ONNX production version and fires the drift alert on shifted traffic
//! only; an ONNX version is a 10% canary beside a native production
//! version, each variant answering with its own model's prediction; and an
//! ONNX shadow never answers, its difference from production reported.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use ml_shared::features::FeatureRegistry;
use ml_shared::gen::Target;
use ml_shared::holdout::is_holdout;
use ml_shared::model::ModelArtifact;
use ml_shared::profile::{Bins, DEFAULT_BINS};
use rand::SeedableRng;
use serde_json::{json, Value};

use crate::common::*;
use crate::monitoring::{drift_fires_on_shifted_traffic_only, drift_monitor};
use crate::onnx::{close_within, tolerance, version_of, Stack};

const WAIT: Duration = Duration::from_secs(20);

/// A version's artifact as the registry stored it.
fn stored_artifact(stack: &Stack, version: u64) -> ModelArtifact {
    let path: PathBuf = stack
        .bed
        .dir
        .path()
        .join("registry")
        .join(registry::store::model_file(version));
    registry::store::read_model(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .artifact
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_version_is_profiled_at_import_and_checked_for_drift() {
    // Load with timing-dependent windows: not alongside the other heavy tests.
    let _heavy = HEAVY.lock().await;
    let events = [("EVENTS", "on"), ("EVENT_FLUSH", "50ms")];
    let Some(stack) = Stack::start(3000, Target::Regression, false, &events).await else {
        return;
    };
    let version = version_of(&stack.import_ok("gbr", &[]));
    stack.served(version).await;

    // The profile: the holdout rows' features, binned as a trainer bins its
    // training split, and the model's predictions on them.
    let profile = stored_artifact(&stack, version)
        .profile
        .expect("an imported version carries a reference profile");
    let expected = stack.expected("gbr");
    let rows = read_rows(&stack.bed.data);
    let holdout: Vec<usize> = (0..rows.len())
        .filter(|i| is_holdout(&rows[*i].0, 0.2, 42))
        .collect();
    assert_eq!(profile.rows, holdout.len() as u64);
    let column = |f: &dyn Fn(usize) -> f64| -> Bins {
        let values: Vec<f64> = holdout.iter().map(|i| f(*i)).collect();
        Bins::from_values(&values, DEFAULT_BINS).unwrap()
    };
    assert_eq!(profile.features[0].name, "feature_1");
    assert_eq!(profile.features[0].bins, column(&|i| rows[i].1));
    assert_eq!(profile.features[1].bins, column(&|i| rows[i].2));
    let ort = column(&|i| expected[i].output());
    assert_eq!(profile.prediction.len(), ort.len(), "{profile:?}");
    for (edge, want) in profile.prediction.edges.iter().zip(&ort.edges) {
        assert!(close_within(*edge, *want, 1e-5), "edge {edge} vs {want}");
    }

    // The monitor checks the ONNX production version's drift.
    let (monitor, out) = drift_monitor(&stack.bed.url, stack.bed.dir.path());
    let mut alerts = stack.client.subscribe("ml.alerts").await.unwrap();
    stack.client.flush().await.unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
    let notice =
        drift_fires_on_shifted_traffic_only(&stack.client, &mut alerts, &mut rng, &out).await;
    println!("ONNX production v{version}: drift alert {notice}");
    let detail = notice["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(&format!("model=v{version}")), "{notice}");
    monitor.stop().await;
}

/// Native version `version`'s own arithmetic on row `k`'s features from the
/// data file (not through the predictor).
fn native_arithmetic(stack: &Stack, version: u64) -> impl Fn(usize) -> f64 + '_ {
    let artifact = stored_artifact(stack, version);
    let plan = FeatureRegistry::default()
        .plan(&artifact.feature_names)
        .unwrap();
    let raw: HashMap<String, [f64; 2]> = read_rows(&stack.bed.data)
        .into_iter()
        .map(|(id, f1, f2, _)| (id, [f1, f2]))
        .collect();
    move |k| artifact.predict(&plan.compute(&raw[&stack.user_ids[k]]))
}

/// Sends `n` single requests, one user each (row `k % users`), 16 at a
/// time; returns each row with its reply.
async fn replies(stack: &Stack, n: usize) -> Vec<(usize, Value)> {
    let users = stack.user_ids.len();
    futures::stream::iter(0..n)
        .map(|k| {
            let client = stack.client.clone();
            let body = json!({ "user_id": stack.user_ids[k % users] }).to_string();
            async move {
                let reply = request(&client, "ml.predict", body.into_bytes()).await;
                let v: Value = serde_json::from_slice(&reply.payload).expect("JSON reply");
                (k % users, v)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_onnx_canary_beside_a_native_production_answers_with_each_models_prediction() {
    let Some(stack) = Stack::start(1000, Target::Regression, true, &[]).await else {
        return;
    };
    let native = stack.native_production().await;
    let onnx = version_of(&stack.import_ok("linear", &[]));
    if stack.models().await["production"].as_u64() != Some(native) {
        stack.promote(native).await;
    }
    let body =
        json!({"candidates":[{"version":onnx,"percent":10}],"reason":"onnx canary","actor":"ops"});
    let set = request_json(&stack.client, "ml.registry.route", &body.to_string()).await;
    assert_eq!(set["changed"], true, "{set}");
    ml_tests::wait_for("the predictor serves the table", WAIT, || async {
        let (_, v) = replies(&stack, 1).await.pop()?;
        v["variant"].as_str().map(|_| ())
    })
    .await;

    let native_predicts = native_arithmetic(&stack, native);
    let ort = stack.expected("linear");
    let answers = replies(&stack, 4000).await;
    let mut canary = 0;
    for (row, reply) in &answers {
        let got = reply["prediction"]
            .as_f64()
            .unwrap_or_else(|| panic!("{reply}"));
        let version = reply["model_version"].as_u64();
        match reply["variant"].as_str() {
            Some("production") => {
                assert_eq!(version, Some(native), "{reply}");
                let want = native_predicts(*row);
                assert_close(got, want, 1e-12);
            }
            Some("candidate") => {
                assert_eq!(version, Some(onnx), "{reply}");
                let want = ort[*row].output();
                assert!(
                    close_within(got, want, tolerance("linear")),
                    "{got} vs onnxruntime {want}"
                );
                canary += 1;
            }
            _ => panic!("no variant: {reply}"),
        }
    }
    let share = canary as f64 / answers.len() as f64;
    println!(
        "native v{native} / ONNX v{onnx} 90/10: canary share {:.2}% of {}",
        share * 100.0,
        answers.len()
    );
    assert!((share - 0.10).abs() <= 0.03, "canary share {share}");
}

/// An ONNX version as the shadow of a native production version: every
/// reply is production's own, and the monitor's mean absolute difference
/// between the two equals the test's, from the native model's arithmetic and
/// onnxruntime's outputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_onnx_shadow_beside_a_native_production_never_answers_and_is_compared() {
    let events = [("EVENTS", "on"), ("EVENT_FLUSH", "50ms")];
    let Some(stack) = Stack::start(1000, Target::Regression, true, &events).await else {
        return;
    };
    let native = stack.native_production().await;
    let onnx = version_of(&stack.import_ok("linear", &[]));
    if stack.models().await["production"].as_u64() != Some(native) {
        stack.promote(native).await;
    }
    let (monitor, _out) = drift_monitor(&stack.bed.url, stack.bed.dir.path());
    let body = json!({"shadow":{"version":onnx,"percent":50},"reason":"onnx shadow","actor":"ops"});
    let set = request_json(&stack.client, "ml.registry.route", &body.to_string()).await;
    assert_eq!(set["changed"], true, "{set}");
    // The first reply under the table (row 0) may be shadowed too.
    let first = ml_tests::wait_for("the predictor serves the table", WAIT, || async {
        let (row, v) = replies(&stack, 1).await.pop()?;
        v["variant"].is_string().then_some((row, v))
    })
    .await;
    let mut answers = replies(&stack, 2000).await;
    answers.push(first);

    let native_predicts = native_arithmetic(&stack, native);
    let ort = stack.expected("linear");
    let (mut diff, mut shadowed) = (0.0, 0usize);
    for (row, reply) in &answers {
        assert_eq!(reply["variant"], "production", "{reply}");
        assert_eq!(reply["model_version"].as_u64(), Some(native), "{reply}");
        let got = reply["prediction"].as_f64().unwrap();
        let want = native_predicts(*row);
        assert_close(got, want, 1e-12);
        // Which requests the shadow runs on follows from their request_id.
        if ml_shared::routing::shadowed(reply["request_id"].as_str().unwrap(), 50) {
            diff += (got - ort[*row].output()).abs();
            shadowed += 1;
        }
    }
    let mad = diff / shadowed as f64;
    let key = onnx.to_string();
    let stats = ml_tests::wait_for("the monitor counts every shadow run", WAIT, || async {
        let s = request_json(&stack.client, "ml.monitor.stats", "").await;
        (s["total"]["shadow"][&key]["count"].as_u64()? == shadowed as u64).then_some(s)
    })
    .await;
    let shadow = &stats["total"]["shadow"][&key];
    let reported = shadow["mean_abs_diff"].as_f64().unwrap();
    println!(
        "native v{native} / ONNX shadow v{onnx}: mean |difference| monitor {reported}, test {mad}"
    );
    // onnxruntime and the engine agree to 1e-6 of each prediction.
    let scale = answers
        .iter()
        .map(|(_, r)| r["prediction"].as_f64().unwrap().abs())
        .fold(1.0, f64::max);
    assert!((reported - mad).abs() <= 1e-5 * scale, "{shadow}");
    assert!(mad > 1e-3, "the two models differ: {mad}");
    assert_eq!(stats["total"]["shadow_dropped"], 0, "{stats}");
    monitor.stop().await;
}
