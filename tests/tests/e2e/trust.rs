//! The registry's trust boundary and durable state, attacked and broken as
//! an adversary or an unlucky operator would, against a real `nats-server`
//! running the shipped configuration (accounts and users) and the real
//! binaries: hostile submissions, listings that could outgrow the payload
//! limit, a torn history line after a crash, a registry reset.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::Client;
use ml_shared::codec;
use ml_shared::messages::{Metrics, RunRecord, Submission, TrainParams};
use ml_shared::model::ModelArtifact;
use ml_tests::services::Process;
use ml_tests::wait_for;
use serde_json::Value;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(20);

/// A submission of `artifact` claiming `metrics`.
fn submission(run_id: &str, artifact: ModelArtifact, metrics: Metrics) -> Submission {
    Submission {
        run: RunRecord {
            run_id: run_id.into(),
            started_ms: ml_shared::time::now_ms(),
            duration_ms: 1,
            params: TrainParams {
                model: "linear".into(),
                seed: 42,
                validation_fraction: 0.2,
            },
            metrics,
            rows_train: 160,
            rows_validation: 40,
            data_path: "exact.csv".into(),
            data_fingerprint: "sha256:00".into(),
            feature_names: artifact.feature_names.clone(),
        },
        artifact,
    }
}

/// An honest submission: the exact model moved by `offset`, claiming the
/// RMSE it has.
fn honest(run_id: &str, offset: f64) -> Submission {
    submission(
        run_id,
        exact_artifact(offset),
        Metrics::regression(offset.abs(), offset.abs(), 0.9),
    )
}

/// The registry's JSON reply to a submission.
async fn submit(trainer: &Client, s: &Submission) -> Value {
    let m = request(trainer, "ml.registry.submit", codec::encode(s)).await;
    serde_json::from_slice(&m.payload).expect("a JSON reply")
}

/// A registry process under the shipped configuration, storing into `dir`
/// with `holdout` as its holdout data.
fn registry(shipped: &Shipped, dir: &Path, holdout: &Path, log: &Path) -> Process {
    let mut env = shipped.env("registry");
    env.push(("REGISTRY_DIR".into(), dir.to_str().unwrap().into()));
    env.push((
        "REGISTRY_HOLDOUT_PATH".into(),
        holdout.to_str().unwrap().into(),
    ));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Process::start("registry", &[], &env, log)
}

