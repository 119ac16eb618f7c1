//! The pipeline, end to end, with the services in-process on a private
//! `nats-server`: train, register, publish, serve, monitor, retrain, restart.

use std::time::Duration;

use ml_tests::services::{self, Service};
use ml_tests::{wait_for, NatsServer};
use serde_json::Value;

use crate::common::*;

const PREDICT: &str = "ml.predict";
const WAIT: Duration = Duration::from_secs(15);

/// The version and reply of a successful prediction; `None` while there is
/// no predictor or no model yet.
async fn predict_version(client: &async_nats::Client, body: &str) -> Option<(u64, Value)> {
    let message = client.request(PREDICT, body.to_owned().into()).await.ok()?;
    let reply: Value = serde_json::from_slice(&message.payload).ok()?;
    reply["model_version"].as_u64().map(|v| (v, reply))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trains_registers_serves_monitors_and_retrains() {
    ml_tests::init_logging();
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = ml_tests::temp_dir();
    let data = dir.path().join("users.csv");
    let registry_dir = dir.path().join("registry");
    write_data(&data, 3000, 7);

    let registry = services::registry(&url, &registry_dir, &data);
    let predictor = services::predictor(&url, &data);
    let monitor = services::monitor(&url, "1s");
    let trainer = services::trainer(&url, &data, "1h");
    let client = client(&url).await;

    // The trainer's first run (at start) becomes version 1 and reaches the predictor.
    let rows = read_rows(&data);
    let (user, f1, f2, _) = rows[17].clone();
    let body = format!(r#"{{"user_id":"{user}"}}"#);
    let (version, reply) = wait_for("version 1 served", WAIT, || async {
        predict_version(&client, &body).await
    })
    .await;
    assert_eq!(version, 1, "{reply}");
    assert_eq!(reply["user_id"], user.as_str());

    // The prediction is the least-squares fit on the same training split,
    // solved here independently.
    let (train_rows, _) = trainer::pipeline::split(rows.iter().map(|r| r.0.as_str()), 0.2, 42);
    let beta = least_squares(&rows, &train_rows);
    assert_close(
        reply["prediction"].as_f64().unwrap(),
        predict(&beta, f1, f2),
        1e-6,
    );

    // Raw features for an entity that is not in the store.
    let reply = request_json(
        &client,
        PREDICT,
        r#"{"features":{"feature_1":0.3,"feature_2":1.5}}"#,
    )
    .await;
    assert_close(
        reply["prediction"].as_f64().unwrap(),
        predict(&beta, 0.3, 1.5),
        1e-6,
    );
    assert!(reply.get("user_id").is_none(), "{reply}");

    // Bad requests get structured errors with the micro-service headers, and
    // the predictor keeps serving.
    for (body, code, status) in [
        ("{not json", "bad_request", "400"),
        ("", "bad_request", "400"),
        (r#"{"user_id":"nobody"}"#, "unknown_user", "404"),
        (r#"{"user_id":"a","features":{}}"#, "bad_request", "400"),
        (r#"{"features":{"feature_1":1}}"#, "bad_request", "400"),
    ] {
        let message = request(&client, PREDICT, body.to_owned()).await;
        let reply: Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(reply["error"]["code"], code, "{body:?} -> {reply}");
        assert!(reply["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        let headers = message.headers.expect("error headers");
        assert_eq!(
            headers.get("Nats-Service-Error-Code").map(|v| v.as_str()),
            Some(status)
        );
        assert_eq!(
            headers.get("Nats-Service-Error").map(|v| v.as_str()),
            Some(code)
        );
    }
    assert_eq!(predict_version(&client, &body).await.map(|v| v.0), Some(1));

    // A batch: one prediction per user, in order, null for unknown users.
    let batch = format!(
        r#"{{"user_ids":["{}","nobody","{}"]}}"#,
        rows[17].0, rows[3].0
    );
    let reply = request_json(&client, PREDICT, &batch).await;
    let predictions = reply["predictions"]
        .as_array()
        .unwrap_or_else(|| panic!("{reply}"));
    assert_eq!(predictions.len(), 3);
    assert_close(
        predictions[0].as_f64().unwrap(),
        predict(&beta, f1, f2),
        1e-6,
    );
    assert!(predictions[1].is_null());
    assert_close(
        predictions[2].as_f64().unwrap(),
        predict(&beta, rows[3].1, rows[3].2),
        1e-6,
    );
    assert_eq!(reply["unknown_user_ids"], serde_json::json!(["nobody"]));
    assert_eq!(reply["model_version"], 1);

    // The monitor saw the requests: successes on version 1, and the errors.
    let stats = wait_for("monitor totals", WAIT, || async {
        let s = request_json(&client, "ml.monitor.stats", "").await;
        // Every request counted: the polling while no model was served adds
        // `no_model` events before them.
        let counted = s["total"]["versions"]["1"].as_u64() >= Some(3)
            && s["total"]["errors"]["bad_request"].as_u64() >= Some(4)
            && s["total"]["errors"]["unknown_user"].as_u64() >= Some(1);
        counted.then_some(s)
    })
    .await;
    assert!(
        stats["total"]["versions"]["1"].as_u64() >= Some(3),
        "{stats}"
    );
    assert_eq!(stats["total"]["errors"]["unknown_user"], 1, "{stats}");
    assert_eq!(stats["total"]["errors"]["bad_request"], 4, "{stats}");
    assert!(
        stats["total"]["versions"]["1"].as_u64() >= Some(4),
        "{stats}"
    );
    assert!(
        stats["total"]["latency_ms"]["p99"]
            .as_f64()
            .is_some_and(|p| p > 0.0),
        "{stats}"
    );

    // A predictor started after the publication serves the production model
    // at once: stop the first so that the new one answers every request.
    predictor.stop().await;
    let late = services::predictor(&url, &data);
    let (version, _) = wait_for("late predictor serves", WAIT, || async {
        predict_version(&client, &body).await
    })
    .await;
    assert_eq!(version, 1);

    // New data, training on demand: version 2, and the predictor switches.
    write_data(&data, 3000, 8);
    let rows = read_rows(&data);
    let train = request_json(&client, "ml.train", "").await;
    assert_eq!(train["version"], 2, "{train}");
    assert_eq!(train["production"], true, "{train}");
    assert!(
        train["run"]["metrics"]["r2"].as_f64().unwrap() > 0.99,
        "{train}"
    );
    let (user, f1, f2, _) = rows[5].clone();
    let body = format!(r#"{{"user_id":"{user}"}}"#);
    let (version, reply) = wait_for("version 2 served with the new data", WAIT, || async {
        predict_version(&client, &body)
            .await
            .filter(|(v, _)| *v == 2)
    })
    .await;
    assert_eq!(version, 2);
    let (train_rows, _) = trainer::pipeline::split(rows.iter().map(|r| r.0.as_str()), 0.2, 42);
    let beta = least_squares(&rows, &train_rows);
    assert_close(
        reply["prediction"].as_f64().unwrap(),
        predict(&beta, f1, f2),
        1e-6,
    );

    // The registry, restarted, still has both versions and both runs.
    registry.stop().await;
    let registry = services::registry(&url, &registry_dir, &data);
    let models = wait_for("restarted registry answers", WAIT, || async {
        let reply = client.request("ml.registry.models", "".into()).await.ok()?;
        serde_json::from_slice::<Value>(&reply.payload).ok()
    })
    .await;
    let versions: Vec<u64> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2], "{models}");
    assert_eq!(models["production"], 2);
    let runs = request_json(&client, "ml.registry.runs", "").await;
    assert_eq!(runs["runs"].as_array().unwrap().len(), 2, "{runs}");
    let log = std::fs::read_to_string(registry_dir.join("experiments.csv")).unwrap();
    assert_eq!(log.lines().count(), 3, "header and two runs:\n{log}");
    assert!(log.starts_with("timestamp,version,run_id,"), "{log}");

    for service in [trainer, monitor, late, registry] {
        service.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_predictor_without_a_model_answers_no_model_then_serves() {
    ml_tests::init_logging();
    let Bed {
        nats: _nats,
        url,
        dir,
        data,
    } = Bed::new(200, 1);
    let predictor = services::predictor(&url, &data);
    let client = client(&url).await;

    let body = r#"{"features":{"feature_1":1.0,"feature_2":2.0}}"#;
    let reply = wait_for("predictor up", WAIT, || async {
        let m = client.request(PREDICT, body.into()).await.ok()?;
        Some(m)
    })
    .await;
    let json: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(json["error"]["code"], "no_model", "{json}");
    assert_eq!(
        reply
            .headers
            .unwrap()
            .get("Nats-Service-Error-Code")
            .map(|v| v.as_str()),
        Some("503")
    );

    // The registry comes up later, the trainer trains: the predictor serves.
    let registry = services::registry(&url, &dir.path().join("registry"), &data);
    let trainer = services::trainer(&url, &data, "1h");
    let (version, _) = wait_for("first model served", WAIT, || async {
        predict_version(&client, body).await
    })
    .await;
    assert_eq!(version, 1);
    for service in [trainer, registry, predictor] {
        service.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_registers_nothing_and_says_why() {
    ml_tests::init_logging();
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = ml_tests::temp_dir();
    let data = dir.path().join("users.csv");
    std::fs::write(
        &data,
        "user_id,feature_1,feature_2,target\na,1,2,3\nb,1,2,4\nc,2,oops,5\nd,3,1,2\ne,1,1,1\n",
    )
    .unwrap();
    let registry = services::registry(&url, &dir.path().join("registry"), &data);
    let trainer = services::trainer(&url, &data, "0");
    let client = client(&url).await;
    // The registry first: a failed run is reported to it once, when the
    // run fails (a registry still starting would miss the report).
    ml_tests::registry_answers(&client, WAIT).await;

    let reply = wait_for("trainer answers", WAIT, || async {
        let m = client.request("ml.train", "".into()).await.ok()?;
        serde_json::from_slice::<Value>(&m.payload).ok()
    })
    .await;
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("users.csv:4"),
        "line number in {message:?}"
    );
    assert!(message.contains("feature_2"), "column in {message:?}");

    let models = request_json(&client, "ml.registry.models", "").await;
    assert_eq!(models["models"].as_array().unwrap().len(), 0, "{models}");
    assert_eq!(models["production"], Value::Null);
    // The experiments log has the failed run, with its reason.
    let runs = wait_for("the failed run logged", WAIT, || async {
        let r = request_json(&client, "ml.registry.runs", "").await;
        (r["runs"].as_array()?.len() == 1).then_some(r)
    })
    .await;
    let run = &runs["runs"][0];
    assert_eq!(run["status"], "failed", "{runs}");
    assert_eq!(run["version"], Value::Null, "{runs}");
    assert!(
        run["reason"].as_str().unwrap().contains("users.csv:4"),
        "{runs}"
    );
    for service in [trainer, registry] {
        service.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trainers_submitting_at_once_get_distinct_versions() {
    ml_tests::init_logging();
    let Bed {
        nats: _nats,
        url,
        dir,
        data,
    } = Bed::new(500, 3);
    let registry = services::registry(&url, &dir.path().join("registry"), &data);
    let trainers: Vec<Service> = (0..2)
        .map(|_| services::trainer(&url, &data, "0"))
        .collect();
    let client = client(&url).await;
    // A first run that registers a version: both the trainers and the
    // registry are up (a reply alone could be the trainer's "registry
    // unavailable" while the registry is still starting).
    wait_for("a first run registers a version", WAIT, || async {
        let m = client.request("ml.train", "".into()).await.ok()?;
        let reply: Value = serde_json::from_slice(&m.payload).ok()?;
        reply["version"].as_u64()
    })
    .await;

    let replies = futures::future::join_all((0..6).map(|_| {
        let client = client.clone();
        async move { request_json(&client, "ml.train", "").await }
    }))
    .await;
    let mut versions: Vec<u64> = replies
        .iter()
        .map(|r| r["version"].as_u64().unwrap_or_else(|| panic!("{r}")))
        .collect();
    versions.sort();
    versions.dedup();
    assert_eq!(versions.len(), 6, "distinct versions: {versions:?}");
    let models = request_json(&client, "ml.registry.models", "").await;
    assert_eq!(models["models"].as_array().unwrap().len(), 7);
    for service in trainers.into_iter().chain([registry]) {
        service.stop().await;
    }
}