/// The registry's answer on a listing subject, once it answers.
async fn listing(admin: &Client, subject: &str, body: &str) -> (Value, usize) {
    wait_for("the registry answers", WAIT, || async {
        let m = admin
            .request(subject.to_owned(), body.to_owned().into())
            .await
            .ok()?;
        Some((serde_json::from_slice(&m.payload).ok()?, m.payload.len()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_submissions_are_refused_and_listings_never_outgrow_a_reply() {
    ml_tests::init_logging();
    let shipped = Shipped::start();
    let dir = ml_tests::temp_dir();
    let holdout = dir.path().join("exact.csv");
    write_exact_data(&holdout, 200);
    let _registry = registry(
        &shipped,
        &dir.path().join("registry"),
        &holdout,
        &dir.path().join("registry.log"),
    );
    let (trainer, _) = shipped.connect("trainer").await;
    let (admin, _) = shipped.connect("admin").await;
    listing(&admin, "ml.registry.models", "").await;
    let first = submit(&trainer, &honest("run-first", 0.5)).await;
    assert_eq!(
        (first["version"].as_u64(), first["production"].as_bool()),
        (Some(1), Some(true)),
        "{first}"
    );

    let unknown_feature = {
        let mut a = exact_artifact(0.0);
        a.feature_names[2] = "feature_9".into();
        a
    };
    let huge = ModelArtifact {
        coefficients: vec![1e308, 1e308, 1e308],
        ..exact_artifact(0.0)
    };
    let hostile = [
        (
            "an unknown feature",
            submission(
                "run-unknown",
                unknown_feature,
                Metrics::regression(0.01, 0.01, 0.99),
            ),
            "unknown feature \"feature_9\"",
        ),
        (
            "coefficients of 1e308",
            submission("run-huge", huge, Metrics::regression(0.01, 0.01, 0.99)),
            "not a finite number",
        ),
        (
            "a claimed RMSE of -1",
            submission(
                "run-negative",
                exact_artifact(0.0),
                Metrics::regression(-1.0, 0.0, 1.0),
            ),
            "rmse -1 is outside its possible range",
        ),
        (
            "a run id of 900 KB",
            honest(&"x".repeat(900_000), 0.0),
            "run_id",
        ),
        (
            "a data path of 900 KB",
            {
                let mut s = honest("run-path", 0.0);
                s.run.data_path = "p".repeat(900_000);
                s
            },
            "data_path",
        ),
    ];
    for (what, s, reason) in &hostile {
        let reply = submit(&trainer, s).await;
        assert_eq!(reply["error"]["code"], "bad_request", "{what}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(reason),
            "{what}: {message:?} lacks {reason:?}"
        );
    }
    // A better claim than the truth counts for nothing: the registry's own
    // figure decides, and this model is worse than production on it.
    let liar = submission(
        "run-liar",
        exact_artifact(2.0),
        Metrics::regression(0.001, 0.001, 0.999),
    );
    let reply = submit(&trainer, &liar).await;
    assert_eq!(reply["production"], false, "{reply}");
    assert!(
        (reply["gate"]["candidate"].as_f64().unwrap() - 2.0).abs() < 1e-9,
        "{reply}"
    );

    // Production untouched, every refused submission unstored.
    let (models, _) = listing(&admin, "ml.registry.models", "").await;
    assert_eq!(
        (models["production"].as_u64(), models["total"].as_u64()),
        (Some(1), Some(2)),
        "{models}"
    );

    // Many versions with the longest text fields allowed: every listing
    // stays within a reply, and paging reaches every entry.
    let long = "r".repeat(1000);
    for i in 0..130 {
        let mut s = honest(&format!("run-{i:03}-{}", &long[..990]), 0.5);
        s.run.data_path = long.clone();
        s.run.data_fingerprint = long.clone();
        assert!(submit(&trainer, &s).await["version"].is_u64());
    }
    let mut seen = Vec::new();
    let total = loop {
        let body = format!(r#"{{"limit":500,"offset":{}}}"#, seen.len());
        let (page, bytes) = listing(&admin, "ml.registry.runs", &body).await;
        assert!(bytes <= 512 * 1024, "a runs page of {bytes} bytes");
        let runs = page["runs"].as_array().unwrap();
        assert!(!runs.is_empty(), "{page}");
        seen.splice(
            0..0,
            runs.iter()
                .map(|r| r["run_id"].as_str().unwrap().to_owned()),
        );
        let total = page["total"].as_u64().unwrap() as usize;
        if seen.len() >= total {
            break total;
        }
    };
    assert_eq!((total, seen.len()), (132, 132));
    assert_eq!(seen[0], "run-first");
    let (models, bytes) = listing(&admin, "ml.registry.models", r#"{"limit":500}"#).await;
    assert!(
        bytes <= 512 * 1024 && models["total"] == 132,
        "{bytes} bytes, total {}",
        models["total"]
    );
    let (history, bytes) = listing(&admin, "ml.registry.history", "").await;
    assert!(
        bytes <= 512 * 1024 && history["moves"].as_array().unwrap().len() <= 100,
        "{bytes}"
    );
    let (refused, _) = listing(&admin, "ml.registry.models", r#"{"limit":100000}"#).await;
    assert_eq!(refused["error"]["code"], "bad_request", "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_history_line_after_a_crash_is_restored_and_the_registry_starts_again() {
    ml_tests::init_logging();
    let shipped = Shipped::start();
    let dir = ml_tests::temp_dir();
    let holdout = dir.path().join("exact.csv");
    write_exact_data(&holdout, 200);
    let store = dir.path().join("registry");
    let log = |i: u32| dir.path().join(format!("registry-{i}.log"));
    let mut first = registry(&shipped, &store, &holdout, &log(1));
    let (trainer, _) = shipped.connect("trainer").await;
    let (admin, _) = shipped.connect("admin").await;
    listing(&admin, "ml.registry.models", "").await;
    submit(&trainer, &honest("run-a", 0.5)).await;
    submit(&trainer, &honest("run-b", 0.25)).await;
    let promote = |v: u64| {
        let admin = admin.clone();
        async move {
            let body = format!(r#"{{"version":{v},"reason":"check","actor":"olivia"}}"#);
            let m = request(&admin, "ml.registry.promote", body).await;
            serde_json::from_slice::<Value>(&m.payload).unwrap()
        }
    };
    let acked = promote(1).await;
    let epoch = acked["epoch"].as_u64().expect("acknowledged");
    first.signal("KILL");
    assert!(first.terminate(WAIT).is_some(), "the registry is gone");
    // The crash tore the last line of the history after production.json
    // was written.
    let history = store.join("history.jsonl");
    let text = std::fs::read(&history).unwrap();
    std::fs::write(&history, &text[..text.len() - 9]).unwrap();

    let mut second = registry(&shipped, &store, &holdout, &log(2));
    let (models, _) = listing(&admin, "ml.registry.models", "").await;
    assert_eq!(
        models["production"], 1,
        "the acknowledged move holds: {models}"
    );
    let next = promote(2).await;
    assert_eq!(next["epoch"].as_u64(), Some(epoch + 1), "{next}");
    assert!(second.terminate(WAIT).is_some_and(|s| s.success()));

    let _third = registry(&shipped, &store, &holdout, &log(3));
    let (history, _) = listing(&admin, "ml.registry.history", "").await;
    let moves = history["moves"].as_array().unwrap();
    for (i, m) in moves.iter().enumerate() {
        assert_eq!(m["seq"].as_u64(), Some(i as u64 + 1), "{history}");
    }
    let restored = &moves[moves.len() - 2];
    assert_eq!(
        (restored["action"].as_str(), restored["to"].as_u64()),
        (Some("recovery"), Some(1)),
        "{restored}"
    );
    assert_eq!(moves.last().unwrap()["to"], 2);
    let (models, _) = listing(&admin, "ml.registry.models", "").await;
    assert_eq!(models["production"], 2, "{models}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_reset_is_said_loudly_and_the_fleet_follows_the_registry() {
    ml_tests::init_logging();
    let shipped = Shipped::start();
    let dir = ml_tests::temp_dir();
    let data = dir.path().join("exact.csv");
    write_exact_data(&data, 200);
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let mut old = registry(
        &shipped,
        &dir.path().join("old"),
        &data,
        &log("registry-old"),
    );
    let mut env = shipped.env("predictor");
    env.extend([
        ("DATA_PATH".into(), data.to_str().unwrap().into()),
        ("MODEL_POLL".into(), "200ms".into()),
        ("MODEL_RECONCILE".into(), "500ms".into()),
    ]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let _predictor = Process::start("predictor", &[], &env, &log("predictor"));
    let (trainer, _) = shipped.connect("trainer").await;
    let (client, _) = shipped.connect("client").await;
    let (admin, _) = shipped.connect("admin").await;
    listing(&admin, "ml.registry.models", "").await;
    submit(&trainer, &honest("run-old", 0.5)).await;
    // On exact data the prediction is the target plus the model's offset.
    let rows = read_rows(&data);
    let (user, target) = (rows[3].0.clone(), rows[3].3);
    let offset = || {
        let client = client.clone();
        let body = format!(r#"{{"user_id":"{user}"}}"#);
        async move {
            let m = client.request("ml.predict", body.into()).await.ok()?;
            let v: Value = serde_json::from_slice(&m.payload).ok()?;
            Some(v["prediction"].as_f64()? - target)
        }
    };
    wait_for("the old registry's model served", WAIT, || async {
        offset().await.filter(|o| (o - 0.5).abs() < 1e-9)
    })
    .await;
    assert!(old.terminate(WAIT).is_some_and(|s| s.success()));

    // The registry's directory is lost: a new one starts empty.
    let fresh: PathBuf = dir.path().join("fresh");
    let _new = registry(&shipped, &fresh, &data, &log("registry-new"));
    listing(&admin, "ml.registry.models", "").await;
    let said = |name: &str| {
        std::fs::read_to_string(log(name))
            .unwrap()
            .contains("registry reset")
    };
    // The predictor reconciles (every 500 ms) with the old registry's model
    // in hand: the new registry, still empty, says so.
    wait_for("the new registry hears of the old model", WAIT, || async {
        said("registry-new").then_some(())
    })
    .await;
    let reply = submit(&trainer, &honest("run-new", 0.25)).await;
    assert_eq!(reply["version"], 1, "{reply}");
    wait_for("the new registry's model served", WAIT, || async {
        offset().await.filter(|o| (o - 0.25).abs() < 1e-9)
    })
    .await;
    assert!(said("predictor"), "the predictor says nothing of the reset");
}
